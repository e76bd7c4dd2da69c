"""k-means dictionary learning in torch: :class:`KMeans` (full-batch Lloyd) and
:class:`MiniBatchKMeans` (scikit-learn's mini-batch rule), over one shared base class.

One numeric code path serves the CPU and CUDA: the chunked distance kernels and the solvers live
in :mod:`featlearn._kmeans_solvers`, the input checks in :mod:`featlearn._kmeans_input`. All
randomness comes from a private CPU :class:`torch.Generator`, so a seed picks the same samples
on every device and the global torch seed is never touched.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin
from sklearn.base import TransformerMixin
from sklearn.utils import check_random_state
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from featlearn._kmeans_input import as_tensor, check_centers, check_weight
from featlearn._kmeans_solvers import (MiniBatchResult, _inertia, _init_centers, _lloyd,
                                       _minibatch, _minibatch_step, _MiniBatchState,
                                       _rows_per_chunk, _tolerance, cpu_workers,
                                       nearest_centroid, pairwise_distances)
from featlearn import _native, _torch
from featlearn._torch import make_generator, resolve_precision, to_numpy

# --------------------------------------------------------------------------------------------
# The estimators
# --------------------------------------------------------------------------------------------


def _resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": "int8" where its products are native (:func:`featlearn._torch.has_fast_int8`),
    else :func:`featlearn._torch.resolve_precision`'s rule; either needs the CPU and featlearn's
    native refinement kernels (elsewhere the refinement in torch ops costs more than it
    saves)."""
    if precision != "auto":
        return precision
    if not (device.type == "cpu" and _native.available()):
        return "float32"
    if _torch.has_fast_int8(device):
        return "int8"
    return resolve_precision(precision, device)


#: k-means++ subsample per centre when ``init_size=None``: a careful start pays off over
#: Lloyd's full passes, while for mini-batches a larger sample would cost more than the fit.
_LLOYD_INIT_OVERSAMPLING = 24
_MINIBATCH_INIT_OVERSAMPLING = 3


