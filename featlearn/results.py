"""The results of a reproduction run on disk: the results folder's rules, ``results.json`` and
``results.md``, and the pictures (learned centroids, learning curve, confusion matrix).

A results folder is checked before a run starts (:func:`prepare_results_dir`) and written
file by file atomically (:func:`write_results`), ``results.json`` last: its marker
(:data:`RESULTS_MARKER`) says the folder holds a complete set of featlearn results, which a
later run may replace without ``--force``.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np

from ._io import atomic_path, check_output, check_writable_dir
from ._logging import logger


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
    from featlearn.pipeline import ensemble_members, image_encoder

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
        pipes = ensemble_members(pipe)  # an ensemble: the first member's centroids
        with atomic_path(out / "centroids.png") as tmp:
            plot_centroids(image_encoder(pipes[0]), tmp)
        with atomic_path(out / "learning_curve.png") as tmp:
            clfs = [p.named_steps["classifier"] for p in pipes]
            plot_learning_curve([getattr(c, "head_", c) for c in clfs], tmp,
                                title=results["config"])
        if results.get("confusion_matrix") is not None:
            with atomic_path(out / "confusion.png") as tmp:
                plot_confusion(np.asarray(results["confusion_matrix"]), results["target_names"],
                               tmp, title=f"{results['config']}: test accuracy "
                                          f"{results['test_accuracy']:.2%}")
    # results.json last: its marker says the folder holds a complete set of results.
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({RESULTS_MARKER: 1, **results}, indent=2, default=str)
                             + "\n")


def results_markdown(results: dict) -> str:
    """The results table of a run (the dict :func:`featlearn.reproduce.run` returns), in Markdown."""
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
    members = results.get("members")
    if members:
        rows += ["", f"An ensemble of {len(members)} pipelines, their test probabilities "
                     "averaged (K and features above are their sums; stage seconds summed):", ""]
        rows += [f"- {m['name']}: K={m['n_centroids']}, {m['n_features']} features; "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in m["stage_seconds"].items())
                 for m in members]
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
    eff, tf = results["efficiency"], results["distance_tflop"]
    prec = results.get("distance_precision") or {"k-means": "float32", "encoding": "float32"}
    pct = ", ".join(f"{k} {v:.0%}" for k, v in eff.items() if v is not None)
    bf16, int8 = results.get("gemm_gflops_bfloat16"), results.get("gemm_gops_int8")
    rates = (f"float32 {results['gemm_gflops']} GFLOP/s"
             + (f", bfloat16 {bf16} GFLOP/s" if bf16 else "")
             + (f", int8 {int8} GOP/s" if int8 else ""))
    net, net_prec = results.get("network_tflop") or {}, results.get("network_precision") or {}
    network = "".join(f"; {v:.3g} TFLOP of network products in {k} ({net_prec.get(k, '?')})"
                      for k, v in net.items())
    return (f"Distance products: {tf['k-means']:.3g} TFLOP in k-means ({prec['k-means']}), "
            f"{tf['encoding']:.3g} TFLOP in encoding ({prec['encoding']}){network}; GEMM "
            f"rates measured in this run: {rates}; efficiency (the products' time at the GEMM "
            f"rate of their precision / stage time): {pct}.")


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
    """The training loss per epoch (and validation accuracy, when recorded) of ``clf``, of
    each member of a seed ensemble (``make_coates_pipeline(ensemble=N)``), or of each
    classifier of a list (an ensemble configuration's members)."""
    import matplotlib.pyplot as plt

    members = [m for c in (clf if isinstance(clf, list) else [clf])
               for m in (getattr(c, "estimators_", None) or [c])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = None
    for i, member in enumerate(members):
        which = f" (member {i + 1})" if len(members) > 1 else ""
        loss = getattr(member, "loss_curve_", None)
        if loss:
            ax.plot(np.arange(1, len(loss) + 1), loss, label="training loss" + which)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
        val = getattr(member, "validation_scores_", None)
        if val:
            ax2 = ax2 or ax.twinx()
            ax2.plot(np.arange(1, len(val) + 1), val, linestyle="--",
                     label="validation accuracy" + which)
            ax2.set_ylabel("validation accuracy")
    if ax2 is not None:
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
