"""The full-batch solver: L-BFGS (strong-Wolfe line search), with the linear model's
one-pass objective and preconditioner, as functions of explicit arguments."""

from __future__ import annotations

import torch

from .._torch import chunk_size
from ._losses import mean_loss, summed_loss_and_grad
from ._network import weight_parameters

#: Largest input width for which ``precondition="auto"`` builds the ``d x d`` preconditioner.
PRECONDITION_MAX_FEATURES = 16384
#: The preconditioner's covariance uses every row up to this many (then 2 x n_features rows).
PRECONDITION_MIN_ROWS = 16384
#: Working memory of one chunk of the linear objective and the preconditioner's Gram: below
#: ~1,000 rows per chunk the per-chunk overhead dominates.
CHUNK_BYTES = 64 * 2**20
#: Rows per chunk when standardizing the network's full-batch copy.
_STANDARDIZE_ROWS = 8192


def curvature(loss):
    """Typical curvature of the loss in a score, times the fraction of rows carrying it: 2 x 1/2
    for the squared hinge (only margin violators count), 1/4 for cross-entropy (``p (1-p)``)."""
    return 1.0 if loss == "squared_hinge" else 0.25


def preconditioner(X, standardizer, alpha, curv, generator):
    """Lower Cholesky factor ``L`` of ``M = alpha I + curv G``, ``G`` the covariance of the
    standardized rows of ``X``.

    ``G`` uses all rows, or a random subset of ``max(2 d, 16384)`` when there are more: enough
    to capture the large eigen-directions that make plain L-BFGS slow, at a fraction of the
    full Gram's cost. L-BFGS then runs on ``U = W L``, where the objective is nearly isotropic.
    """
    n, d = X.shape
    m = min(n, max(2 * d, PRECONDITION_MIN_ROWS))
    rows = torch.randperm(n, generator=generator)[:m].sort().values.to(X.device)
    G = torch.zeros((d, d), dtype=torch.float32, device=X.device)
    step = chunk_size(d * X.element_size(), X.device, budget=CHUNK_BYTES, minimum=256)
    for s in range(0, m, step):
        xc = standardizer.apply_(X[rows[s:s + step]].float())  # a gathered copy
        G.addmm_(xc.t(), xc)
    M = G.double().mul_(curv / m)
    M.diagonal().add_(max(alpha, 1e-6))
    return torch.linalg.cholesky(M).float()


def linear_objective(X, y, W, b, standardizer, loss, weight=None):
    """Mean data loss of the linear model ``standardize(X) W^T + b`` and its gradient.

    One pass over raw ``X`` in chunks, each feeding the scores and the weight gradient while it
    is fresh; ``X`` is never copied (standardization is folded into the weights). The problem
    is memory-bound, so reading ``X`` once per evaluation is what matters.

    Returns ``(loss, grad_W, grad_b)``: a float32 scalar tensor and two tensors like W and b.
    """
    n = len(X)
    with torch.no_grad():
        Ws, bs = standardizer.fold(W, b)
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(b)
        total = torch.zeros((), dtype=torch.float64, device=X.device)
        step = chunk_size(X.shape[1] * X.element_size(), X.device, budget=CHUNK_BYTES,
                          minimum=256)
        for s in range(0, n, step):
            xc, yc = X[s:s + step], y[s:s + step]
            wc = None if weight is None else weight[s:s + step]
            scores = torch.addmm(bs, xc, Ws.t())
            chunk_loss, G = summed_loss_and_grad(scores, yc, loss, wc)
            gW.addmm_(G.t(), xc, alpha=1.0 / n)
            gb.add_(G.sum(0), alpha=1.0 / n)
            total += chunk_loss / n
        standardizer.unfold_grad_(gW, gb)
    return total.float(), gW, gb


def solve_upper(L, U):
    """``W = U L^-1`` for the rows of ``U`` (``W^T = L^-T U^T``)."""
    return torch.linalg.solve_triangular(L.t(), U.t(), upper=True).t()


def solve_lower(L, G):
    """``G L^-T``: a gradient with respect to ``W`` mapped to ``U`` (``W = U L^-1``)."""
    return torch.linalg.solve_triangular(L, G.t(), upper=False).t()


def minimize(params, closure, max_iter):
    """Run torch's L-BFGS on ``closure`` (which fills ``params``' gradients and returns the
    objective); the number of iterations it took."""
    optim = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 20,
                              history_size=20, tolerance_grad=1e-7, tolerance_change=1e-9,
                              line_search_fn="strong_wolfe")
    optim.step(closure)
    return int(optim.state[params[0]].get("n_iter", 1))


def _objective(model, alpha, data_loss, on_eval):
    """A closure: zeroed gradients, ``data_loss()`` (which adds its own gradient), the penalty
    through autograd; reports each value to ``on_eval``."""
    weights = weight_parameters(model)

    def closure():
        for p in model.parameters():
            p.grad.zero_()
        value = data_loss().detach()
        if alpha > 0:
            with torch.enable_grad():
                pen = 0.5 * alpha * sum(w.square().sum() for w in weights)
                pen.backward()
            value = value + pen.detach()
        on_eval(float(value))
        return value
    return closure


def fit_linear(model, X, y, weight, *, standardizer, loss, alpha, max_iter, precondition,
               generator, on_eval):
    """L-BFGS on the linear model ``model[-1]`` (optionally preconditioned); iterations run."""
    lin = model[-1]
    W, b = lin.weight, lin.bias
    for p in (W, b):
        p.grad = torch.zeros_like(p)
    L = U = None
    if precondition:
        L = preconditioner(X, standardizer, alpha, curvature(loss), generator)
        U = torch.zeros_like(W, requires_grad=True)  # W = U L^-1, so W = 0 at the start
        U.grad = torch.zeros_like(U)

    def data_loss():
        if L is not None:
            with torch.no_grad():
                W.copy_(solve_upper(L, U))
        value, gW, gb = linear_objective(X, y, W, b, standardizer, loss, weight)
        W.grad.add_(gW)
        b.grad.add_(gb)
        return value

    objective = _objective(model, alpha, data_loss, on_eval)
    if L is None:
        return minimize([W, b], objective, max_iter)

    def closure():  # the chain rule through W = U L^-1
        value = objective()
        with torch.no_grad():
            U.grad.copy_(solve_lower(L, W.grad))
        return value

    n_iter = minimize([U, b], closure, max_iter)
    with torch.no_grad():  # the last evaluation may have been a rejected line-search point
        W.copy_(solve_upper(L, U))
    return n_iter


def fit_network(model, X, y, weight, *, standardizer, loss, alpha, max_iter, on_eval):
    """L-BFGS on every parameter of a network, on one standardized copy of ``X``."""
    Xs = X.clone()
    for s in range(0, len(Xs), _STANDARDIZE_ROWS):
        standardizer.apply_(Xs[s:s + _STANDARDIZE_ROWS])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def data_loss():
        value = mean_loss(model(Xs), y, loss, weight)
        value.backward()
        return value

    return minimize(list(model.parameters()), _objective(model, alpha, data_loss, on_eval),
                    max_iter)
