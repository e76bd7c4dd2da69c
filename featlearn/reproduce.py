"""The CIFAR-10 reproduction job behind ``featlearn reproduce`` and ``benchmarks/reproduce_cifar10.py``.

Runs a named configuration end to end in steps: build the pipeline, fit it (on features
encoded once, or streaming images through the classifier), evaluate on the test images, and
collect a results dict with each stage's time and the run's efficiency; :mod:`featlearn.results`
writes it (JSON, Markdown, pictures). Encoded features are cached with joblib.Memory when a
cache folder is given, so a second run that changes only the classifier skips encoding; the
cache key follows the feature-cache policy of :mod:`featlearn.fingerprints`.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import fingerprints
from ._logging import log, logger
from .results import prepare_results_dir, write_results

#: The stage time of fitting the encoder (patches, whitening, k-means).
_DICTIONARY = "dictionary (patches, whitening, k-means)"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@contextlib.contextmanager
def _timed(times: dict, stage: str):
    """Record the seconds the ``with`` block took as ``times[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = time.perf_counter() - t0


def _encode(encoder, X_train, X_test, key=None):
    """Fit the encoder on the training images and encode both splits (the cached unit of work).

    ``key`` only identifies the call for the cache (see :func:`encoder_cache_key`).
    """
    times = {}
    with _timed(times, _DICTIONARY):
        encoder.fit(X_train)
    with _timed(times, "encode train"):
        F_train = encoder.transform(X_train)
    with _timed(times, "encode test"):
        F_test = encoder.transform(X_test)
    return encoder, F_train, F_test, times


def encoder_cache_key(encoder) -> dict:
    """What can change the encoder's output: its class, its result parameters and those of its
    nested estimators (:func:`featlearn.fingerprints.params_fingerprint`, which leaves out the
    same execution-only parameters as extraction), and the code of the feature stages.
    """
    return {"class": type(encoder).__name__, "params": fingerprints.params_fingerprint(encoder),
            "code": fingerprints.code_fingerprint()}


def encode_cached(encoder, X_train, X_test, cache=None, verbose=0):
    """``_encode`` through ``joblib.Memory(cache)``.

    The cache key is the encoder's output-relevant parameters (:func:`encoder_cache_key`) and
    both image arrays, so a changed encoder parameter or different data never reuses stale
    features; joblib also invalidates entries when this function's code changes, and recomputes
    (with a warning) an entry it cannot read back, so a corrupt cache is never fatal. Returns the
    ``_encode`` outputs and whether they came from the cache.
    """
    if cache is None:
        return (*_encode(encoder, X_train, X_test), False)
    from joblib import Memory

    func = Memory(str(cache), verbose=0).cache(_encode, ignore=["encoder"])
    key = encoder_cache_key(encoder)
    hit = func.check_call_in_cache(encoder, X_train, X_test, key)
    if hit:
        log(verbose, "encoded features found in the cache; loading them", level=2)
    return (*func(encoder, X_train, X_test, key), hit)


def distance_flops(encoder, n_train, n_test, encoded=None) -> dict:
    """FLOPs of the run's distance products, the work a GEMM must do whatever else runs.

    k-means: ``2 * rows * d * K`` per pass over the patches (every Lloyd iteration; each
    mini-batch step's batch, plus the final pass for ``labels_`` when ``compute_labels``);
    k-means++ seeding is left out (a dictionary of random patches has no passes). Encoding:
    ``2 * images * views * positions * d * K``, or ``2 * encoded * positions * d * K`` when
    the number of encoded images is given (a streaming run encodes every epoch's batches).
    ``d`` is the whitened patch width.
    """
    km = encoder.kmeans_
    K, d = encoder.n_clusters_, int(np.shape(km.cluster_centers_)[1])
    n = encoder.n_patches
    if hasattr(km, "batch_size") and hasattr(km, "n_steps_"):  # mini-batch
        rows = km.n_steps_ * min(km.batch_size, n) + (n if getattr(km, "compute_labels", True)
                                                       else 0)
    else:
        rows = getattr(km, "n_iter_", 0) * n
    Ph, Pw = encoder.map_shape_
    if encoded is None:
        encoded = (n_train + n_test) * (2 if encoder.flip else 1)
    return {"k-means": 2.0 * rows * d * K, "encoding": 2.0 * encoded * Ph * Pw * d * K}


def network_flops(clf, n_train, n_test) -> dict:
    """FLOPs of the matrix products of a featlearn network trained by Adam or SGD:
    ``{"classifier fit": ..., "predict": ...}``, or ``{}`` where they are not counted (L-BFGS,
    whose line search evaluates the objective a varying number of times; a streamed or
    another library's classifier).

    Fit: every one of the ``n_iter_`` epochs takes the training rows (samples times
    ``n_views``, less an early-stopping validation split) through each Linear layer forward,
    ``2 * rows * in * out``, and back: its weight gradient costs as much again, and so does its
    input gradient, except the first layer's (its input needs none); early stopping scores the
    validation rows forward once an epoch. Predict: the rows of both splits forward, once.
    """
    import math

    import torch

    from featlearn.classifier import TorchMLPClassifier

    if not isinstance(clf, TorchMLPClassifier) or getattr(clf, "solver_", None) not in ("adam",
                                                                                         "sgd"):
        return {}
    shapes = [(m.in_features, m.out_features) for m in clf.model_
              if isinstance(m, torch.nn.Linear)]
    forward = sum(2.0 * i * o for i, o in shapes)
    backward = sum(2.0 * i * o * (1 if k == 0 else 2) for k, (i, o) in enumerate(shapes))
    # train_test_split's test size: ceil(fraction * samples)
    held = math.ceil(clf.validation_fraction * n_train) if clf.early_stopping else 0
    rows, held = (n_train - held) * clf.n_views, held * clf.n_views
    return {"classifier fit": clf.n_iter_ * (rows * (forward + backward) + held * forward),
            "predict": (n_train + n_test) * clf.n_views * forward}


def stage_precisions(encoder) -> dict:
    """The precision each distance part of an encoder multiplied in: ``{"k-means": ...,
    "encoding": ...}`` ("float32" for a k-means without a ``precision_``, e.g. scikit-learn's)."""
    return {"k-means": getattr(encoder.kmeans_, "precision_", "float32"),
            "encoding": encoder._transform_precision()}


def efficiency(gemm_seconds: dict, seconds: dict) -> dict:
    """Fraction of each part's time its products would take at the GEMM rate of their own
    precision measured in the run (``gemm_seconds``: ``{"k-means": s, "encoding": s}``, and
    ``"classifier fit"`` and ``"predict"`` where :func:`network_flops` counts them), so a
    bfloat16 stage is held to the bfloat16 rate. "end to end" holds all the products counted
    to the time of all the stages."""
    dict_s = seconds.get(_DICTIONARY, 0.0)
    enc_s = seconds.get("encode train", 0.0) + seconds.get("encode test", 0.0)
    parts = {"dictionary": (gemm_seconds["k-means"], dict_s),
             "encoding": (gemm_seconds["encoding"], enc_s)}
    for part in ("classifier fit", "predict"):
        if part in gemm_seconds:
            parts[part] = (gemm_seconds[part], seconds.get(part, 0.0))
    parts["end to end"] = (sum(gemm_seconds.values()), sum(seconds.values()))
    return {k: float(f"{g / t:.3g}") if t > 0 else None for k, (g, t) in parts.items()}


@dataclass
class _Job:
    """A built configuration: the pipeline, its encoder and classifier, where it runs."""

    name: str
    pipe: object
    encoder: object
    clf: object
    streaming: bool  # the classifier takes images and encodes them per batch
    device: object
    members: list = field(default_factory=list)  # (name, _Job) of a soft-voting ensemble


@dataclass
class _Fitted:
    """What fitting left: the fitted encoder, the classifier's inputs, where features came from."""

    encoder: object
    train: object
    test: object
    cached: bool = False
    load_s: float = 0.0
    encoded: int | None = None  # images encoded, when not one pass over each split
    members: list = field(default_factory=list)  # an ensemble's (name, fitted encoder, seconds)


def run(config, data, *, out=None, cache=None, device=None, n_train=None, n_test=None,
        random_state=None, overwrite=False, verbose=1):
    """Run ``config`` (a dict from :func:`featlearn.pipeline.load_config`) on ``data``.

    ``data`` is the Bunch of :func:`featlearn.fetch_cifar10`. ``n_train`` / ``n_test`` take the
    first images of each split (for smoke runs; the published numbers use all of them). Returns
    the results dict and the fitted pipeline; with ``out`` it also writes ``results.json``,
    ``results.md`` and the PNGs there, after checking the folder first
    (:func:`featlearn.results.prepare_results_dir`, with ``overwrite``). Without ``cache``, a
    pipeline is fitted split by split (:func:`_fit_split_by_split`): one split's features in
    memory at a time.
    """
    import torch

    from featlearn._torch import gemm_rate, has_fast_bfloat16, has_fast_int8

    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"{what} must be a positive int or None, got {n!r}")
    if out is not None:
        out = prepare_results_dir(out, overwrite=overwrite)
    t_start = time.perf_counter()
    job = _build(config, device, random_state, verbose)
    split = {"X_train": data["X_train"][:n_train], "y_train": data["y_train"][:n_train],
             "X_test": data["X_test"][:n_test], "y_test": data["y_test"][:n_test]}
    log(verbose, f"[{job.name}] {len(split['X_train'])} training and {len(split['X_test'])} "
                 f"test images, K={job.encoder.kmeans.n_clusters}, device {job.device}", level=2)
    # The yardsticks for the efficiency figures, measured beside the run: float32, and
    # bfloat16 and int8 where they are native (a stage is held to its own precision's rate).
    rate = {"float32": gemm_rate(n=3072, repeats=2, device=job.device)}
    if has_fast_bfloat16(job.device):
        rate["bfloat16"] = gemm_rate(n=3072, repeats=2, device=job.device, dtype=torch.bfloat16)
    if has_fast_int8(job.device):
        rate["int8"] = gemm_rate(n=3072, repeats=2, device=job.device, dtype=torch.int8)
    log(verbose, f"[{job.name}] GEMM rates of this machine: "
                 + ", ".join(f"{k} {v:.0f} {'GOP/s' if k == 'int8' else 'GFLOP/s'}"
                             for k, v in rate.items()), level=2)

    times = {}
    if job.members:
        fitted, proba = _fit_members(job, split, cache, times, verbose)
        classes = np.asarray(job.pipe.classes_)
        pred_train, pred_test = (classes[proba[part].argmax(1)] for part in ("train", "test"))
    else:
        if job.streaming:
            fitted = _fit_streaming(job, split, cache, times)
        elif cache is None:  # nothing to store: one split's features in memory at a time
            pred = {}

            def predict(part, F):
                pred[part] = job.clf.predict(F)
            encoder = _fit_split_by_split(job, split, times, verbose, predict)
            fitted = _Fitted(encoder, None, None)
            pred_train, pred_test = np.asarray(pred["train"]), np.asarray(pred["test"])
        else:
            fitted = _fit_on_features(job, split, cache, times, verbose)
        if fitted.train is not None:
            with _timed(times, "predict"):
                pred_test = np.asarray(job.clf.predict(fitted.test))
                pred_train = np.asarray(job.clf.predict(fitted.train))
    results = _results(config, data, job, split, fitted, pred_train, pred_test, times,
                       time.perf_counter() - t_start, rate)
    log(verbose, f"[{job.name}] test accuracy {results['test_accuracy']:.2%}, train "
                 f"{results['train_accuracy']:.2%}, {results['total_seconds']:.0f} s, peak RSS "
                 f"{results['peak_rss_gb']} GB", level=2)
    if out is not None:
        write_results(results, job.pipe, Path(out))
    return results, job.pipe


