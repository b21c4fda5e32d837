r"""Gated linear attention (GLA, Yang et al. 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training"): causal linear attention whose state decays by a
data-dependent gate per key dimension.

.. math:: S_j = \operatorname{diag}(\alpha_j)\, S_{j-1} + k_j^\top v_j, \qquad
          o_i = s\, q_i S_{i'},

with gates :math:`\alpha_j = \exp(g_j) \in (0, 1]^{D}` given as log-gates ``g <= 0``,
:math:`i' = i + M - N` the bottom-right aligned query position and ``s`` the scale
(default ``1/sqrt(D)``). Unrolled, :math:`o_i = s \sum_{j \le i'} (q_i \odot
e^{G_{i'} - G_j}) \cdot k_j \; v_j` with :math:`G_j = \sum_{t \le j} g_t`: the parallel
form. A constant gate :math:`g = \log\gamma` is retention (:func:`refattn.retention`).

Three equal forms: ``"parallel"`` (an ``(N, M, D)`` decay tensor per head),
``"recurrent"`` (Numba, one token at a time) and ``"chunkwise"`` (parallel inside chunks,
the state carried between them). Every decay is ``exp`` of a non-positive sum of
log-gates taken inside one chunk, so gates near 0 (``g -> -inf``) underflow to exact
zeros instead of overflowing, and gates near 1 over a million tokens stay accurate.
Like retention there is no normalization; ``causal=`` is accepted and changes nothing.

**States and packed sequences** (flash-linear-attention's conventions, ``fla.ops.gla``).
The state is the streaming form's :math:`S` per KV head, ``(..., Hkv, D, Dv)``, unscaled
(the scale multiplies ``q``). ``initial_state`` :math:`S_{-1}` is the state before key 0:
:math:`S_j = \operatorname{diag}(e^{G_j}) S_{-1} + \sum_{t \le j}
\operatorname{diag}(e^{G_j - G_t}) k_t^\top v_t`, so query ``i`` adds :math:`s\,(q_i
\odot e^{G_{i'}}) S_{-1}`; ``return_final_state=True`` also returns :math:`S_{M-1}`.
``cu_seqlens`` (``(num_seqs + 1,)`` integers, 0 first, ``N`` last) packs sequences along
the tokens of a batch of one, ``q (1, Hq, N, D)``, ``k``, ``log_gates (1, Hkv, N, D)``:
the state restarts at every sequence start, states are ``(num_seqs, Hkv, D, Dv)``, and
each sequence is computed exactly as a call of its own. Queries before the first key
(``N > M`` without packing) see neither keys nor the initial state: their output is 0.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from .._core.checks import check_bool, check_memory, resolve_scale
from .._core.problem import prepare_qkv
from .._core.varlen import (check_packed, initial_states, over_sequences,
                            split_cotangent, state_batch)
from ..boundary.arrays import to_float64
from ..gradients import sum_to_shape
from ..registry import attach, register
from ..streaming import State, check_sizes, check_tokens
from ._common import (check_state_size, choose_form, grouped_cotangent, qkv_gradients,
                      query_rows, shape_of)

__all__ = ["gated_linear_attention", "gla_matrix", "gla_init_state", "gla_step",
           "GLAState", "gated_linear_attention_vjp"]



def _log_gates(log_gates, shape, name="log_gates", check_finite=True) -> np.ndarray:
    """``log_gates`` as float64 broadcast to ``shape``; every entry must be <= 0."""
    g = to_float64(log_gates, name, check_finite=check_finite)
    try:
        g = np.broadcast_to(g, shape)
    except ValueError:
        raise ValueError(f"{name} must broadcast to the keys' shape {tuple(shape)} "
                         f"(batch, Hkv, M, D), got shape {g.shape}") from None
    if (g > 0).any():
        raise ValueError(f"{name} must be <= 0 (gates exp({name}) in (0, 1]); "
                         f"largest is {g.max()}")
    return g


def _setup(q, k, v, log_gates, scale, check_finite, need_v=True):
    """``(q, k, v, pb, g)``: validated inputs, ``q`` scaled and grouped
    ``(B, Hkv, G, N, D)``, log-gates ``g (B, Hkv, M, D)`` (as :mod:`.retention`)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=need_v)
    g = _log_gates(log_gates, pb.batch_shape + (pb.heads_kv, pb.m, pb.d),
                   check_finite=check_finite).reshape(pb.batch, pb.heads_kv, pb.m, pb.d)
    q = (q * resolve_scale(scale, pb.d)).reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.d)
    return q, k, v, pb, g


