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
SMALL_MLP = TorchMLPClassifier(hidden_layer_sizes=(32,), dropout=0.1, max_iter=40,
                               batch_size=64, learning_rate_init=1e-2, device="cpu")
SMALL_SVM = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=100,
                               solver="lbfgs", max_iter=100, device="cpu")


def _expected_failures(estimator):
    # Mini-batch training draws different batches from repeated rows than from weighted ones;
    # only the exact (L-BFGS) solver can honour the check, and only up to float32 round-off.
    return {"check_sample_weight_equivalence_on_dense_data":
            "the stochastic solver shuffles repeated rows differently; L-BFGS is float32"}


@parametrize_with_checks([SMALL_MLP, SMALL_SVM], expected_failed_checks=_expected_failures)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)


def test_digits_mlp_accuracy(digits):
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(256,), max_iter=30, batch_size=64, random_state=0,
                             device="cpu").fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.95
    assert len(clf.loss_curve_) == clf.n_iter_ == 30
    assert clf.loss_curve_[-1] < clf.loss_curve_[0] / 5
    proba = clf.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(1)], clf.predict(Xte))


@pytest.mark.parametrize("kw", [
    dict(solver="sgd", learning_rate_init=0.05, lr_schedule="step", activation="tanh"),
    dict(batch_norm=True, activation="leaky_relu", input_dropout=0.1, lr_schedule="constant"),
    dict(precision="bfloat16"),
])
def test_digits_other_configurations(digits, kw):
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(128,), max_iter=25, batch_size=64, random_state=0,
                             device="cpu", **kw).fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.95


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_uses_bfloat16_only_where_native(digits, monkeypatch, native):
    # Emulated bfloat16 (AVX2-only CPUs) ran 7x slower than float32: "auto" must avoid it.
    monkeypatch.setattr("featlearn._torch.has_fast_bfloat16", lambda device: native)
    Xtr, Xte, ytr, yte = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(64,), max_iter=3, precision="auto",
                             random_state=0, device="cpu").fit(Xtr, ytr)
    assert clf.precision_ == ("bfloat16" if native else "float32")
    if not native:  # then it is exactly the float32 model
        ref = TorchMLPClassifier(hidden_layer_sizes=(64,), max_iter=3, precision="float32",
                                 random_state=0, device="cpu").fit(Xtr, ytr)
        np.testing.assert_array_equal(clf.decision_function(Xte), ref.decision_function(Xte))
    assert pickle.loads(pickle.dumps(clf)).precision_ == clf.precision_


def test_early_stopping_restores_best_epoch(digits):
    Xtr, _, ytr, _ = digits
    kw = dict(hidden_layer_sizes=(64,), early_stopping=True, validation_fraction=0.2,
              lr_schedule="constant", learning_rate_init=0.02, random_state=0, device="cpu")
    clf = TorchMLPClassifier(max_iter=200, n_iter_no_change=4, **kw).fit(Xtr, ytr)
    assert clf.n_iter_ < 200 and len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_epoch_ < clf.n_iter_ - 1  # it ran past its best epoch
    assert clf.validation_scores_[clf.best_epoch_] == max(clf.validation_scores_)
    # The same run cut at the best epoch draws the same randomness up to there, so the
    # restored weights must be exactly the weights it ends with.
    short = TorchMLPClassifier(max_iter=clf.best_epoch_ + 1, n_iter_no_change=1000, **kw)
    short.fit(Xtr, ytr)
    np.testing.assert_array_equal(clf.decision_function(Xtr), short.decision_function(Xtr))
    assert clf.score(Xtr, ytr) >= 0.95


