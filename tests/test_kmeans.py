"""Tests for featlearn.KMeans and featlearn.MiniBatchKMeans: scikit-learn contract, agreement,
sample weights, robustness, determinism, logging."""

import logging
import pickle

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import KMeans, MiniBatchKMeans
from featlearn._kmeans_solvers import (LloydResult, MiniBatchResult, _kmeans_plusplus, _lloyd,
                                       _minibatch, nearest_centroid, pairwise_distances)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

# As for scikit-learn's own k-means: random draws (k-means++ subsample, reassignment picks) see
# rows, not weights, so weights only equal repetition for a fixed init (tested below).
_WEIGHT_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data":
        "random initialisation draws rows, so weights differ from repetition (fixed init: equal)",
    "check_sample_weight_equivalence_on_sparse_data": "sparse input is not supported",
}


@parametrize_with_checks([KMeans(n_clusters=3, max_iter=10, random_state=0),
                          MiniBatchKMeans(n_clusters=3, batch_size=16, max_iter=10,
                                          random_state=0)],
                         expected_failed_checks=lambda est: _WEIGHT_XFAIL)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def make(batch_size, **kw):
    """KMeans for ``batch_size=None``, else MiniBatchKMeans with that batch size."""
    if batch_size is None:
        return KMeans(**kw)
    return MiniBatchKMeans(batch_size=batch_size, **kw)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=3000, n_features=10, centers=8, cluster_std=0.5, random_state=3)
    return X.astype(np.float32), y


@pytest.mark.parametrize("batch_size", [None, 256])
def test_agrees_with_sklearn_on_blobs(blobs, batch_size):
    X, y = blobs
    ref = SkKMeans(n_clusters=8, n_init=1, random_state=0).fit(X)
    km = make(batch_size, n_clusters=8, random_state=0, device="cpu").fit(X)
    assert adjusted_rand_score(km.labels_, y) > 0.99
    assert adjusted_rand_score(km.labels_, ref.labels_) > 0.99
    assert km.inertia_ <= ref.inertia_ * 1.01
    assert km.cluster_centers_.dtype == np.float32
    assert km.labels_.dtype == np.int64
    assert km.counts_.sum() >= len(X) if batch_size else km.counts_.sum() == len(X)
    np.testing.assert_array_equal(km.predict(X), km.labels_)
    assert np.isclose(-km.score(X), km.inertia_, rtol=1e-4)


def test_minibatch_is_minibatch_by_default(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=8, random_state=0, device="cpu")
    assert km.batch_size == 1024 and km.compute_labels
    km.fit(X)
    assert km.n_steps_ > km.n_iter_            # several 1024-row batches per epoch
    assert not hasattr(KMeans(), "partial_fit") and not hasattr(KMeans(), "batch_size")


@pytest.mark.parametrize("batch_size", [None, 256])
@pytest.mark.parametrize("init", ["random", "randn"])
def test_more_inits_never_worse(blobs, init, batch_size):
    # Random inits can stop in a local minimum on blobs (so does scikit-learn's): n_init keeps
    # the best run, which includes the first one.
    X, _ = blobs
    one = make(batch_size, n_clusters=8, init=init, n_init=1, random_state=0).fit(X)
    five = make(batch_size, n_clusters=8, init=init, n_init=5, random_state=0).fit(X)
    assert five.inertia_ <= one.inertia_
    assert np.isfinite(five.cluster_centers_).all() and (five.counts_ > 0).all()


def test_lloyd_reaches_sklearn_inertia_on_harder_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 16)).astype(np.float32)
    ref = SkKMeans(n_clusters=40, n_init=1, random_state=0).fit(X)
    km = KMeans(n_clusters=40, random_state=0, device="cpu").fit(X)
    assert km.inertia_ <= ref.inertia_ * 1.01
    # The reported inertia is that of the returned centres and labels.
    d2 = ((X - km.cluster_centers_[km.labels_]) ** 2).sum()
    assert np.isclose(km.inertia_, d2, rtol=1e-4)
    np.testing.assert_array_equal(np.bincount(km.labels_, minlength=40), km.counts_)


