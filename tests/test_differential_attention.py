"""Differential attention (Ye et al. 2024): ``(softmax(Q1 K1ᵀ s) - λ softmax(Q2 K2ᵀ s)) V``
with q and k split in halves along D. Its dense, tiled and sparse paths against each
other, a torch float64 transcription of the paper's code (``multihead_flashdiff_1``
with FlashAttention replaced by a softmax), and its VJP against finite differences."""
import numpy as np
import pytest

import refattn as ra
from refattn.exact import differential_attention
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=6, dv=3):
    return (rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, m, d)),
            rng.standard_normal((b, hkv, m, dv)))


CASES = {
    "plain": {},
    "causal, N != M": dict(causal=True),
    "window + causal": dict(mask=ra.masks.sliding_window(3), causal=True),
    "document + softcap": dict(mask=ra.masks.document([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
                               softcap=1.5),
    "alibi + scale": dict(bias=ra.scores.alibi(4), causal=True, scale=0.4),
}


@pytest.mark.parametrize("case", CASES)
def test_every_path_agrees_and_is_the_difference_of_two_attentions(case):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng)
    lam = np.array([0.2, 0.5, 0.8, 1.1])
    kw = dict(CASES[case])
    ref = differential_attention(q, k, v, lam=lam, method="dense", **kw)
    paths = [dict(method="tiled"), dict(method="tiled", block_q=3, block_k=4)]
    if "mask" in kw or kw.get("causal"):
        paths += [dict(method="sparse"), dict(method="sparse", block_q=2, block_k=5)]
    for path in paths:
        out = differential_attention(q, k, v, lam=lam, **path, **kw)
        assert max_rel_error(out, ref) <= 1e-12, path
    kw.setdefault("scale", 1 / np.sqrt(3))               # 1/sqrt(d), d = D/2 = 3
    two = (ra.attention(q[..., :3], k[..., :3], v, **kw)
           - lam[:, None, None] * ra.attention(q[..., 3:], k[..., 3:], v, **kw))
    assert max_rel_error(ref, two) <= 1e-12


def test_lambda_zero_is_the_first_map_and_odd_d_splits_ceil():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, d=6)
    np.testing.assert_allclose(differential_attention(q, k, v, lam=0.0, causal=True),
                               ra.attention(q[..., :3], k[..., :3], v, causal=True,
                                            scale=1 / np.sqrt(3)), rtol=1e-13, atol=1e-15)
    q, k, v = _inputs(rng, d=5)
    s = np.sqrt(2 / 5)
    expected = (ra.attention(q[..., :3], k[..., :3], v, scale=s)
                - 0.5 * ra.attention(q[..., 3:], k[..., 3:], v, scale=s))
    assert max_rel_error(differential_attention(q, k, v, lam=0.5), expected) <= 1e-12
    q, k, v = _inputs(rng, d=1)                             # second map: logits 0
    uniform = np.repeat(v, 2, axis=1).mean(-2, keepdims=True)
    expected = ra.attention(q, k, v, scale=np.sqrt(2)) - 0.5 * uniform
    assert max_rel_error(differential_attention(q, k, v, lam=0.5), expected) <= 1e-12