class _BaseKMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin,
                  BaseEstimator):
    """Validation, initialisation, ``predict``/``transform``/``score`` shared by both k-means."""

    _parameter_constraints = {
        "n_clusters": [Interval(numbers.Integral, 1, None, closed="left")],
        "init": [StrOptions({"k-means++", "random", "randn"}), callable, "array-like"],
        "init_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "reassignment_ratio": [Interval(numbers.Real, 0, 1, closed="both")],
        "n_init": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "precision": [StrOptions({"float32", "bfloat16", "int8", "auto"})],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    #: k-means++ subsample per centre when ``init_size`` is None.
    _init_oversampling = _LLOYD_INIT_OVERSAMPLING
    #: Runs of a random start under ``n_init="auto"`` (scikit-learn's values).
    _default_n_init = 10

    # ---- validation (the input checks: featlearn._kmeans_input) ---------------------------

    def _check_n_samples(self, n):
        if n < self.n_clusters:
            raise ValueError(f"n_samples={n} should be >= n_clusters={self.n_clusters}.")

    def _check_init(self, d):
        if isinstance(self.init, str) or callable(self.init):
            return self.init
        return check_centers(self.init, self.n_clusters, d)

    def _resolve_init(self, init, X, gen):
        """A callable init called as scikit-learn does, ``init(X, n_clusters, random_state)``
        (numpy ``X``, a RandomState seeded from the private generator); else ``init``."""
        if not callable(init):
            return init
        rs = np.random.RandomState(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        return check_centers(init(to_numpy(X), self.n_clusters, random_state=rs),
                             self.n_clusters, X.shape[1])

    def _resolve_n_init(self, init):
        """scikit-learn's ``n_init="auto"``: one run for k-means++ and explicit centres,
        ``_default_n_init`` for random starts ("random", "randn", a callable); an explicit
        array with ``n_init > 1`` warns and runs once. Sets ``_n_init``."""
        n_init = self.n_init
        if n_init == "auto":
            n_init = 1 if isinstance(init, np.ndarray) or init == "k-means++" else None
            n_init = self._default_n_init if n_init is None else n_init
        if isinstance(init, np.ndarray) and n_init != 1:
            warnings.warn("Explicit initial center position passed: performing only one init "
                          f"in {type(self).__name__} instead of n_init={n_init}.",
                          RuntimeWarning, stacklevel=4)
            n_init = 1
        self._n_init = n_init
        return n_init

    def _init_size(self, n=None):
        if self.init_size is None:
            return self._init_oversampling * self.n_clusters
        if self.init_size < self.n_clusters:
            size = self._init_oversampling * self.n_clusters
            size = size if n is None else min(size, n)
            warnings.warn(f"init_size={self.init_size} should be larger than n_clusters="
                          f"{self.n_clusters}. Setting it to {size}.", RuntimeWarning,
                          stacklevel=4)
            return size
        return self.init_size

    # ---- fitting -------------------------------------------------------------------------

    def _solve(self, X, centers, *, gen, tol, chunk, sample_weight, need_labels):
        raise NotImplementedError

    def _fit(self, X, sample_weight, *, need_labels=True):
        """Validate, run ``n_init`` initialisations + solver runs, keep the lowest inertia."""
        self._validate_params()
        X = as_tensor(self, X, reset=True, fitting=True)
        w = check_weight(sample_weight, X)
        n, d = X.shape
        self._check_n_samples(n)
        init = self._check_init(d)
        n_init = self._resolve_n_init(init)
        gen = make_generator(self.random_state)
        self.precision_ = _resolve_precision(self.precision, X.device)
        chunk = self._chunk(d, X.device)
        init_size = self._init_size(n)
        best = None
        with cpu_workers(X.device):
            tol = _tolerance(X, self.tol)
            for _ in range(n_init):
                centers = _init_centers(X, self.n_clusters, self._resolve_init(init, X, gen),
                                        gen, init_size, w)
                res = self._solve(X, centers, gen=gen, tol=tol, chunk=chunk, sample_weight=w,
                                  need_labels=need_labels or n_init > 1)
                if best is None or res.inertia < best.inertia:
                    best = res
        self.cluster_centers_ = to_numpy(best.centers).astype(np.float32, copy=True)
        if need_labels:
            self.labels_ = to_numpy(best.labels).astype(np.int64, copy=False)
            distinct = len(np.unique(self.labels_))
            if distinct < self.n_clusters and isinstance(self, KMeans):
                warnings.warn(f"Number of distinct clusters ({distinct}) found smaller than "
                              f"n_clusters ({self.n_clusters}). Possibly due to duplicate "
                              "points in X.", ConvergenceWarning, stacklevel=3)
        if best.inertia is not None:
            self.inertia_ = best.inertia
        else:  # the final pass was skipped: scikit-learn's estimate from the batch inertia
            weight_sum = float(n) if w is None else float(w.sum(dtype=torch.float64))
            self.inertia_ = best.ewa_inertia * weight_sum
        self.counts_ = to_numpy(best.counts).astype(np.float64, copy=True)
        self.n_iter_ = int(best.n_iter)
        self.n_steps_ = int(best.n_steps)
        return gen, best

    # ---- using a fitted model ------------------------------------------------------------

    def _precision(self):
        """The fitted precision (models saved before it existed: float32)."""
        return getattr(self, "precision_", "float32")

    def _chunk(self, d, device):
        """Rows per assignment chunk: bfloat16 products take half a float32 distance block's
        bytes, so twice the rows (int8 products are int32)."""
        return _rows_per_chunk(self.n_clusters, d, device,
                               2 if self._precision() == "bfloat16" else 4)

    def _centers_like(self, X):
        return torch.from_numpy(self.cluster_centers_).to(device=X.device, dtype=X.dtype)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the nearest centre of every row of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,) or None, default=None

        Returns
        -------
        labels : ndarray of shape (n_samples,), int64
        """
        self.fit(X, sample_weight=sample_weight)
        labels = getattr(self, "labels_", None)
        return labels if labels is not None else self.predict(X)

    def predict(self, X):
        """Index of the nearest centre for each row of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,), int64
        """
        check_is_fitted(self)
        X = as_tensor(self, X, reset=False)
        with cpu_workers(X.device):
            labels, _ = nearest_centroid(X, self._centers_like(X), precision=self._precision())
        return to_numpy(labels).astype(np.int64, copy=False)

    def transform(self, X):
        """Euclidean distances from each row of ``X`` to every centre.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        distances : ndarray of shape (n_samples, n_clusters)
            float64 for float64 input, else float32.
        """
        check_is_fitted(self)
        X = as_tensor(self, X, reset=False)
        with cpu_workers(X.device):
            return to_numpy(pairwise_distances(X, self._centers_like(X)))

    def score(self, X, y=None, sample_weight=None):
        """Minus the inertia of ``X`` (weighted sum of squared distances to the nearest centre).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,) or None, default=None

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X = as_tensor(self, X, reset=False)
        w = check_weight(sample_weight, X)
        with cpu_workers(X.device):
            _, mind = nearest_centroid(X, self._centers_like(X), precision=self._precision())
        return -_inertia(mind, w)

    @property
    def _n_features_out(self):
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