def naive_lloyd(X, C, max_iter):
    """Textbook Lloyd in float64 numpy: assign, stop when the labels repeat, else average."""
    prev = None
    for it in range(1, max_iter + 1):
        labels = ((X[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        if prev is not None and np.array_equal(labels, prev):
            break
        C = np.stack([X[labels == j].mean(0) for j in range(len(C))])
        prev = labels
    return C, labels, it


def test_lloyd_matches_a_naive_lloyd():
    # No reassignment (every cluster keeps points), tol=0: only the arithmetic can differ.
    X, _ = make_blobs(n_samples=400, n_features=5, centers=6, cluster_std=2.0, random_state=1)
    X = X.astype(np.float32)
    init = X[:6].copy()
    km = KMeans(n_clusters=6, init=init, tol=0, reassignment_ratio=0, max_iter=100,
                device="cpu").fit(X)
    C, labels, n_iter = naive_lloyd(X.astype(np.float64), init.astype(np.float64), 100)
    assert km.n_iter_ == n_iter > 2
    np.testing.assert_array_equal(km.labels_, labels)
    np.testing.assert_allclose(km.cluster_centers_, C, rtol=1e-5, atol=1e-5)


def test_regression_values():
    # Frozen from the full-batch path that the paper's configurations ran before KMeans existed
    # (MiniBatchKMeans(batch_size=None)); a change here changes every shipped dictionary.
    X = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    km = KMeans(5, random_state=0, device="cpu").fit(X)
    assert km.counts_.tolist() == [69, 66, 46, 48, 71] and km.n_iter_ == 12
    assert km.inertia_ == pytest.approx(367.619687974453, rel=1e-6)
    mb = MiniBatchKMeans(5, batch_size=50, random_state=0, device="cpu").fit(X)
    assert mb.counts_.tolist() == [41, 96, 146, 149, 168] and mb.n_steps_ == 12
    assert np.bincount(mb.labels_).tolist() == [33, 58, 62, 73, 74]
    assert mb.inertia_ == pytest.approx(411.7386466860771, rel=1e-6)


def test_solvers_return_named_results(blobs):
    X = torch.from_numpy(blobs[0])
    gen = torch.Generator().manual_seed(0)
    C = X[:8].clone()
    res = _lloyd(X, C, max_iter=5, tol=0.0, reassignment_ratio=0.01, gen=gen, chunk=500)
    assert isinstance(res, LloydResult) and res.n_iter == res.n_steps <= 5
    assert res.labels.shape == (len(X),) and res.inertia > 0
    mb = _minibatch(X, C, batch_size=100, max_iter=1, tol=0.0, max_no_improvement=None,
                    reassignment_ratio=0.01, gen=gen, chunk=500, compute_labels=False)
    assert isinstance(mb, MiniBatchResult) and mb.labels is None and mb.inertia is None
    assert mb.n_steps == 30 and mb.n_iter == 1 and mb.ewa_inertia > 0
    # Composable: mini-batch centres can start Lloyd.
    res2 = _lloyd(X, mb.centers, max_iter=3, tol=0.0, reassignment_ratio=0.01, gen=gen, chunk=500)
    assert res2.inertia <= mb.ewa_inertia * len(X) * 1.5


# ---- sample weights ----------------------------------------------------------------------

def test_kmeans_integer_weights_equal_repeated_rows():
    X, y = make_blobs(n_samples=300, n_features=4, centers=5, cluster_std=1.0,
                      center_box=(-40, 40), random_state=2)
    X = np.rint(X).astype(np.float32)   # integer values: weighted and repeated sums are exact
    w = np.random.default_rng(0).integers(0, 4, size=len(X))
    init = np.stack([X[np.flatnonzero((y == c) & (w > 0))[0]] for c in range(5)])
    kw = dict(n_clusters=5, init=init, tol=0, reassignment_ratio=0, device="cpu")
    weighted = KMeans(**kw).fit(X, sample_weight=w)
    repeated = KMeans(**kw).fit(np.repeat(X, w, axis=0))
    np.testing.assert_array_equal(weighted.cluster_centers_, repeated.cluster_centers_)
    np.testing.assert_array_equal(np.repeat(weighted.labels_, w), repeated.labels_)
    np.testing.assert_array_equal(weighted.counts_, repeated.counts_)
    assert weighted.n_iter_ == repeated.n_iter_
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-9)
    assert weighted.score(X, sample_weight=w) == pytest.approx(-weighted.inertia_, rel=1e-6)
    # Weights matter: unweighted centres differ.
    assert not np.array_equal(KMeans(**kw).fit(X).cluster_centers_, weighted.cluster_centers_)


@pytest.mark.parametrize("batch_size", [None, 64])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_zero_weight_outliers_are_ignored(batch_size, init):
    # Far points of weight 0 neither seed a centre nor pull one.
    rng = np.random.default_rng(0)
    blob = rng.normal(size=(600, 3))
    far = rng.normal(size=(40, 3)) * 1000
    X = np.vstack([blob, far]).astype(np.float32)
    w = np.r_[np.ones(600), np.zeros(40)]
    km = make(batch_size, n_clusters=10, init=init, random_state=0, device="cpu")
    km.fit(X, sample_weight=w)
    assert np.abs(km.cluster_centers_).max() < 10
    if batch_size is None:
        assert km.counts_.sum() == 600       # summed weights: the outliers count for nothing
    assert km.inertia_ == pytest.approx(-km.score(X[:600]), rel=1e-5)
    # Without the weights the outliers take centres.
    assert np.abs(make(batch_size, n_clusters=10, init=init, random_state=0, device="cpu")
                  .fit(X).cluster_centers_).max() > 10


def test_minibatch_weights_pull_centres():
    # Two clusters of points; weighting one half of a cluster moves its centre there.
    X = np.array([[0.0], [1.0]] * 200 + [[100.0]] * 400, dtype=np.float32)
    w = np.where(X[:, 0] == 1.0, 9.0, 1.0)
    init = np.array([[0.5], [100.0]], dtype=np.float32)
    for km in (KMeans(2, init=init, device="cpu"),
               MiniBatchKMeans(2, init=init, batch_size=100, max_iter=5, random_state=0,
                               device="cpu")):
        plain = km.fit(X).cluster_centers_[0, 0]
        weighted = km.fit(X, sample_weight=w).cluster_centers_[0, 0]
        assert plain == pytest.approx(0.5, abs=0.05)
        assert weighted == pytest.approx(0.9, abs=0.05)


@pytest.mark.parametrize("cls", [KMeans, MiniBatchKMeans])
def test_bad_sample_weight(blobs, cls):
    X, _ = blobs
    km = cls(n_clusters=4, max_iter=2, device="cpu")
    with pytest.raises(ValueError, match="sample_weight.shape"):
        km.fit(X, sample_weight=np.ones(len(X) - 1))
    with pytest.raises(ValueError, match="[Nn]egative"):
        km.fit(X, sample_weight=-np.ones(len(X)))
    with pytest.raises(ValueError, match="non-zero"):
        km.fit(X, sample_weight=np.zeros(len(X)))
    with pytest.raises(ValueError, match="NaN|infinity"):
        km.fit(X, sample_weight=np.full(len(X), np.nan))
    km.fit(X, sample_weight=torch.ones(len(X)))        # a tensor is accepted too
    with pytest.raises(ValueError, match="sample_weight.shape"):
        km.score(X, sample_weight=np.ones(3))


def test_partial_fit_with_weights(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=8, random_state=0, device="cpu")
    km.partial_fit(X[:1000], sample_weight=np.full(1000, 2.0))
    assert km.counts_.sum() == pytest.approx(2000)
    km.partial_fit(X[1000:2000], sample_weight=np.full(1000, 0.5))
    assert km.counts_.sum() == pytest.approx(2500)


# ---- compute_labels ------------------------------------------------------------------------

def test_compute_labels_false_skips_the_final_pass(blobs):
    X, _ = blobs
    kw = dict(n_clusters=8, batch_size=256, random_state=0, device="cpu")
    full = MiniBatchKMeans(**kw).fit(X)
    quick = MiniBatchKMeans(compute_labels=False, **kw).fit(X)
    np.testing.assert_array_equal(full.cluster_centers_, quick.cluster_centers_)
    assert not hasattr(quick, "labels_")
    assert quick.inertia_ == pytest.approx(full.inertia_, rel=0.3)   # an EWA estimate
    np.testing.assert_array_equal(quick.fit_predict(X), full.labels_)
    # A refit without labels drops stale ones; n_init > 1 still compares real inertias.
    full.set_params(compute_labels=False).fit(X)
    assert not hasattr(full, "labels_")
    two = MiniBatchKMeans(compute_labels=False, n_init=2, **kw).fit(X)
    assert two.inertia_ == pytest.approx(-two.score(X), rel=1e-5)
    stream = MiniBatchKMeans(compute_labels=False, **kw).partial_fit(X[:500])
    assert not hasattr(stream, "labels_") and stream.inertia_ > 0


# ---- robustness ------------------------------------------------------------------------------

def test_transform_is_euclidean_distance(blobs):
    X, _ = blobs
    km = KMeans(n_clusters=5, max_iter=3, random_state=0).fit(X)
    D = km.transform(X[:50])
    ref = np.sqrt(((X[:50, None, :] - km.cluster_centers_[None]) ** 2).sum(-1))
    np.testing.assert_allclose(D, ref, rtol=1e-4, atol=1e-3)
    assert D.dtype == np.float32
    assert km.transform(X[:5].astype(np.float64)).dtype == np.float64
    np.testing.assert_array_equal(km.fit_predict(X), km.labels_)
    assert km.get_feature_names_out().tolist() == [f"kmeans{i}" for i in range(5)]
    mb = MiniBatchKMeans(n_clusters=5, max_iter=3, random_state=0).fit(X)
    assert mb.get_feature_names_out().tolist() == [f"minibatchkmeans{i}" for i in range(5)]


@pytest.mark.parametrize("batch_size", [None, 32])
@pytest.mark.parametrize("init", ["k-means++", "random", "randn"])
def test_duplicates_and_k_near_n_never_zero_or_nan(batch_size, init):
    rng = np.random.default_rng(1)
    distinct = rng.uniform(1, 2, size=(20, 6)).astype(np.float32)
    X = np.repeat(distinct, 5, axis=0)           # 100 samples, only 20 distinct points
    km = make(batch_size, n_clusters=90, init=init, max_iter=20, random_state=0,
              device="cpu").fit(X)
    C = km.cluster_centers_
    assert np.isfinite(C).all()
    assert (np.abs(C).sum(axis=1) > 0).all(), "a centre collapsed to zero"
    # Every centre is a data point (or an average of duplicates), never an artefact.
    assert (C >= 1 - 1e-5).all() and (C <= 2 + 1e-5).all()
    assert km.inertia_ == pytest.approx(0.0, abs=1e-3)   # 20 distinct points, 90 centres

    km = make(batch_size, n_clusters=100, init=init, random_state=0).fit(X)
    assert np.isfinite(km.cluster_centers_).all()


def test_all_identical_points():
    X = np.full((30, 4), 3.0, dtype=np.float32)
    for bs in (None, 8):
        km = make(bs, n_clusters=30, random_state=0).fit(X)
        np.testing.assert_allclose(km.cluster_centers_, 3.0)
        assert km.inertia_ == pytest.approx(0.0, abs=1e-4)


def test_randn_init_reassigns_empty_clusters():
    # 0.1*randn centres sit far from data shifted to 50: Lloyd must move every empty one.
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(2000, 8)) + 50).astype(np.float32)
    km = KMeans(n_clusters=30, init="randn", random_state=0).fit(X)
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
    km = make(batch_size, n_clusters=40, max_iter=30, random_state=0).fit(X)
    assert (km.counts_ > 1).all()
    # Without reassignment Lloyd keeps the scikit-learn KMeans behaviour (singletons remain).
    if batch_size is None:
        km0 = KMeans(n_clusters=40, reassignment_ratio=0, random_state=0).fit(X)
        assert (km0.counts_ <= 1).any()


