"""Benchmark the ways images come in: a folder of image files through `featlearn fit` and
`featlearn extract`, and torch DataLoaders through extract_features, against the same images as
one numpy array in the same process.

Run (under the shared lock, so other jobs on the machine do not disturb the timings)::

    flock /tmp/featlearn-bench.lock python benchmarks/bench_inputs.py
    python benchmarks/bench_inputs.py --quick      # smoke run, small sizes

The images are the first ``--n-images`` CIFAR-10 training images of ``--data``, written as PNG
files (and once as JPEG, for the decoding rate) into an ImageFolder layout (one sub-folder per
class) in a temporary folder: the pixels of real photographs, in files like a user's own. The
dictionary is small (``--n-clusters`` centroids from 100,000 patches, 20 Lloyd iterations), so
the numbers show what the input paths cost next to encoding, not the paper's configuration.
Every command runs in this process (``featlearn.cli.main``), so Python's start-up and imports
are not counted; ``featlearn extract`` is timed with an empty decoding cache, so its time
includes reading the files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import (RESULTS, add_common_args, gemm_rate, header, load_cifar10, machine,
                     parse_args, write)


def write_folder(root: Path, images, labels, names, fmt, upscale=None):
    """``root/CLASS/00012.png`` (or ``.jpg``, quality 90); ``upscale``: saved at that size
    (bilinear), like photographs that are then resized down to the dictionary's size."""
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        if upscale:
            im = im.resize((upscale, upscale), Image.BILINEAR)
        im.save(folder / f"{i:05d}.{ext}", format=fmt, **(
            {"quality": 90} if fmt == "JPEG" else {}))


class FileDataset:
    """What a torch user writes: a map-style dataset decoding one PNG per item with Pillow."""

    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return np.asarray(im.convert("RGB")), int(self.labels[i])


#: Side of the "photographs" (upscaled CIFAR-10 images) decoded and resized back to 32x32.
PHOTO = 384


