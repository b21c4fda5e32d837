"""Gradients of the compression family (pooled, strided-KV, landmark, k-means KV
attention) and of the memory mechanisms (Compressive Transformer, persistent memory,
kNN memory).

Each VJP is checked three independent ways: central finite differences
(``numerical_vjp``, relative error <= 1e-7 normwise) for every differentiable input
(q, k, v; the compression weights; the memory slots; an array bias), agreement with
another form (blocks of query rows, exact attention where the mechanism reduces to it,
Transformer-XL's backward) <= 1e-11, and PyTorch float64 autograd through a
transcription of each forward written here (<= 1e-12). Discrete choices (landmarks by
norm, k-means clusters, max-pooling arg-maxes, kNN retrieval) are held fixed.
"""
import numpy as np
import pytest

import refattn as ra
import refattn.compression as rc
from refattn.compression.kmeans_kv import kmeans_kv_attention_vjp
from refattn.compression.landmark import landmark_attention_vjp
from refattn.compression.pooled import pooled_attention_vjp
from refattn.compression.strided_kv import strided_kv_attention_vjp
from refattn.memory import (compressive_attention, knn_memory_attention,
                            persistent_memory_attention)
from refattn.memory.compressive import compressive_attention_vjp
from refattn.memory.knn import knn_memory_attention_vjp
from refattn.memory.persistent import persistent_memory_attention_vjp
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

torch = pytest.importorskip("torch")

SLOW = pytest.mark.slow
FD = 1e-7          # finite differences
FORMS = 1e-11      # two forms of the same gradient
TORCH = 1e-12      # torch float64 autograd


def _problem(rng, *, n=5, m=7, hq=4, hkv=2, d=3, dv=2):
    """A batch of 2 with GQA (4 query heads on 2 KV heads) and ``k`` broadcast over the
    batch (its gradient must be summed back)."""
    q = rng.standard_normal((2, hq, n, d))
    k = rng.standard_normal((hkv, m, d))
    v = rng.standard_normal((2, hkv, m, dv))
    g = rng.standard_normal((2, hq, n, dv))
    return q, k, v, g


def _check(exact, numeric, tol=FD):
    for name, ref in numeric.items():
        assert exact[name].shape == ref.shape, name
        if np.abs(ref).max(initial=0) <= 1e-12:   # e.g. one key seen: q does not matter
            assert np.abs(exact[name]).max(initial=0) <= 1e-12, name
            continue
        err = max_rel_error(exact[name], ref, normwise=True)
        assert err <= tol, f"d{name}: {err:.2e}"


def _t(*arrays):
    return [torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
            for x in arrays]


def _torch_check(mine, names, tensors, loss, tol=TORCH):
    ref = torch.autograd.grad(loss, tensors, allow_unused=True)
    for name, r in zip(names, ref):
        r = np.zeros(mine[name].shape) if r is None else r.numpy()
        err = max_rel_error(mine[name], r, normwise=True)
        assert err <= tol, f"d{name}: {err:.2e}"


def _repeat(x, group):
    return x.repeat_interleave(group, dim=-3)


def _softmax(s):
    """Row softmax of masked logits with empty rows 0 (and the lse, 0 where empty)."""
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    lse = torch.logsumexp(s, dim=-1)
    return p, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


# ================================================================ compression
POOLED = {
    "mean": dict(stride=3),
    "mean causal local": dict(stride=3, causal=True, local=True),
    "mean causal log_count": dict(stride=2, causal=True, log_count=True),
    "max": dict(stride=3, pool="max"),
    "max causal local log_count": dict(stride=3, pool="max", causal=True, local=True,
                                       log_count=True),
    "one window": dict(stride=9, causal=True, local=True),
}


@pytest.mark.parametrize("case,n,m", [(case, 5, 7) for case in POOLED] + [
    pytest.param(case, 8, 7, marks=() if case == "mean causal local" else SLOW)
    for case in POOLED])
def test_pooled_finite_differences(rng, case, n, m):
    q, k, v, g = _problem(rng, n=n, m=m)
    kw = POOLED[case]
    exact = ra.vjp("pooled_attention", q, k, v, g, **kw)
    _check(exact, numerical_vjp(ra.pooled_attention, dict(q=q, k=k, v=v), g, **kw))
    if n > m and kw.get("causal"):                    # the first N - M queries see nothing
        assert not exact["q"][..., : n - m, :].any()


