"""make_coates_pipeline, configurations, flip augmentation, caching and the reproduce job."""

import json
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from featlearn import PatchEncoder, make_coates_pipeline

from conftest import make_cifar_archive
from featlearn.pipeline import (available_configs, build_pipeline, ensemble_members,
                                load_config)

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


def test_seed_ensemble_averages_members_that_differ_only_in_their_seeds():
    from featlearn.classifier import SeedEnsembleClassifier

    X, y = tiny_images()
    encoder = {k: v for k, v in TINY.items() if k.startswith("encoder__")}
    pipe = make_coates_pipeline(12, augment="flip", ensemble=3, classifier__estimator__max_iter=5,
                                **encoder)
    ens = pipe.named_steps["classifier"]
    assert isinstance(ens, SeedEnsembleClassifier) and ens.n_estimators == 3
    assert ens.estimator.n_views == 2  # flip reached the members
    pipe.fit(X, y)
    members = ens.estimators_
    assert len({m.random_state for m in members}) == 3
    for m in members:  # each member saw every sample: the same fit as alone with its seed
        assert m.n_views == 2 and m.max_iter == 5
    F = pipe.named_steps["encoder"].transform(X)
    alone = clone(members[0]).fit(F, y)
    np.testing.assert_allclose(alone.predict_proba(F), members[0].predict_proba(F), atol=1e-6)
    expected = np.mean([m.predict_proba(F) for m in members], axis=0)
    np.testing.assert_allclose(pipe.predict_proba(X), expected, atol=1e-6)
    again = clone(pipe).fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X), pipe.predict_proba(X))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_seed_ensemble_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="ensemble must be None or an integer >= 1"):
        make_coates_pipeline(ensemble=bad)


def test_seed_ensemble_refuses_the_streaming_classifier():
    with pytest.raises(ValueError, match="ensemble does not apply to classifier='stream'"):
        make_coates_pipeline(classifier="stream", ensemble=2)


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
        model = build_pipeline(config)
        # An ensemble configuration: a soft-voting ensemble of pipelines.
        assert all(isinstance(pipe, Pipeline) for pipe in ensemble_members(model))
        assert isinstance(model, Pipeline) == ("members" not in config)
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
    return make_cifar_archive(tmp_path / "tiny.tar.gz", n=40)


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
    assert results["n_features"] == 64
    # accuracies are counts over the 40 test / 200 training images, and the table shows them
    assert round(results["test_accuracy"] * 40, 6) == round(results["test_accuracy"] * 40)
    assert round(results["train_accuracy"] * 200, 6) == round(results["train_accuracy"] * 200)
    assert f"{results['test_accuracy']:.2%}" in (out / "results.md").read_text()
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
    from featlearn import fingerprints, reproduce
    from featlearn.datasets import fetch_cifar10

    data = fetch_cifar10(tmp_path / "home", archive=tiny_archive, md5=None)
    config = {"name": "c", "params": {"n_centroids": 16, "classifier": "svm", **TINY}}
    first, _ = reproduce.run(config, data, cache=tmp_path / "cache", verbose=0)
    again, _ = reproduce.run(config, data, cache=tmp_path / "cache", verbose=0)
    assert not first["features_from_cache"] and again["features_from_cache"]
    monkeypatch.setattr(fingerprints, "code_fingerprint", lambda: "changed")
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


# -- configurations are data -------------------------------------------------------------------------

def _write_config(tmp_path, obj, name="c.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _one_line_error(path_or_config, match, **overrides):
    with pytest.raises(ValueError, match=match) as info:
        if isinstance(path_or_config, dict):
            build_pipeline(path_or_config, **overrides)
        else:
            load_config(path_or_config)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_shipped_configurations_use_only_the_allowed_keys():
    from featlearn.pipeline import CONFIG_KEYS

    for name in available_configs():
        raw = json.loads((__import__("featlearn.pipeline").pipeline.CONFIG_DIR
                          / f"{name}.json").read_text())
        assert set(raw) <= set(CONFIG_KEYS) and raw["name"] == name


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "must be a JSON object, got a list"),
    ('"text"', "must be a JSON object, got a string"),
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ({"params": {}, "descripton": "x"}, "unknown key 'descripton' \\(did you mean 'description'"),
    ({"params": [1]}, "no 'params' object"),
    ({"name": "../../x", "params": {}}, "'name' must match"),
    ({"name": "..", "params": {}}, "'name' must match"),
    ({"name": "a/b", "params": {}}, "'name' must match"),
    ({"name": 3, "params": {}}, "'name' must match"),
    ({"params": {}, "published": "77.9"}, "'published' must be a number or null"),
    ({"params": {}, "description": ["x"]}, "'description' must be a string"),
])
def test_malformed_configuration_files_are_one_line_errors(tmp_path, content, match):
    _one_line_error(_write_config(tmp_path, content), match)


