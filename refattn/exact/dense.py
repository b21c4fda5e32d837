r"""Exact softmax attention, dense: the oracle every other mechanism is measured against.

.. math::

    O = \operatorname{softmax}(S) V, \qquad
    S_{ij} = \text{mask}\big(\text{score\_mod}(\text{softcap}(\tfrac{1}{\sqrt{D}}
    q_i \cdot k_j))\big), \qquad
    \text{lse}_i = \log \textstyle\sum_j e^{S_{ij}}

(Vaswani et al. 2017). Computed in float64 with the max-subtracted softmax, one
``(G, N, M)`` block per batch element and KV head, so the working memory is that of one
head group's score matrix; beyond the memory budget use
:func:`refattn.tiled_attention`.

Learned attention sinks (``sinks=``, gpt-oss; FlashAttention 3's and FlashInfer's
``sinks``): a logit :math:`s_h` per query head joins the denominator only,

.. math::

    P_{ij} = \frac{e^{S_{ij}}}{e^{s_h} + \sum_l e^{S_{il}}}, \qquad
    \text{lse}_i = \log\big(e^{s_h} + \textstyle\sum_l e^{S_{il}}\big),

the sink having no value (gpt-oss's reference appends :math:`s_h` as one more column of
the logits, takes the softmax and drops the column). Rows then sum to less than 1, and a
row that keeps no key gives output 0 and lse :math:`s_h`.
"""
from __future__ import annotations

import numpy as np

from .._core.backward import head_summed_product, sink_gradient, softmax_backward
from .._core.checks import check_memory
from .._core.logits import make_logits
from .._core.problem import prepare_qkv
from .._core.select import block_rows
from .._core.softmax import finish_rows, merge_sinks, normalize_rows, softmax_rows
from ..registry import attach, register

__all__ = ["attention", "attention_probs", "attention_vjp"]


