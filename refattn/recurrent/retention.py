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
from ._common import grouped_cotangent, qkv_gradients, run_form, run_vjp_form, shape_of

__all__ = ["retention", "retention_matrix", "retention_init_state", "retention_step",
           "RetentionState", "retention_vjp"]



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


# --------------------------------------------------------------------------- backward
# Flat, grouped arguments: ``qg (B, Hkv, G, N, D)`` (scaled), ``k (B, Hkv, M, D)``,
# ``v (B, Hkv, M, Dv)``, ``do (B, Hkv, G, N, Dv)``; each form returns ``(dq, dk, dv)``
# with ``dq`` w.r.t. the scaled queries.

def _parallel_vjp(qg, k, v, do, pb, lg):
    pos = np.arange(pb.n) + pb.m - pb.n
    dec = _decay(lg, pos[:, None] - np.arange(pb.m)[None, :])        # (Hkv, G, N, M)
    a = np.einsum("bhgnd,bhmd->bhgnm", qg, k) * dec
    dv = np.einsum("bhgnm,bhgne->bhme", a, do)
    ds = np.einsum("bhgne,bhme->bhgnm", do, v) * dec
    return (np.einsum("bhgnm,bhmd->bhgnd", ds, k), np.einsum("bhgnm,bhgnd->bhmd", ds, qg),
            dv)


def _recurrent_vjp(qg, k, v, do, pb, lg):
    dq, dk, dv = np.zeros(qg.shape), np.zeros(k.shape), np.zeros(v.shape)
    decay, shift = np.exp(lg), pb.m - pb.n                # γ (Hkv, G, 1, 1)
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv))
    for j in range(pb.m):                                 # forward: dq_i = S_i' do_i
        state = decay * state + k[:, :, None, j, :, None] * v[:, :, None, j, None, :]
        if j >= shift:
            dq[..., j - shift, :] = np.einsum("bhgde,bhge->bhgd", state, do[..., j - shift, :])
    state[:] = 0.0                                        # now dS̄_j, backwards in time
    for j in range(pb.m - 1, -1, -1):
        if j >= shift:
            state += qg[..., j - shift, :, None] * do[..., j - shift, None, :]
        dk[:, :, j] = np.einsum("bhgde,bhe->bhd", state, v[:, :, j])
        dv[:, :, j] = np.einsum("bhgde,bhd->bhe", state, k[:, :, j])
        state *= decay
    return dq, dk, dv


def _chunkwise_vjp(qg, k, v, do, pb, lg, chunk):
    dq, dk, dv = np.zeros(qg.shape), np.zeros(k.shape), np.zeros(v.shape)
    shift = pb.m - pb.n
    spans = []
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)   # query rows at positions c0..c1
        spans.append((c0, c1, r0, r1, np.arange(r0, r1) + shift, np.arange(c0, c1)))
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv))   # γ S_{c0-1}
    for c0, c1, r0, r1, pos, keys in spans:              # forward sweep: dq
        if r1 > r0:
            dec = _decay(lg, pos[:, None] - keys[None, :])
            ds = np.einsum("bhgne,bhme->bhgnm", do[..., r0:r1, :], v[:, :, c0:c1]) * dec
            dq[..., r0:r1, :] = np.einsum("bhgne,bhgde->bhgnd", do[..., r0:r1, :], state) * \
                _decay(lg, (pos - c0)[:, None]) + np.einsum("bhgnm,bhmd->bhgnd", ds, k[:, :, c0:c1])
        w = _decay(lg, (c1 - keys)[None, :])[:, :, 0, :]                # γ^(c1-j)
        state = state * _decay(lg, np.asarray([[c1 - c0]])) + np.einsum(
            "hgm,bhmd,bhme->bhgde", w, k[:, :, c0:c1], v[:, :, c0:c1])
    state[:] = 0.0          # T_c = Σ_{i' >= c1} γ^(i'-c1) q_iᵀ do_i = ∂L/∂(γ S_{c1-1})
    for c0, c1, r0, r1, pos, keys in reversed(spans):    # backward sweep: dk, dv
        kc, vc = k[:, :, c0:c1], v[:, :, c0:c1]
        w = _decay(lg, (c1 - keys)[None, :])[:, :, 0, :]                # γ^(c1-j)
        dk[:, :, c0:c1] = np.einsum("hgm,bhgde,bhme->bhmd", w, state, vc)
        dv[:, :, c0:c1] = np.einsum("hgm,bhgde,bhmd->bhme", w, state, kc)
        state = state * _decay(lg, np.asarray([[c1 - c0]]))
        if r1 > r0:
            qc, dc = qg[..., r0:r1, :], do[..., r0:r1, :]
            dec = _decay(lg, pos[:, None] - keys[None, :])
            a = np.einsum("bhgnd,bhmd->bhgnm", qc, kc) * dec
            ds = np.einsum("bhgne,bhme->bhgnm", dc, vc) * dec
            dv[:, :, c0:c1] += np.einsum("bhgnm,bhgne->bhme", a, dc)
            dk[:, :, c0:c1] += np.einsum("bhgnm,bhgnd->bhmd", ds, qc)
            state += np.einsum("hgn,bhgnd,bhgne->bhgde",
                               _decay(lg, (pos - c0)[None, :])[:, :, 0, :], qc, dc)
    return dq, dk, dv