@pytest.mark.parametrize("cls", [KMeans, MiniBatchKMeans])
def test_n_clusters_larger_than_n_samples(cls):
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=6"):
        cls(n_clusters=6).fit(X)
    if cls is MiniBatchKMeans:
        with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=6"):
            cls(n_clusters=6).partial_fit(X)


@pytest.mark.parametrize("batch_size", [None, 100])
def test_determinism(blobs, batch_size):
    X, _ = blobs
    a = make(batch_size, n_clusters=20, random_state=7).fit(X)
    b = make(batch_size, n_clusters=20, random_state=7).fit(X)
    c = make(batch_size, n_clusters=20, random_state=8).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_no_global_seeding(blobs):
    X, _ = blobs
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MiniBatchKMeans(n_clusters=10, batch_size=64, random_state=0).fit(X)
    KMeans(n_clusters=10, max_iter=3, random_state=0).fit(X)
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
    ref = KMeans(n_clusters=8, random_state=0).fit(X)
    assert -km.score(X) <= ref.inertia_ * 1.05
    # Deterministic over the same stream.
    km2 = MiniBatchKMeans(n_clusters=8, random_state=0)
    for epoch in range(3):
        for chunk in np.array_split(order, 30):
            km2.partial_fit(X[chunk])
    np.testing.assert_array_equal(km.cluster_centers_, km2.cluster_centers_)


