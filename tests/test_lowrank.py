"""Low-rank attention (Linformer, Nyströmformer, Luna) against independent forms: the
limits where each is exact, explicit per-head loops, the pseudoinverse iteration's error
recursion, and convergence trends."""
import numpy as np
import pytest
from hypothesis import given

import refattn as ra
from refattn.lowrank import (iterative_pinv, linformer_attention,
                             linformer_attention_matrix, linformer_projections,
                             luna_attention, luna_attention_matrix, nystrom_attention,
                             nystrom_attention_matrix, segment_means)
from refattn.testing import strategies as rst


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _qkv(rng, batch=(2,), hq=4, hkv=2, n=7, m=9, d=5, dv=3, spread=1.0):
    return (rng.standard_normal(batch + (hq, n, d)) * spread,
            rng.standard_normal(batch + (hkv, m, d)) * spread,
            rng.standard_normal(batch + (hkv, m, dv)))


# ----------------------------------------------------------------------- Linformer
@given(rst.attention_inputs(dtype="float64"))
def test_linformer_with_identity_projections_is_exact_attention(inputs):
    q, k, v = inputs
    m = k.shape[-2]
    eye = np.eye(m)
    expected = ra.attention(q, k, v)
    np.testing.assert_allclose(linformer_attention(q, k, v, proj=(eye, eye)), expected,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(linformer_attention(q, k, v, rank=m, proj=eye, shared=True),
                               expected, rtol=1e-12, atol=1e-13)
    # mean pooling with one segment per key is the identity too
    np.testing.assert_allclose(
        linformer_attention(q, k, v, proj=linformer_projections(m, m, kind="mean")),
        expected, rtol=1e-12, atol=1e-13)


def test_linformer_matches_a_per_head_loop_with_per_head_projections(rng):
    q, k, v = _qkv(rng)
    b, hq, n, _ = q.shape
    hkv, m = k.shape[-3:-1]
    e = rng.standard_normal((hkv, 3, m))            # one projection per KV head
    f = rng.standard_normal((b, hkv, 3, m))         # ... and per batch element
    out = linformer_attention(q, k, v, proj=(e, f), scale=0.7)
    expected = np.zeros(out.shape)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            ek = e[kv] @ k[bi, kv]
            fv = f[bi, kv] @ v[bi, kv]
            for i in range(n):
                expected[bi, h, i] = _softmax(0.7 * ek @ q[bi, h, i]) @ fv
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    a = linformer_attention_matrix(q, k, proj=(e, f), scale=0.7)
    np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3), out, rtol=1e-11, atol=1e-12)


def test_linformer_random_projections_are_the_documented_draws(rng):
    q, k, v = _qkv(rng, m=11)
    for shared in (False, True):
        e, f = linformer_projections(11, 4, rng=np.random.default_rng(3), shared=shared)
        np.testing.assert_array_equal(
            linformer_attention(q, k, v, rank=4, rng=3, shared=shared),
            linformer_attention(q, k, v, proj=e if shared else (e, f), shared=shared))
    e, f = linformer_projections(11, 4, rng=3)
    # shared draws only E: the same first matrix as the unshared draw
    np.testing.assert_array_equal(linformer_projections(11, 4, rng=3, shared=True)[1], e)
    assert not np.array_equal(e, f)


def test_gaussian_projection_entries_have_variance_one_over_rank():
    rank, m = 8, 5000
    e, f = linformer_projections(m, rank, rng=11)
    for x in (e, f):
        n = x.size                                   # 40000 i.i.d. N(0, 1/8) entries
        # mean: sd 1/sqrt(8 n) ~ 1.8e-3; variance * rank: sd sqrt(2/n) ~ 7.1e-3 (5 sigma)
        assert abs(x.mean()) < 5 / np.sqrt(rank * n)
        assert abs(x.var() * rank - 1) < 5 * np.sqrt(2 / n)


