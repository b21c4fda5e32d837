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
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from .._core.checks import check_memory, resolve_scale
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..gradients import sum_to_shape
from ..registry import attach, register
from ..streaming import State, check_sizes, check_tokens
from ._common import (grouped_cotangent, qkv_gradients, query_rows, run_form,
                      run_vjp_form, shape_of)

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


@njit(cache=True)
def _recurrent_kernel(q, k, v, g, shift):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    out = np.zeros((bh, group, n, dv))
    s = np.zeros((d, dv))
    for b in range(bh):
        s[:] = 0.0
        for j in range(m):
            _gated_update(s, g[b, j], k[b, j], v[b, j])
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for a in range(d):
                        qa = q[b, r, i, a]
                        for e in range(dv):
                            out[b, r, i, e] += qa * s[a, e]
    return out


def _recurrent(q, k, v, g, pb):
    flat = lambda x: np.ascontiguousarray(x.reshape((-1,) + x.shape[2:]))   # noqa: E731
    out = _recurrent_kernel(flat(q), flat(k), flat(v), flat(g), pb.m - pb.n)
    return out.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv)


def _chunkwise(q, k, v, g, pb, chunk):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = np.zeros((pb.batch, pb.heads_kv, pb.d, pb.dv))       # S after key c0 - 1
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
    return out


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·D) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"log_gates": -0.2})
def gated_linear_attention(q, k, v, *, log_gates, scale=None, method=None, chunk_size=64,
                           causal=True, check_finite=True, memory_budget=None):
    """Gated linear attention (module docstring for the equations).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    log_gates : log of the gates, ``<= 0``, broadcastable to the keys' shape
        ``(..., Hkv, M, D)`` (data-dependent in GLA; a number gives retention).
    method : ``"chunkwise"`` (default), ``"parallel"`` (``N·M·D`` memory; checks the
        memory budget) or ``"recurrent"``; all agree to float64 rounding.
    chunk_size : int >= 1, keys per chunk of the ``"chunkwise"`` form.

    Returns float64 ``(..., Hq, N, Dv)``.

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
    """
    q, k, v, pb, g = _setup(q, k, v, log_gates, scale, check_finite)
    return run_form(
        method, chunk_size, pb, memory_budget, what="gated linear attention",
        parallel_bytes=pb.batch * pb.heads_kv * pb.n * pb.m * pb.d * 24.0,
        parallel=lambda: np.einsum("bhgnm,bhme->bhgne", _parallel_matrix(q, k, g, pb), v),
        recurrent=lambda: _recurrent(q, k, v, g, pb),
        chunkwise=lambda chunk: _chunkwise(q, k, v, g, pb, chunk))


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
                   **_ignored):
    """Empty streaming state of :func:`gated_linear_attention` (``_ignored``: ``method``
    etc.). ``log_gates`` (optional): a fixed gate, broadcastable to
    ``(*batch_shape, Hkv, D)``, for steps that are given none.

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
# ``v (B, Hkv, M, Dv)``, ``g (B, Hkv, M, D)``, ``do (B, Hkv, G, N, Dv)``; each form
# returns ``(dq, dk, dv)``, ``dq`` w.r.t. the scaled queries; the gate's gradient follows
# from them (:func:`_gate_gradient`).

def _parallel_vjp(q, k, v, g, do, pb):
    cum = np.cumsum(g, axis=-2)
    pos = np.arange(pb.n) + pb.m - pb.n
    decay = _pair_decay(cum[:, :, np.maximum(pos, 0)], cum, pos, np.arange(pb.m))
    a = np.einsum("bhgnd,bhmd,bhnmd->bhgnm", q, k, decay, optimize=True)
    dp = np.einsum("bhgne,bhme->bhgnm", do, v)
    return (np.einsum("bhgnm,bhmd,bhnmd->bhgnd", dp, k, decay, optimize=True),
            np.einsum("bhgnm,bhgnd,bhnmd->bhmd", dp, q, decay, optimize=True),
            np.einsum("bhgnm,bhgne->bhme", a, do))


@njit(cache=True)
def _recurrent_vjp_kernel(q, k, v, g, do, shift):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    dq, dk, dvv = np.zeros((bh, group, n, d)), np.zeros((bh, m, d)), np.zeros((bh, m, dv))
    s = np.zeros((d, dv))
    for b in range(bh):
        s[:] = 0.0
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
        s[:] = 0.0                               # backwards: the state gradient dS̄_j
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
    return dq, dk, dvv


def _recurrent_vjp(q, k, v, g, do, pb):
    flat = lambda x: np.ascontiguousarray(x.reshape((-1,) + x.shape[2:]))   # noqa: E731
    dq, dk, dv = _recurrent_vjp_kernel(flat(q), flat(k), flat(v), flat(g), flat(do),
                                       pb.m - pb.n)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def _chunks(g, pb, chunk):
    """Per chunk: ``(c0, c1, r0, r1, at, local)``, the keys ``c0..c1``, the query rows
    ``r0..r1`` at their positions, those rows' local positions ``at`` and the in-chunk
    cumulative log-gates ``local`` (``G_j - G_{c0-1} <= 0``)."""
    shift = pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)
        yield c0, c1, r0, r1, np.arange(r0, r1) + shift - c0, np.cumsum(g[:, :, c0:c1], axis=-2)


def _chunkwise_vjp(q, k, v, g, do, pb, chunk):
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    state = np.zeros((pb.batch, pb.heads_kv, pb.d, pb.dv))       # S after key c0 - 1
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
    state[:] = 0.0                   # ∂L/∂S_{c1-1} from the queries at positions >= c1
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
    return dq, dk, dv


def _gate_gradient(q, dq, k, dk, pb):
    """``dg_t = Σ_{p >= t} dG_p`` with ``dG_p = Σ_g q_{g,i} ∘ dq_{g,i} (i' = p) -
    k_p ∘ dk_p``: the log-gates enter only through their cumulative sums ``G``."""
    dgc = -k * dk
    rows, positions = query_rows(pb.n, pb.m)
    dgc[:, :, positions] += np.einsum("bhgnd,bhgnd->bhnd", q[..., rows, :], dq[..., rows, :])
    return np.flip(np.cumsum(np.flip(dgc, axis=-2), axis=-2), axis=-2)


def gated_linear_attention_vjp(q, k, v, grad_out, *, log_gates, scale=None, method=None,
                               chunk_size=64, causal=True, check_finite=True,
                               memory_budget=None):
    r"""Gradients of :func:`gated_linear_attention` for the cotangent ``grad_out``
    ``(..., Hq, N, Dv)``: ``{"q", "k", "v", "log_gates"}``, each float64 in its input's
    shape (a KV head's gradient sums over its query heads; a broadcast ``log_gates``, a
    number say, gets the sum over the dimensions it was broadcast along). The arguments
    are the forward's, validated alike.

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

    ``method``, as in the forward: ``"parallel"`` (the ``(N, M, D)`` decay tensor;
    memory-checked), ``"recurrent"`` (Numba: ``dq_i = S_{i'} do_i`` on a forward sweep,
    then backwards in time the state gradient :math:`\bar S_j = \operatorname{diag}
    (\alpha_{j+1}) \bar S_{j+1} + \tilde q_i^\top do_i` (``i' = j``), :math:`dk_j =
    \bar S_j v_j`, :math:`dv_j = \bar S_j^\top k_j`; O(D·Dv) per KV head) or
    ``"chunkwise"`` (default: the same, parallel inside chunks, states carried forwards
    for ``dq`` and backwards for ``dk``, ``dv``). Every decay is ``exp`` of a
    non-positive sum of log-gates (inside one chunk in the chunkwise form), so gates near
    0 and 1 stay exact. The reversed cumulative sum adds ``O(ε·Σ|dG|)``, growing with
    ``M``, to ``dg`` (as in every implementation of this identity).

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
    """
    shapes = shape_of(q), shape_of(k), shape_of(v)
    g_shape = shape_of(log_gates)
    q, k, v, pb, g = _setup(q, k, v, log_gates, scale, check_finite)
    do = grouped_cotangent(grad_out, pb, check_finite)
    dq, dk, dv = run_vjp_form(
        method, chunk_size, memory_budget, what="gated linear attention",
        parallel_bytes=pb.batch * pb.heads_kv * pb.n * pb.m * (pb.d * 24.0 + pb.group * 16.0),
        parallel=lambda: _parallel_vjp(q, k, v, g, do, pb),
        recurrent=lambda: _recurrent_vjp(q, k, v, g, do, pb),
        chunkwise=lambda chunk: _chunkwise_vjp(q, k, v, g, do, pb, chunk))
    dg = _gate_gradient(q, dq, k, dk, pb)
    grads = qkv_gradients(dq * resolve_scale(scale, pb.d), dk, dv, pb, shapes)
    grads["log_gates"] = sum_to_shape(pb.unflatten(dg), g_shape)
    return grads


attach(gated_linear_attention, implied=gla_matrix, init_state=gla_init_state, step=gla_step,
       vjp=gated_linear_attention_vjp)
