r"""Nyströmformer (Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention"), float64 reference: with segment-mean landmarks
:math:`\tilde Q, \tilde K` (``c`` rows each, :func:`segment_means`),

.. math:: O = \tilde F\, \tilde A^{+}\, \tilde B\, V, \quad
          \tilde F = \operatorname{softmax}(s\, Q \tilde K^\top),\
          \tilde A = \operatorname{softmax}(s\, \tilde Q \tilde K^\top),\
          \tilde B = \operatorname{softmax}(s\, \tilde Q K^\top),

with :math:`\tilde A^{+}` from the paper's iterative pseudoinverse
(:func:`iterative_pinv`) or, with ``pinv_iters=None``, the exact one. ``s`` is the
``scale`` (default ``1/sqrt(D)``), every softmax over the last axis. Non-causal (the
paper defines no causal form) and without a mask. The implied matrix
:func:`nystrom_attention_matrix` ``(..., Hq, N, M)``, with ``out == A @ v``, has the
signs of :math:`\tilde A^{+}` (not row-stochastic).

Shapes follow refattn's layout, ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``,
``v (..., Hkv, M, Dv)``, with grouped-query attention (query head ``h`` uses KV head
``h // (Hq // Hkv)``).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_choice, check_cotangent, check_int, resolve_scale
from .._core.problem import prepare_qkv
from ..registry import attach, register
from ._common import (grouped, implied_memory, segment_means, segment_means_vjp, softmax,
                      softmax_vjp, ungrouped)

__all__ = ["PINV_INITS", "nystrom_attention", "nystrom_attention_matrix",
           "nystrom_attention_vjp",
           "iterative_pinv", "iterative_pinv_vjp", "iterative_pinv_backward",
           "pinv_backward"]


#: Where the start ``Z_0 = Aᵀ / (‖A‖₁‖A‖∞)`` takes its norms: each matrix's own
#: ("per_matrix", the paper) or their maxima over the whole batch ("batch", the official
#: code and HuggingFace's Nyströmformer).
PINV_INITS = ("per_matrix", "batch")

#: Most iterations of :func:`iterative_pinv` accepted. Its slow phase near ``‖E‖ ≈ 1``
#: lasts about ``log_{13/4}(1 / (1 - ‖E_0‖))`` iterations, at most ~600 in float64 (a gap
#: ``1 - ‖E_0‖`` of 1e-308); third-order convergence then takes a few more, after which
#: further iterations only let rounding drift (a singular ``A``). More is a mistake, not
#: a longer computation worth running (the backward keeps one matrix per iteration).
MAX_PINV_ITERS = 10_000


def _check_iters(name, iters):
    """``iters`` an int in ``0 .. MAX_PINV_ITERS``, named ``name`` when not."""
    iters = check_int(name, iters, minimum=0,
                      context=" (or None for the exact pseudoinverse)"
                      if name == "pinv_iters" else "")
    if iters > MAX_PINV_ITERS:
        raise ValueError(f"{name}={iters:,} is more than MAX_PINV_ITERS={MAX_PINV_ITERS:,} "
                         f"iterations of the iterative pseudoinverse: it converges (third "
                         f"order) within about 600 even from the worst float64 start, and "
                         f"further iterations only accumulate rounding; use at most "
                         f"{MAX_PINV_ITERS:,}"
                         + (" or pinv_iters=None (exact)" if name == "pinv_iters" else ""))
    return iters


def _check_pinv(a, iters, init="per_matrix"):
    """``a`` as float64 square matrices ``(..., c, c)``, ``iters`` and ``init`` checked."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"iterative_pinv needs square matrices (..., c, c), got shape "
                         f"{a.shape}")
    check_choice("init", init, PINV_INITS)
    return a, _check_iters("iters", iters)


