"""Small native (C) kernels for the compiled encoder and k-means on the CPU, where one pass per
row that stays in L1 beats what a compiled graph or a torch reduction does in whole-chunk passes.

- :func:`nearest_thresholds`: each row's ``rank``-th smallest signed distance, for ``y`` and
  ``-y`` (the nearest-fraction code). Neither ``torch.kthvalue`` (a sort-like pass per row) nor
  a compiled graph does this per-row order statistic at the GEMM's pace: inductor turns the
  bisection of :func:`featlearn.activations.bracket_thresholds` into one pass over the whole
  chunk per halving. Here each row is loaded once and its two selections run side by side in
  counting loops the C compiler vectorizes: a first bracket around the previous row's answer
  (neighbouring patches rank their centroids alike), then interpolation and halving steps,
  until the answer is the smallest or the largest entry left in the bracket. The result is the
  order statistic itself, bit for bit (the signed distances are formed with
  :func:`featlearn.activations._signed`'s own operations and roundings).
- :func:`triangle_pool`: the triangle activation summed over cells (a grid, or pooling windows
  that may overlap), row by row: each row's ``z = sqrt(max(D, 0))`` is computed once into an L1
  buffer, its mean taken, and ``max(0, mean - z)`` added to the row's cells, where the compiled
  graph reads the chunk twice and takes every square root twice. The same numbers up to
  float32 summation order. :func:`nearest_pool` pools the nearest-fraction code the same way.
- :func:`row_argmin`: ``torch.min(D, 1)`` for k-means' float32 distances, whose indexed minimum
  torch runs as a scalar loop on the CPU.
- :func:`refine_argmin`: the k-means assignment from bfloat16 products, settled in float32 for
  the few centres their rounding leaves in contention (``precision="bfloat16"``).
- :func:`quantize_rows` and :func:`refine_argmin_int8`: the same from exact products of rows
  and centres quantized to 8-bit integers (``precision="int8"``).
- :func:`pack_centres_int8` and :func:`assign_int8`: the int8 assignment fused (products in
  registers by AVX512-VNNI, bound and settling in the same pass), where the CPU has VNNI; its
  rows split between C threads of its own (POSIX threads, started per call).
- :func:`centre_sums`: k-means' per-centre sums and counts (``index_add_`` and ``bincount``'s
  numbers) in one pass, and :func:`minibatch_update`: those and a mini-batch step's update,
  where the torch ops are a dozen small passes over the centres.
- :func:`standardize_rows`: a classifier's mini-batch gathered from float16 features,
  standardized and rounded to bfloat16 in one pass.

The C source (``_native.c``, beside this module) is compiled once per machine with the
system's C compiler (the one inductor needs anyway), into featlearn's own cache folder, and
loaded with :mod:`ctypes`, which releases the GIL during a call, so the encoder's worker threads
run their kernels at the same time. Without a compiler or the source, or on any failure,
:func:`available` is False and the callers keep their compiled graphs (one warning line).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ._logging import logger

#: The kernels' C source, shipped beside this module (package data).
_SOURCE_FILE = Path(__file__).with_name("_native.c")

#: ``-ffp-contract=off``: no fused multiply-adds, so every rounding is the one torch makes (the
#: fused int8 kernel's bounds use them explicitly, within the margin that covers rounding).
#: ``-pthread``: that kernel's own threads.
#: ``-march=native`` first (the count loops vectorize to the CPU's widest registers), then without
#: it for a compiler that does not know the flag.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]
_TRIES = (["-march=native"], [])
_LOCK = threading.Lock()
_STATE: dict = {}


def _compiler():
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    """featlearn's own folder for compiled code, private to this user: under
    ``$FEATLEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/featlearn`` (``~/.cache/featlearn``)."""
    base = os.environ.get("FEATLEARN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "featlearn")
    path = Path(base) / "native"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is not private to this user; not loading code from it")
    return path


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build():
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    source = _SOURCE_FILE.read_text()
    folder = _cache_dir()
    error = ""
    for extra in _TRIES:
        flags = _FLAGS + extra
        key = hashlib.sha256("\0".join([source, " ".join(flags), version, _cpu_key()])
                             .encode()).hexdigest()[:16]
        lib = folder / f"kernels-{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                src.write_text(source)
                run = subprocess.run([compiler, *flags, str(src), "-o", str(out)],
                                     capture_output=True, text=True, timeout=300)
                if run.returncode != 0:
                    error = (run.stderr.strip().splitlines() or [""])[0]
                    continue
                os.replace(out, lib)  # atomic: another process sees the whole file or none
        dll = ctypes.CDLL(str(lib))
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        dll.featlearn_nearest_thresholds.argtypes = [P, I64, I, P, I64, I, I, P]
        dll.featlearn_triangle_pool.argtypes = [P, I64, I, I64, I, I, I, P, P, P, P, I, I, P]
        for fn in (dll.featlearn_nearest_thresholds, dll.featlearn_triangle_pool):
            fn.restype = ctypes.c_int
        dll.featlearn_nearest_pool.argtypes = [P, I64, I, P, P, I64, I, I, I, P, P, P, P, I, I,
                                               P]
        dll.featlearn_nearest_pool.restype = ctypes.c_int
        dll.featlearn_standardize_rows.argtypes = [P, I64, I64, P, I64, P, P, I, P]
        dll.featlearn_standardize_rows.restype = None
        dll.featlearn_minibatch_update.argtypes = [P, I64, I64, I, P, P, P, I64, P, P, P, P, P]
        dll.featlearn_minibatch_update.restype = ctypes.c_int64
        dll.featlearn_centre_sums.argtypes = [P, I64, I64, I, P, P, I64, P, P]
        dll.featlearn_centre_sums.restype = ctypes.c_int
        dll.featlearn_row_argmin.argtypes = [P, I64, I64, I, P, P]
        dll.featlearn_row_argmin.restype = None
        F = ctypes.c_float
        dll.featlearn_refine_argmin.argtypes = [P, I64, P, I64, I, P, P, P, I64, I, F, P, P]
        dll.featlearn_refine_argmin.restype = ctypes.c_int
        dll.featlearn_quantize_rows.argtypes = [P, I64, I64, I, P, I64, P, P, P]
        dll.featlearn_quantize_rows.restype = None
        dll.featlearn_refine_argmin_int8.argtypes = [P, I64, P, I64, I, P, P, P, P, P, P, P, P,
                                                     I64, I, P, P]
        dll.featlearn_refine_argmin_int8.restype = ctypes.c_int
        dll.featlearn_int8_fused.argtypes = []
        dll.featlearn_int8_fused.restype = ctypes.c_int
        dll.featlearn_pack_centres_int8.argtypes = [P, I, I, P, P, I, P, P, P, P, P]
        dll.featlearn_pack_centres_int8.restype = ctypes.c_int
        dll.featlearn_assign_int8.argtypes = [P, I64, I64, I, P, I, P, P, P, P, P, P, P]
        dll.featlearn_assign_int8.restype = ctypes.c_int
        dll.featlearn_assign_int8_start.argtypes = [P, I64, I64, I, P, I, P, P, P, P, P, P, P, I]
        dll.featlearn_assign_int8_start.restype = P
        dll.featlearn_assign_int8_join.argtypes = [P]
        dll.featlearn_assign_int8_join.restype = ctypes.c_int
        return dll
    raise OSError(f"{compiler} failed: {error}")


def _library():
    if "lib" in _STATE:
        return _STATE["lib"]
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"] = _build()
            except Exception as exc:  # noqa: BLE001 - any failure means: keep the compiled graphs
                _STATE["lib"] = None
                logger.warning("could not build featlearn's native encoding kernels (%s: %s); "
                               "using the compiled graphs (same results, slower)",
                               type(exc).__name__, str(exc)[:200])
        return _STATE["lib"]


def available() -> bool:
    """Whether the native kernels are built (or can be) and loaded here; False after a warning."""
    return _library() is not None


def _loaded():
    lib = _library()
    if lib is None:
        raise RuntimeError("featlearn's native kernels are not available here (see the warning "
                           "logged when they failed to build)")
    return lib


def nearest_thresholds(S: torch.Tensor, col_sq: torch.Tensor, rank: int) -> torch.Tensor:
    """``(n, 2)`` thresholds: the ``rank``-th smallest of ``col_sq - 2 S`` and of
    ``col_sq + 2 S`` per row, as :func:`featlearn.activations.nearest_fraction_thresholds`
    gives them over the same columns. ``S`` is a CPU ``(n, m)`` float32 or bfloat16 tensor whose
    rows may be strided (a column block of the products); ``col_sq`` the ``m`` float32 norms."""
    n, m = S.shape
    if S.device.type != "cpu" or S.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native thresholds need CPU float32 or bfloat16 products, got "
                         f"{S.dtype} on {S.device}")
    if not 1 <= rank <= m:
        raise ValueError(f"rank {rank} is outside 1..{m}")
    if S.stride(1) != 1:
        S = S.contiguous()
    cc = col_sq.detach().to(torch.float32).contiguous()
    if cc.shape != (m,):
        raise ValueError(f"col_sq has shape {tuple(cc.shape)}, expected ({m},)")
    out = torch.empty((n, 2), dtype=torch.float32)
    if n and _loaded().featlearn_nearest_thresholds(
            S.data_ptr(), S.stride(0), int(S.dtype == torch.bfloat16), cc.data_ptr(), n, m, rank,
            out.data_ptr()) != 0:
        raise MemoryError("native thresholds: out of memory")
    return out


@functools.lru_cache(maxsize=64)
def _cell_lists(row_bounds, col_bounds, map_shape):
    """For each map row and each map column, the cells (row or column numbers) that hold it,
    as ``(ptr, idx)`` int32 lists: ``idx[ptr[i]:ptr[i + 1]]`` for position ``i``."""
    lists = []
    for bounds, size in ((row_bounds, map_shape[0]), (col_bounds, map_shape[1])):
        cells = [[c for c, (a, b) in enumerate(bounds) if a <= i < b] for i in range(size)]
        ptr = np.cumsum([0] + [len(c) for c in cells])
        lists += [torch.tensor(ptr, dtype=torch.int32),
                  torch.tensor([c for cs in cells for c in cs] or [0], dtype=torch.int32)]
    return tuple(lists)


def _cells(D, n_images, map_shape, row_bounds, col_bounds, pool_op, what):
    """The checks and cell lists shared by the pooling kernels: ``D`` (CPU float32 or
    bfloat16, unit column stride after this) with rows for ``n_images`` maps pooled by sum or
    mean over cells inside the map (a grid, or windows that may overlap). Returns ``(D,
    row_ptr, row_idx, col_ptr, col_idx, n_cells)``."""
    Ph, Pw = map_shape
    n = n_images * Ph * Pw
    if D.device.type != "cpu" or D.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the native {what} needs CPU float32 or bfloat16 products, got "
                         f"{D.dtype} on {D.device}")
    if pool_op not in ("sum", "mean") or D.shape[0] < n:
        raise ValueError(f"the native {what} pools {n} rows by sum or mean, got "
                         f"{D.shape[0]} rows and {pool_op!r}")
    if D.stride(1) != 1:
        D = D.contiguous()
    for bounds, size in ((row_bounds, Ph), (col_bounds, Pw)):
        if not bounds or not all(0 <= a < b <= size for a, b in bounds):
            raise ValueError(f"the cells must be non-empty ranges inside the {Ph}x{Pw} map, "
                             f"got {bounds}")
    return (D, *_cell_lists(row_bounds, col_bounds, tuple(map_shape)),
            len(row_bounds) * len(col_bounds))


@functools.lru_cache(maxsize=64)
def _cell_sizes(row_bounds, col_bounds, inverse):
    """Each cell's size (or ``1 / size``), shaped to scale pooled ``(n, n_cells, K)`` sums."""
    return torch.tensor([[(1.0 / ((r1 - r0) * (c1 - c0)) if inverse else (r1 - r0) * (c1 - c0))
                          for c0, c1 in col_bounds] for r0, r1 in row_bounds],
                        dtype=torch.float32).view(1, -1, 1)


