"""Benchmark featlearn.KMeans and featlearn.MiniBatchKMeans against scikit-learn on whitened
CIFAR-10 patches.

One run, all contenders on the same data: 400,000 random 6x6x3 patches of the CIFAR-10 training
images (RandomPatchExtractor(random_state=0)), contrast-normalized and ZCA-whitened, k=1600.
Each row reports the fit wall time and the final inertia of the fitted centres on *all* points,
evaluated the same way for every contender (float64 distances, outside the timed region).

    python benchmarks/bench_kmeans.py                 # the full benchmark (several minutes)
    python benchmarks/bench_kmeans.py --smoke         # seconds: 5,000 patches, 20 centres

Run the full one under the shared lock so benchmarks do not run concurrently:
``flock /tmp/featlearn-bench.lock python benchmarks/bench_kmeans.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHARED_ARCHIVE = "/work/shared/datasets/cifar10-jpeg75/cifar-10-python.tar.gz"
SHARED_MD5 = "bd43d2a3421d9a4f9a66309ec8f698ed"
RESULTS = Path(__file__).resolve().parent / "results" / "kmeans.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-home", default=os.environ.get("FEATLEARN_DATA"),
                   help="cache folder for the parsed arrays (default $FEATLEARN_DATA or "
                        "~/featlearn_data)")
    p.add_argument("--archive", default=SHARED_ARCHIVE, help="local cifar-10-python.tar.gz")
    p.add_argument("--md5", default=SHARED_MD5, help="expected md5 of the archive ('' skips)")
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
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run: 5,000 patches, 20 centres, few iterations")
    p.add_argument("--out", default=str(RESULTS), help="Markdown result file ('' to skip)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_patches, args.n_clusters = min(args.n_patches, 5000), min(args.n_clusters, 20)
        args.max_iter, args.mb_max_iter, args.sk_kmeans_max_iter = 5, 2, 5
        args.batch_size, args.sk_batch_size = 512, 512
    return args


def whitened_patches(args):
    from featlearn import PatchNormalizer, RandomPatchExtractor, ZCAWhitening, fetch_cifar10

    data = fetch_cifar10(args.data_home, archive=args.archive, md5=args.md5 or None)
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
    script = sys.argv[0] if argv is None else "benchmarks/bench_kmeans.py"
    command = "python " + " ".join(shlex.quote(a) for a in [script] + (
        sys.argv[1:] if argv is None else list(argv)))
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
    if args.out:
        write_markdown(Path(args.out), command, table, args, X.shape, loads)
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


def write_markdown(path, command, table, args, shape, loads):
    import sklearn

    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    text = (f"# k-means benchmark\n\n```\n{command}\n```\n\n"
            f"{shape[0]:,} whitened {shape[1]}-dim CIFAR-10 patches, k={args.n_clusters}, "
            f"seed {args.seed}; featlearn on `{args.device}`; {os.cpu_count()} CPU cores "
            f"({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"scikit-learn {sklearn.__version__}. Fit wall time; inertia of the fitted centres "
            f"on all points, computed identically (float64) for every row. sklearn KMeans is "
            f"capped at max_iter={args.sk_kmeans_max_iter} (its default is 300; the paper ran 50 "
            f"Lloyd iterations). Run under the shared benchmark lock "
            f"(`flock /tmp/featlearn-bench.lock ...`); 1-minute load average {loads[0]:.2f} at "
            f"start and {loads[1]:.2f} at end (the machine is shared; a load above the core "
            f"count means the timings were disturbed).\n\n{table}\n")
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
