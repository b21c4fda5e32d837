r"""Top-k attention: every query keeps only its ``k`` highest-scoring keys.

.. math::

    T_i = \operatorname{top}_k \{ j : s_{ij} > -\infty \}, \qquad
    o_i = \sum_{j \in T_i} \frac{e^{s_{ij}}}{\sum_{l \in T_i} e^{s_{il}}} \, v_j, \qquad
    \text{lse}_i = \log \sum_{j \in T_i} e^{s_{ij}},

where ``s`` are the logits of :func:`refattn.attention` (scale, softcap, bias, then the
mask and causality), so a masked key is never selected. A query with fewer than ``k``
allowed keys keeps all of them; with ``k >= M`` the result is exact attention.
(Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"; the same
selection is the explicit sparse attention of Zhao et al. 2019 and the k-NN attention
of Wang et al. 2022, "KVT".)

**Ties.** Among keys whose logit equals the k-th largest logit of the row, those with the
lowest key index are kept, so exactly ``min(k, #allowed keys)`` keys are kept and the
result is deterministic. Without exact ties the selection does not depend on the order
of the keys.

**Memory.** Queries are processed in blocks of ``block_q`` rows: the logits of a block
against all ``M`` keys (``G x block_q x M`` for the ``G`` query heads sharing a KV head)
are formed with the shared logit pipeline, the k-th largest logit of each row found with
a partial sort (``np.partition``, O(M) per row), and the softmax taken over the kept
keys. Working memory is O(block_q · M), never O(N · M), except for
:func:`topk_attention_matrix`, whose result is the ``N x M`` matrix.
"""
from __future__ import annotations

import numpy as np

from .._core.backward import softmax_backward
from .._core.checks import check_int
from .._core.problem import prepare_qkv
from .._core.select import BLOCK_ELEMENTS, topk_keep
from .._core.softmax import normalize_rows
from ..exact.dense import dense_backward
from ..registry import attach, register
from ._common import logit_blocks

__all__ = ["topk_attention", "topk_attention_matrix", "BLOCK_ELEMENTS"]