def _build(config, device, random_state, verbose) -> _Job:
    """The configuration's pipeline, with the run's device and seed when given."""
    from featlearn.pipeline import build_pipeline

    overrides = {k: v for k, v in (("device", device), ("random_state", random_state))
                 if v is not None}
    name = config.get("name", "?")
    pipe = build_pipeline(config, verbose=verbose, **overrides)
    members = [(member, _job(f"{name}.{member}", est)) for member, est in
               getattr(pipe, "estimators", [])]  # a soft-voting ensemble of pipelines
    if members:
        first = members[0][1]
        return _Job(name, pipe, first.encoder, pipe, False, first.device, members)
    return _job(name, pipe)


def _job(name, pipe) -> _Job:
    """One pipeline's job: its encoder, its classifier, the device it encodes on."""
    from featlearn._torch import resolve_device
    from featlearn.pipeline import image_encoder

    encoder, clf = image_encoder(pipe), pipe.named_steps["classifier"]
    streaming = "encoder" not in pipe.named_steps
    # A streaming classifier encodes on its head's device.
    run_device = resolve_device(clf.head.device if streaming else encoder.device)
    return _Job(name, pipe, encoder, clf, streaming, run_device)


def _fit_members(job, split, cache, times, verbose):
    """Fit a soft-voting ensemble member by member, each as :func:`_fit_on_features` fits one
    pipeline (its own cached features; without a cache, one split at a time:
    :func:`_fit_split_by_split`), and drop each member's features before the next is
    encoded: memory is one member's, not the sum. Returns the fitted ensemble's
    :class:`_Fitted` (its members' encoders and stage seconds; ``times`` gets their sums) and
    the members' summed probabilities on both splits; ``job.pipe`` becomes the fitted
    ``VotingClassifier`` of the fitted pipelines (as ``FrozenEstimator``, so fitting the
    ensemble refits none of them)."""
    from sklearn.ensemble import VotingClassifier
    from sklearn.frozen import FrozenEstimator

    proba = {"train": 0.0, "test": 0.0}
    ensemble = _Fitted(None, None, None)
    frozen = []
    for name, member in job.members:
        member_times = {}
        if cache is None:
            def add(part, F, member=member):
                proba[part] = proba[part] + member.clf.predict_proba(F)
            encoder = _fit_split_by_split(member, split, member_times, verbose, add)
        else:
            fitted = _fit_on_features(member, split, cache, member_times, verbose)
            with _timed(member_times, "predict"):
                for part in proba:
                    proba[part] = proba[part] + member.clf.predict_proba(getattr(fitted, part))
            encoder = fitted.encoder
            ensemble.cached = ensemble.cached or fitted.cached
            ensemble.load_s += fitted.load_s
            del fitted
        # The first torch optimizer of a process is built during lazy imports whose frames form
        # reference cycles, and those frames hold the classifier's training features: without
        # a collection they outlive the member and add to the next member's peak memory.
        gc.collect()
        for stage, seconds in member_times.items():
            times[stage] = times.get(stage, 0.0) + seconds
        ensemble.members.append((name, encoder, member_times))
        frozen.append((name, FrozenEstimator(member.pipe)))
    ensemble.encoder = ensemble.members[0][1]
    job.pipe = VotingClassifier(frozen, voting="soft").fit(split["X_train"], split["y_train"])
    return ensemble, proba


