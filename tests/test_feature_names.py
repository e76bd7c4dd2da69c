"""Every transformer names its output columns and supports ``set_output(transform="pandas")``
for its 2-D outputs."""

import numpy as np
import pytest

from featlearn import KMeans, MiniBatchKMeans
from featlearn.dictionary import RandomPatchDictionary
from featlearn.patches import RandomPatchExtractor
from featlearn.preprocessing import PatchNormalizer, PowerNormalizer, ZCAWhitening

rng = np.random.default_rng(0)
ROWS = rng.normal(size=(60, 12)).astype(np.float32)
IMAGES = rng.integers(0, 256, size=(6, 8, 8, 3)).astype(np.float32)


def _row_transformers():
    return [PatchNormalizer(), PowerNormalizer(), ZCAWhitening(),
            KMeans(n_clusters=4, random_state=0, device="cpu"),
            MiniBatchKMeans(n_clusters=4, batch_size=16, random_state=0, device="cpu"),
            RandomPatchDictionary(n_clusters=5, random_state=0)]


@pytest.mark.parametrize("est", _row_transformers(), ids=lambda e: type(e).__name__)
def test_row_transformer_names_and_pandas(est):
    pd = pytest.importorskip("pandas")
    X = np.abs(ROWS) if isinstance(est, PowerNormalizer) else ROWS
    out = est.fit(X).transform(X)
    names = est.get_feature_names_out()
    assert len(names) == out.shape[1] and len(set(names)) == len(names)
    df = est.set_output(transform="pandas").transform(X)
    assert isinstance(df, pd.DataFrame) and list(df.columns) == list(names)
    np.testing.assert_allclose(df.to_numpy(), out, rtol=1e-6, atol=1e-6)
    assert isinstance(est.set_output(transform="default").transform(X), np.ndarray)


def test_kmeans_names_are_sklearns():
    km = KMeans(n_clusters=3, random_state=0, device="cpu").fit(ROWS)
    assert km.get_feature_names_out().tolist() == ["kmeans0", "kmeans1", "kmeans2"]


def test_patch_extractor_names_follow_the_hwc_layout():
    pd = pytest.importorskip("pandas")
    ext = RandomPatchExtractor(patch_size=2, n_patches=10, random_state=0).fit(IMAGES)
    names = ext.get_feature_names_out().tolist()
    assert names == [f"r{r}_c{c}_ch{ch}" for r in range(2) for c in range(2) for ch in range(3)]
    out = ext.transform(IMAGES)
    # Column "r1_c0_ch2" holds pixel (1, 0), channel 2 of each patch.
    np.testing.assert_array_equal(out.reshape(-1, 2, 2, 3)[:, 1, 0, 2], out[:, names.index("r1_c0_ch2")])
    df = ext.set_output(transform="pandas").transform(IMAGES)
    assert list(df.columns) == names and df.shape == out.shape
    with pytest.raises(Exception, match="not fitted"):
        RandomPatchExtractor(patch_size=2).get_feature_names_out()
