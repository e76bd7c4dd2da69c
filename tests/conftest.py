"""Shared fixtures: the shared JPEG-75 CIFAR-10 archive (skipped cleanly when absent)."""

from pathlib import Path

import pytest

SHARED_ARCHIVE = (Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
                  / "cifar10-jpeg75" / "cifar-10-python.tar.gz")
SHARED_MD5 = "bd43d2a3421d9a4f9a66309ec8f698ed"


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory):
    """The shared archive loaded through the library's own loader (cached per test session)."""
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    from featlearn.datasets import fetch_cifar10

    return fetch_cifar10(tmp_path_factory.mktemp("data"), archive=SHARED_ARCHIVE, md5=SHARED_MD5)


# -- small models and data for the extraction, CLI and reproduce tests ------------------------------
# (Slow lives here, in an importable module, so that a CLI subprocess with tests/ on its
# PYTHONPATH can unpickle a model that wraps it.)

import io as _io
import pickle as _pickle
import tarfile as _tarfile
import time as _time

import numpy as _np
from sklearn.base import BaseEstimator as _BaseEstimator
from sklearn.base import TransformerMixin as _TransformerMixin


def tiny_encoder(images, seed=0, device="cpu"):
    """A small real PatchEncoder (3x3 patches, K=8) fitted on ``images``."""
    from featlearn.encoding import PatchEncoder
    from featlearn.kmeans import MiniBatchKMeans

    enc = PatchEncoder(patch_size=3, n_patches=500, device=device, random_state=seed,
                       kmeans=MiniBatchKMeans(n_clusters=8, random_state=seed, device=device))
    return enc.fit(images)


class Slow(_TransformerMixin, _BaseEstimator):
    """Wraps a fitted encoder and sleeps per call, so a job is slow enough to be killed mid-run."""

    def __init__(self, encoder=None, delay=0.2):
        self.encoder = encoder
        self.delay = delay

    def fit(self, X, y=None):
        return self

    def __sklearn_is_fitted__(self):
        return True

    def transform(self, X):
        _time.sleep(self.delay)
        return self.encoder.transform(X)


def cifar_members(n=4, seed=0):
    """The members of a CIFAR-10-format archive: ``n`` random images per batch (5 train, 1 test)."""
    def batch(k):
        rng = _np.random.default_rng(seed * 100 + k)
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=_np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, n)],
                b"filenames": [b"x.png"] * n, b"batch_label": b"batch"}

    members = {f"data_batch_{i}": batch(i) for i in range(1, 6)}
    members["test_batch"] = batch(9)
    members["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    return members


def write_cifar_archive(path, members, drop=None):
    """Write ``members`` (objects are pickled, bytes written as they are) as a ``.tar.gz``."""
    with _tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            if name == drop:
                continue
            blob = obj if isinstance(obj, bytes) else _pickle.dumps(obj, protocol=2)
            info = _tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, _io.BytesIO(blob))
    return path


def make_cifar_archive(path, n=4, seed=0):
    """A CIFAR-10-format ``.tar.gz`` with ``n`` images per batch (5 train batches, 1 test)."""
    return write_cifar_archive(path, cifar_members(n, seed))


def cuda_marks():
    """The marks of a test's CUDA variant: the ``gpu`` marker, skipped without a GPU."""
    import torch

    return [pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def two_threads():
    """torch at two intra-op threads for the test (the CPU worker-thread paths need > 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images():
    rng = _np.random.RandomState(0)
    return rng.randint(0, 256, size=(60, 8, 8, 3)).astype(_np.uint8)


@pytest.fixture(scope="module")
def encoder(images):
    return tiny_encoder(images, seed=0)


@pytest.fixture(scope="module")
def expected(encoder, images):
    return _np.concatenate([encoder.transform(images[i:i + 7]) for i in range(0, len(images), 7)])


def naive_whitened_patches(enc, img):
    """Every patch of one image through ``enc``'s fitted normalizer and whitener, in float64:
    the straightforward reference the encoding tests compare the kernel with."""
    p, s = enc.patch_size, enc.stride
    Ph, Pw = enc.map_shape_
    P = _np.stack([img[i * s:i * s + p, j * s:j * s + p].reshape(-1)
                   for i in range(Ph) for j in range(Pw)])
    Y = enc.whitener_.transform(enc.normalizer_.transform(P.astype(_np.float32)))
    return Y.astype(_np.float64)
