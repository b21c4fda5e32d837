"""What the attention-like recurrences share: the three forms ``method=`` selects
(``"parallel"``: the masked ``N x M`` matrix; ``"recurrent"``: one token at a time;
``"chunkwise"``: parallel inside chunks, the state carried between them), run by one
dispatcher that checks the choice and the parallel form's memory (:func:`choose_form`,
for the forward and the backward, run once or per packed sequence), the memory check of
their streaming states (:func:`check_state_size`), and the bookkeeping of their VJPs
(input shapes, GQA sums, query rows at key positions).
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import check_choice, check_int, check_memory, check_state_memory
from ..gradients import check_cotangent, sum_to_shape

#: Names of the forms ``method=`` selects (``None``: ``"chunkwise"``).
METHODS = ("parallel", "recurrent", "chunkwise")


def choose_form(method, chunk_size, memory_budget, what, parallel_bytes, parallel,
                recurrent, chunkwise):
    """Check ``method`` and return the chosen form's result as it is: ``parallel()``
    after checking its ``parallel_bytes`` against ``memory_budget``, ``recurrent()``, or
    ``chunkwise(chunk_size)`` (``chunk_size`` checked)."""
    method = check_choice("method", method, METHODS, none="chunkwise")
    if method == "parallel":
        check_memory(parallel_bytes, memory_budget, f"parallel {what}", "method='chunkwise'")
        return parallel()
    if method == "recurrent":
        return recurrent()
    return chunkwise(check_int("chunk_size", chunk_size, minimum=1))


def check_state_size(what, memory_budget, batch_shape, heads, d, dv, *,
                     heads_name="heads_kv", heads_kv=None) -> None:
    """Raise :class:`refattn.MemoryBudgetError`, naming ``batch_shape``, the heads
    (``heads_name``), ``d`` and ``dv``, before a matrix state ``S (*batch_shape, heads,
    D, Dv)`` and its per-channel inputs ``(*batch_shape, heads, D)`` -- ``(D·Dv + 2D)·8``
    bytes per head -- are allocated beyond ``memory_budget`` (bytes; None: 8 GiB). The
    one check of every recurrent ``init_state``, made right after ``check_sizes``. A
    state per query head (``heads_name="heads_q"``) names ``heads_kv`` too when given
    (the query heads are a multiple of it).

    >>> import refattn as ra
    >>> try:
    ...     check_state_size("retention_init_state", None, (1,), 2, 2**17, 2**17)
    ... except ra.MemoryBudgetError as exc:
    ...     print(str(exc)[:78])
    retention_init_state: about 256.0 GiB of memory for batch_shape=(1,), heads_kv
    """
    if heads_kv is not None:
        what = f"{what} (one state per query head, a multiple of heads_kv={heads_kv:,})"
    check_state_memory(8.0 * math.prod(batch_shape) * heads * d * (dv + 2), memory_budget,
                       what, batch_shape=tuple(batch_shape), **{heads_name: heads}, d=d,
                       dv=dv)


def shape_of(x) -> tuple:
    """The shape of an input as the caller gave it (array, tensor, number, sequence)."""
    shape = getattr(x, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else np.shape(x)


def grouped_cotangent(grad_out, pb, check_finite=True) -> np.ndarray:
    """``grad_out`` checked against the output's shape ``(..., Hq, N, Dv)`` and returned
    flat and grouped, ``(B, Hkv, G, N, Dv)``."""
    g = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                        check_finite=check_finite)
    return g.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv)


def qkv_gradients(dq, dk, dv, pb, shapes) -> dict:
    """``{"q", "k", "v"}``: flat ``dq (B, Hkv, G, N, D)`` (already w.r.t. the unscaled
    ``q``), ``dk (B, Hkv, M, D)``, ``dv (B, Hkv, M, Dv)`` given back the caller's batch
    dimensions and summed to the inputs' ``shapes`` (broadcast batch dimensions)."""
    flat = (dq.reshape(pb.batch, pb.heads_q, pb.n, pb.d), dk, dv)
    return {name: sum_to_shape(pb.unflatten(g), shape)
            for name, g, shape in zip("qkv", flat, shapes)}


def query_rows(n: int, m: int):
    """``(rows, positions)``: the query rows that see at least one key and the key
    positions ``i' = i + M - N`` they sit at (bottom-right alignment), as slices."""
    return slice(max(n - m, 0), n), slice(max(m - n, 0), m)