def test_squared_hinge_matches_linearsvc():
    X, y = make_classification(n_samples=600, n_features=20, n_informative=10, n_classes=3,
                               n_clusters_per_class=1, class_sep=0.8, random_state=0)
    X = (X - X.mean(0)) / np.sqrt(X.var(0) + STANDARDIZE_EPS)  # so both see the same features
    C = 100.0
    ours = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=C,
                              solver="lbfgs", max_iter=500, standardize=False,
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
    kw = dict(hidden_layer_sizes=(), loss=loss, C=100.0, solver="lbfgs", max_iter=3000,
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
    kw = dict(hidden_layer_sizes=(), loss="squared_hinge", solver="lbfgs", max_iter=50,
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
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, device="cpu",
                             random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.mean_, X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(clf.scale_, np.sqrt(X.var(0) + 0.01), rtol=1e-5)
    raw = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, device="cpu",
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
    clf = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, device="cpu")
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
        TorchMLPClassifier(solver="lbfgs", hidden_layer_sizes=(8,), dropout=0.5).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        TorchMLPClassifier(hidden_layer_sizes=(0,)).fit(Xtr, ytr)
    assert not hasattr(TorchMLPClassifier(solver="lbfgs"), "partial_fit")
    assert not hasattr(TorchMLPClassifier(loss="squared_hinge"), "predict_proba")


def test_determinism_and_no_global_rng(digits):
    Xtr, Xte, ytr, _ = digits
    kw = dict(hidden_layer_sizes=(32,), max_iter=3, input_dropout=0.2, dropout=0.5,
              early_stopping=True, random_state=42, device="cpu")
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
    clf = TorchMLPClassifier(hidden_layer_sizes=(32,), max_iter=2, random_state=0,
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
    clf = TorchMLPClassifier(hidden_layer_sizes=(32,), max_iter=2, random_state=0,
                             device="cuda").fit(Xtr, ytr)
    blob = pickle.dumps(clf)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = pickle.loads(blob)
    assert next(back.model_.parameters()).device.type == "cpu"
    np.testing.assert_allclose(back.decision_function(Xte), clf.decision_function(Xte),
                               atol=1e-4)


# ---------------------------------------------------------------------- defaults that converge


def _svm_objective(W, b, Xs, y, alpha):
    """The one-vs-all squared-hinge objective of a linear model on standardized rows (numpy)."""
    S = Xs @ W.T + b
    t = -np.ones_like(S)
    t[np.arange(len(y)), y] = 1
    return (np.maximum(0, 1 - t * S) ** 2).sum(1).mean() + 0.5 * alpha * (W ** 2).sum()


def test_auto_solver_linear_reaches_linearsvc_objective(digits):
    # Issue 14: Adam stopped at 20x the optimum here; "auto" must be L-BFGS and converge.
    Xtr, _, ytr, _ = digits
    svm = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", device="cpu",
                             random_state=0).fit(Xtr, ytr)
    assert svm.solver_ == "lbfgs"
    alpha = svm.alpha
    Xs = (Xtr - svm.mean_) / svm.scale_
    # LinearSVC sums the loss (C = 1 / (alpha n)); a large intercept_scaling frees its intercept.
    ref = LinearSVC(loss="squared_hinge", C=1 / alpha / len(Xs), intercept_scaling=1000,
                    tol=1e-10, max_iter=100_000, dual=False).fit(Xs, ytr)
    lin = svm.model_[-1]
    ours = _svm_objective(lin.weight.detach().numpy().astype(np.float64),
                          lin.bias.detach().numpy(), Xs, ytr, alpha)
    best = _svm_objective(ref.coef_, ref.intercept_, Xs, ytr, alpha)
    assert abs(ours - best) <= 1e-4 * best
    np.testing.assert_allclose(svm.loss_curve_[-1], ours, rtol=1e-4)  # it reports the same


def test_default_network_matches_mlpclassifier(digits):
    # MLPClassifier() (scikit-learn 1.9, random_state=0) scores 0.9685 on this split; running it
    # here would double the cost of the test. benchmarks/check_svm_objective.py --digits runs it.
    Xtr, Xte, ytr, yte = digits
    ours = TorchMLPClassifier(device="cpu", random_state=0).fit(Xtr, ytr)
    assert ours.solver_ == "adam" and ours.n_iter_ == 200
    assert ours.score(Xte, yte) >= 0.9685 - 0.01


def test_auto_solver_resolution():
    X, y = make_classification(n_samples=80, n_features=5, random_state=0)
    assert TorchMLPClassifier(hidden_layer_sizes=(), max_iter=5, device="cpu").fit(
        X, y).solver_ == "lbfgs"
    assert TorchMLPClassifier(hidden_layer_sizes=(4,), max_iter=2, device="cpu").fit(
        X, y).solver_ == "adam"
    # Input dropout makes the linear objective stochastic: mini-batches then.
    assert TorchMLPClassifier(hidden_layer_sizes=(), input_dropout=0.1, max_iter=2,
                              device="cpu").fit(X, y).solver_ == "adam"
    assert hasattr(TorchMLPClassifier(hidden_layer_sizes=(4,)), "partial_fit")
    assert not hasattr(TorchMLPClassifier(hidden_layer_sizes=()), "partial_fit")


# ---------------------------------------------------------------------- weights


def test_integer_sample_weight_equals_repeated_rows():
    X, y = make_classification(n_samples=150, n_features=6, n_informative=4, n_classes=3,
                               random_state=0)
    w = np.random.default_rng(0).integers(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(), loss="squared_hinge", C=10.0, device="cpu",
              random_state=0)
    weighted = TorchMLPClassifier(**kw).fit(X, y, sample_weight=w)
    repeated = TorchMLPClassifier(**kw).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    np.testing.assert_allclose(weighted.decision_function(X), repeated.decision_function(X),
                               atol=1e-3)
    np.testing.assert_allclose(weighted.loss_curve_[-1], repeated.loss_curve_[-1], rtol=1e-4)
    # The standardization statistics are weighted too.
    np.testing.assert_allclose(weighted.mean_, repeated.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted.scale_, repeated.scale_, rtol=1e-5)


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_class_weight_is_a_sample_weight(solver):
    X, y = make_classification(n_samples=200, n_features=6, weights=[0.8], random_state=0)
    kw = dict(hidden_layer_sizes=() if solver == "lbfgs" else (8,), solver=solver, max_iter=20,
              device="cpu", random_state=0)
    by_class = TorchMLPClassifier(class_weight={0: 1.0, 1: 4.0}, **kw).fit(X, y)
    by_sample = TorchMLPClassifier(**kw).fit(X, y, sample_weight=np.where(y == 1, 4.0, 1.0))
    np.testing.assert_allclose(by_class.decision_function(X), by_sample.decision_function(X),
                               rtol=1e-5, atol=1e-6)
    plain = TorchMLPClassifier(**kw).fit(X, y)
    # Up-weighting the minority class predicts it more often.
    assert (by_class.predict(X) == 1).sum() > (plain.predict(X) == 1).sum()
    balanced = TorchMLPClassifier(class_weight="balanced", **kw).fit(X, y)
    assert (balanced.predict(X) == 1).sum() > (plain.predict(X) == 1).sum()


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_uniform_sample_weight_changes_nothing(solver):
    X, y = make_classification(n_samples=120, n_features=5, random_state=0)
    kw = dict(hidden_layer_sizes=(), solver=solver, max_iter=5, device="cpu", random_state=0)
    a = TorchMLPClassifier(**kw).fit(X, y)
    b = TorchMLPClassifier(**kw).fit(X, y, sample_weight=np.full(len(X), 3.0))
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))


