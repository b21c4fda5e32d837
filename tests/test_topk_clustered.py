"""Top-k, routing and clustered attention against independent forms: the limits where
they become exact, loop-by-loop re-implementations of their selection rules, identities
their attention matrices must satisfy, and k-means properties."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.clustered import (clustered_attention, clustered_attention_matrix,
                               improved_clustered_attention,
                               improved_clustered_attention_matrix, query_clusters,
                               routing_attention, routing_attention_matrix,
                               routing_clusters)
from refattn.testing import strategies as rst
from refattn.topk import topk_attention, topk_attention_matrix

TIGHT = dict(rtol=1e-12, atol=1e-13)
FEW = settings(max_examples=25)
CLUSTERED = (routing_attention, clustered_attention, improved_clustered_attention)
EXTRA = {routing_attention: {}, clustered_attention: {},
         improved_clustered_attention: {"topk": 3}}


def _inputs(**kw):
    return rst.attention_inputs(rst.shapes(**kw), dtype="float64")


def _flat(x):
    """``(..., H, L, D)`` -> ``(B, H, L, D)``."""
    return x.reshape((-1,) + x.shape[-3:])


def _logits(q, k):
    """Scaled logits with the query heads' KV heads repeated: ``(..., Hq, N, M)``."""
    g = q.shape[-3] // k.shape[-3]
    return q @ np.swapaxes(np.repeat(k, g, axis=-3), -1, -2) / np.sqrt(q.shape[-1])


def _causal_keep(n, m):
    return np.arange(m)[None, :] <= np.arange(n)[:, None] + (m - n)


def _softmax(s):
    w = np.exp(s - s.max())
    return w / w.sum(), s.max() + np.log(w.sum())


# ------------------------------------------------------------------------------ top-k
@given(_inputs(), rst.masks(), st.booleans(), st.integers(0, 3))
def test_topk_with_all_keys_is_exact_attention(qkv, mask, causal, extra):
    q, k, v = qkv
    kw = dict(mask=mask, causal=causal)
    out, lse = topk_attention(q, k, v, topk=k.shape[-2] + extra, return_lse=True, **kw)
    ref, ref_lse = ra.attention(q, k, v, return_lse=True, **kw)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)
    ra.testing.assert_close(topk_attention_matrix(q, k, topk=k.shape[-2] + extra, **kw),
                            ra.attention_probs(q, k, **kw), name="matrix", **TIGHT)


