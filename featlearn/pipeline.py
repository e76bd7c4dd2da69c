"""Composition: the Coates-Ng pipeline as a plain scikit-learn Pipeline, and named configurations.

No numerics live here. A configuration in ``pipelines/`` is data (JSON): the keyword arguments of
:func:`make_coates_pipeline` plus how they were chosen, so a new configuration needs no new code.
A configuration with ``members`` is several such pipelines (each member's keys over the shared
``params``) whose predicted probabilities are averaged: a scikit-learn
``VotingClassifier(voting="soft")``, so members may differ in their features (dictionary seed,
pooling grid), which a seed ensemble of one classifier cannot.

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

import difflib
import importlib
import inspect
import json
import os
import re
from pathlib import Path

from sklearn.pipeline import Pipeline

def _config_dir() -> Path:
    """The named configurations: ``featlearn/pipelines`` in an installed wheel, else the
    top-level ``pipelines/`` of a source checkout (also what an editable install sees)."""
    from importlib.resources import files

    installed = Path(str(files("featlearn") / "pipelines"))
    if installed.is_dir() and any(installed.glob("*.json")):
        return installed
    return Path(__file__).resolve().parents[1] / "pipelines"


#: Where the named configurations live (the repository's ``pipelines/`` folder, which a wheel
#: ships inside the package).
CONFIG_DIR = _config_dir()

#: The paper's L2-SVM (Coates, Lee & Ng, AISTATS 2011): one-vs-all squared hinge, C=100 on the
#: mean loss, full-batch L-BFGS.
SVM_PARAMS = dict(hidden_layer_sizes=(), loss="squared_hinge", C=100.0, solver="lbfgs",
                  dropout=0.0, max_iter=1000)
#: The seed talk's two-layer network, with the training settings chosen for 6,400-dimensional
#: pooled features (the class defaults are scikit-learn's, for small problems).
MLP_PARAMS = dict(hidden_layer_sizes=(512,), loss="cross_entropy", dropout=0.5, solver="adam",
                  batch_size=256, max_iter=50, lr_schedule="cosine")


def make_coates_pipeline(n_centroids=1600, *, classifier="mlp", augment=None, power=None,
                         ensemble=None, memory=None, device="auto", random_state=0, verbose=0,
                         **stage_params):
    """Build the Coates-Ng pipeline: ``PatchEncoder`` -> classifier, as a plain ``Pipeline``.

    Parameters
    ----------
    n_centroids : int, default=1600
        Dictionary size K (``encoder__kmeans__n_clusters``).
    classifier : {"mlp", "svm", "stream"} or estimator, default="mlp"
        "svm" is the paper's one-vs-all L2-SVM (C=100 in the paper's units);
        "mlp" the two-layer network (512 ReLU units, dropout 0.5). An estimator is used as is.
        "stream" (or a :class:`featlearn.StreamingConvClassifier`) trains a convolutional head
        on maps encoded from randomly cropped and flipped images every mini-batch, as Thiry et
        al. do: the pipeline is then the one step ``("classifier",
        StreamingConvClassifier(encoder, head))``, which takes the encoder built here (pooling
        5x5 windows at stride 3 by their mean, the streaming default), so its parameters are
        ``classifier__encoder__...`` and ``classifier__head__...``.
    augment : None or "flip", default=None
        "flip": train on images and their horizontal mirrors and average both views'
        predictions at test time (see the module docstring for how).
    power : float or None, default=None
        Adds a ``("power", PowerNormalizer(power))`` step between the encoder and the
        classifier: signed power normalization of the pooled features (0.5: signed square
        root).
    ensemble : int >= 1 or None, default=None
        Train this many copies of the classifier, each with its own seed, on the same features
        and average their predicted probabilities: the classifier step becomes
        ``SeedEnsembleClassifier(classifier, n_estimators=ensemble)``, so the classifier's own
        parameters are ``classifier__estimator__...``. Not with ``"stream"``.
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
    sklearn.pipeline.Pipeline with steps ``("encoder", PatchEncoder)``, ``("power",
    PowerNormalizer)`` when ``power`` is set, and ``("classifier", ...)`` (only the last for
    ``"stream"``); ``clone``, ``GridSearchCV`` and pickle accept it.

    Notes
    -----
    Predict and score on images at the scale the pipeline was fitted on: the encoder records it
    at fit, and data whose scale differs by more than 10x (0..1 floats after fitting on 0..255
    uint8 pixels, or the reverse) triggers a :class:`featlearn.ScaleWarning` that names the fix.
    Turn it into an error with ``warnings.simplefilter("error", featlearn.ScaleWarning)``:

    >>> import warnings
    >>> import numpy as np
    >>> import featlearn
    >>> X = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    >>> y = np.arange(40) % 2
    >>> pipe = make_coates_pipeline(4, classifier="svm", encoder__patch_size=3,
    ...                             encoder__n_patches=500, classifier__max_iter=5).fit(X, y)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = pipe.predict(X / 255.0)  # fitted on 0..255, given 0..1
    >>> [w.category.__name__ for w in caught]
    ['ScaleWarning']
    """
    from featlearn.classifier import TorchMLPClassifier
    from featlearn.streaming import StreamingConvClassifier
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import KMeans

    if augment not in (None, "flip"):
        raise ValueError(f"augment must be None or 'flip', got {augment!r}")
    n_views = 2 if augment == "flip" else 1
    encoder = PatchEncoder(
        kmeans=KMeans(n_clusters=n_centroids, device=device, random_state=random_state,
                      verbose=verbose),
        flip=augment == "flip", device=device, random_state=random_state, verbose=verbose)
    if ensemble is not None and (isinstance(ensemble, bool) or not isinstance(ensemble, int)
                                 or ensemble < 1):
        raise ValueError(f"ensemble must be None or an integer >= 1, got {ensemble!r}")
    if classifier == "stream" or isinstance(classifier, StreamingConvClassifier):
        if ensemble is not None:
            raise ValueError("ensemble does not apply to classifier='stream', which trains one "
                             "head on images encoded per batch")
        return _streaming_pipeline(classifier, encoder, augment=augment, power=power,
                                   memory=memory, device=device, random_state=random_state,
                                   verbose=verbose, stage_params=stage_params)
    if isinstance(classifier, str):
        presets = {"svm": SVM_PARAMS, "mlp": MLP_PARAMS}
        if classifier not in presets:
            raise ValueError(f"classifier must be 'mlp', 'svm', 'stream' or an estimator, got "
                             f"{classifier!r}")
        clf = TorchMLPClassifier(**presets[classifier], n_views=n_views, device=device,
                                 random_state=random_state, verbose=verbose)
    else:
        clf = classifier
        if n_views > 1:
            if "n_views" not in clf.get_params():
                raise ValueError("augment='flip' needs a classifier with an n_views parameter "
                                 "(e.g. TorchMLPClassifier)")
            clf.set_params(n_views=n_views)
    if ensemble is not None:
        from featlearn.classifier import SeedEnsembleClassifier

        clf = SeedEnsembleClassifier(clf, n_estimators=ensemble, random_state=random_state)
    steps = [("encoder", encoder), ("classifier", clf)]
    if power is not None:
        from featlearn.preprocessing import PowerNormalizer

        steps.insert(1, ("power", PowerNormalizer(power, copy=False)))
    pipe = Pipeline(steps, memory=memory)
    if stage_params:
        pipe.set_params(**stage_params)
    return pipe


def _streaming_pipeline(classifier, encoder, *, augment, power, memory, device, random_state,
                        verbose, stage_params):
    """``Pipeline([("classifier", StreamingConvClassifier(encoder, head))])``: images in."""
    from featlearn.classifier import TorchConvClassifier
    from featlearn.streaming import StreamingConvClassifier

    if augment is not None:
        raise ValueError("augment='flip' does not apply to classifier='stream', which flips "
                         "every training batch itself (classifier__flip, classifier__test_flip)")
    if power is not None:
        raise ValueError("power does not apply to classifier='stream': its head trains on the "
                         "encoder's maps directly")
    clf = (StreamingConvClassifier(random_state=random_state, verbose=verbose)
           if classifier == "stream" else classifier)
    if clf.encoder is None:
        clf.set_params(encoder=encoder.set_params(pool_size=5, pool_stride=3, pool_op="mean"))
    if clf.head is None:
        clf.set_params(head=TorchConvClassifier(device=device, random_state=random_state,
                                                verbose=verbose))
    pipe = Pipeline([("classifier", clf)], memory=memory)
    if stage_params:
        pipe.set_params(**stage_params)
    return pipe


def image_encoder(model):
    """The :class:`PatchEncoder` of a pipeline or a streaming classifier, fitted or not: a
    Pipeline's ``encoder`` step, else the encoder of a :class:`StreamingConvClassifier` (its
    ``classifier`` step, or ``model`` itself), ``encoder_`` once fitted; None otherwise."""
    from featlearn.streaming import StreamingConvClassifier

    steps = getattr(model, "named_steps", None)
    if steps is not None:
        if "encoder" in steps:
            return steps["encoder"]
        model = steps.get("classifier")
    if not isinstance(model, StreamingConvClassifier):
        return None
    return model.encoder_ if hasattr(model, "encoder_") else model.encoder


def available_configs():
    """Names of the configurations in ``pipelines/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


#: The keys a configuration file may hold: documentation, ``params``, and optionally
#: ``members`` (see :func:`member_configs`).
CONFIG_KEYS = ("name", "description", "published", "how_chosen", "params", "members")
#: A configuration's name becomes a folder name: no path separators, no leading dot.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The parameters (last ``__`` component, or ``classifier`` of make_coates_pipeline) that take
#: an estimator, i.e. accept a nested ``{"class": NAME, "params": {...}}`` object in a
#: configuration.
ESTIMATOR_PARAMS = ("normalizer", "whitener", "kmeans", "classifier")
#: The classes of :data:`ESTIMATOR_CLASSES` that ``classifier`` takes, and only it.
CLASSIFIER_CLASSES = ("TorchMLPClassifier", "TorchConvClassifier")


def _featlearn_kmeans():
    """``featlearn.kmeans.KMeans`` where this version has it (resolved lazily), else None."""
    try:
        from featlearn.kmeans import KMeans
    except ImportError:
        return None
    return KMeans


#: Every class a configuration may name, by the name it uses. A fixed table (module and
#: attribute spelled out here), so a configuration can name no function and no other class.
ESTIMATOR_CLASSES = {
    "PatchNormalizer": lambda: importlib.import_module("featlearn.preprocessing").PatchNormalizer,
    "ZCAWhitening": lambda: importlib.import_module("featlearn.preprocessing").ZCAWhitening,
    "PowerNormalizer": lambda: importlib.import_module("featlearn.preprocessing").PowerNormalizer,
    "RandomPatchExtractor": lambda: importlib.import_module("featlearn.patches").RandomPatchExtractor,
    "MiniBatchKMeans": lambda: importlib.import_module("featlearn.kmeans").MiniBatchKMeans,
    "KMeans": _featlearn_kmeans,
    "RandomPatchDictionary":
        lambda: importlib.import_module("featlearn.dictionary").RandomPatchDictionary,
    "TorchMLPClassifier": lambda: importlib.import_module("featlearn.classifier").TorchMLPClassifier,
    "TorchConvClassifier":
        lambda: importlib.import_module("featlearn.classifier").TorchConvClassifier,
    "sklearn.decomposition.PCA": lambda: importlib.import_module("sklearn.decomposition").PCA,
    "sklearn.preprocessing.StandardScaler":
        lambda: importlib.import_module("sklearn.preprocessing").StandardScaler,
    "sklearn.cluster.KMeans": lambda: importlib.import_module("sklearn.cluster").KMeans,
    "sklearn.cluster.MiniBatchKMeans":
        lambda: importlib.import_module("sklearn.cluster").MiniBatchKMeans,
}