@pytest.mark.parametrize("batch_size", [None, 256])
def test_torch_tensor_input(blobs, batch_size):
    X, _ = blobs
    a = make(batch_size, n_clusters=8, random_state=0).fit(X)
    b = make(batch_size, n_clusters=8, random_state=0).fit(torch.from_numpy(X))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.predict(torch.from_numpy(X)), a.labels_)
    assert b.n_features_in_ == X.shape[1]
    a64 = make(batch_size, n_clusters=8, random_state=0).fit(X.astype(np.float64))
    np.testing.assert_array_equal(a.cluster_centers_, a64.cluster_centers_)


def test_array_init(blobs):
    X, _ = blobs
    init = X[:8].copy()
    km = KMeans(n_clusters=8, init=init, max_iter=1).fit(X)
    assert km.n_iter_ == 1
    with pytest.warns(RuntimeWarning, match="performing only one init"):
        KMeans(n_clusters=8, init=init, n_init=2, max_iter=1).fit(X)
    with pytest.raises(ValueError, match="initial centers .* number of clusters"):
        MiniBatchKMeans(n_clusters=8, init=X[:7]).fit(X)


@pytest.mark.parametrize("cls", [KMeans, MiniBatchKMeans])
def test_bad_input_errors(blobs, cls):
    X, _ = blobs
    km = cls(n_clusters=4, max_iter=3)
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
    # Finite in float64, infinite once cast to float32: named as such.
    huge = X.astype(np.float64)
    huge[0, 0] = 1e39
    with pytest.raises(ValueError, match="float32"):
        km.fit(huge)
    with pytest.raises(ValueError, match="float32"):
        km.fit(torch.from_numpy(huge))
    km.fit(X)
    with pytest.raises(ValueError, match=f"X has 9 features, but {cls.__name__} is expecting 10"):
        km.predict(X[:, :9])
    with pytest.raises(ValueError, match="X has 9 features"):
        km.predict(torch.from_numpy(X[:, :9]))
    with pytest.raises(ValueError, match="NaN"):
        km.predict(bad)
    with pytest.raises(ValueError, match="n_clusters"):
        cls(n_clusters=0).fit(X)
    with pytest.raises(ValueError, match="CUDA is not available") if not torch.cuda.is_available() \
            else pytest.raises(ValueError, match="no-such-device|Invalid|Expected"):
        cls(n_clusters=4, device="cuda" if not torch.cuda.is_available()
            else "no-such-device").fit(X)


