"""Does ``solver="auto"`` (L-BFGS) reach the L2-SVM optimum? Objectives against LinearSVC.

The linear squared-hinge model is convex, so ``TorchMLPClassifier(hidden_layer_sizes=(),
loss="squared_hinge")`` must reach LinearSVC's objective at the same C (ours is on the mean loss:
``C_sklearn = C / n``) within 1e-4 relative. LinearSVC penalizes its intercept; a large
``intercept_scaling`` makes that penalty negligible. Both objectives are evaluated by the same
numpy function on the same standardized features.

    python benchmarks/check_svm_objective.py --digits          # seconds: digits, and the
                                                               # default MLP vs MLPClassifier()
    python benchmarks/check_svm_objective.py --n-train 10000   # CIFAR-10 features (minutes)
    python benchmarks/check_svm_objective.py --features f.npz  # X_train, y_train from a file
    python benchmarks/check_svm_objective.py --quick           # seconds: 1,000 CIFAR-10 images

CIFAR-10 features come from a small PatchEncoder (100 centroids, stride 2, 2x2 sum pooling:
400 features) fitted on the first ``--n-train`` training images of ``--data`` (default: the
shared archive). ``--out FILE`` also writes the printed lines as a Markdown report.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from _common import add_common_args, gemm_rate, header, load_cifar10, parse_args, write, writes


def svm_objective(W, b, Xs, y, alpha):
    """Mean one-vs-all squared hinge + 0.5 alpha ||W||^2 (one output and t = +-1 for 2 classes)."""
    S = Xs.astype(np.float64) @ np.asarray(W, np.float64).T + np.asarray(b, np.float64)
    if S.shape[1] == 1:
        t = np.where(y == 1, 1.0, -1.0)[:, None]
    else:
        t = -np.ones_like(S)
        t[np.arange(len(y)), y] = 1
    return (np.maximum(0, 1 - t * S) ** 2).sum(1).mean() + 0.5 * alpha * np.square(W).sum()


def compare(X, y, C, label, report=print):
    from sklearn.svm import LinearSVC

    from featlearn import TorchMLPClassifier

    t0 = time.perf_counter()
    ours = TorchMLPClassifier(hidden_layer_sizes=(), loss="squared_hinge", C=C, device="cpu",
                              random_state=0).fit(X, y)
    t_ours = time.perf_counter() - t0
    alpha = 1.0 / C
    Xs = (X - ours.mean_) / ours.scale_
    t0 = time.perf_counter()
    ref = LinearSVC(loss="squared_hinge", C=C / len(Xs), intercept_scaling=1000, tol=1e-10,
                    max_iter=100_000, dual=False).fit(Xs, y)
    t_ref = time.perf_counter() - t0
    lin = ours.model_[-1]
    o = svm_objective(lin.weight.detach().numpy(), lin.bias.detach().numpy(), Xs, y, alpha)
    r = svm_objective(ref.coef_, ref.intercept_, Xs, y, alpha)
    rel = (o - r) / r
    report(f"{label}: n={len(X)} d={X.shape[1]} C={C:g} | featlearn solver={ours.solver_} "
          f"{ours.n_iter_} it. objective {o:.6f} ({t_ours:.1f} s) | LinearSVC "
          f"C={C / len(Xs):.3g} objective {r:.6f} ({t_ref:.1f} s) | relative gap {rel:.2e} "
          f"{'OK' if rel <= 1e-4 else 'NOT within 1e-4'}")
    return rel


def digits(report=print):
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    from featlearn import TorchMLPClassifier

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    compare(Xtr, ytr, 1e4, "digits, default alpha=1e-4", report)
    compare(Xtr, ytr, 100.0, "digits, the paper's C=100", report)
    for seed in (0, 1, 2):
        ours = TorchMLPClassifier(device="cpu", random_state=seed).fit(Xtr, ytr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = MLPClassifier(random_state=seed).fit(Xtr, ytr)
        report(f"digits default network, random_state={seed}: featlearn "
              f"{ours.score(Xte, yte):.4f}, MLPClassifier() {ref.score(Xte, yte):.4f}")


def cifar_features(args, n_train):
    from featlearn import MiniBatchKMeans, PatchEncoder

    data = load_cifar10(args)
    X, y = data.X_train[:n_train], data.y_train[:n_train].astype(np.int64)
    enc = PatchEncoder(n_patches=50_000, stride=2, kmeans=MiniBatchKMeans(
        n_clusters=100, random_state=0), device="cpu", random_state=0)
    return enc.fit_transform(X).astype(np.float32), y


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--digits", action="store_true", help="scikit-learn's digits (seconds)")
    p.add_argument("--features", help="npz with X_train, y_train")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--C", type=float, default=100.0, help="the paper's units (default: 100)")
    args = parse_args(p, argv)
    if args.quick:  # seconds: 1,000 CIFAR-10 training images
        args.n_train = min(args.n_train, 1000)
    lines = []

    def report(line):
        print(line, flush=True)
        lines.append(f"- {line}")

    gemm = None
    if writes(args.out):  # measured before the timings, in the same run as them
        gemm = gemm_rate()
        print(f"fp32 GEMM (torch.mm 4096^3): {gemm:.1f} GFLOP/s", flush=True)
    if args.digits:
        digits(report)
    else:
        cifar(args, report)
    write(args.out, header("L2-SVM objective: featlearn L-BFGS against LinearSVC", argv=argv,
                           gemm=gemm, quick=args.quick, script=__file__) + lines)


def cifar(args, report):
    if args.features:
        z = np.load(args.features)
        X, y = z["X_train"][:args.n_train], z["y_train"][:args.n_train]
    else:
        t0 = time.perf_counter()
        X, y = cifar_features(args, args.n_train)
        print(f"encoded {len(X)} CIFAR-10 training images in {time.perf_counter() - t0:.0f} s",
              flush=True)
    compare(np.asarray(X, np.float32), np.asarray(y), args.C, "CIFAR-10 features", report)


if __name__ == "__main__":
    main()
