"""The ``featlearn`` command: argument parsing, progress and result files; no numerics.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` and ``_run_<name>(args)``,
registered in :data:`_COMMANDS`; library imports happen inside the run functions so that
``featlearn --help`` never loads torch.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
import warnings


def _positive_int(text):
    """argparse type: an int >= 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _n_jobs(text):
    """argparse type: a positive int, or -1 for every CPU (joblib's convention)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1 (all CPUs), got {text!r}")
    return value


def _batch_size(text):
    """argparse type: "auto" or a positive int."""
    return "auto" if text == "auto" else _positive_int(text)


def _image_size(text):
    """argparse type: ``N`` (N x N pixels) or ``HxW`` (height x width)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW (pixels), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


_FOLDER_HELP = ("a folder of images with one sub-folder per class (labels are the sub-folder "
                "names)")


def _add_data_args(p, *, metavar="ARCHIVE_OR_DIR",
                   help="cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder, or "
                        "a folder holding train/ and test/ image folders (each one sub-folder "
                        "per class)"):
    p.add_argument("--data", required=True, metavar=metavar, help=help)
    p.add_argument("--md5", default=None,
                   help="expected md5 of the archive (default: not checked for a local file)")
    p.add_argument("--data-home", default=None,
                   help="where parsed arrays and decoded images are cached (default "
                        "$FEATLEARN_DATA or ~/featlearn_data)")
    p.add_argument("--size", type=_image_size, default=None, metavar="N|HxW",
                   help="image folders: resize every image to N x N (or H x W) pixels; needed "
                        "when the images differ in size")
    p.add_argument("--grayscale", action="store_true",
                   help="image folders: one channel instead of RGB")
    p.add_argument("--skip-bad", action="store_true",
                   help="image folders: skip files that are not readable images (how many is "
                        "reported) instead of stopping at the first")


def _folder_options(args) -> dict:
    """The image-folder and cache options of ``--data`` (see :mod:`featlearn.data_paths`)."""
    return dict(data_home=args.data_home, md5=args.md5, size=args.size,
                grayscale=args.grayscale, skip_bad=args.skip_bad)


#: Commands that need a test split: for them a single image folder (no train/ and test/) is an
#: error; for the others it is the training split.
_NEEDS_TEST = {"reproduce"}


def load_data(args):
    """The ``--data`` dataset as ``fetch_cifar10``'s Bunch (:func:`featlearn.data_paths.load_dataset`).
    For ``info``, a single image folder is the training split and ``X_test`` is None."""
    from featlearn.data_paths import load_dataset

    command = getattr(args, "command", None)
    needs_test = f"'featlearn {command}'" if command in _NEEDS_TEST else None
    return load_dataset(args.data, needs_test=needs_test, **_folder_options(args))


# -- info ----------------------------------------------------------------------------------------

def _add_info(sub, parent):
    p = sub.add_parser("info", parents=[parent],
                       help="load a CIFAR-10 archive, print its contents, and whiten a sample of "
                            "its patches (a quick check of an install)")
    _add_data_args(p)
    p.add_argument("--n-patches", type=_positive_int, default=100_000)
    p.add_argument("--random-state", type=int, default=0)


def _run_info(args):
    import numpy as np

    from featlearn import PatchNormalizer, RandomPatchExtractor, ZCAWhitening

    t0 = time.perf_counter()
    data = load_data(args)
    print(f"archive: {data.archive}  ({time.perf_counter() - t0:.1f} s)")
    for split in ("train", "test"):
        X, y = data[f"X_{split}"], data[f"y_{split}"]
        if X is None:
            continue
        counts = ", ".join(f"{n}={c}" for n, c in zip(
            data.target_names, np.bincount(y, minlength=len(data.target_names))))
        print(f"{split}: {X.shape} {X.dtype}; {counts}")
    t0 = time.perf_counter()
    patches = RandomPatchExtractor(n_patches=args.n_patches,
                                   random_state=args.random_state).transform(data.X_train)
    white = ZCAWhitening().fit(PatchNormalizer().transform(patches))
    ev = white.explained_variance_
    print(f"{len(patches)} random 6x6x{data.X_train.shape[-1]} patches normalized and ZCA-whitened in "
          f"{time.perf_counter() - t0:.2f} s; covariance eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g}")
    return 0


