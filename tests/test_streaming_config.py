"""Streaming configurations (``classifier: "stream"``) through make_coates_pipeline,
configuration files, ``featlearn reproduce``, ``fit`` and ``extract``; and reproduce applying a
configuration's power normalization."""

import json

import numpy as np
import pytest
from sklearn.base import clone

from featlearn import PatchEncoder, StreamingConvClassifier, TorchConvClassifier
from featlearn.cli import main
from featlearn.persistence import encoder_of, load_model
from featlearn.pipeline import build_pipeline, image_encoder, load_config, make_coates_pipeline

from conftest import make_cifar_archive

STREAM = {"n_centroids": 8, "classifier": "stream", "device": "cpu",
          "classifier__encoder__patch_size": 3, "classifier__encoder__n_patches": 1000,
          "classifier__encoder__kmeans": {"class": "RandomPatchDictionary", "params": {}},
          "classifier__encoder__activation": "nearest_fraction",
          "classifier__head__width": 4, "classifier__head__kernel_size": 2,
          "classifier__head__max_iter": 2, "classifier__head__batch_size": 16,
          "classifier__crop_padding": 2}


@pytest.fixture
def archive(tmp_path):
    return make_cifar_archive(tmp_path / "tiny.tar.gz", n=20)


def write_config(tmp_path, params, name="tiny-stream"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "params": params}))
    return path


def test_stream_pipeline_is_one_image_classifier_step():
    pipe = make_coates_pipeline(16, classifier="stream", device="cpu", random_state=3,
                                classifier__head__width=8)
    assert [name for name, _ in pipe.steps] == ["classifier"]
    clf = pipe.named_steps["classifier"]
    assert isinstance(clf, StreamingConvClassifier) and isinstance(clf.head, TorchConvClassifier)
    enc = image_encoder(pipe)
    assert isinstance(enc, PatchEncoder) and enc.kmeans.n_clusters == 16
    assert (enc.pool_size, enc.pool_stride, enc.pool_op) == (5, 3, "mean")
    assert clf.head.width == 8 and clf.head.random_state == 3 and clf.random_state == 3
    assert clf.head.device == "cpu"
    clone(pipe)


@pytest.mark.parametrize("kw, fragment", [({"augment": "flip"}, "flips every training batch"),
                                          ({"power": 0.5}, "power does not apply")])
def test_stream_refuses_pipeline_options_it_replaces(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_coates_pipeline(8, classifier="stream", **kw)


def test_stream_config_keys_are_checked_in_one_line(tmp_path):
    bad = {**STREAM, "classifier__encoder__pool_sise": 3}
    with pytest.raises(ValueError, match="classifier__encoder__pool_sise.*did you mean") as exc:
        load_config(write_config(tmp_path, bad))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="'classifier__encoder__pool_stride'"):
        load_config(write_config(tmp_path, {**STREAM, "classifier__encoder__pool_stride": [1, 2, 3]}))


def test_the_thiry_configuration_is_the_published_recipe():
    config = load_config("thiry2021-2048-linear")
    clf = build_pipeline(config, device="cpu").named_steps["classifier"]
    enc = clf.encoder
    assert enc.kmeans.n_clusters == 2048 and type(enc.kmeans).__name__ == "RandomPatchDictionary"
    assert (enc.activation, enc.neighbor_fraction) == ("nearest_fraction", 0.4)
    assert (enc.pool_size, enc.pool_stride, enc.pool_op, enc.patch_size) == (5, 3, "mean", 6)
    assert (enc.whitener.eps, enc.whitener.eps_scale) == (1e-3, "mean")
    assert (clf.head.width, clf.head.kernel_size, clf.head.max_iter) == (128, 6, 80)
    assert clf.crop_padding == 4 and clf.flip and clf.test_flip


def test_reproduce_runs_a_streaming_config(tmp_path, archive):
    out = tmp_path / "out"
    rc = main(["reproduce", str(write_config(tmp_path, STREAM)), "--data", str(archive),
               "--data-home", str(tmp_path / "home"), "--n-train", "60", "--n-test", "20",
               "--out", str(out), "-q"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stage_seconds"]) == ["fit (dictionary, streamed training)", "predict"]
    assert results["n_centroids"] == 8 and results["device"] == "cpu"
    # 2K channels of 10x10 maps: 5x5 windows at stride 3 over 30x30 positions, the last clipped
    assert results["n_features"] == 16 * 10 * 10
    assert results["distance_tflop"]["k-means"] == 0  # random patches: no k-means pass
    assert 0 <= results["test_accuracy"] <= 1 and 0 <= results["train_accuracy"] <= 1
    assert {p.name for p in out.iterdir()} >= {"results.md", "learning_curve.png",
                                               "centroids.png", "confusion.png"}


def test_fit_and_extract_with_a_streaming_config(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    src, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(src, X)
    np.save(labels, np.arange(40) % 2)
    config = write_config(tmp_path, STREAM)
    enc_file, pipe_file = tmp_path / "enc.npz", tmp_path / "pipe.npz"
    assert main(["fit", str(config), "--data", str(src), "--out", str(enc_file), "-q"]) == 0
    assert isinstance(load_model(enc_file), PatchEncoder)
    assert main(["fit", str(config), "--data", str(src), "--labels", str(labels), "--out",
                 str(pipe_file), "--with-classifier", "-q"]) == 0
    pipe = load_model(pipe_file)
    assert pipe.predict(X).shape == (40,)
    encoder = encoder_of(pipe)
    assert encoder is pipe.named_steps["classifier"].encoder_
    out = tmp_path / "maps.npy"
    assert main(["extract", "--model", str(pipe_file), "--data", str(src), "--out", str(out),
                 "-q"]) == 0
    np.testing.assert_array_equal(np.load(out), encoder.transform(X))


def test_reproduce_applies_the_configs_power_normalization(tmp_path, archive):
    from featlearn.preprocessing import PowerNormalizer
    from featlearn.reproduce import run

    params = {"n_centroids": 8, "classifier": "svm", "device": "cpu", "power": 0.5,
              "encoder__patch_size": 3, "encoder__n_patches": 1000,
              "encoder__kmeans__max_iter": 3, "classifier__max_iter": 3}
    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8),
            "y_train": np.arange(30) % 3,
            "X_test": rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8),
            "y_test": np.arange(10) % 3}
    results, pipe = run({"name": "p", "params": params}, data, verbose=0)
    F = pipe.named_steps["encoder"].transform(data["X_train"])
    want = PowerNormalizer(0.5).transform(F).mean(0)
    np.testing.assert_allclose(pipe.named_steps["classifier"].mean_, want, rtol=1e-5, atol=1e-6)
    assert results["test_accuracy"] == pytest.approx(pipe.score(data["X_test"], data["y_test"]))