def _mean(out, row_bounds, col_bounds, windows):
    """Sums over the cells -> means, in place, with the eager path's rounding: a grid's sums
    times ``1 / size`` (:func:`featlearn.pooling.pool`), windows' divided by their size
    (``avg_pool2d``). The sizes are made once per grid (this runs per block of images)."""
    if windows:
        out /= _cell_sizes(row_bounds, col_bounds, False)
    else:
        out *= _cell_sizes(row_bounds, col_bounds, True)
    return out


def triangle_pool(D: torch.Tensor, n_images: int, map_shape, row_bounds, col_bounds,
                  pool_op: str = "sum", windows: bool = False) -> torch.Tensor:
    """``(n_images, n_cells, K)``: the triangle activation of ``D`` (squared distances, CPU
    float32 or bfloat16, rows image-major as the encoder lays them out; at least
    ``n_images * rows * cols`` of them) pooled over the cells ``row_bounds`` x ``col_bounds``
    (a grid, or with ``windows`` the pooling windows, which may overlap) with ``"sum"`` or
    ``"mean"``: what :func:`featlearn.activations.activate_and_pool` gives for them, up to
    float32 summation order."""
    row_bounds, col_bounds = (tuple(map(tuple, b)) for b in (row_bounds, col_bounds))
    D, rp, ri, cp, ci, n_cells = _cells(D, n_images, map_shape, row_bounds, col_bounds,
                                        pool_op, "triangle")
    K = D.shape[1]
    out = torch.zeros((n_images, n_cells, K), dtype=torch.float32)
    if n_images and _loaded().featlearn_triangle_pool(
            D.data_ptr(), D.stride(0), int(D.dtype == torch.bfloat16), n_images, *map_shape, K,
            rp.data_ptr(), ri.data_ptr(), cp.data_ptr(), ci.data_ptr(), len(col_bounds),
            n_cells, out.data_ptr()) != 0:
        raise MemoryError("native triangle: out of memory")
    return _mean(out, row_bounds, col_bounds, windows) if pool_op == "mean" else out


