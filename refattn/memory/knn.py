"""kNN-retrieval memory (Wu et al. 2022, "Memorizing Transformers"): each query
retrieves its ``topk`` best keys from an external store and attends to them and,
separately, to its causal local context; a per-head gate mixes the two. Holds the
forward and its matrix over ``[store; sequence]``.
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .._core.backward import head_summed_product, softmax_block_vjp
from .._core.checks import (check_bool, check_cotangent, check_int, resolve_scale,
                            resolve_softcap)
from .._core.problem import prepare_qkv
from .._core.select import block_rows, topk_keep
from .._core.softmax import normalize_rows
from ..boundary.arrays import to_float64
from ..exact.dense import attention_vjp
from ..registry import attach, register
from ._common import _memory_slots, _slot_logits, _softcap, _softcap_derivative

__all__ = ["knn_memory_attention", "knn_memory_attention_matrix",
           "knn_memory_attention_vjp"]


def _check_gate(gate, heads_q):
    g = to_float64(gate, "gate")
    if g.ndim > 1 or (g.ndim == 1 and g.shape[0] not in (1, heads_q)):
        raise ValueError(f"gate must be a scalar or one value per query head "
                         f"(Hq={heads_q},); got shape {g.shape}")
    if ((g < 0) | (g > 1)).any():
        raise ValueError(f"gate values must lie in [0, 1] (pass sigmoid(b_g) for the "
                         f"paper's learned gate bias b_g); got {gate!r}")
    return np.broadcast_to(g, (heads_q,))


def _local_mask(local_window, mask, pb):
    """The mask of the local attention (beside ``causal``): the window and ``mask``."""
    local = None
    if local_window is not None:
        local = masks.sliding_window(check_int("local_window", local_window, minimum=0))
    if mask is not None:
        user = masks.as_mask(mask, pb.batch_shape)
        local = user if local is None else local & user
    return local


def _knn_parts(q, k, v, *, mem_k, mem_v, num_slots, rng, topk, gate, local_window, mask,
               scale, bias, softcap, check_finite, memory_budget, what):
    """Yield ``(b, hs, p_mem, p_loc, vm, vl, gate)`` per (batch, KV head) with the
    normalized ``(G, N, S)`` retrieval and ``(G, N, M)`` local probabilities."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    topk = check_int("topk", topk, minimum=1, context=" (store keys retrieved per query)")
    g = _check_gate(gate, pb.heads_q)
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb, what, need_v=v is not None,
                           memory_budget=memory_budget)
    local = _local_mask(local_window, mask, pb)
    logits, q_scaled, rows, cols = _slot_logits(
        q, pb, mk, mask=local, causal=True, scale=scale, bias=bias, softcap=softcap,
        check_finite=check_finite, memory_budget=memory_budget, what=what)

    def parts():
        for b, hk, hs in pb.kv_groups():
            dot = q[b, hs] @ mk[b, hk].T                        # retrieval scores
            s_mem = _softcap(dot * logits.scale, logits.softcap)
            s_mem[~topk_keep(dot, topk)] = -np.inf
            s_loc = logits.block(q_scaled[b, hs], k[b, hk], b,
                                 np.arange(hs.start, hs.stop), rows, cols)
            normalize_rows(s_mem)
            normalize_rows(s_loc)
            yield (b, hs, s_mem, s_loc, None if v is None else mv[b, hk],
                   None if v is None else v[b, hk], g[hs])
    return pb, mk.shape[-2], parts()


@register(family="memory", exact=False, time="O(N·(S + M)·D)",
          state="O((S + M)·D) store and KV cache", supports_causal=True,
          supports_mask=True,
          supports_gqa=True, position_free=False, row_stochastic=False,
          self_attention_only=False,
          example={"num_slots": 5, "topk": 2, "gate": 0.5})
