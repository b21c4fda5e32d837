"""Gradients of the mechanisms with discrete choices, the choices held fixed: routing,
clustered and i-clustered attention (k-means clusters), Reformer LSH attention (hash
buckets), Scatterbrain (random features and sparse support) and PVT's spatial-reduction
attention (a fixed pooling, no choice at all).

Each VJP is checked against central finite differences (inputs small and away from ties,
so the selection does not change under the step; relative error <= 1e-7 normwise),
against a PyTorch float64 autograd transcription written here with the selection passed
in as a fixed mask or assignment (<= 1e-12), against the dense attention VJP in the
limits where the mechanism is exact (one cluster, every query its own cluster, k = M,
one bucket and one chunk, support = every key, ratio 1), across block sizes, and for
bad cotangents and extreme inputs.
"""
import math

import numpy as np
import pytest

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

CLUSTERED = {"routing_attention": {"n_clusters": 3},
             "clustered_attention": {"n_clusters": 3},
             "improved_clustered_attention": {"n_clusters": 3, "topk": 3}}


def _rel(exact, other, names="qkv"):
    return max(max_rel_error(exact[x], other[x], normwise=True) for x in names)


def _problem(seed, *, n=7, m=6, hq=4, hkv=2, d=3, dv=2, scale=1.0):
    """A batch of 2 with GQA (4 query heads on 2 KV heads), ``k`` broadcast over the
    batch."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, hq, n, d)) * scale
    k = rng.standard_normal((hkv, m, d)) * scale
    v = rng.standard_normal((2, hkv, m, dv))
    return q, k, v, rng.standard_normal((2, hq, n, dv)), rng.standard_normal((2, hq, n))


def _lse_cotangent(fn, q, k, v, glse, **kw):
    """``glse`` with zeros where the forward's lse is ``-inf`` (rows that see no key)."""
    _, lse = fn(q, k, v, return_lse=True, **kw)
    return np.where(np.isneginf(lse), 0.0, glse)


# ------------------------------------------------------------- finite differences
@pytest.mark.parametrize("name", CLUSTERED)
@pytest.mark.parametrize("options", [
    {}, {"causal": True, "softcap": 2.0}, {"mask": ra.masks.sliding_window(3, 1)},
    {"scale": 0.7, "bias": "array"}], ids=["plain", "causal+softcap", "window", "bias"])
def test_clustered_finite_differences(name, options):
    q, k, v, g, glse = _problem(1, n=5, m=6, hq=2, hkv=1)
    fn = getattr(ra, name)
    kw = dict(CLUSTERED[name], rng=0, **options)
    inputs = dict(q=q, k=k, v=v)
    if kw.get("bias") == "array":                    # broadcast over the batch
        kw["bias"] = inputs["bias"] = np.random.default_rng(9).standard_normal((2, 5, 6))
    glse = _lse_cotangent(fn, q, k, v, glse, **kw)
    exact = ra.vjp(name, q, k, v, g, grad_lse=glse, **kw)
    rest = {a: b for a, b in kw.items() if a not in inputs}
    numeric = numerical_vjp(lambda **x: fn(**x, return_lse=True, **rest), inputs, (g, glse))
    assert set(exact) == set(inputs)
    for x in inputs:
        assert exact[x].shape == np.shape(inputs[x])
        assert max_rel_error(exact[x], numeric[x], normwise=True) <= 1e-7, x


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_lsh_finite_differences(shared_qk, causal, n_hashes):
    q, k, v, g, glse = _problem(3, n=7, m=7)
    kw = dict(n_buckets=4, n_hashes=n_hashes, chunk_size=3, shared_qk=shared_qk,
              causal=causal, rng=5)
    _, lse = ra.lsh_attention(q, k, v, return_lse=True, **kw)
    # A shared-QK token alone in every round has lse = SELF_LOGIT = -1e5, where central
    # differences of <glse, lse> lose ~1e5 * eps / h: no lse cotangent on those rows.
    glse = np.where(lse < -1e4, 0.0, glse)
    exact = ra.vjp("lsh_attention", q, k, v, g, grad_lse=glse, **kw)
    numeric = numerical_vjp(lambda **x: ra.lsh_attention(**x, return_lse=True, **kw),
                            dict(q=q, k=k, v=v), (g, glse))
    assert _rel(exact, numeric, "qv") <= 1e-7
    if shared_qk:                        # k is not used: zero gradient
        assert not exact["k"].any() and not numeric["k"].any()
        assert "k" not in ra.vjp("lsh_attention", q, None, v, g, **kw)
    else:
        assert _rel(exact, numeric, "k") <= 1e-7


