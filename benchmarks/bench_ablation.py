"""Ablation: which knob of the patch pipeline buys how much validation accuracy, at what cost.

Every row changes one thing of the paper's pipeline (k-means 1600 from 400,000 patches, ZCA
eps=0.1, triangle, 2x2 sum pooling, L2-SVM) or names the rows it combines, and is scored on
one validation split of the TRAINING set (``--n-train`` images to fit on, ``--n-val`` others
to score on; the test set is never read). Rows that share a dictionary share its fit, and rows
that share an encoding share the features; a row's time counts everything it needs (dictionary,
encoding of its training and validation images, classifier) as if computed for it alone.

    flock /tmp/featlearn-bench.lock python benchmarks/bench_ablation.py
    python benchmarks/bench_ablation.py --quick      # a smoke run; its numbers are not results
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

from _common import RESULTS, add_common_args, gemm_rate, header, load_cifar10, parse_args, write

PAPER = dict(n_centroids=1600, classifier="svm", encoder__n_patches=400_000,
             encoder__kmeans__max_iter=50, classifier__max_iter=1000)
RANDOM_1600 = {"class": "RandomPatchDictionary", "params": {"n_clusters": 1600,
                                                             "random_state": 0}}
THIRY_WHITENING = {"class": "ZCAWhitening", "params": {"eps": 1e-3, "eps_scale": "mean"}}
MAP_9x9 = dict(encoder__pool_size=5, encoder__pool_stride=3, encoder__pool_op="mean")
CONV_HEAD = {"class": "TorchConvClassifier", "params": {
    "width": 128, "kernel_size": 6, "max_iter": 15, "batch_size": 128,
    "learning_rate_init": 0.01, "alpha": 1e-4, "random_state": 0}}
MLP = dict(classifier="mlp", classifier__max_iter=20, classifier__dropout=0.5)

#: (row, what it changes against the baseline, overrides of PAPER). Grouped by knob.
ROWS = [
    ("baseline", "the paper's pipeline", {}),
    ("whitening eps=0.01", "ZCA regularized 10x less (absolute eps)",
     dict(encoder__whitener={"class": "ZCAWhitening", "params": {"eps": 0.01}})),
    ("whitening eps=1e-3 x mean eigenvalue", "Thiry et al.'s relative regularization",
     dict(encoder__whitener=THIRY_WHITENING)),
    ("encoding soft threshold 0.25", "soft threshold (alpha=0.25) on the k-means dictionary",
     dict(encoder__activation="soft_threshold", encoder__alpha=0.25)),
    ("encoding nearest 40%", "Thiry et al.'s binary nearest-fraction code, k-means dictionary",
     dict(encoder__activation="nearest_fraction", encoder__selection="sampled")),
    ("dictionary random patches", "1600 random whitened patches instead of k-means",
     dict(encoder__kmeans=RANDOM_1600)),
    ("random patches + nearest 40%", "Thiry et al.'s dictionary and code, 2x2 sum pooling",
     dict(encoder__kmeans=RANDOM_1600, encoder__activation="nearest_fraction",
          encoder__selection="sampled")),
    ("dictionary k-means 4000", "2.5x the centroids", dict(n_centroids=4000)),
    ("pooling 4x4 grid", "16 cells instead of 4 (25,600 features)",
     dict(encoder__pooling=[4, 4])),
    ("pooling 9x9 map + conv head", "5x5 mean windows at stride 3, BN + 1x1 conv to 128 + 6x6 "
     "conv, 15 epochs of SGD",
     dict(MAP_9x9, encoder__layout="map", classifier=CONV_HEAD)),
    ("flip views", "train on image and mirror, average both at test", dict(augment="flip")),
    ("power normalization", "signed square root of the pooled features", dict(power=0.5)),
    ("classifier MLP 512", "featlearn-best's two-layer network (20 epochs, dropout 0.5)", MLP),
    ("MLP + flip + power", "the three cheapest gains together", dict(MLP, augment="flip",
                                                                     power=0.5)),
]

QUICK = dict(n_centroids=32, encoder__n_patches=5_000, encoder__kmeans__max_iter=3,
             classifier__max_iter=5)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "ablation.md")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=5_000)
    p.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    args = parse_args(p, argv)

    from sklearn.base import clone

    from featlearn.pipeline import build_pipeline

    gemm = None if args.quick else gemm_rate()
    if args.quick:
        args.n_train, args.n_val = 300, 100
    d = load_cifar10(args)
    perm = np.random.default_rng(0).permutation(len(d.y_train))
    tr, va = perm[:args.n_train], perm[args.n_train:args.n_train + args.n_val]
    Xtr, ytr, Xva, yva = d.X_train[tr], d.y_train[tr], d.X_train[va], d.y_train[va]

    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    lines = header("Ablation on a validation split of the training set", argv=argv,
                   gemm=gemm, quick=args.quick, script=__file__)
    lines += [f"Fit on {args.n_train:,} training images, scored on {args.n_val:,} other "
              "training images (a seeded random split; the test set is not read). Baseline: "
              "the paper's pipeline (`coates2011-1600-svm`: 400,000 patches, ZCA eps=0.1, "
              "k-means 1600 by 50 Lloyd iterations, triangle, 2x2 sum pooling, L2-SVM C=100 by "
              "L-BFGS). One run per row; the split's standard error is about "
              f"{100 * np.sqrt(0.25 / args.n_val):.1f} points at 75%.", "",
              "| # | row | what changes | val % | gain | seconds | x baseline time |",
              "|---:|---|---|---:|---:|---:|---:|"]
    dictionaries, features = {}, {}
    base_acc = base_time = None
    for i, (name, what, overrides) in enumerate(rows):
        params = dict(PAPER, **(QUICK if args.quick else {}))
        params.update(overrides)
        if "encoder__kmeans" in overrides:  # a dictionary of its own: no Lloyd iterations
            params.pop("encoder__kmeans__max_iter")
        if isinstance(overrides.get("classifier"), dict):  # its own epochs, not the SVM's
            params.pop("classifier__max_iter", None)
        pipe = build_pipeline({"name": "ablation", "params": params})
        steps = pipe.steps
        encoder, clf = steps[0][1], steps[-1][1]
        middle = [s for _, s in steps[1:-1]]
        fit_key = json.dumps({k: v for k, v in params.items() if _fits_dictionary(k)},
                             sort_keys=True, default=str)
        enc_key = json.dumps({k: v for k, v in params.items() if k.startswith("encoder__")
                              or k in ("augment", "n_centroids", "power")},
                             sort_keys=True, default=str)
        t_dict = 0.0
        if fit_key not in dictionaries:
            t0 = time.perf_counter()
            dictionaries[fit_key] = (clone(encoder).fit(Xtr), time.perf_counter() - t0)
        fitted, t_dict = dictionaries[fit_key]
        if enc_key not in features:
            # The encoding parameters do not enter the fitted state: a copy of the fitted
            # encoder with this row's encoding parameters needs no refit.
            enc = copy.copy(fitted).set_params(**{
                k: v for k, v in encoder.get_params(deep=False).items()
                if not _fits_dictionary_param(k)})
            t0 = time.perf_counter()
            Ftr, Fva = enc.transform(Xtr), enc.transform(Xva)
            for m in middle:
                Ftr, Fva = m.fit_transform(Ftr), m.transform(Fva)
            if params.get("encoder__layout") == "map":  # maps kept as float16, as on disk
                Ftr, Fva = Ftr.astype(np.float16), Fva.astype(np.float16)
            features.clear()  # one encoding held at a time
            features[enc_key] = (Ftr, Fva, time.perf_counter() - t0)
        Ftr, Fva, t_enc = features[enc_key]
        t0 = time.perf_counter()
        acc = float(np.mean(clf.fit(Ftr, ytr).predict(Fva) == yva))
        t_clf = time.perf_counter() - t0
        total = t_dict + t_enc + t_clf
        if base_acc is None:
            base_acc, base_time = acc, total
        lines.append(f"| {i} | {name} | {what} | {100 * acc:.2f} | {100 * (acc - base_acc):+.2f} "
                     f"| {total:.0f} | {total / base_time:.2f} |")
        print(lines[-1], f"(dictionary {t_dict:.0f} s, encoding {t_enc:.0f} s, classifier "
              f"{t_clf:.0f} s)", flush=True)
        write(args.out, lines)  # every row as it lands: a long run keeps what it measured


def _fits_dictionary(key):
    """Whether a pipeline parameter changes the fitted dictionary (patches, whitening, k-means)."""
    return key == "n_centroids" or (key.startswith("encoder__")
                                    and _fits_dictionary_param(key[len("encoder__"):]))


def _fits_dictionary_param(name):
    return name.split("__")[0] in ("n_patches", "patch_size", "normalizer", "whitener", "kmeans",
                                   "random_state", "channels")


if __name__ == "__main__":
    main()
