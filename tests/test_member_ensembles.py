"""Configurations with ``members``: several pipelines (differing in their features) whose
predicted probabilities are averaged, as a scikit-learn ``VotingClassifier(voting="soft")``."""

import json

import numpy as np
import pytest
from sklearn.ensemble import VotingClassifier

from featlearn.cli import main
from featlearn.pipeline import build_pipeline, ensemble_members, load_config, member_configs
from featlearn.reproduce import run

from conftest import make_cifar_archive

SHARED = {"n_centroids": 8, "augment": "flip", "device": "cpu", "encoder__patch_size": 3,
          "encoder__n_patches": 500, "encoder__kmeans__max_iter": 5,
          "classifier__max_iter": 3}
MEMBERS = [{}, {"random_state": 1, "encoder__pooling": [3, 3], "encoder__dtype": "float16"}]


def config(**extra):
    return {"name": "duo", "params": dict(SHARED), "members": MEMBERS, **extra}


def synthetic(n_train=90, n_test=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"X_train": rng.integers(0, 256, (n_train, 12, 12, 3), dtype=np.uint8),
            "y_train": np.arange(n_train) % 3,
            "X_test": rng.integers(0, 256, (n_test, 12, 12, 3), dtype=np.uint8),
            "y_test": np.arange(n_test) % 3, "target_names": ["a", "b", "c"],
            "archive": "synthetic"}


def test_members_build_a_soft_voting_ensemble_of_pipelines():
    model = build_pipeline(config(), random_state=5)
    assert isinstance(model, VotingClassifier) and model.voting == "soft"
    names = [name for name, _ in model.estimators]
    assert names == ["member0", "member1"]
    first, second = (p.named_steps["encoder"] for _, p in model.estimators)
    # A member's own keys win over the overrides, which win over the shared params.
    assert (first.random_state, first.pooling, first.flip) == (5, (2, 2), True)
    assert (second.random_state, second.pooling, second.dtype) == (1, (3, 3), "float16")
    assert [c["name"] for c in member_configs(config())] == ["duo.member0", "duo.member1"]
    assert member_configs({"name": "one", "params": SHARED}) == []


@pytest.mark.parametrize("members, match", [
    ([{}], "at least 2"),
    ({"a": {}}, "at least 2"),
    ([{}, 3], "at least 2"),
    ([{}, {"encoder__bogus": 1}], "member1 of configuration 'duo': unknown configuration key "
                                  "'encoder__bogus'"),
    ([{}, {"classifier": "stream"}], "member1 of configuration 'duo'"),
])
def test_bad_members_are_one_line_errors_naming_the_member(members, match, tmp_path):
    path = tmp_path / "duo.json"
    path.write_text(json.dumps(config() | {"members": members}))
    with pytest.raises(ValueError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_reproduce_fits_member_by_member_and_averages_their_probabilities(tmp_path):
    data = synthetic()
    results, model = run(config(), data, out=tmp_path / "out", cache=tmp_path / "cache",
                         verbose=0)
    assert isinstance(model, VotingClassifier)
    pipes = ensemble_members(model)
    assert len(pipes) == 2 and all(hasattr(p.named_steps["classifier"], "classes_")
                                   for p in pipes)
    # The reported accuracy is the average of the members' probabilities, which is also what
    # the fitted ensemble predicts from images.
    proba = sum(p.predict_proba(data["X_test"]) for p in pipes)
    expected = np.mean(np.arange(3)[proba.argmax(1)] == data["y_test"])
    assert results["test_accuracy"] == pytest.approx(expected)
    assert np.array_equal(model.predict(data["X_test"]), np.arange(3)[proba.argmax(1)])
    # Sizes and FLOPs are the members' sums; each member's own are listed.
    sizes = [(m["n_centroids"], m["n_features"]) for m in results["members"]]
    assert sizes == [(8, 2 * 4 * 8), (8, 2 * 9 * 8)]
    assert results["n_features"] == 2 * 4 * 8 + 2 * 9 * 8 and results["n_centroids"] == 16
    assert results["members"][1]["params"]["encoder__pooling"] == [3, 3]
    summed = sum(m["stage_seconds"]["encode train"] for m in results["members"])
    assert results["stage_seconds"]["encode train"] == pytest.approx(summed, abs=0.02)
    text = (tmp_path / "out" / "results.md").read_text()
    assert "An ensemble of 2 pipelines" in text and "- member1: K=8, 144 features" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"results.json",
                                                              "learning_curve.png"}
    # A second run loads every member's features from the cache, and scores the same.
    again, _ = run(config(), data, cache=tmp_path / "cache", verbose=0)
    assert again["features_from_cache"] and again["test_accuracy"] == results["test_accuracy"]
    # Without a cache each member encodes one split at a time: the same numbers.
    plain, _ = run(config(), data, verbose=0)
    assert plain["test_accuracy"] == results["test_accuracy"]
    assert plain["train_accuracy"] == results["train_accuracy"]
    assert set(plain["stage_seconds"]) == set(results["stage_seconds"])


def test_tune_classifier_scores_an_ensemble_configuration_member_by_member(tmp_path,
                                                                            monkeypatch):
    import importlib.util
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("tune_classifier",
                                                  benchmarks / "tune_classifier.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    path = tmp_path / "duo.json"
    path.write_text(json.dumps(config()))
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n=500)
    out = tmp_path / "t.md"
    tune.main([str(path), "--quick", "--candidates", "[{}]", "--data", str(archive), "--md5", "",
               "--data-home", str(tmp_path / "home"), "--out", str(out)])
    text = out.read_text()
    assert "Config `duo.member0`" in text and "Config `duo.member1`" in text
    assert "| `{}` | 2 | `duo.member1` |" in text


def test_cli_fit_refuses_an_ensemble_configuration_before_any_work(tmp_path, capsys):
    path = tmp_path / "duo.json"
    path.write_text(json.dumps(config()))
    src, out = tmp_path / "x.npy", tmp_path / "model.npz"
    np.save(src, synthetic()["X_train"])
    assert main(["fit", str(path), "--data", str(src), "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("featlearn fit: error: ")
    assert "featlearn reproduce duo" in err
    assert not out.exists()
