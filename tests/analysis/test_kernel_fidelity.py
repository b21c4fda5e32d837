"""Performer Lemma 2 and the orthogonal-feature bound, checked by Monte Carlo.

Statistics (T independent trials, fixed seeds):

* light-tailed cases (trig everywhere; positive and hyperbolic at x.y = -0.5): the
  empirical MSE is a mean of squared errors, its standard error the sample sd of the
  squared errors over sqrt(T); |z| < 5 is required (two-sided normal 5.7e-7).
* heavy-tailed cases (positive and hyperbolic at |x| = |y| = 1, x.y = 0.5, so
  |x+y|^2 = 3: the squared errors are lognormal-like with relative variance ~e^12/m;
  over 200 seeds the sample-sd z reached -7, so it is not a valid CI there): the exact
  E[e^4] (squared_error_moments) gives the one-sided bound for means of nonnegative
  variables P(mean <= E - t) <= exp(-T t^2 / (2 E[e^4])); requiring a deficit under
  5 sqrt(E[e^4]/T) fails falsely with probability <= exp(-12.5) = 3.7e-6; and a
  Chebyshev bound with 40 standard deviations above (false failure <= 1/1600).

Every check is also applied to a 2x-wrong theory and must reject it.
"""
import numpy as np
import pytest

from refattn.analysis import kernel_fidelity as KF

Z = 5.0
T = 20000


def _pair(d, dot):
    x, y = np.zeros(d), np.zeros(d)
    x[0] = 1.0
    y[0], y[1] = dot, np.sqrt(1 - dot * dot)
    return x, y


GRID = [(0.5, 1.0), (-0.5, 1.0), (0.0, 0.7), (0.9, 0.5)]   # (cos angle, norm)


@pytest.mark.parametrize("kind", ["trig", "positive", "hyperbolic"])
@pytest.mark.parametrize("cos,norm", GRID)
def test_moment_derivation_equals_lemma2(kind, cos, norm):
    """An independent derivation (central moments of one projection's term) agrees with
    the Lemma 2 closed forms to rounding, for several m."""
    x, y = _pair(5, cos)
    x, y = norm * x, norm * y
    for m in (1, 3, 64):
        mse, e4 = KF.squared_error_moments(kind, x, y, m)
        np.testing.assert_allclose(mse, KF.softmax_kernel_mse_theory(kind, x, y, m),
                                   rtol=1e-12)
        assert e4 >= mse ** 2


@pytest.mark.parametrize("kind", ["trig", "positive", "hyperbolic"])
def test_lemma2_light_tails(kind):
    m = 16
    cases = [(-0.5, 1.0), (0.0, 0.7)] + ([(0.5, 1.0), (0.9, 0.5)] if kind == "trig" else [])
    for i, (cos, norm) in enumerate(cases):
        x, y = _pair(4, cos)
        x, y = norm * x, norm * y
        theory = KF.softmax_kernel_mse_theory(kind, x, y, m)
        est = KF.softmax_kernel_mse(kind, x, y, m, trials=T, rng=100 + i)
        assert abs(est.z(theory)) < Z, (kind, cos, norm, est, theory)
        assert abs(est.z(2 * theory)) > Z and abs(est.z(theory / 2)) > Z   # power


@pytest.mark.parametrize("kind", ["positive", "hyperbolic"])
def test_lemma2_heavy_tails_at_unit_norms_dot_half(kind):
    x, y = _pair(2, 0.5)          # |x| = |y| = 1, x.y = 0.5; d irrelevant for i.i.d.
    m = 1024
    theory = KF.softmax_kernel_mse_theory(kind, x, y, m)
    mse, e4 = KF.squared_error_moments(kind, x, y, m)
    est = KF.softmax_kernel_mse(kind, x, y, m, trials=T, rng=7)
    lower = Z * np.sqrt(e4 / T)                  # sub-Gaussian lower tail, P <= 3.7e-6
    upper = 40 * np.sqrt((e4 - mse ** 2) / T)    # Chebyshev, P <= 1/1600

    def consistent(th):
        return th - lower <= est.value <= th + upper
    assert consistent(theory), (est, theory, lower, upper)
    assert not consistent(2 * theory)


@pytest.mark.parametrize("kind", ["trig", "positive", "hyperbolic"])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_unbiased(kind, orthogonal):
    x, y = _pair(4, -0.5)
    b = KF.softmax_kernel_bias(kind, x, y, 4, orthogonal=orthogonal, trials=T, rng=11)
    assert abs(b.z(0.0)) < Z
    assert abs(b.stderr) < 0.05 * np.exp(-0.5)       # precise enough to see a 25 % bias


@pytest.mark.parametrize("d", [4, 16])
def test_orthogonal_features_beat_the_bound(d):
    """MSE_orth <= MSE_iid - 2(m-1)/(m(d+2)) (SM - e^{-(|x|^2+|y|^2)/2})^2, m = d, and
    the gain is resolved: MSE_orth is 5 standard errors below the i.i.d. MSE."""
    x, y = _pair(d, -0.5)
    m = d
    iid = KF.softmax_kernel_mse_theory("positive", x, y, m)
    bound = KF.orthogonal_mse_reduction_bound(x, y, m)
    assert bound > 0.05 * iid
    orth = KF.softmax_kernel_mse("positive", x, y, m, orthogonal=True, trials=T, rng=21)
    assert orth.value <= iid - bound + Z * orth.stderr
    assert orth.value < iid - Z * orth.stderr
    # the i.i.d. estimator measured the same way does not beat the bound
    est = KF.softmax_kernel_mse("positive", x, y, m, orthogonal=False, trials=T, rng=22)
    assert est.value > iid - bound - Z * est.stderr and abs(est.z(iid)) < Z


def test_orthogonal_bound_needs_m_le_d():
    x, y = _pair(3, 0.2)
    with pytest.raises(ValueError, match="m <= d"):
        KF.orthogonal_mse_reduction_bound(x, y, 4)


@pytest.mark.parametrize("dist", [0.5, 1.0, 2.0, 3.0])
def test_trig_negative_fraction_m1(dist):
    x, y = np.array([dist, 0.0, 0.0]), np.zeros(3)
    theory = KF.trig_negative_fraction_theory(x, y)
    f = KF.trig_negative_fraction(x, y, 1, trials=T, rng=31)
    assert abs(f.z(theory)) < Z
    # a wrong formula (only the first interval, k = 0) is rejected where it differs
    wrong = 2 * (KF.ndtr(1.5 * np.pi / dist) - KF.ndtr(0.5 * np.pi / dist))
    if abs(wrong - theory) > 0.02:
        assert abs(f.z(wrong)) > Z


def test_trig_negative_fraction_shrinks_with_m():
    x, y = np.array([1.0, 0.0, 0.0]), np.array([-0.5, 0.5, 0.0])
    f = [KF.trig_negative_fraction(x, y, m, trials=4000, rng=40 + m).value for m in (1, 4, 16)]
    assert f[0] > f[1] > f[2]


def test_errors_name_arguments():
    with pytest.raises(ValueError, match="kind"):
        KF.softmax_kernel_mse_theory("relu", np.ones(2), np.ones(2), 2)
    with pytest.raises(ValueError, match=r"x \(2,\), y \(3,\)"):
        KF.softmax_kernel_mse("trig", np.ones(2), np.ones(3), 2, trials=3, rng=0)
    with pytest.raises(TypeError, match="rng"):
        KF.softmax_kernel_mse("trig", np.ones(2), np.ones(2), 2, trials=3, rng=None)
