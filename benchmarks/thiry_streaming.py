"""Thiry et al.'s 2,048-patch linear-head recipe through featlearn, at a CPU-sized scale.

Random whitened patches as the dictionary (ZCA regularized by 1e-3 times the mean eigenvalue),
the binary "nearest 40%" code for each patch and its negative, 5x5 average pooling at stride 3
(9x9 maps of 4,096 channels), and the head batch norm -> 1x1 conv to 128 -> 6x6 conv -> global
average, trained by SGD with momentum on maps encoded per mini-batch from randomly cropped
(4-pixel zero padding) and flipped images (:class:`featlearn.StreamingConvClassifier`), scored
on test images and their mirror images. The published run trains 80 epochs on all 50,000
images on GPUs; ``--n-train`` and ``--epochs`` set the reduced scale, which the table states.

    flock /tmp/featlearn-bench.lock python benchmarks/thiry_streaming.py
    python benchmarks/thiry_streaming.py --quick     # a smoke run; its numbers are not results
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from _common import RESULTS, add_common_args, gemm_rate, header, load_cifar10, parse_args, write


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                        out=RESULTS / "thiry-streaming.md")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--n-clusters", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rate", type=float, default=0.01)
    args = parse_args(p, argv)

    from featlearn import (PatchEncoder, RandomPatchDictionary, StreamingConvClassifier,
                           TorchConvClassifier, ZCAWhitening)

    if args.quick:
        args.n_train, args.n_test, args.n_clusters, args.epochs = 300, 100, 64, 1
    gemm = None if args.quick else gemm_rate()
    d = load_cifar10(args)
    Xtr, ytr = d.X_train[:args.n_train], d.y_train[:args.n_train]
    Xte, yte = d.X_test[:args.n_test], d.y_test[:args.n_test]
    encoder = PatchEncoder(n_patches=min(400_000, 40 * args.n_train),
                           whitener=ZCAWhitening(eps=1e-3, eps_scale="mean"),
                           kmeans=RandomPatchDictionary(args.n_clusters, random_state=0),
                           activation="nearest_fraction", neighbor_fraction=0.4,
                           pool_size=5, pool_stride=3, pool_op="mean", device="cpu",
                           random_state=0)
    head = TorchConvClassifier(width=128, kernel_size=6, max_iter=args.epochs,
                               learning_rate_init=args.learning_rate, batch_size=128,
                               device="cpu", random_state=0, verbose=2)
    model = StreamingConvClassifier(encoder, head, crop_padding=4, random_state=0, verbose=1)
    t0 = time.perf_counter()
    model.fit(Xtr, ytr)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = float(np.mean(model.predict(Xte) == yte))
    t_pred = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    h, w = model.encoder_.pooled_shape_
    print(f"test {100 * acc:.2f}%, fit {t_fit:.0f} s, predict {t_pred:.0f} s, peak RSS {rss:.2f} GB")

    lines = header("Thiry et al.'s linear-head recipe, streamed, at a reduced CPU scale",
                   argv=argv, gemm=gemm, quick=args.quick, script=__file__)
    lines += [
        f"Dictionary: {args.n_clusters:,} random whitened patches (ZCA eps 1e-3 x mean "
        f"eigenvalue) from {encoder.n_patches:,} patches of the training images; code: nearest "
        f"40% for x and -x ({2 * args.n_clusters:,} channels), 5x5 mean pooling at stride 3 "
        f"({h}x{w} maps); head: batch norm, 1x1 conv to 128, 6x6 conv, global average; SGD "
        f"(momentum 0.9, cosine schedule from {args.learning_rate}, batch 128, weight decay "
        "1e-4); each batch encoded on the fly from images randomly cropped (4-pixel zero "
        "padding) and flipped; test scores averaged with the mirror images'.",
        "",
        "| scale | training images | epochs | test images | test % | fit s | predict s | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| this run | {args.n_train:,} | {args.epochs} | {args.n_test:,} | {100 * acc:.2f} | "
        f"{t_fit:.0f} | {t_pred:.0f} | {rss:.2f} |",
        "| Thiry et al. (original pixels, GPUs) | 50,000 | 80 | 10,000 | 82.3 | | | |",
        "",
        "Per-epoch training loss: " + ", ".join(f"{v:.3f}" for v in model.head_.loss_curve_) + ".",
    ]
    write(args.out, lines)


if __name__ == "__main__":
    main()