def test_bad_sample_weight():
    X, y = make_classification(n_samples=40, n_features=5, random_state=0)
    clf = TorchMLPClassifier(hidden_layer_sizes=(), max_iter=5, device="cpu")
    with pytest.raises(ValueError, match="sample_weight"):
        clf.fit(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="Negative"):
        clf.fit(X, y, sample_weight=-np.ones(len(X)))
    with pytest.raises(ValueError, match="non-zero|positive"):
        clf.fit(X, y, sample_weight=np.zeros(len(X)))
    with pytest.raises(ValueError, match="balanced"):
        TorchMLPClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1])


# ---------------------------------------------------------------------- contract


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_values_not_finite_in_float32_are_rejected():
    X, y = make_classification(n_samples=40, n_features=5, random_state=0)
    X[0, 0] = 1e39  # finite in float64, inf once cast to float32
    with pytest.raises(ValueError, match="infinity"):
        TorchMLPClassifier(max_iter=1, device="cpu").fit(X, y)


def test_fitted_state_is_plain_data(digits):
    Xtr, _, ytr, _ = digits
    clf = TorchMLPClassifier(hidden_layer_sizes=(16,), dropout=0.3, input_dropout=0.1,
                             batch_norm=True, max_iter=2, early_stopping=True, device="cpu",
                             random_state=0).fit(Xtr, ytr)
    clf.partial_fit(Xtr, ytr)
    allowed = (np.ndarray, torch.Tensor, int, float, str, bool, type(None), np.generic)

    def plain(v):
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(plain(x) for x in v.values())
        return isinstance(v, allowed)

    fitted = {k: v for k, v in vars(clf).items() if k.endswith("_") and not k.startswith("_")}
    assert {"model_", "classes_", "mean_", "scale_", "solver_", "device_"} <= set(fitted)
    for key, value in fitted.items():
        if key == "model_":
            assert type(value) is torch.nn.Sequential
            for layer in value:
                assert type(layer).__module__.startswith("torch.nn.modules"), layer
                assert not any(isinstance(v, torch.Generator) for v in vars(layer).values())
        else:
            assert plain(value), (key, type(value))