def nearest_pool(S: torch.Tensor, col_sq: torch.Tensor, thresholds: torch.Tensor, n_images: int,
                 map_shape, row_bounds, col_bounds, pool_op: str = "sum",
                 windows: bool = False) -> torch.Tensor:
    """``(n_images, n_cells, 2K)``: the nearest-fraction code of the products ``S`` (CPU float32
    or bfloat16, rows laid out as for :func:`triangle_pool`) with the rows' ``(n, 2)``
    ``thresholds``, pooled over the cells as :func:`triangle_pool` pools: what
    :func:`featlearn.activations.activate_and_pool` gives for them (sums exactly, means with
    the eager path's rounding)."""
    row_bounds, col_bounds = (tuple(map(tuple, b)) for b in (row_bounds, col_bounds))
    S, rp, ri, cp, ci, n_cells = _cells(S, n_images, map_shape, row_bounds, col_bounds,
                                        pool_op, "nearest-fraction pooling")
    K = S.shape[1]
    cc = col_sq.detach().to(torch.float32).contiguous()
    t = thresholds.detach().to(torch.float32).contiguous()
    rows = n_images * map_shape[0] * map_shape[1]
    if cc.shape != (K,) or t.dim() != 2 or t.shape[1] != 2 or len(t) < rows:
        raise ValueError(f"col_sq of ({K},) and two thresholds per row expected, got "
                         f"{tuple(cc.shape)} and {tuple(t.shape)}")
    out = torch.zeros((n_images, n_cells, 2 * K), dtype=torch.float32)
    if n_images and _loaded().featlearn_nearest_pool(
            S.data_ptr(), S.stride(0), int(S.dtype == torch.bfloat16), cc.data_ptr(),
            t.data_ptr(), n_images, *map_shape, K, rp.data_ptr(), ri.data_ptr(), cp.data_ptr(),
            ci.data_ptr(), len(col_bounds), n_cells, out.data_ptr()) != 0:
        raise MemoryError("native nearest-fraction pooling: out of memory")
    return _mean(out, row_bounds, col_bounds, windows) if pool_op == "mean" else out