def _dense_blocks(q, k, v, *, mask, causal, scale, bias, softcap, check_finite,
                  memory_budget, what, sinks=None):
    """Validate, then yield ``(b, head_slice, p, v_block, row_max, row_sum)`` per
    (batch, KV head), where ``p = exp(s - rowmax)`` has shape ``(G, N, M)``; with
    ``sinks``, ``row_max`` and ``row_sum`` include the sink (``p`` rescaled to match)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite, sinks=sinks)
    check_memory(pb.group * pb.n * pb.m * 17.0, memory_budget, what,
                 "refattn.tiled_attention(q, k, v, ...)")
    q_scaled = q * logits.scale
    rows, cols = np.arange(pb.n), np.arange(pb.m)

    def blocks():
        for b, hk, hs in pb.kv_groups():
            heads = np.arange(hs.start, hs.stop)
            s = logits.block(q_scaled[b, hs], k[b, hk], b, heads, rows, cols)
            row_max, row_sum = softmax_rows(s)
            if logits.sinks is not None:
                row_max, row_sum = merge_sinks(s, row_max, row_sum, logits.sinks[hs, None])
            yield b, hs, s, (None if v is None else v[b, hk]), row_max, row_sum
            del s   # one (G, N, M) block alive at a time
    return pb, blocks()


@register(family="exact", exact=True, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True)
def attention(q, k, v, *, mask=None, causal=False, scale=None, bias=None, softcap=None,
              sinks=None, return_lse=False, check_finite=True, memory_budget=None):
    """Exact softmax attention (dense reference).

    Parameters
    ----------
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, M, D)``; ``Hq`` a multiple of ``Hkv`` (GQA/MQA: query head
        ``h`` uses KV head ``h // (Hq // Hkv)``)
    v : array ``(..., Hkv, M, Dv)``
    mask : :mod:`refattn.masks` mask, ``mask_mod(b, h, q_idx, kv_idx)`` function, or
        boolean array broadcastable to ``(..., Hq, N, M)``; ``True`` keeps a key.
    causal : bool, ``causal() & mask``; bottom-right aligned when ``N != M``.
    scale : float, default ``1/sqrt(D)``.
    bias : additive array broadcastable to ``(..., Hq, N, M)`` or a score modifier
        ``score_mod(score, b, h, q_idx, kv_idx)`` (:mod:`refattn.scores`).
    softcap : float, logits become ``softcap * tanh(s / softcap)`` before ``bias``.
    sinks : array ``(Hq,)``, learned sink logits in the softmax denominator (gpt-oss;
        module docstring); ``-inf`` for a head without one.
    return_lse : also return the log-sum-exp ``(..., Hq, N)`` of the logits (and sinks).
    check_finite : raise on non-finite ``q``, ``k``, ``v`` (default).
    memory_budget : bytes of working memory allowed (default
        ``refattn.DEFAULT_MEMORY_BUDGET``); larger requests raise
        :class:`refattn.MemoryBudgetError` before allocating.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``, and ``(..., Hq, N)`` lse if ``return_lse``. Rows whose
    keys are all masked give output 0 and lse ``-inf``.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 8))   # 2 heads, 5 tokens, D = 8
    >>> out, lse = ra.attention(q, k, v, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((2, 5, 8), (2, 5))
    >>> bool(np.allclose(out[:, 0], v[:, 0]))    # the first query sees only key 0
    True
    >>> _, lse = ra.attention(q, k, v, causal=True, sinks=np.zeros(2), return_lse=True)
    >>> p = ra.attention_probs(q, k, causal=True, sinks=np.zeros(2))  # sink logits 0
    >>> bool(np.allclose(p.sum(-1) + np.exp(0.0 - lse), 1.0))  # the sink takes e^(s - lse)
    True
    """
    pb, blocks = _dense_blocks(q, k, v, mask=mask, causal=causal, scale=scale, bias=bias,
                               softcap=softcap, check_finite=check_finite,
                               memory_budget=memory_budget, what="dense attention",
                               sinks=sinks)
    out, lse = pb.poisoned_outputs()
    for b, hs, p, vb, row_max, row_sum in blocks:
        finish_rows(p @ vb, row_max, row_sum, out[b, hs], lse[b, hs])
        del p
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


def attention_probs(q, k, *, mask=None, causal=False, scale=None, bias=None, softcap=None,
                    sinks=None, check_finite=True, memory_budget=None):
    """The attention matrix ``P = softmax(S)`` of :func:`attention`, float64
    ``(..., Hq, N, M)``; rows that keep no key are 0 (with ``sinks``, rows sum to
    ``1 - P_sink``). Same arguments as :func:`attention`.

    >>> import numpy as np, refattn as ra
    >>> q = k = np.eye(3)[None]            # one head, orthogonal queries and keys
    >>> ra.attention_probs(q, k, scale=100.0, causal=True).round(3)
    array([[[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]]])
    """
    pb, blocks = _dense_blocks(q, k, None, mask=mask, causal=causal, scale=scale, bias=bias,
                               softcap=softcap, check_finite=check_finite,
                               memory_budget=memory_budget, what="attention_probs",
                               sinks=sinks)
    pb.check_matrix_memory(memory_budget, "the attention matrix of attention_probs",
                           "refattn.tiled_attention")
    probs = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    for b, hs, p, _, _, row_sum in blocks:
        empty = row_sum == 0
        p[empty] = 0.0
        np.divide(p, row_sum[..., None], out=p, where=~empty[..., None])
        probs[b, hs] = p
        del p
    return pb.unflatten(probs)



def attention_vjp(q, k, v, grad_out, *, grad_lse=None, mask=None, causal=False, scale=None,
                  bias=None, softcap=None, sinks=None, check_finite=True,
                  memory_budget=None):
    r"""Gradients of :func:`attention` (dense reference): ``{"q", "k", "v"}``,
    ``"bias"`` for an array bias (its shape) or a relative-position table (the table's),
    and ``"sinks"`` ``(Hq,)`` with sink logits.

    With ``P = softmax(S)``, ``O = P V``, ``lse = logsumexp(S)`` and cotangents ``dO``
    (``grad_out``, ``(..., Hq, N, Dv)``) and ``dlse`` (``grad_lse``, ``(..., Hq, N)``):

    .. math::

        dV = P^\top dO, \quad dP = dO\, V^\top, \quad
        D_i = \textstyle\sum_d dO_{id} O_{id} - dlse_i, \quad
        dS = P \circ (dP - D), \\
        dX = dS \circ \tfrac{\partial S}{\partial X}, \quad
        dQ = \text{scale}\; dX\, K, \quad dK = \text{scale}\; dX^\top Q,

    where ``X = scale · QKᵀ`` and ``∂S/∂X`` is ``1 - tanh²(X / softcap)`` times the score
    modifier's derivative (FlashAttention-2's backward, Dao 2023, §3.1, without tiling).
    An additive bias gets ``dS`` summed over its broadcast dimensions; ALiBi and relative
    tables pass ``dS`` through; a user ``score_mod`` needs its ``derivative``
    (:func:`refattn.scores.from_function`). GQA: a KV head sums over its query heads.
    Sinks: ``P`` and ``lse`` include them and the equations above are unchanged;
    ``dsinks_h = -Σ_i P_sink,i D_i`` with ``P_sink,i = exp(s_h - lse_i)``, summed over
    the batch and the rows of head ``h``.
    Masked pairs and fully masked rows get zero gradients. Working memory: a few
    ``(G, r, M)`` blocks of query rows (``memory_budget`` is accepted for uniformity).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 4, 8))
    >>> g = ra.vjp("attention", q, k, v, np.ones((2, 4, 8)))
    >>> bool(np.allclose(g["v"].sum(-2), 4.0))      # each row of P sums to 1
    True
    """
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                          check_finite=check_finite)
    return dense_backward(bw)


def dense_backward(bw, *, select=None, block_q=None, rounding=None) -> dict:
    """The loop of :func:`attention_vjp` on a validated call ``bw``
    (``refattn._core.backward.softmax_backward``), one ``(G, block_q, M)`` block of
    query rows at a time (about ``BLOCK_ELEMENTS`` logits when ``block_q`` is None).

    ``select(s)``, when given, is the boolean ``(G, r, M)`` keep of a block of logits
    (top-k attention's selection, held fixed: the gradient of the softmax over the kept
    keys). ``rounding(x)``, when given, rounds what a low-precision kernel holds in its
    element type: ``O`` and ``P`` before ``D`` and ``dV = PᵀdO``, ``dS`` before ``dQ``
    and ``dK``, and the gradients (the baseline of
    :func:`refattn.testing.low_precision_attention_vjp`).
    """
    keep = rounding or (lambda x: x)
    q, k, v, do, dlse, pb, logits, param = (bw.q, bw.k, bw.v, bw.do, bw.dlse, bw.pb,
                                            bw.logits, bw.parameter)
    q_scaled = q * logits.scale
    cols = np.arange(pb.m)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    sinks = logits.sinks
    dsinks = None if sinks is None else np.zeros(pb.heads_q)
    for b, hk, hs, rs in pb.query_blocks(block_rows(block_q, pb.group, pb.n, pb.m)):
        heads, rows = np.arange(hs.start, hs.stop), np.arange(rs.start, rs.stop)
        p, chain = logits.block(q_scaled[b, hs, rs], k[b, hk], b, heads, rows, cols,
                                derivative=True)
        if select is not None:
            p[~select(p)] = -np.inf
        lse = normalize_rows(p, None if sinks is None else sinks[hs, None])
        dob = do[b, hs, rs]
        dv[b, hk] += head_summed_product(keep(p), dob)
        delta = np.einsum("gnd,gnd->gn", dob, keep(p @ v[b, hk]))
        if dlse is not None:
            delta -= dlse[b, hs, rs]
        if sinks is not None:
            dsinks[hs] += sink_gradient(sinks[hs], lse, delta)
        ds = dob @ v[b, hk].T                                  # dP, then dS in place
        ds -= delta[..., None]
        ds *= p
        del p
        if param is not None:
            param[1](param[0], ds, b, heads, rows, cols, pb.n, pb.m)
        if chain is not None:
            ds *= chain
        ds = keep(ds)
        dq[b, hs, rs] = (ds @ k[b, hk]) * logits.scale
        dk[b, hk] += head_summed_product(ds, q_scaled[b, hs, rs])
    return bw.gradients(*(keep(x) for x in (dq, dk, dv)), dsinks)


attach(attention, implied=attention_probs, vjp=attention_vjp)
