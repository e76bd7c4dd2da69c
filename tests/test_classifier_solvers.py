"""The classifier's building blocks, called directly with explicit arguments."""

import math

import numpy as np
import pytest
import torch

from featlearn.classifier import _lbfgs, _losses, _network, _stochastic
from featlearn.classifier._standardize import Standardizer, feature_stats


def _problem(n=300, d=7, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * 3 + 1
    y = torch.randint(0, max(n_out, 2), (n,), generator=g)
    W = torch.randn(n_out, d, generator=g) * 0.3
    b = torch.randn(n_out, generator=g) * 0.1
    w = torch.rand(n, generator=g) * 2
    return X, y, W, b, w


def test_signed_targets():
    y = torch.tensor([0, 2, 1])
    np.testing.assert_array_equal(_losses.signed_targets(y, 3, torch.float32),
                                  [[1, -1, -1], [-1, -1, 1], [-1, 1, -1]])
    np.testing.assert_array_equal(_losses.signed_targets(torch.tensor([0, 1]), 1, torch.float32),
                                  [[-1], [1]])


@pytest.mark.parametrize("loss", ["squared_hinge", "cross_entropy"])
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_objective_matches_autograd(loss, n_out, weighted):
    X, y, W, b, w = _problem(n_out=n_out)
    y = y.clamp(max=max(n_out - 1, 1))
    w = w if weighted else None
    mean, scale = feature_stats(X.numpy())
    std = Standardizer(mean, scale, X.device)
    value, gW, gb = _lbfgs.linear_objective(X, y, W, b, std, loss, w)
    Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
    ref = _losses.mean_loss(std.apply_(X.clone()) @ Wr.t() + br, y, loss, w)
    ref.backward()
    np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
    np.testing.assert_allclose(gW.numpy(), Wr.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb.numpy(), br.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_standardizer_fold_equals_apply():
    X, _, W, b, _ = _problem()
    std = Standardizer(*feature_stats(X.numpy()), X.device)
    Ws, bs = std.fold(W, b)
    np.testing.assert_allclose((X @ Ws.t() + bs).numpy(),
                               (std.apply_(X.clone()) @ W.t() + b).numpy(), rtol=1e-4, atol=1e-5)
    off = Standardizer(*feature_stats(X.numpy()), X.device, enabled=False)
    assert torch.equal(off.apply_(X.clone()), X)


def test_weighted_feature_stats():
    X = np.array([[0.0], [2.0], [10.0]], np.float32)
    mean, scale = feature_stats(X, np.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(mean, [1.0])
    np.testing.assert_allclose(scale, [math.sqrt(1.0 + 0.01)], rtol=1e-6)


def test_preconditioner_is_cholesky_of_damped_covariance():
    X, *_ = _problem(n=200, d=5)
    std = Standardizer(*feature_stats(X.numpy()), X.device)
    L = _lbfgs.preconditioner(X, std, 0.01, 1.0, torch.Generator().manual_seed(0))
    Xs = std.apply_(X.clone()).double()
    M = Xs.t() @ Xs / len(Xs) + 0.01 * torch.eye(5, dtype=torch.float64)
    np.testing.assert_allclose((L.double() @ L.double().t()).numpy(), M.numpy(), rtol=1e-4,
                               atol=1e-5)
    U = torch.randn(3, 5, dtype=torch.float32)
    np.testing.assert_allclose((_lbfgs.solve_upper(L, U) @ L).numpy(), U.numpy(), atol=1e-4)


def test_fit_linear_minimizes_the_objective():
    X, y, *_ = _problem(n=400, d=6)
    std = Standardizer(*feature_stats(X.numpy()), X.device)
    values = []
    for precondition in (False, True):
        model = _network.build_network(6, (), 3, activation="relu", dropout=0, input_dropout=0,
                                       batch_norm=False, generator=torch.Generator())
        curve = []
        _lbfgs.fit_linear(model, X, y, None, standardizer=std, loss="squared_hinge", alpha=0.01,
                          max_iter=500, precondition=precondition,
                          generator=torch.Generator().manual_seed(0), on_eval=curve.append)
        value, gW, gb = _lbfgs.linear_objective(X, y, model[-1].weight.detach(),
                                                model[-1].bias.detach(), std, "squared_hinge")
        gW += 0.01 * model[-1].weight.detach()
        assert float(gW.abs().max()) < 1e-4 and float(gb.abs().max()) < 1e-4  # stationary
        assert curve[-1] <= curve[0]
        values.append(curve[-1])
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5)


def test_cosine_and_step_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = _stochastic.make_schedule(opt, "cosine", n_batches=4, n_epochs=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(12)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = _stochastic.make_schedule(opt, "step", n_batches=2, n_epochs=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert _stochastic.make_schedule(opt, "constant", 2, 4) is None


def test_early_stopping_keeps_the_best_state():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1))
    stop = _stochastic.EarlyStopping(tol=0.01, patience=2)
    assert not stop.update(0.5, 0, model)
    best = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not stop.update(0.505, 1, model)  # not better by more than tol
    assert stop.update(0.4, 2, model)
    stop.restore(model)
    assert stop.best_epoch == 0 and torch.equal(model[0].weight, best)


def test_network_is_standard_layers_with_private_dropout():
    gen = torch.Generator().manual_seed(0)
    model = _network.build_network(5, (8,), 3, activation="relu", dropout=0.5,
                                   input_dropout=0.2, batch_norm=True, generator=gen)
    assert all(type(m).__module__.startswith("torch.nn.modules") for m in model.modules())
    x = torch.randn(16, 5)
    state = torch.random.get_rng_state()
    a = _network.forward(model.train(), x, torch.Generator().manual_seed(1))
    b = _network.forward(model.train(), x, torch.Generator().manual_seed(1))
    c = _network.forward(model.train(), x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())
    model.eval()
    assert torch.equal(_network.forward(model, x, torch.Generator()), model(x))


def test_penalty_counts_weight_matrices_only():
    model = _network.build_network(3, (4,), 2, activation="tanh", dropout=0, input_dropout=0,
                                   batch_norm=True, generator=torch.Generator().manual_seed(0))
    sq = sum(float(m.weight.detach().square().sum()) for m in model
             if isinstance(m, torch.nn.Linear))
    assert _losses.penalty(model, 0.5) == pytest.approx(0.25 * sq)
