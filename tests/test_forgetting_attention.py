"""Forgetting attention (FoX, Lin et al. 2025): softmax attention biased by cumulative log
forget gates. Its dense, tiled and sparse paths against each other and against exact
attention with the bias written out, flash-linear-attention's naive references, a torch
float64 autograd transcription, and its VJP against finite differences."""
import numpy as np
import pytest

import refattn as ra
from refattn.exact import forgetting_attention
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=5, dv=3):
    return (rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, m, d)),
            rng.standard_normal((b, hkv, m, dv)))


def _log_f(rng, shape, low=0.2):
    return np.log(rng.uniform(low, 1.0, shape))


def _bias(log_f, n):
    """``Σ_{l=j+1..i'} log f_l`` written out, ``(..., H, N, M)``."""
    c = np.cumsum(log_f, -1)
    m = log_f.shape[-1]
    return c[..., m - n:, None] - c[..., None, :]


CASES = {
    "plain": {},
    "window": dict(mask=ra.masks.sliding_window(3)),
    "document + softcap": dict(mask=ra.masks.document([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
                               softcap=1.5),
    "sinks": dict(sinks=np.array([0.5, -np.inf, -1.0, 2.0])),
}


@pytest.mark.parametrize("case", CASES)
def test_every_path_equals_attention_with_the_bias_written_out(case):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng)
    log_f = _log_f(rng, (2, 4, 11))
    kw = CASES[case]
    ref, ref_lse = ra.attention(q, k, v, causal=True, bias=_bias(log_f, 9), return_lse=True,
                                **kw)
    for method, blocks in (("dense", {}), ("tiled", dict(block_q=3, block_k=4)),
                           ("tiled", dict(block_q=5, block_k=2)), ("sparse", {}),
                           ("sparse", dict(block_q=2, block_k=3))):
        out, lse = forgetting_attention(q, k, v, log_f=log_f, method=method,
                                        return_lse=True, **blocks, **kw)
        assert max_rel_error(out, ref) <= 1e-12, method
        assert max_rel_error(lse, ref_lse) <= 1e-12, method
    bias = ra.exact.forgetting.forget_gate_bias(log_f, q.shape, k.shape)
    gathered = ra.sparse_attention(q, k, v, kw.get("mask", ra.masks.causal()), causal=True,
                                   method="gather", bias=bias,
                                   **{x: y for x, y in kw.items() if x != "mask"})
    assert max_rel_error(gathered, ref) <= 1e-12


def test_gates_of_one_give_causal_attention_and_broadcast():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, b=3, n=7, m=7)
    np.testing.assert_allclose(forgetting_attention(q, k, v, log_f=0.0),
                               ra.attention(q, k, v, causal=True), rtol=1e-13, atol=1e-15)
    per_head = _log_f(rng, (4, 1))                       # one gate per head for every token
    full = np.broadcast_to(per_head, (3, 4, 7))
    assert max_rel_error(forgetting_attention(q, k, v, log_f=per_head),
                         forgetting_attention(q, k, v, log_f=full)) <= 1e-14
    # a constant gate is ALiBi-like decay log f · (i - j)
    decay = np.log(0.9) * np.subtract.outer(np.arange(7), np.arange(7))
    assert max_rel_error(forgetting_attention(q, k, v, log_f=np.log(0.9)),
                         ra.attention(q, k, v, causal=True, bias=decay)) <= 1e-13


def test_the_prefix_sums_are_compensated_at_long_lengths():
    """With log f = -0.1 the bias is -0.1 (i - j) exactly; plain float64 prefix sums of
    3000 gates carry their rounding (~|c| eps per sum) into the logits, the compensated
    ones do not. (Plain np.cumsum misses the bound, checked below: the test can fail.)"""
    rng = np.random.default_rng(2)
    n, lf = 3000, -0.1
    q, k, v = rng.standard_normal((3, 1, n, 4))
    distance = np.subtract.outer(np.arange(n), np.arange(n)).astype(float)
    ref = ra.attention(q, k, v, causal=True, bias=lf * distance)
    out = forgetting_attention(q, k, v, log_f=np.full(n, lf))
    assert max_rel_error(out, ref) <= 1e-14
    plain = ra.attention(q, k, v, causal=True, bias=_bias(np.full((1, n), lf), n))
    assert max_rel_error(plain, ref) > 1e-13