def _fit_split_by_split(job, split, times, verbose, score):
    """Fit one pipeline without a cache: fit its encoder, encode the training images, fit the
    classifier and ``score("train", features)``, drop them, then encode the test images and
    ``score("test", features)``, so peak memory is the larger split's features, not both
    splits'. Returns the fitted encoder (the pipeline's first step from then on)."""
    from sklearn.base import clone

    encoder, pipe = clone(job.encoder), job.pipe
    with _timed(times, _DICTIONARY):
        encoder.fit(split["X_train"])
    pipe.steps[0] = ("encoder", encoder)
    middle = pipe[1:-1]
    with _timed(times, "encode train"):
        F = encoder.transform(split["X_train"])
    log(verbose, f"[{job.name}] features {F.shape}", level=2)
    if middle.steps:
        F = middle.fit_transform(F)
    with _timed(times, "classifier fit"):
        job.clf.fit(F, split["y_train"])
    with _timed(times, "predict"):
        score("train", F)
    del F
    gc.collect()  # see _fit_members
    with _timed(times, "encode test"):
        F = encoder.transform(split["X_test"])
    if middle.steps:
        F = middle.transform(F)
    t0 = time.perf_counter()
    score("test", F)
    times["predict"] += time.perf_counter() - t0
    return encoder


