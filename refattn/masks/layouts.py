"""Block layouts: masks given by a boolean grid of ``(query block, key block)`` pairs,
fixed (:func:`block_layout`; Sparse Transformer, FlexAttention block masks) or drawn at
random per key length (:func:`random_blocks`; BigBird), classified from 2-D prefix counts
of the grid.
"""
from __future__ import annotations

import functools

import numpy as np

from .._core.checks import check_count, is_int
from .base import EMPTY, FULL, PARTIAL, Mask, _offset

__all__ = ["block_layout", "random_blocks"]


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
                    f"block layout of shape {layout.shape} with block_size "
                    f"{self.block_size} covers {layout.shape[0] * self.block_size} query "
                    f"and {layout.shape[1] * self.block_size} key positions; M={m} needs "
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
    elif is_int(rng):
        seed, shown = int(rng), str(int(rng))
    else:
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {rng!r}")
    return _RandomBlocks(count, block_size, seed, shown)
