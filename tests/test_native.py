"""The native encoding kernels: the nearest-fraction order statistic itself, the triangle pooled
over grids, and the fallback to the compiled graphs."""

import logging
import shutil
import stat

import numpy as np
import pytest
import torch

import featlearn._native as native
from featlearn._logging import logger
from featlearn.activations import _signed

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


def _kthvalue(S, cs, rank):
    return torch.stack([E.kthvalue(rank, 1).values for E in _signed(S.float(), cs)], 1)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,K,m,rank,ties", [
    (300, 1600, 267, 107, False),   # featlearn-nearest-1600's sampled columns
    (40, 600, 600, 241, False),     # "exact": every column
    (50, 40, 40, 1, False), (50, 40, 40, 40, False),  # the smallest and the largest entry
    (60, 300, 300, 17, True),       # many equal entries
    (5, 16, 16, 8, True), (7, 1, 1, 1, False), (0, 20, 20, 3, False),
])
def test_native_thresholds_are_the_order_statistic(dtype, n, K, m, rank, ties):
    g = torch.Generator().manual_seed(n + m + rank)
    P = torch.randn(n, K, generator=g) * 3
    if ties:
        P = P.round()
    P = P.to(dtype)
    S = P[:, :m]  # a column block: rows K apart
    cs = torch.rand(m, generator=g) * 10
    cs[: m // 4] = 0.0
    if ties:
        cs = cs.round()
    got = native.nearest_thresholds(S, cs, rank)
    assert got.shape == (n, 2) and got.dtype == torch.float32
    assert torch.equal(got, _kthvalue(S, cs, rank))


@needs_compiler
def test_native_thresholds_refuse_what_they_cannot_read():
    S, cs = torch.zeros(4, 8), torch.zeros(8)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.nearest_thresholds(S.double(), cs, 2)
    with pytest.raises(ValueError, match="rank 9 is outside 1..8"):
        native.nearest_thresholds(S, cs, 9)
    with pytest.raises(ValueError, match="col_sq has shape"):
        native.nearest_thresholds(S, torch.zeros(7), 2)
    # A transposed (column-strided) block is copied, not misread.
    T = torch.randn(8, 4).T
    assert torch.equal(native.nearest_thresholds(T, cs, 3), _kthvalue(T, cs, 3))


@needs_compiler
def test_library_is_built_once_into_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATLEARN_CACHE_DIR", str(tmp_path / "cache"))
    native._build()
    folder = tmp_path / "cache" / "native"
    libs = list(folder.glob("kernels-*.so"))
    assert len(libs) == 1 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == [libs[0].name]  # no temporary left behind
    before = libs[0].stat().st_mtime_ns
    native._build()
    assert libs[0].stat().st_mtime_ns == before  # loaded, not rebuilt
    folder.chmod(0o777)  # another user could have put code there: refused
    with pytest.raises(OSError, match="not private"):
        native._build()


def test_without_a_compiler_the_compiled_graph_answers(monkeypatch):
    from featlearn import PatchEncoder, RandomPatchDictionary

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    rng = np.random.RandomState(3)
    images = rng.randint(0, 256, size=(5, 10, 10, 3)).astype(np.uint8)
    enc = PatchEncoder(patch_size=3, n_patches=500, activation="nearest_fraction",
                       kmeans=RandomPatchDictionary(64, random_state=0), device="cpu",
                       batch_size=2, random_state=0).fit(images)
    logger.addHandler(handler)
    try:
        assert not native.available()
        eager = enc.set_params(compile=False).transform(images)
        if shutil.which("cc") or shutil.which("gcc"):  # inductor needs one too
            fused = enc.set_params(compile=True).transform(images)
            np.testing.assert_array_equal(fused, eager)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and "native encoding kernels" in records[0]
    assert "no C compiler found" in records[0]


#: Map shapes, cells and reductions for the pooling kernels: grids (one cell per position),
#: overlapping windows (Thiry et al.'s 5x5 at stride 3; a last one clipped), windows that leave
#: positions out (size 2 at stride 3) and non-overlapping clipped ones.
POOLINGS = [((27, 27), (2, 2), None, "sum", 1600), ((9, 8), (3, 2), None, "mean", 37),
            ((5, 5), (1, 1), None, "sum", 16), ((27, 27), None, (5, 5, 3, 3), "mean", 96),
            ((9, 8), None, (3, 2, 2, 3), "sum", 37), ((7, 8), None, (2, 2, 3, 3), "mean", 20),
            ((6, 7), None, (4, 4, 4, 4), "mean", 16)]


def _cells(map_shape, grid, window):
    from featlearn.pooling import cell_bounds

    return cell_bounds(map_shape, grid, window)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("map_shape,grid,window,pool_op,K", POOLINGS)
def test_native_triangle_pool_is_the_graphs_up_to_summation_order(dtype, map_shape, grid,
                                                                   window, pool_op, K):
    from featlearn.activations import activate_and_pool

    g = torch.Generator().manual_seed(K)
    n_images = 3
    rows = n_images * map_shape[0] * map_shape[1]
    D = (torch.rand(rows + 5, K, generator=g) * 40 - 1).to(dtype)  # a few negative; spare rows
    rb, cb = _cells(map_shape, grid, window)
    got = native.triangle_pool(D, n_images, map_shape, rb, cb, pool_op, windows=bool(window))
    ref = activate_and_pool(D[:rows].float(), n_images=n_images, map_shape=map_shape,
                            row_bounds=rb, col_bounds=cb, activation="triangle", alpha=0.0,
                            pool_op=pool_op, window=window)
    assert got.shape == ref.shape == (n_images, len(rb) * len(cb), K)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_compiler
def test_native_triangle_refuses_cells_off_the_map_and_other_reductions():
    D = torch.rand(2 * 4 * 4, 8)
    with pytest.raises(ValueError, match="non-empty ranges inside the 4x4 map"):
        native.triangle_pool(D, 2, (4, 4), ((0, 3), (1, 5)), ((0, 4),))
    with pytest.raises(ValueError, match="non-empty ranges inside the 4x4 map"):
        native.triangle_pool(D, 2, (4, 4), ((0, 4),), ((2, 2),))
    with pytest.raises(ValueError, match="by sum or mean"):
        native.triangle_pool(D, 2, (4, 4), ((0, 4),), ((0, 4),), "max")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("map_shape,grid,window,pool_op,K", POOLINGS)
def test_native_nearest_pool_is_the_graphs(dtype, map_shape, grid, window, pool_op, K):
    from featlearn.activations import activate_and_pool, nearest_fraction_thresholds

    g = torch.Generator().manual_seed(K)
    n_images = 3
    rows = n_images * map_shape[0] * map_shape[1]
    S = (torch.randn(rows + 5, K, generator=g) * 4).round().to(dtype)  # ties at the thresholds
    cs = (torch.rand(K, generator=g) * 10).round()
    t = nearest_fraction_thresholds(S[:rows].float(), cs, fraction=0.4, selection="exact")
    rb, cb = _cells(map_shape, grid, window)
    got = native.nearest_pool(S, cs, t, n_images, map_shape, rb, cb, pool_op,
                              windows=bool(window))
    ref = activate_and_pool(S[:rows].float(), None, cs, t, n_images=n_images,
                            map_shape=map_shape, row_bounds=rb, col_bounds=cb,
                            activation="nearest_fraction", alpha=0.0, pool_op=pool_op,
                            window=window)
    assert got.shape == ref.shape == (n_images, len(rb) * len(cb), 2 * K)
    # counts, exact in float32; means with the eager path's rounding (a grid's sums times
    # 1 / size, windows' divided by their size)
    assert torch.equal(got, ref)


@needs_compiler
def test_native_nearest_pool_refuses_what_it_cannot_read():
    S, cs = torch.rand(2 * 4 * 4, 8), torch.rand(8)
    with pytest.raises(ValueError, match="two thresholds per row"):
        native.nearest_pool(S, cs, torch.zeros(31, 2), 2, (4, 4), ((0, 4),), ((0, 4),))
    with pytest.raises(ValueError, match="non-empty ranges inside the 4x4 map"):
        native.nearest_pool(S, cs, torch.zeros(32, 2), 2, (4, 4), ((0, 3), (3, 5)), ((0, 4),))


# ---- the k-means assignment kernels --------------------------------------------------------

@needs_compiler
@pytest.mark.parametrize("n,k,ties", [(200, 1600, False), (64, 37, True), (30, 5, False),
                                      (50, 16, True), (0, 8, False)])
def test_native_argmin_is_torch_min(n, k, ties):
    g = torch.Generator().manual_seed(n + k)
    D = torch.randn(n, k + 3, generator=g)
    if ties:
        D = D.round()  # many equal minima: the first column must win
    D = D[:, :k]  # strided rows
    values = torch.empty(n)
    labels = torch.empty(n, dtype=torch.int64)
    native.row_argmin(D, values, labels)
    ref = torch.min(D, 1)
    assert torch.equal(values, ref.values) and torch.equal(labels, ref.indices)


def _heavy_tailed(n, d, g):
    """Whitened-patch-like rows: heavy tails, norms over an order of magnitude."""
    X = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).pow(3).mul(8).add(0.2)
    return X


