"""What the low-rank mechanisms share: the plain row softmax of their small logit
matrices, the grouped-query view of the queries (``(B, Hkv, G, N, D)``), the memory check
of an implied matrix, the broadcast test of per-head parameters, and
:func:`segment_means` (Nyströmformer's landmarks, Linformer's mean-pooling projections,
Luna's parameter-free packed sequence); for the gradients, the VJPs of the softmax and of
the segment means.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int

__all__ = ["segment_means"]


def softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max-subtracted). Every row here has at least one
    finite logit when the inputs are finite; NaN/inf inputs (``check_finite=False``)
    propagate as NaN."""
    if s.shape[-1] == 0:                  # no keys (M = 0): an empty, all-zero softmax
        return np.zeros(s.shape)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - top)
    return e / e.sum(axis=-1, keepdims=True)


def grouped(q: np.ndarray, pb) -> np.ndarray:
    """``q (B, Hq, N, D)`` as ``(B, Hkv, G, N, D)``: the query heads of each KV head."""
    return q.reshape(pb.batch, pb.heads_kv, pb.group, *q.shape[2:])


def ungrouped(x: np.ndarray, pb) -> np.ndarray:
    """``(B, Hkv, G, ...)`` back to ``(B, Hq, ...)``."""
    return x.reshape(pb.batch, pb.heads_q, *x.shape[3:])


def implied_memory(pb, memory_budget, name: str) -> None:
    """Raise before forming the ``(B, Hq, N, M)`` implied matrix of ``name`` (and two
    temporaries of its size) beyond ``memory_budget``."""
    pb.check_matrix_memory(memory_budget, f"the implied matrix of {name}",
                           f"refattn.lowrank.{name}", copies=3)


def broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (leading dims of a per-head
    parameter against ``(*batch, H)``)."""
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def softmax_vjp(p: np.ndarray, dp: np.ndarray) -> np.ndarray:
    """The logits' gradient of ``p = softmax(s)`` (last axis) for the cotangent ``dp``:
    ``dS = P ∘ (dP − rowsum(dP ∘ P))``."""
    return p * (dp - np.einsum("...j,...j->...", dp, p)[..., None])


def segment_sizes(length: int, num_segments: int) -> np.ndarray:
    """Rows per segment of :func:`segment_means` (``np.array_split``'s rule)."""
    sizes = np.full(num_segments, length // num_segments)
    sizes[:length % num_segments] += 1
    return sizes


def segment_means_vjp(grad: np.ndarray, length: int) -> np.ndarray:
    """The gradient of ``x (..., length, D)`` for the cotangent ``grad (..., c, D)`` of
    ``segment_means(x, c)``: each row receives its segment's cotangent over the segment's
    size."""
    sizes = segment_sizes(length, grad.shape[-2])
    return np.repeat(grad / sizes[:, None], sizes, axis=-2)


def segment_means(x, num_segments: int):
    """Means of ``num_segments`` contiguous segments of the rows of ``x``.

    ``x``: ``(..., L, D)``; returns ``(..., num_segments, D)``. Segments follow
    ``np.array_split``: with ``L = num_segments * q + r``, the first ``r`` segments hold
    ``q + 1`` rows and the others ``q`` rows (all equal when ``num_segments`` divides
    ``L``, the paper's case). Requires ``1 <= num_segments <= L``.

    >>> import numpy as np
    >>> from refattn.lowrank import segment_means
    >>> segment_means(np.arange(5.0)[:, None], 2)       # segments [0, 1, 2] and [3, 4]
    array([[1. ],
           [3.5]])
    """
    x = np.asarray(x, dtype=np.float64)
    length = x.shape[-2]
    num_segments = check_int("num_segments", num_segments, minimum=1,
                             context=f" (rows of x {x.shape})")
    if num_segments > length:
        raise ValueError(f"num_segments={num_segments} exceeds the {length} rows of x "
                         f"{x.shape}: every segment needs at least one row")
    sizes = segment_sizes(length, num_segments)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.add.reduceat(x, starts, axis=-2) / sizes[:, None]

