"""The shape of an attention call: validation and normalization of ``q``, ``k``, ``v``,
shared by every mechanism and by the GPU host code.

Every reference converts ``q``, ``k``, ``v`` to float64 here, checks their shapes against
the layout ``q: (..., Hq, N, D)``, ``k: (..., Hkv, M, D)``, ``v: (..., Hkv, M, Dv)`` and
flattens the broadcast batch dimensions into one axis ``B``, so the mechanisms only ever
see ``q: (B, Hq, N, D)``, ``k: (B, Hkv, M, D)``, ``v: (B, Hkv, M, Dv)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..boundary.arrays import to_float64
from .checks import check_memory


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

    def kv_groups(self):
        """Yield ``(b, hk, heads)`` for every flat batch index ``b`` and KV head ``hk``,
        ``heads`` the slice of the ``G`` query heads that share it (GQA)."""
        for b in range(self.batch):
            for hk in range(self.heads_kv):
                yield b, hk, slice(hk * self.group, (hk + 1) * self.group)

    def query_blocks(self, rows_per_block: int):
        """Yield ``(b, hk, heads, rows)`` for every KV-head group (:meth:`kv_groups`) and
        every block of ``rows_per_block`` consecutive query rows (``rows`` a slice)."""
        for b, hk, heads in self.kv_groups():
            for r0 in range(0, self.n, rows_per_block):
                yield b, hk, heads, slice(r0, min(r0 + rows_per_block, self.n))

    def check_matrix_memory(self, memory_budget, what: str, mechanism: str, *,
                            copies: float = 1.0, m: int | None = None) -> None:
        """Raise :class:`MemoryBudgetError` before forming ``copies`` float64
        ``(B, Hq, N, m)`` matrices (``m`` defaults to ``M``) for ``what`` beyond
        ``memory_budget``, naming ``mechanism``, which never forms the matrix."""
        check_memory(self.batch * self.heads_q * self.n * (self.m if m is None else m) * 8.0
                     * copies, memory_budget, what, f"{mechanism} (it never forms the matrix)")

    def matrix_from_blocks(self, blocks, memory_budget, what: str, mechanism: str):
        """The implied matrix ``(..., Hq, N, M)`` assembled from ``blocks`` yielding
        ``(b, hk, heads, rows, p, lse_rows)`` (as for :meth:`outputs_from_blocks`), after
        :meth:`check_matrix_memory`; it starts poisoned, so a row no block writes is NaN."""
        self.check_matrix_memory(memory_budget, what, mechanism)
        probs = np.full((self.batch, self.heads_q, self.n, self.m), np.nan)
        for b, _, heads, rows, p, _ in blocks:
            probs[b, heads, rows] = p
        return self.unflatten(probs)

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

    def input_gradient(self, flat: np.ndarray, shape: tuple) -> np.ndarray:
        """A flat ``(B, ...)`` gradient as the gradient of an input of ``shape`` (the
        caller's, before broadcasting): batch dimensions restored, then summed over the
        dimensions broadcasting added (:func:`sum_to_shape`)."""
        return sum_to_shape(self.unflatten(flat), shape)

    def unflatten(self, *arrays):
        """Give flat ``(B, ...)`` arrays the caller's batch dimensions back."""
        out = tuple(a.reshape(self.batch_shape + a.shape[1:]) for a in arrays)
        return out if len(out) > 1 else out[0]


def _flatten_batch(x: np.ndarray, batch_shape: tuple) -> np.ndarray:
    x = np.broadcast_to(x, batch_shape + x.shape[-3:])
    return np.ascontiguousarray(x).reshape((math.prod(batch_shape),) + x.shape[-3:])


def problem_from_shapes(q_shape, k_shape, v_shape=None) -> Problem:
    """The :class:`Problem` of ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)`` and
    ``v (..., Hkv, M, Dv)`` (``v_shape`` None: no values, ``Dv = 0``): the shape rules
    of every reference and GPU kernel. Raises ``ValueError`` naming all three shapes."""
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    v_shape = None if v_shape is None else tuple(v_shape)
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if shape is not None and len(shape) < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least "
                             f"3 dimensions, got shape {shape}")
    shapes = f"q {q_shape}, k {k_shape}" + (f", v {v_shape}" if v_shape is not None else "")
    hint = ("; shapes are heads-first (..., H, N, D): for (..., N, H, D) tensors "
            "(FlashAttention's layout) pass layout='bnhd'")
    hq, n, d = q_shape[-3:]
    hkv, m, dk = k_shape[-3:]
    if d != dk:
        raise ValueError(f"q and k must share the last dimension D; got {shapes}")
    if v_shape is not None and v_shape[-3:-1] != (hkv, m):
        raise ValueError(f"k and v must have the same heads and length (..., Hkv, M, *); "
                         f"got {shapes}{hint}")
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a positive multiple of KV heads "
                         f"Hkv={hkv} (grouped-query attention); got {shapes}{hint}")
    if d == 0:
        raise ValueError(f"head dimension D must be positive; got {shapes}")
    try:
        batch_shape = np.broadcast_shapes(q_shape[:-3], k_shape[:-3],
                                          *(() if v_shape is None else (v_shape[:-3],)))
    except ValueError:
        raise ValueError(f"leading batch dimensions of q, k, v do not broadcast; got "
                         f"{shapes}") from None
    return Problem(tuple(int(x) for x in batch_shape), int(hq), int(hkv), int(n), int(m),
                   int(d), 0 if v_shape is None else int(v_shape[-1]))


def prepare_qkv(q, k, v, *, check_finite: bool = True, need_v: bool = True):
    """Validate ``q``, ``k``, ``v`` and return ``(q, k, v, problem)`` with float64
    arrays of shapes ``(B, Hq, N, D)``, ``(B, Hkv, M, D)``, ``(B, Hkv, M, Dv)``.

    ``v`` may be ``None`` when ``need_v`` is false (attention probabilities only).
    """
    q = to_float64(q, "q", check_finite=check_finite)
    k = to_float64(k, "k", check_finite=check_finite)
    if need_v or v is not None:
        v = to_float64(v, "v", check_finite=check_finite)
    problem = problem_from_shapes(q.shape, k.shape, None if v is None else v.shape)
    q = _flatten_batch(q, problem.batch_shape)
    k = _flatten_batch(k, problem.batch_shape)
    if v is not None:
        v = _flatten_batch(v, problem.batch_shape)
    return q, k, v, problem


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


def gather_broadcast(a: np.ndarray, b, h, q_idx, kv_idx, n, m, what: str) -> np.ndarray:
    """``a[b, h, q_idx, kv_idx]`` for a ``(B|1, H|1, N|1, M|1)`` array, size-1 axes
    broadcasting; checks the last two axes against the lengths ``n``, ``m``."""
    for axis, size, label in ((2, n, "N"), (3, m, "M")):
        if size is not None and a.shape[axis] not in (1, size):
            raise ValueError(f"{what} with shape {a.shape} does not broadcast to {label}={size}")
    idx = tuple(np.asarray(i) if s > 1 else np.zeros_like(np.asarray(i))
                for i, s in zip((b, h, q_idx, kv_idx), a.shape))
    return a[idx]


def sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``grad`` over the dimensions that broadcasting added to an input of ``shape``
    (leading dimensions, and dimensions of size 1): the gradient of a broadcast input.

    >>> sum_to_shape(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    shape = tuple(shape)
    lead = grad.ndim - len(shape)
    out = grad.sum(axis=tuple(range(lead))) if lead > 0 else grad
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and out.shape[i] != 1)
    if axes:
        out = out.sum(axis=axes, keepdims=True)
    return out.reshape(shape)
