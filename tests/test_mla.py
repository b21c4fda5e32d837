"""Multi-head latent attention (DeepSeek-V2): the naive form against the absorbed form,
against a loop oracle and a torch float64 transcription of HuggingFace's
DeepseekV2Attention; decoding with the latent cache against the naive form at every step;
the cache's bytes; the VJP against finite differences and torch autograd."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from conftest import naive_attention
from refattn.exact import (MLACacheState, mla_attention, mla_attention_absorbed,
                           mla_attention_vjp, mla_cache_from, mla_cache_nbytes,
                           mla_init_state, mla_step)
from refattn.streaming import state_size_table
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

NAMES = ("q_nope", "q_rope", "c_kv", "k_rope", "w_uk", "w_uv")


def _inputs(rng, *, batch=(2,), h=3, n=5, m=7, d_nope=4, d_rope=2, d_c=6, d_v=3,
            batch_k=None):
    """MLA inputs, weights scaled by 1/sqrt(d_c) so that logits stay of order one."""
    bk = batch if batch_k is None else batch_k
    return dict(q_nope=rng.standard_normal(batch + (h, n, d_nope)),
                q_rope=rng.standard_normal(batch + (h, n, d_rope)),
                c_kv=rng.standard_normal(bk + (m, d_c)),
                k_rope=rng.standard_normal(bk + (m, d_rope)),
                w_uk=rng.standard_normal((h, d_nope, d_c)) / np.sqrt(d_c),
                w_uv=rng.standard_normal((h, d_v, d_c)) / np.sqrt(d_c))


def _expand(x):
    """Per-head q, k, v written with einsum, independently of refattn.exact.mla."""
    h, m = x["w_uk"].shape[0], x["c_kv"].shape[-2]
    k_nope = np.einsum("...mc,hdc->...hmd", x["c_kv"], x["w_uk"])
    k_rope = np.broadcast_to(x["k_rope"][..., None, :, :],
                             k_nope.shape[:-3] + (h, m, x["k_rope"].shape[-1]))
    return (np.concatenate([x["q_nope"], x["q_rope"]], -1),
            np.concatenate([k_nope, k_rope], -1),
            np.einsum("...mc,hvc->...hmv", x["c_kv"], x["w_uv"]))


CASES = {
    "plain": dict(),
    "causal, N < M": dict(causal=True),
    "causal, N > M (empty rows)": dict(causal=True, n=9, m=6),
    "top-left causal": dict(causal="top_left"),
    "window + sinks": dict(mask=ra.masks.sliding_window(2) | ra.masks.sinks(1),
                           causal=True),
    "softcap + scale": dict(softcap=1.3, scale=0.9, causal=True),
    "array bias": dict(bias="array"),
    "alibi": dict(bias=ra.scores.alibi(3), causal=True),
    "broadcast latents": dict(batch_k=(1,)),
    "unbatched latents": dict(batch_k=()),
}


def _case(name, rng):
    kw = dict(CASES[name])
    sizes = {key: kw.pop(key) for key in ("n", "m", "batch_k") if key in kw}
    x = _inputs(rng, **sizes)
    if isinstance(kw.get("bias"), str):
        kw["bias"] = rng.standard_normal((3, x["q_nope"].shape[-2], x["c_kv"].shape[-2]))
    return x, kw


@pytest.mark.parametrize("case", CASES)
def test_absorbed_form_equals_naive_form(case):
    x, kw = _case(case, np.random.default_rng(0))
    out, lse = mla_attention(**x, return_lse=True, **kw)
    absorbed, absorbed_lse = mla_attention_absorbed(**x, return_lse=True, **kw)
    assert out.shape == x["q_nope"].shape[:-1] + (3,)
    assert max_rel_error(absorbed, out) <= 1e-12
    assert max_rel_error(absorbed_lse, lse) <= 1e-12
    latent = mla_attention_absorbed(**dict(x, w_uv=None), **kw)      # FlashMLA's output
    assert latent.shape == x["q_nope"].shape[:-1] + (6,)
    assert max_rel_error(latent @ np.swapaxes(x["w_uv"], -1, -2), out) <= 1e-12
    if "N > M" in case:
        assert not out[..., :3, :].any() and np.isneginf(lse[..., :3]).all()


@pytest.mark.parametrize("case", ["plain", "window + sinks", "array bias"])
def test_naive_form_equals_a_loop_oracle(case):
    x, kw = _case(case, np.random.default_rng(1))
    out, lse = mla_attention(**x, return_lse=True, **kw)
    q, k, v = _expand(x)
    n, m = q.shape[-2], k.shape[-2]
    keep = np.ones((3, n, m), bool)
    if "mask" in kw:
        keep &= (kw["mask"] & ra.masks.causal()).materialize(n, m)
    bias = kw.get("bias")
    for b in range(q.shape[0]):
        ref_out, ref_lse = naive_attention(q[b], k[b], v[b], keep, bias=bias)
        assert max_rel_error(out[b], ref_out) <= 1e-12
        assert max_rel_error(lse[b], ref_lse) <= 1e-12


@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_absorbed_equals_naive_on_random_shapes(data, seed):
    draw = data.draw
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    batch_k = draw(st.sampled_from([batch, batch[1:], tuple(1 for _ in batch)]))
    sizes = dict(h=draw(st.integers(1, 4)), n=draw(st.integers(1, 6)),
                 m=draw(st.integers(1, 7)), d_nope=draw(st.integers(1, 5)),
                 d_rope=draw(st.integers(1, 3)), d_c=draw(st.integers(1, 9)),
                 d_v=draw(st.integers(1, 4)))
    x = _inputs(np.random.default_rng(seed), batch=batch, batch_k=batch_k, **sizes)
    causal = draw(st.booleans())
    out, lse = mla_attention(**x, causal=causal, return_lse=True)
    absorbed, absorbed_lse = mla_attention_absorbed(**x, causal=causal, return_lse=True)
    assert max_rel_error(absorbed, out) <= 1e-12
    assert max_rel_error(absorbed_lse, lse) <= 1e-12


def test_bnhd_layout_moves_queries_and_output_only():
    x = _inputs(np.random.default_rng(2))
    ref, lse = mla_attention(**x, causal=True, return_lse=True)
    moved = dict(x, q_nope=np.swapaxes(x["q_nope"], -3, -2),
                 q_rope=np.swapaxes(x["q_rope"], -3, -2))
    for fn in (mla_attention, mla_attention_absorbed):
        out, out_lse = fn(**moved, causal=True, return_lse=True, layout="bnhd")
        assert max_rel_error(np.swapaxes(out, -3, -2), ref) <= 1e-12
        assert max_rel_error(out_lse, lse) <= 1e-12


# ------------------------------------------------ HuggingFace DeepseekV2Attention
def _hf_deepseek_v2(torch, hidden, w, *, heads, d_nope, d_rope, d_c, d_v, theta=10000.0,
                    eps=1e-6):
    """HuggingFace's ``DeepseekV2Attention.forward`` (``q_lora_rank=None``, eager, no
    cache, dropout 0) transcribed in torch float64 up to ``o_proj``, with its complex
    (interleaved-pair) RoPE. Returns the attention output ``(B, H, S, d_v)`` and the
    tensors MLA's oracle takes."""
    b, s, _ = hidden.shape
    q = (hidden @ w["q_proj"].T).view(b, s, heads, d_nope + d_rope).transpose(1, 2)
    q_nope, q_pe = torch.split(q, [d_nope, d_rope], dim=-1)
    compressed = hidden @ w["kv_a_proj_with_mqa"].T
    k_nope, k_pe = torch.split(compressed, [d_c, d_rope], dim=-1)
    latent = w["kv_a_layernorm"] * (k_nope * torch.rsqrt(
        k_nope.pow(2).mean(-1, keepdim=True) + eps))                  # DeepseekV2RMSNorm
    kv = (latent @ w["kv_b_proj"].T).view(b, s, heads, d_nope + d_v).transpose(1, 2)
    k_nope, value = torch.split(kv, [d_nope, d_v], dim=-1)
    k_pe = k_pe.view(b, 1, s, d_rope)
    inv_freq = 1.0 / theta ** (torch.arange(0, d_rope, 2, dtype=torch.float64) / d_rope)
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)          # (S, d_rope / 2)

    def rotate(x):                                                   # apply_rotary_emb
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * freqs_cis).flatten(3)

    q_pe, k_pe = rotate(q_pe), rotate(k_pe)
    query = torch.cat((q_nope, q_pe), dim=-1)
    key = torch.cat((k_nope, k_pe.expand(*k_nope.shape[:-1], -1)), dim=-1)
    scaling = (d_nope + d_rope) ** -0.5
    causal = torch.full((s, s), torch.finfo(torch.float64).min,
                        dtype=torch.float64).triu(1)
    weights = torch.softmax(query @ key.transpose(2, 3) * scaling + causal, dim=-1)
    return weights @ value, dict(q_nope=q_nope, q_rope=q_pe, c_kv=latent, k_rope=k_pe[:, 0])