@needs_compiler
@pytest.mark.parametrize("k", [1, 7, 16, 400, 1603])
def test_native_refinement_finds_the_exact_nearest_centre(k):
    g = torch.Generator().manual_seed(k)
    X = _heavy_tailed(700, 108, g)
    C = _heavy_tailed(k, 108, g)
    S = X.bfloat16() @ C.t().bfloat16()
    c_sq = (C * C).sum(1)
    values = torch.empty(len(X))
    labels = torch.empty(len(X), dtype=torch.int64)
    native.refine_argmin(S, X, C, c_sq, c_sq.sqrt(), values, labels)
    exact = c_sq.double() - 2 * X.double() @ C.t().double()
    assert torch.equal(labels, exact.argmin(1))
    assert torch.allclose(values.double(), exact.min(1).values, rtol=1e-5, atol=1e-3)
    # plain bfloat16 distances pick other centres for some rows here: the refinement matters
    if k >= 400:
        assert not torch.equal((c_sq - 2 * S.float()).argmin(1), labels)


@needs_compiler
def test_native_refinement_takes_the_first_of_equal_centres():
    X = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    C = torch.tensor([[5.0, 5.0], [1.0, 2.0], [1.0, 2.0], [0.5, -1.0], [0.5, -1.0]])
    S = X.bfloat16() @ C.t().bfloat16()
    c_sq = (C * C).sum(1)
    values, labels = torch.empty(2), torch.empty(2, dtype=torch.int64)
    native.refine_argmin(S, X, C, c_sq, c_sq.sqrt(), values, labels)
    assert labels.tolist() == [1, 3]


