import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import TorchMLPClassifier
from featlearn.classifier import STANDARDIZE_EPS

# Small, fast configurations for the scikit-learn contract checks: an MLP and the L2-SVM.
SMALL_MLP = TorchMLPClassifier(hidden_layer_sizes=(32,), dropout=0.1, max_epochs=40,
                               batch_size=64, learning_rate_init=1e-2, device="cpu")
SMALL_SVM = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=100,
                               optimizer="lbfgs", max_epochs=100, device="cpu")


@parametrize_with_checks([SMALL_MLP, SMALL_SVM])
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)


def test_digits_mlp_accuracy(digits):
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(256,), max_epochs=30, batch_size=64, random_state=0,
                             device="cpu").fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.95
    assert len(clf.loss_curve_) == clf.n_iter_ == 30
    assert clf.loss_curve_[-1] < clf.loss_curve_[0] / 5
    proba = clf.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(1)], clf.predict(Xte))


@pytest.mark.parametrize("kw", [
    dict(optimizer="sgd", learning_rate_init=0.05, lr_schedule="step", activation="tanh"),
    dict(batch_norm=True, activation="leaky_relu", input_dropout=0.1, lr_schedule="constant"),
    dict(precision="bfloat16"),
])
def test_digits_other_configurations(digits, kw):
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(128,), max_epochs=25, batch_size=64, random_state=0,
                             device="cpu", **kw).fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.95


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_uses_bfloat16_only_where_native(digits, monkeypatch, native):
    # Emulated bfloat16 (AVX2-only CPUs) ran 7x slower than float32: "auto" must avoid it.
    monkeypatch.setattr("featlearn.classifier._has_fast_bfloat16", lambda device: native)
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(64,), max_epochs=3, precision="auto",
                             random_state=0, device="cpu").fit(Xtr, ytr)
    assert clf.precision_ == ("bfloat16" if native else "float32")
    if not native:  # then it is exactly the float32 model
        ref = TorchMLPClassifier(hidden_layer_sizes=(64,), max_epochs=3, precision="float32",
                                 random_state=0, device="cpu").fit(Xtr, ytr)
        np.testing.assert_array_equal(clf.decision_function(Xte), ref.decision_function(Xte))
    assert pickle.loads(pickle.dumps(clf)).precision_ == clf.precision_


def test_early_stopping_restores_best_epoch(digits):
    Xtr, _, ytr, _ = digits
    kw = dict(hidden_layer_sizes=(64,), early_stopping=True, validation_fraction=0.2,
              lr_schedule="constant", learning_rate_init=0.02, random_state=0, device="cpu")
    clf = TorchMLPClassifier(max_epochs=200, n_iter_no_change=4, **kw).fit(Xtr, ytr)
    assert clf.n_iter_ < 200 and len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_epoch_ < clf.n_iter_ - 1  # it ran past its best epoch
    assert clf.validation_scores_[clf.best_epoch_] == max(clf.validation_scores_)
    # The same run cut at the best epoch draws the same randomness up to there, so the
    # restored weights must be exactly the weights it ends with.
    short = TorchMLPClassifier(max_epochs=clf.best_epoch_ + 1, n_iter_no_change=1000, **kw)
    short.fit(Xtr, ytr)
    np.testing.assert_array_equal(clf.decision_function(Xtr), short.decision_function(Xtr))
    assert clf.score(Xtr, ytr) >= 0.95


def test_squared_hinge_matches_linearsvc():
    X, y = make_classification(n_samples=600, n_features=20, n_informative=10, n_classes=3,
                               n_clusters_per_class=1, class_sep=0.8, random_state=0)
    X = (X - X.mean(0)) / np.sqrt(X.var(0) + STANDARDIZE_EPS)  # so both see the same features
    C = 100.0
    ours = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=C,
                              optimizer="lbfgs", max_epochs=500, standardize=False,
                              device="cpu").fit(X, y)
    # LinearSVC sums the loss: C_sklearn = C / n_train. A large intercept_scaling makes its
    # (penalized) intercept nearly free, like ours.
    ref = LinearSVC(loss="squared_hinge", C=C / len(X), intercept_scaling=100, tol=1e-8,
                    dual=False).fit(X, y)
    agree = np.mean(ours.predict(X) == ref.predict(X))
    assert agree >= 0.99
    np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(X),
                               atol=0.01 * np.abs(ref.decision_function(X)).max())


@pytest.mark.parametrize("loss", ["squared_hinge", "cross_entropy"])
def test_preconditioned_lbfgs_same_solution_fewer_iterations(loss):
    # Strongly correlated features (a few latent factors seen through many noisy copies), like
    # pooled k-means features: plain L-BFGS crawls along the ill-conditioned directions.
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(3000, 8))
    X = (Z @ rng.normal(size=(8, 300)) + 0.05 * rng.normal(size=(3000, 300))).astype(np.float32)
    y = (Z[:, :3] @ [1.0, -1.0, 0.5] > 0).astype(int) + (Z[:, 3] > 0.5)
    kw = dict(hidden_layer_sizes=(), loss=loss, C=100.0, optimizer="lbfgs", max_epochs=3000,
              device="cpu", random_state=0)
    pre = TorchMLPClassifier(precondition=True, **kw).fit(X, y)
    plain = TorchMLPClassifier(precondition=False, **kw).fit(X, y)
    assert pre.n_iter_ < plain.n_iter_ / 1.5  # measured: 15 vs 46 (hinge), 19 vs 35 (CE)
    # Both minimize the same convex objective: the preconditioned one at least as well.
    assert pre.loss_curve_[-1] <= plain.loss_curve_[-1] * (1 + 1e-4)
    np.testing.assert_allclose(pre.decision_function(X), plain.decision_function(X),
                               atol=0.02 * np.abs(plain.decision_function(X)).max())
    assert np.mean(pre.predict(X) == plain.predict(X)) >= 0.99


