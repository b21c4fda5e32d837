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
from ..registry import attach, register
from ..streaming import State, check_sizes, check_tokens
from ._common import run_form

__all__ = ["gated_linear_attention", "gla_matrix", "gla_init_state", "gla_step",
           "GLAState"]



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


@njit(cache=True)
def _recurrent_kernel(q, k, v, g, shift):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    out = np.zeros((bh, group, n, dv))
    s = np.zeros((d, dv))
    for b in range(bh):
        s[:] = 0.0
        for j in range(m):
            for a in range(d):
                gate = np.exp(g[b, j, a])
                for e in range(dv):
                    s[a, e] = gate * s[a, e] + k[b, j, a] * v[b, j, e]
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


attach(gated_linear_attention, implied=gla_matrix, init_state=gla_init_state, step=gla_step)
