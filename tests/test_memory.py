"""Memory-augmented attention against independent forms: Transformer-XL's segment
recurrence against exact attention under its mask and against a re-run of the paper's
memory update; the Compressive Transformer against a per-query loop over its definition,
the paper's segment-by-segment algorithm, Transformer-XL (rate 1) and PyTorch's conv1d;
persistent memory against attention over the concatenated keys; kNN memory against a
loop with explicit sorting, and its limits (topk = S, gate 0 and 1)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import refattn as ra
from conftest import naive_attention
from refattn.memory import (compress_memory, compressive_attention,
                            compressive_attention_matrix, compressive_init_state,
                            compressive_step, knn_memory_attention,
                            knn_memory_attention_matrix, persistent_memory_attention,
                            persistent_memory_attention_matrix, random_memory,
                            transformer_xl_attention, transformer_xl_attention_matrix,
                            transformer_xl_init_state, transformer_xl_mask,
                            transformer_xl_step)
from refattn.testing import strategies as rst

TIGHT = dict(rtol=1e-12, atol=1e-13)
FEW = settings(max_examples=30)


def _inputs(**kw):
    return rst.attention_inputs(rst.shapes(**kw), dtype="float64")


def _flat(x):
    """``(..., H, L, D)`` -> ``(B, H, L, D)`` after broadcasting the batch dims."""
    return x.reshape((int(np.prod(x.shape[:-3])),) + x.shape[-3:])


def _softmax_out(s, vals):
    """Softmax of the 1-D logits ``s`` (``-inf`` dropped) applied to ``vals``; zeros and
    ``-inf`` when nothing is kept."""
    if s.size == 0 or np.isneginf(s).all():
        return np.zeros(vals.shape[-1]), -np.inf
    w = np.exp(s - s.max())
    return w @ vals / w.sum(), s.max() + np.log(w.sum())


# ================================================================ Transformer-XL
def _xl_keep(n, m, segment_len, mem_len):
    """The definition: keep j for position i' iff seg_start(i') - mem_len <= j <= i'."""
    pos = np.arange(n)[:, None] + (m - n)
    j = np.arange(m)[None, :]
    start = (pos // segment_len) * segment_len
    return (j >= start - mem_len) & (j <= pos)


@given(n=st.integers(0, 30), m=st.integers(0, 30), segment_len=st.integers(1, 9),
       mem_len=st.integers(0, 25), bq=st.integers(1, 7), bk=st.integers(1, 7))
def test_xl_mask_is_its_definition_and_classifies_tiles_soundly(n, m, segment_len, mem_len,
                                                                bq, bk):
    mask = transformer_xl_mask(segment_len, mem_len)
    keep = mask.materialize(n, m)
    np.testing.assert_array_equal(keep, _xl_keep(n, m, segment_len, mem_len))
    assert mask.analytic
    labels = mask.classify_tiles(n, m, bq, bk)
    for a in range(labels.shape[0]):
        for b in range(labels.shape[1]):
            tile = keep[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
            if labels[a, b] == ra.masks.FULL:
                assert tile.all()
            elif labels[a, b] == ra.masks.EMPTY:
                assert not tile.any()


def test_xl_mask_names_its_parameters_and_rejects_bad_ones():
    assert repr(transformer_xl_mask(4, 6)) == \
        "transformer_xl_mask(segment_len=4, mem_len=6)"
    assert ra.mechanisms()["transformer_xl_attention"].mask is transformer_xl_mask
    with pytest.raises(ValueError, match="segment_len"):
        transformer_xl_mask(0, 2)
    with pytest.raises(ValueError, match="mem_len"):
        transformer_xl_mask(2, -1)
    with pytest.raises(TypeError, match="segment_len"):
        transformer_xl_mask(2.0, 1)


@given(qkv=_inputs(), segment_len=st.integers(1, 9), mem_len=st.integers(0, 20),
       causal=st.booleans(), extra=st.one_of(st.none(), rst.masks(compose=False)),
       softcap=st.sampled_from([None, 2.0]), bias=st.sampled_from([None, "alibi", "array"]))
def test_xl_recurrence_equals_attention_under_its_mask(qkv, segment_len, mem_len, causal,
                                                       extra, softcap, bias):
    q, k, v = qkv
    if bias == "alibi":
        bias = ra.scores.alibi(q.shape[-3])
    elif bias == "array":              # e.g. Transformer-XL's precomputed position terms
        bias = np.random.default_rng(q.shape[-2]).standard_normal(
            (q.shape[-3], q.shape[-2], k.shape[-2]))
    kw = dict(causal=causal, softcap=softcap, bias=bias)
    out, lse = transformer_xl_attention(q, k, v, segment_len=segment_len, mem_len=mem_len,
                                        mask=extra, return_lse=True, **kw)
    mask = transformer_xl_mask(segment_len, mem_len)
    ref, ref_lse = ra.attention(q, k, v, mask=mask if extra is None else mask & extra,
                                return_lse=True, **kw)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)
    a = transformer_xl_attention_matrix(q, k, segment_len=segment_len, mem_len=mem_len,
                                        mask=extra, **kw)
    g = q.shape[-3] // k.shape[-3]
    ra.testing.assert_close(a @ np.repeat(v, g, axis=-3), out, name="A @ v", **TIGHT)


@FEW
@given(qkv=_inputs(max_batch_dims=1), segment_len=st.integers(1, 7),
       mem_len=st.integers(0, 12))
def test_xl_equals_the_papers_memory_update(qkv, segment_len, mem_len):
    """Re-run Transformer-XL as the model does: a cache carried from segment to segment
    (new cache = last mem_len of [cache; segment]); the segment's queries are the last
    rows of [cache; segment], so causal bottom-right attention is the segment's."""
    q, k, v = qkv
    n, m = q.shape[-2], k.shape[-2]
    off = m - n
    out = transformer_xl_attention(q, k, v, segment_len=segment_len, mem_len=mem_len)
    expected = np.zeros(np.broadcast_shapes(q.shape[:-1], k.shape[:-3] + (1, 1))
                        + v.shape[-1:])
    ck, cv = k[..., :0, :], v[..., :0, :]
    for s0 in range(0, m, segment_len):
        sk, sv = k[..., s0:s0 + segment_len, :], v[..., s0:s0 + segment_len, :]
        kk, vv = np.concatenate([ck, sk], -2), np.concatenate([cv, sv], -2)
        r0, r1 = max(0, s0 - off), min(n, s0 + segment_len - off)
        if r0 < r1:
            expected[..., r0:r1, :] = ra.attention(q[..., r0:r1, :], kk, vv, causal=True)
        keep = max(0, kk.shape[-2] - mem_len)
        ck, cv = kk[..., keep:, :], vv[..., keep:, :]
    ra.testing.assert_close(out, expected, **TIGHT)


def test_xl_limits(rng):
    q, k, v = rng.standard_normal((3, 2, 3, 13, 5))
    causal = ra.attention(q, k, v, causal=True)
    for seg, mem in ((3, 13), (13, 0), (20, 4), (1, 12)):   # everything before is visible
        ra.testing.assert_close(transformer_xl_attention(q, k, v, segment_len=seg,
                                                         mem_len=mem), causal, **TIGHT)
    # one-token segments without memory: each query sees only itself
    ra.testing.assert_close(transformer_xl_attention(q, k, v, segment_len=1, mem_len=0), v,
                            **TIGHT)
    # segments without memory: block-diagonal causal attention
    blocks = ra.attention(q, k, v, causal=True, mask=ra.masks.block_window(0, 4))
    ra.testing.assert_close(transformer_xl_attention(q, k, v, segment_len=4, mem_len=0),
                            blocks, **TIGHT)
    assert not np.allclose(transformer_xl_attention(q, k, v, segment_len=4, mem_len=3),
                           causal)


def test_xl_rows_before_the_first_key_are_zero(rng):
    q = rng.standard_normal((2, 9, 4))
    k, v = rng.standard_normal((2, 2, 4, 4))
    out, lse = transformer_xl_attention(q, k, v, segment_len=2, mem_len=1, return_lse=True)
    assert (out[:, :5] == 0).all() and np.isneginf(lse[:, :5]).all()
    assert np.isfinite(lse[:, 5:]).all()


def _run_stream(init, step, q, k, v, **params):
    batch, (hq, n, d), (hkv, _, dv) = q.shape[:-3], q.shape[-3:], v.shape[-3:]
    state = init(batch_shape=batch, heads_q=hq, heads_kv=hkv, d=d, dv=dv, **params)
    outs, sizes = [], []
    for t in range(n):
        before = {f: np.copy(getattr(state, f)) for f in ("k_buf", "v_buf", "ck_buf",
                                                          "cv_buf")}
        out_t, new = step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        for f, arr in before.items():        # the old state is left unchanged
            np.testing.assert_array_equal(getattr(state, f), arr)
        state = new
        outs.append(out_t)
        sizes.append(state.nbytes)
    assert len(set(sizes)) <= 1
    return np.stack(outs, axis=-2) if outs else None


@FEW
@given(sh=rst.shapes(max_len=20), segment_len=st.integers(1, 6), mem_len=st.integers(0, 8),
       seed=rst.seeds(), softcap=st.sampled_from([None, 1.5]))
def test_xl_streaming_equals_parallel(sh, segment_len, mem_len, seed, softcap):
    r = np.random.default_rng(seed)
    q = r.standard_normal(sh.batch + (sh.hq, sh.n, sh.d))
    k = r.standard_normal(sh.batch + (sh.hkv, sh.n, sh.d))
    v = r.standard_normal(sh.batch + (sh.hkv, sh.n, sh.dv))
    params = dict(segment_len=segment_len, mem_len=mem_len, scale=0.7, softcap=softcap)
    streamed = _run_stream(transformer_xl_init_state, transformer_xl_step, q, k, v,
                           **params)
    ra.testing.assert_close(streamed, transformer_xl_attention(q, k, v, **params), **TIGHT)


def test_streaming_validates_tokens():
    state = transformer_xl_init_state(batch_shape=(2,), heads_q=2, heads_kv=1, d=3, dv=3,
                                      segment_len=2, mem_len=1)
    with pytest.raises(ValueError, match=r"q_t must have shape \(2, 2, 3\)"):
        transformer_xl_step(state, np.zeros((2, 1, 3)), np.zeros((2, 1, 3)),
                            np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        transformer_xl_init_state(heads_q=3, heads_kv=2, d=3, dv=3, segment_len=2,
                                  mem_len=1)


# ======================================================= Compressive Transformer
def _compress_group(x, kind):
    """One slot from a ``(c, F)`` group, written out element by element."""
    c, f = x.shape
    if isinstance(kind, str) and kind == "mean":
        return np.array([sum(x[r, i] for r in range(c)) / c for i in range(f)])
    if isinstance(kind, str) and kind == "max":
        return np.array([max(x[r, i] for r in range(c)) for i in range(f)])
    return np.array([sum(kind[r] * x[r, i] for r in range(c)) for i in range(f)])


def _naive_compressive(q, k, v, segment_len, mem_len, cmem_len, rate, kinds, scale=None):
    """Per query, from the definition: slots u in [U - cmem_len, U) of the groups
    [u c, (u+1) c), U = max(0, s0 - mem_len) / c, then raw keys max(0, s0 - mem_len)..i'.
    ``kinds`` = (key compression, value compression), each 'mean', 'max', a (c,) kernel
    or a callable on a (c, F) group."""
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    q = _flat(np.broadcast_to(q, bshape + q.shape[-3:]))
    k = _flat(np.broadcast_to(k, bshape + k.shape[-3:]))
    v = _flat(np.broadcast_to(v, bshape + v.shape[-3:]))
    bsz, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((bsz, hq, n, v.shape[-1]))
    lse = np.full((bsz, hq, n), -np.inf)

    def squash(x, kind):
        return kind(x) if callable(kind) else _compress_group(x, kind)
    for b in range(bsz):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(n):
                pos = i + m - n
                if pos < 0:
                    continue
                s0 = pos // segment_len * segment_len
                lo = max(0, s0 - mem_len)
                big_u = lo // rate
                slots = range(max(0, big_u - cmem_len), big_u)
                keys = [squash(k[b, kv, u * rate:(u + 1) * rate], kinds[0]) for u in slots]
                vals = [squash(v[b, kv, u * rate:(u + 1) * rate], kinds[1]) for u in slots]
                keys += list(k[b, kv, lo:pos + 1])
                vals += list(v[b, kv, lo:pos + 1])
                s = scale * np.array([q[b, h, i] @ kk for kk in keys])
                out[b, h, i], lse[b, h, i] = _softmax_out(s, np.array(vals))
    return out.reshape(bshape + out.shape[1:]), lse.reshape(bshape + lse.shape[1:])


@st.composite
def _compressive_params(draw):
    rate = draw(st.integers(1, 3))
    return dict(segment_len=rate * draw(st.integers(1, 3)),
                mem_len=rate * draw(st.integers(0, 3)), cmem_len=draw(st.integers(0, 4)),
                rate=rate)


@FEW
@given(qkv=_inputs(max_len=24), params=_compressive_params(),
       kind=st.sampled_from(["mean", "max", "kernel"]), seed=rst.seeds())
def test_compressive_equals_a_loop_over_its_definition(qkv, params, kind, seed):
    q, k, v = qkv
    compress = kind
    if kind == "kernel":
        compress = np.random.default_rng(seed).standard_normal(params["rate"])
    out, lse = compressive_attention(q, k, v, compress=compress, return_lse=True, **params)
    ref, ref_lse = _naive_compressive(q, k, v, kinds=(compress, compress), **params)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)


def test_compressive_with_conv_weights_equals_the_loop(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 23, 3))
    k = k[:, :2]
    v = v[:, :2, :, :2]                                   # GQA, Dv != D
    wk, wv = rng.standard_normal((3, 3, 2)), rng.standard_normal((2, 2, 2))
    params = dict(segment_len=4, mem_len=2, cmem_len=3, rate=2)

    def conv(w):
        return lambda x: np.array([sum(w[o, i, r] * x[r, i] for i in range(x.shape[1])
                                       for r in range(x.shape[0]))
                                   for o in range(w.shape[0])])
    out = compressive_attention(q, k, v, compress=(wk, wv), **params)
    ref, _ = _naive_compressive(q, k, v, kinds=(conv(wk), conv(wv)), **params)
    ra.testing.assert_close(out, ref, **TIGHT)
    with pytest.raises(ValueError, match="no implied"):
        compressive_attention_matrix(q, k, compress=(wk, wv), **params)


