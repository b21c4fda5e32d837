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

from .._core.checks import check_bool, check_cotangent, check_int, is_int, resolve_scale
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (broadcasts_to, grouped, implied_memory, segment_means,
                      segment_means_vjp, softmax, softmax_vjp, ungrouped)

__all__ = ["luna_attention", "luna_attention_matrix", "luna_attention_vjp"]


def _luna(q, k, v, *, packed, scale, check_finite, parts=False):
    """Validate; return ``(pb, pi (B,Hkv,G,l,M), u (B,Hkv,G,N,l), ck, cv, v)`` where
    ``pi`` is the pack attention, ``u`` the unpack attention, ``ck = pi @ k`` and
    ``cv = pi @ v`` (None without ``v``); with ``parts`` also ``(qg, k, p, s,
    packed_gradient)``, the last mapping the gradient of ``p (B,Hkv,G,l,D)`` to that of
    ``packed`` (None when ``packed`` is an int)."""
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
        packed_gradient = None
    else:
        p = to_float64(packed, "packed", check_finite=check_finite)
        shape = p.shape

        def packed_gradient(dp):
            if len(shape) == 2:
                return dp.sum(axis=(0, 1, 2))
            if shape[-3] == pb.heads_q:
                return pb.input_gradient(ungrouped(dp, pb), shape)
            return pb.input_gradient(dp.sum(axis=2), shape)
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
    if parts:
        return pb, pi, u, ck, cv, v, (qg, k, p, s, packed_gradient)
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
    return_packed = check_bool("return_packed", return_packed)
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


def luna_attention_vjp(q, k, v, grad_out, *, packed, scale=None, return_packed=False,
                       grad_packed_keys=None, grad_packed_values=None, check_finite=True):
    r"""Gradients of :func:`luna_attention` for the cotangent ``grad_out``
    ``(..., Hq, N, Dv)`` of its output (``None``: zero) and, optionally,
    ``grad_packed_keys`` ``(..., Hq, l, D)`` and ``grad_packed_values``
    ``(..., Hq, l, Dv)`` (:math:`\overline{C_K}`, :math:`\overline{C_V}`) of the packed
    context ``C_K``, ``C_V`` it returns with ``return_packed=True`` (``None``: zero;
    ``return_packed`` is accepted and changes nothing). Same keyword arguments as the
    forward, validated alike.

    With :math:`U = \operatorname{softmax}(s\, Q C_K^\top)` (unpack),
    :math:`\Pi = \operatorname{softmax}(s\, P K^\top)` (pack),
    :math:`O = U C_V`, and for each softmax :math:`X = \operatorname{softmax}(S)` the
    logits' gradient :math:`dS_X = X \circ (dX - \operatorname{rowsum}(dX \circ X))`:

    .. math::

        dU = dO\, C_V^\top, \quad dC_V = U^\top dO + \overline{C_V}, \quad
        dQ = s\, dS_U C_K, \quad dC_K = s\, dS_U^\top Q + \overline{C_K}, \\
        d\Pi = dC_K K^\top + dC_V V^\top, \quad
        dK = \Pi^\top dC_K + s\, dS_\Pi^\top P, \quad dV = \Pi^\top dC_V, \quad
        dP = s\, dS_\Pi K

    (Ma et al. 2021). ``packed`` an int: ``P`` is the segment means of the queries, so
    each query row also receives its segment's :math:`dP` over the segment's size. GQA:
    a KV head sums over its query heads.

    Returns ``{"q", "k", "v"}``, float64, each of its input's shape, and ``"packed"``
    (its shape; broadcast dims and shared heads summed) when ``packed`` is an array.
    Working memory: the ``(l, M)`` and ``(N, l)`` attentions per query head, never
    ``N x M``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> p = rng.standard_normal((3, 4))
    >>> g = ra.vjp("luna_attention", q, k, v, np.ones((2, 6, 4)), packed=p)
    >>> sorted(g), g["packed"].shape
    (['k', 'packed', 'q', 'v'], (3, 4))
    >>> bool(np.allclose(g["v"].sum(-2), 6.0))   # O = A V with A row-stochastic
    True
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    pb, pi, u, ck, cv, v, (qg, k, p, s, packed_gradient) = _luna(
        q, k, v, packed=packed, scale=scale, check_finite=check_finite, parts=True)

    def cotangent(grad, name, last):
        g = check_cotangent(grad, name, pb.batch_shape + (pb.heads_q, last[0], last[1]),
                            check_finite=check_finite)
        return None if g is None else grouped(g.reshape((pb.batch, pb.heads_q) + last), pb)
    do = cotangent(grad_out, "grad_out", (pb.n, pb.dv))      # (B, Hkv, G, N, Dv)
    if do is None:
        do = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    l_ = pi.shape[-2]
    dck_in = cotangent(grad_packed_keys, "grad_packed_keys", (l_, pb.d))
    dcv_in = cotangent(grad_packed_values, "grad_packed_values", (l_, pb.dv))
    kg, vg = k[:, :, None], v[:, :, None]                  # (B, Hkv, 1, M, *)
    dcv = u.swapaxes(-1, -2) @ do                           # (B, Hkv, G, l, Dv)
    if dcv_in is not None:
        dcv = dcv + dcv_in
    dsu = softmax_vjp(u, do @ cv.swapaxes(-1, -2))          # (B, Hkv, G, N, l)
    dqg = s * (dsu @ ck)
    dck = s * (dsu.swapaxes(-1, -2) @ qg)                   # (B, Hkv, G, l, D)
    if dck_in is not None:
        dck = dck + dck_in
    dspi = softmax_vjp(pi, dck @ kg.swapaxes(-1, -2) + dcv @ vg.swapaxes(-1, -2))
    dk = (pi.swapaxes(-1, -2) @ dck + s * (dspi.swapaxes(-1, -2) @ p)).sum(axis=2)
    dv = (pi.swapaxes(-1, -2) @ dcv).sum(axis=2)
    dp = s * (dspi @ kg)                                    # (B, Hkv, G, l, D)
    if packed_gradient is None:
        dqg = dqg + segment_means_vjp(dp, pb.n)
    grads = {"q": pb.input_gradient(ungrouped(dqg, pb), shapes["q"]),
             "k": pb.input_gradient(dk, shapes["k"]),
             "v": pb.input_gradient(dv, shapes["v"])}
    if packed_gradient is not None:
        grads["packed"] = packed_gradient(dp)
    return grads


attach(luna_attention, implied=luna_attention_matrix, vjp=luna_attention_vjp)
