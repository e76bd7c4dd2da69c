"""CIFAR-10: download (checksummed, atomic, retried), local archives, and a parsed-array cache.

The batches are Python pickles. They are read with :class:`_BatchUnpickler`, which admits only
the few names the official archive's pickles use (numpy's array reconstruction and the latin-1
``_codecs.encode`` that protocol 2 uses for bytes), so an archive from an untrusted source can be
rejected as corrupt but can never run code. Tar members are read in memory, never extracted.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from ._io import atomic_path
from ._logging import logger

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_FOLDER = "cifar-10-batches-py"
_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = "test_batch"
_META = "batches.meta"
_PIXELS = 32 * 32 * 3
_CACHE_VERSION = 2


class DatasetError(ValueError):
    """A dataset archive is missing, corrupt, truncated or fails its checksum."""


class ChecksumError(DatasetError):
    """A file's md5 differs from the expected one."""


def get_data_home(data_home=None) -> Path:
    """``data_home``, else ``$FEATLEARN_DATA``, else ``~/featlearn_data`` (created if missing)."""
    if data_home is None:
        data_home = os.environ.get("FEATLEARN_DATA", os.path.join("~", "featlearn_data"))
    path = Path(data_home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_md5(path, chunk=4 * 2**20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch_cifar10(data_home=None, *, archive=None, download_if_missing=True, md5=CIFAR10_MD5,
                  url=CIFAR10_URL, n_retries=3, verbose=False):
    """Load CIFAR-10 as HWC uint8 arrays.

    Parameters
    ----------
    data_home : str or Path, optional
        Where downloads and the parsed-array cache live. Default ``$FEATLEARN_DATA``, else
        ``~/featlearn_data``.
    archive : str or Path, optional
        A local ``cifar-10-python.tar.gz``, or its extracted ``cifar-10-batches-py`` folder (or
        the folder holding it), read in place instead of downloading. A tarball's md5 is checked
        against ``md5``; a folder has no single checksum and is not checked.
    download_if_missing : bool, default=True
        Download the official archive into ``data_home`` when neither ``archive`` nor a previous
        download is present.
    md5 : str or None
        Expected md5 of the archive; None skips the check (e.g. for a re-encoded copy you trust).
        When given, the archive's bytes are hashed on every call (a cached parse is used only
        for an archive whose content has this md5, so an archive edited in place is always
        caught); with None the parsed-array cache trusts the file's path, size and mtime.
    url : str
        Where to download from.
    n_retries : int, default=3
        Download attempts before giving up.

    Returns
    -------
    Bunch with ``X_train`` (n, 32, 32, 3) uint8 (HWC), ``y_train`` (n,) int64, ``X_test``,
    ``y_test``, ``target_names`` (10 class names) and ``archive`` (the file that was read).

    Raises
    ------
    ChecksumError, DatasetError
        On a checksum mismatch or a corrupt, truncated or incomplete archive.
    OSError
        When the archive is missing and cannot be downloaded.
    """
    home = get_data_home(data_home)
    actual = None  # the archive's md5, computed at most once per call
    if archive is None:
        archive = home / "cifar-10-python.tar.gz"
        if archive.exists() and md5 is not None:
            actual = file_md5(archive)
            if actual != md5:
                if verbose:
                    logger.info(f"{archive} fails its checksum; downloading it again")
                archive.unlink()
                actual = None
        if not archive.exists():
            if not download_if_missing:
                raise OSError(
                    f"CIFAR-10 not found at {archive} and download_if_missing=False; pass "
                    "archive='path/to/cifar-10-python.tar.gz' to use a local copy")
            _download(url, archive, md5, n_retries=n_retries, verbose=verbose)
            actual = md5  # _download verified it
    else:
        archive = Path(archive).expanduser()
        if not archive.exists():
            raise OSError(f"CIFAR-10 archive {archive} does not exist")

    if md5 is not None and not archive.is_dir():  # folders carry no single checksum
        if actual is None:
            actual = file_md5(archive)
        if actual != md5:
            raise ChecksumError(_checksum_message(archive, actual, md5))
    cache = _cache_path(home, archive, md5 if actual is not None else None)
    if cache is not None and cache.exists():
        try:
            return _load_cache(cache, archive)
        except Exception:  # a damaged cache is only a cache: rebuild it
            cache.unlink(missing_ok=True)

    data = _parse(archive)
    if cache is not None:
        _save_cache(cache, data)
    return Bunch(**data, archive=str(archive))


def _checksum_message(what, actual, expected) -> str:
    return (f"{what} has md5 {actual}, expected {expected}: the archive is corrupt or not the "
            "one expected")


def _download(url, dest: Path, md5, *, n_retries, verbose):
    """Download to ``dest.part``, verify, and rename atomically; retries; never leaves a partial file."""
    part = dest.with_name(dest.name + ".part")
    last = None
    for attempt in range(1, max(1, n_retries) + 1):
        try:
            if verbose:
                logger.info(f"downloading {url} (attempt {attempt})")
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
                expected = resp.headers.get("Content-Length")
                shutil.copyfileobj(resp, out, length=2**20)
                out.flush()
                os.fsync(out.fileno())
            got = part.stat().st_size
            if expected is not None and got != int(expected):
                raise OSError(f"connection dropped: got {got} of {expected} bytes")
            if md5 is not None:
                actual = file_md5(part)
                if actual != md5:
                    raise ChecksumError(_checksum_message(f"the download from {url}", actual, md5))
            os.replace(part, dest)
            return
        except (OSError, http.client.HTTPException, ChecksumError) as exc:
            last = exc  # URLError is an OSError; IncompleteRead is an HTTPException
            part.unlink(missing_ok=True)
            if attempt < n_retries:
                time.sleep(min(2.0, 0.2 * attempt))
    if isinstance(last, ChecksumError):
        raise ChecksumError(f"{last} (after {n_retries} attempts)") from last
    raise OSError(
        f"could not download CIFAR-10 from {url} after {n_retries} attempts ({last}). Without "
        "internet access, pass archive='path/to/cifar-10-python.tar.gz' (or its extracted "
        "cifar-10-batches-py folder)") from last


def _cache_path(home: Path, archive: Path, verified_md5):
    """Cache file for an archive.

    A tarball whose bytes were just verified against ``verified_md5`` is keyed by that content
    hash alone, so the cache can never stand in for different bytes. Otherwise (no md5, or a
    folder, which has no single checksum) the key is the file's identity: path, size, mtime.
    """
    try:
        archive.stat()
    except OSError:
        return None
    if archive.is_dir():
        root = _batch_dir(archive)
        stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(root.iterdir())] if root else []
        ident = repr((str(archive.resolve()), stamps))
    elif verified_md5 is not None:
        ident = f"md5:{verified_md5}"
    else:
        st = archive.stat()
        ident = repr((str(archive.resolve()), st.st_size, st.st_mtime_ns))
    key = hashlib.sha1(f"{_CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]
    return home / f"cifar10-{key}.npz"


def _save_cache(path: Path, data: dict):
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in data.items()})
    except OSError:
        pass  # the cache is an optimisation: a read-only or full disk must not fail the load


