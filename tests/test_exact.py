"""Dense exact attention against a plain loop form, and its conventions."""
import ml_dtypes
import numpy as np
import pytest
from conftest import naive_attention

import refattn as ra


def test_matches_loop_form_with_gqa_mask_and_bias(rng):
    q = rng.standard_normal((6, 9, 5))
    k = rng.standard_normal((2, 11, 5))
    v = rng.standard_normal((2, 11, 3))
    keep = rng.random((6, 9, 11)) < 0.7
    bias = rng.standard_normal((6, 9, 11))
    out, lse = ra.attention(q, k, v, mask=keep, bias=bias, scale=0.3, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, keep, scale=0.3, bias=bias)
    np.testing.assert_allclose(out, ref_out, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13)


def test_gqa_equals_repeated_kv_heads(rng):
    q = rng.standard_normal((2, 8, 7, 4))
    k = rng.standard_normal((2, 2, 7, 4))
    v = rng.standard_normal((2, 2, 7, 4))
    out = ra.attention(q, k, v, causal=True)
    ref = ra.attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=True)
    np.testing.assert_array_equal(out, ref)


def test_causal_is_bottom_right_aligned(rng):
    """With N < M the last query sees every key, the first sees M - N + 1 of them."""
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 7, 4)), \
        rng.standard_normal((1, 7, 2))
    out = ra.attention(q, k, v, causal=True)
    for i in range(3):
        np.testing.assert_allclose(out[0, i], ra.attention(q[:, i:i + 1], k[:, :5 + i],
                                                           v[:, :5 + i])[0, 0], rtol=1e-14)
    top_left = ra.attention(q, k, v, mask=ra.masks.causal("top_left"))
    np.testing.assert_allclose(top_left[0, 0], v[0, 0], rtol=1e-14)


def test_fully_masked_rows_give_zero_and_minus_inf(rng):
    q, k, v = rng.standard_normal((3, 1, 5, 4))
    keep = np.ones((5, 5), bool)
    keep[2] = False
    out, lse = ra.attention(q, k, v, mask=keep, return_lse=True)
    assert np.all(out[0, 2] == 0) and lse[0, 2] == -np.inf
    assert np.isfinite(out).all() and np.isfinite(np.delete(lse, 2, axis=1)).all()
    # N > M with bottom-right causal: the first N - M rows see no key
    out, lse = ra.attention(rng.standard_normal((1, 6, 4)), k, v, causal=True,
                            return_lse=True)
    assert np.all(out[0, 0] == 0) and lse[0, 0] == -np.inf and np.isfinite(lse[0, 1:]).all()
    # no keys at all
    out, lse = ra.attention(q, k[:, :0], v[:, :0], return_lse=True)
    assert out.shape == (1, 5, 4) and np.all(out == 0) and np.all(lse == -np.inf)


def test_softcap_and_score_mods(rng):
    q, k, v = rng.standard_normal((3, 2, 6, 4)) * 4
    s = np.einsum("hnd,hmd->hnm", q, k) / 2
    capped = 5 * np.tanh(s / 5)
    slopes = ra.scores.alibi_slopes(2)
    dist = np.abs(np.arange(6)[:, None] - np.arange(6)[None, :])
    alibi = -slopes[:, None, None] * dist
    expected = ra.attention(q, k, v, bias=capped - s + alibi)
    got = ra.attention(q, k, v, softcap=5, bias=ra.scores.alibi(2))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    fn = ra.attention(q, k, v, softcap=5,
                      bias=lambda sc, b, h, i, j: sc - slopes[h] * np.abs(i - j))
    np.testing.assert_allclose(fn, got, rtol=1e-14)


def test_relative_bias_table(rng):
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    table = rng.standard_normal((2, 5))          # R = 2
    rel = np.clip(np.arange(5)[:, None] - np.arange(5)[None, :], -2, 2) + 2
    bias = table[:, rel]
    np.testing.assert_allclose(ra.attention(q, k, v, bias=ra.scores.relative_bias(table)),
                               ra.attention(q, k, v, bias=bias), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16, np.int8])
