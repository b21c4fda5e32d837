"""The backward kernels (gpu/kernels/flash_bwd.cu, unmodified) on the CPU emulator,
against the float64 gradients (``refattn.vjp("attention", ...)``).

Every instantiation runs through the real launch path (``backward.plan``,
``backward.run`` with the emulator's CuPy-like module, the selfcheck's NaN-poisoned
buffers) with zero diagnostics, and each of ``dq, dk, dv`` must be as accurate as the
same-precision baseline (``low_precision_attention_vjp``) by the 2x rule, for the
tensor-core kernels (``variant="fast"``, fp16/bf16, D <= 128) and the simple ones: odd N and M,
N != M, GQA / MQA, causal with rows that keep no key, windows, softcap with scale, a
Longformer block mask; fp16, bf16, fp32. Host-side checks (shapes, dtypes, the
key-major tile lists) need no emulator. Planted bugs: test_gpu_backward_mutations.py.
"""
import subprocess
import sys
from importlib import resources

import ml_dtypes
import numpy as np
import pytest

import refattn as ra
from refattn.gpu import backward, blockmask, emulator, kernels_spec as ks, launch, selfcheck
from refattn.testing import assert_as_accurate_as, low_precision_attention_vjp, tolerance

STATUS = emulator.status()
needs_emulator = pytest.mark.skipif(not STATUS.startswith("ok"), reason=STATUS)
C = selfcheck.BackwardCase


def _text() -> str:
    return resources.files("refattn.gpu").joinpath("kernels", "flash_bwd.cu").read_text()


def module(cp, text=None, names=None):
    """The backward source (or ``text``) built for the emulator with ``#line`` directives
    (diagnostics name flash_bwd.cu); ``names`` default to every instantiation."""
    folder = resources.files("refattn.gpu").joinpath("kernels")
    code = emulator.assemble(_text() if text is None else text, "flash_bwd.cu",
                             {h: folder.joinpath(h).read_text() for h in ks.HEADERS})
    names = names or [i.name for i in ks.backward_instantiations()]
    return cp.RawModule(code=code, options=(), name_expressions=names)


@pytest.fixture(scope="module")
def cp():
    if not STATUS.startswith("ok"):
        pytest.skip(STATUS)
    with emulator.installed() as mod:
        launch.module_cache[(0, ks.BACKWARD)] = module(mod)
        yield mod


def check(cp, case, seed=0):
    """Run ``case`` as the selfcheck does: three launches, all completed with no
    diagnostics, every gradient within 2x its baseline's error (+ the dtype's atol)."""
    before = len(cp.launches)
    entry = selfcheck.run_backward_case(case, np.random.default_rng(seed))
    recs = cp.launches[before:]
    assert [r.kernel for r in recs] == entry["kernel"].split(" + ")
    for rec in recs:
        assert rec.completed and rec.diagnostics == [], "\n".join(map(str, rec.diagnostics))
    assert entry["passed"], entry
    return entry


CALLS = sorted({ks.backward_kernel_names(v, t, d): (v, t, d) for v in ks.VARIANTS
                for t in ks.DTYPES for d in ks.HEAD_DIMS}.values())


@needs_emulator
@pytest.mark.parametrize("variant,dtype,d", [pytest.param(*c, id="-".join(map(str, c)))
                                             for c in CALLS])
def test_every_instantiation_matches_the_float64_gradients(cp, variant, dtype, d):
    """Batch 2, GQA 4/2, N = 37, M = 45 (tails in every tile)."""
    entry = check(cp, C(variant, dtype, d, batch=2, hq=4, hkv=2, n=37, m=45))
    assert entry["kernel"] == " + ".join(ks.backward_kernel_names(variant, dtype, d))


def test_the_calls_cover_every_backward_instantiation():
    names = {n for c in CALLS for n in ks.backward_kernel_names(*c)}
    assert names == {i.name for i in ks.backward_instantiations()}
    assert ks.backward_kernel_names("fast", "float16", 256)[2].startswith("flash_bwd_dq_s")
    assert ks.backward_kernel_names("fast", "float32", 64)[1].startswith("flash_bwd_dkdv_s")


FEATURES = [c for c in selfcheck.backward_cases(quick=True) if c.d == 64 and c.n != 37
            and (c.variant == "fast") == (c.dtype != "float32")]


@needs_emulator
@pytest.mark.parametrize("case", [pytest.param(c, id=c.label) for c in FEATURES])
def test_features_match_the_float64_gradients(cp, case):
    """MQA with causal N > M (rows with no key: zero gradients), a (9, 4) window with
    softcap and scale, a Longformer block mask with GQA."""
    check(cp, case)


@needs_emulator
def test_block_masks_with_empty_rows_and_a_document_mask(cp):
    """BigBird + causal with N > M and a document mask: tiles skipped both ways."""
    for variant in ks.VARIANTS:
        check(cp, C(variant, "float16", 32, mask="bigbird", causal=True, hq=2, hkv=1,
                    n=100, m=70))
    check(cp, C("fast", "bfloat16", 64, mask="document", n=90, m=90), seed=1)


