"""SeedEnsembleClassifier: copies of a classifier that differ only in their seeds, averaged."""

import tracemalloc

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import SeedEnsembleClassifier, TorchMLPClassifier

SMALL_MLP = TorchMLPClassifier(hidden_layer_sizes=(16,), dropout=0.1, max_iter=10,
                               batch_size=64, learning_rate_init=1e-2, device="cpu")


def _expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data":
            "the members' stochastic solver shuffles repeated rows differently"}


@parametrize_with_checks([SeedEnsembleClassifier(SMALL_MLP, n_estimators=2, random_state=0)],
                         expected_failed_checks=_expected_failures)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    return X, y


def test_members_are_the_estimator_with_their_own_seeds(data):
    X, y = data
    ens = SeedEnsembleClassifier(SMALL_MLP, n_estimators=3, random_state=0).fit(X, y)
    seeds = [m.random_state for m in ens.estimators_]
    assert len(set(seeds)) == 3 and SMALL_MLP.random_state is None  # the template is untouched
    for member, seed in zip(ens.estimators_, seeds):
        alone = clone(SMALL_MLP).set_params(random_state=seed).fit(X, y)
        np.testing.assert_allclose(member.predict_proba(X), alone.predict_proba(X), atol=1e-6)
    expected = np.mean([m.predict_proba(X) for m in ens.estimators_], axis=0)
    np.testing.assert_allclose(ens.predict_proba(X), expected)
    np.testing.assert_array_equal(ens.predict(X), ens.classes_[expected.argmax(1)])
    np.testing.assert_array_equal(ens.classes_, [0, 1, 2])
    assert ens.n_features_in_ == 20


def test_same_random_state_same_ensemble_other_state_other_seeds(data):
    X, y = data
    a = SeedEnsembleClassifier(SMALL_MLP, n_estimators=2, random_state=4).fit(X, y)
    b = SeedEnsembleClassifier(SMALL_MLP, n_estimators=2, random_state=4).fit(X, y)
    c = SeedEnsembleClassifier(SMALL_MLP, n_estimators=2, random_state=5).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert [m.random_state for m in a.estimators_] != [m.random_state for m in c.estimators_]


def test_fit_params_reach_every_member(data):
    X, y = data
    w = np.where(y == 2, 0.0, 1.0)  # class 2 weighted out: no member may predict it much
    ens = SeedEnsembleClassifier(LogisticRegression(max_iter=200), n_estimators=2,
                                 random_state=0).fit(X, y, sample_weight=w)
    plain = SeedEnsembleClassifier(LogisticRegression(max_iter=200), n_estimators=2,
                                   random_state=0).fit(X, y)
    assert np.mean(ens.predict(X) == 2) < np.mean(plain.predict(X) == 2)


def test_features_are_read_in_place_not_copied_per_member(data, tmp_path):
    """The reason for this class: BaggingClassifier predicts each member on X[:, features]."""
    X, y = data
    X = np.tile(X, (1, 200)).astype(np.float16)  # 300 x 4000 float16: 2.4 MB
    path = tmp_path / "f.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    ens = SeedEnsembleClassifier(SMALL_MLP, n_estimators=4, random_state=0).fit(mm, y)
    np.testing.assert_allclose(ens.predict_proba(mm), ens.predict_proba(X), atol=1e-6)
    tracemalloc.start()
    ens.predict_proba(mm)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < X.nbytes * 2  # four members, not four copies (and never a float64 one)


@pytest.mark.parametrize("params, match", [
    (dict(estimator=LinearSVC()), "predict_proba"),
    (dict(estimator=SMALL_MLP, n_estimators=0), "n_estimators"),
    (dict(estimator=SMALL_MLP, n_estimators=1.5), "n_estimators"),
])
def test_bad_parameters_are_named(data, params, match):
    with pytest.raises(ValueError, match=match):
        SeedEnsembleClassifier(**params).fit(*data)


def test_an_estimator_without_a_seed_is_refused(data):
    from sklearn.naive_bayes import GaussianNB

    with pytest.raises(ValueError, match="needs an estimator with a random_state parameter; "
                                         "GaussianNB has none"):
        SeedEnsembleClassifier(GaussianNB(), n_estimators=2).fit(*data)


def test_unfitted_ensemble_says_so(data):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        SeedEnsembleClassifier(SMALL_MLP).predict(data[0])
