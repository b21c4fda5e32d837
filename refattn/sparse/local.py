r"""Local attention: a sliding window (Longformer's local part, Mistral) and attention
sinks plus a window (StreamingLLM), with the fixed-size caches that decode them.

Both are exact attention under a mask (:func:`refattn.masks.sliding_window`,
:func:`refattn.masks.sinks`) computed by :func:`refattn.sparse_attention`. With
``causal=True`` each has a streaming form whose state never grows: a ring of the last
``window + 1`` keys and values (plus ``sinks`` first tokens), the rolling KV cache of
Mistral and StreamingLLM (Xiao et al. 2024).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import masks
from .._core.checks import check_count, check_int, check_state_memory
from ..registry import attach
from ..streaming import State, Window, attend_token, check_sizes, check_tokens
from ._common import pattern
from .engine import sparse_attention

__all__ = ["sliding_window_attention", "sink_attention", "SinkWindowState", "sink_init",
           "sink_step", "ring_init", "ring_step"]


def _window_mask(window, right=0, dilation=1):
    return masks.sliding_window(check_count("window", window), check_count("right", right),
                                dilation)


@pattern(_window_mask, time="O(N·w·D)", state="O(w·D) rolling KV cache",
          example={"window": 3, "right": 1},
          budget=lambda n, b: {"window": b // 2, "right": b // 2})
def sliding_window_attention(q, k, v, *, window, right=0, dilation=1, **options):
    """Local attention in a sliding window (Beltagy et al. 2020; Mistral 7B).

    Query ``i`` keeps keys ``j`` with ``-right <= i' - j <= window`` and
    ``(i' - j) % dilation == 0`` (:func:`refattn.masks.sliding_window`): causal when
    ``right = 0`` (add ``causal=True`` to be explicit), symmetric with ``right = window``;
    ``dilation`` may be a per-head sequence (Longformer's dilated heads). ``options``
    as :func:`sparse_attention`.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 10, 4))
    >>> out = ra.sliding_window_attention(q, k, v, window=2)
    >>> bool(np.allclose(out[0, 5], ra.attention(q[:, 5:6], k[:, 3:6], v[:, 3:6])[0, 0]))
    True
    """
    return sparse_attention(q, k, v, _window_mask(window, right, dilation), **options)


def _sink_mask(window, sinks=4):
    return masks.sinks(check_count("sinks", sinks)) | masks.sliding_window(
        check_count("window", window))


@pattern(_sink_mask, time="O(N·(w + s)·D)", state="O((w + s)·D)",
          example={"window": 3, "sinks": 2},
          budget=lambda n, b: {"window": max(0, b - 4), "sinks": 4})
def sink_attention(q, k, v, *, window, sinks=4, **options):
    """Attention sinks plus a sliding window (StreamingLLM, Xiao et al. 2024): every
    query keeps the first ``sinks`` keys and the ``window`` keys before it (and itself);
    with ``causal=True`` a decoder's rolling cache of ``sinks + window + 1`` keys.

    >>> import numpy as np, refattn as ra
    >>> ra.sink_attention.mask(window=1, sinks=2).materialize(6, 6)[5].astype(int)
    array([1, 1, 0, 0, 1, 1])
    """
    return sparse_attention(q, k, v, _sink_mask(window, sinks), **options)


@dataclasses.dataclass(frozen=True)
class SinkWindowState(State):
    """Fixed-size cache: ``sinks`` slots for the first tokens and the ``window + 1`` most
    recent later tokens in ``recent`` (a :class:`refattn.streaming.Window`: steps append
    in amortized O(1) rather than copying the window). ``dilation``: a read-only int
    array of one entry per query head (a broadcast view when one number was given), head
    ``h`` reading only keys ``j`` with ``(t - j) % dilation[h] == 0`` (None: every key).
    ``nbytes`` counts the ``sinks + window + 1`` slots the cache holds."""

    sink_keys: np.ndarray
    sink_values: np.ndarray
    recent: Window
    sizes: tuple
    window: int
    sinks: int
    scale: float | None
    dilation: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.nbytes_after(self.position)

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens: constant, ``prod(batch)·Hkv·(s+w+1)·(D+Dv)·8``."""
        check_int("n", n, minimum=0)
        b, _, hkv, d, dv = self.sizes
        return int(np.prod(b, dtype=np.int64)) * hkv * (self.sinks + self.window + 1) * (d + dv) * 8


