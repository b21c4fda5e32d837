"""What the vision mechanisms share: checks of grid arguments (per-axis integer and
boolean tuples, grid shapes), the factorized grid mask with its analytic tile
classification (:class:`_GridMask`) that neighborhoods and windows are built on, global
(CLS) tokens in front of any mask (:func:`with_global`), and the grid input adapter
(:class:`_Grid`) that validates ``q, k, v`` grids and flattens them to sequences.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import check_cotangent, is_int
from .._core.problem import sum_to_shape
from ..boundary.arrays import to_float64
from ..masks import EMPTY, FULL, PARTIAL, Mask, Tiles, as_mask
from ..sparse.engine import sparse_attention, sparse_attention_vjp

__all__ = ["with_global"]


# ----------------------------------------------------------------- argument checks
def _int_tuple(name: str, value, nd: int | None, *, minimum: int = 1) -> tuple:
    """``value`` as a tuple of ``nd`` integers >= ``minimum``: an int is repeated (on
    both axes of a 2-D grid when ``nd`` is None), a sequence must have length ``nd``."""
    if is_int(value):
        out = (int(value),) * (2 if nd is None else nd)
    elif isinstance(value, (tuple, list, np.ndarray)) and all(is_int(x) for x in value):
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
    if is_int(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            is_int(x) and x >= 1 for x in shape):
        raise ValueError(f"grid shape must be a non-empty tuple of positive integers, got "
                         f"{shape!r}")
    shape = tuple(int(x) for x in shape)
    if nd is not None and len(shape) != nd:
        raise ValueError(f"grid shape {shape} has {len(shape)} axes but the pattern has "
                         f"{nd}")
    return shape


# ------------------------------------------------------------------------ grid masks
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


def flatten_grid(x, nd: int):
    """``(..., *S, C)`` with ``nd`` spatial axes -> ``(..., prod(S), C)`` (also when
    something is empty, where ``reshape(-1)`` is ambiguous)."""
    return x.reshape(x.shape[:-nd - 1] + (math.prod(x.shape[-nd - 1:-1]), x.shape[-1]))


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
                            np.maximum(t.k_lo - g, 0), np.maximum(t.k_hi - g, 0),
                            n_in, m_in)
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

    >>> from refattn.vision import window_mask
    >>> with_global(window_mask((4,), (2,)), 1).materialize(5, 5).astype(int)
    array([[1, 1, 1, 1, 1],
           [1, 1, 1, 0, 0],
           [1, 1, 1, 0, 0],
           [1, 0, 0, 1, 1],
           [1, 0, 0, 1, 1]])
    """
    if not is_int(count) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    mask = as_mask(mask)
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
            raise ValueError(f"q and k must lie on the same grid; got q grid "
                             f"{self.q_grid}, k grid {self.k_grid} ({shapes})")
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
            x = flatten_grid(x, nd)
            return np.broadcast_to(x, self.batch + x.shape[-3:]) if cls is not None else x
        self.q, self.k, self.v = flat(q), flat(k), flat(v)
        if cls is not None:
            self.cls_shapes = tuple(c.shape for c in cls)
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

    def attend(self, pattern: Mask, *, scale, bias, softcap, return_lse, check_finite,
               method, block_q, block_k, workers):
        """Attention on the flattened grid under ``pattern`` (a mask over the grid; the
        CLS tokens are put in front as global tokens) through
        :func:`refattn.sparse_attention`, returned on the grid by :meth:`finish`."""
        mask = with_global(pattern, self.num_global)
        out, lse = sparse_attention(self.q, self.k, self.v, mask, scale=scale, bias=bias,
                                    softcap=softcap, return_lse=True,
                                    check_finite=check_finite, method=method,
                                    block_q=block_q, block_k=block_k, workers=workers)
        return self.finish(out, lse, return_lse)

    def attend_vjp(self, pattern: Mask, grad_out, grad_lse, *, scale, bias, softcap,
                   check_finite, method, block_q, block_k, workers):
        """Gradients of :meth:`attend`, by the sparse engine's tiled backward:
        ``{"q", "k", "v"}`` in the grid inputs' shapes, and ``"cls_tokens"`` (a triple in
        theirs) with CLS tokens, and ``"bias"`` for a bias with parameters (an array, in
        its shape). Cotangents as :meth:`flat_cotangents` takes them."""
        do, dlse = self.flat_cotangents(grad_out, grad_lse, check_finite)
        grads = sparse_attention_vjp(
            self.q, self.k, self.v, do, mask=with_global(pattern, self.num_global),
            grad_lse=dlse, scale=scale, bias=bias, softcap=softcap,
            check_finite=check_finite, method=method, block_q=block_q, block_k=block_k,
            workers=workers)
        out = {name: self.grid_gradient(grads[name], x.shape)
               for name, x in (("q", self.grid_q), ("k", self.grid_k), ("v", self.grid_v))}
        if self.num_global:
            out["cls_tokens"] = self.cls_gradients(grads["q"], grads["k"], grads["v"])
        if "bias" in grads:             # a bias array's (on the flattened sequence)
            out["bias"] = grads["bias"]
        return out

    def flat_cotangents(self, grad_out, grad_lse, check_finite):
        """The cotangents of :meth:`finish`'s outputs on the flattened sequence (CLS
        tokens first): ``grad_out`` of the grid output's shape ``(..., Hq, *S, Dv)``,
        with CLS tokens the pair ``(grid, cls (..., Hq, G, Dv))`` the forward returns;
        ``grad_lse`` likewise, or None."""
        g, lead = self.num_global, self.batch + (self.heads_q,)
        flat = []
        for name, cot, tail in (("grad_out", grad_out, (self.grid_v.shape[-1],)),
                                ("grad_lse", grad_lse, ())):
            if g and cot is not None and not (isinstance(cot, tuple) and len(cot) == 2):
                raise TypeError(f"with cls_tokens, {name} is the pair (grid, cls) of the "
                                f"forward's outputs, got {type(cot).__name__}")
            grid, cls = cot if g and cot is not None else (cot, None)
            grid = check_cotangent(grid, name, lead + self.q_grid + tail,
                                   check_finite=check_finite)
            if grid is not None:
                grid = grid.reshape(lead + (math.prod(self.q_grid),) + tail)
                if g:
                    cls = check_cotangent(cls, f"{name}[1] (cls)", lead + (g,) + tail,
                                          check_finite=check_finite)
                    cls = np.zeros(lead + (g,) + tail) if cls is None else cls
                    grid = np.concatenate([cls, grid], axis=len(lead))
            flat.append(grid)
        return tuple(flat)

    def grid_gradient(self, flat, shape):
        """The gradient of a grid input of ``shape`` from that of the flattened sequence
        (its CLS part dropped, broadcast dimensions summed)."""
        grid = flat[..., self.num_global:, :]
        return sum_to_shape(grid.reshape(grid.shape[:-2] + shape[-self.nd - 1:]), shape)

    def cls_gradients(self, dq, dk, dv):
        """The CLS tokens' gradients, from the flattened sequence's (their rows first)."""
        return tuple(sum_to_shape(d[..., :self.num_global, :], shape)
                     for d, shape in zip((dq, dk, dv), self.cls_shapes))

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
