"""Nystrom's third-order pseudoinverse iteration and Reformer's LSH collision law."""
import math

import numpy as np
import pytest

import refattn as ra
from refattn.analysis import facts
from refattn.analysis.inputs import temperature


@pytest.mark.parametrize("which", ["gaussian", "attention"])
def test_nystrom_iteration_is_third_order(which):
    rng = np.random.default_rng(0)
    if which == "gaussian":
        a = rng.standard_normal((24, 24))
    else:
        q, k, _ = temperature(16, 8, temperature=1.0, rng=1)
        a = ra.attention_probs(q, k)[0, 0]
    e = facts.pinv_residuals(a, 60)
    live = np.flatnonzero((e[:-1] > 1e-4) & (e[1:] > 1e-11))
    assert len(live) >= 3
    # exact recurrence e' = 3/4 e^3 + 1/4 e^4: e'/e^3 = 3/4 + e/4 -> 3/4
    ratio = e[live + 1] / e[live] ** 3
    np.testing.assert_allclose(ratio, 0.75 + 0.25 * e[live], rtol=1e-6)
    last = live[-1]
    assert e[last] < 0.2 and abs(ratio[-1] - 0.75) < 0.06
    # estimated order on the last steps above the rounding floor: 3 (not 2, not 4)
    order = facts.convergence_order(e[live[-2]:live[-1] + 2])
    assert abs(order[-1] - 3) < 0.1
    assert e[-1] < 1e-12                         # converged to the inverse


def test_convergence_order_detects_quadratic():
    e = [1e-1]
    for _ in range(3):
        e.append(e[-1] ** 2)
    np.testing.assert_allclose(facts.convergence_order(np.array(e)), 2.0)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 3, math.pi / 2, 2.5, math.pi])
def test_lsh_two_bucket_collision_probability(theta):
    """Binomial CI, 5 sigma (sample sd; exact 0/1 at theta = 0 and pi)."""
    r = facts.lsh_collision_rate(theta, 8, trials=40000, rng=int(theta * 1000))
    p = facts.lsh_collision_theory(theta)
    if theta in (0.0, math.pi):
        assert r.value == p
        return
    assert abs(r.z(p)) < 5
    # a wrong law (cos^2(theta/2), a plausible guess) is rejected where it differs
    wrong = math.cos(theta / 2) ** 2
    if abs(wrong - p) > 0.02:
        assert abs(r.z(wrong)) > 5
