"""The float64 oracle against a 50-digit mpmath evaluation of the same inputs.

Requirement: :func:`refattn.attention` agrees with a 50-digit evaluation of the *same
float64* ``q``, ``k``, ``v`` and ``scale`` on adversarial inputs (near-ties, one
dominant key, rows of 4096 keys, logits up to ``+-1e4``) to a relative error of at most
``1e-13`` where a row's logits lie within ``+-50``, and ``64 * eps * max|logit|`` beyond
(``eps = np.finfo(float).eps``), with no overflow and no NaN.

The reference (:func:`mp_reference`) takes the float64 values as exact rationals and, at
``mp.dps = 50``, forms ``s_j = scale * sum_i q_i k_ji``, ``lse = log sum_j exp(s_j)``,
``p_j = exp(s_j) / sum_j exp(s_j)`` and ``o_d = sum_j p_j v_jd``. Per query row the
errors measured (:func:`row_errors`) are

* **lse**: ``|lse - lse*| / max(|lse*|, 1)``. Relative, with an absolute floor of 1 so a
  row whose lse is (near) zero, e.g. ``M`` equal logits ``-log M``, is not held to a
  relative error of a number that is itself a cancellation of ``O(log M)`` terms.
* **probabilities** (:func:`refattn.attention_probs`): ``max_j |p_j - p*_j| /
  max(p*_j, 1e-300)``, the elementwise relative error of every probability that does not
  underflow; probabilities below ``1e-300`` (which underflow, or are subnormal, in
  float64) are only required to be absolutely within ``bound * 1e-300`` of ``p*``.
* **output**: ``max_d |o_d - o*_d| / sum_j p*_j |v_jd|``. The output is a convex
  combination of the rows of ``v``, so ``sum_j p*_j |v_jd|`` is its natural scale (its
  condition number with respect to relative perturbations of ``p`` and ``v``); a plain
  relative error ``|o - o*| / |o*|`` would be unbounded when ``o*_d`` cancels to ~0.

Each must be at most :func:`bound` of the row: ``1e-13`` when every exact logit of the
row lies in ``[-50, 50]``, else ``64 * eps * max_j |s*_j|``.

Inputs come in two kinds. *Controlled* cases use ``D = 4`` and the default scale
``1/sqrt(4) = 0.5``, query rows ``2 e_r`` and ``k[:, r]`` set to the wanted logits of row
``r``: the float64 logits are then exact and only the softmax rounds. *Dense* cases use
``D = 8``, Gaussian directions and the scale ``1/sqrt(8)`` (or ``0.1``), which rounds,
so the scaling of ``q`` and the dot product round too. Dense inputs are kept
well-conditioned (``scale * sum_i |q_i k_ji|`` of the order of ``max|logit|``): with heavy
cancellation in ``q . k`` no float64 dot product could meet a bound stated in terms of
the logits.
"""
from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
from mpmath import mpf

import refattn as ra

EPS = np.finfo(float).eps
TIGHT, TIGHT_RANGE, LOOSE_FACTOR = 1e-13, 50.0, 64.0


def bound(max_abs_logit: float) -> float:
    """The allowed error of a row whose largest exact logit magnitude is given."""
    return TIGHT if max_abs_logit <= TIGHT_RANGE else LOOSE_FACTOR * EPS * max_abs_logit


def mp_reference(q, k, v, scale):
    """50-digit attention of float64 ``q (N, D)``, ``k (M, D)``, ``v (M, Dv)``.

    Returns per row ``(s, lse, p, o)`` as mpf values (logits, log-sum-exp,
    probabilities, output)."""
    with mpmath.workdps(50):
        sc = mpf(float(scale))
        kk = [[mpf(x) for x in row] for row in k.tolist()]
        vcols = [[mpf(x) for x in col] for col in v.T.tolist()]
        rows = []
        for qrow in q.tolist():
            qq = [mpf(x) for x in qrow]
            s = [sc * mpmath.fdot(qq, kr) for kr in kk]
            e = [mpmath.exp(x) for x in s]
            total = mpmath.fsum(e)
            p = [x / total for x in e]
            rows.append((s, mpmath.log(total), p, [mpmath.fdot(p, c) for c in vcols]))
        return rows


