"""Which k-means dictionary makes good CIFAR-10 features? Downstream accuracy per k-means variant.

Inertia alone does not tell: a dictionary can have lower inertia and still waste centres on
single outlier patches (whitened patches are heavy-tailed), where their triangle activations are
always zero. Each variant here fits the paper's encoder (400,000 patches, ZCA, 1600 centroids)
with a different k-means, encodes the first ``--n-train`` training images and the whole test
set, and trains the paper's L2-SVM (C=100, L-BFGS, ``--max-epochs`` iterations). Reported: test
and train accuracy, and how many centres hold at most 2 of 100,000 held-out patches.

    flock /tmp/featlearn-bench.lock python benchmarks/bench_dictionary.py   # ~20 minutes
    ... bench_dictionary.py --only 1 2 3                                    # some variants
    python benchmarks/bench_dictionary.py --quick                           # seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import (RESULTS, add_common_args, gemm_rate, header, load_cifar10, parse_args,
                     write, writes)


def variants(k, seed):
    from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans

    from featlearn import KMeans, MiniBatchKMeans

    fast = dict(batch_size=4096, init="random", n_init=1, max_iter=1, tol=0,
                compute_labels=False, random_state=seed)
    return {
        "featlearn KMeans, k-means++, reassignment_ratio=0 (farthest-point relocation)":
            KMeans(k, reassignment_ratio=0, random_state=seed),
        "featlearn KMeans, k-means++, reassignment_ratio=0.01 (default: 50 Lloyd iterations)":
            KMeans(k, random_state=seed),
        "featlearn MiniBatchKMeans(batch_size=4096, init='random', max_iter=1, lloyd_iter=20)":
            MiniBatchKMeans(k, lloyd_iter=20, **fast),
        "featlearn MiniBatchKMeans(batch_size=4096, init='random', max_iter=1, lloyd_iter=30)":
            MiniBatchKMeans(k, lloyd_iter=30, **fast),
        "featlearn MiniBatchKMeans(batch_size=2048, init='random', max_no_improvement=5), "
        "mini-batch only":
            MiniBatchKMeans(k, batch_size=2048, init="random", n_init=1, max_no_improvement=5,
                            tol=0,
                            compute_labels=False, random_state=seed),
        "scikit-learn MiniBatchKMeans(batch_size=4096)":
            SkMiniBatchKMeans(k, batch_size=4096, n_init=1, random_state=seed),
    }


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "kmeans-dictionary.md")
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-clusters", type=int, default=1600)
    p.add_argument("--max-epochs", type=int, default=300, help="L-BFGS iterations of the SVM")
    p.add_argument("--only", nargs="*", type=int, help="indices of the variants to run")
    p.add_argument("--seed", type=int, default=0)
    args = parse_args(p, argv)

    from featlearn import PatchEncoder, RandomPatchExtractor, TorchMLPClassifier

    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        gemm = gemm_rate()
        print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)
    d = load_cifar10(args)
    n_test = len(d.X_test)
    n_patches = 400_000
    if args.quick:  # 2,000 / 1,000 images, 50 centroids
        args.n_train, n_test, args.n_clusters, args.max_epochs = 2000, 1000, 50, 50
        n_patches = 20_000
    Xtr, ytr = d.X_train[:args.n_train], d.y_train[:args.n_train]
    Xte, yte = d.X_test[:n_test], d.y_test[:n_test]
    held_out = RandomPatchExtractor(6, min(100_000, n_patches), random_state=args.seed + 1)
    held_out = held_out.fit_transform(d.X_train)

    rows = []
    for i, (name, km) in enumerate(variants(args.n_clusters, args.seed).items()):
        if args.only and i not in args.only:
            continue
        t0 = time.perf_counter()
        # The dictionary is learned on patches of all training images, as in the pipeline.
        enc = PatchEncoder(n_patches=n_patches, kmeans=km, random_state=args.seed).fit(d.X_train)
        t_dict = time.perf_counter() - t0
        labels = enc.kmeans_.predict(enc.whitener_.transform(enc.normalizer_.transform(held_out)))
        tiny = int((np.bincount(labels, minlength=args.n_clusters) <= 2).sum())
        Ftr, Fte = enc.transform(Xtr), enc.transform(Xte)
        svm = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=100,
                                 solver="lbfgs", max_iter=args.max_epochs,
                                 random_state=args.seed).fit(Ftr, ytr)
        row = (name, float(np.mean(svm.predict(Fte) == yte)),
               float(np.mean(svm.predict(Ftr) == ytr)), tiny, t_dict)
        rows.append(row)
        print(f"{name}: test {row[1]:.2%}, train {row[2]:.2%}, centres with <= 2 held-out "
              f"patches {tiny}, dictionary {t_dict:.0f} s", flush=True)

    if writes(args.out) and rows:
        lines = header("k-means dictionaries: downstream accuracy", argv=argv, gemm=gemm,
                       quick=args.quick, script=__file__) + [
            f"Dictionary: {n_patches:,} patches of all 50,000 training images, contrast "
            f"normalization, ZCA, {args.n_clusters} centroids. Features: triangle encoding, "
            f"2x2 sum pooling. Classifier: L2-SVM C=100, L-BFGS {args.max_epochs} iterations, "
            f"trained on the first {len(Xtr):,} training images, tested on {len(Xte):,} test "
            "images (JPEG-75 copy).", "",
            "| k-means | test acc | train acc | centres holding <= 2 of 100k held-out patches "
            "| dictionary s |",
            "|---|---|---|---|---|",
        ] + [f"| {n} | {te:.2%} | {tr:.2%} | {tiny} | {t:.0f} |" for n, te, tr, tiny, t in rows]
        write(args.out, lines)


if __name__ == "__main__":
    main()