def iterative_pinv(a, iters: int, *, init: str = "per_matrix"):
    r"""Nyströmformer's iterative Moore-Penrose pseudoinverse of ``a`` ``(..., c, c)``.

    .. math:: Z_0 = \frac{A^\top}{\|A\|_1 \|A\|_\infty}, \qquad
              Z_{j+1} = \tfrac14 Z_j\big(13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))\big)

    (Xiong et al. 2021, after Razavi et al. 2014). ``‖A‖₁`` is the largest absolute
    column sum and ``‖A‖∞`` the largest absolute row sum, **per matrix** with
    ``init="per_matrix"`` (the paper's definition), or their maxima over every matrix of
    ``a`` with ``init="batch"``: one scale :math:`1 / (\max \text{col sum} \cdot \max
    \text{row sum})` for the whole batch and all heads, as the official code and
    HuggingFace's ``NystromformerSelfAttention.iterative_inv`` take it (HF's default
    ``"original"`` start divides by the largest column sum only: its matrices are
    softmaxes, whose row sums are 1). The start changes every finite iterate, not the
    limit, and makes one matrix's result depend on the others in the batch. The error
    :math:`E_j = I - A Z_j` obeys :math:`E_{j+1} = \tfrac34 E_j^3 + \tfrac14 E_j^4`, so
    the iteration converges with third order to :math:`A^{+}` once
    :math:`\|E_j\| < 1`; with an ill-conditioned ``a`` it first spends about
    :math:`\log_{13/4}(1/(1 - \|E_0\|))` iterations near :math:`\|E\| \approx 1`
    (so the paper's 6 iterations can be far from :math:`A^{+}`). For a singular ``a`` the
    iterates converge to :math:`A^{+}` in exact arithmetic; in floating point the
    rounding along the left null space (an eigenvalue 1 of ``E``, a repelling fixed
    point of slope 13/4) grows 13/4-fold per iteration, so many iterations drift away
    again. Returns ``Z_iters`` (float64, shape of ``a``); an all-zero matrix gives 0.
    Its gradient, through every iteration: :func:`iterative_pinv_vjp`
    (``refattn.vjp(iterative_pinv, a, grad, iters=...)``).

    >>> import numpy as np, refattn as ra
    >>> a = np.array([[0.7, 0.3], [0.2, 0.8]])
    >>> bool(np.allclose(ra.lowrank.iterative_pinv(a, 6), np.linalg.inv(a), rtol=1e-12))
    True
    >>> b = np.stack([a, 3 * a])          # batch: one scale, set by the larger matrix
    >>> z1 = ra.lowrank.iterative_pinv(b, 1, init="batch")
    >>> z2 = ra.lowrank.iterative_pinv(b, 1)
    >>> bool(np.allclose(z1[1], z2[1])), bool(np.allclose(z1[0], z2[0]))
    (True, False)
    """
    a, iters = _check_pinv(a, iters, init)
    z = _pinv_start(a, init)[0]
    eye = np.eye(a.shape[-1])
    for _ in range(iters):
        z = _pinv_step(a, z, eye)
    return z


def _pinv_start(a, init="per_matrix"):
    """``(Z_0, ‖A‖₁, ‖A‖∞, ‖A‖₁‖A‖∞)`` of :func:`iterative_pinv` (norms ``(..., 1, 1)``,
    the batch's maxima everywhere with ``init="batch"``; ``Z_0 = 0`` where the product
    is 0)."""
    norm1 = np.abs(a).sum(axis=-2).max(axis=-1, initial=0.0)[..., None, None]
    norm_inf = np.abs(a).sum(axis=-1).max(axis=-1, initial=0.0)[..., None, None]
    if init == "batch":
        norm1 = np.full(norm1.shape, norm1.max(initial=0.0))
        norm_inf = np.full(norm_inf.shape, norm_inf.max(initial=0.0))
    denom = norm1 * norm_inf
    z = np.divide(a.swapaxes(-1, -2), denom, out=np.zeros_like(a), where=denom > 0)
    return z, norm1, norm_inf, denom


def _pinv_step(a, z, eye):
    """One iteration ``Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))``."""
    az = a @ z
    return 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))


