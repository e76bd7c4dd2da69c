"""The input checks of featlearn's k-means estimators (:mod:`featlearn.kmeans`): data as a
tensor on the estimator's device, sample weights, explicit initial centres, each with
scikit-learn's messages, so that scikit-learn's own k-means tests hold for them.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import _check_sample_weight, validate_data

from featlearn._torch import resolve_device, to_numpy


def as_tensor(est, X, *, reset, fitting=False) -> torch.Tensor:
    """Validate ``X`` (numpy-like or tensor) for ``est`` (``validate_data``: feature counts and
    names) and return it as a tensor on ``est.device``.

    Float64 input stays float64 (for predict/transform/score); fitting casts to float32.
    Values that are not finite after that cast are an error.
    """
    device = resolve_device(est.device)
    if isinstance(X, torch.Tensor):
        validate_data(est, X, skip_check_array=True, reset=reset)
        if X.ndim != 2:
            raise ValueError(f"Expected a 2-D tensor, got shape {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a "
                             "minimum of 1 is required.")
        if X.is_complex():
            raise ValueError("Complex data not supported")
        if not X.is_floating_point():
            X = X.to(torch.float32)
        want = torch.float32 if (fitting or X.dtype != torch.float64) else torch.float64
        X = X.to(device=device, dtype=want)
        if not bool(torch.isfinite(X).all()):
            raise ValueError("Input X contains NaN or infinity (after the cast to "
                             f"{str(want).replace('torch.', '')}).")
        return X.contiguous()
    X = validate_data(est, X, dtype=[np.float32, np.float64], reset=reset, order="C")
    if fitting or X.dtype != np.float64:
        with np.errstate(over="ignore"):
            X32 = X.astype(np.float32, copy=False)
        if X32 is not X and not np.isfinite(X32).all():
            raise ValueError("Input X contains infinity after the cast to float32 (values "
                             "beyond float32's range).")
        X = X32
    if not X.flags.writeable:
        X = X.copy()  # torch.from_numpy warns on read-only (e.g. memmapped) arrays
    return torch.from_numpy(X).to(device)


def check_weight(sample_weight, X: torch.Tensor):
    """scikit-learn's sample-weight validation; None stays None (the unweighted path)."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, torch.Tensor):
        sample_weight = to_numpy(sample_weight)
    w = _check_sample_weight(sample_weight, np.empty((X.shape[0], 0)), dtype=np.float64,
                             ensure_non_negative=True)
    w32 = w.astype(np.float32)
    if not np.isfinite(w32).all():
        raise ValueError("sample_weight contains values beyond float32's range.")
    if not w32.sum() > 0:
        raise ValueError("sample_weight must have a positive sum.")
    if (w32 == 1).all():
        return None  # unit weights are no weights: the same draws, the same result
    return torch.from_numpy(w32).to(X.device)


def check_centers(init, n_clusters: int, d: int) -> np.ndarray:
    """An explicit (or callable-made) initial array: scikit-learn's shape messages."""
    init = np.asarray(init, dtype=np.float32)
    if init.ndim != 2 or init.shape[0] != n_clusters:
        raise ValueError(f"The shape of the initial centers {init.shape} does not match "
                         f"the number of clusters {n_clusters}.")
    if init.shape[1] != d:
        raise ValueError(f"The shape of the initial centers {init.shape} does not match "
                         f"the number of features of the data {d}.")
    if not np.isfinite(init).all():
        raise ValueError("init array contains NaN or infinity")
    return init
