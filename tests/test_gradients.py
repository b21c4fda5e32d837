"""Gradients of the softmax references: every registered VJP against central finite
differences, the tiled and sparse backwards against the dense one, and the dense one
against a PyTorch float64 autograd transcription (torch is a test peer only)."""
import inspect

import numpy as np
import pytest

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

SPECS = [s for s in ra.mechanisms().values() if s.vjp is not None]


def _inputs(rng, *, b=1, hq=2, hkv=1, n=5, m=6, d=3, dv=2):
    q = rng.standard_normal((b, hq, n, d))
    k = rng.standard_normal((b, hkv, m, d))
    v = rng.standard_normal((b, hkv, m, dv))
    return q, k, v


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("causal", [False, True])
def test_every_vjp_matches_finite_differences(spec, causal):
    """Found through the registry: a mechanism registered later with a VJP is checked
    here with no new test code."""
    if causal and not spec.supports_causal:
        pytest.skip("not causal")
    rng = np.random.default_rng(len(spec.name))
    n = 6 if spec.self_attention_only else 5
    q, k, v = _inputs(rng, n=n, m=6)
    params = dict(spec.example, **({"rng": 0} if spec.randomized else {}))
    if "causal" in inspect.signature(spec.fn).parameters:
        params["causal"] = causal
    out = spec.fn(q, k, v, **params)
    g = rng.standard_normal(out.shape)
    exact = ra.vjp(spec.name, q, k, v, g, **params)
    numeric = numerical_vjp(spec.fn, dict(q=q, k=k, v=v), g, **params)
    for name in "qkv":
        assert exact[name].shape == numeric[name].shape
        if not numeric[name].any():   # e.g. a window of one key: q does not matter
            assert np.abs(exact[name]).max() <= 1e-12, name
            continue
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


@pytest.mark.parametrize("spec", [s for s in SPECS if "return_lse" in
                                  inspect.signature(s.fn).parameters], ids=lambda s: s.name)
def test_the_lse_cotangent(spec):
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, n=6, m=6)
    params = dict(spec.example, **({"rng": 0} if spec.randomized else {}))
    out, lse = spec.fn(q, k, v, return_lse=True, **params)
    g, glse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    exact = ra.vjp(spec.name, q, k, v, g, grad_lse=glse, **params)
    numeric = numerical_vjp(lambda **x: spec.fn(**x, return_lse=True, **params),
                            dict(q=q, k=k, v=v), (g, glse))
    for name in "qkv":
        assert max_rel_error(exact[name], numeric[name], normwise=True) <= 1e-7, name


CASES = {
    "plain": {},
    "causal, N != M": dict(causal=True),
    "window + sinks": dict(mask=ra.masks.sliding_window(3) | ra.masks.sinks(2), causal=True),
    "document": dict(mask=ra.masks.document([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])),
    "softcap + scale": dict(softcap=1.5, scale=0.7, causal=True),
    "alibi": dict(bias=ra.scores.alibi(4), causal=True),
    "top-left causal via mask": dict(mask=ra.masks.causal("top_left")),
}


@pytest.mark.parametrize("case", CASES)
def test_dense_backward_matches_finite_differences(case):
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=7, m=11, d=3, dv=2)
    k, v = k[:1], v[:1]                                  # broadcast over the batch
    g = rng.standard_normal((2, 4, 7, 2))
    exact = ra.vjp("attention", q, k, v, g, **CASES[case])
    numeric = numerical_vjp(ra.attention, dict(q=q, k=k, v=v), g, **CASES[case])
    for name in "qkv":
        assert exact[name].shape == np.shape(locals()[name])
        assert max_rel_error(exact[name], numeric[name], normwise=True) <= 1e-7, name


