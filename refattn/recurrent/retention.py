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

**States and packed sequences** (flash-linear-attention's conventions). The state is the
streaming form's :math:`S` per query head, ``(..., Hq, D, Dv)``, unscaled (the scale
multiplies ``q``). ``initial_state`` :math:`S_{-1}` enters as a key before position 0:
:math:`S_j = \gamma^{j+1} S_{-1} + \sum_{t \le j} \gamma^{j-t} k_t^\top v_t`, so query
``i`` adds :math:`s\,\gamma^{i'+1} q_i S_{-1}`; ``return_final_state=True`` also returns
:math:`S_{M-1}`. ``cu_seqlens`` (``(num_seqs + 1,)`` integers, 0 first, ``N`` last) packs
sequences along the tokens of a batch of one, ``q (1, Hq, N, D)``, ``k (1, Hkv, N, D)``:
the state restarts at every sequence start, states are ``(num_seqs, Hq, D, Dv)``, and
each sequence is computed exactly as a call of its own. Queries before the first key
(``N > M`` without packing) see neither keys nor the initial state: their output is 0.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .._core.checks import check_bool, check_memory, resolve_scale
from .._core.problem import prepare_qkv
from .._core.varlen import (check_packed, initial_states, over_sequences,
                            split_cotangent, state_batch)
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ..streaming import State, check_sizes, check_token
from ._common import (check_state_size, choose_form, grouped_cotangent, qkv_gradients,
                      shape_of)

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


def _entry(lg, pos):
    """``γ^(i'+1)`` for query positions ``pos`` (the initial state's decay when read at
    ``i'``), 0 for queries before the first key: ``(Hkv, G, N, 1)``."""
    return _decay(lg, np.where(pos >= 0, pos + 1, -1)[:, None])


def _to_end(lg, m):
    """``γ^(M-1-j)`` for every key ``j``: how key ``j`` enters the final state
    ``(Hkv, G, M)``."""
    return _decay(lg, (m - 1 - np.arange(m))[None, :])[:, :, 0, :]


def _parallel(q, k, v, pb, lg, s0):
    pos = np.arange(pb.n) + pb.m - pb.n
    dist = pos[:, None] - np.arange(pb.m)[None, :]
    qg = _grouped(q, pb)
    s = np.einsum("bhgnd,bhmd->bhgnm", qg, k) * _decay(lg, dist)
    out = np.einsum("bhgnm,bhme->bhgne", s, v)
    final = np.einsum("hgm,bhmd,bhme->bhgde", _to_end(lg, pb.m), k, v)
    if s0 is not None:
        out += np.einsum("bhgnd,bhgde->bhgne", qg, s0) * _entry(lg, pos)
        final += s0 * _decay(lg, np.asarray([[pb.m]]))
    return out, final


def _recurrent(q, k, v, pb, lg, s0):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv)) if s0 is None \
        else s0.copy()
    decay = np.exp(lg)                                  # (Hkv, G, 1, 1)
    qg = _grouped(q, pb)
    for j in range(pb.m):
        state = decay * state + (k[:, :, None, j, :, None] * v[:, :, None, j, None, :])
        i = j - (pb.m - pb.n)                           # the query at position j
        if i >= 0:
            out[..., i, :] = np.einsum("bhgd,bhgde->bhge", qg[..., i, :], state)
    return out, state


