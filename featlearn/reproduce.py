"""The CIFAR-10 reproduction job behind ``featlearn reproduce`` and ``benchmarks/reproduce_cifar10.py``.

Runs a named configuration end to end (fit on the training images, score on the test images),
timing each stage, and writes a results table (JSON + Markdown), a picture of the learned
centroids and the classifier's learning curve. Encoded features are cached with joblib.Memory
when a cache folder is given, so a second run that changes only the classifier skips encoding.
"""

from __future__ import annotations

import errno
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from ._io import atomic_path, check_output, check_writable_dir
from ._logging import log, logger


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _encode(encoder, X_train, X_test, key=None):
    """Fit the encoder on the training images and encode both splits (the cached unit of work).

    ``key`` only identifies the call for the cache (see :func:`encoder_cache_key`).
    """
    t0 = time.perf_counter()
    encoder.fit(X_train)
    t1 = time.perf_counter()
    F_train = encoder.transform(X_train)
    t2 = time.perf_counter()
    F_test = encoder.transform(X_test)
    t3 = time.perf_counter()
    times = {"dictionary (patches, whitening, k-means)": t1 - t0,
             "encode train": t2 - t1, "encode test": t3 - t2}
    return encoder, F_train, F_test, times


#: The modules whose code decides the encoded features (the cache key fingerprints them): the
#: feature stages and every featlearn module they import, but the logger.
_FEATURE_MODULES = ("patches", "preprocessing", "dictionary", "kmeans", "_kmeans_solvers",
                    "activations", "encoding", "_encoding_kernel", "_compile", "_torch")


def _code_fingerprint() -> str:
    """sha256 of the feature-stage source files: new code never reuses features of the old.

    joblib.Memory only watches the cached function's own code; a fix inside k-means (same
    parameters, same version number) would otherwise be answered with stale features.
    """
    import hashlib

    h = hashlib.sha256()
    for name in _FEATURE_MODULES:
        h.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def encoder_cache_key(encoder) -> dict:
    """What can change the encoder's output: its class, its result parameters and those of its
    nested estimators (:func:`featlearn.fingerprints.params_fingerprint`, which leaves out the
    same execution-only parameters as extraction), and the code of the feature stages.
    """
    from featlearn.fingerprints import params_fingerprint

    return {"class": type(encoder).__name__, "params": params_fingerprint(encoder),
            "code": _code_fingerprint()}


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


def efficiency(flops: dict, seconds: dict, rate_gflops: float) -> dict:
    """Fraction of the measured GEMM rate each part of the run reached (FLOPs / time / rate)."""
    dict_s = seconds.get("dictionary (patches, whitening, k-means)", 0.0)
    enc_s = seconds.get("encode train", 0.0) + seconds.get("encode test", 0.0)
    parts = {"dictionary": (flops["k-means"], dict_s), "encoding": (flops["encoding"], enc_s),
             "end to end": (sum(flops.values()), sum(seconds.values()))}
    return {k: float(f"{f / t / (rate_gflops * 1e9):.3g}") if t > 0 else None
            for k, (f, t) in parts.items()}


