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

#: Per-block-row counts formed at once while classifying tiles (elements).
CLASSIFY_ELEMENTS = 2**20

__all__ = ["block_layout", "random_blocks", "bigbird_layout"]


class _BlockLayout(Mask):
    """Keep iff block ``(i' // block, j // block)`` is kept; positions outside the layout
    and query positions below 0 are masked. Subclasses give :meth:`rows`; a layout that
    differs between query heads (``per_head``) gives :meth:`head_rows` as well, and
    :meth:`rows` is then the union over its heads (what tiles are classified by: a tile
    is skipped only when no head keeps anything in it, and full only when every head
    keeps all of it)."""

    analytic = True
    per_head = False

    def __init__(self, block_size, name):
        self.block_size, self.name = block_size, name

    def rows(self, m: int):
        """``(shape, indptr, cols)``: the layout used when there are ``m`` keys, block row
        ``r`` keeping key blocks ``cols[indptr[r]:indptr[r + 1]]`` (ascending); the union
        over the heads for a per-head layout."""
        return self._rows

    def head_rows(self, m: int, h: int):
        """``(shape, indptr, cols)`` of query head ``h`` (:meth:`rows` unless the layout is
        per head)."""
        return self.rows(m)

    def layout(self, m: int, h: int | None = None) -> np.ndarray:
        """The layout for ``m`` keys as a dense boolean ``(row blocks, key blocks)`` array
        (for inspection: it has ``(M / block_size)²`` elements); of query head ``h``, or
        the union over the heads when ``h`` is None."""
        (r, c), indptr, cols = self.rows(m) if h is None else self.head_rows(m, h)
        dense = np.zeros((r, c), bool)
        dense[np.repeat(np.arange(r), np.diff(indptr)), cols] = True
        return dense

    @functools.lru_cache(maxsize=4)
    def _keys(self, m):
        """The kept blocks as ascending keys ``r * (key blocks) + c`` (kept between calls:
        partial tiles are evaluated one at a time)."""
        return _keys_of(self.rows(m))

    def _head_keys(self, m, h):
        """:meth:`_keys` of query head ``h``, kept per instance (one entry per head)."""
        cache = self.__dict__.setdefault("_head_cache", {})
        keys = cache.get((m, h))
        if keys is None:
            if len(cache) > 1024:
                cache.clear()
            keys = cache[(m, h)] = _keys_of(self.head_rows(m, h))
        return keys

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
        want = qb * ncols + kb
        if not self.per_head:
            return _member(self._keys(m), want) & inside
        heads = np.asarray(h)
        keep = np.zeros(np.broadcast_shapes(heads.shape, np.shape(want)), bool)
        for head in np.unique(heads):
            keep = np.where(heads == head, _member(self._head_keys(m, int(head)), want),
                            keep)
        return keep & inside

    def common_rows(self, m: int):
        """``(shape, indptr, cols)`` of the blocks every query head keeps (:meth:`rows`
        unless the layout is per head; a per-head layout may return fewer)."""
        return self.rows(m)

    @functools.lru_cache(maxsize=4)
    def _common_keys(self, m):
        return self._keys(m) if not self.per_head else _keys_of(self.common_rows(m))

    def _classify(self, t):
        n, m = t.n, t.m
        (rows, ncols), indptr, cols = self._checked_rows(n, m)
        bs, off = self.block_size, m - n
        r0 = np.clip((t.q_lo + off) // bs, 0, rows)
        r1 = np.clip((t.q_hi + off) // bs + 1, 0, rows)
        c0, c1 = t.k_lo // bs, np.minimum(t.k_hi // bs + 1, ncols)

        def count(keys):
            """Kept blocks of each tile: per block row the kept blocks among key blocks
            [c0[c], c1[c]), summed over the tile's block rows; a group of tile rows at a
            time, so that the per-block-row counts stay about CLASSIFY_ELEMENTS."""
            out = np.empty((len(r0), len(c0)), np.int64)
            step = max(1, CLASSIFY_ELEMENTS // max(1, len(c0) * max(
                1, int((r1 - r0).max(initial=1)))))
            for a in range(0, len(r0), step):
                g0, g1 = r0[a:a + step], r1[a:a + step]
                lo, hi = int(g0.min()), int(g1.max())        # g0 is never empty
                base = (np.arange(lo, hi) * ncols)[:, None]
                kept = (np.searchsorted(keys, base + c1[None, :])
                        - np.searchsorted(keys, base + np.minimum(c0, ncols)[None, :]))
                cum = np.zeros((hi - lo + 1, len(c0)), np.int64)
                np.cumsum(kept, axis=0, out=cum[1:])
                out[a:a + step] = cum[g1 - lo] - cum[g0 - lo]
            return out

        total = count(self._keys(m))           # any head (the union)
        common = total if not self.per_head else count(self._common_keys(m))
        size = ((r1 - r0)[:, None] * np.maximum(c1 - c0, 0)[None, :])
        # Rows before position 0 are masked: a tile reaching them is at most partial.
        full = (common == size) & (size > 0) & (t.q_lo + off >= 0)[:, None] & (
            (t.k_hi < ncols * bs)[None, :]) & ((t.q_hi + off < rows * bs)[:, None])
        return np.where(full, FULL, np.where(total == 0, EMPTY, PARTIAL))


