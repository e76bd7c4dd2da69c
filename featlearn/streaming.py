"""Images in, classes out: a meta-estimator over a :class:`featlearn.PatchEncoder` and a
:class:`featlearn.TorchConvClassifier` head, each mini-batch encoded on the fly with random crop
+ flip, so no feature matrix is ever materialized (the way Thiry et al. train, and the GPU path).

It sits above both stages (datasets -> patches -> preprocessing -> kmeans -> encoding ->
classifier -> streaming, pipeline): :class:`ImageStream` feeds the head's training loop with
maps from the encoder's public :meth:`~featlearn.PatchEncoder.encoding_plan`.
"""

from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._logging import log
from ._torch import make_generator, resolve_device
from .classifier import TorchConvClassifier
from .classifier._conv import MapSource, scores
from .classifier._data import class_codes
from .classifier._losses import predict_index, probabilities
from .encoding import PatchEncoder
from .patches import check_images, image_input_tags


class ImageStream(MapSource):
    """Rows of images encoded to ``(C, h, w)`` maps per batch by a fitted
    :class:`featlearn.PatchEncoder`, optionally randomly cropped and flipped first.

    A row is one view of one image (``row = image * n_views + view``; view 1 is the mirror
    image), as in :class:`MapSource`. With ``crop_padding=p`` each image is padded with ``p``
    zero pixels on every side and a random window of its own size cut from it; with
    ``random_flip`` it is mirrored with probability 1/2. Offsets and flips are drawn from
    ``generator``, so a seeded run is repeatable. On a multi-core CPU a batch's chunks are
    encoded by worker threads of one intra-op thread each (as ``PatchEncoder.transform``
    does), every worker with a kernel of its own, kept for the next batches.
    """

    def __init__(self, images, encoder, device, *, n_views=1, crop_padding=0,
                 random_flip=False, generator=None):
        plan = encoder.encoding_plan()
        # the encoder's rule for a transform of these images (the native kernels on the CPU)
        compiled = encoder._use_compile(plan, resolve_device(device), len(images))
        self.kernels = plan.kernel_pool(device, len(images), compiled=compiled)
        self.X, self.n_views = images, n_views
        self.shape = (plan.per_cell,) + tuple(plan.pooled_shape)
        self.layout = "stream"
        self.n_samples, self.n_rows = len(images), len(images) * n_views
        self.crop_padding, self.random_flip, self.generator = crop_padding, random_flip, generator

    @property
    def row_bytes(self):
        """Bytes of one encoded row; the encoder's own buffers are allocated once."""
        return int(np.prod(self.shape)) * 8

    def batch(self, rows, device):
        """Rows ``rows`` (int64 numpy indices) encoded as a float32 ``(b, C, h, w)`` tensor."""
        V = self.n_views
        images = self.X[rows // V]
        mirror = (rows % V) == 1
        if self.crop_padding:
            images = self._crop(images)
        if self.random_flip:
            mirror ^= torch.rand(len(rows), generator=self.generator).numpy() < 0.5
        if mirror.any():
            images = images.copy()
            images[mirror] = images[mirror][:, :, ::-1]
        out = torch.empty((len(rows),) + self.shape, dtype=torch.float32, device=device)
        self.kernels.over_chunks(len(rows),
                                 lambda k, s, e: self._encode(k, images[s:e], out[s:e]))
        return out

    def _encode(self, kernel, images, out):
        C, h, w = self.shape
        with torch.no_grad():  # thread-local: entered in the worker itself
            cells = kernel.encode(images)  # (b, h*w, C): the kernel's buffers
            out.copy_(cells.reshape(-1, h, w, C).permute(0, 3, 1, 2).to(out.device))

    def _crop(self, images):
        p = self.crop_padding
        n, H, W, C = images.shape
        padded = np.zeros((n, H + 2 * p, W + 2 * p, C), dtype=images.dtype)
        padded[:, p:p + H, p:p + W] = images
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=self.generator).numpy()
        rows = offsets[:, :1, None] + np.arange(H)[None, :, None]  # (n, H, 1)
        cols = offsets[:, None, 1:] + np.arange(W)[None, None, :]  # (n, 1, W)
        return padded[np.arange(n)[:, None, None], rows, cols]


