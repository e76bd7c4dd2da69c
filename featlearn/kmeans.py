"""k-means dictionary learning in torch: full-batch Lloyd or scikit-learn-style mini-batches.

One numeric code path serves the CPU and CUDA. Distances are ``||c||^2 - 2 x.c`` (the ``||x||^2``
term is added only where a true distance is needed), computed with ``addmm`` into a preallocated
``chunk x k`` buffer, so peak extra memory is ``O(chunk * k + k * d)`` and never ``n * k``.
All randomness comes from a private CPU :class:`torch.Generator`, so a seed picks the same samples
on every device and the global torch seed is never touched.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin
from sklearn.base import TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from featlearn._torch import chunk_size, make_generator, resolve_device, to_numpy

#: On the CPU, rows per distance chunk are capped here: a ``chunk x k`` block that stays near the
#: caches makes the argmin that follows the GEMM cheap; larger chunks gain nothing.
_CPU_MAX_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Private numeric kernels (reusable by other stages: the encoder needs the same distances)
# --------------------------------------------------------------------------------------------

def _rows_per_chunk(n_clusters: int, n_features: int, device: torch.device, itemsize: int = 4) -> int:
    """Rows of ``X`` per chunk: one distance row (k) plus the row itself and a few scalars."""
    maximum = _CPU_MAX_CHUNK if device.type == "cpu" else None
    return chunk_size((n_clusters + n_features + 4) * itemsize, device, maximum=maximum)


def nearest_centroid(X: torch.Tensor, C: torch.Tensor, *, chunk: int | None = None,
                     accumulate: bool = False):
    """Nearest centre and squared distance of every row of ``X``, chunk by chunk.

    Returns ``(labels, min_sq_dist)``, plus ``(sums, counts)`` (per-centre sums of the assigned
    rows and their counts, float64) when ``accumulate`` is true, computed in the same pass while
    each chunk is hot. ``min_sq_dist`` is clamped at 0 (float32 cancellation can make it
    slightly negative, whose ``sqrt`` would be NaN).

    Centre sums avoid atomics: ``index_add_`` is sequential (deterministic) on the CPU, while on
    CUDA (where it uses atomics) a one-hot GEMM over the chunk's distance buffer is used instead.
    """
    n, d = X.shape
    k = C.shape[0]
    device = X.device
    if chunk is None:
        chunk = _rows_per_chunk(k, d, device, X.element_size())
    chunk = max(1, min(chunk, n))
    c_sq = (C * C).sum(1)
    Ct = C.t()
    buf = torch.empty((chunk, k), dtype=X.dtype, device=device)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    mind = torch.empty(n, dtype=X.dtype, device=device)
    if accumulate:
        sums = torch.zeros((k, d), dtype=X.dtype, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        Xc = X[s:e]
        D = buf[:e - s]
        torch.addmm(c_sq, Xc, Ct, beta=1, alpha=-2, out=D)
        torch.min(D, dim=1, out=(mind[s:e], labels[s:e]))
        mind[s:e] += (Xc * Xc).sum(1)
        if accumulate:
            lab = labels[s:e]
            if device.type == "cuda":
                D.zero_()
                D.scatter_(1, lab[:, None], 1.0)
                sums.addmm_(D.t(), Xc)
                counts += D.sum(0, dtype=torch.float64)
            else:
                sums.index_add_(0, lab, Xc)
                counts += torch.bincount(lab, minlength=k)
    mind.clamp_(min=0)
    if accumulate:
        return labels, mind, sums, counts
    return labels, mind


def pairwise_distances(X: torch.Tensor, C: torch.Tensor, *, squared: bool = False,
                       chunk: int | None = None) -> torch.Tensor:
    """``(n, k)`` Euclidean (or squared) distances, computed chunk by chunk into the output.

    The output is itself ``n x k``; only the working memory beyond it is bounded.
    """
    n, d = X.shape
    k = C.shape[0]
    if chunk is None:
        chunk = _rows_per_chunk(k, d, X.device, X.element_size())
    c_sq = (C * C).sum(1)
    out = torch.empty((n, k), dtype=X.dtype, device=X.device)
    for s in range(0, n, max(1, chunk)):
        e = min(n, s + chunk)
        D = out[s:e]
        torch.addmm(c_sq, X[s:e], C.t(), beta=1, alpha=-2, out=D)
        D += (X[s:e] * X[s:e]).sum(1, keepdim=True)
        D.clamp_(min=0)
        if not squared:
            D.sqrt_()
    return out


def _kmeans_plusplus(X: torch.Tensor, n_clusters: int, gen: torch.Generator,
                     n_local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ on ``X`` (already a subsample), without a host round-trip per centre.

    All uniform draws are made up front on the CPU generator and sent to the device once; each
    centre is then picked by inverse-CDF sampling (``cumsum`` + ``searchsorted``) of the current
    potential, keeping the best of ``n_local_trials`` candidates (scikit-learn's greedy rule).
    When the potential is zero (fewer distinct points than centres) candidates are uniform.
    """
    m, d = X.shape
    device = X.device
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    first = int(torch.randint(m, (1,), generator=gen))
    u = torch.rand((n_clusters, n_local_trials), generator=gen, dtype=torch.float64).to(device)
    x_sq = (X * X).sum(1)
    centers = torch.empty((n_clusters, d), dtype=X.dtype, device=device)
    centers[0] = X[first]
    closest = (x_sq - 2 * X @ X[first] + x_sq[first]).clamp_(min=0)
    last = torch.tensor(m - 1, device=device)
    for c in range(1, n_clusters):
        cdf = torch.cumsum(closest, 0, dtype=torch.float64)
        total = cdf[-1]
        by_potential = torch.searchsorted(cdf, u[c] * total, right=True)
        uniform = (u[c] * m).long()
        cand = torch.where(total > 0, by_potential, uniform).clamp_(max=last)
        Xc = X[cand]
        dist = (x_sq[:, None] - 2 * X @ Xc.t() + x_sq[cand][None, :]).clamp_(min=0)
        dist = torch.minimum(dist, closest[:, None])
        best = torch.argmin(dist.sum(0))
        closest = dist[:, best]
        centers[c] = Xc[best]
    return centers


