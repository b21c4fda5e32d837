r"""Memory-augmented attention: keys and values beyond the current sequence.

Four mechanisms, each a float64 reference with the layout of :func:`refattn.attention`
(``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``, GQA: query head
``h`` uses KV head ``h // (Hq // Hkv)``):

* :func:`transformer_xl_attention` — segment-level recurrence (Dai et al. 2019,
  "Transformer-XL"): the sequence is processed in segments of ``segment_len``; a query
  attends causally within its segment and to a cache of the ``mem_len`` tokens before
  the segment. Equal to exact attention under :func:`transformer_xl_mask`.
* :func:`compressive_attention` — the Compressive Transformer (Rae et al. 2020): tokens
  that fall out of the memory are compressed at rate ``c`` (mean/max pooling or a 1-D
  convolution) into a second memory of up to ``cmem_len`` compressed slots.
* :func:`persistent_memory_attention` — persistent memory vectors (Sukhbaatar et al.
  2019, "Augmenting Self-attention with Persistent Memory"): ``P`` fixed key/value
  slots concatenated to every query's keys, visible under any mask.
* :func:`knn_memory_attention` — kNN-retrieval memory (Wu et al. 2022, "Memorizing
  Transformers"): each query retrieves its ``topk`` best keys from an external store,
  attends to them and, separately, to its causal local context; a per-head gate mixes
  the two.

**Keys and values as the cache.** In Transformer-XL and the Compressive Transformer the
memory holds the previous layer's *hidden states*, from which each layer computes keys
and values. Here the cache holds the *keys and values* themselves: for linear key/value
projections this is the same computation (mean pooling, or any linear compression,
commutes with an affine projection); max pooling and a channel-mixing convolution then
act on keys and values instead of hidden states. The stop-gradient of the memory is
irrelevant to a forward reference.

**Positions.** Segments are cut by *absolute key position*: segment ``s`` holds positions
``[s·S, (s+1)·S)``. When ``N != M`` the queries are the last ``N`` positions (bottom-right
alignment, query ``i`` at position ``i' = i + M - N``, as in decoding with a KV cache);
query rows at negative positions see nothing and give 0 (lse ``-inf``).

**Relative positions** belong to the layer, not to this recurrence. The Transformer-XL
and persistent-memory references take ``bias=`` (an additive ``(..., Hq, N, M)`` array or
a score modifier from :mod:`refattn.scores`, evaluated at the full-sequence indices), so
the position terms of Transformer-XL's relative attention can be passed in precomputed.
Memory slots that are not sequence positions (persistent slots, compressed slots,
retrieved keys) get no bias.

**Implied matrices.** Transformer-XL and the Compressive Transformer with mean pooling
(or a 1-D convolution) are linear in ``v`` with an ``(N, M)`` matrix over the sequence;
they register it. Persistent and retrieved slots are not columns of ``v``, so their
mechanisms register no implied matrix; :func:`persistent_memory_attention_matrix` and
:func:`knn_memory_attention_matrix` return the matrix over ``[memory slots; sequence]``
instead.

>>> import numpy as np, refattn as ra
>>> from refattn.memory import transformer_xl_attention, transformer_xl_mask
>>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 10, 8))
>>> out = transformer_xl_attention(q, k, v, segment_len=4, mem_len=2)
>>> mask = transformer_xl_mask(segment_len=4, mem_len=2)
>>> bool(np.allclose(out, ra.attention(q, k, v, mask=mask), rtol=1e-12))
True
>>> mask.materialize(10, 10)[9].astype(int)    # segment [8, 10) plus 2 memory tokens
array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import masks as _masks
from .._core.checks import (check_int, check_memory, resolve_rng, resolve_scale,
                            resolve_softcap)
from .._core.logits import make_logits
from .._core.problem import prepare_qkv
from .._core.select import topk_keep
from .._core.softmax import finish_rows, softmax_rows
from ..boundary.arrays import to_float64
from ..exact.dense import attention_probs
from ..registry import attach, register
from ..streaming import State, check_sizes, check_token

__all__ = ["transformer_xl_mask", "transformer_xl_attention",
           "transformer_xl_attention_matrix", "transformer_xl_init_state",
           "transformer_xl_step", "compress_memory", "compressive_attention",
           "compressive_attention_matrix", "compressive_init_state", "compressive_step",
           "SegmentMemoryState", "random_memory", "persistent_memory_attention",
           "persistent_memory_attention_matrix", "knn_memory_attention",
           "knn_memory_attention_matrix"]


# ============================================================== shared helpers
def _softcap(s: np.ndarray, softcap) -> np.ndarray:
    """``softcap * tanh(s / softcap)`` in place (the order of :mod:`refattn._logits`)."""
    if softcap is not None:
        s /= softcap
        np.tanh(s, out=s)
        s *= softcap
    return s


def _segment_params(segment_len, mem_len):
    segment_len = check_int("segment_len", segment_len, minimum=1)
    mem_len = check_int("mem_len", mem_len, minimum=0)
    return segment_len, mem_len


def _empty_front_rows(out, lse, pb) -> None:
    """Rows at negative positions (``N > M``) see no key: output 0, lse ``-inf``."""
    front = max(0, pb.n - pb.m)
    out[:, :, :front] = 0.0
    lse[:, :, :front] = -np.inf


def _segment_blocks(q, k, pb, logits, segment_len, mem_len, slots=None):
    """The segment recurrence, one block per (batch, KV head, segment).

    Yields ``(b, hk, hs, r0, r1, s, slot_ids, lo, hi)``: query rows ``r0:r1`` (those at
    positions in the segment ``[s0, hi)``) of the query heads ``hs`` with logits ``s``
    of shape ``(G, r1 - r0, len(slot_ids) + hi - lo)`` over the compressed slots
    ``slot_ids`` (of ``slots``, ``(B, Hkv, U, D)``, or none) followed by the raw keys
    ``lo:hi`` (the ``mem_len`` cached positions before the segment and the segment).
    """
    s_len, off = segment_len, pb.m - pb.n
    q_scaled = q * logits.scale
    no_slots = np.zeros(0, np.int64)
    for b in range(pb.batch):
        for hk in range(pb.heads_kv):
            hs = slice(hk * pb.group, (hk + 1) * pb.group)
            heads = np.arange(hs.start, hs.stop)
            for s0 in range(0, pb.m, s_len):
                hi = min(s0 + s_len, pb.m)
                r0, r1 = max(0, s0 - off), min(pb.n, hi - off)
                if r0 >= r1:
                    continue
                rows = np.arange(r0, r1)
                lo = max(0, s0 - mem_len)                     # the cache: [lo, s0)
                cols = np.arange(lo, hi)
                s = logits.block(q_scaled[b, hs, r0:r1], k[b, hk, lo:hi], b, heads,
                                 rows, cols)
                future = cols[None, :] > rows[:, None] + off  # causal inside the segment
                np.copyto(s, -np.inf, where=future[None])
                slot_ids = no_slots
                if slots is not None:
                    cmem_len, rate = slots[1], slots[2]
                    u_end = lo // rate                        # slots fully evicted
                    slot_ids = np.arange(max(0, u_end - cmem_len), u_end)
                    sc = q_scaled[b, hs, r0:r1] @ slots[0][b, hk, slot_ids].T
                    s = np.concatenate([_softcap(sc, logits.softcap), s], axis=-1)
                yield b, hk, hs, r0, r1, s, slot_ids, lo, hi


# ============================================================== Transformer-XL
def transformer_xl_mask(segment_len: int, mem_len: int) -> _masks.Mask:
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
    inner = _masks.causal() & _masks.block_window(r, segment_len)
    if t:
        inner = _masks.causal() & _masks.block_window(r + 1, segment_len) & (
            _masks.block_window(r, segment_len) | _masks.fixed(segment_len, t))
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
    states (see the module docstring).

    >>> import numpy as np, refattn as ra
    >>> from refattn.memory import transformer_xl_attention
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 1, 9, 4))
    >>> out = transformer_xl_attention(q, k, v, segment_len=3, mem_len=3)
    >>> # query 7 is in segment [6, 9): it sees the cache [3, 6) and keys 6, 7
    >>> bool(np.allclose(out[0, 7], ra.attention(q[:, 7:8], k[:, 3:8], v[:, 3:8])[0, 0]))
    True
    """
    out, lse = _compressive(q, k, v, segment_len=segment_len, mem_len=mem_len,
                            cmem_len=0, rate=1, compress="mean", mask=mask, causal=causal,
                            scale=scale, bias=bias, softcap=softcap,
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
        xl = xl & _masks.as_mask(mask, np.broadcast_shapes(np.shape(q)[:-3],
                                                            np.shape(k)[:-3]))
    return attention_probs(q, k, mask=xl, causal=causal, scale=scale, bias=bias,
                           softcap=softcap, check_finite=check_finite,
                           memory_budget=memory_budget)


# ====================================================== Compressive Transformer
_POOLS = ("mean", "max")


def _resolve_compress(compress, rate, d, dv):
    """``(kind, w_k, w_v)`` with kind ``"mean"``, ``"max"``, ``"kernel"`` (a shared
    ``(rate,)`` temporal kernel) or ``"conv"`` (Conv1d weights ``(F, F, rate)``);
    ``dv=None`` (no values: the implied matrix) skips checking the value weights."""
    if isinstance(compress, str):
        if compress not in _POOLS:
            raise ValueError(f"compress must be 'mean', 'max', a (rate,) kernel or a pair "
                             f"of Conv1d weights, got {compress!r}")
        return compress, None, None
    if isinstance(compress, (tuple, list)) and len(compress) == 2 and \
            all(np.ndim(w) == 3 for w in compress):
        w_k = to_float64(compress[0], "compress[0] (key convolution weights)")
        w_v = to_float64(compress[1], "compress[1] (value convolution weights)")
        for name, w, f in (("compress[0]", w_k, d), ("compress[1]", w_v, dv)):
            if f is not None and w.shape != (f, f, rate):
                raise ValueError(f"{name} must have the Conv1d weight shape (out, in, "
                                 f"kernel) = {(f, f, rate)} for rate={rate} and feature "
                                 f"size {f}, got {w.shape}")
        return "conv", w_k, w_v
    w = to_float64(compress, "compress (convolution kernel)")
    if w.shape != (rate,):
        raise ValueError(f"a compression kernel must have shape (rate,) = ({rate},) "
                         f"(kernel size and stride equal the rate); got {w.shape}")
    return "kernel", w, w


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


def _compress(x, rate, kind, w):
    units = x.shape[-2] // rate
    groups = x[..., :units * rate, :].reshape(x.shape[:-2] + (units, rate, x.shape[-1]))
    if kind == "mean":
        return groups.mean(axis=-2)
    if kind == "max":
        return groups.max(axis=-2)
    if kind == "kernel":
        return np.einsum("...urf,r->...uf", groups, w)
    return np.einsum("...uri,oir->...uo", groups, w)


def _compressive_params(segment_len, mem_len, cmem_len, rate):
    segment_len, mem_len = _segment_params(segment_len, mem_len)
    cmem_len = check_int("cmem_len", cmem_len, minimum=0)
    rate = check_int("rate", rate, minimum=1)
    if segment_len % rate or mem_len % rate:
        raise ValueError(f"rate={rate} must divide segment_len={segment_len} and "
                         f"mem_len={mem_len} (the paper's setting), so that the tokens "
                         f"leaving the memory form whole groups of rate tokens")
    return segment_len, mem_len, cmem_len, rate


def _compressive(q, k, v, *, segment_len, mem_len, cmem_len, rate, compress, mask,
                 causal, scale, bias, softcap, check_finite, matrix=False,
                 memory_budget=None):
    """Shared body of the Transformer-XL and Compressive Transformer references:
    ``(out, lse)``, or the implied matrix when ``matrix``."""
    segment_len, mem_len, cmem_len, rate = _compressive_params(segment_len, mem_len,
                                                               cmem_len, rate)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=not matrix)
    kind, w_k, w_v = _resolve_compress(compress, rate, pb.d, None if matrix else pb.dv)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    slots = None
    if cmem_len:
        slots = (_compress(k, rate, kind, w_k), cmem_len, rate)
        slot_v = None if matrix else _compress(v, rate, kind, w_v)
    blocks = _segment_blocks(q, k, pb, logits, segment_len, mem_len, slots)
    if matrix:
        if cmem_len and kind not in ("mean", "kernel"):
            raise ValueError(f"compressive attention with compress={kind!r} is not linear "
                             f"in v with weights over the sequence: it has no implied "
                             f"(N, M) matrix (only 'mean' and a (rate,) kernel do)")
        coef = np.full(rate, 1.0 / rate) if kind == "mean" else w_k
        check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 8.0, memory_budget,
                     "the implied matrix of compressive/Transformer-XL attention",
                     "refattn.memory.compressive_attention (it never forms the matrix)")
        probs = np.zeros((pb.batch, pb.heads_q, pb.n, pb.m))
        for b, _, hs, r0, r1, s, slot_ids, lo, hi in blocks:
            _, row_sum = softmax_rows(s)
            live = row_sum > 0
            np.divide(s, row_sum[..., None], out=s, where=live[..., None])
            s[~live] = 0.0
            nc = len(slot_ids)
            probs[b, hs, r0:r1, lo:hi] += s[..., nc:]
            for a, u in enumerate(slot_ids):       # a slot's weight spread over its group
                probs[b, hs, r0:r1, u * rate:(u + 1) * rate] += \
                    s[..., a, None] * coef
        return pb.unflatten(probs)
    out, lse = pb.poisoned_outputs()
    _empty_front_rows(out, lse, pb)
    for b, hk, hs, r0, r1, s, slot_ids, lo, hi in blocks:
        row_max, row_sum = softmax_rows(s)
        vals = v[b, hk, lo:hi]
        if slots is not None:
            vals = np.concatenate([slot_v[b, hk, slot_ids], vals])
        finish_rows(s @ vals, row_max, row_sum, out[b, hs, r0:r1], lse[b, hs, r0:r1])
    return pb.unflatten(out, lse)


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
        keys and values, not hidden states (module docstring).
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
    out, lse = _compressive(q, k, v, segment_len=segment_len, mem_len=mem_len,
                            cmem_len=cmem_len, rate=rate, compress=compress, mask=None,
                            causal=causal, scale=scale, bias=None, softcap=softcap,
                            check_finite=check_finite)
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
    return _compressive(q, k, None, segment_len=segment_len, mem_len=mem_len,
                        cmem_len=cmem_len, rate=rate, compress=compress, mask=None,
                        causal=causal, scale=scale, bias=None, softcap=softcap,
                        check_finite=check_finite, matrix=True, memory_budget=memory_budget)


