"""Attention masks as composable predicates.

A mask decides, for query row ``q_idx`` and key ``kv_idx`` (and batch ``b``, query head
``h``), whether the query may attend to the key. Masks are FlexAttention-style predicates
``mask_mod(b, h, q_idx, kv_idx) -> bool`` evaluated on broadcast NumPy integer arrays, so
a simple FlexAttention ``mask_mod`` works unchanged wherever refattn takes ``mask=``.

**Positions.** Queries and keys may have different lengths ``N`` and ``M``. The masks
built here compare *positions*: key ``j`` sits at position ``j``, query row ``i`` at
position ``i' = i + (M - N)`` (bottom-right alignment: the last query is level with the
last key, as in FlashAttention 2 and KV-cache decoding). ``causal`` and
``sliding_window`` take ``align="top_left"`` for ``i' = i``. A mask object learns
``N, M`` from the attention call; calling it directly assumes ``N == M`` unless bound
with :meth:`Mask.bind`. Plain functions receive the raw indices ``i``, ``j``, as in
FlexAttention.

**Tiles.** :meth:`Mask.classify_tiles` labels each ``(block_q, block_k)`` tile of the
``N x M`` grid ``EMPTY`` (no key kept), ``FULL`` (every key kept) or ``PARTIAL``; the
sparse references and the GPU kernels skip empty tiles and evaluate the predicate only
on partial ones. Built-in masks classify analytically in ``O(tiles)``; composed masks
combine their parts' labels conservatively (a tile may be reported ``PARTIAL`` when it
is in fact full or empty, never the reverse).

>>> import refattn as ra
>>> m = ra.masks.causal() & ra.masks.sliding_window(2)
>>> m
causal() & sliding_window(2)
>>> m.materialize(4, 4).astype(int)
array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [1, 1, 1, 0],
       [0, 1, 1, 1]])
>>> m.classify_tiles(4, 4, 2, 2)  # 0 empty, 1 partial, 2 full
array([[1, 0],
       [1, 1]], dtype=int8)
"""
from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass

import numpy as np

from .._core.checks import check_count
from .._core.problem import flatten_leading, gather_broadcast

EMPTY, PARTIAL, FULL = 0, 1, 2
_ALIGNS = ("bottom_right", "top_left")

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "global_tokens",
    "prefix_lm", "document", "sinks", "strided", "block_layout", "random_blocks",
    "from_function", "from_array", "as_mask", "block_window", "fixed", "chunks", "Tiles",
]


def _tile_bounds(length: int, block: int):
    """First and last index of each block of ``range(length)``."""
    lo = np.arange(0, length, block)
    return lo, np.minimum(lo + block, length) - 1


@dataclass(frozen=True)
class Tiles:
    """A grid of tiles to classify: consecutive query tiles ``[q_lo[a], q_hi[a]]`` and
    key tiles ``[k_lo[b], k_hi[b]]`` (inclusive raw indices) of an ``N x M`` problem."""

    q_lo: np.ndarray
    q_hi: np.ndarray
    k_lo: np.ndarray
    k_hi: np.ndarray
    n: int
    m: int

    @classmethod
    def grid(cls, n, m, block_q, block_k, rows=None) -> "Tiles":
        q_lo, q_hi = _tile_bounds(n, block_q)
        if rows is not None:
            q_lo, q_hi = q_lo[rows], q_hi[rows]
        return cls(q_lo, q_hi, *_tile_bounds(m, block_k), n, m)

    @property
    def shape(self) -> tuple:
        return (len(self.q_lo), len(self.k_lo))