def test_pickle_roundtrip(blobs):
    X, _ = blobs
    km = MiniBatchKMeans(n_clusters=6, batch_size=128, random_state=0).fit(X)
    km2 = pickle.loads(pickle.dumps(km))
    assert isinstance(km2.cluster_centers_, np.ndarray)
    np.testing.assert_array_equal(km2.predict(X), km.predict(X))
    km2.partial_fit(X[:100])          # a loaded model keeps streaming
    assert km2.n_steps_ == km.n_steps_ + 1
    lloyd = KMeans(n_clusters=6, max_iter=3, random_state=0).fit(X)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lloyd)).predict(X), lloyd.labels_)


# ---- reporting --------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [None, 256])
def test_verbose_levels(blobs, batch_size, capsys):
    X, _ = blobs
    kw = dict(n_clusters=8, max_iter=4, tol=0, random_state=0, device="cpu")
    make(batch_size, verbose=0, **kw).fit(X)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    make(batch_size, verbose=1, **kw).fit(X)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("featlearn:")]
    assert out == "" and len(lines) == 1 and "stopped after" in lines[0]
    make(batch_size, verbose=2, **kw).fit(X)
    out, err = capsys.readouterr()
    per_step = "Lloyd iteration" if batch_size is None else "Mini-batch step"
    assert out == "" and err.count(per_step) >= 1 and err.count("stopped after") == 1


