r"""Decoding with a KV cache for exact attention: the streaming form of
:func:`refattn.attention` (a full cache), a paged cache and a quantized cache. The
fixed-size caches of :func:`refattn.sink_attention` and
:func:`refattn.sliding_window_attention` live beside them in :mod:`refattn.sparse.local`,
split-KV decoding in :mod:`refattn.exact.merge`; ``refattn.kvcache`` gathers them all.

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

from .._core.checks import check_int
from ..boundary.arrays import to_float64
from ..registry import attach
from ..streaming import State, Window, attend_token, check_sizes, check_tokens
from .dense import attention
from .quantize import KINDS, dequantize, quantize_named

__all__ = ["FullCacheState", "full_cache_init", "full_cache_step", "full_cache_from",
           "PagedCacheState", "paged_init", "paged_step", "QuantizedCacheState",
           "quantized_init", "quantized_step"]


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
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, *state.sizes)
    new = state.replace(position=state.position + 1,
                        cache=state.cache.append(k_t, v_t, keep=len(state.cache)))
    return attend_token(q_t, new.keys, new.values, scale=state.scale), new


@dataclasses.dataclass(frozen=True)
class PagedCacheState(State):
    """Paged KV cache (vLLM's PagedAttention, Kwon et al. 2023): a preallocated pool of
    ``num_pages`` pages of ``page_size`` tokens and a page table ``page_table`` (tuple of
    physical page ids, logical order).

    The pages in use are held one array each, ``key_blocks[i]`` ``(*b, Hkv, page_size,
    D)`` for page ``page_table[i]`` (likewise ``value_blocks``), so that a step copies
    only the page it writes (O(page), not O(pool)) and no state ever changes. The pool
    ``key_pages (P, *b, Hkv, page_size, D)``, ``value_pages (P, *b, Hkv, page_size, Dv)``
    (unused pages and slots 0) is assembled when read, in O(pool)."""

    key_blocks: tuple
    value_blocks: tuple
    num_pages: int
    page_table: tuple
    allocation: tuple
    sizes: tuple
    page_size: int
    scale: float | None

    @property
    def key_pages(self) -> np.ndarray:
        return self._pool(self.key_blocks, self.sizes[3])

    @property
    def value_pages(self) -> np.ndarray:
        return self._pool(self.value_blocks, self.sizes[4])

    def _pool(self, blocks, dim):
        b, _, hkv = self.sizes[:3]
        pool = np.zeros((self.num_pages,) + b + (hkv, self.page_size, dim))
        for page, block in zip(self.page_table, blocks):
            pool[page] = block
        return pool

    @property
    def nbytes(self) -> int:
        """The preallocated pool's bytes (:meth:`nbytes_after`)."""
        return self.nbytes_after(self.position)

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens: the pool, ``P·prod(batch)·Hkv·page_size·(D+Dv)·8``
        (constant; preallocated), plus nothing for the page table (a tuple)."""
        check_int("n", n, minimum=0)
        b, _, hkv, d, dv = self.sizes
        return (self.num_pages * int(np.prod(b, dtype=np.int64)) * hkv * self.page_size
                * (d + dv) * 8)


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
    return PagedCacheState(position=0, key_blocks=(), value_blocks=(), num_pages=num_pages,
                           page_table=(), allocation=allocation, sizes=sizes,
                           page_size=page_size, scale=scale)


def paged_step(state, q_t, k_t, v_t):
    """Write token ``t`` at offset ``t % page_size`` of logical page ``t // page_size``
    (allocating the next page of ``allocation`` when a page fills), gather the pages of
    the page table in logical order, and attend ``q_t`` to the first ``t + 1`` tokens.
    Returns ``(out_t, new_state)``; raises ValueError when the pool is exhausted. A step
    copies the one page it writes (and the tuple of page references), never the pool;
    :func:`refattn.paged_attention` reads the pool (``kv_layout="HND"`` when
    ``batch_shape=()``).
    Example: see :func:`paged_init`."""
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, *state.sizes)
    t, ps = state.position, state.page_size
    table, kb, vb = state.page_table, state.key_blocks, state.value_blocks
    if t % ps == 0:
        if len(table) >= len(state.allocation):
            raise ValueError(f"paged cache is full: {len(state.allocation)} pages of "
                             f"{ps} tokens hold {t} tokens")
        table = table + (state.allocation[len(table)],)
        page_k, page_v = (np.zeros(x.shape[:-1] + (ps, x.shape[-1])) for x in (k_t, v_t))
    else:                                 # copy the last page only: old states keep theirs
        page_k, page_v, kb, vb = kb[-1].copy(), vb[-1].copy(), kb[:-1], vb[:-1]
    page_k[..., t % ps, :], page_v[..., t % ps, :] = k_t, v_t
    kb, vb = kb + (page_k,), vb + (page_v,)
    keys = np.concatenate(kb, axis=-2)[..., :t + 1, :]
    values = np.concatenate(vb, axis=-2)[..., :t + 1, :]
    new = state.replace(position=t + 1, key_blocks=kb, value_blocks=vb, page_table=table)
    return attend_token(q_t, keys, values, scale=state.scale), new


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
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, *state.sizes)
    kind, g = state.kind, state.group_size
    fresh_k, fresh_v = k_t[..., None, :], v_t[..., None, :]
    if kind == "int8-channel":
        fresh_k = _cat(state.residual_keys, fresh_k)
        fresh_v = _cat(state.residual_values, fresh_v)
    changes = dict(residual_keys=fresh_k[..., :0, :], residual_values=fresh_v[..., :0, :])
    if kind != "int8-channel" or fresh_k.shape[-2] == g:
        (kc, ks), (vc, vs) = (quantize_named(x, kind, g, name) for x, name in (
            (fresh_k, "k_t"), (fresh_v, "v_t")))
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


attach(attention, init_state=full_cache_init, step=full_cache_step)