def _topk_blocks(q, k, v, *, topk, mask, causal, scale, bias, softcap, check_finite,
                 block_q):
    """Validate, then yield ``(b, hk, head_slice, row_slice, p, lse)`` per query block,
    with ``p`` the ``(G, r, M)`` top-k probabilities."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    topk = check_int("topk", topk, minimum=1,
                      context=f" (keys kept per query; k has M={pb.m} keys)")
    logits, rows_per_block, q_scaled = logit_blocks(
        q, pb, block_q, pb.group, mask=mask, causal=causal, scale=scale, bias=bias,
        softcap=softcap, check_finite=check_finite)
    cols = np.arange(pb.m)

    def blocks():
        for b, hk, hs, rs in pb.query_blocks(rows_per_block):
            s = logits.block(q_scaled[b, hs, rs], k[b, hk], b, np.arange(hs.start, hs.stop),
                             np.arange(rs.start, rs.stop), cols)
            s[~topk_keep(s, topk)] = -np.inf
            lse = normalize_rows(s)
            yield b, hk, hs, rs, s, lse
    return pb, v, blocks()


@register(family="sparse", exact=False, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True, position_free=True,
          example={"topk": 3},
          budget=lambda n, b: {"topk": b})
def topk_attention(q, k, v, *, topk, mask=None, causal=False, scale=None, bias=None,
                   softcap=None, return_lse=False, check_finite=True, block_q=None):
    r"""Top-k attention: softmax over each query's ``topk`` highest-scoring keys.

    .. math:: o_i = \sum_{j \in T_i} \operatorname{softmax}_{T_i}(s_i)_j \, v_j, \qquad
              T_i = \operatorname{top}_k\{j : s_{ij} > -\infty\}

    (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention").

    Parameters
    ----------
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, M, D)``; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h``
        uses KV head ``h // (Hq // Hkv)``; each query head selects its own keys).
    v : array ``(..., Hkv, M, Dv)``
    topk : int >= 1, keys kept per query. Queries with fewer allowed keys keep all of
        them; ``topk >= M`` gives exact attention. Ties at the k-th largest logit are
        broken in favour of the lower key index, so exactly ``min(topk, allowed)`` keys
        are kept.
    mask, causal, scale, bias, softcap, check_finite : as :func:`refattn.attention`;
        selection happens after all of them (a masked key is never selected).
    return_lse : also return ``lse_i = log sum_{j in T_i} exp(s_ij)``, ``(..., Hq, N)``.
    block_q : query rows per block (default: about ``BLOCK_ELEMENTS / (G * M)``);
        working memory is O(G · block_q · M).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse). Rows with no allowed key give 0 and lse
    ``-inf``.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 8))          # 2 heads, 6 tokens
    >>> ra.topk_attention(q, k, v, topk=2, causal=True).shape
    (2, 6, 8)
    >>> bool(np.allclose(ra.topk_attention(q, k, v, topk=6), ra.attention(q, k, v)))
    True
    >>> best = (q @ k.swapaxes(-1, -2)).argmax(-1)            # topk=1: the best key's value
    >>> best_v = v[np.arange(2)[:, None], best]
    >>> bool(np.allclose(ra.topk_attention(q, k, v, topk=1), best_v))
    True
    """
    pb, v, blocks = _topk_blocks(q, k, v, topk=topk, mask=mask, causal=causal, scale=scale,
                                 bias=bias, softcap=softcap, check_finite=check_finite,
                                 block_q=block_q)
    return pb.outputs_from_blocks(v, blocks, return_lse)


def topk_attention_matrix(q, k, *, topk, mask=None, causal=False, scale=None, bias=None,
                          softcap=None, check_finite=True, block_q=None,
                          memory_budget=None):
    """The implied attention matrix ``A`` of :func:`topk_attention`, float64
    ``(..., Hq, N, M)``: ``A_ij = softmax_{T_i}(s_i)_j`` for the kept keys ``j in T_i``
    and 0 elsewhere, so that ``topk_attention(q, k, v) == A @ v`` (with ``v`` repeated
    over the query heads of a group). Same arguments as :func:`topk_attention`;
    ``memory_budget`` bounds the matrix (:class:`refattn.MemoryBudgetError` beyond it).

    >>> import numpy as np, refattn as ra
    >>> q = k = np.zeros((1, 3, 4))                  # all logits tie: lowest indices win
    >>> ra.sparse.topk_attention_matrix(q, k, topk=2)
    array([[[0.5, 0.5, 0. ],
            [0.5, 0.5, 0. ],
            [0.5, 0.5, 0. ]]])
    """
    pb, _, blocks = _topk_blocks(q, k, None, topk=topk, mask=mask, causal=causal,
                                 scale=scale, bias=bias, softcap=softcap,
                                 check_finite=check_finite, block_q=block_q)
    return pb.matrix_from_blocks(blocks, memory_budget,
                                 "the attention matrix of topk_attention_matrix",
                                 "refattn.topk.topk_attention")



def topk_attention_vjp(q, k, v, grad_out, *, topk, grad_lse=None, mask=None, causal=False,
                       scale=None, bias=None, softcap=None, check_finite=True, block_q=None):
    """Gradients of :func:`topk_attention` with the selection held fixed, as
    implementations train it: the gradient of the softmax over each query's kept keys
    ``T_i`` (:func:`refattn.exact.dense.attention_vjp`'s equations with ``P`` zero
    outside ``T_i``); keys outside ``T_i`` get nothing from query ``i``. One
    ``(G, block_q, M)`` block of rows at a time, as the forward.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = ra.vjp("topk_attention", q, k, v, np.ones((1, 6, 4)), topk=6)
    >>> bool(np.allclose(g["q"], ra.vjp("attention", q, k, v, np.ones((1, 6, 4)))["q"]))
    True
    """
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap, check_finite=check_finite)
    topk = check_int("topk", topk, minimum=1,
                     context=f" (keys kept per query; k has M={bw.pb.m} keys)")
    return dense_backward(bw, select=lambda s: topk_keep(s, topk), block_q=block_q)

attach(topk_attention, implied=topk_attention_matrix, vjp=topk_attention_vjp)
