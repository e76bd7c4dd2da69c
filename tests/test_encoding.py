"""PatchEncoder: exactness against a naive reference, layout, scale-out and the sklearn contract.

The reference below is deliberately the slow, obvious algorithm (every patch materialized with
numpy, the fitted estimators' own ``transform``, explicit float64 distances, explicit pooling
loops), so the fast path's chunked whitening, augmented GEMM and fused pooling are checked against
something that shares none of their tricks.
"""

import copy
import pickle

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import StandardScaler

from featlearn import PatchEncoder, PatchNormalizer, ZCAWhitening
from featlearn.encoding import pooling_bounds
from featlearn.patches import flatten_patches


# ----------------------------------------------------------------------------- the reference
def ref_bounds(n, cells):
    """Round-half-up split, written independently of the library."""
    edges = [int(np.floor(i * n / cells + 0.5)) for i in range(cells + 1)]
    return list(zip(edges[:-1], edges[1:]))


def reference_transform(enc, X):
    X = np.asarray(X)
    if X.ndim == 3:
        X = X[..., None]
    p, s = enc.patch_size, enc.stride
    win = sliding_window_view(X, (p, p), axis=(1, 2))[:, ::s, ::s]  # (n, Ph, Pw, C, p, p)
    win = np.moveaxis(win, 3, -1)  # (n, Ph, Pw, p, p, C)
    n, Ph, Pw = win.shape[:3]
    P = flatten_patches(win).reshape(n * Ph * Pw, -1).astype(np.float32)
    if enc.normalizer_ != "passthrough":
        P = enc.normalizer_.transform(P)
    if enc.whitener_ != "passthrough":
        P = enc.whitener_.transform(P)
    Y = P.astype(np.float64)
    C = np.asarray(enc.kmeans_.cluster_centers_, dtype=np.float64)
    K = C.shape[0]
    if enc.activation == "triangle":
        z = np.sqrt(np.maximum(((Y[:, None, :] - C[None, :, :]) ** 2).sum(-1), 0))
        f = np.maximum(0, z.mean(1, keepdims=True) - z)
    elif enc.activation == "hard":
        dist = ((Y[:, None, :] - C[None, :, :]) ** 2).sum(-1)
        f = np.zeros_like(dist)
        f[np.arange(len(f)), dist.argmin(1)] = 1
    else:
        dot = Y @ C.T
        f = np.concatenate([np.maximum(0, dot - enc.alpha), np.maximum(0, -dot - enc.alpha)], 1)
    fmap = f.reshape(n, Ph, Pw, -1)
    grid = enc.pooling if not isinstance(enc.pooling, int) else (enc.pooling, enc.pooling)
    out = []
    for r0, r1 in ref_bounds(Ph, grid[0]):
        for c0, c1 in ref_bounds(Pw, grid[1]):
            cell = fmap[:, r0:r1, c0:c1].reshape(n, -1, fmap.shape[-1])
            out.append(cell.sum(1) if enc.pool_op == "sum" else cell.max(1))
    return np.concatenate(out, axis=1), K


