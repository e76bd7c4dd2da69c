"""How large is Thiry et al.'s whitening regularizer next to ours? The patch spectra compared.

Thiry et al. (ICLR 2021, louity/patches ``kneighbors.py``) add an absolute ``whitening_reg``
(1e-3 in their best runs) to the eigenvalues of the biased covariance of raw 0..1 patches;
featlearn whitens contrast-normalized 0..255 patches with the paper's absolute ``eps=0.1``.
This prints both spectra's mean and largest eigenvalues on our copy of CIFAR-10 and each
regularizer relative to them, i.e. the ``ZCAWhitening(eps_scale="mean")`` value that carries
Thiry's setting over to normalized patches. No timings.

    python benchmarks/whitening_spectrum.py            # ~1 minute
    python benchmarks/whitening_spectrum.py --quick    # seconds
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import RESULTS, add_common_args, header, load_cifar10, parse_args, write, writes

#: Thiry et al.'s values of ``whitening_reg`` in their ablation (ablation_study_eps.sh).
THIRY_REGS = (1e-1, 1e-2, 1e-3, 1e-4)


def spectrum(P, ddof):
    C = np.cov(P, rowvar=False, ddof=ddof)
    lam = np.clip(np.linalg.eigvalsh(C), 0, None)
    return float(lam.mean()), float(lam.max())


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "whitening-spectrum.md")
    p.add_argument("--n-images", type=int, default=20_000)
    p.add_argument("--n-patches", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    args = parse_args(p, argv)
    if args.quick:
        args.n_images, args.n_patches = 2000, 20_000

    from featlearn import PatchNormalizer, RandomPatchExtractor

    d = load_cifar10(args)
    P = RandomPatchExtractor(6, args.n_patches, random_state=args.seed).fit_transform(
        d.X_train[:args.n_images])
    raw_mean, raw_max = spectrum(P.astype(np.float64) / 255.0, ddof=0)  # Thiry: 0..1, biased
    norm_mean, norm_max = spectrum(PatchNormalizer().fit_transform(P).astype(np.float64), ddof=1)
    print(f"raw 0..1 patches: mean eigenvalue {raw_mean:.4g}, largest {raw_max:.4g}")
    print(f"contrast-normalized patches: mean eigenvalue {norm_mean:.4g}, largest {norm_max:.4g}")
    rows = [(f"Thiry et al. whitening_reg={r:g} (raw 0..1 patches)", r, r / raw_mean, r / raw_max)
            for r in THIRY_REGS]
    rows.append(("paper / featlearn eps=0.1 (contrast-normalized patches)", 0.1, 0.1 / norm_mean,
                 0.1 / norm_max))
    for name, a, rm, rx in rows:
        print(f"{name}: {rm:.4g} x mean eigenvalue, {rx:.3g} x largest")
    if writes(args.out):
        lines = header("Whitening regularizers relative to the patch spectrum", argv=argv,
                       quick=args.quick, script=__file__) + [
            f"{args.n_patches:,} random 6x6x3 patches of the first {args.n_images:,} training "
            "images (JPEG-75 copy). Raw: pixels / 255, biased covariance (Thiry et al.'s "
            f"whitening): mean eigenvalue {raw_mean:.4g}, largest {raw_max:.4g}. Normalized: "
            "PatchNormalizer() (eps=10, ddof=1), unbiased covariance (featlearn's): mean "
            f"eigenvalue {norm_mean:.4g}, largest {norm_max:.4g}.", "",
            "| regularizer | absolute | / mean eigenvalue (`eps_scale=\"mean\"`) | / largest |",
            "|---|---|---|---|",
        ] + [f"| {n} | {a:g} | {rm:.4g} | {rx:.3g} |" for n, a, rm, rx in rows]
        write(args.out, lines)


if __name__ == "__main__":
    main()