def _chunkwise(q, k, v, pb, lg, chunk, s0):
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv)) if s0 is None \
        else s0.copy()                                  # S after key c0 - 1
    qg, shift = _grouped(q, pb), pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        keys = np.arange(c0, c1)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)  # query rows at positions c0..c1
        if r1 > r0:
            pos = np.arange(r0, r1) + shift
            inter = np.einsum("bhgnd,bhgde->bhgne", qg[..., r0:r1, :], state) * \
                _decay(lg, (pos - c0 + 1)[:, None])
            s = np.einsum("bhgnd,bhmd->bhgnm", qg[..., r0:r1, :], k[:, :, c0:c1]) * \
                _decay(lg, pos[:, None] - keys[None, :])
            out[..., r0:r1, :] = inter + np.einsum("bhgnm,bhme->bhgne", s, v[:, :, c0:c1])
        w = _decay(lg, (c1 - 1 - keys)[None, :])[:, :, 0, :]   # (Hkv, G, chunk): γ^(c1-1-j)
        state = state * _decay(lg, np.asarray([[c1 - c0]])) + np.einsum(
            "hgm,bhmd,bhme->bhgde", w, k[:, :, c0:c1], v[:, :, c0:c1])
    return out, state


def _states_setup(pb, initial_state, cu_seqlens, check_finite):
    """``(cu, s0)``: the checked packing (or None) and the initial states grouped
    ``(S, Hkv, G, D, Dv)`` (or None)."""
    cu = check_packed(pb, cu_seqlens)
    s0 = initial_states(initial_state, pb.batch_shape, cu, (pb.heads_q, pb.d, pb.dv),
                        "Hq, D, Dv", check_finite=check_finite)
    if s0 is not None:
        s0 = s0.reshape(-1, pb.heads_kv, pb.group, pb.d, pb.dv)
    return cu, s0


@register(family="recurrent", exact=False, time="O(N·D·Dv) chunkwise",
          state="O(D·Dv) per query head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"gamma": 0.9})
def retention(q, k, v, *, gamma, scale=None, method=None, chunk_size=64, causal=True,
              initial_state=None, return_final_state=False, cu_seqlens=None,
              check_finite=True, memory_budget=None):
    """Retention (module docstring for the equation): ``q (..., Hq, N, D)``,
    ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``; ``gamma`` in (0, 1], one number or one
    per query head. ``method``: ``"chunkwise"`` (default), ``"parallel"`` (checks the
    memory budget) or ``"recurrent"``.

    ``initial_state``: the state before the first key, :math:`S_{-1}` of
    :func:`retention_step`'s state ``(..., Hq, D, Dv)`` (``(num_seqs, Hq, D, Dv)`` with
    ``cu_seqlens``); default 0. ``return_final_state``: also return the state after the
    last key (likewise shaped). ``cu_seqlens``: ``(num_seqs + 1,)`` integers ``[0, ...,
    N]``, sequences packed along the tokens of ``q (1, Hq, N, D)``, ``k (1, Hkv, N, D)``
    (batch size 1, ``N = M``; flash-linear-attention's convention): the state restarts at
    each sequence start (module docstring).

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> a = ra.retention(q, k, v, gamma=0.9, chunk_size=4)
    >>> bool(np.allclose(a, ra.retention(q, k, v, gamma=0.9, method="recurrent")))
    True
    >>> one = ra.retention(q[:, :1], k[:, :1], v[:, :1], gamma=0.5)   # o_0 = s (q_0.k_0) v_0
    >>> bool(np.allclose(one[:, 0], (q[:, 0] * k[:, 0]).sum(-1, keepdims=True) / 2 * v[:, 0]))
    True
    >>> x, s = ra.retention(q[:, :4], k[:, :4], v[:, :4], gamma=0.9,
    ...                     return_final_state=True)
    >>> y = ra.retention(q[:, 4:], k[:, 4:], v[:, 4:], gamma=0.9, initial_state=s)
    >>> bool(np.allclose(np.concatenate([x, y], -2), a))     # the state carries over
    True
    >>> cu = np.array([0, 4, 9])                              # two packed sequences
    >>> p, f = ra.retention(q[None], k[None], v[None], gamma=0.9, cu_seqlens=cu,
    ...                     return_final_state=True)
    >>> bool(np.array_equal(p[0, :, :4], x)), f.shape
    (True, (2, 2, 4, 4))
    """
    q, k, v, pb, lg = _setup(q, k, v, gamma, scale, check_finite)
    cu, s0 = _states_setup(pb, initial_state, cu_seqlens, check_finite)
    return_final_state = check_bool("return_final_state", return_final_state)

    def run(p, tokens, states):
        (qs, ks, vs), (s,) = tokens, states
        return choose_form(
            method, chunk_size, memory_budget, "retention",
            p.batch * p.heads_q * p.n * p.m * 16.0,
            parallel=lambda: _parallel(qs, ks, vs, p, lg, s),
            recurrent=lambda: _recurrent(qs, ks, vs, p, lg, s),
            chunkwise=lambda chunk: _chunkwise(qs, ks, vs, p, lg, chunk, s))

    out, final = over_sequences(cu, pb, run, [q, k, v], [s0], (3, 0))
    out = pb.unflatten(out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv))
    if not return_final_state:
        return out
    lead = state_batch(pb.batch_shape, cu)[0]
    return out, final.reshape(lead + (pb.heads_q, pb.d, pb.dv))


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
                         memory_budget=None):
    """Empty streaming state of :func:`retention`: ``S (*batch_shape, Hq, D, Dv)`` of
    zeros, refused (:class:`refattn.MemoryBudgetError`) beyond ``memory_budget`` bytes
    (None: 8 GiB) before it is allocated."""
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    check_state_size("retention_init_state", memory_budget, batch_shape, heads_q, d, dv,
                     heads_name="heads_q", heads_kv=heads_kv)
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
# ``v (B, Hkv, M, Dv)``, ``do (B, Hkv, G, N, Dv)``, the initial state ``s0`` and the final
# state's cotangent ``dsf`` ``(B, Hkv, G, D, Dv)`` (or None); each form returns
# ``(dq, dk, dv, ds0)`` with ``dq`` w.r.t. the scaled queries.