@pytest.mark.parametrize("case", [dict(stride=2), dict(stride=3, offset=2, causal=True),
                                  dict(stride=1, causal=True)])
@pytest.mark.parametrize("n,m", [(5, 7), (7, 4)])
def test_strided_finite_differences_and_masked_attention(rng, case, n, m):
    q, k, v, g = _problem(rng, n=n, m=m)
    exact = ra.vjp("strided_kv_attention", q, k, v, g, **case)
    _check(exact, numerical_vjp(ra.strided_kv_attention, dict(q=q, k=k, v=v), g, **case))
    keep = np.zeros(m, bool)
    keep[case.get("offset", 0)::case["stride"]] = True
    dense = ra.vjp("attention", q, k, v, g, mask=np.broadcast_to(keep, (n, m)),
                   causal=case.get("causal", False))
    _check(exact, dense, FORMS)


@pytest.mark.parametrize("case", [dict(indices=[1, 5, 2]), dict(indices=[4, 0],
                                  causal=True), dict(num_landmarks=3),
                                  dict(num_landmarks=3, causal=True),
                                  dict(num_landmarks=9)])
def test_landmark_finite_differences(rng, case):
    q, k, v, g = _problem(rng, n=6, m=7)
    exact = ra.vjp("landmark_attention", q, k, v, g, **case)
    _check(exact, numerical_vjp(ra.landmark_attention, dict(q=q, k=k, v=v), g, **case))
    if "indices" in case:                 # the other keys and values get no gradient
        other = np.setdiff1d(np.arange(7), case["indices"])
        assert not exact["k"][..., other, :].any() and not exact["v"][..., other, :].any()
    if case.get("num_landmarks") == 9:    # every key: exact attention's gradient
        _check(exact, ra.vjp("attention", q, k, v, g), FORMS)


@pytest.mark.parametrize("n_centroids,log_count", [(3, True), (3, False), (7, True),
                                                   pytest.param(1, True, marks=SLOW)])
def test_kmeans_finite_differences(rng, log_count, n_centroids):
    q, k, v, g = _problem(rng, n=5, m=7)
    kw = dict(n_centroids=n_centroids, rng=3, log_count=log_count)
    exact = ra.vjp("kmeans_kv_attention", q, k, v, g, **kw)
    _check(exact, numerical_vjp(ra.kmeans_kv_attention, dict(q=q, k=k, v=v), g, **kw))
    if n_centroids == 7:                  # one key per cluster: exact attention
        _check(exact, ra.vjp("attention", q, k, v, g), FORMS)


COMPRESSION = [
    (pooled_attention_vjp, ra.pooled_attention,
     dict(stride=3, pool="max", causal=True, local=True, log_count=True)),
    (pooled_attention_vjp, ra.pooled_attention, dict(stride=2, causal=True, local=True)),
    (strided_kv_attention_vjp, ra.strided_kv_attention, dict(stride=2, causal=True)),
    (landmark_attention_vjp, ra.landmark_attention, dict(num_landmarks=4, causal=True)),
    (kmeans_kv_attention_vjp, ra.kmeans_kv_attention, dict(n_centroids=4, rng=1)),
]


@pytest.mark.parametrize("vjp,fn,kw", COMPRESSION, ids=lambda x: getattr(x, "__name__", ""))
def test_compression_blocks_of_query_rows_agree(rng, monkeypatch, vjp, fn, kw):
    """Tiny row blocks (1 or 2 rows, set through the package's BLOCK_ELEMENTS) against
    one block: the same gradients, to rounding."""
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    whole = vjp(q, k, v, g, **kw)
    for block in (1, 17):
        monkeypatch.setattr(rc, "BLOCK_ELEMENTS", block)
        _check(vjp(q, k, v, g, **kw), whole, FORMS)


# ----------------------------------------------------- torch transcriptions
def _torch_windows(k, stride, pool):
    m = k.shape[-2]
    parts = [k[..., a:min(a + stride, m), :] for a in range(0, m, stride)]
    red = (lambda x: x.mean(-2)) if pool == "mean" else (lambda x: x.max(-2).values)
    return torch.stack([red(x) for x in parts], -2)


