"""Tests for featlearn.MiniBatchKMeans: scikit-learn contract, agreement, robustness, determinism."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import MiniBatchKMeans
from featlearn.kmeans import _kmeans_plusplus, nearest_centroid, pairwise_distances

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@parametrize_with_checks([MiniBatchKMeans(n_clusters=3, max_iter=10, random_state=0),
                          MiniBatchKMeans(n_clusters=3, batch_size=16, max_iter=10,
                                          random_state=0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=3000, n_features=10, centers=8, cluster_std=0.5, random_state=3)
    return X.astype(np.float32), y


@pytest.mark.parametrize("batch_size", [None, 256])
def test_agrees_with_sklearn_on_blobs(blobs, batch_size):
    X, y = blobs
    ref = KMeans(n_clusters=8, n_init=1, random_state=0).fit(X)
    km = MiniBatchKMeans(n_clusters=8, batch_size=batch_size,
                         random_state=0, device="cpu").fit(X)
    assert adjusted_rand_score(km.labels_, y) > 0.99
    assert adjusted_rand_score(km.labels_, ref.labels_) > 0.99
    assert km.inertia_ <= ref.inertia_ * 1.01
    assert km.cluster_centers_.dtype == np.float32
    assert km.labels_.dtype == np.int64
    assert km.counts_.sum() >= len(X) if batch_size else km.counts_.sum() == len(X)
    np.testing.assert_array_equal(km.predict(X), km.labels_)
    assert np.isclose(-km.score(X), km.inertia_, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [None, 256])
@pytest.mark.parametrize("init", ["random", "randn"])
def test_more_inits_never_worse(blobs, init, batch_size):
    # Random inits can stop in a local minimum on blobs (so does scikit-learn's): n_init keeps
    # the best run, which includes the first one.
    X, _ = blobs
    one = MiniBatchKMeans(n_clusters=8, init=init, batch_size=batch_size, random_state=0).fit(X)
    five = MiniBatchKMeans(n_clusters=8, init=init, batch_size=batch_size, n_init=5,
                           random_state=0).fit(X)
    assert five.inertia_ <= one.inertia_
    assert np.isfinite(five.cluster_centers_).all() and (five.counts_ > 0).all()


def test_lloyd_reaches_sklearn_inertia_on_harder_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 16)).astype(np.float32)
    ref = KMeans(n_clusters=40, n_init=1, random_state=0).fit(X)
    km = MiniBatchKMeans(n_clusters=40, random_state=0, device="cpu").fit(X)
    assert km.inertia_ <= ref.inertia_ * 1.01
    # The reported inertia is that of the returned centres and labels.
    d2 = ((X - km.cluster_centers_[km.labels_]) ** 2).sum()
    assert np.isclose(km.inertia_, d2, rtol=1e-4)
    np.testing.assert_array_equal(np.bincount(km.labels_, minlength=40), km.counts_)


def test_transform_is_euclidean_distance(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=5, max_iter=3, random_state=0).fit(X)
    D = km.transform(X[:50])
    ref = np.sqrt(((X[:50, None, :] - km.cluster_centers_[None]) ** 2).sum(-1))
    np.testing.assert_allclose(D, ref, rtol=1e-4, atol=1e-3)
    assert D.dtype == np.float32
    assert km.transform(X[:5].astype(np.float64)).dtype == np.float64
    np.testing.assert_array_equal(km.fit_predict(X), km.labels_)
    assert km.get_feature_names_out().tolist() == [f"minibatchkmeans{i}" for i in range(5)]


@pytest.mark.parametrize("batch_size", [None, 32])
@pytest.mark.parametrize("init", ["k-means++", "random", "randn"])
def test_duplicates_and_k_near_n_never_zero_or_nan(batch_size, init):
    rng = np.random.default_rng(1)
    distinct = rng.uniform(1, 2, size=(20, 6)).astype(np.float32)
    X = np.repeat(distinct, 5, axis=0)           # 100 samples, only 20 distinct points
    km = MiniBatchKMeans(n_clusters=90, init=init, batch_size=batch_size, max_iter=20,
                         random_state=0, device="cpu").fit(X)
    C = km.cluster_centers_
    assert np.isfinite(C).all()
    assert (np.abs(C).sum(axis=1) > 0).all(), "a centre collapsed to zero"
    # Every centre is a data point (or an average of duplicates), never an artefact.
    assert (C >= 1 - 1e-5).all() and (C <= 2 + 1e-5).all()
    assert km.inertia_ == pytest.approx(0.0, abs=1e-3)   # 20 distinct points, 90 centres

    km = MiniBatchKMeans(n_clusters=100, init=init, batch_size=batch_size, random_state=0).fit(X)
    assert np.isfinite(km.cluster_centers_).all()


def test_all_identical_points():
    X = np.full((30, 4), 3.0, dtype=np.float32)
    for bs in (None, 8):
        km = MiniBatchKMeans(n_clusters=30, batch_size=bs, random_state=0).fit(X)
        np.testing.assert_allclose(km.cluster_centers_, 3.0)
        assert km.inertia_ == pytest.approx(0.0, abs=1e-4)


def test_randn_init_reassigns_empty_clusters():
    # 0.1*randn centres sit far from data shifted to 50: Lloyd must move every empty one.
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(2000, 8)) + 50).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=30, init="randn", random_state=0).fit(X)
    assert (km.counts_ > 0).all()
    assert np.abs(km.cluster_centers_ - 50).max() < 10



@pytest.mark.parametrize("batch_size", [None, 256])
def test_centres_do_not_stay_on_outliers(batch_size):
    # A dense blob plus far, isolated points (heavy tails, like whitened patches): k-means++
    # and farthest-point relocation seed centres on the outliers. With reassignment those
    # centres move back to the data instead of each holding a single point for good.
    rng = np.random.default_rng(0)
    blob = rng.normal(size=(3000, 5))
    far = rng.normal(size=(30, 5))
    far *= 200 / np.linalg.norm(far, axis=1, keepdims=True)
    X = np.vstack([blob, far]).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=40, batch_size=batch_size, max_iter=30,
                         random_state=0).fit(X)
    assert (km.counts_ > 1).all()
    # Without reassignment Lloyd keeps the scikit-learn KMeans behaviour (singletons remain).
    if batch_size is None:
        km0 = MiniBatchKMeans(n_clusters=40, reassignment_ratio=0, random_state=0).fit(X)
        assert (km0.counts_ <= 1).any()

def test_n_clusters_larger_than_n_samples():
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=6"):
        MiniBatchKMeans(n_clusters=6).fit(X)
    with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=6"):
        MiniBatchKMeans(n_clusters=6).partial_fit(X)


@pytest.mark.parametrize("batch_size", [None, 100])
def test_determinism(blobs, batch_size):
    X, _ = blobs
    a = MiniBatchKMeans(n_clusters=20, batch_size=batch_size, random_state=7).fit(X)
    b = MiniBatchKMeans(n_clusters=20, batch_size=batch_size, random_state=7).fit(X)
    c = MiniBatchKMeans(n_clusters=20, batch_size=batch_size, random_state=8).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_no_global_seeding(blobs):
    X, _ = blobs
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MiniBatchKMeans(n_clusters=10, batch_size=64, random_state=0).fit(X)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_partial_fit_stream(blobs):
    X, y = blobs
    km = MiniBatchKMeans(n_clusters=8, random_state=0)
    order = np.random.default_rng(0).permutation(len(X))
    for epoch in range(3):
        for chunk in np.array_split(order, 30):
            km.partial_fit(X[chunk])
    assert km.n_steps_ == 90
    assert km.counts_.sum() >= len(X) * 3 * 0.9
    assert np.isfinite(km.cluster_centers_).all()
    assert adjusted_rand_score(km.predict(X), y) > 0.95
    assert km.labels_.shape == (100,)                # the last batch
    ref = MiniBatchKMeans(n_clusters=8, random_state=0).fit(X)
    assert -km.score(X) <= ref.inertia_ * 1.05
    # Deterministic over the same stream.
    km2 = MiniBatchKMeans(n_clusters=8, random_state=0)
    for epoch in range(3):
        for chunk in np.array_split(order, 30):
            km2.partial_fit(X[chunk])
    np.testing.assert_array_equal(km.cluster_centers_, km2.cluster_centers_)


def test_torch_tensor_input(blobs):
    X, _ = blobs
    a = MiniBatchKMeans(n_clusters=8, random_state=0).fit(X)
    b = MiniBatchKMeans(n_clusters=8, random_state=0).fit(torch.from_numpy(X))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.predict(torch.from_numpy(X)), a.labels_)
    assert b.n_features_in_ == X.shape[1]
    a64 = MiniBatchKMeans(n_clusters=8, random_state=0).fit(X.astype(np.float64))
    np.testing.assert_array_equal(a.cluster_centers_, a64.cluster_centers_)


def test_array_init(blobs):
    X, _ = blobs
    init = X[:8].copy()
    km = MiniBatchKMeans(n_clusters=8, init=init, max_iter=1).fit(X)
    assert km.n_iter_ == 1
    with pytest.warns(RuntimeWarning, match="single init"):
        MiniBatchKMeans(n_clusters=8, init=init, n_init=2, max_iter=1).fit(X)
    with pytest.raises(ValueError, match="init array has shape"):
        MiniBatchKMeans(n_clusters=8, init=X[:7]).fit(X)


def test_bad_input_errors(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=4)
    with pytest.raises(NotFittedError):
        km.predict(X)
    with pytest.raises(NotFittedError):
        km.transform(X)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        km.fit(bad)
    with pytest.raises(ValueError, match="NaN"):
        km.fit(torch.from_numpy(bad))
    km.fit(X)
    with pytest.raises(ValueError, match="X has 9 features, but MiniBatchKMeans is expecting 10"):
        km.predict(X[:, :9])
    with pytest.raises(ValueError, match="X has 9 features"):
        km.predict(torch.from_numpy(X[:, :9]))
    with pytest.raises(ValueError, match="NaN"):
        km.predict(bad)
    with pytest.raises(ValueError, match="n_clusters"):
        MiniBatchKMeans(n_clusters=0).fit(X)
    with pytest.raises(ValueError, match="CUDA is not available") if not torch.cuda.is_available() \
            else pytest.raises(ValueError, match="no-such-device|Invalid|Expected"):
        MiniBatchKMeans(n_clusters=4, device="cuda" if not torch.cuda.is_available()
                        else "no-such-device").fit(X)


def test_pickle_roundtrip(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=6, batch_size=128, random_state=0).fit(X)
    km2 = pickle.loads(pickle.dumps(km))
    assert isinstance(km2.cluster_centers_, np.ndarray)
    np.testing.assert_array_equal(km2.predict(X), km.predict(X))
    km2.partial_fit(X[:100])          # a loaded model keeps streaming
    assert km2.n_steps_ == km.n_steps_ + 1


def test_chunked_kernels_match_dense():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1001, 7, generator=g, dtype=torch.float64)
    C = torch.randn(13, 7, generator=g, dtype=torch.float64)
    D2 = torch.cdist(X, C) ** 2
    for chunk in (1, 64, 1001, 5000):
        labels, mind, sums, counts = nearest_centroid(X, C, chunk=chunk, accumulate=True)
        np.testing.assert_array_equal(labels, D2.argmin(1))
        np.testing.assert_allclose(mind, D2.min(1).values, atol=1e-9)
        np.testing.assert_array_equal(counts, torch.bincount(D2.argmin(1), minlength=13))
        ref = torch.zeros(13, 7, dtype=torch.float64).index_add_(0, D2.argmin(1), X)
        np.testing.assert_allclose(sums, ref, atol=1e-9)
        np.testing.assert_allclose(pairwise_distances(X, C, chunk=chunk), D2.sqrt(), atol=1e-9)


@pytest.mark.parametrize("batch_size, per_centre", [(None, 24), (64, 3)])
def test_init_size_default(blobs, batch_size, per_centre):
    # Lloyd samples 24 k points for k-means++, mini-batches 3 k (a larger sample would cost
    # more than the mini-batch fit itself); init_size overrides either.
    X, _ = blobs
    kw = dict(n_clusters=8, batch_size=batch_size, max_iter=2, random_state=0, device="cpu")
    default = MiniBatchKMeans(**kw).fit(X)
    explicit = MiniBatchKMeans(init_size=per_centre * 8, **kw).fit(X)
    other = MiniBatchKMeans(init_size=1000, **kw).fit(X)
    np.testing.assert_array_equal(default.cluster_centers_, explicit.cluster_centers_)
    assert not np.array_equal(default.cluster_centers_, other.cluster_centers_)


def test_kmeans_plusplus_picks_distinct_points():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 3, generator=g)
    C = _kmeans_plusplus(X, 50, g)
    assert len(torch.unique(C, dim=0)) == 50
    assert all(bool((X == c).all(1).any()) for c in C)


@needs_cuda
@pytest.mark.parametrize("batch_size", [None, 128])
def test_cuda_matches_cpu_and_pickles_to_cpu(blobs, batch_size):
    X, y = blobs
    cpu = MiniBatchKMeans(n_clusters=8, batch_size=batch_size, random_state=0, device="cpu").fit(X)
    gpu = MiniBatchKMeans(n_clusters=8, batch_size=batch_size, random_state=0, device="cuda").fit(X)
    gpu2 = MiniBatchKMeans(n_clusters=8, batch_size=batch_size, random_state=0,
                           device="cuda").fit(torch.from_numpy(X).cuda())
    np.testing.assert_array_equal(gpu.cluster_centers_, gpu2.cluster_centers_)
    assert adjusted_rand_score(gpu.labels_, cpu.labels_) > 0.99
    assert adjusted_rand_score(gpu.labels_, y) > 0.99
    state = pickle.dumps(gpu)
    loaded = pickle.loads(state)
    assert isinstance(loaded.cluster_centers_, np.ndarray)
    loaded.set_params(device="cpu")
    np.testing.assert_array_equal(loaded.predict(X), gpu.labels_)


@needs_cuda
def test_cuda_sums_are_deterministic():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20000, 16, generator=g).cuda()
    C = X[:50].clone()
    a = nearest_centroid(X, C, chunk=3000, accumulate=True)
    b = nearest_centroid(X, C, chunk=3000, accumulate=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end in smoke mode and writes its Markdown table."""
    import importlib.util
    from pathlib import Path

    from conftest import SHARED_ARCHIVE, SHARED_MD5

    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kmeans.py"
    spec = importlib.util.spec_from_file_location("bench_kmeans", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kmeans.md"
    rows = bench.main(["--smoke", "--n-patches", "2000", "--data-home", str(tmp_path / "data"),
                       "--archive", str(SHARED_ARCHIVE), "--md5", SHARED_MD5, "--out", str(out)])
    assert [r[0] for r in rows] == ["fl-lloyd", "fl-mb", "sk-mbk", "sk-mbk-tuned", "sk-kmeans"]
    assert all(np.isfinite(r[3]) and r[3] > 0 for r in rows)
    text = out.read_text()
    assert "--smoke" in text and "| featlearn full-batch Lloyd" in text