@FEW
@given(qkv=_inputs(max_batch_dims=1, max_len=24), params=_compressive_params())
def test_compressive_equals_the_papers_segment_algorithm(qkv, params):
    """The paper's Algorithm 1 on keys/values (N = M): after each segment the memory
    gains the segment, its oldest entries beyond mem_len are compressed into the
    compressed memory, which keeps its last cmem_len slots."""
    q, k, v = qkv
    k, v = k[..., :q.shape[-2], :], v[..., :q.shape[-2], :]
    q = q[..., :k.shape[-2], :]
    seg, mem_len, cmem_len, rate = (params[x] for x in ("segment_len", "mem_len",
                                                        "cmem_len", "rate"))
    out = compressive_attention(q, k, v, compress="max", **params)
    expected = np.zeros(np.broadcast_shapes(q.shape[:-1], k.shape[:-3] + (1, 1))
                        + v.shape[-1:])
    mk, mv = k[..., :0, :], v[..., :0, :]
    ck, cv = mk, mv
    for s0 in range(0, k.shape[-2], seg):
        sk, sv = k[..., s0:s0 + seg, :], v[..., s0:s0 + seg, :]
        kk = np.concatenate([ck, mk, sk], -2)
        vv = np.concatenate([cv, mv, sv], -2)
        expected[..., s0:s0 + seg, :] = ra.attention(q[..., s0:s0 + seg, :], kk, vv,
                                                     causal=True)
        mk, mv = np.concatenate([mk, sk], -2), np.concatenate([mv, sv], -2)
        old = mk.shape[-2] - mem_len
        if old > 0:
            ck = np.concatenate([ck, compress_memory(mk[..., :old, :], rate, "max")], -2)
            cv = np.concatenate([cv, compress_memory(mv[..., :old, :], rate, "max")], -2)
            first = max(0, ck.shape[-2] - cmem_len)
            ck, cv = ck[..., first:, :], cv[..., first:, :]
            mk, mv = mk[..., old:, :], mv[..., old:, :]
    ra.testing.assert_close(out, expected, **TIGHT)