def load_config(name_or_path) -> dict:
    """Load and validate a configuration by name (``pipelines/NAME.json``) or path.

    A configuration is data: a JSON object with the keys in :data:`CONFIG_KEYS` only. ``params``
    holds keyword arguments of :func:`make_coates_pipeline` and ``step__param`` paths of the
    pipeline it builds; a parameter that takes an estimator (:data:`ESTIMATOR_PARAMS`) may be
    ``{"class": NAME, "params": {...}}`` with NAME one of :data:`ESTIMATOR_CLASSES`. Nothing
    else is ever looked up, imported or called. The other keys (``description``,
    ``how_chosen``, ``published``) are documentation; ``name`` (default: the file's stem) names
    the results folder, so it must match ``[A-Za-z0-9][A-Za-z0-9._-]*``.

    Returns
    -------
    dict
        The configuration, with ``name`` filled in.

    Raises
    ------
    ValueError
        With one line naming the problem: unknown name, missing or unreadable file, invalid
        JSON, not an object, an unknown key (with the closest valid one), a wrong type or a bad
        value. The parameters are checked by building the pipeline once (nothing is fitted).
    """
    text = str(name_or_path)
    path = Path(name_or_path)
    if not text.endswith(".json") and os.sep not in text and "/" not in text:
        if not _NAME_RE.fullmatch(text):
            raise ValueError(f"configuration name {text!r} is not valid: use letters, digits, "
                             "'.', '_' and '-' (or give a path to a .json file)")
        path = CONFIG_DIR / f"{text}.json"
        if not path.is_file():
            raise ValueError(f"unknown configuration {text!r}; available: "
                             f"{', '.join(available_configs()) or '(none)'}")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"configuration {path} {what}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"configuration {path} is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"configuration {path} cannot be read: {exc}") from exc
    if isinstance(config, dict):
        config.setdefault("name", path.stem)
    _check_config(config, path)
    device = config["params"].get("device")
    if isinstance(device, str):
        from featlearn._torch import check_device_name

        check_device_name(device)  # its availability is checked when the pipeline is built
    build_pipeline(config, device="cpu")  # validates every other parameter
    return config


