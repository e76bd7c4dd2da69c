"""Test accuracy against end-to-end minutes for every committed configuration run.

Reads the folders ``featlearn reproduce CONFIG --out benchmarks/results/CONFIG`` wrote
(``results.json`` for the numbers, ``COMMAND.md`` for the machine) and writes ``frontier.png``
and ``frontier.md`` there, so a user can pick a configuration for a time budget; with the
default ``--results`` it also rewrites the block of README.md between ``<!-- frontier:start -->``
and ``<!-- frontier:end -->``. Only recorded numbers are shown: a missing one is "-". The runs
come from different CPUs, so each row names its CPU and the float32 GEMM rate recorded with it.

A folder whose name is not its configuration's (``first-look``) is a run of another
configuration, not a configuration's results: it is left out with a note. A configuration run
on fewer images than CIFAR-10's 50,000/10,000, or on cached features, is shown but marked and
kept off the Pareto frontier: its accuracy or its minutes are not the configuration's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from _common import REPO, RESULTS, command, write

README = REPO / "README.md"

#: CIFAR-10's full training and test sets: a run on fewer images is a reduced run.
FULL_TRAIN, FULL_TEST = 50_000, 10_000
START, END = "<!-- frontier:start -->", "<!-- frontier:end -->"
#: Keys a results.json may name its CPU under (``featlearn reproduce`` writes none yet).
CPU_KEYS = ("cpu", "cpu_name", "machine")


def _machine_paragraph(text: str) -> str:
    """The first ``Machine:`` paragraph of the part of COMMAND.md that describes these files
    (the part before its first ``## `` heading, where the earlier runs are)."""
    head = re.split(r"^## ", text, maxsplit=1, flags=re.M)[0]
    m = re.search(r"^Machine:(.*?)(?:\n\s*\n|\Z)", head, flags=re.M | re.S)
    return " ".join(m.group(1).split()) if m else ""


def cpu_label(machine: str) -> str | None:
    """A short CPU name from a COMMAND.md machine line: cores, vendor and model, and the matrix
    extension that decides its bfloat16 speed (AMX, AVX-512 BF16, AVX-512 or AVX2)."""
    m = re.search(r"\b(?:Intel|AMD|Apple|Ampere|ARM|Arm)\b[^,;.()]*", machine)
    if not m:
        return None
    name = re.split(r"\s+with\s+", m.group(0).strip())[0].strip()
    cores = re.search(r"(\d+)[- ]cores?\b", machine)
    if cores:
        name = f"{cores.group(1)}-core {name}"
    if re.search(r"(?<!no )AMX", machine):
        ext = "AMX-BF16"
    elif re.search(r"avx512_bf16|native bfloat16", machine, flags=re.I):
        ext = "AVX-512 BF16"
    elif re.search(r"(?<!no )AVX-?512", machine):
        ext = "AVX-512"
    elif "AVX2" in machine:
        ext = "AVX2"
    else:
        return name
    return f"{name}, {ext}"


def _gemm_from_text(machine: str):
    m = re.search(r"([\d.]+)\s*GFLOP/s", machine)
    return float(m.group(1)) if m else None


def read_run(folder: Path) -> dict | None:
    """One results folder as a row (None if it has no results.json)."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    text = (folder / "COMMAND.md").read_text() if (folder / "COMMAND.md").is_file() else ""
    machine = _machine_paragraph(text)
    head = re.split(r"^## ", text, maxsplit=1, flags=re.M)[0]
    cpu = next((res[k] for k in CPU_KEYS if res.get(k)), None) or cpu_label(machine)
    gemm, gemm_source = res.get("gemm_gflops"), "run"
    if gemm is None:
        gemm, gemm_source = _gemm_from_text(machine), "COMMAND.md"
    total = res.get("total_seconds")
    acc = res.get("test_accuracy")
    n_train, n_test = res.get("n_train"), res.get("n_test")
    notes = []
    reduced = ((n_train is not None and n_train < FULL_TRAIN)
               or (n_test is not None and n_test < FULL_TEST))
    if reduced:
        notes.append(f"reduced run: {n_train:,} training, {n_test:,} test images")
    if res.get("features_from_cache"):
        notes.append("features loaded from a cache: not end to end")
    if "upper bound" in head:
        notes.append("cores shared during the run: minutes are an upper bound")
    if gemm is not None and gemm_source != "run":
        notes.append("GEMM rate from COMMAND.md (measured before the run, not by it)")
    return {
        "folder": folder.name,
        "config": res.get("config", folder.name),
        "test_pct": None if acc is None else 100 * acc,
        "minutes": None if total is None else total / 60,
        "peak_gb": res.get("peak_rss_gb"),
        "cpu": cpu,
        "gemm": gemm,
        "eligible": not reduced and not res.get("features_from_cache")
                    and acc is not None and total is not None,
        "notes": notes,
    }


def collect(results_dir: Path):
    """(rows, excluded): each configuration folder's row, and (folder, reason) for the rest."""
    rows, excluded = [], []
    for folder in sorted(p for p in Path(results_dir).iterdir() if p.is_dir()):
        row = read_run(folder)
        if row is None:
            continue
        if row["config"] != folder.name:
            excluded.append((folder.name, f"a run of `{row['config']}`, not a configuration's "
                             "folder" + (f" ({row['notes'][0]})" if row["notes"] else "")))
            continue
        rows.append(row)
    mark_frontier(rows)
    rows.sort(key=lambda r: (r["minutes"] is None, r["minutes"] or 0, r["config"]))
    return rows, excluded


def mark_frontier(rows):
    """Set ``frontier``: no other eligible run is at least as accurate in at most the minutes
    and strictly better in one of the two."""
    pts = [r for r in rows if r["eligible"]]
    for r in rows:
        r["frontier"] = r["eligible"] and not any(
            o is not r and o["minutes"] <= r["minutes"] and o["test_pct"] >= r["test_pct"]
            and (o["minutes"] < r["minutes"] or o["test_pct"] > r["test_pct"]) for o in pts)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cpus(rows):
    return sorted({r["cpu"] or "-" for r in rows})


def table_lines(rows, excluded):
    """The Markdown table, sorted by minutes, and its notes."""
    lines = ["| configuration | test % | end-to-end min | peak GB | CPU | GEMM GFLOP/s | "
             "on the frontier | notes |", "|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| `{r['config']}` | {_fmt(r['test_pct'], '.2f')} | "
                     f"{_fmt(r['minutes'], '.1f')} | {_fmt(r['peak_gb'], '.2f')} | "
                     f"{r['cpu'] or '-'} | {_fmt(r['gemm'], '.1f')} | "
                     f"{'yes' if r['frontier'] else 'no'} | {'; '.join(r['notes']) or '-'} |")
    lines += ["", "Minutes are `total_seconds` of each folder's `results.json` (from loading the "
              "data to the written results, inside the job); peak GB its `peak_rss_gb`; the CPU "
              "is the machine line of its `COMMAND.md`, the GEMM rate the float32 `torch.mm` "
              "rate recorded with the run. A run is on the frontier when no other full-scale "
              "run is at least as accurate in no more minutes."]
    if len(cpus(rows)) > 1:
        lines += ["", f"**The runs come from {len(cpus(rows))} different CPUs** "
                  f"({'; '.join(cpus(rows))}): their minutes compare machines as well as "
                  "configurations; the GEMM rate says how fast each machine was."]
    for folder, reason in excluded:
        lines += ["", f"Not shown: `{folder}/`, {reason}."]
    return lines


def markdown(rows, excluded, argv=None):
    return (["# Choosing a configuration for a time budget", "",
             "Written by this command from the results folders:", "", "```",
             command(argv, script=__file__), "```", "", "![accuracy against minutes](frontier.png)",
             ""] + table_lines(rows, excluded))


def plot(rows, out_png: Path):
    """Accuracy (%) against minutes on a log axis, one labelled point per run, the frontier as a
    step line; colour and marker by CPU, hollow markers for runs kept off the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["minutes"] is not None and r["test_pct"] is not None]
    names = cpus(shown)
    colours = plt.get_cmap("tab10").colors
    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for i, cpu in enumerate(names):
        for full in (True, False):
            pts = [r for r in shown if (r["cpu"] or "-") == cpu and r["eligible"] == full]
            if not pts:
                continue
            ax.scatter([r["minutes"] for r in pts], [r["test_pct"] for r in pts], s=60, zorder=3,
                       marker=markers[i % len(markers)], edgecolors=colours[i % 10],
                       facecolors=colours[i % 10] if full else "none", linewidths=1.5,
                       label=cpu + ("" if full else " (reduced or cached: off the frontier)"))
    front = sorted((r for r in shown if r["frontier"]), key=lambda r: r["minutes"])
    if front:
        xs = [r["minutes"] for r in front]
        ys = [r["test_pct"] for r in front]
        ax.step(xs + [xs[-1] * 1.6], ys + [ys[-1]], where="post", color="0.4", lw=1.2,
                ls="--", zorder=2, label="Pareto frontier")
    _label_points(ax, shown)
    ax.set_xscale("log")
    lo = min((r["minutes"] for r in shown), default=1)
    hi = max((r["minutes"] for r in shown), default=10)
    ax.set_xlim(lo / 1.6, hi * 2.2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("end-to-end minutes (log scale)")
    ax.set_ylabel("CIFAR-10 test accuracy, % (JPEG-75 copy)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("featlearn configurations: CIFAR-10 test accuracy against end-to-end minutes\n"
                 "runs on " + " and ".join(names), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, metadata={"Software": None})
    plt.close(fig)


def _label_points(ax, rows):
    """Each point's configuration name beside it, from the most accurate down: a label that
    would land near one already placed (in log-minutes and accuracy) goes to another side."""
    options = [(7, 3, "left"), (7, -11, "left"), (-7, 3, "right"), (-7, -11, "right")]
    placed = []
    for r in sorted(rows, key=lambda r: (-r["test_pct"], r["minutes"])):
        x, y = math.log10(r["minutes"]), r["test_pct"]
        spots = [(x + (0.12 if dx > 0 else -0.12), y + (0.4 if dy > 0 else -0.8))
                 for dx, dy, _ in options]
        i = next((i for i, (lx, ly) in enumerate(spots)
                  if all(abs(lx - px) > 0.3 or abs(ly - py) > 0.9 for px, py in placed)), 0)
        placed.append(spots[i])
        ax.annotate(r["config"], (r["minutes"], y), xytext=options[i][:2],
                    textcoords="offset points", ha=options[i][2], fontsize=8)


def replace_block(readme: Path, block: list[str]) -> bool:
    """Rewrite the lines between the frontier markers; False (nothing written) without them."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    new = before + START + "\n" + "\n".join(block) + "\n" + END + after
    if new != text:
        readme.write_text(new)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the folder of <config>/ results folders (default benchmarks/results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where frontier.png and frontier.md go (default: --results)")
    parser.add_argument("--readme", default=None,
                        help="README whose frontier block to rewrite (default README.md with the "
                             "default --results, else none; '' for none)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    readme = args.readme
    if readme is None:
        readme = str(README) if args.results.resolve() == RESULTS.resolve() else ""
    rows, excluded = collect(args.results)
    if not rows:
        raise SystemExit(f"no results folders with results.json under {args.results}")
    plot(rows, out / "frontier.png")
    print(f"wrote {out / 'frontier.png'}")
    write(out / "frontier.md", markdown(rows, excluded, argv))
    if readme:
        if not replace_block(Path(readme), _readme_block(rows, excluded)):
            raise SystemExit(f"{readme} has no {START} ... {END} block")
        print(f"rewrote the frontier block of {readme}")
    return rows


def _readme_block(rows, excluded):
    return (["", "![test accuracy against end-to-end minutes](benchmarks/results/frontier.png)",
             ""] + table_lines(rows, excluded)
            + ["", "Written by `python benchmarks/frontier.py` from `benchmarks/results/*/`; "
               "re-run it after a new results folder lands.", ""])


if __name__ == "__main__":
    main()
