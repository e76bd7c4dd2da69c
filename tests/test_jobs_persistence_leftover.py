"""Saving and loading models (left here for the persistence rewrite to move)."""

import os
import subprocess
import sys

import joblib
import numpy as np
import pytest

from featlearn.persistence import load_model, save_model

from conftest import Slow


def test_model_saved_by_another_version_warns(encoder, tmp_path):
    path = tmp_path / "m.joblib"
    meta = save_model(encoder, path, config={"name": "x"})
    assert {"featlearn", "torch", "sklearn", "saved_at"} <= set(meta)
    blob = joblib.load(path)
    blob["metadata"]["featlearn"] = "0.0.1"
    joblib.dump(blob, path)
    with pytest.warns(UserWarning, match="saved by featlearn 0.0.1.*loaded by featlearn"):
        model, meta = load_model(path, return_metadata=True)
    assert meta["config"] == {"name": "x"}


def test_cuda_device_is_switched_to_cpu_without_cuda(encoder, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "m.joblib"
    save_model(Slow(encoder), path)
    blob = joblib.load(path)
    blob["model"].encoder.set_params(device="cuda:0")
    joblib.dump(blob, path)
    with pytest.warns(UserWarning, match="CUDA is not available here; using device='cpu'"):
        model = load_model(path)
    assert model.encoder.device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_gpu_fitted_model_loads_on_cpu(images, tmp_path):
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    enc = PatchEncoder(patch_size=3, n_patches=500, device="cuda", random_state=0,
                       kmeans=MiniBatchKMeans(n_clusters=8, random_state=0, device="cuda"))
    enc.fit(images)
    save_model(enc, tmp_path / "gpu.joblib")
    np.save(tmp_path / "x.npy", images)
    code = ("import sys, numpy as np, warnings; from featlearn.persistence import load_model; "
            f"m = load_model({str(tmp_path / 'gpu.joblib')!r}); "
            f"np.save({str(tmp_path / 'cpu.npy')!r}, m.transform(np.load({str(tmp_path / 'x.npy')!r})))")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cpu.npy"), enc.transform(images), rtol=1e-4,
                               atol=1e-4)


