"""Sigmoid attention (Ramapuram et al. 2024; FlashSigmoid): ``σ(S + b) V`` without
normalisation. Its dense, tiled and sparse (pair-list) forms against each other and a
torch float64 autograd transcription, its VJP against finite differences, and its
memory staying bounded by the tiles."""
import tracemalloc

import numpy as np
import pytest

import refattn as ra
from refattn.exact import sigmoid_attention
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _inputs(rng, b=2, hq=4, hkv=2, n=9, m=11, d=5, dv=3):
    return (rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, m, d)),
            rng.standard_normal((b, hkv, m, dv)))


def _numpy_sigmoid(q, k, v, *, keep, scale, b, bias=0.0, softcap=None):
    """``σ(S + b) V`` written out in NumPy (masked pairs 0), GQA by repeating heads."""
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, -3), np.repeat(v, group, -3)
    s = scale * q @ k.swapaxes(-1, -2)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    a = np.where(keep, 1 / (1 + np.exp(-(s + bias + b))), 0.0)
    return a @ v


CASES = {
    "plain": {},
    "causal, N != M": dict(causal=True),
    "window + causal": dict(mask=ra.masks.sliding_window(3), causal=True),
    "document": dict(mask=ra.masks.document([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])),
    "softcap + alibi + per-head b": dict(softcap=1.5, bias=ra.scores.alibi(4), causal=True,
                                         sigmoid_bias=np.array([0.5, -1.0, 0.0, -3.0])),
}


@pytest.mark.parametrize("case", CASES)
def test_dense_tiled_and_sparse_forms_agree(case):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng)
    kw = CASES[case]
    ref = sigmoid_attention(q, k, v, method="dense", **kw)
    for blocks in ({}, dict(block_q=3, block_k=4), dict(block_q=5, block_k=2)):
        assert max_rel_error(sigmoid_attention(q, k, v, **blocks, **kw), ref) <= 1e-12
        if "mask" in kw or kw.get("causal"):
            out = sigmoid_attention(q, k, v, method="sparse", **blocks, **kw)
            assert max_rel_error(out, ref) <= 1e-12, blocks


def test_equals_the_written_out_equation_with_the_default_bias():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng)
    mask = ra.masks.sliding_window(4)
    keep = (mask & ra.masks.causal()).materialize(9, 11)
    keep[3] = False                                     # a row that keeps no key: 0
    expected = _numpy_sigmoid(q, k, v, keep=keep, scale=1 / np.sqrt(5), b=-np.log(11))
    for method in ("dense", "tiled", "sparse"):
        out = sigmoid_attention(q, k, v, mask=keep, method=method, block_q=2, block_k=3)
        assert max_rel_error(out, expected) <= 1e-12, method
        assert not out[..., 3, :].any()
    same = sigmoid_attention(q, k, v, sigmoid_bias=-np.log(11), mask=keep)
    np.testing.assert_array_equal(same, sigmoid_attention(q, k, v, mask=keep))


def test_not_row_stochastic_and_the_matrix_reproduces_the_output():
    spec = ra.mechanisms()["sigmoid_attention"]
    assert not spec.row_stochastic and spec.vjp is not None
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng)
    a = spec.implied_matrix(q, k, causal=True)
    assert (a >= 0).all() and (a <= 1).all()
    assert np.abs(a.sum(-1) - 1).max() > 0.1            # not a softmax
    assert max_rel_error(a @ np.repeat(v, 2, axis=1),
                         sigmoid_attention(q, k, v, causal=True)) <= 1e-12


