"""The MLP's contract: its docstring and its own parameters' constraints (kept apart so the
estimator's module stays short)."""

import numbers

from sklearn.utils._param_validation import Interval, StrOptions


CLASS_DOC = """Multi-layer perceptron or one-vs-all L2-SVM, trained with torch on the CPU or a GPU.

    The network is ``[input dropout] -> (Linear -> [BatchNorm] -> activation -> [dropout]) x H ->
    Linear``. With ``hidden_layer_sizes=()`` it is linear; with ``loss="squared_hinge"`` as well
    it is the paper's one-vs-all L2-SVM.

    The training objective is ``sum_i w_i loss_i / sum_i w_i + 0.5 * alpha * sum ||W||^2`` over
    the weight matrices (biases and batch-norm parameters are not penalized), with ``w_i`` the
    sample weight times the class weight (1 by default), where ``loss_i`` is

    * ``"cross_entropy"``: softmax cross-entropy (logistic loss with one output for 2 classes);
    * ``"squared_hinge"``: ``sum_k max(0, 1 - t_ik f_k(x_i))^2`` with ``t_ik = +1`` for the true
      class and ``-1`` otherwise (one output and ``t_i = +-1`` for 2 classes), i.e. one L2-SVM per
      class summed.

    **Solvers.** ``solver="auto"`` is L-BFGS for a linear model without input dropout (the
    objective is convex and deterministic: L-BFGS reaches its minimum, where mini-batch Adam
    stalls far from it), and Adam for a network. L-BFGS is full-batch with a strong-Wolfe line
    search; it stops on torch's convergence tests or after ``max_iter`` iterations, needs a
    deterministic objective (no dropout), ignores ``batch_size``, ``lr_schedule`` and
    ``early_stopping`` and has no ``partial_fit``. Adam/SGD run ``max_iter`` epochs of shuffled
    mini-batches (fewer with early stopping).

    **The paper's C.** The paper minimizes, per class, ``0.5 ||w||^2 + C * mean_i(margin_i^2)``
    with ``C = 100``. Dividing by ``C`` gives the objective above with ``alpha = 1 / C``, so
    passing ``C`` sets ``alpha = 1 / C`` (and ``alpha`` is then ignored). scikit-learn's
    ``LinearSVC`` (LIBLINEAR) *sums* the loss instead of averaging it, so the same model is
    ``LinearSVC(loss="squared_hinge", C=C / n_train)``: 100 / 50,000 = 0.002 on CIFAR-10.
    (LinearSVC also penalizes its intercept; here it is not.)

    **Standardization.** With ``standardize=True`` each feature is mapped to
    ``(x - mean) / sqrt(var + 0.01)`` with the training statistics (the demo's step), stored in
    ``mean_`` / ``scale_`` and applied at predict time. It is applied per mini-batch, so the
    training data is never copied for it; the linear L-BFGS objective folds it into the weights.

    **Features as float16.** float32 and float16 inputs are used as given (anything else is
    converted to float32); Adam/SGD and prediction decode float16 one mini-batch at a time, so
    half-size stored features (``PatchEncoder(dtype="float16")``) are never copied to float32
    whole. L-BFGS, being full-batch, converts them.

    **Randomness.** All randomness (initialization, shuffling, the validation split, dropout
    masks, the preconditioner's rows) comes from private ``torch.Generator`` objects seeded from
    ``random_state``; the global torch/numpy seeds are never read or changed. The same
    ``random_state`` gives the same model on the CPU (on a GPU, up to the non-determinism of its
    kernels).

    **Fitted state is plain data.** Fitted attributes (ending in ``_``) hold only numpy arrays,
    torch tensors, python scalars, strings, ``None``, lists/tuples/dicts of those, and
    ``model_``, a ``torch.nn.Sequential`` of standard layers (Linear, BatchNorm1d, ReLU,
    LeakyReLU, Tanh, Dropout), so they can be saved without pickle. Generators, the optimizer and
    device copies of the statistics are private, rebuilt on demand; pickling also keeps the
    generator and optimizer states (so ``partial_fit`` continues exactly), all on the CPU, and
    an unpickled model goes back to its fitting device where that exists, else the CPU.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(100,)
        Widths of the hidden layers; ``()`` for a linear model.
    activation : {"relu", "leaky_relu", "tanh"}, default="relu"
        Hidden activation; weights get Kaiming init for (leaky) ReLU and Xavier init for tanh.
    dropout : float in [0, 1), default=0.0
        Dropout probability after each hidden activation.
    input_dropout : float in [0, 1), default=0.0
        Dropout probability on the (standardized) inputs.
    batch_norm : bool, default=False
        Batch normalization after each hidden linear layer.
    loss : {"cross_entropy", "squared_hinge"}, default="cross_entropy"
    alpha : float >= 0, default=1e-4
        L2 penalty ``0.5 * alpha * ||W||^2`` added to the *mean* loss (ignored when ``C`` is set).
        scikit-learn's MLPClassifier divides its penalty by the batch size, so its ``alpha``
        equals ``alpha * batch_size`` here.
    C : float > 0 or None, default=None
        The penalty in the paper's units: ``alpha = 1 / C`` (see above). ``C=100`` is the paper's.
    class_weight : dict, "balanced" or None, default=None
        Weights multiplying each class's samples' losses, as in scikit-learn's linear models
        (``"balanced"``: ``n_samples / (n_classes * count)``; not with :meth:`partial_fit`).
    solver : {"auto", "lbfgs", "adam", "sgd"}, default="auto"
        See **Solvers** above.
    learning_rate_init : float, default=1e-3
        Initial step size of adam/sgd (the L-BFGS step is 1 with a line search).
    momentum : float in [0, 1], default=0.9
        SGD momentum.
    nesterov : bool, default=True
        Nesterov momentum for SGD (when ``momentum > 0``).
    lr_schedule : {"constant", "step", "cosine"}, default="cosine"
        Learning-rate decay over ``max_iter`` epochs in :meth:`fit`: cosine annealing to 0 per
        batch, or x0.1 at 50% and again at 75% of the epochs. :meth:`partial_fit` always uses
        ``learning_rate_init``.
    batch_size : int, default=200
    max_iter : int or None, default=None
        Epochs of adam/sgd; iterations of L-BFGS (which stops earlier once converged). None:
        200 epochs, or at most 1000 L-BFGS iterations.
    early_stopping : bool, default=False
        Adam/SGD: hold out a stratified ``validation_fraction`` of the training samples, stop
        when its (unweighted) accuracy has not improved by ``tol`` for ``n_iter_no_change``
        epochs, and restore the weights of the best epoch.
    validation_fraction : float in (0, 1), default=0.1
    n_iter_no_change : int, default=5
    tol : float, default=1e-4
        Minimum improvement of the validation accuracy that resets the early-stopping counter.
    standardize : bool, default=True
    precision : {"float32", "bfloat16", "auto"}, default="float32"
        ``"bfloat16"`` runs the adam/sgd forward and backward passes under
        :func:`torch.autocast` (bfloat16 matrix products; float32 weights, optimizer state and
        loss): faster where bfloat16 is native (CPUs with AVX512-BF16/AMX, GPUs), at the cost
        of ~3 significant digits in the products, and much *slower* where it is emulated.
        ``"auto"`` uses bfloat16 only where it is native (see ``precision_``). L-BFGS and
        prediction always run in float32.
    precondition : bool or "auto", default="auto"
        Linear model with L-BFGS only: optimize in coordinates where the loss is nearly
        isotropic. The preconditioner is ``M = alpha I + c G``, with ``G`` the covariance of the
        standardized features (on at most ``max(2 * n_features, 16384)`` rows) and ``c`` the
        loss's typical curvature; L-BFGS then runs on ``U = W L`` (``M = L L^T``). Standardized
        pooled features are strongly correlated, which makes plain L-BFGS crawl; the solution
        is the same either way, only the path to it changes. "auto" preconditions when
        ``n_features <= 16384`` (the ``d x d`` matrix stays under 1 GB).
    n_views : int, default=1
        The columns of ``X`` are ``n_views`` equal blocks, each a view of the same sample (e.g.
        an image and its mirror from ``PatchEncoder(flip=True)``). Training uses every view as a
        sample with the sample's label and weight (standardization statistics are per
        view-feature); predictions average the views' scores (logits). The early-stopping split
        is by sample, so the views of one sample never straddle it.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        1: a one-line summary per fit; 2: also a line per epoch / L-BFGS evaluation (through
        the ``featlearn`` logger).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels (any type :func:`numpy.unique` sorts).
    n_features_in_ : int
    solver_ : {"lbfgs", "adam", "sgd"}
        The solver used (``solver`` with "auto" resolved).
    mean_, scale_ : ndarray of shape (n_features_in_ // n_views,), float32
        Standardization statistics, weighted by the sample weights (zeros and ones when
        ``standardize=False``).
    loss_curve_ : list of float
        Training objective (mean loss + penalty) per epoch (L-BFGS: per function evaluation).
    validation_scores_ : list of float
        Validation accuracy per epoch (empty without early stopping).
    precision_ : {"float32", "bfloat16"}
        The precision training ran in (``precision`` with "auto" resolved for the device).
    best_epoch_ : int
        Epoch (0-based) whose weights were kept: the best validation epoch, else the last.
    n_iter_ : int
        Epochs run (L-BFGS: iterations) by the last :meth:`fit`, counting later
        :meth:`partial_fit` calls.
    device_ : str
        The device training ran on.
    model_ : torch.nn.Sequential
        The trained network (standard layers only).

    See Also
    --------
    sklearn.neural_network.MLPClassifier : the same network in numpy.
    sklearn.svm.LinearSVC : the L2-SVM with ``C_sklearn = C / n_train``.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from featlearn import TorchMLPClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> svm = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=100,
    ...                          device="cpu").fit(X, y)
    >>> svm.solver_, svm.score(X, y) > 0.9
    ('lbfgs', True)
    """

#: The MLP's own parameters' constraints (those it shares with the convolutional head are
#: :class:`featlearn.classifier._base.BaseTorchClassifier`'s).
PARAMETER_CONSTRAINTS = {
    "hidden_layer_sizes": [tuple, list],
    "activation": [StrOptions({"relu", "leaky_relu", "tanh"})],
    "input_dropout": [Interval(numbers.Real, 0, 1, closed="left")],
    "batch_norm": ["boolean"],
    "C": [Interval(numbers.Real, 0, None, closed="neither"), None],
    "solver": [StrOptions({"auto", "lbfgs", "adam", "sgd"})],
    "max_iter": [Interval(numbers.Integral, 1, None, closed="left"), None],
    "standardize": ["boolean"],
    "precondition": ["boolean", StrOptions({"auto"})],
}
