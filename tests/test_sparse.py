"""The sparse engine and every mask-defined mechanism against dense masked attention."""
import inspect

import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.testing import max_rel_error, strategies as rst

MASK_DEFINED = [s for s in ra.mechanisms().values() if s.mask is not None]


def test_the_named_patterns_are_registered():
    names = {s.name for s in MASK_DEFINED}
    assert names >= {"sliding_window_attention", "strided_attention", "fixed_attention",
                     "block_sparse_attention", "bigbird_attention", "longformer_attention",
                     "sink_attention"}


@pytest.mark.parametrize("spec", MASK_DEFINED, ids=lambda s: s.name)
@given(inputs=rst.attention_inputs(dtype="float64"), causal=st.booleans(),
       method=st.sampled_from(["tiles", "gather"]), block=st.integers(1, 12))
def test_mechanism_equals_dense_attention_under_its_mask(spec, inputs, causal, method, block):
    q, k, v = inputs
    params = dict(spec.example, **({"rng": 3} if spec.randomized else {}))
    engine = dict(method=method, block_q=block, block_k=block + 2) \
        if "options" in inspect.signature(spec.fn).parameters else {}   # sparse engine's
    out, lse = spec.fn(q, k, v, **params, causal=causal, return_lse=True, **engine)
    ref, ref_lse = ra.attention(q, k, v, mask=spec.mask(**params), causal=causal,
                                return_lse=True)
    assert max_rel_error(out, ref) <= 1e-12 and max_rel_error(lse, ref_lse) <= 1e-12


@given(inputs=rst.attention_inputs(dtype="float64"), mask=rst.masks(),
       method=st.sampled_from(["auto", "tiles", "gather"]), bq=st.integers(1, 9),
       bk=st.integers(1, 9), softcap=st.sampled_from([None, 3.0]))
def test_engine_equals_dense_for_any_mask(inputs, mask, method, bq, bk, softcap):
    q, k, v = inputs
    bias = ra.scores.alibi(q.shape[-3])
    out = ra.sparse_attention(q, k, v, mask, method=method, block_q=bq, block_k=bk,
                              softcap=softcap, bias=bias)
    assert max_rel_error(out, ra.attention(q, k, v, mask=mask, softcap=softcap, bias=bias)) <= 1e-12


def test_engine_with_head_dependent_function_mask(rng):
    q = rng.standard_normal((2, 4, 23, 8))
    k, v = rng.standard_normal((2, 2, 2, 31, 8))

    def mask(b, h, i, j):
        return (i + 2 * j + h + b) % 3 == 0

    for method in ("tiles", "gather"):
        out = ra.sparse_attention(q, k, v, mask, method=method, block_q=5, block_k=7)
        assert max_rel_error(out, ra.attention(q, k, v, mask=mask)) <= 1e-12


def test_per_head_dilation_matches_explicit_masks(rng):
    q, k, v = rng.standard_normal((3, 3, 40, 8))
    out = ra.longformer_attention(q, k, v, window=6, dilation=[1, 2, 3], global_tokens=[0, 9])
    keep = np.stack([ra.masks.sliding_window(6, right=6, dilation=d).materialize(40, 40)
                     for d in (1, 2, 3)]) | ra.masks.global_tokens([0, 9]).materialize(40, 40)
    assert max_rel_error(out, ra.attention(q, k, v, mask=keep)) <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_windows_covering_everything_are_full_attention(rng, causal):
    q = rng.standard_normal((2, 37, 8))
    k, v = rng.standard_normal((2, 2, 45, 8))
    full = ra.attention(q, k, v, causal=causal)
    for out in (ra.sliding_window_attention(q, k, v, window=45, right=45, causal=causal),
                ra.sink_attention(q, k, v, window=0, sinks=45, causal=causal),
                ra.longformer_attention(q, k, v, window=50, causal=causal),
                ra.bigbird_attention(q, k, v, block_size=8, window_blocks=6, rng=0,
                                     causal=causal),
                ra.block_sparse_attention(q, k, v, block_layout=np.ones((6, 6), bool),
                                          block_size=8, causal=causal)):
        assert max_rel_error(out, full) <= 1e-12


def test_random_blocks_are_seeded(rng):
    q, k, v = rng.standard_normal((3, 1, 64, 8))
    a = ra.bigbird_attention(q, k, v, block_size=4, rng=1)
    np.testing.assert_array_equal(a, ra.bigbird_attention(q, k, v, block_size=4, rng=1))
    assert not np.array_equal(a, ra.bigbird_attention(q, k, v, block_size=4, rng=2))


def test_gather_and_tiles_agree_at_moderate_size(rng):
    q, k, v = rng.standard_normal((3, 2, 700, 16))
    mask = ra.masks.strided(7) | ra.masks.sliding_window(20)
    tiles = ra.sparse_attention(q, k, v, mask, causal=True, method="tiles")
    gather = ra.sparse_attention(q, k, v, mask, causal=True, method="gather", workers=2)
    assert max_rel_error(tiles, gather) <= 1e-12


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ra.sliding_window_attention(x, x, x, window=-1), ValueError, "window must be an integer >= 0"),
    (lambda x: ra.sliding_window_attention(x, x, x, window=2, dilation=[]), ValueError,
     "dilation must be"),
    (lambda x: ra.strided_attention(x, x, x, stride=0), ValueError, "stride must be"),
    (lambda x: ra.fixed_attention(x, x, x, block=4, summary=5), ValueError,
     "summary=5 must not exceed block=4"),
    (lambda x: ra.block_sparse_attention(x, x, x, block_layout=np.ones((2, 2), bool),
                                         block_size=4), ValueError,
     r"covers 8 query and 8 key positions; M=10 needs \(3, 3\) blocks"),
    (lambda x: ra.block_sparse_attention(x, x, x, block_layout=np.ones((3, 3)), block_size=4),
     ValueError, "2-D boolean array"),
    (lambda x: ra.bigbird_attention(x, x, x, block_size=0, rng=0), ValueError,
     "block_size must be"),
    (lambda x: ra.bigbird_attention(x, x, x, block_size=2, rng=None), TypeError,
     "needs rng"),
    (lambda x: ra.longformer_attention(x, x, x, window=2, global_tokens=[-3]), ValueError,
     "non-negative"),
    (lambda x: ra.sparse_attention(x, x, x, None), ValueError, "needs a mask"),
    (lambda x: ra.sparse_attention(x, x, x, ra.masks.causal(), method="csr"), ValueError,
     "method must be one of"),
    (lambda x: ra.sparse_attention(x, x, x, ra.masks.causal(), block_q=0), ValueError,
     "block_q must be a positive integer"),
])
def test_bad_input_is_reported(call, error, message):
    with pytest.raises(error, match=message):
        call(np.zeros((1, 10, 4)))