def _keys_of(rows):
    """Ascending keys ``r * (key blocks) + c`` of a CSR layout ``(shape, indptr, cols)``."""
    (_, ncols), indptr, cols = rows
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64) * ncols,
                     np.diff(indptr)) + cols


def _rows_of(keys, shape):
    """The CSR layout ``(shape, indptr, cols)`` of ascending unique keys."""
    indptr = np.searchsorted(keys, np.arange(shape[0] + 1, dtype=np.int64) * shape[1])
    return tuple(shape), indptr.astype(np.int64), keys % shape[1]


def _unique(x, counts=False):
    """The sorted distinct values of the int array ``x`` (and how often each occurs)."""
    x = np.sort(x)
    first = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]])) if len(x) else \
        np.zeros(0, np.int64)
    if not counts:
        return x[first]
    return x[first], np.diff(np.append(first, len(x)))


def _member(keys, want):
    """Whether each element of ``want`` is among the ascending ``keys``."""
    if not len(keys):
        return np.zeros(np.shape(want), bool)
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    return keys[at] == want


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


def _seed(rng):
    """``(seed, shown)`` of ``rng=``: an int seed >= 0, or a ``numpy.random.Generator``
    from which one integer is drawn now."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(2**63)), "Generator"
    if is_int(rng) and rng >= 0:
        return int(rng), str(int(rng))
    raise TypeError(f"rng must be an int seed >= 0 or a numpy.random.Generator, got "
                    f"{rng!r}")


def random_blocks(count: int, block_size: int, rng) -> Mask:
    """BigBird random attention: each query block attends to ``count`` key blocks drawn
    without replacement (all blocks when fewer exist), the same for every head; the
    published pattern (per head, excluding the window and global blocks) is
    :func:`bigbird_layout`.

    ``rng`` is an int seed or a ``numpy.random.Generator`` (one integer is drawn from it
    now); the layout for each key length is then fixed, so repeated evaluation and tile
    classification agree. Held as ``count`` blocks per block row.
    """
    count = check_count("count", count)
    block_size = check_count("block_size", block_size, minimum=1)
    return _RandomBlocks(count, block_size, *_seed(rng))


# ------------------------------------------------------------------ BigBird's layout
_GLOBAL_AT = ("ends", "start")


class _BigBird(_BlockLayout):
    """BigBird's block layout, per query head (see :func:`bigbird_layout`)."""

    per_head = True

    def __init__(self, block_size, window, global_blocks, global_at, count, seed, indices,
                 heads, name):
        super().__init__(block_size, name)
        self.window, self.global_blocks, self.global_at = window, global_blocks, global_at
        self.count, self.seed, self.indices, self.heads = count, seed, indices, heads
        self._cache = {}

    def _cached(self, key, make):
        out = self._cache.get(key)
        if out is None:
            if len(self._cache) > 1024:
                self._cache.clear()
            out = self._cache[key] = make()
        return out

    def _parts(self, m):
        """``(nb, global_rows, rows, excluded)`` for ``m`` keys: the block count, the
        global blocks, the other block rows ``(R,)`` and, per such row, its window and
        global blocks ``(R, K)`` ascending, padded with ``nb``."""
        if m is None:
            raise ValueError(f"{self.name} needs the key length: call .bind(n, m) before "
                             f"using it as a plain mask_mod")
        return self._cached(("parts", m), lambda: self._make_parts(m))

    def _make_parts(self, m):
        nb, g = -(-m // self.block_size), self.global_blocks
        w = min(self.window, nb)        # a wider window reaches no further block
        glob = np.arange(min(g, nb))
        if self.global_at == "ends":
            glob = np.union1d(glob, np.arange(max(nb - g, 0), nb))
        is_global = np.zeros(nb, bool)
        is_global[glob] = True
        rows = np.flatnonzero(~is_global)
        win = rows[:, None] + np.arange(-w, w + 1)[None, :]
        win = np.where((win >= 0) & (win < nb), win, nb)
        win = np.where(is_global[np.minimum(win, nb - 1)], nb, win)   # listed once
        excluded = np.sort(np.concatenate(
            [win, np.broadcast_to(glob, (len(rows), len(glob)))], axis=1), axis=1)
        return nb, glob, rows, excluded

    def _fixed_keys(self, m):
        """Keys of the window and global blocks: what every head keeps."""
        def make():
            nb, glob, rows, excluded = self._parts(m)
            return _unique(np.concatenate([(glob[:, None] * nb + np.arange(nb)).ravel(),
                                           (rows[:, None] * nb + excluded)[excluded < nb]]))
        return self._cached(("fixed", m), make)

    def _random(self, m, h):
        """The random key blocks ``(R, r)`` of head ``h`` (``-1``: none left to draw)."""
        nb, glob, rows, excluded = self._parts(m)
        if self.indices is not None:
            return self._given(m, h)
        gen = np.random.default_rng([self.seed, h])
        left = nb - (excluded < nb).sum(axis=1)          # blocks a row may draw from
        count = min(self.count, nb)     # draws past a row's last free block take none
        taken = np.full((len(rows), count), -1, np.int64)
        banned = excluded
        for t in range(count):
            live = t < left
            # the u-th allowed block: step over the banned blocks below it, in order
            block = gen.integers(0, np.maximum(left - t, 1))
            for j in range(banned.shape[1]):
                block = block + (block >= banned[:, j])
            taken[:, t] = np.where(live, block, -1)
            banned = np.sort(np.concatenate(
                [banned, np.where(live, block, nb)[:, None]], axis=1), axis=1)
        return taken

    def _given(self, m, h):
        nb, glob, rows, excluded = self._parts(m)
        idx = self.indices
        if idx.shape[0] > 1 and h >= idx.shape[0]:
            raise ValueError(f"random_indices of shape {idx.shape} has {idx.shape[0]} "
                             f"heads; query head {h} has none")
        idx = idx[h if idx.shape[0] > 1 else 0]
        if idx.shape[0] != len(rows):
            raise ValueError(
                f"random_indices of shape {self.indices.shape} has {idx.shape[0]} block "
                f"rows; M={m} keys in blocks of {self.block_size} give {nb} blocks, "
                f"{len(rows)} of them not global (one row each, ascending)")
        where = np.argwhere((idx < 0) | (idx >= nb))
        if len(where):
            r, c = where[0]
            raise ValueError(f"random_indices[{h}, {r}] = {idx[r, c]} is not a key block "
                             f"of 0..{nb - 1}")
        srt = np.sort(idx, axis=1)
        twice = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        clash = np.flatnonzero((idx[:, :, None] == excluded[:, None, :]).any(axis=(1, 2)))
        for bad, what in ((twice, "names a block twice"),
                          (clash, "names a window or global block")):
            if len(bad):
                raise ValueError(
                    f"random_indices[{h}, {bad[0]}] = {idx[bad[0]].tolist()} (query block "
                    f"{rows[bad[0]]}) {what}; a mask keeps a key once, so HuggingFace's "
                    f"double counting of it (its eval mode draws all zeros) cannot be "
                    f"reproduced")
        return idx

    def _head_keys(self, m, h):
        if self.heads is not None and h >= self.heads:
            raise ValueError(f"{self.name} was built for {self.heads} heads; query head "
                             f"{h} has no layout")
        if self.indices is not None and self.indices.shape[0] == 1:
            h = 0

        def make():
            nb, glob, rows, excluded = self._parts(m)
            taken = self._random(m, h)
            extra = (rows[:, None] * nb + taken)[taken >= 0]
            return _unique(np.concatenate([self._fixed_keys(m), extra]))
        return self._cached(("head", m, h), make)

    def _known_heads(self):
        return self.indices.shape[0] if self.indices is not None else self.heads

    def head_rows(self, m, h):
        nb = self._parts(m)[0]
        return _rows_of(self._head_keys(m, int(h)), (nb, nb))

    def rows(self, m):
        def make():
            nb, heads = self._parts(m)[0], self._known_heads()
            # heads not known: what every head keeps (tiles classified conservatively)
            keys = self._fixed_keys(m) if heads is None else self._over_heads(m, heads)[0]
            return _rows_of(keys, (nb, nb))
        return self._cached(("union", m), make)

    def common_rows(self, m):
        nb, heads = self._parts(m)[0], self._known_heads()
        keys = self._fixed_keys(m) if heads is None else self._over_heads(m, heads)[1]
        return _rows_of(keys, (nb, nb))

    def _over_heads(self, m, heads):
        """``(union, intersection)`` of the heads' keys (each head's keys are unique, so a
        key every head keeps occurs ``heads`` times)."""
        def make():
            keys, counts = _unique(np.concatenate(
                [self._head_keys(m, h) for h in range(heads)]), counts=True)
            return keys, keys[counts == heads]
        return self._cached(("heads", m), make)

    def _classify(self, t):
        labels = super()._classify(t)
        if self._known_heads() is None and self.count:
            # any tile may hold some head's random block: visit it, evaluate per head
            labels = np.maximum(labels, PARTIAL)
        return labels


def bigbird_layout(block_size: int, *, window_blocks: int = 1, global_blocks: int = 1,
                   global_at: str = "ends", random_blocks: int | None = None, rng=None,
                   random_indices=None, heads: int | None = None) -> Mask:
    r"""BigBird's block-sparse pattern as published (Zaheer et al. 2020, ITC; the original
    code and HuggingFace's ``BigBirdBlockSparseAttention``), per query head.

    Positions fall in blocks of ``block_size`` (``nb = ceil(M / block_size)``; query
    positions are bottom-right aligned). A query block keeps

    * every key block if it is **global**: the first and the last ``global_blocks`` blocks
      (``global_at="ends"``, the paper's and HuggingFace's layout) or the first
      ``global_blocks`` only (``global_at="start"``, refattn's earlier layout);
    * otherwise the blocks within ``window_blocks`` of its own, the global blocks, and
      ``random_blocks`` **random** key blocks of its own for each query head, drawn
      without replacement among the blocks it does not keep already (as HuggingFace's
      ``_bigbird_block_rand_mask_with_head`` does; all of them when fewer are left: a
      ``window_blocks`` or ``random_blocks`` beyond ``nb`` is the same as ``nb``). So
      a non-global row keeps exactly ``(2w + 1) + 2g + r`` blocks away from the edges
      (``(2w + 1) + g + r`` with ``global_at="start"``).

    Drawn here, every allowed block is equally likely; HuggingFace draws by a "plan"
    (beyond ``2r + 5`` blocks, later rows draw among the first ``2r + 5`` blocks only)
    and also keeps block 1 from drawing block ``nb - 2`` and block ``nb - 2`` from
    drawing block 1. Its ``rand_attn`` given as ``random_indices`` reproduces either.

    The random blocks are drawn per head from ``rng`` (an int seed or a
    ``numpy.random.Generator``; head ``h`` draws from ``default_rng([seed, h])``, so its
    blocks do not depend on how many heads there are), or given as ``random_indices``:
    an integer array ``(H, R, r)`` (or ``(R, r)`` for all heads) with one row per
    non-global query block, ascending -- HuggingFace's ``rand_attn`` (rows for blocks
    ``1 .. nb - 2``), which reproduces a model's pattern. Given blocks must be key blocks
    that the row does not keep already, each named once (HuggingFace's eval mode, whose
    ``rand_attn`` is all zeros, attends to block 0 twice; no mask can).

    ``heads``: the number of query heads the drawn layouts are used with; tiles are then
    classified by the union of their layouts (empty only if empty for every head, full
    only if full for every head). Without it (and without ``random_indices``) the mask
    evaluates any head, but every tile is visited. Memory grows with the kept blocks per
    head, never with the ``nb x nb`` grid.

    >>> import refattn as ra
    >>> from refattn.masks.layouts import bigbird_layout
    >>> mask = bigbird_layout(1, random_blocks=1, rng=0, heads=2)
    >>> keep = mask.materialize(8, 8, h=1).astype(int)
    >>> keep[0].tolist(), keep.sum(1).tolist()  # 3 + 2 + 1, block 1's window reaches 0
    ([1, 1, 1, 1, 1, 1, 1, 1], [8, 5, 6, 6, 6, 6, 5, 8])
    """
    block_size = check_count("block_size", block_size, minimum=1)
    window = check_count("window_blocks", window_blocks)
    g = check_count("global_blocks", global_blocks)
    if global_at not in _GLOBAL_AT:
        raise ValueError(f"global_at must be one of {_GLOBAL_AT}, got {global_at!r}")
    heads = check_count("heads", heads, minimum=1, allow_none=True)
    count = check_count("random_blocks", random_blocks, allow_none=True)
    if random_indices is not None:
        if rng is not None:
            raise TypeError("bigbird_layout takes rng (random blocks drawn) or "
                            "random_indices (given), not both")
        idx = np.asarray(random_indices)
        if idx.ndim == 2:
            idx = idx[None]
        if idx.ndim != 3 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"random_indices must be an integer array (H, R, r) or "
                             f"(R, r), got dtype {idx.dtype} shape "
                             f"{np.shape(random_indices)}")
        if count is not None and count != idx.shape[2]:
            raise ValueError(f"random_blocks={count} but random_indices of shape "
                             f"{np.shape(random_indices)} gives {idx.shape[2]} per row")
        if heads is not None and idx.shape[0] not in (1, heads):
            raise ValueError(f"random_indices of shape {np.shape(random_indices)} has "
                             f"{idx.shape[0]} heads, not 1 or heads={heads}")
        seed, count, shown = None, idx.shape[2], f"random_indices{tuple(idx.shape)}"
        idx = idx.astype(np.int64)
    else:
        if rng is None:
            raise TypeError("bigbird_layout needs rng (an int seed or a numpy Generator) "
                            "for its random blocks, or random_indices")
        count = 2 if count is None else count
        (seed, shown), idx = _seed(rng), None
        shown = f"random_blocks={count}, rng={shown}"
    name = (f"bigbird_layout(block_size={block_size}, window_blocks={window}, "
            f"global_blocks={g}, global_at={global_at!r}, {shown}"
            + (f", heads={heads})" if heads is not None else ")"))
    return _BigBird(block_size, window, g, global_at, count, seed, idx, heads, name)
