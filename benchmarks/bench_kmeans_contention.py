"""Benchmark MiniBatchKMeans on a busy machine: featlearn's and scikit-learn's throughput with
another CPU-bound job running.

Run (under the shared lock, so no other benchmark runs at the same time)::

    flock /tmp/featlearn-bench.lock python benchmarks/bench_kmeans_contention.py
    python benchmarks/bench_kmeans_contention.py --quick      # smoke run, small sizes

The paper's cell of ``bench_kmeans.py --same-batch`` (whitened CIFAR-10 patches, k=1600,
batch_size=1024, ``init="random"``, ``max_no_improvement=10``, no final labelling pass), with
featlearn at ``--precision`` ("auto" by default, as the pipeline configurations run their
k-means: int8 on a CPU with VNNI). Each contender fits on the quiet machine,
beside the competitor of ``bench_contention.py`` (a float32 ``torch.mm`` loop with one thread
per core, in another process), and quiet again; busy/quiet is its throughput beside the
competitor over the mean of its two quiet fits. Both libraries run on as many threads as torch
(scikit-learn's OpenMP and BLAS limited to them).
"""

from __future__ import annotations

import argparse
import os

import torch

from _common import RESULTS, Competitor, add_common_args, gemm_lines, gemm_rates, header, write
from _common import parse_args as _parse
from bench_kmeans import timed_fit, whitened_patches


def main(argv=None):
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]),
                         out=RESULTS / "kmeans-contention.md")
    ap.add_argument("--n-patches", type=int, default=400_000)
    ap.add_argument("--n-clusters", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                    help="featlearn's precision (default: auto)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="the competitor's torch threads (default: one per core)")
    args = _parse(ap, argv)
    if args.quick:
        args.n_patches, args.n_clusters, args.batch_size = 5000, 20, 256

    from sklearn.cluster import MiniBatchKMeans as SkMBK

    from featlearn import MiniBatchKMeans

    gemm = gemm_rates(int8=True)
    print("\n".join(gemm_lines(gemm)), flush=True)
    X, _ = whitened_patches(args, args.n_patches)
    k, b, threads = args.n_clusters, args.batch_size, torch.get_num_threads()
    common = dict(batch_size=b, init="random", n_init=1, max_no_improvement=10,
                  compute_labels=False, random_state=args.seed)
    contenders = [("featlearn MiniBatchKMeans",
                   lambda: MiniBatchKMeans(k, tol=0, precision=args.precision, **common)),
                  ("scikit-learn MiniBatchKMeans", lambda: SkMBK(k, **common))]
    rows = []
    for name, make in contenders:
        make().fit(X[:2 * b])  # warm-up (the native kernels' first load)
        est = make()
        quiet1 = timed_fit(est, X, threads)[0]
        with Competitor(args.threads) as comp:
            busy = timed_fit(make(), X, threads)[0]
        quiet2 = timed_fit(make(), X, threads)[0]
        ratio = (quiet1 + quiet2) / 2 / busy
        precision = getattr(est, "precision_", "float32")
        rows.append((name, precision, est.n_steps_, quiet1, quiet2, busy, ratio, comp.rate))
        print(f"{name} ({precision}): quiet {quiet1:.2f} s and {quiet2:.2f} s, busy {busy:.2f} s, "
              f"busy/quiet {ratio:.2f} (competitor {comp.rate:.1f} GFLOP/s)", flush=True)

    lines = header("MiniBatchKMeans throughput beside a competing CPU-bound job", argv=argv,
                   gemm=gemm, quick=args.quick, script=__file__)
    lines += [f"{X.shape[0]:,} whitened CIFAR-10 patches of {X.shape[1]} dims, k={k}, "
              f"batch_size={b}, seed {args.seed}, no final labelling pass; {threads} thread(s) "
              f"for each library. The competitor is a {args.threads}-thread float32 torch.mm loop "
              "(1024^3) in another process. busy/quiet: throughput beside the competitor over the "
              "mean of a fit before and a fit after (the same steps every time: one seed).", "",
              "| contender | precision | steps | quiet s (before, after) | busy s | busy/quiet | "
              "competitor GFLOP/s while busy |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, precision, steps, q1, q2, busy, ratio, rate in rows:
        lines.append(f"| {name} | {precision} | {steps} | {q1:.2f}, {q2:.2f} | {busy:.2f} | "
                     f"{ratio:.2f} | {rate:.1f} |")
    write(args.out, lines)
    return rows


if __name__ == "__main__":
    main()
