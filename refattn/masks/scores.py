"""Score modifiers: additive biases and elementwise transforms of attention logits.

A score modifier has the FlexAttention signature
``score_mod(score, b, h, q_idx, kv_idx) -> score`` on broadcast NumPy arrays (one written
with torch runs on torch tensors: :mod:`refattn.boundary.torch_mods`) and is passed
as ``bias=`` to the attention references; ``bias=`` also takes an additive array
broadcastable to ``(..., Hq, N, M)``. Like masks, the modifiers built here use query
*positions* ``i' = i + (M - N)`` (bottom-right alignment) and learn ``N, M`` from the
attention call; plain functions receive raw indices.

The references compute logits in this order::

    s = scale * q @ k.T           # (N, M)
    s = softcap * tanh(s / softcap)   if softcap is given (Gemma 2)
    s = s + bias  or  s = score_mod(s, b, h, i, j)
    s = -inf where the mask drops a key

>>> import numpy as np, refattn as ra
>>> ra.scores.alibi_slopes(4).tolist()
[0.25, 0.0625, 0.015625, 0.00390625]
>>> ra.scores.alibi(4).materialize(3, 3, heads=4)[1]  # head 1: -slope * |i - j|
array([[ 0.    , -0.0625, -0.125 ],
       [-0.0625,  0.    , -0.0625],
       [-0.125 , -0.0625,  0.    ]])
"""
from __future__ import annotations

import abc
import math

import numpy as np

from .._core.checks import is_int, resolve_softcap
from .._core.problem import flatten_leading, gather_broadcast, sum_to_shape
from ..boundary.arrays import to_float64
from ..boundary.torch_mods import ModEvaluator

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "relative_bias", "softcap",
           "from_function", "from_array", "as_score_mod"]


class ScoreMod(abc.ABC):
    """An elementwise transform of attention logits, aware of ``(b, h, q_idx, kv_idx)``."""

    name = "score_mod"
    _n: int | None = None
    _m: int | None = None

    #: The modifier adds something that does not depend on ``score`` (its derivative in
    #: ``score`` is 1): biases, ALiBi, relative tables.
    additive = False

    @abc.abstractmethod
    def _apply(self, score, b, h, q_idx, kv_idx, n, m) -> np.ndarray:
        """New logits, the broadcast of ``score`` and the index arrays."""

    def _derivative(self, score, b, h, q_idx, kv_idx, n, m) -> np.ndarray:
        """``d new logit / d score`` (broadcastable), for gradients through the logits."""
        if self.additive:
            return np.ones(())
        raise TypeError(f"score_mod {self.name} cannot be differentiated: give its "
                        f"derivative, refattn.scores.from_function(fn, derivative=dfn) with "
                        f"dfn(score, b, h, q_idx, kv_idx) = d fn / d score")

    def _parameter_gradient(self):
        """``(grad, add, result)`` for the gradient of the modifier's own parameters (the
        array of an additive bias, a relative table), or None when it has none to learn.
        ``add(grad, dscore, b, heads, rows, cols, n, m)`` adds a ``(G, r, c)`` block of
        logit gradients for batch ``b``, query heads ``heads (G,)``, rows ``(r,)`` and
        key columns ``(c,)``; ``result(grad, batch_shape)`` gives it the parameter's shape
        as the caller passed it."""
        return None

    def __call__(self, score, b, h, q_idx, kv_idx):
        """FlexAttention signature; lengths from :meth:`bind` (unbound: ``N == M``)."""
        return self._apply(np.asarray(score, dtype=np.float64), np.asarray(b), np.asarray(h),
                           np.asarray(q_idx), np.asarray(kv_idx), self._n, self._m)

    def bind(self, n: int, m: int) -> "ScoreMod":
        """A copy that knows the query and key lengths."""
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._n, bound._m = int(n), int(m)
        return bound

    def materialize(self, n: int, m: int, heads: int = 1, *, b: int = 0) -> np.ndarray:
        """The additive bias it applies to zero logits, shape ``(heads, N, M)``."""
        out = self._apply(np.zeros((1, 1, 1)), np.asarray(b), np.arange(heads)[:, None, None],
                          np.arange(n)[None, :, None], np.arange(m)[None, None, :], n, m)
        return np.broadcast_to(out, (heads, n, m)).copy()

    def __repr__(self) -> str:
        return self.name