def _torch_flashdiff(x_q, x_k, x_v, lam, *, heads, kv_heads, causal, torch):
    """``multihead_flashdiff_1.forward`` from the paper's code (projections, RoPE,
    RMSNorm and the (1 - λ_init) factor removed; ``flash_attn_func`` as a softmax) on
    ``(B, T, H·2d)`` projected tensors, in float64."""
    bsz, tgt, _ = x_q.shape
    src = x_k.shape[1]
    hd = x_q.shape[-1] // heads // 2
    q = x_q.reshape(bsz, tgt, heads, 2, hd)
    k = x_k.reshape(bsz, src, kv_heads, 2, hd)
    v = x_v.reshape(bsz, src, kv_heads, 2 * hd)

    def flash(q, k, v):                                   # (B, T, H, d) FlashAttention API
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
        if causal:
            keep = torch.ones(tgt, src, dtype=torch.bool).tril(src - tgt)
            s = s.masked_fill(~keep, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)

    attn1 = flash(q[:, :, :, 0], k[:, :, :, 0], v)
    attn2 = flash(q[:, :, :, 1], k[:, :, :, 1], v)
    return attn1 - lam * attn2                            # (B, T, H, 2d)


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
def test_matches_the_papers_code_in_torch_float64_with_gradients(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    heads, kv_heads, hd, n = 4, 2, 3, 12
    x_q = rng.standard_normal((2, n, heads * 2 * hd))
    x_k, x_v = rng.standard_normal((2, 2, n, kv_heads * 2 * hd))
    lam = 0.65
    g = rng.standard_normal((2, n, heads, 2 * hd))
    t = [torch.tensor(x, requires_grad=True) for x in (x_q, x_k, x_v)]
    tl = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    out = _torch_flashdiff(*t, tl, heads=heads, kv_heads=kv_heads, causal=True, torch=torch)
    ref = torch.autograd.grad((out * torch.tensor(g)).sum(), t + [tl])
    # refattn's layout: (B, H, T, 2d) with the two maps as the halves of each head
    q = x_q.reshape(2, n, heads, 2 * hd).transpose(0, 2, 1, 3)
    k = x_k.reshape(2, n, kv_heads, 2 * hd).transpose(0, 2, 1, 3)
    v = x_v.reshape(2, n, kv_heads, 2 * hd).transpose(0, 2, 1, 3)
    kw = dict(lam=lam, causal=True, method=method, block_q=5, block_k=4)
    mine = differential_attention(q, k, v, **kw)
    assert max_rel_error(mine, out.detach().numpy().transpose(0, 2, 1, 3)) <= 1e-12
    grads = ra.vjp("differential_attention", q, k, v, g.transpose(0, 2, 1, 3), **kw)
    back = {name: grads[name].transpose(0, 2, 1, 3).reshape(r.shape)
            for name, r in zip("qkv", ref)}
    back["lam"] = grads["lam"]
    for name, r in zip(("q", "k", "v", "lam"), ref):
        err = max_rel_error(back[name], r.numpy(), normwise=True)
        assert err <= 1e-12, f"{method} d{name}: {err:.2e}"


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
@pytest.mark.parametrize("lam", [0.7, "per head"])
def test_the_vjp_matches_finite_differences(method, lam):
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=5, m=7, d=4, dv=2)
    k, v = k[:1], v[:1]                                     # broadcast over the batch
    lam = rng.uniform(0.2, 0.9, 4) if lam == "per head" else lam
    bias = rng.standard_normal((4, 5, 7))
    g = rng.standard_normal((2, 4, 5, 2))
    kw = dict(method=method, mask=ra.masks.sliding_window(4), causal=True, softcap=2.0,
              block_q=2, block_k=3)
    exact = ra.vjp("differential_attention", q, k, v, g, lam=lam, bias=bias, **kw)
    numeric = numerical_vjp(lambda q, k, v, lam, bias: differential_attention(
        q, k, v, lam=lam, bias=bias, **kw), dict(q=q, k=k, v=v, lam=lam, bias=bias), g)
    for name in numeric:
        assert exact[name].shape == np.shape(numeric[name])
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


def test_registry_entry_and_implied_matrix():
    spec = ra.mechanisms()["differential_attention"]
    assert not spec.row_stochastic and spec.supports_mask and spec.vjp is not None
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng)
    a = spec.implied_matrix(q, k, lam=0.3, causal=True)
    rows = a.sum(-1)
    np.testing.assert_allclose(rows, 0.7, rtol=1e-13)               # rows sum to 1 - λ
    assert max_rel_error(a @ np.repeat(v, 2, axis=1),
                         differential_attention(q, k, v, lam=0.3, causal=True)) <= 1e-12


def test_bad_arguments_name_themselves_and_the_shapes():
    q, k, v = _inputs(np.random.default_rng(5))
    with pytest.raises(ValueError, match=r"lam must be .* shape \(Hq,\) = \(4,\); got "
                                         r"shape \(2,\)"):
        differential_attention(q, k, v, lam=np.ones(2))
    with pytest.raises(ValueError, match="lam .*non-finite"):
        differential_attention(q, k, v, lam=np.inf)
    with pytest.raises(ValueError, match=r"q and k must share the last dimension D; got "
                                         r"q \(2, 4, 9, 6\), k \(2, 2, 11, 4\)"):
        differential_attention(q, k[..., :4], v, lam=0.5)
    with pytest.raises(ValueError, match="method='sparse'.*mask= or causal=True"):
        differential_attention(q, k, v, lam=0.5, method="sparse")
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape"):
        ra.vjp("differential_attention", q, k, v, np.zeros((2, 4, 9, 2)), lam=0.5)
    with pytest.raises(TypeError, match="lam"):
        differential_attention(q, k, v)
