"""Reformer LSH attention and its memory-saving utilities (refattn.lsh, refattn.reversible).

Every LSH output is checked against an independent form: dense attention in the limits
where LSH becomes exact (one bucket, one chunk), and dense attention restricted to the
union of the attended sets, built here by plain loops from the definition.
"""
import importlib
import math

import numpy as np
import pytest

import refattn as ra
from refattn.lsh import SELF_LOGIT, lsh_attention, lsh_attention_matrix, lsh_buckets
from refattn.reversible import (chunked_feed_forward, reversible_forward,
                                reversible_inverse)


def _inputs(seed, shape_q, shape_kv=None, dv=None):
    r = np.random.default_rng(seed)
    shape_kv = shape_q if shape_kv is None else shape_kv
    q = r.standard_normal(shape_q)
    k = r.standard_normal(shape_kv)
    v = r.standard_normal(shape_kv[:-1] + ((dv or shape_kv[-1]),))
    return q, k, v


def _unit(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _self_bias(q, keys, scale):
    """Additive bias that turns the diagonal logit into SELF_LOGIT (shared-QK rule)."""
    n = q.shape[-2]
    diag = scale * np.einsum("...nd,...nd->...n", q, keys)
    bias = np.zeros(q.shape[:-1] + (n,))
    idx = np.arange(n)
    bias[..., idx, idx] = SELF_LOGIT - diag
    return bias


# ----------------------------------------------------------------- (a) exact limits
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_one_chunk_is_exact_attention(n_hashes, causal):
    q, k, v = _inputs(0, (2, 19, 8), dv=5)
    zeros = np.zeros((n_hashes, 2, 19), dtype=np.int64)
    out, lse = lsh_attention(q, k, v, n_buckets=2, n_hashes=n_hashes, chunk_size=19,
                             causal=causal, buckets=(zeros, zeros), return_lse=True)
    ref, ref_lse = ra.attention(q, k, v, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-14)
    # Each round sees every key, so every pair is counted n_hashes times: without the
    # log(N_ij) correction the lse would be ref_lse + log(n_hashes).
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n_hashes", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_shared_qk_one_bucket_is_dense_attention_with_self_logit_replaced(n_hashes, causal):
    q, _, v = _inputs(1, (3, 17, 6))
    scale = 1 / math.sqrt(6)
    zeros = np.zeros((n_hashes, 3, 17), dtype=np.int64)
    out, lse = lsh_attention(q, None, v, n_buckets=4, n_hashes=n_hashes, chunk_size=32,
                             shared_qk=True, causal=causal, buckets=zeros, return_lse=True)
    keys = _unit(q)
    ref, ref_lse = ra.attention(q, keys, v, causal=causal, return_lse=True,
                                bias=_self_bias(q, keys, scale))
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13, atol=1e-13)
    # the first token of a causal sequence has only itself: weight 1 at logit -1e5
    if causal:
        np.testing.assert_array_equal(out[:, 0], v[:, 0])
        np.testing.assert_allclose(lse[:, 0], SELF_LOGIT, rtol=1e-15)


