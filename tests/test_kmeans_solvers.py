"""featlearn._kmeans_solvers, the fast k-means paths: mini-batch epochs followed by Lloyd
iterations (``MiniBatchKMeans(lloyd_iter=...)``), fits that make no pass over all points when
``compute_labels=False``, the cache-sized CPU chunks and their worker threads, and a k-means++
that picks exactly what the straightforward version picks."""

import math

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

import featlearn._kmeans_solvers as solvers
from featlearn import KMeans, MiniBatchKMeans
from featlearn._kmeans_solvers import _kmeans_plusplus, _rows_per_chunk, _tolerance

_WEIGHT_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data":
        "random initialisation draws rows, so weights differ from repetition (fixed init: equal)",
    "check_sample_weight_equivalence_on_sparse_data": "sparse input is not supported",
}


@parametrize_with_checks([MiniBatchKMeans(n_clusters=3, batch_size=16, max_iter=3, lloyd_iter=2,
                                          random_state=0)],
                         expected_failed_checks=lambda est: _WEIGHT_XFAIL)
def test_sklearn_compatible_with_lloyd_iter(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def heavy():
    """Heavy-tailed data (like whitened patches), where centres end up on outliers."""
    rng = np.random.default_rng(0)
    return rng.standard_t(3, size=(4000, 12)).astype(np.float32)


def _reference_kmeans_plusplus(X, n_clusters, gen, sample_weight=None):
    """The k-means++ of featlearn 24b0e72, written the plain way (the fast one must match it)."""
    m, d = X.shape
    n_local_trials = 2 + int(math.log(n_clusters))
    w = sample_weight
    if w is None:
        first = int(torch.randint(m, (1,), generator=gen))
    else:
        first = int(torch.multinomial(w.double(), 1, generator=gen))
    u = torch.rand((n_clusters, n_local_trials), generator=gen, dtype=torch.float64)
    x_sq = (X * X).sum(1)
    centers = torch.empty((n_clusters, d), dtype=X.dtype)
    centers[0] = X[first]
    closest = (x_sq - 2 * X @ X[first] + x_sq[first]).clamp_(min=0)
    for c in range(1, n_clusters):
        cdf = torch.cumsum(closest if w is None else closest * w, 0, dtype=torch.float64)
        total = cdf[-1]
        by_potential = torch.searchsorted(cdf, u[c] * total, right=True)
        uniform = (u[c] * m).long()
        cand = torch.where(total > 0, by_potential, uniform).clamp_(max=m - 1)
        Xc = X[cand]
        dist = (x_sq[:, None] - 2 * X @ Xc.t() + x_sq[cand][None, :]).clamp_(min=0)
        dist = torch.minimum(dist, closest[:, None])
        best = torch.argmin(dist.sum(0) if w is None else (w[:, None] * dist).sum(0))
        closest = dist[:, best]
        centers[c] = Xc[best]
    return centers


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_plusplus_picks_what_the_plain_version_picks(heavy, weighted):
    # Same draws, same rounding (doubling is exact; the candidate sums run in the old layout):
    # the shipped dictionaries do not change.
    X = torch.from_numpy(heavy[:2500])
    w = torch.rand(len(X), generator=torch.Generator().manual_seed(1)) if weighted else None
    fast = _kmeans_plusplus(X, 120, torch.Generator().manual_seed(3), sample_weight=w)
    plain = _reference_kmeans_plusplus(X, 120, torch.Generator().manual_seed(3), sample_weight=w)
    assert torch.equal(fast, plain)


def test_cpu_chunks_keep_the_distance_block_cache_sized():
    cpu = torch.device("cpu")
    for k in (20, 400, 1600, 4000, 100_000):
        rows = _rows_per_chunk(k, 108, cpu)
        assert solvers._CPU_MIN_CHUNK <= rows <= solvers._CPU_MAX_CHUNK
        assert rows * k * 4 <= solvers._CPU_BLOCK_BYTES or rows == solvers._CPU_MIN_CHUNK
    assert _rows_per_chunk(1600, 108, cpu) < _rows_per_chunk(400, 108, cpu)


def test_tolerance():
    X = torch.from_numpy(np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32) * 3)
    assert _tolerance(X, 0.0) == 0.0
    assert _tolerance(X[:1], 1e-4) == 0.0
    assert _tolerance(X, 1e-4) == pytest.approx(float(X.double().var(0).mean()) * 1e-4, rel=1e-6)
    # Chunked: the same from any chunk size; a large mean costs no accuracy.
    assert _tolerance(X, 1.0, chunk=7) == pytest.approx(_tolerance(X, 1.0), rel=1e-6)
    assert _tolerance(X + 1e4, 1.0) == pytest.approx(float(X.double().var(0).mean()), rel=1e-5)


