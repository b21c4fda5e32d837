"""Validation and normalization of attention inputs, shared by every mechanism.

Every reference converts ``q``, ``k``, ``v`` to float64 here, checks their shapes against
the layout ``q: (..., Hq, N, D)``, ``k: (..., Hkv, M, D)``, ``v: (..., Hkv, M, Dv)`` and
flattens the broadcast batch dimensions into one axis ``B``, so the mechanisms only ever
see ``q: (B, Hq, N, D)``, ``k: (B, Hkv, M, D)``, ``v: (B, Hkv, M, Dv)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Default limit, in bytes, on the working memory a dense (N x M materializing) reference
#: may allocate. Pass ``memory_budget=`` to a function to change it for one call.
DEFAULT_MEMORY_BUDGET = 8 * 2**30

_ML_DTYPE_NAMES = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                   "float8_e5m2fnuz", "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3",
                   "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn"}


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def to_float64(x, name: str, *, check_finite: bool = True) -> np.ndarray:
    """Return ``x`` as a float64 array; reject non-numeric, complex and non-finite input.

    Accepts float16/32/64, integer and bool arrays, and the ``ml_dtypes`` low-precision
    floats (bfloat16, float8 ...). Raises ``TypeError`` naming ``name`` otherwise.
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. a CUDA tensor: name the argument, keep the cause
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to a NumPy array "
                        f"({exc}); pass a host array") from exc
    kind = arr.dtype.kind
    if not (kind in "fiub" or arr.dtype.name in _ML_DTYPE_NAMES):
        raise TypeError(f"{name} must have a real numeric dtype, got {arr.dtype} "
                        f"with shape {arr.shape}")
    out = arr.astype(np.float64, copy=False)
    if check_finite and not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"{name} {arr.shape} contains non-finite values (first at index "
                         f"{tuple(int(i) for i in bad)}: {out[tuple(bad)]}); pass "
                         f"check_finite=False to allow them")
    return out


@dataclass(frozen=True)
class Problem:
    """Sizes of one attention call after validation (batch dims flattened into ``B``)."""

    batch_shape: tuple
    heads_q: int
    heads_kv: int
    n: int
    m: int
    d: int
    dv: int

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def group(self) -> int:
        """Query heads per KV head (1 for multi-head, Hq for multi-query attention)."""
        return self.heads_q // self.heads_kv

    def poisoned_outputs(self):
        """NaN-filled flat ``out (B, Hq, N, Dv)`` and ``lse (B, Hq, N)`` for a reference
        to fill piece by piece: an element left unwritten shows as NaN."""
        return (np.full((self.batch, self.heads_q, self.n, self.dv), np.nan),
                np.full((self.batch, self.heads_q, self.n), np.nan))

    def outputs_from_blocks(self, v, blocks, return_lse):
        """Assemble ``out`` (and ``lse``) from ``blocks`` yielding ``(b, hk, heads, rows,
        p, lse_rows)``: ``out[b, heads, rows] = p @ v[b, hk]``; returned with the caller's
        batch dimensions, as ``(out, lse)`` when ``return_lse``. Outputs start poisoned,
        so a row no block writes shows as NaN."""
        out, lse = self.poisoned_outputs()
        for b, hk, heads, rows, p, block_lse in blocks:
            out[b, heads, rows] = p @ v[b, hk]
            lse[b, heads, rows] = block_lse
        out, lse = self.unflatten(out, lse)
        return (out, lse) if return_lse else out

    def unflatten(self, *arrays):
        """Give flat ``(B, ...)`` arrays the caller's batch dimensions back."""
        out = tuple(a.reshape(self.batch_shape + a.shape[1:]) for a in arrays)
        return out if len(out) > 1 else out[0]


def _flatten_batch(x: np.ndarray, batch_shape: tuple) -> np.ndarray:
    x = np.broadcast_to(x, batch_shape + x.shape[-3:])
    return np.ascontiguousarray(x).reshape((math.prod(batch_shape),) + x.shape[-3:])