def _distance(q_idx, kv_idx, n, m):
    """``i' - j`` with bottom-right aligned query positions."""
    return q_idx + (0 if n is None or m is None else m - n) - kv_idx


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence
    ``2^(-8 k / n)``, ``k = 1..n``, for ``n`` a power of two; otherwise the slopes of the
    nearest lower power of two followed by every other slope of twice that, as in the
    paper's reference code."""
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")

    def power_of_two(n):
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    p = 2 ** int(math.floor(math.log2(num_heads)))
    if p == num_heads:
        return power_of_two(p)
    return np.concatenate([power_of_two(p), power_of_two(2 * p)[0::2][: num_heads - p]])


class _ALiBi(ScoreMod):
    additive = True

    def __init__(self, slopes, name):
        self.slopes, self.name = slopes, name

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        slope = self.slopes[np.asarray(h) % len(self.slopes)]
        return score - slope * np.abs(_distance(q_idx, kv_idx, n, m))


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi: ``s[h, i, j] - slope_h * |i' - j|`` with :func:`alibi_slopes`.

    With a causal mask this is the paper's ``-slope * (i - j)``; without one the
    distance is symmetric, the usual bidirectional form.
    """
    return _ALiBi(alibi_slopes(num_heads), f"alibi({num_heads})")


class _RelativeBias(ScoreMod):
    additive = True

    def __init__(self, table, name):
        self.table, self.name = table, name

    def _columns(self, q_idx, kv_idx, n, m):
        reach = (self.table.shape[1] - 1) // 2
        return np.clip(_distance(q_idx, kv_idx, n, m), -reach, reach) + reach

    def _parameter_gradient(self):
        table = self.table

        def add(grad, dscore, b, heads, rows, cols, n, m):
            """``grad[h, column] += dscore`` summed over the positions of each column."""
            column = self._columns(rows[:, None], cols[None, :], n, m).ravel()
            for g, h in enumerate(heads if table.shape[0] > 1 else np.zeros_like(heads)):
                grad[h] += np.bincount(column, weights=dscore[g].ravel(),
                                       minlength=table.shape[1])
        return np.zeros(table.shape), add, lambda grad, batch_shape: grad

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        heads = np.asarray(h) if self.table.shape[0] > 1 else np.zeros_like(np.asarray(h))
        return score + self.table[heads, self._columns(q_idx, kv_idx, n, m)]


def relative_bias(table) -> ScoreMod:
    """Learned relative-position bias: ``s + table[h, clip(i' - j, -R, R) + R]``.

    ``table`` has shape ``(H or 1, 2R + 1)``: column ``R + d`` holds the bias for
    distance ``i' - j = d``; farther distances share the end columns (Shaw et al. 2018,
    T5 without its log buckets).
    """
    t = to_float64(table, "table")
    if t.ndim != 2 or t.shape[1] % 2 != 1:
        raise ValueError(f"relative_bias table must have shape (H, 2R+1) with an odd number "
                         f"of columns, got {t.shape}")
    return _RelativeBias(t, f"relative_bias(H={t.shape[0]}, R={(t.shape[1] - 1) // 2})")


class _Softcap(ScoreMod):
    def __init__(self, cap):
        self.cap, self.name = cap, f"softcap({cap:g})"

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        return self.cap * np.tanh(score / self.cap)

    def _derivative(self, score, b, h, q_idx, kv_idx, n, m):
        return 1.0 - np.tanh(score / self.cap) ** 2


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2, Grok); the references also
    take it directly as ``softcap=`` (applied before ``bias``)."""
    return _Softcap(resolve_softcap(cap))


class _Function(ScoreMod):
    def __init__(self, fn, name, derivative=None):
        self.fn, self.name, self.derivative = fn, name, derivative
        self._call = ModEvaluator(fn, name, "score_mod")
        self._call_derivative = None if derivative is None else \
            ModEvaluator(derivative, name, "derivative")

    def _derivative(self, score, b, h, q_idx, kv_idx, n, m):
        if self.derivative is None:
            return super()._derivative(score, b, h, q_idx, kv_idx, n, m)
        out = self._call_derivative(score, b, h, q_idx, kv_idx)
        if out.dtype.kind not in "fiub":
            raise TypeError(f"derivative of score_mod {self.name} returned dtype "
                            f"{out.dtype}; expected real numbers")
        return out.astype(np.float64, copy=False)

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        out = self._call(score, b, h, q_idx, kv_idx)
        if out.dtype.kind not in "fiu":
            raise TypeError(f"score_mod {self.name} returned dtype {out.dtype}; expected "
                            f"real numbers")
        return out


def from_function(fn, name: str | None = None, *, derivative=None) -> ScoreMod:
    """Wrap a FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)``.

    ``derivative(score, b, h, q_idx, kv_idx)``, when given, is ``d score_mod / d score``:
    gradients (:func:`refattn.vjp`) flow through the modifier with it, and raise without
    it (refattn does not differentiate Python code).

    Either may be written with torch (``torch.tanh(score)``, a captured slope tensor):
    when the caller has imported torch and the function refers to it or NumPy cannot
    run it, it is evaluated on torch CPU tensors (``score`` float64, indices int64) and
    its result converted to float64;
    see :mod:`refattn.boundary.torch_mods`. A function that fails raises an error naming
    it, with the error it raised.

    >>> import numpy as np, refattn as ra
    >>> cap = ra.scores.from_function(
    ...     lambda s, b, h, q, k: 2 * np.tanh(s / 2),
    ...     derivative=lambda s, b, h, q, k: 1 - np.tanh(s / 2) ** 2)
    >>> cap(np.array([0.0, 4.0]), 0, 0, 0, 0).round(4)
    array([0.    , 1.9281])
    """
    if not callable(fn):
        raise TypeError(f"score_mod must be callable, got {type(fn).__name__}")
    if derivative is not None and not callable(derivative):
        raise TypeError(f"derivative must be callable, got {type(derivative).__name__}")
    return _Function(fn, name or getattr(fn, "__name__", "score_mod"), derivative)


class _Additive(ScoreMod):
    additive = True

    def __init__(self, arr, name):
        self.arr, self.name = arr, name

    def _parameter_gradient(self):
        arr = self.arr

        def add(grad, dscore, b, heads, rows, cols, n, m):
            """``grad[b, h, i, j] += dscore``, summed over the axes the array broadcasts
            (size 1): then every index is distinct and a plain ``+=`` is exact."""
            for axis, size in ((0, arr.shape[1]), (1, arr.shape[2]), (2, arr.shape[3])):
                if size == 1:
                    dscore = dscore.sum(axis=axis, keepdims=True)
            h, r, c = (ix if size > 1 else np.zeros(1, np.int64)
                       for ix, size in zip((heads, rows, cols), arr.shape[1:]))
            grad[b if arr.shape[0] > 1 else 0, h[:, None, None], r[None, :, None],
                 c[None, None, :]] += dscore

        def result(grad, batch_shape):
            lead = tuple(batch_shape) if arr.shape[0] > 1 else (1,) * len(batch_shape)
            return sum_to_shape(grad.reshape(lead + arr.shape[1:]), self.shape)
        return np.zeros(arr.shape), add, result

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        return score + gather_broadcast(self.arr, b, h, q_idx, kv_idx, n, m, "bias array")


def from_array(bias, batch_shape: tuple = (), *, check_finite: bool = True) -> ScoreMod:
    """An additive bias array broadcastable to ``(*batch_shape, H, N, M)``.

    ``-inf`` entries are allowed (they drop keys, like a mask); ``nan`` and ``+inf``
    raise unless ``check_finite=False``.
    """
    a = to_float64(bias, "bias", check_finite=False)
    if check_finite and (np.isnan(a).any() or np.isposinf(a).any()):
        raise ValueError(f"bias {a.shape} contains nan or +inf; pass check_finite=False to "
                         f"allow them")
    out = _Additive(flatten_leading(a, tuple(batch_shape), "bias"), f"bias{a.shape}")
    out.shape = a.shape
    return out


def as_score_mod(bias, batch_shape: tuple = (), *, check_finite: bool = True):
    """Coerce ``bias=`` input (``None``, a :class:`ScoreMod`, a function or an array)."""
    if bias is None or isinstance(bias, ScoreMod):
        return bias
    if callable(bias):
        return from_function(bias)
    return from_array(bias, batch_shape, check_finite=check_finite)