@given(qkv=_inputs(max_len=30), seg=st.integers(1, 6), mem_len=st.integers(0, 8),
       cmem_len=st.integers(0, 8),
       compress=st.sampled_from(["mean", "max", "kernel", "conv"]))
def test_compressive_at_rate_1_is_transformer_xl_with_the_longer_memory(qkv, seg, mem_len,
                                                                        cmem_len, compress):
    q, k, v = qkv
    if compress == "kernel":
        compress = np.ones(1)
    elif compress == "conv":                          # identity Conv1d weights
        compress = (np.eye(k.shape[-1])[:, :, None], np.eye(v.shape[-1])[:, :, None])
    params = dict(segment_len=seg, mem_len=mem_len, cmem_len=cmem_len, rate=1)
    out, lse = compressive_attention(q, k, v, compress=compress, return_lse=True,
                                     softcap=3.0, **params)
    xl, xl_lse = transformer_xl_attention(q, k, v, segment_len=seg,
                                          mem_len=mem_len + cmem_len, return_lse=True,
                                          softcap=3.0)
    ra.testing.assert_close(out, xl, name="out", **TIGHT)
    ra.testing.assert_close(lse, xl_lse, name="lse", **TIGHT)
    ra.testing.assert_close(compressive_attention(q, k, v, segment_len=seg, mem_len=mem_len,
                                                  cmem_len=0, rate=1),
                            transformer_xl_attention(q, k, v, segment_len=seg,
                                                     mem_len=mem_len), **TIGHT)


