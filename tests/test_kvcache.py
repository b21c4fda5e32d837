import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refattn.exact import attention
from refattn.sparse import sink_attention, sliding_window_attention
from refattn.kvcache import (quantize, dequantize, quantized_init, quantized_step, full_cache_from,
                             quantization_error, full_cache_init, full_cache_step, ring_init, ring_step,
                             sink_init, sink_step, split_kv_decode,
                             paged_init, paged_step, state_size_table)


def _run(init, step, q, k, v, **params):
    *b, hq, n, d = q.shape
    hkv, dv = k.shape[-3], v.shape[-1]
    state = init(batch_shape=tuple(b), heads_q=hq, heads_kv=hkv, d=d, dv=dv, **params)
    outs, sizes = [], []
    for t in range(n):
        o, state = step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        outs.append(o)
        sizes.append((state.nbytes, state.nbytes_after(t + 1)))
    return np.stack(outs, axis=-2), state, sizes


@st.composite
def problems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
    hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, d, dv = draw(st.integers(1, 14)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    q = rng.standard_normal(batch + (hkv * g, n, d)) * 2
    k = rng.standard_normal(batch + (hkv, n, d)) * 2
    v = rng.standard_normal(batch + (hkv, n, dv))
    return q, k, v


@settings(max_examples=40, deadline=None)
@given(problems())
def test_full_cache_equals_causal_attention(qkv):
    q, k, v = qkv
    out, state, sizes = _run(full_cache_init, full_cache_step, q, k, v)
    np.testing.assert_allclose(out, attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    assert all(a == b for a, b in sizes)              # nbytes_after == actual nbytes
    assert state.position == q.shape[-2]


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 6))
def test_ring_buffer_equals_sliding_window(qkv, w):
    q, k, v = qkv
    dilation = 1 + np.arange(q.shape[-3]) % 3                 # per query head
    out, _, sizes = _run(ring_init, ring_step, q, k, v, window=w, dilation=dilation)
    ref = sliding_window_attention(q, k, v, window=w, dilation=dilation, causal=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert len({s for pair in sizes for s in pair}) == 1   # constant, and as predicted


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 5), st.integers(0, 4))
def test_sink_cache_equals_sink_attention(qkv, w, s):
    q, k, v = qkv
    out, _, sizes = _run(sink_init, sink_step, q, k, v, window=w, sinks=s)
    ref = sink_attention(q, k, v, window=w, sinks=s, causal=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert len({x for pair in sizes for x in pair}) == 1


def test_gqa_cache_is_group_times_smaller():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 6, 4))
    k, v = rng.standard_normal((2, 2, 6, 4))
    _, gqa, _ = _run(full_cache_init, full_cache_step, q, k, v)
    rep = np.repeat(k, 4, axis=0), np.repeat(v, 4, axis=0)
    out_rep, mha, _ = _run(full_cache_init, full_cache_step, q, *rep)
    out, _, _ = _run(full_cache_init, full_cache_step, q, k, v)
    assert mha.nbytes == 4 * gqa.nbytes == 4 * 2 * 6 * 8 * 8
    np.testing.assert_allclose(out, out_rep, rtol=1e-13, atol=1e-13)


def test_step_is_functional():
    rng = np.random.default_rng(1)
    s0 = sink_init(heads_q=1, heads_kv=1, d=3, dv=3, window=1, sinks=1)
    x = rng.standard_normal((3, 1, 3))
    _, s1 = sink_step(s0, *x)
    _, s2 = sink_step(s1, *x)
    assert s0.position == 0 and not s0.sink_keys.any() and len(s0.recent) == 0
    assert s1.position == 1 and len(s1.recent) == 0 and len(s2.recent) == 1
    f0 = full_cache_init(heads_q=1, heads_kv=1, d=3, dv=3)
    _, f1 = full_cache_step(f0, *x)
    assert f0.keys.shape[-2] == 0 and f1.keys.shape[-2] == 1


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(1, 20))
def test_split_kv_decode_equals_attention(qkv, splits):
    q, k, v = qkv
    q_t = q[..., -1, :]
    ref = attention(q_t[..., None, :], k, v)[..., 0, :]
    np.testing.assert_allclose(split_kv_decode(q_t, k, v, splits), ref,
                               rtol=1e-12, atol=1e-12)


def test_state_size_table():
    t = state_size_table(heads_q=32, heads_kv=8, d=128, dv=128)
    assert t["attention"][1_000_000] == 8 * 1_000_000 * 256 * 8
    assert t["attention"][16_000] == 16 * t["attention"][1_000]
    assert len(set(t["sink_attention"].values())) == 1
    # budget 4096: 4 sinks + a window of 4092 back (4093 ring slots)
    assert t["sink_attention"][1000] == 8 * (4 + 4093) * 256 * 8
    assert t["gated_linear_attention"][1000] == 8 * 128 * 128 * 8      # per KV head
    assert t["retention"][1000] == 32 * 128 * 128 * 8                  # per query head
    assert t["selective_scan"][10**6] == 32 * 128 * 16 * 8
    small = state_size_table((10,), heads_q=2, heads_kv=1, d=4, dv=4, budget=8)
    assert small["sliding_window_attention"][10] == (4 + 1) * 8 * 8    # window 4 back

