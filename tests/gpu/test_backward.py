"""flash_attention_backward on a device against the float64 gradients (skipped without one).

Each of ``dq, dk, dv`` must be within 2x the error of the same-precision baseline
(``low_precision_attention_vjp``, + the dtype's atol) against ``refattn.vjp("attention")``
-- the rule tests/test_gpu_backward.py applies on the CPU emulator -- for fp16, bf16 and
fp32, both variants, causal (rows that keep no key), GQA / MQA, a window with softcap and
scale, block masks. The design has no atomics: two runs give bit-identical gradients. The
selfcheck's backward cases run here too, with fresh seeds and NaN-poisoned buffers."""
import ml_dtypes
import numpy as np
import pytest

import refattn as ra
import refattn.gpu as gpu
from refattn.gpu import host, selfcheck
from refattn.testing import assert_as_accurate_as, low_precision_attention_vjp, tolerance

status = gpu.device_status()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not status.startswith("ok"), reason=status)]

DTYPES = ["float16", "bfloat16", "float32"]
LONGFORMER = ra.masks.sliding_window(24, 24) | ra.masks.global_tokens([0, 1, 2, 3])
BIGBIRD = (ra.masks.block_window(1, 32) | ra.masks.global_tokens([0, 1, 2])
           | ra.masks.random_blocks(2, 32, rng=7))
#: (id, (B, Hq, Hkv, N, M, D), keyword arguments of the forward and the backward)
FEATURES = [
    ("causal-gqa-empty-rows", (2, 4, 2, 150, 97, 64), dict(causal=True)),
    ("causal-mqa-d128", (1, 6, 1, 200, 200, 128), dict(causal=True)),
    ("window-softcap-scale", (2, 2, 2, 170, 183, 64), dict(window=(33, 9), softcap=4.0,
                                                           scale=0.4)),
    ("longformer-gqa", (1, 4, 2, 260, 260, 64), dict(block_mask=LONGFORMER)),
    ("bigbird-causal-d32", (1, 2, 1, 300, 240, 32),
     dict(causal=True, block_mask=BIGBIRD)),
    ("d256", (1, 2, 2, 90, 77, 256), dict(causal=True)),
]


def _dt(dtype):
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def _inputs(shape, dtype, seed):
    b, hq, hkv, n, m, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, n, d)).astype(_dt(dtype))
    k, v = (rng.standard_normal((b, hkv, m, d)).astype(_dt(dtype)) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(_dt(dtype))
    return q, k, v, do


def _oracle_kwargs(kw, n, m):
    """The refattn keywords equal to the kernels' masking and scalars."""
    mask = host.reference_mask(kw.get("causal", False), kw.get("window"),
                               kw.get("block_mask"), n, m)
    return dict(mask=mask, scale=kw.get("scale"), softcap=kw.get("softcap"))


@pytest.mark.parametrize("case", selfcheck.backward_cases(quick=True),
                         ids=lambda c: c.label)
def test_selfcheck_backward_case(case):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    entry = selfcheck.run_backward_case(case, np.random.default_rng(seed))
    assert entry["passed"], (seed, entry)


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,kw", FEATURES, ids=[f[0] for f in FEATURES])
def test_gradients_match_the_float64_vjp(name, shape, kw, dtype, variant):
    """o and lse from the float64 forward (rounded as a kernel stores them), gradients
    from the device, NumPy in and out; every gradient by the 2x rule, and zero dq on
    the rows that keep no key."""
    q, k, v, do = _inputs(shape, dtype, seed=sum(map(ord, name)))
    n, m = shape[3], shape[4]
    ref = _oracle_kwargs(kw, n, m)
    o, lse = ra.attention(q, k, v, return_lse=True, **ref)
    dq, dk, dv = gpu.flash_attention_backward(q, k, v, o.astype(q.dtype), do,
                                              lse.astype(np.float32), variant=variant, **kw)
    assert (dq.dtype, dq.shape, dk.shape, dv.shape) == (q.dtype, q.shape, k.shape, v.shape)
    want = ra.vjp("attention", q, k, v, do, **ref)
    base = low_precision_attention_vjp(q, k, v, do, dtype, **ref)
    for g, got in zip("qkv", (dq, dk, dv)):
        assert_as_accurate_as(got, base[g], want[g], atol=tolerance(dtype)[1],
                              name=f"d{g} ({name}, {dtype}, {variant})")
    empty = np.isneginf(lse)
    assert (dq.astype(np.float64)[empty] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_end_to_end_with_the_forward_kernel(dtype):
    """``flash_attention(..., return_lse=True)`` on the device -> o, lse ->
    ``flash_attention_backward``: the 2x rule against the float64 VJP."""
    q, k, v, do = _inputs((2, 4, 2, 131, 97, 64), dtype, seed=3)
    kw = dict(causal=True, softcap=6.0)
    o, lse = gpu.flash_attention(q, k, v, return_lse=True, **kw)
    assert np.isneginf(lse[..., :34]).all()              # rows before the first key
    dq, dk, dv = gpu.flash_attention_backward(q, k, v, o, do, lse, **kw)
    want = ra.vjp("attention", q, k, v, do, **kw)
    base = low_precision_attention_vjp(q, k, v, do, dtype, **kw)
    for g, got in zip("qkv", (dq, dk, dv)):
        assert_as_accurate_as(got, base[g], want[g], atol=tolerance(dtype)[1], name=f"d{g}")


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_runs_are_bit_identical(dtype, variant):
    """No atomics: dk, dv sum a KV head's query heads in a fixed order, dq is its own
    pass, so repeated runs (many blocks in flight, GQA 8/2, a block mask and causal)
    agree to the bit."""
    q, k, v, do = _inputs((2, 8, 2, 700, 900, 128), dtype, seed=11)
    kw = dict(causal=True, block_mask=LONGFORMER, variant=variant)
    o, lse = gpu.flash_attention(q, k, v, return_lse=True, **kw)
    first = gpu.flash_attention_backward(q, k, v, o, do, lse, **kw)
    for _ in range(2):
        again = gpu.flash_attention_backward(q, k, v, o, do, lse, **kw)
        for g, a, b in zip("qkv", first, again):
            assert a.tobytes() == b.tobytes(), f"d{g} differs between runs"
    assert all(np.isfinite(g.astype(np.float64)).all() for g in first)


def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    q, k, v, do = _inputs((1, 4, 2, 70, 90, 64), "float16", seed=5)
    o, lse = gpu.flash_attention(q, k, v, return_lse=True)
    dev = [cupy.asarray(x) for x in (q, k, v, o, do, lse)]
    dq, dk, dv = gpu.flash_attention_backward(*dev)
    assert all(isinstance(g, cupy.ndarray) for g in (dq, dk, dv))
    want = gpu.flash_attention_backward(q, k, v, o, do, lse)
    for got, w in zip((dq, dk, dv), want):
        assert got.get().tobytes() == w.tobytes()