def _check_config(config, where):
    """The configuration's own structure (not its params): one ValueError per problem."""
    if not isinstance(config, dict):
        raise ValueError(f"configuration {where} must be a JSON object, got "
                         f"{_json_type(config)}")
    for key in config:
        if key not in CONFIG_KEYS:
            raise ValueError(f"configuration {where}: unknown key {key!r}"
                             f"{_suggest(key, CONFIG_KEYS)}; allowed keys: "
                             f"{', '.join(CONFIG_KEYS)}")
    if not isinstance(config.get("params"), dict):
        raise ValueError(f"configuration {where} has no 'params' object")
    members = config.get("members")
    if "members" in config and (not isinstance(members, list) or len(members) < 2
                                or not all(isinstance(m, dict) for m in members)):
        raise ValueError(f"configuration {where}: 'members' must be a list of at least 2 "
                         "objects (each member's params over the shared 'params'), got "
                         f"{_json_type(members) if not isinstance(members, list) else members!r}")
    name = config.get("name", "unnamed")  # load_config always sets it
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"configuration {where}: 'name' must match [A-Za-z0-9][A-Za-z0-9._-]* "
                         f"(it names the results folder), got {name!r}")
    for key in ("description", "how_chosen"):
        if key in config and not isinstance(config[key], str):
            raise ValueError(f"configuration {where}: {key!r} must be a string, got "
                             f"{_json_type(config[key])}")
    published = config.get("published")
    if published is not None and (isinstance(published, bool)
                                  or not isinstance(published, (int, float))):
        raise ValueError(f"configuration {where}: 'published' must be a number or null, got "
                         f"{_json_type(published)}")


