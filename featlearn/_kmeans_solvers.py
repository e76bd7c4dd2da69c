"""The numeric kernels of featlearn's k-means: chunked distances, initialisation, and the Lloyd
and mini-batch solvers as functions (:mod:`featlearn.kmeans` holds the estimators over them).

Distances are ``||c||^2 - 2 x.c`` (the ``||x||^2`` term is added only where a true distance is
needed), computed with ``addmm`` into a preallocated ``chunk x k`` buffer, so peak extra memory
is ``O(chunk * k + k * d)`` and never ``n * k``. The solvers (:func:`_lloyd`,
:func:`_minibatch`) take initial centres and return named tuples (:class:`LloydResult`,
:class:`MiniBatchResult`), so they compose: e.g. mini-batch epochs whose centres then start a
few Lloyd iterations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from featlearn import _native
from featlearn._logging import log, progress
from featlearn._reduced_products import ReducedProducts
from featlearn._torch import _POOL, _WORKERS, _executor, chunk_size, cpu_workers  # noqa: F401
from featlearn._torch import n_workers
from featlearn._torch import over_rows as _over_rows

#: On the CPU a chunk's ``chunk x k`` distance block is sized to stay near a core's L2 cache,
#: so the argmin that reads it back right after the GEMM finds it there, and a pass has chunks
#: enough to split between the worker threads. The bounds keep a chunk tall enough for the
#: GEMM's own blocking and short enough to leave every thread chunks to do. Chunking never
#: changes a result: rows are independent and summed in order.
_CPU_BLOCK_BYTES = 2 * 2**20
_CPU_MIN_CHUNK = 64
_CPU_MAX_CHUNK = 4096
#: Columns per block of the CPU argmin without the native kernel (:func:`_row_argmin`). torch's
#: ``min(dim)`` with indices is a scalar loop on the CPU, while ``amin`` over a block's contiguous
#: columns is vectorised: so the minimum of the block minima comes first, then the first minimum
#: inside the winning block. A multiple of the SIMD width, and long enough that a block's
#: reduction is vector work.
_ARGMIN_BLOCK = 64
#: The fewest multiply-adds a thread of the fused int8 assignment takes on: a fraction of a
#: millisecond of one core's work, of which a thread's start and join (tens of microseconds)
#: stay a small part. A mini-batch step on a many-core CPU then starts a few threads, not one
#: per core.
_PRODUCTS_PER_THREAD = 2 ** 25


# --------------------------------------------------------------------------------------------
# Private numeric kernels
# --------------------------------------------------------------------------------------------

def _rows_per_chunk(n_clusters: int, n_features: int, device: torch.device, itemsize: int = 4) -> int:
    """Rows of ``X`` per chunk: one distance row (k) plus the row itself and a few scalars.

    On the CPU, also as many rows as keep the distance block near ``_CPU_BLOCK_BYTES``.
    """
    maximum = None
    if device.type == "cpu":
        rows = _CPU_BLOCK_BYTES // max(1, n_clusters * itemsize)
        maximum = min(_CPU_MAX_CHUNK, max(_CPU_MIN_CHUNK, rows))
    return chunk_size((n_clusters + n_features + 4) * itemsize, device, maximum=maximum)


def nearest_centroid(X: torch.Tensor, C: torch.Tensor, *, chunk: int | None = None,
                     accumulate: bool = False, sample_weight: torch.Tensor | None = None,
                     onehot_sums: bool | None = None, precision: str = "float32",
                     alongside=None):
    """Nearest centre and squared distance of every row of ``X``, chunk by chunk.

    ``precision="bfloat16"`` or ``"int8"`` (float32 ``X`` only) multiplies in that precision,
    then settles every row whose products' error bound leaves more than one centre in
    contention by those centres' float32 distances (:mod:`featlearn._reduced_products`): the
    labels and distances of float32, up to float32 rounding, at the cheaper GEMM's cost.

    Returns ``(labels, min_sq_dist)``, plus ``(sums, counts)`` (per-centre sums of the assigned
    rows and their counts, float64) when ``accumulate`` is true. With ``sample_weight`` (a
    tensor of shape ``(n,)``) the sums and counts are weighted; ``min_sq_dist`` never is.
    ``min_sq_dist`` is clamped at 0 (float32 cancellation can make it slightly negative, whose
    ``sqrt`` would be NaN).

    On the CPU the chunks are split between the worker threads of :func:`cpu_workers` (when
    inside it; the fused int8 kernel splits the rows between as many threads of its own), and
    the sums are one pass in row order after it (deterministic, and the same as chunk by chunk:
    a native pass with ``index_add_``'s numbers where the native kernels run). On CUDA, where
    ``index_add_`` uses atomics, a one-hot GEMM over each chunk's distance buffer sums instead
    (``onehot_sums``: None picks by device; True/False force a path, e.g. to test both).

    ``alongside()``, when given, runs on the calling thread while the other threads take their
    rows: independent work of the caller's.
    """
    n, d = X.shape
    k = C.shape[0]
    device = X.device
    if chunk is None:
        chunk = _rows_per_chunk(k, d, device, X.element_size())
    chunk = max(1, min(chunk, n))
    # Equal whole chunks for every worker: a mini-batch of a few chunks is split evenly, not
    # left to one worker or split 2:1.
    workers = n_workers(device)
    chunk = max(1, -(-n // (workers * max(1, -(-n // (chunk * workers))))))
    c_sq = (C * C).sum(1)
    Ct = C.t()
    reduced = None
    if precision in ("bfloat16", "int8") and X.dtype == torch.float32:
        reduced = ReducedProducts(C, c_sq, precision)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    mind = torch.empty(n, dtype=X.dtype, device=device)
    w = None if sample_weight is None else sample_weight.to(device=device, dtype=X.dtype)
    if onehot_sums is None:
        onehot_sums = device.type == "cuda"
    onehot = accumulate and onehot_sums
    if accumulate:
        sums = torch.zeros((k, d), dtype=X.dtype, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)

    def work(start, stop):
        rows = min(chunk, stop - start)
        if reduced is None or onehot:
            buf, blocks = _distance_buffer(rows, k, X.dtype, device)
        for s in range(start, stop, chunk):
            e = min(stop, s + chunk)
            Xc = X[s:e]
            if reduced is not None:
                reduced.assign(Xc, mind[s:e], labels[s:e])
            else:
                D = buf[:e - s]
                torch.addmm(c_sq, Xc, Ct, beta=1, alpha=-2, out=D)
                _row_argmin(D, None if blocks is None else blocks[:e - s], mind[s:e],
                            labels[s:e])
            if onehot:  # one range only (never split between workers): sums in row order
                D = buf[:e - s]
                D.zero_()
                D.scatter_(1, labels[s:e, None], 1.0 if w is None else w[s:e, None])
                sums.addmm_(D.t(), Xc)
                counts.add_(D.sum(0, dtype=torch.float64))

    norms = []

    def beside():
        # The rows' squared norms, once for the pass and on the calling thread while the
        # workers run: they make no torch calls they can spare (each may wait for the GIL).
        norms.append(_row_sq_norms(X))
        if alongside is not None:
            alongside()

    if reduced is not None and reduced.threaded:
        # All rows in one call, split between the kernel's own threads (one per worker, each
        # with _PRODUCTS_PER_THREAD products at least).
        threads = min(workers, -(-n // chunk), max(1, n * k * d // _PRODUCTS_PER_THREAD))
        reduced.assign(X, mind, labels, threads=threads, alongside=beside)
    elif onehot:
        beside()
        work(0, n)
    else:
        _over_rows(n, chunk, work, device, alongside=beside)
    mind += norms[0]
    mind.clamp_(min=0)
    if accumulate and not onehot and _native_float32(X.dtype, device) and X.stride(1) == 1:
        _native.centre_sums(X, labels, w, sums, counts)  # the same numbers, in one pass
    elif accumulate and not onehot:
        # In row order, as chunk by chunk: row blocks bound the weighted copy's memory.
        for s in range(0, n, 16384):
            Xb = X[s:s + 16384]
            rows = labels[s:s + 16384]
            sums.index_add_(0, rows, Xb if w is None else Xb * w[s:s + 16384, None])
        if w is None:
            counts += torch.bincount(labels, minlength=k)
        else:
            counts += torch.bincount(labels, weights=w.double(), minlength=k)
    if accumulate:
        return labels, mind, sums, counts
    return labels, mind


def _native_float32(dtype, device: torch.device) -> bool:
    """Whether the native kernels take this CPU float32 work (the argmin of
    :func:`_row_argmin`, the per-centre sums, the mini-batch update): CPU float32, when they
    are built."""
    return device.type == "cpu" and dtype == torch.float32 and _native.available()


def _distance_buffer(rows: int, k: int, dtype, device: torch.device):
    """A ``rows x k`` distance block, and (CPU without the native argmin, ``k`` of two blocks or
    more) its rows as ``_ARGMIN_BLOCK``-column blocks for :func:`_row_argmin`: the block is the
    first ``k`` columns of a buffer padded to whole blocks with ``+inf`` (never a minimum),
    which the GEMM writes in place through its row stride."""
    if device.type != "cpu" or k < 2 * _ARGMIN_BLOCK or _native_float32(dtype, device):
        return torch.empty((rows, k), dtype=dtype, device=device), None
    padded = -(-k // _ARGMIN_BLOCK) * _ARGMIN_BLOCK
    buf = torch.empty((rows, padded), dtype=dtype, device=device)
    buf[:, k:] = math.inf
    return buf[:, :k], buf.view(rows, padded // _ARGMIN_BLOCK, _ARGMIN_BLOCK)


def _row_argmin(D: torch.Tensor, blocks: torch.Tensor | None, values: torch.Tensor,
                labels: torch.Tensor) -> None:
    """``torch.min(D, 1)`` into ``values`` and ``labels``: the same minima and the same (first)
    indices: by the native kernel on a CPU float32 block (no NaN: the k-means inputs are
    checked finite), else by block minima when ``blocks`` (:func:`_distance_buffer`) views
    ``D``'s rows."""
    if blocks is None and _native_float32(D.dtype, D.device):
        _native.row_argmin(D, values, labels)
        return
    if blocks is None:
        torch.min(D, dim=1, out=(values, labels))
        return
    torch.min(torch.amin(blocks, 2), dim=1, out=(values, labels))   # the first winning block
    rows = torch.arange(D.shape[0], device=D.device)
    labels.mul_(_ARGMIN_BLOCK).add_(blocks[rows, labels // _ARGMIN_BLOCK].argmin(1))


def _row_sq_norms(X: torch.Tensor, block: int = 16384) -> torch.Tensor:
    """``(X * X).sum(1)`` in row blocks (the product is never ``n x d`` at once)."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for s in range(0, X.shape[0], block):
        Xb = X[s:s + block]
        torch.sum(Xb * Xb, 1, out=out[s:s + block])
    return out


def _inertia(mind: torch.Tensor, sample_weight: torch.Tensor | None) -> float:
    """Sum of (weighted) squared distances, accumulated in float64."""
    if sample_weight is None:
        return float(mind.sum(dtype=torch.float64))
    return float((mind.double() * sample_weight.to(mind.device, torch.float64)).sum())


def _tolerance(X: torch.Tensor, tol: float, chunk: int = 16384) -> float:
    """scikit-learn's relative tolerance: ``tol`` times the mean per-feature variance of ``X``.

    Two passes over row chunks (column sums, then the summed squared deviations as one dot
    product per chunk, accumulated in float64): contiguous reads and one BLAS call per chunk
    rather than ``X.var(0)``'s reduction per column, and as accurate as a threshold needs.
    ``tol=0`` (scikit-learn's default for mini-batches) skips both passes.
    """
    n, d = X.shape
    if tol == 0 or n < 2:
        return 0.0
    total = torch.zeros(d, dtype=torch.float64, device=X.device)
    for s in range(0, n, chunk):
        total += X[s:s + chunk].sum(0)
    mean = (total / n).to(X.dtype)
    acc = torch.zeros((), dtype=torch.float64, device=X.device)
    for s in range(0, n, chunk):
        dev = (X[s:s + chunk] - mean).view(-1)
        acc += torch.dot(dev, dev)
    return float(acc) / (d * (n - 1)) * tol


def pairwise_distances(X: torch.Tensor, C: torch.Tensor, *, squared: bool = False,
                       chunk: int | None = None) -> torch.Tensor:
    """``(n, k)`` Euclidean (or squared) distances, computed chunk by chunk into the output.

    The output is itself ``n x k``; only the working memory beyond it is bounded.
    """
    n, d = X.shape
    k = C.shape[0]
    if chunk is None:
        chunk = _rows_per_chunk(k, d, X.device, X.element_size())
    chunk = max(1, min(chunk, n))
    c_sq = (C * C).sum(1)
    out = torch.empty((n, k), dtype=X.dtype, device=X.device)

    def work(start, stop):
        for s in range(start, stop, chunk):
            e = min(stop, s + chunk)
            D = out[s:e]
            torch.addmm(c_sq, X[s:e], C.t(), beta=1, alpha=-2, out=D)
            D += (X[s:e] * X[s:e]).sum(1, keepdim=True)
            D.clamp_(min=0)
            if not squared:
                D.sqrt_()

    _over_rows(n, chunk, work, X.device)
    return out


def _kmeans_plusplus(X: torch.Tensor, n_clusters: int, gen: torch.Generator,
                     n_local_trials: int | None = None,
                     sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ on ``X`` (already a subsample), without a host round-trip per centre.

    All uniform draws are made up front on the CPU generator and sent to the device once; each
    centre is then picked by inverse-CDF sampling (``cumsum`` + ``searchsorted``) of the current
    potential, keeping the best of ``n_local_trials`` candidates (scikit-learn's greedy rule).
    With ``sample_weight`` the first centre is drawn in proportion to the weights and the
    potential is weighted, as in scikit-learn. When the potential is zero (fewer distinct points
    than centres) candidates are uniform.
    """
    m, d = X.shape
    device = X.device
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    w = None if sample_weight is None else sample_weight.to(device=device, dtype=X.dtype)
    if w is None:
        first = int(torch.randint(m, (1,), generator=gen))
    else:
        first = int(torch.multinomial(w.double().cpu(), 1, generator=gen))
    u = torch.rand((n_clusters, n_local_trials), generator=gen, dtype=torch.float64).to(device)
    x_sq = (X * X).sum(1)
    centers = torch.empty((n_clusters, d), dtype=X.dtype, device=device)
    centers[0] = X[first]
    closest = (x_sq - 2 * X @ X[first] + x_sq[first]).clamp_(min=0)
    last = torch.tensor(m - 1, device=device)
    # Candidates times X^T (trials x m) is the fast GEMM orientation, computed in place.
    # Doubling is exact, so every distance rounds as ``x_sq - 2 x.c + c_sq`` always did; the
    # per-candidate sums run on an (m, trials) copy, the layout whose summation order (and so
    # whose picks) earlier versions had.
    Xt = X.t().contiguous()
    for c in range(1, n_clusters):
        cdf = torch.cumsum(closest if w is None else closest * w, 0, dtype=torch.float64)
        total = cdf[-1]
        by_potential = torch.searchsorted(cdf, u[c] * total, right=True)
        uniform = (u[c] * m).long()
        cand = torch.where(total > 0, by_potential, uniform).clamp_(max=last)
        Xc = X[cand]
        dist = torch.mm(Xc, Xt).mul_(-2).add_(x_sq).add_(x_sq[cand][:, None]).clamp_(min=0)
        torch.minimum(dist, closest, out=dist)
        by_row = dist.t().contiguous()
        best = torch.argmin(by_row.sum(0) if w is None else (w[:, None] * by_row).sum(0))
        closest = dist[best]
        centers[c] = Xc[best]
    return centers


def _random_rows(n: int, m: int, gen: torch.Generator, sample_weight=None) -> torch.Tensor:
    """Up to ``m`` distinct row indices (CPU), uniform among rows of positive weight."""
    if sample_weight is None:
        return torch.randperm(n, generator=gen)[:m]
    pool = torch.nonzero(sample_weight.cpu() > 0).flatten()
    return pool[torch.randperm(pool.numel(), generator=gen)[:m]]


def _leave_old_clusters(new, moved, pick, X, labels, sums, counts, sample_weight) -> None:
    """Points that moved centres now sit on are taken out of their old clusters' means
    (scikit-learn's relocation): the M-step then matches the assignment it implies. A cluster
    that is itself moved, or that the points would leave empty, keeps its centre."""
    donors = labels[pick]
    w = (torch.ones(pick.numel(), dtype=torch.float64, device=X.device) if sample_weight is None
         else sample_weight[pick].to(torch.float64))
    lost = torch.zeros_like(counts).index_add_(0, donors, w)
    lost_sums = torch.zeros_like(sums).index_add_(0, donors, X[pick] * w.to(X.dtype)[:, None])
    left = counts - lost
    update = (lost > 0) & (left > 0)
    update[moved] = False
    new[update] = (sums[update] - lost_sums[update]) / left[update].to(sums.dtype)[:, None]


def _init_centers(X: torch.Tensor, n_clusters: int, init, gen: torch.Generator,
                  init_size: int, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Initial centres: k-means++ on a subsample of ``init_size`` points, sampled points,
    ``0.1 * randn``, or an array. Weighted data draws points in proportion to their weights."""
    n, d = X.shape
    if isinstance(init, str) and init == "k-means++":
        m = min(n, max(init_size, n_clusters))
        idx = torch.randperm(n, generator=gen)[:m].to(X.device) if m < n else slice(None)
        w = None if sample_weight is None else sample_weight[idx]
        return _kmeans_plusplus(X[idx], n_clusters, gen, sample_weight=w)
    if isinstance(init, str) and init == "random":
        if sample_weight is not None and int((sample_weight > 0).sum()) >= n_clusters:
            idx = torch.multinomial(sample_weight.double().cpu(), n_clusters, replacement=False,
                                    generator=gen).to(X.device)
        else:
            idx = torch.randperm(n, generator=gen)[:n_clusters].to(X.device)
        return X[idx].clone()
    if isinstance(init, str) and init == "randn":
        return (0.1 * torch.randn((n_clusters, d), generator=gen)).to(X.device, X.dtype)
    return torch.as_tensor(np.asarray(init), dtype=X.dtype).to(X.device).clone()


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------

class LloydResult(NamedTuple):
    """What :func:`_lloyd` returns (tensors on the device)."""

    centers: torch.Tensor
    labels: torch.Tensor | None   # nearest centre of every sample, consistent with ``centers``;
                                  # None when the final pass was skipped
    inertia: float            # (weighted) sum of squared distances, float64 accumulation
    n_iter: int
    n_steps: int              # centre updates; equals n_iter for Lloyd
    counts: torch.Tensor      # float64 (weighted) samples per centre in the final assignment


class MiniBatchResult(NamedTuple):
    """What :func:`_minibatch` returns (tensors on the device)."""

    centers: torch.Tensor
    labels: torch.Tensor | None   # None when the final full pass was skipped
    inertia: float | None         # likewise
    n_iter: int                   # epochs started
    n_steps: int                  # batches
    counts: torch.Tensor          # float64 running (weighted) counts
    ewa_inertia: float | None     # smoothed per-sample batch inertia at the last step


def _lloyd(X, centers, *, max_iter, tol, reassignment_ratio, gen, chunk, verbose=0,
           sample_weight=None, final_pass=True, precision="float32") -> LloydResult:
    """Full-batch Lloyd, with low-count clusters moved to random points.

    Centres whose count is below ``reassignment_ratio * max count`` (empty ones included) move
    to distinct random data points before every iteration but the last; with a ratio of 0 only
    empty clusters move, to the points farthest from their centres (scikit-learn's KMeans).
    Why not always the farthest points: on whitened patches (heavy-tailed) both k-means++ and
    farthest-point relocation park centres on single outliers, where they stay for good and
    cost downstream accuracy (benchmarks/bench_dictionary.py compares the variants).

    Stops when the labels no longer change, when the summed squared centre shift is at most
    ``tol`` (absolute), or after ``max_iter`` iterations. Returns the centres with labels,
    inertia and counts that are consistent with them (one final E-step if needed). With
    ``final_pass=False`` that E-step is skipped: labels are None, and inertia and counts are
    those of the last assignment (an upper bound on the final centres' inertia, since the means
    of fixed labels only lower it and the last iteration moves empty centres only).
    """
    prev = None
    n_iter = 0
    consistent = None
    n = X.shape[0]
    reason = f"max_iter={max_iter} reached"
    for it in range(max_iter):
        labels, mind, sums, counts = nearest_centroid(X, centers, chunk=chunk, accumulate=True,
                                                      sample_weight=sample_weight,
                                                      precision=precision)
        n_iter = it + 1
        if prev is not None and torch.equal(labels, prev):
            # The centres were computed from exactly these labels: a fixed point.
            consistent = (labels, mind, counts)
            reason = "labels unchanged"
            break
        if sample_weight is None:
            new = (sums / counts.clamp(min=1).to(sums.dtype)[:, None])
        else:  # weighted counts can be positive yet below 1: divide by the true weight
            new = sums / torch.where(counts > 0, counts, 1.0).to(sums.dtype)[:, None]
        if reassignment_ratio > 0:
            low = counts < reassignment_ratio * counts.max()
            if it == max_iter - 1:
                low &= counts == 0  # the last iteration only rescues empty centres
        else:
            low = counts == 0
        moved = torch.nonzero(low).flatten()
        if moved.numel() and not bool(mind.max() > 0):
            # Every point sits on its centre (more centres than distinct points): moving one
            # is pointless, so empty centres stay where they are (scikit-learn's rule).
            empty = counts == 0
            new[empty] = centers[empty]
            moved = moved[:0]
        if moved.numel():
            if reassignment_ratio > 0:
                # Indices drawn on the CPU generator: the same points on every device.
                pick = _random_rows(n, moved.numel(), gen, sample_weight).to(X.device)
            else:
                pick = torch.topk(mind, min(moved.numel(), n)).indices
            moved = moved[:pick.numel()]
            new[moved] = X[pick]
            if reassignment_ratio == 0:  # scikit-learn's relocation, all of it
                _leave_old_clusters(new, moved, pick, X, labels, sums, counts, sample_weight)
        shift = float(((new - centers) ** 2).sum())
        log(verbose, "Lloyd iteration %d: inertia %.6g, centre shift %.3g, moved %d", n_iter,
            _inertia(mind, sample_weight), shift, moved.numel(), level=2)
        centers = new
        # A moved centre is not the mean of its labels: no fixed point can be claimed.
        prev = None if moved.numel() else labels
        if shift <= tol:
            reason = "centre shift within tol"
            break
    if consistent is None and not final_pass:
        labels = None
    elif consistent is None:
        labels, mind, _, counts = nearest_centroid(X, centers, chunk=chunk, accumulate=True,
                                                   precision=precision,
                                                   sample_weight=sample_weight)
    else:
        labels, mind, counts = consistent
    inertia = _inertia(mind, sample_weight)
    log(verbose, "KMeans: Lloyd stopped after %d iterations (%s), inertia %.6g", n_iter, reason,
        inertia)
    return LloydResult(centers, labels, inertia, n_iter, n_iter, counts)


class _MiniBatchState:
    """What a mini-batch run carries between steps (also across ``partial_fit`` calls)."""

    def __init__(self, counts, since_reassign=0):
        self.counts = counts            # float64 per-centre (weighted) counts, on the device
        self.since_reassign = since_reassign
        self.ewa = None
        self.ewa_min = None
        self.no_improvement = 0
        self.batch_inertia = None


def _minibatch_step(Xb, centers, state, *, reassignment_ratio, gen, chunk, sample_weight=None,
                    need_shift=True, precision="float32", alongside=None):
    """One mini-batch update with scikit-learn's per-centre learning rate ``1 / count``.

    Returns the new centres, the batch inertia (before the update, per sample) and the summed
    squared centre shift (None unless ``need_shift``: only a ``tol`` needs it, and it is a
    pass over the centres). Centres with low counts (``< reassignment_ratio * max count``) are
    moved to random batch points every ``10 * k`` samples, or as soon as a centre has count 0.
    With ``sample_weight`` (the batch's weights) counts and sums are weighted. ``alongside``:
    the caller's independent work, run while the assignment's worker threads do theirs.
    """
    b = Xb.shape[0]
    k = centers.shape[0]
    if _native_float32(Xb.dtype, Xb.device) and centers.is_contiguous():
        # The sums, counts and update in one native pass (the same numbers as the torch ops).
        labels, mind = nearest_centroid(Xb, centers, chunk=chunk, precision=precision,
                                        alongside=alongside)
        new, counts, zeros = _native.minibatch_update(Xb, labels, sample_weight, centers,
                                                      state.counts)
    else:
        _, mind, sums, bcounts = nearest_centroid(Xb, centers, chunk=chunk, accumulate=True,
                                                  sample_weight=sample_weight,
                                                  precision=precision, alongside=alongside)
        counts = state.counts + bcounts
        if sample_weight is None:
            rate = counts.clamp(min=1).to(sums.dtype)[:, None]
        else:
            rate = torch.where(counts > 0, counts, 1.0).to(sums.dtype)[:, None]
        new = centers + (sums - bcounts.to(sums.dtype)[:, None] * centers) / rate
        zeros = None  # counted only when reassignment needs it (a device sync on CUDA)
    if sample_weight is None:
        batch_inertia = mind.sum() / b
    else:
        batch_inertia = (mind * sample_weight.to(mind.device, mind.dtype)).sum() / b
    state.counts = counts
    state.since_reassign += b
    if reassignment_ratio > 0 and ((bool((counts == 0).any()) if zeros is None else zeros > 0)
                                   or state.since_reassign >= 10 * k):
        state.since_reassign = 0
        low = counts < reassignment_ratio * counts.max()
        n_low = int(low.sum())
        # Moved centres restart at the smallest count of the well-populated ones, so that they
        # are not picked again while others still wait (a capped round leaves some behind).
        floor = counts[~low].min() if n_low < k else counts.max()
        if n_low > b // 2:
            # Never reassign more centres than half the batch (scikit-learn's cap): keep the rest.
            keep = torch.argsort(counts, stable=True)[b // 2:]
            low[keep] = False
            n_low = int(low.sum())
        if n_low:
            pick = _random_rows(b, n_low, gen, sample_weight).to(Xb.device)
            moved = torch.nonzero(low).flatten()[:pick.numel()]
            new[moved] = Xb[pick]
            counts[moved] = floor
    shift = ((new - centers) ** 2).sum() if need_shift else None
    return new, batch_inertia, shift


def _minibatch_converged(state, batch_inertia, shift, *, step, batch_size, n_samples, tol,
                         max_no_improvement, verbose):
    """scikit-learn's stopping rule: centre shift under ``tol`` or no EWA-inertia improvement.

    Returns None to go on, else the reason to stop.
    """
    batch_inertia = float(batch_inertia)
    state.batch_inertia = batch_inertia
    if step == 0:
        return None
    if state.ewa is None:
        state.ewa = batch_inertia
    else:
        alpha = min(batch_size * 2.0 / (n_samples + 1), 1.0)
        state.ewa = state.ewa * (1 - alpha) + batch_inertia * alpha
    log(verbose, "Mini-batch step %d: batch inertia %.6g, ewa inertia %.6g", step + 1,
        batch_inertia, state.ewa, level=2)
    if tol > 0 and float(shift) <= tol:
        return "centre shift within tol"
    if state.ewa_min is None or state.ewa < state.ewa_min:
        state.no_improvement = 0
        state.ewa_min = state.ewa
    else:
        state.no_improvement += 1
    if max_no_improvement is not None and state.no_improvement >= max_no_improvement:
        return f"no EWA-inertia improvement in {max_no_improvement} steps"
    return None


def _minibatch(X, centers, *, batch_size, max_iter, tol, max_no_improvement, reassignment_ratio,
               gen, chunk, verbose=0, sample_weight=None, compute_labels=True,
               precision="float32") -> MiniBatchResult:
    """Mini-batch k-means: batches drawn without replacement within each epoch (a fresh CPU
    permutation per epoch; the remainder shorter than a batch is left for the next one).

    ``compute_labels=False`` skips the final full pass (labels and inertia are then None).
    """
    n = X.shape[0]
    k = centers.shape[0]
    b = min(batch_size, n)
    n_steps = max(1, (max_iter * n) // b)
    state = _MiniBatchState(torch.zeros(k, dtype=torch.float64, device=X.device))
    perm, pos = None, n
    steps_done = 0
    reason = f"max_iter={max_iter} epochs done"
    ahead = []  # the next batch's rows, gathered during this step's assignment

    def gather_next():
        # Only within the epoch's permutation: a new one is drawn at the next step as before,
        # after this step's reassignments have drawn from the same generator.
        if pos + b <= n and step + 1 < n_steps:
            ahead.append(torch.index_select(X, 0, perm[pos:pos + b]))

    with progress(n_steps, desc="MiniBatchKMeans", verbose=verbose, unit="batch") as bar:
        for step in range(n_steps):
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=gen).to(X.device), 0
            idx = perm[pos:pos + b]
            # whole-row copies, not X[idx]'s general indexing
            Xb = ahead.pop() if ahead else torch.index_select(X, 0, idx)
            wb = None if sample_weight is None else sample_weight[idx]
            pos += b
            centers, batch_inertia, shift = _minibatch_step(
                Xb, centers, state, reassignment_ratio=reassignment_ratio, gen=gen, chunk=chunk,
                sample_weight=wb, need_shift=tol > 0, precision=precision,
                alongside=gather_next)
            steps_done = step + 1
            bar.update(1)
            stop = _minibatch_converged(
                state, batch_inertia, shift, step=step, batch_size=b, n_samples=n, tol=tol,
                max_no_improvement=max_no_improvement, verbose=verbose)
            # Never stop while a centre has seen no sample yet and could still be reassigned.
            if stop and not (reassignment_ratio > 0 and bool((state.counts == 0).any())):
                reason = stop
                break
    n_iter = int(math.ceil(steps_done * b / n))
    labels = inertia = None
    if compute_labels:
        labels, mind = nearest_centroid(X, centers, chunk=chunk, precision=precision)
        inertia = _inertia(mind, sample_weight)
    ewa = state.ewa if state.ewa is not None else state.batch_inertia
    log(verbose, "MiniBatchKMeans: stopped after %d steps, %d epochs (%s), %s", steps_done,
        n_iter, reason, "ewa inertia %.6g" % ewa if inertia is None else "inertia %.6g" % inertia)
    return MiniBatchResult(centers, labels, inertia, n_iter, steps_done, state.counts, ewa)
