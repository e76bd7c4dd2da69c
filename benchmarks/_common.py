"""What every benchmark script shares: the data flags, the machine line, the GEMM rate, the command
(and, for the contention benchmarks, the competing job: :class:`Competitor`).

Every script takes the same flags (``--data``, ``--md5``, ``--data-home``, ``--out``,
``--quick``), and every results table starts with :func:`header`: the command that produced it,
the CPU or GPU, and the machine's float32 GEMM rate measured in the same run. The 2-core
machines these run on differ by up to 6x in raw speed, so a table without its machine and its
GEMM rate cannot be compared with another. Parse with :func:`parse_args`: a ``--quick`` run
writes only to an ``--out`` given explicitly, so smoke numbers never replace a results file.
No machine path is written in a script: the default archive is found beside the checkout
(``$FEATLEARN_CIFAR10`` or ``--data`` point elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: The shared JPEG-75 copy of CIFAR-10 beside the checkout, and its md5 (its README).
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg75" / "cifar-10-python.tar.gz"
DEFAULT_MD5 = "bd43d2a3421d9a4f9a66309ec8f698ed"


def add_common_args(parser: argparse.ArgumentParser, *, out: Path | None = None):
    """``--data``, ``--md5``, ``--data-home``, ``--out`` and ``--quick``, the same everywhere."""
    parser.add_argument("--data", default=os.environ.get("FEATLEARN_CIFAR10", str(DEFAULT_ARCHIVE)),
                        help="cifar-10-python.tar.gz (default $FEATLEARN_CIFAR10, else the shared "
                             "JPEG-75 copy beside the checkout)")
    parser.add_argument("--md5", default=DEFAULT_MD5,
                        help="expected md5 of --data ('' skips the check)")
    parser.add_argument("--data-home", default=None,
                        help="where parsed arrays are cached (default $FEATLEARN_DATA)")
    where = f"default {_show(out)}; " if out is not None else "default: none; "
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown results file ({where}'' to skip writing; a --quick run "
                             "writes only to an --out given explicitly)")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run with tiny sizes (its numbers are not results)")
    parser.set_defaults(_default_out=out)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None):
    """``parser.parse_args(argv)`` with ``--out`` resolved: an explicit ``--out`` wins; otherwise
    the script's results file, except for ``--quick`` (smoke numbers never replace results)."""
    args = parser.parse_args(argv)
    default = vars(args).pop("_default_out", None)
    if args.out is None and not args.quick:
        args.out = default
    return args


def writes(out) -> bool:
    """Whether ``out`` names a file to write (not None, '' or '.')."""
    return bool(out) and str(out) not in ("", ".")


def _show(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def load_cifar10(args):
    from featlearn import fetch_cifar10

    return fetch_cifar10(args.data_home, archive=args.data, md5=args.md5 or None)


def machine() -> str:
    """The CPU model (or CUDA device), core count and torch's thread count, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    line = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name(0)}"
    return line


def gemm_rate(n=4096, repeats=3, device="cpu", dtype="float32") -> float:
    """Best-of-``repeats`` ``torch.mm`` rate at ``n^3`` in ``dtype``, in GFLOP/s (the library's
    own yardstick, :func:`featlearn._torch.gemm_rate`, which ``featlearn reproduce`` records)."""
    import torch

    from featlearn._torch import gemm_rate as rate

    return rate(n, repeats, device, getattr(torch, dtype))


def gemm_rates(device="cpu", int8=False) -> dict:
    """``{"float32": GFLOP/s, "bfloat16": GFLOP/s}`` measured now, and whether bfloat16 is native
    here (``"bfloat16_native"``): each encoder row is compared with the GEMM of its own
    precision, since a bfloat16 kernel against a float32 GEMM flatters itself. ``int8``: also
    ``"int8"``, ``torch._int_mm``'s GOP/s where int8 products are native (else None)."""
    import torch

    from featlearn._torch import has_fast_bfloat16, has_fast_int8

    dev = torch.device(device)
    native = has_fast_bfloat16(dev)
    # Emulated bfloat16 runs at a few GFLOP/s: one 1024^3 product says so in seconds.
    n, repeats = (4096, 3) if native else (1024, 1)
    rates = {"float32": gemm_rate(device=device),
             "bfloat16": gemm_rate(n, repeats, device=device, dtype="bfloat16"),
             "bfloat16_n": n, "bfloat16_native": native}
    if int8:
        rates["int8"] = gemm_rate(device=device, dtype="int8") if has_fast_int8(dev) else None
    return rates


def gemm_lines(rates) -> list[str]:
    """The GEMM lines of a results header, from :func:`gemm_rates`."""
    native = "native" if rates["bfloat16_native"] else "emulated by torch: not native here"
    lines = [f"float32 GEMM rate measured in the same run (torch.mm 4096^3): "
             f"{rates['float32']:.1f} GFLOP/s.",
             f"bfloat16 GEMM rate measured in the same run (torch.mm {rates['bfloat16_n']}^3, "
             f"{native}): "
             f"{rates['bfloat16']:.1f} GFLOP/s."]
    if "int8" in rates:
        lines.append("int8 GEMM rate measured in the same run (torch._int_mm 4096^3, int32 "
                     "sums): " + ("not native here (no VNNI or AMX-INT8): not measured."
                                  if rates["int8"] is None else f"{rates['int8']:.1f} GOP/s."))
    return lines


def command(argv=None, script=None) -> str:
    """The command line that ran this script, as a user would retype it from the repo root.

    ``argv`` defaults to ``sys.argv[1:]`` and ``script`` to ``sys.argv[0]``; a script's ``main``
    passes its own ``__file__``, so a call from Python (a test) records the script, not pytest.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    script = Path(sys.argv[0] if script is None else script).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *map(str, args)])


def header(title: str, *, argv=None, gemm: float | dict | None = None, quick=False,
           script=None) -> list[str]:
    """The first lines of every results table: title, command, machine and GEMM rate(s)
    (a float: the float32 rate; a dict from :func:`gemm_rates`: both precisions)."""
    lines = [f"# {title}" + (" (QUICK smoke run: not the results)" if quick else ""), "",
             "```", command(argv, script), "```", "", f"Machine: {machine()}."]
    if isinstance(gemm, dict):
        lines += gemm_lines(gemm)
    elif gemm is not None:
        lines.append(f"float32 GEMM rate measured in the same run (torch.mm 4096^3): "
                     f"{gemm:.1f} GFLOP/s.")
    return lines + [""]


def write(out, lines):
    """Write the table (unless ``out`` is empty) and say where."""
    if not writes(out):
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


#: The competitor: float32 GEMMs on every core until SIGTERM, then its rate on stdout.
COMPETITOR = """
import signal, sys, time, torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024); out = torch.empty(1024, 1024)
n, t0 = 0, time.perf_counter()
def done(*_):
    print(f"COMPETITOR {{2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9:.1f}}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("READY", flush=True)
while True:
    torch.mm(a, b, out=out); n += 1
"""


class Competitor:
    """The competing job, started on entry and stopped on exit; ``rate`` is its GFLOP/s."""

    def __init__(self, threads):
        self.threads, self.rate = threads, None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(threads=self.threads)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "READY"
        time.sleep(1.0)  # let it reach its steady state
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        lines = [ln for ln in out.splitlines() if ln.startswith("COMPETITOR ")]
        self.rate = float(lines[-1].split()[1]) if lines else float("nan")