def test_gaussian_projections_preserve_attention_outputs_at_rate_one_over_sqrt_rank():
    """Linformer's Theorem 1 (a JL statement): ``P F^T F V`` approximates ``P V`` with
    relative error ~ c / sqrt(rank) when ``F`` has N(0, 1/rank) entries. Averaged over 60
    seeds the error must halve (within 20%) each time the rank grows 4x."""
    r = np.random.default_rng(0)
    m, d = 64, 8
    errs = {rank: [] for rank in (4, 16, 64)}
    for seed in range(60):
        q, k, v = r.standard_normal((3, 1, m, d))
        p = ra.attention_probs(q, k)[0]
        pv = p @ v[0]
        for rank in errs:
            f, _ = linformer_projections(m, rank, rng=seed, shared=True)
            errs[rank].append(np.linalg.norm(p @ f.T @ (f @ v[0]) - pv) / np.linalg.norm(pv))
    mean = {rank: np.mean(e) for rank, e in errs.items()}
    assert 1.6 < mean[4] / mean[16] < 2.4
    assert 1.6 < mean[16] / mean[64] < 2.4


def test_linformer_error_falls_with_rank_on_low_rank_inputs():
    """Keys and values that are smooth along the sequence (three cosine modes: rank 3 in
    the sequence direction), mean-pooling projections (the paper's "general
    projections"). Averaged over 8 input seeds the error must fall strictly at every
    doubling of the rank and vanish at rank = M; the pooling error of a smooth function
    is second order in the segment length, so from rank 2 on each doubling must cut it
    at least 2x (about 4x is seen)."""
    m = n = 64
    t = (np.arange(m) + 0.5) / m
    modes = np.stack([np.cos(np.pi * f * t) for f in range(3)], axis=1)
    ranks = [1, 2, 4, 8, 16, 32, 64]
    errs = np.zeros(len(ranks))
    for seed in range(8):
        r = np.random.default_rng(seed)
        k = (modes @ r.standard_normal((3, 6)))[None]
        v = (modes @ r.standard_normal((3, 6)))[None]
        q = r.standard_normal((1, n, 6))
        exact = ra.attention(q, k, v)
        for i, rank in enumerate(ranks):
            proj = linformer_projections(m, rank, kind="mean", shared=True)[0]
            out = linformer_attention(q, k, v, proj=proj, shared=True)
            errs[i] += np.linalg.norm(out - exact) / np.linalg.norm(exact) / 8
    assert (np.diff(errs) < 0).all(), errs
    assert (errs[1:-1] / errs[2:] > 2).all(), errs    # from rank 2 on (rank 1 is coarse)
    assert errs[-1] < 1e-14
    # Random Gaussian projections, by contrast, are no approximation even at rank = M
    # (documented): the relative error stays of order 1.
    gauss = np.mean([np.linalg.norm(linformer_attention(q, k, v, rank=m, rng=s) - exact)
                     / np.linalg.norm(exact) for s in range(8)])
    assert gauss > 0.5


def test_linformer_implied_matrix_rows_sum_to_softmax_times_f_row_sums(rng):
    q, k, v = _qkv(rng, m=10)
    a = linformer_attention_matrix(q, k, rank=4, rng=5)
    e, f = linformer_projections(10, 4, rng=5)
    p = linformer_attention_matrix(q, k, proj=(e, np.eye(10)[:4]))   # softmax(Q (EK)^T)
    np.testing.assert_allclose(a.sum(-1), p[..., :4] @ f.sum(-1), rtol=1e-12, atol=1e-13)
    assert (a < 0).any()                    # not row-stochastic: F has both signs