@pytest.mark.parametrize("options", [
    {"topk": 2}, {"topk": 3, "kernel": "hyperbolic", "scale": -0.4},
    {"support": "lsh", "n_buckets": 4, "n_hashes": 2},
    {"topk": 2, "block_q": 2, "orthogonal": False}])
def test_scatterbrain_finite_differences(options):
    q, k, v, g, _ = _problem(3, n=5, m=7, scale=0.7)
    kw = dict(num_features=6, rng=2, **options)
    exact = ra.vjp("scatterbrain_attention", q, k, v, g, **kw)
    numeric = numerical_vjp(ra.scatterbrain_attention, dict(q=q, k=k, v=v), g, **kw)
    assert _rel(exact, numeric) <= 1e-7


@pytest.mark.parametrize("ratio", [2, (2, 3), (4, 2), 1])
@pytest.mark.parametrize("options", [{}, {"softcap": 1.5, "scale": 0.6}])
def test_spatial_reduction_finite_differences(ratio, options):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 3, 4, 3))            # batch 2, Hq 4, grid 3 x 4
    k = rng.standard_normal((2, 5, 3, 3))               # Hkv 2, grid 5 x 3, broadcast
    v = rng.standard_normal((2, 2, 5, 3, 2))
    g, glse = rng.standard_normal((2, 4, 3, 4, 2)), rng.standard_normal((2, 4, 3, 4))
    exact = ra.vjp("spatial_reduction_attention", q, k, v, g, ratio=ratio, grad_lse=glse,
                   **options)
    numeric = numerical_vjp(
        lambda **x: ra.spatial_reduction_attention(**x, ratio=ratio, return_lse=True,
                                                   **options), dict(q=q, k=k, v=v),
        (g, glse))
    assert {x: exact[x].shape for x in "qkv"} == {"q": q.shape, "k": k.shape, "v": v.shape}
    assert _rel(exact, numeric) <= 1e-7


def test_spatial_reduction_one_dimensional_grid_and_short_last_block():
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((3, 1, 2, 7, 3))
    g = rng.standard_normal((1, 2, 7, 3))
    exact = ra.vjp("spatial_reduction_attention", q, k, v, g, ratio=(3,))   # 3 + 3 + 1
    numeric = numerical_vjp(ra.spatial_reduction_attention, dict(q=q, k=k, v=v), g,
                            ratio=(3,))
    assert _rel(exact, numeric) <= 1e-7


# ------------------------------------------------ limits where they become exact
def test_the_exact_limits_give_the_dense_vjp():
    q, k, v, g, glse = _problem(5, n=6, m=6)
    dense = ra.vjp("attention", q, k, v, g, grad_lse=glse, causal=True)
    cases = {"routing_attention": dict(n_clusters=1, causal=True, rng=0),
             "clustered_attention": dict(n_clusters=6, causal=True, rng=0),
             "improved_clustered_attention": dict(n_clusters=2, topk=6, causal=True,
                                                  rng=0)}
    for name, kw in cases.items():
        # (i-clustered returns the centroid's lse, exact only in its output)
        lse_ok = name != "improved_clustered_attention"
        got = ra.vjp(name, q, k, v, g, grad_lse=glse if lse_ok else None, **kw)
        ref = dense if lse_ok else ra.vjp("attention", q, k, v, g, causal=True)
        assert _rel(got, ref) <= 1e-12, name
    same = np.zeros((2, 2, 4, 6), dtype=int)             # one bucket, one chunk
    lsh = ra.vjp("lsh_attention", q, k, v, g, grad_lse=glse, n_buckets=2, n_hashes=2,
                 chunk_size=6, causal=True, buckets=(same, same[:, :, :2]))
    assert _rel(lsh, dense) <= 1e-12
    plain = ra.vjp("attention", q, k, v, g)
    sb = ra.vjp("scatterbrain_attention", q, k, v, g, num_features=4, topk=6, rng=0)
    assert _rel(sb, plain) <= 1e-12
    grid = [x.reshape(x.shape[:-2] + (2, 3, x.shape[-1])) for x in (q, k, v, g)]
    sra = ra.vjp("spatial_reduction_attention", *grid, ratio=1)
    assert max(max_rel_error(sra[x].reshape(plain[x].shape), plain[x], normwise=True)
               for x in "qkv") <= 1e-12