def member_configs(config) -> list[dict]:
    """The members of a configuration with ``members``, each a configuration of its own:
    ``{"name": "NAME.memberI", "params": {**params, **members[I]}}`` (a member's keys win);
    ``[]`` for a configuration without members."""
    base = dict(config["params"])
    return [{"name": f"{config.get('name', 'unnamed')}.member{i}", "params": {**base, **m}}
            for i, m in enumerate(config.get("members") or [])]


def ensemble_members(model) -> list:
    """The pipelines of a model: a soft-voting ensemble's members (fitted ones once fitted,
    unwrapped from ``FrozenEstimator``), else ``[model]``."""
    from sklearn.ensemble import VotingClassifier

    if not isinstance(model, VotingClassifier):
        return [model]
    members = getattr(model, "estimators_", None) or [est for _, est in model.estimators]
    return [getattr(m, "estimator", m) if type(m).__name__ == "FrozenEstimator" else m
            for m in members]


def build_pipeline(config, **overrides):
    """``make_coates_pipeline`` from a configuration; ``overrides`` win over its params.

    Every key and value is checked before anything is built from it, and every estimator's
    parameters are validated eagerly (``_validate_params``), so a bad configuration fails here,
    in one line naming the key, not after the data is loaded or half-way through a fit.

    Parameters
    ----------
    config : dict
        A configuration as returned by :func:`load_config`.
    **overrides
        Keyword arguments of :func:`make_coates_pipeline` or ``step__param`` paths; None
        values are ignored.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Or, for a configuration with ``members``, ``VotingClassifier(voting="soft")`` over the
        members' pipelines (named ``member0``, ``member1``, ...): each member's own keys win
        over ``overrides``, which win over the shared ``params``.

    Raises
    ------
    ValueError
        Unknown key (with the closest valid one), wrong type, an estimator class outside
        :data:`ESTIMATOR_CLASSES`, or a value the estimator rejects (in a member: naming it).
    """
    _check_config(config, repr(config.get("name", "(unnamed)")) if isinstance(config, dict)
                  else "(given)")
    if "members" in config:
        from sklearn.ensemble import VotingClassifier

        pipes = []
        for member, own in zip(member_configs(config), config["members"]):
            name = member["name"].rsplit(".", 1)[1]
            try:
                pipes.append((name, build_pipeline(
                    member, **{k: v for k, v in overrides.items() if k not in own})))
            except ValueError as exc:
                raise ValueError(f"{name} of configuration {config.get('name', '(unnamed)')!r}: "
                                 f"{exc}") from exc
            if "encoder" not in pipes[-1][1].named_steps:
                raise ValueError(f"{name} of configuration {config.get('name', '(unnamed)')!r}: "
                                 "a member trains on stored features; 'classifier': 'stream' "
                                 "(images encoded per batch) cannot be one")
        return VotingClassifier(pipes, voting="soft")
    params = dict(config["params"])
    params.update({k: v for k, v in overrides.items() if v is not None})

    signature = inspect.signature(make_coates_pipeline).parameters
    top_keys = [k for k in signature if signature[k].kind is inspect.Parameter.KEYWORD_ONLY
                or signature[k].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    top, nested = {}, {}
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"configuration params: invalid key {key!r}")
        if "__" in key:
            nested[key] = value
        elif key in top_keys:
            top[key] = _from_json(key, value, takes_estimator=key in ESTIMATOR_PARAMS)
        else:
            raise ValueError(f"unknown configuration key {key!r}{_suggest(key, top_keys)}; "
                             "params are arguments of make_coates_pipeline "
                             f"({', '.join(top_keys)}) or step__param paths such as "
                             "encoder__stride or classifier__max_iter")
    _check_top_types(top)
    if "device" in top:
        from featlearn._torch import resolve_device

        resolve_device(top["device"])  # an unknown or absent device, now and in one line
    pipe = make_coates_pipeline(**top)
    # Shallow paths first: setting encoder__whitener creates encoder__whitener__eps.
    for key in sorted(nested, key=lambda k: k.count("__")):
        valid = pipe.get_params(deep=True)
        if key not in valid:
            owner = key.rsplit("__", 1)[0]
            if owner.rsplit("__", 1)[-1] in ESTIMATOR_PARAMS and valid.get(owner) is None:
                raise ValueError(
                    f"configuration key {key!r}: {owner} is the default (null), whose "
                    f"parameters cannot be set one by one; give {owner} as "
                    '{"class": NAME, "params": {...}} instead')
            candidates = [k for k in valid if "__" in k] + top_keys
            raise ValueError(f"unknown configuration key {key!r}{_suggest(key, candidates)}")
        value = _from_json(key, nested[key],
                           takes_estimator=key.rsplit("__", 1)[1] in ESTIMATOR_PARAMS)
        pipe.set_params(**{key: value})
        if isinstance(nested[key], dict):
            _inherit(pipe, key, nested[key], top)
    if isinstance(params.get("classifier"), dict):
        _inherit(pipe, "classifier", params["classifier"], top)
    _validate_estimators(pipe, params)
    return pipe


