"""CPU tests of refattn.gpu: everything except the launch (no device needed)."""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import refattn as ra
from refattn import gpu
from refattn.gpu import blockmask, host, kernels_spec as ks, selfcheck


# ----------------------------------------------------------------------------- dtypes
def test_dtype_names():
    assert host.dtype_name(np.zeros(1, np.float16)) == "float16"
    assert host.dtype_name(np.zeros(1, np.float32)) == "float32"
    assert host.dtype_name(np.zeros(1, ml_dtypes.bfloat16)) == "bfloat16"
    with pytest.raises(TypeError, match="float64 has no GPU kernel"):
        host.dtype_name(np.zeros(1))
    with pytest.raises(TypeError, match="expected an array"):
        host.dtype_name([1.0])


def test_torch_dtype_names():
    torch = pytest.importorskip("torch")
    assert host.dtype_name(torch.zeros(1, dtype=torch.bfloat16)) == "bfloat16"
    with pytest.raises(TypeError, match="int64"):
        host.dtype_name(torch.zeros(1, dtype=torch.int64))


def test_mixed_dtypes_are_refused_before_the_device():
    q = np.zeros((2, 8, 64), np.float16)
    with pytest.raises(TypeError, match="share one dtype.*k float32"):
        gpu.flash_attention(q, q.astype(np.float32), q)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shapes, match", [
    (((2, 8, 64), (2, 8, 32), (2, 8, 32)), "share the last dimension D"),
    (((2, 8, 64), (2, 8, 64), (2, 9, 64)), "same heads and length"),
    (((2, 8, 64), (2, 8, 64), (2, 8, 128)), "v's head dimension equal to D=64"),
    (((3, 8, 64), (2, 8, 64), (2, 8, 64)), "multiple of KV heads"),
    (((2, 8, 80), (2, 8, 80), (2, 8, 80)), "D=80 has no GPU kernel"),
    (((3, 2, 8, 64), (4, 2, 8, 64), (4, 2, 8, 64)), "do not broadcast"),
    (((8, 64), (8, 64), (8, 64)), "at least|must have shape"),
])
def test_bad_shapes_name_the_problem(shapes, match):
    with pytest.raises(ValueError, match=match):
        host.check_shapes(*shapes)
    with pytest.raises(ValueError, match=match):   # before any device is touched
        gpu.flash_attention(*(np.zeros(s, np.float16) for s in shapes))


def test_shapes_broadcast_and_gqa():
    pb = host.check_shapes((3, 1, 8, 10, 64), (1, 4, 2, 20, 64), (1, 4, 2, 20, 64))
    batch, hq, hkv, n, m, d = pb.batch_shape, pb.heads_q, pb.heads_kv, pb.n, pb.m, pb.d
    assert (batch, hq, hkv, n, m, d) == ((3, 4), 8, 2, 10, 20, 64)


# ---------------------------------------------------------------------------- windows
def test_windows():
    U = host.UNBOUNDED
    assert host.normalize_window(None, False) == (U, U)
    assert host.normalize_window(None, True) == (U, 0)
    assert host.normalize_window(7, False) == (7, 0)
    assert host.normalize_window((3, None), False) == (3, U)
    assert host.normalize_window((None, 4), True) == (U, 0)
    for bad in (-1, 2.5, (1, -2), (1, 2, 3), True, "8"):
        with pytest.raises(ValueError, match="window"):
            host.normalize_window(bad, False)
    with pytest.raises(TypeError, match="causal"):
        host.normalize_window(None, "yes")


@pytest.mark.parametrize("causal, window", [(True, None), (False, 5), (False, (3, 6)),
                                            (True, (4, 9)), (False, (None, 2)),
                                            (False, (2, None))])
@pytest.mark.parametrize("n, m", [(13, 13), (9, 21), (21, 9)])
def test_reference_mask_is_the_kernel_band(causal, window, n, m):
    """The oracle's mask equals the kernels' predicate -right <= i + M - N - j <= left."""
    left, right = host.normalize_window(window, causal)
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    dist = i + (m - n) - j
    band = (dist <= left) & (dist >= -right)
    ref = host.reference_mask(causal, window, None, n, m)
    assert np.array_equal(ref.materialize(n, m), band)


def test_no_mask_means_no_reference_mask():
    assert host.reference_mask(False, None) is None