def test_logging_goes_to_the_featlearn_logger(blobs, caplog):
    X, _ = blobs
    logger = logging.getLogger("featlearn")
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="featlearn"):
            KMeans(n_clusters=8, max_iter=2, verbose=1, random_state=0).fit(X)
    finally:
        logger.propagate = False
    # one summary line (pytest >= 9.2 may capture it twice: on the logger and through the root)
    assert caplog.records and {r.name for r in caplog.records} == {"featlearn"}
    assert {r.getMessage() for r in caplog.records} == {caplog.records[0].getMessage()}


# ---- kernels ----------------------------------------------------------------------------

def test_chunked_kernels_match_dense():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1001, 7, generator=g, dtype=torch.float64)
    C = torch.randn(13, 7, generator=g, dtype=torch.float64)
    w = torch.rand(1001, generator=g, dtype=torch.float64)
    D2 = torch.cdist(X, C) ** 2
    lab = D2.argmin(1)
    for chunk in (1, 64, 1001, 5000):
        labels, mind, sums, counts = nearest_centroid(X, C, chunk=chunk, accumulate=True)
        np.testing.assert_array_equal(labels, lab)
        np.testing.assert_allclose(mind, D2.min(1).values, atol=1e-9)
        np.testing.assert_array_equal(counts, torch.bincount(lab, minlength=13))
        ref = torch.zeros(13, 7, dtype=torch.float64).index_add_(0, lab, X)
        np.testing.assert_allclose(sums, ref, atol=1e-9)
        np.testing.assert_allclose(pairwise_distances(X, C, chunk=chunk), D2.sqrt(), atol=1e-9)
        _, _, wsums, wcounts = nearest_centroid(X, C, chunk=chunk, accumulate=True,
                                                sample_weight=w)
        np.testing.assert_allclose(wcounts, torch.bincount(lab, weights=w, minlength=13))
        ref = torch.zeros(13, 7, dtype=torch.float64).index_add_(0, lab, X * w[:, None])
        np.testing.assert_allclose(wsums, ref, atol=1e-9)
        # The one-hot GEMM sums (CUDA's path) agree with index_add_ (the CPU's).
        for kw in ({}, {"sample_weight": w}):
            a = nearest_centroid(X, C, chunk=chunk, accumulate=True, onehot_sums=False, **kw)
            b = nearest_centroid(X, C, chunk=chunk, accumulate=True, onehot_sums=True, **kw)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[2], b[2], atol=1e-9)
            np.testing.assert_allclose(a[3], b[3], atol=1e-9)


@pytest.mark.parametrize("batch_size, per_centre", [(None, 24), (64, 3)])
def test_init_size_default(blobs, batch_size, per_centre):
    # Lloyd samples 24 k points for k-means++, mini-batches 3 k (a larger sample would cost
    # more than the mini-batch fit itself); init_size overrides either.
    X, _ = blobs
    kw = dict(n_clusters=8, max_iter=2, random_state=0, device="cpu")
    default = make(batch_size, **kw).fit(X)
    explicit = make(batch_size, init_size=per_centre * 8, **kw).fit(X)
    other = make(batch_size, init_size=1000, **kw).fit(X)
    np.testing.assert_array_equal(default.cluster_centers_, explicit.cluster_centers_)
    assert not np.array_equal(default.cluster_centers_, other.cluster_centers_)