def test_shared_qk_token_attends_itself_only_when_alone():
    q, _, v = _inputs(2, (1, 9, 4))
    # token 4 is alone in bucket 1; the others share bucket 0; one chunk
    buckets = np.zeros((1, 1, 9), dtype=np.int64)
    buckets[0, 0, 4] = 1
    kw = dict(n_buckets=2, chunk_size=9, shared_qk=True, buckets=buckets)
    a = lsh_attention_matrix(q, None, **kw)[0]
    out = lsh_attention(q, None, v, **kw)[0]
    expected_diag = np.zeros(9)
    expected_diag[4] = 1.0
    np.testing.assert_array_equal(np.diag(a), expected_diag)
    np.testing.assert_array_equal(out[4], v[0, 4])
    assert (a[4, np.arange(9) != 4] == 0).all() and (a[np.arange(9) != 4, 4] == 0).all()
    # the rest is softmax over the other members of bucket 0
    others = np.delete(np.arange(9), 4)
    s = q[0, others] @ _unit(q[0, others]).T / 2.0
    np.fill_diagonal(s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(a[np.ix_(others, others)], p / p.sum(-1, keepdims=True),
                               rtol=1e-13, atol=1e-15)


# ----------------------------------------- independent form: union of attended sets
def _attended_sets(bq, bk, chunk, causal, shared_qk):
    """Per round, the boolean (N, N) matrix of attended pairs, from the definition
    with plain loops: sort by (bucket, position), chunk, window = own + previous chunk,
    same bucket, causal."""
    n_hashes, n = bq.shape
    sets = np.zeros((n_hashes, n, n), dtype=bool)
    for r in range(n_hashes):
        order_q = sorted(range(n), key=lambda i: (bq[r, i], i))
        order_k = sorted(range(n), key=lambda j: (bk[r, j], j))
        chunk_q = {i: order_q.index(i) // chunk for i in range(n)}
        chunk_k = {j: order_k.index(j) // chunk for j in range(n)}
        for i in range(n):
            for j in range(n):
                if bq[r, i] != bk[r, j] or (causal and j > i):
                    continue
                if chunk_k[j] in (chunk_q[i] - 1, chunk_q[i]):
                    sets[r, i, j] = True
    return sets


@pytest.mark.parametrize("causal, n_buckets, n_hashes", [(False, 16, 1), (False, 16, 2),
                                                       (True, 8, 2)])
def test_shared_qk_random_hashing_self_weight_is_zero_unless_alone(causal, n_buckets,
                                                                   n_hashes):
    q = np.random.default_rng(3).standard_normal((4, 40, 8))
    buckets = lsh_buckets(q, n_buckets, 7, n_hashes=n_hashes)
    a = lsh_attention_matrix(q, None, n_buckets=n_buckets, n_hashes=n_hashes,
                             chunk_size=5, shared_qk=True, causal=causal, rng=7)
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    others = np.stack([_attended_sets(buckets[:, h], buckets[:, h], 5, causal, True)
                       .any(0) & ~np.eye(40, dtype=bool) for h in range(4)])
    alone = ~others.any(-1)
    assert alone.any() and (~alone).any()            # both situations occur here
    np.testing.assert_array_equal(diag[alone], 1.0)
    np.testing.assert_array_equal(diag[~alone], 0.0)
    itself = alone[..., None] & np.eye(40, dtype=bool)
    np.testing.assert_array_equal(a > 0, others | itself)


def _union_reference(q, k, v, bq, bk, chunk, causal, shared_qk):
    """Dense attention restricted to the union of the attended sets, per head."""
    hq, n, d = q.shape
    scale = 1 / math.sqrt(d)
    outs, lses, counts = [], [], []
    for h in range(hq):
        sets = _attended_sets(bq[:, h], bk[:, h], chunk, causal, shared_qk)
        union = sets.any(0)
        keys = _unit(q[h]) if shared_qk else k[h]
        if not shared_qk:
            union[np.arange(n), np.arange(n)] = True      # own-position key
        bias = _self_bias(q[h], keys, scale) if shared_qk else None
        o, lse = ra.attention(q[h][None], keys[None], v[h][None], mask=union[None],
                              bias=None if bias is None else bias[None], return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
        counts.append(sets.sum(0))
    return np.stack(outs), np.stack(lses), np.stack(counts)


@pytest.fixture(params=["whole", "slices"])
def chunk_slices(request, monkeypatch):
    """Every sorted chunk at once, then (a working-memory budget of one byte) one chunk
    of one head at a time: the forward's slices merged online must not change a thing."""
    if request.param == "slices":
        chunks = importlib.import_module("refattn.sparse.lsh_chunks")
        monkeypatch.setattr(chunks, "_BLOCK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, chunk, n_buckets, n_hashes", [
    (23, 4, 4, 3), (17, 5, 2, 2), (1, 4, 2, 2), (2, 1, 2, 3), (12, 3, 6, 1)])
def test_matches_attention_over_the_union_of_attended_sets(shared_qk, causal, n, chunk,
                                                           n_buckets, n_hashes,
                                                           chunk_slices):
    q, k, v = _inputs(n * 31 + chunk, (3, n, 6), dv=4)
    seed = 11
    bq = lsh_buckets(q, n_buckets, seed, n_hashes=n_hashes)
    bk = bq if shared_qk else lsh_buckets(k, n_buckets, seed, n_hashes=n_hashes)
    out, lse = lsh_attention(q, k, v, n_buckets=n_buckets, n_hashes=n_hashes,
                             chunk_size=chunk, shared_qk=shared_qk, causal=causal,
                             rng=seed, return_lse=True)
    ref, ref_lse, _ = _union_reference(q, k, v, bq, bk, chunk, causal, shared_qk)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_duplicate_correction_is_what_makes_rounds_combine_to_the_union():
    """Rounds that overlap partially: some pairs are attended in one round, some in
    several. The lsh result must be the union softmax, and the naive combination of the
    rounds without the log(N_ij) correction must be measurably different."""
    n, chunk, n_buckets, n_hashes, seed = 30, 5, 4, 4, 2
    q, k, v = _inputs(4, (2, n, 8))
    bq = lsh_buckets(q, n_buckets, seed, n_hashes=n_hashes)
    bk = lsh_buckets(k, n_buckets, seed, n_hashes=n_hashes)
    out, lse = lsh_attention(q, k, v, n_buckets=n_buckets, n_hashes=n_hashes,
                             chunk_size=chunk, rng=seed, return_lse=True)
    ref, ref_lse, counts = _union_reference(q, k, v, bq, bk, chunk, False, False)
    assert (counts == 1).any() and (counts >= 2).any()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    # the uncorrected combination: each round's softmax merged by its plain lse
    scale = 1 / math.sqrt(8)
    naive = []
    for h in range(2):
        sets = _attended_sets(bq[:, h], bk[:, h], chunk, False, False)
        parts = [ra.attention(q[h][None], k[h][None], v[h][None], mask=s, return_lse=True)
                 for s in sets]
        parts = [(o[0], l[0]) for o, l in parts]
        own = (v[h], scale * np.einsum("nd,nd->n", q[h], k[h]))
        naive.append(ra.merge_partials([p[0] for p in parts] + [own[0]],
                                       [p[1] for p in parts] + [own[1]])[0])
    assert np.abs(np.stack(naive) - out).max() > 1e-3


def test_drawn_buckets_are_those_of_lsh_buckets_with_the_same_rng():
    q, k, v = _inputs(5, (2, 3, 21, 8))
    kw = dict(n_buckets=6, n_hashes=3, chunk_size=4)
    bq = lsh_buckets(q, 6, 99, n_hashes=3)
    bk = lsh_buckets(k, 6, 99, n_hashes=3)
    np.testing.assert_array_equal(lsh_attention(q, k, v, rng=99, **kw),
                                  lsh_attention(q, k, v, buckets=(bq, bk), **kw))
    np.testing.assert_array_equal(
        lsh_attention(q, k, v, shared_qk=True, rng=99, **kw),
        lsh_attention(q, k, v, shared_qk=True, buckets=bq, **kw))


# ------------------------------------------------------------- (b) LSH statistics
def _pair(theta, d):
    x = np.zeros((2, d))
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = math.cos(theta), math.sin(theta)
    return x


def _within_5_sigma(freq, p, trials):
    return abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / trials)


@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("theta", [math.pi / 8, math.pi / 3, math.pi / 2, 2 * math.pi / 3,
                                   7 * math.pi / 8])
def test_two_bucket_collision_probability_is_one_minus_theta_over_pi(theta, d):
    trials = 40_000
    h = lsh_buckets(_pair(theta, d) * [[2.0], [0.5]], 2, rng=1234, n_hashes=trials)
    freq = float((h[:, 0] == h[:, 1]).mean())
    p = 1 - theta / math.pi
    assert _within_5_sigma(freq, p, trials), (freq, p)


@pytest.mark.parametrize("rounds", [2, 4])
@pytest.mark.parametrize("theta", [math.pi / 4, math.pi / 2, 3 * math.pi / 4])
def test_collision_in_at_least_one_of_r_rounds(theta, rounds):
    trials = 20_000
    h = lsh_buckets(_pair(theta, 8), 2, rng=77, n_hashes=trials * rounds)
    hit = (h[:, 0] == h[:, 1]).reshape(trials, rounds).any(axis=1)
    p = 1 - (theta / math.pi) ** rounds
    assert _within_5_sigma(float(hit.mean()), p, trials), (hit.mean(), p)


def test_hash_limits_and_bucket_uniformity():
    x = np.array([[0.3, -1.2, 0.7], [0.3, -1.2, 0.7], [-0.3, 1.2, -0.7], [0, 0, 0]])
    h = lsh_buckets(x, 8, rng=5, n_hashes=3000)
    assert h.min() == 0 and h.max() == 7 and h.dtype.kind == "i"
    assert (h[:, 0] == h[:, 1]).all()                 # theta = 0: always collide
    assert (h[:, 0] != h[:, 2]).all()                 # theta = pi: never
    assert (h[:, 3] == 0).all()                       # zero vector: bucket 0
    np.testing.assert_array_equal(lsh_buckets(x * 3.5, 8, rng=5, n_hashes=3000), h)
    # by rotation symmetry each of 8 buckets has probability 1/8
    counts = np.bincount(h[:, 0], minlength=8)
    bound = 5 * math.sqrt(3000 * (1 / 8) * (7 / 8))
    assert np.abs(counts - 3000 / 8).max() <= bound, counts
    # n_hashes=None: one hash, no leading axis, same as the first of several rounds
    np.testing.assert_array_equal(lsh_buckets(x, 8, rng=5), lsh_buckets(x, 8, 5,
                                                                        n_hashes=1)[0])


# --------------------------------------------- (c) matrix, GQA, rng, validation
@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_implied_matrix_reproduces_output_and_is_row_stochastic(shared_qk, causal):
    q, k, v = _inputs(6, (2, 4, 26, 8), (2, 2, 26, 8), dv=3)      # GQA, batch 2
    kw = dict(n_buckets=4, n_hashes=3, chunk_size=6, shared_qk=shared_qk, causal=causal,
              rng=8)
    a = lsh_attention_matrix(q, k, **kw)
    assert a.shape == (2, 4, 26, 26)
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-13)
    if causal:
        assert (np.triu(a, 1) == 0).all()
    np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3), lsh_attention(q, k, v, **kw),
                               rtol=1e-12, atol=1e-13)
    # LSH is sparse: most pairs are not attended
    assert (a == 0).mean() > 0.5


