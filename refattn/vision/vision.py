r"""Vision attention on grids of tokens: windows (Swin), shifted windows, neighborhood
attention (NATTEN), spatial-reduction attention (PVT), patch merging, and global (CLS)
tokens added to any of them.

**Layout.** Inputs are grids of tokens, heads first: ``q: (..., Hq, *S, D)``,
``k: (..., Hkv, *S, D)``, ``v: (..., Hkv, *S, Dv)`` with ``S = (X, Y)`` for images,
``(X,)`` for sequences and ``(T, X, Y)`` for video; GQA and leading batch dimensions as
everywhere in refattn. The number of spatial dimensions is the length of the window /
kernel / ratio tuple; a plain ``int`` means the same size on both axes of a 2-D grid.
Outputs are ``(..., Hq, *S, Dv)`` float64.

**Flattened form.** Windows, shifted windows and neighborhoods are masks over the grid
flattened in row-major (C) order, token ``t = x * Y + y`` for an ``(X, Y)`` grid, and
each of these mechanisms equals dense ``refattn.attention`` on the flattened sequence
under its mask (spatial reduction is dense attention to the pooled keys instead):

.. math:: o_t = \sum_{u \in S(t)} \frac{e^{s_{tu}}}{\sum_{u' \in S(t)} e^{s_{tu'}}} v_u,
          \qquad S(t) = \{u : \text{mask}(t, u)\}.

The masks (:func:`neighborhood_mask`, :func:`window_mask`, :func:`shifted_window_mask`,
:func:`with_global`) are :class:`refattn.masks.Mask` objects with an analytic tile
classification (a tile of flattened indices is bounded, per axis, by the rows/columns it
covers), so the mechanisms run through :func:`refattn.sparse_attention` in time and
memory proportional to the kept pairs, ``O(N k^d)``, never ``O(N^2)``.

**Global (CLS) tokens.** ``cls_tokens=(q_cls, k_cls, v_cls)`` with shapes
``(..., Hq, G, D)``, ``(..., Hkv, G, D)``, ``(..., Hkv, G, Dv)`` adds ``G`` tokens that
attend to every token and are attended by every token. In the flattened form they come
first: the sequence is ``[cls_0 .. cls_{G-1}, grid tokens]`` and the mask is
``with_global(pattern, G)``. The mechanisms then return ``(out, out_cls)`` (and with
``return_lse``: ``(out, lse, out_cls, lse_cls)``).

>>> import numpy as np, refattn as ra
>>> from refattn.vision import neighborhood_attention, neighborhood_mask
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 2, 12, 10, 8))       # 2 heads, a 12 x 10 image
>>> out = neighborhood_attention(q, k, v, (5, 5))
>>> flat = lambda x: x.reshape(2, 120, 8)
>>> ref = ra.attention(flat(q), flat(k), flat(v), mask=neighborhood_mask((12, 10), (5, 5)))
>>> bool(np.allclose(out.reshape(2, 120, 8), ref, rtol=1e-12, atol=0))
True
"""
from __future__ import annotations

import math

import numpy as np

from .. import masks as _masks
from ..boundary.arrays import to_float64
from ..exact.dense import attention, attention_probs
from ..exact.merge import merge_partials
from ..exact.tiled import tiled_attention
from ..masks.masks import EMPTY, FULL, PARTIAL, Mask, Tiles
from ..registry import attach, register
from ..sparse.engine import sparse_attention

__all__ = ["neighborhood_attention", "window_attention", "shifted_window_attention",
           "spatial_reduction_attention", "patch_merging", "neighborhood_mask",
           "window_mask", "shifted_window_mask", "with_global", "draw_query_pixel"]