#: k-means++ subsample per centre for full-batch Lloyd (``init_size=None``).
_LLOYD_INIT_OVERSAMPLING = 24


def _default_init_size(n_clusters: int, minibatch: bool) -> int:
    """k-means++ subsample size when ``init_size`` is None: ``24 k`` points for Lloyd, whose
    50 full passes make a careful start worth it; ``3 k`` for mini-batches, whose whole fit
    costs less than a k-means++ on ``24 k`` points (measured on 400,000 CIFAR-10 patches,
    k=1600, 2-core CPU: 7.4 s on 24,576 points, 1.5 s on 4,800, one full pass 1.6 s).
    scikit-learn uses ``3 * batch_size``, which is just as costly for large batches."""
    return 3 * n_clusters if minibatch else _LLOYD_INIT_OVERSAMPLING * n_clusters


def _init_centers(X: torch.Tensor, n_clusters: int, init, gen: torch.Generator,
                  init_size: int) -> torch.Tensor:
    """Initial centres: k-means++ on a subsample of ``init_size`` points, sampled points,
    ``0.1 * randn``, or an array."""
    n, d = X.shape
    if isinstance(init, str) and init == "k-means++":
        m = min(n, max(init_size, n_clusters))
        idx = torch.randperm(n, generator=gen)[:m].to(X.device) if m < n else slice(None)
        return _kmeans_plusplus(X[idx], n_clusters, gen)
    if isinstance(init, str) and init == "random":
        idx = torch.randperm(n, generator=gen)[:n_clusters].to(X.device)
        return X[idx].clone()
    if isinstance(init, str) and init == "randn":
        return (0.1 * torch.randn((n_clusters, d), generator=gen)).to(X.device, X.dtype)
    return torch.as_tensor(np.asarray(init), dtype=X.dtype).to(X.device).clone()


