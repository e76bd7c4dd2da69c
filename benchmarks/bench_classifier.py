"""Benchmark TorchMLPClassifier against scikit-learn on CIFAR-10-sized features.

(a) MLP 6400-512-10 (ReLU, adam, batch 256, alpha 1e-4, no dropout): seconds per epoch against
    ``sklearn.neural_network.MLPClassifier`` with the same architecture (a couple of epochs of each).
(b) L2-SVM (one-vs-all, squared hinge, the paper's C=100): against
    ``sklearn.svm.LinearSVC(loss="squared_hinge", C=100/n_train)`` on a 10,000-row subset
    (fit time and test accuracy), and featlearn's fit on all 50,000 rows, with and without
    the L-BFGS preconditioner.

Features: ``--features path.npz`` (arrays X_train, y_train, X_test, y_test, e.g. PatchEncoder
output), else a fixed random projection of the CIFAR-10 pixels to 6,400 dims followed by a ReLU.
Either way they are standardized with the training statistics (mean, sqrt(var + 0.01)) first.

    flock /tmp/featlearn-bench.lock python benchmarks/bench_classifier.py
    python benchmarks/bench_classifier.py --quick      # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from _common import (RESULTS, add_common_args, gemm_rate, header, load_cifar10, parse_args,
                     write, writes)


def projected_cifar10(data, n_features, n_train, n_test):
    """CIFAR-10 pixels (per-pixel standardized) -> fixed Gaussian projection -> ReLU."""
    Xtr = data.X_train[:n_train].reshape(-1, 3072).astype(np.float32)
    Xte = data.X_test[:n_test].reshape(-1, 3072).astype(np.float32)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-3
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(3072, n_features, generator=gen) / np.sqrt(3072)
    shift = 0.5  # a ReLU with a threshold, like the triangle code's sparsity

    def project(X):
        out = torch.empty(len(X), n_features)
        for s in range(0, len(X), 4096):
            xb = (torch.from_numpy(X[s:s + 4096]) - torch.from_numpy(mu)) / torch.from_numpy(sd)
            out[s:s + 4096] = torch.relu(xb @ R - shift)
        return out.numpy()

    return (project(Xtr), data.y_train[:n_train].astype(np.int64),
            project(Xte), data.y_test[:n_test].astype(np.int64))


def standardize(Xtr, Xte):
    mean = Xtr.mean(0, dtype=np.float64)
    scale = np.sqrt(Xtr.var(0, dtype=np.float64) + 0.01)
    return (((Xtr - mean) / scale).astype(np.float32), ((Xte - mean) / scale).astype(np.float32))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "classifier.md")
    p.add_argument("--features", help="npz with X_train, y_train, X_test, y_test "
                                      "(instead of projected --data pixels)")
    p.add_argument("--n-features", type=int, default=6400)
    p.add_argument("--svm-subset", type=int, default=10000)
    p.add_argument("--svm-iters", type=int, default=1000,
                   help="most L-BFGS iterations (featlearn; it stops earlier once converged)")
    p.add_argument("--mlp-epochs", type=int, default=2, help="featlearn epochs timed")
    p.add_argument("--sklearn-epochs", type=int, default=2, help="MLPClassifier epochs timed")
    p.add_argument("--plain-svm", action="store_true",
                   help="also fit the full L2-SVM without the preconditioner (minutes)")
    args = parse_args(p, argv)
    if args.quick:
        n_train, n_test, args.n_features = 3000, 1000, 512
        args.svm_subset, args.svm_iters, args.mlp_epochs, args.sklearn_epochs = 1500, 100, 2, 1
    else:
        n_train, n_test = 50000, 10000

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    from featlearn import TorchMLPClassifier
    from featlearn._torch import has_fast_bfloat16

    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        gemm = gemm_rate()
        print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)

    t0 = time.perf_counter()
    if args.features:
        z = np.load(args.features)
        Xtr, ytr, Xte, yte = (z["X_train"][:n_train], z["y_train"][:n_train],
                              z["X_test"][:n_test], z["y_test"][:n_test])
        source = f"features from {args.features}"
    else:
        Xtr, ytr, Xte, yte = projected_cifar10(load_cifar10(args), args.n_features, n_train,
                                               n_test)
        source = (f"CIFAR-10 pixels -> fixed random projection to {args.n_features} dims -> "
                  "ReLU(x - 0.5)")
    Xtr, Xte = standardize(np.asarray(Xtr, np.float32), np.asarray(Xte, np.float32))
    n, d = Xtr.shape
    print(f"features: {n} x {d} train, {len(Xte)} test ({source}); "
          f"prepared in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    rows = []

    # (a) MLP, same architecture and optimizer settings in both libraries.
    arch = dict(hidden_layer_sizes=(512,), alpha=1e-4, batch_size=256, learning_rate_init=1e-3)
    # torch's one-time start-up (thread pool, kernel selection) is not a per-epoch cost.
    TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=1, device="cpu").fit(Xtr[:512], ytr[:512])
    ref = MLPClassifier(**arch, solver="adam", max_iter=args.sklearn_epochs, shuffle=True,
                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, t_ref = timed(lambda: ref.fit(Xtr, ytr))
    acc_ref, ep_ref = ref.score(Xte, yte), t_ref / ref.n_iter_
    native_bf16 = has_fast_bfloat16(torch.device("cpu"))
    for precision in ("float32", "bfloat16"):
        if precision == "bfloat16" and not native_bf16:
            # Emulated bfloat16 runs several times slower than float32: nothing to measure.
            rows.append(("MLP 512 hidden, adam, s/epoch, featlearn precision=bfloat16",
                         "-", "-", "-", "skipped: this CPU has no native bfloat16 "
                         "(precision='auto' trains in float32 here)"))
            continue
        # Same alpha value; note MLPClassifier divides its penalty by the batch size, so this
        # penalty is batch_size times stronger (it does not change the time per epoch).
        ours = TorchMLPClassifier(**arch, dropout=0.0, lr_schedule="constant",
                                  max_iter=args.mlp_epochs, precision=precision, device="cpu",
                                  random_state=0)
        _, t_ours = timed(lambda: ours.fit(Xtr, ytr))
        ep_ours = t_ours / ours.n_iter_
        rows.append((f"MLP 512 hidden, adam, s/epoch, featlearn precision={precision}",
                     f"{ep_ours:.2f}", f"{ep_ref:.2f}", f"{ep_ref / ep_ours:.1f}x",
                     f"after {ours.n_iter_} / {ref.n_iter_} epochs: "
                     f"{ours.score(Xte, yte):.4f} / {acc_ref:.4f}"))
        print(rows[-1])

    # (b) L2-SVM on a subset: featlearn (paper's C=100) vs LinearSVC(C=100/n_sub).
    m = min(args.svm_subset, n)
    Xs, ys = Xtr[:m], ytr[:m]
    svm = dict(hidden_layer_sizes=(), loss="squared_hinge", C=100.0, solver="lbfgs",
               dropout=0.0, max_iter=args.svm_iters, device="cpu")
    ours = TorchMLPClassifier(**svm)
    _, t_ours = timed(lambda: ours.fit(Xs, ys))
    acc_ours = ours.score(Xte, yte)
    ref = LinearSVC(loss="squared_hinge", C=100.0 / m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, t_ref = timed(lambda: ref.fit(Xs, ys))
    acc_ref = ref.score(Xte, yte)
    rows.append((f"L2-SVM, {m} rows, fit s (LinearSVC C={100.0 / m:g}, dual={ref.dual})",
                 f"{t_ours:.1f}", f"{t_ref:.1f}", f"{t_ref / t_ours:.1f}x",
                 f"{acc_ours:.4f} / {acc_ref:.4f} ({ours.n_iter_} L-BFGS it.)"))
    print(rows[-1])

    # (b) featlearn L2-SVM on every training row, preconditioned (the default) and plain.
    for precondition in (True, False) if args.plain_svm else (True,):
        full = TorchMLPClassifier(**svm, precondition=precondition)
        _, t_full = timed(lambda: full.fit(Xtr, ytr))
        rows.append((f"L2-SVM, {n} rows, fit s, precondition={precondition}", f"{t_full:.1f}",
                     "-", "-", f"{full.score(Xte, yte):.4f} / - ({full.n_iter_} L-BFGS it., "
                     f"objective {full.loss_curve_[-1]:.5f})"))
        print(rows[-1])
    columns = ("task", "featlearn", "scikit-learn", "speed-up", "test accuracy featlearn / sklearn")
    table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    table += [f"| {' | '.join(r)} |" for r in rows]
    print("\n".join(table))
    if writes(args.out):
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        text = header("TorchMLPClassifier benchmark", argv=argv, gemm=gemm, quick=args.quick,
                      script=__file__) + [
                f"device=cpu; load average at the end {load} (the machine is shared: timings "
                "are noisy).",
                f"Features: {n} x {d} train, {len(Xte)} test; {source}; standardized with the "
                "training mean and sqrt(var + 0.01).", "",
                "MLP: both alpha=1e-4, but MLPClassifier divides its penalty by the batch size, "
                "so featlearn's is 256x stronger here (no effect on time per epoch). "
                "bfloat16 = torch.autocast matrix products ("
                + ("native bfloat16 on this CPU). " if native_bf16 else
                   "not native on this CPU, so not run). ") +
                "L2-SVM: featlearn C=100 (paper units), L-BFGS (preconditioned unless the row "
                "says otherwise; at most --svm-iters iterations, stopping once converged); "
                "LinearSVC C=100/n_rows, default solver settings.", "", *table, ""]
        write(args.out, text)


if __name__ == "__main__":
    main()