# ----------------------------------------------------------------- argument checks
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_tuple(name: str, value, nd: int | None, *, minimum: int = 1) -> tuple:
    """``value`` as a tuple of ``nd`` integers >= ``minimum``: an int is repeated (on
    both axes of a 2-D grid when ``nd`` is None), a sequence must have length ``nd``."""
    if _is_int(value):
        out = (int(value),) * (2 if nd is None else nd)
    elif isinstance(value, (tuple, list, np.ndarray)) and all(_is_int(x) for x in value):
        out = tuple(int(x) for x in value)
        if len(out) == 0 or (nd is not None and len(out) != nd):
            want = "a non-empty sequence" if nd is None else f"{nd} entries (one per axis)"
            raise ValueError(f"{name} must be an int or {want}, got {value!r}")
    else:
        raise ValueError(f"{name} must be an integer or a tuple of integers, got {value!r}")
    if any(x < minimum for x in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return out


def _bool_tuple(name: str, value, nd: int) -> tuple:
    if isinstance(value, (bool, np.bool_)):
        return (bool(value),) * nd
    if isinstance(value, (tuple, list)) and len(value) == nd and all(
            isinstance(x, (bool, np.bool_)) for x in value):
        return tuple(bool(x) for x in value)
    raise TypeError(f"causal must be True/False or a tuple of {nd} booleans (one per "
                    f"axis), got {value!r}")


def _grid_shape(shape, nd: int | None = None) -> tuple:
    if _is_int(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            _is_int(x) and x >= 1 for x in shape):
        raise ValueError(f"grid shape must be a non-empty tuple of positive integers, got "
                         f"{shape!r}")
    shape = tuple(int(x) for x in shape)
    if nd is not None and len(shape) != nd:
        raise ValueError(f"grid shape {shape} has {len(shape)} axes but the pattern has "
                         f"{nd}")
    return shape


# ----------------------------------------------------------------------- grid masks
class _RangeTable:
    """Range minimum or maximum of a fixed integer array over ``[a, b]`` (inclusive),
    vectorized over query arrays (a sparse table, ``O(L log L)`` to build)."""

    def __init__(self, values: np.ndarray, op):
        self.op, self.levels = op, [np.asarray(values, np.int64)]
        j = 1
        while (1 << j) <= len(values):
            prev, half = self.levels[-1], 1 << (j - 1)
            self.levels.append(op(prev[:-half], prev[half:]))
            j += 1

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        level = np.zeros(a.shape, np.int64)
        length = b - a + 1
        for j in range(1, len(self.levels)):
            level[length >= (1 << j)] = j
        out = np.empty(a.shape, np.int64)
        for j in np.unique(level):
            sel = level == j
            tab = self.levels[j]
            out[sel] = self.op(tab[a[sel]], tab[b[sel] - (1 << j) + 1])
        return out


class _GridMask(Mask):
    """A mask over a grid of ``shape`` flattened in row-major order that factorizes over
    axes: keep key ``u`` for query ``t`` iff on every axis ``a`` the key coordinate
    ``u_a`` lies in ``[lo_a[t_a], hi_a[t_a]]`` and ``(u_a - t_a) % step_a == 0``.

    Tiles of flattened indices are classified by the coordinate interval each tile
    covers per axis (the whole axis when it wraps): empty when on some axis no query
    coordinate's key interval meets the key tile's interval, full when every query
    coordinate's interval contains it on every axis (``step = 1``).
    """

    analytic = True
    num_global = 0

    def __init__(self, shape, lo, hi, step, name):
        self.shape = tuple(shape)
        self.size = math.prod(self.shape)
        self.strides = tuple(math.prod(self.shape[a + 1:]) for a in range(len(self.shape)))
        self.lo = [np.asarray(x, np.int64) for x in lo]
        self.hi = [np.asarray(x, np.int64) for x in hi]
        self.step = tuple(step)
        self.name = name
        self._tables = [(_RangeTable(l_, np.minimum), _RangeTable(h_, np.maximum),
                         _RangeTable(l_, np.maximum), _RangeTable(h_, np.minimum))
                        for l_, h_ in zip(self.lo, self.hi)]

    def _check(self, n, m):
        for label, length in (("N", n), ("M", m)):
            if length is not None and length != self.size:
                raise ValueError(f"{self.name} covers a grid of {self.size} tokens; it was "
                                 f"used with {label}={length} (the flattened sequence must "
                                 f"have {self.size} tokens)")

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        self._check(n, m)
        q_idx, kv_idx = np.asarray(q_idx), np.asarray(kv_idx)
        keep = None
        for axis, (stride, length) in enumerate(zip(self.strides, self.shape)):
            qc = (q_idx // stride) % length
            kc = (kv_idx // stride) % length
            part = (kc >= self.lo[axis][qc]) & (kc <= self.hi[axis][qc])
            if self.step[axis] > 1:
                part &= (kc - qc) % self.step[axis] == 0
            keep = part if keep is None else keep & part
        return keep

    def _axis_interval(self, first, last, axis):
        """Per tile ``[first, last]`` of flat indices, the coordinate interval on
        ``axis`` that contains all of its tokens' coordinates."""
        stride, length = self.strides[axis], self.shape[axis]
        u0, u1 = first // stride, last // stride
        c0, c1 = u0 % length, u1 % length
        whole = (u1 - u0 + 1 >= length) | (c0 > c1)
        return np.where(whole, 0, c0), np.where(whole, length - 1, c1)

    def _classify(self, t: Tiles):
        self._check(t.n, t.m)
        shape = t.shape
        if 0 in shape:
            return np.zeros(shape, np.int8)
        empty = np.zeros(shape, bool)
        full = np.ones(shape, bool)
        for axis in range(len(self.shape)):
            qa, qb = self._axis_interval(t.q_lo, t.q_hi, axis)
            ka, kb = self._axis_interval(t.k_lo, t.k_hi, axis)
            min_lo, max_hi, max_lo, min_hi = (tab(qa, qb) for tab in self._tables[axis])
            empty |= (max_hi[:, None] < ka[None, :]) | (min_lo[:, None] > kb[None, :])
            if self.step[axis] == 1:
                full &= (max_lo[:, None] <= ka[None, :]) & (min_hi[:, None] >= kb[None, :])
            else:
                full &= False
        return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _natten_window(length: int, kernel: int, dilation: int, causal: bool):
    """Per coordinate ``x`` of an axis, the first and last key coordinate of its
    neighborhood (keys in between with ``(u - x) % dilation == 0`` are kept)."""
    x = np.arange(length)
    g, j = x % dilation, x // dilation
    group_len = length // dilation + (g < length % dilation)   # tokens in x's group
    if causal:
        start = np.maximum(j - (kernel - 1), 0)
        return g + dilation * start, x
    start = np.clip(j - kernel // 2, 0, group_len - kernel)
    return g + dilation * start, g + dilation * (start + kernel - 1)


def neighborhood_mask(shape, kernel_size, dilation=1, causal=False) -> Mask:
    r"""Neighborhood attention (NATTEN) as a mask over the flattened grid ``shape``.

    On each axis of length ``L``, with kernel ``k`` and dilation ``d``, the tokens split
    into ``d`` dilation groups ``{x : x % d = g}``; a query at ``x`` (group ``g``, index
    ``i = x // d`` in it, group length ``L_g``) attends to the ``k`` group members with
    group indices ``s .. s + k - 1``,

    .. math:: s = \operatorname{clip}(i - \lfloor k/2 \rfloor,\ 0,\ L_g - k),

    i.e. the window centered on the query, shifted inwards at the borders so that every
    query sees exactly ``k`` keys per axis (``k^d`` in all); even ``k`` put
    ``k/2`` keys before the center and ``k/2 - 1`` after, as NATTEN does. ``causal``
    (per axis) keeps group indices ``max(0, i - k + 1) .. i`` instead. A key is kept iff
    it is in the neighborhood on every axis (Hassani et al. 2023, "Neighborhood
    Attention Transformer"; Hassani & Shi 2022, "Dilated Neighborhood Attention
    Transformer"). Requires ``kernel_size * dilation <= shape`` on every axis.

    >>> m = neighborhood_mask((5,), (3,))
    >>> m.materialize(5, 5).astype(int)
    array([[1, 1, 1, 0, 0],
           [1, 1, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 1, 1],
           [0, 0, 1, 1, 1]])
    >>> int(neighborhood_mask((6, 7), (3, 3), dilation=2).materialize(42, 42).sum(1).min())
    9
    """
    ks = _int_tuple("kernel_size", kernel_size, None)
    nd = len(ks)
    shape = _grid_shape(shape, nd)
    dil = _int_tuple("dilation", dilation, nd)
    cz = _bool_tuple("causal", causal, nd)
    for axis, (length, kk, dd) in enumerate(zip(shape, ks, dil)):
        if kk > length:
            raise ValueError(f"kernel_size {ks} is larger than the grid {shape} on axis "
                             f"{axis} ({kk} > {length}); every query needs a full window")
        if kk * dd > length:
            raise ValueError(f"kernel_size * dilation = {kk} * {dd} = {kk * dd} exceeds the "
                             f"grid {shape} on axis {axis} (size {length}); each dilation "
                             f"group must hold a full window: kernel_size * dilation <= "
                             f"size")
    lo, hi = zip(*(_natten_window(length, kk, dd, c)
                   for length, kk, dd, c in zip(shape, ks, dil, cz)))
    extra = ([f"dilation={dil}"] if any(d > 1 for d in dil) else []) + (
        [f"causal={cz}"] if any(cz) else [])
    name = f"neighborhood_mask({shape}, kernel_size={ks}" + "".join(
        ", " + e for e in extra) + ")"
    return _GridMask(shape, lo, hi, dil, name)


def window_mask(shape, window, shift=0) -> Mask:
    r"""(Shifted) window attention (Swin) as a mask over the flattened grid ``shape``.

    On each axis the coordinates are cut into consecutive windows of ``w`` tokens
    starting at ``-(w - s) % w``: token ``x`` belongs to window
    ``(x + (w - s) \bmod w) // w``. With ``shift = 0`` these are Swin's regular windows
    ``x // w``; with ``shift = s > 0`` they are Swin's shifted windows drawn on the
    original (unrolled) grid: ``[0, s)``, ``[s, s + w)``, ... A key is kept iff it is in
    the query's window on every axis.

    **Padding rule.** When ``w`` does not divide the grid, the windows at the end of an
    axis are cut short (the tokens Swin would pad with are masked out, never attended
    to), so every window holds only real tokens. Swin's reference code instead attends
    to its zero-padded tokens (their keys equal the ``qkv`` bias), which is not a
    function of ``q, k, v``.

    >>> window_mask((6,), (3,)).materialize(6, 6)[4].astype(int)
    array([0, 0, 0, 1, 1, 1])
    >>> window_mask((6,), (3,), shift=1).materialize(6, 6)[3].astype(int)
    array([0, 1, 1, 1, 0, 0])
    """
    win = _int_tuple("window", window, None)
    nd = len(win)
    shape = _grid_shape(shape, nd)
    sh = _int_tuple("shift", shift, nd, minimum=0)
    for axis, (length, w, s) in enumerate(zip(shape, win, sh)):
        if w > length:
            raise ValueError(f"window {win} does not fit the grid {shape}: {w} > {length} "
                             f"on axis {axis}")
        if s >= w:
            raise ValueError(f"shift {sh} must be smaller than the window {win} on every "
                             f"axis (axis {axis}: shift {s} >= window {w})")
    lo, hi = [], []
    for length, w, s in zip(shape, win, sh):
        off = (w - s) % w
        first = ((np.arange(length) + off) // w) * w - off
        lo.append(np.maximum(first, 0))
        hi.append(np.minimum(first + w - 1, length - 1))
    name = f"window_mask({shape}, window={win}" + (
        f", shift={sh})" if any(sh) else ")")
    return _GridMask(shape, lo, hi, (1,) * nd, name)


def shifted_window_mask(shape, window, shift=None) -> Mask:
    """Swin's shifted windows: :func:`window_mask` with ``shift`` defaulting to
    ``window // 2`` on every axis (the displacement of the paper).

    >>> shifted_window_mask((8, 8), 4)
    window_mask((8, 8), window=(4, 4), shift=(2, 2))
    """
    win = _int_tuple("window", window, None)
    return window_mask(shape, win, tuple(w // 2 for w in win) if shift is None else shift)


class _WithGlobal(Mask):
    """``count`` global tokens in front of the tokens of ``inner``."""

    def __init__(self, inner: Mask, count: int):
        self.inner, self.num_global = inner, count
        self.analytic = inner.analytic
        self.shape = getattr(inner, "shape", None)
        self.name = f"with_global({inner.name}, {count})"

    def _inner_lengths(self, n, m):
        out = []
        for label, length in (("N", n), ("M", m)):
            if length is not None and length <= self.num_global:
                raise ValueError(f"{self.name} needs more than {self.num_global} tokens, "
                                 f"got {label}={length}")
            out.append(None if length is None else length - self.num_global)
        return out

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        n_in, m_in = self._inner_lengths(n, m)
        qi = np.asarray(q_idx) - self.num_global
        ki = np.asarray(kv_idx) - self.num_global
        inner = self.inner._eval(b, h, np.maximum(qi, 0), np.maximum(ki, 0), n_in, m_in)
        return inner | (qi < 0) | (ki < 0)

    def _classify(self, t: Tiles):
        if not self.analytic:
            return Mask._classify(self, t)
        g = self.num_global
        n_in, m_in = self._inner_lengths(t.n, t.m)
        inner_tiles = Tiles(np.maximum(t.q_lo - g, 0), np.maximum(t.q_hi - g, 0),
                            np.maximum(t.k_lo - g, 0), np.maximum(t.k_hi - g, 0), n_in, m_in)
        inner = np.broadcast_to(self.inner._classify(inner_tiles), t.shape)
        all_global = (t.q_hi < g)[:, None] | (t.k_hi < g)[None, :]
        touches = (t.q_lo < g)[:, None] | (t.k_lo < g)[None, :]
        # Global rows/columns are all kept: the tile is full iff the rest of it is.
        return np.where(all_global, FULL, np.where(touches, np.maximum(inner, PARTIAL),
                                                   inner)).astype(np.int8)


def with_global(mask, count: int) -> Mask:
    """Put ``count`` global (CLS) tokens in front of the sequence ``mask`` is defined
    on: tokens ``0 .. count - 1`` attend to every token and every token attends to them;
    token ``count + t`` is ``mask``'s token ``t``. Keeps the analytic tile
    classification of ``mask``.

    >>> with_global(window_mask((4,), (2,)), 1).materialize(5, 5).astype(int)
    array([[1, 1, 1, 1, 1],
           [1, 1, 1, 0, 0],
           [1, 1, 1, 0, 0],
           [1, 0, 0, 1, 1],
           [1, 0, 0, 1, 1]])
    """
    if not _is_int(count) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    mask = _masks.as_mask(mask)
    return mask if count == 0 else _WithGlobal(mask, int(count))


# ----------------------------------------------------------------- grid inputs
class _Grid:
    """Validated grid inputs, flattened to sequences (CLS tokens first)."""

    def __init__(self, q, k, v, nd, *, check_finite, cls_tokens=None, same_grid=True):
        q = to_float64(q, "q", check_finite=check_finite)
        k = to_float64(k, "k", check_finite=check_finite)
        v = None if v is None else to_float64(v, "v", check_finite=check_finite)
        letters = {1: "X", 2: "X, Y", 3: "T, X, Y"}.get(nd, ", ".join(
            f"S{i}" for i in range(nd)))
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x is not None and x.ndim < nd + 2:
                raise ValueError(f"{name} must have shape (..., heads, {letters}, dim) for "
                                 f"{nd} spatial dimension(s), got shape {x.shape}")
        shapes = f"q {q.shape}, k {k.shape}" + ("" if v is None else f", v {v.shape}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must share the last dimension D; got {shapes}")
        if v is not None and v.shape[-nd - 2:-1] != k.shape[-nd - 2:-1]:
            raise ValueError(f"k and v must have the same heads and grid (..., Hkv, "
                             f"{letters}, *); got {shapes}")
        hq, hkv = q.shape[-nd - 2], k.shape[-nd - 2]
        if hkv == 0 or hq == 0 or hq % hkv != 0:
            raise ValueError(f"query heads Hq={hq} must be a positive multiple of KV heads "
                             f"Hkv={hkv} (grouped-query attention); got {shapes}")
        if q.shape[-1] == 0:
            raise ValueError(f"head dimension D must be positive; got {shapes}")
        self.q_grid, self.k_grid = q.shape[-nd - 1:-1], k.shape[-nd - 1:-1]
        if 0 in self.q_grid or 0 in self.k_grid:
            raise ValueError(f"the grids must not be empty; got {shapes}")
        if same_grid and self.q_grid != self.k_grid:
            raise ValueError(f"q and k must lie on the same grid; got q grid {self.q_grid}, "
                             f"k grid {self.k_grid} ({shapes})")
        try:
            batch = np.broadcast_shapes(q.shape[:-nd - 2], k.shape[:-nd - 2],
                                        *(() if v is None else (v.shape[:-nd - 2],)))
        except ValueError:
            raise ValueError(f"leading batch dimensions of q, k, v do not broadcast; got "
                             f"{shapes}") from None
        self.nd, self.heads_q, self.heads_kv = nd, hq, hkv
        self.grid_q, self.grid_k, self.grid_v = q, k, v
        self.num_global = 0
        cls = None
        if cls_tokens is not None:
            cls, batch = self._check_cls(cls_tokens, batch, q, k, v, check_finite)
        self.batch = tuple(batch)

        def flat(x):
            if x is None:
                return None
            x = x.reshape(x.shape[:-nd - 1] + (-1, x.shape[-1]))
            return np.broadcast_to(x, self.batch + x.shape[-3:]) if cls is not None else x
        self.q, self.k, self.v = flat(q), flat(k), flat(v)
        if cls is not None:
            self.cls = tuple(np.broadcast_to(c, self.batch + c.shape[-3:]) for c in cls)
            self.q = np.concatenate([self.cls[0], self.q], axis=-2)
            self.k = np.concatenate([self.cls[1], self.k], axis=-2)
            self.v = np.concatenate([self.cls[2], self.v], axis=-2)

    def _check_cls(self, cls_tokens, batch, q, k, v, check_finite):
        if not isinstance(cls_tokens, (tuple, list)) or len(cls_tokens) != 3:
            raise TypeError("cls_tokens must be a tuple (q_cls, k_cls, v_cls) of arrays "
                            "(..., Hq, G, D), (..., Hkv, G, D), (..., Hkv, G, Dv)")
        names = ("cls_tokens[0] (q_cls)", "cls_tokens[1] (k_cls)", "cls_tokens[2] (v_cls)")
        if v is None:
            raise TypeError("cls_tokens need v")
        cq, ck, cv = (to_float64(x, name, check_finite=check_finite)
                      for x, name in zip(cls_tokens, names))
        want = [(cq, q, "Hq"), (ck, k, "Hkv"), (cv, v, "Hkv")]
        for (c, x, heads), name in zip(want, names):
            if c.ndim < 3 or c.shape[-3] != x.shape[-self.nd - 2] or \
                    c.shape[-1] != x.shape[-1]:
                raise ValueError(f"{name} must have shape (..., {heads}, G, "
                                 f"{x.shape[-1]}) with {heads}={x.shape[-self.nd - 2]}; "
                                 f"got {c.shape}")
        counts = {c.shape[-2] for c, _, _ in want}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"cls_tokens must hold the same number G >= 1 of tokens in q, "
                             f"k and v; got shapes {[c.shape for c, _, _ in want]}")
        try:
            batch = np.broadcast_shapes(batch, *(c.shape[:-3] for c, _, _ in want))
        except ValueError:
            raise ValueError(f"batch dimensions of cls_tokens do not broadcast with the "
                             f"grid's {tuple(batch)}; got {[c.shape for c, _, _ in want]}"
                             ) from None
        self.num_global = counts.pop()
        return (cq, ck, cv), batch

    def finish(self, out, lse, return_lse):
        """Split the flattened result back into the grid (and the CLS tokens)."""
        g = self.num_global
        lead = out.shape[:-2]
        grid_out = out[..., g:, :].reshape(lead + self.q_grid + (out.shape[-1],))
        grid_lse = lse[..., g:].reshape(lead + self.q_grid)
        if not g:
            return (grid_out, grid_lse) if return_lse else grid_out
        cls_out, cls_lse = out[..., :g, :], lse[..., :g]
        return (grid_out, grid_lse, cls_out, cls_lse) if return_lse else (grid_out, cls_out)


# --------------------------------------------------------------- neighborhood attention
def _na_args(kernel_size, dilation, causal):
    ks = _int_tuple("kernel_size", kernel_size, None)
    return len(ks), ks, _int_tuple("dilation", dilation, len(ks)), \
        _bool_tuple("causal", causal, len(ks))


def _na_probs(q, k, kernel_size, *, dilation=1, causal=False, scale=None, bias=None,
              softcap=None, check_finite=True, method=None, block_q=None, block_k=None,
              workers=None):
    """The dense attention matrix of :func:`neighborhood_attention` over the flattened
    grid, ``(..., Hq, N, N)`` with ``N = prod(grid)``."""
    nd, ks, dil, cz = _na_args(kernel_size, dilation, causal)
    g = _Grid(q, k, None, nd, check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=neighborhood_mask(g.q_grid, ks, dil, cz),
                           scale=scale, bias=bias, softcap=softcap, check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·k^d·D)", state="O(N·D)",
          supports_causal=True, supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=True, self_attention_only=True,
          example={"kernel_size": (1,)})
def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, causal=False,
                           cls_tokens=None, scale=None, bias=None, softcap=None,
                           return_lse=False, check_finite=True, method="auto", block_q=None,
                           block_k=None, workers=None):
    r"""Neighborhood attention (NATTEN) in 1, 2 or 3 (any number of) spatial dimensions.

    Each query attends to the ``k_1 x ... x k_d`` keys around it: on every axis the
    window of ``kernel_size`` tokens centered on the query, with its center clamped at
    the borders so that every query sees a full window, taken within the query's
    dilation group (tokens ``dilation`` apart) -- :func:`neighborhood_mask`:

    .. math:: o_t = \operatorname{softmax}_{u \in \mathcal{N}(t)}(s_{tu})\, v_u,
              \qquad |\mathcal{N}(t)| = \textstyle\prod_a k_a .

    Hassani, Walton, Li, Li & Shi 2023 (NAT, CVPR); Hassani & Shi 2022 (DiNAT: dilation).

    Parameters
    ----------
    q, k, v : ``(..., Hq, *S, D)``, ``(..., Hkv, *S, D)``, ``(..., Hkv, *S, Dv)``; the
        number of spatial axes ``S`` is ``len(kernel_size)`` (an int means 2-D).
    kernel_size : int or tuple, ``1 <= kernel_size * dilation <= S`` on every axis
        (``ValueError`` otherwise).
    dilation : int or tuple (per axis).
    causal : bool or tuple of bools (per axis): keep the ``kernel_size`` group members up
        to and including the query (a query near the start sees fewer).
    cls_tokens : ``(q_cls, k_cls, v_cls)``, global tokens (module docstring); then the
        result is ``(out, out_cls)``.
    scale, bias, softcap, return_lse, check_finite : as :func:`refattn.attention`; a
        ``bias`` array or score modifier is indexed by flattened token indices.
    method, block_q, block_k, workers : passed to :func:`refattn.sparse_attention`.

    Returns ``(..., Hq, *S, Dv)`` (and the lse ``(..., Hq, *S)`` with ``return_lse``).
    Time ``O(N k^d D)``, working memory bounded by the engine's blocks.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 7, 7, 4))
    >>> out = neighborhood_attention(q, k, v, (3, 3))
    >>> from refattn import attention
    >>> corner = attention(q[:, None, 0, 0], k[:, :3, :3].reshape(1, 9, 4),
    ...                    v[:, :3, :3].reshape(1, 9, 4))   # (0, 0) sees the 3 x 3 corner
    >>> bool(np.allclose(out[:, 0, 0], corner[:, 0]))
    True
    """
    nd, ks, dil, cz = _na_args(kernel_size, dilation, causal)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens)
    mask = with_global(neighborhood_mask(g.q_grid, ks, dil, cz), g.num_global)
    out, lse = sparse_attention(g.q, g.k, g.v, mask, scale=scale, bias=bias,
                                softcap=softcap, return_lse=True, check_finite=check_finite,
                                method=method, block_q=block_q, block_k=block_k,
                                workers=workers)
    return g.finish(out, lse, return_lse)


neighborhood_attention.mask = neighborhood_mask


# --------------------------------------------------------------------- window attention
def _window_probs(q, k, window, *, shift=0, scale=None, bias=None, softcap=None,
                  check_finite=True, method=None, block_q=None, block_k=None, workers=None):
    """Dense attention matrix of :func:`window_attention` over the flattened grid."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, None, len(win), check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=window_mask(g.q_grid, win, shift), scale=scale,
                           bias=bias, softcap=softcap, check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·w^d·D)", state="O(N·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=True, example={"window": (1,)})
def window_attention(q, k, v, window, *, shift=0, cls_tokens=None, scale=None, bias=None,
                     softcap=None, return_lse=False, check_finite=True, method="auto",
                     block_q=None, block_k=None, workers=None):
    r"""Window attention (Swin): attention within non-overlapping ``w x w`` windows,
    computed from its mask on the flattened grid (:func:`window_mask`).

    .. math:: o_t = \operatorname{softmax}_{u \in W(t)}(s_{tu})\, v_u, \qquad
              W(t) = \{u : \lfloor (u_a + o_a) / w_a \rfloor =
              \lfloor (t_a + o_a) / w_a \rfloor \ \forall a\},\ o_a = (w_a - s_a) \bmod w_a

    Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
    Windows" (W-MSA; with ``shift`` the SW-MSA of the next block, here evaluated as the
    equivalent mask on the original grid -- :func:`shifted_window_attention` performs
    Swin's literal roll / partition / mask / roll-back and equals this).

    Parameters
    ----------
    q, k, v : ``(..., Hq, *S, D)``, ``(..., Hkv, *S, D)``, ``(..., Hkv, *S, Dv)``;
        ``len(S) = len(window)`` (an int window means 2-D).
    window : int or tuple, ``window <= S`` on every axis (``ValueError`` otherwise). When
        it does not divide ``S`` the last windows of an axis are cut short (padding rule
        of :func:`window_mask`: padded tokens are never attended to).
    shift : int or tuple, ``0 <= shift < window``: Swin's cyclic shift (``window // 2``
        in the paper).
    cls_tokens : global tokens (module docstring): result ``(out, out_cls)``.
    Others as :func:`neighborhood_attention`.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 8, 4))
    >>> out = window_attention(q, k, v, 4)
    >>> from refattn import attention
    >>> win = lambda x: x[:, 4:, :4].reshape(1, 16, 4)          # the bottom-left window
    >>> bool(np.allclose(out[:, 4:, :4].reshape(1, 16, 4), attention(win(q), win(k), win(v))))
    True
    """
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, v, len(win), check_finite=check_finite, cls_tokens=cls_tokens)
    mask = with_global(window_mask(g.q_grid, win, shift), g.num_global)
    out, lse = sparse_attention(g.q, g.k, g.v, mask, scale=scale, bias=bias,
                                softcap=softcap, return_lse=True, check_finite=check_finite,
                                method=method, block_q=block_q, block_k=block_k,
                                workers=workers)
    return g.finish(out, lse, return_lse)


window_attention.mask = window_mask


# ------------------------------------------------------------ shifted windows, literally
def _partition(x, window):
    """``(B, H, *Sp, C)`` -> ``(B, *n, H, prod(window), C)``: Swin's window_partition."""
    nd = len(window)
    b, h, c = x.shape[0], x.shape[1], x.shape[-1]
    counts = tuple(s // w for s, w in zip(x.shape[2:2 + nd], window))
    x = x.reshape((b, h) + sum(((n, w) for n, w in zip(counts, window)), ()) + (c,))
    perm = (0,) + tuple(2 + 2 * a for a in range(nd)) + (1,) + \
        tuple(3 + 2 * a for a in range(nd)) + (2 + 2 * nd,)
    return x.transpose(perm).reshape((b,) + counts + (h, math.prod(window), c))


def _unpartition(x, window, padded):
    """Inverse of :func:`_partition` (Swin's window_reverse)."""
    nd = len(window)
    b, h, c = x.shape[0], x.shape[1 + nd], x.shape[-1]
    counts = tuple(s // w for s, w in zip(padded, window))
    x = x.reshape((b,) + counts + (h,) + tuple(window) + (c,))
    perm = (0, 1 + nd) + sum(((1 + a, 2 + nd + a) for a in range(nd)), ()) + (2 + 2 * nd,)
    return x.transpose(perm).reshape((b, h) + tuple(padded) + (c,))


def _swin_literal(q, k, v, window, shift, scale, softcap):
    """Swin's SW-MSA on ``q (B, Hq, *S, D)``...: pad to whole windows, roll by
    ``-shift``, partition, mask pairs from different regions (and padded keys), attend
    per window, reverse, roll by ``+shift``, crop. Returns ``out, lse`` on the grid."""
    nd = len(window)
    grid = q.shape[2:2 + nd]
    padded = tuple(-(-s // w) * w for s, w in zip(grid, window))
    pads = [(0, 0), (0, 0)] + [(0, p - s) for p, s in zip(padded, grid)] + [(0, 0)]
    q, k, v = (np.pad(x, pads) for x in (q, k, v))
    valid = np.zeros(padded, bool)
    valid[tuple(slice(0, s) for s in grid)] = True
    # Swin's img_mask: per axis slices (0, -w), (-w, -s), (-s, None) on the rolled map
    region = np.zeros(padded, np.int64)
    for a, (p, w, s) in enumerate(zip(padded, window, shift)):
        lab = np.zeros(p, np.int64)
        if s:
            lab[p - w:p - s] = 1
            lab[p - s:] = 2
        region = region * 3 + lab.reshape((1,) * a + (p,) + (1,) * (nd - a - 1))
    spatial = tuple(range(2, 2 + nd))
    if any(shift):   # torch.roll(x, shifts=(-s1, -s2), dims=(1, 2))
        q, k, v = (np.roll(x, tuple(-s for s in shift), axis=spatial) for x in (q, k, v))
        valid = np.roll(valid, tuple(-s for s in shift), axis=tuple(range(nd)))
    # region labels are defined on the rolled map already (no roll)
    lab_w = _partition(region[None, None, ..., None], window)[0, ..., 0, :, 0]
    val_w = _partition(valid[None, None, ..., None], window)[0, ..., 0, :, 0]
    mask = (lab_w[..., :, None] == lab_w[..., None, :]) & val_w[..., None, :]
    out, lse = attention(_partition(q, window), _partition(k, window), _partition(v, window),
                         mask=mask[..., None, :, :], scale=scale, softcap=softcap,
                         return_lse=True)
    out = _unpartition(out, window, padded)
    lse = _unpartition(lse[..., None], window, padded)[..., 0]
    if any(shift):
        out = np.roll(out, shift, axis=spatial)
        lse = np.roll(lse, shift, axis=spatial)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in grid)
    return out[crop], lse[crop]


def _shifted_probs(q, k, window, *, shift=None, scale=None, softcap=None,
                   check_finite=True):
    """Dense attention matrix of :func:`shifted_window_attention` (flattened grid)."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, None, len(win), check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=shifted_window_mask(g.q_grid, win, shift),
                           scale=scale, softcap=softcap, check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·w^d·D)", state="O(N·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=True, example={"window": (1,)})
def shifted_window_attention(q, k, v, window, *, shift=None, cls_tokens=None, scale=None,
                             softcap=None, return_lse=False, check_finite=True):
    r"""Shifted-window attention (Swin SW-MSA), computed literally as Swin does.

    The grid is padded to whole windows, cyclically shifted by ``-shift``
    (``torch.roll``), partitioned into ``w x w`` windows, attention is computed per
    window with Swin's attention mask (pairs from different regions of the wrapped
    border windows are masked), and the result is partitioned back and shifted by
    ``+shift``. Padded tokens are masked as keys (padding rule of :func:`window_mask`).
    Equals :func:`window_attention` ``(..., shift=shift)``, the same pattern as a mask
    on the original grid, to rounding.

    Liu et al. 2021, "Swin Transformer", Sec. 3.2 ("efficient batch computation for
    shifted configuration").

    q, k, v : grids as :func:`window_attention`. window : int or tuple
    (``<= S``). shift : int or tuple, default ``window // 2``; ``0 <= shift < window``.
    cls_tokens : global tokens: the grid's window result is merged with attention to
    the CLS keys by log-sum-exp (:func:`refattn.merge_partials`); CLS queries attend to
    every token. scale, softcap, return_lse, check_finite : as
    :func:`refattn.attention`. Dense per window: memory ``O(N w^d)``.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 10, 4))
    >>> a = shifted_window_attention(q, k, v, 4)                # shift (2, 2), padded
    >>> b = window_attention(q, k, v, 4, shift=2)
    >>> bool(np.allclose(a, b, rtol=1e-12, atol=0))
    True
    """
    win = _int_tuple("window", window, None)
    nd = len(win)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens)
    sh = tuple(w // 2 for w in win) if shift is None else _int_tuple("shift", shift, nd,
                                                                     minimum=0)
    window_mask(g.q_grid, win, sh)        # the same checks (window fits, shift < window)

    def batched(x):     # (*batch, H, *S, C) -> (B, H, *S, C)
        x = np.broadcast_to(x, g.batch + x.shape[-nd - 2:])
        return x.reshape((-1,) + x.shape[-nd - 2:])

    out, lse = _swin_literal(batched(g.grid_q), batched(g.grid_k), batched(g.grid_v), win,
                             sh, scale, softcap)
    out = out.reshape(g.batch + out.shape[1:])
    lse = lse.reshape(g.batch + lse.shape[1:])
    if not g.num_global:
        return (out, lse) if return_lse else out
    gc, n = g.num_global, math.prod(g.q_grid)
    qc, kc, vc = g.cls
    flat_out = out.reshape(g.batch + (g.heads_q, n, out.shape[-1]))
    flat_lse = lse.reshape(g.batch + (g.heads_q, n))
    # grid queries: their window, merged with the CLS keys by log-sum-exp
    to_cls, to_cls_lse = attention(g.q[..., gc:, :], kc, vc, scale=scale, softcap=softcap,
                                   return_lse=True)
    merged, merged_lse = merge_partials([flat_out, to_cls], [flat_lse, to_cls_lse])
    # CLS queries attend to every token
    cls_out, cls_lse = attention(qc, g.k, g.v, scale=scale, softcap=softcap, return_lse=True)
    grid_out = merged.reshape(out.shape)
    grid_lse = merged_lse.reshape(lse.shape)
    return (grid_out, grid_lse, cls_out, cls_lse) if return_lse else (grid_out, cls_out)


shifted_window_attention.mask = shifted_window_mask


# ----------------------------------------------------------- spatial-reduction attention
def _pool(x, ratio):
    """Mean over blocks of ``ratio`` along the last ``len(ratio)`` axes before the
    feature axis; a short last block (axis not divisible) averages the tokens it has."""
    nd = len(ratio)
    for a, r in enumerate(ratio):
        axis = x.ndim - 1 - nd + a
        length = x.shape[axis]
        starts = np.arange(0, length, r)
        counts = np.diff(np.append(starts, length)).astype(np.float64)
        x = np.add.reduceat(x, starts, axis=axis) / counts.reshape(
            (-1,) + (1,) * (x.ndim - 1 - axis))
    return x


def _pool_matrix(grid, ratio):
    """``P (M', M)`` with ``pool(x).flatten() = P @ x.flatten()`` over the grid."""
    p = np.ones((1, 1))
    for length, r in zip(grid, ratio):
        block = np.arange(length) // r
        pa = (block[None, :] == np.arange(block[-1] + 1)[:, None]).astype(np.float64)
        p = np.kron(p, pa / pa.sum(1, keepdims=True))
    return p


def _sra_probs(q, k, ratio, *, scale=None, softcap=None, check_finite=True):
    """The implied matrix of :func:`spatial_reduction_attention` over the original
    keys: ``softmax(q pool(k)^T) P`` with ``P`` the pooling matrix, ``(..., Hq, N, M)``."""
    rt = _int_tuple("ratio", ratio, None)
    g = _Grid(q, k, None, len(rt), check_finite=check_finite, same_grid=False)
    pooled = _pool(g.grid_k, rt)
    kp = pooled.reshape(pooled.shape[:-len(rt) - 1] + (-1, pooled.shape[-1]))
    return attention_probs(g.q, kp, scale=scale, softcap=softcap,
                           check_finite=check_finite) @ _pool_matrix(g.k_grid, rt)


@register(family="vision", exact=False, time="O(N·(M/r^d)·D)", state="O((M/r^d)·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=False, example={"ratio": (2,)})
def spatial_reduction_attention(q, k, v, ratio, *, cls_tokens=None, scale=None,
                                softcap=None, return_lse=False, check_finite=True):
    r"""Spatial-reduction attention (PVT): keys and values average-pooled over
    ``r x r`` blocks, then full attention to the pooled tokens.

    .. math:: o_t = \operatorname{softmax}_j\big(q_t \cdot \bar k_j \cdot
              \text{scale}\big)\, \bar v_j, \qquad
              \bar k_j = \frac{1}{|B_j|}\sum_{u \in B_j} k_u,\
              \bar v_j = \frac{1}{|B_j|}\sum_{u \in B_j} v_u

    over the ``ceil(S / r)`` blocks ``B_j`` of the key grid. Wang et al. 2021, "Pyramid
    Vision Transformer" (SRA; PVT v1 reduces with a learned strided convolution, PVT v2's
    linear SRA with average pooling -- apply a learned reduction yourself and call
    :func:`refattn.attention` for the former).

    q : ``(..., Hq, *Sq, D)``; k, v : ``(..., Hkv, *Sk, D)``, ``(..., Hkv, *Sk, Dv)``
    (``Sq`` and ``Sk`` may differ). ratio : int (2-D) or tuple, ``>= 1`` per axis.
    **Padding rule**: when ``r`` does not divide an axis, the last block is shorter and
    averages the tokens it has (average pooling with ``ceil_mode=True``,
    ``count_include_pad=False``); a ratio larger than an axis pools it to one token.
    cls_tokens : global tokens (module docstring), not pooled: every query attends to
    them and CLS queries attend to the pooled keys. scale, softcap, return_lse,
    check_finite : as :func:`refattn.attention` (computed with
    :func:`refattn.tiled_attention`, bounded memory).

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 6, 4))
    >>> out = spatial_reduction_attention(q, k, v, 3)                   # 4 pooled keys
    >>> kp = k.reshape(1, 2, 3, 2, 3, 4).mean((2, 4)).reshape(1, 4, 4)
    >>> vp = v.reshape(1, 2, 3, 2, 3, 4).mean((2, 4)).reshape(1, 4, 4)
    >>> from refattn import attention
    >>> bool(np.allclose(out.reshape(1, 36, 4), attention(q.reshape(1, 36, 4), kp, vp)))
    True
    """
    rt = _int_tuple("ratio", ratio, None)
    nd = len(rt)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens,
              same_grid=False)
    kp, vp = _pool(g.grid_k, rt), _pool(g.grid_v, rt)
    kp = kp.reshape(kp.shape[:-nd - 1] + (-1, kp.shape[-1]))
    vp = vp.reshape(vp.shape[:-nd - 1] + (-1, vp.shape[-1]))
    qf = g.q
    if g.num_global:
        kp = np.concatenate([g.cls[1], np.broadcast_to(kp, g.batch + kp.shape[-3:])], -2)
        vp = np.concatenate([g.cls[2], np.broadcast_to(vp, g.batch + vp.shape[-3:])], -2)
    out, lse = tiled_attention(qf, kp, vp, scale=scale, softcap=softcap, return_lse=True,
                               check_finite=check_finite)
    return g.finish(out, lse, return_lse)



# ------------------------------------------------------------------- patch merging
def patch_merging(x, *, check_finite=True):
    """Swin's patch merging: concatenate the features of each 2 x 2 block of tokens.

    ``x (..., X, Y, C)`` -> ``(..., ceil(X/2), ceil(Y/2), 4C)`` with the blocks'
    tokens in Swin's order ``[x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)]``
    (``x0, x1, x2, x3`` of ``PatchMerging``). Odd ``X`` or ``Y`` are zero-padded at the
    end first, as Swin does. Swin then applies ``LayerNorm(4C)`` and a learned
    ``Linear(4C, 2C)``: the hierarchical compression between stages (each stage has a
    quarter of the tokens of the one before). For head-split grids
    ``(..., heads, X, Y, D)`` the heads axis is a leading axis.

    Liu et al. 2021, "Swin Transformer", Sec. 3.1.

    >>> import numpy as np
    >>> x = np.arange(2 * 2 * 3).reshape(2, 2, 3)         # a 2 x 2 grid, C = 3
    >>> patch_merging(x).astype(int)
    array([[[ 0,  1,  2,  6,  7,  8,  3,  4,  5,  9, 10, 11]]])
    """
    x = to_float64(x, "x", check_finite=check_finite)
    if x.ndim < 3 or 0 in x.shape[-3:]:
        raise ValueError(f"x must have shape (..., X, Y, C) with non-empty X, Y, C, got "
                         f"shape {x.shape}")
    px, py = x.shape[-3] % 2, x.shape[-2] % 2
    if px or py:
        x = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, px), (0, py), (0, 0)])
    return np.concatenate([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                           x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], axis=-1)


