"""Gated linear attention: parallel, recurrent, chunkwise and streaming forms agree; the
definition by loops; retention as the constant-gate case; stable gates; and the naive
references of flash-linear-attention (code nobody here wrote), where installed."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.gla import gla_init_state, gla_matrix, gla_step
from refattn.testing import max_rel_error, strategies as rst


@given(rst.attention_inputs(dtype="float64"), st.integers(1, 9), st.floats(0.0, 3.0),
       rst.seeds())
def test_three_forms_agree(inputs, chunk, depth, seed):
    q, k, v = inputs
    g = -depth * np.random.default_rng(seed).random(k.shape)
    par = ra.gated_linear_attention(q, k, v, log_gates=g, method="parallel")
    assert max_rel_error(ra.gated_linear_attention(q, k, v, log_gates=g, method="recurrent"),
                par, normwise=True) <= 1e-10
    assert max_rel_error(ra.gated_linear_attention(q, k, v, log_gates=g, chunk_size=chunk),
                par, normwise=True) <= 1e-10


def test_definition_by_loops(rng):
    q, k, v = rng.standard_normal((3, 1, 6, 3))
    g = -rng.random((1, 6, 3))
    out = ra.gated_linear_attention(q, k, v, log_gates=g, scale=0.5)
    ref = np.zeros((6, 3))
    for i in range(6):
        for j in range(i + 1):
            decay = np.exp(g[0, j + 1:i + 1].sum(axis=0))     # gates of tokens j+1..i
            ref[i] += 0.5 * (q[0, i] * decay) @ k[0, j] * v[0, j]
    np.testing.assert_allclose(out[0], ref, rtol=1e-13)
    np.testing.assert_allclose(gla_matrix(q, k, log_gates=g, scale=0.5) @ v, out,
                               rtol=1e-13)


def test_cross_attention_takes_the_last_queries(rng):
    """N < M: query i sits at position i + M - N (bottom-right), like retention."""
    q = rng.standard_normal((2, 3, 4))
    k, v = rng.standard_normal((2, 2, 8, 4))
    g = -rng.random((2, 8, 4))
    full = ra.gated_linear_attention(np.concatenate([np.zeros((2, 5, 4)), q], 1), k, v,
                                     log_gates=g)
    for method in ("parallel", "recurrent", "chunkwise"):
        out = ra.gated_linear_attention(q, k, v, log_gates=g, method=method, chunk_size=3)
        np.testing.assert_allclose(out, full[:, 5:], rtol=1e-12)


def test_constant_gates_are_retention(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 30, 5))
    gammas = np.array([0.5, 0.9, 0.99, 1.0])
    g = np.log(gammas)[:, None, None]                       # per head, broadcast over M, D
    np.testing.assert_allclose(ra.gated_linear_attention(q, k, v, log_gates=g),
                               ra.retention(q, k, v, gamma=gammas), rtol=1e-12)


def test_gqa_equals_repeated_kv_heads(rng):
    q = rng.standard_normal((4, 10, 3))
    k, v = rng.standard_normal((2, 2, 10, 3))
    g = -rng.random((2, 10, 3))
    out = ra.gated_linear_attention(q, k, v, log_gates=g)
    rep = lambda x: np.repeat(x, 2, axis=0)                  # noqa: E731
    np.testing.assert_allclose(out, ra.gated_linear_attention(q, rep(k), rep(v),
                                                              log_gates=rep(g)), rtol=1e-13)


def test_streaming_with_data_dependent_gates(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 20, 5))
    k, v = k[:, :2], v[:, :2]                               # GQA: 4 query heads, 2 KV heads
    g = -2 * rng.random(k.shape)
    state = gla_init_state(batch_shape=(2,), heads_q=4, heads_kv=2, d=5, dv=5)
    size, outs = state.nbytes, []
    for t in range(20):
        o, state = gla_step(state, q[..., t, :], k[..., t, :], v[..., t, :],
                            log_gates_t=g[..., t, :])
        outs.append(o)
    assert state.nbytes == size == 2 * 2 * 5 * 5 * 8
    np.testing.assert_allclose(np.stack(outs, -2),
                               ra.gated_linear_attention(q, k, v, log_gates=g), rtol=1e-12)


@pytest.mark.parametrize("depth", [1e-13, 1e-4, 50.0, 1e4])
def test_gates_near_one_and_near_zero_stay_finite_and_exact(rng, depth):
    """Gates exp(-depth·u): near 1 the state sums ~all 3000 tokens; near 0 every decay
    underflows to an exact 0 without overflow (no exp of a positive sum)."""
    q, k, v = rng.standard_normal((3, 1, 3000, 3)) * 0.1
    g = -depth * rng.uniform(0.5, 1.0, (1, 3000, 3))
    rec = ra.gated_linear_attention(q, k, v, log_gates=g, method="recurrent")
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        chunked = ra.gated_linear_attention(q, k, v, log_gates=g, chunk_size=64)
    assert np.isfinite(chunked).all()
    assert max_rel_error(chunked, rec, normwise=True) <= 1e-10
    if depth >= 1e4:    # no memory at all: o_i = s (q_i . k_i) v_i
        own = (q * k).sum(-1, keepdims=True) / np.sqrt(3) * v
        np.testing.assert_allclose(chunked, own, rtol=1e-12)


@pytest.mark.slow
def test_a_million_tokens_chunkwise_equals_the_recurrence(rng):
    n = 1 << 20
    q, k, v = rng.standard_normal((3, 1, n, 2))
    g = -1e-5 * rng.random((1, n, 2))                        # memory spans ~1e5 tokens
    rec = ra.gated_linear_attention(q, k, v, log_gates=g, method="recurrent")
    chunked = ra.gated_linear_attention(q, k, v, log_gates=g, chunk_size=256)
    assert np.isfinite(chunked).all()
    assert max_rel_error(chunked, rec, normwise=True) <= 1e-10


def test_bad_gates_and_tokens():
    x = np.zeros((1, 4, 3))
    with pytest.raises(ValueError, match=r"must be <= 0"):
        ra.gated_linear_attention(x, x, x, log_gates=0.1)
    with pytest.raises(ValueError, match=r"must broadcast to the keys' shape \(1, 4, 3\)"):
        ra.gated_linear_attention(x, x, x, log_gates=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="method must be one of"):
        ra.gated_linear_attention(x, x, x, log_gates=-1.0, method="fast")
    with pytest.raises(ValueError, match="finite"):
        ra.gated_linear_attention(x, x, x, log_gates=-np.inf)
    state = gla_init_state(heads_q=1, heads_kv=1, d=3, dv=3)
    with pytest.raises(ValueError, match="log_gates_t is required"):
        gla_step(state, np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="q_t must have shape"):
        gla_step(state, np.zeros((2, 3)), np.zeros((1, 3)), np.zeros((1, 3)), -1.0)
    with pytest.raises(ValueError, match="log_gates_t must broadcast"):
        gla_step(state, np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(4))


# --- flash-linear-attention's naive references (PyTorch; they compute in float32) ----


def _fla(module):
    pytest.importorskip("torch")
    return pytest.importorskip(module, reason="flash-linear-attention is not installed")


def test_gla_matches_flash_linear_attention_naive_recurrent(rng):
    naive = _fla("fla.ops.gla.naive")
    import torch
    q, k, v = rng.standard_normal((3, 2, 3, 50, 16))            # (B, H, T, D)
    g = np.log(rng.uniform(0.8, 1.0, q.shape))
    bthd = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa
    theirs, _ = naive.naive_recurrent_gla(bthd(q), bthd(k), bthd(v), bthd(g))
    theirs = theirs.double().numpy().transpose(0, 2, 1, 3)
    ours = ra.gated_linear_attention(q, k, v, log_gates=g)
    # their loop runs in float32: agreement at float32 accuracy, not better
    assert max_rel_error(theirs, ours, normwise=True) <= 1e-5
    assert max_rel_error(theirs, ra.gated_linear_attention(q, k, v, log_gates=g / 2), normwise=True) > 1e-2


def test_retention_matches_flash_linear_attention_naive(rng):
    naive = _fla("fla.ops.retention.naive")
    import torch
    q, k, v = rng.standard_normal((3, 2, 4, 60, 16))            # (B, H, T, D)
    theirs = naive.naive_retention(*(torch.from_numpy(x) for x in (q, k, v))).double().numpy()
    gamma = 1 - 2.0 ** (-5.0 - np.arange(4))                   # their per-head decays
    assert max_rel_error(theirs, ra.retention(q, k, v, gamma=gamma), normwise=True) <= 1e-5
