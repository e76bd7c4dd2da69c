"""A non-learned peer: kymatio's wavelet scattering beside featlearn's learned dictionary.

One process, one CIFAR-10 split (the first ``--n-train`` training and ``--n-test`` test images
of the shared archive): a stated reduced scale, because the full 50,000/10,000 split through
both feature extractors and four classifiers takes too long on a 2-core CPU.

(a) ``kymatio`` Scattering2D(J=2, L=8, shape=(32, 32)) on each colour channel of the 0..1
    pixels: 3 x 81 maps of 8x8, 15,552 features, no log. Then StandardScaler and either the
    paper's linear L2-SVM (featlearn.TorchMLPClassifier, one-vs-all squared hinge, C=100,
    L-BFGS) or a 512-unit MLP (featlearn's preset, ``--mlp-epochs`` epochs).
(b) featlearn's ``coates2011-1600-svm`` configuration on the same images, with its dictionary
    drawn from ``--n-patches`` patches, then the same two classifiers on its features (the SVM
    row is the configuration itself).

kymatio is an optional dependency (``pip install 'featlearn[peer]'``); without it the (a)
rows say so and (b) still runs.

    flock /tmp/featlearn-bench.lock python benchmarks/peer_scattering.py
    python benchmarks/peer_scattering.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from _common import (RESULTS, add_common_args, gemm_rates, header, load_cifar10, parse_args,
                     write, writes)

CONFIG = "coates2011-1600-svm"


def scattering_class():
    """kymatio's torch Scattering2D, or None when kymatio is not installed.

    kymatio 0.3.0's ``kymatio.torch`` also imports its 3-D module, which needs
    ``scipy.special.sph_harm`` (removed in SciPy 1.17); the 2-D frontend alone does not.
    """
    try:
        from kymatio.torch import Scattering2D
    except ImportError:
        try:
            from kymatio.scattering2d.frontend.torch_frontend import (
                ScatteringTorch2D as Scattering2D)
        except ImportError:
            return None
    return Scattering2D


def scatter(images, J=2, batch=256):
    """(n, 32, 32, 3) uint8 -> (n, 3 * 81 * 8 * 8) float32 scattering coefficients."""
    S = scattering_class()(J=J, shape=images.shape[1:3])
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 255.0
            out.append(S(x.contiguous()).reshape(len(x), -1).numpy())
    return np.concatenate(out)


def classifiers(mlp_epochs, svm_iters, precondition="auto"):
    """The linear classifier and the MLP, each after a StandardScaler."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featlearn import TorchMLPClassifier
    from featlearn.pipeline import MLP_PARAMS, SVM_PARAMS

    svm = TorchMLPClassifier(**{**SVM_PARAMS, "max_iter": svm_iters}, precondition=precondition,
                             device="cpu", random_state=0)
    mlp = TorchMLPClassifier(**{**MLP_PARAMS, "max_iter": mlp_epochs}, device="cpu",
                             random_state=0)
    return {"L2-SVM C=100": make_pipeline(StandardScaler(), svm),
            f"MLP 512, {mlp_epochs} epochs": make_pipeline(StandardScaler(), mlp)}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fit_rows(name, Ftr, ytr, Fte, yte, t_extract, args):
    rows = []
    for clf_name, clf in classifiers(args.mlp_epochs, args.svm_iters,
                                           # quick: the 15,552^2 preconditioner costs more than the fit
                                           "auto" if not args.quick else False).items():
        _, t_fit = timed(lambda: clf.fit(Ftr, ytr))
        rows.append({"features": name, "classifier": clf_name, "n_features": Ftr.shape[1],
                     "extract_s": t_extract, "fit_s": t_fit, "accuracy": clf.score(Fte, yte)})
        print(rows[-1], flush=True)
    return rows


