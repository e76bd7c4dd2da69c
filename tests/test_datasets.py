import hashlib
import http.server
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest

from featlearn.datasets import ChecksumError, DatasetError, fetch_cifar10

from conftest import SHARED_ARCHIVE, cifar_members, write_cifar_archive


# -- the shared archive ----------------------------------------------------------------------------

def test_shared_archive_shapes_and_counts(cifar10):
    d = cifar10
    assert d.X_train.shape == (50000, 32, 32, 3) and d.X_train.dtype == np.uint8
    assert d.X_test.shape == (10000, 32, 32, 3) and d.X_test.dtype == np.uint8
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert np.bincount(d.y_train).tolist() == [5000] * 10
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert d.target_names[0] == "airplane" and d.target_names[-1] == "truck"


def test_shared_archive_wrong_md5_is_rejected(tmp_path):
    if not SHARED_ARCHIVE.exists():
        pytest.skip("shared archive absent")
    with pytest.raises(ChecksumError, match="md5"):
        fetch_cifar10(tmp_path, archive=SHARED_ARCHIVE)  # default md5 is the official one


# -- a tiny synthetic archive with the official layout ---------------------------------------------

def make_archive(path, n=4, drop=None, mutate=None):
    members = cifar_members(n)
    if mutate:
        mutate(members)
    write_cifar_archive(path, members, drop=drop)
    return members