_COMMON_PARAMS = """\
    n_clusters : int, default=8
        Number of centres (scikit-learn's default; the paper's dictionary is 1600); must not
        exceed the number of samples.
    init : {"k-means++", "random", "randn"}, callable or array of shape \\
            (n_clusters, n_features), default="k-means++"
        "k-means++": greedy k-means++ (``2 + log(k)`` trials per centre) on a random subsample
        of ``init_size`` points. "random": distinct sampled data points. "randn":
        ``0.1 * randn``, the MATLAB demo's init (empty clusters are then reassigned). With
        ``sample_weight``, points are drawn in proportion to their weights. A callable is
        called as ``init(X, n_clusters, random_state)`` (numpy ``X``, a RandomState) and
        returns the centres.
"""

_SHARED_TAIL = """\
    n_init : "auto" or int, default="auto"
        Independent initialisations, each run to the end; the run with the lowest inertia on
        ``X`` is kept. "auto" (scikit-learn's rule): 1 run for "k-means++" and an array, else
        (random starts: "random", "randn", a callable) 10 for :class:`KMeans` and 3 for
        :class:`MiniBatchKMeans`. An explicit array with ``n_init > 1`` warns and runs once.
    precision : {"float32", "bfloat16", "int8", "auto"}, default="float32"
        The distance products' precision when fitting and predicting on float32 data.
        "bfloat16" multiplies in bfloat16 and settles the few centres that its rounding leaves
        in contention for a sample by their float32 distances, so labels and inertia are those
        of float32 (up to float32 rounding) at the cost of a bfloat16 GEMM: about twice as fast
        on CPUs with native bfloat16 (AVX512-BF16, AMX), slower where it is emulated. "int8"
        does the same from exact integer products of samples and centres scaled to 8 bits
        (one scale each), whose error the quantization residuals bound: the same labels as
        "bfloat16", from a GEMM about twice as fast again on CPUs with VNNI or AMX-INT8.
        "auto" (when featlearn's native kernels are built, on the CPU): "int8" on such a CPU,
        else "bfloat16" where it is native, else "float32".
        :meth:`transform` (all distances) and float64 input always use float32 or float64.
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available, else the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds a private CPU torch generator: the same seed gives the same centres on the same
        device (and the same sampled points on every device).
    verbose : int, default=0
        1: a summary line per fit (and a progress bar for mini-batches); 2: a line per
        iteration / step as well (the ``featlearn`` logger).
"""

_NOTES = """\
    Notes
    -----
    ``fit``/``predict`` accept numpy arrays (float32 preferred, float64 and integers are
    converted) and torch tensors (on any device). Fitting always runs in float32 (values that
    are not finite after that cast are a ValueError); :meth:`predict`/:meth:`transform`/
    :meth:`score` compute in float64 for float64 input. Distances are computed chunk by chunk
    (chunks sized from free memory), so memory beyond the data is ``O(chunk * k + k * d)``.
    Fitted state is numpy, so a CUDA-fitted model pickles and loads without CUDA. On the CPU,
    ``fit``/``predict``/``transform``/``score`` split each pass over the rows between
    ``torch.get_num_threads()`` worker threads and meanwhile run torch with one intra-op thread
    (a process-wide setting, restored afterwards): per-op thread barriers stall on a loaded
    machine, one split per pass does not.
"""