def _torch_sigmoid(q, k, v, bias, b, *, keep, scale, softcap, torch):
    """Sigmoid attention in torch float64, written from the paper."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = scale * q @ k.transpose(-1, -2)
    s = softcap * torch.tanh(s / softcap) + bias + b.reshape(-1, 1, 1)
    return torch.where(keep, torch.sigmoid(s), torch.zeros_like(s)) @ v


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
def test_forward_and_gradients_match_torch_autograd_in_float64(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, b=2, hq=6, hkv=2, n=15, m=19, d=8, dv=5)
    bias, b = rng.standard_normal((6, 15, 19)), rng.standard_normal(6)
    mask = ra.masks.sliding_window(9, right=2)
    keep = mask.materialize(15, 19)
    g = rng.standard_normal((2, 6, 15, 5))
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias, b)]
    out = _torch_sigmoid(*t, keep=torch.tensor(keep), scale=0.3, softcap=2.0, torch=torch)
    ref = torch.autograd.grad((out * torch.tensor(g)).sum(), t)
    kw = dict(mask=mask, scale=0.3, softcap=2.0, bias=bias, sigmoid_bias=b, method=method,
              block_q=4, block_k=5)
    assert max_rel_error(sigmoid_attention(q, k, v, **kw), out.detach().numpy()) <= 1e-12
    mine = ra.vjp("sigmoid_attention", q, k, v, g, **kw)
    for name, r in zip(("q", "k", "v", "bias", "sigmoid_bias"), ref):
        assert mine[name].shape == r.shape
        err = max_rel_error(mine[name], r.numpy(), normwise=True)
        assert err <= 1e-12, f"{method} d{name}: {err:.2e}"


@pytest.mark.parametrize("method", ["dense", "tiled", "sparse"])
def test_the_vjp_matches_finite_differences(method):
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, b=2, hq=4, hkv=2, n=5, m=7, d=3, dv=2)
    k, v = k[:1], v[:1]                                     # broadcast over the batch
    table = rng.standard_normal((4, 7))
    g = rng.standard_normal((2, 4, 5, 2))
    kw = dict(method=method, mask=ra.masks.sliding_window(4), causal=True, block_q=2,
              block_k=3)
    exact = ra.vjp("sigmoid_attention", q, k, v, g, sigmoid_bias=-1.5,
                   bias=ra.scores.relative_bias(table), **kw)
    numeric = numerical_vjp(lambda q, k, v, b, table: sigmoid_attention(
        q, k, v, sigmoid_bias=b, bias=ra.scores.relative_bias(table), **kw),
        dict(q=q, k=k, v=v, b=-1.5, table=table), g)
    numeric["sigmoid_bias"], numeric["bias"] = numeric.pop("b"), numeric.pop("table")
    for name in numeric:
        assert exact[name].shape == np.shape(numeric[name])
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"
    assert "sigmoid_bias" not in ra.vjp("sigmoid_attention", q, k, v, g, **kw)


def test_saturated_logits_keep_finite_outputs_and_gradients():
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, n=6, m=6)
    q *= 300                                            # logits of order ±1e3
    g = rng.standard_normal((2, 4, 6, 3))
    for method in ("dense", "tiled", "sparse"):
        out = sigmoid_attention(q, k, v, causal=True, method=method)
        grads = ra.vjp("sigmoid_attention", q, k, v, g, causal=True, method=method)
        assert np.isfinite(out).all() and all(np.isfinite(x).all() for x in grads.values())


def test_the_tiled_form_stays_within_its_tiles():
    """At N = M = 3072 the attention matrix of one head is 72 MiB; the tiled form's peak
    traced memory stays a few tiles of 256 x 256 beyond inputs and output."""
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((3, 1, 3072, 8))
    tracemalloc.start()
    try:
        sigmoid_attention(q, k, v, causal=True, block_q=256, block_k=256, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    with pytest.raises(ra.MemoryBudgetError, match="method='tiled'"):
        sigmoid_attention(q, k, v, method="dense", memory_budget=2**26)


def test_bad_arguments_name_themselves_and_the_shapes():
    q, k, v = _inputs(np.random.default_rng(7))
    with pytest.raises(ValueError, match=r"sigmoid_bias must be .* shape \(Hq,\) = \(4,\); "
                                         r"got shape \(2,\)"):
        sigmoid_attention(q, k, v, sigmoid_bias=np.zeros(2))
    with pytest.raises(ValueError, match="sigmoid_bias .*non-finite"):
        sigmoid_attention(q, k, v, sigmoid_bias=np.nan)
    with pytest.raises(ValueError, match="method='sparse'.*mask= or causal=True"):
        sigmoid_attention(q, k, v, method="sparse")
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 9, 3\), got \(2, 4, 9, 2\)"):
        ra.vjp("sigmoid_attention", q, k, v, np.zeros((2, 4, 9, 2)))
    with pytest.raises(ValueError, match="block_q"):
        sigmoid_attention(q, k, v, block_q=0)
