"""Compressed attention (pooling, strided, landmarks, k-means) against independent
forms: exact limits, explicit per-query loops, masked dense attention, duplicated keys,
and causal leakage."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.compression import (kmeans_kv_attention, kmeans_kv_attention_matrix,
                                 landmark_attention, landmark_attention_matrix,
                                 landmark_indices, pooled_attention,
                                 pooled_attention_matrix, strided_kv_attention,
                                 strided_kv_attention_matrix)
from refattn.testing import strategies as rst

TOL = dict(rtol=1e-12, atol=1e-13)


def _qkv(rng, batch=(2,), hq=4, hkv=2, n=7, m=9, d=5, dv=3, spread=1.0):
    return (rng.standard_normal(batch + (hq, n, d)) * spread,
            rng.standard_normal(batch + (hkv, m, d)) * spread,
            rng.standard_normal(batch + (hkv, m, dv)))


def _naive(q, keys, values, weights_log=None, scale=None):
    """One query against an explicit list of keys/values (+ log weights): a loop."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1] if np.ndim(values) == 2 else 0)
    scale = 1 / np.sqrt(len(q)) if scale is None else scale
    s = np.array([scale * np.dot(q, kk) for kk in keys])
    if weights_log is not None:
        s = s + np.asarray(weights_log)
    w = np.exp(s - s.max())
    return w @ np.asarray(values) / w.sum()


def _per_query(q, k, v, choose):
    """``choose(i, kk, vv) -> (keys, values, logw)`` per query, flat over batch/heads."""
    b, hq, n, _ = q.shape
    hkv = k.shape[-3]
    out = np.zeros((b, hq, n, v.shape[-1]))
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(n):
                keys, vals, logw = choose(i, k[bi, kv], v[bi, kv])
                if len(keys):
                    out[bi, h, i] = _naive(q[bi, h, i], keys, vals, logw)
    return out


# -------------------------------------------------------------------------- pooling
@given(rst.attention_inputs(dtype="float64"), st.booleans(), st.booleans(),
       st.sampled_from(["mean", "max"]))
def test_stride_one_pooling_is_exact_attention(inputs, causal, local, pool):
    q, k, v = inputs
    np.testing.assert_allclose(
        pooled_attention(q, k, v, stride=1, pool=pool, causal=causal, local=local),
        ra.attention(q, k, v, causal=causal), **TOL)


def _windows(m, stride):
    return [np.arange(a, min(a + stride, m)) for a in range(0, m, stride)]


def _pooled_choose(n, m, stride, pool, causal, local, log_count):
    red = np.mean if pool == "mean" else np.max

    def choose(i, kk, vv):
        pos = i + m - n
        keys, vals, logw = [], [], []
        for w in _windows(m, stride):
            if not causal or w[-1] <= pos:
                keys.append(red(kk[w], axis=0))
                vals.append(red(vv[w], axis=0))
                logw.append(np.log(len(w)) if log_count else 0.0)
            elif local and w[0] <= pos:          # the query's own, incomplete window
                for j in w[w <= pos]:
                    keys.append(kk[j])
                    vals.append(vv[j])
                    logw.append(0.0)
        return keys, vals, logw
    return choose


@pytest.mark.parametrize("n, m, stride", [(7, 9, 2), (9, 7, 3), (8, 8, 4), (5, 11, 20),
                                          (12, 10, 3)])
@pytest.mark.parametrize("causal, local", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("pool, log_count", [("mean", False), ("mean", True), ("max", False)])
def test_pooling_matches_a_per_query_loop(rng, n, m, stride, causal, local, pool, log_count):
    q, k, v = _qkv(rng, n=n, m=m)
    out = pooled_attention(q, k, v, stride=stride, pool=pool, causal=causal, local=local,
                           log_count=log_count)
    expected = _per_query(q, k, v, _pooled_choose(n, m, stride, pool, causal, local,
                                                  log_count))
    np.testing.assert_allclose(out, expected, **TOL)
    if pool == "mean":
        a = pooled_attention_matrix(q, k, stride=stride, causal=causal, local=local,
                                    log_count=log_count)
        np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3), out, **TOL)
        assert (a >= 0).all()
        sums = a.sum(-1)
        np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-13)
    else:
        with pytest.raises(ValueError, match="not linear in v"):
            pooled_attention_matrix(q, k, stride=stride, pool="max")


