"""Linear attention (refattn.linear) against independent forms: explicit loops, the
masked quadratic form, the recurrent scan, the chunked form and the streaming step."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refattn import MemoryBudgetError
from refattn.linear import (linear_attention, linear_attention_init_state,
                            linear_attention_matrix, linear_attention_step)
from refattn.testing import max_rel_error, strategies as rst

METHODS = ("quadratic", "recurrent", "chunked")


def _abs_features(x):
    """A user feature map with F = 2D nonnegative features."""
    return np.concatenate([np.maximum(x, 0), np.maximum(-x, 0) ** 2], axis=-1)


def _elu1(x):
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


PHI = {"elu": _elu1, "relu": lambda x: np.maximum(x, 0), "identity": lambda x: x,
       "abs": _abs_features}
FEATURE_MAPS = {"elu": "elu", "relu": "relu", "abs": _abs_features}


def loop_linear(q, k, v, phi, causal):
    """One (batch, head, query) at a time: ``o_i = sum_j w_ij v_j / sum_j w_ij`` with
    ``w_ij = phi(q_i) . phi(k_j)`` over the visible keys; 0 for a zero denominator.
    ``q (B, Hq, N, D)`` etc. — deliberately plain and independent of the library."""
    nb, hq, n, _ = q.shape
    hkv, m = k.shape[1:3]
    out = np.zeros((nb, hq, n, v.shape[-1]))
    for b in range(nb):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(n):
                fq = phi(q[b, h, i][None])[0]
                num, den = np.zeros(v.shape[-1]), 0.0
                for j in range(m):
                    if causal and j > i + m - n:
                        continue
                    w = float(np.dot(fq, phi(k[b, kv, j][None])[0]))
                    num += w * v[b, kv, j]
                    den += w
                if den != 0:
                    out[b, h, i] = num / den
    return out


def _flat(x, sh):
    return x.reshape((-1,) + x.shape[len(sh.batch):])


@given(data=st.data(), fmap=st.sampled_from(sorted(FEATURE_MAPS)),
       chunk=st.integers(1, 13), causal=st.booleans())
def test_the_three_forms_agree(data, fmap, chunk, causal):
    q, k, v = data.draw(rst.attention_inputs(dtype="float64"))
    outs = {m: linear_attention(q, k, v, feature_map=FEATURE_MAPS[fmap], causal=causal,
                                method=m, chunk_size=chunk) for m in METHODS}
    outs["default"] = linear_attention(q, k, v, feature_map=FEATURE_MAPS[fmap],
                                       causal=causal, chunk_size=chunk)
    for name, out in outs.items():
        assert out.shape == q.shape[:-1] + (v.shape[-1],) and np.isfinite(out).all()
        assert max_rel_error(out, outs["quadratic"], normwise=True) <= 1e-12, name
        np.testing.assert_allclose(out, outs["quadratic"], rtol=1e-11, atol=1e-13)


@settings(max_examples=25)
@given(data=st.data(), fmap=st.sampled_from(sorted(FEATURE_MAPS)), causal=st.booleans())
def test_equals_an_explicit_loop(data, fmap, causal):
    sh = data.draw(rst.shapes(max_batch_dims=1, max_len=9, max_dim=5))
    q, k, v = data.draw(rst.attention_inputs(st.just(sh), dtype="float64"))
    expected = loop_linear(_flat(q, sh), _flat(k, sh), _flat(v, sh), PHI[fmap], causal)
    out = linear_attention(q, k, v, feature_map=FEATURE_MAPS[fmap], causal=causal)
    np.testing.assert_allclose(_flat(out, sh), expected, rtol=1e-12, atol=1e-13)
    a = linear_attention_matrix(q, k, feature_map=FEATURE_MAPS[fmap], causal=causal)
    np.testing.assert_allclose(_flat(a @ np.repeat(v, sh.hq // sh.hkv, axis=-3), sh),
                               expected, rtol=1e-12, atol=1e-13)


def test_gqa_equals_repeated_kv_heads(rng):
    q = rng.standard_normal((2, 6, 7, 5))
    k, v = rng.standard_normal((2, 2, 2, 9, 5))
    for causal in (False, True):
        for method in METHODS:
            out = linear_attention(q, k, v, causal=causal, method=method, chunk_size=4)
            rep = linear_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1),
                                   causal=causal, method=method, chunk_size=4)
            np.testing.assert_allclose(out, rep, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_causal_is_bottom_right_aligned(rng, method):
    q = rng.standard_normal((2, 4, 3))
    k, v = rng.standard_normal((2, 2, 7, 3))
    out = linear_attention(q, k, v, causal=True, method=method, chunk_size=3)
    for i in range(4):                       # query i sees keys 0 .. i + 3
        ref = linear_attention(q[:, i:i + 1], k[:, :i + 4], v[:, :i + 4])
        np.testing.assert_allclose(out[:, i:i + 1], ref, rtol=1e-13)
    # N > M: the first N - M queries see no key and give exactly 0, the rest are finite
    out = linear_attention(k, q, q, causal=True, method=method, chunk_size=2)
    assert (out[:, :3] == 0).all() and np.isfinite(out).all() and (out[:, 3:] != 0).any()


@pytest.mark.parametrize("method", (None,) + METHODS)
def test_zero_denominators_give_zero_not_nan(method):
    q = np.array([[[-1.0, -2.0], [1.0, 0.5], [-3.0, -0.1]]])     # relu(q) = 0 for rows 0, 2
    k = np.array([[[0.5, 1.0], [2.0, 0.1], [0.3, 0.3]]])
    v = np.array([[[1.0], [2.0], [4.0]]])
    out = linear_attention(q, k, v, feature_map="relu", causal=method is not None,
                           method=method, chunk_size=2)
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 0 and np.isfinite(out).all()
    # elu features underflow to exactly 0 far below -745: still 0, no NaN
    low = np.full((1, 3, 2), -800.0)
    out = linear_attention(low, low, v, causal=method is not None, method=method)
    assert (out == 0).all()
    a = linear_attention_matrix(low, low, causal=True)
    assert (a == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_a_later_key_does_not_reach_earlier_queries(method, rng):
    """With check_finite=False a NaN propagates only to the queries that see it."""
    q, k, v = rng.standard_normal((3, 1, 9, 3))
    k[0, 5, 1] = np.nan
    out = linear_attention(q, k, v, causal=True, method=method, chunk_size=4,
                           check_finite=False)
    assert np.isfinite(out[0, :5]).all() and np.isnan(out[0, 5:]).all()
    a = linear_attention_matrix(q, k, causal=True, check_finite=False)
    assert np.isfinite(a[0, :5]).all() and np.isnan(a[0, 5:]).all()


def test_identity_features_are_signed(rng):
    q, k = rng.standard_normal((2, 1, 6, 3))
    v = rng.standard_normal((1, 6, 2))
    a = linear_attention_matrix(q, k, feature_map="identity")
    assert (a < 0).any()                                    # not row-stochastic ...
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-10)  # ... but rows sum to 1
    np.testing.assert_allclose(linear_attention(q, k, v, feature_map="identity"), a @ v,
                               rtol=1e-10)
    expected = loop_linear(q[None], k[None], v[None], PHI["identity"], True)[0]
    for method in METHODS:
        np.testing.assert_allclose(linear_attention(q, k, v, feature_map="identity",
                                                    causal=True, method=method),
                                   expected, rtol=1e-9, atol=1e-12)


def test_user_feature_maps(rng):
    q, k, v = rng.standard_normal((3, 2, 3, 5, 4))
    # one constant feature: every key weighs the same -> (prefix) means of the values
    ones = lambda x: np.ones(x.shape[:-1] + (1,))       # noqa: E731
    np.testing.assert_allclose(linear_attention(q, k, v, feature_map=ones),
                               np.broadcast_to(v.mean(-2, keepdims=True), v.shape),
                               rtol=1e-14)
    prefix = np.cumsum(v, axis=-2) / np.arange(1, 6)[:, None]
    for method in METHODS:
        np.testing.assert_allclose(linear_attention(q, k, v, feature_map=ones, causal=True,
                                                    method=method), prefix, rtol=1e-13)
    # the callable sees the caller's batch dims (*batch, H, L, D)
    seen = []

    def spy(x):
        seen.append(x.shape)
        return np.exp(x)
    linear_attention(q, k, v, feature_map=spy)
    assert seen == [(2, 3, 5, 4), (2, 3, 5, 4)]
    # a signed callable is accepted with allow_negative=True and matches the loop form
    out = linear_attention(q, k, v, feature_map=lambda x: x + 0.5, allow_negative=True)
    exp = loop_linear(q, k, v, lambda x: x + 0.5, False)
    np.testing.assert_allclose(out, exp, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fmap", ["elu", "relu", _abs_features])
def test_stepping_equals_parallel_and_state_is_constant(rng, fmap):
    batch, hq, hkv, n, d, dv = (2,), 6, 3, 11, 4, 3
    q = rng.standard_normal(batch + (hq, n, d))
    k = rng.standard_normal(batch + (hkv, n, d))
    v = rng.standard_normal(batch + (hkv, n, dv))
    state = linear_attention_init_state(batch_shape=batch, heads_q=hq, heads_kv=hkv, d=d,
                                        dv=dv, feature_map=fmap)
    nf = 2 * d if callable(fmap) else d
    size = state.nbytes
    assert size == 8 * (2 * hkv * nf * dv + 2 * hkv * nf)        # S and z per KV head
    outs = []
    for t in range(n):
        before = state
        o, state = linear_attention_step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        assert before.position == t and (before.s == 0).all() == (t == 0)  # old unchanged
        assert state.nbytes == size
        outs.append(o)
    parallel = linear_attention(q, k, v, feature_map=fmap, causal=True)
    np.testing.assert_allclose(np.stack(outs, -2), parallel, rtol=1e-12, atol=1e-14)


def test_state_does_not_grow_with_sequence_length(rng):
    sizes = []
    for n in (3, 60):
        state = linear_attention_init_state(heads_q=2, heads_kv=1, d=5, dv=2)
        for _ in range(n):
            _, state = linear_attention_step(state, rng.standard_normal((2, 5)),
                                             rng.standard_normal((1, 5)),
                                             rng.standard_normal((1, 2)))
        assert state.position == n
        sizes.append(state.nbytes)
    assert sizes[0] == sizes[1] == 8 * (5 * 2 + 5)


def test_validation_errors(rng):
    q, k, v = rng.standard_normal((3, 1, 4, 3))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match=r"negative features.*allow_negative=True"):
        linear_attention(q, k, v, feature_map=lambda x: x)
    with pytest.raises(ValueError, match=r"negative features"):
        linear_attention_matrix(q, k, feature_map=np.sin)
    with pytest.raises(ValueError, match=r"must map q of shape \(1, 4, 3\) to shape"):
        linear_attention(q, k, v, feature_map=lambda x: np.ones(x.shape[:-2] + (2,)))
    with pytest.raises(ValueError, match="non-finite"):
        linear_attention(q, k, v, feature_map=lambda x: np.full(x.shape, np.inf))
    with pytest.raises(TypeError, match="real numeric dtype"):
        linear_attention(q, k, v, feature_map=lambda x: x.astype(complex))
    with pytest.raises(ValueError, match="same number of features F"):   # F from L
        linear_attention(q, k[:, :3], v[:, :3],
                         feature_map=lambda x: np.ones(x.shape[:-1] + (x.shape[-2],)))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
            linear_attention(q, k, v, causal=True, chunk_size=bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="chunk_size must be an integer"):
            linear_attention(q, k, v, causal=True, chunk_size=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        linear_attention(q, k, v, causal=True, method="parallel")
    with pytest.raises(ValueError, match="causal must be True, False or one of"):
        linear_attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="allow_negative must be True or False"):
        linear_attention(q, k, v, allow_negative=1)
    with pytest.raises(MemoryBudgetError, match="method='chunkwise'"):
        linear_attention(q, k, v, causal=True, method="quadratic", memory_budget=100)
    with pytest.raises(MemoryBudgetError, match="linear_attention"):
        linear_attention_matrix(q, k, memory_budget=100)
    linear_attention(q, k, v, method="chunked", memory_budget=100)   # no N x M matrix


def test_step_validation(rng):
    state = linear_attention_init_state(batch_shape=(2,), heads_q=2, heads_kv=1, d=3, dv=4)
    with pytest.raises(ValueError, match=r"q_t must have shape \(2, 2, 3\)"):
        linear_attention_step(state, np.zeros((2, 1, 3)), np.zeros((2, 1, 3)),
                              np.zeros((2, 1, 4)))
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention_step(object(), np.zeros((2, 2, 3)), np.zeros((2, 1, 3)),
                              np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        linear_attention_init_state(heads_q=3, heads_kv=2, d=3, dv=4)
    signed = linear_attention_init_state(heads_q=1, heads_kv=1, d=2, dv=1,
                                         feature_map=lambda x: x)
    with pytest.raises(ValueError, match="negative features"):
        linear_attention_step(signed, -np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 1)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float64(rng, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    q, k, v = (x.astype(dtype) for x in rng.standard_normal((3, 2, 5, 4)))
    out = linear_attention(q, k, v, causal=True)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, linear_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal=True))