def _torch_pooled(q, k, v, *, stride, pool="mean", causal=False, local=False,
                  log_count=False, scale):
    n, m, group = q.shape[-2], k.shape[-2], q.shape[-3] // k.shape[-3]
    kc, vc = (_repeat(_torch_windows(x, stride, pool), group) for x in (k, v))
    kr, vr = _repeat(k, group), _repeat(v, group)
    starts = np.arange(0, m, stride)
    size = np.minimum(starts + stride, m) - starts
    last = starts + size - 1
    pos = np.arange(n) + m - n
    sc = scale * q @ kc.transpose(-1, -2) + torch.tensor(np.log(size) if log_count else
                                                         np.zeros(len(size)))
    keep_c = last[None] <= pos[:, None] if causal else np.ones((n, len(size)), bool)
    j = np.arange(m)
    own = np.clip(pos, 0, None) // stride
    open_ = (pos >= 0) & (last[np.minimum(own, len(last) - 1)] > pos)
    keep_r = (causal and local) & open_[:, None] & (j[None] >= own[:, None] * stride) & \
        (j[None] <= pos[:, None])
    sr = scale * q @ kr.transpose(-1, -2)
    s = torch.cat([sc.masked_fill(~torch.tensor(keep_c), -np.inf),
                   sr.masked_fill(~torch.tensor(keep_r), -np.inf)], -1)
    p, _ = _softmax(s)
    return p[..., :len(size)] @ vc + p[..., len(size):] @ vr


def _torch_masked(q, k, v, keep, scale):
    """Attention of ``q`` over ``k``, ``v`` keeping ``keep`` (bool, broadcast to the
    logits)."""
    group = q.shape[-3] // k.shape[-3]
    s = scale * q @ _repeat(k, group).transpose(-1, -2)
    p, _ = _softmax(s.masked_fill(~torch.as_tensor(keep), -np.inf))
    return p @ _repeat(v, group)


@pytest.mark.parametrize("case", POOLED)
def test_pooled_matches_torch_autograd(rng, case):
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    kw = POOLED[case]
    tq, tk, tv = _t(q, k, v)
    out = _torch_pooled(tq, tk, tv, scale=0.6, **kw)
    np.testing.assert_allclose(out.detach().numpy(),
                               ra.pooled_attention(q, k, v, scale=0.6, **kw), atol=1e-13)
    _torch_check(ra.vjp("pooled_attention", q, k, v, g, scale=0.6, **kw), "qkv",
                 (tq, tk, tv), (out * torch.tensor(g)).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_strided_and_landmarks_match_torch_autograd(rng, causal):
    n, m = 9, 11
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3)
    pos = np.arange(n) + m - n
    visible = (np.arange(m)[None] <= pos[:, None]) if causal else np.ones((n, m), bool)
    tq, tk, tv = _t(q, k, v)
    # strided: keys 1, 4, 7, 10
    keep = visible & (np.arange(m) % 3 == 1)[None]
    out = _torch_masked(tq, tk, tv, keep, 0.5)
    _torch_check(ra.vjp("strided_kv_attention", q, k, v, g, stride=3, offset=1,
                        causal=causal, scale=0.5), "qkv", (tq, tk, tv),
                 (out * torch.tensor(g)).sum())
    # landmarks by norm: per KV head, per query the 4 largest-norm keys it sees
    norms = np.linalg.norm(k, axis=-1)                               # (Hkv, M)
    keep = np.zeros((2, n, m), bool)
    for h in range(2):
        for i in range(n):
            seen = np.flatnonzero(visible[i])
            best = seen[np.argsort(-norms[h, seen], kind="stable")[:4]]
            keep[h, i, best] = True
    keep = np.repeat(keep, 2, axis=0)                                # per query head
    out = _torch_masked(tq, tk, tv, keep, 0.5)
    mine = ra.vjp("landmark_attention", q, k, v, g, num_landmarks=4, causal=causal,
                  scale=0.5)
    _torch_check(mine, "qkv", (tq, tk, tv), (out * torch.tensor(g)).sum())


