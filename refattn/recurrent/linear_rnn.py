r"""Elementwise (diagonal) linear RNN, float64 reference: the recurrence under HGRN, LRU,
RG-LRU (Griffin), minGRU and the gated state-space layers.

.. math:: h_t = a_t \odot h_{t-1} + b_t \odot x_t, \qquad t = 0, \dots, L-1,

per channel, with :math:`h_{-1} = h_0` (zero by default). Shapes: ``a``, ``b``, ``x``
broadcast together to ``(..., L, D)`` (time on axis -2, channels last, like ``q``'s
``(..., N, D)``); ``h0`` broadcasts to ``(..., D)``. The output is every state,
``(..., L, D)`` float64. The gate is restricted to :math:`a_t \in (0, 1]` (what every
such layer produces: a sigmoid, ``exp`` of a non-positive number, ``1 - z``): the
recurrence is then a contraction, and the chunkwise form can work with ``log a``. Gates
outside ``(0, 1]`` raise ``ValueError``.

Three equal forms (``method=``):

* ``"recurrent"`` (default): the loop above, compiled with Numba.
* ``"scan"``: a parallel associative scan (Blelloch 1990, "Prefix sums and their
  applications") over the pairs :math:`(a_t, b_t x_t)` with the operator
  :math:`(a_1, c_1) \circ (a_2, c_2) = (a_1 a_2,\; a_2 c_1 + c_2)`, vectorized NumPy in
  :math:`\lceil\log_2 L\rceil` odd–even levels and O(L) work. It only multiplies and
  adds (never divides), so products of many gates near 0 underflow to the true tiny
  value, never into a wrong answer. O(L·D) memory (checks ``memory_budget``).
* ``"chunkwise"``: the sequence cut into chunks of ``chunk`` steps; inside a chunk
  :math:`h_t = e^{\Lambda_{t,c}} h_{c} + \sum_{c < s \le t} e^{\Lambda_{t,s}} b_s x_s`
  with the log-space segment sums :math:`\Lambda_{t,s} = \sum_{s < r \le t} \log a_r
  \le 0` (each formed by its own cumulative sum, no differences of large cumulative
  sums), and the state carried from chunk to chunk. Every factor is ``exp`` of a
  non-positive number: nothing overflows, nothing is divided, and gates near 1 over a
  million steps stay accurate. Memory O(chunk² · D) per chunk, processed in blocks.

States and packed sequences (flash-linear-attention's conventions, as its HGRN's
``fused_recurrent_hgrn(x, g, initial_state, output_final_state, cu_seqlens)`` with
``a = exp(g)``, ``b = 1``): ``initial_state`` is :math:`h_{-1}` (``h0`` is its older
name), ``return_final_state=True`` (or ``return_last_state``) also returns
:math:`h_{L-1}`. ``cu_seqlens`` (``(num_seqs + 1,)`` integers, 0 first, ``L`` last)
packs sequences along the time axis of a batch of one, ``(1, ..., L, D)`` (or
``(L, D)``): the state restarts at every sequence start (from that sequence's initial
state), the states are ``(num_seqs, ..., D)``, and each sequence is computed exactly as
a call of its own.

Streaming: :func:`linear_rnn_init_state` / :func:`linear_rnn_step` carry ``h``
``(..., D)``, constant size (the protocol of :mod:`refattn.streaming`, with the token
``(a_t, b_t, x_t)`` in place of ``(q_t, k_t, v_t)``). This is not a q/k/v attention
mechanism and is not in the attention registry.

>>> import numpy as np
>>> from refattn.linear_rnn import linear_rnn
>>> rng = np.random.default_rng(0)
>>> a, x = rng.uniform(0.5, 1.0, (2, 7, 3)), rng.standard_normal((2, 7, 3))
>>> h = linear_rnn(a, 1.0, x)
>>> bool(np.allclose(h[:, 1], a[:, 1] * x[:, 0] + x[:, 1]))
True
>>> bool(np.allclose(linear_rnn(a, 1.0, x, method="scan"), h))
True
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit

from .._core.checks import check_bool, check_choice, check_int, check_memory, is_int
from .._core.varlen import check_cu_seqlens, run_packed, split_cotangent
from ..boundary.arrays import to_float64
from ..gradients import check_cotangent, sum_to_shape
from ..streaming import State
from ._common import shape_of

__all__ = ["linear_rnn", "linear_rnn_init_state", "linear_rnn_step", "LinearRNNState",
           "associative_scan", "METHODS", "linear_rnn_vjp"]

#: Names of the forms ``method=`` selects.
METHODS = ("recurrent", "scan", "chunkwise")

#: Elements (chunk·chunk·D per chunk) one vectorized block of the chunkwise form may hold.
_BLOCK_ELEMENTS = 2**21


# --------------------------------------------------------------------------- the scan
def _scan_axis0(a: np.ndarray, c: np.ndarray):
    """Inclusive scan along axis 0 of the pairs ``(a_t, c_t)`` under
    ``(a1, c1) o (a2, c2) = (a1 a2, a2 c1 + c2)``: returns ``(P, H)`` with
    ``P_t = a_0 ... a_t`` and ``H_t`` the state after step ``t`` from ``h = 0``.

    Odd–even recursion: combine neighbouring pairs, scan the half-length sequence
    (giving the prefixes at odd positions), then fill in the even positions."""
    n = a.shape[0]
    if n == 1:
        return a.copy(), c.copy()
    m = n // 2
    a_even, c_even = a[0:2 * m:2], c[0:2 * m:2]
    a_odd, c_odd = a[1:2 * m:2], c[1:2 * m:2]
    pa, pc = _scan_axis0(a_even * a_odd, a_odd * c_even + c_odd)   # prefixes at 1, 3, ..
    out_a, out_c = np.empty_like(a), np.empty_like(c)
    out_a[1:2 * m:2], out_c[1:2 * m:2] = pa, pc
    out_a[0], out_c[0] = a[0], c[0]
    r = (n - 1) // 2                                               # positions 2, 4, ..
    if r:
        a_rest = a[2::2]
        out_a[2::2] = pa[:r] * a_rest
        out_c[2::2] = a_rest * pc[:r] + c[2::2]
    return out_a, out_c


def associative_scan(a, c, axis: int = -1):
    r"""Parallel inclusive scan of the linear recurrence :math:`h_t = a_t h_{t-1} + c_t`
    (from :math:`h_{-1} = 0`) along ``axis``: the pairs :math:`(a_t, c_t)` combined by the
    associative operator :math:`(a_1, c_1) \circ (a_2, c_2) = (a_1 a_2, a_2 c_1 + c_2)` in
    :math:`\lceil \log_2 L \rceil` vectorized odd–even levels (Blelloch 1990), O(L) work.

    ``a`` and ``c``: real or complex numeric arrays (or array-likes) that broadcast
    together under NumPy's rules to the shape of the result, which has at least one
    dimension; a gate shared by every channel, say, is ``a`` of shape ``(L, 1)`` beside
    ``c (L, D)``. Anything else -- ``a (4,)`` beside ``c (5,)``, a scalar pair -- is a
    ``ValueError`` naming both shapes; a non-numeric dtype a ``TypeError``. The values
    are used as given (no conversion to float64, no finiteness check: the validated
    entry points :func:`linear_rnn` and the SSMs check first). Returns ``(P, H)``: the
    cumulative products :math:`P_t = \prod_{s \le t} a_s` and the states :math:`H_t`,
    both of the broadcast shape.

    >>> import numpy as np
    >>> P, H = associative_scan(np.array([0.5, 0.5, 2.0]), np.array([1.0, 1.0, 1.0]))
    >>> P.tolist(), H.tolist()
    ([0.5, 0.25, 0.5], [1.0, 1.5, 4.0])
    >>> associative_scan(np.ones(4), np.ones(5))
    Traceback (most recent call last):
    ...
    ValueError: associative_scan: a (4,) and c (5,) do not broadcast to one shape
    """
    a, c = _scan_operands(a, c, axis)
    if a.shape[0] == 0:
        return np.moveaxis(a.copy(), 0, axis), np.moveaxis(c.copy(), 0, axis)
    p, h = _scan_axis0(a, c)
    return np.moveaxis(p, 0, axis), np.moveaxis(h, 0, axis)


def _scan_operands(a, c, axis):
    """``a`` and ``c`` broadcast together and moved so that ``axis`` comes first."""
    a, c = np.asarray(a), np.asarray(c)
    for name, x in (("a", a), ("c", c)):
        if x.dtype.kind not in "biufc":
            raise TypeError(f"associative_scan: {name} must be a numeric array, got dtype "
                            f"{x.dtype} with shape {x.shape}")
    try:
        shape = np.broadcast_shapes(a.shape, c.shape)
    except ValueError:
        raise ValueError(f"associative_scan: a {a.shape} and c {c.shape} do not broadcast "
                         f"to one shape") from None
    if not shape:
        raise ValueError(f"associative_scan: a {a.shape} and c {c.shape} broadcast to a "
                         f"scalar; the scan needs at least one dimension (the time axis)")
    if not is_int(axis):
        raise TypeError(f"associative_scan: axis must be an integer, got {axis!r}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"associative_scan: axis must be an integer in "
                         f"[{-len(shape)}, {len(shape)}) for a {a.shape} and c {c.shape} "
                         f"(broadcast shape {shape}), got {axis!r}")
    return (np.moveaxis(np.broadcast_to(x, shape), axis, 0) for x in (a, c))


# --------------------------------------------------------------------------- checks
def _check_gate(a: np.ndarray, name: str = "a") -> None:
    bad = ~((a > 0) & (a <= 1))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} (the gate, shape {a.shape}) must lie in (0, 1]; got "
                         f"{a[idx]!r} at index {idx}")


def _initial(h0, initial_state):
    """``(value, name)`` of the initial state given as ``h0`` or ``initial_state``
    (the same argument by two names; not both)."""
    if h0 is not None and initial_state is not None:
        raise TypeError("give the initial state as initial_state= or as h0= (its older "
                        "name), not both")
    return (h0, "h0") if initial_state is None else (initial_state, "initial_state")


def _prepare(a, b, x, h0, check_finite, cu_seqlens=None, h0_name="h0"):
    """Flat ``a, b, x (nb, L, D)``, the initial states ``(nb, D)`` (``(num_seqs, nb,
    D)`` with ``cu_seqlens``), and ``(batch_shape, length, dim, cu, lead)``: ``lead`` the
    states' leading dimensions (the batch's, or ``(num_seqs, *batch_shape[1:])``)."""
    a = to_float64(a, "a", check_finite=check_finite)
    b = to_float64(b, "b", check_finite=check_finite)
    x = to_float64(x, "x", check_finite=check_finite)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape, x.shape)
    except ValueError:
        raise ValueError(f"a, b, x must broadcast to one shape (..., L, D); got a "
                         f"{a.shape}, b {b.shape}, x {x.shape}") from None
    if len(shape) < 2:
        raise ValueError(f"a, b, x must broadcast to (..., L, D) with at least 2 "
                         f"dimensions; got a {a.shape}, b {b.shape}, x {x.shape}")
    _check_gate(a)
    batch_shape, (length, dim) = shape[:-2], shape[-2:]
    cu, lead = None, batch_shape
    if cu_seqlens is not None:
        if batch_shape[:1] not in ((), (1,)):
            raise ValueError(f"with cu_seqlens the sequences are packed along L in a batch "
                             f"of one (flash-linear-attention's convention): a, b, x must "
                             f"broadcast to (1, ..., L, D) or (L, D); got a {a.shape}, b "
                             f"{b.shape}, x {x.shape}")
        cu = check_cu_seqlens(cu_seqlens, length, what="L")
        lead = (cu.size - 1,) + batch_shape[1:]
    text = "(num_seqs, ..., D)" if cu is not None else "(..., D)"
    if h0 is None:
        h0 = np.zeros(lead + (dim,))
    else:
        h0 = to_float64(h0, h0_name, check_finite=check_finite)
        try:
            h0 = np.broadcast_to(h0, lead + (dim,))
        except ValueError:
            raise ValueError(f"{h0_name} must broadcast to {text} = {lead + (dim,)}; got "
                             f"{h0_name} {h0.shape} for a, b, x of shape {shape}") from None
    nb = math.prod(batch_shape)

    def flat(arr):
        return np.ascontiguousarray(np.broadcast_to(arr, shape)).reshape(nb, length, dim)

    h0 = np.ascontiguousarray(h0).reshape((-1, nb, dim) if cu is not None else (nb, dim))
    return flat(a), flat(b), flat(x), h0, (batch_shape, length, dim, cu, lead)


# --------------------------------------------------------------------------- forms
@njit(cache=True)
def _recurrence(a, b, x, h0):   # pragma: no cover - compiled
    """``h_t = a_t h_{t-1} + b_t x_t`` over ``(B, L, D)``; returns every state."""
    nb, length, dim = a.shape
    out = np.full((nb, length, dim), np.nan)
    for i in range(nb):
        for d in range(dim):
            h = h0[i, d]
            for t in range(length):
                h = a[i, t, d] * h + b[i, t, d] * x[i, t, d]
                out[i, t, d] = h
    return out


def _scan_form(a, c, h0):
    c = c.copy()
    c[:, 0] += a[:, 0] * h0               # fold the initial state into the first step
    return associative_scan(a, c, axis=1)[1]


def _chunkwise_form(a, c, h0, chunk):
    nb, length, dim = a.shape
    la = np.log(a)                        # <= 0
    out = np.full((nb, length, dim), np.nan)
    carry = h0.copy()
    span = chunk * max(1, _BLOCK_ELEMENTS // max(1, nb * chunk * chunk * dim))
    tri_strict = np.tril(np.ones((chunk, chunk), dtype=bool), -1)   # t > s
    tri = np.tril(np.ones((chunk, chunk), dtype=bool))              # t >= s
    for p0 in range(0, length, span):
        p1 = min(p0 + span, length)
        k = -(-(p1 - p0) // chunk)
        pad = k * chunk - (p1 - p0)
        lab = np.pad(la[:, p0:p1], ((0, 0), (0, pad), (0, 0))).reshape(nb, k, chunk, dim)
        cb = np.pad(c[:, p0:p1], ((0, 0), (0, pad), (0, 0))).reshape(nb, k, chunk, dim)
        # Λ[t, s] = Σ_{s < r <= t} log a_r: a cumulative sum over t of log a_t masked to
        # t > s, for every s (no subtraction of two cumulative sums).
        seg = np.cumsum(np.where(tri_strict[:, :, None], lab[:, :, :, None, :], 0.0),
                        axis=2)                                    # (B, K, t, s, D)
        w = np.where(tri[:, :, None], np.exp(seg), 0.0)
        local = np.einsum("bktsd,bksd->bktd", w, cb)
        decay = np.exp(np.cumsum(lab, axis=2))                     # Π_{c <= r <= t} a_r
        block = np.empty((nb, k, chunk, dim))
        for j in range(k):
            block[:, j] = local[:, j] + decay[:, j] * carry[:, None, :]
            carry = block[:, j, -1]
        out[:, p0:p1] = block.reshape(nb, k * chunk, dim)[:, :p1 - p0]
    return out


def _states(method, a, b, x, h0, chunk, memory_budget):
    """Every state ``(B, L, D)`` of ``h_t = a_t h_{t-1} + b_t x_t`` by the form
    ``method`` (checked), after its memory check; flat validated inputs."""
    nb, length, dim = a.shape
    if length == 0 or dim == 0:
        return np.zeros((nb, length, dim))
    if method == "recurrent":
        return _recurrence(a, b, x, h0)
    if method == "scan":
        check_memory(nb * length * dim * 8.0 * 6, memory_budget, "the associative scan",
                     "method='chunkwise' or method='recurrent'")
        return _scan_form(a, b * x, h0)
    chunk = min(check_int("chunk", chunk, minimum=1), length)
    check_memory(nb * chunk * chunk * dim * 8.0 * 4, memory_budget,
                 f"one chunk of the chunkwise linear RNN (chunk² · D, chunk = {chunk})",
                 "a smaller chunk or method='recurrent'")
    return _chunkwise_form(a, b * x, h0, chunk)


def _per_sequence(cu, run, arrays, states, axes):
    """``run(arrays, states)`` on the whole sequence (``cu`` None), or on each packed
    sequence: the flat arrays cut to its steps (axis 1), each of ``states`` (``(num_seqs,
    nb, D)``) given as its ``(nb, D)``; the results joined, along axis 1 for those with
    ``axes`` 1, stacked per sequence for those with 0."""
    if cu is None:
        return run(arrays, states)

    def one(n, pieces, rows):
        out = run(pieces, [r[0] for r in rows])
        return tuple(r[None] if ax == 0 else r for r, ax in zip(out, axes))

    return run_packed(cu, one, [(arr, 1) for arr in arrays], states, axes)


def linear_rnn(a, b, x, *, h0=None, method="recurrent", chunk=64,
               return_last_state=False, initial_state=None, return_final_state=False,
               cu_seqlens=None, check_finite=True, memory_budget=None):
    r"""All states of :math:`h_t = a_t \odot h_{t-1} + b_t \odot x_t` (module docstring).

    Parameters
    ----------
    a : gates in ``(0, 1]``, broadcastable to ``(..., L, D)``.
    b, x : input scale and input, broadcastable with ``a`` to ``(..., L, D)`` (``b=1.0``
        for the plain form :math:`h_t = a_t h_{t-1} + x_t`).
    h0, initial_state : the initial state :math:`h_{-1}` ``(..., D)`` (broadcast;
        ``(num_seqs, ..., D)`` with ``cu_seqlens``), default 0; two names for one
        argument (``initial_state``, flash-linear-attention's; give at most one).
    method : ``"recurrent"`` (Numba loop, default), ``"scan"`` (parallel associative
        scan) or ``"chunkwise"`` (log-space chunks of ``chunk`` steps). ``"scan"`` holds
        O(L·D) and ``"chunkwise"`` O(chunk²·D) per chunk; both check ``memory_budget``
        (bytes; default :data:`refattn._inputs.DEFAULT_MEMORY_BUDGET`).
    return_last_state, return_final_state : also return ``h_{L-1}`` ``(..., D)``
        (``h0`` when ``L = 0``; per sequence with ``cu_seqlens``); either name.
    cu_seqlens : ``(num_seqs + 1,)`` integers ``[0, ..., L]``: sequences packed along
        ``L`` of a batch of one, ``(1, ..., L, D)`` or ``(L, D)``; the state restarts
        from each sequence's initial state at its start.

    Returns float64 ``(..., L, D)`` (and the last state).

    >>> import numpy as np
    >>> a = np.full((5, 1), 0.5)
    >>> linear_rnn(a, 1.0, np.ones((5, 1)), method="chunkwise", chunk=2)[:, 0].tolist()
    [1.0, 1.5, 1.75, 1.875, 1.9375]
    >>> h, last = linear_rnn(a, 1.0, np.ones((5, 1)), cu_seqlens=[0, 2, 5],
    ...                      initial_state=[[0.0], [2.0]], return_final_state=True)
    >>> h[:, 0].tolist(), last[:, 0].tolist()      # restarts at step 2, from 2.0
    ([1.0, 1.5, 2.0, 2.0, 2.0], [1.5, 2.0])
    """
    method = check_choice("method", method, METHODS)
    h0, h0_name = _initial(h0, initial_state)
    a, b, x, h0, (batch_shape, length, dim, cu, lead) = _prepare(
        a, b, x, h0, check_finite, cu_seqlens, h0_name)
    want_last = check_bool("return_last_state", return_last_state) | check_bool(
        "return_final_state", return_final_state)

    def run(arrays, states):
        out = _states(method, *arrays, states[0], chunk, memory_budget)
        return out, (out[:, -1] if out.shape[1] else states[0].copy())

    out, last = _per_sequence(cu, run, [a, b, x], [h0], (1, 0))
    out = out.reshape(batch_shape + (length, dim))
    if want_last:
        return out, last.reshape(lead + (dim,))
    return out


# --------------------------------------------------------------------------- streaming
@dataclasses.dataclass(frozen=True)
class LinearRNNState(State):
    """``h``: ``(*batch_shape, D)``, the state after ``position`` steps; fixed size."""

    h: np.ndarray


def linear_rnn_init_state(*, batch_shape=(), dim, h0=None) -> LinearRNNState:
    """The state before the first step: ``h0`` (default 0) of shape
    ``(*batch_shape, dim)``.

    >>> import numpy as np
    >>> s = linear_rnn_init_state(batch_shape=(2,), dim=3)
    >>> h, s = linear_rnn_step(s, 0.5, 1.0, np.ones((2, 3)))
    >>> h, s = linear_rnn_step(s, 0.5, 1.0, np.ones((2, 3)))
    >>> h.tolist(), s.position, s.nbytes
    ([[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]], 2, 48)
    """
    batch_shape = tuple(check_int("batch_shape entries", n, minimum=1) for n in batch_shape)
    dim = check_int("dim", dim, minimum=1)
    shape = batch_shape + (dim,)
    if h0 is None:
        h = np.zeros(shape)
    else:
        h0 = to_float64(h0, "h0")
        try:
            h = np.array(np.broadcast_to(h0, shape))
        except ValueError:
            raise ValueError(f"h0 must broadcast to (*batch_shape, dim) = {shape}, got "
                             f"{h0.shape}") from None
    return LinearRNNState(position=0, h=h)


def linear_rnn_step(state: LinearRNNState, a_t, b_t, x_t, *, check_finite=True):
    """One step ``h = a_t ⊙ h + b_t ⊙ x_t``; ``a_t``, ``b_t``, ``x_t`` broadcast to
    ``(*batch_shape, D)``. Returns ``(h_t, new_state)``; the old state is unchanged."""
    shape = state.h.shape
    args = []
    for name, arr in (("a_t", a_t), ("b_t", b_t), ("x_t", x_t)):
        arr = to_float64(arr, name, check_finite=check_finite)
        try:
            fits = np.broadcast_shapes(arr.shape, shape) == shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{name} must broadcast to the state's shape {shape} "
                             f"(*batch_shape, D), got {arr.shape}")
        args.append(arr)
    _check_gate(args[0], "a_t")
    h = args[0] * state.h + args[1] * args[2]
    return h, state.replace(position=state.position + 1, h=h)


# --------------------------------------------------------------------------- backward
def _vjp_core(method, a, b, x, h0, dh, dlast, chunk, memory_budget):
    """Flat gradients ``(da, db, dx)`` ``(nb, L, D)`` and ``dh0 (nb, D)`` of one
    sequence: ``dh`` the states' cotangent, ``dlast`` the last state's."""
    nb, length, dim = a.shape
    if length == 0:
        return dh, dh, dh, dlast.copy()
    dh = dh.copy()
    dh[:, -1] += dlast
    h = _states(method, a, b, x, h0, chunk, memory_budget)
    rev = np.empty_like(a)                    # a_{t+1} in reversed time, then a 1
    rev[:, 0], rev[:, 1:] = 1.0, a[:, :0:-1]
    lam = _states(method, rev, np.ones_like(a), np.ascontiguousarray(dh[:, ::-1]),
                  np.zeros((nb, dim)), chunk, memory_budget)[:, ::-1]
    prev = np.concatenate([h0[:, None], h[:, :-1]], axis=1)
    return lam * prev, lam * x, lam * b, a[:, 0] * lam[:, 0]


def linear_rnn_vjp(a, b, x, grad_out, *, h0=None, method="recurrent", chunk=64,
                   return_last_state=False, grad_last_state=None, initial_state=None,
                   return_final_state=False, grad_final_state=None, cu_seqlens=None,
                   check_finite=True, memory_budget=None):
    r"""Gradients of :func:`linear_rnn` for the cotangent ``grad_out`` of its states
    ``(..., L, D)`` (``None``: zero) and ``grad_last_state`` (or ``grad_final_state``,
    its other name) of the last state ``(..., D)`` (``(num_seqs, ..., D)`` with
    ``cu_seqlens``; ``None``: zero; or ``grad_out=(grad_out, grad_last_state)``;
    ``return_last_state``/``return_final_state`` are accepted and change nothing).
    Returns ``{"a", "b", "x"}``, plus the initial state's gradient when one is given,
    under the name it was given by (``"h0"`` or ``"initial_state"``), each float64 in its
    input's shape (broadcast dimensions summed). The other arguments are the forward's,
    validated alike; with ``cu_seqlens``, each packed sequence separately.

    The state gradient :math:`\lambda_t = \partial L / \partial h_t` runs backwards in
    time, itself a linear RNN over the reversed sequence:

    .. math:: \lambda_{L-1} = dh_{L-1} + \bar h, \qquad
              \lambda_t = dh_t + a_{t+1} \odot \lambda_{t+1},

    (``dh = grad_out``, :math:`\bar h` = ``grad_last_state``), and then

    .. math:: da_t = \lambda_t \odot h_{t-1}, \quad db_t = \lambda_t \odot x_t, \quad
              dx_t = \lambda_t \odot b_t, \quad dh_0 = a_0 \odot \lambda_0

    with :math:`h_{-1} = h_0`. Both the states and :math:`\lambda` are computed by the
    form ``method`` selects (``"recurrent"``, ``"scan"``, ``"chunkwise"``, with the
    forward's memory checks): the reversed gates :math:`a_{t+1}` lie in ``(0, 1]`` too,
    so the chunkwise form's log-space decays stay non-positive. (The backward of the
    scans in HGRN / LRU / Mamba implementations, e.g. flash-linear-attention's
    ``fused_recurrent_hgrn``.)

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> a, x = rng.uniform(0.5, 1.0, (2, 7, 3)), rng.standard_normal((2, 7, 3))
    >>> g = ra.vjp(ra.linear_rnn, a, 1.0, x, np.ones((2, 7, 3)), h0=np.zeros(3))
    >>> sorted(g), g["b"].shape, g["h0"].shape
    (['a', 'b', 'h0', 'x'], (), (3,))
    >>> s = linear_rnn_vjp(a, 1.0, x, np.ones((2, 7, 3)), h0=np.zeros(3), method="scan")
    >>> all(np.allclose(g[n], s[n]) for n in g)
    True
    """
    method = check_choice("method", method, METHODS)
    shapes = {"a": shape_of(a), "b": shape_of(b), "x": shape_of(x)}
    h0, h0_name = _initial(h0, initial_state)
    h0_shape = None if h0 is None else shape_of(h0)
    if grad_last_state is not None and grad_final_state is not None:
        raise TypeError("give the last state's cotangent as grad_final_state= or as "
                        "grad_last_state= (its older name), not both")
    dlast_name = "grad_final_state" if grad_last_state is None else "grad_last_state"
    grad_out, dlast = split_cotangent(
        grad_out, grad_final_state if grad_last_state is None else grad_last_state)
    a, b, x, h0, (batch_shape, length, dim, cu, lead) = _prepare(
        a, b, x, h0, check_finite, cu_seqlens, h0_name)
    check_bool("return_last_state", return_last_state)
    check_bool("return_final_state", return_final_state)
    nb = a.shape[0]
    dh = check_cotangent(grad_out, "grad_out", batch_shape + (length, dim),
                         check_finite=check_finite)
    dlast = check_cotangent(dlast, dlast_name, lead + (dim,),
                            check_finite=check_finite)
    dh = np.zeros((nb, length, dim)) if dh is None else dh.reshape(nb, length, dim)
    dlast = np.zeros(h0.shape) if dlast is None else dlast.reshape(h0.shape)

    def run(arrays, states):
        (sa, sb, sx, sdh), (start, slast) = arrays, states
        return _vjp_core(method, sa, sb, sx, start, sdh, slast, chunk, memory_budget)

    da, db, dx, dh0 = _per_sequence(cu, run, [a, b, x, dh], [h0, dlast], (1, 1, 1, 0))
    full = batch_shape + (length, dim)
    grads = {name: sum_to_shape(g.reshape(full), shapes[name])
             for name, g in (("a", da), ("b", db), ("x", dx))}
    if h0_shape is not None:
        grads[h0_name] = sum_to_shape(dh0.reshape(lead + (dim,)), h0_shape)
    return grads


linear_rnn.vjp = linear_rnn_vjp