def test_one_cluster_of_clustered_attention_is_attention_of_the_mean_query():
    """One cluster: every query uses the mean query, so dq is the same for all of them
    (1/N of the mean query's gradient summed over rows)."""
    q, k, v, g, _ = _problem(6, n=5, m=6, hq=2, hkv=2)
    grads = ra.vjp("clustered_attention", q, k, v, g, n_clusters=1, rng=0)
    mean = np.broadcast_to(q.mean(-2, keepdims=True), q.shape)
    ref = ra.vjp("attention", mean, k, v, g)
    np.testing.assert_allclose(grads["q"], np.broadcast_to(
        ref["q"].sum(-2, keepdims=True) / 5, q.shape), rtol=1e-12, atol=1e-14)
    assert _rel(grads, ref, "kv") <= 1e-12


# ----------------------------------------------------------- forms (block sizes)
@pytest.mark.parametrize("name", CLUSTERED)
def test_block_sizes_do_not_change_the_clustered_gradients(name):
    q, k, v, g, glse = _problem(7, n=9, m=8)
    kw = dict(CLUSTERED[name], rng=0, causal=True, grad_lse=np.zeros_like(glse))
    ref = ra.vjp(name, q, k, v, g, **kw)
    for block_q in (1, 2, 4):
        assert _rel(ra.vjp(name, q, k, v, g, block_q=block_q, **kw), ref) <= 1e-12


def test_block_sizes_do_not_change_the_scatterbrain_gradients():
    q, k, v, g, _ = _problem(8, n=9, m=8, scale=0.7)
    kw = dict(num_features=6, topk=3, rng=1)
    ref = ra.vjp("scatterbrain_attention", q, k, v, g, **kw)
    for block_q in (1, 4):
        got = ra.vjp("scatterbrain_attention", q, k, v, g, block_q=block_q, **kw)
        assert _rel(got, ref) <= 1e-12


# ------------------------------------------------------ PyTorch float64 autograd
def _torch_grads(fn, arrays, g, glse=None):
    """Autograd gradients of ``<g, out> (+ <glse, lse>)`` for ``fn(*tensors)``."""
    import torch
    ts = [torch.tensor(x, requires_grad=True) for x in arrays]
    res = fn(*ts)
    out, lse = res if isinstance(res, tuple) else (res, None)
    loss = (out * torch.tensor(g)).sum()
    if glse is not None:
        loss = loss + torch.where(torch.tensor(glse) != 0, lse * torch.tensor(glse),
                                  torch.zeros_like(lse)).sum()
    grads = torch.autograd.grad(loss, ts, allow_unused=True)
    return [np.zeros(x.shape) if t is None else t.numpy() for x, t in zip(arrays, grads)]


def _t_logits(torch, q, k, group, scale, softcap=None):
    s = scale * q @ k.repeat_interleave(group, dim=-3).transpose(-1, -2)
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def _t_softmax(torch, s, keep):
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0), torch.logsumexp(s, -1)


def test_routing_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    q, k, v, g, glse = _problem(10, n=9, m=8, d=4)
    kw = dict(n_clusters=3, causal=True, softcap=2.5, rng=4)
    glse = _lse_cotangent(ra.routing_attention, q, k, v, glse, **kw)
    # the fixed selection: the keys each query is routed to (the implied matrix's
    # support; routing_clusters gives the same where a query's cluster holds a key)
    keep = torch.tensor(ra.sparse.routing_attention_matrix(q, k, **kw) > 0)
    qc, kc, _ = ra.sparse.routing_clusters(q, np.broadcast_to(k[None], (2,) + k.shape),
                                           n_clusters=3, rng=4)
    causal = np.tril(np.ones((9, 8), bool), -1)
    own = (qc[..., :, None] == kc[..., None, :]) & causal
    has = own.any(-1)
    np.testing.assert_array_equal(keep.numpy()[has], own[has])

    def fwd(tq, tk, tv):
        p, lse = _t_softmax(torch, _t_logits(torch, tq, tk, 2, 0.5, 2.5), keep)
        return p @ tv.repeat_interleave(2, dim=-3), lse
    ref = _torch_grads(fwd, (q, k, v), g, glse)
    got = ra.vjp("routing_attention", q, k, v, g, grad_lse=glse, **kw)
    for name, r in zip("qkv", ref):
        assert max_rel_error(got[name], r, normwise=True) <= 1e-12, name


