"""Transformer-XL (Dai et al. 2019): segment-level recurrence, each query attending
causally within its segment and to a cache of the ``mem_len`` tokens before it. Holds the
mask (:func:`transformer_xl_mask`), the forward, its implied matrix and the streaming
form; the recurrence itself is shared with the Compressive Transformer (``_common``).
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .._core.problem import problem_from_shapes
from ..exact.dense import attention_probs
from ..registry import attach, register
from ..sparse.engine import sparse_attention_vjp
from ._common import (SegmentMemoryState, _segment_attention, _segment_init,
                      _segment_params, _segment_step)

__all__ = ["transformer_xl_mask", "transformer_xl_attention",
           "transformer_xl_attention_matrix", "transformer_xl_init_state",
           "transformer_xl_step"]


def transformer_xl_mask(segment_len: int, mem_len: int) -> masks.Mask:
    """The mask of :func:`transformer_xl_attention`: keep key ``j`` for query position
    ``i'`` iff ``seg_start(i') - mem_len <= j <= i'``, with
    ``seg_start(i') = (i' // segment_len) * segment_len``.

    Built analytically from :mod:`refattn.masks` primitives (so tiles classify in
    ``O(tiles)`` and :func:`refattn.sparse_attention` can skip empty ones): with
    ``mem_len = r·S + t`` (``0 <= t < S``),
    ``causal() & block_window(r + 1, S) & (block_window(r, S) | fixed(S, t))`` — the
    query's segment and the ``r`` before it, plus the last ``t`` positions of the
    segment before those (``causal() & block_window(r, S)`` when ``t = 0``).

    >>> from refattn.memory import transformer_xl_mask
    >>> transformer_xl_mask(3, 2).materialize(7, 7).astype(int)
    array([[1, 0, 0, 0, 0, 0, 0],
           [1, 1, 0, 0, 0, 0, 0],
           [1, 1, 1, 0, 0, 0, 0],
           [0, 1, 1, 1, 0, 0, 0],
           [0, 1, 1, 1, 1, 0, 0],
           [0, 1, 1, 1, 1, 1, 0],
           [0, 0, 0, 0, 1, 1, 1]])
    """
    segment_len, mem_len = _segment_params(segment_len, mem_len)
    r, t = divmod(mem_len, segment_len)
    inner = masks.causal() & masks.block_window(r, segment_len)
    if t:
        inner = masks.causal() & masks.block_window(r + 1, segment_len) & (
            masks.block_window(r, segment_len) | masks.fixed(segment_len, t))
    return inner.renamed(f"transformer_xl_mask(segment_len={segment_len}, "
                         f"mem_len={mem_len})")


@register(family="memory", exact=False, time="O(N·(S + mem_len)·D)",
          state="O((S + mem_len)·D) rolling KV cache", supports_causal=True,
          supports_mask=True, supports_gqa=True, position_free=False,
          row_stochastic=True, self_attention_only=False, constant_state=True,
          mask=transformer_xl_mask,
          example={"segment_len": 3, "mem_len": 2},
          budget=lambda n, b: {"segment_len": max(1, b // 2), "mem_len": b // 2})
def transformer_xl_attention(q, k, v, *, segment_len, mem_len, mask=None, causal=False,
                             scale=None, bias=None, softcap=None, return_lse=False,
                             check_finite=True):
    r"""Transformer-XL segment-recurrent attention (Dai et al. 2019).

    The key positions are cut into segments of ``S = segment_len``. For segment
    ``[s0, s0 + S)`` the cache holds the keys/values of the ``mem_len`` positions before
    it, ``[max(0, s0 - mem_len), s0)``; each query of the segment attends causally to
    its own segment and to the whole cache:

    .. math:: o_i = \sum_{j \in W(i)} \operatorname{softmax}_{W(i)}(s_i)_j \, v_j,
              \qquad W(i) = \{ j : s_0(i') - \text{mem\_len} \le j \le i' \},

    i.e. exact attention under :func:`transformer_xl_mask`. The computation here is the
    recurrent one: per segment, the logits against ``[cache; segment]`` only, time
    ``O(N·(S + mem_len)·D)``.

    Parameters
    ----------
    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)``.
        ``N != M``: the queries are the last ``N`` positions (bottom-right alignment).
    segment_len : int >= 1, tokens per segment (segments by absolute key position).
    mem_len : int >= 0, cached tokens before each segment (0: segments attend only to
        themselves; ``>= M``: causal attention).
    mask : an extra mask, combined with the Transformer-XL mask by ``&``.
    causal : accepted for uniformity; the mechanism is causal already, so ``True``
        changes nothing.
    scale, softcap, check_finite : as :func:`refattn.attention`.
    bias : additive array broadcastable to ``(..., Hq, N, M)`` or a score modifier,
        evaluated at the full-sequence indices: the place for the layer's relative
        position terms (Transformer-XL's relative encoding is part of the layer and is
        not built in).
    return_lse : also return the log-sum-exp ``(..., Hq, N)``.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse). Rows at negative positions (``N > M``)
    or with every key masked give 0 (lse ``-inf``).

    The cache holds keys/values; in the model it holds the previous layer's hidden
    states (see :mod:`refattn.memory`).

    >>> import numpy as np, refattn as ra
    >>> from refattn.memory import transformer_xl_attention
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 1, 9, 4))
    >>> out = transformer_xl_attention(q, k, v, segment_len=3, mem_len=3)
    >>> # query 7 is in segment [6, 9): it sees the cache [3, 6) and keys 6, 7
    >>> bool(np.allclose(out[0, 7], ra.attention(q[:, 7:8], k[:, 3:8], v[:, 3:8])[0, 0]))
    True
    """
    out, lse = _segment_attention(q, k, v, segment_len=segment_len, mem_len=mem_len,
                                  cmem_len=0, rate=1, compress="mean", mask=mask,
                                  causal=causal, scale=scale, bias=bias, softcap=softcap,
                                  check_finite=check_finite)
    return (out, lse) if return_lse else out


def transformer_xl_attention_matrix(q, k, *, segment_len, mem_len, mask=None,
                                    causal=False, scale=None, bias=None, softcap=None,
                                    check_finite=True, memory_budget=None):
    """The implied ``(..., Hq, N, M)`` matrix of :func:`transformer_xl_attention`:
    ``refattn.attention_probs`` under :func:`transformer_xl_mask` (``& mask``). Rows
    are nonnegative and sum to 1 (0 for rows that keep no key).

    >>> import numpy as np
    >>> from refattn.memory import transformer_xl_attention_matrix
    >>> q = k = np.zeros((1, 5, 2))                    # equal logits: uniform rows
    >>> transformer_xl_attention_matrix(q, k, segment_len=2, mem_len=1)[0, 3]
    array([0.        , 0.33333333, 0.33333333, 0.33333333, 0.        ])
    """
    xl = transformer_xl_mask(segment_len, mem_len)
    if mask is not None:
        xl = xl & masks.as_mask(mask, np.broadcast_shapes(np.shape(q)[:-3],
                                                            np.shape(k)[:-3]))
    return attention_probs(q, k, mask=xl, causal=causal, scale=scale, bias=bias,
                           softcap=softcap, check_finite=check_finite,
                           memory_budget=memory_budget)


def transformer_xl_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, segment_len,
                              mem_len, scale=None, softcap=None,
                              memory_budget=None) -> SegmentMemoryState:
    """Streaming state of :func:`transformer_xl_attention`: a ring buffer of the last
    ``mem_len + segment_len`` keys and values (:class:`SegmentMemoryState`), constant
    in size. Stepping equals the parallel form (segment boundaries by absolute
    position); ``bias``/``mask`` are not available in streaming. A state larger than
    ``memory_budget`` (bytes, default 8 GiB) raises :class:`refattn.MemoryBudgetError`
    naming its sizes before anything is allocated.

    >>> import numpy as np
    >>> from refattn.memory import (transformer_xl_attention, transformer_xl_init_state,
    ...                             transformer_xl_step)
    >>> q, k, v = np.random.default_rng(3).standard_normal((3, 2, 7, 4))
    >>> state = transformer_xl_init_state(heads_q=2, heads_kv=2, d=4, dv=4,
    ...                                   segment_len=3, mem_len=2)
    >>> outs = []
    >>> for t in range(7):
    ...     out_t, state = transformer_xl_step(state, q[:, t], k[:, t], v[:, t])
    ...     outs.append(out_t)
    >>> ref = transformer_xl_attention(q, k, v, segment_len=3, mem_len=2)
    >>> bool(np.allclose(np.stack(outs, axis=-2), ref)), state.nbytes
    (True, 640)
    """
    return _segment_init(batch_shape, heads_q, heads_kv, d, dv, segment_len, mem_len, 0, 1,
                         "mean", scale, softcap, memory_budget)


def transformer_xl_step(state: SegmentMemoryState, q_t, k_t, v_t):
    """One token of :func:`transformer_xl_attention`: ``q_t (*batch, Hq, D)``,
    ``k_t (*batch, Hkv, D)``, ``v_t (*batch, Hkv, Dv)`` → ``(out_t (*batch, Hq, Dv),
    new_state)``; the old state is unchanged. The token at position ``t`` attends to
    positions ``[max(0, s0 - mem_len), t]``, ``s0 = (t // segment_len) * segment_len``.

    >>> import numpy as np
    >>> from refattn.memory import transformer_xl_init_state, transformer_xl_step
    >>> state = transformer_xl_init_state(heads_q=1, heads_kv=1, d=2, dv=1,
    ...                                   segment_len=2, mem_len=0)
    >>> for t in range(3):
    ...     out, state = transformer_xl_step(state, np.zeros((1, 2)), np.zeros((1, 2)),
    ...                                      np.full((1, 1), float(t)))
    >>> out          # token 2 starts a segment and has no memory: its own value
    array([[2.]])
    """
    return _segment_step(state, q_t, k_t, v_t)



def transformer_xl_attention_vjp(q, k, v, grad_out, *, segment_len, mem_len, grad_lse=None,
                                 mask=None, causal=False, scale=None, bias=None,
                                 softcap=None, check_finite=True):
    """Gradients of :func:`transformer_xl_attention`: exact attention under
    :func:`transformer_xl_mask` (and ``mask``), differentiated by the sparse engine's
    tiled backward (:func:`refattn.sparse.engine.sparse_attention_vjp`) over the tiles
    the segment structure leaves non-empty. The cached memory is part of ``k``, ``v``
    here, so its gradient is theirs (the model stops it: ``SG(h)`` in the paper)."""
    keep = transformer_xl_mask(segment_len, mem_len)
    if mask is not None:
        shapes = (np.shape(q), np.shape(k), np.shape(v))
        keep = keep & masks.as_mask(mask, problem_from_shapes(*shapes).batch_shape)
    return sparse_attention_vjp(q, k, v, grad_out, mask=keep, grad_lse=grad_lse,
                                causal=causal, scale=scale, bias=bias, softcap=softcap,
                                check_finite=check_finite)

attach(transformer_xl_attention, implied=transformer_xl_attention_matrix,
       init_state=transformer_xl_init_state, step=transformer_xl_step,
       vjp=transformer_xl_attention_vjp)
