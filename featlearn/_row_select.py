"""The nearest-fraction thresholds in native code: each row's ``rank``-th smallest signed
distance, for ``y`` and ``-y``, found while the row sits in L1.

Why native code: the order statistic is per row and small (a few hundred entries), and neither
``torch.kthvalue`` (a sort-like pass per row) nor a compiled graph does it at the GEMM's pace:
inductor turns the bisection of :func:`featlearn.activations.bracket_thresholds` into one pass
over the whole chunk per halving, each bound by its per-row reductions. Here each row is loaded
once and its two selections run side by side in counting loops the C compiler vectorizes: a
first bracket around the previous row's answer (neighbouring patches rank their centroids
alike), then interpolation and halving steps, until the answer is the smallest or the largest
entry left in the bracket. The result is the order statistic itself, bit for bit (the signed
distances are formed with :func:`featlearn.activations._signed`'s own operations and
roundings), so no fix-up pass is needed.

The C source below is compiled once per machine with the system's C compiler (the one inductor
needs anyway), into featlearn's own cache folder, and loaded with :mod:`ctypes`, which releases
the GIL during the call, so the encoder's worker threads select at the same time. Without a
compiler, or on any failure, :func:`selector` returns None and the caller keeps its compiled
graph (one warning line).
"""

from __future__ import annotations

import ctypes
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

import torch

from ._logging import logger

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define LANES 16

/* The smallest entry >= v of e[0..mp): LANES running minima, so that the compiler vectorizes
   the loop without reassociating anything. */
static float min_from(const float *e, int mp, float v) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = INFINITY;
    for (int j = 0; j < mp; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = e[j + l] >= v ? e[j + l] : INFINITY;
            acc[l] = x < acc[l] ? x : acc[l];
        }
    float r = acc[0];
    for (int l = 1; l < LANES; l++) r = acc[l] < r ? acc[l] : r;
    return r;
}

/* The largest entry below v (or at most v, `closed`) of e[0..mp), as min_from. */
static float max_below(const float *e, int mp, float v, int closed) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = -INFINITY;
    for (int j = 0; j < mp; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = (closed ? e[j + l] <= v : e[j + l] < v) ? e[j + l] : -INFINITY;
            acc[l] = x > acc[l] ? x : acc[l];
        }
    float r = acc[0];
    for (int l = 1; l < LANES; l++) r = acc[l] > r ? acc[l] : r;
    return r;
}

/* One selection: the rank-th smallest of a row's entries lies in the bracket [lo, hi] (or
   [lo, hi) once `open`), with `below` entries under lo and `upto` under the bracket's top. */
typedef struct { float lo, hi; int below, upto, open, interp, done; } Bracket;

/* The smallest and largest of the m entries of each of two rows: LANES running extrema, so
   that the loop vectorizes without reassociating anything. */
static void min_max(const float *x, const float *y, int m, float *mn, float *mx) {
    float n0[LANES], x0[LANES], n1[LANES], x1[LANES];
    for (int l = 0; l < LANES; l++) { n0[l] = x0[l] = x[0]; n1[l] = x1[l] = y[0]; }
    for (int j = 0; j + LANES <= m; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float a = x[j + l], c = y[j + l];
            n0[l] = a < n0[l] ? a : n0[l];
            x0[l] = a > x0[l] ? a : x0[l];
            n1[l] = c < n1[l] ? c : n1[l];
            x1[l] = c > x1[l] ? c : x1[l];
        }
    for (int j = m - m % LANES; j < m; j++) {
        n0[0] = x[j] < n0[0] ? x[j] : n0[0];
        x0[0] = x[j] > x0[0] ? x[j] : x0[0];
        n1[0] = y[j] < n1[0] ? y[j] : n1[0];
        x1[0] = y[j] > x1[0] ? y[j] : x1[0];
    }
    for (int l = 1; l < LANES; l++) {
        n0[0] = n0[l] < n0[0] ? n0[l] : n0[0];
        x0[0] = x0[l] > x0[0] ? x0[l] : x0[0];
        n1[0] = n1[l] < n1[0] ? n1[l] : n1[0];
        x1[0] = x1[l] > x1[0] ? x1[l] : x1[0];
    }
    mn[0] = n0[0]; mx[0] = x0[0]; mn[1] = n1[0]; mx[1] = x1[0];
}

