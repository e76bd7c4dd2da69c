"""The compiled (fused) activation + pooling path against the eager reference, and its fallback."""

import logging
import pickle
import shutil

import numpy as np
import pytest
import torch

import featlearn._encoding_kernel as encoding_kernel
import featlearn._native as _native
import featlearn._torch
import featlearn.encoding as encoding
from featlearn._compile import CompiledKernel
from featlearn._logging import logger
from featlearn.activations import ACTIVATIONS, activate_and_pool, triangle
from featlearn.encoding import PatchEncoder
from featlearn.kmeans import MiniBatchKMeans
from featlearn.pooling import as_pair

from conftest import cuda_marks, naive_whitened_patches

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None,
    reason="inductor's CPU backend needs a C++ compiler")
#: The same test on a GPU where one is present (the compiled bisection and fix-up take the
#: thresholds there: the native kernels are the CPU's).
ON_CUDA = pytest.param("cuda", False, marks=cuda_marks())


@pytest.fixture
def warnings_logged():
    """Warnings the featlearn logger emits during the test (its stderr handler stays)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _fit(images, activation, K=12):
    enc = PatchEncoder(patch_size=3, n_patches=600, activation=activation, random_state=0,
                       kmeans=MiniBatchKMeans(n_clusters=K, random_state=0), device="cpu")
    return enc.fit(images)


def _naive(enc, X):
    """Every patch through the fitted stages in numpy, then the activation, then pooling."""
    Ph, Pw = enc.map_shape_
    C = np.asarray(enc.kmeans_.cluster_centers_, np.float64)
    grid = as_pair(enc.pooling, "pooling")
    rows = encoding.pooling_bounds(Ph, grid[0])
    cols = encoding.pooling_bounds(Pw, grid[1])
    out = []
    for img in X.astype(np.float64):
        Y = naive_whitened_patches(enc, img)
        if enc.activation == "soft_threshold":
            dot = Y @ C.T
            A = np.concatenate([np.maximum(dot - enc.alpha, 0), np.maximum(-dot - enc.alpha, 0)], 1)
        else:
            z = np.sqrt(((Y[:, None, :] - C[None]) ** 2).sum(-1))
            if enc.activation == "triangle":
                A = np.maximum(z.mean(1, keepdims=True) - z, 0)
            else:
                A = np.eye(C.shape[0])[z.argmin(1)]
        A = A.reshape(Ph, Pw, -1)
        red = np.sum if enc.pool_op == "sum" else np.max
        out.append(np.concatenate([red(A[r0:r1, c0:c1], axis=(0, 1))
                                   for r0, r1 in rows for c0, c1 in cols]))
    return np.asarray(out)


# Every activation and both pool ops, with grids, strides and channel counts spread over them:
# each row is one compilation (seconds), so the matrix is covered without its full product.
CASES = [
    ("triangle", "sum", (2, 2), 1, 3),
    ("triangle", "max", (3, 2), 2, 1),
    ("triangle", "sum", 1, 1, 1),
    ("hard", "sum", (2, 2), 1, 3),
    ("hard", "max", (1, 3), 2, 3),
    ("soft_threshold", "sum", (2, 2), 1, 3),
    ("soft_threshold", "max", (2, 1), 2, 1),
]


@needs_compiler
@pytest.mark.parametrize("activation,pool_op,pooling,stride,channels", CASES)
def test_compiled_matches_eager_and_naive(activation, pool_op, pooling, stride, channels,
                                          warnings_logged):
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, size=(11, 10, 9, channels)).astype(np.uint8)
    enc = _fit(images, activation)
    enc.set_params(pool_op=pool_op, pooling=pooling, stride=stride, batch_size=4)
    eager = enc.set_params(compile=False).transform(images)
    fused = enc.set_params(compile=True).transform(images)  # 11 = 4 + 4 + 3: a padded chunk
    assert warnings_logged == []  # it compiled: no fallback
    scale = np.abs(eager).max()
    np.testing.assert_allclose(fused, eager, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(eager, _naive(enc, images), rtol=1e-4, atol=1e-4 * scale)


@needs_compiler
def test_compiled_flip_views_and_row_independence(images, warnings_logged):
    enc = _fit(images, "triangle").set_params(flip=True, batch_size=8, compile=True)
    whole = enc.transform(images)
    parts = np.concatenate([enc.transform(images[i:i + 5]) for i in range(0, len(images), 5)])
    np.testing.assert_allclose(whole, parts, rtol=1e-6, atol=1e-6 * np.abs(whole).max())
    eager = enc.set_params(compile=False).transform(images)
    np.testing.assert_allclose(whole, eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())
    assert warnings_logged == []


@needs_compiler
@pytest.mark.parametrize("selection,precision,pooling", [
    ("sampled", "float32", dict(pooling=(2, 2), pool_op="sum")),
    ("exact", "float32", dict(pool_size=3, pool_stride=2, pool_op="mean")),
    ("sampled", "bfloat16", dict(pooling=(1, 2), pool_op="max")),
])
@pytest.mark.parametrize("device,native", [("cpu", True), ("cpu", False), ON_CUDA])
def test_compiled_nearest_fraction_equals_eager(selection, precision, pooling, device, native,
                                                warnings_logged, monkeypatch):
    """The compiled path (selection columns first; thresholds by the native kernel, or by the
    compiled bisection and its fix-up; one compare-and-pool graph; features put back in
    centroid order) gives the eager code's numbers exactly."""
    from featlearn import RandomPatchDictionary

    if not native:
        monkeypatch.setattr(encoding_kernel._native, "available", lambda: False)

    rng = np.random.RandomState(2)
    images = rng.randint(0, 256, size=(7, 12, 12, 3)).astype(np.uint8)
    enc = PatchEncoder(patch_size=3, n_patches=2000, activation="nearest_fraction",
                       kmeans=RandomPatchDictionary(600, random_state=0), selection=selection,
                       precision=precision, flip=True, batch_size=3, device=device,
                       random_state=0, **pooling).fit(images)  # K=600: every 2nd sampled
    eager = enc.set_params(compile=False).transform(images)
    fused = enc.set_params(compile=True).transform(images)  # 7 = 3 + 3 + 1: a padded chunk
    assert warnings_logged == []
    np.testing.assert_array_equal(fused, eager)