def test_naive_form_matches_huggingface_deepseek_v2_in_float64():
    torch = pytest.importorskip("torch")
    heads, d_nope, d_rope, d_c, d_v, hidden_size = 4, 16, 8, 32, 12, 48
    rng = np.random.default_rng(3)

    def linear(out_features, in_features):
        return torch.tensor(rng.standard_normal((out_features, in_features))
                            / np.sqrt(in_features))

    w = {"q_proj": linear(heads * (d_nope + d_rope), hidden_size),
         "kv_a_proj_with_mqa": linear(d_c + d_rope, hidden_size),
         "kv_a_layernorm": torch.tensor(1 + 0.1 * rng.standard_normal(d_c)),
         "kv_b_proj": linear(heads * (d_nope + d_v), d_c)}
    hidden = torch.tensor(rng.standard_normal((2, 11, hidden_size)))
    ref, inputs = _hf_deepseek_v2(torch, hidden, w, heads=heads, d_nope=d_nope,
                                  d_rope=d_rope, d_c=d_c, d_v=d_v)
    kv_b = w["kv_b_proj"].view(heads, d_nope + d_v, d_c).numpy()   # (H, d_nope + d_v, d_c)
    x = {name: t.numpy() for name, t in inputs.items()}
    x.update(w_uk=kv_b[:, :d_nope], w_uv=kv_b[:, d_nope:])
    for fn in (mla_attention, mla_attention_absorbed):
        out = fn(**x, causal=True)                  # default scale = HF's scaling
        assert max_rel_error(out, ref.numpy()) <= 1e-12, fn.__name__
    # the cache holds 576 = 512 + 64 numbers per token in DeepSeek-V2; here d_c + d_rope
    s = mla_cache_from(x["c_kv"], x["k_rope"], w_uk=x["w_uk"], w_uv=x["w_uv"])
    assert s.nbytes == 2 * 11 * (d_c + d_rope) * 8


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("batch", [(), (2,), (2, 1)])
def test_decoding_equals_the_causal_naive_form_at_every_step(batch):
    x = _inputs(np.random.default_rng(4), batch=batch, n=9, m=9)
    ref = mla_attention(**x, causal=True)
    state = mla_init_state(w_uk=x["w_uk"], w_uv=x["w_uv"], d_rope=2, batch_shape=batch)
    per_token = int(np.prod(batch, dtype=np.int64)) * (6 + 2) * 8
    for t in range(9):
        out, new = mla_step(state, x["q_nope"][..., t, :], x["q_rope"][..., t, :],
                            x["c_kv"][..., t, :], x["k_rope"][..., t, :])
        assert max_rel_error(out, ref[..., t, :]) <= 1e-12, t
        assert new.position == t + 1 and state.position == t        # the old state stays
        assert state.c_kv.shape[-2] == t and new.c_kv.shape[-2] == t + 1
        assert new.nbytes == new.nbytes_after(t + 1) == (t + 1) * per_token
        state = new
    assert isinstance(state, MLACacheState)


