"""The tiles a tiled computation visits, classified one strip of query-tile rows at a
time, so that memory grows with a strip, never with the whole ``(N / block_q) x
(M / block_k)`` grid (at N = M = 2^21 with 64-blocks the grid has 2^30 tiles).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .._core.checks import DEFAULT_MEMORY_BUDGET, MemoryBudgetError
from .base import FULL, PARTIAL, STRIP_TILES

__all__ = ["TileRows"]

#: Bytes per listed tile in :meth:`TileRows.columns`: an int32 row index and an int8 label.
_TILE_BYTES = 5


class TileRows:
    """The key tiles each query tile visits, in order.

    ``row(a)`` returns ``(key_tiles, labels)`` for query tile ``a``: every key tile as
    ``FULL`` without a mask, every key tile as ``PARTIAL`` (evaluated element by element)
    for a mask without an analytic classification, and only the non-empty tiles, labelled
    ``FULL`` or ``PARTIAL``, for an analytic mask. Analytic masks are classified a strip of
    about ``strip_elements`` tiles at a time; the last few strips are kept (thread-safe),
    so workers visiting neighbouring rows share them.

    >>> import refattn as ra
    >>> rows = TileRows(ra.masks.causal(), 6, 6, 2, 2)
    >>> [(t.tolist(), lab.tolist()) for t, lab in map(rows.row, range(3))]
    [([0], [1]), ([0, 1], [2, 1]), ([0, 1, 2], [2, 2, 1])]
    """

    def __init__(self, mask, n: int, m: int, block_q: int, block_k: int, *,
                 strip_elements: int = STRIP_TILES, cached_strips: int = 4):
        self.mask, self.n, self.m, self.block_q, self.block_k = mask, n, m, block_q, block_k
        self.n_rows, self.n_cols = -(-n // block_q), -(-m // block_k)
        self.strip = max(1, strip_elements // max(1, self.n_cols))
        self._every = np.arange(self.n_cols)
        self._uniform = None if mask is not None and mask.analytic else np.full(
            self.n_cols, FULL if mask is None else PARTIAL, np.int8)
        self._cache: OrderedDict = OrderedDict()
        self._cached, self._lock = cached_strips, threading.Lock()

    @property
    def grid_tiles(self) -> int:
        """Tiles in the whole grid: an upper bound on the tiles visited."""
        return self.n_rows * self.n_cols

    def row(self, a: int):
        """``(key_tiles, labels)`` of query tile ``a``."""
        if self._uniform is not None:
            return self._every, self._uniform
        s = a // self.strip
        with self._lock:
            csr = self._cache.get(s)
            if csr is not None:
                self._cache.move_to_end(s)
        if csr is None:
            csr = self._classify_strip(s)
            with self._lock:
                self._cache[s] = csr
                while len(self._cache) > self._cached:
                    self._cache.popitem(last=False)
        indptr, key_tiles, labels = csr
        i = a - s * self.strip
        return key_tiles[indptr[i]:indptr[i + 1]], labels[indptr[i]:indptr[i + 1]]

    def _classify_strip(self, s: int):
        lab = self.mask.classify_tiles(self.n, self.m, self.block_q, self.block_k,
                                       rows=slice(s * self.strip, (s + 1) * self.strip))
        r, c = np.nonzero(lab)
        indptr = np.zeros(lab.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=lab.shape[0]), out=indptr[1:])
        return indptr, c, lab[r, c]

    def strips(self):
        """``(first_row, indptr, key_tiles, labels)`` of every strip, in order (the rows of
        a strip in CSR form, not cached)."""
        for s in range(-(-self.n_rows // self.strip)):
            first = s * self.strip
            if self._uniform is not None:
                rows = min(self.strip, self.n_rows - first)
                yield (first, np.arange(rows + 1) * self.n_cols,
                       np.tile(self._every, rows), np.tile(self._uniform, rows))
            else:
                yield (first, *self._classify_strip(s))

    def columns(self, memory_budget=None):
        """The same tiles key-major, for a backward that owns each key tile's gradients:
        ``(indptr, query_tiles, labels)`` with the query tiles visiting key tile ``b`` in
        ``query_tiles[indptr[b]:indptr[b+1]]``, ascending. Built by counting sort in two
        passes over the strips; holds every visited tile (5 bytes each) and raises
        :class:`MemoryBudgetError` before allocating them when they would exceed
        ``memory_budget`` (default 8 GiB)."""
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        counts = np.zeros(self.n_cols, np.int64)
        for *_, key_tiles, _ in self.strips():
            counts += np.bincount(key_tiles, minlength=self.n_cols)
        total = int(counts.sum())
        if total * _TILE_BYTES > budget:
            raise MemoryBudgetError(
                f"the tiled backward lists its {total:,} visited ({self.block_q}, "
                f"{self.block_k}) tiles key by key, about {total * _TILE_BYTES / 2**30:.1f} "
                f"GiB, over the memory budget of {budget / 2**30:.1f} GiB; use larger "
                f"block_q/block_k")
        indptr = np.zeros(self.n_cols + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        query_tiles, labels = np.empty(total, np.int32), np.empty(total, np.int8)
        cursor = indptr[:-1].copy()
        for first, strip_ptr, key_tiles, lab in self.strips():
            rows = first + np.repeat(np.arange(len(strip_ptr) - 1), np.diff(strip_ptr))
            order = np.argsort(key_tiles, kind="stable")     # rows stay ascending
            cols = key_tiles[order]
            group_start = np.searchsorted(cols, cols)        # first of each column's run
            at = cursor[cols] + np.arange(len(cols)) - group_start
            query_tiles[at], labels[at] = rows[order], lab[order]
            cursor += np.bincount(key_tiles, minlength=self.n_cols)
        return indptr, query_tiles, labels
