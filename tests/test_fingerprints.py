"""Fingerprints of models and data, and the one list of execution-only parameters."""

import numpy as np

from featlearn.fingerprints import (EXECUTION_PARAMS, data_fingerprint, execution_params,
                                    model_fingerprint, params_fingerprint)
from featlearn.persistence import load_model, save_model
from featlearn.reproduce import encoder_cache_key


def _encoder(**kmeans):
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    return PatchEncoder(patch_size=3, n_patches=500, device="cpu", random_state=0,
                        kmeans=MiniBatchKMeans(n_clusters=8, random_state=0, device="cpu", **kmeans))


def test_execution_params_are_per_class():
    from featlearn.classifier import TorchMLPClassifier
    from featlearn.kmeans import MiniBatchKMeans

    enc = _encoder()
    assert "batch_size" in execution_params(enc)  # the encoder's inner chunking
    assert "batch_size" not in execution_params(MiniBatchKMeans())  # changes the centres
    assert "batch_size" not in execution_params(TorchMLPClassifier())
    assert {"device", "verbose", "n_jobs"} <= EXECUTION_PARAMS["*"]


def test_params_fingerprint_ignores_execution_params_only():
    base = params_fingerprint(_encoder())
    assert params_fingerprint(_encoder().set_params(batch_size=3, n_jobs=2, verbose=2,
                                                    device="auto")) == base
    assert params_fingerprint(_encoder().set_params(kmeans__verbose=3, kmeans__device="auto")) == base
    # nested k-means batch_size and any result parameter do change it
    assert params_fingerprint(_encoder(batch_size=64)) != base
    assert params_fingerprint(_encoder().set_params(stride=2)) != base
    assert params_fingerprint(_encoder().set_params(kmeans__n_clusters=9)) != base


def test_reproduce_cache_key_uses_the_same_rule():
    base = encoder_cache_key(_encoder())
    assert encoder_cache_key(_encoder().set_params(batch_size=3, device="auto", verbose=2)) == base
    assert encoder_cache_key(_encoder(batch_size=64)) != base  # a suffix rule would miss this
    assert encoder_cache_key(_encoder().set_params(pooling=(3, 3))) != base


def test_model_fingerprint_covers_fitted_state_not_execution(images, encoder, tmp_path):
    from sklearn.base import clone

    fp = model_fingerprint(encoder)
    other = clone(encoder).set_params(random_state=1).fit(images)
    assert model_fingerprint(other) != fp
    save_model(encoder, tmp_path / "m.joblib")
    reloaded = load_model(tmp_path / "m.joblib")
    assert model_fingerprint(reloaded) == fp
    assert model_fingerprint(reloaded.set_params(batch_size=5, verbose=2)) == fp


def test_data_fingerprint_sees_every_byte_and_the_layout(images):
    fp = data_fingerprint(images)
    changed = images.copy()
    changed[-1, -1, -1, -1] ^= 1
    assert data_fingerprint(changed) != fp
    assert data_fingerprint(images.reshape(60, 8, 24)) != fp
    assert data_fingerprint(images, block_bytes=100) == fp
    assert data_fingerprint(np.ascontiguousarray(images)) == fp


class _Holder:
    """A torch module whose state_dict carries an extra state (an estimator or a nested list)."""

    def __new__(cls, extra):
        import torch

        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.extra = extra
                self.register_buffer("w", torch.ones(2))

            def get_extra_state(self):
                return self.extra

            def set_extra_state(self, state):
                self.extra = state

        return Holder()


def test_a_module_inside_a_model_keeps_the_fitted_flag():
    # params_fingerprint ignores fitted attributes, also of an estimator reached through a
    # torch module's state_dict.
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    scaler = StandardScaler()
    model = FunctionTransformer(kw_args={"net": _Holder(scaler)})
    before = params_fingerprint(model)
    scaler.fit(np.arange(6.0).reshape(3, 2))
    assert params_fingerprint(model) == before
    assert model_fingerprint(model) != model_fingerprint(
        FunctionTransformer(kw_args={"net": _Holder(StandardScaler())}))


def test_a_module_inside_a_model_keeps_the_depth():
    # The depth bound counts through a torch module's state_dict, not from zero again.
    import pytest
    from sklearn.preprocessing import FunctionTransformer

    deep = []
    for _ in range(10):
        deep = [deep]
    nested = _Holder(deep)
    for _ in range(45):
        nested = [nested]
    with pytest.raises(ValueError, match="nested too deeply"):
        params_fingerprint(FunctionTransformer(kw_args={"net": nested}))


def test_the_feature_cache_key_covers_every_module_the_features_depend_on():
    # A module the feature stages import (directly or not) but the key does not hash would
    # answer a changed kernel with stale cached features. Only the logger is left out.
    import ast
    from pathlib import Path

    from featlearn import fingerprints

    root = Path(fingerprints.__file__).parent
    seen, todo = set(), list(fingerprints.FEATURE_MODULES)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(node.module.split(".")[0])
            elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                  and node.module.startswith("featlearn.")):
                todo.append(node.module.split(".")[1])
    assert seen - {"_logging"} <= set(fingerprints.FEATURE_MODULES)


def test_the_feature_cache_key_covers_the_native_kernels_source(tmp_path, monkeypatch):
    # The C kernels compute thresholds, pooled codes and k-means labels: a changed kernel must
    # not answer with features cached by the old one.
    import shutil
    from pathlib import Path

    from featlearn import fingerprints

    root = Path(fingerprints.__file__).parent
    copy = tmp_path / "featlearn"
    copy.mkdir()
    for name in [f"{m}.py" for m in fingerprints.FEATURE_MODULES] + ["_native.c"]:
        shutil.copy(root / name, copy / name)
    monkeypatch.setattr(fingerprints, "__file__", str(copy / "fingerprints.py"))
    before = fingerprints.code_fingerprint()
    assert before == fingerprints.code_fingerprint()
    with open(copy / "_native.c", "a") as fh:
        fh.write("/* changed */\n")
    assert fingerprints.code_fingerprint() != before