def test_bad_inputs_name_the_argument():
    s = full_cache_init(batch_shape=(2,), heads_q=2, heads_kv=1, d=4, dv=3)
    good = np.zeros((2, 2, 4)), np.zeros((2, 1, 4)), np.zeros((2, 1, 3))
    with pytest.raises(ValueError, match="q_t"):
        full_cache_step(s, np.zeros((2, 1, 4)), *good[1:])
    with pytest.raises(ValueError, match="k_t"):
        full_cache_step(s, good[0], np.zeros((2, 1, 5)), good[2])
    with pytest.raises(ValueError, match="v_t"):
        full_cache_step(s, *good[:2], np.zeros((1, 1, 3)))
    with pytest.raises(TypeError, match="q_t"):
        full_cache_step(s, good[0].astype(complex), *good[1:])
    with pytest.raises(ValueError, match="window"):
        ring_init(heads_q=1, heads_kv=1, d=1, dv=1, window=-1)
    with pytest.raises(ValueError, match="right"):
        ring_init(heads_q=1, heads_kv=1, d=1, dv=1, window=2, right=-1)
    with pytest.raises(ValueError, match="dilation"):
        ring_init(heads_q=2, heads_kv=1, d=1, dv=1, window=2, dilation=[1, 2, 3])
    with pytest.raises(ValueError, match="sinks"):
        sink_init(heads_q=1, heads_kv=1, d=1, dv=1, window=2, sinks=-1)
    with pytest.raises(ValueError, match="splits"):
        split_kv_decode(*good[:2], np.zeros((2, 1, 3)), 0)
    with pytest.raises(ValueError, match="heads"):
        full_cache_init(heads_q=3, heads_kv=2, d=1, dv=1)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 5), st.randoms(use_true_random=False))