@pytest.mark.parametrize("topk", [None, 3])
def test_clustered_matches_torch_autograd(topk):
    torch = pytest.importorskip("torch")
    q, k, v, g, glse = _problem(11, n=9, m=8, d=4)
    name = "clustered_attention" if topk is None else "improved_clustered_attention"
    kw = dict(n_clusters=3, causal=True, rng=2, **({} if topk is None else {"topk": topk}))
    glse = _lse_cotangent(getattr(ra, name), q, k, v, glse, **kw)
    assign, _ = ra.sparse.query_clusters(q, n_clusters=3, rng=2)     # the fixed clusters
    onehot = torch.tensor((assign[..., :, None] == np.arange(3)).astype(np.float64))
    allowed = torch.tensor(np.tril(np.ones((9, 8), bool), -1))
    scale = 0.5

    def fwd(tq, tk, tv):
        counts = onehot.sum(-2)                                      # (B, H, C)
        means = (onehot.transpose(-1, -2) @ tq) / counts.clamp(min=1)[..., None]
        cent = onehot @ means                                        # each query's
        a, lse = _t_softmax(torch, _t_logits(torch, cent, tk, 2, scale), allowed)
        vv = tv.repeat_interleave(2, dim=-3)
        if topk is None:
            return a @ vv, lse
        sc = _t_logits(torch, cent, tk, 2, scale).masked_fill(~allowed, float("-inf"))
        order = np.argsort(-sc.detach().numpy(), axis=-1, kind="stable")[..., :topk]
        top = np.zeros(sc.shape, bool)
        np.put_along_axis(top, order, True, axis=-1)
        top = torch.tensor(top) & allowed
        mass = (a * top).sum(-1, keepdim=True)
        e, _ = _t_softmax(torch, _t_logits(torch, tq, tk, 2, scale), top)
        return torch.where(top, mass * e, a) @ vv, lse
    ref = _torch_grads(fwd, (q, k, v), g, glse)
    got = ra.vjp(name, q, k, v, g, grad_lse=glse, **kw)
    for x, r in zip("qkv", ref):
        assert max_rel_error(got[x], r, normwise=True) <= 1e-12, x


def _attended(bq, bk, chunk, causal):
    """Per round, the attended (N, N) pairs by the definition, with plain loops."""
    rounds, n = bq.shape
    sets = np.zeros((rounds, n, n), bool)
    for r in range(rounds):
        order_q = sorted(range(n), key=lambda i: (bq[r, i], i))
        order_k = sorted(range(n), key=lambda j: (bk[r, j], j))
        for i in range(n):
            for j in range(n):
                cq, ck = order_q.index(i) // chunk, order_k.index(j) // chunk
                sets[r, i, j] = (bq[r, i] == bk[r, j] and ck in (cq - 1, cq)
                                 and not (causal and j > i))
    return sets


