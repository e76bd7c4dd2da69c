"""Dense patch encoding and pooling: the image-level stage of the Coates-Ng pipeline.

:class:`PatchEncoder` owns the fitted patch-space steps (normalizer, whitener, dictionary) and
applies them to *every* patch of every image, chunk by chunk, so that no patch matrix larger than
one cache-sized chunk ever exists.

The chunk kernel (:mod:`featlearn._encoding_kernel`) does the work, from the numbers
:meth:`PatchEncoder.encoding_plan` gathers; its docstring says how it is laid out and why. Where
the pooling cells lie is :mod:`featlearn.pooling`'s arithmetic, and the check that images come
at the scale they were fitted at is :mod:`featlearn._scale`'s.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._compile import COMPILE_DEVICES
from ._logging import log, progress
from ._torch import (is_torch_data, iter_image_batches, resolve_device, resolve_precision,
                     stream_length, to_numpy)
from ._encoding_kernel import Plan, encode_block, encode_into, out_shape
from ._scale import check_scale, patch_scale
from ._scale import ScaleWarning, value_scale  # noqa: F401  (featlearn.encoding's public names)
from .activations import ACTIVATIONS, n_nearest
from .pooling import POOL_OPS, cell_bounds, map_shape, pool_window
from .pooling import pooling_bounds  # noqa: F401  (featlearn.encoding.pooling_bounds)
from .patches import (RandomPatchExtractor, check_finite_float32, check_images, image_input_tags,
                      row_blocks)
from .preprocessing import PatchNormalizer, ZCAWhitening

#: Images per joblib task when ``n_jobs`` is set (rounded to whole chunks): big enough to
#: amortize shipping the plan, small enough to balance and to report progress.
_TASK_IMAGES = 512
#: Bytes of the boolean mask of one block of the float16 overflow check.
_RANGE_CHECK_BYTES = 16 * 2**20
#: ``compile="auto"`` compiles the activation and pooling only for a transform that computes at
#: least this many activation entries (images x views x positions x features per position):
#: about 8,600 32x32 images at K=1600, enough that a first (cold-cache) compilation repays itself.
_COMPILE_MIN_ENTRIES = 10**10


class PatchEncoder(TransformerMixin, BaseEstimator):
    """Encode every patch of every image against a learned dictionary, then pool.

    ``fit(images)`` samples ``n_patches`` random patches (:class:`RandomPatchExtractor`), fits the
    contrast normalizer, the whitener and k-means on them in turn (each a clone of the given
    estimator). ``transform(images)`` takes every ``patch_size`` patch at the given ``stride``,
    applies the *same* fitted normalization and whitening, encodes it against the centroids and
    pools the feature map over cells: a grid (``pooling``), or windows of ``pool_size`` every
    ``pool_stride`` positions (Thiry et al.'s spatial maps).

    Output layout (``layout="flat"``): ``(n_images, n_cells * n_per_cell)`` float32, cell-major:
    all features of cell 0, then cell 1, ...; cells in row-major order over the pooled map (for
    a (2, 2) grid: top-left, top-right, bottom-left, bottom-right). Grid boundaries are rounded
    half up, so the 27x27 map of 32x32 images splits into rows/cols 0..13 and 14..26 exactly as
    the Coates-Ng demo. Windows follow ``avg_pool2d(ceil_mode=True)`` without padding: a last
    window may hang over the edge and is clipped (27 positions, size 5, stride 3: 9 windows,
    the last ``[24, 27)``). ``layout="map"`` returns the same numbers as
    ``(n_images, n_per_cell, h, w)`` maps (``(h, w) = pooled_shape_``), the input of
    :class:`featlearn.TorchConvClassifier`, which also reads the flat layout given
    ``map_shape=pooled_shape_``.

    Activations, with ``y`` the whitened patch and ``c_k`` the centroids (``K`` of them):

    * ``"triangle"``: ``z_k = ||y - c_k||``, ``f_k = max(0, mean_j z_j - z_k)``; K per cell.
    * ``"hard"``: one-hot of the nearest centroid; K per cell (sum pooling counts assignments).
    * ``"soft_threshold"``: ``[max(0, c_k.y - alpha), max(0, -c_k.y - alpha)]``; 2K per cell,
      the K positive parts first, then the K negative parts.
    * ``"nearest_fraction"`` (Thiry et al.): 1 for the ``k = int(neighbor_fraction * K)``
      centroids nearest ``y`` in Euclidean distance (in whitened space), else 0; then the same
      for ``-y``; 2K per cell (the ``y`` block first). The rule is theirs: an entry is 1 when
      its distance is strictly below the ``(k+1)``-th smallest, so a tie at the boundary gives
      fewer than ``k``. ``selection`` says how that threshold is found.
    * ``"heaviside"`` (Thiry et al.'s fixed threshold): ``[1(cos(y, c_k) > alpha),
      1(cos(-y, c_k) > alpha)]`` with unit-norm ``y`` and ``c_k``; 2K per cell. A zero patch
      has cosine 0. Their default threshold is 0.1.

    Transform runs in bounded memory: images are processed in chunks of ``batch_size`` images
    (normalization and whitening are applied to the chunk's patch rows, and the distance products
    are one preallocated GEMM per chunk), so peak memory is the output array plus a constant.

    Parameters
    ----------
    patch_size : int, default=6
        Side of the square receptive field.
    n_patches : int, default=400_000
        Random patches sampled in :meth:`fit` (patch i from image i mod n_images).
    normalizer : estimator, "passthrough" or None, default=None
        Per-patch normalization fitted on the sampled patches. None means
        ``PatchNormalizer()``; "passthrough" skips the stage. A :class:`PatchNormalizer` runs
        inside the torch kernel; any other transformer is applied to each chunk's patch rows
        through its ``transform`` (correct, slower).
    whitener : estimator, "passthrough" or None, default=None
        Whitening fitted on the normalized patches. None means ``ZCAWhitening()``;
        "passthrough" skips it. A :class:`ZCAWhitening` is applied as ``(x - mean_) @ whitening_``
        in the kernel; other transformers through ``transform``.
    kmeans : estimator or None, default=None
        Dictionary learner with a ``cluster_centers_`` attribute after ``fit`` (shape
        ``(K, d')``, ``d'`` the whitener's output width). None means
        ``featlearn.KMeans(1600)`` (full-batch Lloyd, 50 iterations), resolved at fit time.
    stride : int, default=1
        Step between patch positions in :meth:`transform`.
    activation : {"triangle", "hard", "soft_threshold", "nearest_fraction", "heaviside"}, \
            default="triangle"
        See Activations above.
    alpha : float, default=0.25
        Threshold of the ``"soft_threshold"`` activation (on ``c.y``) and of ``"heaviside"``
        (on the cosine).
    pooling : (int, int) or int, default=(2, 2)
        Pooling grid (rows, cols); an int means a square grid.
    pool_op : {"sum", "max", "mean"}, default="sum"
        ``"mean"`` divides each cell by its size (a clipped edge window by its clipped size).
    batch_size : int or "auto", default="auto"
        Images per chunk. "auto" keeps a CPU chunk near the cache (a few 32x32 images at
        K=1600) and sizes a GPU chunk from free memory.
    device : str, torch.device or "auto", default="auto"
        Where transform runs; "auto" is CUDA when available. Fitted state is kept as numpy, so
        an encoder fitted on a GPU unpickles and runs on a CPU-only machine.
    n_jobs : int or None, default=None
        If set, blocks of images are encoded through ``joblib.Parallel(n_jobs)``, so
        ``with joblib.parallel_config(backend="dask"):`` spreads them over a dask cluster.
        None encodes in this process: on the CPU, chunks go to ``torch.get_num_threads()``
        worker threads of one intra-op thread each, a kernel each, so no op waits at a
        barrier for a thread that other jobs on the machine have descheduled (torch runs
        other threads' ops on one thread while a transform lasts).
    random_state : int, RandomState instance or None, default=None
        Seeds the patch sampling and the *default* k-means. A user-supplied ``kmeans`` keeps
        its own ``random_state`` (None stays None): the encoder never rewrites the parameters
        of an estimator it was handed, so set the seed there for a reproducible dictionary.
    verbose : int, default=0
        If > 0, a progress bar for transform (see :mod:`featlearn._logging`).
    flip : bool, default=False
        Also encode the horizontal mirror of every image and append its features as a second
        block of columns, ``[f(x), f(mirror(x))]``: flip augmentation that keeps one row per
        sample (see :mod:`featlearn.pipeline`).
    compile : bool or "auto", default="auto"
        Run the activation and pooling of each chunk as one :func:`torch.compile` graph
        (inductor fuses their elementwise passes and reductions into one or two passes over the
        distance matrix) instead of one eager pass per operation. On the CPU the triangle and
        the nearest-fraction code (sum or mean pooling, over a grid or windows) run as native
        kernels instead, which "auto" always uses: they compile nothing per process. Otherwise
        "auto" compiles on CPU and CUDA for transforms large enough to repay a first
        compilation (about 10^10 activation entries: some 8,600 CIFAR images at K=1600);
        compiled code is cached on disk by inductor, so later processes only re-trace. Results
        match the eager path to float32 rounding. A missing compiler or any compile error logs
        one warning and runs eagerly.
        Blocks sent to ``n_jobs`` workers run the native kernels where those apply, else
        eagerly.
    neighbor_fraction : float in (0, 1), default=0.4
        Fraction of the centroids marked by ``"nearest_fraction"`` (at least one).
    selection : {"sampled", "exact"}, default="sampled"
        How ``"nearest_fraction"`` finds each row's threshold: ``"exact"`` is the order
        statistic over all ``K`` distances (``torch.kthvalue``, Thiry et al.'s); ``"sampled"``
        estimates it from 256 evenly strided distances of the row (identical for
        ``K < 512``), cheaper for large ``K`` at the price of a few entries on the other side
        of the threshold (benchmarks/results/encodings.md measures both). Compiled, either
        threshold is found by bisection over those entries: on the CPU by a small native
        kernel built once with the system's C compiler (cached under
        ``~/.cache/featlearn/native``, or ``$FEATLEARN_CACHE_DIR``), else by a compiled graph
        with the order statistic for the rare rows it leaves undecided; both give the same
        numbers as eager.
    pool_size : int, (int, int) or None, default=None
        Pooling windows (rows, cols) that replace the ``pooling`` grid; None uses the grid.
    pool_stride : int, (int, int) or None, default=None
        Step between windows; None means ``pool_size`` (non-overlapping).
    layout : {"flat", "map"}, default="flat"
        ``"flat"`` rows of features (cell-major), or ``"map"``: ``(n, channels, h, w)`` with the
        ``flip`` view's channels after the original's (see Output layout).
    channels : {"last", "first"}, default="last"
        Layout of 4-D images: ``(n, H, W, C)`` or the torch layout ``(n, C, H, W)``. Images
        given in the default layout that look channels-first (``(n, 3, 32, 32)``) are a
        ValueError naming both layouts, never 3x32 images with 32 channels.
    output : {"numpy", "torch"}, default="numpy"
        What :meth:`transform` returns: a numpy array, or a tensor on the encoder's resolved
        ``device`` (for a torch model downstream that keeps features on the GPU).
    precision : {"float32", "bfloat16", "auto"}, default="float32"
        The distance GEMM's precision. ``"bfloat16"`` rounds the whitened patches, the
        centroids and the products to bfloat16 (8 significant bits; the activation and
        pooling stay float32), which CUDA GPUs and CPUs with AMX or AVX512-BF16 multiply
        natively, faster than float32; elsewhere torch emulates it, slower. ``"auto"`` is
        bfloat16 where it is native, resolved once by :meth:`fit` (``precision_``).
        benchmarks/results/encode.md measures how far the features move and what accuracy
        that costs.
    dtype : {"float32", "float16"}, default="float32"
        The output's dtype (the kernel computes in float32 and rounds once when it stores a
        chunk). ``"float16"`` halves the features' memory: sum-pooled counts of the binary
        encodings ("nearest_fraction", "heaviside", "hard") are exact in it up to 2048 patches
        per cell, other features keep 11 significant bits. :class:`featlearn.TorchMLPClassifier`
        and :class:`featlearn.TorchConvClassifier` train on float16 features without a float32
        copy of them.

    Notes
    -----
    ``fit`` takes images as a numpy array (a memory-mapped ``.npy`` included) or a torch tensor
    on any device (moved to the host once: the kernel streams chunks to ``device`` itself).
    ``transform`` also takes a torch ``Dataset`` or ``DataLoader`` yielding images or
    ``(images, labels)`` (labels are ignored; tensors, arrays or PIL images): it is streamed
    batch by batch (a ``Dataset`` in batches of 256), so memory holds one batch plus the output;
    a shuffling ``DataLoader`` is refused, since its rows could not be matched to labels.
    Fitting samples patches from every image, so it needs an array or tensor.

    The fitted stages depend on the pixels' scale (``PatchNormalizer``'s ``eps=10`` is in 0..255
    pixel units), so images must be encoded at the scale they were fitted at. ``fit`` records
    that scale (``input_scale_``, the 99th percentile of ``|x|`` over sampled patches);
    ``transform`` estimates it on a few evenly spaced images of its input and, if the two differ
    by more than 10x either way (0..1 floats after fitting on 0..255 bytes, or the reverse),
    warns with :class:`featlearn.ScaleWarning`, naming both scales and the fix (multiply or
    divide by 255, or refit). Turn the warning into an error with
    ``warnings.simplefilter("error", featlearn.ScaleWarning)``. Values that are NaN, infinite
    or past float32's range (a float64 1e39) are a ValueError in ``fit`` and ``transform``.

    Attributes
    ----------
    normalizer_, whitener_ : estimator or "passthrough"
        The fitted clones (or "passthrough").
    kmeans_ : estimator
        The fitted dictionary learner; ``kmeans_.cluster_centers_`` are the centroids.
    n_clusters_ : int
        Number of centroids ``K``.
    image_shape_ : tuple (H, W, C)
        Image shape seen in :meth:`fit`; transform requires the same.
    input_scale_ : float
        Value scale of the fitted images (99th percentile of ``|x|`` over sampled raw patches);
        see Notes.
    n_features_in_ : int
        ``H * W * C``.
    precision_ : {"float32", "bfloat16"}
        ``precision`` with "auto" resolved in :meth:`fit` for the encoder's ``device`` then,
        so that every chunk, every ``n_jobs`` worker and every later transform computes the
        same numbers. ``transform`` runs in ``precision`` when that is "float32" or
        "bfloat16" (set before or after fit), else in ``precision_``: refit to resolve "auto"
        for another device.
    map_shape_ : tuple (rows, cols)
        Patch positions per image at ``stride``.
    pooled_shape_ : tuple (h, w)
        Cells of the pooled map: the grid, or the number of windows per side.
    n_features_out_ : int
        ``n_cells * K`` (``2K`` per cell for the width-2 activations "soft_threshold",
        "nearest_fraction" and "heaviside"), doubled with ``flip``; with ``layout="map"`` the
        size of one output map stack.

    See Also
    --------
    featlearn.RandomPatchExtractor, featlearn.PatchNormalizer, featlearn.ZCAWhitening,
    featlearn.KMeans

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.cluster import KMeans
    >>> from featlearn import PatchEncoder
    >>> images = np.random.default_rng(0).integers(0, 256, (20, 12, 12, 3), dtype=np.uint8)
    >>> enc = PatchEncoder(n_patches=500, kmeans=KMeans(8, n_init=1, random_state=0),
    ...                    random_state=0).fit(images)
    >>> enc.transform(images).shape
    (20, 32)
    >>> thiry = PatchEncoder(n_patches=500, kmeans=KMeans(8, n_init=1, random_state=0),
    ...                      activation="nearest_fraction", pool_size=3, pool_stride=2,
    ...                      pool_op="mean", layout="map", random_state=0).fit(images)
    >>> thiry.transform(images).shape
    (20, 16, 3, 3)
    """

    _parameter_constraints = {
        "patch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_patches": [Interval(numbers.Integral, 2, None, closed="left")],
        "normalizer": [HasMethods(["fit", "transform"]), StrOptions({"passthrough"}), None],
        "whitener": [HasMethods(["fit", "transform"]), StrOptions({"passthrough"}), None],
        "kmeans": [HasMethods(["fit"]), None],
        "stride": [Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "alpha": [Interval(numbers.Real, None, None, closed="neither")],
        "pooling": [Interval(numbers.Integral, 1, None, closed="left"), "array-like"],
        "pool_op": [StrOptions(set(POOL_OPS))],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "device": "no_validation",
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "flip": ["boolean"],
        "compile": ["boolean", StrOptions({"auto"})],
        "neighbor_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "selection": [StrOptions({"exact", "sampled"})],
        "pool_size": [Interval(numbers.Integral, 1, None, closed="left"), "array-like", None],
        "pool_stride": [Interval(numbers.Integral, 1, None, closed="left"), "array-like", None],
        "layout": [StrOptions({"flat", "map"})],
        "channels": [StrOptions({"last", "first"})],
        "output": [StrOptions({"numpy", "torch"})],
        "precision": [StrOptions({"float32", "bfloat16", "auto"})],
        "dtype": [StrOptions({"float32", "float16"})],
    }

    def __init__(self, patch_size=6, n_patches=400_000, normalizer=None, whitener=None,
                 kmeans=None, stride=1, activation="triangle", alpha=0.25, pooling=(2, 2),
                 pool_op="sum", batch_size="auto", device="auto", n_jobs=None,
                 random_state=None, verbose=0, flip=False, compile="auto",
                 neighbor_fraction=0.4, selection="sampled", pool_size=None, pool_stride=None,
                 layout="flat", channels="last", output="numpy", precision="float32",
                 dtype="float32"):
        self.patch_size = patch_size
        self.n_patches = n_patches
        self.normalizer = normalizer
        self.whitener = whitener
        self.kmeans = kmeans
        self.stride = stride
        self.activation = activation
        self.alpha = alpha
        self.pooling = pooling
        self.pool_op = pool_op
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.flip = flip
        self.compile = compile
        self.neighbor_fraction = neighbor_fraction
        self.selection = selection
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.layout = layout
        self.channels = channels
        self.output = output
        self.precision = precision
        self.dtype = dtype

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Sample patches from ``X`` and fit normalizer, whitener and k-means on them."""
        self._validate_params()
        X = check_images(X, patch_size=self.patch_size, allow_nan=True, channels=self.channels)
        _check_finite(X)
        n, H, W, C = X.shape
        self._cell_bounds(map_shape((H, W), self.patch_size, self.stride))  # fail now, not later

        rng = check_random_state(self.random_state)
        patch_seed = rng.randint(np.iinfo(np.int32).max)
        kmeans_seed = rng.randint(np.iinfo(np.int32).max)
        patches = RandomPatchExtractor(self.patch_size, self.n_patches,
                                       random_state=patch_seed).fit_transform(X)
        input_scale = patch_scale(patches)

        self.normalizer_ = _fit_stage(self.normalizer, PatchNormalizer, patches)
        if self.normalizer_ != "passthrough":
            patches = self.normalizer_.transform(patches)
        self.whitener_ = _fit_stage(self.whitener, ZCAWhitening, patches)
        if self.whitener_ != "passthrough":
            patches = self.whitener_.transform(patches)

        if self.kmeans is None:
            from .kmeans import KMeans  # resolved lazily: the default, not an import dep
            kmeans = KMeans(1600, random_state=kmeans_seed)
        else:
            kmeans = clone(self.kmeans)
        self.kmeans_ = kmeans.fit(np.asarray(patches, dtype=np.float32))
        centers = _centers(self.kmeans_)
        if centers.ndim != 2 or centers.shape[1] != patches.shape[1]:
            raise ValueError(
                f"kmeans.cluster_centers_ has shape {centers.shape}; expected (K, "
                f"{patches.shape[1]}) to match the whitened patch width")

        self.image_shape_ = (H, W, C)
        self.input_scale_ = input_scale
        self.n_features_in_ = H * W * C
        self.n_clusters_ = int(centers.shape[0])
        self.precision_ = resolve_precision(self.precision, self.device)
        self._check_neighbors()
        return self

    # The encoding-time parameters (stride, activation, pooling, pool_op, flip) do not enter
    # the fitted state, so these follow them: changing one after fit needs no refit.
    @property
    def map_shape_(self):
        return map_shape(self.image_shape_[:2], self.patch_size, self.stride)

    @property
    def n_features_out_(self):
        rows, cols = self._cell_bounds(self.map_shape_)
        per_cell = ACTIVATIONS[self.activation].width * self.n_clusters_
        return len(rows) * len(cols) * per_cell * (2 if self.flip else 1)

    @property
    def pooled_shape_(self):
        """``(h, w)`` of the pooled map: the grid, or the number of windows per side."""
        rows, cols = self._cell_bounds(self.map_shape_)
        return (len(rows), len(cols))

    # ------------------------------------------------------------ transform
    def transform(self, X):
        """Encode and pool every image: ``(n_images, n_features_out_)`` of ``dtype``.

        ``X``: images as in :meth:`fit`, or a torch ``Dataset``/``DataLoader`` (streamed; see
        Notes). Returns a numpy array, or a tensor on ``device`` with ``output="torch"``.
        """
        check_is_fitted(self)
        self._validate_params()
        if is_torch_data(X):
            return _as_output(self, _transform_stream(self, X))
        X = self._check_transform_input(X)
        plan = self.encoding_plan()
        device = resolve_device(self.device)
        n = X.shape[0]
        compiled = self._use_compile(plan, device, n)
        batch = plan.chunk_images(device, compiled)
        out = np.empty(out_shape(plan, n), dtype=self.dtype)
        with progress(n, desc="encode", verbose=self.verbose) as bar:
            if self.n_jobs is None:
                encode_into(plan, X, out, device, batch, bar, compiled=compiled)
            else:
                _encode_parallel(plan, X, out, self.device, batch, self.n_jobs, bar, compiled)
        if out.dtype == np.float16:
            _check_float16_range(out)
        return _as_output(self, out)

    def _check_transform_input(self, X):
        """Images as ``(n, H, W, C)``, checked against the fitted shape, finite, on scale."""
        X = check_images(X, patch_size=self.patch_size, allow_nan=True, channels=self.channels)
        if X.shape[1:] != tuple(self.image_shape_):
            H, W, C = self.image_shape_
            raise ValueError(
                f"images have size {X.shape[1]}x{X.shape[2]} with {X.shape[3]} channel(s); the "
                f"encoder was fitted on {H}x{W} images with {C} channel(s)")
        _check_finite(X)
        check_scale(X, self.input_scale_)
        self._check_neighbors()
        return X

    def get_feature_names_out(self, input_features=None):
        """``patchencoder_c{cell}_k{k}`` (width-2 activations: ``..._k{k}_pos`` then
        ``..._k{k}_neg``; the mirrored block with ``flip``: ``patchencoder_flip_c{cell}_...``),
        in the order of ``transform(X).reshape(len(X), -1)``'s columns: cell-major for
        ``layout="flat"``, channel-major (``c{cell}`` varying fastest) for ``"map"``."""
        check_is_fitted(self)
        return _feature_names(ACTIVATIONS[self.activation].width, self.n_clusters_,
                              int(np.prod(self.pooled_shape_)), self.flip, self.layout)

    # -------------------------------------------------------------- helpers
    def _use_compile(self, plan, device, n_images):
        """Whether this transform runs the compiled activation + pooling (see ``compile``);
        with ``n_jobs``, only where the native kernels take it (workers compile no graphs)."""
        native = plan.native_pooling(device)
        if self.n_jobs is not None and not native:
            return False
        if self.compile == "auto":
            # the native kernels compile nothing per process: any transform repays them
            entries = (n_images * (2 if plan.flip else 1) * plan.map_shape[0] * plan.map_shape[1]
                       * plan.per_cell)
            use = native or (device.type in COMPILE_DEVICES and entries >= _COMPILE_MIN_ENTRIES)
        else:
            use = bool(self.compile)
        if use and native:
            log(self.verbose, "encoding through the native activation + pooling kernels")
        elif use:
            log(self.verbose, "encoding through the compiled activation + pooling kernel "
                "(the first compilation on a machine is slow; inductor caches it)")
        return use

    def _cell_bounds(self, shape):
        """Row and column bounds of the pooling cells over a ``shape`` map: ``pool_size``
        windows every ``pool_stride`` when ``pool_size`` is set, else the ``pooling`` grid."""
        return cell_bounds(shape, self.pooling, pool_window(self.pool_size, self.pool_stride))

    def _check_neighbors(self):
        if self.activation == "nearest_fraction" and n_nearest(self.neighbor_fraction,
                                                               self.n_clusters_) < 1:
            raise ValueError(
                f"neighbor_fraction={self.neighbor_fraction} of {self.n_clusters_} centroids "
                "marks none of them; raise it to at least 1/K")

    def _transform_precision(self):
        """The precision :meth:`transform` multiplies in: ``precision`` when explicit, else the
        fitted ``precision_``."""
        return self.precision_ if self.precision == "auto" else self.precision

    def encoding_plan(self):
        """The fitted encoder as a :class:`featlearn._encoding_kernel.Plan`: every number a
        chunk of images needs (fitted stages, centroids, pooling cells, resolved precision),
        numpy-only and picklable, for the current encoding-time parameters.

        ``plan.kernel(device)`` encodes chunks on a device (``kernel.encode(images)`` ->
        ``(b, n_cells, per_cell)`` tensor); ``plan.chunk_images(device)`` is the chunk size
        ``transform`` uses there. What :class:`featlearn.StreamingConvClassifier` encodes its
        mini-batches with.
        """
        check_is_fitted(self)
        H, W, C = self.image_shape_
        Ph, Pw = self.map_shape_
        rows, cols = self._cell_bounds((Ph, Pw))
        return Plan(
            patch_size=self.patch_size, stride=self.stride, image_shape=(H, W, C),
            map_shape=(Ph, Pw), row_bounds=rows, col_bounds=cols, normalizer=self.normalizer_,
            whitener=self.whitener_, centers=_centers(self.kmeans_),
            activation=self.activation, alpha=float(self.alpha), pool_op=self.pool_op,
            flip=bool(self.flip), fraction=float(self.neighbor_fraction),
            selection=self.selection, layout=self.layout,
            window=pool_window(self.pool_size, self.pool_stride),
            precision=self._transform_precision(), batch_size=self.batch_size)

    def __sklearn_tags__(self):
        return image_input_tags(super().__sklearn_tags__(), self.random_state)


# ---------------------------------------------------------------------------------- internals
def _fit_stage(est, default_cls, patches):
    if isinstance(est, str) and est == "passthrough":
        return "passthrough"
    est = default_cls() if est is None else clone(est)
    return est.fit(patches)


def _centers(kmeans):
    centers = kmeans.cluster_centers_
    if isinstance(centers, torch.Tensor):
        centers = to_numpy(centers)
    return np.asarray(centers, dtype=np.float32)


def _encode_parallel(plan, X, out, device, batch, n_jobs, progress, compiled=False):
    """``n_jobs``: blocks of ``_TASK_IMAGES`` (whole chunks) encoded by ``joblib.Parallel``
    tasks, each block's rows copied into ``out`` as it arrives."""
    from joblib import Parallel, delayed

    task = max(batch, (_TASK_IMAGES // batch) * batch)
    starts = range(0, X.shape[0], task)
    jobs = (delayed(encode_block)(plan, X[s:s + task], device, batch, compiled)
            for s in starts)
    parallel = Parallel(n_jobs=n_jobs, return_as="generator")
    for s, block in zip(starts, parallel(jobs)):
        out[s:s + block.shape[0]] = block
        progress.update(block.shape[0])


def _feature_names(width, K, n_cells, flip, layout):
    """The names of :meth:`PatchEncoder.get_feature_names_out`, in the output's column order."""
    if width == 2:
        per_cell = [f"k{k}_pos" for k in range(K)] + [f"k{k}_neg" for k in range(K)]
    else:
        per_cell = [f"k{k}" for k in range(K)]
    views = ["patchencoder_", "patchencoder_flip_"] if flip else ["patchencoder_"]
    if layout == "map":
        names = [f"{view}c{c}_{name}" for view in views for name in per_cell
                 for c in range(n_cells)]
    else:
        names = [f"{view}c{c}_{name}" for view in views for c in range(n_cells)
                 for name in per_cell]
    return np.asarray(names, dtype=object)


def _check_float16_range(out):
    """A ValueError when a float16 output overflowed; checked in row blocks whose mask takes
    at most ``_RANGE_CHECK_BYTES``, never one the size of the output."""
    for block in row_blocks(out, _RANGE_CHECK_BYTES):  # a boolean mask: a byte per value
        if not np.isfinite(block).all():
            raise ValueError("the features exceed float16's range (65504): use "
                             "dtype='float32', or pool_op='mean'")


def _check_finite(X):
    """NaN, infinity or float64 values past float32's range: a ValueError (chunked check)."""
    check_finite_float32(X, "images")


# ------------------------------------------------------------------------- inputs and outputs
def _as_output(encoder, out: np.ndarray):
    """``out`` as the encoder's ``output`` asks: the array, or a tensor on its device."""
    if encoder.output == "torch":
        return torch.from_numpy(out).to(resolve_device(encoder.device))
    return out


def _transform_stream(encoder, data) -> np.ndarray:
    """Encode a torch ``Dataset``/``DataLoader`` batch by batch into one output array.

    Each batch goes through the encoder's own array path (validation, scale check, chunked
    kernel, ``n_jobs``) on a shallow copy that is silent and returns numpy; only the current
    batch and the output are in memory. With a known length the output is preallocated, else
    the batches' features are joined at the end.
    """
    n = stream_length(data)
    worker = copy.copy(encoder).set_params(verbose=0, output="numpy")
    row_shape = out_shape(encoder.encoding_plan(), 0)[1:]  # flat rows or (channels, h, w) maps
    out = np.empty((n, *row_shape), dtype=encoder.dtype) if n is not None else None
    parts, done = [], 0
    with progress(n, desc="encode", verbose=encoder.verbose) as bar:
        for X in iter_image_batches(data):
            if len(X) == 0:
                continue
            Z = worker.transform(X)
            if out is None:
                parts.append(Z)
            elif done + len(Z) > n:
                raise ValueError(f"the dataset yielded more images than its length ({n})")
            else:
                out[done:done + len(Z)] = Z
            done += len(Z)
            bar.update(len(Z))
    if out is None:
        if not parts:
            raise ValueError("the dataset yielded no images")
        return np.concatenate(parts)
    if done != n:
        raise ValueError(f"the dataset yielded {done} images but its length is {n}")
    return out
