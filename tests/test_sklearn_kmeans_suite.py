"""scikit-learn's own k-means test module, run against featlearn's KMeans and MiniBatchKMeans.

The installed ``sklearn/cluster/tests/test_k_means.py`` is copied into a temporary directory
with one line added after its imports, ``from featlearn import KMeans, MiniBatchKMeans``, so
every test and every parametrization (which captures the classes when the module body runs)
uses featlearn's classes. It runs in a pytest subprocess with a small plugin (written next to
it) that provides scikit-learn's ``global_random_seed``/``global_dtype`` fixtures, skips the
tests of :data:`NOT_APPLICABLE` with their reason, marks those of :data:`KNOWN_FAILURES` as
(non-strict) xfails and reports every outcome as JSON.

Run it alone, with the per-test outcomes printed::

    python -m pytest -q tests/test_sklearn_kmeans_suite.py -rA -s
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import featlearn

#: Tests (fnmatch patterns on the test's name, parameters included) that do not apply to
#: featlearn's classes, one reason each. featlearn fits dense float32 data with Lloyd (or
#: mini-batches); its kernels and functions are its own.
NOT_APPLICABLE = {
    "*sparse*": "sparse input is not supported (dense numpy arrays and torch tensors only)",
    "*X_csr*": "sparse input is not supported (dense numpy arrays and torch tensors only)",
    "*csr_*": "sparse input is not supported (dense numpy arrays and torch tensors only)",
    "*elkan*": "algorithm='elkan' is not implemented (Lloyd only)",
    "test_relocate_empty_clusters*": "tests scikit-learn's private _relocate_empty_clusters_* "
                                     "kernels",
    "test_minibatch_update_consistency*": "tests scikit-learn's private _mini_batch_step and "
                                          "_labels_inertia on sparse input",
    "test_minibatch_reassign*": "tests scikit-learn's private _mini_batch_step",
    "test_euclidean_distance*": "tests scikit-learn's private _euclidean_*_dense_wrapper kernels",
    "test_inertia*": "tests scikit-learn's private _inertia_dense/_inertia_sparse kernels",
    "test_is_same_clustering*": "tests scikit-learn's private _is_same_clustering",
    "test_kmeans_plusplus_*": "tests scikit-learn's public kmeans_plusplus function, not the "
                              "classes",
    "test_k_means_function*": "tests scikit-learn's k_means function, not the classes",
    "test_sample_weight_init*": "calls scikit-learn's private KMeans._init_centroids",
    "test_sample_weight_zero*": "calls scikit-learn's private KMeans._init_centroids",
    "test_integer_input*": "asserts float64 centres: featlearn fits in float32 (no float64 "
                           "dtype preservation)",
    "test_float_precision*": "asserts float64 centres for float64 input: featlearn fits in "
                             "float32",
    "test_kmeans_verbose*": "asserts scikit-learn's printed messages: featlearn logs through the "
                            "'featlearn' logger and never prints",
    "test_minibatch_declared_convergence*": "asserts scikit-learn's printed convergence "
                                            "messages: featlearn logs, never prints",
    "test_minibatch_kmeans_init_size*": "asserts scikit-learn's private _init_size (featlearn "
                                        "samples init_size from n_clusters, not batch_size)",
    "test_warning_elkan_1_cluster*": "algorithm='elkan' is not implemented (Lloyd only)",
}

#: Applicable tests that still fail, with the reason. They run as (non-strict) xfails, since
#: one of them depends on an unseeded draw; they count against :data:`TARGET`.
KNOWN_FAILURES = {
    "test_kmeans_copyx": "one k-means++ run (n_init='auto') from featlearn's generator with "
                         "seed 42 ends in a local minimum on this data (v-measure 0.66); "
                         "scikit-learn's draw for that seed does not",
    "test_kmeans_empty_cluster_relocated[dense]":
        "featlearn moves empty clusters to random points by default (reassignment_ratio=0.01: "
        "farthest points park centres on outliers); the test expects scikit-learn's "
        "farthest point (reassignment_ratio=0 does that) and passes only on some unseeded draws",
    "test_kmeans_relocated_clusters[lloyd-dense]":
        "unseeded: whether the relocated centre matches scikit-learn's expected one depends on "
        "featlearn's random relocation draw (it passes on most runs)",
}

#: The share of applicable tests that must pass.
TARGET = 0.9

_OVERRIDE = "from featlearn import KMeans, MiniBatchKMeans  # the classes under test\n"

_PLUGIN = '''
import fnmatch, json, os
import numpy as np
import pytest

_CFG = json.loads(open(os.environ["FEATLEARN_SK_SUITE_CONFIG"]).read())
_RESULTS = {}


def pytest_generate_tests(metafunc):
    if "global_random_seed" in metafunc.fixturenames:
        seed = os.environ.get("SKLEARN_TESTS_GLOBAL_RANDOM_SEED", "42")
        metafunc.parametrize("global_random_seed", [int(seed)])


@pytest.fixture(params=[np.float32, np.float64])
def global_dtype(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    for item in items:
        for pattern, reason in _CFG["not_applicable"].items():
            if fnmatch.fnmatchcase(item.name, pattern):
                item.add_marker(pytest.mark.skip(reason="not applicable: " + reason))
                break
        else:
            reason = _CFG["known_failures"].get(item.name)
            if reason is not None:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=False))


def pytest_runtest_logreport(report):
    name = report.nodeid.split("::", 1)[-1]
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        else:
            outcome = report.outcome
        if name not in _RESULTS or _RESULTS[name] == "passed":
            _RESULTS[name] = outcome


def pytest_sessionfinish(session, exitstatus):
    with open(_CFG["results"], "w") as f:
        json.dump(_RESULTS, f, indent=0, sort_keys=True)
'''


def _sklearn_module_path():
    try:
        spec = importlib.util.find_spec("sklearn.cluster.tests.test_k_means")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn's test modules are not installed")
    return Path(spec.origin)


def _with_featlearn_classes(source: str) -> str:
    """The module's source with featlearn's classes imported after its last top-level import."""
    tree = ast.parse(source)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports, "scikit-learn's test module has no top-level imports"
    lines = source.splitlines(keepends=True)
    end = imports[-1].end_lineno
    return "".join(lines[:end]) + _OVERRIDE + "".join(lines[end:])


def run_suite(tmp_path):
    """Run the module against featlearn's classes; returns ``{test name: outcome}``."""
    source = _sklearn_module_path().read_text()
    (tmp_path / "test_k_means_featlearn.py").write_text(_with_featlearn_classes(source))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(_PLUGIN))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    results = tmp_path / "results.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"not_applicable": NOT_APPLICABLE,
                                  "known_failures": KNOWN_FAILURES, "results": str(results)}))
    root = str(Path(featlearn.__file__).resolve().parents[1])  # this checkout's featlearn
    env = dict(os.environ, FEATLEARN_SK_SUITE_CONFIG=str(config),
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")]
                                                    if p]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfE", "--tb=short", "test_k_means_featlearn.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    if not results.exists():
        pytest.fail(f"the suite did not run:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return json.loads(results.read_text()), proc.stdout


def test_sklearn_kmeans_module(tmp_path):
    outcomes, log = run_suite(tmp_path)
    counts = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    applicable = sum(counts.get(k, 0) for k in ("passed", "failed", "xfailed", "xpassed"))
    passed = counts.get("passed", 0)
    summary = (f"scikit-learn k-means suite: {applicable} applicable, {passed} passed, "
               f"{counts.get('skipped', 0)} not applicable; outcomes {counts}")
    print(summary)
    bad = sorted(name for name, outcome in outcomes.items() if outcome in ("failed", "error"))
    assert not bad, f"{summary}\nunexpected outcomes: {bad}\n{log[-8000:]}"
    assert passed >= TARGET * applicable, summary
    # The tables must stay in step with the module: every entry still names a test.
    names = list(outcomes)
    import fnmatch

    stale = [p for p in NOT_APPLICABLE if not fnmatch.filter(names, p)]
    stale += [n for n in KNOWN_FAILURES if n not in outcomes]
    assert not stale, f"table entries that match no test: {stale}"
