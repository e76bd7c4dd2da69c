"""The modern encodings' cost: nearest-fraction selection (exact vs sampled), Heaviside, triangle.

Thiry et al.'s nearest-fraction encoding marks, per patch and per sign, the ``int(fraction*K)``
centroids nearest ``y`` (and ``-y``): a per-row order statistic over ``K`` entries. The exact
one (``torch.kthvalue`` over all ``K``, ``selection="exact"``) is measured against the estimate
from :data:`featlearn.activations.SELECTION_SAMPLE` evenly strided entries per row
(``selection="sampled"``), on the distance products of real CIFAR-10 patches (random-patch
dictionary, ZCA), with ``torch.topk`` as a second exact peer. Reported: seconds per chunk of
each activation + pooling beside the chunk's distance GEMM, the fraction of binary entries
where sampled and exact differ (before pooling), the largest pooled difference, and whole
``transform`` time per image for each encoding (eager and compiled, 5x5 windows at stride 3).

    flock /tmp/featlearn-bench.lock python benchmarks/bench_encodings.py
    python benchmarks/bench_encodings.py --quick      # seconds; numbers are not results
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, add_common_args, gemm_rates, header, load_cifar10, parse_args, write


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "encodings.md")
    p.add_argument("--n-clusters", type=int, default=2048)
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--chunk-images", type=int, default=8)
    p.add_argument("--n-images", type=int, default=200, help="images per transform timing")
    p.add_argument("--n-agree", type=int, default=200, help="images for the agreement")
    p.add_argument("--repeats", type=int, default=3)
    args = parse_args(p, argv)

    import torch

    from featlearn import PatchEncoder, RandomPatchDictionary, _native
    from featlearn.activations import (BRACKET_ITERS, SELECTION_SAMPLE, activate_and_pool,
                                       bracket_thresholds, fix_thresholds, n_nearest,
                                       selection_columns, selection_rank)
    from featlearn._compile import CompiledKernel

    if args.quick:
        args.n_clusters, args.n_images, args.n_agree, args.repeats = 512, 16, 16, 1
    gemm = gemm_rates()
    d = load_cifar10(args)
    X = d.X_train[:5000]
    K = args.n_clusters
    enc = PatchEncoder(n_patches=100_000, kmeans=RandomPatchDictionary(K, random_state=0),
                       activation="nearest_fraction", neighbor_fraction=args.fraction,
                       pool_size=5, pool_stride=3, pool_op="mean", device="cpu",
                       random_state=0).fit(X)
    plan = enc.encoding_plan()
    cpu = torch.device("cpu")
    B = args.chunk_images
    kernel = plan.kernel(cpu, batch=B)
    static = dict(kernel.static, n_images=B)

    def products(chunk):
        """The chunk's dot products, and ||y||^2 (for the triangle row) from the normalized
        patches the kernel leaves in its GEMM's left operand (float32: whitening folded)."""
        kernel.encode(chunk)
        u = kernel.lhs[: B * kernel.L, : plan.d]
        y = (u - torch.from_numpy(plan.white_mean)) @ torch.from_numpy(plan.white_mat)
        return kernel.dist[: B * kernel.L].clone(), (y * y).sum(1)

    Xa = d.X_test[: args.n_agree]
    with torch.inference_mode():
        D, row_sq = products(Xa[:B])
        col_sq = kernel.col_sq
        k = n_nearest(args.fraction, K)
        lhs, cen = kernel.lhs[: B * kernel.L], kernel.centers_aug
        t_gemm = _best(lambda: torch.mm(lhs, cen), args.repeats)
        E = col_sq.view(1, -1) - 2 * D
        t_kth = _best(lambda: E.kthvalue(k + 1, 1), args.repeats)
        t_topk = _best(lambda: E.topk(k + 1, 1, largest=False), args.repeats)
        timings = {}
        for sel in ("exact", "sampled"):
            st = dict(static, selection=sel)
            timings[sel] = _best(lambda: activate_and_pool(D, row_sq, col_sq, **st), args.repeats)
        # The compiled path's pieces: bisection over the selection's columns (contiguous, as
        # the kernel lays them out), the fix-up, one compare-and-pool graph.
        fused = {}
        native = _native.nearest_thresholds if _native.available() else None
        for sel in ("exact", "sampled"):
            cols = torch.from_numpy(selection_columns(K, sel))
            rank = selection_rank(K, k, len(cols))
            S, cs = D[:, cols].contiguous(), col_sq[cols]
            bracket = CompiledKernel(bracket_thresholds, name="bench", rank=rank,
                                     iters=BRACKET_ITERS)
            pooled = CompiledKernel(activate_and_pool, name="bench", **dict(static, selection=sel))
            t, ok = bracket(S, cs)
            th = fix_thresholds(t, ok, S, cs, rank)
            pooled(D, row_sq, col_sq, th)  # warm-up: the compilation is not measured
            fused[sel] = dict(
                bracket=_best(lambda: bracket(S, cs), args.repeats),
                fix=_best(lambda: fix_thresholds(t, ok, S, cs, rank), args.repeats),
                pool=_best(lambda: pooled(D, row_sq, col_sq, th), args.repeats),
                undecided=float((~ok).any(1).float().mean()))
            if native is not None:  # the CPU path: the same thresholds (asserted), no fix-up
                assert torch.equal(native(S, cs, rank), th)
                fused[sel]["native"] = _best(lambda: native(S, cs, rank), args.repeats)
        tri = dict(static, activation="triangle")
        Dsq = (row_sq.view(-1, 1) + col_sq.view(1, -1) - 2 * D)
        t_tri = _best(lambda: activate_and_pool(Dsq, **tri), args.repeats)
        # Agreement over n_agree images, before pooling (binary entries) and after.
        from featlearn.activations import nearest_fraction
        diff = total = 0
        pooled_gap = 0.0
        for s in range(0, len(Xa) - B + 1, B):
            D, row_sq = products(Xa[s:s + B])
            a = nearest_fraction(D, 0.0, col_sq=col_sq, fraction=args.fraction, selection="exact")
            b = nearest_fraction(D, 0.0, col_sq=col_sq, fraction=args.fraction,
                                 selection="sampled")
            diff += int((a != b).sum())
            total += a.numel()
            pa = activate_and_pool(D, row_sq, col_sq, **dict(static, selection="exact"))
            pb = activate_and_pool(D, row_sq, col_sq, **dict(static, selection="sampled"))
            pooled_gap = max(pooled_gap, float((pa - pb).abs().max()))

    Xt = d.X_test[: args.n_images]
    per_image = {}
    configs = [("triangle", {}), ("heaviside", {"alpha": 0.1}),
               ("nearest_fraction", {"selection": "exact"}),
               ("nearest_fraction", {"selection": "sampled"})]
    for compiled in (False, True):
        for act, extra in configs:
            enc.set_params(activation=act, compile=compiled, **extra)
            enc.transform(Xt[:B])  # warm-up (and the compilation)
            t = _best(lambda: enc.transform(Xt), 1 if args.quick else 2)
            name = act + (f" ({extra['selection']})" if "selection" in extra else "")
            per_image[(name, compiled)] = t / len(Xt)
        enc.set_params(alpha=0.25)

    lines = header("Modern encodings: nearest-fraction selection and per-image cost",
                   gemm=gemm, quick=args.quick, script=__file__)
    n_rows = B * kernel.L
    lines += [
        f"Random-patch dictionary of K={K} on 5,000 training images (ZCA), 6x6 patches, "
        f"27x27 map, mean pooling of 5x5 windows at stride 3 (9x9), fraction={args.fraction} "
        f"(k={k} per sign); the sampled threshold reads {SELECTION_SAMPLE} of {K} entries per "
        f"row. Chunk: {B} images = {n_rows} rows. Best of {args.repeats}, one process.", "",
        "| per chunk | seconds | x GEMM |", "|---|---|---|",
        f"| distance GEMM ({n_rows} x {kernel.lhs.shape[1]} x {K}) | {t_gemm:.4f} | 1.00 |",
        f"| `kthvalue` alone, one sign | {t_kth:.4f} | {t_kth / t_gemm:.2f} |",
        f"| `topk(k+1)` alone, one sign | {t_topk:.4f} | {t_topk / t_gemm:.2f} |",
        f"| nearest_fraction exact, both signs + pooling (eager) | {timings['exact']:.4f} | "
        f"{timings['exact'] / t_gemm:.2f} |",
        f"| nearest_fraction sampled, both signs + pooling (eager) | {timings['sampled']:.4f} | "
        f"{timings['sampled'] / t_gemm:.2f} |",
        f"| triangle + pooling (eager, for scale) | {t_tri:.4f} | {t_tri / t_gemm:.2f} |",
        *[f"| compiled {sel}: {name} | {fused[sel][key]:.4f} | {fused[sel][key] / t_gemm:.2f} |"
          for sel in ("exact", "sampled")
          for key, name in (("bracket", f"bisection ({BRACKET_ITERS} halvings), both signs"),
                            ("fix", f"order statistic of the undecided rows "
                                    f"({fused[sel]['undecided']:.2%})"),
                            ("pool", "compare + pooling, both signs"))],
        *[f"| compiled {sel}: native thresholds, both signs, one thread (each encoder worker "
          f"runs its own; on the CPU it replaces the bisection and the fix-up) | {fused[sel]['native']:.4f} "
          f"| {fused[sel]['native'] / t_gemm:.2f} |"
          for sel in ("exact", "sampled") if "native" in fused[sel]], "",
        f"Agreement on {len(Xa)} test images: sampled and exact differ on "
        f"{diff / total:.4%} of the {total:,} binary entries (before pooling); the largest "
        f"pooled difference is {pooled_gap:.4f} (pooled features lie in [0, 1]).", "",
        f"Whole `transform` ({len(Xt)} test images, after a warm-up call that also compiles):",
        "", "| encoding | eager ms/image | compiled ms/image | compiled, % of the float32 GEMM "
        "rate |", "|---|---|---|---|"]
    flops = 2 * kernel.L * plan.d * K  # effective distance products per image
    for name in dict.fromkeys(n for n, _ in per_image):
        rate = flops / per_image[(name, True)] / 1e9
        lines.append(f"| {name} | {1e3 * per_image[(name, False)]:.2f} | "
                     f"{1e3 * per_image[(name, True)]:.2f} | {100 * rate / gemm['float32']:.0f}% |")
    print("\n".join(lines))
    write(args.out, lines)


if __name__ == "__main__":
    main()