@given(_inputs(), st.booleans())
def test_topk_one_returns_the_value_of_the_best_allowed_key(qkv, causal):
    q, k, v = qkv
    s = _logits(q, k)
    n, m = s.shape[-2:]
    if causal:
        s = np.where(_causal_keep(n, m), s, -np.inf)
    out, lse = topk_attention(q, k, v, topk=1, causal=causal, return_lse=True)
    vq = np.repeat(v, q.shape[-3] // k.shape[-3], axis=-3)
    best = np.take_along_axis(vq, s.argmax(-1)[..., None], axis=-2)
    live = np.isfinite(s.max(-1))
    np.testing.assert_allclose(out, np.where(live[..., None], best, 0.0), rtol=0, atol=0)
    # Rounding of a dot product is bounded by D eps sum_d |q_d k_d|, not by |q . k|.
    bound = _logits(np.abs(q), np.abs(k)).max() if s.size else 0.0
    np.testing.assert_allclose(lse, s.max(-1), rtol=1e-13, atol=4 * q.shape[-1] * 2.2e-16 * bound)


@settings(max_examples=40)
@given(st.data())
def test_topk_keeps_exactly_k_breaking_ties_by_lower_key_index(data):
    """Integer logits (many exact ties) against a loop over rows with a stable sort."""
    sh = data.draw(rst.shapes(max_dim=3, max_len=12))
    seed = data.draw(rst.seeds())
    r = np.random.default_rng(seed)
    q = r.integers(-1, 2, sh.batch + (sh.hq, sh.n, sh.d)).astype(float)
    k = r.integers(-1, 2, sh.batch + (sh.hkv, sh.m, sh.d)).astype(float)
    v = r.standard_normal(sh.batch + (sh.hkv, sh.m, sh.dv))
    keep = r.random((sh.hq, sh.n, sh.m)) < 0.7
    topk = data.draw(st.integers(1, sh.m + 1))
    a = topk_attention_matrix(q, k, topk=topk, mask=keep, scale=1.0)
    out = topk_attention(q, k, v, topk=topk, mask=keep, scale=1.0)
    s = np.where(keep, _flat(_logits(q, k)) * np.sqrt(sh.d), -np.inf)  # scale 1
    expected = np.zeros(s.shape)
    for idx in np.ndindex(s.shape[:-1]):
        row = s[idx]
        allowed = np.flatnonzero(np.isfinite(row))
        chosen = allowed[np.argsort(-row[allowed], kind="stable")[:topk]]
        if len(chosen):
            expected[idx + (chosen,)] = _softmax(row[chosen])[0]
    a = _flat(a)
    np.testing.assert_allclose(a, expected, rtol=1e-13, atol=0)
    assert ((a > 0).sum(-1) == np.minimum(topk, keep.sum(-1))).all()
    g = sh.hq // sh.hkv
    ra.testing.assert_close(_flat(out), a @ np.repeat(_flat(v), g, axis=-3), **TIGHT)


@settings(max_examples=30)
@given(_inputs(max_len=24), st.booleans())
def test_topk_total_variation_is_the_dropped_mass_and_shrinks_with_k(qkv, causal):
    """TV(top-k, full) = 1 - (full probability kept), so it is non-increasing in k, 0
    at k = M, and bounds the output error: |o_k - o| <= 2 TV max|v|."""
    q, k, v = qkv
    m = k.shape[-2]
    p = ra.attention_probs(q, k, causal=causal)
    o = ra.attention(q, k, v, causal=causal)
    vmax = np.abs(v).max() if v.size else 0.0
    previous = None
    for topk in range(1, m + 1):
        a = topk_attention_matrix(q, k, topk=topk, causal=causal)
        support = a > 0
        # The kept keys are the topk most probable ones: nothing dropped beats them.
        dropped_max = np.where(support, -np.inf, p).max(-1)
        kept_min = np.where(support, p, np.inf).min(-1)
        assert (dropped_max <= kept_min).all()
        tv = 0.5 * np.abs(a - p).sum(-1)
        kept_mass = np.where(support, p, 0.0).sum(-1)
        live = p.sum(-1) > 0
        np.testing.assert_allclose(tv, np.where(live, 1.0 - kept_mass, 0.0), atol=1e-13)
        if previous is not None:
            assert (tv <= previous + 1e-14).all()
        previous = tv
        err = np.abs(topk_attention(q, k, v, topk=topk, causal=causal) - o).max(-1)
        assert (err <= 2 * tv * vmax + 1e-12).all()
    np.testing.assert_allclose(previous, 0.0, atol=1e-13)


@FEW
@given(_inputs(), st.booleans(), st.integers(1, 5), st.integers(1, 7))
def test_topk_does_not_depend_on_the_query_block_or_kv_sharing(qkv, causal, topk, block):
    q, k, v = qkv
    out = topk_attention(q, k, v, topk=topk, causal=causal)
    ra.testing.assert_close(topk_attention(q, k, v, topk=topk, causal=causal,
                                           block_q=block), out, **TIGHT)
    g = q.shape[-3] // k.shape[-3]
    ra.testing.assert_close(topk_attention(q, np.repeat(k, g, -3), np.repeat(v, g, -3),
                                           topk=topk, causal=causal), out, **TIGHT)


def test_topk_on_all_equal_logits_keeps_the_first_keys():
    v = np.arange(12.0).reshape(1, 6, 2)
    q = k = np.zeros((1, 6, 3))
    out = topk_attention(q, k, v, topk=2, causal=True)
    expected = [v[0, 0], v[0, :2].mean(0)] + [v[0, :2].mean(0)] * 4
    np.testing.assert_array_equal(out[0], np.array(expected))


def test_topk_accepts_low_precision_and_propagates_nan():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 2, 7, 4)).astype(np.float16)
    out = topk_attention(q, k, v, topk=3)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, topk_attention(*(x.astype(float) for x in (q, k, v)),
                                                      topk=3))
    q = q.astype(float)
    q[0, 2, 1] = np.nan
    out = topk_attention(q, k, v, topk=3, check_finite=False)
    assert np.isnan(out[0, 2]).all() and np.isfinite(np.delete(out[0], 2, 0)).all()


