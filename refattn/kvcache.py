r"""Decoding with a KV cache for exact attention: the streaming forms of
:func:`refattn.attention`, :func:`refattn.sink_attention`, plus split-KV decoding.

Each step appends token ``t``'s key/value to a cache and computes

.. math:: o_t = \operatorname{softmax}\big(\tfrac{1}{\sqrt D} q_t K_{\text{cache}}^\top\big)
          V_{\text{cache}}

over the cached keys (Pope et al. 2022, "Efficiently Scaling Transformer Inference";
StreamingLLM, Xiao et al. 2024, for sinks + window). The cache stores ``Hkv`` heads
(grouped-query attention): query head ``h`` reads KV head ``h // (Hq // Hkv)``.
States follow :mod:`refattn.streaming`: ``step`` is functional, the old state is
unchanged. Every state reports ``nbytes_after(n)``, its size after ``n`` tokens,
without stepping.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._inputs import check_int, to_float64
from .exact import attention, merge_partials
from .registry import _REGISTRY
from .streaming import State, Window, attend_token, check_sizes, check_token

__all__ = ["FullCacheState", "SinkWindowState", "full_cache_init", "full_cache_step",
           "full_cache_from",
           "ring_init", "ring_step", "paged_init", "paged_step", "PagedCacheState",
           "sink_init", "quantize", "dequantize", "quantized_init", "quantized_step",
           "quantization_error", "QuantizedCacheState", "sink_step", "split_kv_decode",
           "state_size_table"]


def _tokens(state, q_t, k_t, v_t):
    b, hq, hkv, d, dv = state.sizes
    return (check_token(q_t, "q_t", b + (hq, d)), check_token(k_t, "k_t", b + (hkv, d)),
            check_token(v_t, "v_t", b + (hkv, dv)))


@dataclasses.dataclass(frozen=True)
class FullCacheState(State):
    """Full KV cache: ``keys (*b, Hkv, t, D)``, ``values (*b, Hkv, t, Dv)``; grows by one
    token per step. The tokens live in a :class:`refattn.streaming.Window` (buffers with
    spare capacity), so a step appends in amortized O(1) instead of copying the cache,
    and no state ever changes. ``nbytes`` counts the ``t`` cached tokens (the buffers
    hold at most about twice that).
    """

    cache: Window
    sizes: tuple
    scale: float | None

    @property
    def keys(self) -> np.ndarray:
        return self.cache.keys_view

    @property
    def values(self) -> np.ndarray:
        return self.cache.values_view

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens: ``prod(batch)·Hkv·n·(D + Dv)·8``."""
        b, _, hkv, d, dv = self.sizes
        return int(np.prod(b, dtype=np.int64)) * hkv * check_int("n", n, minimum=0) * (d + dv) * 8


def full_cache_init(*, batch_shape=(), heads_q, heads_kv, d, dv, scale=None):
    """Empty full KV cache for :func:`refattn.attention` (causal decoding).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 4, 8))
    >>> s = full_cache_init(heads_q=2, heads_kv=2, d=8, dv=8)
    >>> outs = []
    >>> for t in range(4):
    ...     o, s = full_cache_step(s, q[:, t], k[:, t], v[:, t]); outs.append(o)
    >>> bool(np.allclose(np.stack(outs, 1), ra.attention(q, k, v, causal=True)))
    True
    """
    sizes = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    b, _, hkv, d, dv = sizes
    return FullCacheState(position=0, cache=Window.empty(b + (hkv, d), b + (hkv, dv)),
                          sizes=sizes, scale=scale)


def full_cache_from(k, v, *, heads_q, scale=None):
    """A full cache already holding ``k (*b, Hkv, t, D)``, ``v (*b, Hkv, t, Dv)`` (after a
    prefill), ready for :func:`full_cache_step`.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> s = full_cache_from(k[:, :5], v[:, :5], heads_q=1)
    >>> o, s = full_cache_step(s, q[:, 5], k[:, 5], v[:, 5])
    >>> bool(np.allclose(o, ra.attention(q, k, v, causal=True)[:, 5])), s.position
    (True, 6)
    """
    k, v = (to_float64(x, name) for x, name in ((k, "k"), (v, "v")))
    if k.ndim < 3 or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"k and v must have shapes (*batch, Hkv, t, D) and "
                         f"(*batch, Hkv, t, Dv); got k {k.shape}, v {v.shape}")
    *b, hkv, t, d = k.shape
    sizes = check_sizes(b, heads_q, hkv, d, v.shape[-1])
    return FullCacheState(position=t, cache=Window(k.copy(), v.copy(), 0, t, [t]),
                          sizes=sizes, scale=scale)


