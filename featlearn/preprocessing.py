"""Preprocessing: per-patch contrast normalization and ZCA/PCA whitening (patch space), and the
signed power normalization of pooled features (feature space).

The patch-space stages are fitted on sampled patches and applied again, densely, to every patch
of every image inside :class:`featlearn.PatchEncoder`, which reads their fitted state (``eps``,
``ddof``, ``mean_``, ``whitening_``) and applies it to its patch chunks in torch.
:class:`PowerNormalizer` acts on the encoder's output, before the classifier.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, ClassNamePrefixFeaturesOutMixin
from sklearn.base import TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .patches import check_finite_float32

#: Rows processed per step when accumulating covariance, to keep float64 copies small.
_COV_CHUNK = 65536


class PatchNormalizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Per-patch (per-row) contrast normalization.

    Each row ``x`` becomes ``(x - mean(x)) / sqrt(var(x, ddof) + eps)``. With the demo's
    defaults (``eps=10``, ``ddof=1``, the MATLAB unbiased variance) this is the paper's
    brightness/contrast normalization for 0..255 pixel patches; ``eps`` is in squared pixel
    units, so rescale it if your pixels are in 0..1.

    The transform is stateless: :meth:`fit` only validates and records ``n_features_in_``.

    Parameters
    ----------
    eps : float, default=10.0
        Added to the variance before the square root; damps the noise of flat patches.
    ddof : int, default=1
        Delta degrees of freedom of the variance (1 = unbiased, as MATLAB; numpy's default is 0).

    Attributes
    ----------
    n_features_in_ : int
        Number of features (patch dimension) seen in :meth:`fit`.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import PatchNormalizer
    >>> X = np.arange(12, dtype=np.float32).reshape(2, 6)
    >>> PatchNormalizer().fit_transform(X).mean(axis=1)
    array([0., 0.], dtype=float32)
    """

    _parameter_constraints = {
        "eps": [Interval(numbers.Real, 0, None, closed="left")],
        "ddof": [Interval(numbers.Integral, 0, None, closed="left")],
    }

    def __init__(self, eps=10.0, ddof=1):
        self.eps = eps
        self.ddof = ddof

    def _check_width(self, X):
        if X.shape[1] <= self.ddof:
            raise ValueError(
                f"PatchNormalizer with ddof={self.ddof} needs more than {self.ddof} features per "
                f"row, got {X.shape[1]} feature(s)")

    def fit(self, X, y=None):
        """Validate ``X`` and record its width; nothing is learned."""
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        check_finite_float32(X, "X")
        self._check_width(X)
        return self

    def transform(self, X):
        """Return the contrast-normalized rows of ``X`` as float32."""
        self._validate_params()
        X = _float32(validate_data(self, X, dtype=[np.float32, np.float64], reset=False),
                     copy=True)
        self._check_width(X)
        return normalize_rows(X, self.eps, self.ddof)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


class PowerNormalizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Signed power normalization of features: ``x -> sign(x) * |x| ** power``.

    With ``power=0.5`` (the signed square root) it damps the features that pooling made large
    (a dictionary atom that fires over the whole image) relative to the rare ones, the
    correction Perronnin et al. (ECCV 2010) made to pooled Fisher vectors; sum-pooled counts
    behave the same way. Applied element-wise and stateless: :meth:`fit` only validates and
    records ``n_features_in_``. Place it after the encoder in a ``Pipeline``, before the
    classifier's standardization.

    Parameters
    ----------
    power : float > 0, default=0.5
        The exponent; 1 is the identity.
    copy : bool, default=True
        If False and ``X`` is a writable C-contiguous float32 array, it is transformed in place
        (a feature matrix need not be held twice).

    Attributes
    ----------
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import PowerNormalizer
    >>> PowerNormalizer().fit_transform(np.array([[4.0, -9.0, 0.25]], dtype=np.float32))
    array([[ 2. , -3. ,  0.5]], dtype=float32)
    """

    _parameter_constraints = {
        "power": [Interval(numbers.Real, 0, None, closed="neither")],
        "copy": ["boolean"],
    }

    def __init__(self, power=0.5, copy=True):
        self.power = power
        self.copy = copy

    def fit(self, X, y=None):
        """Validate ``X`` and record its width; nothing is learned."""
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        check_finite_float32(X, "X")
        return self

    def transform(self, X):
        """``sign(X) * |X| ** power`` as float32 (chunked, in place on the float32 copy)."""
        self._validate_params()
        X = _float32(validate_data(self, X, dtype=[np.float32, np.float64], reset=False,
                                   order="C", copy=False), copy=self.copy)
        if not X.flags.writeable:
            X = X.copy()
        return signed_power_(X, float(self.power))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def signed_power_(X: np.ndarray, power: float) -> np.ndarray:
    """``X <- sign(X) * |X| ** power`` in place, in row chunks (one small float32 temporary)."""
    if power == 1.0:
        return X
    rows = max(1, _COV_CHUNK * 16 // max(1, X.shape[1]))
    flat = X.reshape(X.shape[0], -1)
    for s in range(0, flat.shape[0], rows):
        block = flat[s:s + rows]
        mag = np.abs(block)
        if power == 0.5:
            np.sqrt(mag, out=mag)  # correctly rounded, and what power 0.5 means
        else:
            np.power(mag, np.float32(power), out=mag)
        np.copysign(mag, block, out=block)
    return X


def normalize_rows(X: np.ndarray, eps: float, ddof: int) -> np.ndarray:
    """In-place row contrast normalization of a float32 array (statistics in float64)."""
    mean = X.mean(axis=1, dtype=np.float64, keepdims=True)
    X -= mean.astype(np.float32)
    var = np.einsum("ij,ij->i", X, X, dtype=np.float64)[:, None] / (X.shape[1] - ddof)
    X *= (1.0 / np.sqrt(var + eps)).astype(np.float32)
    return X


class ZCAWhitening(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """ZCA or PCA whitening of patch vectors.

    Fits the mean ``M`` and the covariance ``C = V diag(l) V^T`` (unbiased, ``ddof=1``) of the
    training rows and maps a row ``x`` to ``(x - M) W`` with

    * ZCA (``zca=True``): ``W = V diag(1 / sqrt(l + eps_)) V^T`` (rotated back to patch space;
      the paper's whitening). With ``n_components=k`` only the top-``k`` directions are kept
      (``V_k diag(...) V_k^T``), still returning ``n_features`` columns.
    * PCA (``zca=False``): ``W = V_k diag(1 / sqrt(l_k + eps_))``, returning ``k`` columns
      (``k = n_features`` when ``n_components`` is None).

    The whitened covariance of the training data is ``V diag(l / (l + eps_)) V^T``: ``eps_``
    regularizes the small eigen-directions instead of amplifying their noise.

    **Regularization relative to the spectrum.** ``eps`` is in the data's squared units, so the
    same value regularizes differently once the pixel scale or the contrast normalization
    changes. ``eps_scale="mean"`` adds ``eps_ = eps * mean(l)`` instead (``mean(l) =
    trace(C) / n_features``, the average variance per coordinate: the reference scale of
    :class:`sklearn.covariance.ShrunkCovariance`), and ``"max"`` adds ``eps * max(l)``; both
    are taken over all ``n_features`` eigenvalues (clipped at 0), whatever ``n_components``.
    Thiry et al. (ICLR 2021; louity/patches, ``kneighbors.py`` and ``utils.py``) add an
    *absolute* ``whitening_reg`` to the eigenvalues of the biased covariance of raw 0..1
    patches (no contrast normalization); ``eps_scale="mean"`` with ``eps = whitening_reg /
    mean(l)`` of those patches carries their value over to normalized ones.

    Parameters
    ----------
    eps : float, default=0.1
        Regularizer added to the eigenvalues (the paper's 0.1 for normalized patches), in the
        units ``eps_scale`` says.
    eps_scale : {"absolute", "mean", "max"}, default="absolute"
        ``"absolute"``: add ``eps`` itself; ``"mean"`` / ``"max"``: add ``eps`` times the mean /
        largest eigenvalue of the covariance (see above).
    n_components : int or None, default=None
        Number of principal directions kept; None keeps all.
    zca : bool, default=True
        Rotate back to patch space (ZCA) or stay in the principal basis (PCA whitening).
    copy : bool, default=True
        If False and the input is a C-contiguous float32 array, it is centred in place.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,), float32
    components_ : ndarray of shape (n_components_, n_features)
        Principal directions (rows), by decreasing variance.
    explained_variance_ : ndarray of shape (n_components_,)
        Eigenvalues of the covariance for those directions.
    eps_ : float
        The regularizer actually added to the eigenvalues (``eps`` times the ``eps_scale``).
    whitening_ : ndarray of shape (n_features, n_features_out), float32
        The matrix ``W`` above; ``transform(X) == (X - mean_) @ whitening_``.
    n_components_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import ZCAWhitening
    >>> X = np.random.default_rng(0).normal(size=(1000, 5)).astype(np.float32)
    >>> ZCAWhitening(eps=0.0).fit_transform(X).std(axis=0).round(1)
    array([1., 1., 1., 1., 1.], dtype=float32)
    """

    _parameter_constraints = {
        "eps": [Interval(numbers.Real, 0, None, closed="left")],
        "eps_scale": [StrOptions({"absolute", "mean", "max"})],
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "zca": ["boolean"],
        "copy": ["boolean"],
    }

    def __init__(self, eps=0.1, n_components=None, zca=True, copy=True, eps_scale="absolute"):
        self.eps = eps
        self.eps_scale = eps_scale
        self.n_components = n_components
        self.zca = zca
        self.copy = copy

    def fit(self, X, y=None):
        """Fit the mean and the eigen-decomposition of the covariance of ``X``."""
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        check_finite_float32(X, "X")
        n, d = X.shape
        if n < 2:
            raise ValueError(f"ZCAWhitening needs at least 2 samples, got {n} sample(s)")
        k = d if self.n_components is None else self.n_components
        if k > d:
            raise ValueError(f"n_components={k} must be <= n_features={d}")
        mean, cov = _mean_and_covariance(X)
        evals, evecs = np.linalg.eigh(cov)
        eps = _absolute_eps(self.eps, self.eps_scale, np.clip(evals, 0.0, None))
        order = np.argsort(evals)[::-1][:k]
        evals = np.clip(evals[order], 0.0, None)
        V = evecs[:, order]
        scale = 1.0 / np.sqrt(evals + eps) if eps > 0 else _safe_inv_sqrt(evals)
        W = V * scale
        if self.zca:
            W = W @ V.T
        self.mean_ = mean.astype(np.float32)
        self.components_ = V.T.astype(np.float32)
        self.explained_variance_ = evals
        self.whitening_ = np.ascontiguousarray(W, dtype=np.float32)
        self.n_components_ = k
        self.eps_ = float(eps)
        # The pseudo-inverse of W, for inverse_transform (exact when nothing was dropped).
        unscale = np.sqrt(evals + eps)
        U = (V * unscale).T
        self._unwhitening = np.ascontiguousarray(V @ U if self.zca else U, dtype=np.float32)
        self._n_features_out = W.shape[1]
        return self

    def transform(self, X):
        """Whiten ``X``: ``(X - mean_) @ whitening_``, float32."""
        check_is_fitted(self)
        X = _float32(validate_data(self, X, dtype=[np.float32, np.float64], reset=False,
                                   order="C"), copy=self.copy)
        X -= self.mean_
        return _rowwise_matmul(X, self.whitening_)

    def inverse_transform(self, X):
        """Map whitened rows back to patch space (exact unless components were dropped)."""
        check_is_fitted(self)
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self._n_features_out:
            raise ValueError(
                f"X has shape {X.shape}; expected (n_samples, {self._n_features_out}) whitened rows")
        X = _float32(X, copy=False)
        return _rowwise_matmul(X, self._unwhitening) + self.mean_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _float32(X: np.ndarray, copy: bool) -> np.ndarray:
    """``X`` as a C-contiguous float32 array, after checking it stays finite in float32."""
    check_finite_float32(X, "X")
    if X.dtype == np.float32 and X.flags.c_contiguous:
        return X.copy() if copy else X
    return np.ascontiguousarray(X, dtype=np.float32)


def _rowwise_matmul(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``X @ W`` as float32 whose rows do not depend on the other rows.

    A float32 GEMM rounds a row differently depending on where the BLAS kernel's blocking puts
    it, so permuting the samples could change results by an ulp (scikit-learn's
    sample-order-invariance check caught this on another CPU). Accumulating in float64 and
    rounding once makes each output row a function of its input row alone. Chunked, so the
    float64 temporaries stay small; the fast encoding path has its own float32 kernel.
    """
    W64 = W.astype(np.float64)
    out = np.empty((X.shape[0], W.shape[1]), dtype=np.float32)
    for s in range(0, X.shape[0], _COV_CHUNK):
        out[s:s + _COV_CHUNK] = X[s:s + _COV_CHUNK].astype(np.float64) @ W64
    return out


def _absolute_eps(eps, eps_scale, evals):
    """The regularizer added to the eigenvalues ``evals`` (all of them, clipped at 0).

    ``"absolute"`` returns ``eps`` itself (not a float copy), so today's arithmetic stays
    bit-identical.
    """
    if eps_scale == "absolute":
        return eps
    ref = float(evals.mean()) if eps_scale == "mean" else float(evals.max())
    return eps * ref


def _safe_inv_sqrt(evals):
    out = np.zeros_like(evals)
    pos = evals > evals.max() * 1e-12
    out[pos] = 1.0 / np.sqrt(evals[pos])
    return out


def _mean_and_covariance(X: np.ndarray):
    """Mean and unbiased covariance in float64, in chunks (two passes; no cancellation)."""
    n = X.shape[0]
    mean = np.zeros(X.shape[1])
    for s in range(0, n, _COV_CHUNK):
        mean += X[s:s + _COV_CHUNK].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((X.shape[1], X.shape[1]))
    for s in range(0, n, _COV_CHUNK):
        Z = X[s:s + _COV_CHUNK].astype(np.float64) - mean
        cov += Z.T @ Z
    cov /= n - 1
    return mean, cov