def _load_cache(path: Path, archive) -> Bunch:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in ("X_train", "y_train", "X_test", "y_test", "target_names")}
    data["target_names"] = [str(s) for s in data["target_names"]]
    return Bunch(**data, archive=str(archive))


def _batch_dir(folder: Path):
    for cand in (folder, folder / _FOLDER):
        if (cand / _TEST).exists() or (cand / _META).exists():
            return cand
    return None


def _parse(archive: Path) -> dict:
    """Read all batches from a tarball or folder; every failure becomes a DatasetError."""
    try:
        if archive.is_dir():
            root = _batch_dir(archive)
            if root is None:
                raise DatasetError(f"{archive} holds no {_FOLDER} batches ({_TEST}, {_META})")
            raw = {}
            for name in _TRAIN + [_TEST, _META]:
                if (root / name).exists():
                    raw[name] = (root / name).read_bytes()
        else:
            raw = {}
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in _TRAIN + [_TEST, _META]:
                        raw[base] = tar.extractfile(member).read()
    except DatasetError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"{archive} is truncated or not a valid CIFAR-10 archive: {exc}") from exc

    missing = [n for n in _TRAIN + [_TEST, _META] if n not in raw]
    if missing:
        raise DatasetError(f"{archive} is missing CIFAR-10 batch(es): {', '.join(missing)}")
    train = [_parse_batch(raw[n], n, archive) for n in _TRAIN]
    X_test, y_test = _parse_batch(raw[_TEST], _TEST, archive)
    meta = _unpickle(raw[_META], _META, archive)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if names is None or len(names) != 10:
        raise DatasetError(f"{archive}: {_META} has no list of 10 label_names")
    return {
        "X_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "X_test": X_test,
        "y_test": y_test,
        "target_names": [n.decode() if isinstance(n, bytes) else str(n) for n in names],
    }


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, "
                                     f"{encoding!r})")
    return text.encode("latin1")