# ------------------------------------------------------------------------------ plans
@pytest.mark.parametrize("variant", ks.VARIANTS)
@pytest.mark.parametrize("dtype", sorted(ks.DTYPES))
@pytest.mark.parametrize("d", ks.HEAD_DIMS)
def test_plan_uses_a_compiled_instantiation(variant, dtype, d):
    p = host.plan((2, 4, 130, d), (2, 2, 70, d), (2, 2, 70, d), dtype, variant=variant)
    assert p.kernel in {i.name for i in ks.instantiations()}
    assert p.block[0] % 32 == 0 and p.block[0] <= 1024
    assert p.shared_bytes <= 163 * 1024          # fits sm_80 (and sm_90)
    assert p.grid[1:] == (4, 2) and p.group == 2
    rows_per_block = p.block_q if p.source == "fast" else p.block[0] // 32
    assert p.grid[0] == -(-130 // rows_per_block)
    assert p.block_k % 32 == 0 and p.block_q == 16 * (p.block[0] // 32) or p.source == "simple"
    if dtype == "float32":
        assert p.source == "simple"


def test_plan_scalars():
    p = host.plan((1, 2, 5, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16", softcap=30,
                  scale=0.25, causal=True, window=(9, 3))
    assert (p.scale, p.softcap, p.left, p.right) == (0.25, 30.0, 9, 0)
    assert host.plan((1, 2, 5, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16").scale == 0.125
    with pytest.raises(ValueError, match="softcap"):
        host.plan((1, 2, 5, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16", softcap=-1)
    with pytest.raises(ValueError, match="variant"):
        host.plan((1, 2, 5, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16", variant="turbo")
    with pytest.raises(ValueError, match="65535"):
        host.plan((70000, 2, 5, 64), (70000, 2, 5, 64), (70000, 2, 5, 64), "float16")


def test_empty_problems_need_no_launch():
    p = host.plan((1, 2, 0, 64), (1, 2, 5, 64), (1, 2, 5, 64), "float16")
    assert p.empty and p.out_shape() == (1, 2, 0, 64)


def test_flops():
    assert host.flops(2, 3, 5, 7, 64) == 4 * 2 * 3 * 5 * 7 * 64
    assert host.flops(2, 3, 5, 7, 64, causal=True) == 2 * 2 * 3 * 5 * 7 * 64


# ------------------------------------------------------------------------ block masks
def _masks(n, m):
    mk = ra.masks
    return [mk.causal(), mk.sliding_window(20, 7), mk.causal() & mk.sliding_window(50),
            mk.block_window(1, 32) | mk.global_tokens([0, 3]) | mk.random_blocks(2, 32, rng=1),
            mk.sliding_window(24, 24) | mk.global_tokens([0, 5, 99]),
            mk.document(np.repeat(np.arange(7), -(-m // 7))[:m]) & mk.causal(),
            mk.from_function(lambda b, h, i, j: (i * 7 + j * 3) % 5 == 0)]


@pytest.mark.parametrize("n, m", [(150, 150), (77, 200), (129, 64)])
@pytest.mark.parametrize("bq, bk", [(64, 64), (64, 32)])
def test_block_mask_keeps_exactly_the_mask(n, m, bq, bk):
    for mask in _masks(n, m):
        if "document" in mask.name and n != m and n > m:
            continue
        bm = blockmask.build(mask, n, m, bq, bk)
        assert np.array_equal(bm.dense(), mask.materialize(n, m)), mask.name
        assert bm.indptr[0] == 0 and bm.indptr[-1] == len(bm.tile_k)
        assert bm.indptr.dtype == bm.tile_k.dtype == bm.tile_bits.dtype == np.int32
        assert bm.bits.dtype == np.uint32 and bm.bits.shape[1:] == (bq, bk // 32)
        # bitmaps are zero beyond N and M
        for t in np.flatnonzero(bm.tile_bits >= 0):
            a = np.searchsorted(bm.indptr, t, side="right") - 1
            rows_out = max(0, (a + 1) * bq - n)
            if rows_out:
                assert not bm.bits[bm.tile_bits[t], bq - rows_out:].any()


def test_block_mask_skips_empty_tiles():
    n = 4096
    mask = (ra.masks.block_window(1, 64) | ra.masks.global_tokens([0])
            | ra.masks.random_blocks(2, 64, rng=3))
    bm = blockmask.build(mask, n, n, 64, 64)
    assert bm.visited_fraction < 0.12   # ~ (3 band + 2 random + 1 global) / 64 + a row
    lab = mask.classify_tiles(n, n, 64, 64)
    assert len(bm.tile_k) == np.count_nonzero(lab)
    assert (bm.tile_bits < 0).sum() == np.count_nonzero(lab == ra.masks.FULL)


def test_block_mask_must_not_depend_on_heads():
    mask = ra.masks.sliding_window(8, dilation=[1, 2])   # per-head dilation
    with pytest.raises(ValueError, match="differs between batches or heads"):
        blockmask.build(mask, 100, 100, 64, 64, heads=2)
    blockmask.build(mask, 100, 100, 64, 64, heads=1)


def test_plan_combines_block_mask_with_band():
    mask = ra.masks.global_tokens([0, 1])
    p = host.plan((1, 2, 200, 64), (1, 2, 200, 64), (1, 2, 200, 64), "float16",
                  block_mask=mask, causal=True)
    want = (mask & ra.masks.causal()).materialize(200, 200)
    assert np.array_equal(p.tiles.dense(), want)
    bm = p.tiles
    again = host.plan((1, 2, 200, 64), (1, 2, 200, 64), (1, 2, 200, 64), "float16",
                      block_mask=bm)
    assert again.tiles is bm
    with pytest.raises(ValueError, match="built for"):
        host.plan((1, 2, 201, 64), (1, 2, 200, 64), (1, 2, 200, 64), "float16", block_mask=bm)


# ---------------------------------------------------------------- kernels and import
def test_instantiations_cover_every_call():
    names = {i.name for i in ks.instantiations()}
    for variant in ks.VARIANTS:
        for dtype in ks.DTYPES:
            for d in ks.HEAD_DIMS:
                assert ks.kernel_name(variant, dtype, d) in names
    assert len(names) == len(ks.instantiations())


def test_sources_are_self_contained_and_hashed():
    for kernel in ks.VARIANTS:
        src = ks.source(kernel)
        assert '#include "common.cuh"' not in src and "namespace refattn" in src
        assert "#include <cuda_fp16.h>" in src
    h = ks.sources_sha256()
    assert len(h) == 64 and h == ks.sources_sha256()


def test_import_without_cupy_and_clear_device_error():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import numpy as np, refattn.gpu as g\n"
            "ok, why = g.available(); assert not ok and 'CuPy' in why, why\n"
            "q = np.zeros((2, 8, 64), np.float16)\n"
            "try:\n    g.flash_attention(q, q, q)\nexcept RuntimeError as e:\n"
            "    assert 'needs a CUDA device' in str(e); print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_selfcheck_cases_cover_every_instantiation_and_feature():
    cs = selfcheck.cases()
    run = {ks.kernel_name(c.variant, c.dtype, c.d) for c in cs}
    assert run == {i.name for i in ks.instantiations()}
    for feature in ("causal", "window", "softcap", "bigbird", "longformer", "document"):
        for variant in ks.VARIANTS:
            assert any(feature in c.label and c.variant == variant for c in cs), feature
    assert any(c.hkv == 1 and c.hq > 1 for c in cs) and any(1 < c.hkv < c.hq for c in cs)
    assert any(c.causal and c.n > c.m for c in cs)           # rows with no key
    for c in cs:
        if c.mask:
            selfcheck.block_mask_for(c).materialize(c.n, c.m)


def test_selfcheck_covers_every_backward_instantiation_and_feature():
    cs = selfcheck.backward_cases()
    run = {n for c in cs for n in ks.backward_kernel_names(c.variant, c.dtype, c.d)}
    assert run == {i.name for i in ks.backward_instantiations()}
    for feature in ("causal", "window", "softcap", "bigbird", "longformer", "document"):
        assert any(feature in c.label and c.variant == "fast" and c.dtype != "float32"
                   for c in cs), feature
    assert any(c.hkv == 1 and c.hq > 1 for c in cs) and any(1 < c.hkv < c.hq for c in cs)
    assert any(c.causal and c.n > c.m for c in cs)           # rows with no key
    assert all(c.label.startswith("bwd ") for c in cs)


def test_block_mask_of_an_array_indexing_mask_with_heads_and_ragged_tiles():
    """A document mask indexes arrays of length N: the shared-mask check must clamp
    positions past N and M as the bitmaps do (it read index N before)."""
    import refattn as ra
    from refattn.gpu import blockmask
    doc = ra.masks.document(np.repeat(np.arange(4), 70)) & ra.masks.causal()
    built = blockmask.build(doc, 280, 280, 64, 64, batch=2, heads=2)
    one = blockmask.build(doc, 280, 280, 64, 64)
    np.testing.assert_array_equal(built.tile_bits, one.tile_bits)