def test_decoding_after_a_prefill_is_bottom_right_causal():
    x = _inputs(np.random.default_rng(5), n=10, m=10)
    ref = mla_attention(**{k: (v[..., 7:, :] if k.startswith("q") else v)
                           for k, v in x.items()}, causal=True)          # N = 3 < M = 10
    state = mla_cache_from(x["c_kv"][:, :7], x["k_rope"][:, :7], w_uk=x["w_uk"],
                           w_uv=x["w_uv"])
    for i, t in enumerate(range(7, 10)):
        out, state = mla_step(state, x["q_nope"][..., t, :], x["q_rope"][..., t, :],
                              x["c_kv"][:, t], x["k_rope"][:, t])
        assert max_rel_error(out, ref[..., i, :]) <= 1e-12


def test_decoding_with_deepseek_v2_sizes_and_a_given_scale():
    """d_c = 512, d_rope = 64, d_nope = 128: the 576-wide latent cache."""
    rng = np.random.default_rng(6)
    x = _inputs(rng, batch=(1,), h=2, n=3, m=3, d_nope=128, d_rope=64, d_c=512, d_v=128)
    scale = 0.1
    ref = mla_attention(**x, causal=True, scale=scale)
    state = mla_init_state(w_uk=x["w_uk"], w_uv=x["w_uv"], d_rope=64, batch_shape=(1,),
                           scale=scale)
    for t in range(3):
        out, state = mla_step(state, x["q_nope"][..., t, :], x["q_rope"][..., t, :],
                              x["c_kv"][:, t], x["k_rope"][:, t])
        assert max_rel_error(out, ref[..., t, :]) <= 1e-12
    assert state.nbytes == 3 * 576 * 8 == mla_cache_nbytes(3)
    assert state.nbytes_after(10**6) == 10**6 * 576 * 8


