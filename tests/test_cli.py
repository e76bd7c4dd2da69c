"""The featlearn command line: every expected mistake is one line and an exit code, never a
traceback, and no command destroys a file it did not write."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featlearn.cli import main
from featlearn.persistence import load_model, save_model

from conftest import make_cifar_archive

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_cli(*args, cwd=None):
    """The command in a fresh interpreter: what a user sees (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    res = subprocess.run([sys.executable, "-m", "featlearn.cli", *map(str, args)], env=env,
                         capture_output=True, text=True, cwd=cwd, timeout=300)
    return res.returncode, res.stdout, res.stderr


def assert_one_line_error(err, command, *fragments):
    """No traceback; the error is one line, the last; other lines are featlearn's own messages."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"featlearn {command}: error: "), err
    assert all(line.startswith("featlearn") and ": error: " not in line for line in lines[:-1]), err
    for f in fragments:
        assert f in lines[-1], err


@pytest.fixture
def made(encoder, images, tmp_path):
    """An images .npy, a saved encoder, and a finished extraction of them."""
    src, model, out = tmp_path / "x.npy", tmp_path / "model.joblib", tmp_path / "f.npy"
    np.save(src, images)
    save_model(encoder, model)
    assert main(["extract", "--model", str(model), "--data", str(src), "--out", str(out),
                 "--batch-size", "7", "-q"]) == 0
    return src, model, out


def test_cli_fit_then_extract_round_trip(images, tmp_path):
    from featlearn.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": {
        "n_centroids": 8, "classifier": "svm", "device": "cpu",
        "encoder__patch_size": 3, "encoder__n_patches": 500, "classifier__max_iter": 2}}))
    src, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(src, images)
    np.save(labels, np.arange(len(images)) % 3)
    model = tmp_path / "model.joblib"
    assert main(["fit", str(config), "--data", str(src), "--out", str(model)]) == 0
    encoder, meta = load_model(model, return_metadata=True)
    assert meta["config"]["name"] == "tiny" and meta["n_images"] == 60
    out = tmp_path / "features.npy"
    assert main(["extract", "--model", str(model), "--data", str(src), "--out", str(out),
                 "--mirror", "--quiet"]) == 0
    np.testing.assert_allclose(np.load(out), encoder.transform(images[:, :, ::-1]), rtol=1e-5,
                               atol=1e-5)

    full = tmp_path / "pipe.joblib"
    assert main(["fit", str(config), "--data", str(src), "--labels", str(labels), "--out",
                 str(full), "--with-classifier"]) == 0
    pipe = load_model(full)
    assert pipe.predict(images).shape == (60,)
    assert main(["extract", "--model", str(full), "--data", str(src), "--out",
                 str(tmp_path / "p.npy"), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"),
                               pipe.named_steps["encoder"].transform(images), rtol=1e-5, atol=1e-5)
    assert main(["fit", str(config), "--data", str(src), "--out", str(full),
                 "--with-classifier"]) == 1  # no labels for an .npy: a clear error


# -- extract never destroys what it did not make -----------------------------------------------------

def test_extract_refuses_a_foreign_output_unless_force(made, tmp_path, capsys):
    src, model, _ = made
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    rc, _, err = run_cli("extract", "--model", model, "--data", src, "--out", notes)
    assert rc == 1
    assert_one_line_error(err, "extract", "notes.txt", "--force")
    assert notes.read_text() == "precious"
    assert main(["extract", "--model", str(model), "--data", str(src), "--out", str(notes),
                 "--force", "-q"]) == 0
    assert np.load(notes).shape[0] == 60


@pytest.mark.parametrize("which", ["data", "model"])
def test_extract_into_its_own_input_is_always_refused(made, which):
    src, model, _ = made
    target = src if which == "data" else model
    before = target.read_bytes()
    for force in ([], ["--force"]):
        rc, _, err = run_cli("extract", "--model", model, "--data", src, "--out", target, *force)
        assert rc == 1
        assert_one_line_error(err, "extract", "is also an input")
    assert target.read_bytes() == before


@pytest.mark.parametrize("problem", ["image size", "channels first", "nan", "device typo"])
def test_bad_rerun_keeps_the_finished_result(made, images, tmp_path, problem):
    src, model, out = made
    before = out.read_bytes()
    bad, extra = tmp_path / "bad.npy", []
    if problem == "image size":
        np.save(bad, np.zeros((10, 5, 5, 3), np.uint8))
    elif problem == "channels first":
        np.save(bad, np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    elif problem == "nan":
        X = images.astype(np.float32)
        X[2, 2, 2, 2] = np.nan
        np.save(bad, X)
    else:
        bad, extra = src, ["--device", "bogus"]
    rc, _, err = run_cli("extract", "--model", model, "--data", bad, "--out", out, *extra)
    assert rc == 1
    assert_one_line_error(err, "extract")
    if problem == "device typo":
        assert "bogus" in err
    if problem == "nan":
        assert "not finite" in err
    assert out.read_bytes() == before


def test_model_that_is_not_a_model_is_one_line(made, tmp_path):
    import joblib

    src, _, _ = made
    pickled = tmp_path / "dict.joblib"
    joblib.dump({"not": "a model"}, pickled)
    rc, _, err = run_cli("extract", "--model", pickled, "--data", src, "--out", tmp_path / "o.npy")
    assert rc == 1
    assert_one_line_error(err, "extract")
    assert not (tmp_path / "o.npy").exists()


def test_text_file_as_model_is_one_line(made, tmp_path):
    src, _, _ = made
    text = tmp_path / "model.txt"
    text.write_text("not a model at all\n" * 20)
    rc, _, err = run_cli("extract", "--model", text, "--data", src, "--out", tmp_path / "o.npy")
    assert rc == 1
    assert_one_line_error(err, "extract")


# -- one-line errors for every expected mistake --------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["reproduce", "x", "--data", "a", "--n-train", "-400"], "--n-train: expected a positive integer"),
    (["reproduce", "x", "--data", "a", "--n-test", "0"], "--n-test: expected a positive integer"),
    (["extract", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["extract", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "x"], "--batch-size"),
    (["extract", "--model", "m", "--data", "d", "--out", "o", "--n-jobs", "0"], "--n-jobs"),
    (["info", "--data", "a", "--n-patches", "-1"], "--n-patches"),
])
def test_bad_numbers_are_usage_errors(args, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"featlearn {args[0]}: error: argument" in err and fragment in err
    assert "Traceback" not in err


def test_n_jobs_minus_one_is_accepted(made, tmp_path):
    src, model, _ = made
    assert main(["extract", "--model", str(model), "--data", str(src), "--out",
                 str(tmp_path / "all.npy"), "--n-jobs", "-1", "--batch-size", "30", "-q"]) == 0


def test_checksum_error_speaks_of_md5_option(tmp_path):
    arc = make_cifar_archive(tmp_path / "c.tar.gz")
    rc, _, err = run_cli("info", "--data", arc, "--md5", "0" * 32, "--data-home", tmp_path / "h")
    assert rc == 1
    assert_one_line_error(err, "info", "--md5")
    assert "md5=None" not in err


def test_dataset_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"this is not a tar archive")
    rc, _, err = run_cli("info", "--data", bad, "--data-home", tmp_path / "h")
    assert rc == 1
    assert_one_line_error(err, "info")
    rc, _, err = run_cli("info", "--data", tmp_path / "missing.tar.gz")
    assert rc == 1
    assert_one_line_error(err, "info", "does not exist")


def test_bad_configs_are_one_line(tmp_path):
    rc, _, err = run_cli("reproduce", "no-such-config", "--data", "x")
    assert rc == 1
    assert_one_line_error(err, "reproduce", "unknown configuration")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rc, _, err = run_cli("reproduce", broken, "--data", "x", "--out", tmp_path / "o")
    assert rc == 1
    assert_one_line_error(err, "reproduce", "not valid JSON")
    assert not (tmp_path / "o").exists()


def test_config_that_is_a_list_is_one_line(tmp_path):
    cfg = tmp_path / "list.json"
    cfg.write_text("[1, 2]")
    rc, _, err = run_cli("reproduce", cfg, "--data", "x", "--out", tmp_path / "o")
    assert rc == 1
    assert_one_line_error(err, "reproduce")


def test_device_typo_is_one_line_before_any_work(tmp_path):
    rc, _, err = run_cli("reproduce", "coates2011-1600-svm", "--data", tmp_path / "missing.tar.gz",
                         "--device", "cdua", "--out", tmp_path / "o")
    assert rc == 1
    assert_one_line_error(err, "reproduce", "cdua")
    assert not (tmp_path / "o").exists()


def test_keyboard_interrupt_is_one_line(monkeypatch, capsys):
    import featlearn.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_data", interrupted)
    assert main(["info", "--data", "x"]) == 130
    assert_one_line_error(capsys.readouterr().err, "info", "interrupted")


def test_sigterm_is_one_line_and_cleans_up(tmp_path):
    """SIGTERM during a job: exit 143, one line, no temporary file left."""

    code = ("import os, signal, sys, time\n"
            "import featlearn.cli as cli\n"
            "def slow(args):\n"
            "    from featlearn._io import atomic_path\n"
            f"    with atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:\n"
            "        open(tmp, 'w').write('partial'); print('ready', flush=True); time.sleep(60)\n"
            "cli.load_data = slow\n"
            "sys.exit(cli.main(['info', '--data', 'x']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert_one_line_error(err, "info", "terminated")
    assert list(tmp_path.iterdir()) == []


def test_version_does_not_import_torch_or_sklearn():
    code = ("import sys\nfrom featlearn.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'sklearn', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "featlearn 0.1.0"
