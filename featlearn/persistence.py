"""Saving and loading fitted models: a safe format (arrays + JSON, loading runs no code) by
default, and joblib/pickle for arbitrary pipelines, which only trusted files may use.

The safe format is one ``.npz`` zip (``numpy.savez``) holding every array of the model plus one
JSON document, ``__featlearn__.json``: the format version, the versions that made the model,
its config and metadata, and the object tree. Loading reads it with
``numpy.load(allow_pickle=False)`` and ``json``; the only classes it instantiates are those of
:data:`SAFE_CLASSES`, rebuilt from their saved state without calling anything a file names.

An estimator is saved as ``{"class", "params", "state"}``: its ``__getstate__`` split into
``get_params`` names and the rest, restored with ``cls.__new__`` and ``__setstate__``. So a class
marks an attribute as a transient cache (a lazily built generator, a device copy) by leaving it
out of ``__getstate__`` and rebuilding it on use or in ``__setstate__``; any other attribute the
format cannot hold is an error at save time, never silently dropped. A class whose pickle state
differs from what it should save here may define ``__featlearn_getstate__`` (returning a dict)
and ``__featlearn_setstate__(state)``, which take precedence. Torch modules are saved as their
attributes, parameters, buffers and submodules. The object tree is
:mod:`featlearn._safe_format`'s; the file, its versions and the admitted classes are this module's.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib
import io
import json
import pickle
import pickletools
import platform
import warnings
import zipfile
from pathlib import Path

import numpy as np

from . import __version__
from ._io import atomic_path, check_output
from ._safe_format import JSON_KEY as _JSON_KEY, Decoder, Encoder, NotSafe

FORMAT_VERSION = 1
_FORMAT_NAME = "featlearn-model"
_PICKLE_MARK = "featlearn_model"
_PICKLE_PROTOCOL = 5

#: The classes a safe model file may contain, as ``name in the file -> "module:attribute"``.
#: Matched by exact type (a subclass is not admitted) and resolved lazily, so a class that does
#: not exist (yet) is simply unavailable. Extend this tuple to admit a new fitted-state class.
SAFE_CLASSES = (
    ("featlearn.RandomPatchExtractor", "featlearn.patches:RandomPatchExtractor"),
    ("featlearn.PatchNormalizer", "featlearn.preprocessing:PatchNormalizer"),
    ("featlearn.ZCAWhitening", "featlearn.preprocessing:ZCAWhitening"),
    ("featlearn.PowerNormalizer", "featlearn.preprocessing:PowerNormalizer"),
    ("featlearn.RandomPatchDictionary", "featlearn.dictionary:RandomPatchDictionary"),
    ("featlearn.MiniBatchKMeans", "featlearn.kmeans:MiniBatchKMeans"),
    ("featlearn.KMeans", "featlearn.kmeans:KMeans"),
    ("featlearn.PatchEncoder", "featlearn.encoding:PatchEncoder"),
    ("featlearn.TorchMLPClassifier", "featlearn.classifier:TorchMLPClassifier"),
    ("featlearn.TorchConvClassifier", "featlearn.classifier:TorchConvClassifier"),
    ("featlearn.StreamingConvClassifier", "featlearn.streaming:StreamingConvClassifier"),
    ("featlearn.SeedEnsembleClassifier", "featlearn.classifier:SeedEnsembleClassifier"),
    ("sklearn.pipeline.Pipeline", "sklearn.pipeline:Pipeline"),
    ("sklearn.preprocessing.StandardScaler", "sklearn.preprocessing:StandardScaler"),
    ("sklearn.decomposition.PCA", "sklearn.decomposition:PCA"),
    *((f"torch.nn.{name}", f"torch.nn:{name}") for name in (
        "Sequential", "Linear", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Identity", "Dropout",
        "BatchNorm1d", "BatchNorm2d", "Conv2d", "Flatten", "AdaptiveAvgPool2d", "MaxPool2d",
        "AvgPool2d")),
)

_PICKLE_WARNING = ("loading a pickle runs code: only load pickled models from a source you "
                   "trust")


def _corrupt(path, why):
    return ValueError(f"{path} is not a featlearn model (or corrupt): {why}")


# -- metadata ------------------------------------------------------------------------------------

def model_metadata(config=None, **extra) -> dict:
    """Versions, platform and time recorded beside a saved model."""
    import sklearn

    meta = {"featlearn": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a hard dependency
        meta["torch"] = None
    meta.update(extra)
    return meta


# -- public API ----------------------------------------------------------------------------------

def save_model(model, path, *, config=None, format="safe", overwrite=False, inputs=(), **extra):
    """Save a fitted model with its config and the versions that made it.

    Parameters
    ----------
    model : estimator
        A fitted featlearn estimator or scikit-learn ``Pipeline`` of them.
    path : str or Path
        The file to write (atomically: a model already there stays intact until the new one is
        complete).
    config : dict, optional
        The configuration the model was built from (JSON data), recorded in the metadata.
    format : {"safe", "pickle"}, default="safe"
        ``"safe"``: arrays + JSON in one ``.npz``; loading it runs no code. It holds featlearn's
        estimators, a ``Pipeline`` of them, ``StandardScaler``/``PCA`` and standard torch layers
        (:data:`SAFE_CLASSES`); anything else is refused here, naming the attribute.
        ``"pickle"``: joblib/pickle, for arbitrary pipelines. **Loading a pickle runs code**:
        only load one you trust (``load_model(..., allow_pickle=True)``).
    overwrite : bool, default=False
        Replace an existing file that is not a featlearn model. An existing featlearn model is
        replaced without it.
    inputs : iterable of paths
        Files the model was fitted from; ``path`` may never be one of them.
    **extra
        More JSON metadata (e.g. ``n_images``), returned by ``load_model(return_metadata=True)``.

    Returns
    -------
    dict
        The metadata written.

    Raises
    ------
    OutputExistsError
        ``path`` is one of ``inputs``, or exists and is not a featlearn model (without
        ``overwrite``); the file is left as it was.
    ValueError
        ``format="safe"`` and the model holds an object the format does not (its attribute
        path and type are named), or an unknown ``format``.

    Tensors are saved from CPU copies, so a CUDA-fitted model loads on a CPU-only machine and
    the caller's model is left untouched.
    """
    if format not in ("safe", "pickle"):
        raise ValueError(f"format={format!r}: expected 'safe' or 'pickle'")
    path = check_output(path, inputs=inputs, is_ours=is_model_file, overwrite=overwrite,
                        what="model file", flag="overwrite=True")
    meta = model_metadata(config, **extra)
    meta["format"] = format
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model metadata (config and extra values) must be JSON data: {exc}") \
            from None
    if format == "safe":
        tree, arrays = _encode_safe(model)
        doc = json.dumps({"format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
                          "metadata": meta, "model": tree})
        arrays[_JSON_KEY] = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh, warnings.catch_warnings():
            # torch pickles tensors through its deprecated TypedStorage, warning the user for it
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            _CPUPickler(fh, protocol=_PICKLE_PROTOCOL).dump(
                {_PICKLE_MARK: True, "metadata": meta, "model": model})
    return meta


def check_saveable(model, *, format="safe"):
    """Raise ``ValueError`` now if ``model``'s classes cannot be saved in ``format``.

    Meant for an unfitted model before a long fit: its parameters (estimators, layers) are
    checked; fitted state is checked again by :func:`save_model`.
    """
    if format == "safe":
        _encode_safe(model)
    elif format != "pickle":
        raise ValueError(f"format={format!r}: expected 'safe' or 'pickle'")


def _encode_safe(model):
    arrays = {}
    try:
        tree = Encoder(arrays, _safe_classes()[1]).encode(model, "model")
    except NotSafe as exc:
        raise ValueError(f"{exc}; save it with format='pickle' (command line: --format "
                         "pickle), knowing that loading a pickle runs code: only for trusted "
                         "files") from None
    return tree, arrays


def load_model(path, *, return_metadata=False, allow_pickle=False):
    """Load a model saved by :func:`save_model`, on any device, warning on a version mismatch.

    Parameters
    ----------
    path : str or Path
        A model file.
    return_metadata : bool, default=False
        Also return the metadata dict (versions, config, the ``extra`` of ``save_model``).
    allow_pickle : bool, default=False
        Admit a pickle (``format="pickle"``, or a joblib file). **Loading a pickle runs code**
        that the file names: pass True only for a file from a source you trust. The safe
        format never needs it.

    Returns
    -------
    model or (model, dict)

    Raises
    ------
    ValueError
        The file is not a featlearn model, is corrupt, names a class outside
        :data:`SAFE_CLASSES`, or is a pickle and ``allow_pickle`` is False.

    Tensors are created on the CPU; an estimator whose ``device`` asks for CUDA on a machine
    without it is switched to ``"cpu"`` with a warning. A model saved by another featlearn
    version may compute different features, so that is a warning too.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise OSError(errno.ENOENT, f"model file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"PK":
        model, meta = _load_safe(path)
    elif head[:1] == b"\x80":
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle, and {_PICKLE_WARNING}. If you do, pass "
                             "allow_pickle=True (command line: --allow-pickle)")
        model, meta = _load_pickle(path)
    else:
        raise _corrupt(path, "neither a featlearn .npz model nor a pickle")
    saved = meta.get("featlearn")
    if saved is not None and saved != __version__:
        warnings.warn(f"{path} was saved by featlearn {saved} (torch {meta.get('torch')}, "
                      f"scikit-learn {meta.get('sklearn')}) and is being loaded by featlearn "
                      f"{__version__}: its features may differ from a model fitted with this "
                      "version; re-fit it to be sure", UserWarning, stacklevel=2)
    _fix_devices(model, path)
    return (model, meta) if return_metadata else model