def _int8_refine(X, C):
    """The native int8 assignment of ``X`` to ``C``: quantized rows and centres, their exact
    integer products, then the refinement."""
    Qx, sx, rx, xq = native.quantize_rows(X)
    Qc, sc, rc, _ = native.quantize_rows(C)
    S = torch._int_mm(Qx, Qc.t()) if len(X) > 0 else torch.empty(0, len(C), dtype=torch.int32)
    c_sq = (C * C).sum(1)
    values = torch.empty(len(X))
    labels = torch.empty(len(X), dtype=torch.int64)
    native.refine_argmin_int8(S, X, (sx, rx, xq), C, c_sq, c_sq.sqrt(), (sc + sc, rc), values,
                              labels)
    return values, labels, S, (sx, sc)


@needs_compiler
@pytest.mark.parametrize("k", [1, 7, 16, 400, 1603])
def test_native_int8_refinement_finds_the_exact_nearest_centre(k):
    g = torch.Generator().manual_seed(k)
    X = _heavy_tailed(700, 108, g)
    C = _heavy_tailed(k, 108, g)
    values, labels, S, (sx, sc) = _int8_refine(X, C)
    c_sq = (C * C).sum(1)
    exact = c_sq.double() - 2 * X.double() @ C.t().double()
    assert torch.equal(labels, exact.argmin(1))
    assert torch.allclose(values.double(), exact.min(1).values, rtol=1e-5, atol=1e-3)
    # the bfloat16 refinement settles by the same float32 values: the same labels and values
    bf_values, bf_labels = torch.empty(len(X)), torch.empty(len(X), dtype=torch.int64)
    native.refine_argmin(X.bfloat16() @ C.t().bfloat16(), X, C, c_sq, c_sq.sqrt(), bf_values,
                         bf_labels)
    assert torch.equal(labels, bf_labels) and torch.equal(values, bf_values)
    if k >= 400:  # the quantized products alone pick other centres for some rows here
        assert not torch.equal((c_sq - 2 * sx[:, None] * sc * S.float()).argmin(1), labels)


