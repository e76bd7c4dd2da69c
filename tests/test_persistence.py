"""Saved models: the safe format (arrays + JSON, loads without running code) and trusted pickles."""

import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import featlearn
import featlearn.persistence as persistence
from featlearn._io import OutputExistsError
from featlearn.fingerprints import model_fingerprint
from featlearn.persistence import is_model_file, load_model, save_model

from conftest import tiny_encoder

SIDE_EFFECTS = []


class Recorder(TransformerMixin, BaseEstimator):
    """Not allow-listed: records any attempt to build it (which loading must never make)."""

    def __new__(cls, *args, **kwargs):
        SIDE_EFFECTS.append("new")
        return super().__new__(cls)

    def __init__(self, delay=0.0):
        self.delay = delay

    def __setstate__(self, state):
        SIDE_EFFECTS.append("setstate")
        self.__dict__.update(state)

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X


@pytest.fixture(scope="module")
def labels(images):
    return np.arange(len(images)) % 3


def fitted_pipeline(images, labels, classifier):
    from featlearn.pipeline import make_coates_pipeline

    pipe = make_coates_pipeline(n_centroids=8, classifier=classifier, device="cpu",
                                encoder__patch_size=3, encoder__n_patches=500,
                                classifier__max_iter=3)
    return pipe.fit(images, labels)


def read_doc(path):
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["__featlearn__.json"].tobytes())


def rewrite_doc(path, doc):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["__featlearn__.json"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


# -- the safe format -----------------------------------------------------------------------------

def test_encoder_round_trip_is_exact_and_keeps_its_fingerprint(encoder, images, tmp_path):
    path = tmp_path / "enc.npz"
    meta = save_model(encoder, path, config={"name": "tiny"}, n_images=60)
    assert zipfile.is_zipfile(path) and is_model_file(path)
    doc = read_doc(path)
    assert doc["format_version"] == persistence.FORMAT_VERSION
    assert {"featlearn", "torch", "sklearn", "numpy", "python"} <= set(doc["metadata"])
    assert doc["model"]["class"] == "featlearn.PatchEncoder"
    assert doc["model"]["params"]["patch_size"] == 3  # readable parameters
    reloaded, meta2 = load_model(path, return_metadata=True)
    assert meta2 == meta and meta2["config"] == {"name": "tiny"} and meta2["n_images"] == 60
    assert type(reloaded) is type(encoder) and reloaded is not encoder
    np.testing.assert_array_equal(reloaded.transform(images), encoder.transform(images))
    assert model_fingerprint(reloaded) == model_fingerprint(encoder)
    assert featlearn.load_model is load_model and featlearn.save_model is save_model


@pytest.mark.parametrize("classifier", ["svm", "mlp"])
def test_full_pipeline_round_trip(images, labels, classifier, tmp_path):
    pipe = fitted_pipeline(images, labels, classifier)
    path = tmp_path / "pipe.npz"
    save_model(pipe, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same versions, same machine: nothing to warn about
        reloaded = load_model(path)
    assert [name for name, _ in reloaded.steps] == ["encoder", "classifier"]
    np.testing.assert_array_equal(reloaded.predict(images), pipe.predict(images))
    np.testing.assert_array_equal(reloaded.decision_function(images),
                                  pipe.decision_function(images))
    np.testing.assert_array_equal(reloaded[0].transform(images), pipe[0].transform(images))
    assert model_fingerprint(reloaded) == model_fingerprint(pipe)
    # the reloaded classifier's network is an equal module, with its weights as parameters
    a, b = pipe[-1].model_, reloaded[-1].model_
    assert repr(a) == repr(b)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and ta.dtype == tb.dtype and torch.equal(ta, tb)
    assert all(isinstance(p, torch.nn.Parameter) for p in b.parameters())


def test_seed_ensemble_round_trip(images, labels, tmp_path):
    from featlearn.pipeline import make_coates_pipeline

    pipe = make_coates_pipeline(n_centroids=8, ensemble=2, device="cpu", encoder__patch_size=3,
                                encoder__n_patches=500, classifier__estimator__max_iter=3)
    pipe.fit(images, labels)
    path = tmp_path / "ensemble.npz"
    save_model(pipe, path)
    assert read_doc(path)["model"]["params"]["steps"]  # readable, not a pickle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = load_model(path)
    assert type(reloaded[-1]).__name__ == "SeedEnsembleClassifier"
    assert len(reloaded[-1].estimators_) == 2
    np.testing.assert_array_equal(reloaded.predict_proba(images), pipe.predict_proba(images))
    assert model_fingerprint(reloaded) == model_fingerprint(pipe)


def test_generic_values_round_trip(tmp_path):
    """Tuples, non-str keys, numpy scalars/dtypes, bfloat16 tensors, devices, sklearn stages."""
    from featlearn.preprocessing import ZCAWhitening

    X = np.random.RandomState(0).randn(50, 4)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(3)), ("zca", ZCAWhitening())]).fit(X)
    est = pipe.named_steps["zca"]
    est.extra_ = {"t": (1, 2.5, None), 3: [np.float32(1.5), np.int64(7)], "dt": np.dtype("<f4"),
                  "bf": torch.arange(5, dtype=torch.bfloat16) / 3, "p": torch.nn.Parameter(
                      torch.ones(2)), "dev": torch.device("cuda", 1), "tdt": torch.float16,
                  "size": torch.Size([2, 3]), "s": {1, 2}, "nan": float("nan"),
                  "t0": torch.tensor(2.0), "a0": np.array(3), "tT": torch.arange(6.).view(2, 3).T}
    save_model(pipe, tmp_path / "m.npz")
    got = load_model(tmp_path / "m.npz")
    e = got.named_steps["zca"].extra_
    assert e["t"] == (1, 2.5, None) and type(e[3][0]) is np.float32 and e[3][1] == 7
    assert e["dt"] == np.float32 and e["dev"] == torch.device("cuda", 1)
    assert e["tdt"] is torch.float16 and e["size"] == torch.Size([2, 3]) and e["s"] == {1, 2}
    assert e["bf"].dtype == torch.bfloat16 and torch.equal(e["bf"], est.extra_["bf"])
    assert isinstance(e["p"], torch.nn.Parameter) and e["p"].requires_grad
    assert np.isnan(e["nan"])
    assert e["t0"].shape == () and e["a0"].shape == () and e["a0"] == 3  # 0-d stays 0-d
    assert torch.equal(e["tT"], est.extra_["tT"])  # a transposed view, saved by value
    np.testing.assert_array_equal(got.transform(X), pipe.transform(X))