def _pair_decay(cum_rows, cum_cols, pos_rows, pos_cols):
    """``exp(cum_rows[i] - cum_cols[j])`` where ``pos_cols[j] <= pos_rows[i]``, else 0:
    ``(B, Hkv, rows, cols, D)``."""
    diff = cum_rows[:, :, :, None, :] - cum_cols[:, :, None, :, :]
    keep = (pos_cols[None, :] <= pos_rows[:, None])[None, None, :, :, None]
    return np.where(keep, np.exp(np.minimum(diff, 0.0)), 0.0)


def _parallel_matrix(q, k, g, pb):
    if pb.m == 0:                                          # no key: nothing to see
        return np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, 0))
    cum = np.cumsum(g, axis=-2)
    pos = np.arange(pb.n) + pb.m - pb.n
    decay = _pair_decay(cum[:, :, np.maximum(pos, 0)], cum, pos, np.arange(pb.m))
    return np.einsum("bhgnd,bhmd,bhnmd->bhgnm", q, k, decay, optimize=True)


@njit(cache=True, inline="always")
def _gated_update(s, g_row, k_row, v_row):  # pragma: no cover - compiled
    """One token into the state: ``S = diag(exp g) S + k vᵀ``."""
    for a in range(s.shape[0]):
        gate = np.exp(g_row[a])
        for e in range(s.shape[1]):
            s[a, e] = gate * s[a, e] + k_row[a] * v_row[e]


def _ends(g):
    """``(cum, last, to_end)``: the cumulative log-gates ``G (B, Hkv, M, D)``, ``G_{M-1}``
    ``(B, Hkv, D)`` (0 when ``M = 0``) and ``exp(G_{M-1} - G_j)``, how key ``j`` enters
    the final state."""
    cum = np.cumsum(g, axis=-2)
    last = cum[:, :, -1] if g.shape[2] else np.zeros(g.shape[:2] + g.shape[3:])
    return cum, last, np.exp(np.minimum(last[:, :, None] - cum, 0.0))


def _entry(cum, pos):
    """``exp(G_{i'})`` for query positions ``pos`` (how the initial state reaches query
    ``i``), 0 before the first key: ``(B, Hkv, N, D)``."""
    if cum.shape[2] == 0:
        return np.zeros(cum.shape[:2] + (len(pos),) + cum.shape[3:])
    return np.where((pos >= 0)[:, None], np.exp(cum[:, :, np.maximum(pos, 0)]), 0.0)


def _parallel(q, k, v, g, pb, s0):
    out = np.einsum("bhgnm,bhme->bhgne", _parallel_matrix(q, k, g, pb), v)
    cum, last, to_end = _ends(g)
    final = np.einsum("bhmd,bhme->bhde", k * to_end, v)
    if s0 is not None:
        entry = _entry(cum, np.arange(pb.n) + pb.m - pb.n)
        out += np.einsum("bhgnd,bhnd,bhde->bhgne", q, entry, s0)
        final += np.exp(last)[..., None] * s0
    return out, final


@njit(cache=True)
def _recurrent_kernel(q, k, v, g, shift, s0, final):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    out = np.zeros((bh, group, n, dv))
    s = np.zeros((d, dv))
    for b in range(bh):
        s[:] = s0[b]
        for j in range(m):
            _gated_update(s, g[b, j], k[b, j], v[b, j])
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for a in range(d):
                        qa = q[b, r, i, a]
                        for e in range(dv):
                            out[b, r, i, e] += qa * s[a, e]
        final[b, :, :] = s
    return out


def _flat(x):
    """``(B, Hkv, ...)`` -> contiguous ``(B·Hkv, ...)`` for the Numba kernels."""
    return np.ascontiguousarray(x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]))


def _state_or_zeros(s, pb):
    return np.zeros((pb.batch, pb.heads_kv, pb.d, pb.dv)) if s is None else s


