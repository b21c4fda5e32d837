"""Longformer's separate global projections (Beltagy et al. 2020, Sec. 3.1; HuggingFace's
LongformerSelfAttention): global rows use q_global against k_global / v_global over every
key, the other rows their window and the global keys with the local q, k, v."""
import numpy as np
import pytest

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

SPEC = ra.mechanisms()["longformer_attention"]


def _by_definition(q, k, v, qg, kg, vg, window, glob, causal=False):
    """Row by row from the definition, dense: global rows over every key with the global
    projections, the others over window and global keys with the local ones."""
    n, m = q.shape[-2], k.shape[-2]
    group = q.shape[-3] // k.shape[-3]
    expand = (lambda x: np.repeat(x, group, axis=-3))
    i = np.arange(n)[:, None] + (m - n)
    j = np.arange(m)[None, :]
    local = (np.abs(i - j) <= window) | np.isin(j, glob)
    every = np.ones((n, m), bool)
    if causal:
        local, every = local & (j <= i), every & (j <= i)
    out = []
    for qq, kk, vv, keep in ((q, k, v, local), (qg, kg, vg, every)):
        s = qq @ expand(kk).swapaxes(-1, -2) / np.sqrt(q.shape[-1])
        s = np.where(keep, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out.append((p / p.sum(-1, keepdims=True)) @ expand(vv))
    rows = np.isin(np.arange(n) + (m - n), glob)[:, None]
    return np.where(rows, out[1], out[0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", ["tiles", "gather"])
def test_global_rows_use_the_global_projections(causal, method):
    rng = np.random.default_rng(0)
    q, qg = rng.standard_normal((2, 2, 4, 19, 5))
    k, v, kg, vg = rng.standard_normal((4, 2, 2, 23, 5))
    glob = [0, 6, 21]
    out, lse = ra.longformer_attention(q, k, v, window=2, global_tokens=glob, q_global=qg,
                                       k_global=kg, v_global=vg, causal=causal,
                                       method=method, block_q=4, block_k=3,
                                       return_lse=True)
    ref = _by_definition(q, k, v, qg, kg, vg, 2, glob, causal)
    assert max_rel_error(out, ref) <= 1e-12
    assert lse.shape == q.shape[:-1] and np.isfinite(lse).all()
    # bnhd layout moves the global projections with q, k, v
    t = (lambda x: np.swapaxes(x, 1, 2))
    again = ra.longformer_attention(t(q), t(k), t(v), window=2, global_tokens=glob,
                                    q_global=t(qg), k_global=t(kg), v_global=t(vg),
                                    causal=causal, layout="bnhd")
    assert max_rel_error(t(again), ref) <= 1e-12


def test_each_projection_defaults_to_its_local_one():
    rng = np.random.default_rng(1)
    q, k, v, qg = rng.standard_normal((4, 1, 2, 16, 4))
    glob = [3]
    plain = ra.longformer_attention(q, k, v, window=1, global_tokens=glob)
    same = ra.longformer_attention(q, k, v, window=1, global_tokens=glob, q_global=q,
                                   k_global=k, v_global=v)
    assert max_rel_error(same, plain) <= 1e-12
    only_q = ra.longformer_attention(q, k, v, window=1, global_tokens=glob, q_global=qg)
    assert max_rel_error(only_q, _by_definition(q, k, v, qg, k, v, 1, glob)) <= 1e-12
    # the implied matrix exists without v_global
    a = SPEC.implied_matrix(q, k, window=1, global_tokens=glob, q_global=qg)
    assert max_rel_error(a @ v, only_q) <= 1e-12
    with pytest.raises(NotImplementedError, match="v_global has no implied matrix"):
        SPEC.implied_matrix(q, k, window=1, global_tokens=glob, v_global=v)
    with pytest.raises(ValueError,
                       match=r"k_global must have the shape of k \(1, 2, 16, 4\)"):
        ra.longformer_attention(q, k, v, window=1, global_tokens=glob, k_global=k[..., :3])


@pytest.mark.parametrize("given", [("q_global", "k_global", "v_global"), ("q_global",),
                                   ("v_global",)])
def test_vjp_of_the_global_projections(given):
    rng = np.random.default_rng(2)
    inputs = dict(q=rng.standard_normal((1, 2, 7, 3)), k=rng.standard_normal((1, 1, 7, 3)),
                  v=rng.standard_normal((1, 1, 7, 2)))
    inputs.update({name: rng.standard_normal(inputs[name[0]].shape) for name in given})
    params = dict(window=1, global_tokens=[2, 6], causal=True)
    out, lse = ra.longformer_attention(**inputs, **params, return_lse=True)
    g, glse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    exact = ra.vjp("longformer_attention", inputs["q"], inputs["k"], inputs["v"], g,
                   grad_lse=glse, **{n: inputs[n] for n in given}, **params)
    numeric = numerical_vjp(lambda **x: ra.longformer_attention(**x, **params,
                                                                return_lse=True),
                            inputs, (g, glse))
    assert sorted(exact) == sorted(inputs)
    for name in inputs:
        assert max_rel_error(exact[name], numeric[name], normwise=True) <= 1e-7, name


def test_reproduces_huggingface_longformer_self_attention(monkeypatch):
    """HF float64, its softmax kept in float64 (it casts to float32 otherwise), global
    tokens anywhere, one padded token."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim) if x.dtype == torch.float64 else \
            softmax(x, dim=dim, dtype=dtype)
    monkeypatch.setattr(torch.nn.functional, "softmax", float64_softmax)

    heads, d, w, batch, n = 3, 4, 2, 2, 16
    config = LongformerConfig(hidden_size=heads * d, num_attention_heads=heads,
                              attention_window=[2 * w], attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    layer = LongformerSelfAttention(config, layer_id=0).double().eval()
    hidden = torch.randn(batch, n, heads * d, dtype=torch.float64)
    glob = [0, 5, 14]
    mask = torch.zeros(batch, n, dtype=torch.float64)
    mask[:, glob] = 10000.0
    with torch.no_grad():
        out, probs, global_probs = layer(
            hidden, attention_mask=mask, is_index_masked=mask < 0,
            is_index_global_attn=mask > 0, is_global_attn=True, output_attentions=True)

        def split(proj):
            return proj(hidden).view(batch, n, heads, d).transpose(1, 2).numpy()
        q, k, v = split(layer.query), split(layer.key), split(layer.value)
        qg, kg, vg = (split(layer.query_global), split(layer.key_global),
                      split(layer.value_global))
    mine = ra.longformer_attention(q, k, v, window=w, global_tokens=glob, q_global=qg,
                                   k_global=kg, v_global=vg)
    hf_out = out.view(batch, n, heads, d).transpose(1, 2).numpy()
    assert max_rel_error(mine, hf_out) <= 1e-12
    assert max_rel_error(hf_out, _by_definition(q, k, v, qg, kg, vg, w, glob)) <= 1e-12
    rows = SPEC.implied_matrix(q, k, window=w, global_tokens=glob, q_global=qg,
                               k_global=kg)[:, :, glob]
    assert max_rel_error(rows, global_probs.numpy()) <= 1e-12
    # without separate projections HF's layer is refattn's plain Longformer
    for name in ("query", "key", "value"):
        getattr(layer, f"{name}_global").load_state_dict(getattr(layer, name).state_dict())
    with torch.no_grad():
        same = layer(hidden, attention_mask=mask, is_index_masked=mask < 0,
                     is_index_global_attn=mask > 0, is_global_attn=True)[0]
    plain = ra.longformer_attention(q, k, v, window=w, global_tokens=glob)
    assert max_rel_error(plain, same.view(batch, n, heads, d).transpose(1, 2).numpy()) \
        <= 1e-12