class KMeans(_BaseKMeans):
    __doc__ = f"""k-means by full-batch Lloyd iterations in torch, on the CPU or CUDA.

    The dictionary stage of the Coates-Ng pipeline (1600 centres on ~400,000 whitened patches,
    50 iterations, as the paper ran). Clusters never end empty, zero or NaN: empty and low-count
    clusters move to random data points (see ``reassignment_ratio``), so no centre is left on a
    single outlier patch.

    Parameters
    ----------
{_COMMON_PARAMS}    init_size : int or None, default=None
        Points sampled for the k-means++ initialisation (at least ``n_clusters``). None means
        ``24 * n_clusters``.
    max_iter : int, default=50
        Lloyd iterations.
    tol : float, default=1e-4
        Stop when the summed squared centre shift of one iteration is at most
        ``tol * mean(var(X, axis=0))``, scikit-learn's relative tolerance. Lloyd also stops
        when the labels stop changing.
    reassignment_ratio : float, default=0.01
        Centres whose (weighted) count is below this fraction of the largest count move to
        distinct random data points before every iteration but the last (empty ones also in
        the last). 0: only empty clusters move, to the points farthest from their centres,
        which leave their old clusters (scikit-learn's ``KMeans``). When every point already
        sits on a centre, nothing moves.
    algorithm : {{"lloyd"}}, default="lloyd"
        Lloyd iterations, the only algorithm (scikit-learn's "elkan" is not implemented).
    copy_x : bool, default=True
        Accepted for scikit-learn compatibility: ``X`` is never modified (featlearn does not
        centre the data in place).
{_SHARED_TAIL}
    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features), float32
    labels_ : ndarray of shape (n_samples,), int64
        Nearest centre of each training sample (consistent with ``cluster_centers_``).
    inertia_ : float
        (Weighted) sum of squared distances of the training samples to their nearest centre.
    n_iter_ : int
        Lloyd iterations run.
    n_steps_ : int
        Centre updates (equals ``n_iter_``; kept for symmetry with :class:`MiniBatchKMeans`).
    precision_ : {"float32", "bfloat16", "int8"}
        ``precision`` with "auto" resolved for the fitting device.
    counts_ : ndarray of shape (n_clusters,), float64
        Samples (summed sample weights) per centre in the final assignment.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.

{_NOTES}
    See Also
    --------
    MiniBatchKMeans : the same model fitted by mini-batch updates, with ``partial_fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import KMeans
    >>> X = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], dtype=np.float32)
    >>> km = KMeans(n_clusters=2, random_state=0, device="cpu").fit(X)
    >>> sorted(km.cluster_centers_.tolist())
    [[0.0, 0.5], [10.0, 10.5]]
    >>> km.predict(np.array([[1, 1]], dtype=np.float32)) == km.labels_[0]
    array([ True])
    """

    _parameter_constraints = {
        **_BaseKMeans._parameter_constraints,
        "algorithm": [StrOptions({"lloyd"})],
        "copy_x": ["boolean"],
    }

    def __init__(self, n_clusters=8, *, init="k-means++", init_size=None, max_iter=50,
                 tol=1e-4, reassignment_ratio=0.01, n_init="auto", algorithm="lloyd",
                 copy_x=True, precision="float32", device="auto", random_state=None,
                 verbose=0):
        self.n_clusters = n_clusters
        self.algorithm = algorithm
        self.copy_x = copy_x
        self.init = init
        self.init_size = init_size
        self.max_iter = max_iter
        self.tol = tol
        self.reassignment_ratio = reassignment_ratio
        self.n_init = n_init
        self.precision = precision
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _solve(self, X, centers, *, gen, tol, chunk, sample_weight, need_labels):
        return _lloyd(X, centers, max_iter=self.max_iter, tol=tol,
                      reassignment_ratio=self.reassignment_ratio, gen=gen, chunk=chunk,
                      verbose=self.verbose, sample_weight=sample_weight,
                      precision=self.precision_)

    def fit(self, X, y=None, sample_weight=None):
        """Compute the centres of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,) or None, default=None
            Non-negative weights: Lloyd's means and counts are weighted, k-means++ samples in
            proportion to them. Integer weights act as repeated rows.

        Returns
        -------
        self : KMeans
        """
        self._fit(X, sample_weight)
        return self


