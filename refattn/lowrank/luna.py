r"""Luna (Ma et al. 2021, "Luna: Linear Unified Nested Attention"), float64 reference:
a packed sequence ``P`` (``l`` rows) attends to the keys (pack), then the queries attend
to the packed context (unpack):

.. math:: \Pi = \operatorname{softmax}(s\, P K^\top),\quad
          C_K = \Pi K,\ C_V = \Pi V,\quad
          O = \operatorname{softmax}(s\, Q C_K^\top)\, C_V .

``s`` is the ``scale`` (default ``1/sqrt(D)``), every softmax over the last axis.
Non-causal (the paper's causal Luna is a different, cumulative operator) and without a
mask. The implied matrix :func:`luna_attention_matrix` ``(..., Hq, N, M)``, with
``out == A @ v``, is row-stochastic (a product of two row-stochastic matrices).

Shapes follow refattn's layout, ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``,
``v (..., Hkv, M, Dv)``, with grouped-query attention (query head ``h`` uses KV head
``h // (Hq // Hkv)``).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int, is_int, resolve_scale
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (broadcasts_to, grouped, implied_memory, segment_means, softmax,
                      ungrouped)

__all__ = ["luna_attention", "luna_attention_matrix"]


def _luna(q, k, v, *, packed, scale, check_finite):
    """Validate; return ``(pb, pi (B,Hkv,G,l,M), u (B,Hkv,G,N,l), cv, v)`` where ``pi``
    is the pack attention, ``u`` the unpack attention and ``cv = pi @ v`` (None
    without ``v``)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    seen = f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, k " \
           f"{pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
    s = resolve_scale(scale, pb.d)
    qg = grouped(q, pb)
    if is_int(packed):
        l_ = check_int("packed", packed, minimum=1, context=f" (packed length l; {seen})")
        if l_ > pb.n:
            raise ValueError(f"packed={l_} segment means of the queries need l <= "
                             f"N={pb.n}; got {seen}")
        p = segment_means(qg, l_)                           # (B, Hkv, G, l, D)
    else:
        p = to_float64(packed, "packed", check_finite=check_finite)
        if p.ndim < 2 or p.shape[-1] != pb.d or p.shape[-2] < 1:
            raise ValueError(f"packed must have shape (l, D) or (..., H, l, D) with "
                             f"D={pb.d} and l >= 1; got packed {p.shape} with {seen}")
        if p.ndim == 2:
            p = np.broadcast_to(p, (pb.batch, pb.heads_kv, pb.group) + p.shape)
        else:
            hp = p.shape[-3]
            lead = p.shape[:-3]
            if not broadcasts_to(lead, pb.batch_shape) or \
                    hp not in (1, pb.heads_kv, pb.heads_q):
                raise ValueError(f"packed {p.shape}: the head dim must be 1, "
                                 f"Hkv={pb.heads_kv} or Hq={pb.heads_q} and the leading "
                                 f"dims must broadcast to the batch dims {pb.batch_shape}; "
                                 f"got {seen}")
            p = np.broadcast_to(p, pb.batch_shape + p.shape[-3:])
            p = p.reshape((pb.batch,) + p.shape[-3:])
            if hp == pb.heads_q:
                p = p.reshape(pb.batch, pb.heads_kv, pb.group, *p.shape[-2:])
            else:          # 1 or Hkv heads: shared by the query heads of a group
                p = np.broadcast_to(p[:, :, None], (pb.batch, pb.heads_kv, pb.group)
                                    + p.shape[-2:])
    kg = k[:, :, None]                                      # (B, Hkv, 1, M, D)
    pi = softmax(s * (p @ kg.swapaxes(-1, -2)))             # (B, Hkv, G, l, M)
    ck = pi @ kg                                            # packed keys (.., l, D)
    u = softmax(s * (qg @ ck.swapaxes(-1, -2)))             # (B, Hkv, G, N, l)
    cv = None if v is None else pi @ v[:, :, None]          # packed values (.., l, Dv)
    return pb, pi, u, ck, cv, v


@register(family="lowrank", exact=False, time="O(l·(N+M)·(D+Dv))",
          state="O(l·(D+Dv)) packed keys and values per query head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=True,
          row_stochastic=True, example={"packed": 1},
          budget=lambda n, b: {"packed": b})
def luna_attention(q, k, v, *, packed, scale=None, return_packed=False,
                   check_finite=True):
    r"""Luna attention: pack the keys and values into ``l`` rows with a packed query
    sequence ``P``, then let the queries attend to the packed rows.

    .. math:: \Pi = \operatorname{softmax}(s\, P K^\top)\ (l \times M), \quad
              C_K = \Pi K,\ C_V = \Pi V, \quad
              O = \operatorname{softmax}(s\, Q C_K^\top)\, C_V

    (Ma et al. 2021, "Luna: Linear Unified Nested Attention"). In the paper
    the pack is :math:`C_P = \mathrm{Attn}(P W_q, X W_k, X W_v)` and the unpack
    :math:`\mathrm{Attn}(X W_q', C_P W_k', C_P W_v')`. This reference works on
    already-projected ``q, k, v``; it packs the key and the value projections with the
    same weights :math:`\Pi`, which is the paper's computation when the unpack's key and
    value projections equal the pack's (:math:`\Pi (X W) = (\Pi X) W`), and needs no
    parameters or ``Dv == D``. Other unpack projections: pass ``return_packed=True``
    and project ``C_K``, ``C_V`` yourself.

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    packed : the packed sequence ``P``: an array ``(l, D)`` (shared by all heads) or
        ``(..., H, l, D)`` with ``H`` in ``{1, Hkv, Hq}`` and leading dims broadcasting
        to the batch dims (with ``H = Hq`` each query head packs with its own ``P``);
        or an int ``l`` (``1 <= l <= N``), meaning ``P`` = the means of ``l`` contiguous
        segments of each query head's queries (:func:`segment_means`), a parameter-free
        stand-in for the learned ``P`` of the paper's first layer.
    scale : float, default ``1/sqrt(D)``, for both the pack and the unpack logits.
    return_packed : also return ``(C_K, C_V)``, ``(..., Hq, l, D)`` and
        ``(..., Hq, l, Dv)`` (Luna's next layer uses the packed context).
    check_finite : raise on non-finite inputs.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the packed keys and values). Linear in ``N`` and
    ``M``; the implied matrix :math:`\operatorname{softmax}(s Q C_K^\top)\,\Pi` is
    row-stochastic; permuting keys with their values changes nothing. Non-causal (the
    paper's causal Luna replaces the softmax unpack by a different, cumulative
    operator). With ``l = 1`` every query receives the pack attention of the one packed
    row.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> p = rng.standard_normal((3, 4))                       # l = 3 packed rows
    >>> ra.luna_attention(q, k, v, packed=p).shape
    (2, 6, 4)
    >>> # l = 1: the packed context
    >>> one = ra.luna_attention(q, k, v, packed=p[:1])
    >>> ctx = ra.attention(np.broadcast_to(p[:1], (2, 1, 4)), k, v)   # (2 heads, 1, 4)
    >>> bool(np.allclose(one, ctx))                             # for every query
    True
    """
    pb, _, u, ck, cv, v = _luna(q, k, v, packed=packed, scale=scale,
                                check_finite=check_finite)
    out = pb.unflatten(ungrouped(u @ cv, pb))
    if not return_packed:
        return out
    ck = np.broadcast_to(ck, cv.shape[:-1] + ck.shape[-1:])
    return out, pb.unflatten(ungrouped(np.ascontiguousarray(ck), pb)), \
        pb.unflatten(ungrouped(cv, pb))


def luna_attention_matrix(q, k, *, packed, scale=None, check_finite=True,
                          memory_budget=None):
    r"""The implied matrix :math:`A = \operatorname{softmax}(s\, Q C_K^\top)\,\Pi`
    ``(..., Hq, N, M)`` of :func:`luna_attention` (same arguments): a product of two
    row-stochastic matrices, hence row-stochastic, with ``luna_attention(q, k, v) ==
    A @ v``. Its rank is at most ``l``. ``memory_budget`` bounds the matrix.

    >>> import numpy as np, refattn as ra
    >>> q, k = np.random.default_rng(2).standard_normal((2, 1, 5, 3))
    >>> a = ra.lowrank.luna_attention_matrix(q, k, packed=2)
    >>> bool(np.allclose(a.sum(-1), 1.0)), int(np.linalg.matrix_rank(a[0]))
    (True, 2)
    """
    pb, pi, u, _, _, _ = _luna(q, k, None, packed=packed, scale=scale,
                               check_finite=check_finite)
    implied_memory(pb, memory_budget, "luna_attention")
    return pb.unflatten(ungrouped(u @ pi, pb))



attach(luna_attention, implied=luna_attention_matrix)