def is_model_file(path) -> bool:
    """Whether ``path`` is a model :func:`save_model` wrote (checked without unpickling)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        if head[:2] == b"PK":
            with zipfile.ZipFile(path) as zf:
                return _JSON_KEY + ".npy" in zf.namelist()
        if head[:1] == b"\x80":  # a pickle whose top-level dict starts with our mark
            for i, (_, arg, _) in enumerate(pickletools.genops(io.BytesIO(head))):
                if arg == _PICKLE_MARK:
                    return True
                if i > 8:
                    break
    except (OSError, ValueError, zipfile.BadZipFile):
        pass
    return False


def encoder_of(model):
    """The feature-producing part of a saved model: a Pipeline's ``encoder`` step, the fitted
    encoder of a streaming classifier (alone or as a Pipeline's step), else the model."""
    from .pipeline import image_encoder

    encoder = image_encoder(model)
    return model if encoder is None else encoder


# -- the safe format -----------------------------------------------------------------------------

def _safe_classes():
    """``{name: class}`` and ``{class: name}`` for the classes of :data:`SAFE_CLASSES` that exist."""
    by_name = {}
    for name, target in SAFE_CLASSES:
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type):
            by_name[name] = cls
    return by_name, {cls: name for name, cls in by_name.items()}


def _load_safe(path):
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        raw = arrays.pop(_JSON_KEY, None)
        if raw is None:
            raise KeyError(f"no {_JSON_KEY} entry")
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise TypeError(f"{_JSON_KEY} is not a byte string")
        doc = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT_NAME:
            raise ValueError("not a featlearn model document")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"format version {version!r} is newer than this featlearn reads "
                             f"({FORMAT_VERSION}); upgrade featlearn")
        meta = doc.get("metadata")
        if not isinstance(meta, dict):
            raise TypeError("metadata is not a JSON object")
        model = Decoder(arrays, _safe_classes()[0]).decode(doc["model"])
    except MemoryError:
        raise
    except Exception as exc:  # any decoding failure is the file's fault: one clear error
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    return model, meta