def test_bias_parameters_get_their_gradients():
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=5, m=6)
    g = rng.standard_normal((2, 4, 5, 2))
    bias = rng.standard_normal((4, 1, 6))                # broadcast over batch and rows
    table = rng.standard_normal((4, 7))
    exact = ra.vjp("attention", q, k, v, g, bias=bias, causal=True)
    numeric = numerical_vjp(lambda q, k, v, bias: ra.attention(q, k, v, bias=bias,
                                                              causal=True),
                            dict(q=q, k=k, v=v, bias=bias), g)
    assert exact["bias"].shape == bias.shape
    for name in ("q", "k", "v", "bias"):
        assert max_rel_error(exact[name], numeric[name], normwise=True) <= 1e-7, name
    exact = ra.vjp("attention", q, k, v, g, bias=ra.scores.relative_bias(table))
    numeric = numerical_vjp(lambda table: ra.attention(
        q, k, v, bias=ra.scores.relative_bias(table)), dict(table=table), g)
    assert max_rel_error(exact["bias"], numeric["table"], normwise=True) <= 1e-7


def test_a_user_score_mod_needs_its_derivative():
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng)
    g = np.ones((1, 2, 5, 2))

    def squash(score, b, h, q_idx, kv_idx):
        return 3.0 * np.tanh(score / 3.0) - 0.1 * (q_idx - kv_idx) ** 2

    with pytest.raises(TypeError, match="score_mod squash cannot be differentiated"):
        ra.vjp("attention", q, k, v, g, bias=squash)
    mod = ra.scores.from_function(
        squash, derivative=lambda score, b, h, q_idx, kv_idx: 1 - np.tanh(score / 3) ** 2)
    exact = ra.vjp("attention", q, k, v, g, bias=mod)
    numeric = numerical_vjp(ra.attention, dict(q=q, k=k, v=v), g, bias=mod)
    for name in "qkv":
        assert max_rel_error(exact[name], numeric[name], normwise=True) <= 1e-7


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocks", [(3, 4), (5, 2), (64, 64)])
def test_tiled_and_sparse_backwards_equal_the_dense_one(case, blocks):
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=5, dv=3)
    g, glse = rng.standard_normal((2, 4, 9, 3)), rng.standard_normal((2, 4, 9))
    kw = dict(CASES[case], grad_lse=glse)
    dense = ra.vjp("attention", q, k, v, g, **kw)
    tiled = ra.vjp("tiled_attention", q, k, v, g, block_q=blocks[0], block_k=blocks[1],
                   **kw)
    for name in "qkv":
        assert max_rel_error(tiled[name], dense[name], normwise=True) <= 1e-12, name
    if "mask" in kw:
        mask = kw.pop("mask")
        sparse = ra.vjp("sparse_attention", q, k, v, g, mask=mask, block_q=blocks[0],
                        block_k=blocks[1], **kw)
        for name in "qkv":
            assert max_rel_error(sparse[name], dense[name], normwise=True) <= 1e-12


def test_masked_empty_and_huge_rows_have_finite_gradients():
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, n=6, m=4)
    q[..., 0, :] *= 1e3                                   # logits of order 1e3 and more
    g = rng.standard_normal((1, 2, 6, 2))
    mask = np.ones((6, 4), bool)
    mask[2] = False                                       # a row that keeps no key
    for name in ("attention", "tiled_attention"):
        grads = ra.vjp(name, q, k, v, g, mask=mask, grad_lse=np.ones((1, 2, 6)))
        assert all(np.isfinite(x).all() for x in grads.values())
        assert not grads["q"][..., 2, :].any()            # the empty row: zero gradient
    causal = ra.vjp("attention", q, k, v, g, causal=True)  # N > M: rows 0, 1 see nothing
    assert not causal["q"][..., :2, :].any() and np.isfinite(causal["k"]).all()


def test_bad_cotangents_name_themselves_and_the_expected_shape():
    q, k, v = _inputs(np.random.default_rng(7))
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(1, 2, 5, 2\), got \(1, 2, 5, 3\)"):
        ra.vjp("attention", q, k, v, np.ones((1, 2, 5, 3)))
    with pytest.raises(ValueError, match=r"grad_lse must have the output's shape "
                                         r"\(1, 2, 5\)"):
        ra.vjp("tiled_attention", q, k, v, np.ones((1, 2, 5, 2)), grad_lse=np.ones(5))
    with pytest.raises(TypeError, match="lsh_buckets has no VJP"):
        ra.vjp(ra.lsh_buckets, q, np.ones(3))


def _torch_attention(q, k, v, *, keep, scale, softcap, bias):
    """Softmax attention in torch float64, written independently of refattn."""
    import torch
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s + bias
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)          # empty rows -> 0
    return p @ v, torch.logsumexp(s, dim=-1)