def test_kmeans_plusplus_picks_distinct_points():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 3, generator=g)
    C = _kmeans_plusplus(X, 50, g)
    assert len(torch.unique(C, dim=0)) == 50
    assert all(bool((X == c).all(1).any()) for c in C)
    # Weighted: never a point of weight 0.
    w = (torch.arange(500) % 2).float()
    C = _kmeans_plusplus(X, 50, g, sample_weight=w)
    rows = [int(torch.nonzero((X == c).all(1))[0]) for c in C]
    assert all(r % 2 == 1 for r in rows)


@needs_cuda
@pytest.mark.parametrize("batch_size", [None, 128])
def test_cuda_matches_cpu_and_pickles_to_cpu(blobs, batch_size):
    X, y = blobs
    cpu = make(batch_size, n_clusters=8, random_state=0, device="cpu").fit(X)
    gpu = make(batch_size, n_clusters=8, random_state=0, device="cuda").fit(X)
    gpu2 = make(batch_size, n_clusters=8, random_state=0,
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
    w = torch.rand(20000, generator=g).cuda()
    for kw in ({}, {"sample_weight": w}):
        a = nearest_centroid(X, C, chunk=3000, accumulate=True, **kw)
        b = nearest_centroid(X, C, chunk=3000, accumulate=True, **kw)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_benchmark_smoke(tmp_path, monkeypatch):
    """The benchmark script runs end to end in quick mode and writes its Markdown table."""
    import importlib.util
    from pathlib import Path

    from conftest import SHARED_ARCHIVE, SHARED_MD5

    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("bench_kmeans", benchmarks / "bench_kmeans.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kmeans.md"
    rows = bench.main(["--quick", "--n-patches", "2000", "--data-home", str(tmp_path / "data"),
                       "--data", str(SHARED_ARCHIVE), "--md5", SHARED_MD5, "--out", str(out)])
    assert [r["key"] for r in rows] == bench.KEYS[:-1] + ["fl-mbk-lloyd2"]  # baseline: from git
    assert all(np.isfinite(r["inertia"]) and r["inertia"] > 0 for r in rows)
    by = {r["key"]: r for r in rows}
    # The baseline revision's Lloyd and today's give the same centres.
    assert by["fl-kmeans-base"]["inertia"] == by["fl-kmeans"]["inertia"]
    text = out.read_text()
    assert text.startswith("# k-means benchmark (QUICK")
    assert "python benchmarks/bench_kmeans.py --quick" in text and "GFLOP/s" in text
    assert "| featlearn KMeans" in text and "lloyd_iter=" in text
    assert "Dictionary stage at n=2,000" in text


def test_pipelines_and_configurations_use_kmeans():
    # The paper's full-batch Lloyd is KMeans; every shipped configuration builds it, except
    # coates2011-1600-svm: a mini-batch epoch then 15 Lloyd iterations (measured within 0.3
    # points of 50 Lloyd iterations), seeded and placed like the default; and Thiry et al.'s
    # recipe, whose dictionary is random patches.
    from featlearn.pipeline import (available_configs, build_pipeline, ensemble_members,
                                    image_encoder, load_config)
    from featlearn import RandomPatchDictionary, make_coates_pipeline

    assert type(make_coates_pipeline().named_steps["encoder"].kmeans) is KMeans
    names = available_configs()
    assert names
    for name in names:
        (km, *others) = [image_encoder(p).kmeans
                         for p in ensemble_members(build_pipeline(load_config(name)))]
        assert all(type(o) is type(km) and o.max_iter == km.max_iter for o in others)
        if name == "thiry2021-2048-linear":
            assert type(km) is RandomPatchDictionary
            assert (km.n_clusters, km.random_state) == (2048, 0)
        elif name == "coates2011-1600-svm":
            assert type(km) is MiniBatchKMeans and km.lloyd_iter == 15 and km.max_iter == 1
            assert km.random_state == 0 and km.n_clusters == 1600
            moved = build_pipeline(load_config(name), random_state=5, device="cpu",
                                   n_centroids=400).named_steps["encoder"].kmeans
            assert (moved.random_state, moved.device, moved.n_clusters) == (5, "cpu", 400)
        else:
            assert type(km) is KMeans and km.max_iter == 50, name