def test_compression_changes_the_result_and_old_tokens_leave(rng):
    q, k, v = rng.standard_normal((3, 1, 24, 4))
    params = dict(segment_len=4, mem_len=4, cmem_len=2)
    pooled = compressive_attention(q, k, v, rate=2, **params)
    xl = transformer_xl_attention(q, k, v, segment_len=4, mem_len=4)
    full = transformer_xl_attention(q, k, v, segment_len=4, mem_len=8)
    # the first 8 queries have no compressed memory yet; later ones do
    ra.testing.assert_close(pooled[:, :8], xl[:, :8], **TIGHT)
    assert np.abs(pooled[:, 8:] - xl[:, 8:]).min(-1).max() > 1e-3
    assert np.abs(pooled[:, 8:] - full[:, 8:]).min(-1).max() > 1e-3
    # changing a token that has left the compressed memory changes nothing
    k2 = k.copy()
    k2[:, 0] += 5.0                      # token 0: slot 0, evicted once 3 slots exist
    changed = compressive_attention(q, k2, v, rate=2, **params)
    assert np.abs(changed[:, 8:16] - pooled[:, 8:16]).max() > 1e-6
    ra.testing.assert_close(changed[:, 16:], pooled[:, 16:], **TIGHT)


def test_compress_memory_matches_torch():
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 3, 11, 5))
    for rate in (1, 2, 3):
        xt = torch.from_numpy(x.reshape(6, 11, 5)).transpose(1, 2)      # (B, C, L)
        mean = torch.nn.functional.avg_pool1d(xt, rate).transpose(1, 2).numpy()
        top = torch.nn.functional.max_pool1d(xt, rate).transpose(1, 2).numpy()
        w = r.standard_normal((5, 5, rate))
        conv = torch.nn.functional.conv1d(xt, torch.from_numpy(w), stride=rate)
        kern = r.standard_normal(rate)
        depth = torch.nn.functional.conv1d(xt, torch.from_numpy(
            np.tile(kern, (5, 1, 1))), stride=rate, groups=5)
        for kind, ref in (("mean", mean), ("max", top), (w, conv.transpose(1, 2).numpy()),
                          (kern, depth.transpose(1, 2).numpy())):
            got = compress_memory(x, rate, kind)
            assert got.shape == (2, 3, 11 // rate, 5)
            ra.testing.assert_close(got.reshape(6, -1, 5), ref, **TIGHT)


@FEW
@given(qkv=_inputs(max_len=24), params=_compressive_params(), seed=rst.seeds())
def test_compressive_matrix_reproduces_the_output(qkv, params, seed):
    q, k, v = qkv
    g = q.shape[-3] // k.shape[-3]
    kern = np.random.default_rng(seed).standard_normal(params["rate"])
    for compress in ("mean", kern):
        a = compressive_attention_matrix(q, k, compress=compress, **params)
        out = compressive_attention(q, k, v, compress=compress, **params)
        ra.testing.assert_close(a @ np.repeat(v, g, axis=-3), out, **TIGHT)
    sums = a.sum(-1)      # with the kernel: slot weight p spreads as p * sum(kern)
    assert np.isfinite(sums).all()
    mean = compressive_attention_matrix(q, k, **params)
    assert (mean >= 0).all()
    live = mean.sum(-1) > 0
    np.testing.assert_allclose(mean.sum(-1)[live], 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="no implied"):
        compressive_attention_matrix(q, k, compress="max", **dict(params, cmem_len=1))


@FEW
@given(sh=rst.shapes(max_len=22), params=_compressive_params(), seed=rst.seeds(),
       kind=st.sampled_from(["mean", "max", "kernel", "conv"]))
def test_compressive_streaming_equals_parallel(sh, params, seed, kind):
    r = np.random.default_rng(seed)
    q = r.standard_normal(sh.batch + (sh.hq, sh.n, sh.d))
    k = r.standard_normal(sh.batch + (sh.hkv, sh.n, sh.d))
    v = r.standard_normal(sh.batch + (sh.hkv, sh.n, sh.dv))
    compress = {"kernel": r.standard_normal(params["rate"]),
                "conv": (r.standard_normal((sh.d, sh.d, params["rate"])),
                         r.standard_normal((sh.dv, sh.dv, params["rate"])))}.get(kind, kind)
    streamed = _run_stream(compressive_init_state, compressive_step, q, k, v,
                           compress=compress, **params)
    ra.testing.assert_close(streamed, compressive_attention(q, k, v, compress=compress,
                                                            **params), **TIGHT)


def test_compressive_validation(rng):
    q = rng.standard_normal((1, 8, 4))
    with pytest.raises(ValueError, match="rate=2 must divide segment_len=3"):
        compressive_attention(q, q, q, segment_len=3, mem_len=2, cmem_len=1, rate=2)
    with pytest.raises(ValueError, match="must divide"):
        compressive_attention(q, q, q, segment_len=2, mem_len=3, cmem_len=1, rate=2)
    with pytest.raises(ValueError, match=r"shape \(rate,\) = \(2,\)"):
        compressive_attention(q, q, q, segment_len=2, mem_len=2, cmem_len=1, rate=2,
                              compress=np.ones(3))
    with pytest.raises(ValueError, match=r"compress\[1\].*\(4, 4, 2\)"):
        compressive_attention(q, q, q, segment_len=2, mem_len=2, cmem_len=1, rate=2,
                              compress=(np.ones((4, 4, 2)), np.ones((4, 4, 1))))
    with pytest.raises(ValueError, match="compress must be"):
        compressive_attention(q, q, q, segment_len=2, mem_len=2, cmem_len=1, rate=2,
                              compress="median")
    with pytest.raises(ValueError, match="cmem_len"):
        compressive_attention(q, q, q, segment_len=2, mem_len=2, cmem_len=-1, rate=2)


# ============================================================ persistent memory
def _concat_reference(q, k, v, mk, mv, keep, bias=None, **kw):
    """Exact attention over [slots; sequence] with the slots always kept."""
    p = mk.shape[-2]
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    kk = np.concatenate([np.broadcast_to(mk, bshape + mk.shape[-3:]),
                         np.broadcast_to(k, bshape + k.shape[-3:])], -2)
    vv = np.concatenate([np.broadcast_to(mv, bshape + mv.shape[-3:]),
                         np.broadcast_to(v, bshape + v.shape[-3:])], -2)
    keep = np.concatenate([np.ones(keep.shape[:-1] + (p,), bool), keep], -1)
    if bias is not None:
        bias = np.concatenate([np.zeros(bias.shape[:-1] + (p,)), bias], -1)
    return ra.attention(q, kk, vv, mask=keep, bias=bias, return_lse=True, **kw)


@given(qkv=_inputs(), p=st.integers(0, 5), causal=st.booleans(),
       extra=st.one_of(st.none(), rst.masks(compose=False)), use_bias=st.booleans(),
       per_batch=st.booleans(), seed=rst.seeds())
def test_persistent_memory_equals_attention_over_the_concatenation(qkv, p, causal, extra,
                                                                   use_bias, per_batch,
                                                                   seed):
    q, k, v = qkv
    r = np.random.default_rng(seed)
    n, m, hkv = q.shape[-2], k.shape[-2], k.shape[-3]
    lead = np.broadcast_shapes(q.shape[:-3], k.shape[:-3]) if per_batch else ()
    mk = r.standard_normal(lead + (hkv, p, q.shape[-1]))
    mv = r.standard_normal(lead + (hkv, p, v.shape[-1]))
    bias = r.standard_normal((q.shape[-3], n, m)) if use_bias else None
    keep = np.ones((q.shape[-3], n, m), bool)
    if causal:
        keep &= ra.masks.causal().materialize(n, m)
    if extra is not None:           # per query head (dilations may differ by head)
        keep &= np.stack([extra.materialize(n, m, h=h) for h in range(q.shape[-3])])
    out, lse = persistent_memory_attention(q, k, v, mem_k=mk, mem_v=mv, causal=causal,
                                           mask=extra, bias=bias, softcap=4.0,
                                           return_lse=True)
    ref, ref_lse = _concat_reference(q, k, v, mk, mv, keep, bias=bias, softcap=4.0)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)
    a = persistent_memory_attention_matrix(q, k, mem_k=mk, causal=causal, mask=extra,
                                           bias=bias, softcap=4.0)
    g = q.shape[-3] // hkv
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    vv = np.concatenate([np.broadcast_to(mv, bshape + mv.shape[-3:]),
                         np.broadcast_to(v, bshape + v.shape[-3:])], -2)
    ra.testing.assert_close(a @ np.repeat(vv, g, axis=-3), out, name="A @ [mv; v]", **TIGHT)
    assert (a >= 0).all()
    sums = a.sum(-1)
    if p:                           # the slots are always visible: every row sums to 1
        np.testing.assert_allclose(sums, 1.0, rtol=1e-12)


