"""Cached, resumable feature extraction (featlearn.extraction): caching, damage, crashes, kills,
write failures, what it refuses to overwrite, and the worker processes it must not leak."""

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

import featlearn._manifest as manifests
import featlearn.extraction as jobs
from featlearn._io import OutputExistsError
from featlearn.extraction import ExtractionError, extract_features
from featlearn.fingerprints import model_fingerprint
from featlearn.persistence import load_model, save_model

from conftest import Slow, tiny_encoder

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture
def count_chunks(monkeypatch):
    """Count the chunks actually encoded (in-process backends only)."""
    calls = []
    original = jobs._encode_chunk

    def counting(encoder, chunk, mirror, index, *args):
        calls.append(index)
        return original(encoder, chunk, mirror, index, *args)

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


def test_auto_batch_size_and_mirror(encoder, images, tmp_path):
    out = tmp_path / "mirror.npy"
    F = extract_features(encoder, images, out, mirror=True, verbose=0)
    assert read_manifest(out)["n_chunks"] >= 2
    np.testing.assert_allclose(F, encoder.transform(images[:, :, ::-1]), rtol=1e-5, atol=1e-5)


def test_finished_job_is_a_noop(encoder, images, expected, tmp_path, monkeypatch, capsys):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    mtime = out.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a finished job must not encode anything")

    monkeypatch.setattr(jobs, "_encode_chunk", boom)
    monkeypatch.setitem(vars(encoder), "transform", boom)  # instance attr, removed after
    F = extract_features(encoder, images, out, batch_size="auto")  # would raise if it encoded
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