@pytest.mark.parametrize("shared_qk", [False, True])
def test_gqa_equals_repeated_kv_heads(shared_qk):
    q, k, v = _inputs(7, (2, 6, 20, 8), (2, 2, 20, 8), dv=5)
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=3, shared_qk=shared_qk, causal=True,
              rng=4)
    grouped = lsh_attention(q, k, v, **kw)
    repeated = lsh_attention(q, np.repeat(k, 3, axis=-3), np.repeat(v, 3, axis=-3), **kw)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-14, atol=0)


def test_batch_dimensions_broadcast():
    q, k, v = _inputs(8, (3, 2, 14, 4), (1, 2, 14, 4))
    kw = dict(n_buckets=2, n_hashes=2, chunk_size=4, rng=0)
    out = lsh_attention(q, k, v, **kw)
    assert out.shape == (3, 2, 14, 4)
    for b in range(3):
        np.testing.assert_allclose(out[b], lsh_attention(q[b], k[0], v[0], **kw),
                                   rtol=1e-14, atol=0)


def test_same_rng_bit_identical_and_different_rng_differs():
    q, k, v = _inputs(9, (2, 40, 8))
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=5)
    first = lsh_attention(q, k, v, rng=3, **kw)
    np.testing.assert_array_equal(first, lsh_attention(q, k, v, rng=3, **kw))
    np.testing.assert_array_equal(first, lsh_attention(q, k, v,
                                                       rng=np.random.default_rng(3), **kw))
    with pytest.raises(TypeError, match="needs rng="):     # no silent default seed
        lsh_attention(q, k, v, **kw)
    assert np.abs(first - lsh_attention(q, k, v, rng=4, **kw)).max() > 1e-3
    gen = np.random.default_rng(3)             # a Generator is advanced by each call
    assert np.abs(lsh_attention(q, k, v, rng=gen, **kw)
                  - lsh_attention(q, k, v, rng=gen, **kw)).max() > 1e-3