def test_persistent_memory_limits_and_random_slots(rng):
    q, k, v = rng.standard_normal((3, 2, 2, 7, 4))
    none = np.zeros((2, 0, 4))
    ra.testing.assert_close(persistent_memory_attention(q, k, v, mem_k=none, mem_v=none,
                                                        causal=True),
                            ra.attention(q, k, v, causal=True), **TIGHT)
    mk, mv = random_memory(3, heads_kv=2, d=4, dv=4, rng=7)
    ra.testing.assert_close(persistent_memory_attention(q, k, v, num_slots=3, rng=7),
                            persistent_memory_attention(q, k, v, mem_k=mk, mem_v=mv),
                            **TIGHT)
    ra.testing.assert_close(persistent_memory_attention_matrix(q, k, num_slots=3, rng=7),
                            persistent_memory_attention_matrix(q, k, mem_k=mk), **TIGHT)
    # N > M with causal: the front rows see only the slots
    q2 = rng.standard_normal((2, 2, 10, 4))
    out = persistent_memory_attention(q2, k, v, mem_k=mk, mem_v=mv, causal=True)
    ra.testing.assert_close(out[..., :3, :], ra.attention(q2[..., :3, :], mk, mv), **TIGHT)
    assert np.abs(out[..., 3, :] - ra.attention(q2[..., 3:4, :], mk, mv)[..., 0, :]).max() \
        > 1e-3
    # a dominant slot takes all the weight
    big = np.zeros((2, 1, 4))
    big[..., 0] = 1e3
    q3 = np.abs(q) + 1.0
    out = persistent_memory_attention(q3, k, v, mem_k=big, mem_v=np.full((2, 1, 4), 7.0))
    np.testing.assert_allclose(out, 7.0, rtol=1e-12)