def test_kmeans_matches_torch_autograd(rng):
    """Keys in three tight, far-apart groups: k-means finds them, so the transcription
    knows the clusters without running k-means (checked through the forward)."""
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    centers = 6.0 * rng.standard_normal((2, 3, 4))
    k = centers[:, labels] + 0.1 * rng.standard_normal((2, 10, 4))
    q = rng.standard_normal((2, 4, 6, 4))
    v = rng.standard_normal((2, 2, 10, 3))
    g = rng.standard_normal((2, 4, 6, 3))
    for log_count in (True, False):
        tq, tk, tv = _t(q, k, v)
        w = np.eye(3)[labels].T                                       # (C, M)
        counts = w.sum(1)
        mean = torch.tensor(w / counts[:, None])
        kc, vc = _repeat(mean @ tk, 2), _repeat(mean @ tv, 2)
        s = 0.5 * tq @ kc.transpose(-1, -2)
        if log_count:
            s = s + torch.tensor(np.log(counts))
        out = torch.softmax(s, -1) @ vc
        kw = dict(n_centroids=3, rng=0, log_count=log_count, scale=0.5)
        np.testing.assert_allclose(out.detach().numpy(),
                                   ra.kmeans_kv_attention(q, k, v, **kw), atol=1e-13)
        _torch_check(ra.vjp("kmeans_kv_attention", q, k, v, g, **kw), "qkv",
                     (tq, tk, tv), (out * torch.tensor(g)).sum())


def test_compression_bad_cotangents_and_extremes(rng):
    q, k, v, g = _problem(rng, n=5, m=7)
    for name, kw in [("pooled_attention", dict(stride=2)),
                     ("strided_kv_attention", dict(stride=2)),
                     ("landmark_attention", dict(num_landmarks=2)),
                     ("kmeans_kv_attention", dict(n_centroids=2, rng=0))]:
        with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                             r"\(2, 4, 5, 2\), got \(2, 4, 5, 3\)"):
            ra.vjp(name, q, k, v, np.ones((2, 4, 5, 3)), **kw)
        big = ra.vjp(name, 1e3 * q, k, v, g, **kw)                  # logits ~ 1e3
        assert all(np.isfinite(x).all() for x in big.values()), name
    with pytest.raises(ValueError, match="stride"):
        ra.vjp("pooled_attention", q, k, v, g, stride=0)


# ===================================================================== memory
COMPRESS = ("mean", "max", "kernel", "conv")


def _weights(rng, compress, rate, d, dv):
    if compress == "kernel":
        return rng.standard_normal(rate)
    if compress == "conv":
        return (rng.standard_normal((d, d, rate)), rng.standard_normal((dv, dv, rate)))
    return compress


@pytest.mark.parametrize("compress,n,m,softcap", [
    ("mean", 8, 8, None), ("max", 6, 8, 1.5), ("kernel", 8, 8, 1.5), ("conv", 9, 8, None)]
    + [pytest.param(c, n, m, cap, marks=SLOW) for c in COMPRESS
       for n, m, cap in [(10, 10, None), (7, 10, 1.5), (12, 10, None)]])
def test_compressive_finite_differences(rng, compress, n, m, softcap):
    q, k, v, g = _problem(rng, n=n, m=m, hq=2, hkv=1)
    glse = rng.standard_normal(g.shape[:-1])
    glse[..., : max(0, n - m)] = 0.0                  # lse -inf there: no cotangent
    w = _weights(rng, compress, 2, 3, 2)
    kw = dict(segment_len=2, mem_len=2, cmem_len=2, rate=2, compress=w, softcap=softcap)
    exact = ra.vjp("compressive_attention", q, k, v, g, grad_lse=glse, **kw)

    def finite_lse(out_lse):                          # -inf (rows that see nothing) -> 0
        return out_lse[0], np.where(np.isinf(out_lse[1]), 0.0, out_lse[1])
    numeric = numerical_vjp(lambda **x: finite_lse(compressive_attention(
        **x, return_lse=True, **kw)), dict(q=q, k=k, v=v), (g, glse))
    _check(exact, numeric)
    if compress in ("kernel", "conv"):
        ws = dict(w=w) if compress == "kernel" else dict(wk=w[0], wv=w[1])

        def fn(**x):
            return finite_lse(compressive_attention(q, k, v, return_lse=True, **dict(
                kw, compress=x["w"] if compress == "kernel" else (x["wk"], x["wv"]))))
        numeric = numerical_vjp(fn, ws, (g, glse))
        got = (dict(w=exact["compress"]) if compress == "kernel"
               else dict(zip(ws, exact["compress"])))
        _check(got, numeric)
    else:
        assert "compress" not in exact
    if n > m:                                          # rows at negative positions
        assert not exact["q"][..., : n - m, :].any()