@pytest.mark.parametrize("n", [1, 5, 13, 64, 65])
def test_lengths_need_not_be_multiples_of_the_chunk_size(n):
    q, k, v = _inputs(n, (2, n, 4))
    for chunk in (1, 4, 8, 100):
        a = lsh_attention_matrix(q, k, n_buckets=2, n_hashes=2, chunk_size=chunk,
                                 causal=True, rng=1)
        out = lsh_attention(q, k, v, n_buckets=2, n_hashes=2, chunk_size=chunk,
                            causal=True, rng=1)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-13)
        np.testing.assert_allclose(a @ v, out, rtol=1e-12, atol=1e-13)
    # a chunk larger than the sequence is one chunk: equal to chunk_size = n
    np.testing.assert_array_equal(
        lsh_attention(q, k, v, n_buckets=4, chunk_size=n, rng=2),
        lsh_attention(q, k, v, n_buckets=4, chunk_size=n + 7, rng=2))


def test_empty_sequence_gives_empty_results():
    q = np.zeros((2, 0, 4))
    out, lse = lsh_attention(q, q, q[..., :3], n_buckets=2, return_lse=True, rng=0)
    assert out.shape == (2, 0, 3) and lse.shape == (2, 0)
    assert lsh_attention_matrix(q, None, n_buckets=2, shared_qk=True, rng=0).shape == (2, 0, 0)


