"""Choose a configuration's classifier settings on a validation split of the TRAINING set.

Encodes the training (and test) images once through the same joblib cache as
``featlearn reproduce --cache`` (so the final run reuses the features), holds out a stratified
5,000-image validation split of the 50,000 training images, trains each candidate classifier on
the other 45,000 and prints/writes their validation accuracies. The test features are computed
for the cache but never read here: the test set plays no part in the choice.

    python benchmarks/tune_classifier.py featlearn-best-1600 --data ARCHIVE --cache CACHE \
        --candidates '[{"classifier__max_iter": 20}, {"classifier__hidden_layer_sizes": [1024]}]'
    python benchmarks/tune_classifier.py featlearn-best-1600 --quick --candidates '[{}]'
    python benchmarks/tune_classifier.py featlearn-nearest-1600 other.json --cache CACHE \
        --candidates '[{}]'

With ``--ensemble N`` each candidate is trained as the seed ensemble that
``make_coates_pipeline(ensemble=N)`` builds (N copies, seeds differing, probabilities averaged),
and the table gives each member's validation accuracy and the ensemble's of its first 1..N members.

With several configurations, each is encoded (through the cache) and its candidates trained in
turn, one configuration's features in memory at a time, and a last table averages each
candidate's validation probabilities over the first 1..M configurations: an ensemble whose
members differ in their features (dictionary seed, encoding, pooling), not only in their seeds.
A configuration with ``members`` counts as its members, in order, and ``--subsets`` adds every
subset's average (which members an ensemble needs; ``benchmarks/configs/`` holds such
exploration configurations).

``--quick`` is a short smoke run: 2,000 training and 500 test images, a 500-image validation
split, a 50-centroid dictionary on 20,000 patches instead of the config's and 3 classifier
iterations unless a candidate sets ``classifier__max_iter`` (``--cache`` optional); its
accuracies are not results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import add_common_args, gemm_rate, header, load_cifar10, parse_args, write, writes

#: What --quick changes in the configuration (a tiny dictionary, few classifier iterations; a
#: candidate's own overrides still win) and in the data.
QUICK_PARAMS = dict(n_centroids=50, encoder__n_patches=20_000, encoder__kmeans__max_iter=5,
                    classifier__max_iter=3)
QUICK_SIZES = dict(n_train=2000, n_test=500, n_val=500)


def main(argv=None):
    from sklearn.model_selection import train_test_split

    from featlearn.pipeline import load_config, member_configs

    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("config", nargs="+",
                    help="configuration names or paths; several: also their probabilities "
                         "averaged")
    ap.add_argument("--cache", default=None,
                    help="joblib cache folder for the encoded features (required unless --quick)")
    ap.add_argument("--candidates", required=True,
                    help="JSON list of classifier overrides (set_params names, classifier__...)")
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--ensemble", type=int, default=None,
                    help="train each candidate as a seed ensemble of this many copies")
    ap.add_argument("--subsets", action="store_true",
                    help="with several configurations: every subset's averaged validation "
                         "accuracy, best first")
    args = parse_args(ap, argv)
    if args.cache is None and not args.quick:
        ap.error("--cache is required (unless --quick)")

    # Every one checked before any encoding; an ensemble configuration stands for its members.
    loaded = [load_config(c) for c in args.config]
    configs = [m for c in loaded for m in member_configs(c) or [c]]
    candidates = json.loads(args.candidates)
    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        gemm = gemm_rate()
        print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)
    data = load_cifar10(args)
    X_train, y_train, X_test = data.X_train, data.y_train, data.X_test
    overrides = {}
    if args.quick:
        n_train, n_test, args.n_val = (QUICK_SIZES[k] for k in ("n_train", "n_test", "n_val"))
        X_train, y_train, X_test = X_train[:n_train], y_train[:n_train], X_test[:n_test]
        overrides = QUICK_PARAMS
    idx_fit, idx_val = train_test_split(np.arange(len(y_train)), test_size=args.n_val,
                                        stratify=y_train, random_state=0)
    y_val = y_train[idx_val]
    lines = []
    probas = []  # per config: per candidate, (classes, validation probabilities)
    for config in configs:
        rows = _tune(config, candidates, args, overrides, X_train, y_train, X_test,
                     idx_fit, idx_val)
        probas.append([(classes, proba) for _, _, _, _, classes, proba in rows])
        lines += ([""] if lines else []) + _config_lines(config, rows, args, len(idx_fit))
    if len(configs) > 1:
        names = " + ".join(f"`{c['name']}`" for c in configs)
        lines += ["", f"Across configurations ({names}): each candidate's classifier on each "
                      "configuration's features, validation probabilities averaged over the "
                      "first m configurations.", "",
                  "| candidate | m | configuration m | alone | first m averaged |",
                  "|---|---:|---|---:|---:|"]
        for i, cand in enumerate(candidates):
            total = 0.0
            for m, (config, per_cand) in enumerate(zip(configs, probas), 1):
                classes, proba = per_cand[i]
                total = total + proba
                alone = np.mean(classes[proba.argmax(1)] == y_val)
                avg = np.mean(classes[total.argmax(1)] == y_val)
                lines.append(f"| `{json.dumps(cand)}` | {m} | `{config['name']}` | {alone:.2%} "
                             f"| {avg:.2%} |")
        if args.subsets:
            lines += _subset_lines(configs, candidates, probas, y_val)
    print("\n".join(lines))
    title = " + ".join(c["name"] for c in configs)
    write(args.out, header(f"Classifier tuning: {title}", argv=argv, gemm=gemm,
                           quick=args.quick, script=__file__) + lines)


def _subset_lines(configs, candidates, probas, y_val):
    """Every subset of the configurations (two or more), each candidate's validation
    probabilities averaged over it, best first: which members an ensemble needs."""
    import itertools

    lines = ["", "Every subset of two or more configurations, probabilities averaged (best "
                 "first; the differences between subsets are mostly within the split's "
                 "standard error, so compare families of subsets, not single ones).", "",
             "| candidate | configurations | validation accuracy |", "|---|---|---:|"]
    for i, cand in enumerate(candidates):
        rows = []
        for r in range(2, len(configs) + 1):
            for subset in itertools.combinations(range(len(configs)), r):
                classes = probas[subset[0]][i][0]
                total = sum(probas[j][i][1] for j in subset)
                rows.append((float(np.mean(classes[total.argmax(1)] == y_val)),
                             " + ".join(f"`{configs[j]['name']}`" for j in subset)))
        lines += [f"| `{json.dumps(cand)}` | {names} | {acc:.2%} |"
                  for acc, names in sorted(rows, key=lambda row: -row[0])]
    return lines


def _tune(config, candidates, args, overrides, X_train, y_train, X_test, idx_fit, idx_val):
    """Encode ``config``'s features (through the cache) and train each candidate on the
    ``idx_fit`` rows: ``[(candidate, accuracy, fit s, member curve, classes, validation
    probabilities), ...]``. The features are dropped on return."""
    from sklearn.base import clone

    from featlearn.classifier import SeedEnsembleClassifier
    from featlearn.pipeline import build_pipeline
    from featlearn.reproduce import encode_cached

    pipe = build_pipeline(config, verbose=1, **overrides)
    encoder = pipe.named_steps["encoder"]
    y_val = y_train[idx_val]
    trials = []
    for cand in candidates:
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in cand.items()}
        clf = clone(pipe).set_params(**params).named_steps["classifier"]
        if args.ensemble:
            clf = SeedEnsembleClassifier(clf, n_estimators=args.ensemble, random_state=0)
        trials.append((cand, clf, _memo_path(args.cache, encoder, clf, y_train, idx_val)))
    F = None
    rows = []
    for cand, clf, memo in trials:
        if memo is not None and memo.exists():  # this classifier on these features, scored
            with np.load(memo) as saved:
                row = (cand, float(saved["val"]), float(saved["fit_s"]),
                       [tuple(c) for c in saved["curve"]], saved["classes"], saved["proba"])
            print(f"{config['name']} {json.dumps(cand)}: from {memo}", flush=True)
        else:
            if F is None:
                t0 = time.perf_counter()
                _, F, _, _, hit = encode_cached(encoder, X_train, X_test, args.cache, verbose=1)
                print(f"{config['name']}: features {F.shape} in {time.perf_counter() - t0:.0f} "
                      "s" + (" (cache)" if hit else ""), flush=True)
            t0 = time.perf_counter()
            clf.fit(F[idx_fit], y_train[idx_fit])
            fit_s = time.perf_counter() - t0
            classes = np.asarray(clf.classes_)
            curve, proba = _ensemble_curve(clf, F[idx_val], y_val)  # members predicted once
            if proba is None:
                proba = clf.predict_proba(F[idx_val])
            val = float(np.mean(classes[proba.argmax(1)] == y_val))
            row = (cand, val, fit_s, curve, classes, proba)
            if memo is not None:
                memo.parent.mkdir(parents=True, exist_ok=True)
                np.savez(memo, val=val, fit_s=fit_s, curve=np.asarray(curve, dtype=float).reshape(-1, 2),
                         classes=classes, proba=proba)
        rows.append(row)
        cand, val, fit_s = row[:3]
        print(f"{config['name']} {json.dumps(cand)}: validation accuracy {val:.4f} "
              f"({fit_s:.0f} s)", flush=True)
    return rows


def _memo_path(cache, encoder, clf, y_train, idx_val):
    """Where the cache folder keeps a candidate's validation scores (None without a cache):
    named by the encoder's cache key, the classifier's parameters and the split, so a later
    run that averages it with other configurations does not train it again."""
    if cache is None:
        return None
    import joblib

    from featlearn.reproduce import encoder_cache_key

    key = joblib.hash((encoder_cache_key(encoder), clf.get_params(deep=True), y_train, idx_val))
    return Path(cache) / "tuning" / f"{key}.npz"


def _config_lines(config, rows, args, n_fit):
    """The Markdown tables of one configuration's candidates (and seed-ensemble members)."""
    lines = [f"Config `{config['name']}`: classifier candidates trained on {n_fit:,} "
                 f"training images, scored on a stratified {args.n_val}-image validation split "
                 "of the training set (random_state=0). The test set is not used.", "",
             "| candidate (overrides) | validation accuracy | fit s |", "|---|---|---|"]
    lines += [f"| `{json.dumps(c)}` | {v:.2%} | {s:.0f} |" for c, v, s, *_ in rows]
    if args.ensemble:
        lines += ["", f"Seed ensembles of {args.ensemble} (`make_coates_pipeline(ensemble="
                      f"{args.ensemble})`): each member's validation accuracy, and the "
                      "ensemble's of its first m members (probabilities averaged).", "",
                  "| candidate | m | member m alone | first m members averaged |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{json.dumps(c)}` | {m} | {alone:.2%} | {avg:.2%} |"
                  for c, _, _, curve, *_ in rows for m, (alone, avg) in enumerate(curve, 1)]
    return lines


def _ensemble_curve(clf, F_val, y_val):
    """``([(accuracy of member m, accuracy of members 1..m averaged), ...], averaged
    probabilities)`` of a seed ensemble (a SeedEnsembleClassifier, whose members predict its
    ``classes_`` in order); ``([], None)`` otherwise."""
    members = getattr(clf, "estimators_", None)
    if not members:
        return [], None
    classes, total, curve = np.asarray(clf.classes_), 0.0, []
    for member in members:
        proba = member.predict_proba(F_val)
        total = total + proba
        curve.append((float(np.mean(classes[proba.argmax(1)] == y_val)),
                      float(np.mean(classes[total.argmax(1)] == y_val))))
    return curve, total / len(members)


if __name__ == "__main__":
    main()