#: Parameters of make_coates_pipeline that reach an estimator given as ``{"class": ...}`` where
#: its ``params`` leave them out, named as the estimator names them.
_INHERITED = {"device": "device", "random_state": "random_state", "verbose": "verbose",
              "n_centroids": "n_clusters"}


def _inherit(pipe, key, spec, top):
    """Give the estimator at ``key`` (built from ``spec``) the pipeline-wide settings its spec
    leaves out, so ``--device``, ``random_state`` and ``n_centroids`` reach a configured
    dictionary or classifier as they reach the defaults (a MiniBatchKMeans left to its own
    ``random_state=None`` would make the configuration non-deterministic)."""
    est = pipe.get_params()[key]
    own = est.get_params(deep=False)
    given = spec.get("params", {})
    defaults = inspect.signature(make_coates_pipeline).parameters
    for top_name, name in _INHERITED.items():
        if name in own and name not in given:
            if name == "n_clusters" and key == "classifier":
                continue
            value = top.get(top_name, defaults[top_name].default)
            est.set_params(**{name: value})


def _check_top_types(top):
    checks = {
        "n_centroids": (int,), "classifier": (str,), "augment": (str, type(None)),
        "power": (int, float, type(None)), "ensemble": (int, type(None)),
        "memory": (str, type(None)), "device": (str, type(None)),
        "random_state": (int, type(None)), "verbose": (int,),
    }
    for key, value in top.items():
        types = checks.get(key)
        if types is None or (key == "classifier" and hasattr(value, "get_params")):
            continue  # an estimator built from an allowed {"class": ...} object
        bad_bool = isinstance(value, bool) and key in ("n_centroids", "random_state", "power",
                                                           "ensemble")
        if bad_bool or not isinstance(value, types):
            words = {int: "a number" if float in types else "an integer", float: "a number",
                     str: "a string", type(None): "null"}
            names = " or ".join(dict.fromkeys(words[t] for t in types))
            raise ValueError(f"configuration key {key!r} must be {names}, got {value!r}")


