"""Benchmark PatchEncoder: GEMM peak, featlearn encoding, a straightforward numpy version, peak RSS.

Run (under the shared lock, so other jobs on the machine do not disturb the timings)::

    flock /tmp/featlearn-bench.lock python benchmarks/bench_encode.py
    python benchmarks/bench_encode.py --quick      # smoke run, small sizes

Encoding is measured twice, eagerly (``compile=False``: one pass per activation/pooling op)
and through the fused kernel (``compile=True``), whose compilation is timed separately in fresh
processes: once with an empty inductor cache (a new machine) and once with that cache warm (any
later process).

All rates are *effective* GFLOP/s of the distance products, ``2 * n * positions * d * K``,
whatever each implementation actually computes, so they compare directly with
the machine's fp32 GEMM rate. The centroids come from a MiniBatchKMeans run of a few iterations
(fitting is not what is measured). The RSS part encodes 100,000 synthetic images in a fresh
subprocess and reports its peak resident memory relative to the output array.

``--quick`` is a smoke run (small sizes, a minute or so); its numbers are not the results
and are written only to an ``--out`` given explicitly.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from _common import (RESULTS, add_common_args, gemm_rate, gemm_rates, header, load_cifar10, machine,
                     parse_args, write)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def product_flops(n_images, enc):
    Ph, Pw = enc.map_shape_
    d = enc.patch_size ** 2 * enc.image_shape_[2]
    return 2.0 * n_images * Ph * Pw * d * enc.n_clusters_


def numpy_encode(enc, X, batch=50):
    """The straightforward version: every patch of a batch, then normalize, whiten, distances."""
    p = enc.patch_size
    norm, white = enc.normalizer_, enc.whitener_
    C = np.asarray(enc.kmeans_.cluster_centers_, dtype=np.float32)
    c2 = (C * C).sum(1)
    Ph, Pw = enc.map_shape_
    r, c = (Ph + 1) // 2, (Pw + 1) // 2  # round-half-up split of the map
    out = np.empty((X.shape[0], 4 * C.shape[0]), dtype=np.float32)
    for s in range(0, X.shape[0], batch):
        xb = X[s:s + batch].astype(np.float32)
        win = sliding_window_view(xb, (p, p), axis=(1, 2))  # (b, Ph, Pw, C, p, p)
        P = np.moveaxis(win, 3, -1).reshape(-1, p * p * xb.shape[3])
        P = P - P.mean(1, keepdims=True)
        P /= np.sqrt((P * P).sum(1, keepdims=True) / (P.shape[1] - norm.ddof) + norm.eps)
        Y = (P - white.mean_) @ white.whitening_
        D = (Y * Y).sum(1)[:, None] - 2 * Y @ C.T + c2
        z = np.sqrt(np.maximum(D, 0))
        f = np.maximum(0, z.mean(1, keepdims=True) - z).reshape(xb.shape[0], Ph, Pw, -1)
        out[s:s + batch] = np.concatenate(
            [f[:, :r, :c].sum((1, 2)), f[:, :r, c:].sum((1, 2)),
             f[:, r:, :c].sum((1, 2)), f[:, r:, c:].sum((1, 2))], axis=1)
    return out


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def compile_child(model_path, cache_dir):
    """Run in a fresh process: time the first compiled transform (compile + 8 images)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    with open(model_path, "rb") as fh:
        enc = pickle.load(fh)
    H, W, C = enc.image_shape_
    X = np.random.default_rng(0).integers(0, 256, (8, H, W, C), dtype=np.uint8)
    enc.set_params(compile=False).transform(X)  # torch start-up is not compilation
    t0 = time.perf_counter()
    enc.set_params(compile=True).transform(X)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc.transform(X)
    print(f"COMPILE {first - (time.perf_counter() - t0):.2f}")


