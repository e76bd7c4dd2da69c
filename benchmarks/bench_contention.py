"""Benchmark PatchEncoder on a busy machine: throughput with another CPU-bound job running.

Run (under the shared lock, so no other benchmark runs at the same time)::

    flock /tmp/featlearn-bench.lock python benchmarks/bench_contention.py
    python benchmarks/bench_contention.py --quick      # smoke run, small sizes

The script starts the competing job itself: a second process doing float32 ``torch.mm`` in a
loop with as many threads as the machine has cores (torch's default OpenMP settings, as any
other torch or numpy job would run). Each encoder row is timed on the quiet machine, with the
competitor running, and quiet again; the busy/quiet ratio is against the mean of the two quiet
runs. With the cores shared fairly between two jobs, 0.5 is what an encoder can expect.

Two designs are compared in the same process: featlearn's (chunks handed to worker threads of
one intra-op thread each, every worker with its own kernel) and the previous one (one kernel,
every op parallelised by torch over its OpenMP threads), which waits at a barrier per op for
whichever thread the competitor has descheduled.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from _common import (RESULTS, Competitor, add_common_args, gemm_rates, header, load_cifar10,
                     parse_args, write)

def previous_design(enc, X, compiled):
    """The encoder's chunks through one kernel whose every op torch parallelises itself."""
    import torch

    kernel = enc.encoding_plan().kernel("cpu", len(X), compiled=compiled)
    batch = kernel.batch
    with torch.inference_mode():
        for s in range(0, len(X), batch):
            kernel.encode(X[s:s + batch])


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]),
                         out=RESULTS / "contention.md")
    ap.add_argument("--n-images", type=int, default=600)
    ap.add_argument("--n-clusters", type=int, default=1600)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="the competitor's torch threads (default: one per core)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[2, 4, 6, 8],
                    help="images per chunk for the quiet chunk-size table (featlearn's design)")
    args = parse_args(ap, argv)
    if args.quick:
        args.n_images, args.n_clusters = 40, 128

    import torch

    from featlearn import MiniBatchKMeans, PatchEncoder

    gemm = gemm_rates()
    print(f"GEMM float32 {gemm['float32']:.1f} GFLOP/s; torch threads {torch.get_num_threads()}")
    train = load_cifar10(args).X_train
    X = np.ascontiguousarray(train[: args.n_images])
    enc = PatchEncoder(n_patches=50_000 if not args.quick else 5000,
                       kmeans=MiniBatchKMeans(args.n_clusters, max_iter=3, random_state=0),
                       device="cpu", random_state=0).fit(train[:10_000])

    configs = [("triangle", False), ("triangle", True), ("nearest_fraction", True)]
    designs = [("featlearn (worker threads)", lambda X: enc.transform(X)),
               ("previous (one kernel, OpenMP ops)", None)]
    rows = []
    for activation, compiled in configs:
        enc.set_params(activation=activation, compile=compiled)
        for name, run in designs:
            run = run or (lambda X, c=compiled: previous_design(enc, X, c))
            run(X[:20])  # warm-up (and, compiled, the compilation itself)
            quiet1 = timed(lambda: run(X))
            with Competitor(args.threads) as comp:
                busy = timed(lambda: run(X))
            quiet2 = timed(lambda: run(X))
            quiet = len(X) / ((quiet1 + quiet2) / 2)
            row = dict(activation=activation, compiled=compiled, design=name, quiet=quiet,
                       busy=len(X) / busy, ratio=quiet and (len(X) / busy) / quiet,
                       competitor=comp.rate)
            rows.append(row)
            print(f"{activation:17s} {'fused' if compiled else 'eager'} {name:34s} quiet "
                  f"{quiet:7.1f} img/s  busy {row['busy']:7.1f} img/s  ratio {row['ratio']:.2f}  "
                  f"(competitor {comp.rate:.1f} GFLOP/s)", flush=True)

    # The chunk size on the quiet machine: auto (the encoder's memory budget) against fixed sizes.
    sizes = []
    for activation, compiled in configs:
        enc.set_params(activation=activation, compile=compiled)
        auto = enc.encoding_plan().chunk_images("cpu", compiled)
        for batch in ["auto"] + list(args.batch_sizes):
            enc.set_params(batch_size=batch)
            enc.transform(X[:20])
            rate = len(X) / min(timed(lambda: enc.transform(X)) for _ in range(2))
            sizes.append((activation, compiled, f"auto ({auto})" if batch == "auto" else batch,
                          rate))
            print(f"{activation:17s} {'fused' if compiled else 'eager'} chunk {sizes[-1][2]}: "
                  f"{rate:7.1f} img/s", flush=True)
        enc.set_params(batch_size="auto")

    lines = header("PatchEncoder throughput beside a competing CPU-bound job", argv=argv,
                   gemm=gemm, quick=args.quick, script=__file__)
    lines += [f"{len(X)} CIFAR-10 training images, K={enc.n_clusters_}, 2x2 sum pooling; the "
              f"competitor is a {args.threads}-thread float32 torch.mm loop (1024^3) in another "
              "process. Throughput in images/s; quiet is the mean of a run before and a run "
              "after the busy one. Target: busy/quiet >= 0.40 for each featlearn row.", "",
              "| encoding | kernel | design | quiet img/s | busy img/s | busy/quiet | "
              "competitor GFLOP/s while busy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['activation']} | {'fused' if r['compiled'] else 'eager'} | "
                     f"{r['design']} | {r['quiet']:.1f} | {r['busy']:.1f} | {r['ratio']:.2f} | "
                     f"{r['competitor']:.1f} |")
    lines += ["", "Quiet machine, featlearn's design, by images per chunk (best of two runs; "
              "auto: the encoder's per-worker memory budget):", "",
              "| encoding | kernel | images per chunk | img/s |", "|---|---|---|---|"]
    for activation, compiled, batch, rate in sizes:
        lines.append(f"| {activation} | {'fused' if compiled else 'eager'} | {batch} | "
                     f"{rate:.1f} |")
    write(args.out, lines)
    return rows


if __name__ == "__main__":
    main()