def _lloyd(X, centers, *, max_iter, tol, reassignment_ratio, gen, chunk, verbose):
    """Full-batch Lloyd, with low-count clusters moved to random points.

    Centres whose count is below ``reassignment_ratio * max count`` (empty ones included) move
    to distinct random data points before every iteration but the last; with a ratio of 0 only
    empty clusters move, to the points farthest from their centres (scikit-learn's KMeans).
    Why not always the farthest points: on whitened patches (heavy-tailed) both k-means++ and
    farthest-point relocation park centres on single outliers, where they stay for good. On
    CIFAR-10 that left ~230 of 1600 centres holding <= 2 patches and cost 4.6 points of
    accuracy (benchmarks/results/coates2011-1600-svm/COMMAND.md; per-variant comparison:
    benchmarks/bench_dictionary.py).

    Stops when the labels no longer change, when the summed squared centre shift is at most
    ``tol`` (absolute), or after ``max_iter`` iterations. Returns the centres with labels,
    squared distances and counts that are consistent with them (one final E-step if needed).
    """
    prev = None
    n_iter = 0
    consistent = None
    n = X.shape[0]
    for it in range(max_iter):
        labels, mind, sums, counts = nearest_centroid(X, centers, chunk=chunk, accumulate=True)
        n_iter = it + 1
        if prev is not None and torch.equal(labels, prev):
            # The centres were computed from exactly these labels: a fixed point.
            consistent = (labels, mind, counts)
            break
        new = (sums / counts.clamp(min=1).to(sums.dtype)[:, None])
        if reassignment_ratio > 0:
            low = counts < reassignment_ratio * counts.max()
            if it == max_iter - 1:
                low &= counts == 0  # the last iteration only rescues empty centres
        else:
            low = counts == 0
        moved = torch.nonzero(low).flatten()
        if moved.numel():
            if reassignment_ratio > 0:
                # Indices drawn on the CPU generator: the same points on every device.
                pick = torch.randperm(n, generator=gen)[:moved.numel()].to(X.device)
            else:
                pick = torch.topk(mind, min(moved.numel(), n)).indices
            moved = moved[:pick.numel()]
            new[moved] = X[pick]
        shift = float(((new - centers) ** 2).sum())
        if verbose:
            print(f"Lloyd iteration {n_iter}: inertia {float(mind.sum()):.6g}, "
                  f"centre shift {shift:.3g}, moved {moved.numel()}")
        centers = new
        # A moved centre is not the mean of its labels: no fixed point can be claimed.
        prev = None if moved.numel() else labels
        if shift <= tol:
            break
    if consistent is None:
        labels, mind, _, counts = nearest_centroid(X, centers, chunk=chunk, accumulate=True)
    else:
        labels, mind, counts = consistent
    return centers, labels, mind, counts, n_iter, n_iter


class _MiniBatchState:
    """What a mini-batch run carries between steps (also across ``partial_fit`` calls)."""

    def __init__(self, counts, since_reassign=0):
        self.counts = counts            # float64 per-centre counts, on the device
        self.since_reassign = since_reassign
        self.ewa = None
        self.ewa_min = None
        self.no_improvement = 0


def _minibatch_step(Xb, centers, state, *, reassignment_ratio, gen, chunk):
    """One mini-batch update with scikit-learn's per-centre learning rate ``1 / count``.

    Returns the new centres, the batch inertia (before the update, per sample) and the summed
    squared centre shift. Centres with low counts (``< reassignment_ratio * max count``) are
    moved to random batch points every ``10 * k`` samples, or as soon as a centre has count 0.
    """
    b = Xb.shape[0]
    k = centers.shape[0]
    _, mind, sums, bcounts = nearest_centroid(Xb, centers, chunk=chunk, accumulate=True)
    batch_inertia = mind.sum() / b
    counts = state.counts + bcounts
    step = (sums - bcounts.to(sums.dtype)[:, None] * centers) / counts.clamp(min=1).to(sums.dtype)[:, None]
    new = centers + step
    state.counts = counts
    state.since_reassign += b
    if reassignment_ratio > 0 and (bool((counts == 0).any()) or state.since_reassign >= 10 * k):
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
            pick = torch.randperm(b, generator=gen)[:n_low].to(Xb.device)
            new[low] = Xb[pick]
            counts[low] = floor
    shift = ((new - centers) ** 2).sum()
    return new, batch_inertia, shift


def _minibatch_converged(state, batch_inertia, shift, *, step, batch_size, n_samples, tol,
                         max_no_improvement, verbose):
    """scikit-learn's stopping rule: centre shift under ``tol`` or no EWA-inertia improvement."""
    batch_inertia = float(batch_inertia)
    if step == 0:
        return False
    if state.ewa is None:
        state.ewa = batch_inertia
    else:
        alpha = min(batch_size * 2.0 / (n_samples + 1), 1.0)
        state.ewa = state.ewa * (1 - alpha) + batch_inertia * alpha
    if verbose:
        print(f"Mini-batch step {step + 1}: batch inertia {batch_inertia:.6g}, "
              f"ewa inertia {state.ewa:.6g}")
    if tol > 0 and float(shift) <= tol:
        return True
    if state.ewa_min is None or state.ewa < state.ewa_min:
        state.no_improvement = 0
        state.ewa_min = state.ewa
    else:
        state.no_improvement += 1
    return max_no_improvement is not None and state.no_improvement >= max_no_improvement