class MiniBatchKMeans(_BaseKMeans):
    __doc__ = f"""k-means by scikit-learn's mini-batch updates in torch, on the CPU or CUDA.

    Per-centre counts and step ``1 / count``, batches drawn without replacement within an
    epoch, stopping on the smoothed (EWA) batch inertia. Low-count centres move to random
    batch points, so no centre stays empty or on a single outlier. :meth:`partial_fit` streams
    batches.

    Parameters
    ----------
{_COMMON_PARAMS}    batch_size : int, default=1024
        Samples per update (scikit-learn's default); capped at the number of samples.
    init_size : int or None, default=None
        Points sampled for the k-means++ initialisation (at least ``n_clusters``). None means
        ``3 * n_clusters`` (a larger sample would cost more than the mini-batch fit itself;
        scikit-learn uses ``3 * batch_size``).
    max_iter : int, default=50
        Epochs (passes over the data) at most.
    tol : float, default=1e-4
        Stop when the summed squared centre shift of one step is at most
        ``tol * mean(var(X, axis=0))``. 0 disables the rule.
    max_no_improvement : int or None, default=10
        Stop after this many steps without improving the EWA batch inertia. None disables it.
    reassignment_ratio : float, default=0.01
        Centres whose (weighted) count is below this fraction of the largest count move to
        random batch points every ``10 * n_clusters`` samples, or at once when a centre has
        count 0 (at most half a batch per round). 0 disables it.
    compute_labels : bool, default=True
        After fitting, compute ``labels_`` and ``inertia_`` in one full pass over ``X`` (for
        :meth:`partial_fit`: over the batch). False skips the pass: no ``labels_``, and
        ``inertia_`` is the EWA batch inertia times the summed weights, or with ``lloyd_iter``
        the inertia of the last Lloyd assignment, an upper bound on the final centres' (with
        ``n_init > 1`` the pass still runs, to compare the runs).
    lloyd_iter : int, default=0
        Full-batch Lloyd iterations (as :class:`KMeans` runs them, with the same ``tol`` and
        ``reassignment_ratio``) started from the mini-batch centres, in :meth:`fit` only.
        Mini-batch epochs make Lloyd's early, large moves at a fraction of their cost; the
        Lloyd iterations then refine exactly, as :class:`KMeans` would. 0 is scikit-learn's
        ``MiniBatchKMeans``.
{_SHARED_TAIL}
    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features), float32
    labels_ : ndarray of shape (n_samples,), int64
        Nearest centre of each training sample (of the last batch for :meth:`partial_fit`);
        only with ``compute_labels=True``.
    inertia_ : float
        (Weighted) sum of squared distances of those samples to their nearest centre.
    n_iter_ : int
        Epochs started (:meth:`partial_fit`: calls), plus the Lloyd iterations run.
    n_steps_ : int
        Centre updates performed: batches, plus the Lloyd iterations run.
    precision_ : {"float32", "bfloat16", "int8"}
        ``precision`` with "auto" resolved for the fitting device.
    counts_ : ndarray of shape (n_clusters,), float64
        Running (weighted) sample counts per centre, the denominators of the learning rate;
        after Lloyd iterations, the (weighted) samples per centre in the last assignment.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.

{_NOTES}
    See Also
    --------
    KMeans : full-batch Lloyd, the paper's k-means.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import MiniBatchKMeans
    >>> X = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], dtype=np.float32)
    >>> km = MiniBatchKMeans(n_clusters=2, random_state=0, device="cpu").fit(X)
    >>> km.predict(np.array([[0, 0], [10, 10]], dtype=np.float32)).tolist() in ([0, 1], [1, 0])
    True
    """

    _parameter_constraints = {
        **_BaseKMeans._parameter_constraints,
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_no_improvement": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "compute_labels": ["boolean"],
        "lloyd_iter": [Interval(numbers.Integral, 0, None, closed="left")],
    }
    _init_oversampling = _MINIBATCH_INIT_OVERSAMPLING
    _default_n_init = 3

    def __init__(self, n_clusters=8, *, init="k-means++", batch_size=1024, init_size=None,
                 max_iter=50, tol=1e-4, max_no_improvement=10, reassignment_ratio=0.01,
                 compute_labels=True, lloyd_iter=0, n_init="auto", precision="float32",
                 device="auto", random_state=None, verbose=0):
        self.n_clusters = n_clusters
        self.init = init
        self.batch_size = batch_size
        self.init_size = init_size
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.reassignment_ratio = reassignment_ratio
        self.compute_labels = compute_labels
        self.lloyd_iter = lloyd_iter
        self.n_init = n_init
        self.precision = precision
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _solve(self, X, centers, *, gen, tol, chunk, sample_weight, need_labels):
        res = _minibatch(X, centers, batch_size=self.batch_size, max_iter=self.max_iter,
                         tol=tol, max_no_improvement=self.max_no_improvement,
                         reassignment_ratio=self.reassignment_ratio, gen=gen, chunk=chunk,
                         verbose=self.verbose, sample_weight=sample_weight,
                         compute_labels=need_labels and not self.lloyd_iter,
                         precision=self.precision_)
        if not self.lloyd_iter:
            return res
        lloyd = _lloyd(X, res.centers, max_iter=self.lloyd_iter, tol=tol,
                       reassignment_ratio=self.reassignment_ratio, gen=gen, chunk=chunk,
                       verbose=self.verbose, sample_weight=sample_weight, final_pass=need_labels,
                       precision=self.precision_)
        return MiniBatchResult(lloyd.centers, lloyd.labels, lloyd.inertia,
                               res.n_iter + lloyd.n_iter, res.n_steps + lloyd.n_steps,
                               lloyd.counts, res.ewa_inertia)

    def fit(self, X, y=None, sample_weight=None):
        """Compute the centres of ``X`` by mini-batch updates.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,) or None, default=None
            Non-negative weights: counts and centre updates are weighted, k-means++ samples in
            proportion to them.

        Returns
        -------
        self : MiniBatchKMeans
        """
        if hasattr(self, "labels_"):
            del self.labels_  # a refit with compute_labels=False must not keep stale labels
        gen, _ = self._fit(X, sample_weight, need_labels=self.compute_labels)
        # partial_fit may continue a fitted model: its seed and reassignment clock.
        self._seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        self._since_reassign = 0
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """One mini-batch update with all of ``X`` as the batch (initialising on the first call).

        The first call draws the initial centres from this batch (so it needs at least
        ``n_clusters`` samples); ``labels_``/``inertia_`` describe the latest batch (with
        ``compute_labels=True``).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,) or None, default=None

        Returns
        -------
        self : MiniBatchKMeans
        """
        first = not hasattr(self, "cluster_centers_")
        if first:
            self._validate_params()
        X = as_tensor(self, X, reset=first, fitting=True)
        w = check_weight(sample_weight, X)
        n, d = X.shape
        k = self.n_clusters
        if first:
            self.precision_ = _resolve_precision(self.precision, X.device)
        with cpu_workers(X.device):
            if first:
                self._check_n_samples(n)
                self._seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
                gen = torch.Generator().manual_seed(self._seed)
                init = self._resolve_init(self._check_init(d), X, gen)
                centers = _init_centers(X, k, init, gen, self._init_size(n), w)
                state = _MiniBatchState(torch.zeros(k, dtype=torch.float64, device=X.device))
                self.n_steps_ = 0
            else:
                gen = torch.Generator().manual_seed(self._seed + self.n_steps_ + 1)
                centers = torch.from_numpy(self.cluster_centers_).to(X.device)
                counts = torch.from_numpy(self.counts_.astype(np.float64)).to(X.device)
                state = _MiniBatchState(counts, self._since_reassign)
            chunk = self._chunk(d, X.device)
            centers, batch_inertia, _ = _minibatch_step(X, centers, state,
                                                        reassignment_ratio=self.reassignment_ratio,
                                                        gen=gen, chunk=chunk, sample_weight=w,
                                                        precision=self._precision())
            self.cluster_centers_ = to_numpy(centers).astype(np.float32, copy=True)
            self.counts_ = to_numpy(state.counts).astype(np.float64, copy=True)
            self._since_reassign = state.since_reassign
            if self.compute_labels:
                labels, mind = nearest_centroid(X, centers, chunk=chunk,
                                                precision=self._precision())
                self.labels_ = to_numpy(labels).astype(np.int64, copy=False)
                self.inertia_ = _inertia(mind, w)
            else:
                self.inertia_ = float(batch_inertia) * n
        self.n_steps_ += 1
        self.n_iter_ = self.n_steps_
        return self