def _recurrent(q, k, v, g, pb, s0):
    final = np.empty((pb.batch * pb.heads_kv, pb.d, pb.dv))
    out = _recurrent_kernel(_flat(q), _flat(k), _flat(v), _flat(g), pb.m - pb.n,
                            _flat(_state_or_zeros(s0, pb)), final)
    return (out.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv),
            final.reshape(pb.batch, pb.heads_kv, pb.d, pb.dv))


def _chunkwise(q, k, v, g, pb, chunk, s0):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = _state_or_zeros(s0, pb).copy()                       # S after key c0 - 1
    shift = pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        local = np.cumsum(g[:, :, c0:c1], axis=-2)              # G_j - G_{c0-1}, <= 0
        kc, vc = k[:, :, c0:c1], v[:, :, c0:c1]
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)         # query rows in the chunk
        if r1 > r0:
            at = np.arange(r0, r1) + shift - c0                 # their local positions
            qc = q[..., r0:r1, :]
            inter = np.einsum("bhgnd,bhnd,bhde->bhgne", qc, np.exp(local[:, :, at]), state)
            decay = _pair_decay(local[:, :, at], local, at, np.arange(c1 - c0))
            scores = np.einsum("bhgnd,bhmd,bhnmd->bhgnm", qc, kc, decay, optimize=True)
            out[..., r0:r1, :] = inter + np.einsum("bhgnm,bhme->bhgne", scores, vc)
        to_end = np.exp(local[:, :, -1:] - local)               # G_{c1-1} - G_j, <= 0
        state = np.exp(local[:, :, -1, :, None]) * state + np.einsum(
            "bhmd,bhme->bhde", kc * to_end, vc)
    return out, state


def _states(x, pb, cu, name, check_finite):
    """``x`` (the initial state, or the final state's cotangent) checked as per-sequence
    states and returned flat ``(S, Hkv, D, Dv)``, or None."""
    return initial_states(x, pb.batch_shape, cu, (pb.heads_kv, pb.d, pb.dv), "Hkv, D, Dv",
                          name=name, check_finite=check_finite)


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·D) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"log_gates": -0.2}, tokens=("log_gates",))
def gated_linear_attention(q, k, v, *, log_gates, scale=None, method=None, chunk_size=64,
                           causal=True, initial_state=None, return_final_state=False,
                           cu_seqlens=None, check_finite=True, memory_budget=None):
    """Gated linear attention (module docstring for the equations).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    log_gates : log of the gates, ``<= 0``, broadcastable to the keys' shape
        ``(..., Hkv, M, D)`` (data-dependent in GLA; a number gives retention).
    method : ``"chunkwise"`` (default), ``"parallel"`` (``N·M·D`` memory; checks the
        memory budget) or ``"recurrent"``; all agree to float64 rounding.
    chunk_size : int >= 1, keys per chunk of the ``"chunkwise"`` form.
    initial_state : the state before the first key, :math:`S_{-1}` of
        :func:`gla_step`'s state ``(..., Hkv, D, Dv)`` (``(num_seqs, Hkv, D, Dv)`` with
        ``cu_seqlens``); default 0.
    return_final_state : also return the state after the last key (likewise shaped).
    cu_seqlens : ``(num_seqs + 1,)`` integers ``[0, ..., N]``: sequences packed along the
        tokens of ``q (1, Hq, N, D)``, ``k (1, Hkv, N, D)`` (batch size 1, ``N = M``;
        flash-linear-attention's convention), the state restarting at each start.

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> g = -rng.random((2, 9, 4))                      # one gate per key dimension
    >>> a = ra.gated_linear_attention(q, k, v, log_gates=g, chunk_size=4)
    >>> b = ra.gated_linear_attention(q, k, v, log_gates=g, method="recurrent")
    >>> bool(np.allclose(a, b))
    True
    >>> bool(np.allclose(ra.gated_linear_attention(q, k, v, log_gates=np.log(0.9)),
    ...                  ra.retention(q, k, v, gamma=0.9)))
    True
    >>> x, s = ra.gated_linear_attention(q[:, :4], k[:, :4], v[:, :4], log_gates=g[:, :4],
    ...                                  return_final_state=True)
    >>> y = ra.gated_linear_attention(q[:, 4:], k[:, 4:], v[:, 4:], log_gates=g[:, 4:],
    ...                               initial_state=s)
    >>> bool(np.allclose(np.concatenate([x, y], -2), a))     # the state carries over
    True
    """
    q, k, v, pb, g = _setup(q, k, v, log_gates, scale, check_finite)
    cu = check_packed(pb, cu_seqlens)
    s0 = _states(initial_state, pb, cu, "initial_state", check_finite)
    return_final_state = check_bool("return_final_state", return_final_state)

    def run(p, tokens, states):
        (qs, ks, vs, gs), (s,) = tokens, states
        return choose_form(
            method, chunk_size, memory_budget, "gated linear attention",
            p.batch * p.heads_kv * p.n * p.m * p.d * 24.0,
            parallel=lambda: _parallel(qs, ks, vs, gs, p, s),
            recurrent=lambda: _recurrent(qs, ks, vs, gs, p, s),
            chunkwise=lambda chunk: _chunkwise(qs, ks, vs, gs, p, chunk, s))

    out, final = over_sequences(cu, pb, run, [q, k, v, g], [s0], (3, 0))
    out = pb.unflatten(out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv))
    if not return_final_state:
        return out
    lead = state_batch(pb.batch_shape, cu)[0]
    return out, final.reshape(lead + (pb.heads_kv, pb.d, pb.dv))


