"""Activations and pooling: what the encoder does with each chunk's distance products.

One small table (:data:`ACTIVATIONS`) maps an activation's name to the products its GEMM must
produce (squared distances or dot products), its width (features per centroid) and a function
of those products; :func:`pool` reduces the resulting map over a grid of cells. The encoder
composes the two in :func:`activate_and_pool`, the one function that runs eagerly (the
reference and the fallback) or through :func:`torch.compile` (:mod:`featlearn._compile`), where
inductor fuses the elementwise passes and the pooling reduction into one or two passes per chunk.

The functions are written out of place and without data-dependent shapes, so that the compiled
graph has no mutation to write back and no graph break.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def triangle(D: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max(0, mean_j z_j - z_k)`` with ``z = sqrt(max(D, 0))``; ``D`` squared distances.

    The clamp absorbs rounding: a squared distance from the GEMM expansion can come out
    slightly negative.
    """
    z = D.clamp_min(0.0).sqrt()
    return (z.mean(1, keepdim=True) - z).clamp_min(0.0)


def hard(D: torch.Tensor, alpha: float) -> torch.Tensor:
    """One-hot of the nearest centroid (first index on ties); ``D`` squared distances.

    Written as a comparison rather than a scatter so that, compiled, the one-hot is never
    stored: the pooling reduction reads the comparison directly.
    """
    nearest = D.argmin(1, keepdim=True)
    ids = torch.arange(D.shape[1], device=D.device)
    return (ids == nearest).to(D.dtype)


def soft_threshold(D: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[max(0, c.y - alpha), max(0, -c.y - alpha)]``; ``D`` dot products ``c.y``."""
    return torch.cat([(D - alpha).clamp_min(0.0), (-D - alpha).clamp_min(0.0)], 1)


@dataclass(frozen=True)
class Activation:
    """One row of :data:`ACTIVATIONS`."""

    #: What the distance GEMM must produce: ``"sqdist"`` (``||y - c||^2``) or ``"dot"``
    #: (``c . y``).
    products: str
    #: Features per centroid and cell.
    width: int
    #: ``(products (n, K), alpha) -> activations (n, width * K)``.
    fn: Callable[[torch.Tensor, float], torch.Tensor]


ACTIVATIONS = {
    "triangle": Activation("sqdist", 1, triangle),
    "hard": Activation("sqdist", 1, hard),
    "soft_threshold": Activation("dot", 2, soft_threshold),
}


def pool(A: torch.Tensor, row_bounds, col_bounds, op: str) -> torch.Tensor:
    """Pool a ``(b, rows, cols, F)`` map over contiguous cells -> ``(b, n_cells, F)``.

    Rows first, then columns, so the second reduction runs on a map ``cols / n_cell_rows``
    times smaller. Cells are row-major (for a 2x2 grid: top-left, top-right, bottom-left,
    bottom-right), which is the encoder's output layout.
    """
    reduce = torch.sum if op == "sum" else torch.amax
    bands = torch.stack([reduce(A[:, r0:r1], 1) for r0, r1 in row_bounds], 1)
    cells = torch.stack([reduce(bands[:, :, c0:c1], 2) for c0, c1 in col_bounds], 2)
    return cells.reshape(A.shape[0], len(row_bounds) * len(col_bounds), A.shape[-1])


def activate_and_pool(D: torch.Tensor, *, n_images: int, map_shape, row_bounds, col_bounds,
                      activation: str, alpha: float, pool_op: str) -> torch.Tensor:
    """``(n_images * rows * cols, K)`` products -> ``(n_images, n_cells, width * K)`` features.

    Rows of ``D`` are image-major, then map rows, then map columns (the encoder's im2col order).
    """
    A = ACTIVATIONS[activation].fn(D, alpha)
    return pool(A.view(n_images, map_shape[0], map_shape[1], A.shape[1]), row_bounds,
                col_bounds, pool_op)
