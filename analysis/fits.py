r"""Scaling fits with their quality: the exponent ``p`` of ``y ~ N^p``, its confidence
interval and R², and whether it agrees with a mechanism's stated complexity.

:func:`fit_power_law` fits ``log y = p log N + c`` by least squares and reports
``p``, the two-sided 95 % confidence interval of ``p`` (Student's t with ``n - 2``
degrees of freedom), the coefficient of determination R² and the span
``max N / min N`` of the points used. :func:`stated_exponent` reads the power of ``N``
in a registry ``time`` string (``Mechanism.time``, e.g. ``"O(N·(s + N/s)·D)"`` -> 2),
with ``M = N`` (self-attention) and every other symbol a constant (a fixed budget per
query). :func:`judge_fit` turns a fit into the text a table shows: a number only when
the fit is good (R² ≥ ``min_r2``, span ≥ ``min_span``, at least ``min_points``) and
agrees with the stated exponent (within ``tolerance`` of its confidence interval);
otherwise a flag saying why.

>>> import numpy as np
>>> from refattn.analysis.fits import fit_power_law, judge_fit
>>> n = np.array([512, 1024, 2048, 4096, 8192])
>>> f = fit_power_law(n, 3e-9 * n ** 2.0)
>>> round(f.exponent, 6), round(f.r2, 6), f.span
(2.0, 1.0, 16.0)
>>> judge_fit(f, stated=1.0).flag
'contradicts stated O(N^1): fitted 2 [2, 2]'
>>> judge_fit(f, stated=2.0).text
'2.00 ± 0.00 (R² 1.000)'
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

__all__ = ["PowerFit", "Judged", "fit_power_law", "stated_exponent", "judge_fit"]


@dataclasses.dataclass(frozen=True)
class PowerFit:
    """``y ≈ exp(intercept) · N^exponent``; ``ci``: 95 % interval of the exponent
    (``(nan, nan)`` with fewer than three points); ``r2``: R² in log-log space; ``span``:
    max N / min N of the points used; ``points``: how many (positive, finite) points."""

    exponent: float
    intercept: float
    ci: tuple
    r2: float
    span: float
    points: int


@dataclasses.dataclass(frozen=True)
class Judged:
    """A fit as a table shows it: ``text`` (the number, or the flag), ``flag`` ('' when
    the fit is trusted), and the fit itself."""

    text: str
    flag: str
    fit: PowerFit


def fit_power_law(ns, values) -> PowerFit:
    """Least-squares power law through the positive, finite ``values`` at ``ns``.

    >>> fit_power_law([1, 2], [1.0, -1.0]).points      # one usable point: no fit
    1
    """
    ns = np.asarray(ns, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if ns.shape != y.shape or ns.ndim != 1:
        raise ValueError(f"ns and values must be 1-D of the same shape, got {ns.shape} and "
                         f"{y.shape}")
    ok = (ns > 0) & np.isfinite(y) & (y > 0)
    x, y = np.log(ns[ok]), np.log(y[ok])
    k = int(ok.sum())
    nan = float("nan")
    span = float(ns[ok].max() / ns[ok].min()) if k else nan
    if k < 2 or np.ptp(x) == 0:
        return PowerFit(nan, nan, (nan, nan), nan, span, k)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sst = float(((y - ym) ** 2).sum())
    ssr = float((resid ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else 1.0
    if k > 2:
        from scipy.stats import t as student
        se = math.sqrt(ssr / (k - 2) / sxx)
        half = float(student.ppf(0.975, k - 2)) * se
        ci = (slope - half, slope + half)
    else:
        ci = (nan, nan)
    return PowerFit(slope, intercept, ci, float(r2), span, k)


_O = re.compile(r"O\(([^()]*(?:\([^()]*(?:\([^()]*\)[^()]*)*\)[^()]*)*)\)")


def stated_exponent(time: str) -> float:
    """The power of ``N`` in a stated complexity ``"O(...)"`` (the largest over its
    terms and over several ``O(...)`` groups, ``M = N``, other symbols constant;
    ``log N`` counts 0). NaN when the string has no ``O(...)`` or does not mention
    ``N`` or ``M`` (e.g. ``"O(nnz blocks·b²·D)"``: the cost is not stated in ``N``).

    >>> [stated_exponent(s) for s in ("O(N·M·D)", "O(N·(w + s)·D)",
    ...  "O((N+M)·C·D·I + N·M·D/C)", "O(N·(l + c·N/l)·D)", "O(nnz blocks·b²·D)")]
    [2.0, 1.0, 2.0, 2.0, nan]
    """
    groups = _O.findall(str(time))
    best = float("nan")
    for body in groups:
        if not re.search(r"(?<![A-Za-z_])[NM](?![A-Za-z_])", body):
            continue
        e = _degree(body)
        best = e if math.isnan(best) else max(best, e)
    return best


def _degree(expr: str) -> float:
    """Degree in N of a product/sum expression (M = N; N/s counts +1, /N counts -1)."""
    expr = expr.replace("log N", "1").replace("log M", "1")
    expr = re.sub(r"\(\+[^)]*\)", "", expr)
    # split top-level sums
    depth, terms, cur = 0, [], ""
    for ch in expr:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    if len(terms) > 1:
        return max(_degree(t) for t in terms)
    # one product: factors separated by · or *, divisions by /
    total, depth, cur, sign = 0.0, 0, "", 1
    factors = []
    for ch in expr + "·":
        if ch in "·*/" and depth == 0:
            factors.append((sign, cur.strip()))
            cur, sign = "", (-1 if ch == "/" else 1)
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    for s, f in factors:
        if f.startswith("(") and f.endswith(")"):
            total += s * _degree(f[1:-1])
        else:
            m = re.fullmatch(r"([NM])(?:\^(\d+)|([²³]))?", f)
            if m:
                power = int(m.group(2)) if m.group(2) else {"²": 2, "³": 3}.get(
                    m.group(3), 1)
                total += s * power
    return float(total)


def judge_fit(fit: PowerFit, stated=float("nan"), *, tolerance=0.25, min_r2=0.95,
              min_span=8.0, min_points=4, at_most=False) -> Judged:
    """The table text of ``fit``: ``"p ± h (R² r)"`` when trusted, else a flag.

    Flags, first that applies: too few points or too narrow a span of N; a poor fit
    (R² < ``min_r2``); a contradiction of the ``stated`` exponent: ``stated`` outside the
    95 % interval widened by ``tolerance`` (with ``at_most``, only a fit *above* it
    contradicts: memory cannot grow faster than the stated time).
    """
    p, (lo, hi) = fit.exponent, fit.ci
    if fit.points < min_points or not np.isfinite(p):
        flag = f"not fitted: {fit.points} usable points (need {min_points})"
    elif not fit.span >= min_span:
        flag = f"not fitted: N spans {fit.span:.3g}x (need {min_span:g}x)"
    elif not fit.r2 >= min_r2:
        flag = f"poor fit: {p:.2g} with R² {fit.r2:.2f}"
    elif np.isfinite(stated) and (hi + tolerance < stated if not at_most else False):
        flag = (f"below stated O(N^{stated:g}): fitted {p:.2g} [{lo:.2g}, {hi:.2g}]; "
                f"per-call overheads dominate at these N")
    elif np.isfinite(stated) and lo - tolerance > stated:
        flag = f"contradicts stated O(N^{stated:g}): fitted {p:.2g} [{lo:.2g}, {hi:.2g}]"
    else:
        flag = ""
    text = f"⚠ {flag}" if flag else f"{p:.2f} ± {(hi - lo) / 2:.2f} (R² {fit.r2:.3f})"
    return Judged(text=text, flag=flag, fit=fit)
