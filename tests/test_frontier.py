"""benchmarks/frontier.py on a fake results folder: rows, Pareto flags, the PNG and README block."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

XEON = ("Machine: 2-core Intel Xeon with AVX-512, AMX-BF16 and avx512_bf16, torch 2.13.0+cpu (2\n"
        "threads), 24 GB; float32 GEMM rate measured by the run 400.0 GFLOP/s.\n")
EPYC = ("Machine: AMD EPYC, 2 cores, torch 2.13.0+cpu (2 threads); AVX2, no AVX-512. float32 GEMM\n"
        "rate (measured just before the run by the same job script): 120.5 GFLOP/s. The run\n"
        "shared the two cores, so its stage times are upper bounds.\n")


@pytest.fixture
def frontier(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("frontier", BENCHMARKS / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root, folder, acc, seconds, *, config=None, machine=XEON, n_train=50000, gemm=400.0,
         peak=2.5, **extra):
    d = root / folder
    d.mkdir(parents=True)
    res = {"config": config or folder, "test_accuracy": acc, "total_seconds": seconds,
           "n_train": n_train, "n_test": 10000, "peak_rss_gb": peak, "gemm_gflops": gemm,
           "features_from_cache": False, **extra}
    (d / "results.json").write_text(json.dumps({k: v for k, v in res.items() if v != "omit"}))
    (d / "COMMAND.md").write_text(f"# {folder}\n\n```\nfeatlearn reproduce\n```\n\n{machine}\n"
                                  "## Earlier runs\n\nMachine: 2-core AMD EPYC (AVX2).\n")


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    _run(root, "fast", 0.70, 60.0)
    _run(root, "slow-better", 0.80, 600.0)
    _run(root, "dominated", 0.75, 900.0, machine=EPYC, gemm=None, peak="omit")
    _run(root, "tied-later", 0.80, 700.0)
    _run(root, "reduced", 0.90, 120.0, n_train=10000)  # best and fast, but not full scale
    _run(root, "cached", 0.85, 30.0, features_from_cache=True)
    _run(root, "first-look", 0.50, 10.0, config="fast", n_train=2000)
    (root / "notes.md").write_text("not a folder")
    (root / "empty").mkdir()
    return root


def _table(md):
    rows = [ln.split("|")[1:-1] for ln in md.splitlines() if ln.startswith("| `")]
    return [[c.strip() for c in row] for row in rows]


def test_rows_frontier_and_png(frontier, results, tmp_path):
    out = tmp_path / "out"
    rows = frontier.main(["--results", str(results), "--out", str(out)])
    assert [r["config"] for r in rows] == ["cached", "fast", "reduced", "slow-better",
                                           "tied-later", "dominated"]  # sorted by minutes
    table = _table((out / "frontier.md").read_text())
    by = {row[0].strip("`"): row for row in table}
    assert list(by) == [r["config"] for r in rows]
    # configuration, test %, minutes, peak GB, CPU, GEMM, frontier, notes
    assert by["fast"][:7] == ["`fast`", "70.00", "1.0", "2.50", "2-core Intel Xeon, AMX-BF16",
                              "400.0", "yes"]
    assert by["slow-better"][6] == "yes"
    assert by["tied-later"][6] == "no"  # as accurate as slow-better, in more minutes
    assert by["dominated"][6] == "no"
    # Reduced and cached runs are shown, marked, and kept off the frontier.
    assert by["reduced"][6] == "no" and "reduced run" in by["reduced"][7]
    assert by["cached"][6] == "no" and "cache" in by["cached"][7]
    # A missing peak stays "-"; the GEMM rate and CPU come from COMMAND.md's first Machine line.
    assert by["dominated"][3] == "-"
    assert by["dominated"][4] == "2-core AMD EPYC, AVX2"
    assert by["dominated"][5] == "120.5" and "COMMAND.md" in by["dominated"][7]
    assert "upper bound" in by["dominated"][7] and "upper bound" not in by["fast"][7]
    md = (out / "frontier.md").read_text()
    assert "2 different CPUs" in md
    assert "Not shown: `first-look/`" in md and "first-look" not in by
    png = (out / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (results / "frontier.png").exists()  # --out, not --results


def test_no_cpu_anywhere_is_a_dash_and_one_cpu_has_no_warning(frontier, tmp_path):
    root = tmp_path / "results"
    _run(root, "a", 0.7, 60.0, machine="")
    _run(root, "b", 0.8, 120.0, machine="", gemm=None)
    frontier.main(["--results", str(root)])
    md = (root / "frontier.md").read_text()
    assert [row[4:7] for row in _table(md)] == [["-", "400.0", "yes"], ["-", "-", "yes"]]
    assert "different CPUs" not in md


def test_readme_block_rewritten_in_place_and_idempotent(frontier, results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{frontier.START}\nold table\n{frontier.END}\n\nafter\n")
    argv = ["--results", str(results), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    frontier.main(argv)
    text = readme.read_text()
    png = (tmp_path / "out" / "frontier.png").read_bytes()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n\n")
    assert text.endswith(f"{frontier.END}\n\nafter\n")
    assert "| `slow-better` | 80.00 | 10.0 |" in text and "benchmarks/results/frontier.png" in text
    frontier.main(argv)
    assert readme.read_text() == text
    assert (tmp_path / "out" / "frontier.png").read_bytes() == png


def test_readme_without_markers_is_an_error(frontier, results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="frontier:start"):
        frontier.main(["--results", str(results), "--out", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == "# no markers\n"


def test_default_readme_only_for_the_default_results(frontier, results, tmp_path, monkeypatch):
    touched = []
    monkeypatch.setattr(frontier, "replace_block", lambda *a: touched.append(a) or True)
    frontier.main(["--results", str(results), "--out", str(tmp_path)])
    assert touched == []


@pytest.mark.parametrize("machine, label", [
    (XEON, "2-core Intel Xeon, AMX-BF16"),
    (EPYC, "2-core AMD EPYC, AVX2"),
    ("Machine: AMD EPYC, 2 cores, AVX-512 with avx512_bf16 (native bfloat16 products, no AMX)",
     "2-core AMD EPYC, AVX-512 BF16"),
])
def test_cpu_label_reads_the_matrix_extension_and_its_negation(frontier, machine, label):
    assert frontier.cpu_label(machine) == label
