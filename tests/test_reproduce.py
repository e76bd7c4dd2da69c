"""featlearn reproduce: the results folder is checked before any work, never holds someone
else's files unless --force, is always under --out, and is written atomically."""

import json
import os
from pathlib import Path

import pytest
import torch

from featlearn.cli import main
from featlearn.results import (RESULTS_MARKER, default_results_dir, is_results_dir,
                               prepare_results_dir, safe_folder_name)

from conftest import make_cifar_archive

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = {"n_centroids": 8, "classifier": "svm", "device": "cpu", "encoder__patch_size": 3,
        "encoder__n_patches": 1000, "encoder__kmeans__max_iter": 5, "classifier__max_iter": 5}


@pytest.fixture
def archive(tmp_path):
    return make_cifar_archive(tmp_path / "tiny.tar.gz", n=20)


def tiny_config(tmp_path, name="tiny"):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"name": name, "params": TINY}))
    return path


def reproduce(config, archive, *extra):
    return main(["reproduce", str(config), "--data", str(archive), "--data-home",
                 str(Path(archive).parent / "home"), "--n-train", "60", "--n-test", "20", "-q",
                 *map(str, extra)])


@pytest.mark.parametrize("name, safe", [("../../x", "x"), ("..", "results"), (".", "results"),
                                        (".hidden", "hidden"), ("a/b\\c d", "a_b_c_d"),
                                        ("", "results"), ("coates2011-1600-svm", "coates2011-1600-svm")])
def test_folder_names_are_sanitized(name, safe, tmp_path):
    assert safe_folder_name(name) == safe
    out = default_results_dir(name, tmp_path)
    assert out.parent == tmp_path and out.name == safe


def test_config_name_cannot_escape_the_results_folder(tmp_path, archive, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # The configuration is refused when loaded; the folder name is sanitized as well (below).
    assert reproduce(tiny_config(tmp_path, name="../../escaped"), archive) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("featlearn reproduce: error:") and "name" in err and "\n" not in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (work / "results").exists()


def test_results_are_marked_and_a_rerun_replaces_them(tmp_path, archive):
    out = tmp_path / "out"
    assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results[RESULTS_MARKER] == 1 and results["n_train"] == 60 and results["n_test"] == 20
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "centroids.png",
                                               "learning_curve.png", "confusion.png"}
    assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 0  # ours: no --force needed


def test_foreign_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import featlearn.cli as cli

    def no_data(args):
        raise AssertionError("data must not be loaded before --out is checked")

    monkeypatch.setattr(cli, "load_data", no_data)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert reproduce(tiny_config(tmp_path), tmp_path / "unused.tar.gz", "--out", out) == 1
    err = capsys.readouterr().err
    assert "featlearn reproduce: error: results folder" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # a file, and a folder whose parent is missing: refused up front too
    (tmp_path / "file").write_text("x")
    assert reproduce(tiny_config(tmp_path), tmp_path / "unused", "--out", tmp_path / "file") == 1
    assert (tmp_path / "file").read_text() == "x"
    assert reproduce(tiny_config(tmp_path), tmp_path / "unused", "--out",
                     tmp_path / "no" / "such" / "out") == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_force_writes_into_a_foreign_folder(tmp_path, archive):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert reproduce(tiny_config(tmp_path), archive, "--out", out, "--force") == 0
    assert is_results_dir(out) and (out / "notes.txt").read_text() == "precious"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_unwritable_folder_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OSError, match="not writable"):
            prepare_results_dir(ro)
    finally:
        ro.chmod(0o755)


def test_unwritable_folder_probe_is_used(tmp_path, monkeypatch):
    """What a read-only filesystem does even to root: nothing can be created in the folder."""
    import tempfile

    out = tmp_path / "out"
    out.mkdir()

    def denied(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OSError, match="not writable"):
        prepare_results_dir(out)


def test_failed_write_keeps_the_previous_results(tmp_path, archive, monkeypatch):
    import featlearn.results as rep

    out = tmp_path / "out"
    assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rep, "plot_learning_curve", broken)
    assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 1
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys()  # no temporary left behind
    assert after["results.json"] == before["results.json"]  # the marked results stay whole


def test_library_run_checks_the_folder_first(tmp_path, archive):
    from featlearn.datasets import fetch_cifar10
    from featlearn.reproduce import run

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    data = fetch_cifar10(tmp_path / "home", archive=archive, md5=None)
    with pytest.raises(FileExistsError):
        run({"name": "t", "params": TINY}, data, out=out, n_train=60, n_test=20, verbose=0)
    with pytest.raises(ValueError, match="n_train must be a positive int"):
        run({"name": "t", "params": TINY}, data, n_train=-400, verbose=0)


