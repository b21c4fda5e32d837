"""Attention masks as composable predicates: the :class:`Mask` base class with its tile
classification (:class:`Tiles`, the labels ``EMPTY``/``PARTIAL``/``FULL``), the
combinators behind ``&``, ``|``, ``~`` and :meth:`Mask.renamed`, and masks from plain
functions and arrays (:func:`from_function`, :func:`from_array`, :func:`as_mask`). The
named masks are in :mod:`~refattn.masks.bands`, :mod:`~refattn.masks.tokens` and
:mod:`~refattn.masks.layouts`.

A mask decides, for query row ``q_idx`` and key ``kv_idx`` (and batch ``b``, query head
``h``), whether the query may attend to the key. Masks are FlexAttention-style predicates
``mask_mod(b, h, q_idx, kv_idx) -> bool`` evaluated on broadcast NumPy integer arrays, so
a simple FlexAttention ``mask_mod`` works unchanged wherever refattn takes ``mask=``
(one written with torch runs on torch index tensors: :mod:`refattn.boundary.torch_mods`).

**Positions.** Queries and keys may have different lengths ``N`` and ``M``. The named
masks compare *positions*: key ``j`` sits at position ``j``, query row ``i`` at
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
from dataclasses import dataclass

import numpy as np

from .._core.checks import is_int
from .._core.problem import flatten_leading, gather_broadcast
from ..boundary.torch_mods import ModEvaluator

#: Tiles classified at once by :meth:`Mask.tile_lists` and the tiled engines' strips: the
#: analytic classifications hold about ten int64 temporaries per tile (~20 MiB here).
STRIP_TILES = 2**18

EMPTY, PARTIAL, FULL = 0, 1, 2

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "Tiles", "from_function", "from_array",
           "as_mask"]


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
            if not (is_int(val) and val > 0):
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
            raise ValueError(f"rows must be a slice of consecutive tile rows, got {rows!r}")
        tiles = Tiles.grid(n, m, int(block_q), int(block_k), rows)
        return np.broadcast_to(self._classify(tiles), tiles.shape).astype(np.int8)

    def tile_lists(self, n: int, m: int, block_q: int, block_k: int, *,
                   strip_elements: int = STRIP_TILES):
        """The non-empty tiles, row by row, in CSR form: ``(indptr, key_tiles, labels)``
        where query-tile row ``a`` has key tiles ``key_tiles[indptr[a]:indptr[a+1]]``
        with ``labels`` ``PARTIAL`` or ``FULL``. Classifies ``strip_elements`` tiles at a
        time, so memory grows with the non-empty tiles, not with the whole grid.

        >>> import refattn as ra
        >>> indptr, key_tiles, labels = ra.masks.causal().tile_lists(6, 6, 2, 2)
        >>> indptr.tolist(), key_tiles.tolist(), labels.tolist()
        ([0, 1, 3, 6], [0, 0, 1, 0, 1, 2], [1, 2, 1, 2, 2, 1])
        """
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if not (is_int(val) and val > 0):
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
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
            raise ValueError(f"mask length {name} must be a non-negative integer, "
                             f"got {val!r}")
    return int(n), int(m)


def _offset(align: str, n, m) -> int:
    """``i' - i``: the position of query row 0 (0 top-left aligned or lengths unknown)."""
    if align == "top_left" or n is None or m is None:
        return 0
    return m - n


# ----------------------------------------------------------- functions and arrays
class _Function(Mask):
    def __init__(self, fn, name):
        self.fn, self.name = fn, name
        self._call = ModEvaluator(fn, name, "mask_mod")

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        keep = self._call(b, h, q_idx, kv_idx)
        if keep.dtype != bool:
            raise TypeError(f"mask function {self.name} returned dtype {keep.dtype}; a "
                            f"mask_mod must return booleans")
        return keep


def from_function(fn, name: str | None = None) -> Mask:
    """Wrap a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (evaluated
    on broadcast NumPy index arrays; ``q_idx`` is the raw row index).

    A mod written with torch (``doc[q_idx] == doc[kv_idx]`` over a captured id tensor,
    ``torch.where``) is evaluated on torch CPU index tensors instead when the caller has
    imported torch and the mod refers to it or NumPy cannot run it; see
    :mod:`refattn.boundary.torch_mods`.
    A mod that fails raises an error naming it, with the error it raised.

    >>> import refattn as ra
    >>> ra.masks.from_function(lambda b, h, q, k: (q - k) % 2 == 0).materialize(2, 3)
    array([[ True, False,  True],
           [False,  True, False]])
    """
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
    raise TypeError(f"mask must be a refattn mask, a function (b, h, q_idx, kv_idx) -> "
                    f"bool or a boolean array, got {type(mask).__name__}")


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
