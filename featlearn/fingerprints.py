"""Fingerprints: what a model computes and which images it sees, as hashes for cache keys.

Extraction manifests and ``featlearn reproduce``'s feature cache both key on these, and both
leave out the same :data:`EXECUTION_PARAMS`.
"""

from __future__ import annotations

import hashlib

import joblib
import numpy as np

#: Parameters that say *how* a model runs, not *what* it computes; left out of the fingerprint
#: so that a model fitted on a GPU and loaded on a CPU (``device`` reset) keeps its cache.
#: (``batch_size`` here is an encoder's *inner* chunking, e.g. sized from free memory.)
EXECUTION_PARAMS = frozenset({"device", "verbose", "n_jobs", "batch_size"})


def model_fingerprint(model) -> str:
    """A hash of what ``model`` computes: its class, parameters and fitted attributes.

    ``joblib.hash(model)`` alone is not usable as a cache key: torch tensors pickle differently
    after a save/load round trip (so a reloaded model would never hit its cache), and lazily
    built private caches change the pickle of an unchanged model. Estimators are therefore
    reduced to their class, their parameters (minus :data:`EXECUTION_PARAMS`) and their fitted
    attributes (names ending in ``_``), recursively; tensors become numpy arrays.
    """
    return joblib.hash(_canonical_state(model))


def _canonical_state(obj, _depth=0):
    if _depth > 50:
        raise ValueError("model state is nested too deeply to fingerprint")
    mod = type(obj).__module__
    if mod.startswith("torch") and hasattr(obj, "detach"):  # a torch tensor, without importing torch
        return ("tensor", str(obj.dtype), obj.detach().cpu().numpy())
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        # a torch module: its layers and weights (its pickle, like a tensor's, changes on reload)
        return ("module", repr(obj), _canonical_state(dict(obj.state_dict()), _depth + 1))
    if hasattr(obj, "get_params") and hasattr(obj, "set_params"):  # a scikit-learn estimator
        params = {k: v for k, v in _params(obj).items() if k not in EXECUTION_PARAMS}
        fitted = {k: v for k, v in vars(obj).items() if k.endswith("_") and not k.startswith("__")}
        return ("estimator", f"{mod}.{type(obj).__qualname__}",
                _canonical_state(params, _depth + 1), _canonical_state(fitted, _depth + 1))
    if isinstance(obj, dict):
        return {k: _canonical_state(v, _depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_canonical_state(v, _depth + 1) for v in obj])
    return obj


def _params(est) -> dict:
    """``get_params(deep=False)`` that tolerates a model pickled before a parameter was added."""
    try:
        names = est._get_param_names()
    except Exception:
        return est.get_params(deep=False)
    return {k: getattr(est, k, "<missing>") for k in names}


def data_fingerprint(images, *, block_bytes=32 * 2**20) -> str:
    """BLAKE2b of the images' shape, dtype and bytes, read in blocks (memmaps stay on disk).

    Hashing every byte costs about a second per GB (0.2 s for CIFAR-10's training set), which is
    small next to encoding it and, unlike a file's size/mtime, also covers in-memory arrays.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(images.shape), images.dtype.str)).encode())
    row = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, block_bytes // row)
    for start in range(0, images.shape[0], step):
        h.update(np.ascontiguousarray(images[start:start + step]).data)
    return h.hexdigest()