def _from_json(key, value, *, takes_estimator):
    """A JSON value -> the Python value for ``key``: lists become tuples, estimator specs
    become estimators (only where the parameter takes one); anything else is refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        for item in value:
            if not (item is None or isinstance(item, (bool, int, float, str))):
                raise ValueError(f"configuration key {key!r}: lists may hold only numbers, "
                                 f"strings, booleans and null, got {_json_type(item)} in "
                                 f"{value!r}")
        return tuple(value)  # JSON has no tuples (hidden_layer_sizes, pooling)
    if isinstance(value, dict):
        if not takes_estimator:
            raise ValueError(f"configuration key {key!r} does not take an estimator; only "
                             f"{', '.join(ESTIMATOR_PARAMS)} accept a {{\"class\": ..., "
                             "\"params\": ...} object")
        name = value.get("class")
        if key == "classifier" and name not in CLASSIFIER_CLASSES:
            raise ValueError(f"configuration key 'classifier' does not take an estimator of class "
                             f"{name!r}; it takes {' or '.join(CLASSIFIER_CLASSES)} (or \"mlp\" "
                             "/ \"svm\")")
        if key != "classifier" and name in CLASSIFIER_CLASSES:
            raise ValueError(f"configuration key {key!r}: class {name!r} is not allowed here; "
                             "classifiers go in 'classifier'")
        return _build_estimator(value, key=key)
    raise ValueError(f"configuration key {key!r} has an unsupported value {value!r}")


def _build_estimator(spec: dict, key="estimator"):
    """``{"class": "ZCAWhitening", "params": {...}}`` -> an estimator from :data:`ESTIMATOR_CLASSES`."""
    if not isinstance(spec, dict):
        raise ValueError(f"configuration key {key!r}: an estimator must be a "
                         f"{{\"class\": ..., \"params\": ...}} object, got {_json_type(spec)}")
    extra = sorted(set(spec) - {"class", "params"})
    if extra:
        raise ValueError(f"configuration key {key!r}: unknown estimator field {extra[0]!r}; an "
                         "estimator is {\"class\": NAME, \"params\": {...}}")
    name = spec.get("class")
    loader = ESTIMATOR_CLASSES.get(name) if isinstance(name, str) else None
    cls = loader() if loader is not None else None
    if cls is None:
        allowed = [n for n, load in ESTIMATOR_CLASSES.items() if n != "KMeans" or load() is not None]
        raise ValueError(f"configuration key {key!r}: class {name!r} is not allowed"
                         f"{_suggest(str(name), allowed)}; allowed classes: {', '.join(allowed)}")
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"configuration key {key!r}: 'params' of {name} must be an object, got "
                         f"{_json_type(params)}")
    valid = cls().get_params(deep=False)
    kwargs = {}
    for pkey, pvalue in params.items():
        if pkey not in valid:
            raise ValueError(f"configuration key {key!r}: {name} has no parameter {pkey!r}"
                             f"{_suggest(pkey, list(valid))}")
        kwargs[pkey] = _from_json(f"{key}__{pkey}", pvalue, takes_estimator=False)
    return cls(**kwargs)


#: Parameters of make_coates_pipeline that set a step's parameter, for error messages.
_ALIASES = {"encoder__kmeans__n_clusters": "n_centroids"}


def _validate_estimators(pipe, params):
    """Run every estimator's own parameter validation now, naming the configuration key."""
    from sklearn.base import BaseEstimator

    estimators = [(name, est) for name, est in pipe.steps]
    estimators += [(k, v) for k, v in pipe.get_params(deep=True).items()
                   if "__" in k and isinstance(v, BaseEstimator)]
    for prefix, est in estimators:
        validate = getattr(est, "_validate_params", None)
        if validate is None:
            continue
        try:
            validate()
        except ValueError as exc:
            m = re.match(r"The '(\w+)' parameter", str(exc))
            key = f"{prefix}__{m[1]}" if m else prefix
            alias = _ALIASES.get(key)
            if alias is not None and alias in params and key not in params:
                key = alias
            raise ValueError(f"configuration key {key!r}: {_one_line(exc)}") from exc
    encoder = image_encoder(pipe)
    prefix = "encoder" if "encoder" in pipe.named_steps else "classifier__encoder"
    if encoder is not None:
        from featlearn.pooling import as_pair

        for name in ("pooling", "pool_size", "pool_stride"):
            if getattr(encoder, name, None) is None:
                continue
            try:
                as_pair(getattr(encoder, name), name)
            except ValueError as exc:
                raise ValueError(f"configuration key '{prefix}__{name}': "
                                 f"{_one_line(exc)}") from exc


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _suggest(key, candidates) -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in candidates], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
