"""Feature standardization in one object: statistics, in-place application, folding into a
linear layer (so the L-BFGS objective never copies X)."""

from __future__ import annotations

import numpy as np
import torch

from .. import _native
from ._data import tensor_view

#: Added to the per-feature variance before the square root (the demo's feature standardization).
STANDARDIZE_EPS = 0.01
#: Bytes of one float64 chunk of the statistics pass (rows per chunk follow from the width, so
#: 64,000 features take 128 rows, not a 4 GB block).
_STATS_BYTES = 64 * 2**20


def feature_stats(X: np.ndarray, weight=None):
    """Per-feature mean and ``sqrt(var + 0.01)`` as float32 (float64 accumulation, row chunks
    of at most ``_STATS_BYTES``), weighted by ``weight`` (one per row) when given."""
    Xt = tensor_view(X)
    n = len(Xt)
    step = max(1, _STATS_BYTES // (8 * max(1, X.shape[1])))
    w = None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
    total = n if w is None else float(w.sum())
    mean = torch.zeros(X.shape[1], dtype=torch.float64)
    for s in range(0, n, step):
        if w is None:
            mean += Xt[s:s + step].sum(0, dtype=torch.float64)
        else:
            mean += w[s:s + step] @ Xt[s:s + step].double()
    mean /= total
    var = torch.zeros_like(mean)
    # One reused float64 buffer with in-place ops: no fresh full-size tensor per operation.
    buf = torch.empty((min(step, n), X.shape[1]), dtype=torch.float64)
    for s in range(0, n, step):
        xc = buf[:min(step, n - s)]
        xc.copy_(Xt[s:s + step]).sub_(mean)
        var += xc.mul_(xc).sum(0) if w is None else w[s:s + step] @ xc.mul_(xc)
    var /= total
    scale = torch.sqrt(var + STANDARDIZE_EPS)
    return mean.float().numpy(), scale.float().numpy()


class Standardizer:
    """``x -> (x - mean) / scale`` on ``device``; the identity on batches when not ``enabled``.

    Not fitted state: the estimator keeps ``mean_`` / ``scale_`` (numpy) and rebuilds this
    from them on demand.
    """

    def __init__(self, mean, scale, device, enabled=True):
        self.enabled = bool(enabled)
        self.mean = torch.from_numpy(np.asarray(mean, np.float32)).to(device)
        self.inv_scale = torch.from_numpy(1.0 / np.asarray(scale, np.float32)).to(device)

    def apply_(self, xb):
        """Standardize a batch in place (callers pass a fresh gathered copy) and return it,
        as float32 (a float16 batch is decoded first)."""
        xb = xb.float()
        if self.enabled:
            xb.sub_(self.mean).mul_(self.inv_scale)
        return xb

    def batch(self, X, idx, dtype=torch.float32):
        """The standardized rows ``idx`` of ``X`` as ``dtype`` (float32, or bfloat16 for a
        first layer that multiplies in bfloat16 anyway): on the CPU from float16 features by
        one native pass, the same numbers as gathering, :meth:`apply_` and rounding."""
        if X.device.type == "cpu" and X.dtype == torch.float16 and _native.available():
            mean, inv = ((self.mean, self.inv_scale) if self.enabled else  # (x - 0) * 1 == x
                         (torch.zeros(X.shape[1]), torch.ones(X.shape[1])))
            return _native.standardize_rows(X, idx, mean, inv, dtype)
        return self.apply_(X.index_select(0, idx)).to(dtype)

    def fold(self, W, b):
        """Weights acting on raw x: ``x_std W^T + b = x (W s)^T + (b - (W s) mean)``."""
        Ws = W * self.inv_scale
        return Ws, b - Ws @ self.mean

    def unfold_grad_(self, gW, gb):
        """Map the gradient of the folded weights back to ``W`` (in place on ``gW``)."""
        gW -= torch.outer(gb, self.mean)
        gW *= self.inv_scale
        return gW
