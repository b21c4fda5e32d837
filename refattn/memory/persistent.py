"""Persistent memory (Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent
Memory"): ``P`` fixed key/value slots concatenated to every query's keys and values,
visible under any mask. Holds the forward and its matrix over ``[slots; sequence]``
(there is no implied ``(N, M)`` matrix over ``v`` alone).
"""
from __future__ import annotations

import numpy as np

from .._core.backward import head_summed_product, softmax_backward, softmax_block_vjp
from .._core.problem import prepare_qkv
from .._core.select import block_rows
from .._core.softmax import finish_rows, normalize_rows, softmax_rows
from ..registry import attach, register
from ._common import _memory_slots, _slot_logits, _softcap, _softcap_derivative

__all__ = ["persistent_memory_attention", "persistent_memory_attention_matrix",
           "persistent_memory_attention_vjp"]


def _persistent_blocks(q, k, v, *, mem_k, mem_v, num_slots, rng, mask, causal, scale,
                       bias, softcap, check_finite, memory_budget, what):
    """``(pb, P, blocks)``: ``blocks`` yields ``(b, hs, s, vals)`` per (batch, KV head),
    ``s`` the ``(G, N, P + M)`` logits over ``[slots; sequence]`` and ``vals`` the
    matching ``[mem_v; v]`` (``None`` without ``v``)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb, what, need_v=v is not None,
                           memory_budget=memory_budget)
    logits, q_scaled, rows, cols = _slot_logits(
        q, pb, mk, mask=mask, causal=causal, scale=scale, bias=bias, softcap=softcap,
        check_finite=check_finite, memory_budget=memory_budget, what=what)

    def blocks():
        for b, hk, hs in pb.kv_groups():
            heads = np.arange(hs.start, hs.stop)
            seq = logits.block(q_scaled[b, hs], k[b, hk], b, heads, rows, cols)
            slot = _softcap(q_scaled[b, hs] @ mk[b, hk].T, logits.softcap)
            s = np.concatenate([slot, seq], axis=-1)       # [slots; sequence]
            vals = None if v is None else np.concatenate([mv[b, hk], v[b, hk]])
            yield b, hs, s, vals
    return pb, mk.shape[-2], blocks()


@register(family="memory", exact=False, time="O(N·(M + P)·D)",
          state="O((M + P)·D) KV cache and slots", supports_causal=True,
          supports_mask=True,
          supports_gqa=True, position_free=True, row_stochastic=False,
          self_attention_only=False, example={"num_slots": 3})
def persistent_memory_attention(q, k, v, *, mem_k=None, mem_v=None, num_slots=None,
                                rng=None, mask=None, causal=False, scale=None, bias=None,
                                softcap=None, return_lse=False, check_finite=True,
                                memory_budget=None):
    r"""Attention with persistent memory slots (Sukhbaatar et al. 2019, "Augmenting
    Self-attention with Persistent Memory").

    ``P`` learned key/value vectors are concatenated to every query's keys and values
    and are always visible (under ``causal``, ``mask``, and for rows that see no
    sequence key):

    .. math:: o_i = \frac{\sum_{p<P} e^{\hat s_{ip}} m^v_p
              + \sum_{j \in S(i)} e^{s_{ij}} v_j}
              {\sum_{p<P} e^{\hat s_{ip}} + \sum_{j \in S(i)} e^{s_{ij}}}, \qquad
              \hat s_{ip} = \text{softcap}(\tfrac{1}{\sqrt D} q_i \cdot m^k_p),

    with ``s``, ``S(i)`` the logits and kept keys of :func:`refattn.attention` under
    ``mask``/``causal``/``bias``. The all-attention layer of the paper also drops the
    feed-forward sublayer; that is outside attention.

    Parameters
    ----------
    q, k, v : as :func:`refattn.attention`.
    mem_k : ``(..., Hkv, P, D)``, mem_v : ``(..., Hkv, P, Dv)``: the slots, per KV head
        (query heads of a group share them), leading dims broadcasting to the batch.
    num_slots, rng : instead of ``mem_k``/``mem_v``, draw ``P = num_slots`` standard
        normal slots with :func:`random_memory` (the registry's parameterization, valid
        for any shapes). ``rng`` is required then and ignored otherwise.
    mask, causal, bias : act on the sequence keys only (``bias`` ``(..., Hq, N, M)``).
    scale, softcap, return_lse, check_finite, memory_budget : as
        :func:`refattn.attention`; the lse is over slots and keys.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse). The result is a convex combination of
    ``[mem_v; v]``, not of ``v`` alone, so no ``(N, M)`` implied matrix exists; see
    :func:`persistent_memory_attention_matrix`.

    >>> import numpy as np, refattn as ra
    >>> from refattn.memory import persistent_memory_attention
    >>> rng = np.random.default_rng(5)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> mk, mv = rng.standard_normal((2, 2, 3, 4))        # 3 slots per head
    >>> out = persistent_memory_attention(q, k, v, mem_k=mk, mem_v=mv, causal=True)
    >>> keep = np.hstack([np.ones((6, 3), bool), np.tril(np.ones((6, 6), bool))])
    >>> ref = ra.attention(q, np.concatenate([mk, k], 1), np.concatenate([mv, v], 1),
    ...                    mask=keep)
    >>> bool(np.allclose(out, ref))
    True
    """
    pb, _, blocks = _persistent_blocks(
        q, k, v, mem_k=mem_k, mem_v=mem_v, num_slots=num_slots, rng=rng, mask=mask,
        causal=causal, scale=scale, bias=bias, softcap=softcap, check_finite=check_finite,
        memory_budget=memory_budget, what="persistent_memory_attention")
    out, lse = pb.poisoned_outputs()
    for b, hs, s, vals in blocks:
        row_max, row_sum = softmax_rows(s)
        finish_rows(s @ vals, row_max, row_sum, out[b, hs], lse[b, hs])
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


def persistent_memory_attention_matrix(q, k, *, mem_k=None, num_slots=None, rng=None,
                                       mask=None, causal=False, scale=None, bias=None,
                                       softcap=None, check_finite=True, memory_budget=None):
    """The attention matrix of :func:`persistent_memory_attention` over
    ``[slots; sequence]``: float64 ``(..., Hq, N, P + M)``, row-stochastic, with
    ``out == A @ concat([mem_v, v], axis=-2)`` (``v`` repeated over a group's query
    heads). Same arguments (``mem_v`` is not needed; with ``num_slots`` the same keys
    are drawn from ``rng``).

    >>> import numpy as np
    >>> from refattn.memory import persistent_memory_attention_matrix
    >>> q = k = np.zeros((1, 2, 2))
    >>> persistent_memory_attention_matrix(q, k, mem_k=np.zeros((1, 2, 2)), causal=True)
    array([[[0.33333333, 0.33333333, 0.33333333, 0.        ],
            [0.25      , 0.25      , 0.25      , 0.25      ]]])
    """
    pb, p, blocks = _persistent_blocks(
        q, k, None, mem_k=mem_k, mem_v=None, num_slots=num_slots, rng=rng, mask=mask,
        causal=causal, scale=scale, bias=bias, softcap=softcap, check_finite=check_finite,
        memory_budget=memory_budget, what="persistent_memory_attention_matrix")
    pb.check_matrix_memory(memory_budget, "the matrix of persistent_memory_attention_matrix",
                           "refattn.memory.persistent_memory_attention", m=pb.m + p)
    probs = np.full((pb.batch, pb.heads_q, pb.n, p + pb.m), np.nan)
    for b, hs, s, _ in blocks:
        normalize_rows(s)
        probs[b, hs] = s
    return pb.unflatten(probs)


def persistent_memory_attention_vjp(q, k, v, grad_out, *, grad_lse=None, mem_k=None,
                                    mem_v=None, num_slots=None, rng=None, mask=None,
                                    causal=False, scale=None, bias=None, softcap=None,
                                    check_finite=True, memory_budget=None):
    r"""Gradients of :func:`persistent_memory_attention`: ``{"q", "k", "v"}``, ``"bias"``
    for an array bias or a relative-position table (as
    ``refattn.vjp("attention", ...)``), and ``"mem_k"``, ``"mem_v"`` when the slots are
    given as arrays (each in its input's shape, summed over the batch dimensions it
    broadcasts over; random slots drawn with ``num_slots`` are constants and get none).

    The softmax over ``[slots; sequence]`` differentiated as in FlashAttention-2 (Dao
    2023, §3.1): with ``P = [P_m, P_s]`` the probabilities, ``O`` the output, ``dO``
    (``grad_out``, ``(..., Hq, N, Dv)``) and ``dlse`` (``grad_lse``, ``(..., Hq, N)``),

    .. math:: D_i = \textstyle\sum_d dO_{id} O_{id} - dlse_i, \quad
              dS = P \circ (dO\, [M^v; V]^\top - D) \circ \sigma', \quad
              dQ = s\, dS\, [M^k; K], \\
              dM^k = s\, dS_m^\top Q, \quad dK = s\, dS_s^\top Q, \quad
              dM^v = P_m^\top dO, \quad dV = P_s^\top dO,

    ``σ' = 1 - tanh²(x / softcap)`` (1 without a softcap); a KV head's (and its slots')
    gradients sum over its query heads. The bias gradient is ``dS_s`` before ``σ'``,
    summed over its broadcast dimensions. Working memory: blocks of query rows
    (``memory_budget`` is accepted for uniformity).

    >>> import numpy as np
    >>> from refattn.memory.persistent import persistent_memory_attention_vjp
    >>> rng = np.random.default_rng(5)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> mk, mv = rng.standard_normal((2, 2, 3, 4))
    >>> g = persistent_memory_attention_vjp(q, k, v, np.ones((2, 6, 4)), mem_k=mk,
    ...                                     mem_v=mv, causal=True)
    >>> sorted(g), bool(np.allclose(g["mem_v"].sum(-2) + g["v"].sum(-2), 6.0))
    (['k', 'mem_k', 'mem_v', 'q', 'v'], True)
    """
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap,
                          check_finite=check_finite)
    pb, logits, do, dlse, param = bw.pb, bw.logits, bw.do, bw.dlse, bw.parameter
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb,
                           "persistent_memory_attention_vjp", memory_budget=memory_budget)
    q, k, v = bw.q, bw.k, bw.v
    q_scaled, cols, p = q * logits.scale, np.arange(pb.m), mk.shape[-2]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    dmk, dmv = np.zeros(mk.shape), np.zeros(mv.shape)
    for b, hk, hs, rs in pb.query_blocks(block_rows(None, pb.group, pb.n, pb.m + p)):
        heads, rows = np.arange(hs.start, hs.stop), np.arange(rs.start, rs.stop)
        qb = q_scaled[b, hs, rs]
        seq, chain = logits.block(qb, k[b, hk], b, heads, rows, cols, derivative=True)
        slot = _softcap(qb @ mk[b, hk].T, logits.softcap)
        slot_chain = _softcap_derivative(slot, logits.softcap)
        s = np.concatenate([slot, seq], axis=-1)
        normalize_rows(s)
        ds, dvals = softmax_block_vjp(s, np.concatenate([mv[b, hk], v[b, hk]]), do[b, hs, rs],
                                   None if dlse is None else dlse[b, hs, rs])
        ds_m, ds_s = ds[..., :p], ds[..., p:]
        if param is not None:
            param[1](param[0], ds_s, b, heads, rows, cols, pb.n, pb.m)
        if chain is not None:
            ds_s *= chain
        if slot_chain is not None:
            ds_m *= slot_chain
        dq[b, hs, rs] = (ds_m @ mk[b, hk] + ds_s @ k[b, hk]) * logits.scale
        dmk[b, hk] += head_summed_product(ds_m, qb)
        dk[b, hk] += head_summed_product(ds_s, qb)
        dmv[b, hk] += dvals[:p]
        dv[b, hk] += dvals[p:]
    grads = bw.gradients(dq, dk, dv)
    if num_slots is None:
        grads["mem_k"] = pb.input_gradient(dmk, np.shape(mem_k))
        grads["mem_v"] = pb.input_gradient(dmv, np.shape(mem_v))
    return grads


attach(persistent_memory_attention, vjp=persistent_memory_attention_vjp)
