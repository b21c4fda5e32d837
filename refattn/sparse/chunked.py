r"""Chunked attention: the sequence is cut into chunks of ``chunk_size`` positions and each
query attends only inside its own chunk, plus the ``overlap`` keys just before the chunk
(a rolling memory carried from one chunk to the next).

.. math:: o_i = \operatorname{softmax}_{j \in [c C - O,\ (c+1) C)}\big(s\, q_i k_j^\top\big)\, v_j,
          \qquad c = \lfloor i' / C \rfloor,

with :math:`i' = i + M - N` the bottom-right aligned query position. ``overlap = 0``
gives independent chunks (block-diagonal attention, as in chunked prefill or
Memorizing Transformers' local attention); ``overlap = chunk_size`` lets every chunk see
the whole previous chunk (the forward pass of Transformer-XL's segment recurrence with
a memory of one segment; :func:`refattn.transformer_xl_attention` has the general form).
With ``causal=True`` this is streaming attention with a state of at most
``chunk_size + overlap`` tokens (:func:`chunked_init_state`).

Computed chunk by chunk: ``O(N·(C + O)·D)`` time and ``O(C·(C + O))`` working memory.
The mask is :func:`refattn.masks.chunks`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import masks
from .._core.checks import check_int, resolve_scale
from .._core.problem import prepare_qkv
from ..exact.dense import attention, attention_probs
from ..registry import attach, register
from ..streaming import State, Window, attend_token, check_sizes, check_tokens
from .engine import sparse_attention_vjp

__all__ = ["chunked_attention", "chunked_init_state", "chunked_step", "ChunkState"]


def _chunk_mask(chunk_size, overlap=0):
    return masks.chunks(chunk_size, overlap)


def _implied(q, k, *, chunk_size, overlap=0, causal=False, scale=None, softcap=None,
             check_finite=True):
    return attention_probs(q, k, mask=_chunk_mask(chunk_size, overlap), causal=causal,
                           scale=scale, softcap=softcap, check_finite=check_finite)


@register(family="sparse", exact=False, time="O(N·(C + O)·D)", state="O((C + O)·D)",
          supports_causal=True, supports_mask=False, supports_gqa=True,
          position_free=False, mask=_chunk_mask,
          example={"chunk_size": 3, "overlap": 2},
          budget=lambda n, b: {"chunk_size": max(1, b // 2), "overlap": b // 2},
          constant_state=True)
def chunked_attention(q, k, v, *, chunk_size, overlap=0, causal=False, scale=None,
                      softcap=None, return_lse=False, check_finite=True):
    """Attention inside chunks of ``chunk_size`` positions plus ``overlap`` earlier keys
    (module docstring for the equation).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    chunk_size : int >= 1; overlap : int >= 0, keys before the chunk that it also sees.
    causal : also drop keys after the query (streaming chunked attention).

    Returns float64 ``(..., Hq, N, Dv)`` (and the ``(..., Hq, N)`` log-sum-exp with
    ``return_lse``); equal to :func:`refattn.attention` under
    ``mask=refattn.masks.chunks(chunk_size, overlap)``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 10, 4))
    >>> out = ra.chunked_attention(q, k, v, chunk_size=4, overlap=2, causal=True)
    >>> ref = ra.attention(q, k, v, mask=ra.masks.chunks(4, overlap=2), causal=True)
    >>> bool(np.allclose(out, ref))
    True
    >>> bool(np.allclose(out[:, 5], ra.attention(q[:, 5:6], k[:, 2:6], v[:, 2:6])[:, 0]))
    True
    """
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    overlap = check_int("overlap", overlap, minimum=0)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    out, lse = pb.poisoned_outputs()
    shift = pb.m - pb.n
    first = max(shift, 0) // chunk_size * chunk_size        # chunk of the first query
    for c0 in range(first, pb.m, chunk_size):
        c1 = min(c0 + chunk_size, pb.m)
        r0, r1 = max(c0 - shift, 0), c1 - shift             # query rows in this chunk
        lo = max(c0 - overlap, 0)
        # the rows' positions end at c1 - 1 = the last key, so the bottom-right causal
        # alignment of the slice is the global one
        o, s = attention(q[:, :, r0:r1], k[:, :, lo:c1], v[:, :, lo:c1], causal=causal,
                         scale=scale, softcap=softcap, return_lse=True, check_finite=False)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, s
    if pb.n > pb.m:                                         # queries before any key
        out[:, :, :pb.n - pb.m], lse[:, :, :pb.n - pb.m] = 0.0, -np.inf
    return pb.unflatten(out, lse) if return_lse else pb.unflatten(out)


@dataclasses.dataclass(frozen=True)
class ChunkState(State):
    """The tokens the next query may see, from its chunk's start minus ``overlap`` on, in
    ``recent`` (a :class:`refattn.streaming.Window`: steps append in amortized O(1)).
    ``nbytes`` counts the ``chunk_size + overlap`` slots the state holds at most."""

    recent: Window
    heads_q: int
    chunk_size: int
    overlap: int
    scale: float

    @property
    def nbytes(self) -> int:
        k, v = self.recent.keys, self.recent.values
        slots = self.chunk_size + self.overlap
        return (k[..., :1, :].size + v[..., :1, :].size) * slots * 8


def chunked_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, chunk_size, overlap=0,
                       scale=None):
    """Empty streaming state of :func:`chunked_attention` with ``causal=True``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 9, 4))
    >>> s = chunked_init_state(heads_q=1, heads_kv=1, d=4, dv=4, chunk_size=3, overlap=1)
    >>> ref = ra.chunked_attention(q, k, v, chunk_size=3, overlap=1, causal=True)
    >>> for t in range(9):                          # one token at a time equals the whole
    ...     o, s = chunked_step(s, q[:, t], k[:, t], v[:, t])
    ...     assert np.allclose(o, ref[:, t])
    >>> s.nbytes                                    # the chunk and its overlap
    256
    """
    b, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    overlap = check_int("overlap", overlap, minimum=0)
    return ChunkState(position=0, recent=Window.empty(b + (heads_kv, d), b + (heads_kv, dv)),
                      heads_q=heads_q, chunk_size=chunk_size, overlap=overlap,
                      scale=resolve_scale(scale, d))


def chunked_step(state: ChunkState, q_t, k_t, v_t):
    """Append token ``t``, keeping the tokens ``j >= (t // C)·C - O``; attend ``q_t`` to
    them. Returns ``(out_t, new_state)``. Example: see :func:`chunked_init_state`."""
    *lead, hkv, _, d = state.recent.keys.shape
    dv = state.recent.values.shape[-1]
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, lead, state.heads_q, hkv, d, dv)
    t = state.position
    first = max(t // state.chunk_size * state.chunk_size - state.overlap, 0)
    recent = state.recent.append(k_t, v_t, keep=t - first)
    out = attend_token(q_t, recent.keys_view, recent.values_view, scale=state.scale)
    return out, state.replace(position=t + 1, recent=recent)



def chunked_attention_vjp(q, k, v, grad_out, *, chunk_size, overlap=0, grad_lse=None,
                          causal=False, scale=None, softcap=None, check_finite=True):
    """Gradients of :func:`chunked_attention`: exact attention under its chunk mask
    (:func:`refattn.masks.chunks`), differentiated by the sparse engine's tiled backward
    (:func:`refattn.sparse.engine.sparse_attention_vjp`) over the non-empty tiles."""
    return sparse_attention_vjp(q, k, v, grad_out, mask=_chunk_mask(chunk_size, overlap),
                                grad_lse=grad_lse, causal=causal, scale=scale,
                                softcap=softcap, check_finite=check_finite)

attach(chunked_attention, implied=_implied, vjp=chunked_attention_vjp,
       init_state=chunked_init_state, step=chunked_step)
