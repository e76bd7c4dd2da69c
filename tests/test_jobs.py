"""Cached, resumable feature extraction (featlearn.jobs) and the fit/extract commands."""

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin

import featlearn.extraction as jobs
from featlearn.extraction import ExtractionError, extract_features
from featlearn.fingerprints import model_fingerprint
from featlearn.persistence import load_model, save_model

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def tiny_encoder(images, seed=0):
    """A small real PatchEncoder (3x3 patches, K=8) fitted on ``images``."""
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    enc = PatchEncoder(patch_size=3, n_patches=500, device="cpu", random_state=seed,
                       kmeans=MiniBatchKMeans(n_clusters=8, random_state=seed, device="cpu"))
    return enc.fit(images)


class Slow(TransformerMixin, BaseEstimator):
    """Wraps a fitted encoder and sleeps per call, so a job is slow enough to be killed mid-run."""

    def __init__(self, encoder=None, delay=0.2):
        self.encoder = encoder
        self.delay = delay

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        time.sleep(self.delay)
        return self.encoder.transform(X)


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(60, 8, 8, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def encoder(images):
    return tiny_encoder(images, seed=0)


@pytest.fixture(scope="module")
def expected(encoder, images):
    return np.concatenate([encoder.transform(images[i:i + 7]) for i in range(0, len(images), 7)])


@pytest.fixture
def count_chunks(monkeypatch):
    """Count the chunks actually encoded (in-process backends only)."""
    calls = []
    original = jobs._encode_chunk

    def counting(encoder, chunk, flip, index):
        calls.append(index)
        return original(encoder, chunk, flip, index)

    monkeypatch.setattr(jobs, "_encode_chunk", counting)
    return calls


def read_manifest(out):
    return json.loads(Path(str(out) + ".manifest.json").read_text())


# -- basic behaviour -----------------------------------------------------------------------------

def test_chunked_memmap_output_matches_transform(encoder, images, expected, tmp_path, count_chunks):
    src = tmp_path / "images.npy"
    np.save(src, images)
    X = np.load(src, mmap_mode="r")
    out = tmp_path / "features.npy"
    F = extract_features(encoder, X, out, batch_size=7, verbose=0)
    assert isinstance(F, np.memmap) and not F.flags.writeable
    assert F.shape == expected.shape and F.dtype == np.float32
    np.testing.assert_array_equal(F, expected)
    np.testing.assert_allclose(F, encoder.transform(images), rtol=1e-5, atol=1e-5)
    assert sorted(count_chunks) == list(range(9))  # 60 images / 7 per chunk, each encoded once
    m = read_manifest(out)
    assert m["complete"] and m["n_chunks"] == 9 and len(m["chunks"]) == 9
    assert not Path(str(out) + ".partial").exists()


def test_auto_batch_size_and_flip(encoder, images, tmp_path):
    out = tmp_path / "flip.npy"
    F = extract_features(encoder, images, out, flip=True, verbose=0)
    assert read_manifest(out)["n_chunks"] >= 2
    np.testing.assert_allclose(F, encoder.transform(images[:, :, ::-1]), rtol=1e-5, atol=1e-5)


def test_finished_job_is_a_noop(encoder, images, expected, tmp_path, monkeypatch, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    mtime = out.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a finished job must not encode anything")

    monkeypatch.setattr(jobs, "_encode_chunk", boom)
    monkeypatch.setattr(encoder, "transform", boom)  # an instance attribute: not fitted state
    t0 = time.perf_counter()
    F = extract_features(encoder, images, out, batch_size="auto")
    assert time.perf_counter() - t0 < 2
    np.testing.assert_array_equal(F, expected)
    assert out.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().err


def test_reloaded_model_keeps_its_cache(encoder, images, tmp_path, count_chunks):
    """The fingerprint survives a save/load round trip (joblib.hash of torch tensors does not)."""
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    save_model(encoder, tmp_path / "m.joblib")
    reloaded = load_model(tmp_path / "m.joblib")
    assert model_fingerprint(reloaded) == model_fingerprint(encoder)
    n = len(count_chunks)
    extract_features(reloaded, images, out, batch_size=7, verbose=0)
    assert len(count_chunks) == n


def test_stale_model_is_recomputed(encoder, images, tmp_path, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    other = tiny_encoder(images, seed=1)
    F = extract_features(other, images, out, batch_size=7)
    assert "model (its fitted state) differs" in capsys.readouterr().err
    np.testing.assert_allclose(F, other.transform(images), rtol=1e-5, atol=1e-5)
    assert not np.allclose(F, encoder.transform(images))


def test_stale_data_is_recomputed(encoder, images, tmp_path, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    changed = images.copy()
    changed[5, 2, 2, 0] ^= 0xFF  # one byte
    F = extract_features(encoder, changed, out, batch_size=7)
    assert "input images differ" in capsys.readouterr().err
    np.testing.assert_allclose(F, encoder.transform(changed), rtol=1e-5, atol=1e-5)


def test_changed_batch_size_is_recomputed(encoder, images, tmp_path, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    extract_features(encoder, images, out, batch_size=20)
    assert "batch_size changed from 7 to 20" in capsys.readouterr().err
    assert read_manifest(out)["chunk_size"] == 20


# -- damage and crashes --------------------------------------------------------------------------

def test_corrupt_output_chunk_is_recomputed(encoder, images, expected, tmp_path, capsys, count_chunks):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    F = np.load(out, mmap_mode="r+")
    F[30, 3] += 1.0  # row 30 lies in chunk 4 (rows 28..34)
    F.flush()
    del F
    count_chunks.clear()
    G = extract_features(encoder, images, out, batch_size=7)
    assert "1 finished chunk(s) fail their checksum (4)" in capsys.readouterr().err
    assert count_chunks == [4]
    np.testing.assert_array_equal(G, expected)


def test_truncated_output_is_recomputed(encoder, images, expected, tmp_path, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    with open(out, "r+b") as fh:
        fh.truncate(out.stat().st_size - 100)
    G = extract_features(encoder, images, out, batch_size=7)
    assert "corrupt or truncated" in capsys.readouterr().err
    np.testing.assert_array_equal(G, expected)


@pytest.mark.parametrize("damage", ["garbage", "edited", "empty"])
def test_corrupt_manifest_is_recomputed(encoder, images, expected, tmp_path, capsys, damage):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    mpath = Path(str(out) + ".manifest.json")
    if damage == "garbage":
        mpath.write_bytes(b"\x00{not json")
    elif damage == "edited":  # valid JSON claiming another chunk size: caught by its checksum
        m = json.loads(mpath.read_text())
        m["chunk_size"] = 6
        mpath.write_text(json.dumps(m))
    else:
        mpath.write_text("")
    G = extract_features(encoder, images, out, batch_size=7)
    assert "manifest.json is corrupt" in capsys.readouterr().err
    np.testing.assert_array_equal(G, expected)
    assert read_manifest(out)["complete"]


def test_crash_between_write_and_mark_resumes(encoder, images, expected, tmp_path, monkeypatch,
                                              count_chunks):
    """Dying after a chunk's bytes are written but before the manifest lists it loses that chunk only."""
    out = tmp_path / "f.npy"
    original = jobs._write_manifest
    calls = []

    def dying(path, state):
        calls.append(len(state["chunks"]))
        if len(state["chunks"]) == 4:
            raise KeyboardInterrupt  # stands in for kill -9 before the rename
        original(path, state)

    monkeypatch.setattr(jobs, "_write_manifest", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    monkeypatch.setattr(jobs, "_write_manifest", original)
    m = read_manifest(out)
    assert len(m["chunks"]) == 3 and not m["complete"] and not out.exists()
    count_chunks.clear()
    G = extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert len(count_chunks) == 6
    np.testing.assert_array_equal(G, expected)


def test_crash_between_rename_and_completion(encoder, images, expected, tmp_path, monkeypatch,
                                             count_chunks):
    out = tmp_path / "f.npy"
    original = jobs._write_manifest

    def dying(path, state):
        if state["complete"]:
            raise KeyboardInterrupt
        original(path, state)

    monkeypatch.setattr(jobs, "_write_manifest", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    monkeypatch.setattr(jobs, "_write_manifest", original)
    assert out.exists() and not read_manifest(out)["complete"]
    count_chunks.clear()
    G = extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert count_chunks == []
    np.testing.assert_array_equal(G, expected)
    assert read_manifest(out)["complete"]


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return subprocess.Popen([sys.executable, "-m", "featlearn.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _done_chunks(out):
    try:
        return read_manifest(out)
    except (OSError, ValueError):
        return None


def test_kill_9_and_resume_gives_identical_output(encoder, images, expected, tmp_path):
    model = tmp_path / "slow.joblib"
    save_model(Slow(encoder, delay=0.25), model)
    src = tmp_path / "images.npy"
    np.save(src, images)
    out = tmp_path / "features.npy"
    args = ["extract", "--model", model, "--data", src, "--out", out, "--batch-size", 7]
    seen = 0
    for attempt in range(2):  # kill twice, at different points
        proc = _cli(*args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = _done_chunks(out)
            if m is not None and len(m["chunks"]) > seen and not m["complete"]:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        m = read_manifest(out)
        assert not m["complete"] and 1 <= len(m["chunks"]) < m["n_chunks"]
        assert not out.exists()  # only the finished job appears under the output's name
        seen = len(m["chunks"])
    proc = _cli(*args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    done = re.search(r"encoded (\d+) of 60 images \((\d+) reused\)", err)
    assert done, err
    assert int(done.group(2)) >= 7 * seen and int(done.group(1)) + int(done.group(2)) == 60
    np.testing.assert_array_equal(np.load(out), expected)


# -- write failures ------------------------------------------------------------------------------

def test_disk_full_while_writing_keeps_finished_chunks_only(encoder, images, expected, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "f.npy"
    original = jobs._write_chunk
    written = []

    def full(mm, fd, start, Z):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(start)
        original(mm, fd, start, Z)

    monkeypatch.setattr(jobs, "_write_chunk", full)
    with pytest.raises(ExtractionError, match="No space left on device.*3 finished chunk") as info:
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert info.value.errno == errno.ENOSPC
    m = read_manifest(out)
    assert sorted(int(i) * 7 for i in m["chunks"]) == sorted(written) and not m["complete"]
    monkeypatch.setattr(jobs, "_write_chunk", original)
    np.testing.assert_array_equal(extract_features(encoder, images, out, batch_size=7, verbose=0),
                                  expected)


def test_disk_full_at_allocation_is_a_clear_error(encoder, images, tmp_path, monkeypatch):
    out = tmp_path / "f.npy"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(ExtractionError, match="cannot create .*No space left"):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert read_manifest(out)["chunks"] == {}
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory_is_a_clear_error(encoder, images, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExtractionError, match="not writable"):
            extract_features(encoder, images, ro / "f.npy", verbose=0)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_unwritable_output_is_a_clear_error(encoder, images, tmp_path, monkeypatch):
    """What a read-only filesystem does even to root: the output cannot be created."""
    out = tmp_path / "f.npy"

    def denied(*a, **k):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(np.lib.format, "open_memmap", denied)
    with pytest.raises(ExtractionError, match="cannot create .*Read-only file system"):
        extract_features(encoder, images, out, verbose=0)
    assert read_manifest(out)["chunks"] == {}
    with pytest.raises(ExtractionError, match="does not exist"):
        extract_features(encoder, images, tmp_path / "missing" / "f.npy", verbose=0)


def test_concurrent_job_on_the_same_output_is_refused(encoder, images, tmp_path):
    out = tmp_path / "f.npy"
    fd = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ExtractionError, match="another extraction job"):
            extract_features(encoder, images, out, verbose=0)
    finally:
        os.close(fd)


# -- distribution and progress -------------------------------------------------------------------

def test_parallel_chunks_on_dask_match_sequential(encoder, images, expected, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    writes = []
    original = jobs._write_chunk

    def recording(mm, fd, start, Z):
        writes.append(start)
        original(mm, fd, start, Z)

    monkeypatch.setattr(jobs, "_write_chunk", recording)
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None):
        with joblib.parallel_config(backend="dask"):
            F = extract_features(encoder, images, tmp_path / "dask.npy", batch_size=7, verbose=0)
    np.testing.assert_array_equal(F, expected)
    assert sorted(writes) == list(range(0, 60, 7))  # every chunk written once, by the parent
    G = extract_features(encoder, images, tmp_path / "threads.npy", batch_size=7, n_jobs=2,
                         verbose=0)
    np.testing.assert_array_equal(G, expected)


def test_progress_and_summary(encoder, images, tmp_path, capsys):
    extract_features(encoder, images, tmp_path / "f.npy", batch_size=7)
    err = capsys.readouterr().err
    assert "extract" in err and "60/60" in err
    summary = err.strip().splitlines()[-1]
    assert "encoded 60 of 60 images in" in summary and "images/s" in summary
    assert "GFLOP/s" in summary and "f.npy (60 x" in summary


# -- saved models and the command line -----------------------------------------------------------

def test_model_saved_by_another_version_warns(encoder, tmp_path):
    path = tmp_path / "m.joblib"
    meta = save_model(encoder, path, config={"name": "x"})
    assert {"featlearn", "torch", "sklearn", "saved_at"} <= set(meta)
    blob = joblib.load(path)
    blob["metadata"]["featlearn"] = "0.0.1"
    joblib.dump(blob, path)
    with pytest.warns(UserWarning, match="saved by featlearn 0.0.1.*loaded by featlearn"):
        model, meta = load_model(path, return_metadata=True)
    assert meta["config"] == {"name": "x"}


def test_model_pickled_before_a_parameter_existed_loads(encoder, tmp_path):
    old = Slow(encoder, delay=0.0)
    del old.delay  # as if Slow had gained ``delay`` after this model was saved
    save_model(old, tmp_path / "m.joblib")
    model = load_model(tmp_path / "m.joblib")
    assert model_fingerprint(model) == model_fingerprint(old)
    assert model_fingerprint(model) != model_fingerprint(Slow(encoder, delay=0.0))


def test_cuda_device_is_switched_to_cpu_without_cuda(encoder, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "m.joblib"
    save_model(Slow(encoder), path)
    blob = joblib.load(path)
    blob["model"].encoder.set_params(device="cuda:0")
    joblib.dump(blob, path)
    with pytest.warns(UserWarning, match="CUDA is not available here; using device='cpu'"):
        model = load_model(path)
    assert model.encoder.device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_gpu_fitted_model_loads_on_cpu(images, tmp_path):
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    enc = PatchEncoder(patch_size=3, n_patches=500, device="cuda", random_state=0,
                       kmeans=MiniBatchKMeans(n_clusters=8, random_state=0, device="cuda"))
    enc.fit(images)
    save_model(enc, tmp_path / "gpu.joblib")
    np.save(tmp_path / "x.npy", images)
    code = ("import sys, numpy as np, warnings; from featlearn.persistence import load_model; "
            f"m = load_model({str(tmp_path / 'gpu.joblib')!r}); "
            f"np.save({str(tmp_path / 'cpu.npy')!r}, m.transform(np.load({str(tmp_path / 'x.npy')!r})))")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cpu.npy"), enc.transform(images), rtol=1e-4,
                               atol=1e-4)


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
                 "--flip", "--quiet"]) == 0
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