def test_linformer_bad_input_raises():
    q = np.zeros((2, 5, 4))
    eye = np.eye(5)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1"):
        linformer_attention(q, q, q, rank=0, rng=0)
    with pytest.raises(TypeError, match="rank must be an integer"):
        linformer_attention(q, q, q, rank=2.0, rng=0)
    with pytest.raises(ValueError, match=r"rank=6 exceeds the number of keys M=5"):
        linformer_attention(q, q, q, rank=6, rng=0)
    with pytest.raises(ValueError, match=r"rank=6 exceeds the number of keys M=5"):
        linformer_attention(q, q, q, proj=np.zeros((6, 5)), shared=True)
    with pytest.raises(TypeError, match="needs rank="):
        linformer_attention(q, q, q, rng=0)
    with pytest.raises(TypeError, match="rng"):
        linformer_attention(q, q, q, rank=2)
    with pytest.raises(ValueError, match=r"proj\[0\] \(E\) must have shape \(\.\.\., rank, M\) "
                                         r"with M=5 .* got \(2, 4\)"):
        linformer_attention(q, q, q, proj=(np.zeros((2, 4)), np.zeros((2, 5))))
    with pytest.raises(ValueError, match=r"E and F must have the same rank; got E \(2, 5\), "
                                         r"F \(3, 5\)"):
        linformer_attention(q, q, q, proj=(np.zeros((2, 5)), np.zeros((3, 5))))
    with pytest.raises(ValueError, match=r"leading dims must broadcast to \(\*batch, Hkv\)"
                                         r"=\(2,\)"):
        linformer_attention(q, q, q, proj=np.zeros((3, 2, 5)), shared=True)
    with pytest.raises(ValueError, match="does not match the projections' 5 rows"):
        linformer_attention(q, q, q, rank=3, proj=(eye, eye))
    with pytest.raises(TypeError, match=r"proj must be a pair \(E, F\)"):
        linformer_attention(q, q, q, proj=eye)
    with pytest.raises(TypeError, match="with shared=True, proj must be one matrix"):
        linformer_attention(q, q, q, proj=(eye, eye), shared=True)
    with pytest.raises(ValueError, match="non-finite"):
        linformer_attention(q, q, q, proj=np.full((2, 5), np.nan), shared=True)
    with pytest.raises(ValueError, match="kind must be"):
        linformer_projections(5, 2, kind="orthogonal")


# -------------------------------------------------------------------- Nyströmformer
def _error_terms(a, iters):
    """``E_j = I - A Z_j`` for ``j = 0..iters``, with ``Z_j`` from an explicit loop."""
    eye = np.eye(a.shape[-1])
    z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    out = [eye - a @ z]
    for _ in range(iters):
        x = a @ z
        z = 0.25 * z @ (13 * eye - x @ (15 * eye - x @ (7 * eye - x)))
        out.append(eye - a @ z)
    return out


@pytest.mark.parametrize("kind", ["softmax", "general"])
def test_pinv_iteration_error_obeys_the_cubic_recursion(kind):
    r = np.random.default_rng(3)
    for _ in range(5):
        a = r.standard_normal((8, 8))
        if kind == "softmax":
            a = _softmax(a * 2)
        errors = _error_terms(a, 8)
        for j in range(8):
            e = errors[j]
            predicted = 0.75 * np.linalg.matrix_power(e, 3) + 0.25 * np.linalg.matrix_power(e, 4)
            np.testing.assert_allclose(errors[j + 1], predicted, rtol=0,
                                       atol=1e-13 * max(1.0, np.linalg.cond(a)))
        # the library iterates the same Z_j
        for iters in (0, 1, 5):
            np.testing.assert_allclose(np.eye(8) - a @ iterative_pinv(a, iters),
                                       errors[iters], rtol=0, atol=1e-12)