def images(n=5, size=(12, 13), channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *size) if channels is None else (n, *size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_encoder(K=12, **kw):
    kw.setdefault("n_patches", 1500)
    kw.setdefault("random_state", 0)
    return PatchEncoder(kmeans=KMeans(K, n_init=1, random_state=0), **kw)


def assert_matches_reference(enc, X, held_out=True):
    """Compare on held-out images (``held_out``): a patch that *is* a centroid (a singleton
    cluster of the fit sample) puts a squared distance at 0, where float32's
    ``||y||^2 + ||c||^2 - 2 y.c`` has an absolute error that the sqrt amplifies; that case is
    tested separately with its own bound."""
    if held_out:
        X = images(X.shape[0], X.shape[1:3], X.shape[3] if X.ndim == 4 else None, seed=99)
    fast = enc.transform(X)
    ref, K = reference_transform(enc, X)
    assert fast.dtype == np.float32
    assert fast.shape == ref.shape
    if enc.activation == "hard":
        np.testing.assert_array_equal(fast, ref)
    else:
        np.testing.assert_allclose(fast, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())


# ------------------------------------------------------------------------------- exactness
_FITTED = {}


def fitted_encoder(channels, size):
    """One fit per image shape: the encoding-time parameters need no refit (tested below)."""
    key = (channels, size)
    if key not in _FITTED:
        X = images(4, size, channels, seed=channels * 7 + size[0])
        _FITTED[key] = (make_encoder().fit(X), X)
    enc, X = _FITTED[key]
    return copy.deepcopy(enc), X


@pytest.mark.parametrize("activation", ["triangle", "hard", "soft_threshold"])
@pytest.mark.parametrize("pool_op", ["sum", "max"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(12, 13), (15, 14)])  # maps 7x8 / 10x9 (stride 1), 4x4 / 5x5 (2)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 3)])
def test_matches_naive_reference(activation, pool_op, channels, size, stride, grid):
    enc, X = fitted_encoder(channels, size)
    enc.set_params(activation=activation, pool_op=pool_op, stride=stride, pooling=grid)
    assert_matches_reference(enc, X)


def test_encoding_parameters_changed_after_fit_equal_a_refit():
    X = images(4, (12, 13), 3, seed=11)
    params = dict(activation="soft_threshold", stride=2, pooling=(3, 2), pool_op="max")
    refit = make_encoder(**params).fit(X)
    changed = make_encoder().fit(X).set_params(**params)
    assert changed.map_shape_ == refit.map_shape_ == (4, 4)
    assert changed.n_features_out_ == refit.n_features_out_ == 6 * 24
    np.testing.assert_array_equal(changed.transform(X), refit.transform(X))


@pytest.mark.parametrize("normalizer,whitener", [
    ("passthrough", None),
    (None, "passthrough"),
    ("passthrough", "passthrough"),
    (PatchNormalizer(eps=1.0, ddof=0), ZCAWhitening(eps=0.01)),
    (StandardScaler(), PCA(whiten=True, n_components=20)),  # generic transformers, PCA narrows d'
])
@pytest.mark.parametrize("activation", ["triangle", "hard", "soft_threshold"])
def test_stages_and_passthrough_match_reference(normalizer, whitener, activation):
    X = images(4, (13, 12), 3, seed=3)
    enc = make_encoder(normalizer=normalizer, whitener=whitener, activation=activation).fit(X)
    if normalizer == "passthrough":
        assert enc.normalizer_ == "passthrough"
    if whitener == "passthrough":
        assert enc.whitener_ == "passthrough"
    assert_matches_reference(enc, X)


def test_demo_layout_on_cifar_sized_images():
    """32x32 -> 27x27 map split 14/13, quadrant-major; cells sum to the 1x1 pooling."""
    assert pooling_bounds(27, 2) == [(0, 14), (14, 27)]
    assert pooling_bounds(27, 3) == [(0, 9), (9, 18), (18, 27)]
    assert pooling_bounds(28, 2) == [(0, 14), (14, 28)]
    assert pooling_bounds(13, 3) == ref_bounds(13, 3) == [(0, 4), (4, 9), (9, 13)]
    with pytest.raises(ValueError, match="smaller than the 3-cell"):
        pooling_bounds(2, 3)
    X = images(3, (32, 32), 3, seed=5)
    enc = make_encoder(K=16).fit(X)
    assert enc.map_shape_ == (27, 27)
    F = enc.transform(X)
    assert F.shape == (3, 4 * 16)
    assert_matches_reference(enc, X)
    whole = clone(enc).set_params(pooling=1).fit(X).transform(X)
    np.testing.assert_allclose(F.reshape(3, 4, 16).sum(1), whole, rtol=1e-4)


def test_patch_equal_to_a_centroid_gives_finite_features_close_to_reference():
    X = images(2, (12, 12), 3, seed=8)
    enc = PatchEncoder(n_patches=12, kmeans=KMeans(12, n_init=1, random_state=0),
                       random_state=0, pooling=1).fit(X)  # every centroid is a sampled patch
    fast = enc.transform(X)
    ref, _ = reference_transform(enc, X)
    assert np.isfinite(fast).all()
    # |error of z| <= sqrt(|error of the squared distance|) ~ sqrt(1e-6 * (||y||^2 + ||c||^2)).
    C = enc.kmeans_.cluster_centers_
    bound = 1e-3 * np.sqrt(2 * (C.astype(np.float64) ** 2).sum(1).max() + 1.0)
    n_positions = enc.map_shape_[0] * enc.map_shape_[1]
    np.testing.assert_allclose(fast, ref, rtol=2e-4, atol=2 * n_positions * bound)


def test_flip_appends_the_mirror_block():
    X = images(3, (12, 13), 3, seed=9)
    enc = make_encoder(K=6, flip=True).fit(X)
    F = enc.transform(X)
    assert F.shape == (3, 2 * 4 * 6) == (3, enc.n_features_out_)
    plain = clone(enc).set_params(flip=False).fit(X)
    np.testing.assert_array_equal(F[:, :24], plain.transform(X))
    np.testing.assert_allclose(F[:, 24:], plain.transform(X[:, :, ::-1]), rtol=1e-6)
    names = enc.get_feature_names_out()
    assert names[24] == "patchencoder_flip_c0_k0" and len(names) == 48


def test_grid_larger_than_map_is_rejected_at_fit():
    with pytest.raises(ValueError, match="smaller than the 4-cell"):
        make_encoder(pooling=(4, 2), stride=3).fit(images(3, (12, 12)))


# --------------------------------------------------------------------- chunking, dtypes, seeds
def test_batch_size_and_input_forms_do_not_change_results():
    X = images(7, (12, 13), 1, seed=1)
    enc = make_encoder(batch_size=1).fit(X)
    a = enc.transform(X)
    b = enc.set_params(batch_size=3).transform(X)
    c = enc.set_params(batch_size="auto").transform(X)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enc.transform(X[..., 0]), c, rtol=1e-6)  # (n, H, W) form
    np.testing.assert_allclose(enc.transform(X.astype(np.float64)), c, rtol=1e-6)
    Xf = np.asfortranarray(X)  # non-contiguous input
    np.testing.assert_allclose(enc.transform(Xf), c, rtol=1e-6)


