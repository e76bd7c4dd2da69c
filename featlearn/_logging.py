"""The one place featlearn reports: the ``featlearn`` logger and the tqdm progress helper.

Library code never prints. An estimator's ``verbose`` decides *whether* it reports:

- ``verbose=0``: nothing;
- ``verbose>=1``: one progress bar per long stage and a line per stage (``logger.info``);
- ``verbose>=2``: per-iteration detail as well (Lloyd iterations, L-BFGS evaluations, epochs).

Where the messages go is the ``logging`` module's business. The ``featlearn`` logger writes to
stderr as ``featlearn: message`` through its own handler and does not propagate, so a script that
never configures logging still sees what it asked for with ``verbose``. To route the messages
through your own configuration instead, set ``logging.getLogger("featlearn").propagate = True``:
the default handler then steps aside. (Handlers that other code attaches to the logger, such as
pytest's capture, are left alone and do not silence it.)
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("featlearn")


class _DefaultHandler(logging.StreamHandler):
    """stderr, looked up at emit time (so pytest's capsys and redirected stderr see it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("featlearn: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; stderr is always looked up
        pass

    def emit(self, record):
        if logger.propagate:  # the application routes featlearn's records itself
            return
        super().emit(record)


_default_handler = _DefaultHandler()
logger.addHandler(_default_handler)
logger.setLevel(logging.INFO)
logger.propagate = False


def log(verbose, msg, *args, level=1):
    """``logger.info(msg, *args)`` when ``verbose >= level`` (1: per stage, 2: per iteration)."""
    if (verbose or 0) >= level:
        logger.info(msg, *args)


def progress(total, *, desc, verbose, unit="img", initial=0):
    """A tqdm bar on stderr for one long stage; a silent one when ``verbose < 1``.

    Use it as a context manager (or call ``close()``); ``update(n)`` advances it.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=(verbose or 0) < 1,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