def test_pooling_is_exact_when_windows_hold_copies_of_one_token(rng):
    q = rng.standard_normal((2, 6, 4))
    # M = 12, stride 3: four full windows of three identical keys and values
    k = np.repeat(rng.standard_normal((2, 4, 4)), 3, axis=1)
    v = np.repeat(rng.standard_normal((2, 4, 3)), 3, axis=1)
    exact = ra.attention(q, k, v)
    for pool in ("mean", "max"):
        np.testing.assert_allclose(pooled_attention(q, k, v, stride=3, pool=pool), exact, **TOL)
    # ragged last window (M = 10: windows of 3, 3, 3, 1): exact only with log_count
    k10, v10 = k[:, :10], v[:, :10]
    exact10 = ra.attention(q, k10, v10)
    np.testing.assert_allclose(pooled_attention(q, k10, v10, stride=3, log_count=True),
                               exact10, **TOL)
    assert np.abs(pooled_attention(q, k10, v10, stride=3) - exact10).max() > 1e-3
    # causal with local raw keys and log counts: exactly causal attention
    qn = rng.standard_normal((2, 12, 4))
    np.testing.assert_allclose(
        pooled_attention(qn, k, v, stride=3, causal=True, local=True, log_count=True),
        ra.attention(qn, k, v, causal=True), **TOL)


@pytest.mark.parametrize("n, m", [(10, 10), (6, 10), (13, 10)])
@pytest.mark.parametrize("mechanism", ["pooled", "pooled_local", "pooled_max", "strided",
                                       "landmark_norm", "landmark_indices"])
def test_future_keys_and_values_do_not_change_earlier_outputs(rng, n, m, mechanism):
    fn = {
        "pooled": lambda *a: pooled_attention(*a, stride=3, causal=True),
        "pooled_local": lambda *a: pooled_attention(*a, stride=3, causal=True, local=True,
                                                    log_count=True),
        "pooled_max": lambda *a: pooled_attention(*a, stride=3, pool="max", causal=True,
                                                  local=True),
        "strided": lambda *a: strided_kv_attention(*a, stride=2, offset=1, causal=True),
        "landmark_norm": lambda *a: landmark_attention(*a, num_landmarks=3, causal=True),
        "landmark_indices": lambda *a: landmark_attention(*a, indices=[7, 1, 4, 8],
                                                          causal=True),
    }[mechanism]
    q, k, v = _qkv(rng, n=n, m=m)
    out = fn(q, k, v)
    for t in (2, 5, 8):                     # keys t.. change, queries with i' < t must not
        k2, v2 = k.copy(), v.copy()
        k2[..., t:, :] = rng.standard_normal(k2[..., t:, :].shape) * 10   # big norms too
        v2[..., t:, :] += 100.0
        out2 = fn(q, k2, v2)
        early = np.arange(n) + m - n < t
        np.testing.assert_array_equal(out2[..., early, :], out[..., early, :])
        assert np.abs(out2[..., ~early, :] - out[..., ~early, :]).max() > 1e-3


def test_pooled_causal_visibility_rule_by_hand():
    # M = N = 5, stride 2: windows {0,1} {2,3} {4}
    a = pooled_attention_matrix(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), stride=2,
                                causal=True)[0]
    np.testing.assert_allclose(a, [[0, 0, 0, 0, 0],            # sees no complete window
                                   [.5, .5, 0, 0, 0],
                                   [.5, .5, 0, 0, 0],
                                   [.25, .25, .25, .25, 0],
                                   [1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 3]], rtol=1e-15)
    a = pooled_attention_matrix(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), stride=2,
                                causal=True, local=True)[0]
    np.testing.assert_allclose(a[0], [1, 0, 0, 0, 0], rtol=1e-15)      # itself, raw
    np.testing.assert_allclose(a[2], [.25, .25, .5, 0, 0], rtol=1e-15)  # window 0 + key 2