def row_errors(out, lse, probs, v, ref_row):
    """``(lse_err, prob_err, out_err, max|s*|)`` of one row, as defined in the module
    docstring; ``out (Dv,)``, ``lse`` scalar, ``probs (M,)`` from the float64 oracle."""
    s, lse_ref, p_ref, o_ref = ref_row
    with mpmath.workdps(50):
        lse_err = abs(mpf(float(lse)) - lse_ref) / max(abs(lse_ref), 1)
        floor = mpf("1e-300")
        prob_err = max(abs(mpf(x) - r) / max(r, floor)
                       for x, r in zip(probs.tolist(), p_ref))
        out_err = max(abs(mpf(x) - r) / mpmath.fdot(p_ref, [abs(mpf(c)) for c in col])
                      for x, r, col in zip(out.tolist(), o_ref, v.T.tolist()))
        smax = max(abs(x) for x in s)
        return float(lse_err), float(prob_err), float(out_err), float(smax)


# --- cases: each returns q (N, D), k (M, D), v (M, Dv), scale (None = default) ----------

def _controlled(logits, rng, dv=3):
    """Query row ``r`` is ``2 e_r`` and ``k[:, r] = logits[r]``; with the default scale 0.5
    the float64 logits equal ``logits`` exactly. Unused ``k`` columns are random."""
    logits = np.asarray(logits, dtype=float)
    n, m = logits.shape
    d = 4
    q = 2.0 * np.eye(d)[:n]
    k = rng.standard_normal((m, d))
    k[:, :n] = logits.T
    return q, k, rng.standard_normal((m, dv)), None


def _dense(rng, n, m, target, d=8, dv=4, scale=None):
    """Gaussian ``q``, ``k``, with ``k`` rescaled so the largest |logit| is ~``target``."""
    q, k = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    sc = 1 / math.sqrt(d) if scale is None else scale
    k *= target / np.abs(sc * q @ k.T).max() * (1 - 1e-3)
    return q, k, rng.standard_normal((m, dv)), scale


def exact_ties(rng):
    """All logits of a row equal (0, 3.75, -50)."""
    return _controlled([np.full(1000, 0.0), np.full(1000, 3.75), np.full(1000, -50.0)], rng)


def near_ties(rng):
    """Logits 10 + j 1e-12, -50 + j 1e-13, and a mix of 50 and 50 - 1e-12."""
    j = rng.integers(0, 1000, size=(3, 512))
    return _controlled([10 + j[0] * 1e-12, -50 + j[1] * 1e-13,
                        np.where(j[2] % 2, 49.999999999999, 50.0)], rng)


def dominant_50(rng):
    """One logit 50, 4095 at -50 (and the negated row: one -50, the rest 50)."""
    row = np.full(4096, -50.0)
    row[1234] = 50.0
    return _controlled([row, -row], rng)


def random_pm50_4096(rng):
    """4096 logits uniform in [-50, 50]."""
    return _controlled(rng.uniform(-50, 50, size=(3, 4096)), rng)


def dominant_1e4(rng):
    """One logit at 1e4; the rest spread over [-1e4, 1e4 - 1], many within the ~700 below
    the top whose probabilities do not underflow."""
    rows = np.concatenate([rng.uniform(-1e4, 1e4 - 1, size=(2, 3000)),
                           1e4 - rng.uniform(1, 720, size=(2, 1096))], axis=1)
    rows[:, 7] = 1e4
    rows[1, 8] = 1e4 - 2.0 ** -39          # a near-tie one ulp below the top
    return _controlled(rows, rng)


def spread_pm1e4_4096(rng):
    """4096 logits uniform in [-1e4, 1e4], 800 of them within 750 below the top."""
    rows = rng.uniform(-1e4, 1e4, size=(2, 4096))
    rows[:, :800] = rows.max(axis=1, keepdims=True) - rng.uniform(0, 750, size=(2, 800))
    return _controlled(rows, rng)


def very_negative_1e4(rng):
    """Every logit near -1e4 (exp underflows without max-subtraction)."""
    return _controlled([-1e4 + rng.uniform(0, 40, 4096), -1e4 - rng.uniform(0, 700, 4096),
                        np.full(4096, -1e4)], rng)


def large_identical_1e4(rng):
    """4096 identical logits 1e4, -1e4, 9999.5."""
    return _controlled([np.full(4096, 1e4), np.full(4096, -1e4), np.full(4096, 9999.5)],
                       rng)


def dense_pm50_4096(rng):
    """Dense directions, 4096 keys, logits within +-50."""
    return _dense(rng, 3, 4096, 50.0)