def test_results_follow_the_umask(tmp_path, archive):
    out = tmp_path / "out"
    old = os.umask(0o077)
    try:
        assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o700
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p


def test_results_record_gemm_rate_flops_and_efficiency(tmp_path, archive):
    out = tmp_path / "out"
    assert reproduce(tiny_config(tmp_path), archive, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["gemm_gflops"] > 0
    # TINY: 3x3 patches on 32x32x3 images (30x30 positions, d=27), K=8, 60 + 20 images.
    assert results["distance_tflop"]["encoding"] == pytest.approx(2 * 80 * 900 * 27 * 8 / 1e12,
                                                                  rel=1e-3)
    assert set(results["efficiency"]) == {"dictionary", "encoding", "end to end"}
    assert all(v > 0 for v in results["efficiency"].values())
    assert "GEMM rates measured in this run: float32" in (out / "results.md").read_text()


def test_distance_flops_counts_every_pass():
    from types import SimpleNamespace

    from featlearn.reproduce import distance_flops, efficiency

    def encoder(km):
        return SimpleNamespace(kmeans_=km, n_clusters_=4, n_patches=100, map_shape_=(3, 2),
                               flip=True)

    lloyd = SimpleNamespace(cluster_centers_=[[0.0] * 5] * 4, n_iter_=7)
    assert distance_flops(encoder(lloyd), 10, 5) == {
        "k-means": 2.0 * 7 * 100 * 5 * 4, "encoding": 2.0 * 15 * 2 * 6 * 5 * 4}
    mb = SimpleNamespace(cluster_centers_=[[0.0] * 5] * 4, n_steps_=3, batch_size=30,
                         compute_labels=False)
    assert distance_flops(encoder(mb), 0, 0)["k-means"] == 2.0 * 90 * 5 * 4
    mb.compute_labels = True
    assert distance_flops(encoder(mb), 0, 0)["k-means"] == 2.0 * 190 * 5 * 4
    # seconds the products take at the rate of their own precision, over the stages' seconds
    eff = efficiency({"k-means": 0.5, "encoding": 1.5},
                     {"dictionary (patches, whitening, k-means)": 1.0, "encode train": 2.0,
                      "encode test": 1.0, "classifier fit": 4.0})
    assert eff == {"dictionary": 0.5, "encoding": 0.5, "end to end": 0.25}


@pytest.mark.parametrize("solver, early_stopping", [("adam", False), ("adam", True),
                                                    ("sgd", True)])
def test_network_flops_are_the_products_a_fit_and_a_prediction_run(solver, early_stopping):
    """Counted by torch itself: every matrix product of fitting (validation scoring included)
    and of predicting both splits."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from featlearn.classifier import TorchMLPClassifier
    from featlearn.reproduce import network_flops

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 2 * 6)).astype(np.float32), rng.integers(0, 3, 50)
    X_test = rng.normal(size=(10, 12)).astype(np.float32)
    clf = TorchMLPClassifier(hidden_layer_sizes=(7, 5), n_views=2, solver=solver, max_iter=3,
                             batch_size=16, early_stopping=early_stopping,
                             validation_fraction=0.25, n_iter_no_change=10, random_state=0)
    with FlopCounterMode(display=False) as fit:
        clf.fit(X, y)
    with FlopCounterMode(display=False) as predict:
        clf.predict(X)
        clf.predict(X_test)
    assert network_flops(clf, 50, 10) == {"classifier fit": fit.get_total_flops(),
                                          "predict": predict.get_total_flops()}


def test_network_flops_leave_out_what_they_cannot_count():
    import numpy as np

    from featlearn.classifier import TorchMLPClassifier
    from featlearn.reproduce import network_flops

    X, y = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2
    svm = TorchMLPClassifier(hidden_layer_sizes=(), solver="lbfgs", max_iter=3).fit(X, y)
    assert network_flops(svm, 20, 0) == {}
    assert network_flops(object(), 20, 0) == {}


def test_an_mlp_run_reports_its_network_products(tmp_path, archive):
    path = tmp_path / "mlp.json"
    path.write_text(json.dumps({"name": "mlp", "params": TINY | {
        "classifier": "mlp", "classifier__hidden_layer_sizes": [6],
        "classifier__max_iter": 2}}))
    out = tmp_path / "out"
    assert reproduce(path, archive, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    # 60 training images, 2x2 pooling of K=8 triangle features: 32 inputs, 6 hidden, 10 out
    forward = 2 * (32 * 6 + 6 * 10)
    assert results["network_tflop"]["predict"] == pytest.approx(80 * forward / 1e12, rel=1e-3)
    assert results["network_precision"] == {"classifier fit": "float32", "predict": "float32"}
    assert set(results["efficiency"]) == {"dictionary", "encoding", "classifier fit", "predict",
                                          "end to end"}
    assert "TFLOP of network products in classifier fit (float32)" in (
        out / "results.md").read_text()


def test_reduced_precision_stages_are_held_to_their_own_rate(tmp_path, archive, monkeypatch):
    import featlearn._torch as ft
    import featlearn.reproduce as fr

    monkeypatch.setattr(ft, "has_fast_bfloat16", lambda device: True)
    monkeypatch.setattr(ft, "has_fast_int8", lambda device: True)
    rates = {torch.float32: 100.0, torch.bfloat16: 400.0, torch.int8: 800.0}
    monkeypatch.setattr(ft, "gemm_rate", lambda n=0, repeats=0, device="cpu",
                        dtype=torch.float32: rates[dtype])
    # The stage seconds in results.json are rounded to 0.01 s and a tiny run's are a few
    # hundredths, so the ratio is checked on the unrounded figures the run itself used.
    seen, efficiency = [], fr.efficiency

    def spy(gemm_seconds, seconds):
        seen.append((dict(gemm_seconds), dict(seconds)))
        return efficiency(gemm_seconds, seconds)

    monkeypatch.setattr(fr, "efficiency", spy)
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps({"name": "bf16", "params": TINY | {
        "encoder__precision": "bfloat16", "encoder__kmeans__precision": "int8"}}))
    out = tmp_path / "out"
    assert reproduce(path, archive, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["gemm_gflops"], results["gemm_gflops_bfloat16"],
            results["gemm_gops_int8"]) == (100.0, 400.0, 800.0)
    assert results["distance_precision"] == {"k-means": "int8", "encoding": "bfloat16"}
    (gemm_s, seconds), = seen
    # each part's products take their FLOPs at their own precision's rate, not float32's
    assert gemm_s["encoding"] == pytest.approx(
        results["distance_tflop"]["encoding"] * 1e12 / 400e9, rel=0.01)
    assert gemm_s["k-means"] == pytest.approx(
        results["distance_tflop"]["k-means"] * 1e12 / 800e9, rel=0.01)
    enc_s = seconds["encode train"] + seconds["encode test"]
    assert results["efficiency"]["encoding"] == pytest.approx(gemm_s["encoding"] / enc_s,
                                                              rel=0.01)
    text = (out / "results.md").read_text()
    assert ("GEMM rates measured in this run: float32 100.0 GFLOP/s, bfloat16 400.0 GFLOP/s, "
            "int8 800.0 GOP/s" in text)
    assert "TFLOP in encoding (bfloat16)" in text and "TFLOP in k-means (int8)" in text



def test_without_a_cache_the_test_split_is_encoded_after_the_classifier_is_fitted(tmp_path,
                                                                                   monkeypatch):
    """One split's features in memory at a time (the peak of the large configurations), and
    the same accuracies as through a cache, which encodes both splits first."""
    import numpy as np

    from featlearn.classifier import TorchMLPClassifier
    from featlearn.encoding import PatchEncoder
    from featlearn.reproduce import run

    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8),
            "y_train": np.arange(60) % 3,
            "X_test": rng.integers(0, 256, (20, 12, 12, 3), dtype=np.uint8),
            "y_test": np.arange(20) % 3, "target_names": ["a", "b", "c"], "archive": "x"}
    config = {"name": "tiny", "params": TINY}
    events = []
    transform = PatchEncoder.transform

    def spy(self, X):
        events.append(f"encode {len(X)}")
        return transform(self, X)

    def spy_fit(self, X, y, **kw):
        events.append(f"fit {len(X)}")
        return fit(self, X, y, **kw)

    fit = TorchMLPClassifier.fit
    monkeypatch.setattr(PatchEncoder, "transform", spy)
    monkeypatch.setattr(TorchMLPClassifier, "fit", spy_fit)
    plain, model = run(config, data, verbose=0)
    assert events == ["encode 60", "fit 60", "encode 20"]
    assert set(plain["stage_seconds"]) >= {"encode train", "classifier fit", "encode test",
                                           "predict"}
    assert model.named_steps["encoder"].kmeans_ is not None
    cached, _ = run(config, data, cache=tmp_path / "cache", verbose=0)
    assert (plain["test_accuracy"], plain["train_accuracy"]) == (cached["test_accuracy"],
                                                                 cached["train_accuracy"])
