"""benchmarks/peer_scattering.py: the scattering features' shape, and a clean skip without kymatio."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_ARCHIVE, SHARED_MD5

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def peer(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("peer_scattering",
                                                  BENCHMARKS / "peer_scattering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scatter_gives_81_maps_of_8x8_per_channel(peer):
    if peer.scattering_class() is None:
        pytest.skip("kymatio is not installed")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    F = peer.scatter(images, batch=2)  # two batches
    assert F.shape == (3, 3 * 81 * 8 * 8) and F.dtype == np.float32
    assert np.isfinite(F).all()
    # Per-channel: a channel set to zero zeroes its own block of coefficients only.
    images[:, :, :, 1] = 0
    G = peer.scatter(images).reshape(3, 3, -1)
    assert np.all(G[:, 1] == 0) and np.all(G[:, 0] > 0)
    np.testing.assert_allclose(G[:, 0], F.reshape(3, 3, -1)[:, 0], rtol=1e-5)


def test_quick_run_without_kymatio_skips_its_rows(peer, monkeypatch, tmp_path, capsys):
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    monkeypatch.setattr(peer, "scattering_class", lambda: None)
    out = tmp_path / "peer.md"
    rows = peer.main(["--quick", "--data", str(SHARED_ARCHIVE), "--md5", SHARED_MD5,
                      "--data-home", str(tmp_path / "data"), "--out", str(out)])
    assert [r["classifier"] for r in rows] == ["L2-SVM C=100", "MLP 512, 2 epochs"]
    assert all(r["features"].startswith("featlearn coates2011-1600-svm") for r in rows)
    assert all(r["n_features"] == 4 * 32 and 0 <= r["accuracy"] <= 1 for r in rows)
    text = out.read_text()
    assert text.startswith("# Peer: wavelet scattering (kymatio) beside featlearn (QUICK")
    assert "kymatio is not installed" in text and "scattering rows were skipped" in text
    assert "GFLOP/s" in text and "| featlearn coates2011-1600-svm" in text
    assert "kymatio is not installed" in capsys.readouterr().out