def dense_pm1e4_4096(rng):
    """Dense directions, 4096 keys, logits up to ~+-1e4, explicit scale 0.1."""
    return _dense(rng, 3, 4096, 1e4, scale=0.1)


def dense_near_ties(rng):
    """2048 keys equal to one key up to ~1e-13 relative: logits up to ~40 that differ by
    ~1e-11, and 17 exactly tied keys."""
    q, k, v, scale = _dense(rng, 2, 1, 40.0)
    k = k * (1 + 1e-13 * rng.standard_normal((2048, 8)))
    k[:16] = k[16]                                # and some exact ties
    return q, k, rng.standard_normal((2048, 4)), scale


def dense_dominant_1e4(rng):
    """Key 0 parallel to the query (logit 1e4); 300 keys near it (logits within ~700
    below); the rest random with |logit| up to 9.99e3."""
    q, k, v, scale = _dense(rng, 1, 4096, 9990.0)
    k[0] = q[0] * (1e4 * math.sqrt(8) / (q[0] @ q[0]))
    k[1:301] = k[0] * (1 - rng.uniform(0, 0.07, (300, 1))) + rng.standard_normal((300, 8))
    return q, k, v, scale


def dense_dominant_50(rng):
    """Key 0 parallel to the query (logit ~50); the rest negative, down to ~-49.5."""
    q, k, v, scale = _dense(rng, 1, 4096, 49.0)
    k[0] = q[0] * (50 * math.sqrt(8) / (q[0] @ q[0])) * (1 - 1e-12)
    k[1:] = -np.abs(k[1:] @ q[0])[:, None] / (q[0] @ q[0]) * q[0] + 0.01 * k[1:]
    return q, k, v, scale


def dense_very_negative(rng):
    """Keys near ``-c q``: every logit within ~-1e4 + [0, 30]."""
    q = rng.standard_normal((1, 8))
    k = -q * (1e4 * math.sqrt(8) / (q[0] @ q[0])) + 0.5 * rng.standard_normal((4096, 8))
    return q, k, rng.standard_normal((4096, 4)), None


CASES = {f.__name__: f for f in (
    exact_ties, near_ties, dominant_50, random_pm50_4096, dominant_1e4, spread_pm1e4_4096,
    very_negative_1e4, large_identical_1e4, dense_pm50_4096, dense_pm1e4_4096,
    dense_near_ties, dense_dominant_1e4, dense_dominant_50, dense_very_negative)}


@functools.lru_cache(maxsize=None)
def case_errors(name):
    """Per row ``(lse_err, prob_err, out_err, max|s*|)`` of case ``name``, and the raw
    float64 results (to check finiteness)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    q, k, v, scale = CASES[name](rng)
    out, lse = ra.attention(q[None], k[None], v[None], scale=scale, return_lse=True)
    probs = ra.attention_probs(q[None], k[None], scale=scale)
    ref = mp_reference(q, k, v, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    errs = [row_errors(out[0, i], lse[0, i], probs[0, i], v, ref[i])
            for i in range(q.shape[0])]
    return errs, (out, lse, probs)


@pytest.mark.parametrize("name", CASES)
def test_finite(name):
    """No overflow, no NaN: output, lse and probabilities are finite, rows sum to 1."""
    _, (out, lse, probs) = case_errors(name)
    assert np.isfinite(out).all() and np.isfinite(lse).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_matches_50_digit_reference(name):
    """lse, probabilities and output each within the bound of their row."""
    errs, _ = case_errors(name)
    for row, (e_lse, e_p, e_o, smax) in enumerate(errs):
        b = bound(smax)
        assert e_lse <= b and e_p <= b and e_o <= b, (
            f"{name} row {row}: max|s|={smax:.6g}, bound={b:.3g}: "
            f"lse {e_lse:.3g}, probs {e_p:.3g}, out {e_o:.3g}")


def test_cases_cover_both_regimes():
    """The cases meant to test the 1e-13 bound have every logit within +-50; the others
    have every row beyond +-50 and reach |logit| ~1e4 (so each case tests the bound it
    claims to)."""
    smax = {name: [e[3] for e in case_errors(name)[0]] for name in CASES}
    tight = {"exact_ties", "near_ties", "dominant_50", "random_pm50_4096",
             "dense_pm50_4096", "dense_near_ties", "dense_dominant_50"}
    for name in tight:
        assert max(smax[name]) <= TIGHT_RANGE, name
    for name in set(CASES) - tight:
        assert min(smax[name]) > TIGHT_RANGE and max(smax[name]) >= 9.9e3, name