def test_compressive_reduces_to_transformer_xl(rng):
    q, k, v, g = _problem(rng, n=11, m=13, d=4, dv=3)
    glse = rng.standard_normal(g.shape[:-1])
    xl = ra.vjp("transformer_xl_attention", q, k, v, g, grad_lse=glse, segment_len=3,
                mem_len=3, softcap=2.0)
    no_slots = ra.vjp("compressive_attention", q, k, v, g, grad_lse=glse, segment_len=3,
                      mem_len=3, cmem_len=0, rate=3, compress=np.ones(3), softcap=2.0)
    _check(no_slots, xl, FORMS)
    assert not no_slots["compress"].any()             # unused weights: zero gradient
    xl = ra.vjp("transformer_xl_attention", q, k, v, g, segment_len=3, mem_len=7)
    rate1 = ra.vjp("compressive_attention", q, k, v, g, segment_len=3, mem_len=3,
                   cmem_len=4, rate=1)
    _check(rate1, xl, FORMS)


def _torch_compress(x, rate, compress, w):
    units = x.shape[-2] // rate
    groups = x[..., :units * rate, :].reshape(x.shape[:-2] + (units, rate, x.shape[-1]))
    if compress == "mean":
        return groups.mean(-2)
    if compress == "max":
        return groups.max(-2).values
    if compress == "kernel":
        return torch.einsum("...urf,r->...uf", groups, w)
    return torch.einsum("...uri,oir->...uo", groups, w)


def _torch_compressive(q, k, v, *, segment_len, mem_len, cmem_len, rate, compress,
                       wk, wv, scale, softcap):
    """Per query, its definition: slots ``[U - cmem_len, U)`` then raw keys
    ``[max(0, s0 - mem_len), i']``, one softmax."""
    n, m, group = q.shape[-2], k.shape[-2], q.shape[-3] // k.shape[-3]
    ck, cv = (_repeat(_torch_compress(x, rate, compress, w), group)
              for x, w in ((k, wk), (v, wv)))
    kr, vr = _repeat(k, group), _repeat(v, group)
    outs, lses = [], []
    for i in range(n):
        p = i + m - n
        if p < 0:
            outs.append(torch.zeros(q.shape[:-2] + (v.shape[-1],), dtype=q.dtype))
            lses.append(torch.zeros(q.shape[:-2], dtype=q.dtype))
            continue
        s0 = p // segment_len * segment_len
        lo = max(0, s0 - mem_len)
        u = lo // rate
        slots = slice(max(0, u - cmem_len), u)
        keys = torch.cat([ck[..., slots, :], kr[..., lo:p + 1, :]], -2)
        vals = torch.cat([cv[..., slots, :], vr[..., lo:p + 1, :]], -2)
        s = scale * torch.einsum("...d,...ld->...l", q[..., i, :], keys)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        outs.append(torch.einsum("...l,...lf->...f", torch.softmax(s, -1), vals))
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs, -2), torch.stack(lses, -1)


