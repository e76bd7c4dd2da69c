"""Benchmark featlearn.KMeans and featlearn.MiniBatchKMeans against scikit-learn on whitened
CIFAR-10 patches.

One run, all contenders on the same data: 400,000 random 6x6x3 patches of the CIFAR-10 training
images (RandomPatchExtractor(random_state=0)), contrast-normalized and ZCA-whitened, k=1600.
Each row reports the fit wall time and the final inertia of the fitted centres on *all* points,
evaluated the same way for every contender (float64 distances, outside the timed region).

    python benchmarks/bench_kmeans.py                 # the full benchmark (several minutes)
    python benchmarks/bench_kmeans.py --quick         # seconds: 5,000 patches, 20 centres

Run the full one under the shared lock so benchmarks do not run concurrently:
``flock /tmp/featlearn-bench.lock python benchmarks/bench_kmeans.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from _common import RESULTS, add_common_args, gemm_rate, header, load_cifar10, write, writes
from _common import parse_args as _parse


def parse_args(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "kmeans.md")
    p.add_argument("--n-patches", type=int, default=400_000)
    p.add_argument("--n-clusters", type=int, default=1600)
    p.add_argument("--max-iter", type=int, default=50, help="featlearn KMeans (Lloyd) iterations")
    p.add_argument("--batch-size", type=int, default=8192,
                   help="featlearn MiniBatchKMeans batch size")
    p.add_argument("--mb-max-iter", type=int, default=1, help="featlearn MiniBatchKMeans epochs")
    p.add_argument("--sk-batch-size", type=int, default=4096,
                   help="the tuned batch size for sklearn MiniBatchKMeans")
    p.add_argument("--sk-kmeans-max-iter", type=int, default=50,
                   help="cap on sklearn KMeans iterations (its default is 300)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["fl-kmeans", "fl-mbk", "sk-mbk", "sk-mbk-tuned", "sk-kmeans"],
                   help="contenders to leave out")
    p.add_argument("--device", default="cpu", help="device for the featlearn rows")
    p.add_argument("--seed", type=int, default=0)
    args = _parse(p, argv)
    if args.quick:  # seconds: at most 5,000 patches, 20 centres, few iterations
        args.n_patches, args.n_clusters = min(args.n_patches, 5000), min(args.n_clusters, 20)
        args.max_iter, args.mb_max_iter, args.sk_kmeans_max_iter = 5, 2, 5
        args.batch_size, args.sk_batch_size = 512, 512
    return args


def whitened_patches(args):
    from featlearn import PatchNormalizer, RandomPatchExtractor, ZCAWhitening

    data = load_cifar10(args)
    patches = RandomPatchExtractor(n_patches=args.n_patches, random_state=0).transform(data.X_train)
    return ZCAWhitening().fit_transform(PatchNormalizer().transform(patches))


def inertia(X64: torch.Tensor, centers) -> float:
    """Sum of squared distances to the nearest centre, in float64, for every contender alike."""
    from featlearn.kmeans import nearest_centroid

    C = torch.as_tensor(np.asarray(centers), dtype=torch.float64)
    return float(nearest_centroid(X64, C)[1].sum())


def contenders(args):
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.cluster import MiniBatchKMeans as SkMBK

    from featlearn import KMeans, MiniBatchKMeans

    k, seed = args.n_clusters, args.seed
    return [
        ("fl-kmeans", f"featlearn KMeans (full-batch Lloyd, max_iter={args.max_iter})",
         KMeans(k, max_iter=args.max_iter, device=args.device, random_state=seed)),
        ("fl-mbk", f"featlearn MiniBatchKMeans (batch_size={args.batch_size}, "
                   f"max_iter={args.mb_max_iter})",
         MiniBatchKMeans(k, batch_size=args.batch_size, max_iter=args.mb_max_iter,
                         device=args.device, random_state=seed)),
        ("sk-mbk", "sklearn MiniBatchKMeans (defaults: batch_size=1024)",
         SkMBK(k, random_state=seed)),
        ("sk-mbk-tuned", f"sklearn MiniBatchKMeans (batch_size={args.sk_batch_size})",
         SkMBK(k, batch_size=args.sk_batch_size, random_state=seed)),
        ("sk-kmeans", f"sklearn KMeans (n_init=1, max_iter={args.sk_kmeans_max_iter})",
         SkKMeans(k, n_init=1, max_iter=args.sk_kmeans_max_iter, random_state=seed)),
    ]


def main(argv=None):
    args = parse_args(argv)
    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        gemm = gemm_rate()
        print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    X = whitened_patches(args)
    print(f"{X.shape[0]} whitened patches of {X.shape[1]} dims in "
          f"{time.perf_counter() - t0:.1f} s; k={args.n_clusters}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    X64 = torch.from_numpy(X).double()
    rows = []
    for key, label, est in contenders(args):
        if key in args.skip:
            continue
        t = time.perf_counter()
        est.fit(X)
        wall = time.perf_counter() - t
        iters = getattr(est, "n_iter_", "")
        steps = getattr(est, "n_steps_", "")
        rows.append((key, label, wall, inertia(X64, est.cluster_centers_), iters, steps))
        print(f"{label}: {wall:.1f} s, inertia {rows[-1][3]:.6g}, n_iter_ {iters}, "
              f"n_steps_ {steps}", flush=True)
    table = format_table(rows)
    print(table)
    loads = (load_start, os.getloadavg()[0])
    print(f"1-minute load average: {loads[0]:.2f} at start, {loads[1]:.2f} at end")
    if writes(args.out):
        write(args.out, markdown(argv, gemm, table, args, X.shape, loads))
    return rows


def format_table(rows):
    by = {r[0]: r for r in rows}
    ref = by.get("sk-mbk")
    km = by.get("sk-kmeans")
    head = ("| method | fit time (s) | inertia (all points) | speed-up vs sklearn MBK | "
            "inertia / sklearn MBK | inertia / sklearn KMeans | n_iter_ | n_steps_ |")
    lines = [head, "|" + "---|" * 8]
    for key, label, wall, inert, iters, steps in rows:
        speed = f"{ref[2] / wall:.2f}x" if ref else "-"
        r_mbk = f"{inert / ref[3]:.4f}" if ref else "-"
        r_km = f"{inert / km[3]:.4f}" if km else "-"
        lines.append(f"| {label} | {wall:.1f} | {inert:.6g} | {speed} | {r_mbk} | {r_km} | "
                     f"{iters} | {steps} |")
    return "\n".join(lines)


def markdown(argv, gemm, table, args, shape, loads):
    import sklearn

    text = (f"{shape[0]:,} whitened {shape[1]}-dim CIFAR-10 patches, k={args.n_clusters}, "
            f"seed {args.seed}; featlearn on `{args.device}`; "
            f"scikit-learn {sklearn.__version__}. Fit wall time; inertia of the fitted centres "
            f"on all points, computed identically (float64) for every row. sklearn KMeans is "
            f"capped at max_iter={args.sk_kmeans_max_iter} (its default is 300; the paper ran 50 "
            f"Lloyd iterations). Run under the shared benchmark lock "
            f"(`flock /tmp/featlearn-bench.lock ...`); 1-minute load average {loads[0]:.2f} at "
            f"start and {loads[1]:.2f} at end (the machine is shared; a load above the core "
            f"count means the timings were disturbed).")
    return header("k-means benchmark", argv=argv, gemm=gemm, quick=args.quick,
                  script=__file__) + [text, "", table]


if __name__ == "__main__":
    main()
