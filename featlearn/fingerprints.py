"""Fingerprints: what a model computes, which images it sees and which code computes the
features, as hashes for cache keys.

The one feature-cache policy: extraction manifests and ``featlearn reproduce``'s feature cache
both key on the model (leaving out the same execution-only parameters,
:data:`EXECUTION_PARAMS`), the images and :func:`code_fingerprint`, so neither answers a changed
model, changed images or changed feature code with stale features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import joblib
import numpy as np

#: Parameters that say *how* an estimator runs, not *what* it computes, per estimator class
#: (``"*"``: every class). They are left out of every fingerprint, so a model fitted on a GPU
#: and loaded on a CPU (``device`` reset) keeps its cache and a progress setting never
#: invalidates one. The rule is per class because a name alone does not tell: a
#: ``PatchEncoder``'s ``batch_size`` is its inner chunking (sized from free memory), while a
#: ``MiniBatchKMeans``'s or a classifier's ``batch_size`` changes the result. A
#: ``PatchEncoder``'s ``output`` only says whether the same numbers come back as numpy or torch.
EXECUTION_PARAMS = {
    "*": frozenset({"device", "verbose", "n_jobs"}),
    "PatchEncoder": frozenset({"batch_size", "compile", "output"}),
}


def execution_params(estimator) -> frozenset:
    """The names in :data:`EXECUTION_PARAMS` that apply to ``estimator``'s class."""
    return EXECUTION_PARAMS["*"] | EXECUTION_PARAMS.get(type(estimator).__name__, frozenset())


def result_params(estimator) -> dict:
    """``estimator.get_params(deep=False)`` without its execution-only parameters."""
    skip = execution_params(estimator)
    return {k: v for k, v in estimator.get_params(deep=False).items() if k not in skip}


def params_fingerprint(estimator) -> str:
    """A hash of what an *unfitted* ``estimator`` will compute: its class and result parameters.

    Nested estimators (e.g. a ``PatchEncoder``'s ``kmeans``) are reduced the same way, each by
    its own class's rule, so a nested k-means ``batch_size`` counts while the encoder's own
    does not. Fitted attributes are ignored: this is the key of a job that has yet to fit.
    """
    return joblib.hash(_canonical_state(estimator, fitted=False))


def model_fingerprint(model) -> str:
    """A hash of what ``model`` computes: its class, parameters and fitted attributes.

    ``joblib.hash(model)`` alone is not usable as a cache key: torch tensors pickle differently
    after a save/load round trip (so a reloaded model would never hit its cache), and lazily
    built private caches change the pickle of an unchanged model. Estimators are therefore
    reduced to their class, their result parameters (:func:`result_params`) and their fitted
    attributes (names ending in ``_``), recursively; tensors become numpy arrays.
    """
    return joblib.hash(_canonical_state(model, fitted=True))


def _canonical_state(obj, fitted, _depth=0):
    if _depth > 50:
        raise ValueError("model state is nested too deeply to fingerprint")
    mod = type(obj).__module__
    rec = lambda v: _canonical_state(v, fitted, _depth + 1)  # noqa: E731
    if mod.startswith("torch") and hasattr(obj, "detach"):  # a torch tensor, without importing torch
        return ("tensor", str(obj.dtype), obj.detach().cpu().numpy())
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        # a torch module: its layers and weights (its pickle, like a tensor's, changes on reload)
        return ("module", repr(obj), rec(dict(obj.state_dict())))
    if hasattr(obj, "get_params") and hasattr(obj, "set_params"):  # a scikit-learn estimator
        state = {k: v for k, v in vars(obj).items()
                 if fitted and k.endswith("_") and not k.startswith("__")}
        return ("estimator", f"{mod}.{type(obj).__qualname__}", rec(result_params(obj)),
                rec(state))
    if isinstance(obj, dict):
        return {k: rec(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [rec(v) for v in obj])
    return obj


def data_fingerprint(images, *, block_bytes=32 * 2**20) -> str:
    """BLAKE2b of the images' shape, dtype and bytes, read in blocks (memmaps stay on disk).

    Every byte is hashed: cheap next to encoding the images and, unlike a file's size/mtime,
    it also covers in-memory arrays.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(images.shape), images.dtype.str)).encode())
    for block in iter_blocks(images, block_bytes=block_bytes):
        h.update(np.ascontiguousarray(block).data)
    return h.hexdigest()


def iter_blocks(images, *, block_bytes=32 * 2**20):
    """``images`` in consecutive blocks of rows of about ``block_bytes`` (a memmap is read lazily)."""
    row = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, block_bytes // row)
    for start in range(0, images.shape[0], step):
        yield images[start:start + step]


#: The modules whose code decides the encoded features: the feature stages and every featlearn
#: module they import, but the logger.
FEATURE_MODULES = ("patches", "preprocessing", "dictionary", "kmeans", "_kmeans_input",
                   "_kmeans_solvers", "_reduced_products", "activations", "pooling", "encoding",
                   "_encoding_kernel", "_native", "_scale", "_compile", "_torch")


#: Source files beside them that decide the features too: the native kernels' C source.
FEATURE_SOURCES = ("_native.c",)


def code_fingerprint() -> str:
    """sha256 of the source of :data:`FEATURE_MODULES` and :data:`FEATURE_SOURCES`: new code
    never reuses features of the old.

    A fix inside k-means keeps the parameters and the version number, so neither would tell
    the features it changes from those of the old code (joblib.Memory only watches the cached
    function's own code).
    """
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in [f"{m}.py" for m in FEATURE_MODULES] + list(FEATURE_SOURCES):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]