def test_pinv_iteration_converges_with_third_order():
    """``E_0 = I - A A^T / (|A|_1 |A|_inf)`` is symmetric with eigenvalues in [0, 1), and
    every ``E_j`` is a polynomial in it, so ``|E_{j+1}|_2 = 3/4 e^3 + 1/4 e^4`` exactly for
    ``e = |E_j|_2`` (to rounding, ``eps * cond(A)`` absolute): the error norm is cubed
    (times a factor in [3/4, 1]) at each step, after a slow start near 1
    (``1 - e`` grows 13/4-fold per step) when ``A`` is ill-conditioned."""
    r = np.random.default_rng(4)
    a = _softmax(r.standard_normal((16, 16)) * 3)
    floor = 100 * np.finfo(float).eps * np.linalg.cond(a)
    e = np.array([np.linalg.norm(np.eye(16) - a @ iterative_pinv(a, j), 2)
                  for j in range(14)])
    assert e[0] < 1
    predicted = 0.75 * e[:-1] ** 3 + 0.25 * e[:-1] ** 4
    np.testing.assert_allclose(e[1:], predicted, rtol=1e-9, atol=floor)
    big = e[1:] > 1e4 * floor                  # far above rounding
    assert big.sum() >= 8
    ratio = e[1:][big] / e[:-1][big] ** 3
    assert ((ratio > 0.75 * (1 - 1e-6)) & (ratio < 1 + 1e-6)).all(), ratio
    fast = big & (e[:-1] < 0.5)
    assert fast.sum() >= 2
    order = np.log(e[1:][fast]) / np.log(e[:-1][fast])
    assert (order > 2.9).all(), order
    assert e[-1] < floor
    inv = np.linalg.inv(a)
    np.testing.assert_allclose(iterative_pinv(a, 20), inv, rtol=0,
                               atol=floor * np.abs(inv).max())


def test_pinv_iteration_on_singular_matrices_reaches_the_pseudoinverse_then_drifts():
    """From ``Z_0 = a A^T`` the iterates stay in the row space of ``A`` and converge to
    ``A^+`` in exact arithmetic. In floating point the left null space of ``A`` is an
    eigenvector of ``E`` with eigenvalue 1, a repelling fixed point of
    ``e -> 3/4 e^3 + 1/4 e^4`` (slope 13/4): rounding there grows 13/4-fold per
    iteration, so for an exactly singular ``A`` the iterate first converges, then drifts
    away (documented in iterative_pinv)."""
    r = np.random.default_rng(5)
    a = _softmax(r.standard_normal((6, 6)))
    a[3] = a[1]                              # duplicate landmark rows: rank 5
    pinv = np.linalg.pinv(a)
    err = {j: np.abs(iterative_pinv(a, j) - pinv).max() for j in range(8, 31)}
    assert min(err.values()) < 1e-10
    growth = err[30] / err[20]
    assert 0.5 < growth / 3.25 ** 10 < 2, growth
    assert err[30] > 1e-4


def test_pinv_iteration_normalizes_each_matrix_separately():
    r = np.random.default_rng(6)
    a = _softmax(r.standard_normal((2, 5, 5)))
    a[1] *= 1000.0
    batched = iterative_pinv(a, 3)
    for i in range(2):
        np.testing.assert_allclose(batched[i], iterative_pinv(a[i], 3), rtol=1e-13)
    np.testing.assert_array_equal(iterative_pinv(np.zeros((3, 3)), 4), np.zeros((3, 3)))


@given(rst.attention_inputs(rst.shapes().map(
    lambda s: rst.Shapes(s.batch, s.hq, s.hkv, s.n, s.n, s.d, s.dv)), dtype="float64"))
def test_nystrom_with_one_landmark_per_token_and_exact_pinv_is_exact(inputs):
    """F = A = B = P and ``P P^+ P = P``; numerically to ``eps * cond(P) * max|v|`` (the
    pseudoinverse of an ill-conditioned P, small logits with small D, amplifies rounding:
    7x that bound was the worst of 3000 random cases)."""
    q, k, v = inputs
    n = q.shape[-2]
    cond = np.linalg.cond(ra.attention_probs(q, k)).max()
    tol = 50 * np.finfo(float).eps * min(cond, 1e300) * np.abs(v).max()
    np.testing.assert_allclose(nystrom_attention(q, k, v, num_landmarks=n, pinv_iters=None),
                               ra.attention(q, k, v), rtol=1e-12, atol=tol + 1e-13)


