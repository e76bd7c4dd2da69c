"""Benchmark featlearn.KMeans and featlearn.MiniBatchKMeans against scikit-learn on whitened
CIFAR-10 patches.

One run, all contenders on the same data: random 6x6x3 patches of the CIFAR-10 training images
(RandomPatchExtractor(random_state=0)), contrast-normalized and ZCA-whitened, and a grid of
cells: the first 100,000 and all 400,000 of them, each at k=400 and k=1600. Each row reports the
fit wall time and the inertia of the fitted centres on *all* points of its cell, evaluated the
same way for every contender (float64 distances, outside the timed region), and how many
centres hold at most 2 of those points (centres stranded on outlier patches).

Per cell: featlearn KMeans against scikit-learn KMeans at the same iteration count (both with
``tol=0``, so neither stops early unless its labels stop changing); featlearn MiniBatchKMeans
against scikit-learn MiniBatchKMeans with its defaults (which compute labels_ over all points
at the end) and with ``compute_labels=False`` (as featlearn's row); and the dictionary option,
mini-batch epochs followed by a few Lloyd iterations (``lloyd_iter``). In the cell of the
paper's dictionary (400,000 patches, k=1600) the featlearn KMeans of ``--baseline`` (a git
revision, loaded from git into this process) is timed too: the Lloyd that the paper
configurations ran before this benchmark's changes.

    python benchmarks/bench_kmeans.py                 # the full grid (about ten minutes)
    python benchmarks/bench_kmeans.py --quick         # seconds: 5,000 patches, 20 centres
    python benchmarks/bench_kmeans.py --threads 1 --same-batch 1024 2048 --seeds 0 1 2

``--same-batch`` times only featlearn's and scikit-learn's MiniBatchKMeans, at each of the
given batch sizes on the same data (scikit-learn with its defaults otherwise, both with
``compute_labels=False``), one row pair per seed, and writes its table as a new section on
top of ``--out``.

Run the full one under the shared lock so benchmarks do not run concurrently:
``flock /tmp/featlearn-bench.lock python benchmarks/bench_kmeans.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import (REPO, RESULTS, add_common_args, gemm_lines, gemm_rate, gemm_rates, header,
                     load_cifar10, write, writes)
from _common import parse_args as _parse

#: The last commit whose k-means the paper configurations ran before this benchmark's changes.
BASELINE = "24b0e72d3a3d448152a683a7df2f44764b5a9ed4"
KEYS = ["fl-kmeans-base", "fl-kmeans", "sk-kmeans", "fl-mbk", "sk-mbk", "sk-mbk-nolabels",
        "fl-mbk-lloyd"]   # the last one a row per --dict-lloyd-iter value


def parse_args(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "kmeans.md")
    p.add_argument("--n-patches", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--n-clusters", type=int, nargs="+", default=[400, 1600])
    p.add_argument("--max-iter", type=int, default=50,
                   help="Lloyd iterations, featlearn and scikit-learn KMeans alike")
    p.add_argument("--batch-size", type=int, default=2048,
                   help="featlearn MiniBatchKMeans batch size")
    p.add_argument("--mb-max-iter", type=int, default=50,
                   help="featlearn MiniBatchKMeans epochs at most (the EWA rule stops it)")
    p.add_argument("--mb-max-no-improvement", type=int, default=5,
                   help="featlearn MiniBatchKMeans max_no_improvement (the EWA rule)")
    p.add_argument("--mb-init", default="random",
                   help="featlearn MiniBatchKMeans init (both mini-batch rows)")
    p.add_argument("--dict-batch-size", type=int, default=4096,
                   help="batch size of the dictionary option (mini-batch epochs + Lloyd)")
    p.add_argument("--dict-max-iter", type=int, default=1,
                   help="mini-batch epochs of the dictionary option")
    p.add_argument("--dict-lloyd-iter", type=int, nargs="+", default=[15, 20],
                   help="Lloyd iterations of the dictionary option (a row each)")
    p.add_argument("--baseline", default=BASELINE,
                   help="git revision whose featlearn KMeans is timed in the paper's cell "
                        "('' skips it)")
    p.add_argument("--skip", nargs="*", default=[], choices=KEYS, help="contenders to leave out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, and scikit-learn's OpenMP/BLAS threads (default: "
                        "torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="the time the ratios use: wall clock, or the process's CPU time (the "
                        "default with --threads 1: on a shared machine a single-threaded "
                        "process's CPU time does not depend on the other processes' load)")
    p.add_argument("--repeat", type=int, default=1,
                   help="fit every contender of a cell this many times, round robin, and keep "
                        "the fastest")
    p.add_argument("--device", default="cpu", help="device for the featlearn rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-batch", type=int, nargs="+", default=None, metavar="B",
                   help="only featlearn vs scikit-learn MiniBatchKMeans, both at each batch size "
                        "B (a new section on top of --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --same-batch: a row pair per seed (default: --seed)")
    p.add_argument("--sk-init", default="k-means++",
                   help="with --same-batch: scikit-learn's init (its default k-means++)")
    p.add_argument("--precision", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16", "int8", "auto"],
                   help="featlearn's precision: with --same-batch a row pair per value, else a "
                        "featlearn KMeans (Lloyd) row per value (bfloat16 or int8 products "
                        "settled in float32; the table then gives every GEMM rate)")
    args = _parse(p, argv)
    if args.clock is None:
        args.clock = "cpu" if args.threads == 1 else "wall"
    if args.quick:  # seconds: at most 5,000 patches, 20 centres, few iterations
        args.n_patches = [min(n, 5000) for n in args.n_patches][-1:]
        args.n_clusters = [min(k, 20) for k in args.n_clusters][-1:]
        args.max_iter, args.mb_max_iter, args.dict_max_iter, args.dict_lloyd_iter = 5, 2, 1, [2]
        args.batch_size = args.dict_batch_size = 512
        if args.same_batch:
            args.same_batch = [min(b, 512) for b in args.same_batch][:1]
    if args.seeds is None:
        args.seeds = [args.seed]
    return args


def whitened_patches(args, n):
    """``n`` whitened patches, with the seconds the patch stage took (after loading the data)."""
    from featlearn import PatchNormalizer, RandomPatchExtractor, ZCAWhitening

    data = load_cifar10(args)
    t0 = time.perf_counter()
    patches = RandomPatchExtractor(n_patches=n, random_state=0).transform(data.X_train)
    X = ZCAWhitening().fit_transform(PatchNormalizer().transform(patches))
    return np.ascontiguousarray(X, dtype=np.float32), time.perf_counter() - t0


def inertia_and_tiny(X64: torch.Tensor, centers):
    """Sum of squared distances to the nearest centre (float64, for every contender alike), and
    the number of centres nearest to at most 2 points."""
    from featlearn._kmeans_solvers import nearest_centroid

    C = torch.as_tensor(np.asarray(centers), dtype=torch.float64)
    labels, mind = nearest_centroid(X64, C)
    counts = torch.bincount(labels, minlength=C.shape[0])
    return float(mind.sum()), int((counts <= 2).sum())


def load_baseline_kmeans(rev):
    """featlearn's ``KMeans`` class as it was at git revision ``rev``, loaded under private
    module names (so this process times both versions on the same data)."""
    def show(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout

    tag = rev[:12]
    tmp = Path(tempfile.mkdtemp(prefix="featlearn-baseline-"))
    solvers = f"_featlearn_{tag}_kmeans_solvers"
    try:
        (tmp / f"{solvers}.py").write_text(show("featlearn/_kmeans_solvers.py"))
    except subprocess.CalledProcessError:
        solvers = None  # before the split: the solvers lived in kmeans.py
    src = show("featlearn/kmeans.py")
    if solvers is not None:
        src = src.replace("featlearn._kmeans_solvers", solvers)
    (tmp / f"_featlearn_{tag}_kmeans.py").write_text(src)
    modules = [solvers] if solvers else []
    for name in modules + [f"_featlearn_{tag}_kmeans"]:
        spec = importlib.util.spec_from_file_location(name, tmp / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"_featlearn_{tag}_kmeans"].KMeans


def same_batch_contenders(args, n, k):
    """featlearn and scikit-learn MiniBatchKMeans at each ``--same-batch`` size and seed."""
    from sklearn.cluster import MiniBatchKMeans as SkMBK

    from featlearn import MiniBatchKMeans

    mni = args.mb_max_no_improvement
    rows = []
    for b in args.same_batch:
        for seed in args.seeds:
            for prec in args.precision:
                rows.append((f"fl-mbk-b{b}-s{seed}-{prec}",
                             f"featlearn MiniBatchKMeans (batch_size={b}, init={args.mb_init!r}, "
                             f"max_no_improvement={mni}, tol=0, precision={prec!r}, seed {seed})",
                             lambda b=b, seed=seed, prec=prec: MiniBatchKMeans(
                                 k, batch_size=b, init=args.mb_init, n_init=1,
                                 max_iter=args.mb_max_iter, max_no_improvement=mni, tol=0,
                                 compute_labels=False, precision=prec,
                                 device=args.device, random_state=seed)))
            rows.append((f"sk-mbk-b{b}-s{seed}", f"sklearn MiniBatchKMeans (batch_size={b}, "
                         f"init={args.sk_init!r}, seed {seed})",
                         lambda b=b, seed=seed: SkMBK(k, batch_size=b, init=args.sk_init,
                                                      n_init=1, compute_labels=False,
                                                      random_state=seed)))
    return rows


def contenders(args, n, k):
    if args.same_batch:
        return same_batch_contenders(args, n, k)
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.cluster import MiniBatchKMeans as SkMBK

    from featlearn import KMeans, MiniBatchKMeans

    seed, dev, b, db = args.seed, args.device, args.batch_size, args.dict_batch_size
    mb = dict(init=args.mb_init, n_init=1, tol=0, compute_labels=False, device=dev,
              random_state=seed)
    mni = args.mb_max_no_improvement
    rows = []
    if args.baseline and (n, k) == (max(args.n_patches), max(args.n_clusters)):
        rows.append(("fl-kmeans-base", f"featlearn KMeans at {args.baseline[:7]} "
                     f"(Lloyd, max_iter={args.max_iter}, tol=0)",
                     lambda: load_baseline_kmeans(args.baseline)(
                         k, max_iter=args.max_iter, tol=0, device=dev, random_state=seed)))
    for prec in args.precision:  # "fl-kmeans:<precision>" beyond float32 (--skip fl-kmeans)
        rows.append(("fl-kmeans" + ("" if prec == "float32" else f":{prec}"),
                     f"featlearn KMeans (Lloyd, max_iter={args.max_iter}, tol=0"
                     + ("" if prec == "float32" else f", precision={prec!r}") + ")",
                     lambda prec=prec: KMeans(k, max_iter=args.max_iter, tol=0, device=dev,
                                              precision=prec, random_state=seed)))
    rows += [
        ("sk-kmeans", f"sklearn KMeans (Lloyd, max_iter={args.max_iter}, tol=0, n_init=1)",
         lambda: SkKMeans(k, n_init=1, max_iter=args.max_iter, tol=0, random_state=seed)),
        ("fl-mbk", f"featlearn MiniBatchKMeans (batch_size={b}, init={args.mb_init!r}, "
                   f"max_iter={args.mb_max_iter}, max_no_improvement={mni}, tol=0, "
                   "compute_labels=False)",
         lambda: MiniBatchKMeans(k, batch_size=b, max_iter=args.mb_max_iter,
                                 max_no_improvement=mni, **mb)),
        ("sk-mbk", "sklearn MiniBatchKMeans (defaults: batch_size=1024, compute_labels=True)",
         lambda: SkMBK(k, random_state=seed)),
        ("sk-mbk-nolabels", "sklearn MiniBatchKMeans (defaults, compute_labels=False)",
         lambda: SkMBK(k, compute_labels=False, random_state=seed)),
    ]
    for lloyd in args.dict_lloyd_iter:
        rows.append((f"fl-mbk-lloyd{lloyd}",
                     f"featlearn MiniBatchKMeans (batch_size={db}, init={args.mb_init!r}, "
                     f"max_iter={args.dict_max_iter}, lloyd_iter={lloyd}, tol=0, "
                     "compute_labels=False)",
                     lambda lloyd=lloyd: MiniBatchKMeans(k, batch_size=db,
                                                         max_iter=args.dict_max_iter,
                                                         lloyd_iter=lloyd, **mb)))
    return [r for r in rows if r[0].split(":")[0].rstrip("0123456789") not in args.skip]


def timed_fit(est, X, threads):
    """Fit; return (wall seconds, process CPU seconds, 1-minute load average at the start)."""
    from threadpoolctl import threadpool_limits

    load = os.getloadavg()[0]
    limits = threadpool_limits(threads) if threads else contextlib.nullcontext()
    with limits:
        t, c = time.perf_counter(), time.process_time()
        est.fit(X)
        return time.perf_counter() - t, time.process_time() - c, load


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        if set(args.precision) == {"float32"}:
            gemm = gemm_rate()
            print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)
        else:  # reduced-precision rows: every yardstick
            gemm = gemm_rates(int8=True)
            print("\n".join(gemm_lines(gemm)), flush=True)
    load_start = os.getloadavg()[0]
    X_all, prep_s = whitened_patches(args, max(args.n_patches))
    print(f"{X_all.shape[0]} whitened patches of {X_all.shape[1]} dims in {prep_s:.1f} s "
          f"(extraction, normalization, ZCA); torch threads {torch.get_num_threads()}; "
          f"ratios on {args.clock} time", flush=True)
    rows = []
    for n in sorted(args.n_patches):
        X = X_all[:n]
        X64 = torch.from_numpy(X).double()
        for k in sorted(args.n_clusters):
            cell = {}
            for _ in range(args.repeat):  # round robin: a change of load hits every contender
                for key, label, make in contenders(args, n, k):
                    est = make()
                    wall, cpu, load = timed_fit(est, X, args.threads)
                    best = cell.get(key)
                    t = wall if args.clock == "wall" else cpu
                    if best is None or t < best["time"]:
                        cell[key] = dict(n=n, k=k, key=key, label=label, wall=wall, cpu=cpu,
                                         load=load, time=t, est=est)
                    print(f"n={n} k={k} {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, load "
                          f"{load:.1f}", flush=True)
            for row in cell.values():
                est = row.pop("est")
                row["inertia"], row["tiny"] = inertia_and_tiny(X64, est.cluster_centers_)
                row["n_iter"] = getattr(est, "n_iter_", "")
                row["n_steps"] = getattr(est, "n_steps_", "")
                rows.append(row)
                print(f"n={n} k={k} {row['label']}: inertia {row['inertia']:.6g}, "
                      f"{row['tiny']} tiny centres, n_iter_ {row['n_iter']}, n_steps_ "
                      f"{row['n_steps']}", flush=True)
    loads = (load_start, os.getloadavg()[0])
    if args.same_batch:
        table, summary = format_same_batch(rows, args.clock)
    else:
        table = format_table(rows)
        summary = format_summary(rows, prep_s, max(args.n_patches), max(args.n_clusters))
    print(table, summary, sep="\n\n")
    print(f"1-minute load average: {loads[0]:.2f} at start, {loads[1]:.2f} at end")
    if writes(args.out):
        lines = markdown(argv, gemm, table, summary, args, X_all.shape, prep_s, loads)
        if args.same_batch and Path(args.out).exists():  # a section on top of the last tables
            lines += ["", Path(args.out).read_text().rstrip()]
        write(args.out, lines)
    return rows


def format_same_batch(rows, clock):
    """The ``--same-batch`` table (a row per cell, batch size and seed) and its summary."""
    head = ("| patches | k | batch_size | seed | featlearn precision | featlearn (s) | sklearn (s) "
            "| sklearn / featlearn | featlearn inertia | sklearn inertia "
            "| inertia featlearn / sklearn | featlearn n_steps_ | sklearn n_steps_ | load |")
    lines, out = [head, "|" + "---|" * 14], []
    for (n, k), cell in _by_cell(rows).items():
        per_batch = {}
        for key, f in cell.items():
            if not key.startswith("fl-mbk-b"):
                continue
            b, rest = key[len("fl-mbk-b"):].split("-s", 1)
            seed, prec = rest.split("-", 1)
            s = cell[f"sk-mbk-b{b}-s{seed}"]
            speed, inert = s["time"] / f["time"], f["inertia"] / s["inertia"]
            per_batch.setdefault((int(b), prec), []).append((speed, inert))
            lines.append(f"| {n:,} | {k} | {b} | {seed} | {prec} | {f['time']:.2f} | "
                         f"{s['time']:.2f} | {speed:.2f}x | {f['inertia']:.6g} | "
                         f"{s['inertia']:.6g} | {inert:.4f} | {f['n_steps']} | {s['n_steps']} | "
                         f"{f['load']:.1f} |")
        for (b, prec), pairs in per_batch.items():
            speeds, inerts = sorted(p[0] for p in pairs), [p[1] for p in pairs]
            out.append(f"- n={n:,}, k={k}, batch_size={b}, featlearn {prec}: sklearn / featlearn "
                       f"{clock} time "
                       f"{speeds[len(speeds) // 2]:.2f}x median over {len(pairs)} seed(s) "
                       f"(range {speeds[0]:.2f}-{speeds[-1]:.2f}x; target 5x), inertia featlearn / "
                       f"sklearn {min(inerts):.4f}-{max(inerts):.4f} (target within 1%).")
    return "\n".join(lines), "\n".join(out)


def _by_cell(rows):
    cells = {}
    for r in rows:
        cells.setdefault((r["n"], r["k"]), {})[r["key"]] = r
    return cells


def format_table(rows):
    head = ("| patches | k | method | wall (s) | CPU (s) | load | inertia (all points) "
            "| inertia / sklearn MBK | inertia / sklearn KMeans | sklearn MBK time / this "
            "| sklearn KMeans time / this | centres with <= 2 points | n_iter_ | n_steps_ |")
    lines = [head, "|" + "---|" * 14]
    for (n, k), cell in _by_cell(rows).items():
        mbk, km = cell.get("sk-mbk"), cell.get("sk-kmeans")
        for r in cell.values():
            inert = [f"{r['inertia'] / ref['inertia']:.4f}" if ref else "-" for ref in (mbk, km)]
            speed = [f"{ref['time'] / r['time']:.2f}x" if ref else "-" for ref in (mbk, km)]
            lines.append(f"| {n:,} | {k} | {r['label']} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                         f"{r['load']:.1f} | {r['inertia']:.6g} | {inert[0]} | {inert[1]} | "
                         f"{speed[0]} | {speed[1]} | {r['tiny']} | {r['n_iter']} | "
                         f"{r['n_steps']} |")
    return "\n".join(lines)


def format_summary(rows, prep_s, n_paper, k_paper):
    """The targets, one line each, computed from the rows."""
    out = []
    for (n, k), c in _by_cell(rows).items():
        if {"fl-mbk", "sk-mbk"} <= c.keys():
            f, s = c["fl-mbk"], c["sk-mbk"]
            nl = c.get("sk-mbk-nolabels")
            out.append(f"- n={n:,}, k={k}: featlearn mini-batch {s['time'] / f['time']:.2f}x "
                       f"sklearn MiniBatchKMeans (target 5x)"
                       + (f", {nl['time'] / f['time']:.2f}x its compute_labels=False run"
                          if nl else "")
                       + f", at {f['inertia'] / s['inertia']:.4f} of its inertia (target <= 1).")
        if {"fl-kmeans", "sk-kmeans"} <= c.keys():
            f, s = c["fl-kmeans"], c["sk-kmeans"]
            out.append(f"- n={n:,}, k={k}: featlearn Lloyd {s['time'] / f['time']:.2f}x sklearn "
                       f"KMeans at {f['n_iter']} vs {s['n_iter']} iterations, "
                       f"{f['inertia'] / s['inertia']:.4f} of its inertia.")
    paper = _by_cell(rows).get((n_paper, k_paper), {})
    base = paper.get("fl-kmeans-base") or paper.get("fl-kmeans")
    if base is not None:
        for key, r in paper.items():
            if not key.startswith(("fl-kmeans", "fl-mbk-lloyd")) or r is base:
                continue
            out.append(
                f"- Dictionary stage at n={n_paper:,}, k={k_paper}: {r['label']} "
                f"{base['time'] / r['time']:.2f}x the k-means of `{base['label']}` "
                f"({r['time']:.1f} s vs {base['time']:.1f} s; with the {prep_s:.1f} s patch stage "
                f"{(base['time'] + prep_s) / (r['time'] + prep_s):.2f}x), at "
                f"{r['inertia'] / base['inertia']:.4f} of its inertia (target: 3x at the same "
                "accuracy).")
    return "\n".join(out)


def markdown(argv, gemm, table, summary, args, shape, prep_s, loads):
    import sklearn

    threads = (f"{args.threads} thread(s) for torch and scikit-learn's OpenMP and BLAS"
               if args.threads else f"torch's {torch.get_num_threads()} threads")
    text = (f"Whitened {shape[1]}-dim CIFAR-10 patches (the first n of {shape[0]:,}; extraction, "
            f"normalization and ZCA took {prep_s:.1f} s), seed(s) "
            f"{', '.join(map(str, args.seeds if args.same_batch else [args.seed]))}; featlearn on "
            f"`{args.device}`; scikit-learn {sklearn.__version__}; {threads}. Each fit's wall "
            f"time, process CPU time and the 1-minute load average when it started; the ratios "
            f"use {args.clock} time"
            + (f", the fastest of {args.repeat} round-robin fits" if args.repeat > 1 else "")
            + ". Inertia of the "
            f"fitted centres on all points of the cell, computed identically (float64) for every "
            f"row. "
            + ("" if args.same_batch else f"Lloyd rows run max_iter={args.max_iter} with tol=0 "
               "(the paper ran 50 Lloyd iterations). ")
            + "Run under the shared benchmark lock "
            f"(`flock /tmp/featlearn-bench.lock ...`); 1-minute load average {loads[0]:.2f} at "
            f"start and {loads[1]:.2f} at end (the machine is shared; a load above the core "
            f"count means the timings were disturbed).")
    title = ("k-means benchmark: MiniBatchKMeans at equal batch sizes" if args.same_batch
             else "k-means benchmark")
    return header(title, argv=argv, gemm=gemm, quick=args.quick,
                  script=__file__) + [text, "", table, "", "Against the targets:", "", summary]


if __name__ == "__main__":
    main()
