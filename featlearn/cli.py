"""The ``featlearn`` command: argument parsing, progress and result files; no numerics.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` and ``_run_<name>(args)``,
registered in :data:`_COMMANDS`; library imports happen inside the run functions so that
``featlearn --help`` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_data_args(p, *, required=True):
    p.add_argument("--data", required=required, metavar="ARCHIVE_OR_DIR",
                   help="cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder")
    p.add_argument("--md5", default=None,
                   help="expected md5 of the archive (default: not checked for a local file)")
    p.add_argument("--data-home", default=None,
                   help="where parsed arrays are cached (default $FEATLEARN_DATA or ~/featlearn_data)")


def load_data(args):
    """Load CIFAR-10 from the ``--data`` archive given on the command line."""
    from featlearn.datasets import fetch_cifar10

    return fetch_cifar10(args.data_home, archive=args.data, md5=args.md5)


# -- info ----------------------------------------------------------------------------------------

def _add_info(sub):
    p = sub.add_parser("info", help="load a CIFAR-10 archive, print its contents, and whiten a "
                                    "sample of its patches (a quick check of an install)")
    _add_data_args(p)
    p.add_argument("--n-patches", type=int, default=100_000)
    p.add_argument("--random-state", type=int, default=0)


def _run_info(args):
    import numpy as np

    from featlearn import PatchNormalizer, RandomPatchExtractor, ZCAWhitening

    t0 = time.perf_counter()
    data = load_data(args)
    print(f"archive: {data.archive}  ({time.perf_counter() - t0:.1f} s)")
    for split in ("train", "test"):
        X, y = data[f"X_{split}"], data[f"y_{split}"]
        counts = ", ".join(f"{n}={c}" for n, c in zip(data.target_names, np.bincount(y, minlength=10)))
        print(f"{split}: {X.shape} {X.dtype}; {counts}")
    t0 = time.perf_counter()
    patches = RandomPatchExtractor(n_patches=args.n_patches,
                                   random_state=args.random_state).transform(data.X_train)
    white = ZCAWhitening().fit(PatchNormalizer().transform(patches))
    ev = white.explained_variance_
    print(f"{len(patches)} random 6x6x3 patches normalized and ZCA-whitened in "
          f"{time.perf_counter() - t0:.2f} s; covariance eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g}")
    return 0


# -- reproduce -----------------------------------------------------------------------------------

def _add_reproduce(sub):
    from featlearn.pipeline import available_configs

    p = sub.add_parser(
        "reproduce", help="train a pipelines/ configuration on CIFAR-10's 50,000 training images, "
                          "test on its 10,000 test images, and write results and pictures",
        description="Configurations: " + ", ".join(available_configs()))
    p.add_argument("config", metavar="CONFIG", help="a name from pipelines/ or a JSON file")
    _add_data_args(p)
    p.add_argument("--out", default=None, help="folder for results.json/.md and the PNGs "
                                               "(default: results/CONFIG)")
    p.add_argument("--cache", default=None, help="joblib.Memory folder caching encoded features")
    p.add_argument("--device", default=None, help="torch device (default: the config's, 'auto')")
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images "
                                                             "(smoke runs; default all)")
    p.add_argument("--n-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--quiet", action="store_true")


def _run_reproduce(args):
    from pathlib import Path

    from featlearn.pipeline import load_config
    from featlearn.reproduce import results_markdown, run

    config = load_config(args.config)
    data = load_data(args)
    out = Path(args.out) if args.out else Path("results") / config["name"]
    results, _ = run(config, data, out=out, cache=args.cache, device=args.device,
                     n_train=args.n_train, n_test=args.n_test, verbose=0 if args.quiet else 1)
    print(results_markdown(results))
    print(f"results written to {out}/")
    return 0


_COMMANDS = [
    ("info", _add_info, _run_info),
    ("reproduce", _add_reproduce, _run_reproduce),
]


def build_parser() -> argparse.ArgumentParser:
    from featlearn import __version__

    parser = argparse.ArgumentParser(
        prog="featlearn",
        description="Coates-Ng single-layer feature learning (k-means features) on CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"featlearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add, run in _COMMANDS:
        add(sub)
        sub.choices[name].set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        print(f"featlearn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
