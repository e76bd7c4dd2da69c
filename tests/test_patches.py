import numpy as np
import pytest

from featlearn import RandomPatchExtractor
from featlearn.patches import flatten_patches, unflatten_patches


def images(n=7, h=9, w=8, c=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, shape).astype(dtype)


@pytest.mark.parametrize("c", [None, 1, 3])
def test_shapes_and_dtype(c):
    X = images(c=c)
    P = RandomPatchExtractor(patch_size=4, n_patches=50, random_state=0).fit_transform(X)
    assert P.shape == (50, 4 * 4 * (c or 1)) and P.dtype == np.float32


def test_each_patch_is_the_slice_of_its_image():
    X = images(n=5, h=10, w=12, c=3)
    p = 4
    P = RandomPatchExtractor(patch_size=p, n_patches=40, random_state=3).transform(X)
    for i, vec in enumerate(P):
        img = X[i % 5]
        cube = unflatten_patches(vec, p, 3)
        hits = [(r, c) for r in range(10 - p + 1) for c in range(12 - p + 1)
                if np.array_equal(img[r:r + p, c:c + p], cube)]
        assert hits, f"patch {i} is not a slice of image {i % 5}"
        # HWC flattening: element (r, c, ch) at (r*p + c)*C + ch
        r, c = hits[0]
        assert vec[(1 * p + 2) * 3 + 1] == img[r + 1, c + 2, 1]


def test_every_valid_position_is_reachable():
    # Encode the position in the pixels: pixel (r, c) = r * 16 + c.
    H, W, p = 9, 11, 3
    img = (np.arange(H)[:, None] * 16 + np.arange(W)[None, :]).astype(np.float32)[None]
    P = RandomPatchExtractor(patch_size=p, n_patches=20000, random_state=0).transform(img)
    corners = {(int(v // 16), int(v % 16)) for v in P[:, 0]}
    assert corners == {(r, c) for r in range(H - p + 1) for c in range(W - p + 1)}


def test_images_contribute_evenly():
    X = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 6, 6, 1), np.float32)
    P = RandomPatchExtractor(patch_size=2, n_patches=10, random_state=0).transform(X)
    assert P[:, 0].tolist() == [i % 4 for i in range(10)]


def test_determinism():
    X = images()
    a = RandomPatchExtractor(patch_size=3, n_patches=100, random_state=42).transform(X)
    b = RandomPatchExtractor(patch_size=3, n_patches=100, random_state=42).transform(X)
    c = RandomPatchExtractor(patch_size=3, n_patches=100, random_state=43).transform(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_float_images_keep_their_values():
    X = images(dtype=np.float64) / 255.0
    P = RandomPatchExtractor(patch_size=2, n_patches=5, random_state=0).transform(X)
    assert P.max() <= 1.0 and P.dtype == np.float32


def test_flatten_roundtrip():
    cube = np.arange(2 * 3 * 3 * 2).reshape(2, 3, 3, 2)
    np.testing.assert_array_equal(unflatten_patches(flatten_patches(cube), 3, 2), cube)


@pytest.mark.parametrize("X, match", [
    (np.zeros((3, 8, 8, 3, 1)), "3-D .* or 4-D"),
    (np.zeros((8, 8)), "3-D .* or 4-D"),
    (np.zeros((0, 8, 8, 3)), "empty"),
    (np.array([[["a"] * 8] * 8]), "numeric dtype"),
    (np.full((2, 8, 8, 3), np.nan), "NaN"),
    (np.full((2, 8, 8, 3), np.inf), "NaN or infinity"),
    (np.zeros((2, 4, 8, 3)), "smaller than the 6x6 patch"),
])
def test_bad_input(X, match):
    with pytest.raises(ValueError, match=match):
        RandomPatchExtractor(patch_size=6, n_patches=5).transform(X)


@pytest.mark.parametrize("method", ["fit", "transform"])
def test_values_past_float32_range_are_a_value_error(method):
    X = np.zeros((3, 8, 8, 3), np.float64)
    X[1, 2, 3, 0] = -1e39  # finite in float64, infinity once cast to float32
    with pytest.raises(ValueError, match="beyond float32's range"):
        getattr(RandomPatchExtractor(patch_size=6, n_patches=5), method)(X)
    X[1, 2, 3, 0] = 3e38  # within range: fine
    assert np.isfinite(RandomPatchExtractor(patch_size=6, n_patches=5).transform(X)).all()
