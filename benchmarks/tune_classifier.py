"""Choose a configuration's classifier settings on a validation split of the TRAINING set.

Encodes the training (and test) images once through the same joblib cache as
``featlearn reproduce --cache`` (so the final run reuses the features), holds out a stratified
5,000-image validation split of the 50,000 training images, trains each candidate classifier on
the other 45,000 and prints/writes their validation accuracies. The test features are computed
for the cache but never read here: the test set plays no part in the choice.

    python benchmarks/tune_classifier.py featlearn-best-1600 --data ARCHIVE --cache CACHE \
        --candidates '[{"classifier__max_iter": 20}, {"classifier__hidden_layer_sizes": [1024]}]'
    python benchmarks/tune_classifier.py featlearn-best-1600 --quick --candidates '[{}]'

With ``--ensemble N`` each candidate is trained as the seed ensemble that
``make_coates_pipeline(ensemble=N)`` builds (N copies, seeds differing, probabilities averaged),
and the table gives each member's validation accuracy and the ensemble's of its first 1..N members.

``--quick`` is a short smoke run: 2,000 training and 500 test images, a 500-image validation
split, a 50-centroid dictionary on 20,000 patches instead of the config's and 3 classifier
iterations unless a candidate sets ``classifier__max_iter`` (``--cache`` optional); its
accuracies are not results.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _common import add_common_args, gemm_rate, header, load_cifar10, parse_args, write, writes

#: What --quick changes in the configuration (a tiny dictionary, few classifier iterations; a
#: candidate's own overrides still win) and in the data.
QUICK_PARAMS = dict(n_centroids=50, encoder__n_patches=20_000, encoder__kmeans__max_iter=5,
                    classifier__max_iter=3)
QUICK_SIZES = dict(n_train=2000, n_test=500, n_val=500)


def main(argv=None):
    from sklearn.base import clone
    from sklearn.model_selection import train_test_split

    from featlearn.classifier import SeedEnsembleClassifier
    from featlearn.pipeline import build_pipeline, load_config
    from featlearn.reproduce import encode_cached

    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("config")
    ap.add_argument("--cache", default=None,
                    help="joblib cache folder for the encoded features (required unless --quick)")
    ap.add_argument("--candidates", required=True,
                    help="JSON list of classifier overrides (set_params names, classifier__...)")
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--ensemble", type=int, default=None,
                    help="train each candidate as a seed ensemble of this many copies")
    args = parse_args(ap, argv)
    if args.cache is None and not args.quick:
        ap.error("--cache is required (unless --quick)")

    config = load_config(args.config)
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
    pipe = build_pipeline(config, verbose=1, **overrides)
    t0 = time.perf_counter()
    _, F, _, _, hit = encode_cached(pipe.named_steps["encoder"], X_train, X_test,
                                    args.cache, verbose=1)
    print(f"features {F.shape} in {time.perf_counter() - t0:.0f} s" + (" (cache)" if hit else ""))
    idx_fit, idx_val = train_test_split(np.arange(len(F)), test_size=args.n_val,
                                        stratify=y_train, random_state=0)
    rows = []
    for cand in json.loads(args.candidates):
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in cand.items()}
        trial = clone(pipe).set_params(**params)
        clf = trial.named_steps["classifier"]
        if args.ensemble:
            clf = SeedEnsembleClassifier(clf, n_estimators=args.ensemble, random_state=0)
        t0 = time.perf_counter()
        clf.fit(F[idx_fit], y_train[idx_fit])
        fit_s = time.perf_counter() - t0
        y_val = y_train[idx_val]
        curve = _ensemble_curve(clf, F[idx_val], y_val)  # an ensemble's members, predicted once
        val = curve[-1][1] if curve else float(np.mean(clf.predict(F[idx_val]) == y_val))
        rows.append((cand, val, fit_s, curve))
        print(f"{json.dumps(cand)}: validation accuracy {val:.4f} ({fit_s:.0f} s)", flush=True)

    lines = [f"Config `{config['name']}`: classifier candidates trained on {len(idx_fit):,} "
             f"training images, scored on a stratified {args.n_val}-image validation split of the "
             "training set (random_state=0). The test set is not used.", "",
             "| candidate (overrides) | validation accuracy | fit s |", "|---|---|---|"]
    lines += [f"| `{json.dumps(c)}` | {v:.2%} | {s:.0f} |" for c, v, s, _ in rows]
    if args.ensemble:
        lines += ["", f"Seed ensembles of {args.ensemble} (`make_coates_pipeline(ensemble="
                      f"{args.ensemble})`): each member's validation accuracy, and the "
                      "ensemble's of its first m members (probabilities averaged).", "",
                  "| candidate | m | member m alone | first m members averaged |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{json.dumps(c)}` | {m} | {alone:.2%} | {avg:.2%} |"
                  for c, _, _, curve in rows for m, (alone, avg) in enumerate(curve, 1)]
    print("\n".join(lines))
    write(args.out, header(f"Classifier tuning: {config['name']}", argv=argv, gemm=gemm,
                           quick=args.quick, script=__file__) + lines)


def _ensemble_curve(clf, F_val, y_val):
    """``[(accuracy of member m, accuracy of members 1..m averaged), ...]`` of a seed ensemble
    (a SeedEnsembleClassifier, whose members predict its ``classes_`` in order); [] otherwise."""
    members = getattr(clf, "estimators_", None)
    if not members:
        return []
    classes, total, curve = np.asarray(clf.classes_), 0.0, []
    for member in members:
        proba = member.predict_proba(F_val)
        total = total + proba
        curve.append((float(np.mean(classes[proba.argmax(1)] == y_val)),
                      float(np.mean(classes[total.argmax(1)] == y_val))))
    return curve


if __name__ == "__main__":
    main()