def test_paged_cache_equals_full_cache(qkv, page_size, rnd):
    q, k, v = qkv
    n = q.shape[-2]
    pages = -(-n // page_size) + 1
    allocation = list(range(pages))
    rnd.shuffle(allocation)                      # pages allocated out of order
    out, state, sizes = _run(paged_init, paged_step, q, k, v, page_size=page_size,
                             num_pages=pages, allocation=allocation)
    full, _, _ = _run(full_cache_init, full_cache_step, q, k, v)
    np.testing.assert_array_equal(out, full)
    assert state.page_table == tuple(allocation[:-(-n // page_size)])
    assert len({x for pair in sizes for x in pair}) == 1


def test_paged_out_of_order_and_bad_page_size():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 1, 7, 2))      # 7 tokens, page size 3 (no divide)
    out, state, _ = _run(paged_init, paged_step, q, k, v, page_size=3, num_pages=4,
                         allocation=(3, 1, 0))
    assert state.page_table == (3, 1, 0)
    np.testing.assert_array_equal(state.key_pages[3][0], k[0, 0:3])
    np.testing.assert_array_equal(state.key_pages[0][0, 0], k[0, 6])
    np.testing.assert_allclose(out, attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="page_size"):
        paged_init(heads_q=1, heads_kv=1, d=1, dv=1, page_size=0, num_pages=1)
    with pytest.raises(ValueError, match="allocation"):
        paged_init(heads_q=1, heads_kv=1, d=1, dv=1, page_size=1, num_pages=2,
                   allocation=(0, 0))
    with pytest.raises(ValueError, match="full"):
        _run(paged_init, paged_step, q, k, v, page_size=3, num_pages=2)


@settings(max_examples=30, deadline=None)
@given(problems(), st.sampled_from(["int8", "fp8"]))
def test_quantized_cache_equals_attention_over_dequantized(qkv, kind):
    q, k, v = qkv
    out, state, sizes = _run(quantized_init, quantized_step, q, k, v, kind=kind)
    kd, vd = (dequantize(*quantize(x, kind)) for x in (k, v))
    np.testing.assert_allclose(out, attention(q, kd, vd, causal=True), rtol=1e-12, atol=1e-12)
    assert all(a == b for a, b in sizes)
    e = quantization_error(q, k, v, kind)
    assert e["key_within_bound"] and e["value_within_bound"]
    assert e["key_max_abs"] <= e["key_bound"] and e["value_max_abs"] <= e["value_bound"]
    # outputs are convex combinations of values: the value error bounds part of it,
    # and logits move by at most |q|·key_err·scale per key
    d = q.shape[-1]
    dl = np.abs(q).sum(-1).max() * e["key_max_abs"] / np.sqrt(d)
    bound = e["value_bound"] + np.abs(v).max() * np.expm1(2 * dl)
    assert e["out_max_abs"] <= bound + 1e-12


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(1, 5))
def test_per_channel_cache_keeps_the_unfinished_group_exact(qkv, group):
    q, k, v = qkv
    out, state, sizes = _run(quantized_init, quantized_step, q, k, v, kind="int8-channel",
                             group_size=group)
    t = k.shape[-2]
    full = t - t % group                                    # tokens in finished groups
    kd, vd = (np.concatenate([dequantize(*quantize(x[..., :full, :], "int8-channel",
                                                   group_size=group), group_size=group),
                              x[..., full:, :]], axis=-2) for x in (k, v))
    keys, values = state.dequantized()
    np.testing.assert_array_equal(keys, kd)
    np.testing.assert_array_equal(values, vd)
    np.testing.assert_allclose(out[..., -1, :], attention(q, kd, vd, causal=True)[..., -1, :],
                               rtol=1e-12, atol=1e-12)
    assert all(a == b for a, b in sizes)
    e = quantization_error(q, k, v, "int8-channel", group_size=group)
    assert e["key_within_bound"] and e["value_within_bound"]


def test_per_channel_scales_tame_outlier_channels(rng):
    """Keys with one large channel (as in LLM caches): per-token scales are set by the
    outlier and crush the other channels; per-channel scales are not."""
    k = rng.standard_normal((1, 256, 16))
    k[..., 3] *= 100.0
    q, v = rng.standard_normal((2, 1, 256, 16))
    per_token = quantization_error(q, k, v, "int8")
    per_channel = quantization_error(q, k, v, "int8-channel", group_size=32)
    small = np.delete(np.arange(16), 3)
    err = lambda kind, **kw: np.abs(dequantize(*quantize(k, kind, **kw), **(         # noqa
        {"group_size": 32} if kind == "int8-channel" else {})) - k)[..., small].max()
    assert err("int8-channel", group_size=32) < err("int8") / 20
    assert per_channel["out_max_abs"] < per_token["out_max_abs"]


def test_quantization_rules():
    c, s = quantize(np.array([[1.0, -0.5, 0.25, 0.0]]), "int8")
    np.testing.assert_array_equal(c, [[127, -64, 32, 0]])   # -63.5 -> -64 (half to even)
    np.testing.assert_array_equal(quantize(np.zeros((1, 3)), "int8")[0], 0)
    c, _ = quantize(np.array([1.0, 1.0625, 1.1875, 448.0]), "fp8")
    np.testing.assert_array_equal(c.astype(float), [1.0, 1.0, 1.25, 448.0])
    with pytest.raises(ValueError, match="kind"):
        quantized_init(heads_q=1, heads_kv=1, d=1, dv=1, kind="int4")
    with pytest.raises(ValueError, match="448"):
        quantize(np.array([500.0]), "fp8")
    s8 = quantized_init(heads_q=2, heads_kv=1, d=4, dv=4)
    s8 = quantized_step(s8, np.zeros((2, 4)), np.ones((1, 4)), np.ones((1, 4)))[1]
    assert s8.nbytes == 4 + 4 + 8 + 8 == s8.nbytes_after(1)
    sc = quantized_init(heads_q=2, heads_kv=1, d=4, dv=3, kind="int8-channel", group_size=2)
    for t in range(5):
        sc = quantized_step(sc, np.zeros((2, 4)), np.ones((1, 4)), np.ones((1, 3)))[1]
        assert sc.nbytes == sc.nbytes_after(t + 1)
    assert sc.nbytes == 4 * 7 + 2 * 7 * 8 + 1 * 7 * 8        # 2 groups + 1 residual token
    with pytest.raises(ValueError, match="group_size"):
        quantized_init(heads_q=1, heads_kv=1, d=1, dv=1, kind="int8-channel", group_size=0)


def test_full_cache_appends_in_place_yet_states_never_change(rng):
    """The growth buffer is shared along one line of steps; branching from an old state
    copies, so every state keeps seeing exactly its own tokens."""
    q, k, v = rng.standard_normal((3, 2, 40, 4))
    s = full_cache_init(heads_q=2, heads_kv=2, d=4, dv=4)
    states = [s]
    for t in range(30):
        s = full_cache_step(s, q[:, t], k[:, t], v[:, t])[1]
        states.append(s)
    assert states[30].cache.keys is states[20].cache.keys      # appended, not copied
    branch_out, branch = full_cache_step(states[10], q[:, 35], k[:, 35], v[:, 35])
    again_out, _ = full_cache_step(states[10], q[:, 36], k[:, 36], v[:, 36])
    for t, st_ in enumerate(states):
        np.testing.assert_array_equal(st_.keys, k[:, :t])
        np.testing.assert_array_equal(st_.values, v[:, :t])
    idx = list(range(10)) + [35]
    np.testing.assert_array_equal(branch.keys, k[:, idx])
    np.testing.assert_allclose(branch_out, attention(q[:, 35:36], k[:, idx], v[:, idx])[:, 0],
                               rtol=1e-13)
    idx[-1] = 36
    np.testing.assert_allclose(again_out, attention(q[:, 36:37], k[:, idx], v[:, idx])[:, 0],
                               rtol=1e-13)
    resumed = full_cache_from(k[:, :30], v[:, :30], heads_q=2)
    np.testing.assert_array_equal(full_cache_step(resumed, q[:, 30], k[:, 30], v[:, 30])[0],
                                  full_cache_step(states[30], q[:, 30], k[:, 30], v[:, 30])[0])
    with pytest.raises(ValueError, match="k and v must have shapes"):
        full_cache_from(k[:, :3], v[:, :2], heads_q=2)


def test_window_cache_appends_in_place_yet_states_never_change(rng):
    """The window lives in a buffer with room for about twice the window: steps append
    in place until it is full, then move the window to a new buffer; branching from an
    old state copies. Every state keeps seeing exactly its own keys."""
    q, k, v = rng.standard_normal((3, 2, 60, 4))
    s = sink_init(heads_q=2, heads_kv=2, d=4, dv=4, window=9, sinks=2)
    states = [s]
    for t in range(50):
        s = sink_step(s, q[:, t], k[:, t], v[:, t])[1]
        states.append(s)
    assert states[12].recent.keys is states[13].recent.keys     # appended, not copied
    for t, st_ in enumerate(states):
        recent = list(range(max(2, t - 10), t))                  # window 9: 10 tokens back
        np.testing.assert_array_equal(st_.recent.keys_view, k[:, recent])
        np.testing.assert_array_equal(st_.sink_keys[:, :min(t, 2)], k[:, :min(t, 2)])
    out_a, a = sink_step(states[30], q[:, 55], k[:, 55], v[:, 55])
    out_b, b = sink_step(states[30], q[:, 56], k[:, 56], v[:, 56])   # branch again
    for out, j, branch in ((out_a, 55, a), (out_b, 56, b)):
        idx = [0, 1] + list(range(21, 30)) + [j]
        np.testing.assert_array_equal(branch.recent.keys_view, k[:, idx[2:]])
        np.testing.assert_allclose(out, attention(q[:, j:j + 1], k[:, idx], v[:, idx])[:, 0],
                                   rtol=1e-13)


@pytest.mark.parametrize("kind", ["int8", "int8-channel", "fp8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_values(kind, bad):
    x = np.ones((4, 3))
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"x \(4, 3\) contains non-finite.*\(2, 1\)"):
        quantize(x, kind, group_size=2)


@pytest.mark.parametrize("kind", ["int8", "int8-channel", "fp8"])
def test_quantize_refuses_complex_and_non_numeric_values(kind):
    with pytest.raises(TypeError, match="x must have a real numeric dtype, got complex"):
        quantize(np.ones((2, 3)) + 1j, kind)
    with pytest.raises(TypeError, match="x must have a real numeric dtype"):
        quantize(np.array([["a", "b"]]), kind)
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize(np.ones((2, 3)) + 1j, "int4")


def test_quantize_bounds_hold_for_subnormal_rows():
    x = np.array([[5e-324, 0.0, -5e-324]])              # max|x| / 127 rounds to 0
    codes, scales = quantize(x, "int8")
    assert scales[0, 0] > 0
    np.testing.assert_array_equal(dequantize(codes, scales), x)


@pytest.mark.parametrize("kind", ["int8", "int8-channel", "fp8"])
def test_quantized_cache_names_the_bad_token(kind):
    s = quantized_init(heads_q=2, heads_kv=1, d=3, dv=2, kind=kind, group_size=2)
    q, k, v = np.zeros((2, 3)), np.ones((1, 3)), np.ones((1, 2))
    with pytest.raises(ValueError, match=r"k_t \(1, 3\) contains non-finite"):
        quantized_step(s, q, np.array([[1.0, np.nan, 0.0]]), v)
    with pytest.raises(TypeError, match="v_t must have a real numeric dtype"):
        quantized_step(s, q, k, v + 1j)
    if kind == "fp8":
        with pytest.raises(ValueError, match=r"448; v_t \(1, 1, 2\) has 500.0"):
            quantized_step(s, q, k, np.array([[1.0, 500.0]]))
    with pytest.raises(ValueError, match=r"^k \(1, 4, 3\) contains non-finite"):
        quantization_error(np.ones((1, 4, 3)), np.full((1, 4, 3), np.inf),
                           np.ones((1, 4, 3)), kind)