def md5_of(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_synthetic_archive_layout_is_hwc(tmp_path):
    arc = tmp_path / "c.tar.gz"
    members = make_archive(arc)
    d = fetch_cifar10(tmp_path / "home", archive=arc, md5=md5_of(arc))
    assert d.X_train.shape == (20, 32, 32, 3) and d.X_test.shape == (4, 32, 32, 3)
    raw = members["data_batch_1"][b"data"][1]
    # channel 0 is the first 1024 bytes (red plane, row-major)
    np.testing.assert_array_equal(d.X_train[1, :, :, 0].ravel(), raw[:1024])
    np.testing.assert_array_equal(d.X_train[1, 3, 5], raw[[3 * 32 + 5, 1024 + 3 * 32 + 5, 2048 + 3 * 32 + 5]])
    assert d.y_train[:4].tolist() == members["data_batch_1"][b"labels"]
    assert d.target_names == [f"c{i}" for i in range(10)]


def test_cache_makes_second_call_fast_and_identical(tmp_path):
    arc = tmp_path / "c.tar.gz"
    make_archive(arc, n=200)
    home = tmp_path / "home"
    a = fetch_cifar10(home, archive=arc, md5=None)
    assert list(home.glob("cifar10-*.npz"))
    b = fetch_cifar10(home, archive=arc, md5=None)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    # a damaged cache is rebuilt, not fatal
    for f in home.glob("cifar10-*.npz"):
        f.write_bytes(b"garbage")
    c = fetch_cifar10(home, archive=arc, md5=None)
    np.testing.assert_array_equal(a.X_train, c.X_train)


def test_extracted_folder_is_read_in_place(tmp_path):
    arc = tmp_path / "c.tar.gz"
    make_archive(arc)
    with tarfile.open(arc) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    a = fetch_cifar10(tmp_path / "h1", archive=arc, md5=None)
    for folder in (tmp_path / "x", tmp_path / "x" / "cifar-10-batches-py"):
        b = fetch_cifar10(tmp_path / "h2", archive=folder)
        np.testing.assert_array_equal(a.X_train, b.X_train)


@pytest.mark.parametrize("problem, match", [
    ("missing", "missing CIFAR-10 batch"),
    ("truncated", "truncated or not a valid"),
    ("not_tar", "truncated or not a valid"),
    ("bad_pickle", "corrupt"),
    ("bad_shape", "expected \\(n, 3072\\) uint8"),
    ("label_count", "labels"),
])
def test_corrupt_archives_give_clear_errors(tmp_path, problem, match):
    arc = tmp_path / "c.tar.gz"
    if problem == "missing":
        make_archive(arc, drop="data_batch_3")
    elif problem == "truncated":
        make_archive(arc, n=300)
        blob = arc.read_bytes()
        arc.write_bytes(blob[: len(blob) // 2])
    elif problem == "not_tar":
        arc.write_bytes(b"this is not an archive" * 100)
    elif problem == "bad_pickle":
        make_archive(arc, mutate=lambda m: m.__setitem__("test_batch", b"\x80\x02garbage"))
    elif problem == "bad_shape":
        make_archive(arc, mutate=lambda m: m["data_batch_2"].__setitem__(
            b"data", np.zeros((4, 100), np.uint8)))
    elif problem == "label_count":
        make_archive(arc, mutate=lambda m: m["data_batch_2"].__setitem__(b"labels", [1, 2]))
    with pytest.raises(DatasetError, match=match):
        fetch_cifar10(tmp_path / "home", archive=arc, md5=None)


def test_missing_local_archive(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        fetch_cifar10(tmp_path, archive=tmp_path / "nope.tar.gz")


# -- the download path, against a server on 127.0.0.1 ---------------------------------------------

class _Server:
    """Serves one payload; ``drop_first`` requests are cut off half-way (connection dropped)."""

    def __init__(self, payload, drop_first=0):
        self.payload, self.drop_first, self.requests = payload, drop_first, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                if outer.requests <= outer.drop_first:
                    self.wfile.write(outer.payload[: len(outer.payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(outer.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(tmp_path):
    arc = tmp_path / "src.tar.gz"
    make_archive(arc, n=200)
    return arc.read_bytes()


def test_download_success_and_reuse(tmp_path, payload):
    srv = _Server(payload)
    try:
        md5 = hashlib.md5(payload).hexdigest()
        d = fetch_cifar10(tmp_path, url=srv.url, md5=md5)
        assert d.X_train.shape == (1000, 32, 32, 3)
        assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == payload
        assert not list(tmp_path.glob("*.part"))
        fetch_cifar10(tmp_path, url=srv.url, md5=md5)
        assert srv.requests == 1  # the verified file is reused
    finally:
        srv.close()


def test_download_checksum_mismatch(tmp_path, payload):
    srv = _Server(payload)
    try:
        with pytest.raises(ChecksumError, match="md5"):
            fetch_cifar10(tmp_path, url=srv.url, md5="0" * 32, n_retries=2)
        assert not any(tmp_path.glob("cifar-10-python.tar.gz*"))
    finally:
        srv.close()


def test_download_dropped_connection_leaves_nothing_and_recovers(tmp_path, payload):
    md5 = hashlib.md5(payload).hexdigest()
    srv = _Server(payload, drop_first=10)
    try:
        with pytest.raises(OSError, match="could not download"):
            fetch_cifar10(tmp_path, url=srv.url, md5=md5, n_retries=2)
        assert not any(tmp_path.glob("cifar-10-python.tar.gz*"))
        srv.drop_first = srv.requests + 1  # the next attempt drops, the one after succeeds
        d = fetch_cifar10(tmp_path, url=srv.url, md5=md5, n_retries=3)
        assert d.X_test.shape == (200, 32, 32, 3)
        assert not list(tmp_path.glob("*.part"))
    finally:
        srv.close()


def test_existing_file_with_bad_checksum_is_fetched_again(tmp_path, payload):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"stale")
    srv = _Server(payload)
    try:
        d = fetch_cifar10(tmp_path, url=srv.url, md5=hashlib.md5(payload).hexdigest())
        assert d.X_train.shape[0] == 1000 and srv.requests == 1
    finally:
        srv.close()


def test_offline_error_says_how_to_pass_a_local_archive(tmp_path):
    with pytest.raises(OSError, match="archive="):
        fetch_cifar10(tmp_path, url="http://127.0.0.1:9/none.tar.gz", n_retries=1)
    with pytest.raises(OSError, match="archive="):
        fetch_cifar10(tmp_path, download_if_missing=False)


def test_default_data_home_from_environment(tmp_path, monkeypatch, payload):
    monkeypatch.setenv("FEATLEARN_DATA", str(tmp_path / "envhome"))
    srv = _Server(payload)
    try:
        fetch_cifar10(url=srv.url, md5=hashlib.md5(payload).hexdigest())
        assert (tmp_path / "envhome" / "cifar-10-python.tar.gz").exists()
    finally:
        srv.close()


# -- the restricted unpickler ----------------------------------------------------------------------

class _RunsACommand:
    """Unpickling this calls ``os.system(command)`` with the standard pickle module."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def test_archive_whose_pickle_would_run_code_is_rejected_without_running_it(tmp_path,
                                                                             monkeypatch):
    import os
    marker = tmp_path / "pwned"
    arc = tmp_path / "evil.tar.gz"
    make_archive(arc, mutate=lambda m: m.__setitem__(
        "data_batch_1", pickle.dumps({b"data": _RunsACommand(f"touch {marker}"), b"labels": []},
                                     protocol=2)))
    # Had the loader resolved the pickle's global, it would find this recorder, not run a shell.
    calls = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(__import__(os.name), "system", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(DatasetError, match="corrupt or not a CIFAR-10 archive") as info:
        fetch_cifar10(tmp_path / "home", archive=arc, md5=None)
    assert "system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists() and calls == []
    assert not list((tmp_path / "home").glob("cifar10-*.npz"))


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),  # a builtin function, not data
    pickle.dumps({b"data": np.array([None, 1], dtype=object), b"labels": [0, 1]}, protocol=2),
    pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=4),
])
def test_anything_but_the_official_types_is_a_corrupt_archive(tmp_path, payload):
    arc = tmp_path / "c.tar.gz"
    make_archive(arc, mutate=lambda m: m.__setitem__("test_batch", payload))
    with pytest.raises(DatasetError, match="corrupt or not a CIFAR-10 archive"):
        fetch_cifar10(tmp_path / "home", archive=arc, md5=None)


def test_python2_numpy_core_pickles_are_read(tmp_path):
    """The official archive was written by Python 2 numpy, which names ``numpy.core``."""
    arc = tmp_path / "c.tar.gz"

    def old_numpy(members):
        for name in ("data_batch_1", "test_batch"):
            blob = pickle.dumps(members[name], protocol=2)
            assert b"numpy._core.multiarray" in blob
            members[name] = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")

    make_archive(arc, mutate=old_numpy)
    d = fetch_cifar10(tmp_path / "home", archive=arc, md5=None)
    assert d.X_train.shape == (20, 32, 32, 3)


def test_tar_members_are_read_in_memory(tmp_path):
    arc = tmp_path / "c.tar.gz"
    make_archive(arc)
    fetch_cifar10(tmp_path / "home", archive=arc, md5=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.gz", "home"]
    assert not list(tmp_path.rglob("data_batch_*"))


# -- integrity -------------------------------------------------------------------------------------

def test_archive_edited_in_place_with_mtime_restored_fails_md5(tmp_path):
    import os
    arc = tmp_path / "c.tar.gz"
    make_archive(arc, n=50)
    md5 = md5_of(arc)
    home = tmp_path / "home"
    fetch_cifar10(home, archive=arc, md5=md5)  # parsed and cached
    assert list(home.glob("cifar10-*.npz"))
    st = arc.stat()
    blob = bytearray(arc.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one byte different
    arc.write_bytes(bytes(blob))
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert arc.stat().st_mtime_ns == st.st_mtime_ns and arc.stat().st_size == st.st_size
    with pytest.raises(ChecksumError) as info:
        fetch_cifar10(home, archive=arc, md5=md5)
    msg = str(info.value)
    assert md5 in msg and md5_of(arc) in msg
    assert "corrupt or not the one expected" in msg and "md5=None" not in msg


def test_checksum_message_names_both_hashes_and_not_md5_none(tmp_path):
    arc = tmp_path / "c.tar.gz"
    make_archive(arc)
    with pytest.raises(ChecksumError) as info:
        fetch_cifar10(tmp_path / "home", archive=arc, md5="0" * 32)
    msg = str(info.value)
    assert "0" * 32 in msg and md5_of(arc) in msg and "None" not in msg
    assert "corrupt or not the one expected" in msg and "\n" not in msg


def test_verified_cache_is_keyed_by_content_not_by_path(tmp_path):
    import shutil
    arc = tmp_path / "a.tar.gz"
    make_archive(arc, n=20)
    md5 = md5_of(arc)
    home = tmp_path / "home"
    a = fetch_cifar10(home, archive=arc, md5=md5)
    copy = tmp_path / "b.tar.gz"
    shutil.copy(arc, copy)
    b = fetch_cifar10(home, archive=copy, md5=md5)
    assert len(list(home.glob("cifar10-*.npz"))) == 1  # the same bytes share one cache entry
    np.testing.assert_array_equal(a.X_train, b.X_train)
    assert b.archive == str(copy)


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o002, 0o664)])
def test_cache_file_follows_the_umask(tmp_path, umask, mode):
    import os
    arc = tmp_path / "c.tar.gz"
    make_archive(arc)
    old = os.umask(umask)
    try:
        fetch_cifar10(tmp_path / "home", archive=arc, md5=None)
    finally:
        os.umask(old)
    (cache,) = (tmp_path / "home").glob("cifar10-*.npz")
    assert cache.stat().st_mode & 0o777 == mode
