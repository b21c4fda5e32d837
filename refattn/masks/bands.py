"""Position bands: masks that keep a key by its distance ``i' - j`` from the query's
position, or by the block or chunk both positions fall in: :func:`causal`,
:func:`sliding_window` (dilated, per head), :func:`strided`, :func:`block_window` and
:func:`chunks`, each classifying tiles analytically.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import check_count
from .base import EMPTY, FULL, PARTIAL, Mask, _offset

_ALIGNS = ("bottom_right", "top_left")

__all__ = ["causal", "sliding_window", "strided", "block_window", "chunks"]


def _check_align(align) -> str:
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}, got {align!r}")
    return align


class _Band(Mask):
    """Keep key ``j`` for query position ``i'`` iff ``lo <= i' - j <= hi`` and
    ``(i' - j) % dilation == 0``; ``lo``/``hi`` may be infinite."""

    analytic = True

    def __init__(self, lo, hi, dilation, align, name):
        self.lo, self.hi, self.dilation = lo, hi, dilation
        self.align, self.name = align, name

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
        empty = ((d_max < -self.blocks) | (d_min > self.blocks)
                 | (t.q_hi + off < 0)[:, None])
        full = ((d_min >= -self.blocks) & (d_max <= self.blocks)
                & (t.q_lo + off >= 0)[:, None])
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))


def block_window(blocks: int, block_size: int) -> Mask:
    """Blocked sliding window (BigBird): positions are grouped in blocks of
    ``block_size``; a query keeps the keys of its own block and of ``blocks`` blocks on
    each side: keep iff ``|i' // block_size - j // block_size| <= blocks``."""
    blocks = check_count("blocks", blocks)
    block_size = check_count("block_size", block_size, minimum=1)
    return _BlockBand(blocks, block_size,
                      f"block_window({blocks}, block_size={block_size})")


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