def test_changed_feature_code_is_recomputed(encoder, images, tmp_path, capsys, monkeypatch,
                                            count_chunks):
    # The same cache policy as featlearn reproduce: new feature code never reuses old features.
    import featlearn.fingerprints

    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    count_chunks.clear()
    monkeypatch.setattr(featlearn.fingerprints, "code_fingerprint", lambda: "changed")
    extract_features(encoder, images, out, batch_size=7)
    assert "feature code differs" in capsys.readouterr().err
    assert len(count_chunks) == read_manifest(out)["n_chunks"]


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
    original = manifests.write
    calls = []

    def dying(path, state):
        calls.append(len(state["chunks"]))
        if len(state["chunks"]) == 4:
            raise KeyboardInterrupt  # stands in for kill -9 before the rename
        original(path, state)

    monkeypatch.setattr(manifests, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    monkeypatch.setattr(manifests, "write", original)
    m = read_manifest(out)
    assert len(m["chunks"]) == 3 and not m["complete"] and not out.exists()
    count_chunks.clear()
    G = extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert len(count_chunks) == 6
    np.testing.assert_array_equal(G, expected)


def test_crash_between_rename_and_completion(encoder, images, expected, tmp_path, monkeypatch,
                                             count_chunks):
    out = tmp_path / "f.npy"
    original = manifests.write

    def dying(path, state):
        if state["complete"]:
            raise KeyboardInterrupt
        original(path, state)

    monkeypatch.setattr(manifests, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    monkeypatch.setattr(manifests, "write", original)
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
    save_model(Slow(encoder, delay=0.25), model, format="pickle")  # Slow: not in the safe format
    src = tmp_path / "images.npy"
    np.save(src, images)
    out = tmp_path / "features.npy"
    args = ["extract", "--model", model, "--allow-pickle", "--data", src, "--out", out,
            "--batch-size", 7]
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




# -- what extraction refuses to overwrite ----------------------------------------------------------

def test_foreign_output_is_refused_unless_overwrite(encoder, images, expected, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    with pytest.raises(OutputExistsError, match="not written by featlearn.*--force"):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert out.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    # a manifest of another output does not make it ours
    Path(str(out) + ".manifest.json").write_text(json.dumps({"output": "other.npy"}))
    with pytest.raises(OutputExistsError):
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    assert out.read_text() == "my notes"
    F = extract_features(encoder, images, out, batch_size=7, overwrite=True, verbose=0)
    np.testing.assert_array_equal(F, expected)


def test_output_equal_to_an_input_is_always_refused(encoder, images, tmp_path):
    src = tmp_path / "images.npy"
    np.save(src, images)
    before = src.read_bytes()
    X = np.load(src, mmap_mode="r")
    for kw in ({}, {"overwrite": True}):  # the memmap's own file is an input automatically
        with pytest.raises(OutputExistsError, match="is also an input"):
            extract_features(encoder, X, src, verbose=0, **kw)
    model = tmp_path / "model.joblib"
    model.write_bytes(b"model bytes")
    with pytest.raises(OutputExistsError, match="is also an input"):
        extract_features(encoder, images, tmp_path / "." / "model.joblib", inputs=[model],
                         overwrite=True, verbose=0)
    assert src.read_bytes() == before and model.read_bytes() == b"model bytes"


def _snapshot(out):
    return out.read_bytes(), Path(str(out) + ".manifest.json").read_bytes()


@pytest.mark.parametrize("problem", ["image size", "channels first", "nan", "float32 overflow",
                                     "unfitted", "device", "no transform", "bad batch_size"])
def test_bad_rerun_leaves_the_previous_result_intact(encoder, images, tmp_path, problem):
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    before = _snapshot(out)
    enc, X, kw, error = encoder, images, {"batch_size": 7}, ValueError
    if problem == "image size":
        X = np.zeros((10, 5, 5, 3), np.uint8)  # 3x3 patches fit, but the model wants 8x8x3
    elif problem == "channels first":
        X = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    elif problem == "nan":
        X = images.astype(np.float64)
        X[3, 1, 1, 1] = np.nan
    elif problem == "float32 overflow":
        X = images.astype(np.float64)
        X[3, 1, 1, 1] = 1e300
    elif problem == "unfitted":
        enc, error = clone(encoder), NotFittedError
    elif problem == "device":
        enc = clone(encoder).set_params(device="bogus")
        enc.__dict__.update({k: v for k, v in vars(encoder).items() if k.endswith("_")})
    elif problem == "no transform":
        enc = object()
    else:
        kw = {"batch_size": 0}
    with pytest.raises(error):
        extract_features(enc, X, out, verbose=0, **kw)
    assert _snapshot(out) == before
    assert not Path(str(out) + ".partial").exists()


def test_previous_result_survives_until_the_new_one_is_complete(encoder, images, expected,
                                                                  tmp_path, monkeypatch):
    out = tmp_path / "f.npy"
    extract_features(encoder, images, out, batch_size=7, verbose=0)
    before = out.read_bytes()
    other = tiny_encoder(images, seed=1)
    original = manifests.write

    def dying(path, state):
        if len(state["chunks"]) == 3:
            raise KeyboardInterrupt  # stands in for a kill in the middle of the new job
        original(path, state)

    monkeypatch.setattr(manifests, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(other, images, out, batch_size=7, verbose=0)
    assert out.read_bytes() == before  # the old result is still there, whole
    monkeypatch.setattr(manifests, "write", original)
    F = extract_features(other, images, out, batch_size=7, verbose=0)  # resumes the new job
    np.testing.assert_allclose(F, other.transform(images), rtol=1e-5, atol=1e-5)
    assert not Path(str(out) + ".partial").exists()


def test_files_follow_the_umask(encoder, images, tmp_path):
    old = os.umask(0o077)
    try:
        out = tmp_path / "f.npy"
        extract_features(encoder, images, out, batch_size=7, verbose=0)
    finally:
        os.umask(old)
    for p in (out, Path(str(out) + ".manifest.json"), Path(str(out) + ".lock")):
        assert p.stat().st_mode & 0o777 == 0o600, p


def test_kill_during_manifest_write_leaves_nothing_a_rerun_keeps(encoder, images, expected,
                                                                 tmp_path):
    """A SIGKILL inside the manifest's atomic write leaves a temporary; the next run removes it."""
    src, model, out = tmp_path / "x.npy", tmp_path / "m.joblib", tmp_path / "f.npy"
    np.save(src, images)
    save_model(encoder, model)
    code = ("import json, os, signal, sys, numpy as np, featlearn.extraction as ex\n"
            "from featlearn.persistence import load_model\n"
            "real = json.dump\n"
            "def dump(obj, fh, **kw):\n"
            "    if len(obj['chunks']) == 2:\n"
            "        fh.write('{\"half'); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(obj, fh, **kw)\n"
            "json.dump = dump\n"
            f"ex.extract_features(load_model({str(model)!r}), np.load({str(src)!r}), "
            f"{str(out)!r}, batch_size=7, verbose=0)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".featlearn-tmp")]
    assert leftovers and read_manifest(out)["chunks"].keys() == {"0"}
    F = extract_features(encoder, np.load(src), out, batch_size=7, verbose=0)
    np.testing.assert_array_equal(F, expected)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".featlearn-tmp")]


# -- worker processes never outlive the job ---------------------------------------------------------

def _cmdline(psutil, process) -> str:
    """A child's command line, or "" for one that exited meanwhile: a short-lived helper (the C
    compiler a worker runs to build the native kernels) can be a zombie by the time it is read."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _wait_for_workers(proc, n, timeout=120):
    psutil = pytest.importorskip("psutil")
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        kids = [k for k in parent.children(recursive=True) if k.is_running()]
        workers = [k for k in kids if any(w in _cmdline(psutil, k) for w in ("loky", "joblib"))]
        if len(workers) >= n and _done_chunks_count(proc.out) >= 1:
            return kids
        time.sleep(0.1)
    raise AssertionError("the workers did not start")


def _running(psutil, proc):
    """Whether `proc` still runs: an orphaned worker that exited stays a zombie until PID 1 reaps
    it, which in a container may be never; it holds no resources and runs no code."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _done_chunks_count(out):
    try:
        return len(read_manifest(out)["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_parallel_job_leaves_no_worker_alive(encoder, tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    rng = np.random.RandomState(1)
    src, model, out = tmp_path / "x.npy", tmp_path / "slow.joblib", tmp_path / "f.npy"
    np.save(src, rng.randint(0, 256, size=(400, 8, 8, 3)).astype(np.uint8))
    save_model(Slow(encoder, delay=0.3), model, format="pickle")
    # Ctrl-C as a terminal delivers it: a process started with SIGINT ignored (a background
    # job of a non-interactive shell, e.g. a CI script run with `&`) rightly keeps ignoring it,
    # finishes the job and exits 0, which is not what this test is about.
    proc = _cli("extract", "--model", model, "--allow-pickle", "--data", src, "--out", out,
                "--batch-size", 4, "--n-jobs", 2, "-q", preexec_fn=_default_sigint)
    proc.out = out
    try:
        kids = _wait_for_workers(proc, 2)
    except BaseException:
        proc.kill()
        raise
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)  # not communicate(): a surviving worker would hold the pipes open
    gone, alive = psutil.wait_procs(kids, timeout=30)
    alive = [p for p in alive if _running(psutil, p)]
    for p in alive:  # clean up before failing
        p.kill()
    assert not alive, [p.cmdline() for p in alive]
    _, err = proc.communicate(timeout=10)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "featlearn extract: error: interrupted" in err.splitlines(), err


def test_files_kept_beside_the_output_are_never_an_input(encoder, images, tmp_path):
    src = tmp_path / "f.npy.partial"
    with open(src, "wb") as fh:  # np.save(path) would append ".npy"
        np.save(fh, images)
    before = src.read_bytes()
    with pytest.raises(OutputExistsError, match="kept beside output"):
        extract_features(encoder, np.load(src, mmap_mode="r"), tmp_path / "f.npy", overwrite=True,
                         verbose=0)
    assert src.read_bytes() == before
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(ExtractionError, match="is a folder"):
        extract_features(encoder, images, tmp_path / "dir.npy", overwrite=True, verbose=0)


def test_a_worker_orphaned_before_its_first_chunk_exits_and_others_are_left_alone(tmp_path):
    """A worker still starting up when its parent was SIGKILLed reads a queued chunk with no
    parent left: it must exit then, not wait for joblib's idle timeout; a worker whose "parent"
    is alive but not its parent (a Dask worker) goes on."""
    import subprocess
    import sys

    from featlearn.extraction import _process_identity

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_identity = _process_identity(gone.pid)  # while it runs, or as a zombie: "exited"
    gone.wait()
    code = ("import sys; from featlearn.extraction import _watch_parent; "
            "_watch_parent(({!r}, {}, {!r})); sys.exit(0)")
    dead = list(gone_identity[:2]) + ["0" if gone_identity[2] in (None, "exited")
                                      else gone_identity[2]]
    run = subprocess.run([sys.executable, "-c", code.format(*dead)], timeout=120)
    assert run.returncode == 1
    alive = _process_identity(1)  # alive, and not the subprocess's parent
    run = subprocess.run([sys.executable, "-c", code.format(*alive)], timeout=120)
    assert run.returncode == 0