def prepare_qkv(q, k, v, *, check_finite: bool = True, need_v: bool = True):
    """Validate ``q``, ``k``, ``v`` and return ``(q, k, v, problem)`` with float64
    arrays of shapes ``(B, Hq, N, D)``, ``(B, Hkv, M, D)``, ``(B, Hkv, M, Dv)``.

    ``v`` may be ``None`` when ``need_v`` is false (attention probabilities only).
    """
    q = to_float64(q, "q", check_finite=check_finite)
    k = to_float64(k, "k", check_finite=check_finite)
    if need_v or v is not None:
        v = to_float64(v, "v", check_finite=check_finite)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and x.ndim < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least "
                             f"3 dimensions, got shape {x.shape}")
    shapes = f"q {q.shape}, k {k.shape}" + (f", v {v.shape}" if v is not None else "")
    hq, n, d = q.shape[-3:]
    hkv, m, dk = k.shape[-3:]
    if d != dk:
        raise ValueError(f"q and k must share the last dimension D; got {shapes}")
    if v is not None and v.shape[-3:-1] != (hkv, m):
        raise ValueError(f"k and v must have the same heads and length (..., Hkv, M, *); "
                         f"got {shapes}")
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a positive multiple of KV heads "
                         f"Hkv={hkv} (grouped-query attention); got {shapes}")
    if d == 0:
        raise ValueError(f"head dimension D must be positive; got {shapes}")
    try:
        batch_shape = np.broadcast_shapes(q.shape[:-3], k.shape[:-3],
                                          *(() if v is None else (v.shape[:-3],)))
    except ValueError:
        raise ValueError(f"leading batch dimensions of q, k, v do not broadcast; got "
                         f"{shapes}") from None
    problem = Problem(tuple(batch_shape), hq, hkv, n, m, d,
                      v.shape[-1] if v is not None else 0)
    q = _flatten_batch(q, problem.batch_shape)
    k = _flatten_batch(k, problem.batch_shape)
    if v is not None:
        v = _flatten_batch(v, problem.batch_shape)
    return q, k, v, problem


def resolve_scale(scale, d: int) -> float:
    """``scale=None`` means ``1/sqrt(D)``; otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number or None, got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s


def resolve_softcap(softcap):
    """``softcap=None`` disables capping; otherwise a positive finite number."""
    if softcap is None:
        return None
    try:
        c = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a positive number or None, got {softcap!r}") from None
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    return c


class MemoryBudgetError(MemoryError):
    """A dense request would allocate more than its memory budget; raised before any
    large allocation, with the name of the memory-bounded alternative."""


def check_memory(nbytes: float, budget, what: str, alternative: str) -> None:
    """Raise :class:`MemoryBudgetError` before allocating ``nbytes`` beyond ``budget``."""
    budget = DEFAULT_MEMORY_BUDGET if budget is None else budget
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB of working memory, over the "
            f"memory budget of {budget / 2**30:.1f} GiB; use {alternative}, which runs in "
            f"memory independent of the sequence length, or raise memory_budget= if the "
            f"machine has room")


def flatten_leading(arr: np.ndarray, batch_shape: tuple, what: str) -> np.ndarray:
    """Reshape ``arr``, broadcastable to ``(*batch_shape, H, N, M)``, to four dimensions
    ``(B|1, H|1, N|1, M|1)`` with the batch dimensions flattened like ``q``'s."""
    nb = len(batch_shape)
    shape = np.shape(arr)
    if arr.ndim < 2 or arr.ndim > nb + 3:
        raise ValueError(f"{what} of shape {shape} must broadcast to (..., H, N, M) with "
                         f"batch dims {tuple(batch_shape)}")
    a = arr.reshape((1,) * (nb + 3 - arr.ndim) + shape)
    try:
        np.broadcast_shapes(a.shape[:nb], tuple(batch_shape))
    except ValueError:
        raise ValueError(f"{what} of shape {shape} does not broadcast to batch dims "
                         f"{tuple(batch_shape)}") from None
    if any(s != 1 for s in a.shape[:nb]):
        a = np.broadcast_to(a, tuple(batch_shape) + a.shape[nb:])
    return np.ascontiguousarray(a).reshape((math.prod(a.shape[:nb]),) + a.shape[nb:])


def gather4(a: np.ndarray, b, h, q_idx, kv_idx, n, m, what: str) -> np.ndarray:
    """``a[b, h, q_idx, kv_idx]`` for a ``(B|1, H|1, N|1, M|1)`` array, size-1 axes
    broadcasting; checks the last two axes against the lengths ``n``, ``m``."""
    for axis, size, label in ((2, n, "N"), (3, m, "M")):
        if size is not None and a.shape[axis] not in (1, size):
            raise ValueError(f"{what} with shape {a.shape} does not broadcast to {label}={size}")
    idx = tuple(np.asarray(i) if s > 1 else np.zeros_like(np.asarray(i))
                for i, s in zip((b, h, q_idx, kv_idx), a.shape))
    return a[idx]


def resolve_rng(rng, where: str) -> np.random.Generator:
    """The generator of a randomized reference: ``rng`` is an int seed (a fresh
    generator) or a ``numpy.random.Generator`` (used, and so advanced). There is no
    default: an oracle's randomness is always chosen by the caller."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        if rng < 0:
            raise ValueError(f"{where}: rng seed must be a non-negative integer, got {rng!r}")
        return np.random.default_rng(int(rng))
    if rng is None:
        raise TypeError(f"{where} is randomized and needs rng= (an int seed or a "
                        f"numpy.random.Generator); the same rng gives the same result")
    raise TypeError(f"{where}: rng must be an int seed or a numpy.random.Generator, "
                    f"got {rng!r}")


def check_int(name: str, value, *, minimum: int, context: str = "") -> int:
    """An integer ``>= minimum`` (bools rejected): ``TypeError`` for a non-integer,
    ``ValueError`` below the minimum, both naming ``name`` (and ``context``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer{context}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{context}, got {value!r}")
    return int(value)