def test_missing_file_folder_and_bad_names(tmp_path):
    _one_line_error(tmp_path / "absent.json", "does not exist")
    _one_line_error(tmp_path, "is a folder")
    _one_line_error(str(tmp_path / "no" / ".." / ".." / "absent"), "does not exist")
    _one_line_error("bad name", "not valid")
    _one_line_error("nope", "unknown configuration 'nope'.*coates2011-1600-svm")


@pytest.mark.parametrize("params, match", [
    ({"n_centroid": 100}, "unknown configuration key 'n_centroid' \\(did you mean 'n_centroids'"),
    ({"encoder__strid": 2}, "'encoder__strid' \\(did you mean 'encoder__stride'"),
    ({"encoder__kmeans__max_iters": 5}, "did you mean 'encoder__kmeans__max_iter'"),
    ({"classifier__max_ite": 5}, "did you mean 'classifier__max_iter'"),
    ({"steps": []}, "unknown configuration key 'steps'"),
    ({"encoder__whitener__eps": 0.1, "encoder__whitener": "passthrough"},
     "unknown configuration key 'encoder__whitener__eps'"),
    ({"encoder__whitener__eps": 0.01}, "encoder__whitener is the default \\(null\\).*\"class\""),
    ({"n_centroids": -5}, "'n_centroids'.*n_clusters.*Got -5"),
    ({"n_centroids": "many"}, "'n_centroids' must be an integer"),
    ({"n_centroids": True}, "'n_centroids' must be an integer"),
    ({"encoder__kmeans__n_clusters": 0}, "'encoder__kmeans__n_clusters'.*Got 0"),
    ({"encoder__pooling": "x"}, "'encoder__pooling'.*Got 'x'"),
    ({"encoder__pooling": [2, "a"]}, "'encoder__pooling'.*pooling must be"),
    ({"encoder__pooling": [[2], 2]}, "'encoder__pooling': lists may hold only"),
    ({"encoder__activation": "relu"}, "'encoder__activation'.*relu"),
    ({"encoder__stride": 0}, "'encoder__stride'"),
    ({"encoder__stride": {"class": "ZCAWhitening"}}, "'encoder__stride' does not take an estimator"),
    ({"classifier__dropout": 3}, "'classifier__dropout'"),
    ({"classifier": "svmm"}, "classifier must be"),
    ({"classifier": {"class": "ZCAWhitening"}}, "'classifier' does not take an estimator"),
    ({"augment": "mirror"}, "augment must be"),
    ({"ensemble": 0}, "ensemble must be None or an integer >= 1"),
    ({"ensemble": True}, "'ensemble' must be an integer"),
    ({"ensemble": 2, "classifier__dropout": 0.1},
     "'classifier__dropout' \\(did you mean 'classifier__estimator__dropout'"),
    ({"device": "gpu"}, "unknown device 'gpu'.*\"cuda:N\""),
    ({"encoder__whitener": {"class": "ZCAWhitening", "params": {"eps": -1}}},
     "'encoder__whitener__eps'.*Got -1"),
    ({"encoder__whitener": {"class": "ZCAWhitening", "params": {"epss": 1}}},
     "ZCAWhitening has no parameter 'epss' \\(did you mean 'eps'"),
    ({"encoder__whitener": {"class": "ZCAWhitening", "params": [1]}}, "must be an object"),
    ({"encoder__whitener": {"class": "ZCAWhitening", "kwargs": {}}}, "unknown estimator field"),
    ({"encoder__whitener": {"class": "ZCAWhitenin"}}, "did you mean 'ZCAWhitening'"),
    ({"encoder__whitener": {"class": "make_coates_pipeline"}}, "not allowed"),
    ({"encoder__whitener": {"class": "sklearn.decomposition.FastICA"}}, "not allowed"),
    ({"encoder__whitener": {"class": "os.system", "params": {"command": "true"}}}, "not allowed"),
    ({"encoder__normalizer": {"class": "PatchEncoder"}}, "not allowed"),
    ({"encoder__kmeans": {"class": "TorchMLPClassifier"}}, "not allowed"),
])
def test_bad_params_are_one_line_errors_naming_the_key(tmp_path, params, match):
    _one_line_error(_write_config(tmp_path, {"params": params}), match)
    _one_line_error({"name": "c", "params": params}, match)


