"""The convolutional head's parts: its network, its input maps decoded batch by batch, one
training epoch and chunked scores, as functions of explicit arguments.

The maps may be far larger than memory (a ``np.memmap`` of float16 or uint8 pooled maps):
nothing here converts or copies the whole input; each mini-batch gathers its rows, casts them
to float32 and moves them to the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._torch import chunk_size, reuse_freed_memory, to_numpy
from ._losses import penalty
from ._stochastic import train_step


def build_conv_head(channels, map_hw, n_out, *, width, hidden, hidden_kernel_size, kernel_size,
                    dropout, generator):
    """``BatchNorm2d -> [1x1 conv to width] -> [conv to hidden, ReLU, [Dropout]] -> conv ->
    global average -> Flatten``, valid (unpadded) convolutions, as a plain ``nn.Sequential``.

    ``kernel_size=None`` makes the last convolution as large as the map that reaches it (one
    output position: a low-rank linear classifier of the map when there is no hidden layer).
    Returns the network and the last convolution's ``(kh, kw)``. Initialized from
    ``generator``: torch's default uniform init for the linear convolutions, Kaiming for the
    one before the ReLU.
    """
    h, w = map_hw
    layers = [torch.nn.BatchNorm2d(channels)]
    c = channels
    if width is not None:
        layers.append(_conv(c, width, 1, generator))
        c = width
    if hidden is not None:
        if hidden_kernel_size > min(h, w):
            raise ValueError(f"hidden_kernel_size={hidden_kernel_size} is larger than the "
                             f"{h}x{w} input map")
        layers += [_conv(c, hidden, hidden_kernel_size, generator, relu=True), torch.nn.ReLU()]
        if dropout > 0:
            layers.append(torch.nn.Dropout(dropout))
        c = hidden
        h, w = h - hidden_kernel_size + 1, w - hidden_kernel_size + 1
    k = (h, w) if kernel_size is None else (kernel_size, kernel_size)
    if k[0] > h or k[1] > w:
        raise ValueError(f"kernel_size={kernel_size} is larger than the {h}x{w} map that reaches "
                         "the last convolution")
    layers += [_conv(c, n_out, k, generator), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers), k


def _conv(c_in, c_out, k, generator, relu=False):
    """A Conv2d initialized from ``generator`` (its own reset would draw from the global RNG)."""
    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, c_in, c_out, k)
    if relu:
        torch.nn.init.kaiming_uniform_(conv.weight, nonlinearity="relu", generator=generator)
        torch.nn.init.zeros_(conv.bias)
    else:  # torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias
        torch.nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(conv.weight[0].numel())
        torch.nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
    return conv


class MapSource:
    """Rows of ``X`` read as ``(C, h, w)`` maps, one view at a time, decoded per batch.

    ``X`` is ``(n, V*C, h, w)`` (views as channel blocks), or 2D ``(n, V*F)``: with
    ``map_shape=(h, w)`` each view's ``F = h*w*C`` columns are channels-last cells in row-major
    order (:class:`featlearn.PatchEncoder`'s layout), else ``F`` channels of a 1x1 map. A
    "row" here is one view of one sample: ``row = sample * V + view``.
    """

    def __init__(self, X, n_views, map_shape):
        self.X, self.n_views = X, n_views
        n = X.shape[0]
        if X.ndim == 4:
            if X.shape[1] % n_views:
                raise ValueError(f"X has {X.shape[1]} channels, not divisible by "
                                 f"n_views={n_views}")
            self.shape = (X.shape[1] // n_views, X.shape[2], X.shape[3])
            self.layout = "nchw"
        else:
            if X.shape[1] % n_views:
                raise ValueError(f"X has {X.shape[1]} features, not divisible by "
                                 f"n_views={n_views}")
            per_view = X.shape[1] // n_views
            if map_shape is None:
                self.shape, self.layout = (per_view, 1, 1), "flat"
            else:
                h, w = map_shape
                if per_view % (h * w):
                    raise ValueError(f"X has {per_view} features per view, not a multiple of "
                                     f"map_shape={tuple(map_shape)} ({h * w} cells)")
                self.shape, self.layout = (per_view // (h * w), h, w), "hwc"
        self.n_samples, self.n_rows = n, n * n_views

    @property
    def row_bytes(self):
        """Bytes of one decoded row (float32) plus its raw copy."""
        return int(np.prod(self.shape)) * (4 + self.X.dtype.itemsize)

    def batch(self, rows, device):
        """Rows ``rows`` (ascending int64 numpy indices) as a float32 ``(b, C, h, w)`` tensor."""
        V = self.n_views
        samples, views = rows // V, rows % V
        if V == 1:
            raw = self.X[samples]
        else:
            uniq, inv = np.unique(samples, return_inverse=True)
            raw = self.X[uniq][inv]  # each sample read once, however many of its views
        C, h, w = self.shape
        if V > 1:
            raw = raw.reshape(len(rows), V, -1)[np.arange(len(rows)), views]
        t = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
        t = t.to(torch.float32)
        if self.layout == "hwc":
            return t.view(len(rows), h, w, C).permute(0, 3, 1, 2).contiguous()
        return t.view(len(rows), C, h, w)

    def chunks(self, rows, budget_rows):
        """Ascending ``rows`` in consecutive pieces of at most ``budget_rows``."""
        for s in range(0, len(rows), budget_rows):
            yield rows[s:s + budget_rows]


def run_epoch(model, optimizer, source, y, weight, rows, *, batch_size, loss, alpha, generator,
              dropout_generator, device, precision="float32", scheduler=None):
    """One pass over ``rows`` (a CPU index tensor) in shuffled mini-batches; returns the mean
    data loss plus the penalty. Each batch's rows are read in ascending order (the batch is a
    set; sorted reads are sequential on a memmap)."""
    model.train()
    dropout_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    perm = rows[torch.randperm(len(rows), generator=generator)].numpy()
    cells = source.shape[1] * source.shape[2]
    total, n_done = torch.zeros((), device=device), 0
    with reuse_freed_memory():  # each step frees and reallocates the same activation buffers
        for s in range(0, len(perm), batch_size):
            idx = np.sort(perm[s:s + batch_size])
            if len(idx) * cells > 1:  # batch norm needs more than one value per channel
                xb = source.batch(idx, device)
                idx_t = torch.from_numpy(idx).to(device)
                total += train_step(model, optimizer, xb, y, weight, idx_t, loss=loss,
                                    dropout_generator=dropout_generator,
                                    precision=precision) * len(idx)
                n_done += len(idx)
            if scheduler is not None:
                scheduler.step()
    return float(total) / max(1, n_done) + penalty(model, alpha)


def eval_rows(model, source, device):
    """How many rows one evaluation chunk may hold (inputs plus the widest activation)."""
    widths = [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)]
    cells = source.shape[1] * source.shape[2]
    per_row = source.row_bytes + 8 * cells * max(widths + [source.shape[0]])
    return chunk_size(per_row, device, minimum=16)


def scores(model, source, rows=None, device=None):
    """Eval-mode scores of ``rows`` (default: all) as a float32 numpy array ``(len, n_out)``."""
    device = device or next(model.parameters()).device
    rows = np.arange(source.n_rows) if rows is None else np.asarray(rows)
    out = []
    model.eval()
    with torch.no_grad():
        for piece in source.chunks(rows, eval_rows(model, source, device)):
            out.append(to_numpy(model(source.batch(piece, device))))
    n_out = [m for m in model if isinstance(m, torch.nn.Conv2d)][-1].out_channels
    return np.concatenate(out) if out else np.zeros((0, n_out), np.float32)