@pytest.fixture
def passes(monkeypatch):
    """Row counts of every nearest-centroid pass the solvers make."""
    seen = []
    real = solvers.nearest_centroid

    def spy(X, C, **kw):
        seen.append(X.shape[0])
        return real(X, C, **kw)

    monkeypatch.setattr(solvers, "nearest_centroid", spy)
    return seen


@pytest.mark.parametrize("lloyd_iter", [0, 3])
def test_compute_labels_false_makes_no_extra_pass_over_all_points(heavy, passes, lloyd_iter):
    n = len(heavy)
    kw = dict(n_clusters=10, batch_size=500, max_iter=2, tol=0, max_no_improvement=None,
              lloyd_iter=lloyd_iter, device="cpu", random_state=0)
    MiniBatchKMeans(compute_labels=False, **kw).fit(heavy)
    full = [p for p in passes if p == n]
    # Only the Lloyd iterations see all points; the batches never do.
    assert len(full) == lloyd_iter and len(passes) == 16 + lloyd_iter
    passes.clear()
    MiniBatchKMeans(**kw).fit(heavy)
    assert len([p for p in passes if p == n]) == lloyd_iter + 1   # + labels_ / inertia_


def test_lloyd_iter_continues_the_minibatch_centres_with_lloyd(heavy):
    # Without reassignment draws, the result is exactly KMeans started from the mini-batch
    # centres.
    kw = dict(n_clusters=15, batch_size=256, max_iter=2, reassignment_ratio=0, device="cpu",
              random_state=0)
    mb = MiniBatchKMeans(**kw).fit(heavy)
    both = MiniBatchKMeans(lloyd_iter=4, **kw).fit(heavy)
    km = KMeans(15, init=mb.cluster_centers_, max_iter=4, reassignment_ratio=0,
                device="cpu").fit(heavy)
    np.testing.assert_array_equal(both.cluster_centers_, km.cluster_centers_)
    np.testing.assert_array_equal(both.labels_, km.labels_)
    np.testing.assert_array_equal(both.counts_, km.counts_)
    assert both.inertia_ == km.inertia_ < mb.inertia_
    assert both.n_iter_ == mb.n_iter_ + km.n_iter_
    assert both.n_steps_ == mb.n_steps_ + km.n_steps_


def test_lloyd_iter_without_labels(heavy):
    kw = dict(n_clusters=15, batch_size=256, max_iter=1, lloyd_iter=3, tol=0, device="cpu",
              random_state=0)
    quick = MiniBatchKMeans(compute_labels=False, **kw).fit(heavy)
    full = MiniBatchKMeans(**kw).fit(heavy)
    np.testing.assert_array_equal(quick.cluster_centers_, full.cluster_centers_)
    assert not hasattr(quick, "labels_")
    # The last assignment's inertia: an upper bound on the final centres' own.
    assert full.inertia_ == pytest.approx(-full.score(heavy), rel=1e-5)
    assert quick.inertia_ >= full.inertia_ * (1 - 1e-6)
    assert quick.inertia_ <= full.inertia_ * 1.05
    assert quick.counts_.sum() == len(heavy)


