"""The base of the torch classifiers: what the MLP and the convolutional head share as
scikit-learn estimators (as scikit-learn's ``BaseMultilayerPerceptron`` does for its MLPs).

The training parameters' constraints, the predictions (scores averaged over the views, the
predict rule, probabilities) and the tags live here once; each concrete class keeps its own
explicit ``__init__`` (scikit-learn reads the parameters from its signature) and supplies
``_forward_numpy(X) -> (n_samples, n_outputs)`` scores.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if

from ._losses import predict_index, probabilities
from ._state import PrivateStateMixin


class BaseTorchClassifier(PrivateStateMixin, ClassifierMixin, BaseEstimator):
    """Shared parameters' constraints and predictions of :class:`TorchMLPClassifier` and
    :class:`TorchConvClassifier` (not an estimator of its own)."""

    #: The constraints of the parameters both classifiers take; each adds its own.
    _parameter_constraints = {
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "loss": [StrOptions({"cross_entropy", "squared_hinge"})],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "momentum": [Interval(numbers.Real, 0, 1, closed="both")],
        "nesterov": ["boolean"],
        "lr_schedule": [StrOptions({"constant", "step", "cosine"})],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "precision": [StrOptions({"float32", "bfloat16", "auto"})],
        "n_views": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def _forward_numpy(self, X):  # pragma: no cover - every concrete class defines it
        """Scores ``(n_samples, n_outputs)`` of a fitted model, the views averaged."""
        raise NotImplementedError

    def decision_function(self, X):
        """Raw scores (the views' average).

        Parameters
        ----------
        X : array-like
            Samples in the form the model was fitted on.

        Returns
        -------
        ndarray of shape (n_samples,) for 2 classes (positive means ``classes_[1]``), else
        (n_samples, n_classes)
        """
        scores = self._forward_numpy(X)
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        """The class with the highest score.

        Parameters
        ----------
        X : array-like
            Samples in the form the model was fitted on.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        scores = self._forward_numpy(X)  # checks fitted first
        return self.classes_[predict_index(scores)]

    @available_if(lambda self: self.loss == "cross_entropy")
    def predict_proba(self, X):
        """Class probabilities (softmax; sigmoid for 2 classes) of the views' average score.

        Only for ``cross_entropy``: squared-hinge scores are not probabilities (calibrate them
        with :class:`sklearn.calibration.CalibratedClassifierCV`).

        Parameters
        ----------
        X : array-like
            Samples in the form the model was fitted on.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return probabilities(self._forward_numpy(X))

    @available_if(lambda self: self.loss == "cross_entropy")
    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like
            Samples in the form the model was fitted on.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
