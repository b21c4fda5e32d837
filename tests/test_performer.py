"""Performer / FAVOR+ (refattn.performer): unbiasedness and Lemma 2 MSEs by Monte Carlo,
convergence rate m^(-1/2), orthogonal < iid error, nonnegative weights, the stabilizer
cancelling, scale handling, and causal / streaming forms against the masked form.

Monte Carlo checks run at fixed seeds and use a stated bound: |estimate - truth| <= 4
standard errors (the standard error estimated from the same sample)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import special, stats

import refattn as ra
from refattn.performer import (draw_omega, performer_attention, performer_attention_matrix,
                               performer_features, performer_init_state, performer_step,
                               softmax_kernel_estimate)
from refattn.testing import max_rel_error, strategies as rst

KERNELS = ("positive", "trigonometric", "hyperbolic")
# pairs of moderate norm: the estimators' errors have all moments, the 4-SE bound is fair
PAIRS = (np.array([[0.3, -0.2, 0.4, 0.1], [0.5, 0.1, -0.3, 0.2], [0.0, 0.6, 0.2, -0.4]]),
         np.array([[0.2, 0.5, -0.1, 0.3], [-0.2, 0.4, 0.3, 0.1], [0.3, -0.5, 0.1, 0.2]]))


def lemma2_mse(x, y, m, kernel):
    """Choromanski et al. 2021, Lemma 2 (as in DESIGN.md), i.i.d. features."""
    sm = np.exp((x * y).sum(-1))
    s2 = ((x + y) ** 2).sum(-1)
    d2 = ((x - y) ** 2).sum(-1)
    pos = np.exp(s2) * sm ** 2 * (1 - np.exp(-s2)) / m
    if kernel == "positive":
        return pos
    if kernel == "hyperbolic":
        return 0.5 * (1 - np.exp(-s2)) * pos
    return np.exp(s2) * sm ** -2 * (1 - np.exp(-d2)) ** 2 / (2 * m)


def ref_features(x, w, kernel):
    """The three feature maps, written out plainly (no stabilizer)."""
    p = x @ w.T
    half = (x ** 2).sum(-1, keepdims=True) / 2
    m = w.shape[0]
    if kernel == "positive":
        return np.exp(p - half) / np.sqrt(m)
    if kernel == "hyperbolic":
        return np.concatenate([np.exp(p - half), np.exp(-p - half)], -1) / np.sqrt(2 * m)
    return np.exp(half) * np.concatenate([np.sin(p), np.cos(p)], -1) / np.sqrt(m)


# ------------------------------------------------------------------ the estimator
@pytest.mark.parametrize("orthogonal", [False, True], ids=["iid", "orthogonal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_estimate_is_unbiased(kernel, orthogonal):
    x, y = PAIRS
    r = 40_000
    # m = 6 > d = 4: a full orthogonal block and a partial one
    est = softmax_kernel_estimate(x, y, num_features=6, kernel=kernel,
                                  orthogonal=orthogonal, rng=11, draws=r)
    assert est.shape == (r, 3)
    se = est.std(0) / np.sqrt(r)
    truth = np.exp((x * y).sum(-1))
    assert (np.abs(est.mean(0) - truth) <= 4 * se).all(), (est.mean(0), truth, se)
    assert (se < 0.01 * truth).all()              # the bound detects a 4 % bias


@pytest.mark.parametrize("kernel", KERNELS)
def test_lemma2_mse_matches_monte_carlo(kernel):
    """Closed-form MSE of Lemma 2 vs the Monte Carlo MSE of i.i.d. features."""
    x, y = PAIRS
    r, m = 200_000, 4
    est = softmax_kernel_estimate(x, y, num_features=m, kernel=kernel, orthogonal=False,
                                  rng=5, draws=r)
    sq = (est - np.exp((x * y).sum(-1))) ** 2
    mc, se = sq.mean(0), sq.std(0) / np.sqrt(r)
    closed = lemma2_mse(x, y, m, kernel)
    assert (np.abs(mc - closed) <= 4 * se).all(), (mc, closed, se)
    # the bound is tight enough to tell m = 4 from m = 5 features
    assert (4 * se < np.abs(closed - lemma2_mse(x, y, m + 1, kernel))).all()


def test_orthogonal_features_lower_the_positive_mse_by_the_theorem_bound():
    """Positive features, m <= d orthogonal: MSE_ort <= MSE_iid -
    2(m-1)/(m(d+2)) (SM - exp(-(|x|^2+|y|^2)/2))^2 (Choromanski et al. 2021, Thm. 2)."""
    x, y = PAIRS[0][0], PAIRS[1][0]
    m = d = 4
    r = 200_000
    est = softmax_kernel_estimate(x, y, num_features=m, orthogonal=True, rng=3, draws=r)
    sm = np.exp(x @ y)
    sq = (est - sm) ** 2
    mc, se = sq.mean(), sq.std() / np.sqrt(r)
    bound = 2 * (m - 1) / (m * (d + 2)) * (sm - np.exp(-(x @ x + y @ y) / 2)) ** 2
    improvement = lemma2_mse(x, y, m, "positive") - mc
    assert improvement >= bound - 4 * se, (improvement, bound, se)
    assert bound - 4 * se > 0.5 * bound                         # iid features would fail


def test_draw_omega_blocks_and_norms():
    w = draw_omega(10, 4, orthogonal=True, rng=2)
    assert w.shape == (10, 4)
    for block in (w[0:4], w[4:8], w[8:10]):
        g = block @ block.T
        np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-12)
    # norms are chi(d); directions uniform: every row is N(0, I_d) marginally
    many = draw_omega(20_000, 5, orthogonal=True, rng=4)
    assert stats.kstest(np.linalg.norm(many, axis=1), "chi", args=(5,)).pvalue > 1e-3
    cov = np.cov(many.T)
    np.testing.assert_allclose(cov, np.eye(5), atol=4 * np.sqrt(2 / 20_000) * 1.5)
    np.testing.assert_array_equal(draw_omega(3, 2, rng=7), draw_omega(3, 2, rng=7))
    iid = draw_omega(3, 2, orthogonal=False, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(iid, np.random.default_rng(7).standard_normal((3, 2)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_features_match_their_formulas(kernel, rng):
    x = rng.standard_normal((2, 5, 3))
    w = draw_omega(7, 3, rng=0)
    np.testing.assert_allclose(performer_features(x, w, kernel), ref_features(x, w, kernel),
                               rtol=1e-14)
    for mode, shape in (("row", (2, 5, 1)), ("global", (2, 1, 1))):
        f, c = performer_features(x * 3, w, kernel, stabilize=mode, return_shift=True)
        assert c.shape == shape
        np.testing.assert_allclose(f * np.exp(c), ref_features(x * 3, w, kernel),
                                   rtol=1e-12)
        assert np.abs(f).max() <= 1 / np.sqrt(7) * (1 + 1e-15)   # max exponent is 0
        big = performer_features(x * 30, w, kernel, stabilize=mode)   # plain: 0 or inf
        assert np.isfinite(big).all() and (np.abs(big).max(-1) > 0).any()
    # the estimate helper is the dot product of the features
    y = rng.standard_normal((5, 3))
    np.testing.assert_allclose(softmax_kernel_estimate(x, y, num_features=7, kernel=kernel,
                                                       omega=w, rng=None),
                               (ref_features(x, w, kernel) * ref_features(y, w, kernel)
                                ).sum(-1), rtol=1e-13)


# ------------------------------------------------------------------ attention
def _exact_error(q, k, v, exact, m, seeds, **kw):
    return np.array([np.sqrt(np.mean((performer_attention(q, k, v, num_features=m, rng=s,
                                                          **kw) - exact) ** 2))
                     for s in seeds])


@pytest.mark.parametrize("orthogonal", [False, True], ids=["iid", "orthogonal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_error_falls_like_inverse_sqrt_features(kernel, orthogonal):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 64, 16))
    q, k = 0.3 * q, 0.3 * k                   # |x + y|^2 ~ 0.7: in the asymptotic regime
    exact = ra.attention(q, k, v)
    ms = 2 ** np.arange(4, 11)                # 16 .. 1024
    errs = [_exact_error(q, k, v, exact, int(m), range(40), kernel=kernel,
                         orthogonal=orthogonal).mean() for m in ms]
    slope = np.polyfit(np.log(ms), np.log(errs), 1)[0]
    assert -0.6 <= slope <= -0.4, (slope, errs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_orthogonal_features_beat_iid_on_average(kernel):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 64, 16))
    q, k = 0.3 * q, 0.3 * k
    exact = ra.attention(q, k, v)
    seeds = range(100)
    iid = _exact_error(q, k, v, exact, 64, seeds, kernel=kernel, orthogonal=False)
    ort = _exact_error(q, k, v, exact, 64, seeds, kernel=kernel, orthogonal=True)
    se = np.hypot(iid.std(), ort.std()) / np.sqrt(len(seeds))
    assert ort.mean() < iid.mean() - 2 * se, (ort.mean(), iid.mean(), se)


@given(data=st.data(), kernel=st.sampled_from(["positive", "hyperbolic"]),
       spread=st.sampled_from([0.1, 1.0, 3.0, 40.0]), causal=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_positive_and_hyperbolic_weights_are_never_negative(data, kernel, spread, causal,
                                                            seed):
    q, k, _ = data.draw(rst.attention_inputs(dtype="float64", logit_scale=spread))
    a = performer_attention_matrix(q, k, num_features=8, kernel=kernel, causal=causal,
                                   rng=seed)
    assert (a >= 0).all() and np.isfinite(a).all()
    sums = a.sum(-1)
    np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-12)
    w = draw_omega(8, q.shape[-1], rng=seed)
    assert (performer_features(q, w, kernel, stabilize="row") >= 0).all()


def test_trigonometric_weights_can_be_negative(rng):
    q, k = rng.standard_normal((2, 1, 12, 4)) * 2
    a = performer_attention_matrix(q, k, num_features=4, kernel="trigonometric", rng=0)
    assert (a < 0).any()
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-9)


@settings(max_examples=40)
@given(data=st.data(), kernel=st.sampled_from(KERNELS), chunk=st.integers(1, 9),
       orthogonal=st.booleans())
def test_causal_prefix_sums_equal_the_masked_quadratic_form(data, kernel, chunk,
                                                            orthogonal):
    # trigonometric weights are signed: keep logits small so no denominator nears 0
    spread = 0.1 if kernel == "trigonometric" else None
    q, k, v = data.draw(rst.attention_inputs(dtype="float64", logit_scale=spread))
    kw = dict(num_features=7, kernel=kernel, orthogonal=orthogonal, rng=3, causal=True)
    quad = performer_attention(q, k, v, method="quadratic", **kw)
    for method in (None, "recurrent", "chunked"):
        out = performer_attention(q, k, v, method=method, chunk_size=chunk, **kw)
        assert max_rel_error(out, quad, normwise=True) <= 1e-12, method
    a = performer_attention_matrix(q, k, **kw)
    group = q.shape[-3] // k.shape[-3]
    np.testing.assert_allclose(a @ np.repeat(v, group, axis=-3), quad, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3, -0.7])
@pytest.mark.parametrize("kernel", KERNELS)
def test_output_matches_the_feature_formula(kernel, scale, causal, rng):
    """Written out: x = sqrt|s| q, y = sign(s) sqrt|s| k, w_ij = phi(x_i).phi(y_j)."""
    q = rng.standard_normal((2, 4, 6, 5))
    k, v = rng.standard_normal((2, 2, 2, 9, 5))
    w = draw_omega(11, 5, rng=1)
    s = 1 / np.sqrt(5) if scale is None else scale
    x, y = np.sqrt(abs(s)) * q, np.sign(s) * np.sqrt(abs(s)) * k
    fx, fy = ref_features(x, w, kernel), np.repeat(ref_features(y, w, kernel), 2, axis=1)
    wt = fx @ fy.swapaxes(-1, -2)
    if causal:
        wt = wt * np.tril(np.ones((6, 9)), 3)
    expected = wt @ np.repeat(v, 2, axis=1) / wt.sum(-1, keepdims=True)
    for stabilize in (True, False):
        out = performer_attention(q, k, v, num_features=11, kernel=kernel, omega=w,
                                  scale=scale, causal=causal, stabilize=stabilize)
        np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


def test_scale_sets_the_estimated_kernel(rng):
    q, k, v = rng.standard_normal((3, 1, 8, 4))
    q, k = 0.5 * q, 0.5 * k
    for s in (-0.8, 1.0):                  # m = 4096: errors about 0.01 here
        target = ra.attention(q, k, v, scale=s)
        est = np.mean([performer_attention(q, k, v, num_features=4096, scale=s, rng=i)
                       for i in range(4)], axis=0)
        # much closer to softmax attention at this scale than to the default scale 1/2
        assert np.abs(est - target).max() < 0.2 * np.abs(
            target - ra.attention(q, k, v)).max()
    np.testing.assert_array_equal(
        performer_attention(q, k, v, num_features=8, rng=0),
        performer_attention(q, k, v, num_features=8, rng=0, scale=0.5))   # 1/sqrt(4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_scale_is_exact_uniform_averaging(kernel, rng):
    """scale = 0: phi(0).phi(0) = 1 exactly for every kernel, so the estimate is exact."""
    q, k, v = rng.standard_normal((3, 2, 7, 4))
    out = performer_attention(q, k, v, num_features=5, kernel=kernel, scale=0.0, rng=0)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(-2, keepdims=True), v.shape),
                               rtol=1e-13)
    out = performer_attention(q, k, v, num_features=5, kernel=kernel, scale=0.0, rng=0,
                              causal=True)
    np.testing.assert_allclose(out, np.cumsum(v, -2) / np.arange(1, 8)[:, None],
                               rtol=1e-13)


def _logspace_attention(x, y, v, w, kernel):
    """Normalized attention with weights sum_f exp(h_f(x_i) + h_f(y_j)), all in log space
    (positive and hyperbolic kernels): an independent form of what the stabilizer does."""
    def logs(z):
        p = z @ w.T
        half = (z ** 2).sum(-1, keepdims=True) / 2
        if kernel == "positive":
            return p - half
        return np.concatenate([p - half, -p - half], -1)
    lw = special.logsumexp(logs(x)[:, None, :] + logs(y)[None, :, :], axis=-1)
    return special.softmax(lw, axis=-1) @ v


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic"])
def test_stabilizer_cancels_exactly(kernel, rng):
    w = draw_omega(16, 8, rng=5)
    q, k, v = rng.standard_normal((3, 1, 10, 8))
    kw = dict(num_features=16, kernel=kernel, omega=w)
    for causal in (False, True):                       # moderate inputs: same function
        np.testing.assert_allclose(
            performer_attention(q, k, v, causal=causal, stabilize=True, **kw),
            performer_attention(q, k, v, causal=causal, stabilize=False, **kw),
            rtol=1e-12, atol=1e-14)
    # large inputs of equal norm (|x|^2 = 2000): the plain features all underflow to 0
    big_q = q / np.linalg.norm(q, axis=-1, keepdims=True) * np.sqrt(2000) * 8 ** 0.25
    big_k = k / np.linalg.norm(k, axis=-1, keepdims=True) * np.sqrt(2000) * 8 ** 0.25
    plain = performer_attention(big_q, big_k, v, stabilize=False, **kw)
    assert (plain == 0).all()
    stable = performer_attention(big_q, big_k, v, stabilize=True, **kw)
    x, y = big_q[0] * 8 ** -0.25, big_k[0] * 8 ** -0.25
    np.testing.assert_allclose(stable[0], _logspace_attention(x, y, v[0], w, kernel),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", [None, "quadratic", "chunked"])
def test_nan_in_a_later_key_does_not_reach_earlier_queries(method, rng):
    q, k, v = rng.standard_normal((3, 1, 9, 3))
    k[0, 5, 1] = np.nan
    out = performer_attention(q, k, v, num_features=8, rng=0, causal=True, method=method,
                              chunk_size=4, check_finite=False)
    assert np.isfinite(out[0, :5]).all() and np.isnan(out[0, 5:]).all()


def test_trigonometric_overflow_needs_the_stabilizer(rng):
    q, k, v = rng.standard_normal((3, 1, 6, 4)) * 40
    with pytest.raises(ValueError, match="overflowed"):
        performer_attention(q, k, v, num_features=8, kernel="trigonometric", rng=0,
                            stabilize=False)
    out = performer_attention(q, k, v, num_features=8, kernel="trigonometric", rng=0)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stabilize", [True, False])
def test_stepping_equals_the_parallel_form(kernel, stabilize, rng):
    batch, hq, hkv, n, d, dv = (2,), 4, 2, 13, 5, 3
    q = rng.standard_normal(batch + (hq, n, d)) * 0.3
    # growing key norms: the running key max changes at almost every step
    k = rng.standard_normal(batch + (hkv, n, d)) * np.linspace(0.1, 2.0, n)[:, None]
    v = rng.standard_normal(batch + (hkv, n, dv))
    if kernel == "trigonometric":
        k = k * 0.2
    kw = dict(num_features=6, kernel=kernel, rng=9, stabilize=stabilize)
    state = performer_init_state(batch_shape=batch, heads_q=hq, heads_kv=hkv, d=d, dv=dv,
                                 **kw)
    np.testing.assert_array_equal(state.omega, draw_omega(6, d, rng=9))
    size, outs = state.nbytes, []
    for t in range(n):
        o, state = performer_step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        assert state.nbytes == size
        outs.append(o)
    np.testing.assert_allclose(np.stack(outs, -2),
                               performer_attention(q, k, v, causal=True, **kw),
                               rtol=1e-11, atol=1e-13)


def test_stepping_with_keys_of_very_different_norms(rng):
    """Keys whose exponents differ by ~1500: the running shift must only grow (a shift
    that drops would rescale the state by exp(+1500) = inf)."""
    n, d = 9, 4
    q = rng.standard_normal((1, n, d))
    k = rng.standard_normal((1, n, d))
    k[:, 1::2] *= np.sqrt(3000 * 2) / np.linalg.norm(k[:, 1::2], axis=-1, keepdims=True)
    v = rng.standard_normal((1, n, 2))
    state = performer_init_state(heads_q=1, heads_kv=1, d=d, dv=2, num_features=8, rng=1)
    outs = []
    for t in range(n):
        o, state = performer_step(state, q[:, t], k[:, t], v[:, t])
        outs.append(o)
    par = performer_attention(q, k, v, num_features=8, rng=1, causal=True)
    assert np.isfinite(par).all()
    np.testing.assert_allclose(np.stack(outs, -2), par, rtol=1e-11, atol=1e-13)


def test_rng_and_validation(rng):
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    with pytest.raises(TypeError, match="needs rng="):
        performer_attention(q, k, v, num_features=4)
    with pytest.raises(TypeError, match="needs rng="):
        softmax_kernel_estimate(q[0, 0], k[0, 0], num_features=4, rng=None)
    w = draw_omega(4, 4, rng=1)
    np.testing.assert_array_equal(performer_attention(q, k, v, num_features=4, omega=w),
                                  performer_attention(q, k, v, num_features=4, rng=1))
    gen = np.random.default_rng(0)
    first = performer_attention(q, k, v, num_features=4, rng=gen)
    assert not np.array_equal(first, performer_attention(q, k, v, num_features=4, rng=gen))
    with pytest.raises(ValueError, match="kernel must be one of"):
        performer_attention(q, k, v, num_features=4, rng=0, kernel="gaussian")
    with pytest.raises(ValueError, match="num_features must be an integer >= 1"):
        performer_attention(q, k, v, num_features=0, rng=0)
    with pytest.raises(TypeError, match="num_features must be an integer"):
        performer_attention(q, k, v, num_features=4.0, rng=0)
    with pytest.raises(ValueError, match=r"omega must have shape \(num_features, D\)"):
        performer_attention(q, k, v, num_features=4, omega=np.ones((4, 3)))
    with pytest.raises(TypeError, match="stabilize must be True or False"):
        performer_attention(q, k, v, num_features=4, rng=0, stabilize="row")
    with pytest.raises(ValueError, match="method must be one of"):
        performer_attention(q, k, v, num_features=4, rng=0, causal=True, method="cumsum")
    with pytest.raises(ValueError, match=r"x \(..., L, D\) and omega \(m, D\)"):
        performer_features(q, np.ones((4, 3)))
    with pytest.raises(ValueError, match="stabilize must be None"):
        performer_features(q, w, stabilize=True)
    with pytest.raises(ValueError, match="either draws"):
        softmax_kernel_estimate(q[0, 0], k[0, 0], num_features=4, omega=w, draws=3, rng=0)
    with pytest.raises(ra.MemoryBudgetError, match="performer_attention"):
        performer_attention_matrix(q, k, num_features=4, rng=0, memory_budget=10)


def test_registered_flags():
    spec = ra.mechanisms()["performer_attention"]
    assert spec.randomized and spec.position_free and spec.row_stochastic
    assert spec.constant_state and spec.init_state.__wrapped__ is performer_init_state
    assert spec.example == {"num_features": 16}
    assert ra.mechanisms()["linear_attention"].constant_state