def _nystrom_loop(q, k, v, c, iters, scale):
    """Nyströmformer per (batch, head) with explicit segment loops."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[-3:-1]
    out = np.zeros((b, hq, n, v.shape[-1]))
    qs, ks = np.array_split(np.arange(n), c), np.array_split(np.arange(m), c)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            ql = np.stack([q[bi, h, seg].mean(0) for seg in qs])
            kl = np.stack([k[bi, kv, seg].mean(0) for seg in ks])
            f = _softmax(scale * q[bi, h] @ kl.T)
            a = _softmax(scale * ql @ kl.T)
            bb = _softmax(scale * ql @ k[bi, kv].T)
            z = np.linalg.pinv(a) if iters is None else _iterate(a, iters)
            out[bi, h] = f @ z @ bb @ v[bi, kv]
    return out


def _iterate(a, iters):
    eye = np.eye(a.shape[-1])
    z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    for _ in range(iters):
        x = a @ z
        z = 0.25 * z @ (13 * eye - x @ (15 * eye - x @ (7 * eye - x)))
    return z


@pytest.mark.parametrize("n, m, c", [(12, 8, 4), (7, 9, 3), (10, 11, 4), (5, 5, 1)])
@pytest.mark.parametrize("iters", [None, 0, 6])
def test_nystrom_matches_explicit_segments_and_kernels(rng, n, m, c, iters):
    q, k, v = _qkv(rng, n=n, m=m)
    out = nystrom_attention(q, k, v, num_landmarks=c, pinv_iters=iters, scale=0.6)
    np.testing.assert_allclose(out, _nystrom_loop(q, k, v, c, iters, 0.6),
                               rtol=1e-10, atol=1e-11)
    a = nystrom_attention_matrix(q, k, num_landmarks=c, pinv_iters=iters, scale=0.6)
    np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3), out, rtol=1e-10, atol=1e-11)


def test_segment_means_follow_array_split():
    x = np.random.default_rng(0).standard_normal((2, 10, 3))
    for c in (1, 3, 4, 10):
        expected = np.stack([s.mean(-2) for s in np.array_split(x, c, axis=-2)], axis=-2)
        np.testing.assert_allclose(segment_means(x, c), expected, rtol=1e-14)
    with pytest.raises(ValueError, match="num_segments=11 exceeds the 10 rows"):
        segment_means(x, 11)


def test_nystrom_rows_sum_to_one_with_the_exact_inverse_and_iterates_converge(rng):
    q, k, v = _qkv(rng, n=12, m=16, spread=0.7)
    exact_inv = nystrom_attention_matrix(q, k, num_landmarks=4, pinv_iters=None)
    np.testing.assert_allclose(exact_inv.sum(-1), 1.0, rtol=1e-12)
    assert (exact_inv < 0).any()
    exact = nystrom_attention(q, k, v, num_landmarks=4, pinv_iters=None)
    # the landmark kernel of such high-entropy inputs is ill-conditioned: 6 iterations
    # (the paper's default) are still in the slow phase, 20 have converged
    assert np.abs(nystrom_attention(q, k, v, num_landmarks=4) - exact).max() > 1e-3
    assert np.abs(nystrom_attention(q, k, v, num_landmarks=4, pinv_iters=20)
                  - exact).max() < 1e-10


def test_nystrom_bad_input_raises():
    q = np.zeros((2, 6, 4))
    k = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r"num_landmarks must be an integer >= 1"):
        nystrom_attention(q, k, k, num_landmarks=0)
    with pytest.raises(TypeError, match="num_landmarks must be an integer"):
        nystrom_attention(q, k, k, num_landmarks=2.5)
    with pytest.raises(ValueError, match=r"num_landmarks=5 exceeds min\(N, M\)=4.*"
                                         r"q \(2, 6, 4\), k \(2, 4, 4\)"):
        nystrom_attention(q, k, k, num_landmarks=5)
    with pytest.raises(ValueError, match="pinv_iters must be an integer >= 0"):
        nystrom_attention(q, k, k, num_landmarks=2, pinv_iters=-1)
    with pytest.raises(ValueError, match="square matrices"):
        iterative_pinv(np.zeros((3, 4)), 2)


# ----------------------------------------------------------------------------- Luna
def test_luna_equals_two_dense_attentions_per_query_head(rng):
    q, k, v = _qkv(rng)                            # Hq = 4, Hkv = 2
    p = rng.standard_normal((2, 4, 3, 5))          # per batch element and query head
    out, ck, cv = luna_attention(q, k, v, packed=p, scale=0.8, return_packed=True)
    kr, vr = np.repeat(k, 2, axis=-3), np.repeat(v, 2, axis=-3)
    ck2 = ra.attention(p, kr, kr, scale=0.8)
    cv2 = ra.attention(p, kr, vr, scale=0.8)
    np.testing.assert_allclose(ck, ck2, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cv, cv2, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(out, ra.attention(q, ck2, cv2, scale=0.8),
                               rtol=1e-12, atol=1e-13)
    # P per KV head: shared by the two query heads of each group
    pk = rng.standard_normal((2, 3, 5))
    np.testing.assert_allclose(luna_attention(q, k, v, packed=pk),
                               luna_attention(q, k, v, packed=np.repeat(pk, 2, axis=0)),
                               rtol=1e-14)


def test_luna_with_one_packed_row_gives_every_query_the_packed_context(rng):
    q, k, v = _qkv(rng)
    p = rng.standard_normal((1, 5))
    ctx = ra.attention(np.broadcast_to(p, (2, 4, 1, 5)), np.repeat(k, 2, axis=-3),
                       np.repeat(v, 2, axis=-3))
    np.testing.assert_allclose(luna_attention(q, k, v, packed=p),
                               np.broadcast_to(ctx, (2, 4, 7, 3)), rtol=1e-12, atol=1e-13)


def test_luna_is_exact_when_each_packed_row_picks_out_one_key(rng):
    """``P = alpha K`` with unit, distinct keys: the pack attention tends to the identity
    (off-diagonal weights ``exp(-alpha s (1 - cos))``, below 1e-40 here), so
    ``C_K = K``, ``C_V = V`` and the unpack is exact attention."""
    m, d = 10, 16
    k = rng.standard_normal((2, m, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    cos = np.einsum("hid,hjd->hij", k, k) - 2 * np.eye(m)
    assert 1 - cos.max() > 0.3
    q = rng.standard_normal((2, 5, d))
    v = rng.standard_normal((2, m, 4))
    out = luna_attention(q, k, v, packed=1500.0 * k)
    np.testing.assert_allclose(out, ra.attention(q, k, v), rtol=1e-13, atol=1e-14)


def test_luna_integer_packed_uses_query_segment_means(rng):
    q, k, v = _qkv(rng, n=10)
    p = segment_means(q, 3)                        # (2, 4, 3, 5): per query head
    np.testing.assert_array_equal(luna_attention(q, k, v, packed=3),
                                  luna_attention(q, k, v, packed=p))


def test_luna_implied_matrix_is_stochastic_with_rank_at_most_l(rng):
    q, k, v = _qkv(rng, n=12, m=15)
    a = luna_attention_matrix(q, k, packed=3)
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-13)
    assert max(np.linalg.matrix_rank(x) for x in a.reshape(-1, 12, 15)) == 3
    np.testing.assert_allclose(a @ np.repeat(v, 2, axis=-3),
                               luna_attention(q, k, v, packed=3), rtol=1e-12, atol=1e-13)


def test_luna_bad_input_raises():
    q = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"packed must have shape \(l, D\) .* with D=4 .* "
                                         r"got packed \(3, 5\)"):
        luna_attention(q, q, q, packed=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="l >= 1"):
        luna_attention(q, q, q, packed=np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"packed=6 segment means of the queries need "
                                         r"l <= N=5"):
        luna_attention(q, q, q, packed=6)
    with pytest.raises(ValueError, match="packed must be an integer >= 1"):
        luna_attention(q, q, q, packed=0)
    with pytest.raises(ValueError, match=r"head dim must be 1, Hkv=2 or Hq=2"):
        luna_attention(q, q, q, packed=np.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match="batch dims"):
        luna_attention(q, q, q, packed=np.zeros((3, 2, 2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        luna_attention(q, q, q, packed=np.full((2, 4), np.inf))