def full_cache_step(state, q_t, k_t, v_t):
    """Append ``k_t (*b, Hkv, D)``, ``v_t (*b, Hkv, Dv)``; attend ``q_t (*b, Hq, D)`` to
    all cached tokens. Returns ``(out_t (*b, Hq, Dv), new_state)``. Example: see
    :func:`full_cache_init`."""
    q_t, k_t, v_t = _tokens(state, q_t, k_t, v_t)
    new = state.replace(position=state.position + 1,
                        cache=state.cache.append(k_t, v_t, keep=len(state.cache)))
    return attend_token(q_t, new.keys, new.values, scale=state.scale), new


@dataclasses.dataclass(frozen=True)
class SinkWindowState(State):
    """Fixed-size cache: ``sinks`` slots for the first tokens and the ``window + 1`` most
    recent later tokens in ``recent`` (a :class:`refattn.streaming.Window`: steps append
    in amortized O(1) rather than copying the window). ``dilation``: one int per query
    head, head ``h`` reading only keys ``j`` with ``(t - j) % dilation[h] == 0`` (None:
    every key). ``nbytes`` counts the ``sinks + window + 1`` slots the cache holds."""

    sink_keys: np.ndarray
    sink_values: np.ndarray
    recent: Window
    sizes: tuple
    window: int
    sinks: int
    scale: float | None
    dilation: tuple | None = None

    @property
    def nbytes(self) -> int:
        return self.nbytes_after(self.position)

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens: constant, ``prod(batch)·Hkv·(s+w+1)·(D+Dv)·8``."""
        check_int("n", n, minimum=0)
        b, _, hkv, d, dv = self.sizes
        return int(np.prod(b, dtype=np.int64)) * hkv * (self.sinks + self.window + 1) * (d + dv) * 8


def sink_init(*, batch_shape=(), heads_q, heads_kv, d, dv, window, sinks=4, scale=None):
    """Fixed-size StreamingLLM cache for :func:`refattn.sink_attention` with
    ``causal=True``: ``sinks`` first tokens plus the last ``window + 1`` tokens.

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
    return SinkWindowState(position=0, sink_keys=np.zeros(b + (hkv, sinks, d)),
                           sink_values=np.zeros(b + (hkv, sinks, dv)),
                           recent=Window.empty(b + (hkv, d), b + (hkv, dv)), sizes=sizes,
                           window=window, sinks=sinks, scale=scale)


def sink_step(state, q_t, k_t, v_t):
    """Write token ``t`` into its sink slot (``t < sinks``) or append it to the recent
    window (which then drops its oldest token); attend ``q_t`` to the sinks and the window
    (keys ``j < sinks`` or ``t - window <= j <= t``). Returns ``(out_t, new_state)``.
    Example: see :func:`sink_init`."""
    q_t, k_t, v_t = _tokens(state, q_t, k_t, v_t)
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
    if state.dilation is not None and any(x != 1 for x in state.dilation):
        held = np.concatenate([np.arange(n_sink), t + 1 - n_recent + np.arange(n_recent)])
        mask = (t - held)[None, :] % np.asarray(state.dilation)[:, None] == 0   # (Hq, L)
    return attend_token(q_t, keys, values, scale=state.scale, mask=mask), new