def test_random_state_controls_patches_and_default_kmeans_seed_is_not_overridden():
    X = images(6, (12, 12), 3, seed=2)
    a = make_encoder(random_state=1).fit(X)
    b = make_encoder(random_state=1).fit(X)
    c = make_encoder(random_state=2).fit(X)
    np.testing.assert_array_equal(a.whitener_.mean_, b.whitener_.mean_)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    assert not np.array_equal(a.whitener_.mean_, c.whitener_.mean_)
    # A user's k-means keeps its own random_state, even None (documented choice).
    enc = PatchEncoder(n_patches=500, kmeans=KMeans(4, n_init=1), random_state=0).fit(X)
    assert enc.kmeans_.random_state is None
    assert enc.kmeans is not enc.kmeans_  # fitted a clone, the parameter stays unfitted
    assert not hasattr(enc.kmeans, "cluster_centers_")


def test_default_kmeans_is_kmeans_resolved_at_fit(monkeypatch):
    enc = PatchEncoder()  # constructing must not need featlearn.kmeans
    assert enc.kmeans is None
    kmeans = pytest.importorskip("featlearn.kmeans")

    class QuickKMeans(kmeans.KMeans):
        """The real estimator, made cheap (1 iteration, random init) for a test of wiring."""

        def __init__(self, n_clusters=1600, *, random_state=None):
            super().__init__(n_clusters, init="random", max_iter=1, random_state=random_state)

    monkeypatch.setattr(kmeans, "KMeans", QuickKMeans)
    X = images(40, (10, 10), 1, seed=4)
    enc = PatchEncoder(n_patches=2000, random_state=0).fit(X)
    assert isinstance(enc.kmeans_, QuickKMeans)
    assert enc.n_clusters_ == 1600 == enc.kmeans_.n_clusters
    seed = enc.kmeans_.random_state
    assert seed is not None  # seeded from the encoder's random_state
    assert PatchEncoder(n_patches=2000, random_state=0).fit(X).kmeans_.random_state == seed
    assert enc.transform(X[:2]).shape == (2, 4 * 1600)