def test_lloyd_iter_is_deterministic_and_weighted(heavy):
    w = np.random.default_rng(0).integers(0, 3, size=len(heavy)).astype(np.float64)
    kw = dict(n_clusters=12, batch_size=300, max_iter=1, lloyd_iter=3, device="cpu")
    a = MiniBatchKMeans(random_state=5, **kw).fit(heavy, sample_weight=w)
    b = MiniBatchKMeans(random_state=5, **kw).fit(heavy, sample_weight=w)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.counts_.sum() == pytest.approx(w.sum())      # weighted counts of the assignment
    assert a.inertia_ == pytest.approx(-a.score(heavy, sample_weight=w), rel=1e-5)
    c = MiniBatchKMeans(random_state=6, **kw).fit(heavy, sample_weight=w)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_lloyd_iter_two_inits_compare_true_inertias(heavy):
    km = MiniBatchKMeans(n_clusters=10, batch_size=256, max_iter=1, lloyd_iter=2, n_init=2,
                         compute_labels=False, device="cpu", random_state=0).fit(heavy)
    assert km.inertia_ == pytest.approx(-km.score(heavy), rel=1e-5)


def test_lloyd_iter_round_trips_through_the_safe_format(heavy, tmp_path):
    from featlearn.persistence import load_model, save_model

    km = MiniBatchKMeans(n_clusters=6, batch_size=256, max_iter=1, lloyd_iter=2,
                         compute_labels=False, device="cpu", random_state=0).fit(heavy)
    save_model(km, tmp_path / "km.fl")
    back = load_model(tmp_path / "km.fl")
    assert back.get_params() == km.get_params()
    np.testing.assert_array_equal(back.predict(heavy), km.predict(heavy))


def test_bad_lloyd_iter(heavy):
    with pytest.raises(ValueError, match="lloyd_iter"):
        MiniBatchKMeans(n_clusters=3, lloyd_iter=-1).fit(heavy)


# ---- CPU worker threads ----------------------------------------------------------------------

def test_cpu_workers_set_and_restore_the_thread_count(two_threads):
    cpu = torch.device("cpu")
    with solvers.cpu_workers(cpu):
        assert torch.get_num_threads() == 1 and solvers._WORKERS.n == 2
        with solvers.cpu_workers(cpu):          # nested: unchanged
            assert torch.get_num_threads() == 1 and solvers._WORKERS.n == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and solvers._WORKERS.n == 1
    with pytest.raises(RuntimeError, match="boom"):
        with solvers.cpu_workers(cpu):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and solvers._WORKERS.n == 1


def test_rows_are_split_into_chunk_aligned_ranges(two_threads):
    seen = []
    with solvers.cpu_workers(torch.device("cpu")):
        solvers._over_rows(1000, 64, lambda a, b: seen.append((a, b)), torch.device("cpu"))
        assert sorted(seen) == [(0, 512), (512, 1000)]
        seen.clear()
        solvers._over_rows(50, 64, lambda a, b: seen.append((a, b)), torch.device("cpu"))
        assert seen == [(0, 50)]                  # a single chunk: no split
    seen.clear()
    solvers._over_rows(1000, 64, lambda a, b: seen.append((a, b)), torch.device("cpu"))
    assert seen == [(0, 1000)]                    # outside cpu_workers: one range


def test_alongside_work_runs_once_on_the_calling_thread_before_its_own_range(two_threads):
    import threading

    main = threading.get_ident()
    events = []

    def work(a, b):
        events.append(("work", a, threading.get_ident() == main))

    def alongside():
        events.append(("alongside", threading.get_ident() == main))

    with solvers.cpu_workers(torch.device("cpu")):
        solvers._over_rows(1000, 64, work, torch.device("cpu"), alongside=alongside)
        mine = [e for e in events if e[-1]]
        assert mine == [("alongside", True), ("work", 512, True)]
        assert ("work", 0, False) in events and len(events) == 3
    events.clear()
    solvers._over_rows(1000, 64, work, torch.device("cpu"), alongside=alongside)
    assert events == [("alongside", True), ("work", 0, True)]