def measure_compile(enc):
    """Compilation seconds with an empty inductor cache, then with it warm."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "enc.pkl")
        with open(path, "wb") as fh:
            pickle.dump(enc, fh)
        times = []
        for _ in range(2):
            res = subprocess.run([sys.executable, __file__, "--compile-child", path,
                                  os.path.join(tmp, "inductor")],
                                 check=True, capture_output=True, text=True)
            times.append(float([ln for ln in res.stdout.splitlines()
                                if ln.startswith("COMPILE ")][-1].split()[1]))
    return times


def rss_child(model_path, n_images):
    """Run in a fresh process: encode ``n_images`` synthetic images, print RSS numbers."""
    with open(model_path, "rb") as fh:
        enc = pickle.load(fh)
    H, W, C = enc.image_shape_
    X = np.random.default_rng(0).integers(0, 256, (n_images, H, W, C), dtype=np.uint8)
    enc.transform(X[:8])  # warm up: torch threads, allocator, code paths
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    Z = enc.transform(X)
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(f"RSS {n_images} {base} {peak} {Z.nbytes // 1024} {dt:.2f}")


def measure_rss(enc, n_images):
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as fh:
        pickle.dump(enc, fh)
        path = fh.name
    try:
        res = subprocess.run([sys.executable, __file__, "--rss-child", path, str(n_images)],
                             check=True, capture_output=True, text=True)
    finally:
        os.unlink(path)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS ")][-1]
    _, n, base, peak, out_kb, dt = line.split()
    return dict(n=int(n), base_mb=int(base) / 1024, peak_mb=int(peak) / 1024,
                out_mb=int(out_kb) / 1024, seconds=float(dt))


def main(argv=None):
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]),
                         out=RESULTS / "encode.md")
    ap.add_argument("--n-images", type=int, default=5000)
    ap.add_argument("--nearest-images", type=int, default=1000,
                    help="images for the nearest-40%% rows (its eager path is slow)")
    ap.add_argument("--n-clusters", type=int, default=1600)
    ap.add_argument("--numpy-images", type=int, default=500,
                    help="images for the numpy version (its rate is per image, so fewer suffice)")
    ap.add_argument("--rss-images", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", nargs=2, help=argparse.SUPPRESS)
    args = parse_args(ap, argv)
    if args.rss_child:
        return rss_child(args.rss_child[0], int(args.rss_child[1]))
    if args.compile_child:
        return compile_child(*args.compile_child)
    if args.quick:
        args.n_images, args.n_clusters, args.numpy_images, args.nearest_images = 200, 256, 50, 50
        args.rss_images = [500, 2000]
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    from featlearn import MiniBatchKMeans, PatchEncoder

    print(machine())
    gemm = gemm_rates()
    peak = gemm["float32"]
    print(f"GEMM (torch.mm 4096^3): float32 {peak:.1f}, bfloat16 {gemm['bfloat16']:.1f} GFLOP/s")

    data = load_cifar10(args)
    train = data.X_train
    X = np.ascontiguousarray(train[: args.n_images])
    t0 = time.perf_counter()
    enc = PatchEncoder(n_patches=50_000 if not args.quick else 5000,
                       kmeans=MiniBatchKMeans(args.n_clusters, max_iter=3, random_state=0),
                       batch_size=batch, device="cpu", random_state=0).fit(train[:10_000])
    print(f"fit (not measured): {time.perf_counter() - t0:.1f} s, K={enc.n_clusters_}")

    cold, warm = measure_compile(enc)
    print(f"compilation: {cold:.1f} s with an empty inductor cache, {warm:.1f} s warm")

    # Each encoding in each native precision, eager and fused; rates against the GEMM of the
    # row's own precision measured just before and just after the row (the machines' speed
    # drifts by tens of percent within minutes), best ratio of two runs.
    def adjacent_gemm(precision):
        n = 4096 if precision == "float32" else gemm["bfloat16_n"]
        return gemm_rate(n, 3 if n == 4096 else 1, dtype=precision)

    rows, adjacent = {}, {}
    precisions = ["float32"] + (["bfloat16"] if gemm["bfloat16_native"] else [])
    encodings = [("triangle", X), ("nearest_fraction", X[: args.nearest_images])]
    for activation, Xa in encodings:
        for precision in precisions:
            for mode in (False, True):
                enc.set_params(activation=activation, compile=mode, precision=precision)
                enc.transform(Xa[:20])  # warm-up (and, compiled, the compilation itself)
                runs = []
                for _ in range(2):
                    before = adjacent_gemm(precision)
                    seconds = _timed(lambda: enc.transform(Xa))
                    g = (before + adjacent_gemm(precision)) / 2
                    rate = product_flops(len(Xa), enc) / seconds / 1e9
                    runs.append((rate / g, seconds, rate, g))
                _, seconds, rate, g = max(runs)
                rows[activation, precision, mode] = (len(Xa), seconds, rate)
                adjacent[activation, precision, mode] = g
                print(f"featlearn {activation} precision={precision} compile={mode}: {len(Xa)} "
                      f"images in {seconds:.2f} s = {rate:.1f} GFLOP/s = "
                      f"{100 * rate / g:.0f}% of the {precision} GEMM beside it ({g:.1f})")
    enc.set_params(activation="triangle")
    all_rows = rows
    rows = {(p, m): (sec, rate) for (a, p, m), (_, sec, rate) in all_rows.items()
            if a == "triangle"}
    t_fl, rate_fl = rows["float32", True]
    enc.set_params(compile="auto", precision="float32")

    Xn = X[: args.numpy_images]
    numpy_encode(enc, Xn[:10])
    t_np = _timed(lambda: numpy_encode(enc, Xn))
    rate_np = product_flops(len(Xn), enc) / t_np / 1e9
    print(f"numpy: {len(Xn)} images in {t_np:.2f} s = {rate_np:.1f} GFLOP/s")
    ref = numpy_encode(enc, X[:20])
    got = enc.set_params(compile=True).transform(X[:20])
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"max |featlearn - numpy| / max|numpy| on 20 images: {err:.1e}")

    enc.set_params(compile="auto")
    rss = [measure_rss(enc, n) for n in args.rss_images]
    for r in rss:
        print(f"RSS {r['n']} images: base {r['base_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
              f"output {r['out_mb']:.0f} MB, peak - base - output "
              f"{r['peak_mb'] - r['base_mb'] - r['out_mb']:.0f} MB ({r['seconds']:.1f} s)")

    native = "native" if gemm["bfloat16_native"] else "emulated: not native here"
    lines = header("PatchEncoder benchmark", argv=argv, gemm=gemm, quick=args.quick,
                   script=__file__) + [
        f"numpy {np.__version__}; CIFAR-10 32x32x3 images, 6x6 patches, stride 1 (27x27 "
        f"positions), d=108, K={enc.n_clusters_}, 2x2 sum pooling; the triangle, and the "
        "nearest-40% code (both signs, threshold sampled from 256 entries per row). Rates are "
        "effective GFLOP/s of the distance products 2*n*729*108*K; each row's % is of the GEMM "
        "of its own precision, measured just before and just after that row (mean of the two; "
        "the best of two runs), since the machine's speed drifts within minutes (bfloat16 rows "
        "only where bfloat16 is native).",
        "",
        "| what | images | seconds | GFLOP/s | GEMM beside it, GFLOP/s | % of GEMM (same precision) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| fp32 GEMM, torch.mm 4096^3 (start of the run) | | | {peak:.1f} | | 100% |",
        f"| bf16 GEMM, torch.mm {gemm['bfloat16_n']}^3 ({native}) | | | {gemm['bfloat16']:.1f} | | 100% |",
        *[f"| featlearn PatchEncoder {act}, {'fused' if mode else 'eager'} (CPU, batch_size="
          f"{batch}, compile={mode}, precision={prec}) | {n} | {sec:.2f} | {rate:.1f} | "
          f"{adjacent[act, prec, mode]:.1f} | {100 * rate / adjacent[act, prec, mode]:.0f}% |"
          for (act, prec, mode), (n, sec, rate) in all_rows.items()],
        f"| numpy (sliding_window_view + matmul, 50-image batches) | {len(Xn)} | {t_np:.2f} | "
        f"{rate_np:.1f} | | {100 * rate_np / peak:.0f}% |",
        "",
        f"featlearn / numpy (triangle, fused): **{rate_fl / rate_np:.1f}x**; fused triangle / "
        f"float32 GEMM: **{100 * rate_fl / adjacent['triangle', 'float32', True]:.0f}%**; "
        "fused nearest-40% / float32 GEMM: **"
        f"{100 * all_rows['nearest_fraction', 'float32', True][2] / adjacent['nearest_fraction', 'float32', True]:.0f}%**. "
        "Max relative difference "
        f"of the two outputs on 20 images: {err:.1e}. Fused / eager: "
        f"**{rows['float32', False][0] / t_fl:.2f}x**"
        + (f"; fused bfloat16 / fused float32: **{t_fl / rows['bfloat16', True][0]:.2f}x**"
           if ("bfloat16", True) in rows else " (no native bfloat16 here: no bfloat16 rows)")
        + f". Compiling the fused kernel took {cold:.1f} s with an "
        f"empty inductor cache and {warm:.1f} s with a warm one (fresh processes, 8 images, "
        "minus their encoding time).",
        "",
        "Peak resident memory of a fresh process encoding synthetic uint8 images with "
        "`compile=\"auto\"` (base = RSS after loading the encoder, creating the images and a "
        "warm-up; peak = VmHWM after transform):",
        "",
        "| images | base MB | peak MB | output MB | peak - base - output MB | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rss:
        lines.append(f"| {r['n']} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | {r['out_mb']:.0f} | "
                     f"{r['peak_mb'] - r['base_mb'] - r['out_mb']:.0f} | {r['seconds']:.1f} |")
    write(args.out, lines)


if __name__ == "__main__":
    main()