def test_persistent_memory_validation(rng):
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    with pytest.raises(ValueError,
                       match=r"mem_k must have shape \(\.\.\., Hkv=2, P, D=4\)"):
        persistent_memory_attention(q, k, v, mem_k=np.zeros((2, 3, 5)),
                                    mem_v=np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="mem_v must have shape"):
        persistent_memory_attention(q, k, v, mem_k=np.zeros((2, 3, 4)),
                                    mem_v=np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="do not broadcast"):
        persistent_memory_attention(q, k, v, mem_k=np.zeros((3, 2, 3, 4)),
                                    mem_v=np.zeros((3, 2, 3, 4)))
    with pytest.raises(ValueError, match="not both"):
        persistent_memory_attention(q, k, v, mem_k=np.zeros((2, 3, 4)),
                                    mem_v=np.zeros((2, 3, 4)), num_slots=3, rng=0)
    with pytest.raises(TypeError, match="needs the memory"):
        persistent_memory_attention(q, k, v)
    with pytest.raises(TypeError, match="rng"):
        persistent_memory_attention(q, k, v, num_slots=2)
    with pytest.raises(ValueError, match="non-finite"):
        persistent_memory_attention(q, k, v, mem_k=np.full((2, 3, 4), np.nan),
                                    mem_v=np.zeros((2, 3, 4)))