def _reduce_tiles(block: np.ndarray, k_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per key tile starting at ``k_lo``, whether any / all of the boolean
    ``(..., rows, M)`` block is kept."""
    flat = block.reshape(-1, block.shape[-1])
    return (np.logical_or.reduceat(flat.any(axis=0), k_lo),
            np.logical_and.reduceat(flat.all(axis=0), k_lo))


class Mask(abc.ABC):
    """A composable attention mask: a predicate on ``(b, h, q_idx, kv_idx)``.

    Subclasses implement :meth:`_eval` (the predicate, given the lengths ``n, m`` or
    ``None`` when unknown) and, when it can be done without evaluating every element,
    :meth:`_classify` with ``analytic = True``.
    """

    name: str = "mask"
    analytic: bool = False  # True: _classify costs O(tiles), not O(N*M)
    _n: int | None = None
    _m: int | None = None

    @abc.abstractmethod
    def _eval(self, b, h, q_idx, kv_idx, n, m) -> np.ndarray:
        """Boolean array, the broadcast of the index arrays' shapes (or smaller)."""

    def _classify(self, t: Tiles) -> np.ndarray:
        """Tile labels by evaluating every element (query tile by query tile), for
        ``b = h = 0``."""
        out = np.empty(t.shape, dtype=np.int8)
        kv = np.arange(t.m)[None, :]
        zero = np.zeros((1, 1, 1, 1), np.int64)
        for row, (a, z) in enumerate(zip(t.q_lo, t.q_hi)):
            keep = np.asarray(self._eval(zero, zero, np.arange(a, z + 1)[:, None], kv,
                                         t.n, t.m))
            keep = np.broadcast_to(keep, keep.shape[:-2] + (z + 1 - a, t.m))
            any_, all_ = _reduce_tiles(keep, t.k_lo)
            out[row] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
        return out

    # -- public API ------------------------------------------------------------------
    def __call__(self, b, h, q_idx, kv_idx):
        """FlexAttention signature. Uses the lengths from :meth:`bind`; unbound masks
        assume ``N == M`` (no alignment offset)."""
        return self._eval(np.asarray(b), np.asarray(h), np.asarray(q_idx),
                          np.asarray(kv_idx), self._n, self._m)

    def bind(self, n: int, m: int) -> "Mask":
        """A copy that knows the query and key lengths, for use as a plain
        ``mask_mod(b, h, q_idx, kv_idx)`` with ``N != M``."""
        n, m = _check_lengths(n, m)
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._n, bound._m = n, m
        return bound

    def materialize(self, n: int, m: int, *, b: int = 0, h: int = 0) -> np.ndarray:
        """The boolean ``(N, M)`` matrix of kept entries for batch ``b``, head ``h``."""
        n, m = _check_lengths(n, m)
        keep = self._eval(np.asarray(b), np.asarray(h), np.arange(n)[:, None],
                          np.arange(m)[None, :], n, m)
        return np.broadcast_to(np.asarray(keep, dtype=bool), (n, m)).copy()

    def classify_tiles(self, n: int, m: int, block_q: int, block_k: int, *,
                       rows: slice | None = None) -> np.ndarray:
        """Label each ``(block_q, block_k)`` tile: ``EMPTY`` (0), ``PARTIAL`` (1) or
        ``FULL`` (2). Returns int8 of shape ``(ceil(N/block_q), ceil(M/block_k))``, or
        only the query-tile rows in the slice ``rows`` (to bound memory at long N).
        The last tiles in each direction may be shorter than a block. Masks that are not
        ``analytic`` are classified by evaluation at ``b = h = 0``."""
        n, m = _check_lengths(n, m)
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if isinstance(val, bool) or not (isinstance(val, (int, np.integer)) and val > 0):
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
            raise ValueError(f"rows must be a slice of consecutive tile rows, got {rows!r}")
        tiles = Tiles.grid(n, m, int(block_q), int(block_k), rows)
        return np.broadcast_to(self._classify(tiles), tiles.shape).astype(np.int8)

    def tile_lists(self, n: int, m: int, block_q: int, block_k: int, *,
                   strip_elements: int = 2**20):
        """The non-empty tiles, row by row, in CSR form: ``(indptr, key_tiles, labels)``
        where query-tile row ``a`` has key tiles ``key_tiles[indptr[a]:indptr[a+1]]``
        with ``labels`` ``PARTIAL`` or ``FULL``. Classifies ``strip_elements`` tiles at a
        time, so memory grows with the non-empty tiles, not with the whole grid.

        >>> import refattn as ra
        >>> indptr, key_tiles, labels = ra.masks.causal().tile_lists(6, 6, 2, 2)
        >>> indptr.tolist(), key_tiles.tolist(), labels.tolist()
        ([0, 1, 3, 6], [0, 0, 1, 0, 1, 2], [1, 2, 1, 2, 2, 1])
        """
        rows = -(-n // block_q)
        step = max(1, strip_elements // max(1, -(-m // block_k)))
        counts, key_tiles, labels = [], [], []
        for r0 in range(0, rows, step):
            lab = self.classify_tiles(n, m, block_q, block_k, rows=slice(r0, r0 + step))
            r, c = np.nonzero(lab)
            counts.append(np.bincount(r, minlength=lab.shape[0]))
            key_tiles.append(c)
            labels.append(lab[r, c])
        indptr = np.zeros(rows + 1, np.int64)
        if rows:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        return (indptr, np.concatenate(key_tiles or [np.zeros(0, np.int64)]),
                np.concatenate(labels or [np.zeros(0, np.int8)]))

    def renamed(self, name: str) -> "Mask":
        """The same mask under another readable ``name``."""
        return _Named(self, name)

    def __and__(self, other) -> "Mask":
        return _And(self, as_mask(other))

    def __rand__(self, other) -> "Mask":
        return _And(as_mask(other), self)

    def __or__(self, other) -> "Mask":
        return _Or(self, as_mask(other))

    def __ror__(self, other) -> "Mask":
        return _Or(as_mask(other), self)

    def __invert__(self) -> "Mask":
        return _Not(self)

    def __repr__(self) -> str:
        return self.name


def _check_lengths(n, m) -> tuple[int, int]:
    for name, val in (("n", n), ("m", m)):
        if not (isinstance(val, (int, np.integer)) and val >= 0):
            raise ValueError(f"mask length {name} must be a non-negative integer, got {val!r}")
    return int(n), int(m)


def _offset(align: str, n, m) -> int:
    if align == "top_left" or n is None or m is None:
        return 0
    return m - n


def _check_align(align) -> str:
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}, got {align!r}")
    return align


# --------------------------------------------------------------------------- bands
class _Band(Mask):
    """Keep key ``j`` for query position ``i'`` iff ``lo <= i' - j <= hi`` and
    ``(i' - j) % dilation == 0``; ``lo``/``hi`` may be infinite."""

    analytic = True

    def __init__(self, lo, hi, dilation, align, name):
        self.lo, self.hi, self.dilation, self.align, self.name = lo, hi, dilation, align, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        pos = q_idx + _offset(self.align, n, m)
        # lo <= pos - j <= hi, compared without forming the distance array
        keep = (kv_idx <= pos - self.lo) & (kv_idx >= pos - self.hi)
        if len(self.dilation) > 1:          # per head: head h uses dilation[h % H]
            dil = np.asarray(self.dilation)[np.asarray(h) % len(self.dilation)]
            keep = keep & ((pos - kv_idx) % dil == 0)
        elif self.dilation[0] > 1:
            keep &= (pos - kv_idx) % self.dilation[0] == 0
        return keep

    def _classify(self, t):
        off = _offset(self.align, t.n, t.m)
        d_min = (t.q_lo + off)[:, None] - t.k_hi[None, :]
        d_max = (t.q_hi + off)[:, None] - t.k_lo[None, :]
        a = np.maximum(d_min, self.lo)   # the distances both present and allowed
        z = np.minimum(d_max, self.hi)
        # With several (per-head) dilations a tile is empty only if it is empty for
        # every one of them, and full only if every dilation is 1.
        if max(self.dilation) > 1:
            empty = np.ones(np.broadcast_shapes(a.shape, z.shape), bool)
            for dil in set(self.dilation):
                empty &= np.ceil(a / dil) * dil > z     # no multiple of dil in [a, z]
            full = ((d_min >= self.lo) & (d_max <= self.hi) & (d_min == d_max) & ~empty
                    & (len(self.dilation) == 1))
        else:
            empty = a > z
            full = (d_min >= self.lo) & (d_max <= self.hi)
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


def causal(align: str = "bottom_right") -> Mask:
    """Keep key ``j`` for query ``i`` iff ``j <= i'``.

    ``i' = i + (M - N)`` (bottom-right, default) or ``i' = i`` (``align="top_left"``).
    With ``N > M`` bottom-right alignment leaves the first ``N - M`` rows fully masked;
    their output is 0.
    """
    _check_align(align)
    name = "causal()" if align == "bottom_right" else f"causal(align={align!r})"
    return _Band(0, math.inf, (1,), align, name)


def sliding_window(left: int, right: int = 0, dilation: int = 1,
                   align: str = "bottom_right") -> Mask:
    """Keep key ``j`` for query ``i`` iff ``-right <= i' - j <= left`` and
    ``(i' - j) % dilation == 0``.

    Sizes count positions: ``sliding_window(128)`` keeps the query's own position and
    the 128 before it (129 keys), the Longformer/Mistral convention with ``left`` the
    look-back. ``right > 0`` adds look-ahead; ``dilation`` keeps every ``dilation``-th
    position of the window (dilated sliding window, Longformer); a sequence gives each
    query head its own dilation (head ``h`` uses ``dilation[h % len(dilation)]``).
    """
    left = check_count("left", left)
    right = check_count("right", right)
    if isinstance(dilation, (list, tuple, np.ndarray)):
        dils = tuple(check_count("dilation", d, minimum=1) for d in dilation)
        if not dils:
            raise ValueError("dilation must be a positive integer or a non-empty per-head "
                             "sequence of them")
        shown = f"dilation={list(dils)}"
    else:
        dils = (check_count("dilation", dilation, minimum=1),)
        shown = f"dilation={dils[0]}"
    _check_align(align)
    args = [str(left)] + ([f"right={right}"] if right else []) + (
        [shown] if dils != (1,) else []) + (
        [f"align={align!r}"] if align != "bottom_right" else [])
    return _Band(-right, left, dils, align, f"sliding_window({', '.join(args)})")


def strided(stride: int) -> Mask:
    """Keep key ``j`` for query ``i`` iff ``(i' - j) % stride == 0`` (the strided head of
    the Sparse Transformer, Child et al. 2019; combine with ``causal()``)."""
    stride = check_count("stride", stride, minimum=1)
    return _Band(-math.inf, math.inf, (stride,), "bottom_right", f"strided({stride})")


class _BlockBand(Mask):
    """Keep iff ``|i' // size - j // size| <= blocks``: a sliding window of whole blocks."""

    analytic = True

    def __init__(self, blocks, size, name):
        self.blocks, self.size, self.name = blocks, size, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        pos = q_idx + _offset("bottom_right", n, m)
        return (np.abs(pos // self.size - kv_idx // self.size) <= self.blocks) & (pos >= 0)

    def _classify(self, t):
        off = t.m - t.n
        q0, q1 = (t.q_lo + off) // self.size, (t.q_hi + off) // self.size
        d_min = q0[:, None] - (t.k_hi // self.size)[None, :]
        d_max = q1[:, None] - (t.k_lo // self.size)[None, :]
        empty = (d_max < -self.blocks) | (d_min > self.blocks) | (t.q_hi + off < 0)[:, None]
        full = (d_min >= -self.blocks) & (d_max <= self.blocks) & (t.q_lo + off >= 0)[:, None]
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))


def block_window(blocks: int, block_size: int) -> Mask:
    """Blocked sliding window (BigBird): positions are grouped in blocks of
    ``block_size``; a query keeps the keys of its own block and of ``blocks`` blocks on
    each side: keep iff ``|i' // block_size - j // block_size| <= blocks``."""
    blocks = check_count("blocks", blocks)
    block_size = check_count("block_size", block_size, minimum=1)
    return _BlockBand(blocks, block_size, f"block_window({blocks}, block_size={block_size})")


class _Chunks(Mask):
    """Keep iff ``c·size - overlap <= j < (c + 1)·size`` with ``c = i' // size``: the
    query's own chunk and the ``overlap`` keys before it."""

    analytic = True

    def __init__(self, size, overlap, name):
        self.size, self.overlap, self.name = size, overlap, name

    def _range(self, pos):
        """First and last kept key of query position ``pos >= 0``; both nondecreasing."""
        start = pos // self.size * self.size
        return start - self.overlap, start + self.size - 1

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        pos = q_idx + _offset("bottom_right", n, m)
        lo, hi = self._range(pos)
        return (kv_idx >= lo) & (kv_idx <= hi) & (pos >= 0)

    def _classify(self, t):
        off = t.m - t.n
        p0, p1 = t.q_lo + off, t.q_hi + off
        lo0, hi0 = self._range(np.maximum(p0, 0))
        lo1, hi1 = self._range(p1)
        empty = ((t.k_hi[None, :] < lo0[:, None]) | (t.k_lo[None, :] > hi1[:, None])
                 | (p1 < 0)[:, None])
        full = ((t.k_lo[None, :] >= lo1[:, None]) & (t.k_hi[None, :] <= hi0[:, None])
                & (p0 >= 0)[:, None])
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))


def chunks(size: int, overlap: int = 0) -> Mask:
    """Chunked attention: positions are cut into chunks of ``size``; a query keeps the
    keys of its own chunk and the ``overlap`` keys just before it (a rolling memory
    carried from the previous chunks): keep iff ``c·size - overlap <= j < (c+1)·size``
    with ``c = i' // size``. ``overlap = 0``: independent chunks (block-diagonal).
    Combine with ``causal()`` for streaming."""
    size = check_count("size", size, minimum=1)
    overlap = check_count("overlap", overlap)
    return _Chunks(size, overlap, f"chunks({size}, overlap={overlap})")


class _KeyPeriodic(Mask):
    """Keep key ``j`` iff ``j % period >= period - count`` (the last ``count`` positions of
    every period)."""

    analytic = True

    def __init__(self, period, count, name):
        self.period, self.count, self.name = period, count, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        keep = kv_idx % self.period >= self.period - self.count
        return np.broadcast_to(keep, np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))

    def _kept_below(self, x):
        """How many of the positions ``0 .. x - 1`` are kept."""
        return (x // self.period) * self.count + np.maximum(
            0, x % self.period - (self.period - self.count))

    def _classify(self, t):
        kept = self._kept_below(t.k_hi + 1) - self._kept_below(t.k_lo)
        size = t.k_hi - t.k_lo + 1
        return np.where(kept == size, FULL, np.where(kept == 0, EMPTY, PARTIAL))[None, :]


def fixed(block: int, summary: int = 1) -> Mask:
    """The Sparse Transformer's fixed pattern (Child et al. 2019): a query keeps the keys
    of its own block of ``block`` positions and the last ``summary`` positions of every
    block: keep iff ``i' // block == j // block`` or ``j % block >= block - summary``.
    Combine with ``causal()`` for autoregressive models."""
    block = check_count("block", block, minimum=1)
    summary = check_count("summary", summary)
    if summary > block:
        raise ValueError(f"summary={summary} must not exceed block={block}")
    return _Named(_BlockBand(0, block, "") | _KeyPeriodic(block, summary, ""),
                  f"fixed({block}, summary={summary})")


# --------------------------------------------------------------------- key prefix
class _KeyPrefix(Mask):
    """Keep key ``j`` iff ``j < count`` (attention sinks, the prefix of a prefix LM)."""

    analytic = True

    def __init__(self, count, name):
        self.count, self.name = count, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return np.broadcast_to(kv_idx < self.count,
                               np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))

    def _classify(self, t):
        return np.where(t.k_hi < self.count, FULL,
                        np.where(t.k_lo >= self.count, EMPTY, PARTIAL))[None, :].astype(np.int8)