def test_a_config_naming_a_function_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    """The issue's attack: a featlearn function in place of a whitener class."""
    import featlearn
    import featlearn.datasets

    calls = []
    record = lambda *a, **k: calls.append((a, k))  # noqa: E731
    # featlearn first: its lazy lookup must record the real function for the undo.
    monkeypatch.setattr(featlearn, "fetch_cifar10", record)
    monkeypatch.setattr(featlearn.datasets, "fetch_cifar10", record)
    evil = tmp_path / "evil.tar.gz"
    spec = {"class": "fetch_cifar10", "params": {"url": f"file://{evil}", "md5": None}}
    for key in ("encoder__whitener", "encoder__normalizer", "encoder__kmeans"):
        msg = _one_line_error(_write_config(tmp_path, {"params": {key: spec}}),
                              f"'{key}': class 'fetch_cifar10' is not allowed")
        assert "ZCAWhitening" in msg and "sklearn.decomposition.PCA" in msg
    assert calls == []


def test_allowed_estimators_build(tmp_path):
    pca = {"class": "sklearn.decomposition.PCA", "params": {"n_components": 20, "whiten": True}}
    config = load_config(_write_config(tmp_path, {"params": {
        "encoder__whitener": pca, "encoder__whitener__n_components": 10,
        "encoder__normalizer": {"class": "sklearn.preprocessing.StandardScaler"},
        "encoder__kmeans": {"class": "sklearn.cluster.MiniBatchKMeans",
                            "params": {"n_clusters": 8, "n_init": 1}},
        "encoder__pooling": [1, 2], "classifier__hidden_layer_sizes": [16]}}))
    enc = build_pipeline(config).named_steps["encoder"]
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    assert isinstance(enc.whitener, PCA) and enc.whitener.n_components == 10
    assert isinstance(enc.normalizer, StandardScaler)
    assert isinstance(enc.kmeans, MiniBatchKMeans) and enc.kmeans.n_clusters == 8
    assert enc.pooling == (1, 2)


def test_featlearn_kmeans_is_allowed_where_it_exists(tmp_path):
    import featlearn.kmeans

    config = {"name": "c", "params": {"encoder__kmeans": {"class": "KMeans",
                                                          "params": {"n_clusters": 8}}}}
    if hasattr(featlearn.kmeans, "KMeans"):
        enc = build_pipeline(config).named_steps["encoder"]
        assert type(enc.kmeans) is featlearn.kmeans.KMeans
    else:
        _one_line_error(config, "'KMeans' is not allowed")


def test_overrides_are_validated_too():
    config = load_config("coates2011-1600-svm")
    _one_line_error(config, "unknown device 'bogus'", device="bogus")
    _one_line_error(config, "'n_centroids'.*Got -1", n_centroids=-1)
    assert build_pipeline(config, n_centroids=8).named_steps["encoder"].kmeans.n_clusters == 8


def test_the_name_defaults_to_the_file_stem_and_must_be_safe(tmp_path):
    assert load_config(_write_config(tmp_path, {"params": {}}, "my-config.json"))["name"] == \
        "my-config"
    _one_line_error(_write_config(tmp_path, {"params": {}}, "my config.json"), "'name' must match")


def test_build_pipeline_accepts_a_plain_dict_without_name():
    pipe = build_pipeline({"params": {"n_centroids": 8, "encoder__stride": 2}})
    assert pipe.named_steps["encoder"].stride == 2
    with pytest.raises(ValueError, match="must be a JSON object, got a list"):
        build_pipeline([1])