def ring_init(*, batch_shape=(), heads_q, heads_kv, d, dv, window, right=0, dilation=1,
              scale=None, **_ignored):
    """Sliding-window ring buffer of ``window + 1`` slots: the streaming form of
    :func:`refattn.sliding_window_attention` with ``causal=True`` (keys
    ``t - window <= j <= t`` with ``(t - j) % dilation == 0``; ``dilation`` one number or
    one per query head). Causality cuts every look-ahead key, so ``right`` changes
    nothing here. ``_ignored``: the parallel form's options (``method`` etc.).

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
    return state.replace(dilation=tuple(int(x) for x in np.broadcast_to(dil, (state.sizes[1],))))


ring_step = sink_step


def split_kv_decode(q_t, k_cache, v_cache, splits, *, scale=None):
    """Split-KV (flash-decoding) attention of one query token over a cache.

    ``q_t (*b, Hq, D)``, ``k_cache (*b, Hkv, L, D)``, ``v_cache (*b, Hkv, L, Dv)``; the
    cache is cut into ``splits`` contiguous shards (empty shards allowed when
    ``splits > L``), each attended separately with its lse, and merged by
    :func:`refattn.merge_partials`: ``o = sum_s exp(lse_s - lse) o_s``. Returns
    ``(*b, Hq, Dv)``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8)); k, v = rng.standard_normal((2, 1, 5, 8))
    >>> bool(np.allclose(split_kv_decode(q, k, v, 3), ra.attention(q[:, None], k, v)[:, 0]))
    True
    """
    splits = check_int("splits", splits, minimum=1)
    q_t = np.asarray(q_t, dtype=np.float64)
    if q_t.ndim < 2:
        raise ValueError(f"q_t must have shape (*batch, Hq, D), got {q_t.shape}")
    length = np.shape(k_cache)[-2]
    bounds = np.linspace(0, length, splits + 1).round().astype(int)
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        o, lse = attention(q_t[..., None, :], np.asarray(k_cache)[..., lo:hi, :],
                           np.asarray(v_cache)[..., lo:hi, :], scale=scale, return_lse=True)
        outs.append(o)
        lses.append(lse)
    if not outs:
        raise ValueError("k_cache holds no tokens (L = 0)")
    return merge_partials(outs, lses)[0][..., 0, :]


@dataclasses.dataclass(frozen=True)
class PagedCacheState(State):
    """Paged KV cache (vLLM's PagedAttention, Kwon et al. 2023): a preallocated pool
    ``key_pages (P, *b, Hkv, page_size, D)``, ``value_pages (P, *b, Hkv, page_size, Dv)``
    and a page table ``page_table`` (tuple of physical page ids, logical order)."""

    key_pages: np.ndarray
    value_pages: np.ndarray
    page_table: tuple
    allocation: tuple
    sizes: tuple
    page_size: int
    scale: float | None

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens: the pool, ``P·prod(batch)·Hkv·page_size·(D+Dv)·8``
        (constant; preallocated), plus nothing for the page table (a tuple)."""
        check_int("n", n, minimum=0)
        return self.key_pages.nbytes + self.value_pages.nbytes


def paged_init(*, batch_shape=(), heads_q, heads_kv, d, dv, page_size, num_pages,
               allocation=None, scale=None):
    """Empty paged cache with a pool of ``num_pages`` pages of ``page_size`` tokens.
    New pages are taken in the order ``allocation`` (a permutation of a subset of
    ``range(num_pages)``; default ``0, 1, 2, ...``), so tests can allocate out of order.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 7, 4))
    >>> s = paged_init(heads_q=1, heads_kv=1, d=4, dv=4, page_size=3, num_pages=3,
    ...                allocation=(2, 0, 1))
    >>> outs = []
    >>> for t in range(7):
    ...     o, s = paged_step(s, q[:, t], k[:, t], v[:, t]); outs.append(o)
    >>> s.page_table, bool(np.allclose(np.stack(outs, 1), ra.attention(q, k, v, causal=True)))
    ((2, 0, 1), True)
    """
    sizes = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    page_size = check_int("page_size", page_size, minimum=1)
    num_pages = check_int("num_pages", num_pages, minimum=1)
    allocation = tuple(range(num_pages)) if allocation is None else tuple(
        check_int("allocation entries", a, minimum=0) for a in allocation)
    if len(set(allocation)) != len(allocation) or any(a >= num_pages for a in allocation):
        raise ValueError(f"allocation must list distinct page ids < num_pages={num_pages}, "
                         f"got {allocation}")
    b, _, hkv, d, dv = sizes
    return PagedCacheState(position=0,
                           key_pages=np.zeros((num_pages,) + b + (hkv, page_size, d)),
                           value_pages=np.zeros((num_pages,) + b + (hkv, page_size, dv)),
                           page_table=(), allocation=allocation, sizes=sizes,
                           page_size=page_size, scale=scale)


def paged_step(state, q_t, k_t, v_t):
    """Write token ``t`` at offset ``t % page_size`` of logical page ``t // page_size``
    (allocating the next page of ``allocation`` when a page fills), gather the pages of
    the page table in logical order, and attend ``q_t`` to the first ``t + 1`` tokens.
    Returns ``(out_t, new_state)``; raises ValueError when the pool is exhausted.
    Example: see :func:`paged_init`."""
    q_t, k_t, v_t = _tokens(state, q_t, k_t, v_t)
    t, ps = state.position, state.page_size
    table = state.page_table
    if t % ps == 0:
        if len(table) >= len(state.allocation):
            raise ValueError(f"paged cache is full: {len(state.allocation)} pages of "
                             f"{ps} tokens hold {t} tokens")
        table = table + (state.allocation[len(table)],)
    kp, vp = state.key_pages.copy(), state.value_pages.copy()
    kp[table[-1], ..., t % ps, :], vp[table[-1], ..., t % ps, :] = k_t, v_t
    idx = list(table)
    keys = np.concatenate(list(kp[idx]), axis=-2)[..., :t + 1, :]
    values = np.concatenate(list(vp[idx]), axis=-2)[..., :t + 1, :]
    new = state.replace(position=t + 1, key_pages=kp, value_pages=vp, page_table=table)
    return attend_token(q_t, keys, values, scale=state.scale), new


_KINDS = ("int8", "int8-channel", "fp8")


def quantize(x, kind, *, group_size=32):
    """Quantize keys or values ``x (..., T, D)``; returns ``(codes, scales)`` with
    ``dequantize(codes, scales, group_size=...) ~ x``.

    ``kind="int8"``: symmetric per-token int8 (one scale per row of ``D``),
    ``scale = max|x| / 127`` (1 for an all-zero row),
    ``code = clip(round_half_to_even(x / scale), -127, 127)``; so
    ``|x - code·scale| <= scale / 2``. ``kind="int8-channel"``: the same rule with one scale
    per channel for each group of ``group_size`` consecutive tokens (KIVI, Liu et al. 2024:
    keys have outlier channels, which per-token scales spread over the whole row); scales
    ``(..., ceil(T / group_size), D)``, the last group possibly shorter.
    ``kind="fp8"``: ``ml_dtypes.float8_e4m3fn`` (round to nearest even, no scale; finite
    inputs must satisfy ``|x| <= 448``), relative error ``<= 2**-4`` for normals
    (``|x| >= 2**-6``) and absolute ``<= 2**-10`` below.

    >>> x = np.array([[1.0, -0.5, 0.25], [0.5, 0.25, -0.25]])
    >>> c, s = quantize(x, "int8")
    >>> c, dequantize(c, s).round(4)
    (array([[127, -64,  32],
           [127,  64, -64]], dtype=int8), array([[ 1.    , -0.5039,  0.252 ],
           [ 0.5   ,  0.252 , -0.252 ]]))
    >>> c, s = quantize(x, "int8-channel", group_size=2)     # one scale per column
    >>> c, s.shape
    (array([[ 127, -127,  127],
           [  64,   64, -127]], dtype=int8), (1, 3))
    """
    x = np.asarray(x, dtype=np.float64)
    if kind in ("int8", "int8-channel"):
        if kind == "int8":
            top = np.abs(x).max(axis=-1, keepdims=True)
        else:
            if x.ndim < 2:
                raise ValueError(f"int8-channel quantizes (..., tokens, channels); got "
                                 f"shape {x.shape}")
            g = check_int("group_size", group_size, minimum=1)
            starts = np.arange(0, x.shape[-2], g)
            top = np.maximum.reduceat(np.abs(x), starts, axis=-2) if x.shape[-2] else \
                np.zeros(x.shape[:-2] + (0, x.shape[-1]))
        scale = np.where(top > 0, top / 127.0, 1.0)
        full = scale if kind == "int8" else _expand(scale, group_size, x.shape[-2])
        return np.clip(np.rint(x / full), -127, 127).astype(np.int8), scale
    if kind == "fp8":
        import ml_dtypes
        if np.abs(x).max(initial=0.0) > 448:
            raise ValueError("fp8 e4m3 holds |x| <= 448; got larger keys/values")
        return x.astype(ml_dtypes.float8_e4m3fn), None
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def _expand(scales, group_size, tokens):
    """Per-group channel scales ``(..., groups, D)`` repeated to ``(..., tokens, D)``."""
    return np.repeat(scales, group_size, axis=-2)[..., :tokens, :]


def dequantize(codes, scales, *, group_size=None):
    """Inverse of :func:`quantize`: ``codes · scales`` (int8; pass ``group_size`` for
    ``"int8-channel"`` codes) or ``codes`` as float64 (fp8). Example: see
    :func:`quantize`."""
    out = codes.astype(np.float64)
    if scales is None:
        return out
    return out * (scales if group_size is None else
                  _expand(scales, group_size, codes.shape[-2]))


@dataclasses.dataclass(frozen=True)
class QuantizedCacheState(State):
    """Full cache of quantized keys/values (``kind`` "int8" per token, "int8-channel" per
    channel and group of tokens, or "fp8" e4m3): codes ``(*b, Hkv, t, D)`` (1 byte each),
    float64 scales (``(*b, Hkv, t, 1)`` int8; ``(*b, Hkv, t // group_size, D)``
    int8-channel; empty fp8), and, for int8-channel, the float64 ``residual`` tokens of the
    group being filled (``t % group_size`` of them), as KIVI keeps them."""

    key_codes: np.ndarray
    value_codes: np.ndarray
    key_scales: np.ndarray
    value_scales: np.ndarray
    residual_keys: np.ndarray
    residual_values: np.ndarray
    sizes: tuple
    kind: str
    group_size: int
    scale: float | None

    def nbytes_after(self, n: int) -> int:
        """Bytes after ``n`` tokens: codes ``n·(D + Dv)`` plus 16 bytes of scales per token
        (int8), or ``(D + Dv)·8`` bytes of scales per full group and 8 bytes per channel
        for each of the ``n % group_size`` residual tokens (int8-channel); times
        ``prod(b)·Hkv``."""
        b, _, hkv, d, dv = self.sizes
        n = check_int("n", n, minimum=0)
        if self.kind == "int8-channel":
            groups, rest = divmod(n, self.group_size)
            per = groups * self.group_size * (d + dv) + (groups + rest) * (d + dv) * 8
        else:
            per = n * (d + dv + (16 if self.kind == "int8" else 0))
        return int(np.prod(b, dtype=np.int64)) * hkv * per

    def dequantized(self):
        """``(keys, values)`` the cache holds, float64 ``(*b, Hkv, t, D)``."""
        group = self.group_size if self.kind == "int8-channel" else None
        scales = (None, None) if self.kind == "fp8" else (self.key_scales, self.value_scales)
        return tuple(_cat(dequantize(codes, sc, group_size=group), rest) for codes, sc, rest
                     in ((self.key_codes, scales[0], self.residual_keys),
                         (self.value_codes, scales[1], self.residual_values)))


def quantized_init(*, batch_shape=(), heads_q, heads_kv, d, dv, kind="int8", group_size=32,
                   scale=None):
    """Empty quantized full cache (:func:`quantize` rules). Scales are fixed when a token
    (int8, fp8) or a group of ``group_size`` tokens (int8-channel) is written, so streaming
    never requantizes; int8-channel keeps the tokens of the unfinished group in float64.
    ``step`` equals :func:`refattn.attention` over the dequantized keys/values.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 4))
    >>> s = quantized_init(heads_q=1, heads_kv=1, d=4, dv=4, kind="fp8")
    >>> for t in range(5):
    ...     o, s = quantized_step(s, q[:, t], k[:, t], v[:, t])
    >>> kd = dequantize(s.key_codes, None); vd = dequantize(s.value_codes, None)
    >>> bool(np.array_equal(o, ra.attention(q[:, 4:], kd, vd)[:, 0]))
    True
    """
    sizes = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    group_size = check_int("group_size", group_size, minimum=1)
    b, _, hkv, d, dv = sizes
    dt = np.int8
    if kind == "fp8":
        import ml_dtypes
        dt = ml_dtypes.float8_e4m3fn
    width = {"int8": (1, 1), "int8-channel": (d, dv), "fp8": (0, 0)}[kind]
    return QuantizedCacheState(position=0, key_codes=np.zeros(b + (hkv, 0, d), dt),
                               value_codes=np.zeros(b + (hkv, 0, dv), dt),
                               key_scales=np.zeros(b + (hkv, 0, width[0])),
                               value_scales=np.zeros(b + (hkv, 0, width[1])),
                               residual_keys=np.zeros(b + (hkv, 0, d)),
                               residual_values=np.zeros(b + (hkv, 0, dv)),
                               sizes=sizes, kind=kind, group_size=group_size, scale=scale)


def _cat(a, x):
    return np.concatenate([a, x], axis=-2)


def quantized_step(state, q_t, k_t, v_t):
    """Quantize and append ``k_t``, ``v_t`` (int8-channel: once their group is full);
    attend ``q_t`` to the dequantized cache (and the float64 residual). Example: see
    :func:`quantized_init`."""
    q_t, k_t, v_t = _tokens(state, q_t, k_t, v_t)
    kind, g = state.kind, state.group_size
    fresh_k, fresh_v = k_t[..., None, :], v_t[..., None, :]
    if kind == "int8-channel":
        fresh_k = _cat(state.residual_keys, fresh_k)
        fresh_v = _cat(state.residual_values, fresh_v)
    changes = dict(residual_keys=fresh_k[..., :0, :], residual_values=fresh_v[..., :0, :])
    if kind != "int8-channel" or fresh_k.shape[-2] == g:
        (kc, ks), (vc, vs) = (quantize(x, kind, group_size=g) for x in (fresh_k, fresh_v))
        changes.update(key_codes=_cat(state.key_codes, kc),
                       value_codes=_cat(state.value_codes, vc))
        if kind != "fp8":
            changes.update(key_scales=_cat(state.key_scales, ks),
                           value_scales=_cat(state.value_scales, vs))
    else:
        changes.update(residual_keys=fresh_k, residual_values=fresh_v)
    new = state.replace(position=state.position + 1, **changes)
    keys, values = new.dequantized()
    return attend_token(q_t, keys, values, scale=state.scale), new


def quantization_error(q, k, v, kind="int8", *, group_size=32):
    """Error of a quantized cache vs the float64 cache for queries ``q (..., Hq, N, D)``,
    keys ``k``, values ``v`` (causal decoding; int8-channel quantizes every group, the
    last one too, so this bounds what a cache holding a float64 residual would show).
    Returns a dict: ``key_max_abs``, ``value_max_abs`` (max elementwise dequantization
    errors), ``key_bound``, ``value_bound`` (the per-element bound: ``scale/2`` for int8,
    ``max(|x|·2**-4, 2**-10)`` for fp8, maximized), and ``out_max_abs`` (max |output
    difference|).

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> e = quantization_error(q, k, v, "int8")
    >>> e["key_max_abs"] <= e["key_bound"], e["out_max_abs"] < 0.05
    (True, True)
    """
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    res = {}
    group = group_size if kind == "int8-channel" else None
    recon = {}
    for name, x in (("key", k), ("value", v)):
        c, s = quantize(x, kind, group_size=group_size)
        recon[name] = dequantize(c, s, group_size=group)
        err = np.abs(recon[name] - x)
        bound = (np.maximum(np.abs(x) * 2.0**-4, 2.0**-10) if kind == "fp8" else
                 (s if group is None else _expand(s, group, x.shape[-2])) / 2)
        res[f"{name}_max_abs"] = float(err.max(initial=0.0))
        res[f"{name}_bound"] = float(np.broadcast_to(bound, x.shape).max(initial=0.0))
        res[f"{name}_within_bound"] = bool((err <= bound).all())
    res["out_max_abs"] = float(np.abs(attention(q, recon["key"], recon["value"], causal=True)
                                      - attention(q, k, v, causal=True)).max(initial=0.0))
    return res


def _register():
    _REGISTRY["attention"]["streaming"] = (full_cache_init, full_cache_step)
    for name, stream in (("sink_attention", (sink_init, sink_step)),
                         ("sliding_window_attention", (ring_init, ring_step))):
        _REGISTRY[name]["streaming"] = stream
        _REGISTRY[name]["flags"]["constant_state"] = True


_register()


def state_size_table(ns=(1_000, 16_000, 256_000, 1_000_000), *, batch_shape=(),
                     heads_q=32, heads_kv=8, d=128, dv=128, budget=4096, ssm_state=16):
    """Bytes of state after each ``n`` in ``ns`` tokens for every registered streaming
    mechanism, from ``state.nbytes_after(n)`` where the state has it (else, for constant
    states, ``nbytes`` after one token). Parameters: ``spec.budget(max(ns), budget)``
    where registered (a window of ``budget`` keys, ...), else ``spec.example``. Two
    recurrences that are not attention are added for comparison, each with ``Hq·D``
    channels (the width of the layer): ``linear_rnn`` (one number per channel) and
    ``selective_scan`` (Mamba, ``ssm_state`` numbers per channel). Returns
    ``{name: {n: bytes}}``.

    >>> t = state_size_table((1000,), heads_q=4, heads_kv=1, d=8, dv=8)
    >>> t["attention"][1000], t["selective_scan"][1000]
    (128000, 4096)
    """
    from .linear_rnn import linear_rnn_init_state
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
    width, batch = heads_q * d, int(np.prod(batch_shape, dtype=np.int64))
    rnn = linear_rnn_init_state(batch_shape=batch_shape, dim=width)
    scan = selective_scan_init_state(batch=batch, A=-np.ones((width, ssm_state)))
    table["linear_rnn"] = {n: rnn.nbytes for n in ns}
    table["selective_scan"] = {n: scan.nbytes for n in ns}
    return table