@pytest.mark.parametrize("compress", COMPRESS)
@pytest.mark.parametrize("n,m", [(13, 13), (9, 13), (15, 13)])
def test_compressive_matches_torch_autograd(rng, compress, n, m):
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3)
    glse = rng.standard_normal(g.shape[:-1])
    w = _weights(rng, compress, 2, 4, 3)
    kw = dict(segment_len=4, mem_len=2, cmem_len=3, rate=2, scale=0.7, softcap=2.5)
    tq, tk, tv = _t(q, k, v)
    ws = _t(w) if compress == "kernel" else _t(*w) if compress == "conv" else []
    wk, wv = (ws[0], ws[0]) if compress == "kernel" else ws if ws else (None, None)
    out, lse = _torch_compressive(tq, tk, tv, compress=compress, wk=wk, wv=wv, **kw)
    mine_out, mine_lse = compressive_attention(q, k, v, compress=w, return_lse=True, **kw)
    np.testing.assert_allclose(out.detach().numpy(), mine_out, atol=1e-13)
    loss = (out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum()
    mine = ra.vjp("compressive_attention", q, k, v, g, grad_lse=glse, compress=w, **kw)
    names = ["q", "k", "v"]
    if compress == "kernel":
        names.append("compress")
    elif compress == "conv":
        mine = dict(mine, wk=mine["compress"][0], wv=mine["compress"][1])
        names += ["wk", "wv"]
    _torch_check(mine, names, [tq, tk, tv] + list(ws), loss)


def test_compressive_bad_cotangents_and_extremes(rng):
    q, k, v, g = _problem(rng, n=6, m=6)
    kw = dict(segment_len=2, mem_len=2, cmem_len=2, rate=2)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 6, 2\), got \(4, 6, 2\)"):
        ra.vjp("compressive_attention", q, k, v, g[0], **kw)
    with pytest.raises(ValueError, match=r"grad_lse must have the output's shape "
                                         r"\(2, 4, 6\)"):
        ra.vjp("compressive_attention", q, k, v, g, grad_lse=np.ones(6), **kw)
    with pytest.raises(ValueError, match="compress"):
        ra.vjp("compressive_attention", q, k, v, g, compress=np.ones(3), **kw)
    big = ra.vjp("compressive_attention", 1e3 * q, k, v, g, compress="max", **kw)
    assert all(np.isfinite(x).all() for x in big.values())


# ----------------------------------------------------------- persistent memory
def _slots(rng, p=3, d=3, dv=2):
    """Slot keys shared by the batch (no batch dim), values broadcast from a batch of
    1: both gradients must be summed back."""
    return rng.standard_normal((2, p, d)), rng.standard_normal((1, 2, p, dv))


PERSISTENT = {
    "plain": {},
    "causal softcap": dict(causal=True, softcap=1.3),
    "window bias softcap": dict(causal=True, softcap=2.0, mask=ra.masks.sliding_window(2),
                                bias="array"),
    "empty rows": dict(mask=np.zeros((5, 7), bool)),           # only the slots are seen
}


@pytest.mark.parametrize("case", PERSISTENT)
def test_persistent_finite_differences(rng, case):
    q, k, v, g = _problem(rng, n=5, m=7)
    glse = rng.standard_normal(g.shape[:-1])
    mk, mv = _slots(rng)
    kw = dict(PERSISTENT[case])
    inputs = dict(q=q, k=k, v=v, mem_k=mk, mem_v=mv)
    if kw.pop("bias", None) == "array":
        inputs["bias"] = rng.standard_normal((4, 1, 7))      # broadcast over the batch
    exact = ra.vjp("persistent_memory_attention", q, k, v, g, grad_lse=glse, mem_k=mk,
                   mem_v=mv, **kw, **{x: inputs[x] for x in ("bias",) if x in inputs})
    numeric = numerical_vjp(lambda **x: persistent_memory_attention(
        **x, return_lse=True, **kw), inputs, (g, glse))
    _check(exact, numeric)


def test_persistent_equals_attention_over_the_concatenation(rng):
    q, k, v, g = _problem(rng, n=6, m=6, d=4, dv=3)
    k = np.broadcast_to(k, (2,) + k.shape)
    glse = rng.standard_normal(g.shape[:-1])
    mk, mv = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 3, 3))
    mine = ra.vjp("persistent_memory_attention", q, k, v, g, grad_lse=glse, mem_k=mk,
                  mem_v=mv, causal=True)
    keep = np.hstack([np.ones((6, 3), bool), np.tril(np.ones((6, 6), bool))])
    ref = ra.vjp("attention", q, np.concatenate([mk, k], -2), np.concatenate([mv, v], -2),
                 g, grad_lse=glse, mask=keep)
    _check(mine, dict(q=ref["q"], k=ref["k"][..., 3:, :], v=ref["v"][..., 3:, :],
                      mem_k=ref["k"][..., :3, :], mem_v=ref["v"][..., :3, :]), FORMS)
    rand = ra.vjp("persistent_memory_attention", q, k, v, g, num_slots=3, rng=5)
    assert sorted(rand) == ["k", "q", "v"]              # drawn slots: constants