def featlearn_features(Xtr, ytr, Xte, args):
    from featlearn.pipeline import build_pipeline, load_config

    overrides = {"encoder__n_patches": args.n_patches, "device": "cpu"}
    if args.quick:
        overrides.update(n_centroids=32, encoder__kmeans__lloyd_iter=2)
    encoder = build_pipeline(load_config(CONFIG), **overrides).named_steps["encoder"]
    Ftr = encoder.fit_transform(Xtr, ytr)
    return np.asarray(Ftr, np.float32), np.asarray(encoder.transform(Xte), np.float32), encoder


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "peer_scattering.md")
    p.add_argument("--n-train", type=int, default=10000, help="first N training images")
    p.add_argument("--n-test", type=int, default=2000, help="first N test images")
    p.add_argument("--n-patches", type=int, default=100000,
                   help="patches the featlearn dictionary is learned from")
    p.add_argument("--mlp-epochs", type=int, default=10)
    p.add_argument("--svm-iters", type=int, default=1000, help="most L-BFGS iterations")
    args = parse_args(p, argv)
    if args.quick:
        args.n_train, args.n_test, args.n_patches = 60, 40, 3000
        args.mlp_epochs, args.svm_iters = 2, 20

    gemm = gemm_rates() if writes(args.out) else None  # in the same run as the timings
    data = load_cifar10(args)
    Xtr, ytr = data.X_train[:args.n_train], data.y_train[:args.n_train]
    Xte, yte = data.X_test[:args.n_test], data.y_test[:args.n_test]
    rows, notes = [], []

    if scattering_class() is None:
        notes.append("kymatio is not installed (pip install 'featlearn[peer]'): the "
                     "scattering rows were skipped.")
        print(notes[-1], flush=True)
    else:
        from importlib.metadata import version

        notes.append(f"kymatio {version('kymatio')}.")
        (Str, Ste), t_s = timed(lambda: (scatter(Xtr), scatter(Xte)))
        rows += fit_rows("kymatio Scattering2D J=2 (no log)", Str, ytr, Ste, yte, t_s, args)
        del Str, Ste

    (Ftr, Fte, enc), t_f = timed(lambda: featlearn_features(Xtr, ytr, Xte, args))
    name = (f"featlearn {CONFIG}, K={enc.kmeans.n_clusters}, "
            f"{args.n_patches:,} patches")
    rows += fit_rows(name, Ftr, ytr, Fte, yte, t_f, args)

    columns = ("features", "classifier", "features per image", "extraction s (train+test)",
               "classifier fit s", "test accuracy")
    table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    table += [f"| {r['features']} | {r['classifier']} | {r['n_features']:,} | "
              f"{r['extract_s']:.1f} | {r['fit_s']:.1f} | {r['accuracy']:.4f} |" for r in rows]
    print("\n".join(table))
    if writes(args.out):
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        text = header("Peer: wavelet scattering (kymatio) beside featlearn", argv=argv,
                      gemm=gemm, quick=args.quick, script=__file__) + [
            f"device=cpu; load average at the end {load} (the machine is shared: timings "
            "are noisy).",
            f"Split: the first {args.n_train:,} training and {args.n_test:,} test images of the "
            "archive, a reduced scale (the full split takes too long on this 2-core CPU). "
            "Accuracies at this scale are below the full-data "
            "ones for both.", "",
            "Scattering: Scattering2D(J=2, L=8) per colour channel of the 0..1 pixels, "
            "3 x 81 maps of 8x8, no log. featlearn: the named configuration with its "
            "dictionary learned from the patches given; extraction includes learning the "
            "dictionary. Both classifiers get StandardScaler features: the L2-SVM is "
            f"one-vs-all squared hinge, C=100, L-BFGS (at most {args.svm_iters} iterations); "
            f"the MLP featlearn's preset (512 ReLU, dropout 0.5, adam, cosine) for "
            f"{args.mlp_epochs} epochs.", *notes, "", *table, ""]
        write(args.out, text)
    return rows


if __name__ == "__main__":
    main()
