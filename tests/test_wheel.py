"""An installed featlearn (a wheel, not the source tree) finds its configurations and runs.

Builds a wheel of this checkout, installs it without ``-e`` into a fresh virtual environment
(with the system's site-packages, so torch and friends need not be downloaded), and runs
``featlearn reproduce coates2011-1600-svm`` on a few hundred images from a temporary folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_cifar_archive

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_wheel_installs_and_reproduces(tmp_path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    # Build from a clean copy: a stale build/ in the checkout would leak old modules into the
    # wheel, and a test must not write into the source tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks",
        "results", "cache", "featlearn_data"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", wheels, src])
    (wheel,) = wheels.glob("featlearn-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    py = venv / "bin" / "python"
    # --ignore-installed: a featlearn in the system site-packages (e.g. an editable install)
    # must not make pip skip the wheel.
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = _run([py, "-c", "import featlearn, featlearn.pipeline as p; print(featlearn.__file__);"
                            " print(p.CONFIG_DIR); print(','.join(p.available_configs()))"],
                 cwd=work, env=env).stdout.splitlines()
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=work, env=env).stdout.strip())
    assert Path(where[0]).resolve().is_relative_to(site.resolve()), where  # not the repo's copy
    assert not Path(where[0]).resolve().is_relative_to(ROOT), where
    assert Path(where[1]).resolve().is_relative_to(site.resolve()), where
    assert "coates2011-1600-svm" in where[2].split(","), where
    # Every subpackage of the source tree is in the wheel: imported from the installed copy, not
    # from the source tree that an editable install in the system's site-packages points at.
    subpackages = sorted(".".join(p.parent.relative_to(ROOT).parts)
                         for p in (ROOT / "featlearn").rglob("__init__.py"))
    files = _run([py, "-c", "import importlib, sys; print('\\n'.join("
                            "importlib.import_module(m).__file__ for m in sys.argv[1:]))",
                  *subpackages], cwd=work, env=env).stdout.splitlines()
    assert len(files) == len(subpackages) > 1, files
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in files), files
    # the native kernels' C source is package data: the installed copy builds and loads them
    native = _run([py, "-c", "import featlearn._native as n; print(n._SOURCE_FILE); "
                             "print(n.available() if n._compiler() else 'no compiler')"],
                  cwd=work, env=env).stdout.splitlines()
    assert Path(native[0]).resolve().is_relative_to(site.resolve()), native
    assert native[1] in ("True", "no compiler"), native

    archive = make_cifar_archive(tmp_path / "tiny.tar.gz", n=100)
    res = _run([venv / "bin" / "featlearn", "reproduce", "coates2011-1600-svm", "--data", archive,
                "--data-home", tmp_path / "home", "--n-train", 300, "--n-test", 100,
                "--out", work / "out", "-q",
                # smoke-sized: the configuration as shipped, made small enough for a test
                "--set", "n_centroids=16", "--set", "encoder__n_patches=5000",
                "--set", "encoder__kmeans__max_iter=5", "--set", "classifier__max_iter=20"],
               cwd=work, env=env)
    assert "coates2011-1600-svm" in res.stdout
    results = json.loads((work / "out" / "results.json").read_text())
    assert results["featlearn_results"] == 1 and results["config"] == "coates2011-1600-svm"
    assert results["n_train"] == 300 and results["n_test"] == 100
    assert results["params"]["encoder__patch_size"] == 6 and results["params"]["n_centroids"] == 16
    assert {p.name for p in (work / "out").iterdir()} == {
        "results.json", "results.md", "centroids.png", "learning_curve.png", "confusion.png"}