# -- reproduce -----------------------------------------------------------------------------------

def _add_reproduce(sub, parent):
    p = sub.add_parser(
        "reproduce", parents=[parent],
        help="train a pipelines/ configuration on CIFAR-10's 50,000 training images (or an "
             "image folder's train/), test on its 10,000 test images (test/), and write "
             "results and pictures")
    _lazy_description(p, _configs_description)
    p.add_argument("config", metavar="CONFIG", help="a name from pipelines/ or a JSON file")
    _add_data_args(p)
    p.add_argument("--out", default=None,
                   help="folder for results.json/.md and the PNGs (default: results/CONFIG); "
                        "an existing folder must be empty or hold featlearn results")
    p.add_argument("--force", action="store_true",
                   help="write into an existing --out folder that does not hold featlearn results")
    p.add_argument("--cache", default=None, help="joblib.Memory folder caching encoded features")
    p.add_argument("--device", default=None, help="torch device (default: the config's, 'auto')")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help="use the first N training images (smoke runs; default all)")
    p.add_argument("--n-test", type=_positive_int, default=None,
                   help="use the first N test images")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_param_override,
                   metavar="PARAM=VALUE",
                   help="override one of the configuration's params (VALUE is JSON, else a "
                        "string), e.g. --set n_centroids=16 --set encoder__n_patches=2000; "
                        "recorded in results.json (repeatable)")


def _param_override(text):
    """argparse type: ``PARAM=VALUE`` with VALUE parsed as JSON (a bare word stays a string)."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"expected PARAM=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _configs_description():
    from featlearn.pipeline import available_configs

    return "Configurations: " + ", ".join(available_configs())


def _lazy_description(parser, make):
    """Compute ``parser``'s description only when its help is shown (it may import heavy modules)."""
    format_help = parser.format_help

    def lazy():
        parser.description = make()
        return format_help()

    parser.format_help = lazy


def _run_reproduce(args):
    from pathlib import Path

    from featlearn.pipeline import load_config
    from featlearn._torch import resolve_device
    from featlearn.reproduce import run
    from featlearn.results import default_results_dir, prepare_results_dir, results_markdown

    config = load_config(args.config)
    if args.overrides:
        config = {**config, "params": {**config["params"], **dict(args.overrides)}}
    if args.out is not None:
        out = Path(args.out)
    else:
        Path("results").mkdir(exist_ok=True)
        out = default_results_dir(config["name"], "results")
    if args.device is not None:  # a typo is a one-line error before any work
        resolve_device(args.device)
    # Before loading data or fitting: a long run must not end in a refused or failed write.
    created = not out.exists()
    out = prepare_results_dir(out, overwrite=args.force)
    try:
        data = load_data(args)
        results, _ = run(config, data, out=out, cache=args.cache, device=args.device,
                         n_train=args.n_train, n_test=args.n_test, overwrite=args.force,
                         verbose=args.verbose)
    except BaseException:
        if created:  # leave no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    print(results_markdown(results))
    print(f"results written to {out}/")
    return 0


# -- fit / extract -------------------------------------------------------------------------------

def _add_images_args(p):
    _add_data_args(p, metavar="ARCHIVE_DIR_OR_NPY",
                   help="cifar-10-python.tar.gz (or its extracted folder); " + _FOLDER_HELP +
                        ", or one holding train/ and test/ such folders; or an .npy array of "
                        "images (n, H, W[, C]), which is memory-mapped rather than loaded")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which split to use: CIFAR-10's, or an image folder's train/ or test/ "
                        "(ignored for an .npy file and a single image folder; default train)")
    p.add_argument("--channels", choices=("last", "first"), default="last",
                   help="layout of an .npy file's 4-D images: last (n, H, W, C, default) or "
                        "first (n, C, H, W, the torch layout)")