def _plain_dtype(*args):
    """``numpy.dtype`` for plain numeric/bytes dtypes only (an object dtype could hide anything)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} in a data batch")
    return dtype


_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array unpickling entry point

#: Every global the official archive's pickles name (Python 2 wrote ``numpy.core``; numpy 2
#: writes ``numpy._core``). Anything else makes the archive "corrupt", whatever it would do.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only :data:`_ALLOWED_GLOBALS`: it cannot run code."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it references {module}.{name}, which a CIFAR-10 batch never holds") from None


def _unpickle(blob: bytes, name, archive):
    try:
        return _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"{archive}: batch {name} is corrupt or not a CIFAR-10 archive: "
                           f"{exc}") from exc


def _parse_batch(blob: bytes, name, archive):
    d = _unpickle(blob, name, archive)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DatasetError(f"{archive}: batch {name} lacks 'data' or 'labels'")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.dtype != np.uint8:
        raise DatasetError(
            f"{archive}: batch {name} data has shape {data.shape} and dtype {data.dtype}; "
            f"expected (n, {_PIXELS}) uint8")
    if labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{archive}: batch {name} has {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{archive}: batch {name} has labels outside 0..9")
    # CHW row-major -> HWC, contiguous.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


# -- folders of image files ----------------------------------------------------------------------

_FOLDER_CACHE_VERSION = 1
#: Files that are never images and that file managers leave behind; skipped silently, like
#: hidden files and folders (names starting with ".").
_JUNK_FILES = frozenset({"Thumbs.db", "desktop.ini"})
#: Files per decoding task: enough to amortize a task, few enough to spread over the workers.
_DECODE_TASK = 256


def load_image_folder(path, *, size=None, grayscale=False, n_jobs=None, skip_bad=False,
                      data_home=None):
    """Load a folder of image files, one sub-folder per class, as HWC uint8 arrays.

    The layout is torchvision's ``ImageFolder``: ``path/CLASS/IMAGE`` (images may sit deeper
    inside a class folder). Classes are the sub-folders' names, sorted; ``target[i]`` indexes
    ``target_names``. Every file in a class folder is read with Pillow (PNG, JPEG, BMP, GIF,
    TIFF, WebP, ...) and converted to RGB (or to one channel with ``grayscale``), so palette,
    grayscale and RGBA files mix freely. Hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints``), ``Thumbs.db`` and ``desktop.ini`` are ignored; files directly in
    ``path`` are not images of any class and are ignored too.

    The decoded arrays are cached in ``data_home``, keyed by the folder, the name, size and
    modification time of every file in it, and the options: adding, removing, replacing or
    touching a file reads the folder again; an unchanged folder loads from the cache.

    Parameters
    ----------
    path : str or Path
        The folder.
    size : int or (int, int), optional
        Resize every image to ``size x size``, or to ``(height, width)`` (bilinear, antialiased
        when shrinking). Without it, all images must already have one size: different sizes are
        an error naming two files and their sizes.
    grayscale : bool, default=False
        One channel (ITU-R 601-2 luma) instead of RGB.
    n_jobs : int or None, default=None
        Files decoded in parallel through :class:`joblib.Parallel` (-1: all CPUs; None: one
        process unless a ``joblib.parallel_config`` says otherwise).
    skip_bad : bool, default=False
        Skip files Pillow cannot read (not an image, truncated, corrupt) and log how many were
        skipped, instead of raising.
    data_home : str or Path, optional
        Where the cache lives (default ``$FEATLEARN_DATA``, else ``~/featlearn_data``).

    Returns
    -------
    Bunch with ``images`` (n, H, W, C) uint8 (C is 3, or 1 with ``grayscale``), ``target`` (n,)
    int64, ``target_names`` (the class folders, sorted), ``filenames`` (n,) the files' paths,
    ``root`` (the folder) and ``skipped`` (``(path, reason)`` of each skipped file).

    Raises
    ------
    DatasetError
        The folder has no class sub-folders or no images; a file is not a readable image
        (without ``skip_bad``), naming it; images differ in size (without ``size``), naming two
        of them. ``OSError`` when ``path`` is missing.

    Examples
    --------
    >>> from featlearn.datasets import load_image_folder
    >>> data = load_image_folder("my_photos", size=32)  # doctest: +SKIP
    >>> data.images.shape, data.target_names  # doctest: +SKIP
    ((1200, 32, 32, 3), ['cats', 'dogs'])
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise OSError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    size = _check_size(size)
    classes, files = _list_image_folder(root)
    options = (size, bool(grayscale), bool(skip_bad))
    listing = [(rel, st_size, mtime) for rel, _, st_size, mtime in files]
    key = hashlib.sha1(repr((_FOLDER_CACHE_VERSION, str(root.resolve()), classes, listing,
                             options)).encode()).hexdigest()[:16]
    cache = get_data_home(data_home) / f"imagefolder-{key}.npz"
    data = None
    if cache.exists():
        try:
            data = _load_folder_cache(cache)
        except Exception:  # a damaged cache is only a cache: rebuild it
            cache.unlink(missing_ok=True)
    if data is None:
        data = _decode_folder(root, files, size, bool(grayscale), skip_bad, n_jobs)
        data["target_names"] = classes
        _save_cache(cache, data)
    skipped = list(zip(data.pop("skipped_files"), data.pop("skipped_reasons")))
    if skipped:
        first, why = skipped[0]
        logger.warning(f"{root}: skipped {len(skipped)} unreadable file(s) of "
                       f"{len(skipped) + len(data['target'])} (first: {first}: {why})")
    return Bunch(images=data["images"], target=data["target"],
                 target_names=[str(c) for c in data["target_names"]],
                 filenames=np.asarray([str(root / f) for f in data["filenames"]]),
                 root=str(root), skipped=[(str(root / f), str(w)) for f, w in skipped])