# ------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class SegmentMemoryState(State):
    """Streaming state of Transformer-XL / Compressive Transformer attention.

    Ring buffers of constant size: ``k_buf (B, Hkv, mem_len + S, D)`` and ``v_buf``
    hold the last ``mem_len + S`` tokens (position ``p`` in slot ``p % (mem_len + S)``),
    enough for the cache and the current segment; ``ck_buf (B, Hkv, cmem_len, D)`` and
    ``cv_buf`` hold the compressed slots (slot ``u`` in ``u % cmem_len``).
    """

    k_buf: np.ndarray
    v_buf: np.ndarray
    ck_buf: np.ndarray
    cv_buf: np.ndarray
    batch_shape: tuple
    heads_q: int
    segment_len: int
    mem_len: int
    cmem_len: int
    rate: int
    kind: str
    w_k: np.ndarray | None
    w_v: np.ndarray | None
    scale: float
    softcap: float | None


def _segment_init(batch_shape, heads_q, heads_kv, d, dv, segment_len, mem_len, cmem_len,
                  rate, compress, scale, softcap):
    segment_len, mem_len, cmem_len, rate = _compressive_params(segment_len, mem_len,
                                                               cmem_len, rate)
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d,
                                                        dv, min_dv=0)
    kind, w_k, w_v = _resolve_compress(compress, rate, d, dv)
    bsz, window = int(np.prod(batch_shape)), mem_len + segment_len
    return SegmentMemoryState(
        position=0, k_buf=np.zeros((bsz, heads_kv, window, d)),
        v_buf=np.zeros((bsz, heads_kv, window, dv)),
        ck_buf=np.zeros((bsz, heads_kv, cmem_len, d)),
        cv_buf=np.zeros((bsz, heads_kv, cmem_len, dv)), batch_shape=batch_shape,
        heads_q=heads_q, segment_len=segment_len, mem_len=mem_len, cmem_len=cmem_len,
        rate=rate, kind=kind, w_k=w_k, w_v=w_v, scale=resolve_scale(scale, d),
        softcap=resolve_softcap(softcap))


