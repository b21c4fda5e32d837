r"""Differential attention (Ye et al. 2024, "Differential Transformer"): the difference
of two softmax attention maps over the same values,

.. math::

    O = \big(\operatorname{softmax}(s\, Q_1 K_1^\top) - \lambda\,
    \operatorname{softmax}(s\, Q_2 K_2^\top)\big) V, \qquad s = 1/\sqrt{d},

with the head conventions of the paper's code (``multihead_flashdiff_1.py``): each head
of ``q (..., Hq, N, 2d)`` and ``k (..., Hkv, M, 2d)`` carries both maps, **split in
halves along the last dimension** (``Q_1 = q[..., :d]``, ``Q_2 = q[..., d:]``), ``v``
``(..., Hkv, M, Dv)`` (the paper's ``Dv = 2d``) is shared, and ``d = D/2`` is the
paper's head dimension, so the default scale is ``1/sqrt(D/2)``. GQA pairs query head
``h`` with KV head ``h // (Hq/Hkv)`` for both halves (as FlashAttention does in
``multihead_flashdiff_1``; the naive ``multihead_diffattn.py`` repeats the ``2·Hkv``
half-heads instead, which pairs other halves when ``Hq != Hkv``). An odd ``D`` is not a
Differential Transformer head; it is accepted (the registry's property tests draw any
``D``) with the first map taking ``ceil(D/2)`` channels, and at ``D = 1`` the second
map has none: its logits are 0 (a uniform average over the kept keys).

:math:`\lambda` is a number or one per query head; the paper's re-parametrisation
:math:`\lambda = e^{\lambda_{q1}\cdot\lambda_{k1}} - e^{\lambda_{q2}\cdot\lambda_{k2}} +
\lambda_{\text{init}}`, the per-head GroupNorm/RMSNorm and the :math:`(1 -
\lambda_{\text{init}})` factor act outside attention and are not part of it. Both maps run
on the exact engine (:func:`refattn.attention`, :func:`refattn.tiled_attention` or
:func:`refattn.sparse_attention`), with masks, causality, softcap and bias applied to
each.
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .._core.checks import check_choice
from .._core.problem import problem_from_shapes, sum_to_shape
from ..boundary.arrays import to_float64
from ..registry import attach, register
from .dense import attention, attention_probs, attention_vjp
from .tiled import tiled_attention, tiled_attention_vjp

__all__ = ["differential_attention", "differential_attention_matrix",
           "differential_attention_vjp"]

METHODS = ("tiled", "dense", "sparse")


def _halves(x):
    """``(first, second)`` halves of ``x`` along the last axis (the first takes the odd
    channel); an empty second half is one zero channel (its logits are 0)."""
    h = -(-x.shape[-1] // 2)
    second = x[..., h:]
    if second.shape[-1] == 0:
        second = np.zeros(x.shape[:-1] + (1,))
    return x[..., :h], second


def _setup(q, k, v, lam, mask, causal, scale, method, check_finite):
    """Validated float64 inputs (caller's shapes), ``λ`` per query head broadcastable to
    the output ``(Hq, 1, 1)``, its shape, the scale and the engine's keyword arguments."""
    method = check_choice("method", method, METHODS)
    q = to_float64(q, "q", check_finite=check_finite)
    k = to_float64(k, "k", check_finite=check_finite)
    v = None if v is None else to_float64(v, "v", check_finite=check_finite)
    pb = problem_from_shapes(q.shape, k.shape, None if v is None else v.shape)
    lam_arr = to_float64(lam, "lam")
    if lam_arr.shape not in ((), (pb.heads_q,)):
        raise ValueError(f"lam must be a number or one per query head, shape (Hq,) = "
                         f"({pb.heads_q},); got shape {lam_arr.shape}")
    if scale is None:
        scale = float(np.sqrt(2.0 / pb.d))            # 1/sqrt(d), d = D/2 per map
    if method == "sparse" and mask is None and not causal:
        raise ValueError("differential_attention(method='sparse') runs "
                         "refattn.sparse_attention, which needs mask= or causal=True "
                         "(without one, use method='tiled')")
    return q, k, v, lam_arr, np.reshape(lam_arr, (-1, 1, 1)), scale, method


def _run(method, q, k, v, mask, causal, kwargs, tiles, memory_budget):
    """One softmax map on the engine ``method`` selects."""
    if method == "dense":
        return attention(q, k, v, mask=mask, causal=causal, memory_budget=memory_budget,
                         **kwargs)
    if method == "tiled":
        return tiled_attention(q, k, v, mask=mask, causal=causal, **kwargs, **tiles)
    from ..sparse.engine import sparse_attention
    if mask is None:
        mask, causal = masks.causal(), False
    return sparse_attention(q, k, v, mask, causal=causal, **kwargs, **tiles)


@register(family="exact", exact=False, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True,
          row_stochastic=False, example={"lam": 0.6})
def differential_attention(q, k, v, *, lam, mask=None, causal=False, scale=None,
                           bias=None, softcap=None, method="tiled", block_q=None,
                           block_k=None, workers=None, check_finite=True,
                           memory_budget=None):
    """Differential attention (module docstring for the equation and head layout).

    q : ``(..., Hq, N, 2d)``, both maps' queries, split in halves along the last axis.
    k : ``(..., Hkv, M, 2d)``, both maps' keys, likewise; v : ``(..., Hkv, M, Dv)``.
    lam : ``λ``, a number or one per query head ``(Hq,)``.
    mask, causal, bias, softcap : as :func:`refattn.attention`, applied to both maps.
    scale : default ``1/sqrt(d)`` with ``d = D/2`` (the paper's).
    method : ``"tiled"`` (default, O(block) memory), ``"dense"`` (checks
        ``memory_budget``) or ``"sparse"`` (:func:`refattn.sparse_attention`, needs
        ``mask`` or ``causal``); ``block_q``, ``block_k``, ``workers`` go to the tiled
        and sparse engines.

    Returns float64 ``(..., Hq, N, Dv)``: rows of the implied matrix sum to ``1 - λ``.

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact import differential_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 8))          # 2 heads, D = 2d = 8
    >>> out = differential_attention(q, k, v, lam=0.8, causal=True)
    >>> a1 = ra.attention(q[..., :4], k[..., :4], v, causal=True, scale=0.5)
    >>> a2 = ra.attention(q[..., 4:], k[..., 4:], v, causal=True, scale=0.5)
    >>> bool(np.allclose(out, a1 - 0.8 * a2))
    True
    """
    q, k, v, _, lam_b, scale, method = _setup(q, k, v, lam, mask, causal, scale, method,
                                              check_finite)
    kwargs = dict(scale=scale, bias=bias, softcap=softcap, check_finite=check_finite)
    tiles = dict(block_q=block_q, block_k=block_k, workers=workers)
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    first = _run(method, q1, k1, v, mask, causal, kwargs, tiles, memory_budget)
    return first - lam_b * _run(method, q2, k2, v, mask, causal, kwargs, tiles,
                                memory_budget)


def differential_attention_matrix(q, k, *, lam, mask=None, causal=False, scale=None,
                                  bias=None, softcap=None, method=None, block_q=None,
                                  block_k=None, workers=None, check_finite=True,
                                  memory_budget=None):
    """The matrix ``P_1 - λ P_2`` ``(..., Hq, N, M)`` of :func:`differential_attention`
    (not row-stochastic: rows sum to ``1 - λ``, or 0 where no key is kept)."""
    q, k, _, _, lam_b, scale, _ = _setup(q, k, None, lam, mask, causal, scale, "dense",
                                         check_finite)
    kwargs = dict(mask=mask, causal=causal, scale=scale, bias=bias, softcap=softcap,
                  check_finite=check_finite, memory_budget=memory_budget)
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    return (attention_probs(q1, k1, **kwargs)
            - lam_b * attention_probs(q2, k2, **kwargs))


def differential_attention_vjp(q, k, v, grad_out, *, lam, mask=None, causal=False,
                               scale=None, bias=None, softcap=None, method="tiled",
                               block_q=None, block_k=None, workers=None, check_finite=True,
                               memory_budget=None):
    r"""Gradients of :func:`differential_attention`: ``{"q", "k", "v", "lam"}`` (and
    ``"bias"``), each in its input's shape.

    With :math:`O = O_1 - \lambda O_2` and ``dO`` (``grad_out``): the first map's VJP
    for ``dO``, the second's for :math:`-\lambda\, dO` (each the exact engine's:
    :func:`refattn.exact.dense.attention_vjp` or FlashAttention-2's tiled backward),
    ``dq``, ``dk`` their halves side by side, :math:`dV = dV_1 + dV_2`, and
    :math:`d\lambda_h = -\sum dO_h \circ O_{2,h}` (over batch, rows and ``Dv``; over the
    heads too for a scalar ``λ``).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 8))
    >>> g = ra.vjp("differential_attention", q, k, v, np.ones((2, 5, 8)), lam=0.5)
    >>> sorted(g), g["q"].shape, g["lam"].shape
    (['k', 'lam', 'q', 'v'], (2, 5, 8), ())
    """
    q, k, v, lam_arr, lam_b, scale, method = _setup(q, k, v, lam, mask, causal, scale,
                                                    method, check_finite)
    do = to_float64(grad_out, "grad_out", check_finite=check_finite)
    kwargs = dict(scale=scale, bias=bias, softcap=softcap, check_finite=check_finite)
    tiles = dict(block_q=block_q, block_k=block_k, workers=workers)
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    o2 = _run(method, q2, k2, v, mask, causal, kwargs, tiles, memory_budget)
    if do.shape != o2.shape:
        raise ValueError(f"grad_out must have the output's shape {o2.shape}, got "
                         f"{do.shape}")
    grads = [_vjp(method, qi, ki, v, g, mask, causal, kwargs, tiles, memory_budget)
             for qi, ki, g in ((q1, k1, do), (q2, k2, -lam_b * do))]
    out = {name: np.concatenate([grads[0][name], grads[1][name]], -1)[..., :x.shape[-1]]
           for name, x in (("q", q), ("k", k))}          # (a padded empty half dropped)
    out["v"] = grads[0]["v"] + grads[1]["v"]
    if "bias" in grads[0]:
        out["bias"] = grads[0]["bias"] + grads[1]["bias"]
    per_head = -(do * o2).sum(axis=(-2, -1)).reshape(-1, o2.shape[-3]).sum(axis=0)
    out["lam"] = sum_to_shape(per_head, lam_arr.shape)
    return out


def _vjp(method, q, k, v, grad_out, mask, causal, kwargs, tiles, memory_budget):
    """One map's VJP on the engine ``method`` selects."""
    if method == "dense":
        return attention_vjp(q, k, v, grad_out, mask=mask, causal=causal,
                             memory_budget=memory_budget, **kwargs)
    if method == "tiled":
        return tiled_attention_vjp(q, k, v, grad_out, mask=mask, causal=causal, **kwargs,
                                   **tiles)
    from ..sparse.engine import sparse_attention_vjp
    if mask is None:
        mask, causal = masks.causal(), False
    return sparse_attention_vjp(q, k, v, grad_out, mask=mask, causal=causal, **kwargs,
                                **tiles)


attach(differential_attention, implied=differential_attention_matrix,
       vjp=differential_attention_vjp)
