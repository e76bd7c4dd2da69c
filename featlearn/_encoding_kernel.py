"""The chunk kernel of :class:`featlearn.PatchEncoder`: a fitted encoder's numbers as a
:class:`Plan` (:meth:`featlearn.PatchEncoder.encoding_plan`), and a :class:`Kernel`
(:meth:`Plan.kernel`) that encodes chunks of images with them on one device.

How the work is laid out
------------------------
Per chunk of ``B`` images with ``L`` patch positions each:

1. im2col in the library's HWC layout (:func:`featlearn.patches.flatten_patches`): ``(B*L, d)``.
2. Contrast normalization on those rows (mean subtracted *before* squaring: no cancellation on
   0..255 pixels) and whitening ``(u - M) W`` as one small ``(B*L, d) @ (d, d')`` GEMM.
   The whitened rows are written into an *augmented* buffer ``[y, 1, ||y||^2]``.
3. One GEMM against the augmented dictionary ``[-2 C^T; ||c||^2; 1]`` gives the squared distances
   ``||y||^2 + ||c||^2 - 2 y.c`` directly in a preallocated buffer: no broadcast passes. The
   dot-product activations multiply ``y`` by ``C^T`` alone.
4. Activation and pooling (:mod:`featlearn.activations`): eagerly one pass per operation (clamp,
   sqrt, mean over K, ``max(0, mu - z)``, pooled rows first, then columns), or, with
   ``compile``, one inductor-generated graph that reads the buffer once for the row means and
   once for the pooled features. The dot-product activations get the norms they need as
   tensors (``||y||^2`` is the augmented buffer's last column, ``||c||^2`` computed once).
   On the CPU the triangle and the nearest-fraction code over a grid or windows are native
   kernels (:mod:`featlearn._native`), and steps 3 and 4 then run a block of whole images at
   a time, so that the kernels read the products from the cache the GEMM left them in.

Why not fold normalization and whitening into the centroids (filters ``F = W c``, per-position
corrections from box filters): it saves no products (``||y||^2`` still needs the ``d x d'``
whitening products, and ``y . c`` then costs what ``x . F`` would), it has worse float32
conditioning (``x.F - m * sum(F)`` cancels on raw pixels), and it needs a rescaling pass over the
``K`` columns. The whitening alone is folded, in float32 for the activations that read dot
products and no ``||y||^2`` (the nearest-fraction code, the soft threshold): their GEMM takes the
normalized patches against ``[W C^T; -M W C^T]`` and the whitening GEMM disappears.

Why a GEMM and not ``conv2d``: a convolution with the ``K`` filters computes the same
``(L*B, d) x (d, K)`` products, in the layout its backend prefers rather than the one the
activation reads, and its output would still need the per-row corrections
(benchmarks/results/encode.md compares the two). Chunks are a few images on the CPU, so the
elementwise passes run from cache; on a GPU the chunk is sized from free memory.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from . import _native
from ._compile import CompiledKernel
from ._torch import chunk_size, cpu_workers, over_chunks, resolve_device, to_numpy
from .activations import (ACTIVATIONS, BRACKET_ITERS, activate_and_pool, bracket_thresholds,
                          fix_thresholds, n_nearest, selection_columns, selection_rank)
from .patches import flatten_patches
from .preprocessing import PatchNormalizer, ZCAWhitening


#: Working-set target of one CPU worker's chunk: a few CIFAR images at K=1600, enough rows for
#: the GEMM to run at its rate, few enough that the activation/pooling passes read the products
#: from the cache (benchmarks/results/contention.md compares chunk sizes).
_CPU_CHUNK_BYTES = 24 * 2**20
#: Upper bound on images per chunk on an accelerator (bounds index/one-hot temporaries).
_MAX_GPU_CHUNK = 4096
#: Products per GEMM call on the CPU where native kernels activate and pool them: whole images
#: up to about this many bytes (at least one image), so that the kernels read them back from
#: the cache the GEMM wrote them to, not from memory.
_CPU_BLOCK_BYTES = 3 * 2**20


class Plan:
    """The fitted numbers and encoding-time parameters of one encoder, as numpy and plain
    Python objects: a plan pickles to ``n_jobs`` workers and runs on any device.

    :meth:`featlearn.PatchEncoder.encoding_plan` builds it; :meth:`kernel` makes the
    :class:`Kernel` that encodes chunks of images with it on a device. ``precision`` is
    resolved ("float32" or "bfloat16", never "auto"), so every worker computes the same numbers.
    """

    def __init__(self, *, patch_size, stride, image_shape, map_shape, row_bounds, col_bounds,
                 normalizer, whitener, centers, activation, alpha, pool_op, flip,
                 fraction=0.4, selection="exact", layout="flat", window=None,
                 precision="float32", batch_size="auto"):
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"a Plan's precision is 'float32' or 'bfloat16' (resolved), got "
                             f"{precision!r}")
        self.patch_size, self.stride = patch_size, stride
        self.image_shape, self.map_shape = image_shape, map_shape
        self.row_bounds, self.col_bounds = row_bounds, col_bounds
        self.activation, self.alpha, self.pool_op = activation, alpha, pool_op
        self.fraction, self.selection, self.layout = fraction, selection, layout
        self.window = window  # (size_h, size_w, stride_h, stride_w) of pool_size windows
        self.precision = precision
        self.batch_size = batch_size  # images per chunk, or "auto" (see chunk_images)
        self.centers = centers
        self.flip = flip
        self.d = patch_size * patch_size * image_shape[2]
        self.K = centers.shape[0]
        self.d_out = centers.shape[1]
        # Normalization: the torch kernel for PatchNormalizer, else the estimator's transform.
        self.norm = None
        self.norm_est = None
        if isinstance(normalizer, PatchNormalizer):
            self.norm = (float(normalizer.eps), int(normalizer.ddof))
            if self.d <= self.norm[1]:
                raise ValueError(f"patches of {self.d} values are too small for ddof={self.norm[1]}")
        elif normalizer != "passthrough":
            self.norm_est = normalizer
        # Whitening: (u - mean_) @ whitening_ in the kernel for ZCAWhitening, else transform.
        self.white_mean = self.white_mat = self.white_est = None
        if isinstance(whitener, ZCAWhitening):
            self.white_mean = np.asarray(whitener.mean_, dtype=np.float32)
            self.white_mat = np.asarray(whitener.whitening_, dtype=np.float32)
        elif whitener != "passthrough":
            self.white_est = whitener

    @property
    def n_cells(self):
        return len(self.row_bounds) * len(self.col_bounds)

    @property
    def per_cell(self):
        return ACTIVATIONS[self.activation].width * self.K

    @property
    def pooled_shape(self):
        """``(rows, cols)`` of the pooled map: the grid, or the number of windows."""
        return (len(self.row_bounds), len(self.col_bounds))

    def native_pooling(self, device) -> bool:
        """Whether the native kernels activate and pool on ``device`` (with ``compiled``): the
        triangle or the nearest-fraction code over a grid or windows, summed or averaged, on
        the CPU, when the kernels are built. Nothing is then compiled by inductor."""
        return (device.type == "cpu"
                and self.activation in ("triangle", "nearest_fraction")
                and self.pool_op in ("sum", "mean") and _native.available())

    def bytes_per_image(self, compiled=False):
        """Working-set bytes per image of a chunk: the products, and eagerly also the
        activation map (a compiled graph reduces it as it reads the products)."""
        L = self.map_shape[0] * self.map_shape[1]
        n_big = 1 if compiled else ACTIVATIONS[self.activation].width
        floats = L * (n_big * self.K + 2 * self.d + 2 * (self.d_out + 2)) + np.prod(self.image_shape)
        return int(floats * 4)

    def chunk_images(self, device, compiled=False) -> int:
        """Images per chunk on ``device``: the encoder's ``batch_size``, or for "auto" a CPU
        chunk near the cache and an accelerator chunk sized from its free memory."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        device = resolve_device(device)
        per_image = self.bytes_per_image(compiled)
        if device.type == "cpu":
            return chunk_size(per_image, device, budget=_CPU_CHUNK_BYTES)
        return chunk_size(per_image, device, maximum=_MAX_GPU_CHUNK)

    def kernel(self, device, n_images=None, *, batch=None, compiled=False) -> "Kernel":
        """A :class:`Kernel` on ``device`` for chunks of ``batch`` images (default
        :meth:`chunk_images`), no more than ``n_images`` when given: its buffers are allocated
        once, and ``kernel.encode(chunk)`` returns the chunk's pooled features there."""
        device = resolve_device(device)
        return Kernel(self, device, self._batch(device, n_images, batch, compiled),
                      compiled=compiled)

    def kernel_pool(self, device, n_images=None, *, batch=None, compiled=False) -> "KernelPool":
        """The kernels of :meth:`kernel` for worker threads, one per worker (:class:`KernelPool`)."""
        device = resolve_device(device)
        return KernelPool(self, device, self._batch(device, n_images, batch, compiled),
                          compiled=compiled)

    def _batch(self, device, n_images, batch, compiled):
        batch = self.chunk_images(device, compiled) if batch is None else int(batch)
        return batch if n_images is None else min(batch, max(1, int(n_images)))


