import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import PatchNormalizer, ZCAWhitening


@parametrize_with_checks([PatchNormalizer(), ZCAWhitening(), ZCAWhitening(zca=False, n_components=2)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def data(n=500, d=12, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return (rng.normal(size=(n, d)) @ A * 20 + 120).astype(np.float32)


@pytest.mark.parametrize("eps, ddof", [(10.0, 1), (0.5, 0), (0.0, 1)])
def test_normalizer_formula(eps, ddof):
    X = data()
    Y = PatchNormalizer(eps=eps, ddof=ddof).fit_transform(X)
    X64 = X.astype(np.float64)
    ref = (X64 - X64.mean(1, keepdims=True)) / np.sqrt(X64.var(1, ddof=ddof, keepdims=True) + eps)
    assert Y.dtype == np.float32
    np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5)


def test_normalizer_does_not_modify_input_and_is_stateless():
    X = data()
    X0 = X.copy()
    PatchNormalizer().transform(X)  # usable without fit
    np.testing.assert_array_equal(X, X0)


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_zca_whitened_covariance(eps):
    X = data(n=3000)
    z = ZCAWhitening(eps=eps).fit(X)
    Y = z.transform(X).astype(np.float64)
    C = np.cov(X.astype(np.float64), rowvar=False)
    lam, V = np.linalg.eigh(C)
    expected = V @ np.diag(lam / (lam + eps)) @ V.T
    np.testing.assert_allclose(np.cov(Y, rowvar=False), expected, atol=2e-4)
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-3)  # the mean is subtracted
    np.testing.assert_allclose(z.mean_, X.astype(np.float64).mean(0), rtol=1e-6)
    # ZCA is symmetric: W = V diag(1/sqrt(l+eps)) V^T
    np.testing.assert_allclose(z.whitening_, V @ np.diag(1 / np.sqrt(lam + eps)) @ V.T, atol=1e-5)


def test_mean_subtraction_matters():
    X = data(n=2000)
    z = ZCAWhitening().fit(X)
    Y = z.transform(X)
    np.testing.assert_allclose(Y, (X - z.mean_) @ z.whitening_, rtol=1e-4, atol=1e-4)
    assert np.abs((X @ z.whitening_).mean(0)).max() > 1  # without it the output is offset


def test_pca_whitening_reduced_components():
    X = data(n=3000)
    z = ZCAWhitening(zca=False, n_components=5, eps=0.0).fit(X)
    Y = z.transform(X)
    assert Y.shape == (3000, 5) and z.components_.shape == (5, 12)
    np.testing.assert_allclose(np.cov(Y.astype(np.float64), rowvar=False), np.eye(5), atol=1e-3)
    assert np.all(np.diff(z.explained_variance_) <= 0)
    assert z.get_feature_names_out().tolist() == [f"zcawhitening{i}" for i in range(5)]


@pytest.mark.parametrize("zca", [True, False])
def test_inverse_transform_roundtrip(zca):
    X = data()
    z = ZCAWhitening(zca=zca).fit(X)
    np.testing.assert_allclose(z.inverse_transform(z.transform(X)), X, rtol=1e-3, atol=1e-2)


def test_copy_false_centres_in_place():
    X = data()
    X0 = X.copy()
    z = ZCAWhitening(copy=False).fit(X)
    Y = z.transform(X)
    np.testing.assert_allclose(X, X0 - z.mean_, atol=1e-3)
    np.testing.assert_allclose(Y, ZCAWhitening().fit(X0).transform(X0), rtol=1e-4, atol=1e-4)


def test_float_outputs_are_float32():
    X = data().astype(np.float64)
    assert ZCAWhitening().fit(X).transform(X).dtype == np.float32
    assert PatchNormalizer().fit_transform(X).dtype == np.float32


@pytest.mark.parametrize("est", [PatchNormalizer(), ZCAWhitening()])
@pytest.mark.parametrize("X, match", [
    (np.array([[1.0, np.nan, 2.0], [1, 2, 3]]), "NaN"),
    (np.array([[1.0, np.inf, 2.0], [1, 2, 3]]), "infinity"),
    (np.zeros((0, 3)), "0 sample"),
    (np.array([["a", "b", "c"], ["d", "e", "f"]]), "[Ss]tring|dtype|convert"),
    (np.zeros((2, 3, 4)), "[Ff]ound array with dim 3|2D array"),
])
def test_bad_input(est, X, match):
    with pytest.raises(ValueError, match=match):
        est.fit(X)


@pytest.mark.parametrize("est", [PatchNormalizer(), ZCAWhitening()])
def test_feature_count_mismatch_at_transform(est):
    est.fit(data())
    with pytest.raises(ValueError, match="features"):
        est.transform(data(d=7))


def test_n_components_too_large():
    with pytest.raises(ValueError, match="n_components=20 must be <= n_features=12"):
        ZCAWhitening(n_components=20).fit(data())


def test_zca_at_cifar_size_matches_a_float64_reference():
    # The paper's size (400,000 x 108), correlated columns: the chunked float32/float64 fit must
    # give the textbook V diag(1/sqrt(lambda + eps)) V^T of the float64 covariance.
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(400_000, 108)) @ rng.normal(size=(108, 108)) + 3.0).astype(np.float32)
    z = ZCAWhitening(eps=0.1).fit(X)
    X64 = X.astype(np.float64)
    lam, V = np.linalg.eigh(np.cov(X64, rowvar=False, bias=True))
    W = (V / np.sqrt(lam + 0.1)) @ V.T
    np.testing.assert_allclose(z.mean_, X64.mean(0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(z.whitening_, W, rtol=0, atol=1e-4 * np.abs(W).max())


@pytest.mark.parametrize("est", [PatchNormalizer(), ZCAWhitening()])
def test_values_past_float32_range_are_a_value_error(est):
    X = data().astype(np.float64)
    big = X.copy()
    big[3, 2] = 1e39  # finite in float64, infinity once cast to float32
    with pytest.raises(ValueError, match="beyond float32's range"):
        clone(est).fit(big)
    fitted = clone(est).fit(X)
    with pytest.raises(ValueError, match="beyond float32's range"):
        fitted.transform(big)


def test_whitening_inverse_transform_refuses_non_finite_values():
    z = ZCAWhitening().fit(data())
    Y = z.transform(data()).astype(np.float64)
    Y[0, 0] = 1e39
    with pytest.raises(ValueError, match="beyond float32's range"):
        z.inverse_transform(Y)
    Y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        z.inverse_transform(Y)