# ================================================================ kNN memory
def _naive_knn(q, k, v, mk, mv, topk, gate, window=None, scale=None):
    """Per (batch, head, query): stable sort of the store by -dot (lowest index first
    among ties), softmax over the first topk; local causal (windowed) attention via
    conftest's naive_attention."""
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], mk.shape[:-3])
    q, k, v, mk, mv = (_flat(np.broadcast_to(x, bshape + x.shape[-3:]))
                       for x in (q, k, v, mk, mv))
    bsz, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    gate = np.broadcast_to(gate, (hq,))
    keep = ra.masks.causal().materialize(n, m)
    if window is not None:
        keep &= ra.masks.sliding_window(window).materialize(n, m)
    out = np.zeros((bsz, hq, n, v.shape[-1]))
    for b in range(bsz):
        local, _ = naive_attention(q[b], k[b], v[b], np.broadcast_to(keep, (hq, n, m)),
                                   scale=scale)
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(n):
                dots = np.array([q[b, h, i] @ mk[b, kv, s] for s in range(mk.shape[2])])
                chosen = np.argsort(-dots, kind="stable")[:topk]
                o_mem, _ = _softmax_out(scale * dots[chosen], mv[b, kv, chosen])
                out[b, h, i] = gate[h] * o_mem + (1 - gate[h]) * local[h, i]
    return out.reshape(bshape + out.shape[1:])


@given(qkv=_inputs(max_len=20), size=st.integers(0, 12), topk=st.integers(1, 14),
       window=st.one_of(st.none(), st.integers(0, 6)), per_head=st.booleans(),
       seed=rst.seeds())
def test_knn_memory_equals_a_loop_with_explicit_sorting(qkv, size, topk, window, per_head,
                                                        seed):
    q, k, v = qkv
    r = np.random.default_rng(seed)
    hq, hkv = q.shape[-3], k.shape[-3]
    mk = r.standard_normal((hkv, size, q.shape[-1]))
    mv = r.standard_normal((hkv, size, v.shape[-1]))
    if size > 2 and r.random() < 0.5:                  # exact ties among store keys
        mk[:, size // 2] = mk[:, 0]
    gate = r.random(hq) if per_head else float(r.random())
    out = knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=topk, gate=gate,
                               local_window=window)
    ref = _naive_knn(q, k, v, mk, mv, topk, gate, window)
    ra.testing.assert_close(out, ref, **TIGHT)
    a = knn_memory_attention_matrix(q, k, mem_k=mk, topk=topk, gate=gate,
                                    local_window=window)
    g = hq // hkv
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    vv = np.concatenate([np.broadcast_to(mv, bshape + mv.shape[-3:]),
                         np.broadcast_to(v, bshape + v.shape[-3:])], -2)
    ra.testing.assert_close(a @ np.repeat(vv, g, axis=-3), out, name="A @ [mv; v]", **TIGHT)
    assert (a >= 0).all()
    retrieved = (a[..., :size] > 0).sum(-1)
    assert (retrieved <= min(topk, size)).all()


@FEW
@given(qkv=_inputs(max_len=20), size=st.integers(1, 12), extra=st.integers(0, 3),
       window=st.one_of(st.none(), st.integers(0, 6)), seed=rst.seeds())