def sinks(count: int) -> Mask:
    """Keep the first ``count`` keys for every query: the attention sinks of
    StreamingLLM (Xiao et al. 2024), usually ``sinks(4) | sliding_window(w)``."""
    count = check_count("count", count)
    return _KeyPrefix(count, f"sinks({count})")


def prefix_lm(prefix: int) -> Mask:
    """Prefix language model: every query sees the first ``prefix`` keys
    (bidirectional within the prefix), and beyond it attends causally (T5, UniLM)."""
    prefix = check_count("prefix", prefix)
    return _Named(_KeyPrefix(prefix, "") | causal(), f"prefix_lm({prefix})")


# ------------------------------------------------------------------ global tokens
class _GlobalTokens(Mask):
    analytic = True

    def __init__(self, indices):
        idx = np.unique(np.asarray(indices).reshape(-1))
        if idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0):
            raise ValueError(f"global_tokens indices must be non-negative integer positions, "
                             f"got {np.asarray(indices)!r}")
        self.indices = idx.astype(np.int64)
        shown = ", ".join(map(str, self.indices[:6])) + (", ..." if idx.size > 6 else "")
        self.name = f"global_tokens([{shown}])"

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        pos = q_idx + _offset("bottom_right", n, m)
        return np.isin(pos, self.indices) | np.isin(kv_idx, self.indices)

    def _classify(self, t):
        n, m = t.n, t.m
        off = m - n
        size = max(m, n + max(off, 0), int(self.indices.max(initial=-1)) + 1) + 1
        member = np.zeros(size + 1, np.int64)  # prefix counts of global positions
        member[self.indices + 1] = 1
        cum = np.cumsum(member)

        def count(lo, hi):  # global positions within [lo, hi], positions < 0 excluded
            lo, hi = np.clip(lo, 0, size), np.clip(hi + 1, 0, size)
            return cum[hi] - cum[lo]

        cq = count(t.q_lo + off, t.q_hi + off)[:, None]
        ck = count(t.k_lo, t.k_hi)[None, :]
        full = (cq == (t.q_hi - t.q_lo + 1)[:, None]) | (ck == (t.k_hi - t.k_lo + 1)[None, :])
        return np.where(full, FULL, np.where((cq == 0) & (ck == 0), EMPTY, PARTIAL))


