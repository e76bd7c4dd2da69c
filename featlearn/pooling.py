"""Pooling: where the cells of an encoded feature map lie, and the reduction over them.

The geometry is plain integer arithmetic on the encoder's parameters (:func:`map_shape`,
:func:`cell_bounds`): a grid of cells whose boundaries are rounded half up
(:func:`pooling_bounds`, the Coates-Ng demo's split), or windows of a size every stride
(:func:`window_bounds`, ``avg_pool2d(ceil_mode=True)``'s, Thiry et al.'s). :func:`pool` then
reduces a ``(b, rows, cols, F)`` map over those cells; :mod:`featlearn.activations` composes it
with the activation.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

#: Reductions of :func:`pool`.
POOL_OPS = ("sum", "max", "mean")


def as_pair(value, name: str) -> tuple[int, int]:
    """``(rows, cols)`` from an int (a square) or a pair of positive ints; a ValueError naming
    the parameter ``name`` otherwise."""
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (rows, cols) pair of positive "
                         f"ints, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def map_shape(image_hw, patch_size: int, stride: int) -> tuple[int, int]:
    """``(rows, cols)`` of patch positions in an ``(H, W)`` image at ``stride``."""
    H, W = image_hw
    return ((H - patch_size) // stride + 1, (W - patch_size) // stride + 1)


def pool_window(pool_size, pool_stride):
    """``(size_h, size_w, stride_h, stride_w)`` of the pooling windows, or None (a grid) when
    ``pool_size`` is None; ``pool_stride`` None means non-overlapping windows."""
    if pool_size is None:
        return None
    size = as_pair(pool_size, "pool_size")
    return size + (size if pool_stride is None else as_pair(pool_stride, "pool_stride"))


def pooling_bounds(n: int, n_cells: int) -> list[tuple[int, int]]:
    """Split ``n`` map positions into ``n_cells`` contiguous cells, boundaries rounded half up.

    Boundary ``i`` is ``round_half_up(i * n / n_cells)``: for the demo's 27x27 map and 2 cells
    that is ``[0, 14), [14, 27)``, and the same rule generalizes to any grid.
    """
    if n < n_cells:
        raise ValueError(
            f"the {n}-position feature map is smaller than the {n_cells}-cell pooling grid")
    edges = [(2 * i * n + n_cells) // (2 * n_cells) for i in range(n_cells + 1)]
    return list(zip(edges[:-1], edges[1:]))


def window_bounds(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Windows of ``size`` positions every ``stride`` over ``n``: ``torch.nn.functional.
    avg_pool2d``'s ``ceil_mode=True`` arithmetic without padding (Thiry et al.'s), so a last
    window may hang over the edge and is clipped to it: 27 positions, size 5, stride 3 ->
    9 windows, the last one ``[24, 27)``."""
    if n < size:
        raise ValueError(f"the {n}-position feature map is smaller than the {size}-position "
                         "pooling window")
    count = -(-(n - size) // stride) + 1
    if (count - 1) * stride >= n:
        count -= 1
    return [(i * stride, min(i * stride + size, n)) for i in range(count)]


def cell_bounds(shape, pooling, window=None):
    """Row and column bounds of the cells over a ``(rows, cols)`` map: the ``window``s of
    :func:`pool_window` when given, else the ``pooling`` grid (an int or a pair)."""
    if window is None:
        return tuple(pooling_bounds(n, c) for n, c in zip(shape, as_pair(pooling, "pooling")))
    return tuple(window_bounds(n, z, t) for n, z, t in zip(shape, window[:2], window[2:]))


def pool(A: torch.Tensor, row_bounds, col_bounds, op: str, window=None) -> torch.Tensor:
    """Pool a ``(b, rows, cols, F)`` map over cells -> ``(b, n_cells, F)``.

    A cell is a ``[r0, r1) x [c0, c1)`` block. Cells are row-major (for a 2x2 grid: top-left,
    top-right, bottom-left, bottom-right), which is the encoder's output layout. ``"mean"``
    divides each cell's sum by its own size (a clipped edge window by its clipped size).

    A grid (``window`` None) is reduced rows first, then columns, so the second reduction runs
    on a smaller map. Windows (``window = (size_h, size_w, stride_h, stride_w)``, whose bounds
    :func:`window_bounds` gave) overlap, and slicing them one by one costs a pass per window:
    they go through torch's pooling kernels instead, on the channels-last view of the map
    (``ceil_mode=True``: the same windows).
    """
    if window is not None:
        return _pool_windows(A, op, window)
    reduce = torch.amax if op == "max" else torch.sum
    bands = torch.stack([reduce(A[:, r0:r1], 1) for r0, r1 in row_bounds], 1)
    cells = torch.stack([reduce(bands[:, :, c0:c1], 2) for c0, c1 in col_bounds], 2)
    if op == "mean":
        sizes = torch.tensor([[1.0 / ((r1 - r0) * (c1 - c0)) for c0, c1 in col_bounds]
                              for r0, r1 in row_bounds], dtype=A.dtype, device=A.device)
        cells = cells * sizes.view(1, len(row_bounds), len(col_bounds), 1)
    return cells.reshape(A.shape[0], len(row_bounds) * len(col_bounds), A.shape[-1])


def _pool_windows(A, op, window):
    b, F_ = A.shape[0], A.shape[-1]
    x = A.permute(0, 3, 1, 2)  # (b, F, rows, cols), channels-last in memory
    size, stride = window[:2], window[2:]
    if op == "max":
        out = F.max_pool2d(x, size, stride, ceil_mode=True)
    else:
        out = F.avg_pool2d(x, size, stride, ceil_mode=True,
                           divisor_override=1 if op == "sum" else None)
    return out.permute(0, 2, 3, 1).reshape(b, -1, F_)