def test_validation_names_arguments_and_shapes():
    q, k, v = _inputs(10, (2, 6, 4))
    kw = dict(n_buckets=4, rng=0)
    with pytest.raises(ValueError, match=r"N == M.*q \(2, 6, 4\), k \(2, 7, 4\)"):
        lsh_attention(q, np.zeros((2, 7, 4)), np.zeros((2, 7, 4)), **kw)
    with pytest.raises(ValueError, match=r"N == M.*q \(2, 6, 4\), k \(2, 5, 4\)"):
        lsh_attention_matrix(q, np.zeros((2, 5, 4)), **kw)
    for bad in (3, 1, 0, -2):
        with pytest.raises(ValueError, match=f"n_buckets.*{bad}"):
            lsh_attention(q, k, v, n_buckets=bad)
    with pytest.raises(ValueError, match="n_buckets must be even"):
        lsh_buckets(q, 5, 0)
    with pytest.raises(TypeError, match="n_buckets"):
        lsh_attention(q, k, v, n_buckets=4.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lsh_attention(q, k, v, chunk_size=0, **kw)
    with pytest.raises(ValueError, match="n_hashes"):
        lsh_attention(q, k, v, n_hashes=0, **kw)
    with pytest.raises(TypeError, match="rng"):
        lsh_attention(q, k, v, n_buckets=4, rng="seed")
    with pytest.raises(TypeError, match="shared_qk=True"):
        lsh_attention(q, None, v, **kw)
    with pytest.raises(ValueError, match=r"q and k must share the last dimension D"):
        lsh_attention(q, np.zeros((2, 6, 3)), v, **kw)
    with pytest.raises(ValueError, match=r"buckets\[0\].*\(1, 2, 6\).*\(1, 2, 5\)"):
        lsh_attention(q, k, v, n_buckets=4,
                      buckets=(np.zeros((1, 2, 5), int), np.zeros((1, 2, 6), int)))
    with pytest.raises(ValueError, match=r"buckets values must lie in \[0, n_buckets=4\)"):
        lsh_attention(q, None, v, n_buckets=4, shared_qk=True,
                      buckets=np.full((1, 2, 6), 4))
    with pytest.raises(TypeError, match="integer array"):
        lsh_attention(q, None, v, n_buckets=4, shared_qk=True,
                      buckets=np.zeros((1, 2, 6)))
    with pytest.raises(TypeError, match="pair"):
        lsh_attention(q, k, v, n_buckets=4, buckets=np.zeros((1, 2, 6), int))
    with pytest.raises(ValueError, match="non-finite"):
        lsh_attention(np.full_like(q, np.nan), k, v, **kw)


def test_implied_matrix_respects_the_memory_budget():
    q, k, _ = _inputs(11, (2, 30, 4))
    with pytest.raises(ra.MemoryBudgetError, match="lsh_attention"):
        lsh_attention_matrix(q, k, n_buckets=2, memory_budget=1000, rng=0)


# --------------------------------------------------------------- (d) reversible
def _smooth_branch(seed, d):
    r = np.random.default_rng(seed)
    w, b = r.standard_normal((d, d)) / math.sqrt(d), r.standard_normal(d)
    return lambda x: np.tanh(x @ w + b) * 1.5


def test_reversible_inverse_recovers_inputs_to_rounding():
    r = np.random.default_rng(12)
    x1, x2 = r.standard_normal((2, 3, 50, 16))
    f, g = _smooth_branch(1, 16), _smooth_branch(2, 16)
    y1, y2 = reversible_forward(x1, x2, f, g)
    np.testing.assert_array_equal(y1, x1 + f(x2))
    np.testing.assert_array_equal(y2, x2 + g(x1 + f(x2)))
    r1, r2 = reversible_inverse(y1, y2, f, g)
    # x2 = (x2 + G) - G: an error of about one ulp of |x2| + |G| <= 4 + 1.5
    scale = max(np.abs(x1).max(), np.abs(x2).max())
    assert np.abs(r2 - x2).max() <= 1e-15 * scale
    assert np.abs(r1 - x1).max() <= 2e-15 * scale


def test_reversible_stack_round_trip_and_errors():
    r = np.random.default_rng(13)
    x1, x2 = r.standard_normal((2, 20, 8))
    blocks = [(_smooth_branch(2 * i, 8), _smooth_branch(2 * i + 1, 8)) for i in range(6)]
    y1, y2 = x1, x2
    for f, g in blocks:
        y1, y2 = reversible_forward(y1, y2, f, g)
    for f, g in reversed(blocks):
        y1, y2 = reversible_inverse(y1, y2, f, g)
    np.testing.assert_allclose(y1, x1, rtol=0, atol=1e-13)
    np.testing.assert_allclose(y2, x2, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match=r"x1 \(20, 8\), x2 \(20, 7\)"):
        reversible_forward(x1, x2[:, :7], np.tanh, np.tanh)
    with pytest.raises(ValueError, match=r"f must map .*\(20, 8\).*shape \(20, 4\)"):
        reversible_forward(x1, x2, lambda x: x[:, :4], np.tanh)
    with pytest.raises(TypeError, match="g must be callable"):
        reversible_inverse(x1, x2, np.tanh, None)


@pytest.mark.parametrize("chunk", [1, 3, 16, 49, 50, 200])
def test_chunked_feed_forward_equals_applying_at_once(chunk):
    r = np.random.default_rng(14)
    x = r.standard_normal((2, 50, 8))
    w1, w2 = r.standard_normal((8, 24)), r.standard_normal((24, 6))
    seen = []

    def ffn(z):
        seen.append(z.shape[-2])
        return np.maximum(z @ w1, 0) @ w2

    out = chunked_feed_forward(x, ffn, chunk)
    full = np.maximum(x @ w1, 0) @ w2
    assert out.shape == (2, 50, 6)
    np.testing.assert_allclose(out, full, rtol=1e-13, atol=1e-13)
    assert max(seen) == min(chunk, 50) and sum(seen) == 50
    # an elementwise function is reproduced bit for bit
    np.testing.assert_array_equal(chunked_feed_forward(x, np.sin, chunk), np.sin(x))
    # another sequence axis
    xt = np.swapaxes(x, 0, 1)                            # (50, 2, 8), rows on axis 0
    np.testing.assert_array_equal(chunked_feed_forward(xt, np.cos, chunk, axis=0),
                                  np.cos(xt))


def test_chunked_feed_forward_rejects_bad_arguments():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_feed_forward(x, np.sin, 0)
    with pytest.raises(ValueError, match="axis"):
        chunked_feed_forward(x, np.sin, 2, axis=-1)
    with pytest.raises(ValueError, match=r"row-wise.*\(3, 4\).*\(4,\)"):
        chunked_feed_forward(x, lambda z: z.sum(0), 3)
    with pytest.raises(TypeError, match="fn must be callable"):
        chunked_feed_forward(x, 3, 2)
