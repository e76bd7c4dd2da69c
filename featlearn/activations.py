"""Activations: what the encoder does with each chunk's distance products, before pooling.

One small table (:data:`ACTIVATIONS`) maps an activation's name to the products its GEMM must
produce (squared distances, dot products, or dot products with unit-norm centroids), its width
(features per centroid), the norms it needs besides them and a function of those products;
:func:`featlearn.pooling.pool` reduces the resulting map over cells. :func:`activate_and_pool`
composes the two: the one function that runs eagerly (the reference and the fallback) or
through :func:`torch.compile` (:mod:`featlearn._compile`), where inductor fuses the elementwise
passes and the pooling reduction into one or two passes per chunk.

The functions are written out of place and without data-dependent shapes, so that the compiled
graph has no mutation to write back and no graph break.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .pooling import pool


#: Entries per row (and per sign) from which ``selection="sampled"`` estimates the
#: nearest-fraction threshold: evenly strided columns, so no generator is involved.
SELECTION_SAMPLE = 256
#: Halvings of :func:`bracket_thresholds`: a row is left undecided (and passed to the exact
#: order statistic) only when two of its entries lie within ``2**-16`` of its range.
BRACKET_ITERS = 16


def triangle(D: torch.Tensor, alpha: float, *, inplace: bool = False, **_) -> torch.Tensor:
    """``max(0, mean_j z_j - z_k)`` with ``z = sqrt(max(D, 0))``; ``D`` squared distances.

    The clamp absorbs rounding: a squared distance from the GEMM expansion can come out
    slightly negative. ``inplace`` overwrites ``D`` (the eager kernel's scratch buffer): a
    chunk's four temporaries of ``D``'s size would each be a fresh allocation, page-faulted in.
    """
    if inplace:
        z = D.clamp_min_(0.0).sqrt_()
        mean = z.mean(1, keepdim=True)
        return z.sub_(mean).neg_().clamp_min_(0.0)
    z = D.clamp_min(0.0).sqrt()
    return (z.mean(1, keepdim=True) - z).clamp_min(0.0)


def hard(D: torch.Tensor, alpha: float, **_) -> torch.Tensor:
    """One-hot of the nearest centroid (first index on ties); ``D`` squared distances.

    Written as a comparison rather than a scatter so that, compiled, the one-hot is never
    stored: the pooling reduction reads the comparison directly.
    """
    nearest = D.argmin(1, keepdim=True)
    ids = torch.arange(D.shape[1], device=D.device)
    return (ids == nearest).to(D.dtype)


def soft_threshold_blocks(D: torch.Tensor, alpha: float, **_):
    """``max(0, c.y - alpha)`` and ``max(0, -c.y - alpha)``; ``D`` dot products ``c.y``."""
    return (D - alpha).clamp_min(0.0), (-D - alpha).clamp_min(0.0)


def n_nearest(fraction: float, K: int) -> int:
    """How many of ``K`` centroids the nearest-fraction encoding marks: ``int(fraction * K)``."""
    return int(fraction * K)


def selection_columns(K: int, selection: str) -> np.ndarray:
    """The columns whose entries decide each row's nearest-fraction threshold: every
    ``K // SELECTION_SAMPLE``-th one with ``"sampled"`` (all of them when that step is 1, or
    with ``"exact"``)."""
    step = K // SELECTION_SAMPLE
    return np.arange(0, K, step if selection == "sampled" and step > 1 else 1)


def selection_rank(K: int, k: int, n_columns: int) -> int:
    """The threshold's rank (1-based) among ``n_columns`` entries of a row: ``k + 1`` over the
    whole row, the matching rank of the sample otherwise (the ``(k+1)``-th smallest of ``K``
    is at about ``(k + 1/2) / K`` of the way up the sorted row)."""
    if n_columns == K:
        return k + 1
    return min(max(round((k + 0.5) * n_columns / K), 1), n_columns)


def _signed(D: torch.Tensor, cc: torch.Tensor):
    """``||c||^2 - 2 y.c`` and ``||c||^2 + 2 y.c``: the row-constant-free squared distances to
    ``y`` and ``-y``. Every path (eager, compiled, the fix-up) forms them with this one rounding,
    so thresholds and comparisons agree bit for bit."""
    twice = D + D
    return cc - twice, cc + twice


def nearest_fraction_thresholds(D: torch.Tensor, col_sq: torch.Tensor, *, fraction: float,
                                selection: str, **_) -> torch.Tensor:
    """Each row's two thresholds, ``(n, 2)`` (for ``y``, then ``-y``): the
    :func:`selection_rank`-th smallest of the row's :func:`selection_columns` entries
    (``torch.kthvalue``). An entry is marked when its distance is strictly below its threshold
    (Thiry et al.'s rule: exactly ``k`` ones without ties, fewer on a tie at the boundary)."""
    K = D.shape[1]
    cols = selection_columns(K, selection)
    rank = selection_rank(K, n_nearest(fraction, K), len(cols))
    if len(cols) < K:
        D, col_sq = D[:, ::int(cols[1])], col_sq[::int(cols[1])]
    return torch.stack([E.kthvalue(rank, 1).values for E in _signed(D, col_sq)], 1)


def bracket_thresholds(S: torch.Tensor, col_sq: torch.Tensor, *, rank: int, iters: int):
    """The thresholds of :func:`nearest_fraction_thresholds` by bisection, for a compiled graph:
    ``S`` holds each row's selection entries (dot products), ``col_sq`` their centroids' norms.

    ``iters`` halvings of ``[min, max]`` per row and sign, each one counting pass, with the
    invariant ``count(E < lo) < rank <= count(E < hi)``; then the smallest entry ``>= lo`` is the
    ``rank``-th smallest exactly when ``count(E < lo) == rank - 1``. Returns the ``(n, 2)``
    thresholds and an ``(n, 2)`` mask of where that holds; the few other rows (two entries
    closer than the last bracket) are left to :func:`nearest_fraction_thresholds`. No sort, no
    data-dependent shape: the passes are elementwise and row reductions that inductor fuses.
    """
    E = torch.stack(_signed(S.float(), col_sq), 1)  # (n, 2, m)
    lo, hi = E.amin(2, keepdim=True), E.amax(2, keepdim=True)
    below_lo = torch.zeros_like(lo)
    for _ in range(iters):
        mid = (lo + hi) * 0.5
        below = (E < mid).to(E.dtype).sum(2, keepdim=True)
        up = below < rank
        lo, below_lo = torch.where(up, mid, lo), torch.where(up, below, below_lo)
        hi = torch.where(up, hi, mid)
    t = torch.where(E >= lo, E, float("inf")).amin(2)
    return t, (below_lo == rank - 1).squeeze(2)


def fix_thresholds(t: torch.Tensor, ok: torch.Tensor, S: torch.Tensor, col_sq: torch.Tensor,
                   rank: int) -> torch.Tensor:
    """``t`` with the rows :func:`bracket_thresholds` left undecided (``~ok``) replaced by the
    order statistic itself: the same numbers as :func:`nearest_fraction_thresholds`."""
    bad = (~ok).any(1).nonzero().squeeze(1)
    if bad.numel():
        Sb = S.index_select(0, bad).float()
        t = t.clone()
        t[bad] = torch.stack([E.kthvalue(rank, 1).values for E in _signed(Sb, col_sq)], 1)
    return t


def nearest_fraction_blocks(D: torch.Tensor, alpha: float, *, col_sq: torch.Tensor,
                            fraction: float, selection: str,
                            thresholds: torch.Tensor | None = None, **_):
    """1 for the ``int(fraction*K)`` centroids nearest ``y``, and the same for ``-y``; ``D``
    dot products.

    ``||y -+ c||^2 = ||y||^2 + ||c||^2 -+ 2 y.c``: the row's ``||y||^2`` does not change its
    ranking, so only the centroid norms ``col_sq`` enter (rounding aside, the same sets).
    ``thresholds`` (``(n, 2)``, from :func:`nearest_fraction_thresholds` or a compiled kernel's
    bracket) skips the order statistic.
    """
    if thresholds is None:
        thresholds = nearest_fraction_thresholds(D, col_sq, fraction=fraction,
                                                 selection=selection)
    near, far = _signed(D, col_sq.view(1, -1))
    return (near < thresholds[:, :1]).to(D.dtype), (far < thresholds[:, 1:]).to(D.dtype)


def heaviside_blocks(D: torch.Tensor, alpha: float, *, row_sq: torch.Tensor, **_):
    """``1(cos(y, c) > alpha)`` and ``1(cos(-y, c) > alpha)``; ``D`` dot products with unit-norm
    centroids, ``row_sq`` the rows' ``||y||^2``. A zero patch has cosine 0 with every centroid."""
    inv = torch.where(row_sq > 0, row_sq, 1.0).rsqrt().view(-1, 1)
    cos = D * inv
    return (cos > alpha).to(D.dtype), (-cos > alpha).to(D.dtype)


def _joined(blocks):
    """The ``(n, 2K)`` activation of a two-block one: the ``y`` block, then the ``-y`` block."""
    def fn(D, alpha, **kw):
        return torch.cat(blocks(D, alpha, **kw), 1)
    fn.__name__ = blocks.__name__.removesuffix("_blocks")
    fn.__doc__ = blocks.__doc__
    return fn


soft_threshold = _joined(soft_threshold_blocks)
nearest_fraction = _joined(nearest_fraction_blocks)
heaviside = _joined(heaviside_blocks)


@dataclass(frozen=True)
class Activation:
    """One row of :data:`ACTIVATIONS`."""

    #: What the distance GEMM must produce: ``"sqdist"`` (``||y - c||^2``), ``"dot"``
    #: (``c . y``) or ``"unit_dot"`` (``c . y / ||c||``; a zero centroid gives 0).
    products: str
    #: Features per centroid and cell.
    width: int
    #: ``(products (n, K), alpha, **norms, **options) -> activations (n, width * K)``.
    fn: Callable[..., torch.Tensor]
    #: Norms the kernel passes besides the products: ``"row_sq"`` (``||y||^2`` per row, shape
    #: ``(n,)``) and/or ``"col_sq"`` (``||c||^2`` per centroid, shape ``(K,)``).
    norms: tuple = ()
    #: For a width-2 activation, ``fn`` as its two ``(n, K)`` blocks: pooled one by one, so
    #: that a compiled graph never stores the concatenated ``(n, 2K)`` map.
    blocks: Callable | None = None


ACTIVATIONS = {
    "triangle": Activation("sqdist", 1, triangle),
    "hard": Activation("sqdist", 1, hard),
    "soft_threshold": Activation("dot", 2, soft_threshold, (), soft_threshold_blocks),
    "nearest_fraction": Activation("dot", 2, nearest_fraction, ("col_sq",),
                                   nearest_fraction_blocks),
    "heaviside": Activation("unit_dot", 2, heaviside, ("row_sq",), heaviside_blocks),
}

def activate_and_pool(D: torch.Tensor, row_sq: torch.Tensor | None = None,
                      col_sq: torch.Tensor | None = None, thresholds: torch.Tensor | None = None,
                      *, n_images: int, map_shape, row_bounds, col_bounds, activation: str,
                      alpha: float, pool_op: str, fraction: float = 0.4, selection: str = "exact",
                      window=None, inplace: bool = False) -> torch.Tensor:
    """``(n_images * rows * cols, K)`` products -> ``(n_images, n_cells, width * K)`` features.

    Rows of ``D`` are image-major, then map rows, then map columns (the encoder's im2col order).
    ``row_sq`` / ``col_sq`` are the norms the activation declares (:attr:`Activation.norms`);
    ``fraction``, ``selection`` and (precomputed, optional) ``thresholds`` are the
    nearest-fraction encoding's, ``window`` the pooling windows' sizes and strides
    (:func:`featlearn.pooling.pool`). ``inplace`` lets an activation overwrite ``D`` (eager
    only: a compiled graph wants no mutation). A two-block activation is pooled block by block.
    """
    D = D.float()  # bfloat16 products are read as float32 (a no-op for float32)
    act = ACTIVATIONS[activation]
    kw = dict(row_sq=row_sq, col_sq=col_sq, fraction=fraction, selection=selection,
              thresholds=thresholds, inplace=inplace)
    blocks = act.blocks(D, alpha, **kw) if act.blocks else (act.fn(D, alpha, **kw),)
    pooled = [pool(A.view(n_images, map_shape[0], map_shape[1], A.shape[1]), row_bounds,
                   col_bounds, pool_op, window) for A in blocks]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 2)