def test_low_precision_inputs_are_upcast(rng, dtype):
    q, k, v = (rng.standard_normal((3, 1, 4, 8)) * 2).astype(dtype)
    out = ra.attention(q, k, v)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ra.attention(*(x.astype(np.float64)
                                                      for x in (q, k, v))))


def test_attention_probs_rows_and_product(rng):
    q, k, v = rng.standard_normal((3, 2, 3, 6, 4))
    p = ra.attention_probs(q, k, mask=ra.masks.sliding_window(2), causal=True)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-14)
    assert np.all(p[..., 0, 1:] == 0)
    np.testing.assert_allclose(p @ v, ra.attention(q, k, v, mask=ra.masks.sliding_window(2),
                                                   causal=True), rtol=1e-13)


def test_batch_dims_broadcast(rng):
    q = rng.standard_normal((2, 3, 1, 5, 4))
    k = rng.standard_normal((3, 1, 6, 4))
    v = rng.standard_normal((1, 1, 1, 6, 2))
    out = ra.attention(q, k, v)
    assert out.shape == (2, 3, 1, 5, 2)
    np.testing.assert_allclose(out[1, 2], ra.attention(q[1, 2], k[2], v[0, 0]), rtol=1e-15)


def test_against_torch_sdpa(rng):
    torch = pytest.importorskip("torch")
    q = rng.standard_normal((2, 4, 33, 16))
    k = rng.standard_normal((2, 2, 47, 16))
    v = rng.standard_normal((2, 2, 47, 8))
    t = [torch.from_numpy(x) for x in (q, k, v)]
    # torch's is_causal is top-left aligned; pass the bottom-right mask explicitly
    keep = ra.masks.causal().materialize(33, 47)
    ref = torch.nn.functional.scaled_dot_product_attention(
        t[0], t[1], t[2], attn_mask=torch.from_numpy(keep), enable_gqa=True).numpy()
    np.testing.assert_allclose(ra.attention(q, k, v, causal=True), ref, rtol=1e-12,
                               atol=1e-13)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_against_flex_attention_with_its_own_mask_mod(rng):
    """A FlexAttention mask_mod and score_mod, unchanged, give FlexAttention's result."""
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 8)

    def score_mod(score, b, h, q_idx, kv_idx):
        # 0.125 * small integers is exact even in torch's default float32 promotion
        return score - 0.125 * (h + 1) * (q_idx - kv_idx)

    q, k, v = rng.standard_normal((3, 1, 2, 40, 16))
    t = [torch.from_numpy(x) for x in (q, k, v)]
    block = flex.create_block_mask(mask_mod, 1, 2, 40, 40, device="cpu")
    try:
        ref = flex.flex_attention(t[0], t[1], t[2], score_mod=score_mod,
                                  block_mask=block).numpy()
    except Exception as exc:  # some CPU builds cannot run flex_attention eagerly
        pytest.skip(f"flex_attention unavailable on this CPU build: {exc}")
    got = ra.attention(q, k, v, mask=mask_mod, bias=score_mod)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


def test_unchecked_nan_inputs_propagate_instead_of_looking_masked(rng):
    q, k, v = rng.standard_normal((3, 1, 6, 4))
    q[0, 2, 1] = np.nan
    for name, fn in [("attention", ra.attention), ("tiled", ra.tiled_attention),
                     ("sparse tiles", lambda *a, **kw: ra.sparse_attention(
                         *a, ra.masks.causal(), method="tiles", **kw)),
                     ("sparse gather", lambda *a, **kw: ra.sparse_attention(
                         *a, ra.masks.causal(), method="gather", **kw))]:
        out, lse = fn(q, k, v, check_finite=False, return_lse=True)
        assert np.isnan(out[0, 2]).all() and np.isnan(lse[0, 2]), name
        assert np.isfinite(np.delete(out, 2, axis=1)).all(), name
    assert np.isnan(ra.attention_probs(q, k, check_finite=False)[0, 2]).all()


def test_zero_query_heads_are_rejected():
    with pytest.raises(ValueError, match="positive multiple of KV heads"):
        ra.attention(np.zeros((0, 5, 8)), np.zeros((1, 5, 8)), np.zeros((1, 5, 8)))