def test_unsupported_object_is_refused_at_save_time_with_its_path(encoder, tmp_path):
    path = tmp_path / "m.npz"
    with pytest.raises(ValueError, match=r"model\.steps\[1\]\[1\] is a .*Recorder.*format='pickle'"):
        save_model(Pipeline([("enc", encoder), ("rec", Recorder())]), path)
    assert not path.exists() and not os.listdir(tmp_path)
    bad = Recorder()
    bad.cache_ = torch.Generator()  # an unmarked generator: refused, not silently dropped
    enc = tiny_encoder(np.zeros((4, 8, 8, 3), np.uint8) + np.arange(4)[:, None, None, None])
    enc.helper_ = bad.cache_
    with pytest.raises(ValueError, match=r"model\.helper_ is a torch\._C\.Generator"):
        save_model(enc, path)


def test_cuda_model_saves_from_a_copy_and_loads_on_a_cpu_only_machine(encoder, images, tmp_path,
                                                                      monkeypatch):
    import copy

    model = Pipeline([("encoder", copy.deepcopy(encoder))])
    model.set_params(encoder__device="cuda", encoder__kmeans__device="cuda:0")
    path = tmp_path / "m.npz"
    save_model(model, path)
    assert model.named_steps["encoder"].device == "cuda"  # the caller's model is unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available here; using device='cpu'") as rec:
        got = load_model(path)
    assert len([w for w in rec if "CUDA" in str(w.message)]) == 2  # one per estimator
    assert got.named_steps["encoder"].device == "cpu"
    assert got.named_steps["encoder"].kmeans.device == "cpu"
    np.testing.assert_array_equal(got.transform(images), encoder.transform(images))


def test_saving_does_not_mutate_a_model_with_tensors(images, labels, tmp_path):
    pipe = fitted_pipeline(images, labels, "mlp")
    before = model_fingerprint(pipe)
    weight = pipe[-1].model_[0].weight
    save_model(pipe, tmp_path / "m.npz")
    save_model(pipe, tmp_path / "m.pkl", format="pickle")
    assert pipe[-1].model_[0].weight is weight and model_fingerprint(pipe) == before


# -- what loading refuses ------------------------------------------------------------------------