@pytest.mark.parametrize("bad, err, msg", [
    (0, ValueError, r"topk must be an integer >= 1 \(keys kept per query; k has M=5"),
    (-3, ValueError, "topk must be an integer >= 1"),
    (2.5, TypeError, "topk must be an integer"),
    (True, TypeError, "topk must be an integer"),
    ("3", TypeError, "topk must be an integer"),
])
def test_topk_validation(bad, err, msg):
    q = np.zeros((2, 5, 4))
    with pytest.raises(err, match=msg):
        topk_attention(q, q, q, topk=bad)
    with pytest.raises(err, match=msg):
        topk_attention_matrix(q, q, topk=bad)
    with pytest.raises(err, match=msg.replace("keys kept", "keys recomputed")):
        improved_clustered_attention(q, q, q, n_clusters=2, topk=bad, rng=0)


def test_topk_other_validation():
    q = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match="block_q must be an integer >= 1"):
        topk_attention(q, q, q, topk=2, block_q=0)
    with pytest.raises(ValueError, match=r"q and k must share the last dimension D; got "
                                         r"q \(2, 5, 4\), k \(2, 5, 3\)"):
        topk_attention(q, np.zeros((2, 5, 3)), q, topk=2)
    with pytest.raises(ra.MemoryBudgetError, match=r"refattn\.topk\.topk_attention"):
        topk_attention_matrix(q, q, topk=2, memory_budget=100)


# ---------------------------------------------------------------------------- routing
@FEW
@given(_inputs(), rst.masks(), st.booleans())
def test_routing_with_one_cluster_is_exact_attention(qkv, mask, causal):
    q, k, v = qkv
    out, lse = routing_attention(q, k, v, n_clusters=1, mask=mask, causal=causal,
                                 return_lse=True, rng=0)
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)


def _naive_routing(q, k, v, qc, kc, cent, causal):
    """One query at a time: own cluster's allowed keys, else the nearest centroid's
    cluster (by unit query · centroid) that holds an allowed key."""
    hq, n, _ = q.shape
    hkv, m, _ = k.shape
    out, lse = np.zeros((hq, n, v.shape[-1])), np.full((hq, n), -np.inf)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(n):
            allowed = [j for j in range(m) if not causal or j <= i + m - n]
            norm = np.linalg.norm(q[h, i])
            sims = cent[h] @ (q[h, i] / norm if norm > 0 else q[h, i])
            for c in sorted(range(len(sims)), key=lambda c: (c != qc[h, i], -sims[c], c)):
                keys = [j for j in allowed if kc[h, j] == c]
                if keys:
                    w, lse[h, i] = _softmax(k[kv, keys] @ q[h, i] / np.sqrt(q.shape[-1]))
                    out[h, i] = w @ v[kv, keys]
                    break
    return out, lse


@FEW
@given(_inputs(max_len=24), st.booleans(), st.integers(1, 6), rst.seeds())
def test_routing_attends_within_its_cluster_or_the_nearest_usable_one(qkv, causal, c, seed):
    q, k, v = qkv
    out, lse = routing_attention(q, k, v, n_clusters=c, causal=causal, rng=seed,
                                 return_lse=True)
    qc, kc, cent = routing_clusters(q, k, n_clusters=c, rng=seed)
    assert cent.shape[-2] == min(c, q.shape[-2] + k.shape[-2])
    np.testing.assert_allclose(np.linalg.norm(cent, axis=-1), 1.0, rtol=1e-12)
    for args in zip(*map(_flat, (q, k, v)), _flat(qc[..., None])[..., 0],
                    _flat(kc[..., None])[..., 0], _flat(cent), _flat(out),
                    _flat(lse[..., None])[..., 0]):
        *inputs, o, l = args
        ref, ref_lse = _naive_routing(*inputs, causal)
        ra.testing.assert_close(o, ref, name="out", **TIGHT)
        ra.testing.assert_close(l, ref_lse, name="lse", **TIGHT)


