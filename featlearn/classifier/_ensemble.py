"""A seed ensemble: copies of one classifier, differing only in their seeds, averaged."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.validation import check_is_fitted


class SeedEnsembleClassifier(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """``n_estimators`` copies of ``estimator``, each with its own ``random_state``, trained on
    the same rows; their predicted probabilities are averaged.

    For networks trained by SGD on fixed features, the copies differ in their initialisation,
    dropout masks and batch order, and averaging them lowers the variance of the prediction.
    The copies are fitted one after another and read the caller's ``X`` as it is (a float16
    memmap stays a memmap): scikit-learn's ``BaggingClassifier(bootstrap=False)`` does the same
    training but predicts each member on ``X[:, features]``, a full copy of the features per
    member, and ``VotingClassifier`` names each member, so one shared parameter would have
    ``n_estimators`` paths. Here a shared parameter is ``estimator__name`` (in a pipeline built
    by ``make_coates_pipeline(ensemble=N)``: ``classifier__estimator__name``).

    Parameters
    ----------
    estimator : classifier
        With ``fit``, ``predict_proba`` and a ``random_state`` parameter (e.g.
        :class:`featlearn.TorchMLPClassifier`). Cloned, never fitted itself.
    n_estimators : int >= 1, default=5
    random_state : int, RandomState instance or None, default=None
        Draws the copies' seeds: the same value gives the same copies.

    Attributes
    ----------
    estimators_ : list of fitted classifiers
        In the order of their seeds; ``estimators_[i].random_state`` is copy i's seed.
    classes_ : ndarray of shape (n_classes,)
        The copies' classes (the same for all: they see the same ``y``).
    n_features_in_ : int
        Features seen at fit, when the copies record it.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn.classifier import SeedEnsembleClassifier, TorchMLPClassifier
    >>> X = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(int)
    >>> mlp = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=5, device="cpu")
    >>> ens = SeedEnsembleClassifier(mlp, n_estimators=3, random_state=0).fit(X, y)
    >>> len({m.random_state for m in ens.estimators_}), ens.predict_proba(X).shape
    (3, (60, 2))
    """

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "predict_proba"])],
        "n_estimators": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, estimator=None, n_estimators=5, random_state=None):
        self.estimator = estimator
        self.n_estimators = n_estimators
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y, **fit_params):
        """Fit each copy on ``(X, y)``; ``fit_params`` (e.g. ``sample_weight``) go to every copy."""
        if "random_state" not in self.estimator.get_params(deep=False):
            raise ValueError(f"SeedEnsembleClassifier needs an estimator with a random_state "
                             f"parameter; {type(self.estimator).__name__} has none")
        seeds = check_random_state(self.random_state).randint(np.iinfo(np.int32).max,
                                                              size=self.n_estimators)
        self.estimators_ = [clone(self.estimator).set_params(random_state=int(s))
                            .fit(X, y, **fit_params) for s in seeds]
        first = self.estimators_[0]
        self.classes_ = first.classes_
        if hasattr(first, "n_features_in_"):
            self.n_features_in_ = first.n_features_in_
        return self

    def predict_proba(self, X):
        """The copies' class probabilities, averaged: ``(n_samples, n_classes)``."""
        check_is_fitted(self)
        total = None
        for member in self.estimators_:
            proba = np.asarray(member.predict_proba(X), dtype=np.float64)
            total = proba if total is None else total + proba
        return total / len(self.estimators_)

    def predict(self, X):
        """The class of highest averaged probability."""
        proba = self.predict_proba(X)  # first: it checks that the ensemble is fitted
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.estimator is not None:
            inner = self.estimator.__sklearn_tags__()
            tags.input_tags = inner.input_tags
            tags.non_deterministic = inner.non_deterministic
        return tags