def global_tokens(indices) -> Mask:
    """Global tokens (Longformer, BigBird): the positions in ``indices`` attend to every
    key and every query attends to them: keep iff ``i' in G`` or ``j in G``."""
    return _GlobalTokens(indices)


# ----------------------------------------------------------------------- documents
class _Document(Mask):
    analytic = True

    def __init__(self, q_ids, kv_ids, name):
        self.q_ids, self.kv_ids, self.name = q_ids, kv_ids, name

    def _ids(self, n, m):
        """Document id of each query row and each key, checked against the lengths."""
        kv = self.kv_ids
        if m is not None and kv.shape[0] != m:
            raise ValueError(f"document ids have length {kv.shape[0]} but there are M={m} keys")
        if self.q_ids is not None:
            if n is not None and self.q_ids.shape[0] != n:
                raise ValueError(f"document q_ids have length {self.q_ids.shape[0]} but "
                                 f"there are N={n} queries")
            return self.q_ids, kv
        off = _offset("bottom_right", n, m)
        if n is not None and off < 0:
            raise ValueError(f"document(ids) with N={n} > M={m} has queries before the first "
                             f"key position; pass document(q_ids, kv_ids)")
        return kv[off:off + (len(kv) if n is None else n)], kv

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        q_ids, kv_ids = self._ids(n, m)
        return q_ids[q_idx] == kv_ids[kv_idx]

    def _classify(self, t):
        q_ids, kv_ids = self._ids(t.n, t.m)
        if 0 in t.shape:
            return np.zeros(t.shape, np.int8)
        q_ids = q_ids[t.q_lo[0]:t.q_hi[-1] + 1]
        qs = t.q_lo - t.q_lo[0]
        q_min, q_max = np.minimum.reduceat(q_ids, qs), np.maximum.reduceat(q_ids, qs)
        k_min, k_max = np.minimum.reduceat(kv_ids, t.k_lo), np.maximum.reduceat(kv_ids, t.k_lo)
        disjoint = (q_max[:, None] < k_min[None, :]) | (k_max[None, :] < q_min[:, None])
        same = ((q_min == q_max)[:, None] & (k_min == k_max)[None, :]
                & (q_min[:, None] == k_min[None, :]))
        return np.where(same, FULL, np.where(disjoint, EMPTY, PARTIAL))