def _pinv_step_vjp(a, z, eye, g):
    """``(dA, dZ)`` of one :func:`_pinv_step` for the cotangent ``g`` of its result:
    with ``X = AZ``, ``T₁ = 7I − X``, ``T₂ = 15I − X T₁``, ``T₃ = 13I − X T₂`` and
    ``Z' = ¼ Z T₃``: ``dZ = ¼ G T₃ᵀ + Aᵀ dX``, ``dA = dX Zᵀ`` with
    ``dX = −¼ Zᵀ G T₂ᵀ + Xᵀ(¼ Zᵀ G) T₁ᵀ − Xᵀ Xᵀ (¼ Zᵀ G)``."""
    x = a @ z
    t1 = 7 * eye - x
    t2 = 15 * eye - x @ t1
    t3 = 13 * eye - x @ t2
    xt = x.swapaxes(-1, -2)
    dt3 = 0.25 * (z.swapaxes(-1, -2) @ g)
    dt2 = xt @ dt3                                          # −dT₂ (d(X T₂) = −dT₃)
    dx = -dt3 @ t2.swapaxes(-1, -2) + dt2 @ t1.swapaxes(-1, -2) - xt @ dt2
    dz = 0.25 * (g @ t3.swapaxes(-1, -2)) + a.swapaxes(-1, -2) @ dx
    return dx @ z.swapaxes(-1, -2), dz


def _pinv_start_vjp(a, norm1, norm_inf, denom, g, init="per_matrix"):
    """``dA`` of ``Z_0 = Aᵀ / (‖A‖₁‖A‖∞)`` for the cotangent ``g``; the norms' maxima
    differentiate through the first maximal column (row) sum -- of each matrix, or of
    the whole batch with ``init="batch"`` (whose one denominator collects every
    matrix's cotangent) -- ``|x|`` as ``sign(x)``."""
    safe = np.where(denom > 0, denom, 1.0)
    ddenom = np.where(denom > 0, -np.einsum("...ij,...ji->...", g, a)[..., None, None]
                      / safe ** 2, 0.0)
    col_sums, row_sums = np.abs(a).sum(axis=-2), np.abs(a).sum(axis=-1)     # (..., c)
    if init == "batch":
        ddenom = np.full(ddenom.shape, ddenom.sum())
        at_col, at_row = np.zeros(col_sums.shape, bool), np.zeros(row_sums.shape, bool)
        if a.size:
            at_col.flat[np.argmax(col_sums)] = at_row.flat[np.argmax(row_sums)] = True
    else:
        idx = np.arange(a.shape[-1])
        at_col = idx == col_sums.argmax(axis=-1)[..., None]
        at_row = idx == row_sums.argmax(axis=-1)[..., None]
    sign = np.sign(a)
    da = np.where(denom > 0, g.swapaxes(-1, -2) / safe, 0.0)
    da = da + (ddenom * norm_inf) * sign * at_col[..., None, :]
    return da + (ddenom * norm1) * sign * at_row[..., :, None]


def iterative_pinv_backward(a, grad_z, iters: int, init: str = "per_matrix"):
    r"""``dA`` of ``Z = iterative_pinv(a, iters, init=init)`` for the cotangent
    ``grad_z``: the iterates are recomputed and the cotangent runs back through each step
    (:func:`_pinv_step_vjp`) and the start ``Z_0``. ``a`` float64 ``(..., c, c)``."""
    eye = np.eye(a.shape[-1])
    z0, norm1, norm_inf, denom = _pinv_start(a, init)
    zs = [z0]
    for _ in range(iters - 1):
        zs.append(_pinv_step(a, zs[-1], eye))
    da = np.zeros(a.shape)
    g = grad_z
    for z in reversed(zs[:iters]):
        step_da, g = _pinv_step_vjp(a, z, eye, g)
        da += step_da
    return da + _pinv_start_vjp(a, norm1, norm_inf, denom, g, init)