def test_workers_give_the_same_results(heavy, two_threads):
    X = torch.from_numpy(heavy)
    C = X[:37].clone()
    w = torch.rand(len(X), generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"sample_weight": w}):
        plain = solvers.nearest_centroid(X, C, chunk=100, accumulate=True, **kw)
        with solvers.cpu_workers(X.device):
            split = solvers.nearest_centroid(X, C, chunk=100, accumulate=True, **kw)
            D = solvers.pairwise_distances(X, C, chunk=100)
        for a, b in zip(plain, split):
            assert torch.equal(a, b)
        assert torch.equal(D, solvers.pairwise_distances(X, C, chunk=100))
    # An estimator's fit leaves the thread count as it found it.
    KMeans(5, max_iter=3, random_state=0, device="cpu").fit(heavy)
    assert torch.get_num_threads() == 2


def test_the_pool_is_made_anew_after_a_fork(monkeypatch):
    first = solvers._executor(2)
    assert solvers._executor(2) is first
    monkeypatch.setitem(solvers._POOL, "pid", -1)   # as in a forked child
    assert solvers._executor(2) is not first


# ---- bfloat16 products settled in float32 (precision="bfloat16") -------------------------------

@pytest.fixture(scope="module")
def patches_like():
    """108-dim heavy-tailed rows with 300 centres among them: many rows have near-tied centres,
    where plain bfloat16 distances pick another one."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3000, 108, generator=g) * torch.rand(3000, 1, generator=g).pow(3).mul(8).add(.2)
    C = X[torch.randperm(3000, generator=g)[:300]] + 0.3 * torch.randn(300, 108, generator=g)
    return X, C


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int8-unfused"])
@pytest.mark.parametrize("native_kernel", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_reduced_precision_assignment_is_the_float32_one(patches_like, precision, native_kernel,
                                                         accumulate, monkeypatch):
    X, C = patches_like
    if native_kernel and not solvers._native.available():
        pytest.skip("native kernels not built here")
    if not native_kernel:  # the same rule in torch ops (CUDA, or no C compiler)
        monkeypatch.setattr(solvers._native, "available", lambda: False)
    if precision == "int8-unfused":  # a CPU without VNNI: quantize, torch's int8 GEMM, refine
        monkeypatch.setattr(solvers._native, "int8_fused", lambda: False)
        precision = "int8"
    ref = solvers.nearest_centroid(X, C, accumulate=accumulate)
    got = solvers.nearest_centroid(X, C, accumulate=accumulate, precision=precision)
    assert torch.equal(got[0], ref[0])
    # distances equal up to float32 rounding of the terms ||x||^2 + ||c||^2 they cancel from
    scale = (X * X).sum(1) + (C * C).sum(1).max()
    assert bool(((got[1] - ref[1]).abs() <= 1e-6 * scale).all())
    if accumulate:  # the same labels: the same sums, in the same order
        assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
    plain = (C * C).sum(1) - 2 * (X.bfloat16() @ C.t().bfloat16()).float()
    assert not torch.equal(plain.argmin(1), ref[0])  # the data does test the refinement


def test_torch_refinement_falls_back_to_float32_rows_with_many_candidates(monkeypatch):
    """40 centres 2 away from a row and one 1.99 away: all within bfloat16's rounding of each
    other, more candidates than the torch refinement gathers."""
    monkeypatch.setattr(solvers._native, "available", lambda: False)
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(41, 16, generator=g), dim=1)
    x = torch.full((16,), 5.0)
    radius = torch.full((41, 1), 2.0)
    radius[17] = 1.99
    C = x + dirs * radius
    X = torch.stack([x, x + 0.5 * dirs[3]])
    S = X.bfloat16() @ C.t().bfloat16()
    c_sq = (C * C).sum(1)
    low = c_sq - 2 * S.float() - solvers._native.REFINE_DELTA * X.norm(dim=1, keepdim=True) * c_sq.sqrt()
    assert int((low <= (c_sq - 2 * S.float()).min(1, keepdim=True).values).sum(1)[0]) > 8
    labels, mind = solvers.nearest_centroid(X, C, precision="bfloat16")
    assert labels.tolist() == [17, 3]
    assert torch.equal(labels, solvers.nearest_centroid(X, C)[0])


@pytest.mark.parametrize("fused", [True, False])
def test_int8_and_bfloat16_assignments_agree_bit_for_bit(patches_like, fused, monkeypatch):
    """Both settle by the same float32 values, and neither bound leaves the nearest out."""
    X, C = patches_like
    if not fused:
        monkeypatch.setattr(solvers._native, "int8_fused", lambda: False)
    bf16 = solvers.nearest_centroid(X, C, precision="bfloat16")
    int8 = solvers.nearest_centroid(X, C, precision="int8")
    assert torch.equal(bf16[0], int8[0]) and torch.equal(bf16[1], int8[1])


def test_torch_int8_products_stay_exact_past_float32s_integers(monkeypatch):
    """Off the native path int8 products are a float GEMM of the integer values: float64 where
    float32's 24-bit sums could round them (d = 1100 here)."""
    monkeypatch.setattr(solvers._native, "available", lambda: False)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 1100, generator=g)
    C = X[:20] + 0.01 * torch.randn(20, 1100, generator=g)
    labels, mind = solvers.nearest_centroid(X, C, precision="int8")
    assert torch.equal(labels, solvers.nearest_centroid(X, C)[0])
    assert torch.equal(labels[:20], torch.arange(20))