def test_verbose_levels(capsys):
    X, y = make_classification(n_samples=60, n_features=5, random_state=0)
    TorchMLPClassifier(hidden_layer_sizes=(), max_iter=5, device="cpu", verbose=1).fit(X, y)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lbfgs" in err[0]
    TorchMLPClassifier(hidden_layer_sizes=(), max_iter=5, device="cpu", verbose=2).fit(X, y)
    assert sum("lbfgs evaluation" in line for line in capsys.readouterr().err.splitlines()) >= 3
    TorchMLPClassifier(hidden_layer_sizes=(4,), max_iter=3, device="cpu", verbose=2).fit(X, y)
    assert sum("epoch" in line for line in capsys.readouterr().err.splitlines()) == 3
    TorchMLPClassifier(hidden_layer_sizes=(4,), max_iter=3, device="cpu").fit(X, y)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- shipped configurations

# What every shipped configuration's classifier trained with before solver/max_iter (and the
# scikit-learn-like class defaults): the presets and configurations must keep computing it.
_OLD_DEFAULTS = dict(hidden_layer_sizes=(512,), dropout=0.5, batch_size=256,
                     learning_rate_init=1e-3, lr_schedule="cosine", alpha=1e-4, momentum=0.9,
                     nesterov=True, n_iter_no_change=5, validation_fraction=0.1, tol=1e-4,
                     input_dropout=0.0, batch_norm=False, activation="relu", standardize=True)
_SHIPPED = {
    "coates2011-1600-svm": dict(hidden_layer_sizes=(), loss="squared_hinge", C=100.0,
                                dropout=0.0, solver="lbfgs", max_iter=1000, precondition="auto"),
    "featlearn-best-1600": dict(dropout=0.25, solver="adam", max_iter=20, precision="auto",
                                n_views=2),
    "featlearn-best-4000": dict(dropout=0.1, solver="adam", max_iter=20, precision="auto",
                                n_views=2),
    "seed-1600-mlp": dict(solver="sgd", learning_rate_init=0.01, lr_schedule="step",
                          max_iter=40, early_stopping=True, n_iter_no_change=6,
                          precision="auto"),
}


@pytest.mark.parametrize("name", sorted(_SHIPPED))
def test_shipped_configurations_keep_their_classifier(name):
    from featlearn.pipeline import build_pipeline, load_config

    params = build_pipeline(load_config(name)).named_steps["classifier"].get_params()
    expected = {**_OLD_DEFAULTS, **_SHIPPED[name]}
    if expected["hidden_layer_sizes"] == ():  # irrelevant to the linear model
        expected = {k: v for k, v in expected.items() if k not in ("batch_size", "dropout")}
    assert {k: params[k] for k in expected} == expected