def load_images(args, *, labels=False, shuffle=False):
    """Images (and labels if asked) of ``--split`` from ``--data``
    (:func:`featlearn.data_paths.load_split`)."""
    from featlearn.data_paths import load_split

    return load_split(args.data, args.split, labels=labels,
                      labels_file=getattr(args, "labels", None), channels=args.channels,
                      shuffle=shuffle, **_folder_options(args))


def _add_fit(sub, parent):
    def positive_int(text):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        return value

    p = sub.add_parser("fit", parents=[parent],
                       help="fit the encoder (and optionally the classifier) of a pipelines/ "
                            "configuration and save it",
                       description="The default --format safe saves arrays + JSON, which load "
                                   "without running code. --format pickle saves any pipeline, "
                                   "but loading a pickle runs code: only load pickles you trust.")
    p.add_argument("config", metavar="CONFIG", help="a name from pipelines/ or a JSON file")
    _add_images_args(p)
    p.add_argument("--out", required=True, help="model file to write (e.g. model.npz); an "
                                                "existing file is replaced only if it is a "
                                                "featlearn model, or with --force")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is not a featlearn model (never an input)")
    p.add_argument("--format", choices=("safe", "pickle"), default="safe",
                   help="safe (default): arrays + JSON, loading runs no code; pickle: any "
                        "pipeline, but loading a pickle runs code, so load only pickles you "
                        "trust (extract --allow-pickle)")
    p.add_argument("--with-classifier", action="store_true",
                   help="also fit the classifier (needs labels: a CIFAR-10 archive, an image "
                        "folder or --labels)")
    p.add_argument("--labels", default=None, help="labels .npy for an .npy --data")
    p.add_argument("--n-train", type=positive_int, default=None,
                   help="use only the first N images (N > 0)")
    p.add_argument("--device", default=None, help="torch device (default: the config's)")


def _run_fit(args):
    import featlearn
    from featlearn._io import check_output
    from featlearn.persistence import check_saveable, is_model_file, save_model
    from featlearn.pipeline import build_pipeline, image_encoder, load_config

    config = load_config(args.config)
    if "members" in config:
        raise ValueError(f"configuration {config['name']!r} averages {len(config['members'])} "
                         "pipelines, each with its own encoder, and a model file holds one: "
                         f"run `featlearn reproduce {config['name']}`, or fit one member's "
                         "params as a configuration of its own")
    inputs = [args.data, args.labels]
    # Everything that can be checked before the (long) fit is: the output, then the model's classes.
    check_output(args.out, inputs=inputs, is_ours=is_model_file, overwrite=args.force,
                 what="model file")
    pipe = build_pipeline(config, device=args.device, verbose=args.verbose)
    model = pipe if args.with_classifier else image_encoder(pipe)
    check_saveable(model, format=args.format)
    if args.with_classifier:
        X, y = load_images(args, labels=True, shuffle=True)
    else:
        X, y = load_images(args, shuffle=True), None
    if args.n_train is not None:
        X = X[:args.n_train]
        y = None if y is None else y[:args.n_train]
    t0 = time.perf_counter()
    if y is None:
        model.fit(X)
    else:
        model.fit(X, y)
    seconds = time.perf_counter() - t0
    save_model(model, args.out, config=config, format=args.format, overwrite=args.force,
               inputs=inputs, data=str(args.data), split=args.split, n_images=int(len(X)),
               with_classifier=bool(args.with_classifier), fit_seconds=round(seconds, 3))
    what = "pipeline (encoder + classifier)" if args.with_classifier else "encoder"
    print(f"fitted the {what} of {config['name']} on {len(X)} images in {seconds:.1f} s "
          f"(featlearn {featlearn.__version__}) -> {args.out}")
    return 0


