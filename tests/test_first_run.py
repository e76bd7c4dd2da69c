"""A first run worth looking at: a fast --version, lazy imports, the pictures' dependencies,
and the confusion matrix and per-class accuracies of `featlearn reproduce`."""

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from featlearn.cli import main

from conftest import make_cifar_archive

ROOT = Path(__file__).resolve().parents[1]


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)


def test_python_m_featlearn_cli_version_imports_neither_torch_nor_sklearn():
    # Exactly what `python -m featlearn.cli --version` runs, then a look at what it imported.
    code = ("import runpy, sys\nsys.argv = ['featlearn', '--version']\n"
            "try:\n    runpy.run_module('featlearn.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'matplotlib', 'PIL')"
            " if m in sys.modules))\n")
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    version, imported = res.stdout.strip().splitlines()
    assert version == "featlearn 0.1.0" and imported == "[]"
    direct = subprocess.run([sys.executable, "-m", "featlearn.cli", "--version"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert direct.returncode == 0 and direct.stdout.strip() == "featlearn 0.1.0"


def test_import_featlearn_is_lazy_and_names_still_resolve():
    res = run_python("import sys, featlearn\nassert 'torch' not in sys.modules\n"
                     "from featlearn import PatchEncoder, load_image_folder, extract_features\n"
                     "assert 'torch' in sys.modules\nprint(PatchEncoder.__name__, "
                     "load_image_folder.__module__)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["PatchEncoder", "featlearn.datasets"]


def test_pictures_and_image_folders_need_no_extra():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = [line.split(">=")[0].strip().lower()
                for line in cfg["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert "matplotlib" in required and "pillow" in required


def test_reproduce_writes_the_confusion_matrix_and_per_class_accuracies(tmp_path):
    archive = make_cifar_archive(tmp_path / "tiny.tar.gz", n=20)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": {
        "n_centroids": 8, "classifier": "svm", "device": "cpu", "encoder__patch_size": 3,
        "encoder__n_patches": 1000, "encoder__kmeans__max_iter": 5,
        "classifier__max_iter": 5}}))
    out = tmp_path / "out"
    assert main(["reproduce", str(config), "--data", str(archive), "--data-home",
                 str(tmp_path / "home"), "--n-train", "60", "--n-test", "20", "--out", str(out),
                 "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [f"c{i}" for i in range(10)]
    assert results["target_names"] == names and list(results["per_class_accuracy"]) == names
    confusion = np.asarray(results["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 20
    assert np.isclose(np.trace(confusion) / 20, results["test_accuracy"])
    for k, name in enumerate(names):
        acc = results["per_class_accuracy"][name]
        if confusion[k].sum() == 0:
            assert acc is None  # no test image of that class
        else:
            assert np.isclose(acc, confusion[k, k] / confusion[k].sum(), atol=1e-4)
    md = (out / "results.md").read_text()
    assert "Test accuracy per class" in md and "| c0 | c1 |" in md
    png = (out / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
