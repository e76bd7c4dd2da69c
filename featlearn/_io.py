"""Private file plumbing shared by every stage that writes: atomic replacement, durability
(fsync, preallocation), advisory locks, the user's umask, temporary files a kill leaves behind,
and the rules for what featlearn may overwrite.

The rules (README, "Safety"): featlearn replaces an existing output only when it is a featlearn
result of the same kind (the caller says how to recognise one) or the user passed ``--force`` /
``overwrite=True``; an output that is one of the inputs is always refused; and the output's
folder is checked for writability before any work starts, so a long fit never ends in a failed
write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

#: Temporary files are named ``.NAME.PID.featlearn-tmp``: hidden, and recognisable (with the
#: pid that wrote them) so that a later run can remove those whose writer is dead.
_TMP_SUFFIX = ".featlearn-tmp"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+" + re.escape(_TMP_SUFFIX) + "$")


class OutputExistsError(FileExistsError):
    """An output path exists and featlearn will not replace it (not ours, or it is an input)."""


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was; a SIGKILL leaves the temporary file, which :func:`remove_stale_temporaries`
    clears on a later run. The result gets the mode a plain ``open()`` would give it (the
    user's umask), not mkstemp's 0600.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder, name=None):
    """Delete our temporary files in ``folder`` (for ``name`` only, if given) whose writer is dead."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TMP_RE.match(entry.name)
            if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def same_file(a, b) -> bool:
    """Whether two paths name the same existing file (links and ``..`` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path, *, inputs=(), is_ours=None, overwrite=False, what="output",
                 flag="--force"):
    """Refuse an output path that must not be written; return it as a ``Path``.

    Parameters
    ----------
    path : str or Path
        The file or folder about to be (re)written.
    inputs : iterable of paths
        Files the job reads; an output equal to any of them is refused even with ``overwrite``.
    is_ours : callable(Path) -> bool or None
        Recognises an existing featlearn result of this kind (a matching manifest or metadata).
        An existing path it does not recognise is refused unless ``overwrite``.
    overwrite : bool
        The user's ``--force`` / ``overwrite=True``.
    what, flag : str
        Words for the message: what the path is, and the option that forces it.

    Raises
    ------
    OutputExistsError
        The path is an input, or exists and is not ours (without ``overwrite``).
    OSError
        The folder that would hold it does not exist or is not writable.
    """
    path = Path(path).expanduser()
    for src in inputs:
        if src is not None and same_file(path, src):
            raise OutputExistsError(errno.EEXIST, f"{what} {path} is also an input ({src}); "
                                                  "choose another path")
    if path.exists() and not overwrite and not (is_ours is not None and is_ours(path)):
        raise OutputExistsError(errno.EEXIST, f"{what} {path} exists and was not written by "
                                              f"featlearn; choose another path or pass {flag} "
                                              "to replace it")
    check_writable_dir(path.parent)
    return path


def check_writable_dir(folder):
    """Raise ``OSError`` naming the problem unless ``folder`` exists and a file can be created in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OSError(errno.ENOENT, f"folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".probe.{os.getpid()}.",
                                     suffix=_TMP_SUFFIX)
    except OSError as exc:
        raise OSError(exc.errno, f"folder {folder} is not writable ({exc.strerror})") from exc
    os.close(fd)
    os.unlink(probe)


def fsync_dir(path):
    """fsync a folder, so a rename or a new file in it survives a power cut (where supported)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def preallocate(path, size):
    """Reserve ``size`` bytes of the existing file ``path`` and fsync it.

    A memory-mapped write into a sparse file on a full disk is a ``SIGBUS``; reserved up front,
    the full disk is an ``OSError`` here instead. A filesystem without ``posix_fallocate``
    keeps the sparse file.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL,
                                     getattr(errno, "ENOTSUP", -1)):
                    raise
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path, *, busy, error=OSError):
    """Hold an advisory lock on ``path`` (POSIX ``flock``; released by the OS even on kill -9).

    Another holder is ``error(EBUSY, busy)``; a lock file that cannot be created is ``error``
    too. Without ``fcntl`` (not POSIX) there is no cross-process guard.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    except OSError as exc:
        raise error(exc.errno, f"cannot create lock file {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise error(errno.EBUSY, busy) from exc
        yield
    finally:
        os.close(fd)