@needs_compiler
@pytest.mark.parametrize("k,d", [(1, 108), (7, 37), (16, 108), (400, 27), (1603, 108)])
def test_fused_int8_assignment_is_the_unfused_one(k, d):
    if not native.int8_fused():
        pytest.skip("the fused int8 kernel needs AVX512-VNNI")
    g = torch.Generator().manual_seed(k + d)
    X = _heavy_tailed(703, d, g)          # not a whole number of the kernel's row tiles
    C = _heavy_tailed(k, d, g)
    values, labels, _, _ = _int8_refine(X, C)
    c_sq = (C * C).sum(1)
    packed = native.pack_centres_int8(C, c_sq, c_sq.sqrt())
    got_v, got_l = torch.empty(len(X)), torch.empty(len(X), dtype=torch.int64)
    native.assign_int8(X, packed, got_v, got_l)
    assert torch.equal(got_l, labels) and torch.equal(got_v, values)
    wide = torch.zeros(len(X), d + 5)     # strided rows
    wide[:, :d] = X
    native.assign_int8(wide[:, :d], packed, got_v, got_l)
    assert torch.equal(got_l, labels) and torch.equal(got_v, values)
    with pytest.raises(ValueError, match=f"rows of {d} columns"):
        native.assign_int8(wide, packed, got_v, got_l)
    # split between the kernel's own threads, the caller's work run once meanwhile
    for threads in (2, 3):
        calls = []
        got_v, got_l = torch.full((len(X),), -1.0), torch.full((len(X),), -1, dtype=torch.int64)
        native.assign_int8(X, packed, got_v, got_l, threads=threads,
                           alongside=lambda: calls.append(1))
        assert calls == [1]
        assert torch.equal(got_l, labels) and torch.equal(got_v, values)
        native.assign_int8(X[:0], packed, got_v[:0], got_l[:0], threads=threads,
                           alongside=lambda: calls.append(1))
        assert calls == [1, 1]    # no rows: the caller's work still runs


@needs_compiler
def test_fused_int8_assignment_with_many_tied_candidates():
    # 40 copies of a centre A just before B = A + a little: the rows by B keep more candidates
    # than the kernel collects (the copies of A and B), so they are settled by their whole
    # row, which finds B after the 40 copies
    if not native.int8_fused():
        pytest.skip("the fused int8 kernel needs AVX512-VNNI")
    g = torch.Generator().manual_seed(5)
    C = _heavy_tailed(60, 108, g)
    A = C[10:11]
    B = A + 0.05 * A.norm() * torch.randn(1, 108, generator=g) / 108 ** 0.5
    C = torch.cat([C[:10], A.expand(40, -1), B, C[11:]]).contiguous()
    X = torch.cat([B + 1e-4 * A.norm() * torch.randn(50, 108, generator=g) / 108 ** 0.5,
                   _heavy_tailed(50, 108, g)])
    values, labels, _, _ = _int8_refine(X, C)
    assert (labels[:50] == 50).all()
    c_sq = (C * C).sum(1)
    packed = native.pack_centres_int8(C, c_sq, c_sq.sqrt())
    got_v, got_l = torch.empty(len(X)), torch.empty(len(X), dtype=torch.int64)
    native.assign_int8(X, packed, got_v, got_l, threads=2)
    assert torch.equal(got_l, labels) and torch.equal(got_v, values)


@needs_compiler
def test_fused_int8_assignment_waits_for_its_threads_when_the_callers_work_fails():
    if not native.int8_fused():
        pytest.skip("the fused int8 kernel needs AVX512-VNNI")
    g = torch.Generator().manual_seed(6)
    X, C = _heavy_tailed(3000, 108, g), _heavy_tailed(500, 108, g)
    c_sq = (C * C).sum(1)
    packed = native.pack_centres_int8(C, c_sq, c_sq.sqrt())
    got_v, got_l = torch.zeros(len(X)), torch.full((len(X),), -1, dtype=torch.int64)

    def fail():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        native.assign_int8(X, packed, got_v, got_l, threads=2, alongside=fail)
    # every row was written before the call returned: by the started thread, or by the caller
    # finishing the blocks it left
    assert (got_l >= 0).all()