@pytest.mark.parametrize("shared_qk", [False, True])
def test_lsh_matches_torch_autograd(shared_qk):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    q, k, v = rng.standard_normal((2, 4, 11, 4)), rng.standard_normal((2, 2, 11, 4)), \
        rng.standard_normal((2, 2, 11, 3))
    g, glse = rng.standard_normal((2, 4, 11, 3)), rng.standard_normal((2, 4, 11))
    bq = rng.integers(0, 4, (3, 2, 4, 11))                         # the fixed buckets
    bk = bq if shared_qk else rng.integers(0, 4, (3, 2, 2, 11))
    bk_q = bk if shared_qk else np.repeat(bk, 2, axis=2)
    union = np.zeros((2, 4, 11, 11), bool)
    for b in range(2):
        for h in range(4):
            union[b, h] = _attended(bq[:, b, h], bk_q[:, b, h], 3, True).any(0)
    eye = np.eye(11, dtype=bool)
    if not shared_qk:
        union |= eye                                               # own-position key
    kw = dict(n_buckets=4, n_hashes=3, chunk_size=3, causal=True, shared_qk=shared_qk,
              buckets=bq if shared_qk else (bq, bk))
    _, lse = ra.lsh_attention(q, k, v, return_lse=True, **kw)
    glse = np.where(lse < -1e4, 0.0, glse)
    keep, self_pair = torch.tensor(union), torch.tensor(eye)

    def fwd(tq, tk, tv):
        if shared_qk:
            keys = tq / tq.norm(dim=-1, keepdim=True)
            s = 0.5 * tq @ keys.transpose(-1, -2)
            s = torch.where(self_pair & keep, torch.full_like(s, -1e5), s)
        else:
            s = _t_logits(torch, tq, tk, 2, 0.5)
        p, lse = _t_softmax(torch, s, keep)
        return p @ tv.repeat_interleave(2, dim=-3), lse
    ref = _torch_grads(fwd, (q, k, v), g, glse)
    got = ra.vjp("lsh_attention", q, k, v, g, grad_lse=glse, **kw)
    for x, r in zip("qkv", ref):
        if shared_qk and x == "k":
            assert not got[x].any() and not r.any()
            continue
        assert max_rel_error(got[x], r, normwise=True) <= 1e-12, x


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic"])
def test_scatterbrain_matches_torch_autograd(kernel):
    torch = pytest.importorskip("torch")
    q, k, v, g, _ = _problem(13, n=9, m=8, d=4, scale=0.8)
    m, scale = 5, 0.5
    omega = ra.performer.draw_omega(m, 4, orthogonal=True, rng=3)   # the fixed features
    logits = scale * q @ np.repeat(k, 2, axis=-3).swapaxes(-1, -2)
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :3]    # the fixed support
    top = np.zeros(logits.shape, bool)
    np.put_along_axis(top, order, True, axis=-1)
    top, w = torch.tensor(top), torch.tensor(omega)

    def phi(x):
        proj, half = x @ w.T, 0.5 * (x * x).sum(-1, keepdim=True)
        if kernel == "positive":
            return torch.exp(proj - half) / math.sqrt(m)
        return torch.cat([torch.exp(proj - half), torch.exp(-proj - half)], -1) \
            / math.sqrt(2 * m)

    def fwd(tq, tk, tv):
        x, y = tq * math.sqrt(scale), tk.repeat_interleave(2, dim=-3) * math.sqrt(scale)
        weights = torch.where(top, torch.exp(x @ y.transpose(-1, -2)),
                              phi(x) @ phi(y).transpose(-1, -2))
        return (weights @ tv.repeat_interleave(2, dim=-3)) / weights.sum(-1, keepdim=True)
    ref = _torch_grads(fwd, (q, k, v), g)
    got = ra.vjp("scatterbrain_attention", q, k, v, g, num_features=m, topk=3,
                 kernel=kernel, rng=3)
    for x, r in zip("qkv", ref):
        assert max_rel_error(got[x], r, normwise=True) <= 1e-12, x


def test_spatial_reduction_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 4, 5, 4, 3))
    k, v = rng.standard_normal((2, 2, 7, 5, 3)), rng.standard_normal((2, 2, 7, 5, 2))
    g, glse = rng.standard_normal((2, 4, 5, 4, 2)), rng.standard_normal((2, 4, 5, 4))
    pool = torch.nn.functional.avg_pool2d       # ceil_mode: the short last block averages

    def fwd(tq, tk, tv):                        # the tokens it has (padding=0)
        kp, vp = (pool(x.movedim(-1, -3).reshape(-1, x.shape[-1], 7, 5), (3, 2),
                       ceil_mode=True).reshape(2, 2, x.shape[-1], -1).transpose(-1, -2)
                  for x in (tk, tv))
        qf = tq.reshape(2, 4, 20, 3)
        s = _t_logits(torch, qf, kp, 2, 0.4, 1.5)
        p = torch.softmax(s, -1)
        out = p @ vp.repeat_interleave(2, dim=-3)
        return out.reshape(2, 4, 5, 4, 2), torch.logsumexp(s, -1).reshape(2, 4, 5, 4)
    out, _ = fwd(*(torch.tensor(x) for x in (q, k, v)))
    np.testing.assert_allclose(out.numpy(), ra.spatial_reduction_attention(
        q, k, v, (3, 2), scale=0.4, softcap=1.5), rtol=1e-13, atol=1e-14)
    ref = _torch_grads(fwd, (q, k, v), g, glse)
    got = ra.vjp("spatial_reduction_attention", q, k, v, g, ratio=(3, 2), scale=0.4,
                 softcap=1.5, grad_lse=glse)
    for x, r in zip("qkv", ref):
        assert max_rel_error(got[x], r, normwise=True) <= 1e-12, x