def test_dense_backward_matches_torch_autograd_in_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, b=2, hq=6, hkv=2, n=33, m=40, d=8, dv=5)
    bias = rng.standard_normal((6, 33, 40))
    g, glse = rng.standard_normal((2, 6, 33, 5)), rng.standard_normal((2, 6, 33))
    keep = ra.masks.sliding_window(9, right=2).materialize(33, 40)
    keep[4] = False
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tb = torch.tensor(bias, requires_grad=True)
    out, lse = _torch_attention(tq, tk, tv, keep=torch.tensor(keep), scale=0.3,
                                softcap=2.0, bias=tb)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ref = torch.autograd.grad((out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum(),
                              (tq, tk, tv, tb))
    for fn in ("attention", "tiled_attention"):
        mine = ra.vjp(fn, q, k, v, g, grad_lse=glse, mask=keep, scale=0.3, softcap=2.0,
                      bias=bias)
        for name, r in zip(("q", "k", "v", "bias"), ref):
            err = max_rel_error(mine[name], r.numpy(), normwise=True)
            assert err <= 1e-12, f"{fn} d{name}: {err:.2e}"


def test_the_tiled_backward_takes_the_forwards_saved_results():
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=5, dv=3)
    g = rng.standard_normal((2, 4, 9, 3))
    out, lse = ra.tiled_attention(q, k, v, causal=True, return_lse=True)
    saved = ra.vjp("tiled_attention", q, k, v, g, causal=True, out=out, lse=lse)
    again = ra.vjp("tiled_attention", q, k, v, g, causal=True)
    assert all(np.array_equal(saved[x], again[x]) for x in "qkv")
    with pytest.raises(ValueError, match="give both out and lse"):
        ra.vjp("tiled_attention", q, k, v, g, out=out)
    with pytest.raises(ValueError, match=r"lse must be the forward's log-sum-exp, shape "
                                         r"\(2, 4, 9\)"):
        ra.vjp("tiled_attention", q, k, v, g, out=out, lse=lse[..., :3])


def test_no_keys_give_zero_gradients_of_the_right_shapes():
    q, g = np.ones((1, 3, 4)), np.ones((1, 3, 2))
    k, v = np.ones((1, 0, 4)), np.ones((1, 0, 2))
    for name in ("attention", "tiled_attention"):
        grads = ra.vjp(name, q, k, v, g)
        assert grads["k"].shape == (1, 0, 4) and not grads["q"].any()


@pytest.mark.parametrize("name, kw", [("window_attention", dict(window=2, shift=1)),
                                      ("shifted_window_attention", dict(window=2)),
                                      ("neighborhood_attention", dict(kernel_size=(3, 3))),
                                      ("spatial_reduction_attention", dict(ratio=2))])
def test_vision_gradients_with_cls_tokens(name, kw):
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal(s) for s in ((2, 2, 4, 4, 3), (1, 1, 4, 4, 3),
                                                 (1, 1, 4, 4, 2)))
    cls = tuple(rng.standard_normal(s) for s in ((2, 2, 3), (1, 2, 3), (1, 2, 2)))
    g, g_cls = rng.standard_normal((2, 2, 4, 4, 2)), rng.standard_normal((2, 2, 2, 2))
    fn = getattr(ra, name)
    exact = ra.vjp(name, q, k, v, (g, g_cls), cls_tokens=cls, **kw)
    numeric = numerical_vjp(lambda q, k, v, cq, ck, cv: fn(q, k, v, cls_tokens=(cq, ck, cv),
                                                           **kw),
                            dict(q=q, k=k, v=v, cq=cls[0], ck=cls[1], cv=cls[2]), (g, g_cls))
    mine = dict(exact, cq=exact["cls_tokens"][0], ck=exact["cls_tokens"][1],
                cv=exact["cls_tokens"][2])
    for x in numeric:
        assert max_rel_error(mine[x], numeric[x], normwise=True) <= 1e-7, x
    with pytest.raises(TypeError, match="grad_out is the pair"):
        ra.vjp(name, q, k, v, g, cls_tokens=cls, **kw)