def test_fused_int8_assignment_starts_threads_for_enough_work_only(monkeypatch):
    if not (solvers._native.available() and solvers._native.int8_fused()):
        pytest.skip("the fused int8 kernel needs AVX512-VNNI")
    seen = []
    assign = solvers._native.assign_int8

    def spy(*args, threads=1, **kw):
        seen.append(threads)
        return assign(*args, threads=threads, **kw)

    monkeypatch.setattr(solvers._native, "assign_int8", spy)
    monkeypatch.setattr(solvers, "n_workers", lambda device: 4)
    g = torch.Generator().manual_seed(0)
    solvers.nearest_centroid(torch.randn(1024, 8, generator=g), torch.randn(16, 8, generator=g),
                             precision="int8")
    X, C = torch.randn(2048, 108, generator=g), torch.randn(1600, 108, generator=g)
    large = solvers.nearest_centroid(X, C, precision="int8")
    assert seen == [1, 4]  # a tiny pass on the calling thread alone; a large one on four
    assert torch.equal(large[0], solvers.nearest_centroid(X, C)[0])


@pytest.mark.parametrize("weighted", [False, True])
def test_int8_minibatch_fit_is_the_bfloat16_one(patches_like, weighted):
    """Both precisions settle their assignments in float32, so whole mini-batch fits (weights
    and reassignments included) agree bit for bit."""
    X = patches_like[0].numpy()
    w = np.random.default_rng(2).uniform(0.2, 3.0, len(X)) if weighted else None
    kw = dict(n_clusters=50, batch_size=200, max_iter=4, random_state=0, device="cpu",
              reassignment_ratio=0.2, max_no_improvement=None)
    bf16 = MiniBatchKMeans(precision="bfloat16", **kw).fit(X, sample_weight=w)
    int8 = MiniBatchKMeans(precision="int8", **kw).fit(X, sample_weight=w)
    np.testing.assert_array_equal(int8.cluster_centers_, bf16.cluster_centers_)
    np.testing.assert_array_equal(int8.labels_, bf16.labels_)
    assert int8.inertia_ == bf16.inertia_ and int8.n_steps_ == bf16.n_steps_


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("Est", [KMeans, MiniBatchKMeans])
def test_reduced_precision_fits_the_float32_model(patches_like, Est, precision):
    X = patches_like[0].numpy()
    kw = dict(n_clusters=40, random_state=0, device="cpu", max_iter=5)
    if Est is MiniBatchKMeans:
        kw.update(batch_size=512)
    ref = Est(**kw).fit(X)
    got = Est(precision=precision, **kw).fit(X)
    assert got.precision_ == precision and ref.precision_ == "float32"
    np.testing.assert_array_equal(got.labels_, ref.labels_)
    np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.predict(X), ref.predict(X))
    assert got.score(X) == pytest.approx(ref.score(X), rel=1e-6)


