"""Half-size features: PatchEncoder(dtype="float16") and classifiers that train on them whole."""

import json
import tracemalloc

import numpy as np
import pytest

from featlearn import PatchEncoder, TorchMLPClassifier
from featlearn.kmeans import MiniBatchKMeans


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (24, 12, 12, 3), dtype=np.uint8)


def _encoder(images, activation, **kw):
    return PatchEncoder(patch_size=3, n_patches=800, activation=activation, device="cpu",
                        kmeans=MiniBatchKMeans(12, max_iter=3, random_state=0),
                        random_state=0, **kw).fit(images)


@pytest.mark.parametrize("activation", ["triangle", "soft_threshold", "nearest_fraction"])
@pytest.mark.parametrize("layout", ["flat", "map"])
def test_float16_output_is_the_float32_output_rounded_once(images, activation, layout):
    enc = _encoder(images, activation, flip=True, layout=layout)
    want = enc.transform(images)
    got = enc.set_params(dtype="float16").transform(images)
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want.astype(np.float16))
    np.testing.assert_array_equal(enc.set_params(n_jobs=2).transform(images), got)


def test_sum_pooled_binary_codes_are_exact_in_float16(images):
    enc = _encoder(images, "nearest_fraction")
    want = enc.transform(images)
    assert want.max() > 1  # counts, not just 0/1
    np.testing.assert_array_equal(enc.set_params(dtype="float16").transform(images), want)


def test_float16_overflow_is_an_error_naming_the_fix(images):
    # Without contrast normalization the triangle keeps the pixels' scale: 255e3-sized values.
    big = images.astype(np.float32) * 1e3
    enc = _encoder(big, "triangle", dtype="float16", normalizer="passthrough",
                   whitener="passthrough")
    with pytest.raises(ValueError, match="float16's range.*dtype='float32'"):
        enc.transform(big)


def test_float16_through_a_torch_dataset(images):
    torch_data = pytest.importorskip("torch.utils.data")
    enc = _encoder(images, "triangle", dtype="float16")

    class Images(torch_data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    got = enc.transform(Images())
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, enc.transform(images))


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_mlp_on_float16_equals_mlp_on_the_same_values_in_float32(solver):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 30)).astype(np.float16)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1)
    kw = dict(hidden_layer_sizes=(16,) if solver == "adam" else (), solver=solver, max_iter=5,
              dropout=0.0, random_state=0, device="cpu", n_views=2)
    a = TorchMLPClassifier(**kw).fit(X.astype(np.float32), y)
    b = TorchMLPClassifier(**kw).fit(X, y)
    np.testing.assert_array_equal(a.mean_, b.mean_)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.loss_curve_ == b.loss_curve_


