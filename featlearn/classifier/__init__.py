"""The last stage: a torch MLP classifier that is also the paper's one-vs-all L2-SVM, and a
convolutional head for pooled spatial maps (trained from images by
:class:`featlearn.StreamingConvClassifier`, in :mod:`featlearn.streaming`).

A two-layer network (the seed work's classifier) and the paper's linear L2-SVM are the same
model with a different depth and loss, so one estimator owns both; the convolutional head
(Thiry et al., ICLR 2021) shares its training contract and parts. The modules, each a small
overridable step with explicit arguments (tests call them directly):

``_base``         what both estimators share: parameters' constraints, predictions, tags
``_state``        set-up, private state rebuilt on demand, CPU pickling
``_estimator``    the MLP / L2-SVM estimator: its parameters and fit dispatch
``_contract``     its docstring and own parameters' constraints
``_network``      the network (standard ``torch.nn`` layers) and its private-dropout forward
``_losses``       signed targets, mean / summed losses and gradients, penalty, predict rule
``_standardize``  feature statistics, in-place application, folding into a linear layer
``_stochastic``   adam/sgd: optimizer, schedule, early stopping, one epoch
``_lbfgs``        L-BFGS: the linear objective, the preconditioner, the minimizer
``_data``         views, label codes, sample weights, zero-copy tensors
``_conv_estimator`` the convolutional head's estimator: its parameters, fit and input
``_conv``         its network, its maps decoded per batch, its epoch and chunked scores
``_ensemble``     a seed ensemble of either (copies differing in their seeds, averaged)
"""

from ._conv_estimator import TorchConvClassifier
from ._ensemble import SeedEnsembleClassifier
from ._estimator import TorchMLPClassifier
from ._standardize import STANDARDIZE_EPS

__all__ = ["TorchMLPClassifier", "TorchConvClassifier", "SeedEnsembleClassifier",
           "STANDARDIZE_EPS"]
