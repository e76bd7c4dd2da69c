"""TorchConvClassifier: the convolutional head on pooled spatial maps (Thiry et al. 2021)."""

import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import PatchEncoder, TorchConvClassifier
from featlearn.classifier import _conv
from featlearn.kmeans import MiniBatchKMeans
from featlearn.persistence import load_model, save_model
from featlearn.pipeline import build_pipeline

SMALL = dict(width=8, max_iter=30, batch_size=32, learning_rate_init=0.05, device="cpu")


def small(**kw):
    """A small, fast head: SMALL with ``kw`` on top."""
    return TorchConvClassifier(**{**SMALL, **kw})


def _expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data":
            "mini-batch SGD shuffles repeated rows differently from weighted ones"}


# One configuration: the contract does not depend on the layers (the hidden-layer and adam
# variants are trained below), and every check that fits costs seconds on a shared CPU.
@parametrize_with_checks([TorchConvClassifier(width=8, max_iter=12, batch_size=64,
                                              learning_rate_init=0.1, device="cpu")],
                         expected_failed_checks=_expected_failures)
def test_sklearn_contract(estimator, check):
    check(estimator)


def make_maps(n=300, n_classes=3, C=6, h=5, w=5, seed=0, noise=1.0):
    """Maps whose class lights one channel in one corner: linearly separable, position-bound."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    X = rng.normal(scale=noise, size=(n, C, h, w)).astype(np.float32)
    for k in range(n_classes):
        r, c = divmod(k, 2)
        X[y == k, k % C, r * (h - 2):r * (h - 2) + 2, c * (w - 2):c * (w - 2) + 2] += 2.0
    return X, y


@pytest.mark.parametrize("kw", [
    dict(),
    dict(width=None, hidden=16, kernel_size=3),
    dict(width=4, hidden=8, dropout=0.2, lr_schedule="step"),
    dict(solver="adam", learning_rate_init=1e-2, loss="squared_hinge"),
])
def test_learns_a_separable_problem_on_the_cpu(kw):
    X, y = make_maps(seed=1)
    Xt, yt = make_maps(n=150, seed=2)
    clf = small(**{"max_iter": 15, **kw}, random_state=0).fit(X, y)
    assert clf.score(Xt, yt) >= 0.95
    assert len(clf.loss_curve_) == clf.n_iter_ == 15
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def _naive_forward(model, X):
    """Eval-mode forward written out in numpy, layer by layer."""
    x = X.astype(np.float64)
    for layer in model:
        if isinstance(layer, torch.nn.BatchNorm2d):
            m, v = layer.running_mean.numpy(), layer.running_var.numpy()
            g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
            x = (x - m[:, None, None]) / np.sqrt(v[:, None, None] + layer.eps) \
                * g[:, None, None] + b[:, None, None]
        elif isinstance(layer, torch.nn.Conv2d):
            Wt, bias = layer.weight.detach().numpy().astype(np.float64), layer.bias.detach().numpy()
            kh, kw = Wt.shape[2:]
            H, W = x.shape[2] - kh + 1, x.shape[3] - kw + 1
            out = np.empty((x.shape[0], Wt.shape[0], H, W))
            for i in range(H):
                for j in range(W):
                    out[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + kh, j:j + kw], Wt)
            x = out + bias[:, None, None]
        elif isinstance(layer, torch.nn.ReLU):
            x = np.maximum(x, 0)
        elif isinstance(layer, torch.nn.AdaptiveAvgPool2d):
            x = x.mean(axis=(2, 3), keepdims=True)
        elif isinstance(layer, torch.nn.Flatten):
            x = x.reshape(len(x), -1)
    return x


@pytest.mark.parametrize("kw,layers,k", [
    (dict(), ["BatchNorm2d", "Conv2d", "Conv2d", "AdaptiveAvgPool2d", "Flatten"], (5, 5)),
    (dict(kernel_size=3), ["BatchNorm2d", "Conv2d", "Conv2d", "AdaptiveAvgPool2d", "Flatten"],
     (3, 3)),
    (dict(width=None, hidden=8), ["BatchNorm2d", "Conv2d", "ReLU", "Conv2d",
                                  "AdaptiveAvgPool2d", "Flatten"], (3, 3)),
    (dict(hidden=8, hidden_kernel_size=2, kernel_size=2),
     ["BatchNorm2d", "Conv2d", "Conv2d", "ReLU", "Conv2d", "AdaptiveAvgPool2d", "Flatten"], (2, 2)),
])
def test_architecture_and_scores_match_a_naive_reference(kw, layers, k):
    X, y = make_maps(n=120, seed=3)
    clf = small(**{"max_iter": 2, **kw}, random_state=0).fit(X, y)
    assert [type(m).__name__ for m in clf.model_] == layers and clf.kernel_size_ == k
    ref = _naive_forward(clf.model_, X)
    np.testing.assert_allclose(clf.decision_function(X), ref, rtol=1e-4, atol=1e-5)
    p = np.exp(ref - ref.max(1, keepdims=True))
    np.testing.assert_allclose(clf.predict_proba(X), p / p.sum(1, keepdims=True), rtol=1e-4,
                               atol=1e-6)


def test_two_classes_use_one_logistic_output():
    X, y = make_maps(n=100, n_classes=2, seed=4)
    clf = small(random_state=0).fit(X, y)
    assert clf.decision_function(X).shape == (100,)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-clf.decision_function(X))),
                               rtol=1e-5)


def test_flat_channels_last_layout_equals_the_4d_maps():
    # PatchEncoder's layout: cell-major, channels last; map_shape reads it as (C, h, w) maps.
    X, y = make_maps(n=120, seed=5)
    flat = np.ascontiguousarray(X.transpose(0, 2, 3, 1)).reshape(len(X), -1)
    a = small(max_iter=3, random_state=0).fit(X, y)
    b = small(max_iter=3, map_shape=(5, 5), random_state=0).fit(flat, y)
    assert b.input_shape_ == a.input_shape_ == (6, 5, 5)
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(flat))
    # without map_shape a 2D X is a 1x1 map of n_features channels
    c = small(max_iter=1, random_state=0).fit(flat, y)
    assert c.input_shape_ == (150, 1, 1) and c.kernel_size_ == (1, 1)


def test_float16_memmap_and_uint8_are_decoded_per_batch(tmp_path):
    X, y = make_maps(n=150, seed=6)
    X16 = X.astype(np.float16)
    path = tmp_path / "maps.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=X16.shape)
    mm[:] = X16
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=X16.shape)
    a = small(max_iter=3, random_state=0).fit(ro, y)
    b = small(max_iter=3, random_state=0).fit(X16.astype(np.float32), y)
    np.testing.assert_array_equal(a.decision_function(ro), b.decision_function(X16))
    U = np.clip(X * 40 + 128, 0, 255).astype(np.uint8)
    c = small(max_iter=3, random_state=0).fit(U, y)
    d = small(max_iter=3, random_state=0).fit(U.astype(np.float32), y)
    np.testing.assert_array_equal(c.decision_function(U), d.decision_function(U))


def test_training_never_holds_the_maps_in_float32(tmp_path, monkeypatch):
    # Evaluation chunks are sized from a budget (512 MB on the CPU); shrink it so that these
    # 14 MB of maps span many chunks, as a real cache spans many budgets.
    monkeypatch.setattr("featlearn._torch.CPU_CHUNK_BYTES", 2**20)
    n, C, h = 6000, 32, 6
    rng = np.random.default_rng(7)
    path = tmp_path / "big.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, C, h, h))
    for s in range(0, n, 1000):
        mm[s:s + 1000] = rng.normal(size=(min(1000, n - s), C, h, h))
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=(n, C, h, h))
    y = np.arange(n) % 2
    full32 = n * C * h * h * 4
    tracemalloc.start()
    try:
        clf = TorchConvClassifier(width=4, max_iter=1, batch_size=256, device="cpu",
                                  early_stopping=True, n_iter_no_change=1,
                                  random_state=0).fit(ro, y)
        clf.predict(ro)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full32 / 4, (peak, full32)


def test_views_are_channel_blocks_and_predictions_average_them():
    X, y = make_maps(n=120, seed=8)
    mirrored = X[:, :, :, ::-1]
    both = np.ascontiguousarray(np.concatenate([X, mirrored], axis=1))
    clf = small(max_iter=3, n_views=2, random_state=0).fit(both, y)
    assert clf.input_shape_ == (6, 5, 5) and clf.n_features_in_ == 12
    s1 = _naive_forward(clf.model_, X)
    s2 = _naive_forward(clf.model_, np.ascontiguousarray(mirrored))
    np.testing.assert_allclose(clf.decision_function(both), (s1 + s2) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by n_views=2"):
        small(n_views=2).fit(X[:, :5], y)


def test_same_seed_same_model_other_seed_other_model():
    X, y = make_maps(n=150, seed=9)
    kw = dict(max_iter=3, hidden=8, dropout=0.3, early_stopping=True)
    a = small(**kw, random_state=3).fit(X, y)
    b = small(**kw, random_state=3).fit(X, y)
    c = small(**kw, random_state=4).fit(X, y)
    assert a.loss_curve_ == b.loss_curve_ and a.validation_scores_ == b.validation_scores_
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))
    assert not np.array_equal(a.decision_function(X), c.decision_function(X))


def test_the_global_rng_is_neither_read_nor_changed():
    X, y = make_maps(n=90, seed=10)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = small(max_iter=2, random_state=0).fit(X, y)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    b = small(max_iter=2, random_state=0).fit(X, y)
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))


def test_early_stopping_keeps_the_best_epoch():
    X, y = make_maps(n=200, seed=11, noise=3.0)  # noisy: validation accuracy wanders
    kw = dict(early_stopping=True, validation_fraction=0.3, lr_schedule="constant",
              random_state=0)
    clf = small(max_iter=60, n_iter_no_change=3, **kw).fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ < 60
    assert clf.best_epoch_ == int(np.argmax(scores)) < clf.n_iter_ - 1
    assert clf.n_iter_ - 1 - clf.best_epoch_ == 3
    # The same run cut at the best epoch draws the same randomness up to there, so the
    # restored weights must be exactly the weights it ends with.
    short = small(max_iter=clf.best_epoch_ + 1, n_iter_no_change=1000, **kw).fit(X, y)
    np.testing.assert_array_equal(clf.decision_function(X), short.decision_function(X))


def test_sample_and_class_weights():
    X, y = make_maps(n=240, seed=12)
    flipped = y.copy()
    bad = np.arange(len(y)) % 5 < 2  # 40% of the labels wrong...
    flipped[bad] = (y[bad] + 1) % 3
    w = np.where(bad, 0.0, 1.0)  # ...but weightless
    Xt, yt = make_maps(n=150, seed=13)
    clf = small(random_state=0).fit(X, flipped, sample_weight=w)
    assert clf.score(Xt, yt) >= 0.95
    ones = small(max_iter=2, random_state=0).fit(X, y, np.ones(len(y)))
    none = small(max_iter=2, random_state=0).fit(X, y)
    np.testing.assert_array_equal(ones.decision_function(X), none.decision_function(X))
    bal = small(max_iter=2, class_weight="balanced", random_state=0)
    assert bal.fit(X, y).score(X, y) > 0.5


@pytest.mark.parametrize("fmt", ["safe", "pickle"])
def test_save_model_round_trip(tmp_path, fmt):
    X, y = make_maps(n=120, seed=14)
    clf = small(max_iter=2, hidden=8, random_state=0).fit(X, y)
    path = tmp_path / "head.model"
    save_model(clf, path, format=fmt)
    back = load_model(path, allow_pickle=fmt == "pickle")
    assert type(back) is TorchConvClassifier and back.get_params() == clf.get_params()
    np.testing.assert_array_equal(back.decision_function(X), clf.decision_function(X))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(X),
                                  clf.predict_proba(X))


def test_cuda_fitted_model_unpickles_on_the_cpu(monkeypatch):
    X, y = make_maps(n=90, seed=15)
    clf = small(max_iter=1, random_state=0).fit(X, y)
    state = clf.__getstate__()
    state["device_"] = "cuda"  # as fitted on a GPU: its state was saved on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = TorchConvClassifier.__new__(TorchConvClassifier)
    back.__setstate__(state)
    assert next(back.model_.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_predicts_on_cpu_after_pickling(monkeypatch):
    X, y = make_maps(n=150, seed=16)
    clf = small(device="cuda", random_state=0).fit(X, y)
    blob = pickle.dumps(clf)
    assert next(clf.model_.parameters()).is_cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = pickle.loads(blob)
    np.testing.assert_allclose(back.decision_function(X), clf.decision_function(X), rtol=1e-4,
                               atol=1e-4)


def test_errors_name_the_problem():
    X, y = make_maps(n=60, seed=17)
    with pytest.raises(NotFittedError):
        TorchConvClassifier().predict(X)
    with pytest.raises(ValueError, match=r"2D \(n_samples, n_features\) or 4D"):
        small().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="kernel_size=7 is larger than the 5x5 map"):
        small(kernel_size=7).fit(X, y)
    with pytest.raises(ValueError, match="hidden_kernel_size=6 is larger than the 5x5"):
        small(hidden=4, hidden_kernel_size=6).fit(X, y)
    with pytest.raises(ValueError, match="map_shape describes the columns of a 2D X"):
        small(map_shape=(5, 5)).fit(X, y)
    flat = X.reshape(len(X), -1)
    with pytest.raises(ValueError, match=r"not a multiple of map_shape=\(4, 4\)"):
        small(map_shape=(4, 4)).fit(flat, y)
    with pytest.raises(ValueError, match="map_shape must be None or a"):
        small(map_shape=(5, 0)).fit(flat, y)
    clf = small(max_iter=1).fit(X, y)
    with pytest.raises(ValueError, match=r"maps of shape \(6, 4, 4\).*fitted on \(6, 5, 5\)"):
        clf.predict(np.ascontiguousarray(X[:, :, :4, :4]))
    bad = X.astype(np.float16)
    bad[3, 2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        small().fit(bad, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        small().fit(X, np.zeros(len(y)))
    with pytest.raises(FloatingPointError, match="diverged"):
        TorchConvClassifier(width=8, max_iter=3, learning_rate_init=1e12, device="cpu",
                            random_state=0).fit(X * 1e3, y)


def test_after_patch_encoder_in_a_pipeline_and_from_a_configuration(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(60, 10, 10, 3)).astype(np.uint8)
    labels = np.arange(60) % 2
    images[labels == 1, :4, :4] = 255  # a bright top-left corner marks class 1
    enc = PatchEncoder(patch_size=3, n_patches=500, pooling=(3, 3), flip=True, device="cpu",
                       random_state=0, kmeans=MiniBatchKMeans(8, random_state=0, device="cpu"))
    pipe = Pipeline([("encoder", enc),
                     ("classifier", small(map_shape=(3, 3), n_views=2,
                                                        random_state=0))]).fit(images, labels)
    assert pipe[-1].input_shape_ == (8, 3, 3)
    assert pipe.score(images, labels) >= 0.9
    path = tmp_path / "pipe.model"
    save_model(pipe, path)
    np.testing.assert_array_equal(load_model(path).predict_proba(images),
                                  pipe.predict_proba(images))
    config = {"name": "conv", "params": {
        "n_centroids": 8, "augment": "flip", "encoder__pooling": [3, 3],
        "classifier": {"class": "TorchConvClassifier", "params": {"width": 16,
                                                                  "map_shape": [3, 3]}},
        "classifier__max_iter": 2}}
    built = build_pipeline(config, device="cpu")
    head = built.named_steps["classifier"]
    assert isinstance(head, TorchConvClassifier)
    assert (head.width, head.map_shape, head.n_views, head.max_iter) == (16, (3, 3), 2, 2)


def test_map_source_gathers_views_and_layouts():
    X = np.arange(2 * 2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 6, 2, 2)  # 2 views of 3 ch
    src = _conv.MapSource(X, 2, None)
    got = src.batch(np.array([0, 1, 3]), torch.device("cpu")).numpy()
    np.testing.assert_array_equal(got, np.stack([X[0, :3], X[0, 3:], X[1, 3:]]))
    flat = np.ascontiguousarray(X[:, :3].transpose(0, 2, 3, 1)).reshape(2, -1)
    src = _conv.MapSource(flat, 1, (2, 2))
    np.testing.assert_array_equal(src.batch(np.array([0, 1]), torch.device("cpu")).numpy(),
                                  X[:, :3])


@pytest.mark.parametrize("params,message", [
    ({"classifier": {"class": "ZCAWhitening"}},
     "'classifier' does not take an estimator of class 'ZCAWhitening'; it takes "
     "TorchMLPClassifier or TorchConvClassifier"),
    ({"encoder__kmeans": {"class": "TorchConvClassifier"}},
     "'encoder__kmeans': class 'TorchConvClassifier' is not allowed here; classifiers go in"),
    ({"classifier": {"class": "TorchConvClassifier", "params": {"widht": 3}}},
     "TorchConvClassifier has no parameter 'widht' \\(did you mean 'width'\\?\\)"),
    ({"classifier": {"class": "TorchConvClassifier", "params": {"width": 0}}},
     "'classifier__width'"),
])
def test_configuration_errors_name_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        build_pipeline({"name": "bad", "params": params}, device="cpu")