def test_the_state_table_puts_mla_beside_mha_gqa_and_mqa():
    t = state_size_table((1_000, 16_000), heads_q=128, heads_kv=8, d=128, dv=128)
    assert list(t)[:4] == ["attention", "attention_mha", "attention_mqa", "mla_attention"]
    assert t["mla_attention"][1_000] == 1_000 * (512 + 64) * 8
    assert t["mla_attention"][16_000] == 16 * t["mla_attention"][1_000]
    assert t["attention_mha"][1_000] == 1_000 * 128 * 2 * 128 * 8        # 2·n_h·d_h
    assert t["attention"][1_000] == 1_000 * 8 * 2 * 128 * 8              # GQA, 8 groups
    assert t["attention_mqa"][1_000] == 1_000 * 2 * 128 * 8
    # DeepSeek-V2 §2.1.4: MLA's cache equals GQA's with only 2.25 groups (4.5·d_h)
    assert 4 * t["mla_attention"][1_000] == 9 * t["attention_mqa"][1_000]
    small = state_size_table((10,), batch_shape=(3,), heads_q=2, heads_kv=1, d=4, dv=4,
                             mla_latent=16, mla_rope=4)
    assert small["mla_attention"][10] == 3 * 10 * 20 * 8


# ------------------------------------------------------------------ gradients
GRAD_CASES = {
    "causal, N < M": dict(causal=True),
    "causal, N > M": dict(causal=True, n=6, m=4),
    "top-left causal": dict(causal="top_left"),
    "window + softcap + scale": dict(mask=ra.masks.sliding_window(2), causal=True,
                                     softcap=1.5, scale=0.8),
    "array bias": dict(bias="array"),
    "broadcast latents": dict(batch_k=(1,)),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_vjp_matches_finite_differences(case):
    rng = np.random.default_rng(7)
    kw = dict(GRAD_CASES[case])
    sizes = {key: kw.pop(key) for key in ("n", "m", "batch_k") if key in kw}
    x = _inputs(rng, h=2, **dict(dict(n=4, m=5, d_nope=3, d_c=4, d_v=2), **sizes))
    if kw.get("bias") == "array":
        kw["bias"] = rng.standard_normal((2, 4, 5))
    out, lse = mla_attention(**x, return_lse=True, **kw)
    g, glse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    glse[np.isneginf(lse)] = 0.0                         # empty rows: no lse cotangent
    exact = ra.vjp(mla_attention, *(x[n] for n in NAMES), g, grad_lse=glse, **kw)
    inputs = dict(x, bias=kw.pop("bias")) if "bias" in kw else x
    numeric = numerical_vjp(lambda **a: mla_attention(**a, return_lse=True, **kw),
                            inputs, (g, glse))
    for name in inputs:
        assert exact[name].shape == np.shape(inputs[name]), name
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


def test_vjp_in_the_bnhd_layout():
    rng = np.random.default_rng(8)
    x = _inputs(rng, h=2, n=3, m=4, d_nope=3, d_c=4, d_v=2)
    moved = dict(x, q_nope=np.swapaxes(x["q_nope"], -3, -2),
                 q_rope=np.swapaxes(x["q_rope"], -3, -2))
    g = rng.standard_normal((2, 3, 2, 2))                          # (B, N, H, d_v)
    grads = mla_attention_vjp(*(moved[n] for n in NAMES), g, causal=True, layout="bnhd")
    ref = mla_attention_vjp(*(x[n] for n in NAMES), np.swapaxes(g, -3, -2), causal=True)
    for name in NAMES:
        mine = np.swapaxes(grads[name], -3, -2) if name.startswith("q") else grads[name]
        assert max_rel_error(mine, ref[name], normwise=True) <= 1e-13, name


def _torch_mla(torch, q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, keep, scale, softcap):
    """MLA's naive form in torch float64, written independently of refattn."""
    heads = w_uk.shape[0]
    k_nope = torch.einsum("bmc,hdc->bhmd", c_kv, w_uk)
    k = torch.cat([k_nope, k_rope[:, None].expand(-1, heads, -1, -1)], dim=-1)
    v = torch.einsum("bmc,hvc->bhmv", c_kv, w_uv)
    s = scale * torch.cat([q_nope, q_rope], dim=-1) @ k.transpose(-1, -2)
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                  # empty rows -> 0
    return p @ v, torch.logsumexp(s, dim=-1)


def test_vjp_matches_torch_autograd_in_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x = _inputs(rng, batch=(2,), h=4, n=13, m=17, d_nope=8, d_rope=4, d_c=16, d_v=6)
    g, glse = rng.standard_normal((2, 4, 13, 6)), rng.standard_normal((2, 4, 13))
    keep = ra.masks.sliding_window(5, right=1).materialize(13, 17)
    keep[3] = False                                               # a row that keeps no key
    glse[..., 3] = 0.0
    tensors = {n: torch.tensor(x[n], requires_grad=True) for n in NAMES}
    out, lse = _torch_mla(torch, *tensors.values(), keep=torch.tensor(keep), scale=0.4,
                          softcap=2.5)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum()
    ref = torch.autograd.grad(loss, tuple(tensors.values()))
    mine = mla_attention_vjp(*(x[n] for n in NAMES), g, grad_lse=glse, mask=keep, scale=0.4,
                             softcap=2.5)
    assert not mine["q_nope"][..., 3, :].any()
    for name, r in zip(NAMES, ref):
        err = max_rel_error(mine[name], r.numpy(), normwise=True)
        assert err <= 1e-12, f"d{name}: {err:.2e}"


# ------------------------------------------------------------------ bad input
def test_bad_shapes_name_the_argument_and_the_shapes():
    x = _inputs(np.random.default_rng(10))           # H 3, N 5, M 7, d 4 / 2, d_c 6, d_v 3
    bad = {
        "q_rope": (np.zeros((2, 3, 4, 2)), r"q_nope and q_rope must share every dimension "
                                           r"but the last; got q_nope \(2, 3, 5, 4\), "
                                           r"q_rope \(2, 3, 4, 2\)"),
        "k_rope": (np.zeros((2, 6, 2)), r"k_rope must be \(\.\.\., M, d_rope\) with M = 7 "
                                        r"of c_kv \(2, 7, 6\) and d_rope = 2 of q_rope; "
                                        r"got k_rope \(2, 6, 2\)"),
        "w_uk": (np.zeros((3, 6, 4)), r"w_uk must have shape \(H, d_nope, d_c\) = "
                                      r"\(3, 4, 6\).*got w_uk \(3, 6, 4\)"),
        "w_uv": (np.zeros((2, 3, 6)), r"w_uv must have shape \(H, d_v, d_c\) with H = 3.*"
                                      r"got w_uv \(2, 3, 6\)"),
        "c_kv": (np.zeros(6), r"c_kv must be \(\.\.\., M, d_c\), got shape \(6,\)"),
        "q_nope": (np.zeros((5, 4)), r"q_nope must be \(\.\.\., H, N, d\), got shape "
                                     r"\(5, 4\)"),
    }
    for name, (value, message) in bad.items():
        for fn in (mla_attention, mla_attention_absorbed):
            with pytest.raises(ValueError, match=message):
                fn(**dict(x, **{name: value}))
    with pytest.raises(ValueError, match=r"k_rope must be .* d_rope = 2 of q_rope; got "
                                         r"k_rope \(2, 7, 3\)"):
        mla_attention(**dict(x, k_rope=np.zeros((2, 7, 3))))
    with pytest.raises(ValueError, match=r"batch dimensions of q_nope \(2, 3, 5, 4\), "
                                         r"c_kv \(3, 7, 6\) and k_rope \(3, 7, 2\) do "
                                         r"not broadcast"):
        mla_attention(**dict(x, c_kv=np.zeros((3, 7, 6)), k_rope=np.zeros((3, 7, 2))))
    with pytest.raises(ValueError, match="layout must be one of"):
        mla_attention(**x, layout="nhd")
    with pytest.raises(ValueError, match=r"c_kv \(2, 7, 6\) contains non-finite"):
        mla_attention(**dict(x, c_kv=np.full((2, 7, 6), np.nan)))
    with pytest.raises(TypeError, match="w_uk must have a real numeric dtype"):
        mla_attention(**dict(x, w_uk=x["w_uk"].astype(complex)))
    with pytest.raises(TypeError, match="w_uv must be an array"):
        mla_attention(**dict(x, w_uv=None))
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 3, 5, 3\), got \(2, 3, 5, 2\)"):
        mla_attention_vjp(*(x[n] for n in NAMES), np.zeros((2, 3, 5, 2)))