class StreamingConvClassifier(ClassifierMixin, BaseEstimator):
    """Images in, classes out: a :class:`featlearn.PatchEncoder` dictionary and a
    :class:`TorchConvClassifier` head trained on maps encoded batch by batch.

    ``fit`` fits a clone of ``encoder`` on the images (patches, normalization, whitening,
    dictionary), then trains a clone of ``head`` for ``head.max_iter`` epochs where every
    mini-batch is cropped and flipped at random (``crop_padding``, ``flip``) and encoded on the
    fly, so each epoch sees new augmentations and no feature matrix is ever stored: memory is
    the images plus one encoder chunk. Early stopping (``head.early_stopping``) scores its
    held-out images without augmentation. Prediction encodes each image (and, with
    ``test_flip``, its mirror image, averaging the two views' scores) in chunks.

    The encoder's pooling gives the head its map: ``pool_size=5, pool_stride=3,
    pool_op="mean"`` makes Thiry et al.'s 9x9 map of 32x32 images. The encoder must not flip
    (``flip=False``): the views here are drawn per batch. Encoding runs on the head's device.

    Parameters
    ----------
    encoder : PatchEncoder or None, default=None
        Unfitted; None: ``PatchEncoder(pool_size=5, pool_stride=3, pool_op="mean")``.
    head : TorchConvClassifier or None, default=None
        Unfitted, with ``n_views=1`` and no ``map_shape``; None: ``TorchConvClassifier()``.
        Its ``device`` is where the images are encoded and the head trained.
    crop_padding : int >= 0, default=4
        Zero pixels added on every side before a random crop back to the image size.
    flip : bool, default=True
        Mirror each training image with probability 1/2 in every batch.
    test_flip : bool, default=True
        Average each image's scores with its mirror image's at prediction.
    random_state : int, RandomState instance or None, default=None
        Seeds the augmentations (the encoder and the head keep their own ``random_state``).
    verbose : int, default=0

    Attributes
    ----------
    encoder_ : PatchEncoder
    head_ : TorchConvClassifier
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
        ``H * W * C`` of the training images.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import KMeans, PatchEncoder, StreamingConvClassifier, TorchConvClassifier
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(64) % 2
    >>> X = rng.integers(0, 100, (64, 12, 12, 3)).astype(np.uint8)
    >>> X[y == 1, :, :, 0] += 120  # class 1 is redder
    >>> enc = PatchEncoder(patch_size=4, n_patches=2000, kmeans=KMeans(16, random_state=0),
    ...                    pooling=2, device="cpu", random_state=0)
    >>> head = TorchConvClassifier(width=8, max_iter=10, learning_rate_init=0.05,
    ...                            device="cpu", random_state=0)
    >>> clf = StreamingConvClassifier(enc, head, crop_padding=1, random_state=0).fit(X, y)
    >>> clf.score(X, y) > 0.9
    True
    """

    _parameter_constraints = {
        "encoder": [None, HasMethods(["fit", "transform"])],
        "head": [None, TorchConvClassifier],
        "crop_padding": [Interval(numbers.Integral, 0, None, closed="left")],
        "flip": ["boolean"],
        "test_flip": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(self, encoder=None, head=None, crop_padding=4, flip=True, test_flip=True,
                 random_state=None, verbose=0):
        self.encoder = encoder
        self.head = head
        self.crop_padding = crop_padding
        self.flip = flip
        self.test_flip = test_flip
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y):
        """Fit the encoder on ``X`` (images, as :meth:`PatchEncoder.fit` takes them), then
        train the head on augmented maps encoded batch by batch.

        Returns
        -------
        self
        """
        self._validate_params()
        encoder, head = self._components()
        X = check_images(X, patch_size=encoder.patch_size, allow_nan=True,
                         channels=encoder.channels)
        y = column_or_1d(y, warn=True)
        classes, codes = class_codes(y, "StreamingConvClassifier")
        n = len(y)
        if X.shape[0] != n:
            raise ValueError(f"X holds {X.shape[0]} images but y has {n} labels")
        self.encoder_ = encoder.fit(X)  # checks the images' values; X is already (n, H, W, C)
        self.classes_, self.n_features_in_ = classes, int(np.prod(X.shape[1:]))
        device = resolve_device(head.device)
        t0 = time.perf_counter()
        train = ImageStream(X, self.encoder_, device, crop_padding=self.crop_padding,
                            random_flip=self.flip, generator=make_generator(self.random_state))
        plain = ImageStream(X, self.encoder_, device)
        head.classes_ = classes
        head.n_features_in_ = train.shape[0]
        self.head_ = head._fit_source(train, codes, None, eval_source=plain)
        log(self.verbose, "StreamingConvClassifier: %d images, %dx%d maps of %d channels, %d "
            "epochs (%.1f s)", n, train.shape[1], train.shape[2], train.shape[0],
            self.head_.n_iter_, time.perf_counter() - t0)
        return self

    def _components(self):
        encoder = (PatchEncoder(pool_size=5, pool_stride=3, pool_op="mean")
                   if self.encoder is None else clone(self.encoder))
        if not isinstance(encoder, PatchEncoder):
            raise TypeError(f"encoder must be a featlearn PatchEncoder, got "
                            f"{type(encoder).__name__}")
        if encoder.flip:
            raise ValueError("the encoder must have flip=False: StreamingConvClassifier draws "
                             "flips per batch (flip) and averages mirror views (test_flip)")
        head = TorchConvClassifier() if self.head is None else clone(self.head)
        if head.n_views != 1 or head.map_shape is not None:
            raise ValueError("head must have n_views=1 and map_shape=None: the maps come from "
                             "the encoder, one view per row (test_flip adds the mirror view)")
        return encoder, head

    def decision_function(self, X):
        """Raw scores of the head (averaged over the mirror view with ``test_flip``)."""
        out = self._scores(X)
        return out.ravel() if out.shape[1] == 1 else out

    def predict(self, X):
        """The class with the highest score."""
        scores = self._scores(X)  # checks fitted first
        return self.classes_[predict_index(scores)]

    @available_if(lambda self: self.head is None or self.head.loss == "cross_entropy")
    def predict_proba(self, X):
        """Class probabilities (softmax; sigmoid for 2 classes) of the averaged scores."""
        return probabilities(self._scores(X))

    def _scores(self, X):
        check_is_fitted(self)
        X = self.encoder_._check_transform_input(X)
        V = 2 if self.test_flip else 1
        model = self.head_.model_
        source = ImageStream(X, self.encoder_, next(model.parameters()).device, n_views=V)
        out = scores(model, source)
        return out.reshape(X.shape[0], V, -1).mean(axis=1)

    def __sklearn_tags__(self):
        return image_input_tags(super().__sklearn_tags__(), self.random_state)
