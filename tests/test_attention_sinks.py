"""Learned attention sinks (gpt-oss; FlashAttention 3's and FlashInfer's ``sinks``): a
logit per query head in the softmax denominator only. The dense, tiled and sparse (tile
and gather) paths against each other, gpt-oss's reference transcribed in torch float64,
flash-linear-attention's naive reference, and the VJP against finite differences."""
import numpy as np
import inspect

import pytest

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=5, dv=3):
    return (rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, m, d)),
            rng.standard_normal((b, hkv, m, dv)))


def _paths(q, k, v, sinks, mask=None, causal=False, **kw):
    """``(out, lse)`` of every path: dense, tiled (two tilings), sparse tiles and gather."""
    yield "dense", ra.attention(q, k, v, mask=mask, causal=causal, sinks=sinks,
                                return_lse=True, **kw)
    for bq, bk in ((3, 4), (5, 2)):
        yield f"tiled {bq}x{bk}", ra.tiled_attention(
            q, k, v, mask=mask, causal=causal, sinks=sinks, return_lse=True, block_q=bq,
            block_k=bk, **kw)
    if mask is not None or causal:
        sparse_mask = mask if mask is not None else ra.masks.causal()
        for method in ("tiles", "gather"):
            yield method, ra.sparse_attention(
                q, k, v, sparse_mask, causal=causal and mask is not None, sinks=sinks,
                return_lse=True, method=method, block_q=3, block_k=4, **kw)


def _sinks(rng, hq=4):
    s = rng.standard_normal(hq) * 2
    s[1] = -np.inf                                       # a head without a sink
    return s


CASES = {
    "plain": {},
    "causal, N != M": dict(causal=True),
    "window + causal": dict(mask=ra.masks.sliding_window(3), causal=True),
    "document": dict(mask=ra.masks.document([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])),
    "softcap + alibi": dict(softcap=1.5, bias=ra.scores.alibi(4), causal=True),
}


@pytest.mark.parametrize("case", CASES)
def test_every_path_agrees(case):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng)
    sinks = _sinks(rng)
    results = dict(_paths(q, k, v, sinks, **CASES[case]))
    ref_out, ref_lse = results.pop("dense")
    for name, (out, lse) in results.items():
        assert max_rel_error(out, ref_out) <= 1e-12, name
        assert max_rel_error(lse, ref_lse) <= 1e-12, name


#: Those passing the sparse engine's options (``**options``, sinks among them) through;
#: sink_attention's own ``sinks`` counts StreamingLLM's sink tokens.
MASK_DEFINED = [s for s in ra.mechanisms().values() if s.mask is not None
                and "sinks" not in s.params and any(
                    p.kind is p.VAR_KEYWORD
                    for p in inspect.signature(s.fn).parameters.values())]


@pytest.mark.parametrize("spec", MASK_DEFINED, ids=lambda s: s.name)
def test_the_mask_defined_mechanisms_take_sinks_in_every_form(spec):
    """Forward, implied matrix and VJP of each mask-defined mechanism equal dense
    attention with the same sinks under the mechanism's own mask."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, n=20, m=20)
    sinks = _sinks(rng)
    params = dict(spec.example, **({"rng": 3} if spec.randomized else {}))
    kw = dict(params, causal=True, sinks=sinks)
    mask = spec.mask(**params)
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=True, sinks=sinks,
                                return_lse=True)
    out, lse = spec.fn(q, k, v, return_lse=True, **kw)
    assert max_rel_error(out, ref) <= 1e-12 and max_rel_error(lse, ref_lse) <= 1e-12
    p = ra.attention_probs(q, k, mask=mask, causal=True, sinks=sinks)
    assert max_rel_error(spec.implied_matrix(q, k, **kw), p) <= 1e-12
    g = rng.standard_normal(out.shape)
    grads = ra.vjp(spec.name, q, k, v, g, **kw)
    dense = ra.vjp("attention", q, k, v, g, mask=mask, causal=True, sinks=sinks)
    for name in ("q", "k", "v", "sinks"):
        assert max_rel_error(grads[name], dense[name]) <= 1e-11, name


def test_no_sink_changes_nothing_bit_for_bit():
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng)
    none = np.full(4, -np.inf)
    for name, (out, lse) in _paths(q, k, v, none, mask=ra.masks.sliding_window(2),
                                   causal=True):
        plain = dict(_paths(q, k, v, None, mask=ra.masks.sliding_window(2), causal=True))
        np.testing.assert_array_equal(out, plain[name][0], err_msg=name)
        np.testing.assert_array_equal(lse, plain[name][1], err_msg=name)


def test_the_sink_takes_its_share_and_empty_rows_keep_it():
    """A row's mass is 1 - P_sink; a row that keeps no key gives 0 with lse s_h (not
    -inf), even for extreme sink logits."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, b=1, n=6, m=6)
    keep = np.ones((6, 6), bool)
    keep[2] = False
    sinks = np.array([800.0, -800.0, 0.0, -np.inf])
    for name, (out, lse) in _paths(q, k, v, sinks, mask=keep):
        assert np.isfinite(out).all(), name
        assert not out[..., 2, :].any(), name
        np.testing.assert_array_equal(lse[0, :3, 2], sinks[:3], err_msg=name)
        assert np.isneginf(lse[0, 3, 2]), name
        assert max_rel_error(lse[0, 0], np.full(6, 800.0)) <= 1e-12      # sink dominates
    p = ra.attention_probs(q, k, mask=keep, sinks=sinks)
    lse = ra.attention(q, k, v, mask=keep, sinks=sinks, return_lse=True)[1]
    with np.errstate(invalid="ignore"):                  # -inf - -inf where masked below
        p_sink = np.exp(np.where(np.isneginf(lse), -np.inf, sinks[:, None] - lse))
    rows = p.sum(-1) + p_sink
    rows[..., 3, 2] += 1.0                                # no key, no sink: nothing
    np.testing.assert_allclose(rows, 1.0, rtol=1e-13)