def _fit_streaming(job, split, cache, times) -> _Fitted:
    """Fit a classifier that takes images: its encoder, then its head on batches it encodes."""
    if cache is not None:
        logger.warning("%s trains on images encoded per batch and stores no features: "
                       "the cache is not used", job.name)
    clf, X_train, X_test = job.clf, split["X_train"], split["X_test"]
    with _timed(times, "fit (dictionary, streamed training)"):
        clf.fit(X_train, split["y_train"])
    views = 2 if clf.test_flip else 1
    encoded = len(X_train) * clf.head_.n_iter_ + (len(X_train) + len(X_test)) * views
    return _Fitted(clf.encoder_, X_train, X_test, encoded=encoded)


def _fit_on_features(job, split, cache, times, verbose) -> _Fitted:
    """Fit the encoder and encode both splits (through the cache when given), then fit the
    classifier on them. The fitted encoder replaces the pipeline's, and the features go through
    the steps between it and the classifier (power normalization)."""
    pipe, name = job.pipe, job.name
    t0 = time.perf_counter()
    encoder, F_train, F_test, stage_times, cached = encode_cached(
        job.encoder, split["X_train"], split["X_test"], cache, verbose)
    load_s = time.perf_counter() - t0
    times.update(stage_times)
    pipe.steps[0] = ("encoder", encoder)
    log(verbose, f"[{name}] features {F_train.shape}" + (" (from cache)" if cached else ""),
        level=2)
    if cached:  # the stage times are those of the run that computed the features
        computed = sum(stage_times.values())
        log(verbose, f"[{name}] cache: features loaded in {load_s:.1f} s instead of "
                     f"{computed:.0f} s of fitting and encoding ({computed / max(load_s, 1e-9):.0f}x)",
            level=2)
    middle = pipe[1:-1]
    if middle.steps:
        F_train, F_test = middle.fit_transform(F_train), middle.transform(F_test)
    with _timed(times, "classifier fit"):
        job.clf.fit(F_train, split["y_train"])
    return _Fitted(encoder, F_train, F_test, cached=cached, load_s=load_s)


