"""Block layouts: masks given by the kept ``(query block, key block)`` pairs, fixed
(:func:`block_layout`; Sparse Transformer, FlexAttention block masks) or drawn at random
per key length (:func:`random_blocks`; BigBird). The pairs are stored row by row (CSR:
each block row's kept key blocks, ascending), so memory grows with the kept blocks, never
with the ``(N / b) x (M / b)`` grid; tiles are classified by counting kept blocks per
block row with binary searches.
"""
from __future__ import annotations

import functools

import numpy as np

from .._core.checks import check_count, is_int
from .base import EMPTY, FULL, PARTIAL, Mask, _offset

__all__ = ["block_layout", "random_blocks"]


class _BlockLayout(Mask):
    """Keep iff block ``(i' // block, j // block)`` is kept; positions outside the layout
    and query positions below 0 are masked. Subclasses give :meth:`rows`."""

    analytic = True

    def __init__(self, block_size, name):
        self.block_size, self.name = block_size, name

    def rows(self, m: int):
        """``(shape, indptr, cols)``: the layout used when there are ``m`` keys, block row
        ``r`` keeping key blocks ``cols[indptr[r]:indptr[r + 1]]`` (ascending)."""
        return self._rows

    def layout(self, m: int) -> np.ndarray:
        """The layout for ``m`` keys as a dense boolean ``(row blocks, key blocks)`` array
        (for inspection: it has ``(M / block_size)²`` elements)."""
        (r, c), indptr, cols = self.rows(m)
        dense = np.zeros((r, c), bool)
        dense[np.repeat(np.arange(r), np.diff(indptr)), cols] = True
        return dense

    @functools.lru_cache(maxsize=4)
    def _keys(self, m):
        """The kept blocks as ascending keys ``r * (key blocks) + c`` (kept between calls:
        partial tiles are evaluated one at a time)."""
        (_, ncols), indptr, cols = self.rows(m)
        return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64) * ncols,
                         np.diff(indptr)) + cols

    def _checked_rows(self, n, m):
        shape, indptr, cols = self.rows(m)
        if m is not None:
            need = -(-m // self.block_size)
            if shape[0] < need or shape[1] < need:
                raise ValueError(
                    f"block layout of shape {shape} with block_size {self.block_size} "
                    f"covers {shape[0] * self.block_size} query and "
                    f"{shape[1] * self.block_size} key positions; M={m} needs "
                    f"({need}, {need}) blocks")
        return shape, indptr, cols

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        (rows, ncols), indptr, cols = self._checked_rows(n, m)
        pos = q_idx + _offset("bottom_right", n, m)
        qb = np.clip(pos // self.block_size, 0, rows - 1)
        kb = np.clip(kv_idx // self.block_size, 0, ncols - 1)
        inside = (pos >= 0) & (pos < rows * self.block_size) & (
            kv_idx < ncols * self.block_size)
        keys = self._keys(m)
        want = qb * ncols + kb
        at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        return (keys[at] == want if len(keys) else np.zeros(np.shape(want), bool)) & inside

    def _classify(self, t):
        n, m = t.n, t.m
        (rows, ncols), indptr, cols = self._checked_rows(n, m)
        bs, off = self.block_size, m - n
        r0 = np.clip((t.q_lo + off) // bs, 0, rows)
        r1 = np.clip((t.q_hi + off) // bs + 1, 0, rows)
        c0, c1 = t.k_lo // bs, np.minimum(t.k_hi // bs + 1, ncols)
        lo, hi = int(r0.min(initial=0)), int(r1.max(initial=0))
        # kept[r, c]: kept blocks of block row lo + r among key blocks [c0[c], c1[c])
        keys = self._keys(m)
        base = (np.arange(lo, hi) * ncols)[:, None]
        kept = (np.searchsorted(keys, base + c1[None, :])
                - np.searchsorted(keys, base + np.minimum(c0, ncols)[None, :]))
        cum = np.zeros((hi - lo + 1, len(c0)), np.int64)
        np.cumsum(kept, axis=0, out=cum[1:])
        total = cum[(r1 - lo)] - cum[(r0 - lo)]
        size = ((r1 - r0)[:, None] * np.maximum(c1 - c0, 0)[None, :])
        # Rows before position 0 are masked: a tile reaching them is at most partial.
        full = (total == size) & (size > 0) & (t.q_lo + off >= 0)[:, None] & (
            (t.k_hi < ncols * bs)[None, :]) & ((t.q_hi + off < rows * bs)[:, None])
        return np.where(full, FULL, np.where(total == 0, EMPTY, PARTIAL))


def _as_rows(layout):
    """``(shape, indptr, cols)`` of a dense boolean array or a SciPy sparse array/matrix
    (its stored nonzero entries)."""
    if hasattr(layout, "tocsr") and hasattr(layout, "nnz"):      # scipy.sparse
        csr = layout.tocsr()
        csr.sum_duplicates()
        csr.eliminate_zeros()
        csr.sort_indices()
        return (tuple(int(x) for x in csr.shape), csr.indptr.astype(np.int64),
                csr.indices.astype(np.int64))
    arr = np.asarray(layout)
    if arr.ndim != 2 or arr.dtype != bool:
        raise ValueError(f"block_layout layout must be a 2-D boolean array or a SciPy "
                         f"sparse array, got dtype {arr.dtype} shape {arr.shape}")
    r, c = np.nonzero(arr)
    indptr = np.zeros(arr.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=arr.shape[0]), out=indptr[1:])
    return arr.shape, indptr, c.astype(np.int64)


class _FixedLayout(_BlockLayout):
    def __init__(self, layout, block_size):
        self._rows = _as_rows(layout)
        shape = self._rows[0]
        super().__init__(block_size, f"block_layout({shape[0]}x{shape[1]} blocks, "
                                     f"block_size={block_size})")


def block_layout(layout, block_size: int) -> Mask:
    """Block-sparse mask: keep iff block ``(i' // block_size, j // block_size)`` is kept.

    ``layout`` is a boolean ``(row blocks, key blocks)`` array, or a SciPy sparse
    array/matrix whose stored nonzeros are the kept blocks (its memory then grows with
    the kept blocks only), over positions: it needs ``ceil(M / block_size)`` blocks each
    way (Sparse Transformer, BigBird, the block masks of FlexAttention).

    >>> import numpy as np, scipy.sparse as sp, refattn as ra
    >>> band = sp.diags([1, 1, 1], [-1, 0, 1], shape=(3, 3), format="csr")
    >>> ra.masks.block_layout(band, 2).materialize(6, 6).sum(1).tolist()
    [4, 4, 6, 6, 4, 4]
    """
    block_size = check_count("block_size", block_size, minimum=1)
    return _FixedLayout(layout, block_size)


class _RandomBlocks(_BlockLayout):
    def __init__(self, count, block_size, seed, shown_rng):
        super().__init__(block_size, f"random_blocks({count}, block_size={block_size}, "
                                     f"rng={shown_rng})")
        self.count, self.seed = count, seed

    @functools.lru_cache(maxsize=8)
    def rows(self, m: int):
        if m is None:
            raise ValueError(f"{self.name} needs the key length: call .bind(n, m) before "
                             f"using it as a plain mask_mod")
        blocks = -(-m // self.block_size)
        gen = np.random.default_rng(self.seed)
        take = min(self.count, blocks)
        cols = np.empty((blocks, take), np.int64)
        for row in range(blocks):
            cols[row] = np.sort(gen.choice(blocks, size=take, replace=False))
        return (blocks, blocks), np.arange(blocks + 1, dtype=np.int64) * take, cols.ravel()


def random_blocks(count: int, block_size: int, rng) -> Mask:
    """BigBird random attention: each query block attends to ``count`` key blocks drawn
    without replacement (all blocks when fewer exist).

    ``rng`` is an int seed or a ``numpy.random.Generator`` (one integer is drawn from it
    now); the layout for each key length is then fixed, so repeated evaluation and tile
    classification agree. Held as ``count`` blocks per block row.
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
