"""The Compressive Transformer (Rae et al. 2020): Transformer-XL's segment recurrence
with a second memory, into which the tokens leaving the memory are compressed at rate
``c`` (mean or max pooling, or a 1-D convolution). Holds :func:`compress_memory`, the
forward, its implied matrix and the streaming form; the recurrence and the compression
kernels are shared with Transformer-XL (``_common``).
"""
from __future__ import annotations

import numpy as np

from .._core.backward import head_summed_product, softmax_block_vjp
from .._core.checks import check_cotangent, check_int
from .._core.logits import make_logits
from .._core.problem import prepare_qkv
from .._core.softmax import normalize_rows
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (SegmentMemoryState, _compress, _compress_vjp, _compressive_params,
                      _resolve_compress, _segment_attention, _segment_blocks, _segment_init,
                      _segment_step, _softcap_derivative)

__all__ = ["compress_memory", "compressive_attention", "compressive_attention_matrix",
           "compressive_attention_vjp", "compressive_init_state", "compressive_step"]


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
                           softcap=None, memory_budget=None) -> SegmentMemoryState:
    """Streaming state of :func:`compressive_attention` (:class:`SegmentMemoryState`):
    the last ``mem_len + segment_len`` raw tokens and ``cmem_len`` compressed slots,
    constant in size. At each segment start the groups leaving the memory are
    compressed into slots, as in the paper's segment-level update. A state larger than
    ``memory_budget`` (bytes, default 8 GiB) raises :class:`refattn.MemoryBudgetError`
    naming its sizes before anything is allocated.

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
                         cmem_len, rate, compress, scale, softcap, memory_budget)


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


def compressive_attention_vjp(q, k, v, grad_out, *, segment_len, mem_len, cmem_len, rate,
                              compress="mean", grad_lse=None, causal=False, scale=None,
                              softcap=None, check_finite=True):
    r"""Gradients of :func:`compressive_attention`: ``{"q", "k", "v"}`` in the inputs'
    shapes, and ``"compress"`` when the compression has weights: the ``(rate,)`` kernel's
    gradient (summed over its use on keys and on values), or the pair
    ``(dW_k, dW_v)`` of the Conv1d weights' gradients.

    Per segment, the softmax over ``[slots; memory; segment]`` is differentiated as in
    FlashAttention-2 (Dao 2023, §3.1): with ``P`` the probabilities, ``O`` the output,
    ``dO`` (``grad_out``, ``(..., Hq, N, Dv)``) and ``dlse`` (``grad_lse``,
    ``(..., Hq, N)``),

    .. math:: D_i = \textstyle\sum_d dO_{id} O_{id} - dlse_i, \quad
              dS = P \circ (dO\, [\bar V; V]^\top - D) \circ \sigma', \quad
              dQ = s\, dS\, [\bar K; K], \quad
              [d\bar K; dK] \mathrel{+}= s\, dS^\top Q, \quad
              [d\bar V; dV] \mathrel{+}= P^\top dO,

    (``σ' = 1 - tanh²(x / softcap)``, 1 without a softcap), summed over the segments
    that see a slot or key and over the query heads of a group (GQA). The slot gradients
    then flow back through the compression (:func:`compress_memory`): ``"mean"``:
    ``dk_{uc+r} += d\bar k_u / c``; ``"max"``: to each channel's arg-max in the group
    (the first on ties, as PyTorch's ``max_pool1d``); a kernel ``w``:
    ``dk_{uc+r} += w_r d\bar k_u`` and ``dw_r = Σ_u k_{uc+r} · d\bar k_u`` (plus the
    values'); Conv1d weights ``W``: ``dk_{uc+r,i} += Σ_o W_{oir} d\bar k_{uo}``,
    ``dW_{oir} = Σ_u d\bar k_{uo} k_{uc+r,i}``. The memory is not detached: its
    gradient is that of ``k``, ``v`` (the paper stops it, ``SG``; drop those terms to
    match). Working memory: one segment's logits at a time, as the forward.

    >>> import numpy as np
    >>> from refattn.memory.compressive import compressive_attention_vjp
    >>> q, k, v = np.random.default_rng(2).standard_normal((3, 1, 8, 4))
    >>> params = dict(segment_len=2, mem_len=2, cmem_len=2, rate=2, compress=np.ones(2))
    >>> g = compressive_attention_vjp(q, k, v, np.ones((1, 8, 4)), **params)
    >>> sorted(g), g["compress"].shape
    (['compress', 'k', 'q', 'v'], (2,))
    """
    segment_len, mem_len, cmem_len, rate = _compressive_params(segment_len, mem_len,
                                                               cmem_len, rate)
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    kind, w_k, w_v = _resolve_compress(compress, rate, pb.d, pb.dv)
    logits = make_logits(pb, mask=None, causal=causal, scale=scale, bias=None,
                         softcap=softcap, check_finite=check_finite)
    lead = pb.batch_shape + (pb.heads_q, pb.n)
    do = check_cotangent(grad_out, "grad_out", lead + (pb.dv,), check_finite=check_finite)
    dlse = check_cotangent(grad_lse, "grad_lse", lead, check_finite=check_finite)
    do = do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv)
    dlse = None if dlse is None else dlse.reshape(pb.batch, pb.heads_q, pb.n)
    slots, slot_k, slot_v = None, None, None
    if cmem_len:
        slot_k, slot_v = _compress(k, rate, kind, w_k), _compress(v, rate, kind, w_v)
        slots = (slot_k, cmem_len, rate)
        dslot_k, dslot_v = np.zeros(slot_k.shape), np.zeros(slot_v.shape)
    q_scaled = q * logits.scale
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b, hk, hs, r0, r1, s, ids, lo, hi in _segment_blocks(q, k, pb, logits, segment_len,
                                                             mem_len, slots):
        chain = _softcap_derivative(s, logits.softcap)
        normalize_rows(s)
        keys, vals = k[b, hk, lo:hi], v[b, hk, lo:hi]
        if slots is not None:
            keys = np.concatenate([slot_k[b, hk, ids], keys])
            vals = np.concatenate([slot_v[b, hk, ids], vals])
        ds, dvals = softmax_block_vjp(s, vals, do[b, hs, r0:r1],
                                   None if dlse is None else dlse[b, hs, r0:r1])
        if chain is not None:
            ds *= chain
        dq[b, hs, r0:r1] = (ds @ keys) * logits.scale
        dkeys = head_summed_product(ds, q_scaled[b, hs, r0:r1])
        nc = len(ids)
        dk[b, hk, lo:hi] += dkeys[nc:]
        dv[b, hk, lo:hi] += dvals[nc:]
        if nc:
            dslot_k[b, hk, ids] += dkeys[:nc]
            dslot_v[b, hk, ids] += dvals[:nc]
    grads = {}
    if cmem_len:
        pulled_k, dw_k = _compress_vjp(k, rate, kind, w_k, dslot_k)
        pulled_v, dw_v = _compress_vjp(v, rate, kind, w_v, dslot_v)
        dk += pulled_k
        dv += pulled_v
    else:
        dw_k = None if w_k is None else np.zeros(w_k.shape)
        dw_v = None if w_v is None else np.zeros(w_v.shape)
    grads.update((name, pb.input_gradient(g, shape))
                 for name, g, shape in zip("qkv", (dq, dk, dv), shapes))
    if kind == "kernel":
        grads["compress"] = dw_k + dw_v
    elif kind == "conv":
        grads["compress"] = (dw_k, dw_v)
    return grads


attach(compressive_attention, implied=compressive_attention_matrix,
       init_state=compressive_init_state, step=compressive_step,
       vjp=compressive_attention_vjp)