def _results(config, data, job, split, fitted, pred_train, pred_test, times, total, rate) -> dict:
    """The results dict of a finished run (what results.json holds)."""
    import sklearn
    import torch

    import featlearn
    from featlearn.pipeline import member_configs

    y_train, y_test = split["y_train"], split["y_test"]
    n_train, n_test = len(split["X_train"]), len(split["X_test"])
    names = [str(n) for n in data.get("target_names") or []]
    n_classes = max(len(names), int(max(np.max(y_train), np.max(y_test))) + 1)
    names += [str(k) for k in range(len(names), n_classes)]
    confusion = confusion_counts(y_test, pred_test, n_classes)
    encoders = [e for _, e, _ in fitted.members] or [fitted.encoder]
    flops, gemm_s, precisions = {}, {}, {}
    net, net_precisions = {}, {}

    def count(part, f, precision, into, seen):
        into[part] = into.get(part, 0.0) + f
        # bfloat16 or int8 without a measured (native) rate: held to the float32 rate
        gemm_s[part] = gemm_s.get(part, 0.0) + f / (rate.get(precision, rate["float32"]) * 1e9)
        seen.setdefault(part, set()).add(precision)

    def tables(prefix, into, seen):
        return {f"{prefix}_tflop": {k: float(f"{v / 1e12:.4g}") for k, v in into.items()},
                f"{prefix}_precision": {k: "+".join(sorted(v)) for k, v in seen.items()}}

    for encoder in encoders:
        precision = stage_precisions(encoder)
        for part, f in distance_flops(encoder, n_train, n_test, fitted.encoded).items():
            count(part, f, precision[part], flops, precisions)
    for clf in [member.clf for _, member in job.members] or [job.clf]:
        for part, f in network_flops(clf, n_train, n_test).items():
            # prediction runs in float32 whatever the training precision
            count(part, f, clf.precision_ if part == "classifier fit" else "float32", net,
                  net_precisions)
    return {
        "config": job.name,
        "test_accuracy": float(np.mean(pred_test == y_test)),
        "train_accuracy": float(np.mean(pred_train == y_train)),
        "n_train": int(n_train),
        "n_test": int(n_test),
        # An ensemble's: summed over its members (each member's in "members").
        "n_centroids": sum(int(e.n_clusters_) for e in encoders),
        "n_features": sum(int(e.n_features_out_) for e in encoders),
        "published_accuracy": config.get("published"),
        # Per class: the fraction of that class's test images predicted as it (its recall).
        "per_class_accuracy": {name: (round(float(confusion[k, k] / confusion[k].sum()), 4)
                                      if confusion[k].sum() else None)
                               for k, name in enumerate(names)},
        # Rows: true class, columns: predicted class, in the order of target_names.
        "target_names": names,
        "confusion_matrix": confusion.tolist(),
        "features_from_cache": bool(fitted.cached),
        "feature_load_seconds": round(fitted.load_s, 2) if fitted.cached else None,
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "total_seconds": round(total, 1),
        "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2),
        "gemm_gflops": round(rate["float32"], 1),
        "gemm_gflops_bfloat16": round(rate["bfloat16"], 1) if "bfloat16" in rate else None,
        "gemm_gops_int8": round(rate["int8"], 1) if "int8" in rate else None,
        **tables("distance", flops, precisions),
        **(tables("network", net, net_precisions) if net else {}),
        "efficiency": efficiency(gemm_s, times),
        "device": str(job.device),
        "cpu_threads": torch.get_num_threads(),
        "archive": data.get("archive"),
        "versions": {"featlearn": featlearn.__version__, "torch": torch.__version__,
                     "scikit-learn": sklearn.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "params": config["params"],
        **({"members": [{"name": name, "params": params, "n_centroids": int(e.n_clusters_),
                         "n_features": int(e.n_features_out_),
                         "stage_seconds": {k: round(v, 2) for k, v in seconds.items()}}
                        for (name, e, seconds), params in
                        zip(fitted.members, (m["params"] for m in member_configs(config)))]}
           if fitted.members else {}),
    }


def confusion_counts(y_true, y_pred, n_classes) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred,
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)
