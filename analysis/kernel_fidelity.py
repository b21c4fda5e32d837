r"""Fidelity of the Performer random-feature estimates of the softmax kernel.

The softmax kernel is :math:`\mathrm{SM}(x, y) = e^{x\cdot y}` (no :math:`1/\sqrt d`:
Performer attention maps ``q``, ``k`` to ``x``, ``y`` with ``x·y = scale·q·k`` first).
Its estimate from ``m`` projections :math:`\omega_1..\omega_m` is
:math:`\widehat{\mathrm{SM}} = \phi(x)\cdot\phi(y)` with refattn's own
:func:`refattn.performer.performer_features` (via
:func:`refattn.performer.softmax_kernel_estimate`), whose kernels are, per projection,

* ``"trig"``: :math:`e^{(\|x\|^2+\|y\|^2)/2}\cos(\omega\cdot(x-y))` (``2m`` signed features),
* ``"positive"``: :math:`e^{\omega\cdot(x+y) - (\|x\|^2+\|y\|^2)/2}` (``m`` features),
* ``"hyperbolic"``: :math:`\cosh(\omega\cdot(x+y))\,e^{-(\|x\|^2+\|y\|^2)/2}`
  (``2m`` features :math:`e^{\pm\omega\cdot x-\|x\|^2/2}/\sqrt{2m}`),

averaged over the ``m`` projections; all unbiased. For i.i.d. Gaussian :math:`\omega`
(Choromanski et al., ICLR 2021, Lemma 2), with ``m`` the number of projections:

.. math::

    \mathrm{MSE}_{\rm trig} &= \tfrac{1}{2m} e^{\|x+y\|^2} \mathrm{SM}^{-2}
                               (1 - e^{-\|x-y\|^2})^2 \\
    \mathrm{MSE}_{+} &= \tfrac{1}{m} e^{\|x+y\|^2} \mathrm{SM}^{2} (1 - e^{-\|x+y\|^2}) \\
    \mathrm{MSE}_{\rm hyp} &= \tfrac12 (1 - e^{-\|x+y\|^2})\, \mathrm{MSE}_{+}

(:func:`softmax_kernel_mse_theory`). Orthogonal projections (``m <= d``, Theorem 2)
lower the positive MSE by at least
:math:`\frac{2(m-1)}{m(d+2)}(\mathrm{SM} - e^{-(\|x\|^2+\|y\|^2)/2})^2`
(:func:`orthogonal_mse_reduction_bound`).

Monte Carlo estimates are :class:`MCEstimate` (value, standard error, trials): for the
MSE, the mean of the squared errors :math:`e_t^2 = (\widehat{\mathrm{SM}}_t -
\mathrm{SM})^2` over ``trials`` independent draws, with standard error
:math:`\mathrm{sd}(e^2)/\sqrt{\text{trials}}` (the sample standard deviation of the
squared errors).

>>> import numpy as np
>>> from refattn.analysis.kernel_fidelity import softmax_kernel_mse, softmax_kernel_mse_theory
>>> x, y = np.array([0.6, 0.0]), np.array([0.3, 0.4])
>>> est = softmax_kernel_mse("positive", x, y, 4, trials=4000, rng=0)
>>> bool(abs(est.z(softmax_kernel_mse_theory("positive", x, y, 4))) < 5)
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from refattn._core.checks import check_int, resolve_rng
from refattn.boundary import to_float64
from refattn.performer import softmax_kernel_estimate

__all__ = ["KINDS", "MCEstimate", "softmax_kernel_samples", "softmax_kernel_mse",
           "softmax_kernel_bias", "softmax_kernel_mse_theory",
           "orthogonal_mse_reduction_bound", "trig_negative_fraction",
           "trig_negative_fraction_theory", "squared_error_moments"]

#: Kernel names of this module -> refattn.performer's names.
KINDS = {"trig": "trigonometric", "trigonometric": "trigonometric",
         "positive": "positive", "hyperbolic": "hyperbolic"}

#: Elements of the ``(trials, m, d)`` projection draw made at once.
_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class MCEstimate:
    """A Monte Carlo mean: ``value`` with standard error ``stderr`` from ``trials``
    independent samples (``stderr = sample sd / sqrt(trials)``)."""

    value: float
    stderr: float
    trials: int

    def __float__(self) -> float:
        return float(self.value)

    def z(self, reference: float) -> float:
        """Standardized distance ``(value - reference) / stderr`` (``inf`` if
        ``stderr == 0`` and they differ, 0 if equal)."""
        diff = self.value - float(reference)
        if self.stderr == 0:
            return 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return diff / self.stderr

    def interval(self, sigmas: float = 5.0) -> tuple[float, float]:
        """``value -+ sigmas * stderr``."""
        return (self.value - sigmas * self.stderr, self.value + sigmas * self.stderr)


def _mean(samples: np.ndarray) -> MCEstimate:
    n = samples.shape[0]
    sd = float(samples.std(ddof=1)) if n > 1 else math.inf
    return MCEstimate(float(samples.mean()), sd / math.sqrt(n), int(n))


def _kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return KINDS[kind]


def _vectors(x, y):
    x, y = to_float64(x, "x"), to_float64(y, "y")
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be vectors (D,) of the same length D >= 1; got x "
                         f"{x.shape}, y {y.shape}")
    return x, y


def softmax_kernel_samples(kind, x, y, m, *, orthogonal=False, trials, rng) -> np.ndarray:
    r"""``trials`` independent estimates :math:`\widehat{\mathrm{SM}}(x, y)` from ``m``
    projections each (fresh :math:`\omega` per trial), ``x``, ``y`` ``(D,)`` ->
    ``(trials,)`` float64. ``orthogonal``: orthogonal blocks
    (:func:`refattn.performer.draw_omega`). Drawn in chunks from one generator, so the
    result depends only on ``rng`` (and the chunking, fixed by ``m`` and ``D``).

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import softmax_kernel_samples
    >>> softmax_kernel_samples("trig", np.ones(3) / 3, np.ones(3) / 3, 2, trials=5,
    ...                        rng=0).shape
    (5,)
    """
    name = _kind(kind)
    x, y = _vectors(x, y)
    m = check_int("m", m, minimum=1)
    trials = check_int("trials", trials, minimum=1)
    gen = resolve_rng(rng, "softmax_kernel_samples")
    chunk = max(1, _CHUNK_ELEMENTS // (m * x.size))
    parts, done = [], 0
    while done < trials:
        r = min(chunk, trials - done)
        parts.append(softmax_kernel_estimate(x, y, num_features=m, kernel=name,
                                             orthogonal=bool(orthogonal), rng=gen,
                                             draws=r).reshape(r))
        done += r
    return np.concatenate(parts)


def softmax_kernel_mse(kind, x, y, m, *, orthogonal=False, trials=20000, rng) -> MCEstimate:
    r"""Empirical MSE :math:`\frac1T\sum_t (\widehat{\mathrm{SM}}_t - e^{x\cdot y})^2`
    of the ``kind`` estimate from ``m`` projections, with its standard error (sample
    sd of the squared errors over :math:`\sqrt T`). Compare with
    :func:`softmax_kernel_mse_theory` via :meth:`MCEstimate.z`.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import softmax_kernel_mse
    >>> est = softmax_kernel_mse("hyperbolic", np.array([0.5, 0.0]), np.array([0.0, 0.5]),
    ...                          8, trials=1000, rng=0)
    >>> est.trials, bool(est.stderr > 0)
    (1000, True)
    """
    x, y = _vectors(x, y)
    est = softmax_kernel_samples(kind, x, y, m, orthogonal=orthogonal, trials=trials,
                                 rng=rng)
    return _mean((est - math.exp(float(x @ y))) ** 2)


def softmax_kernel_bias(kind, x, y, m, *, orthogonal=False, trials=20000,
                        rng) -> MCEstimate:
    r"""Empirical bias :math:`\overline{\widehat{\mathrm{SM}}} - e^{x\cdot y}` with its
    standard error; 0 in expectation for every kind (Lemma 1), i.i.d. or orthogonal.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import softmax_kernel_bias
    >>> b = softmax_kernel_bias("positive", np.array([0.3, 0.1]), np.array([0.2, 0.2]), 4,
    ...                         trials=2000, rng=1)
    >>> bool(abs(b.z(0.0)) < 5)
    True
    """
    x, y = _vectors(x, y)
    est = softmax_kernel_samples(kind, x, y, m, orthogonal=orthogonal, trials=trials,
                                 rng=rng)
    return _mean(est - math.exp(float(x @ y)))


def _sq(a):
    return np.einsum("...d,...d->...", a, a)


def softmax_kernel_mse_theory(kind, x, y, m):
    r"""Lemma 2 of Choromanski et al. (2021), i.i.d. projections, ``m`` of them; ``x``,
    ``y`` ``(..., D)`` broadcast -> float or ``(...)``:

    trig :math:`\frac{1}{2m} e^{\|x+y\|^2}\mathrm{SM}^{-2}(1-e^{-\|x-y\|^2})^2`,
    positive :math:`\frac1m e^{\|x+y\|^2}\mathrm{SM}^2(1-e^{-\|x+y\|^2})`,
    hyperbolic :math:`\frac12(1-e^{-\|x+y\|^2})\,\mathrm{MSE}_+`.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import softmax_kernel_mse_theory
    >>> x = np.array([1.0, 0.0])
    >>> float(softmax_kernel_mse_theory("trig", x, x, 3))        # x = y: exact
    0.0
    """
    name = _kind(kind)
    x, y = to_float64(x, "x"), to_float64(y, "y")
    if x.ndim < 1 or y.ndim < 1 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must be vectors (..., D) with the same D; got x "
                         f"{x.shape}, y {y.shape}")
    m = check_int("m", m, minimum=1)
    s, d = _sq(x + y), _sq(x - y)
    dot = np.einsum("...d,...d->...", x, y)
    if name == "trigonometric":
        out = np.exp(s - 2 * dot) * (-np.expm1(-d)) ** 2 / (2 * m)
    else:
        out = np.exp(s + 2 * dot) * (-np.expm1(-s)) / m
        if name == "hyperbolic":
            out = 0.5 * (-np.expm1(-s)) * out
    return out if out.ndim else float(out)


def orthogonal_mse_reduction_bound(x, y, m):
    r"""Theorem 2's lower bound on how much orthogonal projections lower the positive
    MSE (``m <= d``): :math:`\frac{2(m-1)}{m(d+2)}\big(\mathrm{SM}(x,y) -
    e^{-(\|x\|^2+\|y\|^2)/2}\big)^2`, so
    :math:`\mathrm{MSE}^{\rm ort}_+ \le \mathrm{MSE}_+ - \text{bound}`.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import orthogonal_mse_reduction_bound
    >>> float(orthogonal_mse_reduction_bound(np.array([1.0, 0]), np.array([0, 1.0]), 1))
    0.0
    """
    x, y = to_float64(x, "x"), to_float64(y, "y")
    if x.ndim < 1 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must be vectors (..., D) with the same D; got x "
                         f"{x.shape}, y {y.shape}")
    d = x.shape[-1]
    m = check_int("m", m, minimum=1)
    if m > d:
        raise ValueError(f"the orthogonal bound holds for m <= d; got m={m}, d={d}")
    gap = np.exp(np.einsum("...d,...d->...", x, y)) - np.exp(-0.5 * (_sq(x) + _sq(y)))
    out = 2 * (m - 1) / (m * (d + 2)) * gap ** 2
    return out if out.ndim else float(out)


def trig_negative_fraction(x, y, m, *, orthogonal=False, trials=20000, rng) -> MCEstimate:
    r"""Fraction of trigonometric estimates :math:`\widehat{\mathrm{SM}}(x, y) < 0`
    (the softmax kernel is positive; signed features make the Performer's attention
    denominators unstable), with its standard error.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import (trig_negative_fraction,
    ...                                               trig_negative_fraction_theory)
    >>> x, y = np.array([1.0, 0.0]), np.zeros(2)
    >>> f = trig_negative_fraction(x, y, 1, trials=2000, rng=0)    # about 11.6 %
    >>> bool(abs(f.z(trig_negative_fraction_theory(x, y))) < 5)
    True
    """
    est = softmax_kernel_samples("trig", x, y, m, orthogonal=orthogonal, trials=trials,
                                 rng=rng)
    return _mean((est < 0).astype(np.float64))


def trig_negative_fraction_theory(x, y) -> float:
    r"""Exact probability that the ``m = 1`` trigonometric estimate is negative:
    :math:`P(\cos(\omega\cdot(x-y)) < 0)` with :math:`\omega\cdot(x-y) \sim
    \mathcal N(0, \sigma^2)`, :math:`\sigma = \|x-y\|`:
    :math:`2\sum_{k\ge0}[\Phi((3\pi/2+2\pi k)/\sigma) - \Phi((\pi/2+2\pi k)/\sigma)]`
    (tends to 1/2 as :math:`\sigma\to\infty`).

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import trig_negative_fraction_theory
    >>> trig_negative_fraction_theory(np.zeros(2), np.zeros(2))
    0.0
    """
    x, y = _vectors(x, y)
    sigma = float(np.linalg.norm(x - y))
    if sigma == 0:
        return 0.0
    kmax = int(math.ceil(12 * sigma / (2 * math.pi))) + 2
    k = np.arange(kmax + 1)
    lo = (math.pi / 2 + 2 * math.pi * k) / sigma
    hi = (3 * math.pi / 2 + 2 * math.pi * k) / sigma
    return float(2 * (ndtr(hi) - ndtr(lo)).sum())


def _raw_moments(name, x, y, kmax):
    r"""``E[W^k]``, ``k = 0..kmax``, of one projection's estimate ``W`` (exact, from the
    Gaussian moment generating / characteristic functions)."""
    from math import comb
    xx, yy = float(x @ x), float(y @ y)
    if name == "trigonometric":          # W = e^{(|x|^2+|y|^2)/2} cos(G), G ~ N(0, |x-y|^2)
        s, a = float((x - y) @ (x - y)), math.exp(0.5 * (xx + yy))
        return [a ** k * 2.0 ** -k * sum(comb(k, j) * math.exp(-0.5 * (2 * j - k) ** 2 * s)
                                         for j in range(k + 1)) for k in range(kmax + 1)]
    s, a = float((x + y) @ (x + y)), math.exp(-0.5 * (xx + yy))
    if name == "positive":               # W = a e^{G}, G ~ N(0, |x+y|^2)
        return [a ** k * math.exp(0.5 * k * k * s) for k in range(kmax + 1)]
    return [a ** k * 2.0 ** -k * sum(comb(k, j) * math.exp(0.5 * (2 * j - k) ** 2 * s)
                                     for j in range(k + 1)) for k in range(kmax + 1)]


def squared_error_moments(kind, x, y, m) -> tuple[float, float]:
    r"""Exact ``(E[e^2], E[e^4])`` of the error :math:`e = \widehat{\mathrm{SM}} - \mathrm{SM}`
    of the i.i.d. ``m``-projection estimate, from the raw moments of one projection's
    term ``W`` (lognormal for positive/hyperbolic, :math:`\cos` of a Gaussian for trig):
    with central moments :math:`\mu_2, \mu_4` of ``W``,
    :math:`E[e^2] = \mu_2/m` (Lemma 2, derived independently) and
    :math:`E[e^4] = (\mu_4 + 3(m-1)\mu_2^2)/m^3`. ``E[e^4]`` gives the exact standard
    error of an empirical MSE: :math:`\sqrt{(E[e^4] - E[e^2]^2)/T}`.

    >>> import numpy as np
    >>> from refattn.analysis.kernel_fidelity import (squared_error_moments,
    ...                                               softmax_kernel_mse_theory)
    >>> x, y = np.array([1.0, 0.0]), np.array([0.5, 0.75 ** 0.5])
    >>> mse, _ = squared_error_moments("positive", x, y, 4)
    >>> bool(np.isclose(mse, softmax_kernel_mse_theory("positive", x, y, 4), rtol=1e-12))
    True
    """
    name = _kind(kind)
    x, y = _vectors(x, y)
    m = check_int("m", m, minimum=1)
    r = _raw_moments(name, x, y, 4)
    mu = r[1]
    c2 = r[2] - mu * mu
    c4 = r[4] - 4 * mu * r[3] + 6 * mu * mu * r[2] - 3 * mu ** 4
    return c2 / m, (c4 + 3 * (m - 1) * c2 * c2) / m ** 3