def test_pooled_bad_input_raises():
    q = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"stride must be an integer >= 1 \(keys per window; "
                                         r"k \(2, 5, 4\)\), got 0"):
        pooled_attention(q, q, q, stride=0)
    with pytest.raises(TypeError, match="stride must be an integer"):
        pooled_attention(q, q, q, stride=1.5)
    with pytest.raises(ValueError, match="pool must be 'mean' or 'max'"):
        pooled_attention(q, q, q, stride=2, pool="sum")
    with pytest.raises(TypeError, match="local must be True or False"):
        pooled_attention(q, q, q, stride=2, causal=True, local="yes")
    with pytest.raises(TypeError, match="causal must be True or False"):
        pooled_attention(q, q, q, stride=2, causal=1)


# -------------------------------------------------------------- strided downsampling
@pytest.mark.parametrize("n, m", [(7, 9), (9, 7), (8, 8)])
@pytest.mark.parametrize("stride, offset", [(1, 0), (2, 0), (2, 1), (3, 2), (12, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_equals_attention_with_the_other_keys_masked(rng, n, m, stride, offset,
                                                             causal):
    q, k, v = _qkv(rng, n=n, m=m)
    kept = (np.arange(m) >= offset) & ((np.arange(m) - offset) % stride == 0)
    mask = np.broadcast_to(kept, (n, m))
    out = strided_kv_attention(q, k, v, stride=stride, offset=offset, causal=causal)
    np.testing.assert_allclose(out, ra.attention(q, k, v, mask=mask, causal=causal), **TOL)
    a = strided_kv_attention_matrix(q, k, stride=stride, offset=offset, causal=causal)
    np.testing.assert_allclose(a, ra.attention_probs(q, k, mask=mask, causal=causal), **TOL)
    if stride == 1:
        np.testing.assert_allclose(out, ra.attention(q, k, v, causal=causal), **TOL)
    if offset >= m:
        np.testing.assert_array_equal(out, 0.0)


def test_strided_bad_input_raises():
    q = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"offset must satisfy 0 <= offset < stride=2, got 2"):
        strided_kv_attention(q, q, q, stride=2, offset=2)
    with pytest.raises(ValueError, match="offset must be an integer >= 0"):
        strided_kv_attention(q, q, q, stride=2, offset=-1)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        strided_kv_attention(q, q, q, stride=0)


# -------------------------------------------------------------------------- landmarks
@given(rst.attention_inputs(dtype="float64"), st.booleans())
def test_every_key_a_landmark_is_exact_attention(inputs, causal):
    q, k, v = inputs
    m = k.shape[-2]
    exact = ra.attention(q, k, v, causal=causal)
    np.testing.assert_allclose(landmark_attention(q, k, v, indices=np.arange(m)[::-1],
                                                  causal=causal), exact, **TOL)
    np.testing.assert_allclose(landmark_attention(q, k, v, num_landmarks=m + 3,
                                                  causal=causal), exact, **TOL)


@pytest.mark.parametrize("n, m", [(7, 9), (9, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_landmark_indices_equal_attention_with_other_keys_masked(rng, n, m, causal):
    q, k, v = _qkv(rng, n=n, m=m)
    idx = [5, 0, 3]
    mask = np.broadcast_to(np.isin(np.arange(m), idx), (n, m))
    np.testing.assert_allclose(landmark_attention(q, k, v, indices=idx, causal=causal),
                               ra.attention(q, k, v, mask=mask, causal=causal), **TOL)
    np.testing.assert_allclose(landmark_attention_matrix(q, k, indices=idx, causal=causal),
                               ra.attention_probs(q, k, mask=mask, causal=causal), **TOL)


def test_norm_landmarks_are_the_largest_keys(rng):
    q, k, v = _qkv(rng, m=12)
    idx = landmark_indices(k, num_landmarks=4)
    norms = np.linalg.norm(k, axis=-1)
    for bi in range(2):
        for h in range(2):
            assert set(idx[bi, h]) == set(np.argsort(-norms[bi, h])[:4])
            assert (np.diff(idx[bi, h]) > 0).all()
    out = landmark_attention(q, k, v, num_landmarks=4)
    for bi in range(2):
        for h in range(4):
            np.testing.assert_allclose(
                out[bi, h], landmark_attention(q[bi, h][None], k[bi, h // 2][None],
                                               v[bi, h // 2][None],
                                               indices=idx[bi, h // 2])[0], **TOL)
    # ties: the lower position wins
    kt = np.ones((1, 5, 2))
    np.testing.assert_array_equal(landmark_indices(kt, num_landmarks=2), [[0, 1]])


@pytest.mark.parametrize("n, m", [(9, 9), (6, 10), (12, 8)])
def test_causal_norm_landmarks_are_the_largest_visible_keys(rng, n, m):
    q, k, v = _qkv(rng, n=n, m=m)
    num = 3

    def choose(i, kk, vv):
        pos = i + m - n
        if pos < 0:
            return [], [], None
        visible = np.arange(pos + 1)
        norms = np.linalg.norm(kk[visible], axis=-1)
        top = visible[np.argsort(-norms, kind="stable")[:num]]
        return kk[top], vv[top], None
    np.testing.assert_allclose(landmark_attention(q, k, v, num_landmarks=num, causal=True),
                               _per_query(q, k, v, choose), **TOL)
    a = landmark_attention_matrix(q, k, num_landmarks=num, causal=True)
    np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3),
                               landmark_attention(q, k, v, num_landmarks=num, causal=True),
                               **TOL)
    assert ((a > 0).sum(-1) == np.minimum(num, np.clip(np.arange(n) + m - n + 1, 0, None))).all()


def test_landmark_bad_input_raises():
    q = np.zeros((2, 5, 4))
    with pytest.raises(TypeError, match="exactly one of indices= .* and num_landmarks="):
        landmark_attention(q, q, q)
    with pytest.raises(TypeError, match="exactly one of"):
        landmark_attention(q, q, q, indices=[0], num_landmarks=2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, M\) with M=5"):
        landmark_attention(q, q, q, indices=[0, 5])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, M\)"):
        landmark_attention(q, q, q, indices=[-1])
    with pytest.raises(ValueError, match="indices must be distinct"):
        landmark_attention(q, q, q, indices=[1, 1])
    with pytest.raises(ValueError, match="1-D array of integer key positions"):
        landmark_attention(q, q, q, indices=[[0, 1]])
    with pytest.raises(ValueError, match="1-D array of integer key positions"):
        landmark_attention(q, q, q, indices=[0.0, 1.0])
    with pytest.raises(ValueError, match="num_landmarks must be an integer >= 1"):
        landmark_attention(q, q, q, num_landmarks=0)
    with pytest.raises(ValueError, match="select must be 'norm'"):
        landmark_attention(q, q, q, num_landmarks=2, select="random")


# --------------------------------------------------------------------------- k-means
@given(rst.attention_inputs(dtype="float64"), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_kmeans_with_one_centroid_per_key_is_exact(inputs, extra, seed):
    q, k, v = inputs
    m = k.shape[-2]
    np.testing.assert_allclose(kmeans_kv_attention(q, k, v, n_centroids=m + extra, rng=seed),
                               ra.attention(q, k, v), **TOL)


def test_kmeans_is_exact_on_duplicated_keys_with_log_counts(rng):
    """Three distinct keys repeated 1, 3 and 5 times in shuffled order, with *different*
    values for the copies: attention over the copies is ``sum_c n_c e^{q k_c} vbar_c``,
    which the count-weighted centroids reproduce exactly."""
    q = rng.standard_normal((2, 2, 6, 4))
    distinct = rng.standard_normal((2, 1, 3, 4))
    which = rng.permutation(np.repeat([0, 1, 2], [1, 3, 5]))
    k = distinct[:, :, which]
    v = rng.standard_normal((2, 1, 9, 3))
    exact = ra.attention(q, k, v)
    for seed in range(5):
        np.testing.assert_allclose(kmeans_kv_attention(q, k, v, n_centroids=3, rng=seed),
                                   exact, **TOL)
    # without the counts each distinct key counts once: attention over the 3 keys with
    # their mean values
    vbar = np.stack([v[:, :, which == c].mean(2) for c in range(3)], axis=2)
    np.testing.assert_allclose(kmeans_kv_attention(q, k, v, n_centroids=3, rng=0,
                                                   log_count=False),
                               ra.attention(q, distinct, vbar), **TOL)
    assert np.abs(ra.attention(q, distinct, vbar) - exact).max() > 1e-3


def test_kmeans_on_separated_blobs_matches_the_centroid_formula(rng):
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])
    sizes = [2, 5, 1, 4]
    labels = np.repeat(np.arange(4), sizes)
    perm = rng.permutation(len(labels))
    labels = labels[perm]
    k = (centers[labels] + 0.1 * rng.standard_normal((len(labels), 3)))[None]
    v = rng.standard_normal((1, len(labels), 2))
    q = rng.standard_normal((1, 5, 3)) * 0.2
    kbar = np.stack([k[0, labels == c].mean(0) for c in range(4)])
    vbar = np.stack([v[0, labels == c].mean(0) for c in range(4)])
    expected = np.stack([_naive(qi, kbar, vbar, np.log(sizes)) for qi in q[0]])[None]
    np.testing.assert_allclose(kmeans_kv_attention(q, k, v, n_centroids=4, rng=1),
                               expected, **TOL)
    a = kmeans_kv_attention_matrix(q, k, n_centroids=4, rng=1)
    s = q[0] @ kbar[labels].T / np.sqrt(3)        # each key replaced by its centroid
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(a[0], p / p.sum(-1, keepdims=True), **TOL)
    np.testing.assert_allclose(a @ v, expected, **TOL)


def test_kmeans_bad_input_raises():
    q = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"n_centroids must be an integer >= 1 \(clusters of "
                                         r"keys; k \(2, 5, 4\)\)"):
        kmeans_kv_attention(q, q, q, n_centroids=0, rng=0)
    with pytest.raises(ValueError, match="n_iters must be an integer >= 0"):
        kmeans_kv_attention(q, q, q, n_centroids=2, n_iters=-1, rng=0)
    with pytest.raises(TypeError, match="needs rng="):
        kmeans_kv_attention(q, q, q, n_centroids=2, rng=None)
    with pytest.raises(TypeError, match="log_count must be True or False"):
        kmeans_kv_attention(q, q, q, n_centroids=2, rng=0, log_count=None)


# ------------------------------------------------------------------- the row blocks
@pytest.mark.parametrize("call", [
    lambda f, *a: f(*a, stride=3, causal=True, local=True, log_count=True),
    lambda f, *a: f(*a, stride=2, offset=1, causal=True),
    lambda f, *a: f(*a, num_landmarks=3, causal=True),
    lambda f, *a: f(*a, indices=[4, 0, 2], causal=True),
    lambda f, *a: f(*a, n_centroids=3, rng=2),
], ids=["pooled", "strided", "landmark_norm", "landmark_indices", "kmeans"])
def test_query_row_blocks_give_the_same_result(rng, monkeypatch, call):
    """Queries are processed in blocks of about BLOCK_ELEMENTS logits; with tiny blocks
    (one or a few rows each) outputs and implied matrices are unchanged (to rounding)."""
    import refattn.compression as comp
    q, k, v = _qkv(rng, n=11, m=13)
    fns = {"pooled": (pooled_attention, pooled_attention_matrix),
           "strided": (strided_kv_attention, strided_kv_attention_matrix),
           "landmark": (landmark_attention, landmark_attention_matrix),
           "kmeans": (kmeans_kv_attention, kmeans_kv_attention_matrix)}
    ran = 0
    for fn, mat in fns.values():
        try:
            out, a = call(fn, q, k, v), call(mat, q, k)
        except TypeError as exc:           # this call's arguments belong to another one
            assert "unexpected keyword argument" in str(exc)
            continue
        ran += 1
        for block in (1, 40, 97):
            monkeypatch.setattr(comp, "BLOCK_ELEMENTS", block)
            # equal to rounding: BLAS sums depend on the shape of the block
            np.testing.assert_allclose(call(fn, q, k, v), out, **TOL)
            np.testing.assert_allclose(call(mat, q, k), a, **TOL)
        monkeypatch.undo()
        np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3), out, **TOL)
    assert ran == 1


def test_no_keys_gives_zero_rows():
    q, k, v = np.ones((1, 4, 3)), np.ones((1, 0, 3)), np.ones((1, 0, 2))
    for out in (pooled_attention(q, k, v, stride=2, causal=True, local=True),
                strided_kv_attention(q, k, v, stride=2, causal=True),
                landmark_attention(q, k, v, num_landmarks=2, causal=True),
                kmeans_kv_attention(q, k, v, n_centroids=2, rng=0)):
        np.testing.assert_array_equal(out, np.zeros((1, 4, 2)))