def knn_memory_attention(q, k, v, *, mem_k=None, mem_v=None, num_slots=None, rng=None,
                         topk, gate, local_window=None, mask=None, causal=False, scale=None,
                         bias=None, softcap=None, check_finite=True, memory_budget=None):
    r"""kNN-augmented attention (Wu et al. 2022, "Memorizing Transformers").

    Each query retrieves the ``topk`` keys of an external store with the largest dot
    product ``q_i · m^k_s`` and attends to them; separately it attends to its local
    context, causally (optionally in a window); a per-head gate mixes the two:

    .. math:: o_i = g_h \, o^{mem}_i + (1 - g_h) \, o^{loc}_i, \qquad
              o^{mem}_i = \sum_{s \in T_i} \operatorname{softmax}_{T_i}(\hat s_i)_s
              \, m^v_s, \qquad
              o^{loc}_i = \sum_{j \in L(i)} \operatorname{softmax}_{L(i)}(s_i)_j \, v_j,

    ``T_i`` the top-``k`` store entries of query ``i``, ``\hat s = \text{softcap}(q \cdot
    m^k / \sqrt D)``, ``L(i) = \{j \le i'\}`` (and ``i' - j <= local_window``), ``s`` the
    logits of :func:`refattn.attention`.

    **Retrieval** is exact (the paper uses approximate kNN) by the unscaled dot product,
    per query head (a GQA group shares its KV head's store). **Ties**: among store
    entries whose dot product equals the k-th largest, the lowest store index wins, so
    exactly ``min(topk, S)`` entries are retrieved (the rule of
    :func:`refattn.topk.topk_attention`). ``topk >= S`` retrieves the whole store.

    Parameters
    ----------
    q, k, v : as :func:`refattn.attention`.
    mem_k : ``(..., Hkv, S, D)``, mem_v : ``(..., Hkv, S, Dv)``: the store (in the paper,
        keys/values of earlier segments of the same document), leading dims broadcasting
        to the batch. ``S = 0`` gives ``o^{mem} = 0``.
    num_slots, rng : instead of the store, draw ``S = num_slots`` standard normal
        entries with :func:`random_memory` (the registry's parameterization).
    topk : int >= 1, entries retrieved per query.
    gate : the gate value ``g`` in ``[0, 1]``: a scalar or ``(Hq,)``, one per query head.
        The paper learns a scalar bias ``b_g`` per head and uses ``g = sigmoid(b_g)``:
        pass ``scipy.special.expit(b_g)``.
    local_window : None (the whole causal context) or int ``w >= 0``: keys with
        ``0 <= i' - j <= w`` (:func:`refattn.masks.sliding_window`).
    mask, bias : act on the local attention only.
    causal : accepted for uniformity; the local attention is causal already.
    scale, softcap, check_finite, memory_budget : as :func:`refattn.attention` (the
        softcap applies to retrieved logits too).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. A part with nothing to attend to (a query at a
    negative position when ``N > M``, an empty store) contributes 0.

    >>> import numpy as np, refattn as ra
    >>> from refattn.memory import knn_memory_attention
    >>> rng = np.random.default_rng(6)
    >>> q, k, v = rng.standard_normal((3, 1, 5, 4))
    >>> mk, mv = rng.standard_normal((2, 1, 20, 4))          # a store of 20 entries
    >>> out = knn_memory_attention(q, k, v, mem_k=mk, mem_v=mv, topk=20, gate=0.25)
    >>> ref = 0.25 * ra.attention(q, mk, mv) + 0.75 * ra.attention(q, k, v, causal=True)
    >>> bool(np.allclose(out, ref))
    True
    """
    pb, _, parts = _knn_parts(
        q, k, v, mem_k=mem_k, mem_v=mem_v, num_slots=num_slots, rng=rng, topk=topk,
        gate=gate, local_window=local_window, mask=mask, scale=scale, bias=bias,
        softcap=softcap, check_finite=check_finite, memory_budget=memory_budget,
        what="knn_memory_attention")
    check_bool("causal", causal)
    out, _ = pb.poisoned_outputs()
    for b, hs, p_mem, p_loc, vm, vl, g in parts:
        g = g[:, None, None]
        out[b, hs] = g * (p_mem @ vm) + (1.0 - g) * (p_loc @ vl)
    return pb.unflatten(out)


def knn_memory_attention_matrix(q, k, *, mem_k=None, num_slots=None, rng=None, topk, gate,
                                local_window=None, mask=None, causal=False, scale=None,
                                bias=None, softcap=None, check_finite=True,
                                memory_budget=None):
    """The matrix of :func:`knn_memory_attention` over ``[store; sequence]``: float64
    ``(..., Hq, N, S + M)`` = ``[g · P_mem, (1 - g) · P_local]``, with
    ``out == A @ concat([mem_v, v], axis=-2)``. Nonnegative; a row sums to
    ``g·[retrieved anything] + (1 - g)·[some local key]``. Same arguments (``mem_v`` not
    needed).

    >>> import numpy as np
    >>> from refattn.memory import knn_memory_attention_matrix
    >>> q = k = np.zeros((1, 2, 2))                 # all scores tie: store entries 0, 1
    >>> knn_memory_attention_matrix(q, k, mem_k=np.zeros((1, 3, 2)), topk=2, gate=0.5)
    array([[[0.25, 0.25, 0.  , 0.5 , 0.  ],
            [0.25, 0.25, 0.  , 0.25, 0.25]]])
    """
    pb, size, parts = _knn_parts(
        q, k, None, mem_k=mem_k, mem_v=None, num_slots=num_slots, rng=rng, topk=topk,
        gate=gate, local_window=local_window, mask=mask, scale=scale, bias=bias,
        softcap=softcap, check_finite=check_finite, memory_budget=memory_budget,
        what="knn_memory_attention_matrix")
    check_bool("causal", causal)
    pb.check_matrix_memory(memory_budget, "the matrix of knn_memory_attention_matrix",
                           "refattn.memory.knn_memory_attention", m=pb.m + size)
    probs = np.full((pb.batch, pb.heads_q, pb.n, size + pb.m), np.nan)
    for b, hs, p_mem, p_loc, _, _, g in parts:
        g = g[:, None, None]
        probs[b, hs, :, :size] = g * p_mem
        probs[b, hs, :, size:] = (1.0 - g) * p_loc
    return pb.unflatten(probs)


