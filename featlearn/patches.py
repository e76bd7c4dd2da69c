"""Random patch sampling, and the one definition of the patch flattening layout.

Layout: a ``p x p`` patch of a ``C``-channel image is flattened in HWC order, i.e. element
``(r, c, ch)`` of the patch lands at index ``(r * p + c) * C + ch``. Every stage that turns
patches into vectors (sampling here, dense encoding in :mod:`featlearn.encoding`, the reference
implementations in the tests) goes through :func:`flatten_patches`, so the layout used to fit the
dictionary is by construction the one used to encode images; :func:`unflatten_patches` turns
vectors (e.g. centroids, for pictures) back into patches.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

#: Patches gathered per vectorised step; bounds the index arrays to a few tens of MB.
_GATHER_CHUNK = 65536
#: Values checked for NaN/inf per step, so validation never allocates a dataset-sized mask.
_FINITE_CHECK_VALUES = 2**21
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite_float32(X: np.ndarray, what: str = "images") -> None:
    """Raise a ValueError unless every value of ``X`` is finite once cast to float32.

    Every stage computes in float32, so a float64 value past float32's range (about 3.4e38)
    would become infinity there and silently turn centroids or features into NaN. Checked in
    chunks of rows, so the temporaries stay small whatever the size of ``X``.
    """
    if not np.issubdtype(X.dtype, np.floating):
        return  # integers (even int64) and booleans always fit
    wide = X.dtype.itemsize > 4
    verb = "contain" if what.endswith("s") else "contains"
    for chunk in row_blocks(X, _FINITE_CHECK_VALUES):
        if not np.isfinite(chunk).all():
            raise ValueError(f"{what} {verb} values that are not finite (NaN or infinity)")
        if wide and chunk.size and np.abs(chunk).max() > _FLOAT32_MAX:
            raise ValueError(f"{what} {verb} values beyond float32's range (|x| > 3.4e38), "
                             "which become infinity in float32; rescale them")


def row_blocks(X, max_values: int):
    """``X`` in blocks of whole rows of at most ``max_values`` values (at least one row): what
    a check over a large array iterates, so that its temporaries stay bounded."""
    rows = max(1, max_values // max(1, int(np.prod(X.shape[1:]))))
    for s in range(0, X.shape[0], rows):
        yield X[s:s + rows]


def flatten_patches(patches: np.ndarray) -> np.ndarray:
    """``(..., p, p, C)`` patches -> ``(..., p * p * C)`` vectors in the library's HWC layout."""
    return patches.reshape(*patches.shape[:-3], -1)


def unflatten_patches(vectors, patch_size: int, n_channels: int):
    """Inverse of :func:`flatten_patches`: ``(..., p*p*C)`` -> ``(..., p, p, C)``.

    Works for numpy arrays and torch tensors alike (the encoder uses it to turn centroids into
    convolution filters).
    """
    return vectors.reshape(*vectors.shape[:-1], patch_size, patch_size, n_channels)


#: The image layouts a stage accepts: "last" is (n, H, W, C) (numpy, PIL, scikit-image),
#: "first" is (n, C, H, W) (torch, torchvision).
CHANNELS = ("last", "first")


def check_image_array(X, *, what: str = "images", layout: str = "(n, H, W, C)",
                      allow_nan: bool = False) -> np.ndarray:
    """The checks every set of images gets, in whatever layout it comes; returns it as numpy.

    A torch tensor (on any device) is moved to the host once; a numpy array, memmaps included,
    is returned as it is. Raises a ValueError naming the problem: a dtype that is not real and
    numeric, not 3-D ``(n, H, W)`` or 4-D ``layout``, no images, an empty dimension, or (unless
    ``allow_nan``) values that are NaN/inf or past float32's range.
    """
    if not isinstance(X, np.ndarray):
        if hasattr(X, "detach"):  # torch tensor, on any device
            from ._torch import to_numpy

            X = to_numpy(X)
        X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ValueError(f"{what} must have a numeric dtype, got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real-valued, got dtype {X.dtype}")
    if X.ndim not in (3, 4):
        raise ValueError(
            f"{what} must be a 3-D (n, H, W) or 4-D {layout} array, got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"got an empty batch of images (shape {tuple(X.shape)})")
    if 0 in X.shape[1:]:
        raise ValueError(f"{what} have an empty dimension (shape {tuple(X.shape)})")
    if not allow_nan:
        check_finite_float32(X, what)
    return X


def check_images(X, *, patch_size: int | None = None, allow_nan: bool = False,
                 channels: str = "last") -> np.ndarray:
    """Validate a batch of images and return it as ``(n, H, W, C)``.

    Accepts ``(n, H, W)`` (taken as one channel) or 4-D images in the ``channels`` layout:
    ``"last"`` ``(n, H, W, C)`` or ``"first"`` ``(n, C, H, W)`` (returned as a transposed view,
    not a copy), uint8/integer or float, as a numpy array or a torch tensor on any device (moved
    to the host once). Raises a ValueError that names the problem: the checks of
    :func:`check_image_array` (``allow_nan`` for callers that check values later), images
    smaller than ``patch_size``, or channels-first images given as channels-last (the message
    names both layouts and the fix).
    """
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 'last' (n, H, W, C) or 'first' (n, C, H, W), got "
                         f"{channels!r}")
    if is_torch_dataset(X):
        raise ValueError(f"got a torch {type(X).__name__}: stream it through "
                         "PatchEncoder.transform or featlearn.extract_features, or pass the "
                         "images as one array or tensor (fitting samples patches from all of them)")
    layout = "(n, C, H, W)" if channels == "first" else "(n, H, W, C)"
    X = np.asarray(check_image_array(X, layout=layout, allow_nan=allow_nan))
    if X.ndim == 3:
        X = X[..., None]
    elif channels == "first":
        X = X.transpose(0, 2, 3, 1)
    elif _looks_channels_first(X.shape):
        n, C, H, W = X.shape
        raise ValueError(
            f"images of shape {X.shape} look channels-first (n, C, H, W): {n} images of "
            f"{H}x{W} pixels with {C} channel(s), the torch layout; featlearn reads (n, H, W, C) "
            f"by default, which would make them {C}x{H} images with {W} channels. Pass "
            "channels=\"first\" (command line: --channels first), or move the channels last "
            "(numpy: X.transpose(0, 2, 3, 1); torch: X.permute(0, 2, 3, 1))")
    if X.dtype == bool:
        X = X.astype(np.uint8)
    if patch_size is not None and (X.shape[1] < patch_size or X.shape[2] < patch_size):
        raise ValueError(
            f"images of size {X.shape[1]}x{X.shape[2]} are smaller than the "
            f"{patch_size}x{patch_size} patch")
    return X