/* The first bracket: the window [w0, w1) when it holds the rank (ca < rank <= cb entries below
   its ends), else the part of [min, max] on the rank's side of it. The window narrows after a
   hit and widens after a miss. */
static void start_from(Bracket *b, int tried, int hit, float w0, float w1, int ca, int cb,
                       float mn, float mx, int m, int rank, float *width) {
    b->interp = 1; b->done = 0;
    if (hit) {
        b->lo = w0; b->hi = w1; b->below = ca; b->upto = cb; b->open = 1;
        *width *= 0.75f;
        return;
    }
    b->lo = mn; b->hi = mx; b->below = 0; b->upto = m; b->open = 0;
    if (tried && cb < rank) { b->lo = w1; b->below = cb; }
    else if (tried) { b->hi = w0; b->upto = ca; b->open = 1; }
    float wide = (mx - mn) * (1.0f / 16.0f);
    *width = 2.0f * *width > wide ? 2.0f * *width : wide;
}

/* The next point to count below, or sets `done` when the answer is known without one: it is
   the smallest entry in the bracket, or the largest (one pass either way), or no float lies
   strictly inside the bracket (the entries left equal lo, or hi when the bracket is closed).
   Points alternate between interpolation (where the rank would lie were the entries evenly
   spread) and halving, so the bracket at least halves every two steps. */
static float next_point(Bracket *b, int rank) {
    int left = b->upto - b->below, r = rank - b->below;
    float mid = b->lo + (b->hi - b->lo) * 0.5f;
    if (b->interp) {
        float guess = b->lo + (b->hi - b->lo) * (((float)r - 0.5f) / (float)left);
        if (guess > b->lo && guess < b->hi) mid = guess;
    }
    if (r == 1 || r == left || !(mid > b->lo && mid < b->hi)) b->done = 1;
    return mid;
}

static void update(Bracket *b, int rank, float mid, int c) {
    int left = b->upto - b->below;
    if (c < rank) { b->lo = mid; b->below = c; }
    else { b->hi = mid; b->upto = c; b->open = 1; }
    b->interp = !b->interp || 2 * (b->upto - b->below) <= left;
}

static float finish(const Bracket *b, const float *e, int mp, int rank) {
    int left = b->upto - b->below, r = rank - b->below;
    if (r == 1) return min_from(e, mp, b->lo);
    if (r == left) return max_below(e, mp, b->hi, !b->open);
    if (b->open) return b->lo;
    int c = 0;
    for (int j = 0; j < mp; j++) c += e[j] < b->hi;
    return c >= rank ? b->lo : b->hi;
}

/* S: n rows of m entries (bfloat16 or float32), `stride` elements apart; cc: the m centroid
   norms. out[2i], out[2i+1]: the thresholds of row i for y and -y, the rank-th smallest of
   cc - (s + s) and cc + (s + s) (the two selections run side by side, one counting loop for
   both). Returns 0, or -1 when out of memory. */
