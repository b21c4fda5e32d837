"""Tiled (online-softmax) attention equals dense attention; merging shards equals
attention over their union."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.testing import max_rel_error, strategies as rst


@given(rst.attention_inputs(dtype="float64"), rst.masks(), st.booleans(),
       st.integers(1, 17), st.integers(1, 17), st.integers(1, 2))
def test_tiled_equals_dense(inputs, mask, causal, block_q, block_k, workers):
    q, k, v = inputs
    kwargs = dict(mask=mask, causal=causal, return_lse=True)
    out, lse = ra.tiled_attention(q, k, v, block_q=block_q, block_k=block_k,
                                  workers=workers, **kwargs)
    ref, ref_lse = ra.attention(q, k, v, **kwargs)
    assert max_rel_error(out, ref) <= 1e-12
    assert max_rel_error(lse, ref_lse) <= 1e-12


@given(st.data(), st.integers(1, 30), st.integers(1, 30), st.integers(1, 9),
       st.integers(1, 9))
def test_tiled_equals_dense_documents_and_functions(data, n, m, block_q, block_k):
    q, k, v = data.draw(rst.attention_inputs(
        rst.shapes(max_len=1).map(lambda s: rst.Shapes(s.batch, s.hq, s.hkv, n, m, s.d, s.dv)),
        dtype="float64"))
    mask = data.draw(st.one_of(
        rst.document_masks(n, m),
        st.just(lambda b, h, i, j: (i * 7 + j * 3 + h) % 4 != 0),   # head-dependent
        st.just(ra.masks.causal() & (lambda b, h, i, j: (i + b) % 3 != 1))))
    out = ra.tiled_attention(q, k, v, mask=mask, block_q=block_q, block_k=block_k)
    assert max_rel_error(out, ra.attention(q, k, v, mask=mask)) <= 1e-12


@given(rst.attention_inputs(dtype="float64"), st.floats(0.5, 30),
       st.integers(1, 9), st.integers(1, 9))
def test_tiled_equals_dense_with_scores(inputs, cap, block_q, block_k):
    q, k, v = inputs
    for bias in (ra.scores.alibi(q.shape[-3]),
                 np.random.default_rng(0).standard_normal((q.shape[-3], q.shape[-2],
                                                           k.shape[-2]))):
        out = ra.tiled_attention(q, k, v, bias=bias, softcap=cap, causal=True,
                                 block_q=block_q, block_k=block_k)
        ref = ra.attention(q, k, v, bias=bias, softcap=cap, causal=True)
        assert max_rel_error(out, ref) <= 1e-12


def test_default_blocks_and_threads_on_a_larger_problem(rng):
    q = rng.standard_normal((8, 1500, 32))
    k, v = rng.standard_normal((2, 2, 1300, 32))
    mask = ra.masks.sliding_window(300) | ra.masks.sinks(4)
    out = ra.tiled_attention(q, k, v, mask=mask, causal=True, workers=2)
    assert max_rel_error(out, ra.attention(q, k, v, mask=mask, causal=True)) <= 1e-12


def test_every_output_element_is_written(rng):
    """Outputs start as NaN; blocks that end past N or M leave nothing unwritten."""
    q, k, v = rng.standard_normal((3, 2, 37, 4))
    out, lse = ra.tiled_attention(q, k, v, block_q=8, block_k=16, return_lse=True,
                                  mask=ra.masks.sliding_window(3, right=2))
    assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_poisoned_tails_are_never_read(rng):
    """Inputs that are views into NaN-padded buffers give bit-identical results."""
    q, k, v = rng.standard_normal((3, 2, 29, 8))
    padded = [np.full((2, 40, 8), np.nan) for _ in range(3)]
    for buf, x in zip(padded, (q, k, v)):
        buf[:, :29] = x
    views = [buf[:, :29] for buf in padded]
    out = ra.tiled_attention(*views, block_q=16, block_k=16, causal=True)
    np.testing.assert_array_equal(out, ra.tiled_attention(q, k, v, block_q=16, block_k=16,
                                                          causal=True))


@pytest.mark.parametrize("shards", [2, 3, 5, 8])
def test_merge_partials_of_random_shards(rng, shards):
    q = rng.standard_normal((2, 3, 11, 8))
    k, v = rng.standard_normal((2, 2, 3, 41, 8))
    owner = rng.integers(0, shards, size=41)
    owner[:shards] = np.arange(shards)                 # every shard has a key
    parts = [ra.attention(q, k[..., owner == s, :], v[..., owner == s, :], return_lse=True)
             for s in range(shards)]
    out, lse = ra.merge_partials([p[0] for p in parts], [p[1] for p in parts])
    ref, ref_lse = ra.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-14)


def test_merge_partials_with_empty_parts(rng):
    q, k, v = rng.standard_normal((3, 1, 6, 4))
    full = ra.attention(q, k, v, causal=True, return_lse=True)
    empty = ra.attention(q, k[:, :0], v[:, :0], return_lse=True)
    out, lse = ra.merge_partials([empty[0], full[0], empty[0]], [empty[1], full[1], empty[1]])
    np.testing.assert_array_equal(out, full[0])
    out, lse = ra.merge_partials([empty[0]] * 2, [empty[1]] * 2)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    with pytest.raises(ValueError, match="one lse per output"):
        ra.merge_partials([out], [])


def test_dense_refuses_what_does_not_fit():
    q = np.zeros((1, 65536, 64))
    with pytest.raises(ra.MemoryBudgetError, match="tiled_attention"):
        ra.attention(q, q, q)
    with pytest.raises(ra.MemoryBudgetError, match="tiled_attention"):
        ra.attention_probs(q[:, :1000], q[:, :1000], memory_budget=1e6)


@pytest.mark.slow
def test_tiled_memory_at_65536():
    """At N = M = 65,536, D = 64 the peak beyond inputs and outputs stays under 1 GiB."""
    n, d = 65536, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, d)) for _ in range(3))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out, lse = ra.tiled_attention(q, k, v, causal=True, return_lse=True)
        peak = tracemalloc.get_traced_memory()[1] - before - out.nbytes - lse.nbytes
    finally:
        tracemalloc.stop()
    assert peak < 2**30, f"peak {peak / 2**20:.0f} MiB"
    # spot-check a few rows against dense attention over their visible keys
    for i in (0, 1, 4097, n - 1):
        ref = ra.attention(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1])
        np.testing.assert_allclose(out[:, i:i + 1], ref, rtol=1e-11, atol=1e-13)