def sink_init(*, batch_shape=(), heads_q, heads_kv, d, dv, window, sinks=4, scale=None,
              memory_budget=None):
    """Fixed-size StreamingLLM cache for :func:`refattn.sink_attention` with
    ``causal=True``: ``sinks`` first tokens plus the last ``window + 1`` tokens. The sink
    slots, ``prod(batch_shape)·Hkv·sinks·(D + Dv)·8`` bytes, are allocated here: beyond
    ``memory_budget`` (bytes; None: 8 GiB) a :class:`refattn.MemoryBudgetError` naming
    the sizes is raised first (the window starts empty and fills as tokens arrive).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 9, 4))
    >>> s = sink_init(heads_q=1, heads_kv=1, d=4, dv=4, window=2, sinks=2)
    >>> outs = []
    >>> for t in range(9):
    ...     o, s = sink_step(s, q[:, t], k[:, t], v[:, t]); outs.append(o)
    >>> ref = ra.sink_attention(q, k, v, window=2, sinks=2, causal=True)
    >>> bool(np.allclose(np.stack(outs, 1), ref))
    True
    """
    sizes = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    window = check_int("window", window, minimum=0)
    sinks = check_int("sinks", sinks, minimum=0)
    b, _, hkv, d, dv = sizes
    check_state_memory(8.0 * math.prod(b) * hkv * sinks * (d + dv), memory_budget,
                       "sink_init's sink slots", batch_shape=b, heads_kv=hkv, sinks=sinks,
                       d=d, dv=dv)
    return SinkWindowState(position=0, sink_keys=np.zeros(b + (hkv, sinks, d)),
                           sink_values=np.zeros(b + (hkv, sinks, dv)),
                           recent=Window.empty(b + (hkv, d), b + (hkv, dv)), sizes=sizes,
                           window=window, sinks=sinks, scale=scale)


def sink_step(state, q_t, k_t, v_t):
    """Write token ``t`` into its sink slot (``t < sinks``) or append it to the recent
    window (which then drops its oldest token); attend ``q_t`` to the sinks and the window
    (keys ``j < sinks`` or ``t - window <= j <= t``). Returns ``(out_t, new_state)``.
    Example: see :func:`sink_init`."""
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, *state.sizes)
    t, s = state.position, state.sinks
    if t < s:                                  # the first s steps only: copying is cheap
        sk, sv = state.sink_keys.copy(), state.sink_values.copy()
        sk[..., t, :], sv[..., t, :] = k_t, v_t
        new = state.replace(position=t + 1, sink_keys=sk, sink_values=sv)
    else:
        new = state.replace(position=t + 1,
                            recent=state.recent.append(k_t, v_t, keep=state.window))
    n_sink, n_recent = min(t + 1, s), len(new.recent)
    keys = (new.sink_keys[..., :n_sink, :], new.recent.keys_view)
    values = (new.sink_values[..., :n_sink, :], new.recent.values_view)
    mask = None
    if state.dilation is not None:
        held = np.concatenate([np.arange(n_sink), t + 1 - n_recent + np.arange(n_recent)])
        mask = (t - held)[None, :] % state.dilation[:, None] == 0   # (Hq, L)
    return attend_token(q_t, keys, values, scale=state.scale, mask=mask), new


def ring_init(*, batch_shape=(), heads_q, heads_kv, d, dv, window, right=0, dilation=1,
              scale=None):
    """Sliding-window ring buffer of ``window + 1`` slots: the streaming form of
    :func:`refattn.sliding_window_attention` with ``causal=True`` (keys
    ``t - window <= j <= t`` with ``(t - j) % dilation == 0``; ``dilation`` one number or
    one per query head). Causality cuts every look-ahead key, so ``right`` changes
    nothing here.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> s = ring_init(heads_q=2, heads_kv=2, d=4, dv=4, window=4, dilation=[1, 2])
    >>> outs = []
    >>> for t in range(9):
    ...     o, s = ring_step(s, q[:, t], k[:, t], v[:, t]); outs.append(o)
    >>> ref = ra.sliding_window_attention(q, k, v, window=4, dilation=[1, 2], causal=True)
    >>> bool(np.allclose(np.stack(outs, 1), ref)), s.nbytes
    (True, 640)
    """
    check_int("right", right, minimum=0)
    state = sink_init(batch_shape=batch_shape, heads_q=heads_q, heads_kv=heads_kv, d=d,
                      dv=dv, window=window, sinks=0, scale=scale)
    dil = np.asarray(dilation)
    if dil.ndim > 1 or (dil.ndim == 1 and dil.shape[0] != state.sizes[1]) or \
            not np.issubdtype(dil.dtype, np.integer) or (dil < 1).any():
        raise ValueError(f"dilation must be an int >= 1 or one per query head "
                         f"(Hq={state.sizes[1]},), got {dilation!r}")
    if (dil == 1).all():
        return state                          # every key: no mask to build per step
    dil = dil.astype(np.int64)                # a copy: the caller's list is not kept
    dil.flags.writeable = False               # a broadcast view when one number is given
    return state.replace(dilation=np.broadcast_to(dil, (state.sizes[1],)))


ring_step = sink_step


attach(sliding_window_attention, init_state=ring_init, step=ring_step, constant_state=True)
attach(sink_attention, init_state=sink_init, step=sink_step, constant_state=True)