@needs_compiler
def test_quantized_rows_and_their_error_bounds():
    g = torch.Generator().manual_seed(0)
    X = _heavy_tailed(300, 37, g)
    X[0] = 0.0
    X[1] = 0.0
    X[1, 5] = 1e-39          # subnormal: no usable scale, all residual
    X[2] = 3.0               # every entry at the maximum
    Q, scale, resid, qnorm = native.quantize_rows(X)
    m = X.abs().amax(1)
    assert Q.dtype == torch.int8 and int(Q.abs().max()) <= 127
    assert torch.equal(Q[3:].float(), torch.round(X[3:] * (127 / m[3:, None])))  # nearest even
    assert torch.equal(scale[3:], m[3:] / 127) and scale[:2].tolist() == [0.0, 0.0]
    assert (Q[2] == 127).all() and Q[:2].abs().sum() == 0
    x64, y64 = X.double(), scale.double()[:, None] * Q.double()
    true_resid, true_qnorm = (x64 - y64).norm(dim=1), y64.norm(dim=1)
    # bounds, and tight ones: the residual about |x - scale Q| itself
    assert (resid.double() >= true_resid).all()
    assert (qnorm.double() >= true_qnorm * (1 - 1e-6)).all()
    assert (resid.double()[3:] <= true_resid[3:] * 1.01 + 1e-3 * scale.double()[3:]).all()
    assert float(resid[1]) >= 1e-39 and float(resid[0]) == 0.0
    # rows may be strided, and the outputs preallocated
    out = tuple(torch.empty(300) for _ in range(3))
    Q2 = torch.empty(300, 40, dtype=torch.int8)[:, :37]
    wide = torch.zeros(300, 50)
    wide[:, :37] = X
    got = native.quantize_rows(wide[:, :37], Q2, out)
    assert got[0] is Q2 and torch.equal(Q2, Q) and all(torch.equal(a, b) for a, b in
                                                        zip(got[1:], (scale, resid, qnorm)))


@needs_compiler
def test_native_int8_refinement_keeps_the_nearest_when_rows_are_tiny_or_zero():
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    X = torch.tensor([[0.0, 0.0], [1e-39, 0.0], [2e-38, 3e-38], [1e-20, 1e-20]])
    values, labels, _, _ = _int8_refine(X, C)
    assert labels.tolist() == [2, 2, 2, 2]


@needs_compiler
def test_native_assignment_kernels_refuse_what_they_cannot_read():
    D = torch.zeros(4, 8)
    v, lab = torch.empty(4), torch.empty(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="CPU float32 block"):
        native.row_argmin(D.double(), v, lab)
    with pytest.raises(ValueError, match="contiguous float32 values and int64"):
        native.row_argmin(D, v, lab.int())
    with pytest.raises(ValueError, match="bfloat16 products"):
        native.refine_argmin(D, torch.zeros(4, 3), torch.zeros(8, 3), torch.zeros(8),
                             torch.zeros(8), v, lab)
    with pytest.raises(ValueError, match="int32 products"):
        native.refine_argmin_int8(D, torch.zeros(4, 3), [torch.zeros(4)] * 3,
                                  torch.zeros(8, 3), torch.zeros(8), torch.zeros(8),
                                  [torch.zeros(8)] * 2, v, lab)
    with pytest.raises(ValueError, match="per-centre"):
        native.refine_argmin_int8(D.int(), torch.zeros(4, 3), [torch.zeros(4)] * 3,
                                  torch.zeros(8, 3), torch.zeros(8), torch.zeros(8),
                                  [torch.zeros(7)] * 2, v, lab)
    with pytest.raises(ValueError, match="CPU float32 rows"):
        native.quantize_rows(D.double())
    with pytest.raises(ValueError, match="int8"):
        native.quantize_rows(D, torch.empty(4, 8, dtype=torch.int16))


def _torch_update(X, labels, w, C, counts):
    """The mini-batch update in torch ops, as featlearn's solver runs it off the native path."""
    k, d = C.shape
    sums = torch.zeros(k, d)
    sums.index_add_(0, labels, X if w is None else X * w[:, None])
    bcounts = torch.zeros(k, dtype=torch.float64)
    bcounts += (torch.bincount(labels, minlength=k) if w is None
                else torch.bincount(labels, weights=w.double(), minlength=k))
    new_counts = counts + bcounts
    rate = (new_counts.clamp(min=1) if w is None
            else torch.where(new_counts > 0, new_counts, 1.0)).float()[:, None]
    return C + (sums - bcounts.float()[:, None] * C) / rate, new_counts


