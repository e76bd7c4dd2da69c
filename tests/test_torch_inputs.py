"""Torch in, torch out: channels-first images, tensors, Datasets and DataLoaders, output="torch",
and the device names."""

import copy
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from featlearn import (PatchEncoder, RandomPatchExtractor, extract_features,
                       make_coates_pipeline)
from featlearn._torch import check_device_name, resolve_device
from featlearn.cli import main
from featlearn.kmeans import MiniBatchKMeans
from featlearn.persistence import load_model, save_model

from conftest import tiny_encoder


@pytest.fixture(scope="module")
def nhwc():
    return np.random.RandomState(3).randint(0, 256, size=(30, 9, 9, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def nchw(nhwc):
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def enc(nhwc):
    return tiny_encoder(nhwc, seed=1)


@pytest.fixture(scope="module")
def enc_first(enc):
    return copy.deepcopy(enc).set_params(channels="first")


@pytest.fixture(scope="module")
def ref(enc, nhwc):
    return enc.transform(nhwc)


def small_encoder(**params):
    return PatchEncoder(patch_size=3, n_patches=400, device="cpu", random_state=0,
                        kmeans=MiniBatchKMeans(n_clusters=6, random_state=0, device="cpu"),
                        **params)


# -- channels-first arrays and tensors -------------------------------------------------------

def test_channels_first_patches_are_the_channels_last_patches(nhwc, nchw):
    last = RandomPatchExtractor(4, 200, random_state=0).transform(nhwc)
    first = RandomPatchExtractor(4, 200, random_state=0, channels="first")
    np.testing.assert_array_equal(first.transform(nchw), last)
    np.testing.assert_array_equal(first.transform(torch.from_numpy(nchw)), last)
    assert first.fit(nchw).n_features_in_ == 9 * 9 * 3


def test_channels_first_encoder_fits_and_encodes_like_channels_last(nhwc, nchw):
    last = small_encoder().fit(nhwc)
    first = small_encoder(channels="first").fit(torch.from_numpy(nchw))
    assert first.image_shape_ == last.image_shape_ == (9, 9, 3)
    np.testing.assert_array_equal(first.kmeans_.cluster_centers_, last.kmeans_.cluster_centers_)
    np.testing.assert_array_equal(first.transform(nchw), last.transform(nhwc))
    # 3-D images are one channel in either layout.
    gray = nhwc[..., 0]
    np.testing.assert_array_equal(small_encoder(channels="first").fit(gray).transform(gray),
                                  small_encoder().fit(gray).transform(gray))


def test_the_default_layout_names_both_layouts_and_the_fix(enc, nchw):
    # The old message said "images of size 3x9 are smaller than the 6x6 patch".
    checks = [lambda: PatchEncoder(n_patches=100).fit(nchw),
              lambda: enc.transform(nchw),
              lambda: RandomPatchExtractor(3, 10).transform(torch.from_numpy(nchw))]
    for call in checks:
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "(n, C, H, W)" in msg and "(n, H, W, C)" in msg
        assert 'channels="first"' in msg and "--channels first" in msg
        assert "9x9 pixels with 3 channel(s)" in msg and "smaller than" not in msg


def test_a_bad_channels_value_is_refused(nhwc):
    with pytest.raises(ValueError, match="channels"):
        small_encoder(channels="NCHW").fit(nhwc)
    with pytest.raises(ValueError, match="channels"):
        RandomPatchExtractor(3, 10, channels="cf").transform(nhwc)


def test_tensors_that_require_grad_or_are_not_contiguous(enc, enc_first, nhwc, nchw, ref):
    t = torch.from_numpy(nhwc).float().requires_grad_(True)
    np.testing.assert_allclose(enc.transform(t), ref, rtol=1e-6, atol=1e-5)
    permuted = torch.from_numpy(nhwc).permute(0, 3, 1, 2)  # a non-contiguous view
    np.testing.assert_array_equal(enc_first.transform(permuted), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_in_and_out(enc, nhwc, ref):  # pragma: no cover - GPU machines only
    gpu = copy.deepcopy(enc).set_params(device="cuda", output="torch")
    out = gpu.transform(torch.from_numpy(nhwc).cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-3)


def test_pipeline_on_channels_first_tensors(nhwc, nchw):
    y = np.arange(len(nhwc)) % 3
    kw = dict(classifier="svm", device="cpu", encoder__patch_size=3, encoder__n_patches=300,
              classifier__max_iter=3)
    last = make_coates_pipeline(6, **kw).fit(nhwc, y)
    first = make_coates_pipeline(6, encoder__channels="first", **kw).fit(torch.from_numpy(nchw), y)
    np.testing.assert_array_equal(first.predict(torch.from_numpy(nchw)), last.predict(nhwc))


# -- torch datasets and loaders --------------------------------------------------------------

class Images(Dataset):
    """A map-style dataset of single images (no labels), as numpy arrays."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class Stream(IterableDataset):
    """An iterable dataset without a length, yielding ``(image, label)``."""

    def __init__(self, images):
        self.images = images

    def __iter__(self):
        for i, img in enumerate(self.images):
            yield torch.from_numpy(img), i % 3


def sources(images):
    t = torch.from_numpy(images)
    labels = torch.arange(len(images)) % 3
    return {
        "TensorDataset(images, labels)": TensorDataset(t, labels),
        "TensorDataset(images)": TensorDataset(t),
        "Dataset of arrays": Images(images),
        "IterableDataset without len": Stream(images),
        "DataLoader(batch_size=7)": DataLoader(TensorDataset(t, labels), batch_size=7),
        "DataLoader(drop_last)": DataLoader(TensorDataset(t), batch_size=8, drop_last=True),
        "DataLoader(batch_size=None)": DataLoader(Images(images), batch_size=None),
        "DataLoader over IterableDataset": DataLoader(Stream(images), batch_size=4),
    }


@pytest.mark.parametrize("name", list(sources(np.zeros((1, 1, 1, 1), np.uint8))))
def test_transform_streams_datasets_and_loaders(name, enc, nhwc, ref):
    data = sources(nhwc)[name]
    n = 24 if "drop_last" in name else len(nhwc)
    np.testing.assert_array_equal(enc.transform(data), ref[:n])


def test_channels_first_loaders_and_torch_output(enc_first, nchw, ref):
    loader = DataLoader(TensorDataset(torch.from_numpy(nchw), torch.zeros(len(nchw))),
                        batch_size=5)
    np.testing.assert_array_equal(enc_first.transform(loader), ref)
    torch_out = copy.deepcopy(enc_first).set_params(output="torch")
    for X in (loader, nchw, torch.from_numpy(nchw)):
        out = torch_out.transform(X)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.device == resolve_device(torch_out.device)
        np.testing.assert_array_equal(out.numpy(), ref)


def test_a_shuffling_loader_and_fitting_on_a_loader_are_refused(enc, nhwc):
    shuffled = DataLoader(TensorDataset(torch.from_numpy(nhwc)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        enc.transform(shuffled)
    with pytest.raises(ValueError, match="shuffle=False"):
        extract_features(enc, shuffled, "unused.npy", verbose=0)
    with pytest.raises(ValueError, match="DataLoader: stream it through"):
        small_encoder().fit(DataLoader(TensorDataset(torch.from_numpy(nhwc))))


def test_a_loader_whose_length_is_wrong_is_an_error(enc, nhwc):
    class Liar(Images):
        def __len__(self):
            return len(self.images) + 5

        def __getitem__(self, i):
            return self.images[i % len(self.images)]

    with pytest.raises(ValueError, match="yielded more images than its length"):
        enc.transform(DataLoader(Liar(nhwc), batch_size=None, sampler=range(len(nhwc) + 10)))


@pytest.mark.parametrize("name", ["TensorDataset(images, labels)", "DataLoader(batch_size=7)",
                                  "IterableDataset without len"])
def test_extract_features_streams_a_dataset_and_resumes(name, enc, nhwc, ref, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "f.npy"
    data = sources(nhwc)[name]
    features = extract_features(enc, data, out, batch_size=8, verbose=0)
    np.testing.assert_array_equal(features, ref)
    # A finished job on the same images is reused without encoding anything.
    encoded = []
    transform = PatchEncoder.transform
    with monkeypatch.context() as m:
        m.setattr(PatchEncoder, "transform",
                  lambda self, X: encoded.append(len(X)) or transform(self, X))
        np.testing.assert_array_equal(extract_features(enc, data, out, batch_size=8, verbose=0),
                                      ref)
    assert encoded == []
    # Different images: recomputed.
    other = sources(nhwc[::-1].copy())[name]
    np.testing.assert_array_equal(extract_features(enc, other, out, batch_size=8, verbose=0),
                                  ref[::-1])


def test_extract_features_mirror_and_tensors_channels_first(enc, enc_first, nhwc, nchw, tmp_path):
    mirrored = enc.transform(nhwc[:, :, ::-1])
    loader = DataLoader(TensorDataset(torch.from_numpy(nchw)), batch_size=6)
    np.testing.assert_array_equal(
        extract_features(enc_first, loader, tmp_path / "a.npy", mirror=True, verbose=0), mirrored)
    np.testing.assert_array_equal(
        extract_features(enc_first, torch.from_numpy(nchw), tmp_path / "b.npy", mirror=True,
                         verbose=0), mirrored)
    torch_out = copy.deepcopy(enc).set_params(output="torch")
    np.testing.assert_array_equal(extract_features(torch_out, nhwc, tmp_path / "c.npy", verbose=0),
                                  enc.transform(nhwc))


def test_extract_features_refuses_a_dataset_that_changes_between_passes(enc, nhwc, tmp_path):
    class Noisy(Images):
        def __getitem__(self, i):
            return np.random.randint(0, 256, self.images[i].shape).astype(np.uint8)

    out = tmp_path / "f.npy"
    with pytest.raises(ValueError, match="different images on a second pass"):
        extract_features(enc, Noisy(nhwc), out, batch_size=8, verbose=0)
    assert not out.exists()


def test_extract_features_checks_a_dataset_before_writing(enc, nhwc, tmp_path):
    bad = nhwc.astype(np.float32)
    bad[17, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        extract_features(enc, TensorDataset(torch.from_numpy(bad)), tmp_path / "f.npy",
                         verbose=0)

    class Ragged(Images):
        def __getitem__(self, i):
            return self.images[i] if i < 20 else self.images[i][:5]

    with pytest.raises(ValueError, match=r"images differ in shape \(\(9, 9, 3\) and \(5, 9, 3\)"):
        extract_features(enc, Ragged(nhwc), tmp_path / "f.npy", batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="batches differ"):
        extract_features(enc, DataLoader(Ragged(nhwc), batch_size=10), tmp_path / "f.npy",
                         verbose=0)
    assert list(tmp_path.iterdir()) == []


# -- the new parameters persist ---------------------------------------------------------------

def test_channels_and_output_round_trip(enc_first, nchw, ref, tmp_path):
    model = copy.deepcopy(enc_first).set_params(output="torch")
    save_model(model, tmp_path / "m.npz")
    loaded = load_model(tmp_path / "m.npz")
    assert loaded.get_params()["channels"] == "first" and loaded.output == "torch"
    np.testing.assert_array_equal(loaded.transform(nchw).numpy(), ref)


# -- devices ---------------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has the given accelerators."""
    def set_(cuda=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return set_


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.parametrize("name", ["gpu", "GPU:0", "tpu", "cuda:x", "", 3])
def test_an_unknown_device_lists_the_valid_ones(name):
    with pytest.raises(ValueError) as err:
        resolve_device(name)
    msg = str(err.value)
    assert '"cpu", "cuda", "cuda:N", "mps"' in msg and '"auto"' in msg
    if str(name).lower().startswith("gpu"):
        assert 'did you mean "cuda"' in msg
    with pytest.raises(ValueError):
        check_device_name(name)


def test_a_device_the_machine_lacks_says_so(machine, enc, nhwc):
    machine(cuda=False, mps=False)
    for name, what in (("mps", "MPS is not available"), ("cuda", "CUDA is not available"),
                       ("cuda:1", "CUDA is not available")):
        with pytest.raises(ValueError, match=what):
            resolve_device(name)
        with pytest.raises(ValueError, match=what):
            copy.deepcopy(enc).set_params(device=name).transform(nhwc)
    machine(cuda=False, mps=True)
    assert resolve_device("mps").type == "mps"


def test_cli_device_errors_are_one_line(tmp_path, nhwc, capsys, machine):
    machine(cuda=False, mps=False)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": {
        "n_centroids": 6, "classifier": "svm", "encoder__patch_size": 3,
        "encoder__n_patches": 300}}))
    np.save(tmp_path / "x.npy", nhwc)
    for device, what in (("gpu", 'did you mean "cuda"'), ("mps", "MPS is not available")):
        assert main(["fit", str(config), "--data", str(tmp_path / "x.npy"), "--out",
                     str(tmp_path / "m.npz"), "--device", device, "-q"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("featlearn fit: error:")
        assert what in err
    assert not (tmp_path / "m.npz").exists()


# -- channels-first .npy on the command line ---------------------------------------------------

def test_cli_channels_first_npy(tmp_path, nhwc, nchw, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": {
        "n_centroids": 6, "classifier": "svm", "device": "cpu", "encoder__patch_size": 3,
        "encoder__n_patches": 300}}))
    np.save(tmp_path / "first.npy", nchw)
    np.save(tmp_path / "last.npy", nhwc)
    model = tmp_path / "m.npz"
    assert main(["fit", str(config), "--data", str(tmp_path / "first.npy"), "--out", str(model),
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "--channels first" in err and "(n, C, H, W)" in err
    assert main(["fit", str(config), "--data", str(tmp_path / "first.npy"), "--out", str(model),
                 "--channels", "first", "-q"]) == 0
    for src, layout in (("first.npy", "first"), ("last.npy", "last")):
        out = tmp_path / f"f-{layout}.npy"
        assert main(["extract", "--model", str(model), "--data", str(tmp_path / src),
                     "--channels", layout, "--out", str(out), "-q"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "f-first.npy"),
                                  np.load(tmp_path / "f-last.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "f-last.npy"),
                                  load_model(model).transform(nhwc))


def test_a_model_saved_for_a_missing_device_loads_on_the_cpu(enc, nhwc, ref, tmp_path, machine):
    save_model(copy.deepcopy(enc).set_params(device="mps"), tmp_path / "mps.npz")
    machine(cuda=False, mps=False)
    with pytest.warns(UserWarning, match="device='mps', but MPS is not available here"):
        loaded = load_model(tmp_path / "mps.npz")
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.transform(nhwc), ref)
