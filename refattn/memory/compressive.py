"""The Compressive Transformer (Rae et al. 2020): Transformer-XL's segment recurrence
with a second memory, into which the tokens leaving the memory are compressed at rate
``c`` (mean or max pooling, or a 1-D convolution). Holds :func:`compress_memory`, the
forward, its implied matrix and the streaming form; the recurrence and the compression
kernels are shared with Transformer-XL (``_common``).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (SegmentMemoryState, _compress, _resolve_compress, _segment_attention,
                      _segment_init, _segment_step)

__all__ = ["compress_memory", "compressive_attention", "compressive_attention_matrix",
           "compressive_init_state", "compressive_step"]


def compress_memory(x, rate, compress="mean"):
    r"""Compress a memory of ``L`` tokens into ``L // rate`` slots (Rae et al. 2020).

    Slot ``u`` summarizes tokens ``u·c .. u·c + c - 1`` (``c = rate``; a trailing
    incomplete group is dropped):

    * ``"mean"``: :math:`\bar x_u = \frac1c \sum_{r<c} x_{uc+r}` (mean pooling);
    * ``"max"``: elementwise maximum over the group (max pooling);
    * a ``(c,)`` kernel ``w``: :math:`\bar x_u = \sum_{r<c} w_r x_{uc+r}`, the same
      kernel for every feature (a depthwise 1-D convolution, kernel size = stride = c);
    * a ``(F, F, c)`` array ``W`` (PyTorch ``Conv1d`` weight layout ``(out, in,
      kernel)``, no bias): :math:`\bar x_{u,o} = \sum_{i,r} W_{o,i,r} x_{uc+r,i}`, the
      paper's convolution over time mixing channels.

    ``x``: ``(..., L, F)``. Returns float64 ``(..., L // rate, F)``.

    >>> import numpy as np
    >>> from refattn.memory import compress_memory
    >>> x = np.arange(10.0).reshape(5, 2)
    >>> compress_memory(x, 2)                          # the 5th token is left over
    array([[1., 2.],
           [5., 6.]])
    >>> compress_memory(x, 2, "max"), compress_memory(x, 2, np.array([1.0, -1.0]))
    (array([[2., 3.],
           [6., 7.]]), array([[-2., -2.],
           [-2., -2.]]))
    """
    x = to_float64(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., L, F), got {x.shape}")
    rate = check_int("rate", rate, minimum=1)
    if isinstance(compress, np.ndarray) and compress.ndim == 3:
        compress = (compress, compress)
    kind, w, _ = _resolve_compress(compress, rate, x.shape[-1], x.shape[-1])
    return _compress(x, rate, kind, w)


@register(family="memory", exact=False, time="O(N·(S + mem_len + cmem_len)·D)",
          state="O((S + mem_len + cmem_len)·D) rolling caches", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=True, self_attention_only=False, constant_state=True,
          example={"segment_len": 2, "mem_len": 2, "cmem_len": 2, "rate": 2},
          budget=lambda n, b: {"segment_len": max(1, b // 4), "mem_len": b // 4,
                               "cmem_len": b // 4, "rate": 2})
def compressive_attention(q, k, v, *, segment_len, mem_len, cmem_len, rate,
                          compress="mean", causal=False, scale=None, softcap=None,
                          return_lse=False, check_finite=True):
    r"""Compressive Transformer attention (Rae et al. 2020).

    Transformer-XL's recurrence (:func:`transformer_xl_attention`) with a second,
    compressed memory. At the start of segment ``[s0, s0 + S)`` the memory holds the
    raw keys/values of positions ``[s0 - mem_len, s0)``; the older positions
    ``[0, s0 - mem_len)`` have left it and were compressed, group ``u`` of positions
    ``[u·c, (u+1)·c)`` into slot ``u`` (:func:`compress_memory`, ``c = rate``); the
    compressed memory keeps the last ``cmem_len`` slots,
    ``u ∈ [U - cmem_len, U)`` with ``U = max(0, s0 - mem_len) / c``. A query at position
    ``i'`` attends, in one softmax, to those slots, the memory and its segment up to
    itself:

    .. math:: o_i = \frac{\sum_{u} e^{q_i \cdot \bar k_u / \sqrt D} \bar v_u
              + \sum_{j = \max(0, s_0 - m)}^{i'} e^{q_i \cdot k_j / \sqrt D} v_j}
              {\sum_{u} e^{q_i \cdot \bar k_u / \sqrt D}
              + \sum_{j = \max(0, s_0 - m)}^{i'} e^{q_i \cdot k_j / \sqrt D}}.

    As in the paper's setting, ``rate`` must divide ``segment_len`` and ``mem_len``, so
    each segment boundary moves whole groups from the memory to the compressed memory
    (``S / c`` slots per segment once the memory is full) and no token is lost.
    ``cmem_len = 0`` is :func:`transformer_xl_attention`; ``rate = 1`` with ``"mean"``
    is Transformer-XL with ``mem_len + cmem_len`` memory.

    Parameters
    ----------
    q, k, v : as :func:`transformer_xl_attention` (``N != M``: bottom-right aligned).
    segment_len, mem_len : as :func:`transformer_xl_attention`.
    cmem_len : int >= 0, compressed slots kept.
    rate : int >= 1, the compression rate ``c``.
    compress : ``"mean"`` (default) or ``"max"`` pooling, a ``(rate,)`` kernel shared by
        all features, or a pair ``(W_k (D, D, rate), W_v (Dv, Dv, rate))`` of Conv1d
        weights for keys and values (see :func:`compress_memory`). Slots are made from
        keys and values, not hidden states (see :mod:`refattn.memory`).
    causal : accepted for uniformity; the mechanism is causal already.
    scale, softcap, check_finite, return_lse : as :func:`refattn.attention` (the softcap
        applies to the slots' logits too). No ``bias``/``mask``: compressed slots have
        no sequence index for them to address.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse over slots and keys).

    >>> import numpy as np
    >>> from refattn.memory import compressive_attention, transformer_xl_attention
    >>> q, k, v = np.random.default_rng(2).standard_normal((3, 2, 12, 4))
    >>> out = compressive_attention(q, k, v, segment_len=4, mem_len=4, cmem_len=2, rate=2)
    >>> out.shape
    (2, 12, 4)
    >>> same = compressive_attention(q, k, v, segment_len=4, mem_len=4, cmem_len=3, rate=1)
    >>> bool(np.allclose(same, transformer_xl_attention(q, k, v, segment_len=4, mem_len=7)))
    True
    """
    out, lse = _segment_attention(q, k, v, segment_len=segment_len, mem_len=mem_len,
                                  cmem_len=cmem_len, rate=rate, compress=compress,
                                  mask=None, causal=causal, scale=scale, bias=None,
                                  softcap=softcap, check_finite=check_finite)
    return (out, lse) if return_lse else out


def compressive_attention_matrix(q, k, *, segment_len, mem_len, cmem_len, rate,
                                 compress="mean", causal=False, scale=None, softcap=None,
                                 check_finite=True, memory_budget=None):
    """The implied ``(..., Hq, N, M)`` matrix ``A`` of :func:`compressive_attention`,
    ``out == A @ v``: a raw key's probability lands on its column; a compressed slot's
    probability ``p`` is spread over the ``rate`` positions of its group as
    ``p / rate`` (``"mean"``) or ``p · w_r`` (a ``(rate,)`` kernel ``w``). Row-stochastic
    for ``"mean"``. ``"max"`` and channel-mixing convolutions are not linear in ``v``
    with weights over the sequence and raise ``ValueError``.

    >>> import numpy as np
    >>> from refattn.memory import compressive_attention_matrix
    >>> q = k = np.zeros((1, 6, 2))               # equal logits
    >>> a = compressive_attention_matrix(q, k, segment_len=2, mem_len=2, cmem_len=1, rate=2)
    >>> a[0, 5] * 10      # query 5: slot of tokens 0-1 (weight 1/5 each half), 2, 3, 4, 5
    array([1., 1., 2., 2., 2., 2.])
    """
    return _segment_attention(q, k, None, segment_len=segment_len, mem_len=mem_len,
                              cmem_len=cmem_len, rate=rate, compress=compress, mask=None,
                              causal=causal, scale=scale, bias=None, softcap=softcap,
                              check_finite=check_finite, matrix=True,
                              memory_budget=memory_budget)


def compressive_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, segment_len,
                           mem_len, cmem_len, rate, compress="mean", scale=None,
                           softcap=None) -> SegmentMemoryState:
    """Streaming state of :func:`compressive_attention` (:class:`SegmentMemoryState`):
    the last ``mem_len + segment_len`` raw tokens and ``cmem_len`` compressed slots,
    constant in size. At each segment start the groups leaving the memory are
    compressed into slots, as in the paper's segment-level update.

    >>> import numpy as np
    >>> from refattn.memory import (compressive_attention, compressive_init_state,
    ...                             compressive_step)
    >>> q, k, v = np.random.default_rng(4).standard_normal((3, 1, 10, 4))
    >>> params = dict(segment_len=2, mem_len=2, cmem_len=2, rate=2, compress="max")
    >>> state = compressive_init_state(heads_q=1, heads_kv=1, d=4, dv=4, **params)
    >>> outs = []
    >>> for t in range(10):
    ...     out_t, state = compressive_step(state, q[:, t], k[:, t], v[:, t])
    ...     outs.append(out_t)
    >>> bool(np.allclose(np.stack(outs, -2), compressive_attention(q, k, v, **params)))
    True
    """
    return _segment_init(batch_shape, heads_q, heads_kv, d, dv, segment_len, mem_len,
                         cmem_len, rate, compress, scale, softcap)


def compressive_step(state: SegmentMemoryState, q_t, k_t, v_t):
    """One token of :func:`compressive_attention` (shapes as
    :func:`transformer_xl_step`): returns ``(out_t, new_state)``.

    >>> import numpy as np
    >>> from refattn.memory import compressive_init_state, compressive_step
    >>> state = compressive_init_state(heads_q=1, heads_kv=1, d=1, dv=1, segment_len=1,
    ...                                mem_len=0, cmem_len=1, rate=1)
    >>> for t in range(3):                  # zero logits: token t sees slot t-1 and t
    ...     out, state = compressive_step(state, np.zeros((1, 1)), np.zeros((1, 1)),
    ...                                   np.full((1, 1), float(t)))
    >>> out
    array([[1.5]])
    """
    return _segment_step(state, q_t, k_t, v_t)


attach(compressive_attention, implied=compressive_attention_matrix,
       init_state=compressive_init_state, step=compressive_step)
