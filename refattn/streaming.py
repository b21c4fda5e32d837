"""The streaming protocol: mechanisms with a recurrent form process one token at a time.

A streaming mechanism provides two functions, registered with it::

    state = init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, **params)
    out_t, state = step(state, q_t, k_t, v_t)

``q_t: (*batch_shape, Hq, D)``, ``k_t: (*batch_shape, Hkv, D)``,
``v_t: (*batch_shape, Hkv, Dv)``; ``out_t: (*batch_shape, Hq, Dv)`` float64. ``step``
returns a new state and leaves the old one unchanged. Running ``step`` over a sequence
equals the mechanism's parallel form with ``causal=True`` (the registry's property tests
check this for every streaming mechanism). ``state.nbytes`` is the memory the state
holds: constant for recurrent mechanisms, growing with every token for a full KV cache.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._inputs import check_int, resolve_scale, to_float64

__all__ = ["State", "check_token", "check_tokens", "check_sizes", "attend_token"]


@dataclasses.dataclass(frozen=True)
class State:
    """Base class of streaming states: a frozen dataclass of arrays (and settings).

    ``position`` counts the tokens consumed; ``nbytes`` sums the arrays' sizes.
    """

    position: int

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for value in vars(self).values()
                   if isinstance(value, np.ndarray))

    def replace(self, **changes) -> "State":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def check_token(x, name: str, expected: tuple, *, check_finite: bool = True) -> np.ndarray:
    """``x`` as float64, checked to have exactly the shape ``expected`` (a token of a
    stream: ``(*batch_shape, heads, dim)``)."""
    arr = to_float64(x, name, check_finite=check_finite)
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} (batch dims, heads, dim) "
                         f"to match the state, got {arr.shape}")
    return arr


def check_tokens(q_t, k_t, v_t, batch_shape, heads_q, heads_kv, d, dv, *,
                 check_finite: bool = True):
    """:func:`check_token` for the ``(q_t, k_t, v_t)`` of one ``step``."""
    bs = tuple(batch_shape)
    return (check_token(q_t, "q_t", bs + (heads_q, d), check_finite=check_finite),
            check_token(k_t, "k_t", bs + (heads_kv, d), check_finite=check_finite),
            check_token(v_t, "v_t", bs + (heads_kv, dv), check_finite=check_finite))


def check_sizes(batch_shape, heads_q, heads_kv, d, dv, *, min_dv: int = 1):
    """Validate the sizes an ``init_state`` receives; returns them as
    ``(batch_shape tuple, heads_q, heads_kv, d, dv)`` ints."""
    batch_shape = tuple(check_int("batch_shape entries", b, minimum=1) for b in batch_shape)
    heads_q = check_int("heads_q", heads_q, minimum=1)
    heads_kv = check_int("heads_kv", heads_kv, minimum=1)
    if heads_q % heads_kv:
        raise ValueError(f"query heads Hq={heads_q} must be a positive multiple of KV "
                         f"heads Hkv={heads_kv} (grouped-query attention)")
    return (batch_shape, heads_q, heads_kv, check_int("d", d, minimum=1),
            check_int("dv", dv, minimum=min_dv))


def attend_token(q_t, keys, values, *, scale=None, mask=None) -> np.ndarray:
    """Softmax attention of one query token per head over cached keys: the decode step of
    the KV-cache states.

    ``q_t (*b, Hq, D)``, ``keys (*b, Hkv, L, D)``, ``values (*b, Hkv, L, Dv)`` (query head
    ``h`` reads KV head ``h // (Hq // Hkv)``), optional boolean ``mask`` broadcastable to
    ``(*b, Hq, L)`` (True keeps a key; every query needs one). Returns ``(*b, Hq, Dv)``:
    ``softmax(scale · q_t Kᵀ) V`` with ``scale = 1/sqrt(D)`` by default. Works on strided
    views of larger buffers without copying them (no input checks: callers check tokens).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 4, 5, 8))
    >>> out = attend_token(q[:, 4], k[:2], v[:2])          # 4 query heads, 2 KV heads
    >>> bool(np.allclose(out, ra.attention(q[:, 4:], k[:2], v[:2])[:, 0]))
    True
    """
    *lead, hq, d = q_t.shape
    hkv = keys.shape[-3]
    grouped = q_t.reshape(tuple(lead) + (hkv, hq // hkv, d)) * resolve_scale(scale, d)
    logits = grouped @ np.swapaxes(keys, -1, -2)           # (*b, Hkv, G, L)
    if mask is not None:
        keep = np.broadcast_to(mask, tuple(lead) + (hq, keys.shape[-2]))
        logits = np.where(keep.reshape(logits.shape), logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(tuple(lead) + (hq, values.shape[-1]))
