"""The benchmark scripts share ``benchmarks/_common.py``: the same flags, the same table header.

Cheap checks only: every script's ``--help`` (a subprocess each) and the helper's pure functions.
The scripts' own runs are smoke-tested elsewhere (``test_kmeans.py::test_benchmark_smoke``).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_ARCHIVE, SHARED_MD5

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
COMMON_FLAGS = ("--data", "--md5", "--data-home", "--out", "--quick")
#: ``featlearn reproduce`` itself, whose flags are the CLI's: it has no --quick (--n-train and
#: --n-test make its smoke runs).
CLI_WRAPPERS = {"reproduce_cifar10.py"}
#: Scripts that read the committed results folders, not the data: only ``--out`` is common.
NO_DATA = {"frontier.py"}


def _common():
    spec = importlib.util.spec_from_file_location("_common", BENCHMARKS / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_found():
    assert {"bench_classifier.py", "bench_dictionary.py", "bench_encode.py", "bench_kmeans.py",
            "check_svm_objective.py", "tune_classifier.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_common_flags(script):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    flags = COMMON_FLAGS[:-1] if script in CLI_WRAPPERS else COMMON_FLAGS
    if script in NO_DATA:
        flags = ("--out",)
    words = res.stdout.split()
    missing = [f for f in flags if f not in words]
    assert not missing, f"{script} --help lacks {missing}"
    for old in ("--archive", "--output", "--smoke"):
        assert old not in words, f"{script} still has {old}"


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - CLI_WRAPPERS))
def test_no_machine_paths_or_md5_of_their_own(script):
    source = (BENCHMARKS / script).read_text()
    assert "/work/" not in source
    assert SHARED_MD5 not in source  # the archive and its md5 live in _common only
    assert "from _common import" in source


def test_default_archive_is_the_tests_shared_archive():
    common = _common()
    assert common.DEFAULT_ARCHIVE == SHARED_ARCHIVE and common.DEFAULT_MD5 == SHARED_MD5


def test_common_args_and_out_resolution(monkeypatch):
    import argparse

    common = _common()
    monkeypatch.delenv("FEATLEARN_CIFAR10", raising=False)

    def parse(argv, out=Path("results/x.md")):
        return common.parse_args(common.add_common_args(argparse.ArgumentParser(), out=out), argv)

    args = parse([])
    assert args.data == str(SHARED_ARCHIVE) and args.md5 == SHARED_MD5
    assert args.data_home is None and args.quick is False and args.out == Path("results/x.md")
    assert not hasattr(args, "_default_out")
    assert parse(["--quick"]).out is None  # smoke numbers never replace the results file
    assert parse(["--quick", "--out", "q.md"]).out == Path("q.md")
    assert not common.writes(parse(["--out", ""]).out)
    assert parse([], out=None).out is None
    monkeypatch.setenv("FEATLEARN_CIFAR10", "elsewhere.tar.gz")
    assert parse([]).data == "elsewhere.tar.gz"


def test_command_records_the_script_from_the_repo_root(tmp_path):
    common = _common()
    cmd = common.command(["--quick", "--out", "a b.md"], script=BENCHMARKS / "bench_x.py")
    assert cmd == "python benchmarks/bench_x.py --quick --out 'a b.md'"
    outside = tmp_path / "y.py"
    assert common.command([], script=outside) == f"python {outside}"


def test_header(monkeypatch):
    common = _common()
    monkeypatch.setattr(common, "machine", lambda: "CPU X, 2 cores")
    lines = common.header("T", argv=["--n", "3"], gemm=123.456, script=BENCHMARKS / "b.py")
    assert lines[0] == "# T"
    assert lines[2:5] == ["```", "python benchmarks/b.py --n 3", "```"]
    assert "Machine: CPU X, 2 cores." in lines
    assert any("123.5 GFLOP/s" in ln for ln in lines) and lines[-1] == ""
    quick = common.header("T", argv=[], quick=True, script=BENCHMARKS / "b.py")
    assert quick[0].startswith("# T (QUICK") and not any("GFLOP/s" in ln for ln in quick)


def test_write(tmp_path, monkeypatch, capsys):
    common = _common()
    monkeypatch.chdir(tmp_path)
    for out in ("", None, Path(""), "."):
        common.write(out, ["# T", ""])
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    out = tmp_path / "sub" / "t.md"
    common.write(out, ["# T", "", "row", "", ""])
    assert out.read_text() == "# T\n\nrow\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_tune_classifier_averages_configurations(tmp_path, monkeypatch):
    """Several configurations: each one's candidates are scored alone, and a last table
    averages their validation probabilities (a quick run on a synthetic archive)."""
    import json

    from conftest import make_cifar_archive

    archive = make_cifar_archive(tmp_path / "c.tar.gz", n=500)
    other = tmp_path / "other-seed.json"
    other.write_text(json.dumps({"name": "other-seed", "params": {
        "n_centroids": 1600, "classifier": "mlp", "random_state": 1,
        "encoder__pooling": [3, 3]}}))
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("tune_classifier",
                                                  BENCHMARKS / "tune_classifier.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    out = tmp_path / "tuning.md"
    argv = ["featlearn-nearest-1600", str(other), "--quick", "--candidates", "[{}]",
            "--data", str(archive), "--md5", "", "--data-home", str(tmp_path / "data"),
            "--cache", str(tmp_path / "cache"), "--subsets", "--out", str(out)]
    tune.main(argv)
    text = out.read_text()
    # A second run takes each configuration's scores from the cache: the same tables.
    memos = sorted((tmp_path / "cache" / "tuning").glob("*.npz"))
    assert len(memos) == 2
    stamps = [m.stat().st_mtime_ns for m in memos]
    tune.main(argv)

    def tables(t):  # the GEMM rate is measured again by each run
        return [ln for ln in t.splitlines() if "GFLOP/s" not in ln]
    assert tables(out.read_text()) == tables(text)
    assert [m.stat().st_mtime_ns for m in memos] == stamps
    assert "Config `featlearn-nearest-1600`" in text and "Config `other-seed`" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| `{}` |")]
    across = [ln.split("|")[1:-1] for ln in rows if ln.count("|") == 6]
    assert [c[2].strip() for c in across] == ["`featlearn-nearest-1600`", "`other-seed`"]
    # The first row's average is that configuration alone.
    assert across[0][3] == across[0][4]
    # --subsets: the one subset of two is the pair's average above.
    pair = [ln.split("|")[1:-1] for ln in rows if ln.count("|") == 4 and " + " in ln]
    assert [c[1].strip() for c in pair] == ["`featlearn-nearest-1600` + `other-seed`"]
    assert pair[0][2].strip() == across[1][4].strip()
    assert all(0 <= float(c[4].strip(" %")) <= 100 for c in across)
