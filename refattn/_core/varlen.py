"""Packed variable-length batches of the recurrent mechanisms (flash-linear-attention's
``cu_seqlens``) and the per-sequence states that go with them.

``S`` sequences of lengths ``l_1, ..., l_S`` are packed one after the other along the
token axis of a batch of one; ``cu_seqlens = [0, l_1, l_1 + l_2, ..., total]`` (``S + 1``
integers, non-decreasing, an empty sequence allowed) marks where each begins and ends, and
a recurrent state restarts at every start. The shapes are checked here once, for every
mechanism that scans a state (linear attention, retention, GLA, the linear RNN, the
selective scan), with errors that name the argument, the rule and the values seen:
:func:`check_cu_seqlens`, :func:`check_packed` (a packed attention call: batch of one,
``N = M``), :func:`initial_states` (per-sequence or per-row states of an exact shape).
A packed call runs each sequence as a call of its own (:func:`run_packed`,
:func:`over_sequences`), so it equals the per-sequence calls bit for bit.

>>> import numpy as np
>>> cu = check_cu_seqlens([0, 2, 2, 5], 5)
>>> sequence_spans(cu)
[(0, 2), (2, 2), (2, 5)]
>>> sequence_starts(cu, 5).tolist()
[False, False, True, False, False]
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..boundary.arrays import host_array, to_float64

__all__ = ["check_cu_seqlens", "sequence_spans", "sequence_starts", "check_state",
           "check_packed_batch", "check_packed", "state_batch", "initial_states",
           "split_cotangent", "run_packed", "over_sequences"]


def check_cu_seqlens(cu_seqlens, total: int, name: str = "cu_seqlens", *,
                     what: str = "N") -> np.ndarray:
    """``cu_seqlens`` as an int64 vector ``0 = cu[0] <= cu[1] <= ... <= cu[-1] = total``
    (``what``: the name of the packed length in messages, ``"N"``, ``"L"``). NumPy
    arrays, sequences and integer tensors of any framework are accepted.

    ``TypeError`` unless it is a 1-D integer array of at least 2 entries; ``ValueError``
    naming the first broken rule (the start, a decrease, the end) otherwise.

    >>> check_cu_seqlens([0, 3, 1], 1)                 # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cu_seqlens must rise ...: it decreases from 3 to 1 at index 2; got [0, 3, 1]
    """
    arr = host_array(cu_seqlens, name)
    if arr.ndim != 1 or arr.size < 2 or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array [0, ..., {what}] of at least "
                        f"2 entries (cumulative sequence lengths), got {arr.dtype} with "
                        f"shape {arr.shape}")
    cu = arr.astype(np.int64)
    drops = np.flatnonzero(np.diff(cu) < 0)
    if cu[0] != 0:
        problem = f"it starts at {cu[0]}, not 0"
    elif drops.size:
        i = int(drops[0]) + 1
        problem = f"it decreases from {cu[i - 1]} to {cu[i]} at index {i}"
    elif cu[-1] != total:
        problem = f"it ends at {cu[-1]}, not at the packed length {what} = {total}"
    else:
        return cu
    shown = cu.tolist() if cu.size <= 16 else f"{cu[:8].tolist()} ... ({cu.size} entries)"
    raise ValueError(f"{name} must rise from 0 to {what} = {total} (cumulative sequence "
                     f"lengths, never decreasing): {problem}; got {shown}")


def sequence_spans(cu: np.ndarray) -> list:
    """``[(start, end), ...]`` of each packed sequence of a checked ``cu``."""
    return [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


def sequence_starts(cu: np.ndarray, total: int) -> np.ndarray:
    """Boolean ``(total,)`` marking the positions where a sequence other than the first
    starts (``cu[1:-1]``, those inside the packed length): where a state restarts."""
    reset = np.zeros(total, dtype=bool)
    starts = cu[1:-1]
    reset[starts[starts < total]] = True
    return reset


def check_packed_batch(batch_shape: tuple, shapes: str, what: str = "N") -> None:
    """With ``cu_seqlens`` the sequences are packed along the tokens of one batch row:
    the batch dimensions must be ``(1,)`` (or absent); ``ValueError`` naming the
    ``shapes`` seen otherwise."""
    if tuple(batch_shape) not in ((), (1,)):
        raise ValueError(f"with cu_seqlens the sequences are packed along {what} in a "
                         f"batch of one (flash-linear-attention's convention): the batch "
                         f"dimension must be 1, got batch dimensions {tuple(batch_shape)} "
                         f"from {shapes}")


def check_state(x, name: str, shape: tuple, layout: str, *,
                check_finite: bool = True) -> np.ndarray:
    """``x`` as float64 of exactly ``shape`` (``layout``: its meaning, e.g.
    ``"(num_seqs, Hq, D, Dv)"``), a new array the caller may write to; ``ValueError``
    naming the expected shape otherwise.

    >>> check_state(np.zeros((2, 3)), "initial_state", (2, 4), "(B, D)")
    Traceback (most recent call last):
    ...
    ValueError: initial_state must have shape (B, D) = (2, 4), got (2, 3)
    """
    arr = to_float64(x, name, check_finite=check_finite)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got "
                         f"{arr.shape}")
    return np.array(arr)


def check_packed(pb, cu_seqlens):
    """``None`` without packing; else ``cu_seqlens`` checked for a packed attention call
    of :class:`~refattn._core.problem.Problem` ``pb``: a batch of one, queries and keys
    the same ``N = M`` packed tokens."""
    if cu_seqlens is None:
        return None
    shapes = (f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, "
              f"k {pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}")
    check_packed_batch(pb.batch_shape, shapes)
    if pb.n != pb.m:
        raise ValueError(f"with cu_seqlens the queries and keys are the same packed "
                         f"tokens: N must equal M, got {shapes}")
    return check_cu_seqlens(cu_seqlens, pb.n)


def state_batch(batch_shape: tuple, cu) -> tuple:
    """``(lead, text)``: the leading dimensions of a per-sequence state, ``(num_seqs,)``
    with ``cu_seqlens``, else the batch dimensions, and how messages name them."""
    if cu is not None:
        return (int(cu.size) - 1,), "num_seqs"
    return tuple(batch_shape), "*batch"


def initial_states(x, batch_shape: tuple, cu, tail: tuple, tail_text: str, *,
                   name: str = "initial_state", check_finite: bool = True):
    """``None``, or the states ``x`` checked to be ``(*lead, *tail)`` (``lead`` from
    :func:`state_batch`; ``tail_text`` names ``tail``'s axes, e.g. ``"Hq, D, Dv"``) and
    returned flat, ``(S, *tail)`` with ``S`` the product of ``lead``."""
    if x is None:
        return None
    lead, text = state_batch(batch_shape, cu)
    arr = check_state(x, name, lead + tuple(tail), f"({text}, {tail_text})",
                      check_finite=check_finite)
    return arr.reshape((-1,) + tuple(tail))


def split_cotangent(grad_out, grad_final_state):
    """``(grad_out, grad_final_state)`` of a VJP that takes the final state's cotangent
    either by keyword or, as the forward returns ``(out, final_state)``, as the pair
    ``grad_out = (grad_out, grad_final_state)``."""
    if isinstance(grad_out, tuple):
        if len(grad_out) != 2 or grad_final_state is not None:
            raise ValueError("grad_out as a tuple must be (grad_out, grad_final_state), "
                             "with grad_final_state= not given as well")
        return grad_out
    return grad_out, grad_final_state


def _rows(x, lo, hi, axis):
    index = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi)
    return np.ascontiguousarray(x[tuple(index)])


def run_packed(cu, run, tokens, states, axes):
    """Run one computation per packed sequence and join the results.

    ``tokens``: ``[(array, token_axis), ...]``, each cut to the sequence's tokens (a new
    contiguous array, as a separate call would hold); ``states``: per-sequence arrays
    ``(num_seqs, ...)`` (or ``None``), each given as its row ``s`` kept as a batch of one
    ``(1, ...)``. ``run(length, token_pieces, state_rows)`` returns a tuple of arrays;
    the ``i``-th results of all sequences are concatenated along ``axes[i]`` (a token
    axis, or 0 for a per-sequence state). Each sequence is computed exactly as alone.
    """
    pieces = []
    for s, (lo, hi) in enumerate(sequence_spans(cu)):
        pieces.append(run(hi - lo, [_rows(x, lo, hi, ax) for x, ax in tokens],
                          [None if x is None else x[s:s + 1] for x in states]))
    return tuple(np.concatenate([p[i] for p in pieces], axis=ax)
                 for i, ax in enumerate(axes))


def over_sequences(cu, pb, run, tokens, states, axes):
    """``run(pb, tokens, states)`` on the whole batch (``cu`` None), or on each packed
    sequence of ``cu`` as a problem of its own (``pb`` with ``N = M`` its length), the
    results joined by :func:`run_packed`. ``tokens``: flat arrays with the tokens on
    axis 2, or 3 for grouped ``(B, Hkv, G, N, *)`` ones; ``states``: per-sequence arrays
    ``(num_seqs, ...)`` or None; ``axes``: the token axis of each result (0: a state)."""
    if cu is None:
        return run(pb, tokens, states)
    return run_packed(
        cu, lambda n, ts, ss: run(dataclasses.replace(pb, n=n, m=n), ts, ss),
        [(x, 3 if x.ndim == 5 else 2) for x in tokens], states, axes)