def _torch_forgetting(q, k, v, log_f, sinks, *, keep, scale, torch):
    """Forgetting attention in torch float64, written from the paper: logits plus
    cumulative log gates (bottom-right positions), the sink appended as a column."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    n, m = q.shape[-2], k.shape[-2]
    c = torch.cumsum(log_f, -1)
    s = scale * q @ k.transpose(-1, -2) + (c[..., m - n:, None] - c[..., None, :])
    s = s.masked_fill(~keep, float("-inf"))
    sink = sinks.reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
    s = torch.cat([s, sink], -1)
    return torch.softmax(s, -1)[..., :-1] @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
def test_forward_and_gradients_match_torch_autograd_in_float64(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, b=2, hq=6, hkv=2, n=15, m=19, d=8, dv=5)
    log_f, sinks = _log_f(rng, (2, 6, 19)), rng.standard_normal(6)
    window = ra.masks.sliding_window(9)
    keep = (window & ra.masks.causal()).materialize(15, 19)
    g, glse = rng.standard_normal((2, 6, 15, 5)), rng.standard_normal((2, 6, 15))
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, log_f, sinks)]
    out, lse = _torch_forgetting(*t, keep=torch.tensor(keep), scale=0.3, torch=torch)
    loss = (out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum()
    ref = torch.autograd.grad(loss, t)
    kw = dict(log_f=log_f, sinks=sinks, mask=window, scale=0.3, method=method, block_q=4,
              block_k=5)
    mine_out, mine_lse = forgetting_attention(q, k, v, return_lse=True, **kw)
    assert max_rel_error(mine_out, out.detach().numpy()) <= 1e-12
    assert max_rel_error(mine_lse, lse.detach().numpy()) <= 1e-12
    mine = ra.vjp("forgetting_attention", q, k, v, g, grad_lse=glse, **kw)
    for name, r in zip(("q", "k", "v", "log_f", "sinks"), ref):
        assert mine[name].shape == r.shape
        err = max_rel_error(mine[name], r.numpy(), normwise=True)
        assert err <= 1e-12, f"{method} d{name}: {err:.2e}"


def test_matches_flash_linear_attentions_naive_references():
    """``fla.ops.attn.naive.naive_parallel_attn(g=, sink_bias=)`` runs in float64 but
    takes the gates' prefix sums in float32: gates that are multiples of 1/64 make those
    exact, so it agrees to 1e-12. ``fla.ops.forgetting_attn.naive_forgetting_attn``
    computes in float32 throughout: it agrees to float32 precision."""
    torch = pytest.importorskip("torch")
    attn = pytest.importorskip("fla.ops.attn.naive")
    fox = pytest.importorskip("fla.ops.forgetting_attn.naive")
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=21, m=21, d=8, dv=8)
    log_f = -rng.integers(0, 32, (2, 4, 21)) / 64.0
    sinks = rng.standard_normal(4)
    tq, tk, tv = (torch.tensor(x).transpose(1, 2) for x in (q, k, v))
    tg = torch.tensor(log_f).transpose(1, 2)                # fla's g: (B, T, HQ)
    for window in (None, 5):
        mask = None if window is None else ra.masks.sliding_window(window - 1)
        ref, _ = attn.naive_parallel_attn(tq, tk, tv, scale=0.3, window_size=window,
                                          g=tg, sink_bias=torch.tensor(sinks))
        out = forgetting_attention(q, k, v, log_f=log_f, sinks=sinks, mask=mask, scale=0.3)
        assert max_rel_error(out, ref.transpose(1, 2).numpy()) <= 1e-12, window
    gates = _log_f(np.random.default_rng(5), (2, 21, 4))
    ref32 = fox.naive_forgetting_attn(tq, tk, tv, torch.tensor(gates), scale=0.3)
    out = forgetting_attention(q, k, v, log_f=gates.transpose(0, 2, 1), scale=0.3)
    err = max_rel_error(out, ref32.transpose(1, 2).double().numpy())
    assert err <= 1e-5 and err > 0                          # float32, not float64


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
@pytest.mark.parametrize("gates", ["full", "per head", "scalar"])
def test_the_vjp_matches_finite_differences(method, gates):
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=5, m=7, d=3, dv=2)
    k, v = k[:1], v[:1]                                     # broadcast over the batch
    log_f = {"full": _log_f(rng, (2, 4, 7)), "per head": _log_f(rng, (4, 1)),
             "scalar": np.log(0.7)}[gates]
    g, glse = rng.standard_normal((2, 4, 5, 2)), rng.standard_normal((2, 4, 5))
    kw = dict(method=method, mask=ra.masks.sliding_window(4), block_q=2, block_k=3)
    exact = ra.vjp("forgetting_attention", q, k, v, g, grad_lse=glse, log_f=log_f, **kw)
    numeric = numerical_vjp(lambda q, k, v, log_f: forgetting_attention(
        q, k, v, log_f=log_f, return_lse=True, **kw), dict(q=q, k=k, v=v, log_f=log_f),
        (g, glse))
    for name in numeric:
        assert exact[name].shape == np.shape(numeric[name])
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


def test_registry_entry_and_implied_matrix():
    spec = ra.mechanisms()["forgetting_attention"]
    assert spec.family == "exact" and spec.vjp is not None and not spec.position_free
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng)
    log_f = _log_f(rng, (2, 4, 11))
    a = spec.implied_matrix(q, k, log_f=log_f)
    np.testing.assert_allclose(a, ra.attention_probs(q, k, causal=True,
                                                     bias=_bias(log_f, 9)), atol=1e-15)
    assert max_rel_error(a @ np.repeat(v, 2, axis=1),
                         forgetting_attention(q, k, v, log_f=log_f)) <= 1e-12


def test_bad_gates_name_themselves_and_the_shapes():
    q, k, v = _inputs(np.random.default_rng(8))
    with pytest.raises(ValueError, match=r"log_f must broadcast to \(\.\.\., Hq, M\) = "
                                         r"\(2, 4, 11\).*got shape \(2, 4, 9\)"):
        forgetting_attention(q, k, v, log_f=np.zeros((2, 4, 9)))
    with pytest.raises(ValueError, match=r"log_f must be <= 0 .* np.log\(f\)"):
        forgetting_attention(q, k, v, log_f=np.full((2, 4, 11), 0.9))
    with pytest.raises(ValueError, match="log_f .*non-finite"):
        forgetting_attention(q, k, v, log_f=np.full(11, -np.inf))
    with pytest.raises(ValueError, match="method must be one of"):
        forgetting_attention(q, k, v, log_f=-0.1, method="flash")
    with pytest.raises(TypeError, match="log_f"):
        forgetting_attention(q, k, v)
