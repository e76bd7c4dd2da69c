"""PowerNormalizer: the signed power normalization of pooled features."""

import pickle

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import PowerNormalizer
from featlearn.persistence import load_model, save_model
from featlearn.preprocessing import signed_power_


@parametrize_with_checks([PowerNormalizer(), PowerNormalizer(power=0.3)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def _features(seed=0, shape=(300, 40)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=shape) * rng.lognormal(0, 2, size=shape[1])
    X[::7, ::3] = 0.0
    X[1, 1] = -0.0
    return X.astype(np.float32)


def test_square_root_is_exact():
    X = _features()
    out = PowerNormalizer().fit_transform(X)
    # float32 sqrt and float64 sqrt rounded to float32 agree exactly (no double-rounding issue)
    ref = (np.sign(X) * np.sqrt(np.abs(X.astype(np.float64)))).astype(np.float32)
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.float32


@pytest.mark.parametrize("power", [0.25, 0.75, 1.5, 2.0])
def test_other_powers_match_the_naive_reference(power):
    X = _features(seed=1)
    out = PowerNormalizer(power=power).fit_transform(X)
    ref = np.sign(X.astype(np.float64)) * np.abs(X.astype(np.float64)) ** power
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=0)


def test_power_one_is_the_identity_and_float64_becomes_float32():
    X = _features(seed=2).astype(np.float64)
    out = PowerNormalizer(power=1).fit_transform(X)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, X.astype(np.float32))


def test_copy_false_transforms_in_place_and_copy_true_does_not():
    X = _features(seed=3)
    keep = X.copy()
    out = PowerNormalizer().fit(X).transform(X)
    np.testing.assert_array_equal(X, keep)
    out2 = PowerNormalizer(copy=False).fit(X).transform(X)
    assert out2 is X or np.shares_memory(out2, X)
    np.testing.assert_array_equal(X, out)


def test_read_only_input_is_not_written(tmp_path):
    X = _features(seed=4)
    path = tmp_path / "f.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    out = PowerNormalizer(copy=False).fit(mm).transform(mm)
    np.testing.assert_array_equal(np.load(path), X)
    np.testing.assert_array_equal(out, PowerNormalizer().fit_transform(X))


def test_chunked_kernel_matches_one_block():
    X = _features(seed=5, shape=(3000, 700))  # several row chunks
    ref = np.sign(X) * np.sqrt(np.abs(X))
    np.testing.assert_array_equal(signed_power_(X.copy(), 0.5), ref)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="power"):
        PowerNormalizer(power=0).fit(_features())
    with pytest.raises(ValueError, match="not finite|NaN"):
        PowerNormalizer().fit(np.array([[1.0, np.nan]]))
    est = PowerNormalizer().fit(_features())
    with pytest.raises(ValueError, match="features"):
        est.transform(np.ones((2, 3), np.float32))


def test_in_a_pipeline_and_round_trip(tmp_path):
    X = np.abs(_features(seed=6))
    pipe = make_pipeline(PowerNormalizer(), StandardScaler()).fit(X)
    path = tmp_path / "pipe.npz"
    save_model(pipe, path)
    back = load_model(path)
    np.testing.assert_array_equal(back.transform(X), pipe.transform(X))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pipe)).transform(X), pipe.transform(X))


def test_pipeline_power_step_from_python_and_configuration():
    from featlearn import make_coates_pipeline
    from featlearn.pipeline import build_pipeline

    pipe = make_coates_pipeline(8, power=0.5)
    assert [name for name, _ in pipe.steps] == ["encoder", "power", "classifier"]
    assert pipe.named_steps["power"].power == 0.5
    assert "power" not in make_coates_pipeline(8).named_steps
    built = build_pipeline({"name": "p", "params": {"power": 0.25, "n_centroids": 8}})
    assert built.named_steps["power"].power == 0.25
    with pytest.raises(ValueError, match="'power' must be a number or null"):
        build_pipeline({"name": "p", "params": {"power": "half"}})
