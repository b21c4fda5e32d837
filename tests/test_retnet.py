"""Retention: parallel, recurrent, chunkwise and streaming forms agree; stable decays."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.retnet import retention_init_state, retention_matrix, retention_step
from refattn.testing import max_rel_error, strategies as rst


@given(rst.attention_inputs(dtype="float64"), st.integers(1, 9), st.floats(0.05, 1.0))
def test_three_forms_agree(inputs, chunk, gamma):
    q, k, v = inputs
    g = np.linspace(gamma, 1.0, q.shape[-3])               # one decay per query head
    par = ra.retention(q, k, v, gamma=g, method="parallel")
    assert max_rel_error(ra.retention(q, k, v, gamma=g, method="recurrent"), par, normwise=True) <= 1e-10
    assert max_rel_error(ra.retention(q, k, v, gamma=g, chunk_size=chunk), par, normwise=True) <= 1e-10


def test_definition_by_loops(rng):
    q, k, v = rng.standard_normal((3, 1, 6, 3))
    out = ra.retention(q, k, v, gamma=0.7, scale=0.5)
    ref = np.zeros((6, 3))
    for i in range(6):
        for j in range(i + 1):
            ref[i] += 0.5 * (q[0, i] @ k[0, j]) * 0.7 ** (i - j) * v[0, j]
    np.testing.assert_allclose(out[0], ref, rtol=1e-13)
    np.testing.assert_allclose(retention_matrix(q, k, gamma=0.7, scale=0.5) @ v, out,
                               rtol=1e-13)


def test_gamma_one_is_causal_linear_attention_unnormalized(rng):
    q, k, v = rng.standard_normal((3, 2, 7, 4))
    s = np.tril(np.einsum("hnd,hmd->hnm", q, k)) / 2
    np.testing.assert_allclose(ra.retention(q, k, v, gamma=1.0), s @ v, rtol=1e-12)


def test_streaming_state_is_constant(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 20, 5))
    state = retention_init_state(batch_shape=(2,), heads_q=4, heads_kv=4, d=5, dv=5,
                                 gamma=0.8)
    size, outs = state.nbytes, []
    for t in range(20):
        o, state = retention_step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        outs.append(o)
    assert state.nbytes == size
    np.testing.assert_allclose(np.stack(outs, -2), ra.retention(q, k, v, gamma=0.8),
                               rtol=1e-12)


@pytest.mark.parametrize("gamma", [1 - 1e-12, 0.999, 1e-3])
def test_decays_near_one_and_near_zero_stay_finite_and_exact(rng, gamma):
    q, k, v = rng.standard_normal((3, 1, 1500, 4)) * 0.1
    par = ra.retention(q, k, v, gamma=gamma, method="parallel")
    chunked = ra.retention(q, k, v, gamma=gamma, chunk_size=64)
    assert np.isfinite(chunked).all()
    assert max_rel_error(chunked, par, normwise=True) <= 1e-10


@pytest.mark.parametrize("gamma, message", [(0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"),
                                            (np.ones(3), "one per query head")])
def test_bad_gamma(gamma, message):
    x = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=message):
        ra.retention(x, x, x, gamma=gamma)


def test_bad_method_and_tokens():
    x = np.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        ra.retention(x, x, x, gamma=0.5, method="fast")
    state = retention_init_state(heads_q=1, heads_kv=1, d=3, dv=3, gamma=0.5)
    with pytest.raises(ValueError, match="q_t must have shape"):
        retention_step(state, np.zeros((2, 3)), np.zeros((1, 3)), np.zeros((1, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1 - 1e-9, 0.9999])
def test_a_million_tokens_chunkwise_equals_the_numba_recurrence(rng, gamma):
    """Retention is GLA with a constant gate: GLA's compiled recurrence is the float64
    reference at 1M tokens (γ^(1M) = 0.999 and 4e-44)."""
    n = 1 << 20
    q, k, v = rng.standard_normal((3, 1, n, 2))
    chunked = ra.retention(q, k, v, gamma=gamma, chunk_size=512)
    rec = ra.gated_linear_attention(q, k, v, log_gates=np.log(gamma), method="recurrent")
    assert np.isfinite(chunked).all()
    assert max_rel_error(chunked, rec, normwise=True) <= 1e-10