# -- pickle --------------------------------------------------------------------------------------

class _CPUPickler(pickle.Pickler):
    """Pickles tensors from CPU copies, so a CUDA-fitted model unpickles anywhere, unmodified."""

    def reducer_override(self, obj):
        mod = type(obj).__module__
        if mod.startswith("torch") and hasattr(obj, "device") and hasattr(obj, "detach"):
            import torch

            if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
                cpu = obj.detach().to("cpu")
                if isinstance(obj, torch.nn.Parameter):
                    cpu = torch.nn.Parameter(cpu, requires_grad=obj.requires_grad)
                else:
                    cpu.requires_grad_(obj.requires_grad)
                return cpu.__reduce_ex__(_PICKLE_PROTOCOL)
        return NotImplemented


def _load_pickle(path):
    import joblib

    try:
        with warnings.catch_warnings():  # as in save_model
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            blob = joblib.load(path)
    except MemoryError:
        raise
    except Exception as exc:
        raise _corrupt(path, f"unpickling failed ({type(exc).__name__}: {exc})") from None
    if isinstance(blob, dict) and blob.get(_PICKLE_MARK):
        return blob["model"], blob.get("metadata") or {}
    if hasattr(blob, "get_params"):
        warnings.warn(f"{path} carries no featlearn metadata (not saved by featlearn's "
                      "save_model); its versions cannot be checked", UserWarning, stacklevel=3)
        return blob, {}
    raise _corrupt(path, f"it holds a pickled {type(blob).__name__}, not an estimator")


# -- devices -------------------------------------------------------------------------------------

def _estimators(obj, seen=None):
    """Every scikit-learn estimator reachable from ``obj`` (parameters and fitted attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if hasattr(obj, "get_params") and hasattr(obj, "set_params"):
        yield obj
        for v in vars(obj).values():
            yield from _estimators(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _estimators(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _estimators(v, seen)


def _fix_devices(model, path):
    import torch

    from ._torch import mps_available

    missing = {"cuda": "CUDA", "mps": "MPS"}
    if torch.cuda.is_available():
        del missing["cuda"]
    if mps_available():
        del missing["mps"]
    if not missing:
        return
    for est in _estimators(model):
        dev = getattr(est, "device", None)
        kind = str(dev).split(":")[0] if isinstance(dev, (str, torch.device)) else None
        if kind in missing:
            warnings.warn(f"{path}: {type(est).__name__} was set to device={str(dev)!r}, but "
                          f"{missing[kind]} is not available here; using device='cpu'",
                          UserWarning, stacklevel=3)
            with contextlib.suppress(ValueError):
                est.set_params(device="cpu")