class Kernel:
    """Device tensors and preallocated buffers for encoding chunks of up to ``batch`` images.

    With ``compiled``, the activation and pooling run through one compiled graph specialised
    on the full chunk shape: a short last chunk is padded (its extra rows hold the previous
    chunk's products and are dropped), so every image passes through the same code. The kernels
    of a :class:`KernelPool` share their compiled graphs (``graphs=``).
    """

    def __init__(self, plan: Plan, device: torch.device, batch: int, compiled: bool = False,
                 graphs=None):
        self.plan, self.device, self.batch = plan, device, batch
        f32 = dict(device=device, dtype=torch.float32)
        H, W, C = plan.image_shape
        Ph, Pw = plan.map_shape
        L, d, dp, K = Ph * Pw, plan.d, plan.d_out, plan.K
        p = plan.patch_size
        self.L = L
        self.images = torch.empty((batch, H, W, C), **f32)
        self.patches = torch.empty((batch, Ph, Pw, p, p, C), **f32)
        c = torch.from_numpy(plan.centers).to(**f32)  # (K, d')
        act = ACTIVATIONS[plan.activation]
        self.col_sq = (c.double() ** 2).sum(1).float()
        if act.products == "unit_dot":  # unit-norm centroids; a zero one stays zero
            c = c * torch.where(self.col_sq > 0, self.col_sq, 1.0).rsqrt().view(-1, 1)
        # float32 dot products that need no ||y||^2 take the whitening folded into the
        # dictionary: y.c = (u - M) W c = u (W c) - M W c, so one GEMM of the normalized patches
        # [u, 1] against [W C^T; -M W C^T] gives them, without the whitening GEMM or the
        # whitened rows (the same products but for float32 rounding: 0.002% of nearest-40%
        # features change by one count). Not in bfloat16: rounding u and W C^T there instead of
        # y and C moves the features 1.6x as far from float32's.
        self.fold = (act.products == "dot" and "row_sq" not in act.norms
                     and plan.white_mat is not None and plan.precision == "float32")
        self._y_pad = self.y_aug = None
        if self.fold:
            F = torch.from_numpy(plan.white_mat).to(device, torch.float64) @ c.double().T
            aug = torch.empty((d + 1, K), **f32)
            aug[:d] = F
            aug[d] = -(torch.from_numpy(plan.white_mean).to(F) @ F)
        else:
            # Whitened rows, augmented with [1, ||y||^2] so one GEMM yields squared distances:
            # the first dp + 2 columns of a buffer whose rows are padded to whole 16-float
            # blocks, the shape at which the whitening GEMM runs at its rate (110 columns do not).
            self._y_pad = torch.zeros((batch * L, -(-(dp + 2) // 16) * 16), **f32)
            self.y_aug = self._y_pad[:, : dp + 2]
            if act.products != "sqdist":  # dot products: the GEMM reads y's dp columns only
                aug = c.T.contiguous()
            else:
                aug = torch.empty((dp + 2, K), **f32)
                aug[:dp] = -2.0 * c.T
                aug[dp] = self.col_sq
                aug[dp + 1] = 1.0
        self.select = self.native = None
        if compiled and plan.activation == "nearest_fraction":
            # The selection's columns first, so that the thresholds read a contiguous block of
            # each row; the pooled features are put back in centroid order.
            cols = selection_columns(K, plan.selection)
            order = np.concatenate([cols, np.setdiff1d(np.arange(K), cols)])
            order_t = torch.from_numpy(order).to(device)
            aug, self.col_sq = aug[:, order_t], self.col_sq[order_t]
            inverse = torch.from_numpy(np.argsort(order)).to(device)
            self.unorder = torch.cat([inverse, inverse + K])
            rank = selection_rank(K, n_nearest(plan.fraction, K), len(cols))
            self.select = (len(cols), rank)
            if device.type == "cpu" and _native.available():
                self.native = _native.nearest_thresholds
        # The triangle or the nearest-fraction code over a grid or windows, summed or
        # averaged: on the CPU a native kernel (one pass per row from L1) in place of the
        # compiled graph.
        self.native_pool = None
        if compiled and plan.native_pooling(device):
            pool = (_native.triangle_pool if plan.activation == "triangle"
                    else _native.nearest_pool)
            self.native_pool = functools.partial(
                pool, map_shape=plan.map_shape, row_bounds=plan.row_bounds,
                col_bounds=plan.col_bounds, pool_op=plan.pool_op,
                windows=plan.window is not None)
        self.centers_aug = aug
        self.bf16 = plan.precision == "bfloat16"
        # Native activation and pooling take the products a block of images at a time.
        self.blockwise = self.native_pool is not None and (self.select is None
                                                           or self.native is not None)
        per_image = L * K * (2 if self.bf16 else 4)
        self.block = max(1, min(batch, _CPU_BLOCK_BYTES // per_image)) if self.blockwise else batch
        rows = self.block * L
        # The GEMM's operands and products: float32, or bfloat16 that the activation reads
        # back as float32 (the compiled graph converts as it reads; the eager path copies into
        # a float32 scratch buffer, ``dist``, which its in-place activation may overwrite).
        if self.bf16:
            bf16 = dict(device=device, dtype=torch.bfloat16)
            self.lhs = torch.empty((batch * L, aug.shape[0]), **bf16)
            self.rhs = aug.to(torch.bfloat16)
            self.products = torch.zeros((rows, K), **bf16)
            self.dist = None if compiled else torch.empty((batch * L, K), **f32)
        else:
            self.lhs = (torch.empty((batch * L, d + 1), **f32) if self.fold
                        else self.y_aug[:, : aug.shape[0]])
            self.rhs = aug
            self.products = self.dist = torch.zeros((rows, K), **f32)
        if self.fold:
            self.lhs[:, d] = 1.0  # the bias row's column
        elif plan.white_mat is not None:
            # Zero columns so the whitening GEMM writes straight into the padded buffer.
            wm = torch.zeros((d, self._y_pad.shape[1]), **f32)
            wm[:, :dp] = torch.from_numpy(plan.white_mat)
            self.white_aug = wm
            self.white_mean = torch.from_numpy(plan.white_mean).to(**f32)
        self.norms = act.norms
        self.sqdist = act.products == "sqdist"
        self.static = dict(map_shape=plan.map_shape, row_bounds=tuple(plan.row_bounds),
                           col_bounds=tuple(plan.col_bounds), activation=plan.activation,
                           alpha=plan.alpha, pool_op=plan.pool_op, fraction=plan.fraction,
                           selection=plan.selection, window=plan.window)
        if compiled and graphs is None:
            # On the CPU, inductor's C++ wrapper: its kernels release the GIL (the default
            # Python wrapper holds it), so the worker threads' graphs run at the same time.
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            threshold = None if self.select is None else CompiledKernel(
                bracket_thresholds, name="nearest-fraction threshold", options=options,
                rank=self.select[1], iters=BRACKET_ITERS)
            graphs = (CompiledKernel(activate_and_pool, name="encoding", options=options,
                                     n_images=batch, **self.static), threshold)
        self.graphs = graphs
        self.compiled = graphs[0] if compiled else None

    def encode(self, chunk: np.ndarray) -> torch.Tensor:
        """``(b, H, W, C)`` images -> ``(b, n_cells, per_cell)`` pooled features on the device."""
        plan, b, L = self.plan, chunk.shape[0], self.L
        x = self.images[:b]
        arr = np.ascontiguousarray(chunk)
        if not arr.flags.writeable:  # a read-only memmap: torch wants a writable buffer
            arr = arr.copy()
        x.copy_(torch.from_numpy(arr))
        p, s = plan.patch_size, plan.stride
        # im2col in the library's HWC patch layout: (b, Ph, Pw, p, p, C) -> (b*L, d).
        windows = x.unfold(1, p, s).unfold(2, p, s).permute(0, 1, 2, 4, 5, 3)
        pt = self.patches[:b]
        pt.copy_(windows)
        P = flatten_patches(pt).reshape(b * L, plan.d)
        P = self._normalize(P)
        lhs, products = self.lhs[: b * L], self.products[: b * L]
        if self.fold:
            lhs[:, : plan.d].copy_(P)
        else:
            y_aug = self.y_aug[: b * L]
            dp = plan.d_out
            self._whiten(P, y_aug)
            y = y_aug[:, :dp]
            # [1, ||y||^2] for squared distances (the GEMM reads them), ||y||^2 where the
            # activation does
            if self.sqdist or "row_sq" in self.norms:
                y_aug[:, dp + 1] = (y * y).sum(1)
            if self.sqdist:
                y_aug[:, dp].fill_(1.0)
            if self.bf16:
                lhs.copy_(y_aug[:, : lhs.shape[1]])
        if self.blockwise:
            return self._native_blocks(lhs, b)
        torch.mm(lhs, self.rhs, out=products)
        if self.select is not None:
            return self._nearest_fraction(b)
        if self.compiled is not None:
            return self.compiled(self.products, *self._norms(self.y_aug))[:b]
        D = self.dist[: b * L]
        if self.bf16:
            D.copy_(products)
        y_aug = None if self.y_aug is None else self.y_aug[: b * L]
        return activate_and_pool(D, *self._norms(y_aug), n_images=b, inplace=True, **self.static)

    def _native_blocks(self, lhs, b):
        """The first ``b`` images by the native kernels, ``self.block`` images at a time: their
        products, then the triangle, or each row's nearest-fraction thresholds and the code,
        pooled while the products are still in the cache (one GEMM over the whole chunk would
        write them out to memory and the kernels read them back from there). Every row's
        numbers are the whole chunk's."""
        L, pooled = self.L, []
        for s in range(0, b, self.block):
            e = min(b, s + self.block)
            S = self.products[: (e - s) * L]
            torch.mm(lhs[s * L: e * L], self.rhs, out=S)
            if self.select is None:
                pooled.append(self.native_pool(S, e - s))
            else:
                m, rank = self.select
                t = self.native(S[:, :m], self.col_sq[:m], rank)
                pooled.append(self.native_pool(S, self.col_sq, t, e - s))
        pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled)
        return pooled if self.select is None else pooled.index_select(2, self.unorder)

    def _nearest_fraction(self, b):
        """The compiled nearest-fraction path for the first ``b`` images where the native
        kernels do not take it all (:meth:`_native_blocks`): each row's thresholds over the
        selection's block (natively on the CPU; elsewhere, or without a C compiler, a compiled
        bisection whose few undecided rows get the order statistic), then a compiled graph
        compares and pools the whole (fixed-size) buffer; same numbers as the eager path."""
        (m, rank), bracket = self.select, self.graphs[1]
        S, cs = self.products[:, :m], self.col_sq[:m]
        if self.native is not None:
            t = self.native(S, cs, rank)
        else:
            t = fix_thresholds(*bracket(S, cs), S, cs, rank)
        pooled = self.compiled(self.products, None, self.col_sq, t)[:b]
        return pooled.index_select(2, self.unorder)

    def _norms(self, y_aug):
        """The norms the activation declares, as ``activate_and_pool``'s positional tensors:
        ``||y||^2`` is the augmented buffer's last column, already computed."""
        if not self.norms:
            return ()
        row_sq = y_aug[:, self.plan.d_out + 1] if "row_sq" in self.norms else None
        col_sq = self.col_sq if "col_sq" in self.norms else None
        return (row_sq, col_sq)

    def _normalize(self, P):
        plan = self.plan
        if plan.norm is not None:
            eps, ddof = plan.norm
            P -= P.mean(1, keepdim=True)  # centre first: no cancellation on 0..255 pixels
            var = (P * P).sum(1, keepdim=True) / (plan.d - ddof)
            P *= torch.rsqrt(var + eps)
        elif plan.norm_est is not None:
            P = self._via_numpy(plan.norm_est, P)
        return P

    def _whiten(self, P, y_aug):
        plan = self.plan
        if plan.white_mat is not None:
            P -= self.white_mean
            torch.mm(P, self.white_aug, out=self._y_pad[: y_aug.shape[0]])
        elif plan.white_est is not None:
            y_aug[:, : plan.d_out].copy_(self._via_numpy(plan.white_est, P))
        else:
            y_aug[:, : plan.d_out].copy_(P)

    def _via_numpy(self, est, P):
        res = est.transform(to_numpy(P).astype(np.float32, copy=False))
        return torch.from_numpy(np.ascontiguousarray(res, dtype=np.float32)).to(self.device)


class KernelPool:
    """:class:`Kernel` s of one plan for the worker threads of :func:`featlearn._torch.cpu_workers`:
    :meth:`over_chunks` gives each worker a kernel of its own (an idle one, else a new one that
    shares the first one's compiled graphs: one compilation, one warning if it fails) and keeps
    them idle for the next call.

    Why workers: an encoding chunk is dozens of small ops, and torch's per-op OpenMP barriers
    make a busy machine wait for a descheduled thread at every one of them; chunks on workers of
    one intra-op thread each never wait for each other.
    """

    def __init__(self, plan: Plan, device: torch.device, batch: int, compiled: bool = False):
        self.plan, self.device, self.batch, self.compiled = plan, device, batch, compiled
        self.idle, self._graphs, self._lock = [], None, threading.Lock()

    def _take(self) -> Kernel:
        with self._lock:
            if self.idle:
                return self.idle.pop()
            kernel = Kernel(self.plan, self.device, self.batch, compiled=self.compiled,
                            graphs=self._graphs)
            self._graphs = kernel.graphs
            return kernel

    def over_chunks(self, n: int, fn) -> None:
        """``fn(kernel, start, stop)`` for every chunk of ``[0, n)``, on the CPU's worker
        threads (one kernel each), else here with one kernel."""
        taken = []

        def make_work():
            kernel = self._take()
            taken.append(kernel)
            return lambda s, e: fn(kernel, s, e)

        try:
            with cpu_workers(self.device):
                over_chunks(n, self.batch, make_work, self.device)
        finally:
            with self._lock:
                self.idle.extend(taken)


def encode_into(plan, X, out, device, batch, progress=None, compiled=False):
    """Encode ``X`` chunk by chunk straight into the preallocated ``out`` rows (on the CPU's
    worker threads: :class:`KernelPool`)."""
    n = X.shape[0]
    if n == 0:
        return out
    out_t = cells_view(torch.from_numpy(out), plan)
    lock = threading.Lock()

    def work(kernel, s, e):
        chunk = X[s:e]
        with torch.inference_mode():  # thread-local: entered in the worker itself
            out_t[s:e, 0].copy_(kernel.encode(chunk))
            if plan.flip:
                out_t[s:e, 1].copy_(kernel.encode(chunk[:, :, ::-1]))
        if progress is not None:
            with lock:
                progress.update(e - s)

    plan.kernel_pool(device, n, batch=batch, compiled=compiled).over_chunks(n, work)
    return out


def encode_block(plan, X, device, batch, compiled=False):
    """One joblib task: a block of images -> its rows of the output (runs on any worker)."""
    out = np.empty(out_shape(plan, X.shape[0]), dtype=np.float32)
    return encode_into(plan, X, out, device, batch, compiled=compiled)


def out_shape(plan, n):
    """The transform's output shape: ``(n, V*cells*F)`` flat, ``(n, V*F, h, w)`` as maps."""
    n_views = 2 if plan.flip else 1
    if plan.layout == "map":
        return (n, n_views * plan.per_cell) + plan.pooled_shape
    return (n, n_views * plan.n_cells * plan.per_cell)


def cells_view(out_t, plan):
    """The output tensor seen as ``(n, views, cells, F)`` (a strided view for maps), the shape
    the kernel's pooled chunks are copied into."""
    n_views = 2 if plan.flip else 1
    n = out_t.shape[0]
    if plan.layout == "map":
        return out_t.view(n, n_views, plan.per_cell, plan.n_cells).transpose(2, 3)
    return out_t.view(n, n_views, plan.n_cells, plan.per_cell)
