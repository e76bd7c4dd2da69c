"""k-means assignment from reduced-precision products, settled in float32.

A chunk's products ``x.c`` are multiplied cheaply (in bfloat16, or as 8-bit integers), each
value ``a_j = ||c_j||^2 - 2 x.c_j`` comes with a bound ``e_j`` on its error, and only the
centres with ``a_j - e_j <= min(a + e)`` can be the nearest: usually one or two, whose float32
values ``||c_j||^2 - 2 x.c_j`` decide (the first on a tie). So the labels and values are those
of float32 distances, up to float32 rounding, at the cheaper GEMM's cost, and both precisions
give the same labels: each keeps every centre its bound cannot rule out, and the same float32
values settle.

- bfloat16: ``e_j = REFINE_DELTA |x| |c_j|`` over the rounding of both factors and the product.
- int8: rows and centres scaled to ``[-127, 127]`` one scale each (``x ~ s_x q_x``); the
  integer products are exact, and ``x.c - s_x s_c q_x.q_c = (x - s_x q_x).c + s_x q_x.(c - s_c
  q_c)``, so ``e_j = 2 (|x - s_x q_x| |c_j| + |s_x q_x| |c_j - s_c q_c|)``: the residual norms
  themselves, about as tight as bfloat16's bound. int8 GEMMs run at about twice the bfloat16
  rate on CPUs with VNNI or AMX-INT8.

The native kernels (:mod:`featlearn._native`) do this on the CPU: for int8 on a CPU with
AVX512-VNNI in one call for all the rows, split between the kernel's own threads (products in
registers, never written out), else quantization, ``torch._int_mm`` and the settling kernel
chunk by chunk. Elsewhere (CUDA, no C compiler) the same rule runs in torch ops, where int8
products are a float32 GEMM of the integer values (exact: float32 while every partial sum is an
integer below 2^24, else float64).
"""

from __future__ import annotations

import math
import threading

import torch

from featlearn import _native

#: Candidates per row that the torch rule settles by gathered float32 distances (rows with more
#: get the full float32 row).
_CANDIDATES = 8
#: The int8 bound's slack for float32 rounding: its norms grow by this factor, and a margin of
#: ``(d / 16 + 20) 2^-23 (||c||^2 + 2 |x| |c|)`` covers the float32 value's own rounding (the
#: native kernel's rule).
_GROW = 1.0 + 2.0 ** -10