def pinv_backward(a, z, grad_z):
    r"""``dA`` of the exact pseudoinverse ``Z = A⁺`` for the cotangent ``G``
    (Golub & Pereyra 1973, the derivative of :math:`A^{+}` where the rank of ``A`` is
    locally constant):

    .. math:: dA = -Z^\top G Z^\top + (I - A Z)\, G^\top Z Z^\top
                  + Z^\top Z\, G^\top (I - Z A);

    for an invertible ``A`` the last two terms vanish, leaving
    :math:`-A^{-\top} G A^{-\top}` (from :math:`d(A^{-1}) = -A^{-1} dA\, A^{-1}`)."""
    zt, gt = z.swapaxes(-1, -2), grad_z.swapaxes(-1, -2)
    eye = np.eye(a.shape[-1])
    return (-zt @ grad_z @ zt + (eye - a @ z) @ gt @ (z @ zt)
            + (zt @ z) @ gt @ (eye - z @ a))


def iterative_pinv_vjp(a, grad_out, *, iters, init="per_matrix"):
    r"""Gradient of :func:`iterative_pinv` for the cotangent ``grad_out`` of its result
    (``a``'s shape): ``{"a": dA}``, float64.

    Each iteration is a polynomial in ``A`` and ``Z``; with ``X = A Z_j``,
    ``T₁ = 7I − X``, ``T₂ = 15I − X T₁``, ``T₃ = 13I − X T₂``,
    :math:`Z_{j+1} = \tfrac14 Z_j T_3` and the cotangent ``G`` of :math:`Z_{j+1}`:

    .. math:: \bar T_3 = \tfrac14 Z_j^\top G, \quad
              \bar X = -\bar T_3 T_2^\top + X^\top \bar T_3 T_1^\top
                        - X^\top X^\top \bar T_3, \quad
              dA \mathrel{+}= \bar X Z_j^\top, \quad
              \bar Z_j = \tfrac14 G T_3^\top + A^\top \bar X,

    chained from the last iteration back to
    :math:`Z_0 = A^\top / (\|A\|_1 \|A\|_\infty)`, whose norms differentiate
    through their maximal column and row sums (the first one on a tie, where the norm
    has no derivative: a subgradient) with :math:`d|x| = \operatorname{sign}(x)\,dx`;
    with ``init="batch"`` through the batch's maximal ones (one matrix's), the shared
    denominator collecting the cotangent of every matrix.
    The iterates are recomputed (``iters`` matrices of ``a``'s size are kept).

    >>> import numpy as np, refattn as ra
    >>> from refattn.lowrank.nystrom import iterative_pinv_vjp
    >>> a = np.array([[0.7, 0.3], [0.2, 0.8]])
    >>> g = np.eye(2)
    >>> da = ra.vjp(ra.lowrank.iterative_pinv, a, g, iters=8)["a"]   # converged: A⁻¹'s
    >>> inv = np.linalg.inv(a)
    >>> bool(np.allclose(da, -(inv @ inv).T))
    True
    """
    a, iters = _check_pinv(a, iters, init)
    g = check_cotangent(grad_out, "grad_out", a.shape)
    return {"a": iterative_pinv_backward(a, g, iters, init)}


