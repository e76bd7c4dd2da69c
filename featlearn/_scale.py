"""The pixels' value scale: recorded by :meth:`featlearn.PatchEncoder.fit`, checked by its
``transform``, so that images encoded at another scale than they were fitted at (0..1 floats
after 0..255 pixels, or the reverse) are a :class:`ScaleWarning` naming the fix, never quietly
meaningless features.
"""

from __future__ import annotations

import warnings

import numpy as np

#: Sampled patches (fit) and images per call (transform) used to estimate the value scale:
#: enough for a stable percentile, never a pass over the whole input.
_SCALE_SAMPLE_PATCHES = 4096
_SCALE_SAMPLE_IMAGES = 64
#: A transform input whose scale differs from the fitted one by more than this factor, either
#: way, gets a ScaleWarning.
_SCALE_TOLERANCE = 10.0


class ScaleWarning(UserWarning):
    """Data passed to ``transform`` has a different value scale from the data used to fit.

    The fitted stages are not scale-invariant (contrast normalization's ``eps`` is in pixel
    units, the centroids live where the fitted patches were), so 0..1 floats encoded by a model
    fitted on 0..255 pixels, or the reverse, give quietly meaningless features. The message
    names both scales and the fix.
    """


def value_scale(values) -> float:
    """The robust value scale of pixels: the 99th percentile of ``|x|`` (float32 arithmetic)."""
    values = np.abs(np.asarray(values, dtype=np.float32)).ravel()
    return float(np.percentile(values, 99)) if values.size else 0.0


def patch_scale(patches) -> float:
    """The value scale :meth:`featlearn.PatchEncoder.fit` records, from its first sampled
    (raw) patches."""
    return value_scale(patches[:_SCALE_SAMPLE_PATCHES])


def check_scale(X, fitted: float, stacklevel: int = 5) -> None:
    """Warn (:class:`ScaleWarning`) when the images ``X`` (a few evenly spaced ones) have a
    value scale more than ``_SCALE_TOLERANCE`` times off the ``fitted`` one, either way."""
    if fitted == 0.0:
        return  # fitted on black images: no scale to compare with
    idx = np.unique(np.linspace(0, X.shape[0] - 1, _SCALE_SAMPLE_IMAGES).astype(np.intp))
    scale = value_scale(X[idx])
    if scale == 0.0 or 1 / _SCALE_TOLERANCE <= scale / fitted <= _SCALE_TOLERANCE:
        return  # all-black images carry no scale information
    ratio = fitted / scale
    if 100 <= ratio <= 650:
        fix = ("if they are 0..1 floats and the encoder was fitted on 0..255 pixels, "
               "multiply them by 255")
    elif 1 / 650 <= ratio <= 1 / 100:
        fix = ("if they are 0..255 pixels and the encoder was fitted on 0..1 floats, "
               "divide them by 255")
    else:
        fix = f"multiply them by about {ratio:.3g}"
    warnings.warn(
        f"images passed to transform have a value scale of {scale:.3g} (99th percentile of "
        f"|x|) but the encoder was fitted on images of scale {fitted:.3g}; {fix}, or refit "
        "the encoder on data of this scale", ScaleWarning, stacklevel=stacklevel)