@needs_emulator
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_end_to_end_with_the_forward_kernel(cp, dtype):
    """``flash_attention`` (fast forward on the emulator) -> o, lse ->
    ``flash_attention_backward``: NumPy in and out, the 2x rule against the float64 VJP
    with the low-precision baseline, zero gradients on fully masked rows."""
    rng = np.random.default_rng(3)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    q = rng.standard_normal((2, 4, 51, 64)).astype(dt)
    k, v = (rng.standard_normal((2, 2, 33, 64)).astype(dt) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(dt)
    o, lse = ra.gpu.flash_attention(q, k, v, causal=True, softcap=6.0, return_lse=True)
    assert np.isneginf(lse[..., :18]).all()              # rows before the first key
    dq, dk, dv = ra.gpu.flash_attention_backward(q, k, v, o, do, lse, causal=True,
                                                 softcap=6.0)
    assert (dq.dtype, dq.shape, dk.shape, dv.shape) == (q.dtype, q.shape, k.shape, v.shape)
    assert (dq[..., :18, :].astype(np.float64) == 0).all()
    want = ra.vjp("attention", q, k, v, do, causal=True, softcap=6.0)
    base = low_precision_attention_vjp(q, k, v, do, dtype, causal=True, softcap=6.0)
    for name, got in zip("qkv", (dq, dk, dv)):
        assert_as_accurate_as(got, base[name], want[name], atol=tolerance(dtype)[1],
                              name=f"d{name}")
    assert all(r.diagnostics == [] for r in cp.launches[-4:])


@needs_emulator
def test_no_keys_gives_zero_dq_and_empty_dk(cp):
    q = np.ones((1, 2, 5, 32), np.float32)
    k = np.ones((1, 2, 0, 32), np.float32)
    lse = np.full((1, 2, 5), -np.inf, np.float32)
    dq, dk, dv = ra.gpu.flash_attention_backward(q, k, k, q * 0, q, lse)
    assert (dq == 0).all() and dk.shape == (1, 2, 0, 32) and dv.shape == dk.shape


# ------------------------------------------------------------------ host-side checks
def test_key_major_tile_lists_hold_the_same_tiles():
    """Every (query tile, key tile, bitmap) of the CSR list appears once key-major, the
    query tiles in increasing order within each key tile."""
    mask = ra.masks.sliding_window(24, 24) | ra.masks.global_tokens([0, 5, 99])
    bm = blockmask.build(mask, 300, 270, 64, 32)
    indptr, tile_q, bits = backward.transpose_tiles(bm)
    q_of = np.repeat(np.arange(len(bm.indptr) - 1), np.diff(bm.indptr))
    want = sorted(zip(bm.tile_k.tolist(), q_of.tolist(), bm.tile_bits.tolist()))
    key_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    assert list(zip(key_of.tolist(), tile_q.tolist(), bits.tolist())) == want
    assert len(indptr) == -(-270 // 32) + 1 and indptr[-1] == len(bm.tile_k)


def test_plan_picks_kernels_and_grids():
    p = backward.plan((3, 6, 70, 96), (3, 2, 90, 96), (3, 2, 90, 96), "float16",
                      window=(9, 4), variant="fast", block_mask=ra.masks.causal())
    assert (p.dq_kernel, p.dkdv_kernel) == ("flash_bwd_dq_fast<__half, 96, 64, 64, 4>",
                                            "flash_bwd_dkdv_fast<__half, 96, 64, 64>")
    assert (p.dq_grid, p.dkdv_grid, p.dq_block, p.dkdv_block) == (
        (2, 6, 3), (2, 2, 3), (128, 1, 1), (128, 1, 1))
    assert p.dq_shared == p.dkdv_shared == (2 * 64 + 4 * 64) * 13 * 16   # 13 chunks/row
    s = backward.plan((3, 6, 70, 96), (3, 2, 90, 96), (3, 2, 90, 96), "float16",
                      variant="simple")
    assert (s.dq_grid, s.dkdv_grid, s.dq_shared) == ((18, 6, 3), (23, 2, 3), 0)
    d32 = backward.plan((1, 4, 70, 32), (1, 2, 90, 32), (1, 2, 90, 32), "bfloat16")
    assert (d32.dkdv_grid, d32.dkdv_block) == ((3, 2, 1), (64, 1, 1))   # BN = 32: 2 warps
    assert p.grad_shapes() == ((3, 6, 70, 96), (3, 2, 90, 96), (3, 2, 90, 96))
    assert (p.left, p.right) == (9, 4) and p.tiles_by_key[0].shape == (3,)
    assert {i.name for i in ks.backward_instantiations()} <= {
        i.name for i in ks.all_instantiations()}


@pytest.mark.parametrize("call,match", [
    (lambda q, lse: backward.plan((2, 4, 8, 64), (1, 2, 8, 64), (1, 2, 8, 64), "float16"),
     r"equal leading dims.*q \(2, 4, 8, 64\), k \(1, 2, 8, 64\)"),
    (lambda q, lse: ra.gpu.flash_attention_backward(q, q, q, q, q.astype(np.float32), lse),
     r"share one dtype.*do float32"),
    (lambda q, lse: ra.gpu.flash_attention_backward(q, q, q, q[:, :, :4], q, lse),
     r"o must have q's shape \(1, 2, 8, 64\), got \(1, 2, 4, 64\)"),
    (lambda q, lse: ra.gpu.flash_attention_backward(q, q, q, q, q, lse[..., :3]),
     r"lse must have shape \(1, 2, 8\)"),
    (lambda q, lse: ra.gpu.flash_attention_backward(q, q, q, q, q, lse.astype(np.float64)),
     r"lse must be float32"),
    (lambda q, lse: ra.gpu.flash_attention_backward(q, q, q, q, q, lse, window="x"),
     r"window must be"),
])
def test_bad_arguments_are_refused_before_the_device(call, match):
    q = np.zeros((1, 2, 8, 64), np.float16)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, np.zeros((1, 2, 8), np.float32))


def test_without_cupy_the_backward_says_it_needs_a_device():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import numpy as np, refattn.gpu as g\n"
            "q = np.zeros((2, 8, 64), np.float16)\n"
            "try:\n    g.flash_attention_backward(q, q, q, q, q, np.zeros((2, 8), "
            "np.float32))\nexcept RuntimeError as e:\n"
            "    assert 'needs a CUDA device' in str(e); print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr
