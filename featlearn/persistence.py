"""Saving and loading fitted models, with the versions that made them recorded beside them."""

from __future__ import annotations

import contextlib
import datetime
import errno
import platform
import warnings
from pathlib import Path

import joblib
import numpy as np

from . import __version__
from ._io import atomic_path


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


def save_model(model, path, *, config=None, **extra) -> dict:
    """Save a fitted model with joblib, with versions and ``config`` recorded beside it.

    Torch tensors in the model's state are moved to the CPU first, so a model fitted on a GPU
    loads on a machine without one. The file is written atomically (temp file + rename).
    Returns the metadata dict.
    """
    path = Path(path).expanduser()
    meta = model_metadata(config, **extra)
    _to_cpu_inplace(model)
    with atomic_path(path) as tmp:
        joblib.dump({"featlearn_model": True, "metadata": meta, "model": model}, tmp)
    return meta


def load_model(path, *, return_metadata=False):
    """Load a model saved by :func:`save_model` (on any device), warning on a version mismatch.

    A model saved by another featlearn version may compute different features; the warning
    says which versions are involved. Tensors are mapped to the CPU when CUDA is unavailable,
    and an estimator whose ``device`` asks for CUDA is switched to ``"cpu"`` (with a warning)
    on such a machine.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise OSError(errno.ENOENT, f"model file {path} does not exist")
    with _cpu_unpickling():
        blob = joblib.load(path)
    if isinstance(blob, dict) and blob.get("featlearn_model"):
        model, meta = blob["model"], blob["metadata"]
    else:
        model, meta = blob, {}
        warnings.warn(f"{path} carries no featlearn metadata (not saved by featlearn.jobs."
                      "save_model); its versions cannot be checked", UserWarning, stacklevel=2)
    saved = meta.get("featlearn")
    if saved is not None and saved != __version__:
        warnings.warn(f"{path} was saved by featlearn {saved} (torch {meta.get('torch')}, "
                      f"scikit-learn {meta.get('sklearn')}) and is being loaded by featlearn "
                      f"{__version__}: its features may differ from a model fitted with this "
                      "version; re-fit it to be sure", UserWarning, stacklevel=2)
    _fix_devices(model, path)
    return (model, meta) if return_metadata else model


@contextlib.contextmanager
def _cpu_unpickling():
    """Unpickle torch storages onto the CPU when CUDA is unavailable (plain pickle has no map_location)."""
    try:
        import torch
        import torch.storage as ts
    except ImportError:  # pragma: no cover
        yield
        return
    if torch.cuda.is_available():
        yield
        return
    import io

    original = ts._load_from_bytes
    ts._load_from_bytes = lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)
    try:
        yield
    finally:
        ts._load_from_bytes = original


def _estimators(obj, seen=None):
    """Every scikit-learn estimator reachable from ``obj`` (parameters and fitted attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if hasattr(obj, "get_params") and hasattr(obj, "set_params"):
        yield obj
        for v in list(obj.get_params(deep=False).values()) + list(vars(obj).values()):
            yield from _estimators(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _estimators(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _estimators(v, seen)


def _to_cpu_inplace(model):
    try:
        from featlearn._torch import state_to_cpu
    except ImportError:  # pragma: no cover
        return
    for est in _estimators(model):
        for k, v in list(vars(est).items()):
            moved = state_to_cpu(v)
            if moved is not v:
                setattr(est, k, moved)


def _fix_devices(model, path):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        return
    for est in _estimators(model):
        dev = getattr(est, "device", None)
        if isinstance(dev, (str, torch.device)) and str(dev).startswith("cuda"):
            warnings.warn(f"{path}: {type(est).__name__} was set to device={str(dev)!r}, but CUDA "
                          "is not available here; using device='cpu'", UserWarning, stacklevel=3)
            est.set_params(device="cpu")


def encoder_of(model):
    """The feature-producing part of a saved model: a Pipeline's ``encoder`` step, else the model."""
    steps = getattr(model, "named_steps", None)
    if steps is not None and "encoder" in steps:
        return steps["encoder"]
    return model
