"""The network: built from standard ``torch.nn`` layers only, run with private dropout masks.

The saved network is a plain ``nn.Sequential`` (Linear, BatchNorm1d, ReLU/LeakyReLU/Tanh,
Dropout) that any torch code can load. ``nn.Dropout`` would draw its masks from the global RNG,
so in training :func:`forward` runs the layers itself and draws every dropout mask from a
private generator; in eval mode the Dropout layers are the identity, as usual.
"""

from __future__ import annotations

import numpy as np
import torch

from .._torch import chunk_size, to_numpy

#: Negative slope of ``activation="leaky_relu"``.
LEAKY_SLOPE = 0.01


def build_network(n_in, hidden, n_out, *, activation, dropout, input_dropout, batch_norm,
                  generator):
    """``[Dropout] -> (Linear -> [BatchNorm1d] -> activation -> [Dropout]) x H -> Linear``.

    Initialized from ``generator``: Kaiming for (leaky) ReLU, Xavier for tanh; a linear model
    starts at zero, the convex problem's natural start.
    """
    layers = []
    if input_dropout > 0:
        layers.append(torch.nn.Dropout(input_dropout))
    width = n_in
    for h in hidden:
        lin = _linear(width, h, bias=not batch_norm)
        if activation == "tanh":
            torch.nn.init.xavier_uniform_(lin.weight, gain=5 / 3, generator=generator)
            act = torch.nn.Tanh()
        else:
            slope = LEAKY_SLOPE if activation == "leaky_relu" else 0.0
            torch.nn.init.kaiming_uniform_(lin.weight, a=slope, nonlinearity="leaky_relu",
                                           generator=generator)
            act = torch.nn.LeakyReLU(LEAKY_SLOPE) if slope else torch.nn.ReLU()
        if lin.bias is not None:
            torch.nn.init.zeros_(lin.bias)
        layers.append(lin)
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(h))
        layers.append(act)
        if dropout > 0:
            layers.append(torch.nn.Dropout(dropout))
        width = h
    out = _linear(width, n_out)
    if hidden:
        torch.nn.init.xavier_uniform_(out.weight, generator=generator)
    else:
        torch.nn.init.zeros_(out.weight)
    torch.nn.init.zeros_(out.bias)
    layers.append(out)
    return torch.nn.Sequential(*layers)


def forward(model, x, generator=None):
    """``model(x)``, with dropout masks from ``generator`` when the model is training."""
    if not model.training or generator is None:
        return model(x)
    for layer in model:
        if isinstance(layer, torch.nn.Dropout):
            x = _dropout(x, layer.p, generator)
        else:
            x = layer(x)
    return x


def _dropout(x, p, generator):
    """Inverted dropout with a mask from ``generator`` (on ``x``'s device)."""
    if p == 0:
        return x
    keep = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    return x * keep * (1.0 / (1 - p))


def scores(model, X, standardizer):
    """Scores of the raw rows ``X`` (a CPU tensor) in eval mode, in memory-bounded chunks,
    as a float32 numpy array."""
    dev = next(model.parameters()).device
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    step = chunk_size(8 * (X.shape[1] + sum(widths)), dev, minimum=256)
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(X), step):
            out.append(to_numpy(model(standardizer.apply_(X[s:s + step].to(dev, copy=True)))))
    return np.concatenate(out) if out else np.zeros((0, widths[-1]), np.float32)


def weight_parameters(model):
    """The weight matrices and convolution kernels: the penalized parameters (biases and batch
    norm are not)."""
    return [p for name, p in model.named_parameters() if _is_weight(name, p)]


def split_decay(model):
    """``(penalized, not penalized)`` parameter lists."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if _is_weight(name, p) else no_decay).append(p)
    return decay, no_decay


def _is_weight(name, p):
    return name.endswith("weight") and p.ndim >= 2  # Linear matrices and Conv2d kernels


def _linear(n_in, n_out, bias=True):
    """An uninitialized Linear layer: its own reset would draw from the global RNG."""
    return torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out, bias=bias)