def test_routing_falls_back_when_the_own_cluster_has_no_visible_key():
    """Queries point along x; the first 4 keys along y, the rest along x. Under
    causality queries 0-3 see only y-keys: they use the y-cluster, later ones the x-one."""
    n = 8
    e = np.eye(2)
    q = np.tile(e[0], (n, 1))[None] + 0.01 * np.arange(n)[None, :, None] * e[1]
    k = np.concatenate([np.tile(e[1], (4, 1)), np.tile(e[0], (4, 1))])[None]
    k = k + 0.01 * np.arange(n)[None, :, None] * e[::-1][0]
    v = np.random.default_rng(0).standard_normal((1, n, 3))
    qc, kc, _ = routing_clusters(q, k, n_clusters=2, rng=0)
    assert len(set(qc[0])) == 1 and (kc[0, :4] != qc[0, 0]).all() and (kc[0, 4:] == qc[0, 0]).all()
    out = routing_attention(q, k, v, n_clusters=2, causal=True, rng=0)
    for i in range(n):
        keys = np.arange(i + 1) if i < 4 else np.arange(4, i + 1)
        ref = ra.attention(q[:, i:i + 1], k[:, keys], v[:, keys])
        ra.testing.assert_close(out[:, i:i + 1], ref, **TIGHT)


@pytest.mark.parametrize("spherical", [True, False], ids=["routing", "clustered"])
def test_kmeans_objective_improves_with_iterations(spherical):
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 2, 60, 5)) + rng.standard_normal((2, 2, 1, 5))
    objectives = []
    for n_iters in range(8):
        if spherical:
            qc, kc, cent = routing_clusters(q, k, n_clusters=5, n_iters=n_iters, rng=3)
            x = np.concatenate([q, k], axis=-2)
            x = x / np.linalg.norm(x, axis=-1, keepdims=True)
            assign = np.concatenate([qc, kc], axis=-1)
            sims = x @ np.swapaxes(cent, -1, -2)
            np.testing.assert_array_equal(assign, sims.argmax(-1))    # nearest centroid
            objectives.append(np.take_along_axis(sims, assign[..., None], -1).sum())
        else:
            assign, cent = query_clusters(q, n_clusters=5, n_iters=n_iters, rng=3)
            for h in range(2):                                         # centroid = mean
                for c in np.unique(assign[h]):
                    np.testing.assert_allclose(cent[h, c], q[h, assign[h] == c].mean(0),
                                               rtol=1e-13, atol=1e-15)
            objectives.append(-((q - np.take_along_axis(cent, assign[..., None], -2)) ** 2).sum())
    assert np.all(np.diff(objectives) >= -1e-12), objectives
    assert objectives[-1] > objectives[0]          # the iterations did something here


# ---------------------------------------------------------------------------- clustered
@FEW
@given(_inputs(), rst.masks(), st.booleans())
def test_clustered_with_every_query_its_own_cluster_is_exact_attention(qkv, mask, causal):
    q, k, v = qkv
    n = q.shape[-2]
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    for fn, kw in ((clustered_attention, {}), (improved_clustered_attention, {"topk": 2})):
        out, lse = fn(q, k, v, n_clusters=n, mask=mask, causal=causal, return_lse=True,
                      rng=0, **kw)
        ra.testing.assert_close(out, ref, name=f"{fn.__name__} out", **TIGHT)
        ra.testing.assert_close(lse, ref_lse, name=f"{fn.__name__} lse", **TIGHT)


