"""Thiry et al.'s encodings (nearest fraction, cosine Heaviside), pooling windows and maps,
against naive numpy references, eager and compiled, and through a Pipeline and a saved model."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.pipeline import Pipeline

import featlearn.activations as activations
from featlearn import PatchEncoder, RandomPatchDictionary, TorchConvClassifier
from featlearn.activations import activate_and_pool
from featlearn.pooling import window_bounds

from conftest import cuda_marks, naive_whitened_patches
from featlearn.persistence import load_model, save_model

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None,
    reason="inductor's CPU backend needs a C++ compiler")


@pytest.fixture(scope="module")
def imgs():
    return np.random.RandomState(3).randint(0, 256, size=(9, 13, 12, 3)).astype(np.uint8)


def _fit(images, activation, K=20, **kw):
    enc = PatchEncoder(patch_size=3, n_patches=600, activation=activation, device="cpu",
                       kmeans=RandomPatchDictionary(K, random_state=0), random_state=0,
                       batch_size=4, compile=False, **kw)
    return enc.fit(images)


def _sample_threshold(E, k):
    """The sampled rule in numpy: order statistic of evenly strided entries of each row."""
    K = E.shape[1]
    step = K // activations.SELECTION_SAMPLE
    if step <= 1:
        return np.sort(E, 1)[:, k:k + 1]
    sample = np.sort(E[:, ::step], 1)
    s = sample.shape[1]
    rank = min(max(int(np.floor((k + 0.5) * s / K + 0.5)), 1), s)
    return sample[:, rank - 1:rank]


def _naive(enc, X):
    """Every patch through the fitted stages (float64), the activation from its definition
    (Euclidean distances to y and -y, cosines), then each cell pooled by slicing."""
    Ph, Pw = enc.map_shape_
    C = np.asarray(enc.kmeans_.cluster_centers_, np.float64)
    K = C.shape[0]
    rows, cols = enc._cell_bounds((Ph, Pw))
    out, margins = [], []
    for img in X.astype(np.float64):
        Y = naive_whitened_patches(enc, img)
        if enc.activation == "nearest_fraction":
            k = int(enc.neighbor_fraction * K)
            blocks = []
            for sign in (1, -1):
                E = ((sign * Y[:, None, :] - C[None]) ** 2).sum(-1)
                if enc.selection == "exact":
                    t = np.sort(E, 1)[:, k:k + 1]
                else:
                    t = _sample_threshold(E, k)
                blocks.append((E < t).astype(float))
                margins.append(np.abs(E - t)[E != t].min() / E.max())
            A = np.concatenate(blocks, 1)
        else:  # heaviside
            cos = (Y / np.linalg.norm(Y, axis=1, keepdims=True)) @ (
                C / np.linalg.norm(C, axis=1, keepdims=True)).T
            A = np.concatenate([cos > enc.alpha, -cos > enc.alpha], 1).astype(float)
            margins.append(np.abs(np.abs(cos) - enc.alpha).min())
        A = A.reshape(Ph, Pw, -1)
        red = {"sum": np.sum, "max": np.max, "mean": np.mean}[enc.pool_op]
        out.append(np.concatenate([red(A[r0:r1, c0:c1], axis=(0, 1))
                                   for r0, r1 in rows for c0, c1 in cols]))
    # Rounding could flip an entry only this close to its threshold: none is.
    assert min(margins) > 1e-6
    return np.asarray(out)


CASES = [  # activation, options, pooling
    ("nearest_fraction", dict(selection="exact", neighbor_fraction=0.4),
     dict(pool_size=4, pool_stride=3, pool_op="mean")),
    ("nearest_fraction", dict(selection="exact", neighbor_fraction=0.25),
     dict(pooling=(2, 3), pool_op="sum")),
    ("nearest_fraction", dict(selection="sampled", neighbor_fraction=0.4),
     dict(pool_size=(3, 5), pool_stride=(2, 4), pool_op="max")),
    ("heaviside", dict(alpha=0.1), dict(pool_size=5, pool_stride=3, pool_op="mean")),
    ("heaviside", dict(alpha=0.3), dict(pooling=2, pool_op="max")),
]


@pytest.mark.parametrize("activation,options,pooling", CASES)
def test_eager_matches_naive(imgs, monkeypatch, activation, options, pooling):
    monkeypatch.setattr(activations, "SELECTION_SAMPLE", 6)  # K=20: every 3rd entry sampled
    enc = _fit(imgs, activation, **options, **pooling)
    got = enc.transform(imgs)  # 9 = 4 + 4 + 1 images: a short last chunk
    assert got.shape == (9, enc.n_features_out_)
    np.testing.assert_allclose(got, _naive(enc, imgs), rtol=1e-6, atol=1e-6)


def test_nearest_fraction_marks_k_per_sign(imgs):
    enc = _fit(imgs, "nearest_fraction", neighbor_fraction=0.4, selection="exact",
               pooling=1, pool_op="sum")
    L = enc.map_shape_[0] * enc.map_shape_[1]
    counts = enc.transform(imgs).reshape(9, 2, 20).sum(2)
    np.testing.assert_array_equal(counts, 8 * L)  # int(0.4 * 20) ones per patch and sign


def test_selection_sampled_is_exact_when_the_row_is_the_sample():
    D = torch.randn(50, 40)
    col_sq = torch.rand(40)
    args = dict(alpha=0.0, col_sq=col_sq, fraction=0.3)
    exact = activations.nearest_fraction(D, selection="exact", **args)
    torch.testing.assert_close(activations.nearest_fraction(D, selection="sampled", **args),
                               exact)
    assert (exact.sum(1) == 2 * 12).all()


def test_window_bounds_follow_torch_pooling():
    assert len(window_bounds(27, 5, 3)) == 9 and window_bounds(27, 5, 3)[-1] == (24, 27)
    for n, size, stride in [(27, 5, 3), (27, 5, 2), (10, 4, 3), (7, 7, 1), (8, 3, 4), (9, 2, 5)]:
        expected = F.avg_pool2d(torch.zeros(1, 1, n, n), size, stride, ceil_mode=True).shape[-1]
        bounds = window_bounds(n, size, stride)
        assert len(bounds) == expected, (n, size, stride)
        assert all(0 <= a < b <= n for a, b in bounds)
    with pytest.raises(ValueError, match="smaller than the 6-position pooling window"):
        window_bounds(5, 6, 1)


@needs_compiler
@pytest.mark.parametrize("activation,selection,pool_op,window", [
    ("nearest_fraction", "sampled", "mean", (3, 3, 2, 2)),
    ("heaviside", "exact", "mean", None),
])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks())])
def test_compiled_matches_eager(activation, selection, pool_op, window, device):
    from featlearn._compile import CompiledKernel

    torch.manual_seed(0)
    n, h, w, K = 3, 7, 6, 600  # K=600: the sampled rule reads every 2nd entry
    D = torch.randn(n * h * w, K).to(device)
    row_sq = (torch.rand(n * h * w) + 0.5).to(device)
    col_sq = torch.rand(K).to(device)
    rows = window_bounds(h, 3, 2) if window else [(0, 4), (4, 7)]
    cols = window_bounds(w, 3, 2) if window else [(0, 3), (3, 6)]
    static = dict(n_images=n, map_shape=(h, w), row_bounds=tuple(rows), col_bounds=tuple(cols),
                  activation=activation, alpha=0.2, pool_op=pool_op, fraction=0.4,
                  selection=selection, window=window)
    kernel = CompiledKernel(activate_and_pool, name="test", **static)
    eager = activate_and_pool(D, row_sq, col_sq, **static)
    fused = kernel(D, row_sq, col_sq)
    assert not kernel.failed
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)


def test_map_layout_flip_and_feature_names(imgs):
    enc = _fit(imgs, "heaviside", pool_size=4, pool_stride=3, pool_op="mean", flip=True)
    flat = enc.transform(imgs)
    maps = enc.set_params(layout="map").transform(imgs)
    h, w = enc.pooled_shape_
    per_cell = 2 * 20
    assert maps.shape == (9, 2 * per_cell, h, w)  # the views as channel blocks
    np.testing.assert_array_equal(
        maps, flat.reshape(9, 2, h, w, per_cell).transpose(0, 1, 4, 2, 3).reshape(maps.shape))
    names = enc.get_feature_names_out()
    assert len(names) == maps[0].size == enc.n_features_out_
    assert names[0] == "patchencoder_c0_k0_pos" and names[1] == "patchencoder_c1_k0_pos"
    assert names[-1] == f"patchencoder_flip_c{h * w - 1}_k19_neg"


def test_conv_head_reads_both_layouts_alike():
    rng = np.random.RandomState(0)
    X = rng.randint(0, 256, size=(40, 12, 12, 3)).astype(np.uint8)
    y = np.arange(40) % 2
    enc = PatchEncoder(patch_size=3, n_patches=800, activation="nearest_fraction",
                       kmeans=RandomPatchDictionary(8, random_state=0), pool_size=4,
                       pool_stride=3, pool_op="mean", device="cpu", random_state=0)
    enc.fit(X)
    head = dict(width=4, kernel_size=2, max_iter=3, batch_size=16, device="cpu", random_state=0)
    flat = Pipeline([("enc", enc), ("clf", TorchConvClassifier(map_shape=enc.pooled_shape_,
                                                               **head))]).fit(X, y)
    maps = Pipeline([("enc", clone(enc).set_params(layout="map")),
                     ("clf", TorchConvClassifier(**head))]).fit(X, y)
    assert enc.pooled_shape_ == (3, 3)
    np.testing.assert_allclose(flat.predict_proba(X), maps.predict_proba(X), rtol=1e-5,
                               atol=1e-6)


def test_saved_model_round_trips(imgs, tmp_path):
    enc = _fit(imgs, "nearest_fraction", selection="exact", pool_size=3, pool_stride=2,
               pool_op="mean", layout="map")
    path = tmp_path / "enc.flm"
    save_model(enc, path)
    loaded = load_model(path)
    assert loaded.get_params()["pool_size"] == 3 and loaded.layout == "map"
    np.testing.assert_array_equal(loaded.transform(imgs), enc.transform(imgs))


def test_errors_name_the_problem(imgs):
    with pytest.raises(ValueError, match="neighbor_fraction=0.01 of 20 centroids marks none"):
        _fit(imgs, "nearest_fraction", neighbor_fraction=0.01)
    with pytest.raises(ValueError, match="smaller than the 12-position pooling window"):
        _fit(imgs, "heaviside", pool_size=12)
    with pytest.raises(ValueError, match="pool_stride must be a positive int"):
        _fit(imgs, "heaviside", pool_size=2, pool_stride=(1, 0))
    with pytest.raises(ValueError, match="selection"):
        _fit(imgs, "nearest_fraction", selection="approx")


@needs_compiler
def test_encoder_compiled_passes_its_norms(imgs):
    enc = _fit(imgs, "heaviside", alpha=0.2, pool_size=4, pool_stride=3, pool_op="mean")
    eager = enc.transform(imgs)
    fused = enc.set_params(compile=True).transform(imgs)  # 9 = 4 + 4 + 1: a padded chunk
    np.testing.assert_allclose(fused, eager, rtol=1e-6, atol=1e-6)