def test_knn_memory_limits(qkv, size, extra, window, seed):
    q, k, v = qkv
    r = np.random.default_rng(seed)
    hkv = k.shape[-3]
    mk = r.standard_normal((hkv, size, q.shape[-1])) * 2
    mv = r.standard_normal((hkv, size, v.shape[-1]))
    local_mask = None if window is None else ra.masks.sliding_window(window)
    local = ra.attention(q, k, v, causal=True, mask=local_mask, softcap=5.0)
    mem = ra.attention(q, mk, mv, softcap=5.0)
    kw = dict(mem_k=mk, mem_v=mv, local_window=window, softcap=5.0)
    # topk >= S: attention over the whole store
    out = knn_memory_attention(q, k, v, topk=size + extra, gate=0.3, **kw)
    bshape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    ra.testing.assert_close(out, np.broadcast_to(0.3 * mem + 0.7 * local, out.shape),
                            **TIGHT)
    # gate 0: local attention; gate 1: memory attention (any topk)
    topk = max(1, size // 2)
    ra.testing.assert_close(knn_memory_attention(q, k, v, topk=topk, gate=0.0, **kw),
                            np.broadcast_to(local, bshape + local.shape[-3:]), **TIGHT)
    only_mem = knn_memory_attention(q, k, v, topk=topk, gate=1.0, **kw)
    expected = ra.topk_attention(np.broadcast_to(q, bshape + q.shape[-3:]),
                                 np.broadcast_to(mk, bshape + mk.shape[-3:]),
                                 np.broadcast_to(mv, bshape + mv.shape[-3:]),
                                 topk=topk, softcap=5.0)
    ra.testing.assert_close(only_mem, expected, **TIGHT)


def test_knn_mask_and_bias_act_on_the_local_part(rng):
    q, k, v = rng.standard_normal((3, 2, 4, 9, 3))
    k, v = k[:, :2], v[:, :2]
    mk, mv = rng.standard_normal((2, 2, 6, 3))
    bias = rng.standard_normal((4, 9, 9))
    extra = ra.masks.sinks(2) | ra.masks.strided(2)
    kw = dict(mem_k=mk, mem_v=mv, topk=6, mask=extra, bias=bias, local_window=4)
    local = ra.attention(q, k, v, causal=True, bias=bias,
                         mask=extra & ra.masks.sliding_window(4))
    mem = ra.attention(q, mk, mv)
    ra.testing.assert_close(knn_memory_attention(q, k, v, gate=0.0, **kw), local, **TIGHT)
    gate = np.array([0.0, 0.3, 0.6, 1.0])[:, None, None]
    ra.testing.assert_close(knn_memory_attention(q, k, v, gate=gate[:, 0, 0], **kw),
                            gate * mem + (1 - gate) * local, **TIGHT)


def test_knn_ties_keep_the_lowest_store_index(rng):
    q = np.zeros((1, 3, 4))                      # every dot product is 0: all tie
    k, v = rng.standard_normal((2, 1, 3, 4))
    mk = rng.standard_normal((1, 6, 4))
    mv = rng.standard_normal((1, 6, 4))
    out = knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=2, gate=1.0)
    np.testing.assert_allclose(out[0], np.broadcast_to(mv[0, :2].mean(0), (3, 4)),
                               rtol=1e-13)
    # a tie at the k-th place between entries 1 and 4: entry 1 is kept
    q = np.ones((1, 1, 2))
    mk = np.array([[[3.0, 3.0], [1.0, 1.0], [0.0, 0.0], [-1.0, -1.0], [1.0, 1.0]]])
    mv = np.eye(5)[None, :, :]
    a = knn_memory_attention_matrix(q, q, mem_k=mk, topk=2, gate=1.0)
    assert (a[0, 0, :5] > 0).tolist() == [True, True, False, False, False]
    out = knn_memory_attention(q, q, np.zeros((1, 1, 5)), mem_k=mk, mem_v=mv, topk=2,
                               gate=1.0)
    w = np.exp(np.array([6.0, 2.0]) / np.sqrt(2))
    np.testing.assert_allclose(out[0, 0, :2], w / w.sum(), rtol=1e-13)


def test_knn_memory_empty_store_random_slots_and_validation(rng):
    q, k, v = rng.standard_normal((3, 2, 2, 6, 4))
    empty = np.zeros((2, 0, 4))
    out = knn_memory_attention(q, k, v, mem_k=empty, mem_v=empty, topk=3, gate=0.4)
    ra.testing.assert_close(out, 0.6 * ra.attention(q, k, v, causal=True), **TIGHT)
    mk, mv = random_memory(5, heads_kv=2, d=4, dv=4, rng=11)
    ra.testing.assert_close(knn_memory_attention(q, k, v, num_slots=5, rng=11, topk=2,
                                                 gate=0.5),
                            knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=2,
                                                 gate=0.5), **TIGHT)
    for bad in (1.5, -0.1, np.array([0.2, 2.0])):
        with pytest.raises(ValueError, match=r"gate values must lie in \[0, 1\]"):
            knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=2, gate=bad)
    with pytest.raises(ValueError, match="one value per query head"):
        knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=2, gate=np.ones(3) / 2)
    with pytest.raises(ValueError, match="topk"):
        knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=0, gate=0.5)
    with pytest.raises(ValueError, match="local_window"):
        knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=1, gate=0.5,
                             local_window=-1)


# ==================================================================== registry
def test_memory_mechanisms_are_registered():
    specs = ra.mechanisms()
    names = ("transformer_xl_attention", "compressive_attention",
             "persistent_memory_attention", "knn_memory_attention")
    for name in names:
        assert specs[name].family == "memory" and not specs[name].exact
    assert specs["transformer_xl_attention"].constant_state
    assert specs["compressive_attention"].constant_state
    assert specs["persistent_memory_attention"].implied_matrix is None
    assert specs["knn_memory_attention"].implied_matrix is None
    assert specs["persistent_memory_attention"].randomized  # via num_slots + rng