# ------------------------------------------------------------------------- pictures
_MECHANISMS = (neighborhood_attention, window_attention, shifted_window_attention,
               spatial_reduction_attention)
_WHITE, _KEPT, _KEPT_ALT = (255, 255, 255), (31, 59, 102), (86, 126, 186)
_QUERY, _QUERY_UNSEEN, _GAP = (214, 39, 40), (244, 163, 163), (200, 200, 200)


def _pattern_row(pattern, shape, pixel, params):
    """``(row, num_global, checker, name)``: which of the ``G + prod(shape)`` tokens the
    query at ``pixel`` keeps (bool), and for spatial reduction the checkerboard parity
    of each key's pooled block."""
    if isinstance(pattern, str):
        named = {fn.__name__: fn for fn in _MECHANISMS}
        if pattern not in named:
            raise ValueError(f"unknown vision mechanism {pattern!r}; expected one of "
                             f"{sorted(named)}, a mask or a mask_mod function")
        pattern = named[pattern]
    shape = _grid_shape(shape)
    idx = np.asarray(pixel)
    if idx.shape != (len(shape),) or idx.dtype.kind not in "iu" or \
            not all(0 <= i < s for i, s in zip(idx.tolist(), shape)):
        raise ValueError(f"pixel must be {len(shape)} integer coordinates inside the grid "
                         f"{shape}, got {pixel!r}")
    flat = int(np.ravel_multi_index(tuple(idx.tolist()), shape))
    n = math.prod(shape)
    count = params.pop("num_global", 0)
    if pattern is spatial_reduction_attention:
        if "ratio" not in params:
            raise TypeError("drawing spatial_reduction_attention needs ratio=")
        rt = _int_tuple("ratio", params.pop("ratio"), len(shape))
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")
        checker = sum(np.indices(shape)[a] // r for a, r in enumerate(rt)) % 2
        return (np.ones(count + n, bool), count, checker.reshape(-1),
                f"spatial_reduction_attention(ratio={rt})")
    if pattern in _MECHANISMS:
        mask = pattern.mask(shape, **params)
    else:
        if params:
            raise TypeError(f"parameters {sorted(params)} are only for vision mechanisms")
        mask = _masks.as_mask(pattern)
    mask = with_global(mask, count)
    g = getattr(mask, "num_global", 0)
    total = g + n
    row = np.asarray(mask._eval(np.asarray(0), np.asarray(0), np.asarray([[g + flat]]),
                                np.arange(total)[None, :], total, total))
    return np.broadcast_to(row, (1, total))[0].copy(), g, None, mask.name


def _layout(values, shape, fill):
    """Arrange per-token cell colors ``(*shape, 3)`` as an image: 1-D as a row, 2-D as
    is, 3-D as its slices side by side with a one-cell gap."""
    if len(shape) == 1:
        return values[None]
    if len(shape) == 2:
        return values
    if len(shape) == 3:
        gap = np.full((shape[1], 1, 3), fill, np.uint8)
        parts = []
        for t in range(shape[0]):
            parts += ([gap] if t else []) + [values[t]]
        return np.concatenate(parts, axis=1)
    raise ValueError(f"pictures are drawn for grids of 1, 2 or 3 axes, got shape {shape}")


def _query_image(row, g, pools, shape, flat, cell):
    grid = row[g:].reshape(shape)
    colors = np.empty(shape + (3,), np.uint8)
    colors[...] = _WHITE
    colors[grid] = _KEPT
    if pools is not None:
        alt = (pools.reshape(shape) == 1) & grid        # pooled blocks as a checkerboard
        colors[alt] = _KEPT_ALT
    where = np.unravel_index(flat, shape)
    colors[where] = _QUERY if grid[where] else _QUERY_UNSEEN
    img = _layout(colors, shape, _GAP)
    if g:
        width = img.shape[1]
        rows = -(-g // width)
        strip = np.empty((rows * width, 3), np.uint8)
        strip[...] = _GAP
        strip[:g] = np.where(row[:g, None], np.array(_KEPT, np.uint8),
                             np.array(_WHITE, np.uint8))
        img = np.concatenate([strip.reshape(rows, width, 3),
                              np.full((1, width, 3), _GAP, np.uint8), img])
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


def draw_query_pixel(pattern, shape, pixel, path=None, *, raw=False, cell=8, title=None,
                     **params):
    """Picture of the keys one query pixel attends to, on the grid, as a PNG.

    pattern : a vision mechanism (:func:`neighborhood_attention`,
        :func:`window_attention`, :func:`shifted_window_attention`,
        :func:`spatial_reduction_attention`) or its name, with its parameters as
        ``**params`` (``kernel_size=..., dilation=..., causal=...``, ``window=...,
        shift=...``, ``ratio=...``; ``num_global=G`` adds ``G`` CLS tokens); or any mask
        over the flattened grid (a :class:`refattn.masks.Mask` such as
        :func:`neighborhood_mask`, or a FlexAttention ``mask_mod`` function).
    shape : the grid, 1 to 3 axes (3-D grids are drawn as their slices side by side).
    pixel : the query's coordinates.
    path : where to write the PNG (nothing is written when None).
    raw : write the pixel-exact image instead of an annotated figure: ``cell x cell``
        pixels per token, kept keys dark blue ``(31, 59, 102)`` (the pooled blocks of
        spatial reduction alternate with ``(86, 126, 186)`` as a checkerboard), other
        tokens white, the query red ``(214, 39, 40)`` (pink ``(244, 163, 163)`` if it
        does not see itself), gaps grey ``(200, 200, 200)``; CLS tokens are a strip
        above the grid, followed by a grey row.

    Returns the matplotlib figure (annotated), or with ``raw=True`` the uint8 RGB image
    that was written.

    >>> img = draw_query_pixel("neighborhood_attention", (6, 6), (0, 0), raw=True,
    ...                        cell=1, kernel_size=(3, 3))
    >>> (img == 255).all(-1).astype(int)         # white: keys the corner query ignores
    array([[0, 0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1, 1],
           [1, 1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1, 1]])
    """
    if not _is_int(cell) or cell < 1:
        raise ValueError(f"cell must be a positive integer, got {cell!r}")
    shape = _grid_shape(shape)
    row, g, pools, name = _pattern_row(pattern, shape, pixel, dict(params))
    flat = int(np.ravel_multi_index(tuple(np.asarray(pixel).tolist()), shape))
    img = _query_image(row, g, pools, shape, flat, int(cell))
    import matplotlib
    matplotlib.use("Agg", force=False)
    if raw:
        if path is not None:
            import matplotlib.image
            matplotlib.image.imsave(path, img)
        return img
    import matplotlib.pyplot as plt
    small = _query_image(row, g, pools, shape, flat, 1)
    h, w = small.shape[:2]
    fig, ax = plt.subplots(figsize=(6, max(1.2, 6 * h / w) + 0.8))
    ax.imshow(small, interpolation="nearest")
    kept = int(row[g:].sum())
    ax.set_title(title or f"{name}\nquery {tuple(np.asarray(pixel).tolist())} sees "
                          f"{kept} of {row.size - g} grid tokens"
                 + (f" and {int(row[:g].sum())} CLS tokens" if g else ""), fontsize=9)
    axes = {1: ("", "x"), 2: ("x", "y"), 3: ("x", "y  (slices t = 0, 1, ... left to right)")}
    ax.set_ylabel(axes[len(shape)][0])
    ax.set_xlabel(axes[len(shape)][1])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


attach(neighborhood_attention, implied=_na_probs)
attach(window_attention, implied=_window_probs)
attach(shifted_window_attention, implied=_shifted_probs)
attach(spatial_reduction_attention, implied=_sra_probs)