def gla_matrix(q, k, *, log_gates, scale=None, causal=True, check_finite=True,
               memory_budget=None, method=None, chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``A`` with ``gated_linear_attention(q, k, v) = A v``:
    ``A[i, j] = s Σ_d q_id k_jd exp(G_i'd - G_jd)`` for ``j <= i'`` (not row-stochastic)."""
    q, k, _, pb, g = _setup(q, k, None, log_gates, scale, check_finite, need_v=False)
    check_memory(pb.batch * pb.heads_kv * pb.n * pb.m * pb.d * 24.0, memory_budget,
                 "the gated linear attention matrix",
                 "gated_linear_attention(method='chunkwise')")
    a = _parallel_matrix(q, k, g, pb)
    return pb.unflatten(a.reshape(pb.batch, pb.heads_q, pb.n, pb.m))


@dataclasses.dataclass(frozen=True)
class GLAState(State):
    """``s``: ``(*batch, Hkv, D, Dv)`` gated sum of ``k^T v``; fixed size. ``log_gates``:
    the gate used when a step is given none (broadcastable to ``(*batch, Hkv, D)``), or
    None."""

    s: np.ndarray
    log_gates: np.ndarray | None
    scale: float
    heads_q: int

    @property
    def nbytes(self) -> int:
        """Bytes of the recurrent state ``s`` (the fixed gate is a setting)."""
        return self.s.nbytes


def gla_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, log_gates=None, scale=None,
                   memory_budget=None):
    """Empty streaming state of :func:`gated_linear_attention`: ``S (*batch_shape, Hkv, D,
    Dv)`` of zeros, refused (:class:`refattn.MemoryBudgetError`) beyond ``memory_budget``
    bytes (None: 8 GiB) before it is allocated. ``log_gates`` (optional): a fixed gate,
    broadcastable to ``(*batch_shape, Hkv, D)``, for steps that are given none.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4)); g = -rng.random((1, 6, 4))
    >>> s = gla_init_state(heads_q=1, heads_kv=1, d=4, dv=4)
    >>> outs = []
    >>> for t in range(6):
    ...     o, s = gla_step(s, q[:, t], k[:, t], v[:, t], log_gates_t=g[:, t]); outs.append(o)
    >>> ref = ra.gated_linear_attention(q, k, v, log_gates=g)
    >>> bool(np.allclose(np.stack(outs, 1), ref)), s.nbytes
    (True, 128)
    """
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    check_state_size("gla_init_state", memory_budget, batch_shape, heads_kv, d, dv)
    if log_gates is not None:
        log_gates = _log_gates(log_gates, batch_shape + (heads_kv, d)).copy()
    return GLAState(position=0, s=np.zeros(batch_shape + (heads_kv, d, dv)),
                    log_gates=log_gates, scale=resolve_scale(scale, d), heads_q=heads_q)


def gla_step(state: GLAState, q_t, k_t, v_t, log_gates_t=None):
    """``S = diag(exp(g_t)) S + k_tᵀ v_t``, ``o_t = s q_t S``; returns ``(o_t, new_state)``.
    ``log_gates_t`` broadcastable to ``(*batch, Hkv, D)``; default: the state's fixed gate.
    Example: see :func:`gla_init_state`."""
    *lead, hkv, d, dv = state.s.shape
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, lead, state.heads_q, hkv, d, dv)
    if log_gates_t is None:
        if state.log_gates is None:
            raise ValueError("log_gates_t is required: this state was made without a "
                             "fixed log_gates")
        g = state.log_gates
    else:
        g = _log_gates(log_gates_t, tuple(lead) + (hkv, d), "log_gates_t")
    s = np.exp(g)[..., None] * state.s + k_t[..., :, None] * v_t[..., None, :]
    qg = q_t.reshape(tuple(lead) + (hkv, state.heads_q // hkv, d))
    out = state.scale * np.einsum("...hgd,...hde->...hge", qg, s)
    return out.reshape(tuple(lead) + (state.heads_q, dv)), state.replace(
        position=state.position + 1, s=s)


# --------------------------------------------------------------------------- backward
# Flat arguments: ``q (B, Hkv, G, N, D)`` (scaled), ``k (B, Hkv, M, D)``,
# ``v (B, Hkv, M, Dv)``, ``g (B, Hkv, M, D)``, ``do (B, Hkv, G, N, Dv)``, the initial state
# ``s0`` and the final state's cotangent ``dsf`` ``(B, Hkv, D, Dv)`` (or None); each form
# returns ``(dq, dk, dv, ds0, sf)``, ``dq`` w.r.t. the scaled queries, ``sf`` the final
# state; the gate's gradient follows from them (:func:`_gate_gradient`).

def _parallel_vjp(q, k, v, g, do, pb, s0, dsf):
    cum, last, to_end = _ends(g)
    pos = np.arange(pb.n) + pb.m - pb.n
    if pb.m:
        decay = _pair_decay(cum[:, :, np.maximum(pos, 0)], cum, pos, np.arange(pb.m))
    else:
        decay = np.zeros((pb.batch, pb.heads_kv, pb.n, 0, pb.d))
    a = np.einsum("bhgnd,bhmd,bhnmd->bhgnm", q, k, decay, optimize=True)
    dp = np.einsum("bhgne,bhme->bhgnm", do, v)
    dq = np.einsum("bhgnm,bhmd,bhnmd->bhgnd", dp, k, decay, optimize=True)
    dk = np.einsum("bhgnm,bhgnd,bhnmd->bhmd", dp, q, decay, optimize=True)
    dv = np.einsum("bhgnm,bhgne->bhme", a, do)
    entry = _entry(cum, pos)                                     # exp(G_i')
    ds0 = np.einsum("bhgnd,bhnd,bhgne->bhde", q, entry, do)
    sf = np.einsum("bhmd,bhme->bhde", k * to_end, v)
    if s0 is not None:
        dq += np.einsum("bhgne,bhde,bhnd->bhgnd", do, s0, entry)
        sf += np.exp(last)[..., None] * s0
    if dsf is not None:
        dk += np.einsum("bhme,bhde->bhmd", v, dsf) * to_end
        dv += np.einsum("bhmd,bhde->bhme", k * to_end, dsf)
        ds0 += np.exp(last)[..., None] * dsf
    return dq, dk, dv, ds0, sf


@njit(cache=True)
def _recurrent_vjp_kernel(q, k, v, g, do, shift, s0, dsf):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    dq, dk, dvv = np.zeros((bh, group, n, d)), np.zeros((bh, m, d)), np.zeros((bh, m, dv))
    ds0, sf = np.zeros((bh, d, dv)), np.zeros((bh, d, dv))
    s = np.zeros((d, dv))
    for b in range(bh):
        s[:, :] = s0[b]
        for j in range(m):                       # forward: S_j, dq_i = S_i' do_i
            _gated_update(s, g[b, j], k[b, j], v[b, j])
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for a in range(d):
                        acc = 0.0
                        for e in range(dv):
                            acc += s[a, e] * do[b, r, i, e]
                        dq[b, r, i, a] = acc
        sf[b, :, :] = s
        s[:, :] = dsf[b]                         # backwards: the state gradient dS̄_j
        for j in range(m - 1, -1, -1):
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for a in range(d):
                        for e in range(dv):
                            s[a, e] += q[b, r, i, a] * do[b, r, i, e]
            for a in range(d):
                acc = 0.0
                for e in range(dv):
                    acc += s[a, e] * v[b, j, e]
                dk[b, j, a] = acc
            for e in range(dv):
                acc = 0.0
                for a in range(d):
                    acc += s[a, e] * k[b, j, a]
                dvv[b, j, e] = acc
            for a in range(d):
                gate = np.exp(g[b, j, a])
                for e in range(dv):
                    s[a, e] *= gate
        ds0[b, :, :] = s                         # diag(α_0) dS̄_0 = ∂L/∂S_{-1}
    return dq, dk, dvv, ds0, sf


def _recurrent_vjp(q, k, v, g, do, pb, s0, dsf):
    dq, dk, dv, ds0, sf = _recurrent_vjp_kernel(
        _flat(q), _flat(k), _flat(v), _flat(g), _flat(do), pb.m - pb.n,
        _flat(_state_or_zeros(s0, pb)), _flat(_state_or_zeros(dsf, pb)))
    state = (pb.batch, pb.heads_kv, pb.d, pb.dv)
    return (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape),
            ds0.reshape(state), sf.reshape(state))


def _chunks(g, pb, chunk):
    """Per chunk: ``(c0, c1, r0, r1, at, local)``, the keys ``c0..c1``, the query rows
    ``r0..r1`` at their positions, those rows' local positions ``at`` and the in-chunk
    cumulative log-gates ``local`` (``G_j - G_{c0-1} <= 0``)."""
    shift = pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)
        yield c0, c1, r0, r1, np.arange(r0, r1) + shift - c0, np.cumsum(g[:, :, c0:c1], axis=-2)


def _chunkwise_vjp(q, k, v, g, do, pb, chunk, s0, dsf):
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    state = _state_or_zeros(s0, pb).copy()                       # S after key c0 - 1
    for c0, c1, r0, r1, at, local in _chunks(g, pb, chunk):      # forward sweep: dq
        kc, vc = k[:, :, c0:c1], v[:, :, c0:c1]
        if r1 > r0:
            dc = do[..., r0:r1, :]
            decay = _pair_decay(local[:, :, at], local, at, np.arange(c1 - c0))
            dp = np.einsum("bhgne,bhme->bhgnm", dc, vc)
            dq[..., r0:r1, :] = np.einsum("bhgne,bhde,bhnd->bhgnd", dc, state,
                                          np.exp(local[:, :, at])) + np.einsum(
                "bhgnm,bhmd,bhnmd->bhgnd", dp, kc, decay, optimize=True)
        to_end = np.exp(np.minimum(local[:, :, -1:] - local, 0.0))   # G_{c1-1} - G_j
        state = np.exp(local[:, :, -1, :, None]) * state + np.einsum(
            "bhmd,bhme->bhde", kc * to_end, vc)
    sf = state
    # ∂L/∂S_{c1-1} from the queries at positions >= c1 and the final state
    state = _state_or_zeros(dsf, pb).copy()
    for c0, c1, r0, r1, at, local in reversed(list(_chunks(g, pb, chunk))):
        kc, vc = k[:, :, c0:c1], v[:, :, c0:c1]
        to_end = np.exp(np.minimum(local[:, :, -1:] - local, 0.0))
        dk[:, :, c0:c1] = np.einsum("bhme,bhde->bhmd", vc, state) * to_end
        dv[:, :, c0:c1] = np.einsum("bhmd,bhde->bhme", kc * to_end, state)
        state = np.exp(local[:, :, -1, :, None]) * state
        if r1 > r0:
            qc, dc = q[..., r0:r1, :], do[..., r0:r1, :]
            decay = _pair_decay(local[:, :, at], local, at, np.arange(c1 - c0))
            a = np.einsum("bhgnd,bhmd,bhnmd->bhgnm", qc, kc, decay, optimize=True)
            dp = np.einsum("bhgne,bhme->bhgnm", dc, vc)
            dv[:, :, c0:c1] += np.einsum("bhgnm,bhgne->bhme", a, dc)
            dk[:, :, c0:c1] += np.einsum("bhgnm,bhgnd,bhnmd->bhmd", dp, qc, decay,
                                         optimize=True)
            state += np.einsum("bhgnd,bhnd,bhgne->bhde", qc, np.exp(local[:, :, at]), dc)
    return dq, dk, dv, state, sf                                 # state: ∂L/∂S_{-1}


def _gate_gradient(q, dq, k, dk, pb, sf=None, dsf=None):
    """``dg_t = Σ_{p >= t} dG_p`` with ``dG_p = Σ_g q_{g,i} ∘ dq_{g,i} (i' = p) -
    k_p ∘ dk_p`` (+ ``Σ_e dS̄_f ∘ S_f`` at ``p = M - 1``, the final state ``S_f`` and its
    cotangent): the log-gates enter only through their cumulative sums ``G``."""
    dgc = -k * dk
    rows, positions = query_rows(pb.n, pb.m)
    dgc[:, :, positions] += np.einsum("bhgnd,bhgnd->bhnd", q[..., rows, :], dq[..., rows, :])
    if dsf is not None and pb.m:
        dgc[:, :, -1] += (dsf * sf).sum(-1)
    return np.flip(np.cumsum(np.flip(dgc, axis=-2), axis=-2), axis=-2)


def gated_linear_attention_vjp(q, k, v, grad_out, *, log_gates, scale=None, method=None,
                               chunk_size=64, causal=True, initial_state=None,
                               return_final_state=False, grad_final_state=None,
                               cu_seqlens=None, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`gated_linear_attention` for the cotangent ``grad_out``
    ``(..., Hq, N, Dv)`` (``None``: zero) and ``grad_final_state`` of the final state
    (``None``: zero; or ``grad_out=(grad_out, grad_final_state)``): ``{"q", "k", "v",
    "log_gates"}`` (and ``"initial_state"`` when one is given), each float64 in its
    input's shape (a KV head's gradient sums over its query heads; a broadcast
    ``log_gates``, a number say, gets the sum over the dimensions it was broadcast
    along). The other arguments are the forward's (``return_final_state`` is accepted
    and changes nothing), validated alike.

    With :math:`E_{ija} = e^{G_{i'a} - G_{ja}}` (``j <= i'``, else 0), :math:`G_j =
    \sum_{t \le j} g_t`, :math:`\tilde q = s\,q`, :math:`A_{ij} = \sum_a \tilde q_{ia}
    k_{ja} E_{ija}` and :math:`dP_{ij} = do_i \cdot v_j`:

    .. math:: dv_j = \sum_i A_{ij}\, do_i, \quad
              d\tilde q_{ia} = \sum_j dP_{ij}\, k_{ja} E_{ija}, \quad
              dk_{ja} = \sum_i dP_{ij}\, \tilde q_{ia} E_{ija}, \quad
              dq = s\, d\tilde q,

    and for the gates, since :math:`g` enters only through the cumulative sums
    :math:`G` (:math:`G_{i'}` with a plus, :math:`G_j` with a minus):

    .. math:: dG_p = \sum_{i' = p} q_i \odot dq_i - k_p \odot dk_p, \qquad
              dg_t = \sum_{p \ge t} dG_p,

    the reversed cumulative sum of flash-linear-attention's GLA backward
    (``fla.ops.gla``: ``dg = revcumsum(q∘dq - k∘dk)``; Yang et al. 2024, §4).

    With an initial state :math:`S_{-1}` and the final state's cotangent :math:`\bar S_f`
    (:math:`S_f = S_{M-1}`): :math:`d\tilde q_i \mathrel{+}= e^{G_{i'}} \odot S_{-1}
    do_i`, :math:`dk_j \mathrel{+}= e^{G_{M-1} - G_j} \odot \bar S_f v_j`,
    :math:`dv_j \mathrel{+}= \bar S_f^\top (e^{G_{M-1} - G_j} \odot k_j)`,
    :math:`dS_{-1} = \operatorname{diag}(e^{G_{M-1}}) \bar S_f + \sum_i
    \operatorname{diag}(e^{G_{i'}}) \tilde q_i^\top do_i`, and
    :math:`dG_{M-1} \mathrel{+}= \sum_e (\bar S_f \odot S_f)_{\cdot e}`. With
    ``cu_seqlens``, each packed sequence separately.

    ``method``, as in the forward: ``"parallel"`` (the ``(N, M, D)`` decay tensor;
    memory-checked), ``"recurrent"`` (Numba: ``dq_i = S_{i'} do_i`` on a forward sweep,
    then backwards in time the state gradient :math:`\bar S_j = \operatorname{diag}
    (\alpha_{j+1}) \bar S_{j+1} + \tilde q_i^\top do_i` (``i' = j``), :math:`dk_j =
    \bar S_j v_j`, :math:`dv_j = \bar S_j^\top k_j`; O(D·Dv) per KV head) or
    ``"chunkwise"`` (default: the same, parallel inside chunks, states carried forwards
    for ``dq`` and backwards for ``dk``, ``dv``). Every decay is ``exp`` of a
    non-positive sum of log-gates (inside one chunk in the chunkwise form), so gates near
    0 and 1 stay exact. The reversed cumulative sum adds ``O(ε·Σ|dG|)``, growing with
    ``M``, to ``dg`` (as in every implementation of this identity). The recurrent form's
    state gradient starts from :math:`\bar S_f` and ends as :math:`dS_{-1} =
    \operatorname{diag}(\alpha_0) \bar S_0`.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> g = -rng.random((2, 9, 4))
    >>> do = np.ones((2, 9, 4))
    >>> a = ra.vjp("gated_linear_attention", q, k, v, do, log_gates=g, chunk_size=4)
    >>> b = gated_linear_attention_vjp(q, k, v, do, log_gates=g, method="recurrent")
    >>> sorted(a), all(np.allclose(a[x], b[x]) for x in a)
    (['k', 'log_gates', 'q', 'v'], True)
    >>> ra.vjp("gated_linear_attention", q, k, v, do, log_gates=-0.1)["log_gates"].shape
    ()
    >>> s0 = np.ones((2, 4, 4))
    >>> a = ra.vjp("gated_linear_attention", q, k, v, do, log_gates=g, initial_state=s0,
    ...            grad_final_state=np.ones((2, 4, 4)))
    >>> a["initial_state"].shape
    (2, 4, 4)
    """
    shapes = shape_of(q), shape_of(k), shape_of(v)
    g_shape = shape_of(log_gates)
    q, k, v, pb, g = _setup(q, k, v, log_gates, scale, check_finite)
    cu = check_packed(pb, cu_seqlens)
    s0 = _states(initial_state, pb, cu, "initial_state", check_finite)
    check_bool("return_final_state", return_final_state)
    grad_out, grad_final_state = split_cotangent(grad_out, grad_final_state)
    do = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv)) if grad_out is None \
        else grouped_cotangent(grad_out, pb, check_finite)
    dsf = _states(grad_final_state, pb, cu, "grad_final_state", check_finite)

    def run(p, tokens, states):
        (qs, ks, vs, gs, dos), (s, dfs) = tokens, states
        dq, dk, dv, ds0, sf = choose_form(
            method, chunk_size, memory_budget, "gated linear attention backward",
            p.batch * p.heads_kv * p.n * p.m * (p.d * 24.0 + p.group * 16.0),
            parallel=lambda: _parallel_vjp(qs, ks, vs, gs, dos, p, s, dfs),
            recurrent=lambda: _recurrent_vjp(qs, ks, vs, gs, dos, p, s, dfs),
            chunkwise=lambda chunk: _chunkwise_vjp(qs, ks, vs, gs, dos, p, chunk, s, dfs))
        return dq, dk, dv, ds0, _gate_gradient(qs, dq, ks, dk, p, sf, dfs)

    dq, dk, dv, ds0, dg = over_sequences(cu, pb, run, [q, k, v, g, do], [s0, dsf],
                                         (3, 2, 2, 0, 2))
    grads = qkv_gradients(dq * resolve_scale(scale, pb.d), dk, dv, pb, shapes)
    grads["log_gates"] = sum_to_shape(pb.unflatten(dg), g_shape)
    if initial_state is not None:
        lead = state_batch(pb.batch_shape, cu)[0]
        grads["initial_state"] = ds0.reshape(lead + (pb.heads_kv, pb.d, pb.dv))
    return grads


attach(gated_linear_attention, implied=gla_matrix, init_state=gla_init_state, step=gla_step,
       vjp=gated_linear_attention_vjp)