def _check_assignment_out(values, labels, n):
    """What the assignment kernels write into: contiguous float32 values, int64 labels, n each."""
    if (values.shape != (n,) or labels.shape != (n,) or values.dtype != torch.float32
            or labels.dtype != torch.int64 or not values.is_contiguous()
            or not labels.is_contiguous()):
        raise ValueError("the native assignment writes into contiguous float32 values and int64 "
                         f"labels of {n} rows")


def row_argmin(D: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> None:
    """``torch.min(D, 1, out=(values, labels))`` for a CPU float32 ``D`` without NaN (rows may
    be strided): the same minima and the same, first, columns, in one vectorized pass. The
    k-means assignment, where torch's indexed minimum is a scalar loop."""
    n, k = D.shape
    if D.device.type != "cpu" or D.dtype != torch.float32 or D.stride(1) != 1 or k < 1:
        raise ValueError(f"the native argmin needs a CPU float32 block with unit column "
                         f"stride, got {D.dtype} on {D.device}, strides {D.stride()}")
    _check_assignment_out(values, labels, n)
    if n:
        _loaded().featlearn_row_argmin(D.data_ptr(), D.stride(0), n, k, values.data_ptr(),
                                       labels.data_ptr())


#: The bound on ``|bf16 product - x.c| / (|x| |c|)`` that :func:`refine_argmin` allows for, over
#: twice the worst case of bfloat16 rounding (each factor, and the output: 3 units of 2**-8,
#: doubled in ``-2 x.c``, 0.0234) with the float32 sums' error: 2**-5.
REFINE_DELTA = 2.0 ** -5


def _check_products(S, dtype, X, C, what):
    """``(n, k, d)`` of products ``S`` (n, k) in ``dtype`` of rows ``X`` (n, d) and centres
    ``C`` (k, d) that the refinements read, or a ValueError: "the native {what} products..."."""
    n, k = S.shape
    d = X.shape[1]
    if (S.device.type != "cpu" or S.dtype != dtype or S.stride(1) != 1
            or X.dtype != torch.float32 or X.stride(1) != 1 or X.shape[0] != n
            or C.shape != (k, d) or C.dtype != torch.float32 or not C.is_contiguous()):
        raise ValueError(f"the native {what} products (n, k), float32 rows (n, d) and "
                         "contiguous float32 centres (k, d)")
    return n, k, d


def refine_argmin(S: torch.Tensor, X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor,
                  c_norm: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> None:
    """The nearest centre of each row of ``X`` from its bfloat16 products ``S = X C^T``
    (computed with float32 accumulation, as CPU GEMMs do): the few centres that the products'
    rounding bound leaves in contention get their float32 value ``c_sq - 2 x.c``, and the
    smallest, the first on a tie, is written into ``values`` and ``labels``. So the labels are
    those of the float32 distances (up to float32 rounding) at the bfloat16 GEMM's cost."""
    n, k, d = _check_products(S, torch.bfloat16, X, C, "refinement needs CPU bfloat16")
    cc, cn = _f32(c_sq), _f32(c_norm)
    if cc.shape != (k,) or cn.shape != (k,):
        raise ValueError(f"centre norms of ({k},) expected")
    _check_assignment_out(values, labels, n)
    if n and _loaded().featlearn_refine_argmin(
            S.data_ptr(), S.stride(0), X.data_ptr(), X.stride(0), d, C.data_ptr(),
            cc.data_ptr(), cn.data_ptr(), n, k, REFINE_DELTA, values.data_ptr(),
            labels.data_ptr()) != 0:
        raise MemoryError("native refinement: out of memory")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32, itself when it is already (no torch call: a kernel called
    per chunk from worker threads avoids ops that would wait for the GIL)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def quantize_rows(X: torch.Tensor, Q: torch.Tensor | None = None, out=None):
    """Each row of a CPU float32 ``X`` (rows may be strided) as 8-bit integers with one scale:
    ``Q = round(x * 127 / max|x|)`` (to nearest even, ``|Q| <= 127``). Returns ``(Q, scale,
    resid, qnorm)``: ``scale = max|x| / 127``, and upper bounds on the norms of ``x - scale Q``
    and of ``scale Q``, which bound the error of products taken from ``Q``
    (:func:`refine_argmin_int8`). A row under 2^-100 is all residual (``Q`` 0, ``scale`` 0).
    ``Q`` (int8 ``(n, d)``, rows may be strided) and ``out`` (three contiguous float32 ``(n,)``)
    are optional output buffers."""
    n, d = X.shape
    if X.device.type != "cpu" or X.dtype != torch.float32 or X.stride(1) != 1:
        raise ValueError("native quantization needs CPU float32 rows with unit column stride")
    if Q is None:
        Q = torch.empty((n, d), dtype=torch.int8)
    elif Q.shape != (n, d) or Q.dtype != torch.int8 or Q.stride(1) != 1:
        raise ValueError(f"the quantized rows are written into an int8 ({n}, {d}) tensor")
    if out is None:
        out = tuple(torch.empty(n, dtype=torch.float32) for _ in range(3))
    elif any(t.shape != (n,) or t.dtype != torch.float32 or not t.is_contiguous() for t in out):
        raise ValueError(f"scales and norms are written into contiguous float32 ({n},) tensors")
    scale, resid, qnorm = out
    if n:
        _loaded().featlearn_quantize_rows(X.data_ptr(), X.stride(0), n, d, Q.data_ptr(),
                                          Q.stride(0), scale.data_ptr(), resid.data_ptr(),
                                          qnorm.data_ptr())
    return Q, scale, resid, qnorm


def refine_argmin_int8(S: torch.Tensor, X: torch.Tensor, rows, C: torch.Tensor,
                       c_sq: torch.Tensor, c_norm: torch.Tensor, centres, values: torch.Tensor,
                       labels: torch.Tensor) -> None:
    """:func:`refine_argmin` from int32 products ``S = Q_x Q_c^T`` of rows and centres quantized
    by :func:`quantize_rows` (``rows``: the rows' ``(scale, resid, qnorm)``; ``centres``: the
    centres' ``(2 * scale, resid)``): the quantization bound leaves a few centres in
    contention, and their float32 values decide. The same labels and values as
    :func:`refine_argmin`: both settle by the same float32 values, and each bound holds."""
    n, k, d = _check_products(S, torch.int32, X, C, "int8 refinement needs CPU int32")
    sx, rx, xq = (_f32(t) for t in rows)
    sc2, rc = (_f32(t) for t in centres)
    cc, cn = _f32(c_sq), _f32(c_norm)
    if (any(t.shape != (k,) for t in (cc, cn, sc2, rc))
            or any(t.shape != (n,) for t in (sx, rx, xq))):
        raise ValueError(f"per-centre ({k},) and per-row ({n},) norms and scales expected")
    _check_assignment_out(values, labels, n)
    if n and _loaded().featlearn_refine_argmin_int8(
            S.data_ptr(), S.stride(0), X.data_ptr(), X.stride(0), d, C.data_ptr(),
            cc.data_ptr(), cn.data_ptr(), sc2.data_ptr(), rc.data_ptr(), sx.data_ptr(),
            rx.data_ptr(), xq.data_ptr(), n, k, values.data_ptr(), labels.data_ptr()) != 0:
        raise MemoryError("native int8 refinement: out of memory")


def int8_fused() -> bool:
    """Whether :func:`assign_int8` is built here: the kernels are, and for a CPU with
    AVX512-VNNI."""
    if "int8_fused" not in _STATE:
        _STATE["int8_fused"] = available() and bool(_loaded().featlearn_int8_fused())
    return _STATE["int8_fused"]


class PackedCentres(NamedTuple):
    """Centres prepared by :func:`pack_centres_int8` for :func:`assign_int8`."""
    C: torch.Tensor        # the float32 centres (k, d), contiguous
    packed: torch.Tensor   # their int8 values in VNNI blocks (uint8)
    kpad: int              # k rounded up to 64
    cc: torch.Tensor       # squared norms, +inf on the padding (kpad,)
    cn: torch.Tensor       # norms (kpad,)
    sc2: torch.Tensor      # twice the quantization scales (kpad,)
    rc: torch.Tensor       # quantization residual norms (kpad,)


def pack_centres_int8(C: torch.Tensor, c_sq: torch.Tensor, c_norm: torch.Tensor) -> PackedCentres:
    """The CPU float32 centres ``C`` quantized as :func:`quantize_rows` and packed for
    :func:`assign_int8`, with their squared norms ``c_sq`` and norms ``c_norm`` (the values
    the assignment settles with)."""
    k, d = C.shape
    if C.device.type != "cpu" or C.dtype != torch.float32 or not C.is_contiguous():
        raise ValueError("the int8 centres are packed from contiguous CPU float32 centres")
    cc, cn = _f32(c_sq), _f32(c_norm)
    if cc.shape != (k,) or cn.shape != (k,):
        raise ValueError(f"centre norms of ({k},) expected")
    kpad = -(-k // 64) * 64
    groups = -(-d // 4)
    packed = torch.empty(kpad * groups * 4, dtype=torch.uint8)
    out = tuple(torch.empty(kpad, dtype=torch.float32) for _ in range(4))
    if _loaded().featlearn_pack_centres_int8(C.data_ptr(), k, d, cc.data_ptr(), cn.data_ptr(),
                                             kpad, packed.data_ptr(),
                                             *(t.data_ptr() for t in out)) != 0:
        raise MemoryError("packing the int8 centres: out of memory, or no VNNI kernel here")
    return PackedCentres(C, packed, kpad, *out)


def assign_int8(X: torch.Tensor, centres: PackedCentres, values: torch.Tensor,
                labels: torch.Tensor, *, threads: int = 1, alongside=None) -> None:
    """:func:`quantize_rows`, the int8 products and :func:`refine_argmin_int8` in one pass for
    the CPU float32 rows ``X`` (rows may be strided): the same labels and values, with the
    products kept in registers (AVX512-VNNI; :func:`int8_fused`).

    ``threads > 1`` splits the rows between ``threads - 1`` C threads of the kernel's own and
    the calling thread, which runs ``alongside()`` first (the caller's independent work, if any):
    each takes the next block of rows until none is left, so the split stays even whatever the
    caller's work costs. No Python runs between them, so a small pass (a mini-batch step) pays
    one thread start instead of hand-offs through the GIL. When ``alongside()`` raises, the
    threads' rows are still finished before the error goes on.
    """
    n, d = X.shape
    if (X.device.type != "cpu" or X.dtype != torch.float32 or X.stride(1) != 1
            or centres.C.shape[1] != d):
        raise ValueError(f"the fused int8 assignment needs CPU float32 rows of "
                         f"{centres.C.shape[1]} columns")
    _check_assignment_out(values, labels, n)
    lib = _loaded()
    args = (X.data_ptr(), X.stride(0), n, d, centres.packed.data_ptr(), centres.kpad,
            centres.C.data_ptr(), centres.cc.data_ptr(), centres.cn.data_ptr(),
            centres.sc2.data_ptr(), centres.rc.data_ptr(), values.data_ptr(), labels.data_ptr())
    handle = lib.featlearn_assign_int8_start(*args, threads - 1) if threads > 1 and n else None
    if handle is None:  # one thread, or none could start: the caller assigns every row
        if alongside is not None:
            alongside()
        got = lib.featlearn_assign_int8(*args) if n else 0
    else:
        try:
            if alongside is not None:
                alongside()
        finally:  # never return while a thread still writes into the caller's buffers
            got = lib.featlearn_assign_int8_join(handle)  # with the caller's share of the rows
    if got == -2:
        raise RuntimeError("the fused int8 assignment is not built for this CPU (no VNNI)")
    if got != 0:
        raise MemoryError("fused int8 assignment: out of memory")


def standardize_rows(X: torch.Tensor, idx: torch.Tensor, mean: torch.Tensor,
                     inv_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``((X[idx].float() - mean) * inv_scale).to(dtype)`` for a CPU float16 ``X`` (rows may be
    strided) in one pass: the same numbers (float32 arithmetic, bfloat16 rounded to nearest
    even from it). A classifier's mini-batch from stored float16 features."""
    if (X.device.type != "cpu" or X.dtype != torch.float16 or X.dim() != 2 or X.stride(1) != 1
            or dtype not in (torch.float32, torch.bfloat16)):
        raise ValueError(f"native standardization reads a CPU float16 matrix into float32 or "
                         f"bfloat16, got {X.dtype} on {X.device} into {dtype}")
    F = X.shape[1]
    idx = idx.to(torch.int64).contiguous()
    mean = mean.to(torch.float32).contiguous()
    inv_scale = inv_scale.to(torch.float32).contiguous()
    if mean.shape != (F,) or inv_scale.shape != (F,):
        raise ValueError(f"mean and inv_scale of ({F},) expected")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(X)):
        raise IndexError(f"row index out of range for {len(X)} rows")
    out = torch.empty((len(idx), F), dtype=dtype)
    if len(idx):
        _loaded().featlearn_standardize_rows(
            X.data_ptr(), X.stride(0), F, idx.data_ptr(), len(idx), mean.data_ptr(),
            inv_scale.data_ptr(), int(dtype == torch.bfloat16), out.data_ptr())
    return out


def _rows_and_weights(X: torch.Tensor, labels: torch.Tensor, weights, what: str):
    """The checks the native per-centre sums share: CPU float32 rows ``(n, d)`` (strided rows
    allowed) and contiguous int64 ``labels`` ``(n,)``; returns ``weights`` as contiguous float32
    ``(n,)`` (or None)."""
    n = X.shape[0]
    if (X.device.type != "cpu" or X.dtype != torch.float32 or X.stride(1) != 1
            or labels.shape != (n,) or labels.dtype != torch.int64
            or not labels.is_contiguous()):
        raise ValueError(f"{what} needs CPU float32 rows (n, d) and int64 labels (n,)")
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
        if weights.shape != (n,):
            raise ValueError(f"weights of ({n},) expected, got {tuple(weights.shape)}")
    return weights


def _check_per_centre(A: torch.Tensor, counts: torch.Tensor, d: int, what: str, name: str):
    """``A`` contiguous float32 ``(k, d)`` and ``counts`` contiguous float64 ``(k,)``."""
    k = A.shape[0]
    if (A.shape != (k, d) or A.dtype != torch.float32 or not A.is_contiguous()
            or counts.shape != (k,) or counts.dtype != torch.float64
            or not counts.is_contiguous()):
        raise ValueError(f"{what} needs contiguous float32 {name} (k, d) and float64 counts "
                         f"(k,)")


def centre_sums(X: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the CPU float32 rows ``X`` (rows may be strided; times ``weights`` with weights) per
    label into ``sums`` (float32 ``(k, d)``) in row order, and their (weighted) counts into
    ``counts`` (float64 ``(k,)``), one by one: what ``index_add_`` gives, and from zero counts
    what ``bincount`` gives, bit for bit, in one pass on one thread."""
    n, d = X.shape
    k = sums.shape[0]
    weights = _rows_and_weights(X, labels, weights, "native centre sums")
    _check_per_centre(sums, counts, d, "native centre sums", "sums")
    if _loaded().featlearn_centre_sums(
            X.data_ptr(), X.stride(0), n, d, labels.data_ptr(),
            None if weights is None else weights.data_ptr(), k, sums.data_ptr(),
            counts.data_ptr()) < 0:
        raise IndexError(f"a label is outside 0..{k - 1}")


def minibatch_update(X: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                     C: torch.Tensor, counts: torch.Tensor):
    """One mini-batch k-means update of the CPU float32 centres ``C`` from the batch ``X``
    (rows may be strided) and its ``labels``: the per-centre sums (of ``X * weights`` with
    weights) in row order and the counts (float64) added to ``counts``, then
    ``C + (sums - batch_count * C) / rate`` with ``rate`` the new count (at least 1; 1 where a
    weighted count is 0): what the torch ops of ``index_add_``, ``bincount`` and that formula
    give, bit for bit. Returns ``(new_centres, new_counts, zero_counts)``."""
    n, d = X.shape
    k = C.shape[0]
    weights = _rows_and_weights(X, labels, weights, "the native mini-batch update")
    _check_per_centre(C, counts, d, "the native mini-batch update", "centres")
    sums = torch.empty((k, d), dtype=torch.float32)
    scratch = torch.empty(2 * k, dtype=torch.float64)
    out = torch.empty_like(C)
    zeros = _loaded().featlearn_minibatch_update(
        X.data_ptr(), X.stride(0), n, d, labels.data_ptr(),
        None if weights is None else weights.data_ptr(), C.data_ptr(), k, counts.data_ptr(),
        sums.data_ptr(), scratch.data_ptr(), scratch[k:].data_ptr(), out.data_ptr())
    if zeros < 0:
        raise IndexError(f"a label is outside 0..{k - 1}")
    return out, scratch[k:], int(zeros)
