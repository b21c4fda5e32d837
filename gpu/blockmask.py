"""Block masks for the kernels: a refattn mask classified into the kernels' tiles.

A kernel visits, for query tile ``a`` (rows ``a*BM .. a*BM+BM-1``), only the key tiles
listed in CSR form: ``tile_k[indptr[a]:indptr[a+1]]`` (from
:meth:`refattn.masks.Mask.tile_lists`, so EMPTY tiles are skipped: BigBird, Longformer,
document masks). ``tile_bits[t]`` is ``-1`` for a FULL tile (no per-element test) or
the index of the tile's bitmap in ``bits``, an ``(P, BM, BN / 32)`` uint32 array for the
``P`` PARTIAL tiles: bit ``c % 32`` of ``bits[p, r, c // 32]`` is whether row ``r`` of the
tile keeps key ``c`` of the tile (0 beyond ``N`` and ``M``).

The mask is evaluated for batch 0, head 0 (like refattn's tile classification): a block
mask must be the same for every batch and head. :func:`build` checks this on the first
partial tiles and raises otherwise.

>>> import numpy as np, refattn as ra
>>> bm = build(ra.masks.causal(), 100, 100, 64, 32)
>>> bm.indptr.tolist(), bm.tile_k.tolist(), bm.tile_bits.tolist()
([0, 2, 6], [0, 1, 0, 1, 2, 3], [0, 1, -1, -1, 2, 3])
>>> bm.bits.shape
(4, 64, 1)
>>> bool((bm.dense() == ra.masks.causal().materialize(100, 100)).all())
True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refattn import masks as _masks

__all__ = ["BlockMask", "build"]


@dataclass(frozen=True)
class BlockMask:
    """Tile lists and bitmaps of one mask at one ``(N, M, BM, BN)`` tiling."""

    n: int
    m: int
    block_q: int
    block_k: int
    indptr: np.ndarray     # int32 (ceil(N / BM) + 1,)
    tile_k: np.ndarray     # int32 (T,) key tile index
    tile_bits: np.ndarray  # int32 (T,) -1 (FULL) or bitmap index
    bits: np.ndarray       # uint32 (max(P, 1), BM, BN / 32)
    name: str = "mask"

    @property
    def visited_fraction(self) -> float:
        """Visited tiles over all tiles (1.0 for a dense problem)."""
        total = max(1, (len(self.indptr) - 1) * -(-self.m // self.block_k))
        return len(self.tile_k) / total

    def dense(self) -> np.ndarray:
        """The boolean ``(N, M)`` matrix these tiles keep (for tests)."""
        keep = np.zeros((len(self.indptr) - 1) * self.block_q, bool)[:, None] & np.zeros(
            -(-self.m // self.block_k) * self.block_k, bool)[None, :]
        bq, bk = self.block_q, self.block_k
        for a in range(len(self.indptr) - 1):
            for t in range(self.indptr[a], self.indptr[a + 1]):
                c0 = self.tile_k[t] * bk
                if self.tile_bits[t] < 0:
                    keep[a * bq:(a + 1) * bq, c0:c0 + bk] = True
                else:
                    words = self.bits[self.tile_bits[t]]
                    cols = np.arange(bk)
                    keep[a * bq:(a + 1) * bq, c0:c0 + bk] = (
                        (words[:, cols // 32] >> (cols % 32).astype(np.uint32)) & 1).astype(bool)
        return keep[:self.n, :self.m]


def _pack_bits(keep: np.ndarray) -> np.ndarray:
    """``(..., BN)`` booleans -> ``(..., BN / 32)`` uint32, bit ``c % 32`` of word ``c // 32``."""
    shape = keep.shape[:-1] + (keep.shape[-1] // 32, 32)
    weights = (np.uint32(1) << np.arange(32, dtype=np.uint32))
    return (keep.reshape(shape).astype(np.uint32) * weights).sum(axis=-1, dtype=np.uint32)


def build(mask, n: int, m: int, block_q: int, block_k: int, *, batch: int = 1,
          heads: int = 1, chunk: int = 256) -> BlockMask:
    """Classify ``mask`` (anything :func:`refattn.masks.as_mask` takes) into
    ``(block_q, block_k)`` tiles of an ``N x M`` problem and pack the PARTIAL tiles'
    bitmaps; ``block_k`` must be a multiple of 32. ``batch`` and ``heads`` are only used
    to check that the mask does not depend on them."""
    mask = _masks.as_mask(mask)
    if block_k % 32:
        raise ValueError(f"block_k must be a multiple of 32 for the tile bitmaps, got {block_k}")
    indptr, tile_k, labels = mask.tile_lists(n, m, block_q, block_k)
    if len(tile_k) >= 2**31:
        raise ValueError(f"block mask has {len(tile_k)} tiles; at most 2^31 - 1 supported")
    partial = np.flatnonzero(labels == _masks.PARTIAL)
    tile_bits = np.full(len(tile_k), -1, np.int32)
    tile_bits[partial] = np.arange(len(partial), dtype=np.int32)
    bits = np.zeros((max(1, len(partial)), block_q, block_k // 32), np.uint32)
    if len(partial):
        q_tile = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[partial]
        bound = mask.bind(n, m)
        r = np.arange(block_q)
        c = np.arange(block_k)
        for s in range(0, len(partial), chunk):
            sel = slice(s, s + chunk)
            rows = q_tile[sel, None, None] * block_q + r[None, :, None]     # (P, BM, 1)
            cols = tile_k[partial[sel], None, None] * block_k + c[None, None, :]  # (P, 1, BN)
            inside = (rows < n) & (cols < m)
            keep = np.asarray(bound(0, 0, np.minimum(rows, max(n - 1, 0)),
                                    np.minimum(cols, max(m - 1, 0))))
            keep = np.broadcast_to(keep, inside.shape) & inside
            bits[sel] = _pack_bits(keep)
            if s == 0 and (batch > 1 or heads > 1):
                _check_shared(bound, rows[:8], cols[:8], inside[:8], keep[:8], batch, heads,
                              n, m)
    return BlockMask(n, m, block_q, block_k, indptr.astype(np.int32),
                     tile_k.astype(np.int32), tile_bits, bits, getattr(mask, "name", "mask"))


def _check_shared(bound, rows, cols, inside, keep0, batch, heads, n, m):
    """Raise if the mask differs between batches or heads on these tiles (positions past
    ``N``/``M`` clamped inside, as for the bitmaps: masks may index arrays of length N)."""
    b = np.arange(batch).reshape(-1, 1, 1, 1, 1)
    h = np.arange(heads).reshape(1, -1, 1, 1, 1)
    keep = np.asarray(bound(b, h, np.minimum(rows, max(n - 1, 0)),
                            np.minimum(cols, max(m - 1, 0))))
    if keep.ndim == 5 and (keep.shape[0] > 1 or keep.shape[1] > 1):
        if not (np.broadcast_to(keep, keep.shape[:2] + inside.shape) & inside
                == keep0).all():
            raise ValueError("block_mask differs between batches or heads; the GPU kernels "
                             "take one mask shared by all of them (use refattn's references "
                             "for per-head masks)")