def best(fn, repeats):
    """The shortest of ``repeats`` runs of ``fn(i)`` (other jobs on the machine only add time)."""
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]),
                         out=RESULTS / "inputs.md")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--n-clusters", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=256, help="DataLoader batch size")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each measurement; the table shows the shortest (the fit: "
                         "one fewer)")
    args = parse_args(ap, argv)
    n_patches = 100_000
    if args.quick:
        args.n_images, args.n_clusters, n_patches, args.repeats = 200, 32, 5000, 1
    reps = max(1, args.repeats)

    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from featlearn import extract_features, load_image_folder
    from featlearn.cli import main as cli
    from featlearn.persistence import encoder_of, load_model

    print(machine())
    peak = gemm_rate()
    print(f"fp32 GEMM (torch.mm 4096^3): {peak:.1f} GFLOP/s")
    data = load_cifar10(args)
    n = args.n_images
    X, y = np.ascontiguousarray(data.X_train[:n]), data.y_train[:n]
    rows = []  # (what, seconds)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in ("PNG", "JPEG"):
            write_folder(tmp / fmt, X, y, data.target_names, fmt)
        write_folder(tmp / "photos", X, y, data.target_names, "JPEG", upscale=PHOTO)
        size_png = sum(f.stat().st_size for f in (tmp / "PNG").rglob("*.png"))
        # Decoding (each run with an empty cache): one thread, all cores (threads); the cache.
        for fmt in ("PNG", "JPEG"):
            for jobs in (1, -1):
                dt = best(lambda i: load_image_folder(tmp / fmt, n_jobs=jobs,
                                                      data_home=tmp / f"home-{fmt}{jobs}-{i}"),
                          reps)
                rows.append((f"`load_image_folder`, {fmt}, n_jobs={jobs} (decode, empty cache)",
                             dt))
        for jobs in (1, -1):
            dt = best(lambda i: load_image_folder(tmp / "photos", size=32, n_jobs=jobs,
                                                  data_home=tmp / f"home-photos{jobs}-{i}"),
                      reps)
            rows.append((f"`load_image_folder`, {PHOTO}x{PHOTO} JPEG, `size=32`, n_jobs={jobs} "
                         "(decode and resize, empty cache)", dt))
        cached = load_image_folder(tmp / "PNG", data_home=tmp / "home-PNG1-0")
        dt = best(lambda i: load_image_folder(tmp / "PNG", data_home=tmp / "home-PNG1-0"), reps)
        rows.append(("`load_image_folder`, PNG, cached", dt))
        order = [int(Path(f).stem) for f in cached.filenames]  # class by class
        assert np.array_equal(cached.images, X[order])  # PNG is lossless: the same pixels

        config = tmp / "small.json"
        config.write_text(json.dumps({"name": "small", "params": {
            "n_centroids": args.n_clusters, "classifier": "svm", "device": "cpu",
            "encoder__n_patches": n_patches, "encoder__kmeans__max_iter": 20,
            "classifier__max_iter": 200}}))
        model = tmp / "model.npz"

        def fit(i):
            assert cli(["fit", str(config), "--data", str(tmp / "PNG"), "--out", str(model),
                        "--with-classifier", "--data-home", str(tmp / f"home-fit-{i}"),
                        "-q"]) == 0

        def extract(i):
            assert cli(["extract", "--model", str(model), "--data", str(tmp / "PNG"), "--out",
                        str(tmp / f"folder-{i}.npy"), "--data-home", str(tmp / f"home-ext-{i}"),
                        "-q"]) == 0

        rows.append(("`featlearn fit --with-classifier` on the PNG folder (decode, dictionary, "
                     "encode, L2-SVM)", best(fit, max(1, reps - 1))))
        rows.append(("`featlearn extract` on the PNG folder (decode + encode)",
                     best(extract, reps)))

        encoder = encoder_of(load_model(model)).set_params(verbose=0)
        first = encoder_of(load_model(model)).set_params(verbose=0, channels="first")
        nchw = torch.from_numpy(X).permute(0, 3, 1, 2).contiguous()
        files = sorted((tmp / "PNG").rglob("*.png"), key=lambda p: p.name)  # index order

        class Files(FileDataset, Dataset):
            pass

        tensors = DataLoader(TensorDataset(nchw, torch.from_numpy(y)), batch_size=args.batch_size)
        decoding = DataLoader(Files(files, y), batch_size=args.batch_size,
                              collate_fn=lambda b: np.stack([img for img, _ in b]))
        ref = encoder.transform(X)  # also the warm-up
        # The folder's images come class by class: its features are those of the same images.
        np.testing.assert_allclose(np.load(tmp / "folder-0.npy"), ref[order], rtol=1e-5,
                                   atol=1e-4)
        cases = [
            ("`extract_features`, numpy array (the peer)", encoder, X),
            ("`extract_features`, `DataLoader(TensorDataset(uint8 NCHW tensor))`, "
             "`channels=\"first\"`", first, tensors),
            ("`extract_features`, `DataLoader` of a Dataset decoding the PNG files", encoder,
             decoding),
        ]
        for k, (what, enc, source) in enumerate(cases):
            def run(i):
                out = extract_features(enc, source, tmp / f"x{k}-{i}.npy", verbose=0)
                assert np.array_equal(out, ref)

            rows.append((what, best(run, reps)))
        rows.append(("`PatchEncoder.transform`, numpy array (the peer)",
                     best(lambda i: encoder.transform(X), reps)))
        rows.append(("`PatchEncoder.transform`, the `DataLoader` of tensors",
                     best(lambda i: first.transform(tensors), reps)))

    for what, dt in rows:
        print(f"{what}: {n} images in {dt:.2f} s = {n / dt:.0f} images/s")
    lines = header("Inputs: image folders, tensors and DataLoaders", argv=argv, gemm=peak,
                   quick=args.quick, script=__file__) + [
        f"{n} CIFAR-10 training images (32x32x3) written as PNG files ({size_png / 2**20:.1f} MB) "
        f"and as JPEG (quality 90) into one sub-folder per class, and once more as {PHOTO}x{PHOTO} "
        "JPEG files (bilinear upscales, standing in for photographs) decoded and resized back to "
        "32x32. Decoding threads (`n_jobs=-1`, what the command line uses) pay off on the larger "
        "files and cost a little on 32x32 ones. Dictionary: 6x6 patches, "
        f"{n_patches:,} of them, contrast normalization, ZCA, K={args.n_clusters} (Lloyd, 20 "
        f"iterations), triangle encoding, 2x2 sum pooling ({4 * args.n_clusters} features); "
        "L2-SVM (at most 200 L-BFGS iterations). DataLoaders: batch_size "
        f"{args.batch_size}, num_workers=0. Each time is the shortest of {reps} runs "
        f"({max(1, reps - 1)} for the fit), in this one process.",
        "",
        "| what | images | seconds | images/s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {what} | {n} | {dt:.2f} | {n / dt:,.0f} |" for what, dt in rows]
    by = dict(rows)
    array = by[cases[0][0]]
    lines += ["", "`extract_features` on a DataLoader reads it twice (a first pass hashes the "
              "images for the cache key, the second encodes them and checks they are the same). "
              "Time relative to the numpy array in the same run: " + "; ".join(
                  f"{w.split(', ', 1)[1]} **{by[w] / array:.2f}x**" for w, _, _ in cases[1:])
              + f". `PatchEncoder.transform` on the DataLoader: **"
              f"{by[rows[-1][0]] / by[rows[-2][0]]:.2f}x** the array's time."]
    write(args.out, lines)


if __name__ == "__main__":
    main()