@needs_compiler
@pytest.mark.parametrize("activation", ["nearest_fraction", "triangle"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_native_blocks_of_one_image_give_the_chunks_numbers(activation, precision, monkeypatch):
    """Where native kernels activate and pool, the products are made a block of images at a
    time: blocks of one image (several per chunk, the last chunk short) give the features of
    one block per chunk exactly, and the eager code's (the triangle up to summation order)."""
    from featlearn import RandomPatchDictionary

    if not encoding_kernel._native.available():
        pytest.skip("native kernels not built here")
    rng = np.random.RandomState(3)
    images = rng.randint(0, 256, size=(7, 12, 12, 3)).astype(np.uint8)
    enc = PatchEncoder(patch_size=3, n_patches=2000, activation=activation,
                       kmeans=RandomPatchDictionary(600, random_state=0), precision=precision,
                       batch_size=3, pooling=(2, 2), device="cpu", random_state=0).fit(images)
    eager = enc.set_params(compile=False).transform(images)
    whole = enc.set_params(compile=True).transform(images)
    plan = enc.encoding_plan()
    assert plan.kernel(torch.device("cpu"), compiled=True).block == 3  # one block per chunk
    monkeypatch.setattr(encoding_kernel, "_CPU_BLOCK_BYTES", 1)
    assert plan.kernel(torch.device("cpu"), compiled=True).block == 1
    blocks = enc.transform(images)  # 7 = 3 + 3 + 1 images, one GEMM per image
    np.testing.assert_array_equal(blocks, whole)
    if activation == "nearest_fraction":
        np.testing.assert_array_equal(blocks, eager)
    else:
        np.testing.assert_allclose(blocks, eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


def test_compile_failure_falls_back_with_one_warning(images, monkeypatch, warnings_logged):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(encoding_kernel._native, "available", lambda: False)  # the graph's path
    enc = _fit(images, "triangle").set_params(batch_size=7)
    eager = enc.set_params(compile=False).transform(images)
    fused = enc.set_params(compile=True).transform(images)
    np.testing.assert_array_equal(fused, eager)
    assert len(warnings_logged) == 1  # once per transform, not once per chunk
    assert "could not compile the encoding kernel" in warnings_logged[0]
    assert "No working C++ compiler" in warnings_logged[0] and "more detail" not in warnings_logged[0]


def test_compiled_kernel_reports_and_keeps_eager_after_failure(monkeypatch, warnings_logged):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("boom")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    D = torch.rand(2 * 4 * 4, 5)
    kernel = CompiledKernel(activate_and_pool, name="test", n_images=2, map_shape=(4, 4),
                            row_bounds=((0, 2), (2, 4)), col_bounds=((0, 4),),
                            activation="triangle", alpha=0.0, pool_op="sum")
    first, second = kernel(D), kernel(D)
    assert kernel.failed and len(calls) == 1 and len(warnings_logged) == 1
    torch.testing.assert_close(first, second)


def test_auto_compiles_only_large_transforms(images, monkeypatch):
    enc = _fit(images, "triangle")
    plan = enc.encoding_plan()
    cpu = torch.device("cpu")
    monkeypatch.setattr(_native, "available", lambda: False)  # the inductor graph's rule
    per_image = enc.map_shape_[0] * enc.map_shape_[1] * plan.per_cell
    monkeypatch.setattr(encoding, "_COMPILE_MIN_ENTRIES", 100 * per_image)
    assert not enc._use_compile(plan, cpu, 99)
    assert enc._use_compile(plan, cpu, 100)
    assert not enc._use_compile(plan, torch.device("mps"), 10**6)  # experimental backend
    enc.set_params(flip=True)
    assert enc._use_compile(enc.encoding_plan(), cpu, 50)  # both views count
    assert not enc.set_params(compile=False)._use_compile(plan, cpu, 10**6)
    assert enc.set_params(compile=True)._use_compile(plan, cpu, 1)


@pytest.mark.skipif(not _native.available(), reason="no C compiler for the native kernels")
@pytest.mark.parametrize("activation", ["triangle", "nearest_fraction"])
def test_auto_takes_the_native_kernels_for_any_transform(images, activation, capsys):
    """They compile nothing per process, so "auto" runs them for one image as for many, over
    a grid or windows; what they cannot take (max pooling, another activation) keeps the size
    rule."""
    enc = _fit(images, activation).set_params(verbose=1)
    cpu = torch.device("cpu")
    assert enc._use_compile(enc.encoding_plan(), cpu, 1)
    assert "native activation + pooling kernels" in capsys.readouterr().err
    assert not enc.set_params(compile=False)._use_compile(enc.encoding_plan(), cpu, 1)
    enc.set_params(compile="auto", pool_op="max")
    assert not enc._use_compile(enc.encoding_plan(), cpu, 1)
    enc.set_params(pool_op="mean", pool_size=3, pool_stride=2)
    assert enc._use_compile(enc.encoding_plan(), cpu, 1)
    # one image encodes as it does inside a large transform, and as eagerly
    for pool_size in (None, 3):
        enc.set_params(pool_size=pool_size, compile="auto")
        one = np.concatenate([enc.transform(images[i:i + 1]) for i in range(3)])
        np.testing.assert_array_equal(one, enc.transform(images[:3]))
        eager = enc.set_params(compile=False).transform(images[:3])
        if activation == "nearest_fraction":
            np.testing.assert_array_equal(one, eager)
        else:  # the triangle's mean over K: float32 summation order
            np.testing.assert_allclose(one, eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


def test_compile_is_validated_and_execution_only(images):
    from featlearn.fingerprints import params_fingerprint
    with pytest.raises(ValueError, match="compile"):
        _fit(images, "triangle").set_params(compile="always").transform(images)
    assert (params_fingerprint(PatchEncoder(compile=True))
            == params_fingerprint(PatchEncoder(compile=False)))


def test_activation_table_widths():
    D = torch.randn(6, 4)
    norms = dict(row_sq=torch.rand(6), col_sq=torch.rand(4))
    for name, act in ACTIVATIONS.items():
        given = {k: norms[k] for k in act.norms}
        out = act.fn(D, 0.1, fraction=0.5, selection="exact", **given)
        assert out.shape == (6, act.width * 4), name
        assert act.products in {"sqdist", "dot", "unit_dot"}
        assert set(act.norms) <= {"row_sq", "col_sq"}


def test_eager_triangle_in_place_equals_out_of_place():
    D = torch.rand(50, 40, generator=torch.Generator().manual_seed(0)) - 0.01  # a few < 0
    want = triangle(D, 0.0)
    scratch = D.clone()
    np.testing.assert_array_equal(triangle(scratch, 0.0, inplace=True).numpy(), want.numpy())


@pytest.mark.parametrize("activation", ["triangle", "soft_threshold"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_bfloat16_products_stay_close_to_float32(images, activation, compiled):
    enc = PatchEncoder(n_patches=3000, kmeans=MiniBatchKMeans(24, max_iter=3, random_state=0),
                       activation=activation, device="cpu", compile=compiled,
                       random_state=0).fit(images)
    want = enc.transform(images)
    got = enc.set_params(precision="bfloat16").transform(images)
    assert got.dtype == np.float32 and not np.array_equal(got, want)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


def test_auto_precision_is_resolved_at_fit(images, monkeypatch):
    # "auto" is resolved once, by fit, into precision_: the plan every chunk and worker gets
    # carries it, and transform does not ask the hardware again.
    kw = dict(n_patches=3000, kmeans=MiniBatchKMeans(24, max_iter=3, random_state=0),
              device="cpu", compile=False, random_state=0)
    results = {}
    for native in (False, True):
        monkeypatch.setattr(featlearn._torch, "has_fast_bfloat16", lambda device, n=native: n)
        enc = PatchEncoder(precision="auto", **kw).fit(images)
        assert enc.precision_ == ("bfloat16" if native else "float32")
        assert pickle.loads(pickle.dumps(enc.encoding_plan())).precision == enc.precision_
        results[native] = enc.transform(images)
    monkeypatch.setattr(featlearn._torch, "has_fast_bfloat16", lambda device: False)
    np.testing.assert_array_equal(enc.transform(images), results[True])
    np.testing.assert_array_equal(results[False],
                                  enc.set_params(precision="float32").transform(images))
    np.testing.assert_array_equal(results[True],
                                  enc.set_params(precision="bfloat16").transform(images))
    assert enc.set_params(precision="auto").encoding_plan().precision == "bfloat16"
    assert PatchEncoder(**kw).fit(images).precision_ == "float32"
    with pytest.raises(ValueError, match="resolved"):
        encoding_kernel.Plan(patch_size=3, stride=1, image_shape=(8, 8, 3), map_shape=(6, 6),
                             row_bounds=[(0, 6)], col_bounds=[(0, 6)], normalizer="passthrough",
                             whitener="passthrough", centers=np.zeros((4, 27), np.float32),
                             activation="triangle", alpha=0.0, pool_op="sum", flip=False,
                             precision="auto")


@pytest.mark.parametrize("activation,compiled", [("triangle", False), ("triangle", True),
                                                 ("nearest_fraction", True)])
def test_worker_threads_give_the_single_thread_features(images, activation, compiled):
    # Two worker threads with a kernel each (the CPU default with 2 torch threads) encode the
    # same features as one thread doing every chunk, whichever worker takes which chunk.
    enc = _fit(images, activation).set_params(batch_size=3, flip=True, compile=compiled)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = enc.transform(images)
        torch.set_num_threads(2)
        workers = enc.transform(images)
        assert torch.get_num_threads() == 2  # restored after the workers
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(workers, single)