# ------------------------------------------------------------------------------ scale-out
def test_n_jobs_matches_local_run():
    X = images(9, (12, 12), 3, seed=6)
    enc = make_encoder(batch_size=2).fit(X)
    local = enc.transform(X)
    par = enc.set_params(n_jobs=2).transform(X)
    np.testing.assert_allclose(par, local, rtol=1e-6, atol=1e-6)


def test_dask_cluster_matches_local_run(monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    import joblib

    import featlearn.encoding as encoding

    monkeypatch.setattr(encoding, "_TASK_IMAGES", 4)  # several tasks on a small input
    X = images(13, (12, 12), 3, seed=7)
    enc = make_encoder(batch_size=2).fit(X)
    local = enc.transform(X)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream, \
                joblib.parallel_config(backend="dask"):
            remote = enc.set_params(n_jobs=-1).transform(X)
        # The blocks really ran as tasks in the workers' processes.
        workers = {t["worker"] for t in stream.data}
        assert len(stream.data) >= 4
        assert workers and workers <= set(client.scheduler_info()["workers"])
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)


def test_verbose_progress_bar_and_silence(capsys):
    X = images(5, (12, 12), 1)
    enc = make_encoder(batch_size=2, verbose=1).fit(X)
    enc.transform(X)
    assert "encode" in (err := capsys.readouterr().err) and "5/5" in err
    enc.set_params(verbose=0).transform(X)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ sklearn contract
def test_feature_names_set_output_clone_pickle():
    X = images(4, (12, 12), 3)
    enc = make_encoder(K=5, activation="soft_threshold").fit(X)
    names = enc.get_feature_names_out()
    assert len(names) == enc.n_features_out_ == 4 * 10 == enc.transform(X).shape[1]
    assert names[0] == "patchencoder_c0_k0_pos" and names[5] == "patchencoder_c0_k0_neg"
    assert names[10] == "patchencoder_c1_k0_pos"
    tri = make_encoder(K=5).fit(X).get_feature_names_out()
    assert list(tri[:6]) == [f"patchencoder_c0_k{k}" for k in range(5)] + ["patchencoder_c1_k0"]

    assert isinstance(enc.set_output(transform="default").transform(X), np.ndarray)
    cl = clone(enc)
    assert cl.get_params()["activation"] == "soft_threshold"
    assert not hasattr(cl, "kmeans_")
    with pytest.raises(NotFittedError):
        cl.transform(X)

    restored = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(restored.transform(X), enc.transform(X))


def test_set_output_pandas():
    pd = pytest.importorskip("pandas")
    X = images(3, (12, 12), 1)
    enc = make_encoder(K=4).fit(X).set_output(transform="pandas")
    df = enc.transform(X)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == list(enc.get_feature_names_out())


def test_fitted_state_is_plain_numpy():
    """No torch tensors in the pickled state: a GPU-fitted encoder loads on a CPU-only box."""
    import torch

    enc = make_encoder(K=4).fit(images(3, (12, 12), 1))
    found = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            [walk(v) for v in obj.values()]
        elif isinstance(obj, (list, tuple)):
            [walk(v) for v in obj]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            walk(vars(obj))

    walk(vars(enc))
    assert not found