def _nystrom(q, k, v, *, num_landmarks, pinv_iters, scale, check_finite, pinv_init,
             parts=False):
    """Validate; return ``(pb, f (B,Hkv,G,N,c), z (B,Hkv,G,c,c), b (B,Hkv,G,c,M), v)``,
    and with ``parts`` also ``(qg, k, q_land, k_land, a, s, pinv_iters)``."""
    check_choice("pinv_init", pinv_init, PINV_INITS)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    seen = f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, k " \
           f"{pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
    c = check_int("num_landmarks", num_landmarks, minimum=1, context=f" ({seen})")
    if c > min(pb.n, pb.m):
        raise ValueError(f"num_landmarks={c} exceeds min(N, M)={min(pb.n, pb.m)}: each "
                         f"landmark is the mean of a segment of at least one query and one "
                         f"key; got {seen}")
    if pinv_iters is not None:
        pinv_iters = _check_iters("pinv_iters", pinv_iters)
    s = resolve_scale(scale, pb.d)
    qg = grouped(q, pb)                                     # (B, Hkv, G, N, D)
    q_land = segment_means(qg, c)                           # (B, Hkv, G, c, D)
    k_land = segment_means(k, c)[:, :, None]                # (B, Hkv, 1, c, D)
    f = softmax(s * (qg @ k_land.swapaxes(-1, -2)))
    a = softmax(s * (q_land @ k_land.swapaxes(-1, -2)))
    b = softmax(s * (q_land @ k[:, :, None].swapaxes(-1, -2)))
    z = np.linalg.pinv(a) if pinv_iters is None else iterative_pinv(a, pinv_iters,
                                                                    init=pinv_init)
    if parts:
        return pb, f, z, b, v, (qg, k, q_land, k_land, a, s, pinv_iters)
    return pb, f, z, b, v


@register(family="lowrank", exact=False, time="O(c·(N+M)·(D+Dv) + c³·I)",
          state="O(c·(D+Dv)) landmarks per query head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=False,
          example={"num_landmarks": 1}, budget=lambda n, b: {"num_landmarks": b})
def nystrom_attention(q, k, v, *, num_landmarks, pinv_iters=6, pinv_init="per_matrix",
                      scale=None, check_finite=True):
    r"""Nyströmformer attention: the Nyström approximation of ``softmax(s Q K^T)``
    through ``num_landmarks`` segment-mean landmarks.

    .. math:: O = \tilde F\, \tilde A^{+}\, (\tilde B V), \quad
              \tilde F = \operatorname{softmax}(s\, Q \tilde K^\top),\
              \tilde A = \operatorname{softmax}(s\, \tilde Q \tilde K^\top),\
              \tilde B = \operatorname{softmax}(s\, \tilde Q K^\top)

    (Xiong et al. 2021, "Nyströmformer"). ``Q̃`` (``c x D``) holds the means of
    ``c`` contiguous segments of the queries, ``K̃`` those of the keys.

    **Segments.** The paper needs ``c`` to divide the length (the official code pads the
    input). Here any ``1 <= c <= min(N, M)`` is accepted and the segments follow
    ``np.array_split`` (:func:`segment_means`): with ``L = c·q + r`` the first ``r``
    segments have ``q + 1`` tokens, the rest ``q``. When ``c`` divides ``L`` this is the
    paper's rule. ``c > min(N, M)`` raises ``ValueError``.

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``; ``N != M``
        allowed (queries and keys have separate landmarks). GQA: each query head has its
        own query landmarks and uses its KV head's key landmarks.
    num_landmarks : int ``c``.
    pinv_iters : int ``0 .. MAX_PINV_ITERS`` (10,000), iterations of
        :func:`iterative_pinv` (the paper uses 6), or None for the exact pseudoinverse
        (``np.linalg.pinv``). Six iterations are not
        converged when :math:`\tilde A` is ill-conditioned (small logits, many landmarks);
        that is the paper's operator, not a defect of the reference.
    pinv_init : ``"per_matrix"`` (default, the paper: each head's ``Z_0`` from its own
        norms) or ``"batch"`` (the official code and HuggingFace: one scale
        :math:`1 / (\max \text{col sum} \cdot \max \text{row sum})` over the whole
        batch and every head, so a sequence's result depends on the others in the call);
        see :func:`iterative_pinv`. No effect with ``pinv_iters=None``.
    scale : float, default ``1/sqrt(D)``.
    check_finite : raise on non-finite inputs.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. The paper's depthwise-convolution skip connection on
    ``V`` is a separate learned layer and not part of this operator. Non-causal.
    With ``c = N = M`` (one token per segment) and the exact pseudoinverse the result is
    exact attention (:math:`P P^{+} P = P`).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 8, 4)) * 0.5
    >>> ra.nystrom_attention(q, k, v, num_landmarks=4).shape
    (2, 8, 4)
    >>> exact = ra.nystrom_attention(q, k, v, num_landmarks=8, pinv_iters=None)
    >>> bool(np.allclose(exact, ra.attention(q, k, v)))
    True
    """
    pb, f, z, b, v = _nystrom(q, k, v, num_landmarks=num_landmarks, pinv_iters=pinv_iters,
                              scale=scale, check_finite=check_finite, pinv_init=pinv_init)
    bv = b @ v[:, :, None]                                  # (B, Hkv, G, c, Dv)
    return pb.unflatten(ungrouped(f @ (z @ bv), pb))


def nystrom_attention_matrix(q, k, *, num_landmarks, pinv_iters=6, pinv_init="per_matrix",
                             scale=None, check_finite=True, memory_budget=None):
    r"""The implied matrix :math:`\tilde F \tilde A^{+} \tilde B` ``(..., Hq, N, M)`` of
    :func:`nystrom_attention` (same arguments), so that ``nystrom_attention(q, k, v) ==
    A @ v``. Not row-stochastic in general (:math:`\tilde A^{+}` has negative entries).
    Rows sum to 1 when :math:`\tilde A` is invertible and its inverse exact
    (``pinv_iters=None``): :math:`\tilde B 1 = 1` and :math:`\tilde A^{-1} 1 = 1`.
    ``memory_budget`` bounds the matrix.

    >>> import numpy as np, refattn as ra
    >>> q, k = np.random.default_rng(1).standard_normal((2, 1, 6, 3))
    >>> a = ra.lowrank.nystrom_attention_matrix(q, k, num_landmarks=3, pinv_iters=None)
    >>> bool(np.allclose(a.sum(-1), 1.0)), bool((a < 0).any())
    (True, True)
    """
    pb, f, z, b, _ = _nystrom(q, k, None, num_landmarks=num_landmarks,
                              pinv_iters=pinv_iters, scale=scale, check_finite=check_finite,
                              pinv_init=pinv_init)
    implied_memory(pb, memory_budget, "nystrom_attention")
    return pb.unflatten(ungrouped(f @ (z @ b), pb))


def nystrom_attention_vjp(q, k, v, grad_out, *, num_landmarks, pinv_iters=6,
                          pinv_init="per_matrix", scale=None, check_finite=True):
    r"""Gradients of :func:`nystrom_attention` for the cotangent ``grad_out``
    ``(..., Hq, N, Dv)`` of its output (same keyword arguments, validated alike).

    With :math:`O = F Z (B V)`, ``Z`` the pseudoinverse of ``A`` as the forward computes
    it, and :math:`dO` = ``grad_out``:

    .. math::

        W = Z B V, \quad dF = dO\, W^\top, \quad dW = F^\top dO, \quad
        dZ = dW (B V)^\top, \quad d(BV) = Z^\top dW, \quad
        dB = d(BV)\, V^\top, \quad dV = B^\top d(BV),

    ``dA`` from ``dZ`` through the pseudoinverse, then each softmax
    :math:`dS = P \circ (dP - \operatorname{rowsum}(dP \circ P))` and its logits
    :math:`S = s\, X Y^\top` (:math:`dX = s\, dS\, Y`, :math:`dY = s\, dS^\top X`)
    with :math:`(X, Y)` = :math:`(Q, \tilde K)`, :math:`(\tilde Q, \tilde K)`,
    :math:`(\tilde Q, K)`, and the landmarks' gradients back to their segments: each
    row of ``q`` (``k``) receives its segment's :math:`d\tilde Q` (:math:`d\tilde K`)
    over the segment's size.

    **The pseudoinverse.** ``pinv_iters`` an int: the gradient of the iterative form
    itself, backpropagated through every iteration and the start
    :math:`Z_0 = A^\top / (\|A\|_1 \|A\|_\infty)` (:func:`iterative_pinv_vjp`; with
    ``pinv_init="batch"`` through the batch's norms), not
    the derivative of :math:`A^{+}` (they differ as much as the iterate differs from
    :math:`A^{+}`). ``pinv_iters=None``: the derivative of the exact pseudoinverse
    (Golub & Pereyra 1973, :func:`pinv_backward`),

    .. math:: dA = -Z^\top dZ\, Z^\top + (I - A Z)\, dZ^\top Z Z^\top
                  + Z^\top Z\, dZ^\top (I - Z A),

    which reduces to :math:`-A^{-\top} dZ\, A^{-\top}` for an invertible ``A``
    (:math:`d(A^{-1}) = -A^{-1} dA\, A^{-1}`); it holds where the rank of ``A`` is
    locally constant (``np.linalg.pinv`` drops singular values below ``1e-15`` of the
    largest, where the pseudoinverse is not continuous).

    Returns ``{"q", "k", "v"}``, float64, each of its input's shape (GQA: a KV head sums
    over its query heads; broadcast dims summed). Working memory: the ``(N, c)``,
    ``(c, c)`` and ``(c, M)`` kernels per query head (Xiong et al. 2021), never
    ``N x M``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 4)) * 0.5
    >>> g = np.ones((2, 6, 4))
    >>> mine = ra.vjp("nystrom_attention", q, k, v, g, num_landmarks=6, pinv_iters=None)
    >>> ref = ra.vjp("attention", q, k, v, g)       # c = N = M, exact inverse: exact
    >>> all(np.allclose(mine[x], ref[x]) for x in "qkv")
    True
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    pb, f, z, b, v, (qg, k, q_land, k_land, a, s, iters) = _nystrom(
        q, k, v, num_landmarks=num_landmarks, pinv_iters=pinv_iters, scale=scale,
        check_finite=check_finite, pinv_init=pinv_init, parts=True)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                         check_finite=check_finite)
    do = grouped(do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv), pb)   # (B, Hkv, G, N, Dv)
    vg = v[:, :, None]                                      # (B, Hkv, 1, M, Dv)
    bv = b @ vg                                             # (B, Hkv, G, c, Dv)
    dw = f.swapaxes(-1, -2) @ do                            # (B, Hkv, G, c, Dv)
    df = do @ (z @ bv).swapaxes(-1, -2)                     # (B, Hkv, G, N, c)
    dz = dw @ bv.swapaxes(-1, -2)                           # (B, Hkv, G, c, c)
    dbv = z.swapaxes(-1, -2) @ dw
    dv = (b.swapaxes(-1, -2) @ dbv).sum(axis=2)             # (B, Hkv, M, Dv)
    da = pinv_backward(a, z, dz) if iters is None else \
        iterative_pinv_backward(a, dz, iters, pinv_init)
    dsf = softmax_vjp(f, df)
    dsa = softmax_vjp(a, da)
    dsb = softmax_vjp(b, dbv @ vg.swapaxes(-1, -2))         # (B, Hkv, G, c, M)
    dqg = s * (dsf @ k_land)
    dq_land = s * (dsa @ k_land + dsb @ k[:, :, None])      # (B, Hkv, G, c, D)
    dk_land = s * (dsf.swapaxes(-1, -2) @ qg + dsa.swapaxes(-1, -2) @ q_land).sum(axis=2)
    dk = s * (dsb.swapaxes(-1, -2) @ q_land).sum(axis=2)    # (B, Hkv, M, D)
    dqg = dqg + segment_means_vjp(dq_land, pb.n)
    dk = dk + segment_means_vjp(dk_land, pb.m)
    return {"q": pb.input_gradient(ungrouped(dqg, pb), shapes["q"]),
            "k": pb.input_gradient(dk, shapes["k"]),
            "v": pb.input_gradient(dv, shapes["v"])}


iterative_pinv.vjp = iterative_pinv_vjp
attach(nystrom_attention, implied=nystrom_attention_matrix, vjp=nystrom_attention_vjp)