def image_folder_splits(path):
    """``{"train": Path, "test": Path}`` when ``path`` holds ``train/`` and ``test/`` image
    folders (each one sub-folder per class), else None."""
    root = Path(path).expanduser()
    splits = {s: root / s for s in ("train", "test")}
    if all(p.is_dir() and _has_subfolders(p) for p in splits.values()):
        return splits
    return None


def is_image_folder(path) -> bool:
    """Whether ``path`` is a folder other than an extracted CIFAR-10 archive."""
    path = Path(path).expanduser()
    return path.is_dir() and _batch_dir(path) is None


def _has_subfolders(folder: Path) -> bool:
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(folder))


def _check_size(size):
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    try:
        h, w = pair
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"size must be a positive int or a (height, width) pair of positive "
                         f"ints, got {size!r}")
    return (int(h), int(w))


def _list_image_folder(root: Path):
    """Sorted class names and ``(relative path, class index, size, mtime_ns)`` of every file."""
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders: an image folder holds one "
                           "sub-folder per class, with that class's images in it "
                           f"({root}/CLASS/IMAGE.png)")
    if {"train", "test"} <= set(classes) and _has_subfolders(root / "train"):
        raise DatasetError(f"{root} holds train/ and test/ splits, not classes: load each split "
                           f"(load_image_folder('{root / 'train'}'))")
    files = []
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith(".") or fname in _JUNK_FILES:
                    continue
                full = os.path.join(dirpath, fname)
                st = os.stat(full)
                files.append((os.path.relpath(full, root), index, st.st_size, st.st_mtime_ns))
    if not files:
        raise DatasetError(f"{root} holds no images: its class folders ({', '.join(classes)}) "
                           "are empty")
    return classes, files


