"""The convolutional head as a scikit-learn classifier: its parameters, fit and input; predictions
and pickling are shared (``_base``, ``_state``)."""

from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .._logging import log
from ..patches import check_finite_float32
from . import _conv
from ._data import class_codes, row_weights
from ._base import BaseTorchClassifier
from ._losses import predict_index


class TorchConvClassifier(BaseTorchClassifier):
    """Convolutional head on pooled spatial maps, trained with torch on the CPU or a GPU.

    The head of Thiry et al. (ICLR 2021): ``BatchNorm2d -> 1x1 conv to width -> k x k conv to
    the classes -> global average``. The 1x1 bottleneck shares one low-rank projection of the
    features over every map position, which Thiry et al. found better than a full linear
    classifier of the same features; with ``kernel_size=None`` the last convolution covers the
    whole map, so the head is a linear classifier of rank ``width``. ``hidden`` adds a
    ``hidden_kernel_size`` convolution and a ReLU (their one-hidden-layer head is
    ``width=None, hidden=2048, kernel_size=6`` on 9x9 maps; their linear one ``width=128,
    kernel_size=6``). All convolutions are unpadded; batch norm replaces the feature
    standardization of :class:`TorchMLPClassifier`.

    **Input.** ``X`` is ``(n_samples, channels, h, w)`` maps, or a 2D feature matrix: with
    ``map_shape=(h, w)`` its columns are channels-last cells in row-major order (the layout of
    :class:`featlearn.PatchEncoder` with ``pooling=(h, w)``), else each column is a channel of
    a 1x1 map. Any real or integer dtype is accepted and decoded to float32 one mini-batch at a
    time (integers are taken as they are: the batch norm makes the head indifferent to a
    per-channel scale), so a ``np.memmap`` of float16 or uint8 maps is trained on without ever
    being held in memory as float32. ``n_views`` blocks of channels (4D) or of columns (2D)
    are views of one sample, as in :class:`TorchMLPClassifier`.

    **Training** minimizes the mean cross-entropy (or one-vs-all squared hinge) plus
    ``0.5 * alpha * ||W||^2`` over the convolution kernels, by SGD with momentum (or Adam) over
    ``max_iter`` epochs of shuffled mini-batches, with a cosine or step learning-rate schedule;
    ``early_stopping`` holds out a stratified validation split (by sample, so a sample's views
    stay together), stops when its accuracy stalls and keeps the best epoch's weights. All
    randomness comes from private generators seeded by ``random_state``; the fitted network is
    a plain ``nn.Sequential`` of standard layers, pickled on the CPU (a CUDA-fitted model
    unpickles on a CPU-only machine) and saved by :func:`featlearn.save_model`.

    Parameters
    ----------
    width : int or None, default=128
        Channels of the 1x1 bottleneck; None omits it.
    hidden : int or None, default=None
        Channels of the hidden convolution (followed by a ReLU); None omits it.
    hidden_kernel_size : int, default=3
    kernel_size : int or None, default=None
        Side of the last convolution; None: the size of the map that reaches it.
    dropout : float in [0, 1), default=0.0
        Dropout after the hidden ReLU (masks from a private generator).
    map_shape : (int, int) or None, default=None
        Cells of a 2D ``X`` (see **Input**); must be None for 4D ``X``.
    loss : {"cross_entropy", "squared_hinge"}, default="cross_entropy"
    alpha : float >= 0, default=1e-4
        Weight decay on the convolution kernels (not on biases or batch norm). Thiry et al.
        trained with none.
    class_weight : dict, "balanced" or None, default=None
    solver : {"sgd", "adam"}, default="sgd"
    learning_rate_init : float, default=3e-3
    momentum : float in [0, 1], default=0.9
    nesterov : bool, default=False
    lr_schedule : {"constant", "step", "cosine"}, default="cosine"
        Per-batch cosine annealing to 0, or x0.1 at 50% and again at 75% of the epochs.
    batch_size : int, default=128
    max_iter : int, default=80
        Epochs (fewer with early stopping).
    early_stopping : bool, default=False
    validation_fraction : float in (0, 1), default=0.1
    n_iter_no_change : int, default=10
    tol : float, default=1e-4
        Minimum improvement of the validation accuracy that resets the early-stopping counter.
    precision : {"float32", "bfloat16", "auto"}, default="float32"
        As in :class:`TorchMLPClassifier` (training only; prediction runs in float32).
    n_views : int, default=1
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        1: one summary line per fit; 2: a line per epoch (``featlearn`` logger).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
        Columns of a 2D ``X``; channels (all views) of a 4D one.
    input_shape_ : tuple (channels, h, w)
        One view's map.
    kernel_size_ : tuple (kh, kw)
        The last convolution's size.
    solver_ : {"sgd", "adam"}
    precision_ : {"float32", "bfloat16"}
    loss_curve_ : list of float
        Training objective per epoch.
    validation_scores_ : list of float
        Validation accuracy per epoch (empty without early stopping).
    best_epoch_ : int
    n_iter_ : int
        Epochs run.
    device_ : str
    model_ : torch.nn.Sequential
        BatchNorm2d, Conv2d, ReLU, Dropout, AdaptiveAvgPool2d and Flatten layers.

    See Also
    --------
    TorchMLPClassifier : the same training contract on flat features.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import TorchConvClassifier
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> X = rng.normal(size=(200, 4, 5, 5)).astype(np.float32)
    >>> X[:, 0, :2] += 2.0 * y[:, None, None]  # class 1 lights channel 0 at the top
    >>> clf = TorchConvClassifier(width=8, max_iter=20, learning_rate_init=0.05,
    ...                           device="cpu", random_state=0).fit(X, y)
    >>> clf.kernel_size_, clf.score(X, y) > 0.9
    ((5, 5), True)
    """

    _parameter_constraints = {
        **BaseTorchClassifier._parameter_constraints,
        "width": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "hidden": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "hidden_kernel_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "kernel_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "map_shape": [tuple, list, None],
        "solver": [StrOptions({"sgd", "adam"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    def __init__(self, width=128, hidden=None, hidden_kernel_size=3, kernel_size=None,
                 dropout=0.0, map_shape=None, loss="cross_entropy", alpha=1e-4,
                 class_weight=None, solver="sgd", learning_rate_init=3e-3, momentum=0.9,
                 nesterov=False, lr_schedule="cosine", batch_size=128, max_iter=80,
                 early_stopping=False, validation_fraction=0.1, n_iter_no_change=10, tol=1e-4,
                 precision="float32", n_views=1, device="auto", random_state=None, verbose=0):
        self.width = width
        self.hidden = hidden
        self.hidden_kernel_size = hidden_kernel_size
        self.kernel_size = kernel_size
        self.dropout = dropout
        self.map_shape = map_shape
        self.loss = loss
        self.alpha = alpha
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
        self.precision = precision
        self.n_views = n_views
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ training

    def fit(self, X, y, sample_weight=None):
        """Initialize a new head and train it on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, channels, h, w) or (n_samples, n_features)
            See **Input** in the class docstring; never copied whole.
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Multiplies each sample's loss (times ``class_weight``).

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = self._check_X(X, y, reset=True)
        classes, codes = class_codes(y, "TorchConvClassifier")
        weight = row_weights(sample_weight, self.class_weight, X, codes, classes)
        self.classes_ = classes
        return self._fit_source(self._source(X), codes, weight)

    def _fit_source(self, source, codes, weight, eval_source=None):
        """Train a fresh head on the maps ``source`` yields (``classes_`` set, ``codes`` its
        samples' class codes). ``eval_source`` (default ``source``) serves the validation
        scores: :class:`StreamingConvClassifier` trains on augmented maps and validates on
        plain ones."""
        self.solver_ = self.solver
        self.input_shape_ = tuple(int(v) for v in source.shape)
        self._initialize_head(source)
        t0 = time.perf_counter()
        V = source.n_views
        dev = self._model_device()
        yt = torch.from_numpy(np.repeat(codes, V).astype(np.int64)).to(dev)
        wt = None if weight is None else torch.from_numpy(np.repeat(weight, V)).to(dev)
        self._train(source, eval_source or source, yt, wt, np.repeat(codes, V))
        log(self.verbose, "TorchConvClassifier: %s, %d epochs, objective %.6g (%.1f s)",
            self.solver_, self.n_iter_, self.loss_curve_[-1], time.perf_counter() - t0)
        return self

    def _train(self, source, eval_source, yt, wt, codes):
        dev = self._model_device()

        def epoch(optimizer, rows, schedule):
            return _conv.run_epoch(
                self.model_, optimizer, source, yt, wt, rows, batch_size=self.batch_size,
                loss=self.loss, alpha=self._alpha, generator=self._generator(),
                dropout_generator=self._dropout_generator(), device=dev,
                precision=self.precision_, scheduler=schedule)

        def score(val):
            val_rows = val.numpy()
            pred = predict_index(_conv.scores(self.model_, eval_source, val_rows, dev))
            return float(np.mean(pred == codes[val_rows]))

        self._train_epochs(codes, self.max_iter, epoch, score)

    def _initialize_head(self, source):
        """Fresh network, generators and history (the MLP's ``_initialize`` for maps)."""
        dev = self._start_fit()
        n_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        C, h, w = source.shape
        model, self.kernel_size_ = _conv.build_conv_head(
            C, (h, w), n_out, width=self.width, hidden=self.hidden,
            hidden_kernel_size=self.hidden_kernel_size, kernel_size=self.kernel_size,
            dropout=self.dropout, generator=self._rng)
        self.model_ = model.to(dev)
        self._reset_history()

    # ------------------------------------------------------------------ inference

    def _forward_numpy(self, X):
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        source = self._source(X)
        if tuple(source.shape) != tuple(self.input_shape_):
            raise ValueError(f"X holds maps of shape {tuple(source.shape)} (channels, h, w) per "
                             f"view; the model was fitted on {tuple(self.input_shape_)}")
        scores = _conv.scores(self.model_, source)
        return scores.reshape(X.shape[0], self.n_views, -1).mean(axis=1)

    # ------------------------------------------------------------------ input

    def _check_X(self, X, y="no_validation", reset=False):
        """Validated ``X`` (and ``y``, when given), never converted or copied when it is a
        numeric array."""
        keep = isinstance(X, np.ndarray) and X.dtype.kind in "fiub"
        kw = dict(dtype=None, allow_nd=True) if keep else dict(dtype=np.float32)
        no_y = isinstance(y, str) and y == "no_validation"
        out = validate_data(self, X, y, reset=reset, ensure_all_finite=False, **kw)
        X, y = (out, None) if no_y else out
        if X.ndim not in (2, 4):
            raise ValueError(f"X must be 2D (n_samples, n_features) or 4D (n_samples, "
                             f"channels, h, w) maps, got shape {X.shape}")
        if X.ndim == 4 and self.map_shape is not None:
            raise ValueError("map_shape describes the columns of a 2D X; leave it None for 4D "
                             "maps")
        check_finite_float32(X, "X")
        return X if no_y else (X, y)

    def _source(self, X):
        map_shape = self.map_shape
        if map_shape is not None:
            map_shape = tuple(map_shape)
            if len(map_shape) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1
                                              for v in map_shape):
                raise ValueError(f"map_shape must be None or a (h, w) pair of positive ints, "
                                 f"got {self.map_shape!r}")
        return _conv.MapSource(X, self.n_views, map_shape)

    @property
    def _alpha(self):
        return float(self.alpha)