@FEW
@given(_inputs(), st.booleans(), st.integers(1, 6), rst.seeds())
def test_clustered_is_attention_of_the_centroids(qkv, causal, c, seed):
    q, k, v = qkv
    out, lse = clustered_attention(q, k, v, n_clusters=c, causal=causal, rng=seed,
                                   return_lse=True)
    assign, cent = query_clusters(q, n_clusters=c, rng=seed)
    q_cent = np.take_along_axis(cent, assign[..., None], axis=-2)
    ref, ref_lse = ra.attention(q_cent, k, v, causal=causal, return_lse=True)
    ra.testing.assert_close(out, ref, name="out", **TIGHT)
    ra.testing.assert_close(lse, ref_lse, name="lse", **TIGHT)
    if not causal:   # a cluster's queries share one row of weights
        a = clustered_attention_matrix(q, k, n_clusters=c, rng=seed)
        first = np.argmax(assign[..., :, None] == assign[..., None, :], axis=-1)
        np.testing.assert_array_equal(a, np.take_along_axis(a, first[..., None], -2))


def test_clustered_with_one_cluster_uses_the_mean_query():
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((3, 2, 9, 6))
    mean = np.broadcast_to(q.mean(-2, keepdims=True), q.shape)
    ra.testing.assert_close(clustered_attention(q, k, v, n_clusters=1, rng=0),
                            ra.attention(mean, k, v), **TIGHT)


@FEW
@given(_inputs(max_len=20), st.booleans(), st.integers(1, 4), st.integers(1, 6))
def test_improved_clustered_matches_its_definition_and_beats_clustered(qkv, causal, c, topk):
    q, k, v = qkv
    a_t = improved_clustered_attention_matrix(q, k, n_clusters=c, topk=topk, causal=causal, rng=0)
    a_c = clustered_attention_matrix(q, k, n_clusters=c, causal=causal, rng=0)
    assign, cent = query_clusters(q, n_clusters=c, rng=0)
    s_c = _logits(np.take_along_axis(cent, assign[..., None], -2), k)
    s_q = _logits(q, k)
    n, m = s_q.shape[-2:]
    allowed = _causal_keep(n, m) if causal else np.ones((n, m), bool)
    expected = np.zeros(s_q.shape)
    for idx in np.ndindex(s_q.shape[:-2]):
        for i in range(n):
            keys = np.flatnonzero(allowed[i])
            if not len(keys):
                continue
            w_c = _softmax(s_c[idx][i, keys])[0]
            top = np.argsort(-s_c[idx][i, keys], kind="stable")[:topk]
            row = w_c.copy()
            row[top] = w_c[top].sum() * _softmax(s_q[idx][i, keys[top]])[0]
            expected[idx + (i, keys)] = row
    np.testing.assert_allclose(a_t, expected, rtol=1e-12, atol=1e-15)
    exact = ra.attention_probs(q, k, causal=causal)
    assert (np.abs(a_t - exact).sum(-1) <= np.abs(a_c - exact).sum(-1) + 1e-13).all()
    out = improved_clustered_attention(q, k, v, n_clusters=c, topk=topk, causal=causal, rng=0)
    g = q.shape[-3] // k.shape[-3]
    ra.testing.assert_close(out, a_t @ np.repeat(v, g, axis=-3), **TIGHT)
    ra.testing.assert_close(
        improved_clustered_attention(q, k, v, n_clusters=c, topk=m, causal=causal, rng=0),
        ra.attention(q, k, v, causal=causal), **TIGHT)


# ------------------------------------------------------------------ shared properties
@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
@FEW
@given(qkv=_inputs(max_batch_dims=1), c=st.integers(1, 5), seed=rst.seeds(),
       data=st.data())
def test_permutations_of_keys_and_queries(fn, qkv, c, seed, data):
    """k-means runs on a canonical order of the points: permuting keys changes nothing
    and permuting queries permutes the output."""
    q, k, v = qkv
    kw = dict(n_clusters=c, rng=seed, **EXTRA[fn])
    out = fn(q, k, v, **kw)
    pk = data.draw(st.permutations(range(k.shape[-2])))
    pq = data.draw(st.permutations(range(q.shape[-2])))
    ra.testing.assert_close(fn(q, k[..., pk, :], v[..., pk, :], **kw), out, **TIGHT)
    ra.testing.assert_close(fn(q[..., pq, :], k, v, **kw), out[..., pq, :], **TIGHT)