def knn_memory_attention_vjp(q, k, v, grad_out, *, mem_k=None, mem_v=None, num_slots=None,
                             rng=None, topk, gate, local_window=None, mask=None,
                             causal=False, scale=None, bias=None, softcap=None,
                             check_finite=True, memory_budget=None):
    r"""Gradients of :func:`knn_memory_attention`: ``{"q", "k", "v"}``, ``"bias"`` for
    an array bias or a relative-position table, and ``"mem_k"``, ``"mem_v"`` when the
    store is given as arrays (each in its input's shape; random slots drawn with
    ``num_slots`` are constants and get none). The gate ``g`` is a given number: no
    gradient.

    **The retrieval is held fixed**: the top-``k`` entries ``T_i`` are a discrete
    choice, differentiated as implementations train them. (Wu et al. do not
    backpropagate into the external memory at all; ``mem_k``/``mem_v`` gradients are
    given for stores that are learned, drop them to match the paper.) With ``dO`` the
    cotangent (``grad_out``, ``(..., Hq, N, Dv)``), the two softmaxes are
    differentiated apart:

    .. math:: dO^{mem} = g\, dO, \quad dO^{loc} = (1 - g)\, dO, \quad
              dS^{mem} = P^{mem} \circ (dO^{mem} M_v^\top - D^{mem}) \circ \sigma',
              \quad D^{mem}_i = \textstyle\sum_d dO^{mem}_{id} o^{mem}_{id}, \\
              dQ = s\, dS^{mem} M_k + dQ^{loc}, \quad dM_k = s\, dS^{mem\top} Q,
              \quad dM_v = P^{mem\top} dO^{mem},

    ``σ' = 1 - tanh²(x / softcap)``; ``dQ^{loc}``, ``dK``, ``dV`` (and the bias) are
    those of the local causal attention for ``dO^{loc}``
    (``refattn.vjp("attention", ...)``). A KV head's (and its store's) gradients sum
    over its query heads. Working memory: blocks of query rows.

    >>> import numpy as np, refattn as ra
    >>> from refattn.memory.knn import knn_memory_attention_vjp
    >>> rng = np.random.default_rng(6)
    >>> q, k, v = rng.standard_normal((3, 1, 5, 4))
    >>> mk, mv = rng.standard_normal((2, 1, 20, 4))
    >>> do = rng.standard_normal((1, 5, 4))
    >>> g = knn_memory_attention_vjp(q, k, v, do, mem_k=mk, mem_v=mv, topk=20, gate=0.25)
    >>> ref = ra.vjp("attention", q, mk, mv, 0.25 * do)      # topk = S: all the store
    >>> bool(np.allclose(g["mem_k"], ref["k"])), bool(np.allclose(g["mem_v"], ref["v"]))
    (True, True)
    """
    shapes = (np.shape(q), np.shape(k), np.shape(v))
    q_flat, _, _, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    topk = check_int("topk", topk, minimum=1, context=" (store keys retrieved per query)")
    g = _check_gate(gate, pb.heads_q)
    where = "knn_memory_attention_vjp"
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb, where,
                           memory_budget=memory_budget)
    local = _local_mask(local_window, mask, pb)
    check_bool("causal", causal)
    s, cap = resolve_scale(scale, pb.d), resolve_softcap(softcap)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                         check_finite=check_finite)
    gate_rows = g[:, None, None]
    grads = attention_vjp(q, k, v, (1.0 - gate_rows) * do, mask=local, causal=True,
                          scale=scale, bias=bias, softcap=softcap,
                          check_finite=check_finite)
    do_mem = (gate_rows * do).reshape(pb.batch, pb.heads_q, pb.n, pb.dv)
    dq = np.zeros(q_flat.shape)
    dmk, dmv = np.zeros(mk.shape), np.zeros(mv.shape)
    for b, hk, hs, rs in pb.query_blocks(block_rows(None, pb.group, pb.n, mk.shape[-2])):
        qb = q_flat[b, hs, rs]
        dot = qb @ mk[b, hk].T                                  # retrieval scores
        s_mem = _softcap(dot * s, cap)
        chain = _softcap_derivative(s_mem, cap)
        s_mem[~topk_keep(dot, topk)] = -np.inf
        normalize_rows(s_mem)
        ds, dmv_b = softmax_block_vjp(s_mem, mv[b, hk], do_mem[b, hs, rs], None)
        if chain is not None:
            ds *= chain
        dq[b, hs, rs] = (ds @ mk[b, hk]) * s
        dmk[b, hk] += head_summed_product(ds, qb) * s
        dmv[b, hk] += dmv_b
    grads["q"] = grads["q"] + pb.input_gradient(dq, shapes[0])
    if num_slots is None:
        grads["mem_k"] = pb.input_gradient(dmk, np.shape(mem_k))
        grads["mem_v"] = pb.input_gradient(dmv, np.shape(mem_v))
    return grads


attach(knn_memory_attention, vjp=knn_memory_attention_vjp)
