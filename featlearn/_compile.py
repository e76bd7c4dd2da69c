"""``torch.compile`` for featlearn's kernels, with the eager function as the fallback.

A compiled kernel must never break a run: no C++ compiler (inductor's CPU backend needs one),
no Triton, an unsupported device or any error while compiling or running the compiled code
logs one warning line and the same call is answered by the eager function, which then serves
every later call of that kernel. Compiled code is cached on disk by inductor itself (its FX
graph cache, under ``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``), so
the full compilation is paid once per machine and a later process only re-traces.
"""

from __future__ import annotations

import functools
import threading

import torch

from ._logging import logger

#: Devices whose inductor backend is stable enough to use by default (MPS is experimental).
COMPILE_DEVICES = frozenset({"cpu", "cuda"})
#: Specialisations allowed per kernel before dynamo stops compiling it: every encoder
#: configuration (grid, stride, activation, chunk shape) is one, and a grid search visits many.
_RECOMPILE_LIMIT = 64
#: Held for a kernel's first call (its compilation): the encoder's worker threads share one
#: kernel and call it at the same moment; the first compiles, the others wait for its graph.
_FIRST_CALL = threading.Lock()


class CompiledKernel:
    """Call ``fn(*args, **static)`` through ``torch.compile``, falling back to eager.

    ``static`` holds the Python constants the graph is specialised on (shapes, bounds, names);
    the tensors go in ``args``. ``mode`` and ``options`` are passed to :func:`torch.compile`.
    """

    def __init__(self, fn, *, name: str, mode: str | None = None, options: dict | None = None,
                 **static):
        self.eager = functools.partial(fn, **static)
        self.name = name
        self.mode = mode
        self.options = options
        self._compiled = None
        self._warm = False
        self.failed = False

    def __call__(self, *args):
        if not self._warm:
            # The recompile limit only matters when dynamo compiles, which a kernel's later
            # calls (same shapes) do not: patching dynamo's global config there from several
            # threads at once could leave it changed.
            with _FIRST_CALL, torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                result = self._call(*args)
            self._warm = True
            return result
        return self._call(*args)

    def _call(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            if self._compiled is None:
                extra = {"options": self.options} if self.options else {"mode": self.mode}
                self._compiled = torch.compile(self.eager, dynamic=False, **extra)
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            self.failed = True
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            logger.warning("could not compile the %s kernel (%s: %s); running it "
                           "eagerly (same results, slower)", self.name, type(exc).__name__,
                           first)
            return self.eager(*args)