def test_persistent_matches_torch_autograd(rng):
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    glse = rng.standard_normal(g.shape[:-1])
    mk, mv = _slots(rng, p=4, d=4, dv=3)
    bias = rng.standard_normal((4, 9, 11))
    keep = ra.masks.sliding_window(4, right=1).materialize(9, 11)
    tq, tk, tv, tmk, tmv, tb = _t(q, k, v, mk, mv, bias)
    s_slot = 0.4 * tq @ _repeat(tmk, 2).transpose(-1, -2)
    s_seq = 0.4 * tq @ _repeat(tk, 2).transpose(-1, -2)
    s_slot, s_seq = (1.5 * torch.tanh(x / 1.5) for x in (s_slot, s_seq))
    s_seq = (s_seq + tb).masked_fill(~torch.tensor(keep), -np.inf)
    p, lse = _softmax(torch.cat([s_slot.expand(s_seq.shape[:-1] + (4,)), s_seq], -1))
    out = p @ torch.cat([_repeat(tmv, 2).expand(2, 4, 4, 3), _repeat(tv, 2)], -2)
    loss = (out * torch.tensor(g)).sum() + (lse * torch.tensor(glse)).sum()
    mine = ra.vjp("persistent_memory_attention", q, k, v, g, grad_lse=glse, mem_k=mk,
                  mem_v=mv, mask=keep, scale=0.4, softcap=1.5, bias=bias)
    _torch_check(mine, ("q", "k", "v", "mem_k", "mem_v", "bias"),
                 (tq, tk, tv, tmk, tmv, tb), loss)


# ------------------------------------------------------------------ kNN memory
KNN = {
    "plain": dict(topk=2, gate=0.3),
    "per-head gate, window, softcap": dict(topk=3, gate=np.array([0.1, 0.5, 0.9, 1.0]),
                                           local_window=2, softcap=1.3),
    "bias, mask": dict(topk=2, gate=0.6, bias="array", mask=ra.masks.sliding_window(3)),
    "whole store": dict(topk=50, gate=0.5),
}


@pytest.mark.parametrize("case,n,m", [(case, 5, 7) for case in KNN] + [
    pytest.param(case, 8, 6, marks=() if case == "plain" else SLOW) for case in KNN])
def test_knn_finite_differences(rng, case, n, m):
    q, k, v, g = _problem(rng, n=n, m=m)
    mk, mv = _slots(rng, p=6)
    kw = dict(KNN[case])
    inputs = dict(q=q, k=k, v=v, mem_k=mk, mem_v=mv)
    if kw.pop("bias", None) == "array":
        inputs["bias"] = rng.standard_normal((4, 1, m))
    exact = ra.vjp("knn_memory_attention", q, k, v, g, mem_k=mk, mem_v=mv, **kw,
                   **{x: inputs[x] for x in ("bias",) if x in inputs})
    _check(exact, numerical_vjp(lambda **x: knn_memory_attention(**x, **kw), inputs, g))


def test_knn_limits(rng):
    """The whole store retrieved: ``g · attention(q, M_k, M_v)`` plus ``(1 - g) ·``
    causal attention, their gradients added; random stores are constants."""
    q, k, v, g = _problem(rng, n=6, m=6, d=4, dv=3)
    mk, mv = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 3))
    mine = ra.vjp("knn_memory_attention", q, k, v, g, mem_k=mk, mem_v=mv, topk=5, gate=0.2)
    mem = ra.vjp("attention", q, mk, mv, 0.2 * g)
    loc = ra.vjp("attention", q, k, v, 0.8 * g, causal=True)
    _check(mine, dict(q=mem["q"] + loc["q"], k=loc["k"], v=loc["v"], mem_k=mem["k"],
                      mem_v=mem["v"]), FORMS)
    rand = ra.vjp("knn_memory_attention", q, k, v, g, num_slots=4, rng=1, topk=2, gate=1.0)
    assert sorted(rand) == ["k", "q", "v"] and not rand["k"].any()   # gate 1: no local
    empty = ra.vjp("knn_memory_attention", q, k, v, g, mem_k=mk[..., :0, :],
                   mem_v=mv[..., :0, :], topk=2, gate=0.5)
    assert empty["mem_k"].shape == (2, 2, 0, 4)
    _check(dict(q=empty["q"]), dict(q=ra.vjp("attention", q, k, v, 0.5 * g,
                                             causal=True)["q"]), FORMS)


