r"""Retention (RetNet, Sun et al. 2023): causal linear attention with a fixed decay.

.. math:: O = (s\, Q K^\top \odot D_\gamma)\, V, \qquad
          D_\gamma[i, j] = \gamma^{\,i' - j} \text{ for } j \le i', \text{ else } 0,

with :math:`i' = i + M - N` the bottom-right aligned query position and ``s`` the scale
(default ``1/sqrt(D)``). No softmax and no normalization: the group norm that follows
in RetNet belongs to the layer. Three equal forms: ``"parallel"`` (the masked matrix),
``"recurrent"`` (:math:`S_j = \gamma S_{j-1} + k_j^\top v_j`, :math:`o_i = s\,q_i S_{i'}`)
and ``"chunkwise"`` (parallel inside chunks, the state carried between them). Every
decay is :math:`\exp(d \log\gamma)` of a distance :math:`d \ge 0`, so nothing overflows
and long sequences with :math:`\gamma` near 1 stay accurate. Retention is causal by
definition; ``causal=`` is accepted and changes nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .._core.checks import check_memory, resolve_scale
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ..streaming import State, check_sizes, check_token
from ._common import run_form

__all__ = ["retention", "retention_matrix", "retention_init_state", "retention_step",
           "RetentionState"]



def _log_gamma(gamma, heads_q: int) -> np.ndarray:
    """``log(gamma)`` per query head, ``(Hq,)``; gamma in (0, 1], scalar or per head."""
    g = to_float64(gamma, "gamma")
    if g.ndim > 1 or (g.ndim == 1 and g.shape[0] != heads_q):
        raise ValueError(f"gamma must be a number or one per query head (Hq={heads_q},), "
                         f"got shape {g.shape}")
    if not ((g > 0) & (g <= 1)).all():
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    return np.log(np.broadcast_to(g, (heads_q,)))


def _decay(log_gamma, dist):
    """``gamma^dist`` for ``dist >= 0`` and 0 for negative distances (future keys)."""
    with np.errstate(invalid="ignore"):   # 0 * log(1) for masked entries
        return np.where(dist >= 0, np.exp(np.maximum(dist, 0) * log_gamma), 0.0)


def _setup(q, k, v, gamma, scale, check_finite, need_v=True):
    """``(q, k, v, pb, lg)``: validated inputs, ``q`` scaled, and ``log γ`` per query
    head ``(Hkv, G, 1, 1)`` (as :mod:`.gla`)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=need_v)
    lg = _log_gamma(gamma, pb.heads_q).reshape(pb.heads_kv, pb.group, 1, 1)
    return q * resolve_scale(scale, pb.d), k, v, pb, lg


def _grouped(q, pb):
    return q.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.d)


def _parallel(q, k, v, pb, lg):
    pos = np.arange(pb.n) + pb.m - pb.n
    dist = pos[:, None] - np.arange(pb.m)[None, :]
    s = np.einsum("bhgnd,bhmd->bhgnm", _grouped(q, pb), k) * _decay(lg, dist)
    return np.einsum("bhgnm,bhme->bhgne", s, v)


def _recurrent(q, k, v, pb, lg):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv))
    decay = np.exp(lg)                                  # (Hkv, G, 1, 1)
    qg = _grouped(q, pb)
    for j in range(pb.m):
        state = decay * state + (k[:, :, None, j, :, None] * v[:, :, None, j, None, :])
        i = j - (pb.m - pb.n)                           # the query at position j
        if i >= 0:
            out[..., i, :] = np.einsum("bhgd,bhgde->bhge", qg[..., i, :], state)
    return out


def _chunkwise(q, k, v, pb, lg, chunk):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv))   # decayed to c0
    qg, shift = _grouped(q, pb), pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        keys = np.arange(c0, c1)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)  # query rows at positions c0..c1
        if r1 > r0:
            pos = np.arange(r0, r1) + shift
            inter = np.einsum("bhgnd,bhgde->bhgne", qg[..., r0:r1, :], state) * \
                _decay(lg, (pos - c0)[:, None])
            s = np.einsum("bhgnd,bhmd->bhgnm", qg[..., r0:r1, :], k[:, :, c0:c1]) * \
                _decay(lg, pos[:, None] - keys[None, :])
            out[..., r0:r1, :] = inter + np.einsum("bhgnm,bhme->bhgne", s, v[:, :, c0:c1])
        w = _decay(lg, (c1 - keys)[None, :])[:, :, 0, :]   # (Hkv, G, chunk): γ^(c1-j)
        state = state * _decay(lg, np.asarray([[c1 - c0]])) + np.einsum(
            "hgm,bhmd,bhme->bhgde", w, k[:, :, c0:c1], v[:, :, c0:c1])
    return out