def _looks_channels_first(shape) -> bool:
    """(n, C, H, W) with C in {1, 3, 4}, read as (n, H, W, C): images a few pixels tall with
    more channels than any image format has. No real channels-last data looks like this."""
    return shape[1] in (1, 3, 4) and shape[2] > 4 and shape[3] > 4


def is_torch_dataset(X) -> bool:
    """Whether ``X`` is a torch Dataset/DataLoader, checked without importing torch if nothing
    else has (then it cannot be one)."""
    if "torch" not in sys.modules:
        return False
    from ._torch import is_torch_data

    return is_torch_data(X)


class RandomPatchExtractor(TransformerMixin, BaseEstimator):
    """Sample random square patches from a set of images.

    Patch ``i`` is taken from image ``i mod n_images`` (so every image contributes evenly, as in
    the Coates-Ng demo) at a top-left corner drawn uniformly over all valid positions. Patches
    are returned flattened in the library's HWC layout (see :func:`flatten_patches`) with the
    raw pixel scale preserved (0..255 stays 0..255).

    Parameters
    ----------
    patch_size : int, default=6
        Side of the square patch (the paper's receptive field ``rf``).
    n_patches : int, default=400_000
        Number of patches returned by :meth:`transform`.
    random_state : int, RandomState instance or None, default=None
        Controls the corner positions. An int gives the same patches on every call.
    channels : {"last", "first"}, default="last"
        Layout of 4-D images: ``(n, H, W, C)`` or the torch layout ``(n, C, H, W)``. Patches
        come out in the HWC layout either way. Images may be numpy arrays or torch tensors
        (on any device).

    Attributes
    ----------
    n_features_in_ : int
        ``H * W * C`` of the images seen in :meth:`fit` (fit only validates; the extractor is
        stateless).

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import RandomPatchExtractor
    >>> images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    >>> RandomPatchExtractor(patch_size=6, n_patches=100, random_state=0).transform(images).shape
    (100, 108)
    """

    _parameter_constraints = {
        "patch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_patches": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "channels": [StrOptions(set(CHANNELS))],
    }

    def __init__(self, patch_size=6, n_patches=400_000, random_state=None, channels="last"):
        self.patch_size = patch_size
        self.n_patches = n_patches
        self.random_state = random_state
        self.channels = channels

    def fit(self, X, y=None):
        """Validate the images; nothing is learned."""
        self._validate_params()
        X = check_images(X, patch_size=self.patch_size, channels=self.channels)
        self.n_features_in_ = int(np.prod(X.shape[1:]))
        self.n_channels_ = int(X.shape[3])
        return self

    def get_feature_names_out(self, input_features=None):
        """``r{row}_c{col}_ch{channel}``: the pixel of the patch each column holds, in the
        library's HWC patch layout (see :func:`flatten_patches`)."""
        check_is_fitted(self, "n_channels_")
        p, C = self.patch_size, self.n_channels_
        return np.asarray([f"r{r}_c{c}_ch{ch}" for r in range(p) for c in range(p)
                           for ch in range(C)], dtype=object)

    def transform(self, X):
        """Return ``(n_patches, patch_size**2 * C)`` float32 patches sampled from ``X``."""
        self._validate_params()
        X = check_images(X, patch_size=self.patch_size, channels=self.channels)
        n, H, W, C = X.shape
        p = self.patch_size
        rng = check_random_state(self.random_state)
        rows = rng.randint(0, H - p + 1, size=self.n_patches)
        cols = rng.randint(0, W - p + 1, size=self.n_patches)
        images = np.arange(self.n_patches) % n
        offsets = np.arange(p)
        out = np.empty((self.n_patches, p * p * C), dtype=np.float32)
        for start in range(0, self.n_patches, _GATHER_CHUNK):
            s = slice(start, start + _GATHER_CHUNK)
            r = rows[s, None, None] + offsets[None, :, None]
            c = cols[s, None, None] + offsets[None, None, :]
            gathered = X[images[s, None, None], r, c]  # (m, p, p, C)
            out[s] = flatten_patches(gathered)
        return out

    def __sklearn_tags__(self):
        tags = image_input_tags(super().__sklearn_tags__())
        tags.requires_fit = False
        return tags


def image_input_tags(tags, random_state="unset"):
    """scikit-learn tags of an estimator that takes images (3-D and 4-D arrays, not 2-D), and
    is non-deterministic when its ``random_state`` is None."""
    tags.input_tags.two_d_array = False
    tags.input_tags.three_d_array = True
    if random_state != "unset":
        tags.non_deterministic = random_state is None
    return tags