def _segment_step(state: SegmentMemoryState, q_t, k_t, v_t):
    bsz, hkv, window, d = state.k_buf.shape
    dv = state.v_buf.shape[-1]
    hq, g = state.heads_q, state.heads_q // hkv
    q_t = check_token(q_t, "q_t", state.batch_shape + (hq, d)).reshape(bsz, hkv, g, d)
    k_t = check_token(k_t, "k_t", state.batch_shape + (hkv, d)).reshape(bsz, hkv, d)
    v_t = check_token(v_t, "v_t", state.batch_shape + (hkv, dv)).reshape(bsz, hkv, dv)
    t, s_len, mem, c = state.position, state.segment_len, state.mem_len, state.rate
    s0 = (t // s_len) * s_len
    k_buf, v_buf = state.k_buf.copy(), state.v_buf.copy()
    ck_buf, cv_buf = state.ck_buf.copy(), state.cv_buf.copy()
    u_end = max(0, s0 - mem) // c                    # slots evicted before this segment
    if state.cmem_len and t == s0 and t > 0:
        # A segment starts: the groups that just left the memory (still in the ring
        # buffer, which holds positions [t - window, t)) become compressed slots.
        for u in range(max(0, s0 - s_len - mem) // c, u_end):
            pos = np.arange(u * c, (u + 1) * c) % window
            ck_buf[:, :, u % state.cmem_len] = _compress(k_buf[:, :, pos], c, state.kind,
                                                         state.w_k)[:, :, 0]
            cv_buf[:, :, u % state.cmem_len] = _compress(v_buf[:, :, pos], c, state.kind,
                                                         state.w_v)[:, :, 0]
    k_buf[:, :, t % window], v_buf[:, :, t % window] = k_t, v_t
    raw = np.arange(max(0, s0 - mem), t + 1) % window
    keys, vals = k_buf[:, :, raw], v_buf[:, :, raw]
    if state.cmem_len:
        cs = np.arange(max(0, u_end - state.cmem_len), u_end) % state.cmem_len
        keys = np.concatenate([ck_buf[:, :, cs], keys], axis=2)
        vals = np.concatenate([cv_buf[:, :, cs], vals], axis=2)
    s = _softcap(np.einsum("bhgd,bhld->bhgl", q_t * state.scale, keys), state.softcap)
    row_max, row_sum = softmax_rows(s)
    out = np.einsum("bhgl,bhlf->bhgf", s, vals) / row_sum[..., None]
    new = state.replace(position=t + 1, k_buf=k_buf, v_buf=v_buf, ck_buf=ck_buf,
                        cv_buf=cv_buf)
    return out.reshape(state.batch_shape + (hq, dv)), new


def transformer_xl_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, segment_len,
                              mem_len, scale=None, softcap=None) -> SegmentMemoryState:
    """Streaming state of :func:`transformer_xl_attention`: a ring buffer of the last
    ``mem_len + segment_len`` keys and values (:class:`SegmentMemoryState`), constant
    in size. Stepping equals the parallel form (segment boundaries by absolute
    position); ``bias``/``mask`` are not available in streaming.

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
                         "mean", scale, softcap)


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


# ====================================================== memory slots (shared)
def random_memory(num_slots, *, heads_kv, d, dv, rng):
    """Standard-normal memory slots ``(mem_k (Hkv, P, D), mem_v (Hkv, P, Dv))`` drawn
    from ``rng`` (an int seed or a ``numpy.random.Generator``), keys first. This is
    what ``num_slots=P, rng=...`` means in :func:`persistent_memory_attention` and
    :func:`knn_memory_attention` (shared by every batch element).

    >>> from refattn.memory import random_memory
    >>> mk, mv = random_memory(4, heads_kv=2, d=3, dv=5, rng=0)
    >>> mk.shape, mv.shape
    ((2, 4, 3), (2, 4, 5))
    """
    num_slots = check_int("num_slots", num_slots, minimum=0)
    gen = resolve_rng(rng, "random memory slots (num_slots=)")
    return (gen.standard_normal((heads_kv, num_slots, d)),
            gen.standard_normal((heads_kv, num_slots, dv)))


def _memory_slots(mem_k, mem_v, num_slots, rng, pb, where, *, need_v=True):
    """The memory ``(B, Hkv, P, D)``, ``(B, Hkv, P, Dv)`` (or ``None`` for v), given as
    arrays or drawn with :func:`random_memory`."""
    if num_slots is not None:
        if mem_k is not None or mem_v is not None:
            raise ValueError(f"{where}: pass either mem_k and mem_v, or num_slots and rng, "
                             f"not both")
        mk, mv = random_memory(num_slots, heads_kv=pb.heads_kv, d=pb.d, dv=max(pb.dv, 0),
                               rng=rng)
    else:
        if mem_k is None or (need_v and mem_v is None):
            raise TypeError(f"{where} needs the memory: mem_k (..., Hkv, P, D) and mem_v "
                            f"(..., Hkv, P, Dv), or num_slots and rng for random slots")
        mk = to_float64(mem_k, "mem_k")
        mv = to_float64(mem_v, "mem_v") if need_v else None
        shapes = f"mem_k {mk.shape}" + (f", mem_v {mv.shape}" if mv is not None else "")
        if mk.ndim < 3 or (mv is not None and mv.ndim < 3):
            raise ValueError(f"mem_k and mem_v must have shape (..., Hkv, P, D) and "
                             f"(..., Hkv, P, Dv); got {shapes}")
        if mk.shape[-3] != pb.heads_kv or mk.shape[-1] != pb.d:
            raise ValueError(f"mem_k must have shape (..., Hkv={pb.heads_kv}, P, "
                             f"D={pb.d}) like k; got {shapes}")
        if mv is not None and (mv.shape[-3:-1] != mk.shape[-3:-1] or mv.shape[-1] != pb.dv):
            raise ValueError(f"mem_v must have shape (..., Hkv={pb.heads_kv}, P, "
                             f"Dv={pb.dv}) with the P of mem_k; got {shapes}")
        for name, x in (("mem_k", mk), ("mem_v", mv)):
            if x is None:
                continue
            try:
                ok = np.broadcast_shapes(x.shape[:-3], pb.batch_shape) == pb.batch_shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{name} of shape {x.shape} has batch dims that do not "
                                 f"broadcast to the batch dims {pb.batch_shape} of q, k, v")

    def flat(x):
        if x is None:
            return None
        x = np.broadcast_to(x, pb.batch_shape + x.shape[-3:])
        return x.reshape((pb.batch,) + x.shape[-3:])
    return flat(mk), flat(mv)


# ======================================================== persistent memory
def _persistent_blocks(q, k, v, *, mem_k, mem_v, num_slots, rng, mask, causal, scale,
                       bias, softcap, check_finite, memory_budget, what):
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb, what, need_v=v is not None)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    p = mk.shape[-2]
    check_memory(pb.group * pb.n * (pb.m + p) * 17.0, memory_budget, what,
                 "refattn.attention over chunks of queries")
    q_scaled = q * logits.scale
    rows, cols = np.arange(pb.n), np.arange(pb.m)

    def blocks():
        for b in range(pb.batch):
            for hk in range(pb.heads_kv):
                hs = slice(hk * pb.group, (hk + 1) * pb.group)
                heads = np.arange(hs.start, hs.stop)
                seq = logits.block(q_scaled[b, hs], k[b, hk], b, heads, rows, cols)
                slot = _softcap(q_scaled[b, hs] @ mk[b, hk].T, logits.softcap)
                s = np.concatenate([slot, seq], axis=-1)       # [slots; sequence]
                vals = None if v is None else np.concatenate([mv[b, hk], v[b, hk]])
                yield b, hs, s, vals
    return pb, p, blocks()


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
    check_memory(pb.batch * pb.heads_q * pb.n * (pb.m + p) * 8.0, memory_budget,
                 "the matrix of persistent_memory_attention_matrix",
                 "refattn.memory.persistent_memory_attention (it never forms the matrix)")
    probs = np.full((pb.batch, pb.heads_q, pb.n, p + pb.m), np.nan)
    for b, hs, s, _ in blocks:
        _, row_sum = softmax_rows(s)
        empty = row_sum == 0
        np.divide(s, row_sum[..., None], out=s, where=~empty[..., None])
        s[empty] = 0.0
        probs[b, hs] = s
    return pb.unflatten(probs)


# ============================================================ kNN memory
def _check_gate(gate, heads_q):
    g = to_float64(gate, "gate")
    if g.ndim > 1 or (g.ndim == 1 and g.shape[0] not in (1, heads_q)):
        raise ValueError(f"gate must be a scalar or one value per query head "
                         f"(Hq={heads_q},); got shape {g.shape}")
    if ((g < 0) | (g > 1)).any():
        raise ValueError(f"gate values must lie in [0, 1] (pass sigmoid(b_g) for the "
                         f"paper's learned gate bias b_g); got {gate!r}")
    return np.broadcast_to(g, (heads_q,))


def _knn_parts(q, k, v, *, mem_k, mem_v, num_slots, rng, topk, gate, local_window, mask,
               scale, bias, softcap, check_finite, memory_budget, what):
    """Yield ``(b, hs, p_mem, p_loc, vm, vl, gate)`` per (batch, KV head) with the
    normalized ``(G, N, S)`` retrieval and ``(G, N, M)`` local probabilities."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    topk = check_int("topk", topk, minimum=1, context=" (store keys retrieved per query)")
    g = _check_gate(gate, pb.heads_q)
    mk, mv = _memory_slots(mem_k, mem_v, num_slots, rng, pb, what, need_v=v is not None)
    local = None
    if local_window is not None:
        local = _masks.sliding_window(check_int("local_window", local_window, minimum=0))
    if mask is not None:
        user = _masks.as_mask(mask, pb.batch_shape)
        local = user if local is None else local & user
    logits = make_logits(pb, mask=local, causal=True, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    size = mk.shape[-2]
    check_memory(pb.group * pb.n * (pb.m + size) * 17.0, memory_budget, what,
                 "refattn.attention over chunks of queries")
    q_scaled = q * logits.scale
    rows, cols = np.arange(pb.n), np.arange(pb.m)

    def normalize(s):
        _, row_sum = softmax_rows(s)
        empty = row_sum == 0
        np.divide(s, row_sum[..., None], out=s, where=~empty[..., None])
        s[empty] = 0.0
        return s

    def parts():
        for b in range(pb.batch):
            for hk in range(pb.heads_kv):
                hs = slice(hk * pb.group, (hk + 1) * pb.group)
                dot = q[b, hs] @ mk[b, hk].T                        # retrieval scores
                s_mem = _softcap(dot * logits.scale, logits.softcap)
                s_mem[~topk_keep(dot, topk)] = -np.inf
                s_loc = logits.block(q_scaled[b, hs], k[b, hk], b,
                                     np.arange(hs.start, hs.stop), rows, cols)
                yield (b, hs, normalize(s_mem), normalize(s_loc),
                       None if v is None else mv[b, hk], None if v is None else v[b, hk],
                       g[hs])
    return pb, size, parts()


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
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
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
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_memory(pb.batch * pb.heads_q * pb.n * (pb.m + size) * 8.0, memory_budget,
                 "the matrix of knn_memory_attention_matrix",
                 "refattn.memory.knn_memory_attention (it never forms the matrix)")
    probs = np.full((pb.batch, pb.heads_q, pb.n, size + pb.m), np.nan)
    for b, hs, p_mem, p_loc, _, _, g in parts:
        g = g[:, None, None]
        probs[b, hs, :, :size] = g * p_mem
        probs[b, hs, :, size:] = (1.0 - g) * p_loc
    return pb.unflatten(probs)


attach(transformer_xl_attention, implied=transformer_xl_attention_matrix, init_state=transformer_xl_init_state, step=transformer_xl_step)
attach(compressive_attention, implied=compressive_attention_matrix, init_state=compressive_init_state, step=compressive_step)