def test_bad_decoding_inputs_name_the_argument():
    x = _inputs(np.random.default_rng(11))
    with pytest.raises(ValueError, match=r"w_uk and w_uv must have shapes .* got w_uk "
                                         r"\(3, 4, 6\), w_uv \(3, 3, 5\)"):
        mla_init_state(w_uk=x["w_uk"], w_uv=np.zeros((3, 3, 5)), d_rope=2)
    with pytest.raises(ValueError, match="d_rope must be an integer >= 0"):
        mla_init_state(w_uk=x["w_uk"], w_uv=x["w_uv"], d_rope=-1)
    with pytest.raises(ValueError, match=r"c_kv and k_rope must have shapes .* got c_kv "
                                         r"\(2, 7, 6\), k_rope \(2, 6, 2\)"):
        mla_cache_from(x["c_kv"], x["k_rope"][:, :6], w_uk=x["w_uk"], w_uv=x["w_uv"])
    s = mla_init_state(w_uk=x["w_uk"], w_uv=x["w_uv"], d_rope=2, batch_shape=(2,))
    good = (np.zeros((2, 3, 4)), np.zeros((2, 3, 2)), np.zeros((2, 6)), np.zeros((2, 2)))
    names = ("q_nope_t", "q_rope_t", "c_kv_t", "k_rope_t")
    for i, name in enumerate(names):
        wrong = list(good)
        wrong[i] = np.zeros(good[i].shape[:-1] + (good[i].shape[-1] + 1,))
        with pytest.raises(ValueError, match=rf"{name} must have shape "
                                             rf"\({', '.join(map(str, good[i].shape))}\)"):
            mla_step(s, *wrong)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        mla_cache_nbytes(-1)


def test_registered_with_its_own_inputs_and_forms():
    spec = ra.mechanisms(all_inputs=True)["mla_attention"]
    assert "mla_attention" not in ra.mechanisms()       # the q, k, v tests cannot call it
    assert spec.inputs == NAMES and spec.fn is mla_attention
    assert spec.vjp is mla_attention_vjp and spec.supports_streaming
    with pytest.raises(TypeError, match="unknown keyword"):
        spec.init_state(w_uk=np.zeros((2, 3, 4)), w_uv=None, d_rope=2, windw=3)
