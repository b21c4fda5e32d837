"""Chunked attention: equals dense and tiled attention under the chunks mask, its limits
(one chunk = full attention, independent chunks = separate calls), and bad arguments."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.testing import strategies as rst


@given(rst.attention_inputs(dtype="float64"), st.integers(1, 7), st.integers(0, 9),
       st.booleans())
def test_equals_masked_dense_and_tiled_attention(inputs, size, overlap, causal):
    q, k, v = inputs
    mask = ra.masks.chunks(size, overlap)
    out, lse = ra.chunked_attention(q, k, v, chunk_size=size, overlap=overlap,
                                    causal=causal, return_lse=True)
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-13)
    tiled = ra.tiled_attention(q, k, v, mask=mask, causal=causal, block_q=4, block_k=3)
    np.testing.assert_allclose(out, tiled, rtol=1e-12, atol=1e-13)


def test_independent_chunks_are_separate_calls(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 22, 5))
    out = ra.chunked_attention(q, k, v, chunk_size=8)
    for c0 in range(0, 22, 8):
        part = slice(c0, c0 + 8)
        np.testing.assert_allclose(out[..., part, :],
                                   ra.attention(q[..., part, :], k[..., part, :],
                                                v[..., part, :]), rtol=1e-13)


def test_one_chunk_or_full_overlap_is_full_attention(rng):
    q, k, v = rng.standard_normal((3, 2, 17, 4))
    full = ra.attention(q, k, v, causal=True)
    np.testing.assert_allclose(ra.chunked_attention(q, k, v, chunk_size=17, causal=True),
                               full, rtol=1e-13)
    np.testing.assert_allclose(ra.chunked_attention(q, k, v, chunk_size=3, overlap=16,
                                                    causal=True), full, rtol=1e-13)


def test_more_queries_than_keys_get_empty_rows(rng):
    q = rng.standard_normal((1, 6, 3))
    k, v = rng.standard_normal((2, 1, 4, 3))
    out, lse = ra.chunked_attention(q, k, v, chunk_size=2, return_lse=True)
    ref, ref_lse = ra.attention(q, k, v, mask=ra.masks.chunks(2), return_lse=True)
    np.testing.assert_array_equal(out[:, :2], 0.0)
    assert np.isneginf(lse[:, :2]).all()
    np.testing.assert_allclose(out, ref, rtol=1e-13)
    np.testing.assert_array_equal(np.isneginf(ref_lse), np.isneginf(lse))


@pytest.mark.parametrize("kwargs, message", [({"chunk_size": 0}, "chunk_size"),
                                             ({"chunk_size": 2, "overlap": -1}, "overlap")])
def test_bad_arguments(kwargs, message):
    x = np.zeros((1, 4, 2))
    with pytest.raises(ValueError, match=message):
        ra.chunked_attention(x, x, x, **kwargs)
    with pytest.raises(ValueError, match=message):
        ra.chunked.chunked_init_state(heads_q=1, heads_kv=1, d=2, dv=2, **kwargs)
