"""Nyströmformer's pseudoinverse start as the official code and HuggingFace take it: one
scale 1 / (max column sum · max row sum) over the whole batch and every head
(pinv_init="batch"), next to the paper's per-matrix start (the default)."""
import numpy as np
import pytest

import refattn as ra
from refattn.lowrank.nystrom import iterative_pinv_vjp
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _softmax_batch(rng, shape, temperature=1.0):
    x = rng.standard_normal(shape) / temperature
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_the_batch_start_takes_one_scale_for_every_matrix():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 4))
    a[1, 2] *= 5                                 # this matrix sets both maxima
    z0 = ra.lowrank.iterative_pinv(a, 0, init="batch")
    scale = np.abs(a).sum(-2).max() * np.abs(a).sum(-1).max()
    assert max_rel_error(z0, a.swapaxes(-1, -2) / scale, normwise=True) <= 1e-15
    own = ra.lowrank.iterative_pinv(a, 0)
    assert max_rel_error(own[1, 2], z0[1, 2], normwise=True) <= 1e-15
    assert max_rel_error(own[0, 0], z0[0, 0], normwise=True) > 0.5
    # one matrix: the two starts agree; converged, both are the inverse
    for init in ("per_matrix", "batch"):
        assert max_rel_error(ra.lowrank.iterative_pinv(a[0, 0], 3, init=init),
                             ra.lowrank.iterative_pinv(a[0, 0], 3), normwise=True) == 0
    well = np.eye(3) + 0.1 * rng.standard_normal((5, 3, 3))
    for init in ("per_matrix", "batch"):
        z = ra.lowrank.iterative_pinv(well, 30, init=init)
        assert max_rel_error(z, np.linalg.inv(well), normwise=True) <= 1e-12
    with pytest.raises(ValueError, match="init must be one of"):
        ra.lowrank.iterative_pinv(a, 2, init="global")
    with pytest.raises(ValueError, match="pinv_init must be one of"):
        ra.nystrom_attention(a, a, a, num_landmarks=2, pinv_init="global")


@pytest.mark.parametrize("init", ["per_matrix", "batch"])
def test_vjp_through_either_start(init):
    rng = np.random.default_rng(1)
    a = _softmax_batch(rng, (2, 2, 3, 3)) + 0.1 * rng.standard_normal((2, 2, 3, 3))
    g = rng.standard_normal(a.shape)
    exact = ra.vjp(ra.lowrank.iterative_pinv, a, g, iters=3, init=init)["a"]
    numeric = numerical_vjp(lambda a: ra.lowrank.iterative_pinv(a, 3, init=init),
                            dict(a=a), g)["a"]
    assert max_rel_error(exact, numeric, normwise=True) <= 1e-7
    assert iterative_pinv_vjp(a, g, iters=3, init=init)["a"].shape == a.shape
    q = rng.standard_normal((2, 2, 6, 3))
    k, v = rng.standard_normal((2, 2, 1, 6, 3))
    params = dict(num_landmarks=3, pinv_iters=2, pinv_init=init)
    out = ra.nystrom_attention(q, k, v, **params)
    g = rng.standard_normal(out.shape)
    exact = ra.vjp("nystrom_attention", q, k, v, g, **params)
    numeric = numerical_vjp(ra.nystrom_attention, dict(q=q, k=k, v=v), g, **params)
    for x in "qkv":
        assert max_rel_error(exact[x], numeric[x], normwise=True) <= 1e-7, x
    a_mat = ra.mechanisms()["nystrom_attention"].implied_matrix(q, k, **params)
    assert max_rel_error(a_mat @ v[:, None].repeat(2, 1)[:, :, 0], out) <= 1e-12


# ------------------------------------------------------------------ HuggingFace's
def _hf_layer(torch, heads, d, n, c):
    pytest.importorskip("transformers")
    from transformers import NystromformerConfig
    from transformers.models.nystromformer.modeling_nystromformer import (
        NystromformerSelfAttention)
    config = NystromformerConfig(hidden_size=heads * d, num_attention_heads=heads,
                                 num_landmarks=c, segment_means_seq_len=n)
    torch.manual_seed(0)
    layer = NystromformerSelfAttention(config).double().eval()
    layer.conv_kernel_size = None        # no depthwise convolution on V (not attention)
    return layer


@pytest.mark.parametrize("option, init", [("original", "batch"), ("exact", "per_matrix")])
def test_matches_huggingface_iterative_inv(option, init):
    """HF's ``iterative_inv`` on softmax matrices (B, H, c, c), float64: its default
    "original" start is refattn's batch start, its "exact" one the per-matrix start
    (both divide by the largest column sum only: the row sums of a softmax are 1)."""
    torch = pytest.importorskip("torch")
    layer = _hf_layer(torch, 2, 4, 16, 4)
    layer.init_option = option
    rng = np.random.default_rng(2)
    for temperature in (1.0, 0.3):
        a = _softmax_batch(rng, (3, 2, 5, 5), temperature)
        for iters in (0, 1, 6):
            hf = layer.iterative_inv(torch.from_numpy(a), n_iter=iters).numpy()
            mine = ra.lowrank.iterative_pinv(a, iters, init=init)
            assert max_rel_error(mine, hf, normwise=True) <= 1e-12, (temperature, iters)
    other = "per_matrix" if init == "batch" else "batch"
    assert max_rel_error(ra.lowrank.iterative_pinv(a, 6, init=other), hf,
                         normwise=True) > 1e-3


def test_matches_huggingface_nystromformer_self_attention():
    """The whole layer (landmarks, three kernels, 6 iterations from HF's default start)
    against ``nystrom_attention(pinv_init="batch")`` on its own projections."""
    torch = pytest.importorskip("torch")
    heads, d, n, c, batch = 3, 4, 24, 6, 2
    layer = _hf_layer(torch, heads, d, n, c)
    hidden = torch.randn(batch, n, heads * d, dtype=torch.float64)
    with torch.no_grad():
        out, probs = layer(hidden, output_attentions=True)

        def split(proj):
            return proj(hidden).view(batch, n, heads, d).transpose(1, 2).numpy()
        q, k, v = split(layer.query), split(layer.key), split(layer.value)
    hf_out = out.view(batch, n, heads, d).transpose(1, 2).numpy()
    mine = ra.nystrom_attention(q, k, v, num_landmarks=c, pinv_init="batch")
    assert max_rel_error(mine, hf_out, normwise=True) <= 1e-12
    assert max_rel_error(ra.nystrom_attention(q, k, v, num_landmarks=c), hf_out,
                         normwise=True) > 1e-6       # the per-matrix start is another one