def test_auto_precision_is_int8_or_bfloat16_only_where_native(patches_like, monkeypatch):
    import featlearn._torch as torch_module
    import featlearn.kmeans as kmeans_module

    X = patches_like[0][:500].numpy()
    monkeypatch.setattr(torch_module, "has_fast_int8", lambda device: True)
    monkeypatch.setattr(torch_module, "has_fast_bfloat16", lambda device: True)
    monkeypatch.setattr(kmeans_module._native, "available", lambda: True)
    assert KMeans(5, precision="auto", max_iter=2, device="cpu").fit(X).precision_ == "int8"
    monkeypatch.setattr(torch_module, "has_fast_int8", lambda device: False)
    assert KMeans(5, precision="auto", max_iter=2, device="cpu").fit(X).precision_ == "bfloat16"
    monkeypatch.setattr(torch_module, "has_fast_bfloat16", lambda device: False)
    assert KMeans(5, precision="auto", max_iter=2, device="cpu").fit(X).precision_ == "float32"
    monkeypatch.setattr(torch_module, "has_fast_int8", lambda device: True)
    monkeypatch.setattr(kmeans_module._native, "available", lambda: False)
    assert KMeans(5, precision="auto", max_iter=2, device="cpu").fit(X).precision_ == "float32"
    with pytest.raises(ValueError, match="precision"):
        KMeans(5, precision="float16").fit(X)


@pytest.mark.parametrize("weighted", [False, True])
def test_native_minibatch_update_fits_the_torch_model(patches_like, weighted, monkeypatch):
    """The native update (sums, counts and step in one pass) gives the centres, counts and step
    count of the torch ops it replaces, reassignments included."""
    if not solvers._native.available():
        pytest.skip("native kernels not built here")
    X = patches_like[0].numpy()
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(X)) if weighted else None
    kw = dict(n_clusters=60, batch_size=256, max_iter=3, random_state=0, device="cpu",
              reassignment_ratio=0.05)
    got = MiniBatchKMeans(**kw).fit(X, sample_weight=w)
    monkeypatch.setattr(solvers._native, "available", lambda: False)
    ref = MiniBatchKMeans(**kw).fit(X, sample_weight=w)
    np.testing.assert_array_equal(got.cluster_centers_, ref.cluster_centers_)
    assert got.n_steps_ == ref.n_steps_
    np.testing.assert_array_equal(got.labels_, ref.labels_)


@pytest.mark.parametrize("weighted", [False, True])
def test_native_centre_sums_fit_the_torch_model(patches_like, weighted, monkeypatch):
    """Lloyd's per-centre sums in one native pass give the centres, labels and iterations of
    index_add_ and bincount."""
    if not solvers._native.available():
        pytest.skip("native kernels not built here")
    X = patches_like[0].numpy()
    w = np.random.default_rng(1).uniform(0.2, 3.0, len(X)) if weighted else None
    kw = dict(n_clusters=60, max_iter=8, tol=0, random_state=0, device="cpu")
    got = KMeans(**kw).fit(X, sample_weight=w)
    monkeypatch.setattr(solvers._native, "centre_sums", None)  # the torch ops (would fail)
    monkeypatch.setattr(solvers, "_native_float32", lambda dtype, device: False)
    ref = KMeans(**kw).fit(X, sample_weight=w)
    np.testing.assert_array_equal(got.cluster_centers_, ref.cluster_centers_)
    np.testing.assert_array_equal(got.labels_, ref.labels_)
    assert got.n_iter_ == ref.n_iter_


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_no_rows_assign_to_nothing(precision):
    C = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    labels, mind, sums, counts = solvers.nearest_centroid(torch.zeros(0, 8), C, accumulate=True,
                                                          precision=precision)
    assert labels.shape == mind.shape == (0,)
    assert not sums.any() and not counts.any()