@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
def test_grouped_query_heads_equal_repeated_kv_heads(fn):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 6, 13, 5))
    k, v = rng.standard_normal((2, 2, 2, 10, 5))
    kw = dict(n_clusters=3, causal=True, rng=5, **EXTRA[fn])
    ra.testing.assert_close(fn(q, k, v, **kw),
                            fn(q, np.repeat(k, 3, 1), np.repeat(v, 3, 1), **kw), **TIGHT)


@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
def test_seeded_reproducibility(fn):
    q, k, v = np.random.default_rng(2).standard_normal((3, 2, 30, 4))
    kw = dict(n_clusters=4, n_iters=2, **EXTRA[fn])
    first = fn(q, k, v, rng=17, **kw)
    np.testing.assert_array_equal(fn(q, k, v, rng=17, **kw), first)
    np.testing.assert_array_equal(fn(q, k, v, rng=np.random.default_rng(17), **kw),
                                  fn(q, k, v, rng=np.random.default_rng(17), **kw))
    with pytest.raises(TypeError, match="needs rng="):
        fn(q, k, v, rng=None, **kw)
    assert not np.array_equal(fn(q, k, v, rng=18, **kw), first)   # the seed matters


@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
def test_more_clusters_than_points_acts_like_one_per_point(fn):
    q, k, v = np.random.default_rng(6).standard_normal((3, 1, 5, 4))
    points = 10 if fn is routing_attention else 5
    kw = dict(rng=1, causal=True, **EXTRA[fn])
    np.testing.assert_array_equal(fn(q, k, v, n_clusters=points + 7, **kw),
                                  fn(q, k, v, n_clusters=points, **kw))


@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
def test_rows_without_visible_keys_are_zero(fn):
    q = np.random.default_rng(8).standard_normal((2, 7, 4))
    k, v = q[:, :3], q[:, :3, :2]
    out, lse = fn(q, k, v, n_clusters=2, causal=True, return_lse=True, rng=0, **EXTRA[fn])
    assert (out[:, :4] == 0).all() and np.isneginf(lse[:, :4]).all()
    assert np.isfinite(lse[:, 4:]).all() and np.isfinite(out).all()


@pytest.mark.parametrize("fn", CLUSTERED, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kw, err, msg", [
    ({"n_clusters": 0}, ValueError, r"n_clusters must be an integer >= 1 \(clusters of "
                                    r"queries.*q \(2, 5, 4\)"),
    ({"n_clusters": 2.0}, TypeError, "n_clusters must be an integer"),
    ({"n_iters": -1}, ValueError, "n_iters must be an integer >= 0"),
    ({"rng": "seed"}, TypeError, "rng must be an int seed or a numpy.random.Generator"),
    ({"rng": None}, TypeError, "needs rng="),
    ({"rng": -1}, ValueError, "rng seed must be a non-negative integer"),
    ({"block_q": 0}, ValueError, "block_q must be an integer >= 1"),
])
def test_clustered_validation(fn, kw, err, msg):
    q = np.zeros((2, 5, 4))
    kw = {"n_clusters": 2, "rng": 0, **EXTRA[fn], **kw}
    with pytest.raises(err, match=msg):
        fn(q, q, q, **kw)
    matrix = {routing_attention: routing_attention_matrix,
              clustered_attention: clustered_attention_matrix,
              improved_clustered_attention: improved_clustered_attention_matrix}[fn]
    with pytest.raises(err, match=msg):
        matrix(q, q, **kw)
    with pytest.raises(ra.MemoryBudgetError, match=fn.__name__):
        matrix(q, q, **{**kw, "n_clusters": 2, "n_iters": 1, "rng": 0, "block_q": None},
               memory_budget=10)
