"""The manifest of an extraction job (``OUT.manifest.json``): what the job computes, how it is
cut into chunks, and which chunks are on disk with the CRC-32 of their bytes.

It is a JSON dict carrying its own checksum, always replaced atomically (temporary file,
``fsync``, ``os.replace``, ``fsync`` of the folder). This module reads, writes and checks it,
and checks an output file against it; the order of writes that makes a job safe is
:mod:`featlearn.extraction`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np

from . import __version__
from ._io import atomic_path, fsync_dir

#: Version of the manifest layout; a manifest with another version is treated as foreign.
FORMAT = 2
#: How features are stored: float16 when the encoder returns float16 (half the disk and memory,
#: e.g. ``PatchEncoder(dtype="float16")``), else float32.
FLOAT32, FLOAT16 = np.dtype("<f4"), np.dtype("<f2")
#: What each entry of the cache key means, for the message saying why a cache is stale.
_KEY_WORDS = (("model", "the model (its fitted state) differs"),
              ("data", "the input images differ"),
              ("mirror", "the mirror setting differs"),
              ("n_images", "the number of images differs"),
              ("image_shape", "the image shape differs"),
              ("image_dtype", "the image dtype differs"),
              ("code", "featlearn's feature code differs"))


def new(key, row_shape, dtype, chunk_size, output_name) -> dict:
    """The manifest of a job that has not finished a chunk yet."""
    n = key["n_images"]
    return {
        "format": FORMAT, "key": key, "n_features": int(np.prod(row_shape)),
        "row_shape": list(row_shape), "dtype": dtype.str,
        "chunk_size": int(chunk_size), "n_chunks": int(math.ceil(n / chunk_size)), "chunks": {},
        "complete": False, "output": output_name, "featlearn": __version__,
    }


def crc(block: np.ndarray) -> str:
    """CRC-32 of a chunk's bytes, as a manifest records it."""
    return f"{zlib.crc32(np.ascontiguousarray(block).data) & 0xFFFFFFFF:08x}"


def row_shape(state) -> tuple:
    """The stored rows' shape."""
    return tuple(state["row_shape"])


def row_text(state) -> str:
    return " x ".join(str(s) for s in row_shape(state))


def stale_reasons(old_key, key) -> list[str]:
    """What differs between an earlier job's cache key and this one's, in words."""
    return [words for k, words in _KEY_WORDS if old_key.get(k) != key.get(k)]


def _checksum(state) -> str:
    body = json.dumps({k: v for k, v in state.items() if k != "checksum"}, sort_keys=True)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


def write(path: Path, state):
    """Atomically replace the manifest: temp file, fsync, rename, fsync of the directory."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    state["checksum"] = _checksum(state)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(state, fh, sort_keys=True, indent=1)
    fsync_dir(path.parent)


def read(path: Path, report):
    """The manifest as a dict, or None when absent, foreign or corrupt (the latter reported
    through ``report(message)``)."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        ok = (isinstance(state, dict) and state.get("format") == FORMAT
              and state.get("checksum") == _checksum(state))
        if ok:
            n, c = state["key"]["n_images"], state["chunk_size"]
            ok = (c >= 1 and state["n_chunks"] == math.ceil(n / c) and state["n_features"] >= 1
                  and state["dtype"] in (FLOAT32.str, FLOAT16.str)
                  and math.prod(row_shape(state)) == state["n_features"]
                  and all(0 <= int(i) < state["n_chunks"] for i in state["chunks"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        report(f"{path} is corrupt ({type(exc).__name__}: {exc}); recomputing")
        return None
    if not ok:
        report(f"{path} is corrupt or from another featlearn version (checksum/format "
               "mismatch); recomputing")
        return None
    return state


def names_output(manifest: Path, out: Path) -> bool:
    """Whether ``out`` is an extraction result: ``manifest`` beside it names it.

    A manifest that exists but cannot be parsed counts too: it is ours, damaged (a torn disk
    block, an edit), and the job detects and repairs it; a readable one for another file does not.
    """
    try:
        state = json.loads(manifest.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return manifest.is_file()
    return isinstance(state, dict) and state.get("output") == out.name


def bad_chunks(path, state) -> list[int]:
    """The finished chunks of the ``.npy`` at ``path`` whose bytes fail their CRC."""
    n, c = state["key"]["n_images"], state["chunk_size"]
    mm = np.load(path, mmap_mode="r")
    try:
        return sorted(int(i) for i, want in state["chunks"].items()
                      if crc(mm[int(i) * c:min(n, (int(i) + 1) * c)]) != want)
    finally:
        del mm


def npy_problem(path, shape, dtype) -> str:
    """'' when ``path`` is a C-order ``.npy`` of ``shape`` and ``dtype`` and the right size,
    else why not."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"unreadable header: {exc}"
    if tuple(got_shape) != tuple(shape) or fortran or np.dtype(got_dtype) != dtype:
        return (f"header says {got_shape} {np.dtype(got_dtype)}, expected {tuple(shape)} "
                f"{dtype.name}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        return f"{size} bytes, expected {expected}"
    return ""