def _parallel_vjp(qg, k, v, do, pb, lg, s0, dsf):
    pos = np.arange(pb.n) + pb.m - pb.n
    dec = _decay(lg, pos[:, None] - np.arange(pb.m)[None, :])        # (Hkv, G, N, M)
    a = np.einsum("bhgnd,bhmd->bhgnm", qg, k) * dec
    dv = np.einsum("bhgnm,bhgne->bhme", a, do)
    ds = np.einsum("bhgne,bhme->bhgnm", do, v) * dec
    dq, dk = np.einsum("bhgnm,bhmd->bhgnd", ds, k), np.einsum("bhgnm,bhgnd->bhmd", ds, qg)
    entry = _entry(lg, pos)                                           # γ^(i'+1)
    ds0 = np.einsum("bhgnd,bhgne->bhgde", qg * entry, do)
    if s0 is not None:
        dq += np.einsum("bhgne,bhgde->bhgnd", do, s0) * entry
    if dsf is not None:
        to_end = _to_end(lg, pb.m)                                    # γ^(M-1-j)
        dk += np.einsum("hgm,bhgde,bhme->bhmd", to_end, dsf, v)
        dv += np.einsum("hgm,bhgde,bhmd->bhme", to_end, dsf, k)
        ds0 += dsf * _decay(lg, np.asarray([[pb.m]]))
    return dq, dk, dv, ds0


def _recurrent_vjp(qg, k, v, do, pb, lg, s0, dsf):
    dq, dk, dv = np.zeros(qg.shape), np.zeros(k.shape), np.zeros(v.shape)
    decay, shift = np.exp(lg), pb.m - pb.n                # γ (Hkv, G, 1, 1)
    shape = (pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv)
    state = np.zeros(shape) if s0 is None else s0.copy()
    for j in range(pb.m):                                 # forward: dq_i = S_i' do_i
        state = decay * state + k[:, :, None, j, :, None] * v[:, :, None, j, None, :]
        if j >= shift:
            dq[..., j - shift, :] = np.einsum("bhgde,bhge->bhgd", state, do[..., j - shift, :])
    state = np.zeros(shape) if dsf is None else dsf.copy()   # now dS̄_j, backwards in time
    for j in range(pb.m - 1, -1, -1):
        if j >= shift:
            state += qg[..., j - shift, :, None] * do[..., j - shift, None, :]
        dk[:, :, j] = np.einsum("bhgde,bhe->bhd", state, v[:, :, j])
        dv[:, :, j] = np.einsum("bhgde,bhd->bhe", state, k[:, :, j])
        state *= decay
    return dq, dk, dv, state                              # γ dS̄_0 = ∂L/∂S_{-1}


