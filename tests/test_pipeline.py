"""make_coates_pipeline, configurations, flip augmentation, caching and the reproduce job."""

import json
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from featlearn import PatchEncoder, make_coates_pipeline
from featlearn.pipeline import available_configs, build_pipeline, load_config

TINY = dict(encoder__patch_size=3, encoder__n_patches=2000, encoder__kmeans__max_iter=10,
            classifier__max_iter=15)


def tiny_images(n=60, size=8, seed=0):
    """Two classes that differ in texture orientation (stripes), so features can separate them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    r = np.arange(size)
    X = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        phase = rng.uniform(0, 6.28)
        wave = np.sin(r * 1.5 + phase)
        img = wave[None, :] if y[i] else wave[:, None]
        X[i] = (128 + 60 * np.broadcast_to(img, (size, size)))[..., None]
    X += rng.normal(0, 8, X.shape)
    return np.clip(X, 0, 255).astype(np.uint8), y


def tiny_pipeline(**kw):
    params = dict(TINY)
    params.update(kw)
    return make_coates_pipeline(12, **params)


def test_returns_a_plain_pipeline_that_clones_and_pickles():
    pipe = tiny_pipeline()
    assert type(pipe) is Pipeline
    assert [name for name, _ in pipe.steps] == ["encoder", "classifier"]
    assert pipe.get_params()["encoder__kmeans__n_clusters"] == 12
    X, y = tiny_images()
    clone(pipe).fit(X, y)
    pipe.fit(X, y)
    again = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(again.predict(X), pipe.predict(X))
    assert pipe.score(X, y) > 0.9


def test_svm_and_mlp_presets():
    svm = tiny_pipeline(classifier="svm").named_steps["classifier"]
    mlp = tiny_pipeline(classifier="mlp").named_steps["classifier"]
    assert tuple(svm.hidden_layer_sizes) == () and svm.loss == "squared_hinge" and svm.C == 100
    assert tuple(mlp.hidden_layer_sizes) == (512,) and mlp.loss == "cross_entropy"
    with pytest.raises(ValueError, match="classifier must be"):
        make_coates_pipeline(classifier="forest")
    with pytest.raises(ValueError, match="augment"):
        make_coates_pipeline(augment="rotate")


def test_grid_search_reaches_every_stage():
    X, y = tiny_images()
    search = GridSearchCV(tiny_pipeline(classifier="svm"),
                          {"encoder__kmeans__n_clusters": [6, 12], "classifier__C": [1.0, 100.0]},
                          cv=2)
    search.fit(X, y)
    assert set(search.best_params_) == {"encoder__kmeans__n_clusters", "classifier__C"}
    assert search.best_score_ > 0.8


def test_flip_augmentation_doubles_views_not_rows():
    X, y = tiny_images()
    pipe = tiny_pipeline(augment="flip").fit(X, y)
    enc, clf = pipe.named_steps["encoder"], pipe.named_steps["classifier"]
    assert enc.flip and clf.n_views == 2
    F = enc.transform(X)
    assert F.shape == (len(X), 2 * 4 * 12)
    # the second block is the encoding of the mirrored images
    plain = clone(enc).set_params(flip=False)
    plain.__dict__.update({k: v for k, v in enc.__dict__.items() if k.endswith("_")})
    np.testing.assert_allclose(F[:, 48:], plain.transform(X[:, :, ::-1]), rtol=1e-5, atol=1e-5)
    proba = pipe.predict_proba(X)
    assert proba.shape == (len(X), 2) and np.allclose(proba.sum(1), 1)


def test_pipeline_memory_skips_encoding_when_only_the_classifier_changes(tmp_path, monkeypatch):
    X, y = tiny_images()
    calls = {"fit": 0}
    original = PatchEncoder.fit

    def counting_fit(self, *a, **k):
        calls["fit"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(PatchEncoder, "fit", counting_fit)
    pipe = tiny_pipeline(memory=str(tmp_path))
    pipe.fit(X, y)
    assert calls["fit"] == 1
    pipe.set_params(classifier__max_iter=5).fit(X, y)
    assert calls["fit"] == 1  # features came from the cache
    pipe.set_params(encoder__kmeans__n_clusters=8).fit(X, y)
    assert calls["fit"] == 2  # an encoder change is a cache miss


def test_named_configurations_load_and_build():
    names = available_configs()
    for required in ["coates2011-1600-svm", "coates2011-4000-svm", "seed-1600-mlp",
                     "featlearn-best-1600", "featlearn-best-4000"]:
        assert required in names
    for name in names:
        config = load_config(name)
        assert config["how_chosen"] and config["description"]
        pipe = build_pipeline(config)
        assert isinstance(pipe, Pipeline)
    paper = build_pipeline(load_config("coates2011-1600-svm"))
    enc = paper.named_steps["encoder"]
    assert (enc.patch_size, enc.n_patches, enc.stride, enc.activation, tuple(enc.pooling)) == \
        (6, 400_000, 1, "triangle", (2, 2))
    assert enc.kmeans.n_clusters == 1600
    assert paper.named_steps["classifier"].loss == "squared_hinge"
    seed = build_pipeline(load_config("seed-1600-mlp"))
    assert seed.named_steps["encoder"].whitener.zca is False


def test_unknown_or_broken_configuration(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration 'nope'.*coates2011-1600-svm"):
        load_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="no 'params'"):
        load_config(bad)


# -- the reproduce job -------------------------------------------------------------------------------

@pytest.fixture
def tiny_archive(tmp_path):
    from test_datasets import make_archive

    arc = tmp_path / "tiny.tar.gz"
    make_archive(arc, n=40)
    return arc


@pytest.fixture
def tiny_config(tmp_path):
    config = {"name": "tiny", "description": "test", "how_chosen": "test",
              "params": {"n_centroids": 16, "classifier": "svm", **TINY,
                         "encoder__patch_size": 6, "encoder__pooling": [2, 2]}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    return path


def test_reproduce_cli_writes_results_and_pictures(tmp_path, tiny_archive, tiny_config, capsys):
    from featlearn.cli import main

    out = tmp_path / "out"
    assert main(["reproduce", str(tiny_config), "--data", str(tiny_archive), "--out", str(out),
                 "--data-home", str(tmp_path / "home"), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] == 200 and results["n_test"] == 40
    assert 0 <= results["test_accuracy"] <= 1 and results["n_features"] == 64
    assert {"encode train", "classifier fit"} <= set(results["stage_seconds"])
    assert "| tiny |" in (out / "results.md").read_text()
    for png in ("centroids.png", "learning_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test acc" in capsys.readouterr().out


def test_reproduce_cache_reuses_features_when_only_the_classifier_changes(
        tmp_path, tiny_archive, monkeypatch, capsys):
    from featlearn.datasets import fetch_cifar10
    from featlearn.reproduce import run

    data = fetch_cifar10(tmp_path / "home", archive=tiny_archive, md5=None)
    config = {"name": "c", "params": {"n_centroids": 16, "classifier": "svm", **TINY}}
    first, _ = run(config, data, cache=tmp_path / "cache", verbose=0)
    assert not first["features_from_cache"]

    def boom(self, *a, **k):
        raise AssertionError("the encoder must not run again")

    monkeypatch.setattr(PatchEncoder, "fit", boom)
    monkeypatch.setattr(PatchEncoder, "transform", boom)
    config["params"]["classifier__C"] = 10.0
    second, pipe = run(config, data, cache=tmp_path / "cache", verbose=2)
    assert second["features_from_cache"]
    assert second["n_features"] == first["n_features"]
    assert second["feature_load_seconds"] >= 0 and first["feature_load_seconds"] is None
    assert "cache: features loaded in" in capsys.readouterr().err  # the speed-up is logged


def test_reproduce_cache_misses_when_the_feature_code_changes(tmp_path, tiny_archive,
                                                               monkeypatch):
    # Same parameters, same version, new k-means code: the old features must not come back.
    from featlearn import reproduce
    from featlearn.datasets import fetch_cifar10

    data = fetch_cifar10(tmp_path / "home", archive=tiny_archive, md5=None)
    config = {"name": "c", "params": {"n_centroids": 16, "classifier": "svm", **TINY}}
    first, _ = reproduce.run(config, data, cache=tmp_path / "cache", verbose=0)
    again, _ = reproduce.run(config, data, cache=tmp_path / "cache", verbose=0)
    assert not first["features_from_cache"] and again["features_from_cache"]
    monkeypatch.setattr(reproduce, "_code_fingerprint", lambda: "changed")
    changed, _ = reproduce.run(config, data, cache=tmp_path / "cache", verbose=0)
    assert not changed["features_from_cache"]


def test_reproduce_recomputes_a_corrupt_cache_entry(tmp_path, tiny_archive):
    from featlearn.datasets import fetch_cifar10
    from featlearn.reproduce import run

    data = fetch_cifar10(tmp_path / "home", archive=tiny_archive, md5=None)
    config = {"name": "c", "params": {"n_centroids": 16, "classifier": "svm", **TINY}}
    first, _ = run(config, data, cache=tmp_path / "cache", verbose=0)
    outputs = list((tmp_path / "cache").rglob("output.pkl"))
    assert outputs
    for f in outputs:
        f.write_bytes(b"corrupt")
    second, _ = run(config, data, cache=tmp_path / "cache", verbose=0)
    assert second["test_accuracy"] == first["test_accuracy"]


def test_classifier_views_average_scores_and_split_by_sample():
    from featlearn import TorchMLPClassifier

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(2, 120, 5)).astype(np.float32)
    y = (A[:, 0] + B[:, 0] > 0).astype(int)
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), n_views=2, max_iter=5, early_stopping=True,
                             n_iter_no_change=50, random_state=0).fit(np.hstack([A, B]), y)
    assert clf.mean_.shape == (5,) and clf.n_features_in_ == 10
    d = clf.decision_function(np.hstack([A, B]))
    dA, dB = (clf.decision_function(np.hstack([V, V])) for V in (A, B))
    np.testing.assert_allclose(d, (dA + dB) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by n_views=2"):
        TorchMLPClassifier(n_views=2).fit(np.zeros((4, 5)), [0, 1, 0, 1])
