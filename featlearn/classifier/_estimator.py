"""The MLP / one-vs-all L2-SVM estimator: its parameters, fit dispatch (L-BFGS or adam/sgd),
``partial_fit`` and set-up; predictions and pickling are shared (``_base``, ``_state``)."""

from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from .._logging import log
from . import _lbfgs, _network, _stochastic
from ._base import BaseTorchClassifier
from ._contract import CLASS_DOC, PARAMETER_CONSTRAINTS
from ._data import (class_codes, encode_labels, row_weights, split_views, tensor_view,
                    validated_features)
from ._standardize import Standardizer, feature_stats


#: ``max_iter=None``: L-BFGS stops on its own once converged, so its cap is only a safeguard (the
#: paper's 1000); adam/sgd run every epoch (scikit-learn's MLPClassifier default).
DEFAULT_MAX_ITER = {"lbfgs": 1000, "adam": 200, "sgd": 200}


class TorchMLPClassifier(BaseTorchClassifier):
    __doc__ = CLASS_DOC

    _parameter_constraints = {**BaseTorchClassifier._parameter_constraints,
                              **PARAMETER_CONSTRAINTS}

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", dropout=0.0,
                 input_dropout=0.0, batch_norm=False, loss="cross_entropy", alpha=1e-4, C=None,
                 class_weight=None, solver="auto", learning_rate_init=1e-3, momentum=0.9,
                 nesterov=True, lr_schedule="cosine", batch_size=200, max_iter=None,
                 early_stopping=False, validation_fraction=0.1, n_iter_no_change=5, tol=1e-4,
                 standardize=True, precision="float32", precondition="auto", n_views=1,
                 device="auto", random_state=None, verbose=0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.batch_norm = batch_norm
        self.loss = loss
        self.alpha = alpha
        self.C = C
        self.class_weight = class_weight
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.momentum = momentum
        self.nesterov = nesterov
        self.lr_schedule = lr_schedule
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.standardize = standardize
        self.precision = precision
        self.precondition = precondition
        self.n_views = n_views
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ training

    def fit(self, X, y, sample_weight=None):
        """Initialize a new model and train it on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            ``n_views`` equal blocks of columns when ``n_views > 1``.
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Multiplies each sample's loss (times ``class_weight``).

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = validated_features(self, X, y, reset=True)
        classes, codes = class_codes(y, "TorchMLPClassifier")
        weight = row_weights(sample_weight, self.class_weight, X, codes, classes)
        self._check_hyper()
        self.classes_, self.solver_ = classes, self._resolve_solver()
        if self.solver_ == "lbfgs":  # full-batch products over X need it as float32
            X = X.astype(np.float32, copy=False)
        X, codes, weight = split_views(X, self.n_views, codes, weight)
        self._initialize(X, weight)
        t0 = time.perf_counter()
        dev = torch.device(self.device_)
        Xt = tensor_view(X).to(dev)
        yt = torch.from_numpy(codes.astype(np.int64)).to(dev)
        wt = None if weight is None else torch.from_numpy(weight).to(dev)
        if self.solver_ == "lbfgs":
            self._fit_lbfgs(Xt, yt, wt)
        else:
            self._fit_stochastic(Xt, yt, wt, codes)
        log(self.verbose, "TorchMLPClassifier: %s, %d iterations, objective %.6g (%.1f s)",
            self.solver_, self.n_iter_, self.loss_curve_[-1], time.perf_counter() - t0)
        return self

    @available_if(lambda self: self._resolve_solver() != "lbfgs")
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch of adam/sgd over ``(X, y)`` at ``learning_rate_init``, keeping the state.

        The first call needs ``classes`` (all labels that will ever be seen) unless :meth:`fit`
        ran before; it also fixes the standardization statistics from its ``X``, so make the
        first batch representative (or pre-standardize and pass ``standardize=False``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), default=None
        sample_weight : array-like of shape (n_samples,), default=None
            Relative weights within this call (times a dict ``class_weight``).

        Returns
        -------
        self
        """
        first = not hasattr(self, "classes_")
        if first:
            self._validate_params()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            classes = np.unique(np.asarray(classes))
            if len(classes) < 2:
                raise ValueError(f"partial_fit needs at least 2 classes, got {classes.tolist()}")
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)),
                                                         self.classes_):
            raise ValueError(f"classes={classes!r} differs from classes_={self.classes_!r} "
                             "of the earlier calls")
        if self.class_weight == "balanced":
            raise ValueError("class_weight='balanced' needs the whole training set: pass a dict "
                             "of class weights to partial_fit, or use fit")
        X, y = validated_features(self, X, y, reset=first)
        check_classification_targets(y)
        codes = encode_labels(y, classes if first else self.classes_)
        weight = row_weights(sample_weight, self.class_weight, X, codes,
                             classes if first else self.classes_)
        if first:
            self._check_hyper()
            self.classes_, self.solver_ = classes, self._resolve_solver()
        X, codes, weight = split_views(X, self.n_views, codes, weight)
        if first:
            self._initialize(X, weight)
        dev = self._model_device()
        optimizer = self._optimizer()
        for g in optimizer.param_groups:
            g["lr"] = self.learning_rate_init
        wt = None if weight is None else torch.from_numpy(weight).to(dev)
        loss = self._epoch(optimizer, tensor_view(X).to(dev), torch.from_numpy(codes).to(dev),
                           wt, torch.arange(len(codes)), None)
        self.loss_curve_.append(loss)
        self.n_iter_ += 1
        self.best_epoch_ = self.n_iter_ - 1
        return self

    def _fit_stochastic(self, Xt, yt, wt, codes):
        self._train_epochs(
            codes, self._max_iter,
            lambda optimizer, rows, schedule: self._epoch(optimizer, Xt, yt, wt, rows, schedule),
            lambda val: _stochastic.accuracy(self.model_, Xt, yt, val, self._standardizer()))

    def _epoch(self, optimizer, Xt, yt, wt, rows, schedule):
        return _stochastic.run_epoch(
            self.model_, optimizer, Xt, yt, wt, rows, batch_size=self.batch_size,
            loss=self.loss, alpha=self._alpha, standardizer=self._standardizer(),
            generator=self._generator(), dropout_generator=self._dropout_generator(),
            precision=self.precision_, scheduler=schedule)

    def _fit_lbfgs(self, Xt, yt, wt):
        self.model_.train()

        def on_eval(value):
            self.loss_curve_.append(value)
            log(self.verbose, "lbfgs evaluation %d: loss %.6f", len(self.loss_curve_), value,
                level=2)

        common = dict(standardizer=self._standardizer(), loss=self.loss, alpha=self._alpha,
                      max_iter=self._max_iter, on_eval=on_eval)
        if self.hidden_layer_sizes:
            self.n_iter_ = _lbfgs.fit_network(self.model_, Xt, yt, wt, **common)
        else:
            precondition = (Xt.shape[1] <= _lbfgs.PRECONDITION_MAX_FEATURES
                            if self.precondition == "auto" else bool(self.precondition))
            self.n_iter_ = _lbfgs.fit_linear(self.model_, Xt, yt, wt, precondition=precondition,
                                             generator=self._generator(), **common)
        for p in self.model_.parameters():
            p.grad = None
        self.best_epoch_ = self.n_iter_ - 1
        if not np.isfinite(self.loss_curve_[-1]):
            raise FloatingPointError("L-BFGS diverged (non-finite loss)")

    # ------------------------------------------------------------------ inference

    def _forward_numpy(self, X):
        """Scores ``(n_samples, n_outputs)``, in memory-bounded chunks, views averaged."""
        check_is_fitted(self)
        X = validated_features(self, X, reset=False)
        n = len(X)
        (X,) = split_views(X, self.n_views)
        scores = _network.scores(self.model_, tensor_view(X), self._standardizer())
        return scores.reshape(n, self.n_views, -1).mean(axis=1)

    # ------------------------------------------------------------------ set-up

    def _initialize(self, X, weight=None):
        """Fresh statistics, network, generators and history."""
        dev = self._start_fit()
        if self.standardize:
            self.mean_, self.scale_ = feature_stats(X, weight)
        else:
            self.mean_ = np.zeros(X.shape[1], np.float32)
            self.scale_ = np.ones(X.shape[1], np.float32)
        self._std = Standardizer(self.mean_, self.scale_, dev, self.standardize)
        n_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        self.model_ = _network.build_network(
            X.shape[1], tuple(self.hidden_layer_sizes), n_out, activation=self.activation,
            dropout=self.dropout, input_dropout=self.input_dropout, batch_norm=self.batch_norm,
            generator=self._rng).to(dev)
        self._reset_history()

    @property
    def _alpha(self):
        return 1.0 / self.C if self.C is not None else float(self.alpha)

    @property
    def _max_iter(self):
        if self.max_iter is not None:
            return self.max_iter
        return DEFAULT_MAX_ITER[self._resolve_solver()]

    def _resolve_solver(self):
        """"auto": L-BFGS for a linear model (a convex, deterministic objective), else adam."""
        if self.solver != "auto":
            return self.solver
        linear = len(self.hidden_layer_sizes) == 0 and self.input_dropout == 0
        return "lbfgs" if linear else "adam"

    def _check_hyper(self):
        if any(not isinstance(h, numbers.Integral) or h < 1 for h in self.hidden_layer_sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got "
                             f"{self.hidden_layer_sizes!r}")
        if self._resolve_solver() == "lbfgs" and (self.input_dropout > 0 or (
                self.dropout > 0 and len(self.hidden_layer_sizes) > 0)):
            raise ValueError("solver='lbfgs' needs a deterministic objective: set dropout=0 "
                             "and input_dropout=0 (or use adam/sgd)")
