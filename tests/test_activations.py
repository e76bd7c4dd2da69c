"""The nearest-fraction thresholds: the compiled path's bisection and fix-up against the order
statistic, and how far the sampled threshold strays from the exact one."""

import numpy as np
import pytest
import torch

import featlearn.activations as A


def _products(n, K, seed=0, d=24):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g)
    c = torch.randn(K, d, generator=g) * 0.5
    return y @ c.T, (c * c).sum(1)


def _bracketed(D, cs, fraction, selection, iters=A.BRACKET_ITERS):
    """The compiled path's thresholds, eagerly: the selection's columns, bisection, fix-up."""
    K = D.shape[1]
    cols = torch.from_numpy(A.selection_columns(K, selection))
    rank = A.selection_rank(K, A.n_nearest(fraction, K), len(cols))
    S, s_cs = D[:, cols], cs[cols]
    t, ok = A.bracket_thresholds(S, s_cs, rank=rank, iters=iters)
    return A.fix_thresholds(t, ok, S, s_cs, rank), ok


@pytest.mark.parametrize("K,selection", [(40, "exact"), (600, "sampled"), (600, "exact"),
                                         (1600, "sampled")])
@pytest.mark.parametrize("iters", [2, A.BRACKET_ITERS])
def test_bisection_and_fix_up_give_the_order_statistic(K, selection, iters):
    D, cs = _products(300, K)
    want = A.nearest_fraction_thresholds(D, cs, fraction=0.4, selection=selection)
    got, ok = _bracketed(D, cs, 0.4, selection, iters)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if iters == 2:
        assert (~ok).any()  # two halvings leave rows undecided: the fix-up was exercised


def test_ties_and_constant_rows_are_fixed_up():
    D, cs = _products(64, 50)
    D = (D * 2).round() / 2  # many equal entries per row
    D[:5] = 0.0  # every entry of these rows equal (a flat patch)
    cs = torch.zeros_like(cs)
    for fraction in (0.02, 0.4, 0.98):
        want = A.nearest_fraction_thresholds(D, cs, fraction=fraction, selection="exact")
        got, ok = _bracketed(D, cs, fraction, "exact")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not ok[:5].all()
        marks = A.nearest_fraction(D, 0.0, col_sq=cs, fraction=fraction, selection="exact",
                                   thresholds=got)
        assert (marks.view(64, 2, 50).sum(2) <= A.n_nearest(fraction, 50)).all()  # ties: fewer


def test_precomputed_thresholds_give_the_same_code():
    D, cs = _products(100, 600)
    for selection in ("sampled", "exact"):
        t = A.nearest_fraction_thresholds(D, cs, fraction=0.3, selection=selection)
        args = dict(col_sq=cs, fraction=0.3, selection=selection)
        torch.testing.assert_close(A.nearest_fraction(D, 0.0, thresholds=t, **args),
                                   A.nearest_fraction(D, 0.0, **args), rtol=0, atol=0)


@pytest.mark.parametrize("K", [1024, 1600, 4000])
def test_sampled_threshold_disagreement_is_bounded(K):
    """256 sampled entries put each row's threshold within a few percent of ranks of the exact
    one (the sample quantile's standard error at 40% is sqrt(0.4 * 0.6 / 256), about 3%)."""
    D, cs = _products(2000, K, seed=1, d=108)
    exact = A.nearest_fraction(D, 0.0, col_sq=cs, fraction=0.4, selection="exact")
    sampled = A.nearest_fraction(D, 0.0, col_sq=cs, fraction=0.4, selection="sampled")
    assert not torch.equal(exact, sampled)  # it is an estimate
    assert (exact != sampled).float().mean() < 0.035  # of all binary entries
    k = A.n_nearest(0.4, K)
    off = (sampled.view(-1, 2, K).sum(2) - k).abs() / K
    assert off.mean() < 0.035 and off.max() < 0.2


def test_selection_columns_and_rank():
    assert np.array_equal(A.selection_columns(600, "sampled"), np.arange(0, 600, 2))
    assert np.array_equal(A.selection_columns(600, "exact"), np.arange(600))
    assert np.array_equal(A.selection_columns(300, "sampled"), np.arange(300))  # step 1
    assert A.selection_rank(600, 240, 600) == 241
    assert A.selection_rank(1600, 640, 267) == 107