def run(config, data, *, out=None, cache=None, device=None, n_train=None, n_test=None,
        random_state=None, overwrite=False, verbose=1):
    """Run ``config`` (a dict from :func:`featlearn.pipeline.load_config`) on ``data``.

    ``data`` is the Bunch of :func:`featlearn.fetch_cifar10`. ``n_train`` / ``n_test`` take the
    first images of each split (for smoke runs; the published numbers use all of them). Returns
    the results dict; with ``out`` it also writes ``results.json``, ``results.md`` and the PNGs
    there, after checking the folder first (:func:`prepare_results_dir`, with ``overwrite``).
    """
    import sklearn
    import torch

    import featlearn
    from featlearn._torch import gemm_rate, resolve_device
    from featlearn.pipeline import build_pipeline, image_encoder

    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"{name} must be a positive int or None, got {n!r}")
    if out is not None:
        out = prepare_results_dir(out, overwrite=overwrite)
    t_start = time.perf_counter()
    overrides = {}
    if device is not None:
        overrides["device"] = device
    if random_state is not None:
        overrides["random_state"] = random_state
    pipe = build_pipeline(config, verbose=verbose, **overrides)
    encoder, clf = image_encoder(pipe), pipe.named_steps["classifier"]
    streaming = "encoder" not in pipe.named_steps  # the classifier takes images
    # A streaming classifier encodes on its head's device.
    run_device = resolve_device(clf.head.device if streaming else encoder.device)

    X_train, y_train = data["X_train"][:n_train], data["y_train"][:n_train]
    X_test, y_test = data["X_test"][:n_test], data["y_test"][:n_test]
    name = config.get("name", "?")
    log(verbose, f"[{name}] {len(X_train)} training and {len(X_test)} test images, "
                 f"K={encoder.kmeans.n_clusters}, device {run_device}", level=2)

    # The yardstick for the efficiency figures, measured beside the run (a second or two).
    rate = gemm_rate(n=3072, repeats=2, device=run_device)
    log(verbose, f"[{name}] float32 GEMM rate of this machine: {rate:.0f} GFLOP/s", level=2)
    if streaming:
        if cache is not None:
            logger.warning("%s trains on images encoded per batch and stores no features: "
                           "the cache is not used", name)
        t0 = time.perf_counter()
        clf.fit(X_train, y_train)
        times = {"fit (dictionary, streamed training)": time.perf_counter() - t0}
        encoder, cached, load_s = clf.encoder_, False, 0.0
        inputs_train, inputs_test = X_train, X_test
        views = 2 if clf.test_flip else 1
        encoded = len(X_train) * clf.head_.n_iter_ + (len(X_train) + len(X_test)) * views
    else:
        encoder, inputs_train, inputs_test, times, cached, load_s = _features(
            pipe, encoder, X_train, X_test, cache, name, verbose)
        encoded = None
        t0 = time.perf_counter()
        clf.fit(inputs_train, y_train)
        times["classifier fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred_test = np.asarray(clf.predict(inputs_test))
    test_acc = float(np.mean(pred_test == y_test))
    train_acc = float(np.mean(clf.predict(inputs_train) == y_train))
    times["predict"] = time.perf_counter() - t0
    names = [str(n) for n in data.get("target_names") or []]
    n_classes = max(len(names), int(max(np.max(y_train), np.max(y_test))) + 1)
    names += [str(k) for k in range(len(names), n_classes)]
    confusion = confusion_counts(y_test, pred_test, n_classes)
    total = time.perf_counter() - t_start
    flops = distance_flops(encoder, len(X_train), len(X_test), encoded)

    results = {
        "config": name,
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "n_train": int(len(X_train)),
        "n_test": int(len(X_test)),
        "n_centroids": int(encoder.n_clusters_),
        "n_features": int(encoder.n_features_out_),
        "published_accuracy": config.get("published"),
        # Per class: the fraction of that class's test images predicted as it (its recall).
        "per_class_accuracy": {name: (round(float(confusion[k, k] / confusion[k].sum()), 4)
                                      if confusion[k].sum() else None)
                               for k, name in enumerate(names)},
        # Rows: true class, columns: predicted class, in the order of target_names.
        "target_names": names,
        "confusion_matrix": confusion.tolist(),
        "features_from_cache": bool(cached),
        "feature_load_seconds": round(load_s, 2) if cached else None,
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "total_seconds": round(total, 1),
        "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2),
        "gemm_gflops": round(rate, 1),
        "distance_tflop": {k: float(f"{v / 1e12:.4g}") for k, v in flops.items()},
        "efficiency": efficiency(flops, times, rate),
        "device": str(run_device),
        "cpu_threads": torch.get_num_threads(),
        "archive": data.get("archive"),
        "versions": {"featlearn": featlearn.__version__, "torch": torch.__version__,
                     "scikit-learn": sklearn.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "params": config["params"],
    }
    log(verbose, f"[{name}] test accuracy {test_acc:.2%}, train {train_acc:.2%}, "
                 f"{total:.0f} s, peak RSS {results['peak_rss_gb']} GB", level=2)
    if out is not None:
        write_results(results, pipe, Path(out))
    return results, pipe


def _features(pipe, encoder, X_train, X_test, cache, name, verbose):
    """Fit the encoder and encode both splits (through the cache when given); the fitted
    encoder replaces the pipeline's, and the features go through the steps between it and the
    classifier (power normalization)."""
    t0 = time.perf_counter()
    encoder, F_train, F_test, times, cached = encode_cached(encoder, X_train, X_test, cache,
                                                            verbose)
    load_s = time.perf_counter() - t0
    pipe.steps[0] = ("encoder", encoder)
    log(verbose, f"[{name}] features {F_train.shape}" + (" (from cache)" if cached else ""),
        level=2)
    if cached:  # the stage times are those of the run that computed the features
        computed = sum(times.values())
        log(verbose, f"[{name}] cache: features loaded in {load_s:.1f} s instead of "
                     f"{computed:.0f} s of fitting and encoding ({computed / max(load_s, 1e-9):.0f}x)",
            level=2)
    middle = pipe[1:-1]
    if middle.steps:
        F_train, F_test = middle.fit_transform(F_train), middle.transform(F_test)
    return encoder, F_train, F_test, times, cached, load_s


def confusion_counts(y_true, y_pred, n_classes) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred,
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def results_markdown(results: dict) -> str:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in results["stage_seconds"].items())
    pub = results.get("published_accuracy")
    rows = [
        "| config | test acc | train acc | published (original pixels) | K | features | "
        "total s | peak RSS GB | device |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {results['config']} | {results['test_accuracy']:.2%} | "
        f"{results['train_accuracy']:.2%} | {f'{pub}%' if pub else '-'} | "
        f"{results['n_centroids']} | {results['n_features']} | {results['total_seconds']} | "
        f"{results['peak_rss_gb']} | {results['device']} ({results['cpu_threads']} threads) |",
        "",
        f"Stages: {stages}.",
        _efficiency_line(results),
        f"Images: {results['n_train']} train, {results['n_test']} test from "
        f"`{results['archive']}`" + (
            f"; features loaded from the cache in {results.get('feature_load_seconds')} s "
            "(the stage times above are those of the run that computed them)."
            if results["features_from_cache"] else "."),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
    ]
    per_class = results.get("per_class_accuracy")
    if per_class:
        rows += ["", "Test accuracy per class (the fraction of each class's test images "
                     "predicted as it; the confusion matrix is in results.json and "
                     "confusion.png):", "",
                 "| " + " | ".join(per_class) + " |",
                 "|" + "---|" * len(per_class),
                 "| " + " | ".join("-" if v is None else f"{v:.1%}" for v in per_class.values())
                 + " |"]
    return "\n".join(rows) + "\n"


def _efficiency_line(results: dict) -> str:
    eff, tf = results.get("efficiency"), results.get("distance_tflop")
    if not eff or not tf:
        return "Efficiency: not recorded (results from before it was measured)."
    pct = ", ".join(f"{k} {v:.0%}" for k, v in eff.items() if v is not None)
    return (f"Distance products: {tf['k-means']:.3g} TFLOP in k-means, {tf['encoding']:.3g} "
            f"TFLOP in encoding; float32 GEMM rate measured in this run "
            f"{results['gemm_gflops']} GFLOP/s; efficiency (FLOPs / stage time / rate): {pct}.")


#: Marks a results.json written by :func:`write_results`: a folder holding one is a featlearn
#: results folder, which a later run may replace without ``--force``.
RESULTS_MARKER = "featlearn_results"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def safe_folder_name(name) -> str:
    """``name`` reduced to ``[A-Za-z0-9._-]``, without leading dots or underscores: never a path, ``.`` or ``..``."""
    safe = _SAFE_NAME.sub("_", str(name)).lstrip("._")
    return safe or "results"


def default_results_dir(config_name, parent="results") -> Path:
    """``parent/NAME`` for a configuration name, verified to lie directly under ``parent``."""
    parent = Path(parent)
    out = parent / safe_folder_name(config_name)
    if out.resolve().parent != parent.resolve():  # pragma: no cover - excluded by safe_folder_name
        raise ValueError(f"results folder for configuration {config_name!r} would lie outside "
                         f"{parent}")
    return out


def is_results_dir(path) -> bool:
    """Whether ``path`` is a folder of featlearn results (its results.json carries the marker)."""
    try:
        return json.loads((Path(path) / "results.json").read_text()).get(RESULTS_MARKER) == 1
    except (OSError, ValueError, AttributeError):
        return False


def prepare_results_dir(out, *, overwrite=False) -> Path:
    """Check and create the results folder ``out`` before any work starts; return it.

    An existing ``out`` must be an empty folder or a featlearn results folder
    (:func:`is_results_dir`) unless ``overwrite``; its parent must exist; the folder must be
    writable. Checked first so that a long run never ends in a refused or failed write.

    Raises
    ------
    OutputExistsError
        ``out`` exists and is neither empty nor featlearn results (without ``overwrite``).
    OSError
        The parent folder does not exist, or ``out`` is not a writable folder.
    """
    out = Path(out).expanduser()
    check_output(out, overwrite=overwrite, what="results folder",
                 is_ours=lambda p: p.is_dir() and (not any(p.iterdir()) or is_results_dir(p)))
    if out.exists() and not out.is_dir():
        raise OSError(errno.ENOTDIR, f"results folder {out} exists and is not a folder")
    out.mkdir(exist_ok=True)
    check_writable_dir(out)
    return out


def write_results(results: dict, pipe, out: Path):
    """``results.json``, ``results.md``, ``centroids.png``, ``learning_curve.png`` and
    ``confusion.png`` in ``out``.

    Each file is written atomically (temporary file, then rename), so an interrupted run
    leaves the previous file or the new one, never half of one. ``out`` must exist
    (:func:`prepare_results_dir`).
    """
    from featlearn.pipeline import image_encoder

    out = Path(out)
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text(results_markdown(results))
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: skipping centroids.png, learning_curve.png "
                       "and confusion.png (pip install matplotlib)")
    else:
        matplotlib.use("Agg")
        with atomic_path(out / "centroids.png") as tmp:
            plot_centroids(image_encoder(pipe), tmp)
        with atomic_path(out / "learning_curve.png") as tmp:
            clf = pipe.named_steps["classifier"]
            plot_learning_curve(getattr(clf, "head_", clf), tmp, title=results["config"])
        if results.get("confusion_matrix") is not None:
            with atomic_path(out / "confusion.png") as tmp:
                plot_confusion(np.asarray(results["confusion_matrix"]), results["target_names"],
                               tmp, title=f"{results['config']}: test accuracy "
                                          f"{results['test_accuracy']:.2%}")
    # results.json last: its marker says the folder holds a complete set of results.
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({RESULTS_MARKER: 1, **results}, indent=2, default=str)
                             + "\n")