def test_knn_matches_torch_autograd(rng):
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    mk, mv = _slots(rng, p=8, d=4, dv=3)
    bias = rng.standard_normal((4, 9, 11))
    gate = np.array([0.2, 0.4, 0.6, 0.8])
    tq, tk, tv, tmk, tmv, tb = _t(q, k, v, mk, mv, bias)
    dot = tq @ _repeat(tmk, 2).transpose(-1, -2)                     # (2, 4, 9, 8)
    order = np.argsort(-dot.detach().numpy(), axis=-1, kind="stable")[..., :3]
    keep = np.zeros(dot.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    s_mem = (1.5 * torch.tanh(0.4 * dot / 1.5)).masked_fill(~torch.tensor(keep), -np.inf)
    o_mem = torch.softmax(s_mem, -1) @ _repeat(tmv, 2)
    pos = np.arange(9) + 2
    j = np.arange(11)
    local = (j[None] <= pos[:, None]) & (pos[:, None] - j[None] <= 4)
    s_loc = 1.5 * torch.tanh(0.4 * tq @ _repeat(tk, 2).transpose(-1, -2) / 1.5) + tb
    o_loc = _softmax(s_loc.masked_fill(~torch.tensor(local), -np.inf))[0] @ _repeat(tv, 2)
    tg = torch.tensor(gate)[:, None, None]
    out = tg * o_mem + (1 - tg) * o_loc
    kw = dict(mem_k=mk, mem_v=mv, topk=3, gate=gate, local_window=4, scale=0.4,
              softcap=1.5, bias=bias)
    np.testing.assert_allclose(out.detach().numpy(), knn_memory_attention(q, k, v, **kw),
                               atol=1e-13)
    _torch_check(ra.vjp("knn_memory_attention", q, k, v, g, **kw),
                 ("q", "k", "v", "mem_k", "mem_v", "bias"), (tq, tk, tv, tmk, tmv, tb),
                 (out * torch.tensor(g)).sum())


def test_memory_bad_cotangents_and_extremes(rng):
    q, k, v, g = _problem(rng, n=5, m=7)
    mk, mv = _slots(rng)
    for name, kw in [("persistent_memory_attention", dict(mem_k=mk, mem_v=mv)),
                     ("knn_memory_attention", dict(mem_k=mk, mem_v=mv, topk=2, gate=0.5))]:
        with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                             r"\(2, 4, 5, 2\), got \(2, 4, 5\)"):
            ra.vjp(name, q, k, v, g[..., 0], **kw)
        big = ra.vjp(name, 1e3 * q, k, v, g, **kw)
        assert all(np.isfinite(x).all() for x in big.values()), name
    with pytest.raises(ValueError, match="gate"):
        ra.vjp("knn_memory_attention", q, k, v, g, mem_k=mk, mem_v=mv, topk=2, gate=1.5)
    with pytest.raises(ValueError, match="mem_k"):
        ra.vjp("persistent_memory_attention", q, k, v, g, mem_k=mk[..., :2], mem_v=mv)


def test_every_vjp_is_attached_to_its_mechanism():
    attached = {"pooled_attention": pooled_attention_vjp,
                "strided_kv_attention": strided_kv_attention_vjp,
                "landmark_attention": landmark_attention_vjp,
                "kmeans_kv_attention": kmeans_kv_attention_vjp,
                "compressive_attention": compressive_attention_vjp,
                "persistent_memory_attention": persistent_memory_attention_vjp,
                "knn_memory_attention": knn_memory_attention_vjp}
    for name, vjp in attached.items():
        assert ra.mechanisms()[name].vjp is vjp, name
