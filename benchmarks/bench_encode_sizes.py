"""Benchmark PatchEncoder at the sizes of small transforms: compile="auto" against eager.

An extraction chunk (at most 1,024 images), a streamed batch, an ``n_jobs`` task or a small
test set is one small ``transform``. This script times such transforms with the default
``compile="auto"`` and with ``compile=False`` (the eager path), in one process, alternated,
median of ``--repeats``; rates are effective GFLOP/s of the distance products against the GEMM
of the row's own precision, measured in the same run.

    flock /tmp/featlearn-bench.lock python benchmarks/bench_encode_sizes.py
    python benchmarks/bench_encode_sizes.py --quick      # smoke run, small sizes
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np

from _common import RESULTS, add_common_args, gemm_rates, header, load_cifar10, parse_args, write


def main(argv=None):
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]),
                         out=RESULTS / "encode-sizes.md")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 640],
                    help="images per transform")
    ap.add_argument("--n-clusters", type=int, default=1600)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse_args(ap, argv)
    if args.quick:
        args.sizes, args.n_clusters, args.repeats = [8], 64, 1

    from featlearn import MiniBatchKMeans, PatchEncoder

    gemm = gemm_rates()
    print(f"GEMM (torch.mm 4096^3): float32 {gemm['float32']:.1f}, "
          f"bfloat16 {gemm['bfloat16']:.1f} GFLOP/s")
    train = load_cifar10(args).X_train
    enc = PatchEncoder(n_patches=50_000 if not args.quick else 5000,
                       kmeans=MiniBatchKMeans(args.n_clusters, max_iter=3, random_state=0),
                       device="cpu", random_state=0).fit(train[:10_000])
    Ph, Pw = enc.map_shape_
    flops_per_image = 2.0 * Ph * Pw * enc.patch_size ** 2 * enc.image_shape_[2] * enc.n_clusters_

    lines = header("PatchEncoder: small transforms, compile=\"auto\" against eager",
                   argv=argv, gemm=gemm, quick=args.quick)
    lines += [f"CIFAR-10 training images, 6x6 patches, K={enc.n_clusters_}, one view; each "
              f"setting timed {args.repeats} time(s), alternated, median. % is of the GEMM of "
              f"the row's precision.", "",
              "| encoding | pooling | precision | images | eager img/s | \"auto\" img/s "
              "| auto / eager | \"auto\" % of GEMM |", "|---|---|---|---:|---:|---:|---:|---:|"]
    precisions = ["float32"] + (["bfloat16"] if gemm["bfloat16_native"] else [])
    # the paper's grid, and Thiry et al.'s overlapping windows
    poolings = {"2x2 grid, sum": dict(pooling=2, pool_size=None, pool_stride=None,
                                      pool_op="sum"),
                "5x5 windows at stride 3, mean": dict(pool_size=5, pool_stride=3,
                                                      pool_op="mean")}
    for (activation, precision), (pooling, pool_params) in itertools.product(
            itertools.product(("triangle", "nearest_fraction"), precisions), poolings.items()):
        enc.set_params(activation=activation, precision=precision, **pool_params)
        for n in args.sizes:
            X = np.ascontiguousarray(train[:n])
            enc.set_params(compile="auto").transform(X[:2])  # warm: threads, buffers
            times = {False: [], "auto": []}
            for _ in range(args.repeats):
                for mode in times:
                    enc.set_params(compile=mode)
                    t0 = time.perf_counter()
                    enc.transform(X)
                    times[mode].append(time.perf_counter() - t0)
            eager, auto = (n / statistics.median(times[m]) for m in (False, "auto"))
            share = auto * flops_per_image / 1e9 / gemm[precision]
            row = (f"| {activation} | {pooling} | {precision} | {n} | {eager:.0f} | "
                   f"{auto:.0f} | {auto / eager:.2f}x | {share:.0%} |")
            print(row, flush=True)
            lines.append(row)
    write(args.out, lines)


if __name__ == "__main__":
    main()
