"""The estimator's state: set up for a fit, private parts rebuilt on demand, pickled as plain data.

Generators, the optimizer and the device copy of the statistics are not fitted state: they are
rebuilt on demand from fitted attributes (and, after unpickling, from the saved generator and
optimizer states), so a model restored from plain data still predicts and trains on.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .._logging import log
from .._torch import make_generator, resolve_device, resolve_precision, state_to_cpu
from . import _stochastic
from ._standardize import Standardizer


class PrivateStateMixin:
    """Set-up, lazily built private state and CPU pickling of the torch classifiers."""

    def _start_fit(self):
        """Resolve the device and precision and seed the private generator; returns the device."""
        dev = resolve_device(self.device)
        self.device_ = str(dev)
        self.precision_ = resolve_precision(self.precision, dev)
        self._rng = make_generator(self.random_state)
        return dev

    def _reset_history(self):
        """No optimizer state, no dropout generator, an empty history (a fresh network's)."""
        self._optim = self._optim_state = self._rng_state = None
        self._dropout_gen = None
        self.loss_curve_, self.validation_scores_ = [], []
        self.best_epoch_, self.n_iter_ = 0, 0

    def _train_epochs(self, codes, max_iter, epoch, score):
        """The stochastic training loop of every torch classifier here.

        ``codes``: class codes of the training rows (views repeated), for the validation split.
        ``epoch(optimizer, rows, schedule) -> mean loss`` runs one epoch over ``rows``;
        ``score(val_rows) -> accuracy`` scores the held-out rows. Early stopping restores the
        best epoch's weights.
        """
        rows, val, stopper = torch.arange(len(codes)), None, None
        if self.early_stopping:
            rows, val = _stochastic.validation_split(codes, self.n_views,
                                                     self.validation_fraction, self._generator())
            stopper = _stochastic.EarlyStopping(self.tol, self.n_iter_no_change)
        optimizer = self._optimizer()
        schedule = _stochastic.make_schedule(
            optimizer, self.lr_schedule, _stochastic.n_batches(len(rows), self.batch_size),
            max_iter)
        for i in range(max_iter):
            t0 = time.perf_counter()
            loss = epoch(optimizer, rows, schedule)
            self.loss_curve_.append(loss)
            self.n_iter_, self.best_epoch_ = i + 1, i
            stop, msg = False, ""
            if stopper is not None:
                value = score(val)
                self.validation_scores_.append(value)
                stop = stopper.update(value, i, self.model_)
                self.best_epoch_ = stopper.best_epoch
                msg = f", validation accuracy {value:.4f}"
            log(self.verbose, "epoch %d: loss %.5f%s (%.1f s)", i + 1, loss, msg,
                time.perf_counter() - t0, level=2)
            if not np.isfinite(loss):
                raise FloatingPointError(f"the training loss diverged at epoch {i + 1}; "
                                         "lower learning_rate_init")
            if stop:
                log(self.verbose, "early stopping: best epoch %d", self.best_epoch_ + 1, level=2)
                break
        if stopper is not None:
            stopper.restore(self.model_)

    def _model_device(self):
        return next(self.model_.parameters()).device

    def _standardizer(self):
        dev = self._model_device()
        std = getattr(self, "_std", None)
        if std is None or std.mean.device != dev:
            std = self._std = Standardizer(self.mean_, self.scale_, dev, self.standardize)
        return std

    def _generator(self):
        """The private CPU generator (initialization, shuffling, splits, dropout seeds)."""
        if getattr(self, "_rng", None) is None:
            self._rng = make_generator(self.random_state)
            state = getattr(self, "_rng_state", None)
            if state is not None:
                self._rng.set_state(state)
        return self._rng

    def _dropout_generator(self):
        """A generator on the training device for dropout masks (reseeded every epoch)."""
        dev = self._model_device()
        gen = getattr(self, "_dropout_gen", None)
        if gen is None or gen.device != dev:
            gen = self._dropout_gen = torch.Generator(device=dev)
        return gen

    def _optimizer(self):
        if getattr(self, "_optim", None) is None:
            self._optim = _stochastic.make_optimizer(
                self.model_, self.solver_, lr=self.learning_rate_init, alpha=self._alpha,
                momentum=self.momentum, nesterov=self.nesterov)
            state = getattr(self, "_optim_state", None)
            if state is not None:
                fused = [g.get("fused") for g in self._optim.param_groups]
                self._optim.load_state_dict(state)
                # The saved groups carry the fitting device's fused flag; keep this device's.
                for g, f in zip(self._optim.param_groups, fused):
                    g["fused"] = f
        return self._optim

    def __getstate__(self):
        """Plain data on the CPU: a CUDA-fitted model unpickles anywhere."""
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = copy.deepcopy(self.model_).cpu()
            if state.get("_optim") is not None:
                state["_optim_state"] = state_to_cpu(self._optim.state_dict())
            if state.get("_rng") is not None:
                state["_rng_state"] = self._rng.get_state()
        for key in ("_optim", "_rng", "_dropout_gen", "_std"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        """Back on the fitting device when it exists here, else on the CPU."""
        self.__dict__.update(state)
        if "model_" in state:
            try:
                self.model_.to(resolve_device(self.device_))
            except (ValueError, RuntimeError):
                pass