def _add_extract(sub, parent):
    p = sub.add_parser("extract", parents=[parent],
                       help="encode images with a saved model into an .npy feature file (cached "
                            "and resumable: rerun after an interruption)")
    p.add_argument("--model", required=True, help="a model saved by 'featlearn fit'")
    p.add_argument("--allow-pickle", action="store_true", help="a pickle runs code: trusted only")
    _add_images_args(p)
    p.add_argument("--out", required=True,
                   help="features .npy to write; an existing file is replaced only if it is an "
                        "earlier 'featlearn extract' result (see --force), never --data or --model")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not a featlearn extraction result")
    p.add_argument("--mirror", action="store_true",
                   help="encode the horizontally mirrored images instead of the images")
    p.add_argument("--n-jobs", type=_n_jobs, default=None,
                   help="chunks encoded in parallel (joblib; -1: all CPUs; default one at a time)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per chunk, the unit of resumption (default auto)")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="stored features' dtype (default: the model's, float32); float16 halves "
                        "the file")
    p.add_argument("--no-resume", action="store_true", help="recompute even a finished job")


def _run_extract(args):
    from featlearn.extraction import extract_features
    from featlearn.persistence import encoder_of, load_model

    encoder = encoder_of(load_model(args.model, allow_pickle=args.allow_pickle))
    params = getattr(encoder, "get_params", dict)()
    if args.device is not None and "device" in params:
        encoder.set_params(device=args.device)
    if args.dtype is not None:
        if "dtype" not in params:
            raise ValueError(f"--dtype: the model's encoder ({type(encoder).__name__}) has no "
                             "dtype parameter; leave --dtype out")
        encoder.set_params(dtype=args.dtype)
    features = extract_features(encoder, load_images(args), args.out, batch_size=args.batch_size,
                                n_jobs=args.n_jobs, resume=not args.no_resume, mirror=args.mirror,
                                overwrite=args.force, inputs=(args.data, args.model),
                                verbose=args.verbose)
    if not args.verbose:
        print(f"{args.out}: {' x '.join(map(str, features.shape))} {features.dtype.name}")
    return 0


_COMMANDS = [
    ("info", _add_info, _run_info),
    ("reproduce", _add_reproduce, _run_reproduce),
    ("fit", _add_fit, _run_fit),
    ("extract", _add_extract, _run_extract),
]


def _verbosity_parent() -> argparse.ArgumentParser:
    """-v/-q for every subcommand: 0 silent, 1 a bar per stage (default), 2+ per-iteration lines."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=1,
                       help="more messages (-vv: per-iteration detail)")
    group.add_argument("-q", "--quiet", dest="verbose", action="store_const", const=0,
                       help="no progress bars or messages, only the result")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from featlearn import __version__

    parser = argparse.ArgumentParser(
        prog="featlearn",
        description="Coates-Ng single-layer feature learning (k-means features) on CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"featlearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parent = _verbosity_parent()
    for name, add, run in _COMMANDS:
        add(sub, parent)
        sub.choices[name].set_defaults(_run=run)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that temporary files are cleaned up on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _message(exc) -> str:
    """One line for an expected error, in the command line's own words."""
    from featlearn.datasets import ChecksumError

    msg = str(exc)
    if isinstance(exc, ChecksumError):  # the library says md5=None; the CLI user has --md5
        msg = re.sub(r"\s*\(?pass md5=None[^)]*\)?", "", msg).rstrip(" ;.")
        msg += "; check the --md5 value (without --md5 a local archive is not checked)"
    elif isinstance(exc, OSError) and exc.strerror:  # without the "[Errno 17]" prefix
        msg = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    return " ".join(msg.split()) or type(exc).__name__


def main(argv=None) -> int:
    """Run the ``featlearn`` command; every expected error is one line on stderr.

    Exit codes: 0 success, 1 an error (``featlearn CMD: error: MESSAGE``), 2 a usage error
    (argparse), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    prefix = f"featlearn {args.command}: error:"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"featlearn {args.command}: warning: {' '.join(str(message).split())}\n")
    try:
        return int(args._run(args) or 0)
    except _Terminated:
        print(f"{prefix} terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:  # incl. OutputExistsError, ExtractionError, DatasetError
        print(f"{prefix} {_message(exc)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.formatwarning = format_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
