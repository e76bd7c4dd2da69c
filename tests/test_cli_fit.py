"""``featlearn fit`` output rules and options, and loading its models with ``featlearn extract``."""

import json
import os

import numpy as np
import pytest

from featlearn.cli import main
from featlearn.persistence import is_model_file, load_model


@pytest.fixture
def setup(tmp_path):
    """A tiny config, 40 images and their labels on disk."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": {
        "n_centroids": 8, "classifier": "svm", "device": "cpu",
        "encoder__patch_size": 3, "encoder__n_patches": 300, "classifier__max_iter": 2}}))
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(40, 8, 8, 3)).astype(np.uint8)
    src, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(src, images)
    np.save(labels, np.arange(len(images)) % 3)
    return config, src, labels, images


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if anything is fitted (or any images are loaded)."""
    import featlearn.cli
    from featlearn.encoding import PatchEncoder
    from sklearn.pipeline import Pipeline

    def boom(*a, **k):
        raise AssertionError("must be refused before loading data or fitting")

    monkeypatch.setattr(PatchEncoder, "fit", boom)
    monkeypatch.setattr(Pipeline, "fit", boom)
    monkeypatch.setattr(featlearn.cli, "load_images", boom)


def one_error_line(capsys, cmd="fit"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"featlearn {cmd}: error: ")
    return err


def fit(config, src, out, *more):
    return main(["fit", str(config), "--data", str(src), "--out", str(out), "-q", *map(str, more)])


def test_fit_refuses_to_overwrite_its_training_data(setup, capsys, no_fit):
    config, src, labels, _ = setup
    data, lab = src.read_bytes(), labels.read_bytes()
    for out, extra in ((src, ()), (src, ("--force",)), (labels, ("--labels", labels, "--force",
                                                                  "--with-classifier"))):
        assert fit(config, src, out, *extra) == 1
        assert "is also an input" in one_error_line(capsys)
    assert src.read_bytes() == data and labels.read_bytes() == lab


def test_fit_refuses_an_unrelated_file_and_force_replaces_it(setup, tmp_path, capsys,
                                                              monkeypatch):
    config, src, _, images = setup
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with monkeypatch.context() as m:
        from featlearn.encoding import PatchEncoder

        m.setattr(PatchEncoder, "fit", lambda *a, **k: pytest.fail("fitted before refusing"))
        assert fit(config, src, notes) == 1
    err = one_error_line(capsys)
    assert "notes.txt exists and was not written by featlearn" in err and "--force" in err
    assert notes.read_text() == "my notes"
    assert fit(config, src, notes, "--force") == 0
    assert is_model_file(notes)
    model = load_model(notes)
    assert model.transform(images).shape[0] == len(images)
    # a featlearn model is ours: re-fitting into it needs no --force, in either format
    assert fit(config, src, notes, "--n-train", 20) == 0
    assert load_model(notes, return_metadata=True)[1]["n_images"] == 20
    assert fit(config, src, notes, "--format", "pickle") == 0
    assert fit(config, src, notes) == 0


def test_unwritable_output_is_found_before_fitting(setup, tmp_path, capsys, no_fit):
    config, src, _, _ = setup
    assert fit(config, src, tmp_path / "missing" / "m.npz") == 1
    assert "does not exist" in one_error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert fit(config, src, ro / "m.npz") == 1
            assert "not writable" in one_error_line(capsys)
        finally:
            ro.chmod(0o755)


@pytest.mark.parametrize("value", ["-400", "0", "ten"])
def test_n_train_must_be_positive(setup, tmp_path, capsys, value, no_fit):
    config, src, _, _ = setup
    with pytest.raises(SystemExit) as exc:
        fit(config, src, tmp_path / "m.npz", "--n-train", value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"featlearn fit: error: argument --n-train: expected a positive integer, got '{value}'" \
        in err.splitlines()
    assert "Traceback" not in err and not (tmp_path / "m.npz").exists()


def test_pickle_format_needs_allow_pickle_to_extract(setup, tmp_path, capsys):
    config, src, labels, images = setup
    model = tmp_path / "m.pkl"
    assert fit(config, src, model, "--format", "pickle", "--labels", labels,
               "--with-classifier") == 0
    capsys.readouterr()
    out = tmp_path / "f.npy"
    args = ["extract", "--model", str(model), "--data", str(src), "--out", str(out), "-q"]
    assert main(args) == 1
    err = one_error_line(capsys, "extract")
    assert "loading a pickle runs code" in err and "--allow-pickle" in err
    assert not out.exists()
    assert main(args + ["--allow-pickle"]) == 0
    pipe = load_model(model, allow_pickle=True)
    np.testing.assert_allclose(np.load(out), pipe.named_steps["encoder"].transform(images),
                               rtol=1e-5, atol=1e-5)


def test_help_says_pickles_run_code(capsys):
    for cmd in ("fit", "extract"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "pickle runs code" in text