def test_mlp_never_copies_float16_features_to_float32():
    n, d = 4000, 1000  # 8 MB as float16; a float32 copy would add 16 MB
    rng = np.random.default_rng(0)
    X = rng.integers(0, 50, (n, d)).astype(np.float16)
    y = np.arange(n) % 3
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=1, batch_size=256,
                             random_state=0, device="cpu")
    clf.fit(X[:50], y[:50])  # the first fit of a process imports torch's optimizer modules
    tracemalloc.start()
    try:
        clf.fit(X, y)
        clf.predict(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes, f"peak numpy allocation {peak} B for {X.nbytes} B of features"


# -- stored through the extraction cache -------------------------------------------------------

def test_extraction_stores_float16_maps_and_resumes_them(images, tmp_path):
    from featlearn.extraction import extract_features

    enc = _encoder(images, "nearest_fraction", layout="map", pool_size=4, pool_stride=3,
                   pool_op="mean", dtype="float16")
    out = tmp_path / "maps.npy"
    F = extract_features(enc, images, out, batch_size=5, verbose=0)
    want = enc.transform(images)
    assert F.dtype == np.float16 and F.shape == want.shape and F.ndim == 4
    np.testing.assert_array_equal(F, want)
    manifest = json.loads((tmp_path / "maps.npy.manifest.json").read_text())
    assert manifest["dtype"] == "<f2" and manifest["row_shape"] == list(want.shape[1:])
    assert out.stat().st_size < want.size * 2 + 1024  # half a float32 file
    # A finished job is reused as it is; a float32 encoder is another key, so it recomputes.
    assert extract_features(enc, images, out, verbose=0).dtype == np.float16
    F32 = extract_features(enc.set_params(dtype="float32"), images, out, verbose=0)
    assert F32.dtype == np.float32
    np.testing.assert_array_equal(F32, enc.transform(images))


def test_a_resumed_float16_job_checks_its_partial_file(images, tmp_path):
    from featlearn.extraction import extract_features

    enc = _encoder(images, "triangle", dtype="float16")
    out = tmp_path / "f.npy"
    extract_features(enc, images, out, batch_size=5, verbose=0)
    manifest_path = tmp_path / "f.npy.manifest.json"
    # Damage the stored bytes of the last chunk: its checksum fails and it is recomputed.
    with open(out, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\xff" * 8)
    F = extract_features(enc, images, out, verbose=0)
    np.testing.assert_array_equal(F, enc.transform(images))
    assert json.loads(manifest_path.read_text())["complete"]


def test_conv_head_trains_on_the_extracted_float16_memmap(images, tmp_path):
    from featlearn import TorchConvClassifier
    from featlearn.extraction import extract_features

    enc = _encoder(images, "nearest_fraction", layout="map", pool_size=4, pool_stride=3,
                   pool_op="mean", dtype="float16")
    F = extract_features(enc, images, tmp_path / "maps.npy", batch_size=5, verbose=0)
    y = np.arange(len(images)) % 3
    kw = dict(width=4, max_iter=3, batch_size=8, random_state=0, device="cpu")
    a = TorchConvClassifier(**kw).fit(F, y)
    b = TorchConvClassifier(**kw).fit(np.asarray(F, dtype=np.float32), y)
    np.testing.assert_array_equal(a.decision_function(F), b.decision_function(F))


def test_cli_extract_dtype_float16(images, tmp_path, capsys):
    from featlearn.cli import main
    from featlearn.persistence import save_model

    enc = _encoder(images, "triangle")
    src, model, out = tmp_path / "x.npy", tmp_path / "model.npz", tmp_path / "f.npy"
    np.save(src, images)
    save_model(enc, model)
    assert main(["extract", "--model", str(model), "--data", str(src), "--out", str(out),
                 "--dtype", "float16", "-q"]) == 0
    assert f"{len(images)} x {enc.n_features_out_} float16" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out), enc.set_params(dtype="float16").transform(images))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_feature_statistics_are_chunked_by_bytes_and_exact(monkeypatch, dtype, weighted):
    from featlearn.classifier import _standardize

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(37, 50)) * 3 + 1).astype(dtype)
    w = rng.uniform(0.5, 2, 37) if weighted else None
    # 3 rows of 50 float64 per chunk: many chunks and a short last one, whatever the width.
    monkeypatch.setattr(_standardize, "_STATS_BYTES", 3 * 50 * 8)
    mean, scale = _standardize.feature_stats(X, w)
    X64 = X.astype(np.float64)
    want_mean = np.average(X64, axis=0, weights=w)
    want_var = np.average((X64 - want_mean) ** 2, axis=0, weights=w)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scale, np.sqrt(want_var + _standardize.STANDARDIZE_EPS), rtol=1e-6)


def test_float16_range_check_never_builds_a_full_size_mask(images, monkeypatch):
    import featlearn.encoding as encoding

    monkeypatch.setattr(encoding, "_RANGE_CHECK_BYTES", 2**16)  # many blocks on this input
    enc = _encoder(images, "nearest_fraction", flip=True, pooling=(6, 6), dtype="float16")
    X = np.concatenate([images] * 100)  # 8 MB of float16 features
    tracemalloc.start()
    try:
        out = enc.transform(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A mask of the whole output would add half its bytes.
    assert peak < out.nbytes * 1.1, (peak, out.nbytes)


def test_finiteness_of_float16_features_is_checked_without_a_full_mask(monkeypatch):
    """A float16 sum of counts overflows, which sent scikit-learn's check to a full-size
    boolean mask (half the features' bytes); the check now runs in row blocks."""
    from featlearn.classifier import _data

    n, d = 8000, 2000  # 32 MB as float16, with a sum far beyond float16's range
    X = np.full((n, d), 40, dtype=np.float16)
    y = np.arange(n) % 2
    clf = TorchMLPClassifier(hidden_layer_sizes=(4,), max_iter=1, random_state=0, device="cpu")
    monkeypatch.setattr(_data, "_FINITE_BLOCK_BYTES", 2**20)
    tracemalloc.start()
    try:
        _data.check_finite(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= _data._FINITE_BLOCK_BYTES + 2**20 < X.size
    clf.fit(X, y)
    for bad, what in ((np.nan, "NaN"), (np.inf, "infinity")):
        Z = X.copy()
        Z[n - 1, d - 1] = bad  # in the last block
        with pytest.raises(ValueError, match=f"Input X contains {what}"):
            clf.fit(Z, y)
        with pytest.raises(ValueError, match=f"Input X contains {what}"):
            clf.predict(Z)