def test_c_is_alpha_inverse():
    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    kw = dict(hidden_layer_sizes=(), loss="squared_hinge", optimizer="lbfgs", max_epochs=50,
              device="cpu")
    a = TorchMLPClassifier(C=4.0, **kw).fit(X, y)
    b = TorchMLPClassifier(alpha=0.25, **kw).fit(X, y)
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X), rtol=1e-6)
    assert a.decision_function(X).shape == (200,)  # binary: one score, like LinearSVC


def test_standardization_statistics_are_stored_and_used():
    rng = np.random.default_rng(0)
    X = rng.normal(5, 3, size=(300, 6)).astype(np.float32)
    X[:, 0] = 1.0  # constant feature: scale sqrt(0 + 0.01)
    y = (X[:, 1] > 5).astype(int)
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), max_epochs=3, device="cpu",
                             random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.mean_, X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(clf.scale_, np.sqrt(X.var(0) + 0.01), rtol=1e-5)
    raw = TorchMLPClassifier(hidden_layer_sizes=(8,), max_epochs=3, device="cpu",
                             random_state=0, standardize=False)
    raw.fit((X - clf.mean_) / clf.scale_, y)
    np.testing.assert_allclose(clf.decision_function(X),
                               raw.decision_function((X - clf.mean_) / clf.scale_), atol=1e-4)


def test_string_labels_and_partial_fit(digits):
    Xtr, Xte, ytr, yte = digits
    names = np.array([f"digit-{d}" for d in range(10)], dtype=object)
    clf = TorchMLPClassifier(hidden_layer_sizes=(64,), random_state=0, device="cpu",
                             learning_rate_init=3e-3)
    for epoch in range(8):
        for s in range(0, len(Xtr), 400):
            clf.partial_fit(Xtr[s:s + 400], names[ytr[s:s + 400]],
                            classes=names if epoch == 0 and s == 0 else None)
    assert list(clf.classes_) == sorted(names)
    assert clf.score(Xte, names[yte]) >= 0.9
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(Xtr[:5], np.array(["seven"] * 5, dtype=object))


def test_bad_input_errors(digits):
    Xtr, _, ytr, _ = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), max_epochs=2, device="cpu")
    Xnan = Xtr.copy()
    Xnan[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(Xnan, ytr)
    with pytest.raises(ValueError, match="only one class"):
        clf.fit(Xtr, np.zeros(len(Xtr)))
    with pytest.raises(ValueError, match="classes must be passed"):
        TorchMLPClassifier(device="cpu").partial_fit(Xtr, ytr)
    clf.fit(Xtr, ytr)
    with pytest.raises(ValueError, match="features"):
        clf.predict(Xtr[:, :10])
    with pytest.raises(ValueError, match="lbfgs"):
        TorchMLPClassifier(optimizer="lbfgs", dropout=0.5).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        TorchMLPClassifier(hidden_layer_sizes=(0,)).fit(Xtr, ytr)
    assert not hasattr(TorchMLPClassifier(optimizer="lbfgs"), "partial_fit")
    assert not hasattr(TorchMLPClassifier(loss="squared_hinge"), "predict_proba")


def test_determinism_and_no_global_rng(digits):
    Xtr, Xte, ytr, _ = digits
    kw = dict(hidden_layer_sizes=(32,), max_epochs=3, input_dropout=0.2, early_stopping=True,
              random_state=42, device="cpu")
    state = torch.random.get_rng_state()
    a = TorchMLPClassifier(**kw).fit(Xtr, ytr)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    torch.manual_seed(123)
    b = TorchMLPClassifier(**kw).fit(Xtr, ytr)
    np.testing.assert_array_equal(a.decision_function(Xte), b.decision_function(Xte))
    c = TorchMLPClassifier(**{**kw, "random_state": 7}).fit(Xtr, ytr)
    assert not np.array_equal(a.decision_function(Xte), c.decision_function(Xte))


def test_pickle_roundtrip_and_continue_training(digits):
    Xtr, Xte, ytr, _ = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(32,), max_epochs=2, random_state=0,
                             device="cpu").fit(Xtr, ytr)
    blob = pickle.dumps(clf)
    back = pickle.loads(blob)
    np.testing.assert_array_equal(clf.decision_function(Xte), back.decision_function(Xte))
    # The optimizer and generator state travel too: continuing gives identical models.
    clf.partial_fit(Xtr, ytr)
    back.partial_fit(Xtr, ytr)
    np.testing.assert_array_equal(clf.decision_function(Xte), back.decision_function(Xte))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fitted_model_predicts_on_cpu(digits, monkeypatch):
    Xtr, Xte, ytr, _ = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(32,), max_epochs=2, random_state=0,
                             device="cuda").fit(Xtr, ytr)
    blob = pickle.dumps(clf)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = pickle.loads(blob)
    assert next(back.model_.parameters()).device.type == "cpu"
    np.testing.assert_allclose(back.decision_function(Xte), clf.decision_function(Xte),
                               atol=1e-4)