def _minibatch(X, centers, *, batch_size, max_iter, tol, max_no_improvement, reassignment_ratio,
               gen, chunk, verbose):
    """Mini-batch k-means: batches drawn without replacement within each epoch (a fresh CPU
    permutation per epoch; the remainder shorter than a batch is left for the next one)."""
    n = X.shape[0]
    k = centers.shape[0]
    b = min(batch_size, n)
    n_steps = max(1, (max_iter * n) // b)
    state = _MiniBatchState(torch.zeros(k, dtype=torch.float64, device=X.device))
    perm, pos = None, n
    steps_done = 0
    for step in range(n_steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen).to(X.device), 0
        Xb = X[perm[pos:pos + b]]
        pos += b
        centers, batch_inertia, shift = _minibatch_step(
            Xb, centers, state, reassignment_ratio=reassignment_ratio, gen=gen, chunk=chunk)
        steps_done = step + 1
        converged = _minibatch_converged(
            state, batch_inertia, shift, step=step, batch_size=b, n_samples=n, tol=tol,
            max_no_improvement=max_no_improvement, verbose=verbose)
        # Never stop while a centre has seen no sample yet and could still be reassigned.
        if converged and not (reassignment_ratio > 0 and bool((state.counts == 0).any())):
            break
    labels, mind = nearest_centroid(X, centers, chunk=chunk)
    n_iter = int(math.ceil(steps_done * b / n))
    return centers, labels, mind, state.counts, n_iter, steps_done


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------

class MiniBatchKMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin,
                      BaseEstimator):
    """k-means in torch, full-batch (Lloyd) or mini-batch, on the CPU or CUDA.

    The dictionary stage of the Coates-Ng pipeline (1600 centres on ~400,000 whitened patches by
    default). Works in float32 with distances ``||c||^2 - 2 X C^T`` computed chunk by chunk
    (chunks sized from free memory), so memory beyond the data is ``O(chunk * k + k * d)``.
    Clusters never end empty, zero or NaN: empty and low-count clusters move to random data
    points (see ``reassignment_ratio``), never left on a single outlier patch.

    Parameters
    ----------
    n_clusters : int, default=1600
        Number of centres; must not exceed the number of samples.
    init : {"k-means++", "random", "randn"} or array of shape (n_clusters, n_features), \
            default="k-means++"
        "k-means++": greedy k-means++ (``2 + log(k)`` trials per centre) on a random subsample
        of ``init_size`` points. "random": distinct sampled data points. "randn":
        ``0.1 * randn``, the MATLAB demo's init (empty clusters are then reassigned).
    batch_size : int or None, default=None
        None runs full-batch Lloyd (what the paper ran). An int runs mini-batch updates with
        scikit-learn's rule: per-centre counts and step ``1 / count``, batches drawn without
        replacement within an epoch, stopping on the smoothed (EWA) batch inertia.
    init_size : int or None, default=None
        Points sampled for the k-means++ initialisation (at least ``n_clusters``). None means
        ``24 * n_clusters`` for Lloyd and ``3 * n_clusters`` for mini-batches (where a larger
        sample would cost more than the rest of the fit).
    max_iter : int, default=50
        Lloyd iterations, or epochs (passes over the data) for mini-batches.
    tol : float, default=1e-4
        Stop when the summed squared centre shift of one iteration (step) is at most
        ``tol * mean(var(X, axis=0))``, scikit-learn's relative tolerance. Lloyd also stops
        when the labels stop changing.
    max_no_improvement : int or None, default=10
        Mini-batch only: stop after this many steps without improving the EWA inertia.
        None disables the rule.
    reassignment_ratio : float, default=0.01
        Centres whose count is below this fraction of the largest count move to random data
        points: in Lloyd before every iteration but the last, in mini-batch mode every
        ``10 * n_clusters`` samples or at once when a centre has count 0 (then to batch points).
        0 disables it: Lloyd then moves only empty clusters, to the farthest points
        (scikit-learn's ``KMeans``), and mini-batch leaves unseen centres where they are.
    n_init : int, default=1
        Independent initialisations; the run with the lowest inertia on ``X`` is kept.
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available, else the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds a private CPU torch generator: the same seed gives the same centres on the same
        device (and the same sampled points on every device).
    verbose : int, default=0
        Print progress per iteration / step.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features), float32
    labels_ : ndarray of shape (n_samples,), int64
        Nearest centre of each training sample (of the last batch for :meth:`partial_fit`).
    inertia_ : float
        Sum of squared distances of those samples to their nearest centre.
    n_iter_ : int
        Lloyd iterations, or epochs started (mini-batch).
    n_steps_ : int
        Centre updates performed (equals ``n_iter_`` for Lloyd; batches for mini-batch).
    counts_ : ndarray of shape (n_clusters,), int64
        Samples per centre: in the final assignment (Lloyd), or the mini-batch running counts.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.

    Notes
    -----
    ``fit``/``predict`` accept numpy arrays (float32 preferred, float64 and integers are
    converted) and torch tensors (on any device). Fitting always runs in float32;
    :meth:`predict`/:meth:`transform`/:meth:`score` compute in float64 for float64 input.
    Fitted state is numpy, so a CUDA-fitted model pickles and loads without CUDA.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import MiniBatchKMeans
    >>> X = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], dtype=np.float32)
    >>> km = MiniBatchKMeans(n_clusters=2, random_state=0, device="cpu").fit(X)
    >>> sorted(km.cluster_centers_.tolist())
    [[0.0, 0.5], [10.0, 10.5]]
    >>> km.predict(np.array([[1, 1]], dtype=np.float32)) == km.labels_[0]
    array([ True])
    """

    _parameter_constraints = {
        "n_clusters": [Interval(numbers.Integral, 1, None, closed="left")],
        "init": [StrOptions({"k-means++", "random", "randn"}), "array-like"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "init_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "max_no_improvement": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "reassignment_ratio": [Interval(numbers.Real, 0, 1, closed="both")],
        "n_init": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(self, n_clusters=1600, *, init="k-means++", batch_size=None, init_size=None,
                 max_iter=50, tol=1e-4, max_no_improvement=10, reassignment_ratio=0.01,
                 n_init=1, device="auto", random_state=None, verbose=0):
        self.n_clusters = n_clusters
        self.init = init
        self.batch_size = batch_size
        self.init_size = init_size
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.reassignment_ratio = reassignment_ratio
        self.n_init = n_init
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ---- validation ----------------------------------------------------------------------

    def _to_tensor(self, X, *, reset, dtype=None, fitting=False):
        """Validate ``X`` (numpy-like or tensor) and return it as a tensor on the device.

        ``dtype=None`` keeps float64 input as float64 (for predict/transform); fitting casts
        to float32.
        """
        device = resolve_device(self.device)
        if isinstance(X, torch.Tensor):
            validate_data(self, X, skip_check_array=True, reset=reset)
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
                raise ValueError("Input X contains NaN or infinity.")
            return X.contiguous()
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=reset, order="C")
        if fitting or X.dtype != np.float64:
            X = X.astype(np.float32, copy=False)
        if not X.flags.writeable:
            X = X.copy()  # torch.from_numpy warns on read-only (e.g. memmapped) arrays
        return torch.from_numpy(X).to(device)

    def _check_n_samples(self, n):
        if n < self.n_clusters:
            raise ValueError(f"n_samples={n} should be >= n_clusters={self.n_clusters}.")

    def _check_init(self, d):
        if isinstance(self.init, str):
            return self.init
        init = np.asarray(self.init, dtype=np.float32)
        if init.shape != (self.n_clusters, d):
            raise ValueError(f"init array has shape {init.shape}; expected "
                             f"(n_clusters, n_features) = ({self.n_clusters}, {d})")
        if not np.isfinite(init).all():
            raise ValueError("init array contains NaN or infinity")
        return init

    def _init_size(self, minibatch):
        if self.init_size is not None:
            return self.init_size
        return _default_init_size(self.n_clusters, minibatch)

    # ---- fitting -------------------------------------------------------------------------

    def fit(self, X, y=None):
        """Compute the centres of ``X`` (n_samples, n_features); ``y`` is ignored."""
        self._validate_params()
        X = self._to_tensor(X, reset=True, fitting=True)
        n, d = X.shape
        self._check_n_samples(n)
        init = self._check_init(d)
        n_init = self.n_init
        if not isinstance(init, str) and n_init != 1:
            warnings.warn("Explicit initial centres given: running a single init (n_init=1).",
                          RuntimeWarning, stacklevel=2)
            n_init = 1
        gen = make_generator(self.random_state)
        tol = float(X.var(0).mean()) * self.tol if n > 1 else 0.0
        chunk = _rows_per_chunk(self.n_clusters, d, X.device)
        init_size = self._init_size(self.batch_size is not None)
        best = None
        for _ in range(n_init):
            centers = _init_centers(X, self.n_clusters, init, gen, init_size)
            if self.batch_size is None:
                res = _lloyd(X, centers, max_iter=self.max_iter, tol=tol,
                             reassignment_ratio=self.reassignment_ratio, gen=gen, chunk=chunk,
                             verbose=self.verbose)
            else:
                res = _minibatch(X, centers, batch_size=self.batch_size, max_iter=self.max_iter,
                                 tol=tol, max_no_improvement=self.max_no_improvement,
                                 reassignment_ratio=self.reassignment_ratio, gen=gen, chunk=chunk,
                                 verbose=self.verbose)
            inertia = float(res[2].sum(dtype=torch.float64))
            if best is None or inertia < best[0]:
                best = (inertia, res)
        inertia, (centers, labels, _, counts, n_iter, n_steps) = best
        self.cluster_centers_ = to_numpy(centers).astype(np.float32, copy=True)
        self.labels_ = to_numpy(labels).astype(np.int64, copy=False)
        self.inertia_ = inertia
        self.counts_ = np.rint(to_numpy(counts)).astype(np.int64)
        self.n_iter_ = int(n_iter)
        self.n_steps_ = int(n_steps)
        # partial_fit may continue a fitted model: its seed and reassignment clock.
        self._seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        self._since_reassign = 0
        return self

    def partial_fit(self, X, y=None):
        """One mini-batch update with all of ``X`` as the batch (initialising on the first call).

        The first call draws the initial centres from this batch (so it needs at least
        ``n_clusters`` samples); ``labels_``/``inertia_`` describe the latest batch.
        """
        first = not hasattr(self, "cluster_centers_")
        if first:
            self._validate_params()
        X = self._to_tensor(X, reset=first, fitting=True)
        n, d = X.shape
        k = self.n_clusters
        if first:
            self._check_n_samples(n)
            self._seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
            gen = torch.Generator().manual_seed(self._seed)
            centers = _init_centers(X, k, self._check_init(d), gen, self._init_size(True))
            state = _MiniBatchState(torch.zeros(k, dtype=torch.float64, device=X.device))
            self.n_steps_ = 0
        else:
            gen = torch.Generator().manual_seed(self._seed + self.n_steps_ + 1)
            centers = torch.from_numpy(self.cluster_centers_).to(X.device)
            state = _MiniBatchState(torch.from_numpy(self.counts_.astype(np.float64)).to(X.device),
                                    self._since_reassign)
        chunk = _rows_per_chunk(k, d, X.device)
        centers, _, _ = _minibatch_step(X, centers, state,
                                        reassignment_ratio=self.reassignment_ratio,
                                        gen=gen, chunk=chunk)
        labels, mind = nearest_centroid(X, centers, chunk=chunk)
        self.cluster_centers_ = to_numpy(centers).astype(np.float32, copy=True)
        self.counts_ = np.rint(to_numpy(state.counts)).astype(np.int64)
        self._since_reassign = state.since_reassign
        self.labels_ = to_numpy(labels).astype(np.int64, copy=False)
        self.inertia_ = float(mind.sum(dtype=torch.float64))
        self.n_steps_ += 1
        self.n_iter_ = self.n_steps_
        return self

    # ---- using a fitted model ------------------------------------------------------------

    def _centers_like(self, X):
        return torch.from_numpy(self.cluster_centers_).to(device=X.device, dtype=X.dtype)

    def predict(self, X):
        """Index of the nearest centre for each row of ``X`` (int64 numpy array)."""
        check_is_fitted(self)
        X = self._to_tensor(X, reset=False)
        labels, _ = nearest_centroid(X, self._centers_like(X))
        return to_numpy(labels).astype(np.int64, copy=False)

    def transform(self, X):
        """Euclidean distances ``(n_samples, n_clusters)`` from each row to every centre."""
        check_is_fitted(self)
        X = self._to_tensor(X, reset=False)
        return to_numpy(pairwise_distances(X, self._centers_like(X)))

    def score(self, X, y=None):
        """Minus the inertia of ``X`` (sum of squared distances to the nearest centre)."""
        check_is_fitted(self)
        X = self._to_tensor(X, reset=False)
        _, mind = nearest_centroid(X, self._centers_like(X))
        return -float(mind.sum(dtype=torch.float64))

    @property
    def _n_features_out(self):
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

