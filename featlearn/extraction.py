"""Cached, resumable, distributable feature extraction into ``.npy`` files.

:func:`extract_features` encodes an image set chunk by chunk straight into a ``.npy`` file on
disk, so a job over hundreds of thousands of images needs memory for one chunk only, survives
``kill -9`` at any moment, and is never recomputed once finished.

How a job stays safe
--------------------
For ``out="features.npy"`` three files live side by side:

``features.npy.partial``
    The output while the job runs: a ``.npy`` file created at full size up front (and
    preallocated with ``posix_fallocate``, so a full disk is an ``OSError`` at the start rather
    than a ``SIGBUS`` in the middle of a memory-mapped write). Only the finished job is renamed
    to ``features.npy``, so a half-written file is never mistaken for a result, and an earlier
    result there stays whole until the new one replaces it.
``features.npy.manifest.json`` (:mod:`featlearn._manifest`)
    The cache key (a fingerprint of the model's fitted state, a hash of the input images, their
    shape, the mirror flag, a hash of featlearn's feature code), the chunk size and, for every finished chunk, the CRC-32 of its
    bytes. It is rewritten atomically (temporary file, ``fsync``, ``os.replace``, ``fsync`` of
    the directory) after a chunk's data has been flushed and ``fsync``-ed, so it never lists a
    chunk whose bytes might not be on disk. The manifest carries its own checksum.
``features.npy.lock``
    An advisory ``flock`` held while a job writes, so two processes never write one output.

Before anything is written, the inputs are validated (image shape, dtype and finiteness, a
fitted encoder on a valid device, one image actually encoded) and ``out`` is checked: an
existing file that no manifest names, or one of the job's inputs, is refused
(:class:`featlearn._io.OutputExistsError`) unless ``overwrite=True`` (never for an input).

On a rerun, the manifest is read and checked: a different model, different images or a changed
chunk size start over (with a message saying which); a corrupt manifest, or an output whose
header, size or chunk checksums are wrong, is reported and the damaged part recomputed; a
finished, intact job returns at once without calling the encoder. Because each chunk is a
deterministic function of (model, images, chunk boundaries), a job killed and resumed produces
the same bytes as an uninterrupted one.

Distribution
------------
With ``n_jobs`` (or inside ``joblib.parallel_config(backend="dask")``) chunks are encoded through
:class:`joblib.Parallel`. Workers only *compute*: they return the chunk's features to the
calling process, which is the single writer of the output and the manifest. That needs no
shared filesystem (remote Dask workers may not see the output path at all), makes "each chunk
is written by exactly one worker" hold by construction, and keeps the manifest's
fsync-before-mark ordering in one place. Results are consumed as they arrive
(``return_as="generator_unordered"``) and joblib's ``pre_dispatch`` bounds how many are in
flight, so memory stays bounded by a few chunks.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import threading
import time
from pathlib import Path

import joblib
import numpy as np

from . import _manifest
from ._image_sources import image_source, mirror as _mirror
from ._io import (OutputExistsError, check_output, exclusive_lock, fsync_dir, preallocate,
                  same_file)
from ._logging import log, progress
from . import fingerprints

#: ``batch_size="auto"`` caps: images per chunk, and bytes of output per chunk.
AUTO_MAX_IMAGES = 1024
AUTO_MAX_BYTES = 64 * 2**20
#: ``batch_size="auto"`` aims for at least this many chunks, so a killed job loses little work
#: and a parallel job has chunks to spread.
AUTO_MIN_CHUNKS = 8


class ExtractionError(OSError):
    """An extraction job could not write its output (disk full, read-only path, locked)."""


def extract_features(encoder, images, out, *, batch_size="auto", n_jobs=None, resume=True,
                     mirror=False, overwrite=False, inputs=(), verbose=1):
    """Encode ``images`` with a fitted ``encoder`` into the ``.npy`` file ``out``, resumably.

    Parameters
    ----------
    encoder : fitted transformer
        Any object whose ``transform`` maps a chunk of images to a 2-D array with one row per
        image (e.g. a fitted :class:`featlearn.PatchEncoder`). Features are stored as float16
        when the encoder returns float16 (``PatchEncoder(dtype="float16")``), else as float32,
        in the shape of its output: ``(n, n_features)``, or ``(n, channels, h, w)`` maps from
        ``PatchEncoder(layout="map")``, which :class:`featlearn.TorchConvClassifier` trains on
        from the memory-mapped file one mini-batch at a time.
    images : ndarray or tensor of shape (n, H, W[, C]), or a torch Dataset or DataLoader
        The images, in the layout the encoder reads (``PatchEncoder(channels="first")`` takes
        ``(n, C, H, W)``). A memory-mapped ``.npy`` (``np.load(path, mmap_mode="r")``) is read
        chunk by chunk and never loaded whole; a tensor on any device is moved to the host once.
        A torch ``Dataset`` or ``DataLoader`` yielding images or ``(images, labels)`` (labels
        are ignored) is streamed one batch at a time, twice: a first pass counts and hashes the
        images (the cache key), the second encodes them and checks that it saw the same images,
        so the dataset must be deterministic (no random transforms) and a ``DataLoader`` must
        not shuffle (a ValueError otherwise). A ``Dataset`` is read in batches of 256.
    out : str or Path
        The output ``.npy`` file. ``out.partial``, ``out.manifest.json`` and ``out.lock`` are
        kept beside it (see the module docstring). An existing ``out`` is replaced only when it
        is an earlier result of this function (its manifest names it) or ``overwrite=True``, and
        only once the new result is complete.
    batch_size : int or "auto", default="auto"
        Images per chunk: the unit of work, of resumption and of distribution. ``"auto"`` keeps
        the chunk size of a job being resumed, else picks ``min(1024, n/8, 64 MB of output)``.
        Part of the cache key, since it can change floating-point rounding.
    n_jobs : int or None, default=None
        Chunks encoded in parallel through :class:`joblib.Parallel` (``None``: one, unless a
        ``joblib.parallel_config`` context, e.g. the ``"dask"`` backend, says otherwise).
    resume : bool, default=True
        Reuse finished chunks of a matching earlier run (and return a finished job at once).
        ``False`` always starts over.
    mirror : bool, default=False
        Encode the horizontally mirrored images instead of the images (for a
        :class:`featlearn.PatchEncoder`, ``flip=True`` is the other way: it appends the mirror's
        features to each image's).
    overwrite : bool, default=False
        Replace an existing ``out`` that is not a featlearn extraction result.
    inputs : iterable of paths, default=()
        Files this job reads (the images' ``.npy``, the model file): ``out`` may never be one of
        them, even with ``overwrite``. A memory-mapped ``images`` is added automatically.
    verbose : int, default=1
        0: silent. 1: a progress bar (images/s, ETA), messages about stale or damaged caches,
        and a one-line summary, through the ``featlearn`` logger.

    Returns
    -------
    features : numpy.memmap of shape (n, ...) as the encoder's rows, float32 or float16,
        read-only

    Raises
    ------
    ValueError
        Bad images (shape, dtype, values not finite as float32), an unfitted encoder, an
        unknown device, or an encoder that cannot encode these images. Raised before any
        existing file is touched.
    OutputExistsError
        ``out`` is one of the inputs, or exists and is not a featlearn result (without
        ``overwrite``).
    ExtractionError
        When the output cannot be written (read-only directory, disk full, another job holding
        the lock). Chunks already finished stay recorded; nothing unfinished is marked done.
    """
    if batch_size != "auto" and (isinstance(batch_size, bool)
                                 or not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    source = image_source(images)  # validated; a stream's first pass counts and hashes it
    paths = _Paths(Path(out).expanduser())
    _check_paths(paths, [*inputs, source.filename], overwrite)
    _check_encoder(encoder)
    say = _Reporter(verbose)
    t_start = time.perf_counter()
    key = _cache_key(encoder, source, mirror)

    with exclusive_lock(paths.lock, error=ExtractionError,
                        busy=f"another extraction job is writing {paths.out}; wait for it"):
        manifest = _manifest.read(paths.manifest, say.info) if resume else None
        layout = None
        if manifest is None or manifest["key"] != key:
            # One image through the encoder: the output's row shape and dtype, and a clear
            # error for images the model cannot encode (wrong size or layout), before anything
            # on disk changes. (A result of this very model and these images is trusted.)
            layout = _output_layout(encoder, source.first, mirror)
        state = _reuse(manifest, key, batch_size, paths, say) if manifest is not None else None
        if state is not None and state["complete"]:
            say.info(f"{paths.out} is up to date ({key['n_images']} images x "
                     f"{_manifest.row_text(state)} features); nothing to do")
            return np.load(paths.out, mmap_mode="r")
        if state is None:
            layout = layout or _output_layout(encoder, source.first, mirror)
            state = _start(*layout, key, batch_size, paths)
        _run_chunks(encoder, source, state, mirror, n_jobs, paths, say)
        _finish(state, paths)
    say.summary(state, paths.out, time.perf_counter() - t_start,
                _flops_per_image(encoder, source))
    return np.load(paths.out, mmap_mode="r")


class _Paths:
    """The output and the files kept beside it (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.manifest = out.with_name(out.name + ".manifest.json")
        self.lock = out.with_name(out.name + ".lock")


def _check_paths(paths, inputs, overwrite):
    """Refuse, before any work, an output that cannot or must not be written."""
    out = paths.out
    if not out.parent.is_dir():
        raise ExtractionError(errno.ENOENT, f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise ExtractionError(errno.EISDIR, f"output {out} is a folder; give a file name")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ExtractionError(errno.EACCES, f"output directory {out.parent} is not writable; "
                                            "choose another --out")
    for p in (paths.partial, paths.manifest, paths.lock):
        for src in inputs:
            if src is not None and same_file(p, src):
                raise OutputExistsError(errno.EEXIST, f"{p} (kept beside output {out}) is also "
                                                      f"an input ({src}); choose another --out")
    check_output(out, inputs=inputs, overwrite=overwrite, what="output",
                 is_ours=lambda p: _manifest.names_output(paths.manifest, p))


def _cache_key(encoder, source, mirror) -> dict:
    """What the features are a function of: the model's fitted state, the images and the code
    (the feature-cache policy of :mod:`featlearn.fingerprints`)."""
    return {
        "model": fingerprints.model_fingerprint(encoder),
        "data": source.fingerprint(),
        "n_images": int(source.shape[0]),
        "image_shape": [int(s) for s in source.shape[1:]],
        "image_dtype": source.dtype.str,
        "mirror": bool(mirror),
        "code": fingerprints.code_fingerprint(),
    }


def _check_encoder(encoder):
    """A fitted encoder on a valid device (``ValueError``/``NotFittedError`` otherwise)."""
    from sklearn.utils.validation import check_is_fitted

    if not callable(getattr(encoder, "transform", None)):
        raise ValueError(f"the model ({type(encoder).__name__}) has no transform method; "
                         "expected a fitted encoder such as featlearn.PatchEncoder")
    if hasattr(encoder, "get_params") and hasattr(encoder, "fit"):
        check_is_fitted(encoder)
    device = getattr(encoder, "device", None)
    if device is not None:
        from ._torch import resolve_device

        resolve_device(device)


def _features(Z):
    """An encoder's output as a numpy array (a tensor, on any device, is moved to the host)."""
    if hasattr(Z, "detach"):
        from ._torch import to_numpy

        Z = to_numpy(Z)
    return np.asarray(Z)


def _auto_chunk(n: int, row_bytes: int) -> int:
    by_bytes = max(1, AUTO_MAX_BYTES // max(1, row_bytes))
    return int(max(1, min(AUTO_MAX_IMAGES, by_bytes, math.ceil(n / AUTO_MIN_CHUNKS))))


def _encode_chunk(encoder, chunk, mirror, index, dtype=_manifest.FLOAT32, parent=None):
    """Worker side: encode one chunk and return it; never touches the output file."""
    _watch_parent(parent)
    chunk = np.asarray(chunk)
    if mirror:
        chunk = _mirror(chunk, encoder)
    Z = _features(encoder.transform(chunk))
    if Z.ndim < 2 or Z.shape[0] != chunk.shape[0]:
        raise ValueError(f"encoder.transform returned shape {Z.shape} for {chunk.shape[0]} images; "
                         "expected (n_images, n_features)")
    return index, np.ascontiguousarray(Z, dtype=dtype)


_watchdog = None


def _process_identity(pid=None):
    """``(host, pid, start time)`` of a process: what tells it from a later one reusing its pid
    (the start time, from ``/proc``, is None where there is no ``/proc``, and for a process
    that has exited: a zombie's is "exited")."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start = "exited" if fields[0] in (b"Z", b"X") else fields[19].decode()
    except (OSError, IndexError):
        start = None
    return socket.gethostname(), pid, start


def _watch_parent(parent):
    """In a worker process that is a child of ``parent`` (its :func:`_process_identity`), exit
    as soon as ``parent`` dies.

    loky keeps its worker processes for reuse, and a parent killed by SIGKILL or SIGTERM runs no
    cleanup, so without this its workers (each holding a model) live on until loky's idle
    timeout. A daemon thread started once per worker polls the parent pid: the kernel
    reparents an orphan, so ``os.getppid()`` changes the moment the parent is gone. A worker
    that takes its first chunk after the parent died (one still starting up when it was killed,
    reading a chunk already queued) is an orphan already: it exits at once. Workers that are
    not our children (Dask workers, local or remote) and in-process threads are left alone.
    """
    global _watchdog
    if parent is None:
        return
    host, pid, start = parent
    if _watchdog is not None or os.getpid() == pid or host != socket.gethostname():
        return
    if os.getppid() != pid:
        if start is not None and _process_identity(pid)[2] != start:
            os._exit(1)  # the parent is gone (or its pid is another process's now)
        return
    parent = pid

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    _watchdog = threading.Thread(target=watch, name="featlearn-parent-watchdog", daemon=True)
    _watchdog.start()


def _output_layout(encoder, first, mirror):
    """``(row_shape, dtype)`` of the stored features, measured by encoding the first image
    (which also validates it)."""
    one = np.asarray(first)
    Z = _features(encoder.transform(_mirror(one, encoder) if mirror else one))
    if Z.ndim < 2 or Z.shape[0] != 1:
        raise ValueError(f"encoder.transform returned shape {Z.shape} for one image; "
                         "expected (1, n_features)")
    return tuple(int(s) for s in Z.shape[1:]), (_manifest.FLOAT16 if Z.dtype == np.float16 else _manifest.FLOAT32)


def _reuse(manifest, key, batch_size, paths, say):
    """Validate an earlier run against this one; return its state to resume, or None."""
    if manifest["key"] != key:
        what = _manifest.stale_reasons(manifest["key"], key)
        say.info(f"{paths.out}: existing features are stale ({'; '.join(what) or 'cache key differs'}); "
                 "recomputing")
        return None
    if batch_size != "auto" and int(batch_size) != manifest["chunk_size"]:
        say.info(f"{paths.out}: batch_size changed from {manifest['chunk_size']} to {batch_size}; "
                 "recomputing")
        return None
    state = dict(manifest)
    state["chunks"] = dict(manifest["chunks"])
    target = paths.out if manifest["complete"] else paths.partial
    if manifest["complete"] and not paths.out.exists():
        say.info(f"{paths.out} is missing although its manifest says the job finished; recomputing")
        return None
    if not manifest["complete"] and not paths.partial.exists():
        if paths.out.exists() and len(state["chunks"]) == state["n_chunks"]:
            target = paths.out  # killed between the final rename and the manifest update
        else:
            if state["chunks"]:
                say.info(f"{paths.partial} is missing; recomputing")
            return None
    problem = _manifest.npy_problem(target, (key["n_images"], *_manifest.row_shape(state)),
                                     np.dtype(state["dtype"]))
    if problem:
        say.info(f"{target} is corrupt or truncated ({problem}); recomputing")
        return None
    bad = _manifest.bad_chunks(target, state)
    if bad:
        say.info(f"{target}: {len(bad)} finished chunk(s) fail their checksum "
                 f"({_ranges(bad)}); recomputing them")
        for i in bad:
            del state["chunks"][str(i)]
    complete = target == paths.out and len(state["chunks"]) == state["n_chunks"]
    if target == paths.out and not complete:
        os.replace(paths.out, paths.partial)  # back to work in progress
        fsync_dir(paths.out.parent)
    if complete != manifest["complete"] or bad:
        state["complete"] = complete
        _manifest.write(paths.manifest, state)
    return state


def _start(row_shape, dtype, key, batch_size, paths):
    """Begin a fresh job: manifest first (no chunk done), then the preallocated ``.partial``.

    An existing finished ``out`` is left in place: the new result replaces it only when
    complete (:func:`_finish`), so a job that fails or is killed never costs the old one.
    """
    n = key["n_images"]
    d = int(np.prod(row_shape))
    chunk = _auto_chunk(n, d * dtype.itemsize) if batch_size == "auto" else int(batch_size)
    state = _manifest.new(key, row_shape, dtype, chunk, paths.out.name)
    with contextlib.suppress(FileNotFoundError):
        paths.partial.unlink()
    _manifest.write(paths.manifest, state)
    try:
        mm = np.lib.format.open_memmap(paths.partial, mode="w+", dtype=dtype,
                                       shape=(n, *row_shape))
        offset = mm.offset
        del mm
        preallocate(paths.partial, offset + n * d * dtype.itemsize)
    except OSError as exc:
        with contextlib.suppress(OSError):
            paths.partial.unlink()
        raise ExtractionError(exc.errno, f"cannot create {paths.partial} ({n} x {d} {dtype.name}, "
                                         f"{_human(n * d * dtype.itemsize)}): "
                                         f"{exc.strerror or exc}") from exc
    fsync_dir(paths.out.parent)
    return state


def _run_chunks(encoder, source, state, mirror, n_jobs, paths, say):
    n, c = state["key"]["n_images"], state["chunk_size"]
    todo = [i for i in range(state["n_chunks"]) if str(i) not in state["chunks"]]
    if not todo:
        return
    done_images = n - sum(min(n, (i + 1) * c) - i * c for i in todo)
    mm = np.load(paths.partial, mmap_mode="r+")
    fd = os.open(paths.partial, os.O_RDWR)
    bar = say.bar(n, done_images)
    try:
        parent = _process_identity()
        dtype, row_shape = np.dtype(state["dtype"]), _manifest.row_shape(state)
        tasks = (joblib.delayed(_encode_chunk)(encoder, chunk, mirror, i, dtype, parent)
                 for i, chunk in source.chunks(c, todo))
        results = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")(tasks)
        for i, Z in results:
            a, b = i * c, min(n, (i + 1) * c)
            if Z.shape != (b - a, *row_shape):
                raise ValueError(f"chunk {i}: encoder returned {Z.shape}, expected "
                                 f"{(b - a, *row_shape)} (the model's output shape is not what "
                                 "it gave for the first image)")
            try:
                _write_chunk(mm, fd, a, Z)
                state["chunks"][str(i)] = _manifest.crc(Z)
                _manifest.write(paths.manifest, state)
            except OSError as exc:
                state["chunks"].pop(str(i), None)
                raise ExtractionError(
                    exc.errno, f"writing chunk {i} of {paths.partial} failed: "
                               f"{exc.strerror or exc}; {len(state['chunks'])} finished chunk(s) "
                               "are kept and a rerun resumes from them") from exc
            bar.update(b - a)
    finally:
        bar.close()
        os.close(fd)
        del mm


def _write_chunk(mm, fd, start, Z):
    """Copy a chunk into the mapped output and make it durable before it may be marked done."""
    mm[start:start + len(Z)] = Z
    mm.flush()  # msync
    os.fsync(fd)


def _finish(state, paths):
    """All chunks done: rename the partial file into place, then mark the manifest complete."""
    if len(state["chunks"]) != state["n_chunks"]:
        raise RuntimeError("internal error: finishing a job with missing chunks")
    if paths.partial.exists():
        os.replace(paths.partial, paths.out)
        fsync_dir(paths.out.parent)
    state["complete"] = True
    _manifest.write(paths.manifest, state)


# -- reporting -----------------------------------------------------------------------------------

def _flops_per_image(encoder, source):
    """FLOPs of the dense patch-to-centroid products per image, when the encoder can say.

    For a fitted encoder exposing its centroids (``cluster_centers_``, or
    ``kmeans_.cluster_centers_``) and its map of patch positions (``map_shape_``, or
    ``patch_size``/``stride``): ``2 * positions * d * K``, twice that for a
    ``PatchEncoder(flip=True)``, which encodes a mirrored view too. None when it cannot be told.
    """
    shape = tuple(source.shape[1:])
    if getattr(encoder, "channels", "last") == "first" and len(shape) == 3:
        shape = (*shape[1:], shape[0])
    centers = getattr(encoder, "cluster_centers_", None)
    if centers is None:
        centers = getattr(getattr(encoder, "kmeans_", None), "cluster_centers_", None)
    if centers is None or len(getattr(centers, "shape", ())) != 2 or len(shape) < 2:
        return None
    K, d = (int(s) for s in centers.shape)
    map_shape = getattr(encoder, "map_shape_", None)
    if map_shape is not None:
        positions = int(np.prod(map_shape))
    else:
        p, stride = getattr(encoder, "patch_size", None), getattr(encoder, "stride", 1) or 1
        if not isinstance(p, (int, np.integer)):
            return None
        positions = ((shape[0] - p) // stride + 1) * ((shape[1] - p) // stride + 1)
    views = 2 if getattr(encoder, "flip", False) is True else 1
    return 2.0 * positions * d * K * views


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"  # pragma: no cover


def _ranges(indices) -> str:
    s = ", ".join(str(i) for i in indices[:8])
    return s + (", ..." if len(indices) > 8 else "")


class _Reporter:
    """Messages through the featlearn logger, the bar through the one progress helper."""

    def __init__(self, verbose):
        self.verbose = int(verbose or 0)
        self.computed = 0

    def info(self, msg):
        log(self.verbose, "%s", msg)

    def bar(self, total, initial):
        return _CountingBar(self, progress(total, initial=initial, desc="extract",
                                           verbose=self.verbose))

    def summary(self, state, out: Path, seconds, flops):
        n = self.computed
        total = state["key"]["n_images"]
        rate = f"{n / seconds:.0f} images/s" if seconds > 0 and n else "nothing computed"
        gf = f", {flops * n / seconds / 1e9:.1f} GFLOP/s" if flops and n and seconds > 0 else ""
        reused = f" ({total - n} reused)" if n < total else ""
        size = out.stat().st_size if out.exists() else 0
        self.info(f"encoded {n} of {total} images{reused} in {seconds:.1f} s ({rate}{gf}) -> "
                  f"{out} ({total} x {_manifest.row_text(state)} {np.dtype(state['dtype']).name}, "
                  f"{_human(size)})")


class _CountingBar:
    """A progress bar that also counts the images this run computed (for the summary)."""

    def __init__(self, reporter, bar):
        self.reporter, self._bar = reporter, bar

    def update(self, k):
        self.reporter.computed += k
        self._bar.update(k)

    def close(self):
        self._bar.close()