def _gpt_oss_sdpa(q, k, v, sinks, scale, keep, torch):
    """gpt-oss's reference (``gpt_oss/torch/model.py`` ``sdpa``) in float64: the sink
    logit appended as one more column, softmax, the column dropped."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    qk = scale * q @ k.transpose(-1, -2)
    qk = qk.masked_fill(~keep, float("-inf"))
    s = sinks.reshape(-1, 1, 1).expand(*qk.shape[:-1], 1)
    w = torch.softmax(torch.cat([qk, s], -1), -1)[..., :-1]
    return w @ v, torch.logsumexp(torch.cat([qk, s], -1), -1)


@pytest.mark.parametrize("fn", ["attention", "tiled_attention", "sparse_attention"])
def test_forward_and_gradients_match_gpt_oss_reference_in_torch_float64(fn):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, b=2, hq=6, hkv=2, n=17, m=23, d=8, dv=5)
    sinks = rng.standard_normal(6)
    keep = ra.masks.sliding_window(7).materialize(17, 23)
    g, glse = rng.standard_normal((2, 6, 17, 5)), rng.standard_normal((2, 6, 17))
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    out, lse = _gpt_oss_sdpa(*t, 0.3, torch.tensor(keep), torch)
    loss = (out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum()
    ref = torch.autograd.grad(loss, t)
    kw = dict(mask=keep, scale=0.3, sinks=sinks)
    if fn == "tiled_attention":
        kw.update(block_q=4, block_k=6)
    mine_out, mine_lse = getattr(ra, fn)(q, k, v, return_lse=True, **kw)
    assert max_rel_error(mine_out, out.detach().numpy()) <= 1e-12
    assert max_rel_error(mine_lse, lse.detach().numpy()) <= 1e-12
    mine = ra.vjp(fn, q, k, v, g, grad_lse=glse, **kw)
    for name, r in zip(("q", "k", "v", "sinks"), ref):
        assert mine[name].shape == r.shape
        err = max_rel_error(mine[name], r.numpy(), normwise=True)
        assert err <= 1e-12, f"{fn} d{name}: {err:.2e}"


@pytest.mark.parametrize("causal", [False, True])
def test_matches_flash_linear_attentions_naive_reference(causal):
    """``fla.ops.attn.naive.naive_parallel_attn(..., sink_bias=)`` runs in the inputs'
    dtype, so float64 here."""
    torch = pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.attn.naive")
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=13, m=13, d=8, dv=6)
    sinks = rng.standard_normal(4)
    ref, _ = naive.naive_parallel_attn(
        *(torch.tensor(x).transpose(1, 2) for x in (q, k, v)), scale=0.4, causal=causal,
        sink_bias=torch.tensor(sinks))
    out = ra.attention(q, k, v, causal=causal, scale=0.4, sinks=sinks)
    assert max_rel_error(out, ref.transpose(1, 2).numpy()) <= 1e-12


@pytest.mark.parametrize("fn, kw", [("attention", {}),
                                    ("tiled_attention", dict(block_q=2, block_k=3)),
                                    ("sparse_attention", dict(block_q=2, block_k=3))])
def test_the_vjp_matches_finite_differences(fn, kw):
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=5, m=7, d=3, dv=2)
    k, v = k[:1], v[:1]                                  # broadcast over the batch
    sinks = rng.standard_normal(4)
    mask = ra.masks.sliding_window(3)
    g, glse = rng.standard_normal((2, 4, 5, 2)), rng.standard_normal((2, 4, 5))
    kw = dict(kw, causal=True, mask=mask)
    exact = ra.vjp(fn, q, k, v, g, grad_lse=glse, sinks=sinks, **kw)
    forward = getattr(ra, fn)
    if fn == "sparse_attention":
        kw.pop("mask")
        forward = lambda q, k, v, **a: ra.sparse_attention(q, k, v, mask, **a)  # noqa: E731
    numeric = numerical_vjp(lambda q, k, v, sinks: forward(q, k, v, sinks=sinks,
                                                           return_lse=True, **kw),
                            dict(q=q, k=k, v=v, sinks=sinks), (g, glse))
    for name in numeric:
        assert exact[name].shape == numeric[name].shape
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"{fn} d{name}: {err:.2e}"


def test_backwards_agree_and_rows_without_keys_send_dlse_to_the_sink():
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng)
    keep = np.ones((9, 11), bool)
    keep[4] = False
    sinks = _sinks(rng)
    g, glse = rng.standard_normal((2, 4, 9, 3)), rng.standard_normal((2, 4, 9))
    dense = ra.vjp("attention", q, k, v, g, grad_lse=glse, mask=keep, sinks=sinks)
    for fn, kw in (("tiled_attention", dict(block_q=3, block_k=4)),
                   ("sparse_attention", dict(block_q=2, block_k=5))):
        other = ra.vjp(fn, q, k, v, g, grad_lse=glse, mask=keep, sinks=sinks, **kw)
        for name in ("q", "k", "v", "sinks"):
            assert max_rel_error(other[name], dense[name], normwise=True) <= 1e-12
    assert dense["sinks"][1] == 0.0                       # -inf: no sink, no gradient
    only_row = np.zeros_like(glse)
    only_row[..., 4] = glse[..., 4]
    grads = ra.vjp("attention", q, k, v, np.zeros_like(g), grad_lse=only_row, mask=keep,
                   sinks=sinks)
    expected = only_row[..., 4].sum(0) * np.isfinite(sinks)  # P_sink = 1 on that row
    assert max_rel_error(grads["sinks"], expected) <= 1e-15


def test_varlen_and_layout_calls_equal_per_sequence_calls():
    rng = np.random.default_rng(8)
    cu = np.array([0, 4, 11])
    q, k, v = (rng.standard_normal((11, 4, 3)), rng.standard_normal((11, 2, 3)),
               rng.standard_normal((11, 2, 2)))
    sinks = rng.standard_normal(4)
    g = rng.standard_normal((11, 4, 2))
    packed = ra.attention(q, k, v, sinks=sinks, causal=True, cu_seqlens_q=cu,
                          cu_seqlens_k=cu)
    grads = ra.vjp("attention", q, k, v, g, sinks=sinks, causal=True, cu_seqlens_q=cu,
                   cu_seqlens_k=cu)
    total = 0.0
    for a, b in zip(cu[:-1], cu[1:]):
        one = ra.attention(*(x[None, a:b] for x in (q, k, v)), sinks=sinks, causal=True,
                           layout="bnhd")
        np.testing.assert_array_equal(packed[a:b], one[0])
        total = total + ra.vjp("attention", *(x[None, a:b] for x in (q, k, v, g)),
                               sinks=sinks, causal=True, layout="bnhd")["sinks"]
    assert max_rel_error(grads["sinks"], total) <= 1e-15


def test_bad_sinks_name_themselves_and_the_shapes():
    q, k, v = _inputs(np.random.default_rng(9))
    with pytest.raises(ValueError, match=r"sinks must be .* shape \(Hq,\) = \(4,\); got "
                                         r"shape \(2,\)"):
        ra.attention(q, k, v, sinks=np.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(Hq,\) = \(4,\); got shape \(\)"):
        ra.tiled_attention(q, k, v, sinks=4)               # a count, not logits
    with pytest.raises(ValueError, match="sinks .* nan or \\+inf"):
        ra.sparse_attention(q, k, v, ra.masks.causal(), sinks=[0, np.nan, 0, 0])
    with pytest.raises(TypeError, match="sinks"):
        ra.attention(q, k, v, sinks="zeros")
