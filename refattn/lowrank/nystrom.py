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

from .._core.checks import check_int, resolve_scale
from .._core.problem import prepare_qkv
from ..registry import attach, register
from ._common import grouped, implied_memory, segment_means, softmax, ungrouped

__all__ = ["nystrom_attention", "nystrom_attention_matrix", "iterative_pinv"]


def iterative_pinv(a, iters: int):
    r"""Nyströmformer's iterative Moore-Penrose pseudoinverse of ``a`` ``(..., c, c)``.

    .. math:: Z_0 = \frac{A^\top}{\|A\|_1 \|A\|_\infty}, \qquad
              Z_{j+1} = \tfrac14 Z_j\big(13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))\big)

    (Xiong et al. 2021, after Razavi et al. 2014). ``‖A‖₁`` is the largest absolute
    column sum and ``‖A‖∞`` the largest absolute row sum, **per matrix** (the paper's
    definition; the official code takes the maxima over the whole batch and all heads,
    which changes ``Z_0`` and so every finite iterate, but not the limit). The error
    :math:`E_j = I - A Z_j` obeys :math:`E_{j+1} = \tfrac34 E_j^3 + \tfrac14 E_j^4`, so
    the iteration converges with third order to :math:`A^{+}` once
    :math:`\|E_j\| < 1`; with an ill-conditioned ``a`` it first spends about
    :math:`\log_{13/4}(1/(1 - \|E_0\|))` iterations near :math:`\|E\| \approx 1`
    (so the paper's 6 iterations can be far from :math:`A^{+}`). For a singular ``a`` the
    iterates converge to :math:`A^{+}` in exact arithmetic; in floating point the
    rounding along the left null space (an eigenvalue 1 of ``E``, a repelling fixed
    point of slope 13/4) grows 13/4-fold per iteration, so many iterations drift away
    again. Returns ``Z_iters`` (float64, shape of ``a``); an all-zero matrix gives 0.

    >>> import numpy as np, refattn as ra
    >>> a = np.array([[0.7, 0.3], [0.2, 0.8]])
    >>> bool(np.allclose(ra.lowrank.iterative_pinv(a, 6), np.linalg.inv(a), rtol=1e-12))
    True
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"iterative_pinv needs square matrices (..., c, c), got shape "
                         f"{a.shape}")
    iters = check_int("iters", iters, minimum=0)
    norm1 = np.abs(a).sum(axis=-2).max(axis=-1, initial=0.0)
    norm_inf = np.abs(a).sum(axis=-1).max(axis=-1, initial=0.0)
    denom = (norm1 * norm_inf)[..., None, None]
    z = np.divide(a.swapaxes(-1, -2), denom, out=np.zeros_like(a), where=denom > 0)
    eye = np.eye(a.shape[-1])
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _nystrom(q, k, v, *, num_landmarks, pinv_iters, scale, check_finite):
    """Validate; return ``(pb, f (B,Hkv,G,N,c), z (B,Hkv,G,c,c), b (B,Hkv,G,c,M), v)``."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    seen = f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, k " \
           f"{pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
    c = check_int("num_landmarks", num_landmarks, minimum=1, context=f" ({seen})")
    if c > min(pb.n, pb.m):
        raise ValueError(f"num_landmarks={c} exceeds min(N, M)={min(pb.n, pb.m)}: each "
                         f"landmark is the mean of a segment of at least one query and one "
                         f"key; got {seen}")
    if pinv_iters is not None:
        pinv_iters = check_int("pinv_iters", pinv_iters, minimum=0,
                               context=" (or None for the exact pseudoinverse)")
    s = resolve_scale(scale, pb.d)
    qg = grouped(q, pb)                                     # (B, Hkv, G, N, D)
    q_land = segment_means(qg, c)                           # (B, Hkv, G, c, D)
    k_land = segment_means(k, c)[:, :, None]                # (B, Hkv, 1, c, D)
    f = softmax(s * (qg @ k_land.swapaxes(-1, -2)))
    a = softmax(s * (q_land @ k_land.swapaxes(-1, -2)))
    b = softmax(s * (q_land @ k[:, :, None].swapaxes(-1, -2)))
    z = np.linalg.pinv(a) if pinv_iters is None else iterative_pinv(a, pinv_iters)
    return pb, f, z, b, v


@register(family="lowrank", exact=False, time="O(c·(N+M)·(D+Dv) + c³·I)",
          state="O(c·(D+Dv)) landmarks per query head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=False,
          example={"num_landmarks": 1}, budget=lambda n, b: {"num_landmarks": b})
def nystrom_attention(q, k, v, *, num_landmarks, pinv_iters=6, scale=None,
                      check_finite=True):
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
    pinv_iters : int >= 0, iterations of :func:`iterative_pinv` (the paper uses 6), or
        None for the exact pseudoinverse (``np.linalg.pinv``). Six iterations are not
        converged when :math:`\tilde A` is ill-conditioned (small logits, many landmarks);
        that is the paper's operator, not a defect of the reference.
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
                              scale=scale, check_finite=check_finite)
    bv = b @ v[:, :, None]                                  # (B, Hkv, G, c, Dv)
    return pb.unflatten(ungrouped(f @ (z @ bv), pb))


def nystrom_attention_matrix(q, k, *, num_landmarks, pinv_iters=6, scale=None,
                             check_finite=True, memory_budget=None):
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
                              pinv_iters=pinv_iters, scale=scale, check_finite=check_finite)
    implied_memory(pb, memory_budget, "nystrom_attention")
    return pb.unflatten(ungrouped(f @ (z @ b), pb))



attach(nystrom_attention, implied=nystrom_attention_matrix)