def retention_vjp(q, k, v, grad_out, *, gamma, scale=None, method=None, chunk_size=64,
                  causal=True, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`retention` for the cotangent ``grad_out`` ``(..., Hq, N, Dv)``:
    ``{"q", "k", "v"}``, each float64 in its input's shape (a KV head's gradient sums
    over its query heads; broadcast batch dimensions summed). ``gamma`` is a fixed
    hyperparameter of RetNet (one decay per head, not learned): it gets no gradient.
    The arguments are the forward's, validated alike.

    With :math:`A = s\,QK^\top \odot D_\gamma` and :math:`O = AV`:

    .. math:: dV = A^\top dO, \quad dS = (dO\, V^\top) \odot D_\gamma, \quad
              dQ = s\, dS\, K, \quad dK = s\, dS^\top Q.

    ``method`` selects the form, as in the forward: ``"parallel"`` (the matrices above,
    ``N x M``, memory-checked), ``"recurrent"`` (``dq_i = s\, S_{i'} do_i`` on a forward
    sweep; backwards in time the state gradient
    :math:`\bar S_j = \gamma \bar S_{j+1} + s\, q_{i}^\top do_{i}` (``i' = j``) gives
    :math:`dk_j = \bar S_j v_j`, :math:`dv_j = \bar S_j^\top k_j`; O(D·Dv) per head) and
    ``"chunkwise"`` (default: the same, parallel inside chunks of ``chunk_size`` keys,
    states carried between chunks forwards for ``dq`` and backwards for ``dk``, ``dv``).
    Every decay is :math:`\gamma^d` of a distance ``d >= 0``. The scheme of
    flash-linear-attention's chunked retention backward (``fla.ops.retention``: states
    forwards for ``dq``, state gradients backwards for ``dk``, ``dv``), in float64.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> do = np.ones((2, 9, 4))
    >>> g = ra.vjp("retention", q, k, v, do, gamma=0.9, chunk_size=4)
    >>> r = retention_vjp(q, k, v, do, gamma=0.9, method="recurrent")
    >>> sorted(g), all(np.allclose(g[x], r[x]) for x in "qkv")
    (['k', 'q', 'v'], True)
    """
    shapes = shape_of(q), shape_of(k), shape_of(v)
    q, k, v, pb, lg = _setup(q, k, v, gamma, scale, check_finite)
    do = grouped_cotangent(grad_out, pb, check_finite)
    qg = _grouped(q, pb)
    dq, dk, dv = run_vjp_form(
        method, chunk_size, memory_budget, what="retention",
        parallel_bytes=pb.batch * pb.heads_q * pb.n * pb.m * 24.0,
        parallel=lambda: _parallel_vjp(qg, k, v, do, pb, lg),
        recurrent=lambda: _recurrent_vjp(qg, k, v, do, pb, lg),
        chunkwise=lambda chunk: _chunkwise_vjp(qg, k, v, do, pb, lg, chunk))
    return qkv_gradients(dq * resolve_scale(scale, pb.d), dk, dv, pb, shapes)


attach(retention, implied=retention_matrix, init_state=retention_init_state,
       step=retention_step, vjp=retention_vjp)