int featlearn_nearest_thresholds(const void *S, int64_t stride, int bf16, const float *cc,
                                 int64_t n, int m, int rank, float *out) {
    int mp = (m + LANES - 1) / LANES * LANES;
    float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)mp);
    if (!buf) return -1;
    float *near = buf, *far = buf + mp;
    for (int j = m; j < mp; j++) near[j] = far[j] = INFINITY;  /* never below a point */
    float prev[2] = {0.0f, 0.0f}, width[2] = {0.0f, 0.0f};
    for (int64_t i = 0; i < n; i++) {
        if (bf16) {
            const uint16_t *row = (const uint16_t *)S + i * stride;
            for (int j = 0; j < m; j++) {
                float d = bf16_to_float(row[j]);
                float twice = d + d;
                near[j] = cc[j] - twice;
                far[j] = cc[j] + twice;
            }
        } else {
            const float *row = (const float *)S + i * stride;
            for (int j = 0; j < m; j++) {
                float twice = row[j] + row[j];
                near[j] = cc[j] - twice;
                far[j] = cc[j] + twice;
            }
        }
        /* A window around the previous row's answer (neighbouring patches rank alike): when
           it holds the rank, the bracket starts there and needs no min/max pass. */
        int ca0 = 0, cb0 = 0, ca1 = 0, cb1 = 0;
        float a0 = prev[0] - width[0], b0 = prev[0] + width[0];
        float a1 = prev[1] - width[1], b1 = prev[1] + width[1];
        if (i > 0)
            for (int j = 0; j < mp; j++) {
                ca0 += near[j] < a0; cb0 += near[j] < b0;
                ca1 += far[j] < a1; cb1 += far[j] < b1;
            }
        int hit0 = i > 0 && ca0 < rank && rank <= cb0, hit1 = i > 0 && ca1 < rank && rank <= cb1;
        float mn[2] = {0.0f, 0.0f}, mx[2] = {0.0f, 0.0f};
        if (!hit0 || !hit1) min_max(near, far, m, mn, mx);
        Bracket a, b;
        start_from(&a, i > 0, hit0, a0, b0, ca0, cb0, mn[0], mx[0], m, rank, &width[0]);
        start_from(&b, i > 0, hit1, a1, b1, ca1, cb1, mn[1], mx[1], m, rank, &width[1]);
        float pa = next_point(&a, rank), pb = next_point(&b, rank);
        while (!a.done || !b.done) {
            /* a finished selection counts below -inf (nothing) until the other one ends */
            float va = a.done ? -INFINITY : pa, vb = b.done ? -INFINITY : pb;
            int ca = 0, cb = 0;
            for (int j = 0; j < mp; j++) {
                ca += near[j] < va;
                cb += far[j] < vb;
            }
            if (!a.done) { update(&a, rank, pa, ca); pa = next_point(&a, rank); }
            if (!b.done) { update(&b, rank, pb, cb); pb = next_point(&b, rank); }
        }
        out[2 * i] = prev[0] = finish(&a, near, mp, rank);
        out[2 * i + 1] = prev[1] = finish(&b, far, mp, rank);
    }
    free(buf);
    return 0;
}
"""

#: ``-ffp-contract=off``: no fused multiply-adds, so every rounding is the one torch makes.
#: ``-march=native`` first (the count loops vectorize to the CPU's widest registers), then without
#: it for a compiler that does not know the flag.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
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
    folder = _cache_dir()
    error = ""
    for extra in _TRIES:
        flags = _FLAGS + extra
        key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), version, _cpu_key()])
                             .encode()).hexdigest()[:16]
        lib = folder / f"row_select-{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = Path(tmp) / "row_select.c", Path(tmp) / "row_select.so"
                src.write_text(_SOURCE)
                run = subprocess.run([compiler, *flags, str(src), "-o", str(out)],
                                     capture_output=True, text=True, timeout=300)
                if run.returncode != 0:
                    error = (run.stderr.strip().splitlines() or [""])[0]
                    continue
                os.replace(out, lib)  # atomic: another process sees the whole file or none
        dll = ctypes.CDLL(str(lib))
        fn = dll.featlearn_nearest_thresholds
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        return fn
    raise OSError(f"{compiler} failed: {error}")


def _function():
    if "fn" in _STATE:
        return _STATE["fn"]
    with _LOCK:
        if "fn" not in _STATE:
            try:
                _STATE["fn"] = _build()
            except Exception as exc:  # noqa: BLE001 - any failure means: keep the compiled graph
                _STATE["fn"] = None
                logger.warning("could not build the native nearest-fraction threshold kernel "
                               "(%s: %s); using the compiled graph (same results, slower)",
                               type(exc).__name__, str(exc)[:200])
        return _STATE["fn"]


def selector():
    """:func:`nearest_thresholds`, or None where the native kernel cannot be built here."""
    return nearest_thresholds if _function() is not None else None


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
    if n and _function()(S.data_ptr(), S.stride(0), int(S.dtype == torch.bfloat16),
                         cc.data_ptr(), n, m, rank, out.data_ptr()) != 0:
        raise MemoryError("native thresholds: out of memory")
    return out