def _chunkwise_vjp(qg, k, v, do, pb, lg, chunk, s0, dsf):
    dq, dk, dv = np.zeros(qg.shape), np.zeros(k.shape), np.zeros(v.shape)
    shift = pb.m - pb.n
    spans = []
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)   # query rows at positions c0..c1
        spans.append((c0, c1, r0, r1, np.arange(r0, r1) + shift, np.arange(c0, c1)))
    shape = (pb.batch, pb.heads_kv, pb.group, pb.d, pb.dv)
    state = np.zeros(shape) if s0 is None else s0.copy()   # S_{c0-1}
    for c0, c1, r0, r1, pos, keys in spans:              # forward sweep: dq
        if r1 > r0:
            dec = _decay(lg, pos[:, None] - keys[None, :])
            ds = np.einsum("bhgne,bhme->bhgnm", do[..., r0:r1, :], v[:, :, c0:c1]) * dec
            dq[..., r0:r1, :] = np.einsum("bhgne,bhgde->bhgnd", do[..., r0:r1, :], state) * \
                _decay(lg, (pos - c0 + 1)[:, None]) + np.einsum("bhgnm,bhmd->bhgnd", ds,
                                                                k[:, :, c0:c1])
        w = _decay(lg, (c1 - 1 - keys)[None, :])[:, :, 0, :]            # γ^(c1-1-j)
        state = state * _decay(lg, np.asarray([[c1 - c0]])) + np.einsum(
            "hgm,bhmd,bhme->bhgde", w, k[:, :, c0:c1], v[:, :, c0:c1])
    # T = ∂L/∂S_{c1-1} from the queries at positions >= c1 and the final state
    state = np.zeros(shape) if dsf is None else dsf.copy()
    for c0, c1, r0, r1, pos, keys in reversed(spans):    # backward sweep: dk, dv
        kc, vc = k[:, :, c0:c1], v[:, :, c0:c1]
        w = _decay(lg, (c1 - 1 - keys)[None, :])[:, :, 0, :]            # γ^(c1-1-j)
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
                               _decay(lg, (pos - c0 + 1)[None, :])[:, :, 0, :], qc, dc)
    return dq, dk, dv, state                              # ∂L/∂S_{-1}


