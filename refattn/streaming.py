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

from ._core.checks import check_int, is_int, resolve_scale
from .boundary.arrays import to_float64

__all__ = ["State", "Window", "check_token", "check_tokens", "check_sizes", "attend_token",
           "state_size_table"]


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


@dataclasses.dataclass(frozen=True)
class Window:
    """The most recent keys and values of a stream, in order:
    ``keys[..., start:end, :]``, ``values[..., start:end, :]`` of buffers with spare
    room, so that :meth:`append` costs amortized O(1) rows instead of a copy of the
    window. A ``Window`` never changes: it sees only its own ``start:end``; appending to
    a window whose buffer another append has already extended copies first.

    >>> w = Window.empty((1, 2), (1, 2))
    >>> for t in range(5):
    ...     w = w.append(np.full((1, 2), t), np.full((1, 2), -t), keep=2)
    >>> w.keys_view[0, :, 0].tolist(), len(w)
    ([2.0, 3.0, 4.0], 3)
    """

    keys: np.ndarray
    values: np.ndarray
    start: int = 0
    end: int = 0
    filled: list = dataclasses.field(default_factory=lambda: [0], repr=False,
                                     compare=False)   # buffer slots written, shared

    @classmethod
    def empty(cls, key_shape, value_shape) -> "Window":
        """No tokens; ``key_shape = (*b, Hkv, D)``, ``value_shape = (*b, Hkv, Dv)``."""
        return cls(np.zeros(tuple(key_shape[:-1]) + (0, key_shape[-1])),
                   np.zeros(tuple(value_shape[:-1]) + (0, value_shape[-1])))

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def keys_view(self) -> np.ndarray:
        return self.keys[..., self.start:self.end, :]

    @property
    def values_view(self) -> np.ndarray:
        return self.values[..., self.start:self.end, :]

    def append(self, k_t, v_t, *, keep: int) -> "Window":
        """A window of the last ``keep`` tokens of this one (at most) followed by
        ``k_t (*b, Hkv, D)``, ``v_t (*b, Hkv, Dv)``."""
        start = max(self.end - keep, self.start)
        end, filled, keys, values = self.end, self.filled, self.keys, self.values
        if filled[0] != end or end == keys.shape[-2]:          # shared further, or full
            capacity = max(2 * (end - start + 1), 16)
            keys, values = (np.concatenate([x[..., start:end, :], np.empty(
                x.shape[:-2] + (capacity - (end - start), x.shape[-1]))], axis=-2)
                for x in (keys, values))
            start, end, filled = 0, end - start, [0]
        keys[..., end, :], values[..., end, :] = k_t, v_t
        filled[0] = end + 1
        return Window(keys, values, start, end + 1, filled)


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


def check_batch_shape(batch_shape) -> tuple:
    """``batch_shape`` as a tuple of positive ints (an int ``b`` is ``(b,)``); a
    ``TypeError``/``ValueError`` naming it otherwise."""
    if is_int(batch_shape):
        batch_shape = (batch_shape,)
    if not isinstance(batch_shape, (tuple, list)):
        raise TypeError(f"batch_shape must be a tuple of positive integers, got "
                        f"{batch_shape!r}")
    return tuple(check_int("batch_shape entries", b, minimum=1) for b in batch_shape)


