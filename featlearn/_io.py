"""Private file plumbing: atomic replacement of a file, so a crash never leaves it half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, mode=0o644):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was. ``mode`` replaces mkstemp's 0600, which would hide the file from other users.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
