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