def check_sizes(batch_shape, heads_q, heads_kv, d, dv, *, min_dv: int = 1):
    """Validate the sizes an ``init_state`` receives; returns them as
    ``(batch_shape tuple, heads_q, heads_kv, d, dv)`` ints."""
    batch_shape = check_batch_shape(batch_shape)
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
    ``h`` reads KV head ``h // (Hq // Hkv)``), or tuples of such segments whose lengths
    add up to ``L`` (attended as if concatenated, without copying them); optional boolean
    ``mask`` broadcastable to ``(*b, Hq, L)`` (True keeps a key; every query needs one).
    Returns ``(*b, Hq, Dv)``: ``softmax(scale · q_t Kᵀ) V`` with ``scale = 1/sqrt(D)`` by
    default. Works on strided views of larger buffers (no input checks: callers check
    tokens).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 4, 5, 8))
    >>> out = attend_token(q[:, 4], k[:2], v[:2])          # 4 query heads, 2 KV heads
    >>> bool(np.allclose(out, ra.attention(q[:, 4:], k[:2], v[:2])[:, 0]))
    True
    """
    keys = keys if isinstance(keys, tuple) else (keys,)
    values = values if isinstance(values, tuple) else (values,)
    *lead, hq, d = q_t.shape
    hkv = keys[0].shape[-3]
    grouped = q_t.reshape(tuple(lead) + (hkv, hq // hkv, d)) * resolve_scale(scale, d)
    logits = np.concatenate([grouped @ np.swapaxes(k, -1, -2) for k in keys], axis=-1)
    if mask is not None:                                   # logits: (*b, Hkv, G, L)
        keep = np.broadcast_to(mask, tuple(lead) + (hq, logits.shape[-1]))
        logits = np.where(keep.reshape(logits.shape), logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    bounds = np.cumsum([0] + [k.shape[-2] for k in keys])
    out = sum(weights[..., a:b] @ v for a, b, v in zip(bounds[:-1], bounds[1:], values))
    out = out / weights.sum(axis=-1, keepdims=True)
    return out.reshape(tuple(lead) + (hq, values[0].shape[-1]))


def state_size_table(ns=(1_000, 16_000, 256_000, 1_000_000), *, batch_shape=(),
                     heads_q=32, heads_kv=8, d=128, dv=128, budget=4096, ssm_state=16,
                     mla_latent=512, mla_rope=64):
    """Bytes of state after each ``n`` in ``ns`` tokens for every registered streaming
    mechanism, from ``state.nbytes_after(n)`` where the state has it (else, for constant
    states, ``nbytes`` after one token). Parameters: ``spec.budget(max(ns), budget)``
    where registered (a window of ``budget`` keys, ...), else ``spec.example``. Right
    after ``attention`` (its full cache with ``heads_kv`` heads: GQA at the defaults)
    come the same cache as MHA (``attention_mha``, ``Hkv = Hq``) and MQA
    (``attention_mqa``, ``Hkv = 1``), and DeepSeek-V2's latent cache (``mla_attention``,
    ``mla_latent + mla_rope`` numbers per token whatever the heads:
    :func:`refattn.exact.mla_cache_nbytes`). Two recurrences that are not attention are
    added for comparison, each with ``Hq·D`` channels (the width of the layer):
    ``linear_rnn`` (one number per channel) and ``selective_scan`` (Mamba, ``ssm_state``
    numbers per channel). Returns ``{name: {n: bytes}}``.

    >>> t = state_size_table((1000,), heads_q=4, heads_kv=1, d=8, dv=8)
    >>> t["attention"][1000], t["selective_scan"][1000]
    (128000, 4096)
    >>> t["attention_mha"][1000], t["mla_attention"][1000]     # 4 x 16 vs 576 per token
    (512000, 4608000)
    """
    from .exact.mla import mla_cache_nbytes
    from .recurrent.linear_rnn import linear_rnn_init_state
    from .registry import mechanisms
    from .ssm import selective_scan_init_state
    table = {}
    for name, spec in mechanisms().items():
        if spec.init_state is None:
            continue
        params = dict(spec.budget(max(ns), budget) if spec.budget else spec.example,
                      **({"rng": 0} if spec.randomized else {}))
        state = spec.init_state(batch_shape=batch_shape, heads_q=heads_q, heads_kv=heads_kv,
                                d=d, dv=dv, **params)
        if hasattr(state, "nbytes_after"):
            table[name] = {n: state.nbytes_after(n) for n in ns}
        elif spec.constant_state:   # size after one token; the registry tests that it stays
            token = np.zeros(tuple(batch_shape) + (heads_kv, d))
            _, state = spec.step(state, np.zeros(tuple(batch_shape) + (heads_q, d)), token,
                                 np.zeros(tuple(batch_shape) + (heads_kv, dv)))
            table[name] = {n: state.nbytes for n in ns}
        if name == "attention":
            for label, hkv in (("attention_mha", heads_q), ("attention_mqa", 1)):
                cache = spec.init_state(batch_shape=batch_shape, heads_q=heads_q,
                                        heads_kv=hkv, d=d, dv=dv)
                table[label] = {n: cache.nbytes_after(n) for n in ns}
            table["mla_attention"] = {n: mla_cache_nbytes(n, batch_shape=batch_shape,
                                                          d_latent=mla_latent,
                                                          d_rope=mla_rope) for n in ns}
    width, batch = heads_q * d, int(np.prod(batch_shape, dtype=np.int64))
    rnn = linear_rnn_init_state(batch_shape=batch_shape, dim=width)
    scan = selective_scan_init_state(batch=batch, A=-np.ones((width, ssm_state)))
    table["linear_rnn"] = {n: rnn.nbytes for n in ns}
    table["selective_scan"] = {n: scan.nbytes for n in ns}
    return table