def _refused(path, match="not a featlearn model"):
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_text_file_truncated_zip_and_missing_parts_are_refused(encoder, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    _refused(text)
    good = tmp_path / "m.npz"
    save_model(encoder, good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[:len(data) // 2])
    _refused(trunc)
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros(3))
    _refused(empty, "no __featlearn__.json")
    doc = read_doc(good)
    doc["model"]["state"]["kmeans_"]["state"]["cluster_centers_"]["key"] = "a999"
    rewrite_doc(good, doc)
    _refused(good, "array 'a999' is missing")
    broken = tmp_path / "broken.npz"
    with open(broken, "wb") as fh:
        np.savez(fh, **{"__featlearn__.json": np.frombuffer(b"{not json", np.uint8)})
    _refused(broken, "JSONDecodeError")
    with pytest.raises(OSError, match="does not exist"):
        load_model(tmp_path / "absent.npz")


@pytest.mark.parametrize("name", ["featlearn.datasets.fetch_cifar10", "os.system",
                                  f"{__name__}.Recorder", "Recorder", "builtins.eval"])
def test_a_file_naming_a_function_or_foreign_class_runs_nothing(encoder, tmp_path, monkeypatch,
                                                                name):
    import featlearn.datasets

    calls = []
    monkeypatch.setattr(featlearn.datasets, "fetch_cifar10", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a))
    SIDE_EFFECTS.clear()
    path = tmp_path / "evil.npz"
    save_model(encoder, path)
    doc = read_doc(path)
    doc["model"]["class"] = name
    doc["model"]["params"] = {"url": "file:///tmp/evil.tar.gz", "md5": None}
    rewrite_doc(path, doc)
    _refused(path, f"class '{name}' is not one a featlearn model may contain")
    assert calls == [] and SIDE_EFFECTS == []


def test_a_module_entry_must_name_a_torch_layer(encoder, tmp_path):
    path = tmp_path / "m.npz"
    save_model(encoder, path)
    doc = read_doc(path)
    doc["model"]["__type__"] = "module"
    doc["model"].update(attrs={}, parameters={}, buffers={}, modules={}, non_persistent=[],
                        training=True)
    rewrite_doc(path, doc)
    _refused(path, "is not a torch module")


# -- pickles: only when trusted ------------------------------------------------------------------

def test_pickle_needs_allow_pickle_and_says_why(encoder, images, tmp_path):
    path = tmp_path / "m.pkl"
    save_model(Pipeline([("encoder", encoder), ("rec", Recorder())]), path, format="pickle",
               config={"name": "p"})
    assert is_model_file(path)
    SIDE_EFFECTS.clear()
    with pytest.raises(ValueError, match="loading a pickle runs code.*allow_pickle=True.*"
                                         "--allow-pickle"):
        load_model(path)
    assert SIDE_EFFECTS == []  # refused before anything was unpickled
    model, meta = load_model(path, allow_pickle=True, return_metadata=True)
    assert meta["config"] == {"name": "p"} and meta["format"] == "pickle"
    assert SIDE_EFFECTS == ["new", "setstate"]
    np.testing.assert_array_equal(model[0].transform(images), encoder.transform(images))


def test_pickled_dict_is_refused_even_when_trusted(tmp_path):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _refused(path, "is a pickle")
    _refused_trusted = pytest.raises(ValueError, match="not a featlearn model.*pickled dict")
    with _refused_trusted:
        load_model(path, allow_pickle=True)
    assert not is_model_file(path)


def test_pickle_without_featlearn_metadata_warns(encoder, tmp_path):
    path = tmp_path / "plain.joblib"
    joblib.dump(encoder, path)
    with pytest.warns(UserWarning, match="carries no featlearn metadata"):
        load_model(path, allow_pickle=True)


def test_model_saved_by_another_version_warns(encoder, tmp_path):
    path = tmp_path / "m.npz"
    save_model(encoder, path, config={"name": "x"})
    doc = read_doc(path)
    doc["metadata"]["featlearn"] = "0.0.1"
    rewrite_doc(path, doc)
    with pytest.warns(UserWarning, match="saved by featlearn 0.0.1.*loaded by featlearn"):
        model, meta = load_model(path, return_metadata=True)
    assert meta["config"] == {"name": "x"}
    pkl = tmp_path / "m.pkl"
    save_model(encoder, pkl, format="pickle")
    blob = joblib.load(pkl)
    blob["metadata"]["featlearn"] = "0.0.1"
    joblib.dump(blob, pkl)
    with pytest.warns(UserWarning, match="saved by featlearn 0.0.1"):
        load_model(pkl, allow_pickle=True)


def test_cuda_device_of_a_pickle_is_switched_to_cpu_without_cuda(encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "m.pkl"
    save_model(Pipeline([("encoder", encoder)]), path, format="pickle")
    blob = joblib.load(path)
    blob["model"].set_params(encoder__device="cuda:0")
    joblib.dump(blob, path)
    with pytest.warns(UserWarning, match="CUDA is not available here; using device='cpu'"):
        model = load_model(path, allow_pickle=True)
    assert model.named_steps["encoder"].device == "cpu"


# -- output rules --------------------------------------------------------------------------------

def test_save_refuses_foreign_files_and_inputs(encoder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(OutputExistsError, match="not written by featlearn.*overwrite=True"):
        save_model(encoder, notes)
    assert notes.read_text() == "keep me"
    data = tmp_path / "x.npy"
    np.save(data, np.zeros(3))
    before = data.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="also an input"):
            save_model(encoder, data, inputs=[data], overwrite=overwrite)
    assert data.read_bytes() == before
    save_model(encoder, notes, overwrite=True)
    assert is_model_file(notes)
    # a featlearn model (either format) is replaced without overwrite
    pkl = tmp_path / "m.pkl"
    save_model(encoder, pkl, format="pickle")
    save_model(encoder, pkl)
    save_model(encoder, pkl, format="pickle")
    assert is_model_file(pkl)
    joblib.dump({"featlearn_model": True, "metadata": {}, "model": encoder}, pkl)  # older featlearn
    save_model(encoder, pkl)
    joblib.dump({"weights": 1}, pkl)  # someone else's pickle
    with pytest.raises(OutputExistsError):
        save_model(encoder, pkl)
    save_model(encoder, pkl, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkl", "notes.txt", "x.npy"]


def test_model_file_respects_the_umask(encoder, tmp_path):
    old = os.umask(0o027)
    try:
        save_model(encoder, tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o640


def test_bad_format_is_refused(encoder, tmp_path):
    with pytest.raises(ValueError, match="format='json'"):
        save_model(encoder, tmp_path / "m", format="json")


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["safe", "pickle"])
def test_gpu_fitted_model_loads_on_cpu(images, labels, tmp_path, fmt):
    from featlearn.pipeline import make_coates_pipeline

    pipe = make_coates_pipeline(n_centroids=8, classifier="mlp", device="cuda",
                                encoder__patch_size=3, encoder__n_patches=500,
                                classifier__max_iter=3).fit(images, labels)
    save_model(pipe, tmp_path / "gpu.model", format=fmt)
    assert next(pipe[-1].model_.parameters()).is_cuda  # the caller's model stays on the GPU
    np.save(tmp_path / "x.npy", images)
    code = ("import numpy as np; from featlearn.persistence import load_model; "
            f"m = load_model({str(tmp_path / 'gpu.model')!r}, allow_pickle=True); "
            f"x = np.load({str(tmp_path / 'x.npy')!r}); "
            f"np.save({str(tmp_path / 'cpu.npy')!r}, m[0].transform(x)); "
            f"np.save({str(tmp_path / 'p.npy')!r}, m.decision_function(x))")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "using device='cpu'" in res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cpu.npy"), pipe[0].transform(images),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), pipe.decision_function(images),
                               rtol=1e-3, atol=1e-4)


class Cached(TransformerMixin, BaseEstimator):
    """Marks its lazily built generator as transient (left out of __getstate__)."""

    def __init__(self, seed=0):
        self.seed = seed

    def fit(self, X=None, y=None):
        self.offset_ = np.float32(self.seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gen", None)
        return state


class Custom(Cached):
    """Saves a different state in the safe format than in a pickle."""

    def __featlearn_getstate__(self):
        return {"seed": self.seed, "packed_": [self.offset_]}

    def __featlearn_setstate__(self, state):
        self.seed = state["seed"]
        self.offset_ = state["packed_"][0]
        self.restored_ = True


def test_classes_mark_transient_state_and_may_customise_it(tmp_path, monkeypatch):
    monkeypatch.setattr(persistence, "SAFE_CLASSES", persistence.SAFE_CLASSES + (
        ("test.Cached", f"{__name__}:Cached"), ("test.Custom", f"{__name__}:Custom")))
    save_model(Cached(3).fit(), tmp_path / "a.npz")
    got = load_model(tmp_path / "a.npz")
    assert type(got) is Cached and got.offset_ == 3 and not hasattr(got, "_gen")
    save_model(Custom(4).fit(), tmp_path / "b.npz")
    assert read_doc(tmp_path / "b.npz")["model"]["state"] == {"packed_": [
        {"__type__": "npscalar", "key": "a0"}]}
    got = load_model(tmp_path / "b.npz")
    assert type(got) is Custom and got.offset_ == 4 and got.restored_
    # an unmarked generator in an allow-listed class is an error, not silently dropped
    bad = Cached(1).fit()
    bad.other_gen = torch.Generator()
    with pytest.raises(ValueError, match=r"model\.other_gen is a torch\._C\.Generator"):
        save_model(bad, tmp_path / "c.npz")