def retention_vjp(q, k, v, grad_out, *, gamma, scale=None, method=None, chunk_size=64,
                  causal=True, initial_state=None, return_final_state=False,
                  grad_final_state=None, cu_seqlens=None, check_finite=True,
                  memory_budget=None):
    r"""Gradients of :func:`retention` for the cotangent ``grad_out`` ``(..., Hq, N, Dv)``
    (``None``: zero) and ``grad_final_state`` of the final state (``None``: zero; or
    ``grad_out=(grad_out, grad_final_state)``): ``{"q", "k", "v"}`` (and
    ``"initial_state"`` when one is given), each float64 in its input's shape (a KV
    head's gradient sums over its query heads; broadcast batch dimensions summed).
    ``gamma`` is a fixed hyperparameter of RetNet (one decay per head, not learned): it
    gets no gradient. The other arguments are the forward's (``return_final_state`` is
    accepted and changes nothing), validated alike.

    With :math:`A = s\,QK^\top \odot D_\gamma` and :math:`O = AV`:

    .. math:: dV = A^\top dO, \quad dS = (dO\, V^\top) \odot D_\gamma, \quad
              dQ = s\, dS\, K, \quad dK = s\, dS^\top Q,

    and with an initial state :math:`S_{-1}` and the final state's cotangent
    :math:`\bar S_f`: :math:`dq_i \mathrel{+}= s\,\gamma^{i'+1} do_i S_{-1}^\top`,
    :math:`dk_j \mathrel{+}= \gamma^{M-1-j} \bar S_f v_j`, :math:`dv_j \mathrel{+}=
    \gamma^{M-1-j} \bar S_f^\top k_j`, :math:`dS_{-1} = \gamma^M \bar S_f + \sum_i
    \gamma^{i'+1} s\,q_i^\top do_i`. With ``cu_seqlens``, each packed sequence separately.

    ``method`` selects the form, as in the forward: ``"parallel"`` (the matrices above,
    ``N x M``, memory-checked), ``"recurrent"`` (``dq_i = s\, S_{i'} do_i`` on a forward
    sweep; backwards in time the state gradient
    :math:`\bar S_j = \gamma \bar S_{j+1} + s\, q_{i}^\top do_{i}` (``i' = j``;
    :math:`\bar S_{M-1}` starts from :math:`\bar S_f`) gives
    :math:`dk_j = \bar S_j v_j`, :math:`dv_j = \bar S_j^\top k_j`, :math:`dS_{-1} =
    \gamma \bar S_0`; O(D·Dv) per head) and
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
    >>> s0 = np.ones((2, 4, 4))
    >>> g = ra.vjp("retention", q, k, v, do, gamma=0.9, initial_state=s0,
    ...            grad_final_state=np.ones((2, 4, 4)))
    >>> g["initial_state"].shape
    (2, 4, 4)
    """
    shapes = shape_of(q), shape_of(k), shape_of(v)
    q, k, v, pb, lg = _setup(q, k, v, gamma, scale, check_finite)
    cu, s0 = _states_setup(pb, initial_state, cu_seqlens, check_finite)
    check_bool("return_final_state", return_final_state)
    grad_out, grad_final_state = split_cotangent(grad_out, grad_final_state)
    do = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv)) if grad_out is None \
        else grouped_cotangent(grad_out, pb, check_finite)
    lead = state_batch(pb.batch_shape, cu)[0]
    dsf = initial_states(grad_final_state, pb.batch_shape, cu, (pb.heads_q, pb.d, pb.dv),
                         "Hq, D, Dv", name="grad_final_state", check_finite=check_finite)
    if dsf is not None:
        dsf = dsf.reshape(-1, pb.heads_kv, pb.group, pb.d, pb.dv)

    def run(p, tokens, states):
        (qs, ks, vs, dos), (s, dfs) = tokens, states
        qgs = qs.reshape(p.batch, p.heads_kv, p.group, p.n, p.d)
        return choose_form(
            method, chunk_size, memory_budget, "retention backward",
            p.batch * p.heads_q * p.n * p.m * 24.0,
            parallel=lambda: _parallel_vjp(qgs, ks, vs, dos, p, lg, s, dfs),
            recurrent=lambda: _recurrent_vjp(qgs, ks, vs, dos, p, lg, s, dfs),
            chunkwise=lambda chunk: _chunkwise_vjp(qgs, ks, vs, dos, p, lg, chunk, s, dfs))

    dq, dk, dv, ds0 = over_sequences(cu, pb, run, [q, k, v, do], [s0, dsf], (3, 2, 2, 0))
    grads = qkv_gradients(dq * resolve_scale(scale, pb.d), dk, dv, pb, shapes)
    if initial_state is not None:
        grads["initial_state"] = ds0.reshape(lead + (pb.heads_q, pb.d, pb.dv))
    return grads


attach(retention, implied=retention_matrix, init_state=retention_init_state,
       step=retention_step, vjp=retention_vjp)
