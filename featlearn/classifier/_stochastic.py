"""The mini-batch solver: optimizer (fused update with a fallback), learning-rate schedule,
early stopping and one epoch, as functions of explicit arguments."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from .._torch import reuse_freed_memory
from ._losses import mean_loss, penalty, predict_index
from ._network import forward, split_decay


def make_optimizer(model, solver, *, lr, alpha, momentum=0.9, nesterov=True):
    """Adam or SGD with ``weight_decay=alpha`` on the weight matrices only.

    The fused (one-kernel) update is much cheaper than the per-op one for a wide first layer on
    the CPU; torch builds that lack it for a device raise, and get the plain update.
    """
    decay, no_decay = split_decay(model)
    groups = [{"params": decay, "weight_decay": alpha},
              {"params": no_decay, "weight_decay": 0.0}]
    if solver == "adam":
        cls, kw = torch.optim.Adam, {}
    else:
        cls, kw = torch.optim.SGD, dict(momentum=momentum, nesterov=nesterov and momentum > 0)
    try:
        return cls(groups, lr=lr, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return cls(groups, lr=lr, **kw)


def make_schedule(optimizer, kind, n_batches, n_epochs):
    """A per-batch :class:`~torch.optim.lr_scheduler.LambdaLR` over ``n_epochs`` epochs, or
    ``None`` for ``"constant"``.

    ``"cosine"`` anneals to 0 along the fractional epoch; ``"step"`` multiplies by 0.1 at 50%
    and again at 75% of the epochs.
    """
    if kind == "constant":
        return None

    def factor(step):
        epoch, frac = step // n_batches, (step % n_batches) / n_batches
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch + frac) / n_epochs))
        return ((0.1 if epoch >= n_epochs // 2 else 1.0)
                * (0.1 if epoch >= (3 * n_epochs) // 4 else 1.0))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EarlyStopping:
    """Keep the best validation score's weights; stop after ``patience`` epochs without an
    improvement of more than ``tol``."""

    def __init__(self, tol, patience):
        self.tol, self.patience = tol, patience
        self.best, self.best_epoch, self.stale, self.best_state = -np.inf, 0, 0, None

    def update(self, score, epoch, model):
        """Record an epoch's score; True when training should stop."""
        if score > self.best + self.tol:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
        return self.stale >= self.patience

    def restore(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def validation_split(codes, n_views, fraction, generator):
    """Training and validation row indices (CPU tensors), split by sample (stratified when
    every class has 2 samples) so the views of one sample stay on one side."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    per_sample = codes[::n_views]
    stratify = per_sample if np.bincount(per_sample).min() >= 2 else None
    tr, va = train_test_split(np.arange(len(per_sample)), test_size=fraction,
                              stratify=stratify, random_state=seed)
    return [torch.from_numpy((np.sort(i)[:, None] * n_views + np.arange(n_views)).ravel())
            for i in (tr, va)]


def n_batches(n_rows, batch_size):
    return max(1, math.ceil(n_rows / batch_size))


def run_epoch(model, optimizer, X, y, weight, rows, *, batch_size, loss, alpha, standardizer,
              generator, dropout_generator, precision="float32", scheduler=None):
    """One pass over ``rows`` (a CPU index tensor) in shuffled mini-batches.

    Returns the epoch's mean data loss plus the penalty. ``dropout_generator`` (on the
    training device) is reseeded from ``generator`` so masks do not depend on the device's
    generator history.
    """
    device = X.device
    model.train()
    dropout_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    perm = rows[torch.randperm(len(rows), generator=generator)].to(device)
    has_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in model)
    # A first linear layer under bfloat16 autocast rounds its input to bfloat16: the batch can
    # arrive rounded (half the bytes, and the same numbers).
    dtype = (torch.bfloat16 if precision == "bfloat16" and isinstance(model[0], torch.nn.Linear)
             else torch.float32)
    total = torch.zeros((), device=device)
    with reuse_freed_memory():
        for b in range(n_batches(len(perm), batch_size)):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            if not (len(idx) == 1 and has_bn):  # batch norm cannot train on a single sample
                xb = standardizer.batch(X, idx, dtype)
                total += train_step(model, optimizer, xb, y, weight, idx, loss=loss,
                                    dropout_generator=dropout_generator,
                                    precision=precision) * len(idx)
            if scheduler is not None:
                scheduler.step()
    return float(total) / len(perm) + penalty(model, alpha)


def train_step(model, optimizer, xb, y, weight, idx, *, loss, dropout_generator, precision):
    """One optimizer step on the batch ``xb`` of rows ``idx``; returns its (detached) mean loss.

    The forward pass runs under bfloat16 autocast when ``precision`` asks for it; the loss is
    computed in float32 either way.
    """
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        scores = forward(model, xb, dropout_generator)
    wb = None if weight is None else weight.index_select(0, idx)
    batch_loss = mean_loss(scores.float(), y.index_select(0, idx), loss, wb)
    optimizer.zero_grad(set_to_none=True)
    batch_loss.backward()
    optimizer.step()
    return batch_loss.detach()


def accuracy(model, X, y, rows, standardizer):
    """Accuracy of ``model`` (eval mode) on the rows ``rows`` of ``(X, y)``."""
    rows = rows.to(X.device)
    model.eval()
    with torch.no_grad():
        scores = model(standardizer.apply_(X.index_select(0, rows)))
    return float((predict_index(scores) == y.index_select(0, rows)).float().mean())