def document(ids, kv_ids=None) -> Mask:
    """Block-diagonal mask of packed sequences: keep iff query and key belong to the
    same document.

    ``document(ids)``: ``ids[j]`` is the document of key position ``j`` (length ``M``)
    and query ``i`` belongs to ``ids[i']``. ``document(q_ids, kv_ids)``: separate ids of
    length ``N`` and ``M``. Combine with ``causal()`` for packed causal training.
    """
    def check(x, name):
        arr = np.asarray(x)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
            raise ValueError(f"document {name} must be a 1-D integer array, got "
                             f"dtype {arr.dtype} shape {arr.shape}")
        return arr.astype(np.int64)
    if kv_ids is None:
        ids = check(ids, "ids")
        return _Document(None, ids, f"document({len(ids)} positions, "
                                    f"{len(np.unique(ids))} documents)")
    q, kv = check(ids, "q_ids"), check(kv_ids, "kv_ids")
    return _Document(q, kv, f"document({len(q)} queries, {len(kv)} keys)")


# ------------------------------------------------------------------- block layouts
class _BlockLayout(Mask):
    """Keep iff ``layout[i' // block, j // block]``; positions outside the layout and
    query positions below 0 are masked."""

    analytic = True

    def __init__(self, block_size, name):
        self.block_size, self.name = block_size, name

    def layout(self, m: int) -> np.ndarray:
        """The boolean block layout used when there are ``m`` keys."""
        return self._layout

    def _checked_layout(self, n, m):
        layout = self.layout(m)
        if m is not None:
            need = -(-m // self.block_size)
            if layout.shape[0] < need or layout.shape[1] < need:
                raise ValueError(
                    f"block layout of shape {layout.shape} with block_size {self.block_size} "
                    f"covers {layout.shape[0] * self.block_size} query and "
                    f"{layout.shape[1] * self.block_size} key positions; M={m} needs "
                    f"({need}, {need}) blocks")
        return layout

    @functools.lru_cache(maxsize=4)
    def _prefix_counts(self, m: int) -> np.ndarray:
        """2-D prefix counts of the layout for ``m`` keys (kept between the strips of a
        classification): ``cum[r, c]`` = kept blocks above-left of ``(r, c)``."""
        layout = self.layout(m)
        cum = np.zeros((layout.shape[0] + 1, layout.shape[1] + 1), np.int32)
        cum[1:, 1:] = layout.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
        return cum

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        layout = self._checked_layout(n, m)
        pos = q_idx + _offset("bottom_right", n, m)
        qb = np.clip(pos // self.block_size, 0, layout.shape[0] - 1)
        kb = np.clip(kv_idx // self.block_size, 0, layout.shape[1] - 1)
        inside = (pos >= 0) & (pos < layout.shape[0] * self.block_size) & (
            kv_idx < layout.shape[1] * self.block_size)
        return layout[qb, kb] & inside

    def _classify(self, t):
        n, m = t.n, t.m
        layout = self._checked_layout(n, m)
        bs = self.block_size
        cum = self._prefix_counts(m)
        q_lo, q_hi, k_lo, k_hi = t.q_lo, t.q_hi, t.k_lo, t.k_hi
        off = m - n
        # Rows before position 0 are masked: a tile reaching them is at most partial.
        neg = (q_lo + off < 0)[:, None]
        r0 = np.clip((q_lo + off) // bs, 0, layout.shape[0])[:, None]
        r1 = np.clip((q_hi + off) // bs + 1, 0, layout.shape[0])[:, None]
        c0, c1 = (k_lo // bs)[None, :], (k_hi // bs + 1)[None, :]
        kept = cum[r1, c1] - cum[r0, c1] - cum[r1, c0] + cum[r0, c0]
        full = (kept == (r1 - r0) * (c1 - c0)) & ~neg
        return np.where(full, FULL, np.where(kept == 0, EMPTY, PARTIAL))


class _FixedLayout(_BlockLayout):
    def __init__(self, layout, block_size):
        arr = np.asarray(layout)
        if arr.ndim != 2 or arr.dtype != bool:
            raise ValueError(f"block_layout layout must be a 2-D boolean array, got dtype "
                             f"{arr.dtype} shape {arr.shape}")
        super().__init__(block_size, f"block_layout({arr.shape[0]}x{arr.shape[1]} blocks, "
                                     f"block_size={block_size})")
        self._layout = arr.copy()


def block_layout(layout, block_size: int) -> Mask:
    """Block-sparse mask: keep iff ``layout[i' // block_size, j // block_size]``.

    ``layout`` is a boolean ``(row blocks, key blocks)`` array over positions, so it
    needs ``ceil(M / block_size)`` blocks each way (Sparse Transformer, BigBird, the
    block masks of FlexAttention).
    """
    block_size = check_count("block_size", block_size, minimum=1)
    return _FixedLayout(layout, block_size)


class _RandomBlocks(_BlockLayout):
    def __init__(self, count, block_size, seed, shown_rng):
        super().__init__(block_size, f"random_blocks({count}, block_size={block_size}, "
                                     f"rng={shown_rng})")
        self.count, self.seed = count, seed

    @functools.lru_cache(maxsize=8)
    def layout(self, m: int) -> np.ndarray:
        if m is None:
            raise ValueError(f"{self.name} needs the key length: call .bind(n, m) before "
                             f"using it as a plain mask_mod")
        blocks = -(-m // self.block_size)
        gen = np.random.default_rng(self.seed)
        layout = np.zeros((blocks, blocks), bool)
        take = min(self.count, blocks)
        for row in range(blocks):
            layout[row, gen.choice(blocks, size=take, replace=False)] = True
        return layout


def random_blocks(count: int, block_size: int, rng) -> Mask:
    """BigBird random attention: each query block attends to ``count`` key blocks drawn
    without replacement (all blocks when fewer exist).

    ``rng`` is an int seed or a ``numpy.random.Generator`` (one integer is drawn from it
    now); the layout for each key length is then fixed, so repeated evaluation and tile
    classification agree.
    """
    count = check_count("count", count)
    block_size = check_count("block_size", block_size, minimum=1)
    if isinstance(rng, np.random.Generator):
        seed, shown = int(rng.integers(2**63)), "Generator"
    elif isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        seed, shown = int(rng), str(int(rng))
    else:
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {rng!r}")
    return _RandomBlocks(count, block_size, seed, shown)


# ----------------------------------------------------------- functions and arrays
class _Function(Mask):
    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        keep = np.asarray(self.fn(b, h, q_idx, kv_idx))
        if keep.dtype != bool:
            raise TypeError(f"mask function {self.name} returned dtype {keep.dtype}; a "
                            f"mask_mod must return booleans")
        return keep


def from_function(fn, name: str | None = None) -> Mask:
    """Wrap a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (evaluated
    on broadcast NumPy index arrays; ``q_idx`` is the raw row index)."""
    if not callable(fn):
        raise TypeError(f"mask function must be callable, got {type(fn).__name__}")
    return _Function(fn, name or getattr(fn, "__name__", "mask_fn"))


class _Array(Mask):
    """A boolean array ``(B|1, H|1, N|1, M|1)`` indexed by ``(b, h, q_idx, kv_idx)``."""

    def __init__(self, arr, name):
        self.arr, self.name = arr, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return gather_broadcast(self.arr, b, h, q_idx, kv_idx, n, m, "mask array")


def from_array(arr, batch_shape: tuple = ()) -> Mask:
    """Wrap a boolean array broadcastable to ``(*batch_shape, H, N, M)``.

    Leading batch dimensions are flattened the way the references flatten ``q``'s batch
    dimensions, so ``b`` indexes the flattened batch.
    """
    a = np.asarray(arr)
    if a.dtype != bool:
        raise TypeError(f"mask array must be boolean, got dtype {a.dtype} shape {a.shape}")
    return _Array(flatten_leading(a, tuple(batch_shape), "mask array"), f"array{a.shape}")


def as_mask(mask, batch_shape: tuple = ()) -> Mask:
    """Coerce ``mask=`` input (a :class:`Mask`, a ``mask_mod`` function or a boolean
    array) to a :class:`Mask`."""
    if isinstance(mask, Mask):
        return mask
    if callable(mask):
        return from_function(mask)
    if isinstance(mask, (np.ndarray, list, tuple)) or hasattr(mask, "__array__"):
        return from_array(mask, batch_shape)
    raise TypeError(f"mask must be a refattn mask, a function (b, h, q_idx, kv_idx) -> bool "
                    f"or a boolean array, got {type(mask).__name__}")


# --------------------------------------------------------------------- composition
class _Named(Mask):
    """Another mask under a different name."""

    def __init__(self, inner, name):
        self.inner, self.name, self.analytic = inner, name, inner.analytic

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return self.inner._eval(b, h, q_idx, kv_idx, n, m)

    def _classify(self, t):
        return self.inner._classify(t)


class _Binary(Mask):
    def __init__(self, left, right):
        self.left, self.right = left, right
        self.analytic = left.analytic and right.analytic
        self.name = f"{_wrap(left, type(self))} {self.symbol} {_wrap(right, type(self))}"

    def _classify(self, t):
        if not self.analytic:
            return Mask._classify(self, t)
        return self.combine(self.left._classify(t), self.right._classify(t))


def _wrap(mask, parent) -> str:
    return f"({mask.name})" if isinstance(mask, _Binary) and type(mask) is not parent \
        else mask.name


class _And(_Binary):
    symbol = "&"
    combine = staticmethod(np.minimum)  # empty wins; full only if both full

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return self.left._eval(b, h, q_idx, kv_idx, n, m) & \
            self.right._eval(b, h, q_idx, kv_idx, n, m)


class _Or(_Binary):
    symbol = "|"
    combine = staticmethod(np.maximum)  # full wins; empty only if both empty

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return self.left._eval(b, h, q_idx, kv_idx, n, m) | \
            self.right._eval(b, h, q_idx, kv_idx, n, m)


class _Not(Mask):
    def __init__(self, inner):
        self.inner, self.analytic = inner, inner.analytic
        self.name = f"~({inner.name})" if isinstance(inner, _Binary) else f"~{inner.name}"

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return ~np.asarray(self.inner._eval(b, h, q_idx, kv_idx, n, m))

    def _classify(self, t):
        if not self.analytic:
            return Mask._classify(self, t)
        return (FULL - self.inner._classify(t)).astype(np.int8)
