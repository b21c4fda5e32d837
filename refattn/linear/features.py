r"""Random features for the softmax kernel (FAVOR+, Choromanski et al. 2021), shared
by Performer and Scatterbrain and measured by the analysis: draws of ``ω`` (optionally
orthogonal), the feature maps of the positive, trigonometric and hyperbolic kernels
with their numerical stabilizer, and the Monte-Carlo estimate of ``exp(x·y)``.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import (check_bool, check_int, check_size_memory, resolve_budget,
                            resolve_rng)
from ..boundary.arrays import to_float64

__all__ = ["KERNELS", "draw_omega", "performer_features", "softmax_kernel_estimate"]

#: Names of the random-feature kernels.
KERNELS = ("positive", "trigonometric", "hyperbolic")


def check_kernel(kernel) -> str:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def draw_omega(num_features, d, *, orthogonal=True, rng) -> np.ndarray:
    r"""Random projection ``ω`` ``(num_features, d)`` float64 for the Performer features;
    every row is marginally :math:`\mathcal N(0, I_d)`.

    ``orthogonal=False``: i.i.d. standard normal entries. ``orthogonal=True``:
    ``ceil(num_features / d)`` independent blocks; each block is the Haar-distributed
    orthogonal factor ``Q diag(sign(diag R))`` of the QR decomposition of a ``d x d``
    standard normal matrix; the first ``num_features`` rows are kept and row ``f``
    scaled by the norm of an independent ``N(0, I_d)`` vector (a chi(d) variable).
    Rows within one block are orthogonal (Choromanski et al. 2021, Sec. 2.4).

    >>> import numpy as np
    >>> from refattn.performer import draw_omega
    >>> w = draw_omega(4, 4, orthogonal=True, rng=0)
    >>> g = w @ w.T
    >>> bool(np.allclose(g - np.diag(np.diag(g)), 0))       # one block: orthogonal rows
    True
    >>> draw_omega(10, 4, orthogonal=False, rng=0).shape
    (10, 4)
    """
    d = check_int("d", d, minimum=1)
    orthogonal = check_bool("orthogonal", orthogonal)
    m = check_feature_memory(num_features, d, width=0, what="draw_omega",
                             orthogonal=orthogonal)
    return _draw_omegas(1, m, d, orthogonal, resolve_rng(rng, "draw_omega"))[0]


def _draw_omegas(r: int, m: int, d: int, orthogonal: bool, gen) -> np.ndarray:
    """``r`` independent projections ``(r, m, d)`` drawn at once (:func:`draw_omega`)."""
    if not orthogonal:
        return gen.standard_normal((r, m, d))
    nb = -(-m // d)
    qf, rf = np.linalg.qr(gen.standard_normal((r, nb, d, d)))
    signs = np.sign(np.diagonal(rf, axis1=-2, axis2=-1))         # (r, nb, d)
    signs[signs == 0] = 1.0
    rows = (qf * signs[..., None, :]).reshape(r, nb * d, d)[:, :m]
    norms = np.linalg.norm(gen.standard_normal((r, m, d)), axis=-1)
    return rows * norms[..., None]


def log_features(x: np.ndarray, omega: np.ndarray, kernel: str):
    """``(h, g, norm)`` with features ``exp(h) * g * norm``: ``h`` ``(..., L, F)`` (or
    ``(..., L, 1)`` for the trigonometric factor), ``g`` the sin/cos part or None."""
    proj = x @ np.swapaxes(omega, -1, -2)                     # (..., L, m)
    half_sq = 0.5 * np.einsum("...d,...d->...", x, x)[..., None]
    m = omega.shape[-2]
    if kernel == "positive":
        proj -= half_sq                  # in place: at long L these are the big arrays
        return proj, None, 1.0 / math.sqrt(m)
    if kernel == "hyperbolic":
        return np.concatenate([proj - half_sq, -proj - half_sq], -1), None, \
            1.0 / math.sqrt(2 * m)
    return half_sq, np.concatenate([np.sin(proj), np.cos(proj)], -1), 1.0 / math.sqrt(m)


def performer_features(x, omega, kernel="positive", *, stabilize=None, return_shift=False,
                       check_finite=True):
    r"""Random features :math:`\phi(x)` of the Performer kernels (no scaling of ``x``).

    ``x (..., L, D)``, ``omega (m, D)`` (:func:`draw_omega`); returns float64
    ``(..., L, F)``, ``F = m`` (``"positive"``) or ``2m`` (``"hyperbolic"``,
    ``"trigonometric"``):

    .. math::

        \phi_+(x) = \tfrac{1}{\sqrt m} e^{\omega x - \|x\|^2/2}, \quad
        \phi_{\cosh}(x) = \tfrac{1}{\sqrt{2m}} \big[e^{\omega x - \|x\|^2/2},
        e^{-\omega x - \|x\|^2/2}\big], \quad
        \phi_{\rm trig}(x) = \tfrac{e^{\|x\|^2/2}}{\sqrt m} [\sin \omega x, \cos \omega x],

    so that :math:`\mathbb E_\omega[\phi(x)\cdot\phi(y)] = e^{x\cdot y}` (Choromanski et
    al. 2021, Lemma 1 and Eq. 7). ``stabilize``: ``None`` (plain), ``"row"`` (divide
    each row by ``e^c`` with ``c`` the max of its exponents) or ``"global"`` (one ``c``:
    the max over the last two axes, i.e. per leading index). With ``return_shift`` also
    returns ``c`` (shape ``(..., L, 1)`` or ``(..., 1, 1)``; zeros without stabilizing):
    ``features * exp(c)`` are the plain features. ``check_finite``: raise on non-finite
    ``x`` or ``omega``.

    >>> import numpy as np
    >>> from refattn.performer import draw_omega, performer_features
    >>> omega = draw_omega(3, 2, orthogonal=False, rng=0)
    >>> x = np.array([[0.3, -0.2], [1.0, 0.5]])
    >>> performer_features(x, omega).shape, performer_features(x, omega, "hyperbolic").shape
    ((2, 3), (2, 6))
    >>> f, c = performer_features(x, omega, stabilize="row", return_shift=True)
    >>> bool(np.allclose(f * np.exp(c), performer_features(x, omega)))
    True
    """
    kernel = check_kernel(kernel)
    x = to_float64(x, "x", check_finite=check_finite)
    omega = to_float64(omega, "omega", check_finite=check_finite)
    if x.ndim < 2 or omega.ndim != 2 or omega.shape[1] != x.shape[-1] or omega.shape[0] < 1:
        raise ValueError(f"performer_features needs x (..., L, D) and omega (m, D) with "
                         f"m >= 1; got x {x.shape}, omega {omega.shape}")
    if stabilize not in (None, "row", "global"):
        raise ValueError(f"stabilize must be None, 'row' or 'global', got {stabilize!r}")
    return stabilized_features(x, omega, kernel, stabilize, return_shift)


def stabilized_features(x, omega, kernel, stabilize, return_shift=False):
    """:func:`performer_features` without validation (x, omega float64, checked)."""
    h, g, norm = log_features(x, omega, kernel)
    if stabilize == "row":
        shift = h.max(axis=-1, keepdims=True)
    elif stabilize == "global":
        shift = np.fmax.reduce(h, axis=(-2, -1), keepdims=True) if h.size else np.zeros(
            h.shape[:-2] + (1, 1))
    else:
        shift = np.zeros(h.shape[:-2] + (1, 1))
    feats = h - shift
    np.exp(feats, out=feats)             # in place, the same operations in the same order
    feats *= norm
    if g is not None:                    # trigonometric: exp(|x|^2/2) is (..., L, 1)
        feats = feats * g
    return (feats, shift) if return_shift else feats


def stabilized_features_vjp(x, omega, kernel, stabilize, grad_feats):
    r"""``dx = (∂φ/∂x)ᵀ grad_feats`` for the features of :func:`stabilized_features`,
    the projection ``ω`` and the stabilizer's shift ``c`` held fixed (``ω`` is not
    trained; ``c`` cancels in every normalized output, whose derivative in ``c`` is
    therefore 0). With ``P = grad_feats ∘ φ`` (``φ = e^{h - c} · norm · g``):

    * positive (:math:`h_f = \omega_f\cdot x - \|x\|^2/2`):
      :math:`dx = P\,\omega - x \sum_f P_f`;
    * hyperbolic (:math:`h = \pm\omega_f\cdot x - \|x\|^2/2`):
      :math:`dx = (P_+ - P_-)\,\omega - x \sum_f P_f`;
    * trigonometric (:math:`h = \|x\|^2/2`, :math:`g = (\sin \omega x, \cos \omega x)`):
      :math:`dx = x \sum_f P_f + e^{h - c}\,\mathrm{norm}\,
      \big(\bar\phi_{\sin} \circ \cos \omega x - \bar\phi_{\cos} \circ \sin \omega x\big)\,\omega`.

    ``x (..., L, D)``, ``grad_feats (..., L, F)`` float64; returns ``(..., L, D)``.
    """
    feats, shift = stabilized_features(x, omega, kernel, stabilize, True)
    p = grad_feats * feats
    m = omega.shape[-2]
    if kernel == "positive":
        return p @ omega - x * p.sum(-1, keepdims=True)
    if kernel == "hyperbolic":
        return (p[..., :m] - p[..., m:]) @ omega - x * p.sum(-1, keepdims=True)
    proj = x @ np.swapaxes(omega, -1, -2)
    half_sq = 0.5 * np.einsum("...d,...d->...", x, x)[..., None]
    scale = np.exp(half_sq - shift) / math.sqrt(m)              # e^{h - c} · norm
    dg = grad_feats[..., :m] * np.cos(proj) - grad_feats[..., m:] * np.sin(proj)
    return x * p.sum(-1, keepdims=True) + (scale * dg) @ omega


def check_feature_memory(num_features, d, *, rows=0, cells=0, width=2, memory_budget=None,
                         what="the random features", draws=1, orthogonal=True):
    """Raise :class:`refattn.MemoryBudgetError`, naming ``num_features`` and ``d``,
    before ``draws`` projections ``ω (m, d)`` are drawn (orthogonal: QR of ``d x d``
    blocks) and the ``width · m`` features of ``rows`` vectors made (``cells`` more
    float64 per feature: the states ``φ(K)^T V``), if that needs more than
    ``memory_budget``; returns ``m``. The one check every user of random features
    makes (Performer, Scatterbrain, their states)."""
    m = check_int("num_features", num_features, minimum=1)
    block = 8.0 * draws * 4 * d * d if orthogonal else 0.0     # one d x d QR block
    per_feature = 8.0 * (draws * 4 * d + width * (3 * rows + cells))
    budget = resolve_budget(memory_budget)
    sizes = f"num_features={m:,}, d={d:,}" + (f", draws={draws:,}" if draws > 1 else "")
    fit = int((budget - block) // per_feature)
    check_size_memory(per_feature * m + block, budget, what, sizes,
                      f"num_features <= {fit:,}" if fit >= 1 else
                      "orthogonal=False (the orthogonal draw factors d x d blocks)")
    return m


def resolve_omega(omega, num_features, d, orthogonal, rng, where, *, rows=0, cells=0,
                  width=2, memory_budget=None):
    """The ``(m, d)`` projection: ``omega`` checked against ``num_features`` and ``d``,
    or drawn from ``rng``, after :func:`check_feature_memory` (``rows``, ``cells``,
    ``width``, ``memory_budget`` as there)."""
    orthogonal = check_bool("orthogonal", orthogonal)
    m = check_feature_memory(num_features, d, rows=rows, cells=cells, width=width,
                             memory_budget=memory_budget, what=f"{where}'s random features",
                             orthogonal=orthogonal and omega is None)
    if omega is None:
        return draw_omega(m, d, orthogonal=orthogonal, rng=resolve_rng(rng, where))
    omega = to_float64(omega, "omega")
    if omega.shape != (m, d):
        raise ValueError(f"omega must have shape (num_features, D) = {(m, d)}, got "
                         f"{omega.shape}")
    return omega


def softmax_kernel_estimate(x, y, *, num_features, kernel="positive", orthogonal=True,
                            rng, omega=None, draws=None):
    r"""The random-feature estimate :math:`\phi(x)\cdot\phi(y)` of
    :math:`\mathrm{SM}(x, y) = e^{x\cdot y}` from ``m = num_features`` projections
    (:func:`draw_omega`); unbiased: :math:`\mathbb E_\omega = e^{x\cdot y}`
    (Choromanski et al. 2021, Lemma 1; Lemma 2 gives its mean squared error).

    ``x (..., D)`` and ``y (..., D)`` broadcast against each other; one ``ω`` serves
    every pair. Returns float64 of the broadcast shape, or ``(draws, ...)`` for
    ``draws = R`` independent draws of ``ω`` (made at once from ``rng``; ``draws=1``
    uses the ``ω`` of :func:`draw_omega` with the same ``rng``), for Monte Carlo
    studies. ``omega`` replaces the draw: ``(m, D)``, or ``(R, m, D)`` for
    ``R`` given projections (result ``(R, ...)``); ``rng`` is then unused. No scaling is
    applied to ``x``, ``y``. Computed from row-stabilized features with the shifts added
    back in the exponent, so the features themselves never overflow.

    >>> import numpy as np
    >>> from refattn.performer import softmax_kernel_estimate
    >>> x, y = np.array([0.3, -0.1]), np.array([0.2, 0.4])
    >>> est = softmax_kernel_estimate(x, y, num_features=8, rng=0, draws=20000)
    >>> est.shape, bool(abs(est.mean() - np.exp(x @ y)) < 4 * est.std() / np.sqrt(20000))
    ((20000,), True)
    """
    kernel = check_kernel(kernel)
    x = to_float64(x, "x")
    y = to_float64(y, "y")
    if x.ndim < 1 or y.ndim < 1 or x.shape[-1] != y.shape[-1] or x.shape[-1] < 1:
        raise ValueError(f"x and y must be vectors (..., D) with the same D >= 1; got x "
                         f"{x.shape}, y {y.shape}")
    try:
        shape = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    except ValueError:
        raise ValueError(f"x {x.shape} and y {y.shape} do not broadcast") from None
    d = x.shape[-1]
    where = "softmax_kernel_estimate"
    r = 1 if draws is None else check_int("draws", draws, minimum=1)
    m = check_feature_memory(num_features, d, rows=2 * r * math.prod(shape), width=2,
                             draws=r, what=where, orthogonal=orthogonal is not False)
    if draws is not None:
        if omega is not None:
            raise ValueError("pass either draws= (to draw omega) or omega=, not both")
        omegas = _draw_omegas(r, m, d, check_bool("orthogonal", orthogonal),
                              resolve_rng(rng, where))
    elif omega is not None and np.ndim(omega) == 3:
        omegas = to_float64(omega, "omega")
        if omegas.shape[1:] != (m, d):
            raise ValueError(f"omega must have shape (num_features, D) = {(m, d)} or "
                             f"(R, num_features, D), got {omegas.shape}")
    else:
        omegas = resolve_omega(omega, m, d, orthogonal, rng, where)[None]
    xb = np.broadcast_to(x, shape + (d,)).reshape(1, -1, d)      # (1, P, D)
    yb = np.broadcast_to(y, shape + (d,)).reshape(1, -1, d)
    hx, gx, norm = log_features(xb, omegas, kernel)               # (R, P, F) / (1, P, 1)
    hy, gy, _ = log_features(yb, omegas, kernel)
    cx, cy = hx.max(-1, keepdims=True), hy.max(-1, keepdims=True)
    prod = np.exp(hx - cx) * np.exp(hy - cy) * norm ** 2
    if gx is not None:
        prod = prod * gx * gy
    with np.errstate(over="ignore"):
        est = prod.sum(-1) * np.exp(cx[..., 0] + cy[..., 0])       # (R, P)
    est = est.reshape((est.shape[0],) + shape)
    stacked = draws is not None or (omega is not None and np.ndim(omega) == 3)
    return est if stacked else est[0]


def scaled_pair(q, k, scale):
    """``x = sqrt|s| q``, ``y = sign(s) sqrt|s| k`` so that ``x·y = s q·k``."""
    r = math.sqrt(abs(scale))
    return q * r, k * (math.copysign(r, scale) if scale != 0 else 0.0)
