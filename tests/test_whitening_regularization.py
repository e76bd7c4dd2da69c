"""ZCAWhitening's regularization relative to the spectrum (``eps_scale``): exact against a naive
numpy reference, the absolute default unchanged."""

import pickle

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import ZCAWhitening
from featlearn.persistence import load_model, save_model


@parametrize_with_checks([ZCAWhitening(eps_scale="mean"),
                          ZCAWhitening(eps=1e-3, eps_scale="max", zca=False, n_components=2)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def _correlated(n=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.01, d)  # a wide spectrum, so the scale choice matters
    X = rng.normal(size=(n, d)) * scales @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (X + 3.0).astype(np.float32)


def _naive(X, eps, eps_scale, zca=True, k=None):
    """The textbook definition, written out in float64."""
    X = X.astype(np.float64)
    M = X.mean(0)
    C = np.cov(X, rowvar=False, ddof=1)
    lam, V = np.linalg.eigh(C)
    lam = np.clip(lam, 0, None)
    ref = {"absolute": 1.0, "mean": np.trace(C) / X.shape[1], "max": lam.max()}[eps_scale]
    reg = eps * ref
    idx = np.argsort(lam)[::-1][:k]
    V, lam = V[:, idx], lam[idx]
    W = V @ np.diag(1.0 / np.sqrt(lam + reg))
    if zca:
        W = W @ V.T
    return (X - M) @ W, reg


@pytest.mark.parametrize("eps_scale", ["absolute", "mean", "max"])
@pytest.mark.parametrize("zca,k", [(True, None), (False, 5), (True, 7)])
def test_matches_naive_reference(eps_scale, zca, k):
    X = _correlated()
    est = ZCAWhitening(eps=0.05, eps_scale=eps_scale, zca=zca, n_components=k).fit(X)
    ref, reg = _naive(X, 0.05, eps_scale, zca, k)
    assert est.eps_ == pytest.approx(reg, rel=1e-9)
    np.testing.assert_allclose(est.transform(X), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_relative_equals_absolute_with_the_scaled_eps():
    X = _correlated(seed=1)
    lam = np.clip(np.linalg.eigvalsh(np.cov(X.astype(np.float64), rowvar=False)), 0, None)
    for eps_scale, ref in [("mean", lam.mean()), ("max", lam.max())]:
        rel = ZCAWhitening(eps=0.02, eps_scale=eps_scale).fit(X)
        ab = ZCAWhitening(eps=0.02 * ref).fit(X)
        np.testing.assert_allclose(rel.whitening_, ab.whitening_, rtol=1e-6)
        assert rel.eps_ == pytest.approx(ab.eps_, rel=1e-9)


def test_relative_regularization_is_invariant_to_the_data_scale():
    # The point of a relative eps: rescaling the data (0..1 vs 0..255 pixels) whitens alike.
    X = _correlated(seed=2)
    a = ZCAWhitening(eps=0.01, eps_scale="mean").fit_transform(X)
    b = ZCAWhitening(eps=0.01, eps_scale="mean").fit_transform(X * 255)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    c = ZCAWhitening(eps=0.01).fit_transform(X)
    d = ZCAWhitening(eps=0.01).fit_transform(X * 255)
    assert not np.allclose(c, d, rtol=1e-3, atol=1e-4)  # the absolute eps does not


def test_default_is_absolute_and_eps_is_used_as_given():
    X = _correlated(seed=3)
    default = ZCAWhitening(eps=0.1).fit(X)
    explicit = ZCAWhitening(eps=0.1, eps_scale="absolute").fit(X)
    assert default.eps_scale == "absolute" and default.eps_ == 0.1
    np.testing.assert_array_equal(default.whitening_, explicit.whitening_)
    np.testing.assert_array_equal(default.transform(X), explicit.transform(X))


def test_zero_spectrum_falls_back_to_the_unregularized_pseudo_inverse():
    X = np.zeros((10, 4), np.float32)
    X[:, 0] = np.arange(10)  # one direction with variance, three without
    est = ZCAWhitening(eps=0.5, eps_scale="max").fit(X)
    assert est.eps_ > 0 and np.isfinite(est.whitening_).all()
    flat = ZCAWhitening(eps=0.5, eps_scale="mean").fit(np.ones((5, 3), np.float32))
    assert flat.eps_ == 0.0 and np.isfinite(flat.whitening_).all()


def test_inverse_transform_uses_the_effective_eps():
    X = _correlated(seed=4)
    est = ZCAWhitening(eps=0.3, eps_scale="mean").fit(X)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X)), X, rtol=1e-4, atol=1e-3)


def test_bad_eps_scale_is_refused_with_its_name():
    with pytest.raises(ValueError, match="eps_scale"):
        ZCAWhitening(eps_scale="relative").fit(_correlated())


@pytest.mark.parametrize("fmt", ["safe", "pickle"])
def test_round_trip(tmp_path, fmt):
    X = _correlated(seed=6)
    est = ZCAWhitening(eps=0.01, eps_scale="mean").fit(X)
    path = tmp_path / "zca.npz"
    save_model(est, path, format=fmt)
    back = load_model(path, allow_pickle=fmt == "pickle")
    assert back.get_params() == est.get_params() and back.eps_ == est.eps_
    np.testing.assert_array_equal(back.transform(X), est.transform(X))
    assert pickle.loads(pickle.dumps(est)).eps_ == est.eps_
