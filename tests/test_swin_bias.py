"""Swin's literal roll form with a relative position bias: shifted_window_attention(...,
bias=B) equals window_attention(..., shift=s, bias=B), and Swin's own layer (HuggingFace's
SwinLayer: roll, partition, bias table + shift mask per window, reverse, roll back)."""
import numpy as np
import pytest

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _swin_bias(table, grid, window):
    """Swin's relative position bias on a flattened 2-D grid: ``B[h, t, u] =
    table[(dy + w0 - 1) * (2 w1 - 1) + dx + w1 - 1, h]`` for the coordinate differences
    ``(dy, dx)`` of tokens ``t`` and ``u`` (clipped: farther pairs are never in one
    window)."""
    y, x = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    dy = np.clip(y[:, None] - y[None, :], 1 - window[0], window[0] - 1)
    dx = np.clip(x[:, None] - x[None, :], 1 - window[1], window[1] - 1)
    return np.moveaxis(table[(dy + window[0] - 1) * (2 * window[1] - 1) + dx
                             + window[1] - 1], -1, 0)


@pytest.mark.parametrize("grid, window, shift", [((8, 8), (4, 4), (2, 2)),
                                                 ((9, 10), (4, 3), (2, 1)),
                                                 ((7, 6), (3, 3), (0, 1))])
def test_literal_form_with_a_bias_equals_the_mask_form(grid, window, shift):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4) + grid + (5,))
    k, v = rng.standard_normal((2, 2, 2) + grid + (5,))
    n = grid[0] * grid[1]
    table = rng.standard_normal(((2 * window[0] - 1) * (2 * window[1] - 1), 4))
    biases = {"swin table": _swin_bias(table, grid, window),                # (Hq, N, N)
              "per batch": rng.standard_normal((2, 1, n, n)),
              "alibi": ra.scores.alibi(4),
              "function": lambda s, b, h, i, j: s + 0.1 * np.cos(i - 2 * j + h)}
    for name, bias in biases.items():
        lit, lit_lse = ra.shifted_window_attention(q, k, v, window, shift=shift, bias=bias,
                                                   return_lse=True)
        ref, ref_lse = ra.window_attention(q, k, v, window, shift=shift, bias=bias,
                                           return_lse=True)
        assert max_rel_error(lit, ref) <= 1e-12, name
        assert max_rel_error(lit_lse, ref_lse) <= 1e-12, name
        plain = ra.shifted_window_attention(q, k, v, window, shift=shift)
        assert max_rel_error(lit, plain) > 1e-3, name          # the bias is applied


def test_bias_with_cls_tokens_and_one_and_three_axes():
    rng = np.random.default_rng(1)
    for grid, window, shift in (((11,), (4,), (1,)), ((4, 5, 6), (2, 3, 4), (1, 1, 2))):
        q, k, v = rng.standard_normal((3, 1, 2) + grid + (3,))
        cls = tuple(rng.standard_normal((1, 2, 2, 3)) for _ in range(3))
        total = 2 + int(np.prod(grid))
        bias = rng.standard_normal((2, total, total))
        lit = ra.shifted_window_attention(q, k, v, window, shift=shift, bias=bias,
                                          cls_tokens=cls)
        ref = ra.window_attention(q, k, v, window, shift=shift, bias=bias, cls_tokens=cls)
        for a, b in zip(lit, ref):
            assert max_rel_error(a, b) <= 1e-12


def test_implied_matrix_and_vjp_take_the_bias():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 1, 2, 4, 4, 2))
    bias = rng.standard_normal((2, 16, 16))
    params = dict(window=2, shift=1, bias=bias)
    spec = ra.mechanisms()["shifted_window_attention"]
    out = ra.shifted_window_attention(q, k, v, **params)
    a = spec.implied_matrix(q, k, **params)
    assert max_rel_error((a @ v.reshape(1, 2, 16, 2)).reshape(out.shape), out) <= 1e-12
    g = rng.standard_normal(out.shape)
    params.pop("bias")
    numeric = numerical_vjp(ra.shifted_window_attention, dict(q=q, k=k, v=v, bias=bias), g,
                            **params)
    for name in ("shifted_window_attention", "window_attention"):
        exact = ra.vjp(name, q, k, v, g, bias=bias, **params)
        assert sorted(exact) == ["bias", "k", "q", "v"]
        for x in numeric:
            assert max_rel_error(exact[x], numeric[x], normwise=True) <= 1e-7, (name, x)


@pytest.mark.parametrize("shift", [2, 0])
def test_matches_huggingface_swin_layer(shift, monkeypatch):
    """HuggingFace's SwinLayer pieces in float64 (softmax kept in float64; its shift mask
    adds -100 instead of -inf, e^-100 below rounding): roll, window_partition, SwinAttention
    with its relative position bias table, window_reverse, roll back."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import SwinConfig
    from transformers.models.swin import modeling_swin as hf

    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim) if x.dtype == torch.float64 else \
            softmax(x, dim=dim, dtype=dtype)
    monkeypatch.setattr(torch.nn.functional, "softmax", float64_softmax)
    heads, d, w, side, batch = 2, 3, 4, 8, 2
    config = SwinConfig(window_size=w, embed_dim=heads * d, attn_implementation="eager")
    torch.manual_seed(0)
    layer = hf.SwinLayer(config, dim=heads * d, input_resolution=(side, side),
                         num_heads=heads, shift_size=shift).double().eval()
    attn = layer.attention
    with torch.no_grad():
        torch.nn.init.normal_(attn.relative_position_bias.relative_position_bias_table)
        attn.o_proj.weight.copy_(torch.eye(heads * d))
        attn.o_proj.bias.zero_()
        hidden = torch.randn(batch, side, side, heads * d, dtype=torch.float64)
        windows = hf.window_partition(layer.cyclic_shift(hidden), w).view(-1, w * w,
                                                                          heads * d)
        mask = layer.get_attn_mask(side, side, dtype=torch.float64, device=hidden.device)
        out_w = attn(windows, mask)[0].view(-1, w, w, heads * d)
        out = layer.cyclic_shift(hf.window_reverse(out_w, w, side, side), reverse=True)

        def split(x):
            return x.view(batch, side, side, heads, d).permute(0, 3, 1, 2, 4).numpy()
        q, k, v = (split(proj(hidden)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        table = attn.relative_position_bias.relative_position_bias_table.numpy()
        index = attn.relative_position_bias.relative_position_index.view(w * w, w * w)
    bias = _swin_bias(table, (side, side), (w, w))
    inside = _swin_bias(np.arange(table.shape[0])[:, None], (w, w), (w, w))[0]
    np.testing.assert_array_equal(inside, index.numpy())     # Swin's own index
    mine = ra.shifted_window_attention(q, k, v, w, shift=shift, bias=bias)
    assert max_rel_error(mine, split(out)) <= 1e-12
    assert max_rel_error(ra.window_attention(q, k, v, w, shift=shift, bias=bias),
                         split(out)) <= 1e-12