class ReducedProducts:
    """The centres ``C`` (float32, ``(k, d)``) prepared once per pass for reduced-precision
    products in ``precision`` ("bfloat16" or "int8"); :meth:`assign` then settles a chunk of
    rows into ``values`` and ``labels``, from any worker thread."""

    #: The fused int8 kernel's centres (:func:`featlearn._native.pack_centres_int8`), when it
    #: runs here.
    packed = None

    def __init__(self, C: torch.Tensor, c_sq: torch.Tensor, precision: str):
        self.C = C.contiguous()
        self.c_sq = c_sq.contiguous()
        self.c_norm = c_sq.sqrt()
        self.precision = precision
        self.native = C.device.type == "cpu" and _native.available()
        if precision == "bfloat16":
            self.Ct = self.C.to(torch.bfloat16).t()
            self.products = torch.bfloat16
        elif precision == "int8" and self.native and _native.int8_fused():
            # Products, bound and settling in one native pass per range of rows.
            self.packed = _native.pack_centres_int8(self.C, self.c_sq, self.c_norm)
        elif precision == "int8":
            Cq, c_scale, self.c_resid, _ = quantize(self.C, native=self.native)
            self.c_scale2 = c_scale + c_scale
            # On the CPU an int8 GEMM (VNNI, AMX) where torch has one; else the integer values
            # in a float type whose sums are exact.
            int_mm = self.native and hasattr(torch, "_int_mm")
            self.products = torch.int32 if int_mm else _exact_dtype(C.shape[1])
            self.Ct = (Cq if int_mm else Cq.to(self.products)).t()
        else:
            raise ValueError(f"no reduced-precision products in {precision!r}")

    @property
    def threaded(self) -> bool:
        """Whether :meth:`assign` splits its rows between threads of its own (the fused int8
        kernel), so that the caller passes all its rows at once instead of chunks to workers."""
        return self.packed is not None

    def assign(self, Xc: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, *,
               threads: int = 1, alongside=None) -> None:
        """The float32 nearest centre of each row of ``Xc`` into ``values`` and ``labels``
        (``c_sq - 2 x.c``, without ``||x||^2``). ``threads`` and ``alongside`` (run on the
        calling thread meanwhile): :func:`featlearn._native.assign_int8`, when :attr:`threaded`."""
        if self.packed is not None:
            _native.assign_int8(Xc, self.packed, values, labels, threads=threads,
                                alongside=alongside)
            return
        if alongside is not None or threads != 1:
            raise ValueError("only the fused int8 assignment runs threads of its own")
        m, d = Xc.shape
        k = self.C.shape[0]
        S = _scratch("products", (m, k), self.products, Xc.device)
        if self.precision == "bfloat16":
            Xl = _scratch("rows", (m, d), torch.bfloat16, Xc.device)
            torch.mm(Xl.copy_(Xc), self.Ct, out=S)
            if self.native:
                _native.refine_argmin(S, Xc, self.C, self.c_sq, self.c_norm, values, labels)
                return
            a = self.c_sq - 2 * S.float()
            e = (_native.REFINE_DELTA * torch.sqrt((Xc * Xc).sum(1, keepdim=True))) * self.c_norm
            e += self.c_sq * 2.0 ** -20
            _settle(a, e, Xc, self.C, self.c_sq, values, labels)
            return
        Q = _scratch("rows", (m, d), torch.int8, Xc.device)
        if self.native:
            out = tuple(_scratch(name, (m,), torch.float32, Xc.device)
                        for name in ("scales", "residuals", "norms"))
            Q, sx, rx, xq = _native.quantize_rows(Xc, Q, out)
        else:
            Q, sx, rx, xq = quantize(Xc, Q, native=False)
        if self.products == torch.int32:
            torch._int_mm(Q, self.Ct, out=S)
        else:
            torch.mm(Q.to(S.dtype), self.Ct, out=S)
        if self.native:
            _native.refine_argmin_int8(S, Xc, (sx, rx, xq), self.C, self.c_sq, self.c_norm,
                                       (self.c_scale2, self.c_resid), values, labels)
            return
        a = self.c_sq - (sx[:, None] * self.c_scale2) * S.float()
        margin = (d // 16 + 20) * 2.0 ** -23
        xn = torch.sqrt((Xc * Xc).sum(1, keepdim=True))
        e = (2 * _GROW * rx[:, None] + 2 * margin * xn) * self.c_norm
        e += (2 * _GROW * xq[:, None]) * self.c_resid + margin * self.c_sq
        _settle(a, e, Xc, self.C, self.c_sq, values, labels)


#: Each thread's chunk buffers, kept between calls on the CPU: a mini-batch step is a few
#: chunks, and allocating their buffers afresh is torch calls that each may wait for the GIL
#: while the other worker runs Python (most of a small step's overhead).
_SCRATCH = threading.local()


def _scratch(name: str, shape, dtype, device) -> torch.Tensor:
    """A ``shape`` buffer: the first rows of this thread's buffer ``name`` (CPU), reallocated
    when it is too short or of another type or width."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(name)
    if (buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:]
            or buf.shape[0] < shape[0]):
        buf = bufs[name] = torch.empty(shape, dtype=dtype)
    return buf[:shape[0]]


def _exact_dtype(d: int) -> torch.dtype:
    """A float type whose GEMM sums ``d`` products of integers in [-127, 127] exactly."""
    return torch.float32 if d * 127 * 127 < 2 ** 24 else torch.float64


def quantize(X: torch.Tensor, Q: torch.Tensor | None = None, *, native: bool):
    """``(Q, scale, resid, qnorm)`` of :func:`featlearn._native.quantize_rows`, by the native
    kernel or the same rule in torch ops (the same ``Q`` and ``scale``; norm bounds within
    float32 rounding of each other)."""
    if native:
        return _native.quantize_rows(X, Q)
    d = X.shape[1]
    m = X.abs().amax(1)
    usable = m >= 2.0 ** -100              # smaller rows: all residual
    inv = torch.where(usable, torch.full_like(m, 127.0) / m, 0.0)   # a true division
    scale = torch.where(usable, m / 127, 0.0)
    y = X * inv[:, None]
    q = torch.round(y).clamp_(-127, 127)
    resid = torch.where(usable, scale * ((y - q).norm(dim=1) + math.sqrt(d) * 2.0 ** -14),
                        m * math.sqrt(d) * (1 + 2.0 ** -20))
    qnorm = scale * q.norm(dim=1)
    if Q is None:
        Q = q.to(torch.int8)
    else:
        Q.copy_(q)
    return Q, scale, resid, qnorm


def _settle(a: torch.Tensor, e: torch.Tensor, Xc: torch.Tensor, C: torch.Tensor,
            c_sq: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> None:
    """The float32 nearest among the centres with ``a - e <= min(a + e)`` per row, in torch
    ops: the ``_CANDIDATES`` lowest bounds gathered, rows with more candidates by their whole
    float32 row."""
    upper = (a + e).amin(1, keepdim=True)
    low = a.sub_(e)
    m = min(_CANDIDATES, C.shape[0])
    cand = torch.topk(low, m, dim=1, largest=False).indices.sort(1).values  # column order
    dots = torch.bmm(C[cand], Xc.unsqueeze(2)).squeeze(2)
    vals = c_sq[cand] - (dots + dots)
    vals.masked_fill_(low.gather(1, cand) > upper, math.inf)
    best, at = vals.min(1)
    values.copy_(best)
    labels.copy_(cand.gather(1, at[:, None]).squeeze(1))
    over = torch.nonzero((low <= upper).sum(1) > m).flatten()
    if over.numel():  # more candidates than gathered: the float32 row decides
        D = torch.addmm(c_sq, Xc[over], C.t(), beta=1, alpha=-2)
        v, j = torch.min(D, 1)
        values[over], labels[over] = v, j