@needs_compiler
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,k,d", [(1024, 400, 108), (300, 1600, 27), (5, 9, 3), (0, 4, 2)])
def test_native_minibatch_update_is_the_torch_ops(weighted, n, k, d):
    g = torch.Generator().manual_seed(n + k)
    X = _heavy_tailed(n, d + 2, g)[:, :d]  # strided rows
    C = _heavy_tailed(k, d, g)
    labels = torch.randint(0, k, (n,), generator=g)
    counts = torch.randint(0, 3, (k,), generator=g).double()  # some centres still at 0
    w = torch.rand(n, generator=g) * 3 if weighted else None
    if weighted and n:
        w[:3] = 0.0  # weighted counts of 0 keep a rate of 1
    new, new_counts, zeros = native.minibatch_update(X, labels, w, C, counts)
    ref, ref_counts = _torch_update(X, labels, w, C, counts)
    assert torch.equal(new, ref) and torch.equal(new_counts, ref_counts)
    assert zeros == int((ref_counts == 0).sum())
    assert counts.max() <= 2  # the caller's counts are not written


@needs_compiler
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,k,d", [(5000, 400, 108), (7, 9, 3), (0, 4, 2)])
def test_native_centre_sums_are_index_add_and_bincount(weighted, n, k, d):
    g = torch.Generator().manual_seed(n + k + weighted)
    X = _heavy_tailed(n, d + 2, g)[:, :d]  # strided rows
    labels = torch.randint(0, k, (n,), generator=g)
    w = torch.rand(n, generator=g) * 3 if weighted else None
    # the sums added to what they already hold, the counts from zero
    sums, counts = _heavy_tailed(k, d, g), torch.zeros(k, dtype=torch.float64)
    ref_sums = sums.clone().index_add_(0, labels, X if w is None else X * w[:, None])
    ref_counts = (torch.bincount(labels, minlength=k) if w is None
                  else torch.bincount(labels, weights=w.double(), minlength=k)).double()
    native.centre_sums(X, labels, w, sums, counts)
    assert torch.equal(sums, ref_sums) and torch.equal(counts, ref_counts)
    bad = labels.clone()
    if n:
        bad[-1] = k
        with pytest.raises(IndexError, match=f"outside 0..{k - 1}"):
            native.centre_sums(X, bad, w, sums, counts)
        assert torch.equal(sums, ref_sums)  # nothing written
    with pytest.raises(ValueError, match="float64 counts"):
        native.centre_sums(X, labels, w, sums, counts.float())


@needs_compiler
def test_native_minibatch_update_refuses_what_it_cannot_read():
    X, C = torch.zeros(4, 3), torch.zeros(5, 3)
    counts = torch.zeros(5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 5, 2])
    with pytest.raises(IndexError, match="outside 0..4"):
        native.minibatch_update(X, labels, None, C, counts)
    with pytest.raises(ValueError, match="float64 counts"):
        native.minibatch_update(X, labels.clamp(max=4), None, C, counts.float())
    with pytest.raises(ValueError, match="weights of"):
        native.minibatch_update(X, labels.clamp(max=4), torch.ones(3), C, counts)


# ---- a classifier's mini-batch from float16 features -----------------------------------------

@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_standardized_rows_are_torchs(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(50, 300, generator=g) * 30,
                   (torch.rand(50, 300, generator=g) * 5).round()]).half()
    X = torch.cat([X, X], 1)[:, :300]  # strided rows
    mean, inv = torch.randn(300, generator=g), torch.rand(300, generator=g) + 0.1
    idx = torch.randint(0, 100, (64,), generator=g)
    got = native.standardize_rows(X, idx, mean, inv, dtype)
    assert torch.equal(got, ((X.index_select(0, idx).float() - mean) * inv).to(dtype))
    # every float16 value (subnormals, infinities, NaNs) decodes as torch decodes it
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)[None]
    got = native.standardize_rows(every, torch.tensor([0]), torch.zeros(65536), torch.ones(65536))
    ref = every.float()
    assert bool(((got == ref) | (got.isnan() & ref.isnan())).all())
    with pytest.raises(IndexError, match="out of range"):
        native.standardize_rows(X, torch.tensor([100]), mean, inv)
    with pytest.raises(ValueError, match="CPU float16"):
        native.standardize_rows(X.float(), idx, mean, inv)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_standardizer_batch_is_gather_apply_round(enabled, dtype):
    from featlearn.classifier._standardize import Standardizer

    g = torch.Generator().manual_seed(1)
    X = (torch.rand(40, 70, generator=g) * 4).round().half()
    st = Standardizer(torch.rand(70, generator=g).numpy(), (torch.rand(70, generator=g) + .5).numpy(),
                      "cpu", enabled=enabled)
    idx = torch.tensor([3, 3, 39, 0])
    assert torch.equal(st.batch(X, idx, dtype), st.apply_(X.index_select(0, idx)).to(dtype))