@register(family="recurrent", exact=False, time="O(N·D·Dv) chunkwise",
          state="O(D·Dv) per query head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"gamma": 0.9})
def retention(q, k, v, *, gamma, scale=None, method=None, chunk_size=64, causal=True,
              check_finite=True, memory_budget=None):
    """Retention (module docstring for the equation): ``q (..., Hq, N, D)``,
    ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``; ``gamma`` in (0, 1], one number or one
    per query head. ``method``: ``"chunkwise"`` (default), ``"parallel"`` (checks the
    memory budget) or ``"recurrent"``. Returns float64 ``(..., Hq, N, Dv)``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> a = ra.retention(q, k, v, gamma=0.9, chunk_size=4)
    >>> bool(np.allclose(a, ra.retention(q, k, v, gamma=0.9, method="recurrent")))
    True
    >>> one = ra.retention(q[:, :1], k[:, :1], v[:, :1], gamma=0.5)   # o_0 = s (q_0.k_0) v_0
    >>> bool(np.allclose(one[:, 0], (q[:, 0] * k[:, 0]).sum(-1, keepdims=True) / 2 * v[:, 0]))
    True
    """
    q, k, v, pb, lg = _setup(q, k, v, gamma, scale, check_finite)
    return run_form(
        method, chunk_size, pb, memory_budget, what="retention",
        parallel_bytes=pb.batch * pb.heads_q * pb.n * pb.m * 16.0,
        parallel=lambda: _parallel(q, k, v, pb, lg),
        recurrent=lambda: _recurrent(q, k, v, pb, lg),
        chunkwise=lambda chunk: _chunkwise(q, k, v, pb, lg, chunk))


def retention_matrix(q, k, *, gamma, scale=None, causal=True, check_finite=True,
                     memory_budget=None, method=None, chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``s QKᵀ ⊙ Dγ`` that :func:`retention` applies to
    ``v`` (not row-stochastic)."""
    q, k, _, pb, lg = _setup(q, k, None, gamma, scale, check_finite, need_v=False)
    check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 16.0, memory_budget,
                 "the retention matrix", "retention(method='chunkwise')")
    pos = np.arange(pb.n) + pb.m - pb.n
    a = np.einsum("bhgnd,bhmd->bhgnm", _grouped(q, pb), k) * _decay(
        lg, pos[:, None] - np.arange(pb.m)[None, :])
    return pb.unflatten(a.reshape(pb.batch, pb.heads_q, pb.n, pb.m))


@dataclasses.dataclass(frozen=True)
class RetentionState(State):
    """``s``: ``(*batch, Hq, D, Dv)`` decayed sum of ``k^T v``; fixed size."""

    s: np.ndarray
    log_gamma: np.ndarray
    scale: float
    heads_kv: int

    @property
    def nbytes(self) -> int:
        """Bytes of the recurrent state ``s`` (the decays are settings)."""
        return self.s.nbytes


def retention_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, gamma, scale=None,
                         **_ignored):
    """Empty streaming state of :func:`retention` (``_ignored``: ``method`` etc.)."""
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    return RetentionState(position=0, s=np.zeros(batch_shape + (heads_q, d, dv)),
                          log_gamma=_log_gamma(gamma, heads_q),
                          scale=resolve_scale(scale, d), heads_kv=heads_kv)


def retention_step(state: RetentionState, q_t, k_t, v_t):
    """``S = γ S + k_tᵀ v_t``, ``o_t = s q_t S``; returns ``(o_t, new_state)``."""
    *lead, hq, d, dv = state.s.shape
    q_t = check_token(q_t, "q_t", tuple(lead) + (hq, d))
    k_t = check_token(k_t, "k_t", tuple(lead) + (state.heads_kv, d))
    v_t = check_token(v_t, "v_t", tuple(lead) + (state.heads_kv, dv))
    group = hq // state.heads_kv
    k_t, v_t = np.repeat(k_t, group, axis=-2), np.repeat(v_t, group, axis=-2)
    s = np.exp(state.log_gamma)[:, None, None] * state.s + k_t[..., :, None] * v_t[..., None, :]
    out = state.scale * np.einsum("...hd,...hde->...he", q_t, s)
    return out, state.replace(position=state.position + 1, s=s)


attach(retention, implied=retention_matrix, init_state=retention_init_state,
       step=retention_step)