def _decode_files(root, relpaths, size, grayscale):
    """Worker: decode files; ``(array, None)`` for each image, ``(None, reason)`` for a bad file."""
    from PIL import Image, UnidentifiedImageError

    resample = getattr(Image, "Resampling", Image).BILINEAR
    results = []
    for rel in relpaths:
        try:
            with Image.open(os.path.join(root, rel)) as im:
                im = im.convert("L" if grayscale else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), resample=resample)
                arr = np.asarray(im, dtype=np.uint8)
        except UnidentifiedImageError:
            results.append((None, "not an image file Pillow can read"))
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            results.append((None, f"corrupt or truncated image ({exc})"))
            continue
        results.append((arr[..., None] if grayscale else arr, None))
    return results


def _decode_folder(root, files, size, grayscale, skip_bad, n_jobs) -> dict:
    from joblib import Parallel, delayed

    groups = [files[s:s + _DECODE_TASK] for s in range(0, len(files), _DECODE_TASK)]
    jobs = (delayed(_decode_files)(str(root), [f[0] for f in g], size, grayscale)
            for g in groups)
    images, first = None, None
    target, names, bad_files, bad_reasons = [], [], [], []
    k = 0
    parallel = Parallel(n_jobs=n_jobs, return_as="generator", prefer="threads")
    for group, results in zip(groups, parallel(jobs)):
        for (rel, index, _, _), (arr, why) in zip(group, results):
            if arr is None:
                if not skip_bad:
                    raise DatasetError(f"{root / rel}: {why}; remove it, or pass skip_bad=True "
                                       "(command line: --skip-bad) to skip unreadable files")
                bad_files.append(rel)
                bad_reasons.append(why)
                continue
            if images is None:
                first = (rel, arr.shape)
                images = np.empty((len(files), *arr.shape), dtype=np.uint8)
            elif arr.shape != first[1]:
                (h0, w0), (h, w) = first[1][:2], arr.shape[:2]
                raise DatasetError(
                    f"{root}: images differ in size: {first[0]} is {h0}x{w0} (height x width) "
                    f"but {rel} is {h}x{w}; pass size=(height, width) or size=N (command line: "
                    "--size HxW or --size N) to resize them all to one size")
            images[k] = arr
            k += 1
            target.append(index)
            names.append(rel)
    if images is None:
        raise DatasetError(f"{root} holds no readable images ({len(bad_files)} file(s) skipped, "
                           f"first: {bad_files[0]}: {bad_reasons[0]})")
    return {"images": images[:k] if k < len(images) else images,
            "target": np.asarray(target, dtype=np.int64),
            "filenames": np.asarray(names, dtype=str),
            "skipped_files": np.asarray(bad_files, dtype=str),
            "skipped_reasons": np.asarray(bad_reasons, dtype=str)}


def _load_folder_cache(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("images", "target", "target_names", "filenames",
                                  "skipped_files", "skipped_reasons")}
