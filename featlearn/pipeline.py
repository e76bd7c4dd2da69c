"""Composition: the Coates-Ng pipeline as a plain scikit-learn Pipeline, and named configurations.

No numerics live here. A configuration in ``pipelines/`` is data (JSON): the keyword arguments of
:func:`make_coates_pipeline` plus how they were chosen, so a new configuration needs no new code.

Flip augmentation, and why it is expressed as it is
---------------------------------------------------
Training on images and their horizontal mirrors needs twice the rows at the classifier, but a
scikit-learn transformer cannot change the number of rows (``y`` would no longer match). Instead
the encoder appends the mirror's features as a second block of columns (``PatchEncoder(flip=True)``
gives ``[f(x), f(mirror(x))]``), and the classifier reads its input as ``n_views`` blocks of
columns, each a view of the same sample (``TorchMLPClassifier(n_views=2)``): it trains on every
view as a sample and averages the views' scores (logits) at prediction. The row count never
changes, so ``Pipeline``, ``GridSearchCV``, cross-validation splitters and ``Pipeline(memory=)``
caching work unchanged, a sample and its mirror always land on the same side of every split (no
leakage into early-stopping or CV validation folds), and the expensive encoding of both views is
cached together.
"""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.pipeline import Pipeline

#: Where the named configurations live (the repository's ``pipelines/`` folder).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "pipelines"

#: The paper's L2-SVM: one-vs-all squared hinge, C=100 on the mean loss, full-batch L-BFGS
#: (REFERENCE.md).
SVM_PARAMS = dict(hidden_layer_sizes=(), loss="squared_hinge", C=100.0, solver="lbfgs",
                  dropout=0.0, max_iter=1000)
#: The seed talk's two-layer network, with the training settings chosen for 6,400-dimensional
#: pooled features (the class defaults are scikit-learn's, for small problems).
MLP_PARAMS = dict(hidden_layer_sizes=(512,), loss="cross_entropy", dropout=0.5, solver="adam",
                  batch_size=256, max_iter=50, lr_schedule="cosine")


def make_coates_pipeline(n_centroids=1600, *, classifier="mlp", augment=None, memory=None,
                         device="auto", random_state=0, verbose=0, **stage_params):
    """Build the Coates-Ng pipeline: ``PatchEncoder`` -> classifier, as a plain ``Pipeline``.

    Parameters
    ----------
    n_centroids : int, default=1600
        Dictionary size K (``encoder__kmeans__n_clusters``).
    classifier : {"mlp", "svm"} or estimator, default="mlp"
        "svm" is the paper's one-vs-all L2-SVM (C=100 in the paper's units, REFERENCE.md);
        "mlp" the two-layer network (512 ReLU units, dropout 0.5). An estimator is used as is.
    augment : None or "flip", default=None
        "flip": train on images and their horizontal mirrors and average both views'
        predictions at test time (see the module docstring for how).
    memory : str, joblib.Memory or None
        ``Pipeline(memory=)``: caches the fitted encoder and the training features, so refitting
        with only classifier parameters changed skips the encoding.
    device : str, default="auto"
        Torch device for every stage ("auto" = CUDA when available).
    random_state : int or None, default=0
        Seeds the patch sampling, k-means and the classifier.
    verbose : int, default=0
    **stage_params
        Any parameter of the pipeline's steps in ``set_params`` form, e.g.
        ``encoder__stride=2``, ``encoder__whitener=ZCAWhitening(zca=False)``,
        ``classifier__max_iter=30``.

    Returns
    -------
    sklearn.pipeline.Pipeline with steps ``("encoder", PatchEncoder)`` and
    ``("classifier", ...)``; ``clone``, ``GridSearchCV`` and pickle accept it.
    """
    from featlearn.classifier import TorchMLPClassifier
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    if augment not in (None, "flip"):
        raise ValueError(f"augment must be None or 'flip', got {augment!r}")
    n_views = 2 if augment == "flip" else 1
    encoder = PatchEncoder(
        kmeans=MiniBatchKMeans(n_clusters=n_centroids, device=device, random_state=random_state,
                               verbose=verbose),
        flip=augment == "flip", device=device, random_state=random_state, verbose=verbose)
    if isinstance(classifier, str):
        presets = {"svm": SVM_PARAMS, "mlp": MLP_PARAMS}
        if classifier not in presets:
            raise ValueError(f"classifier must be 'mlp', 'svm' or an estimator, got {classifier!r}")
        clf = TorchMLPClassifier(**presets[classifier], n_views=n_views, device=device,
                                 random_state=random_state, verbose=verbose)
    else:
        clf = classifier
        if n_views > 1:
            if "n_views" not in clf.get_params():
                raise ValueError("augment='flip' needs a classifier with an n_views parameter "
                                 "(e.g. TorchMLPClassifier)")
            clf.set_params(n_views=n_views)
    pipe = Pipeline([("encoder", encoder), ("classifier", clf)], memory=memory)
    if stage_params:
        pipe.set_params(**stage_params)
    return pipe


def available_configs():
    """Names of the configurations in ``pipelines/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path) -> dict:
    """Load a configuration by name (``pipelines/NAME.json``) or path.

    Returns a dict with at least ``name`` and ``params`` (keyword arguments of
    :func:`make_coates_pipeline`); other keys (``description``, ``how_chosen``, ``published``) are
    documentation.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(f"unknown configuration {name_or_path!r}; available: "
                         f"{', '.join(available_configs()) or '(none)'}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"configuration {path} is not valid JSON: {exc}") from exc
    if not isinstance(config.get("params"), dict):
        raise ValueError(f"configuration {path} has no 'params' object")
    config.setdefault("name", path.stem)
    return config


def build_pipeline(config, **overrides):
    """``make_coates_pipeline`` from a loaded configuration; ``overrides`` win over its params."""
    params = dict(config["params"])
    params.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in list(params.items()):
        if key.endswith(("whitener", "normalizer")) and isinstance(value, dict):
            params[key] = _build_estimator(value)
        elif isinstance(value, list):
            params[key] = tuple(value)  # JSON has no tuples (hidden_layer_sizes, pooling)
    return make_coates_pipeline(**params)


def _build_estimator(spec: dict):
    """``{"class": "ZCAWhitening", "params": {...}}`` -> an estimator from featlearn."""
    import featlearn

    cls = getattr(featlearn, spec["class"])
    return cls(**spec.get("params", {}))
