"""Losses: signed targets, the mean loss (for autograd), the summed loss with an explicit
gradient (for the linear L-BFGS objective), the penalty, the predict rule and the probabilities.

A model has one output for two classes (``t = +-1``) and one output per class otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._network import weight_parameters


def signed_targets(y, n_out, dtype):
    """``+1`` for the true class and ``-1`` elsewhere, shape ``(n, n_out)``.

    With one output (two classes) the single column is ``+1`` for class 1 and ``-1`` for class 0.
    """
    if n_out == 1:
        return (y.to(dtype) * 2 - 1)[:, None]
    t = torch.full((len(y), n_out), -1.0, dtype=dtype, device=y.device)
    return t.scatter_(1, y[:, None], 1.0)


def per_sample_loss(scores, y, loss):
    """Loss of each row: softmax/logistic cross-entropy or the summed one-vs-all squared hinge."""
    if loss == "cross_entropy":
        if scores.shape[1] == 1:
            return F.softplus(-signed_targets(y, 1, scores.dtype)[:, 0] * scores[:, 0])
        return F.cross_entropy(scores, y, reduction="none")
    t = signed_targets(y, scores.shape[1], scores.dtype)
    return torch.clamp(1 - t * scores, min=0).square().sum(1)


def mean_loss(scores, y, loss, weight=None):
    """Mean loss of a batch (autograd-friendly); ``weight`` (mean 1 over the training set)
    multiplies each row's loss."""
    if weight is not None:
        return (per_sample_loss(scores, y, loss) * weight).mean()
    if loss == "cross_entropy" and scores.shape[1] > 1:
        return F.cross_entropy(scores, y)  # the fused reduction
    return per_sample_loss(scores, y, loss).mean()


def summed_loss_and_grad(scores, y, loss, weight=None):
    """Summed (float64) loss of a chunk and its gradient with respect to the scores.

    The squared hinge's gradient is written out (``-2 t max(0, 1 - t s)``), so the linear
    objective needs no autograd graph per chunk; cross-entropy goes through autograd.
    """
    if loss == "squared_hinge":
        t = signed_targets(y, scores.shape[1], scores.dtype)
        margin = (1 - t * scores).clamp_(min=0)
        if weight is None:
            total = margin.square().sum(dtype=torch.float64)
            return total, margin.mul_(t).mul_(-2.0)
        w = weight[:, None]
        total = (margin.square() * w).sum(dtype=torch.float64)
        return total, margin.mul_(t).mul_(-2.0).mul_(w)
    with torch.enable_grad():
        scores = scores.detach().requires_grad_()
        if weight is None:
            total = mean_loss(scores, y, loss) * len(y)
        else:
            total = (per_sample_loss(scores, y, loss) * weight).sum()
        total.backward()
    return total.detach().double(), scores.grad


def penalty(model, alpha):
    """``0.5 * alpha * sum ||W||^2`` over the weight matrices, as a python float."""
    with torch.no_grad():
        sq = sum(float(p.square().sum()) for p in weight_parameters(model))
    return 0.5 * alpha * sq


def probabilities(scores):
    """Class probabilities from a numpy score matrix, in float64: the softmax, or for one
    output column the sigmoid of the positive class beside its complement."""
    s = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    if s.shape[1] == 1:
        p1 = torch.sigmoid(s[:, 0])
        return torch.stack([1 - p1, p1], 1).numpy()
    return torch.softmax(s, 1).numpy()


def predict_index(scores):
    """Index of the predicted class from scores (numpy array or tensor): the sign of the single
    output, else the largest output."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0) * 1
    return scores.argmax(1)