@pytest.mark.gpu
def test_cuda_matches_cpu_and_unpickles_on_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    X = images(6, (32, 32), 3)
    enc = make_encoder(K=16, device="cuda").fit(X)
    gpu = enc.transform(X)
    restored = pickle.loads(pickle.dumps(enc)).set_params(device="cpu")
    np.testing.assert_allclose(restored.transform(X), gpu, rtol=1e-3, atol=1e-3 * np.abs(gpu).max())
    assert_matches_reference(enc, X)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_named_value_errors():
    X = images(4, (12, 12), 3)
    enc = make_encoder(K=4).fit(X)
    with pytest.raises(ValueError, match="size 13x12"):
        enc.transform(images(2, (13, 12), 3))
    with pytest.raises(ValueError, match="1 channel"):
        enc.transform(images(2, (12, 12), 1))
    with pytest.raises(ValueError, match="smaller than the 6x6 patch"):
        enc.transform(images(2, (5, 12), 3))
    with pytest.raises(ValueError, match="smaller than the 6x6 patch"):
        make_encoder().fit(images(2, (5, 5), 3))
    bad = X.astype(np.float32)
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        enc.transform(bad)
    bad[1, 2, 3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        make_encoder().fit(bad)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        enc.transform(X[0, 0])
    with pytest.raises(ValueError, match="pooling"):
        make_encoder(pooling=(2, 2, 2)).fit(X)
    with pytest.raises(ValueError, match="activation"):
        make_encoder(activation="relu").fit(X)
    wrong = make_encoder(K=4, whitener=PCA(n_components=10))
    wrong.set_params(kmeans=KMeans(4, n_init=1))
    assert wrong.fit(X).kmeans_.cluster_centers_.shape == (4, 10)  # d' follows the whitener


def test_values_past_float32_range_are_a_value_error_at_fit_and_transform():
    X = images(4, (12, 12), 3)
    enc = make_encoder(K=4).fit(X)
    big = X.astype(np.float64)
    big[2, 5, 5, 1] = 1e39  # finite in float64, infinity in float32
    with pytest.raises(ValueError, match="beyond float32's range"):
        enc.transform(big)
    with pytest.raises(ValueError, match="beyond float32's range"):
        make_encoder(K=4).fit(big)


# --------------------------------------------------------------------- value-scale warning
def _scale_warnings(fn):
    import warnings

    from featlearn import ScaleWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, ScaleWarning)]


def test_transform_at_another_scale_warns_with_the_fix():
    import featlearn

    assert issubclass(featlearn.ScaleWarning, UserWarning)
    X = images(20, (12, 12), 3)
    enc = make_encoder(K=4).fit(X)
    assert 200 < enc.input_scale_ <= 255
    assert _scale_warnings(lambda: enc.transform(X)) == []
    assert _scale_warnings(lambda: enc.transform(X.astype(np.float32) * 0.9)) == []
    (w,) = _scale_warnings(lambda: enc.transform(X / 255.0))
    msg = str(w.message)
    assert "multiply them by 255" in msg and "refit" in msg
    assert f"{enc.input_scale_:.3g}" in msg and "0.9" in msg  # both scales

    small = make_encoder(K=4).fit(X / 255.0)
    assert small.input_scale_ <= 1
    assert _scale_warnings(lambda: small.transform(X / 255.0)) == []
    (w,) = _scale_warnings(lambda: small.transform(X))
    assert "divide them by 255" in str(w.message)
    (w,) = _scale_warnings(lambda: enc.transform(X * 0.05))
    assert "multiply them by about 20" in str(w.message)


def test_scale_warning_through_the_pipeline_and_as_an_error():
    import warnings

    from featlearn import ScaleWarning, make_coates_pipeline

    X = images(24, (8, 8), 3)
    y = np.arange(24) % 2
    pipe = make_coates_pipeline(4, classifier="svm", encoder__patch_size=3,
                                encoder__n_patches=500, classifier__max_iter=3).fit(X, y)
    assert len(_scale_warnings(lambda: pipe.predict(X / 255.0))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleWarning)
        pipe.predict(X)  # the fitted scale: silent
        with pytest.raises(ScaleWarning):
            pipe.predict(X / 255.0)


def test_scale_check_ignores_black_images():
    X = images(10, (12, 12), 3)
    enc = make_encoder(K=4).fit(X)
    assert _scale_warnings(lambda: enc.transform(np.zeros_like(X))) == []