# ------------------------------------------------------ bad input, extreme input
BAD = {"routing_attention": dict(n_clusters=2, rng=0),
       "clustered_attention": dict(n_clusters=2, rng=0),
       "improved_clustered_attention": dict(n_clusters=2, topk=2, rng=0),
       "lsh_attention": dict(n_buckets=2, chunk_size=2, rng=0),
       "scatterbrain_attention": dict(num_features=4, topk=2, rng=0)}


@pytest.mark.parametrize("name", BAD)
def test_bad_grad_out_names_itself_and_the_expected_shape(name):
    q, k, v, _, _ = _problem(15, n=6, m=6)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 6, 2\), got \(2, 4, 6, 3\)"):
        ra.vjp(name, q, k, v, np.ones((2, 4, 6, 3)), **BAD[name])
    if name != "scatterbrain_attention":
        with pytest.raises(ValueError, match=r"grad_lse must have the output's shape "
                                             r"\(2, 4, 6\)"):
            ra.vjp(name, q, k, v, np.ones((2, 4, 6, 2)), grad_lse=np.ones(6), **BAD[name])


def test_spatial_reduction_bad_grad_out_and_cls_tokens():
    q, k, v = np.random.default_rng(16).standard_normal((3, 1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(1, 4, 4, 2\), got \(1, 16, 2\)"):
        ra.vjp("spatial_reduction_attention", q, k, v, np.ones((1, 16, 2)), ratio=2)
    cls = (np.ones((1, 1, 2)),) * 3
    with pytest.raises(TypeError, match="with cls_tokens, grad_out is the pair"):
        ra.vjp("spatial_reduction_attention", q, k, v, np.ones((1, 4, 4, 2)), ratio=2,
               cls_tokens=cls)


def test_extreme_and_empty_rows_give_finite_gradients():
    q, k, v, g, glse = _problem(17, n=6, m=4)
    big = q * 300.0                                          # logits in the thousands
    mask = np.ones((6, 4), bool)
    mask[2] = False                                          # a row that keeps no key
    for name, kw in CLUSTERED.items():
        for inputs in ((big, k, v), (q, k, v)):
            grads = ra.vjp(name, *inputs, g, rng=0, mask=mask, **kw)
            assert all(np.isfinite(x).all() for x in grads.values()), name
        if name == "routing_attention":                      # the empty row: nothing
            assert not grads["q"][..., 2, :].any()
    q, k, v, g, glse = _problem(18, n=6, m=6)
    for shared in (False, True):
        grads = ra.vjp("lsh_attention", q * 300.0, k, v, g, grad_lse=glse, n_buckets=2,
                       chunk_size=2, shared_qk=shared, causal=True, rng=0)
        assert all(np.isfinite(x).all() for x in grads.values())
    zero = q.copy()
    zero[..., 1, :] = 0.0                                    # a zero query, shared-QK key 0
    grads = ra.vjp("lsh_attention", zero, None, v, g, n_buckets=2, chunk_size=3,
                   shared_qk=True, rng=0)
    assert all(np.isfinite(x).all() for x in grads.values())
    grads = ra.vjp("scatterbrain_attention", q * 10.0, k * 10.0, v, g, num_features=4,
                   topk=2, rng=0)
    assert all(np.isfinite(x).all() for x in grads.values())
    grid = [x.reshape(x.shape[:-2] + (2, 3, x.shape[-1])) for x in (q * 300.0, k, v, g)]
    grads = ra.vjp("spatial_reduction_attention", *grid, ratio=2)
    assert all(np.isfinite(x).all() for x in grads.values())


def test_a_generator_rng_advances_so_pass_the_same_seed():
    """The clusters are those of the forward only for the same draw: an int seed."""
    q, k, v, g, _ = _problem(19, n=8, m=8)
    a = ra.vjp("routing_attention", q, k, v, g, n_clusters=3, rng=7)
    b = ra.vjp("routing_attention", q, k, v, g, n_clusters=3, rng=np.random.default_rng(7))
    assert all(np.array_equal(a[x], b[x]) for x in "qkv")