def centroid_tiles(encoder, max_tiles=400):
    """The first ``max_tiles`` centroids as ``(n, p, p, C)`` images scaled to 0..1 each.

    Centroids live in whitened space, where they look like the edge and colour detectors the paper
    shows; each tile is stretched to its own range so contrast is visible.
    """
    from featlearn.patches import unflatten_patches

    centres = np.asarray(encoder.kmeans_.cluster_centers_[:max_tiles], dtype=np.float64)
    p = encoder.patch_size
    C = centres.shape[1] // (p * p)
    lo = centres.min(axis=1, keepdims=True)
    hi = centres.max(axis=1, keepdims=True)
    return unflatten_patches((centres - lo) / np.maximum(hi - lo, 1e-12), p, C)


def plot_centroids(encoder, path, max_tiles=400):
    import matplotlib.pyplot as plt

    tiles = centroid_tiles(encoder, max_tiles)
    n, p = len(tiles), tiles.shape[1]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.ones((rows * (p + 1) + 1, cols * (p + 1) + 1, tiles.shape[3]))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[1 + r * (p + 1):1 + r * (p + 1) + p, 1 + c * (p + 1):1 + c * (p + 1) + p] = tile
    fig, ax = plt.subplots(figsize=(8, 8 * rows / cols))
    ax.imshow(canvas.squeeze(), cmap="gray" if canvas.shape[2] == 1 else None,
              interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"first {n} of {len(encoder.kmeans_.cluster_centers_)} centroids (whitened)")
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_learning_curve(clf, path, title=""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    loss = getattr(clf, "loss_curve_", None)
    if loss:
        ax.plot(np.arange(1, len(loss) + 1), loss, label="training loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
    val = getattr(clf, "validation_scores_", None)
    if val:
        ax2 = ax.twinx()
        ax2.plot(np.arange(1, len(val) + 1), val, color="tab:orange", label="validation accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title(f"{title} learning curve")
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(confusion, names, path, title=""):
    """The test confusion matrix, each row normalized to the true class's images (row = true)."""
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    n = len(names)
    side = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:  # beyond that the numbers would not be readable
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
