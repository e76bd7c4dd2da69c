"""Input plumbing: views, label codes, sample weights, zero-copy tensors."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight

from ..patches import row_blocks


#: The feature dtypes the classifiers keep as given (float16 halves the memory of stored
#: features; batches are decoded to float32 one at a time); anything else becomes float32.
FEATURE_DTYPES = [np.float32, np.float16]


#: Bytes of the boolean mask of one row block of :func:`check_finite`.
_FINITE_BLOCK_BYTES = 64 * 2**20


def validated_features(est, X, y="no_validation", *, reset):
    """``validate_data`` for stored features (float32 and float16 kept as given), with the
    finiteness check done in row blocks. scikit-learn's own check sums ``X`` first and, when
    the sum is not finite, builds a full-size boolean mask; a float16 sum of pooled counts
    overflows, so every float16 input would take that path (2.7 GB for 50,000 x 57,600)."""
    from sklearn.utils.validation import validate_data

    out = validate_data(est, X, y, dtype=FEATURE_DTYPES, reset=reset, ensure_all_finite=False)
    check_finite(out if isinstance(y, str) and y == "no_validation" else out[0])
    return out


def check_finite(X: np.ndarray):
    """A ValueError naming NaN or infinity, as scikit-learn words it, from row blocks whose
    mask stays under a few dozen MB."""
    if X.dtype.kind != "f" or X.size == 0:
        return
    for block in row_blocks(X, _FINITE_BLOCK_BYTES):  # a boolean mask: a byte per value
        if not np.isfinite(block).all():
            what = "NaN" if np.isnan(block).any() else "infinity or a value too large for " \
                f"{X.dtype}"
            raise ValueError(f"Input X contains {what}.")


def tensor_view(X: np.ndarray) -> torch.Tensor:
    """A float32 or float16 C-contiguous array as a tensor without copying (read-only inputs
    included: they are only ever read); other dtypes are converted to float32."""
    X = np.ascontiguousarray(X, dtype=X.dtype if X.dtype == np.float16 else np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


def split_views(X, n_views, *per_sample):
    """``(n, V * F)`` -> ``(n * V, F)`` rows (a view, no copy); per-sample arrays repeated per
    view (``None`` stays ``None``)."""
    if X.shape[1] % n_views:
        raise ValueError(f"X has {X.shape[1]} features, not divisible by n_views={n_views}")
    X = np.ascontiguousarray(X).reshape(len(X) * n_views, X.shape[1] // n_views)
    return (X, *(None if a is None else np.repeat(a, n_views) for a in per_sample))


def class_codes(y, owner):
    """Checked classification targets -> ``(classes, codes)``: the sorted labels and each
    sample's index into them; fewer than two classes is an error naming ``owner``."""
    check_classification_targets(y)
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"{owner} needs samples of at least 2 classes in the data, but the data contains "
            f"only one class: {classes[0]!r}")
    return classes, codes


def encode_labels(y, classes):
    """Labels -> indices into the sorted ``classes``; unknown labels are an error."""
    y = np.asarray(y)
    idx = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    bad = classes[idx] != y
    if np.any(bad):
        raise ValueError(f"y contains labels not in classes_ {classes.tolist()}: "
                         f"{np.unique(y[bad]).tolist()}")
    return idx.astype(np.int64)


def row_weights(sample_weight, class_weight, X, codes, classes):
    """Per-sample weights, scaled to mean 1, or ``None`` when every weight is equal.

    As in scikit-learn's linear models, ``class_weight`` multiplies ``sample_weight``. Scaling
    to mean 1 keeps ``alpha`` / ``C`` meaning the same with and without weights (the objective
    is the weighted mean loss); ``None`` keeps the unweighted code path exactly.
    """
    if sample_weight is None and class_weight is None:
        return None
    w = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    if class_weight is not None:
        present = np.unique(codes)
        cw = compute_class_weight(class_weight, classes=present, y=codes) if isinstance(
            class_weight, str) else np.array([class_weight.get(classes[c], 1.0) for c in present],
                                             dtype=np.float64)
        full = np.ones(len(classes))
        full[present] = cw
        w = w * full[codes]
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("sample_weight (times class_weight) must have a positive, finite sum")
    if np.all(w == w[0]):
        return None
    return (w * (len(w) / total)).astype(np.float32)
