r"""What the delta-rule family shares: one engine for the diagonal-plus-low-rank (DPLR)
recurrence every member of the family is an instance of,

.. math:: S_t = (\operatorname{Diag}(e^{g_t}) + b_t a_t^\top)\, S_{t-1}
                + \kappa_t \nu_t^\top, \qquad o_i = \tilde q_i^\top S_{i'},

with the state :math:`S` ``(D, Dv)`` (keys by values, as GLA's and
flash-linear-attention's states: the transpose of the papers' ``Dv x D`` state), log
decays ``g <= 0`` per key channel, the low-rank transition ``b aᵀ``, the written pair
``(κ, ν)``, scaled queries :math:`\tilde q` and :math:`i' = i + M - N` (bottom-right
alignment). DeltaNet is ``g = 0, a = -βk, b = k, κ = k, ν = βv``; Gated DeltaNet, KDA and
RWKV-7 likewise (their modules say how).

Three forms, all equal:

* ``recurrent`` (Numba): one token at a time, O(D·Dv) state.
* ``chunkwise``: inside a chunk of ``L`` keys the pseudo-values :math:`u_t = a_t^\top
  S_{t-1}` solve the unit lower triangular system :math:`(I - A_{ab}) U = (a \odot
  e^{\Gamma^-}) S_0 + A_{a\kappa} N` with :math:`(A_{xy})_{tj} = \sum_d x_{td} y_{jd}
  e^{\Gamma_{t-1,d} - \Gamma_{jd}}` (``j < t``; :math:`\Gamma` the in-chunk cumulative
  log decays): the UT transform of Yang et al. 2024 ("Parallelizing Linear Transformers
  with the Delta Rule over Sequence Length"), generalised to DPLR transitions as
  flash-linear-attention's ``dplr`` kernels do. Outputs and the next state follow from
  ``U`` in closed form. Every decay is ``exp`` of a non-positive difference of
  cumulative log decays inside one chunk, so gates near 0 underflow to exact zeros.
* ``parallel``: the same with one chunk spanning the sequence (``M x M`` matrices and
  ``(N, M, D)`` decay tensors; memory-checked).

Gradients: the reverse-time recurrence of the state's cotangent :math:`\bar S_{t-1} =
(\operatorname{Diag}(e^{g_t}) + a_t b_t^\top) \bar S_t + \tilde q_{i} do_i^\top`, with
the states recomputed from checkpoints every ``64`` steps (O(M/64·D·Dv) memory).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from .._core.checks import (check_bool, check_choice, check_int, check_memory,
                            resolve_scale)
from .._core.problem import prepare_qkv
from .._core.varlen import (check_packed, initial_states, over_sequences, split_cotangent,
                            state_batch)
from ..boundary.arrays import to_float64
from ..gradients import sum_to_shape
from ..streaming import State, check_sizes, check_tokens
from ._common import (METHODS, check_state_size, choose_form, grouped_cotangent,
                      qkv_gradients, shape_of)

#: Steps between the states the backward recomputes from.
CHECKPOINT_EVERY = 64


# --------------------------------------------------------------------------- inputs
def token_input(x, name, shape, layout, *, check_finite=True, nonpositive=False):
    """``x`` as float64 broadcast to ``shape`` (``layout`` names its axes), read-only;
    ``nonpositive``: every entry must be ``<= 0`` (log decays)."""
    arr = to_float64(x, name, check_finite=check_finite)
    try:
        arr = np.broadcast_to(arr, tuple(shape))
    except ValueError:
        raise ValueError(f"{name} must broadcast to {layout} = {tuple(shape)}, got shape "
                         f"{arr.shape}") from None
    if nonpositive and (arr > 0).any():
        raise ValueError(f"{name} must be <= 0 (a log decay: exp({name}) in (0, 1]); "
                         f"largest is {arr.max()}")
    return arr


def l2_normalize(x):
    """``(x / ‖x‖, ‖x‖)`` over the last axis; a zero vector stays zero."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0), norm


def l2_normalize_vjp(unit, norm, grad):
    """Gradient through :func:`l2_normalize`: ``(g - x̂ (x̂·g)) / ‖x‖`` (0 at ``x = 0``)."""
    tangent = grad - unit * np.einsum("...d,...d->...", unit, grad)[..., None]
    return np.divide(tangent, norm, out=np.zeros_like(tangent), where=norm > 0)


def flat(x):
    """``(B, Hkv, ...)`` -> contiguous ``(B·Hkv, ...)`` for the Numba kernels."""
    return np.ascontiguousarray(x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]))


# --------------------------------------------------------------------------- recurrent
@njit(cache=True, inline="always")
def _update(s, u, g, a, b, kk, vv):  # pragma: no cover - compiled
    """``S = Diag(exp g) S + b (aᵀ S) + κ νᵀ`` in place (``u``: scratch, ``(Dv,)``)."""
    d, dv = s.shape
    for e in range(dv):
        acc = 0.0
        for c in range(d):
            acc += a[c] * s[c, e]
        u[e] = acc
    for c in range(d):
        w = np.exp(g[c])
        for e in range(dv):
            s[c, e] = w * s[c, e] + b[c] * u[e] + kk[c] * vv[e]


@njit(cache=True)
def _recurrent_kernel(q, k, v, g, a, b, shift, s0, final):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    out = np.zeros((bh, group, n, dv))
    s, u = np.zeros((d, dv)), np.zeros(dv)
    for x in range(bh):
        s[:, :] = s0[x]
        for j in range(m):
            _update(s, u, g[x, j], a[x, j], b[x, j], k[x, j], v[x, j])
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for c in range(d):
                        qc = q[x, r, i, c]
                        for e in range(dv):
                            out[x, r, i, e] += qc * s[c, e]
        final[x, :, :] = s
    return out


def _zeros_or(s, pb):
    return np.zeros((pb.batch, pb.heads_kv, pb.d, pb.dv)) if s is None else s


def recurrent(q, parts, pb, s0):
    """``(out (B, Hkv, G, N, Dv), final (B, Hkv, D, Dv))``: one token at a time.
    ``q (B, Hkv, G, N, D)`` scaled; ``parts = (κ, ν, g, a, b)``, each ``(B, Hkv, M, *)``."""
    final = np.empty((pb.batch * pb.heads_kv, pb.d, pb.dv))
    out = _recurrent_kernel(flat(q), *(flat(x) for x in parts), pb.m - pb.n,
                            flat(_zeros_or(s0, pb)), final)
    return (out.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv),
            final.reshape(pb.batch, pb.heads_kv, pb.d, pb.dv))


# --------------------------------------------------------------------------- chunks
def _decay(rows, cols, keep):
    """``exp(rows[t] - cols[j])`` where ``keep[t, j]``, else 0: ``(B, Hkv, T, J, D)``."""
    diff = rows[:, :, :, None, :] - cols[:, :, None, :, :]
    return np.where(keep[None, None, :, :, None], np.exp(np.minimum(diff, 0.0)), 0.0)


def _pseudo_values(kc, vc, gc, ac, bc, state):
    """``(cum, U)``: in-chunk cumulative log decays ``Γ (B, Hkv, L, D)`` and the
    pseudo-values ``u_t = a_tᵀ S_{t-1}`` ``(B, Hkv, L, Dv)`` by the UT transform."""
    size = kc.shape[2]
    cum = np.cumsum(gc, axis=2)
    prev = np.concatenate([np.zeros_like(cum[:, :, :1]), cum[:, :, :-1]], axis=2)
    idx = np.arange(size)
    e_prev = _decay(prev, cum, idx[:, None] > idx[None, :])       # Γ_{t-1} - Γ_j, j < t
    a_b = np.einsum("bhtd,bhjd,bhtjd->bhtj", ac, bc, e_prev, optimize=True)
    a_k = np.einsum("bhtd,bhjd,bhtjd->bhtj", ac, kc, e_prev, optimize=True)
    rhs = np.einsum("bhtd,bhde->bhte", ac * np.exp(prev), state) + a_k @ vc
    return cum, np.linalg.solve(np.eye(size) - a_b, rhs)


def _chunk(qc, at, kc, vc, gc, ac, bc, state):
    """One chunk of keys ``kc, vc, gc, ac, bc`` ``(B, Hkv, L, *)`` after ``state``
    ``(B, Hkv, D, Dv)``, queries ``qc (B, Hkv, G, R, D)`` at local positions ``at``:
    ``(out (B, Hkv, G, R, Dv), state after the chunk)``."""
    cum, u = _pseudo_values(kc, vc, gc, ac, bc, state)
    idx = np.arange(kc.shape[2])
    out = np.zeros(qc.shape[:-1] + (vc.shape[-1],))
    if len(at):
        e_cur = _decay(cum[:, :, at], cum, at[:, None] >= idx[None, :])
        out = (np.einsum("bhgrd,bhrd,bhde->bhgre", qc, np.exp(cum[:, :, at]), state)
               + np.einsum("bhgrd,bhjd,bhrjd->bhgrj", qc, bc, e_cur,
                           optimize=True) @ u[:, :, None]
               + np.einsum("bhgrd,bhjd,bhrjd->bhgrj", qc, kc, e_cur,
                           optimize=True) @ vc[:, :, None])
    to_end = np.exp(cum[:, :, -1:] - cum)                          # Γ_{L-1} - Γ_j <= 0
    state = (np.exp(cum[:, :, -1])[..., None] * state
             + np.einsum("bhjd,bhje->bhde", bc * to_end, u)
             + np.einsum("bhjd,bhje->bhde", kc * to_end, vc))
    return out, state


def chunkwise(q, parts, pb, chunk, s0):
    """As :func:`recurrent`, chunk by chunk (``chunk`` keys each; ``chunk >= M``: the
    parallel form)."""
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    state = _zeros_or(s0, pb).copy()
    shift = pb.m - pb.n
    for c0 in range(0, pb.m, chunk):
        c1 = min(c0 + chunk, pb.m)
        r0, r1 = max(c0 - shift, 0), max(c1 - shift, 0)
        at = np.arange(r0, r1) + shift - c0
        out[..., r0:r1, :], state = _chunk(q[..., r0:r1, :], at,
                                           *(x[:, :, c0:c1] for x in parts), state)
    return out, state


def matrix(q, parts, pb):
    """The ``(B, Hkv, G, N, M)`` matrix ``A`` with ``out = A ν`` from a zero state:
    ``A = P_{qb} (I - A_{ab})^{-1} A_{aκ} + P_{qκ}``."""
    kc, _, gc, ac, bc = parts
    if pb.m == 0:
        return np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, 0))
    eye = np.broadcast_to(np.eye(pb.m), (pb.batch, pb.heads_kv, pb.m, pb.m))
    cum, w = _pseudo_values(kc, eye, gc, ac, bc, np.zeros((pb.batch, pb.heads_kv, pb.d,
                                                           pb.m)))
    pos = np.arange(pb.n) + pb.m - pb.n
    e_cur = _decay(cum[:, :, np.maximum(pos, 0)], cum, pos[:, None] >= np.arange(pb.m))
    p_qb = np.einsum("bhgrd,bhjd,bhrjd->bhgrj", q, bc, e_cur, optimize=True)
    p_qk = np.einsum("bhgrd,bhjd,bhrjd->bhgrj", q, kc, e_cur, optimize=True)
    return p_qb @ w[:, :, None] + p_qk


def parallel_bytes(p) -> float:
    """Memory of the parallel form: the ``(N + M) x M x D`` decay tensors."""
    return p.batch * p.heads_kv * (p.n + p.m) * p.m * p.d * 24.0


def forward(q, parts, pb, s0, cu, *, method, chunk_size, memory_budget, what):
    """``(out (B, Hq, N, Dv), final (S, Hkv, D, Dv))`` in the chosen form, per packed
    sequence of ``cu`` (None: the whole batch); ``s0`` flat per-sequence states."""
    def run(p, tokens, states):
        qs, *ps = tokens
        return choose_form(method, chunk_size, memory_budget, what, parallel_bytes(p),
                           parallel=lambda: chunkwise(qs, ps, p, max(p.m, 1), states[0]),
                           recurrent=lambda: recurrent(qs, ps, p, states[0]),
                           chunkwise=lambda chunk: chunkwise(qs, ps, p, chunk, states[0]))

    out, final = over_sequences(cu, pb, run, [q, *parts], [s0], (3, 0))
    return out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv), final


def states(x, pb, cu, name, check_finite):
    """``x`` (an initial state or a final state's cotangent) checked as per-sequence
    states ``(*lead, Hkv, D, Dv)`` and returned flat ``(S, Hkv, D, Dv)``, or None."""
    return initial_states(x, pb.batch_shape, cu, (pb.heads_kv, pb.d, pb.dv),
                          "Hkv, D, Dv", name=name, check_finite=check_finite)


def state_shape(pb, cu) -> tuple:
    """The caller's shape of per-sequence states."""
    return state_batch(pb.batch_shape, cu)[0] + (pb.heads_kv, pb.d, pb.dv)


# --------------------------------------------------------------------------- backward
@njit(cache=True)
def _vjp_kernel(q, k, v, g, a, b, do, shift, s0, dsf, every):  # pragma: no cover
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    dq, dk, dvv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    dg, da, db = np.zeros(g.shape), np.zeros(a.shape), np.zeros(b.shape)
    ds0, sf = np.zeros((bh, d, dv)), np.zeros((bh, d, dv))
    marks = (m + every - 1) // every
    ck = np.zeros((max(marks, 1), d, dv))
    buf = np.zeros((every + 1, d, dv))
    s, ds = np.zeros((d, dv)), np.zeros((d, dv))
    u, z = np.zeros(dv), np.zeros(dv)
    for x in range(bh):
        s[:, :] = s0[x]
        for j in range(m):                                   # forward: checkpoints
            if j % every == 0:
                ck[j // every, :, :] = s
            _update(s, u, g[x, j], a[x, j], b[x, j], k[x, j], v[x, j])
        sf[x, :, :] = s
        ds[:, :] = dsf[x]
        for c in range(marks - 1, -1, -1):
            c0, c1 = c * every, min(c * every + every, m)
            s[:, :] = ck[c]
            buf[0, :, :] = s
            for j in range(c0, c1):                          # the chunk's states again
                _update(s, u, g[x, j], a[x, j], b[x, j], k[x, j], v[x, j])
                buf[j - c0 + 1, :, :] = s
            for j in range(c1 - 1, c0 - 1, -1):              # backwards in time
                cur, prev = buf[j - c0 + 1], buf[j - c0]
                i = j - shift
                if i >= 0:
                    for r in range(group):
                        for cc in range(d):
                            acc = 0.0
                            for e in range(dv):
                                acc += cur[cc, e] * do[x, r, i, e]
                                ds[cc, e] += q[x, r, i, cc] * do[x, r, i, e]
                            dq[x, r, i, cc] = acc
                for e in range(dv):
                    acc_u, acc_z, acc_v = 0.0, 0.0, 0.0
                    for cc in range(d):
                        acc_u += a[x, j, cc] * prev[cc, e]
                        acc_z += b[x, j, cc] * ds[cc, e]
                        acc_v += k[x, j, cc] * ds[cc, e]
                    u[e], z[e], dvv[x, j, e] = acc_u, acc_z, acc_v
                for cc in range(d):
                    w = np.exp(g[x, j, cc])
                    acc_k, acc_g, acc_b, acc_a = 0.0, 0.0, 0.0, 0.0
                    for e in range(dv):
                        acc_k += ds[cc, e] * v[x, j, e]
                        acc_g += ds[cc, e] * prev[cc, e]
                        acc_b += ds[cc, e] * u[e]
                        acc_a += prev[cc, e] * z[e]
                    dk[x, j, cc], dg[x, j, cc] = acc_k, acc_g * w
                    db[x, j, cc], da[x, j, cc] = acc_b, acc_a
                    for e in range(dv):
                        ds[cc, e] = w * ds[cc, e] + a[x, j, cc] * z[e]
        ds0[x, :, :] = ds
    return dq, dk, dvv, dg, da, db, ds0, sf


def backward(q, parts, do, pb, s0, dsf, cu):
    """Gradients of the DPLR recurrence, per packed sequence of ``cu``: ``(dq, dκ, dν,
    dg, da, db, ds0)``, flat (``dq`` w.r.t. the scaled ``q``; ``dg`` w.r.t. the log
    decays), ``ds0 (S, Hkv, D, Dv)``."""
    def run(p, tokens, st):
        qs, *ps, dos = tokens
        s, dfs = _zeros_or(st[0], p), _zeros_or(st[1], p)
        res = _vjp_kernel(flat(qs), *(flat(x) for x in ps), flat(dos), p.m - p.n,
                          flat(s), flat(dfs), CHECKPOINT_EVERY)
        shapes = [qs.shape] + [x.shape for x in ps]
        grads = [r.reshape(sh) for r, sh in zip(res[:6], shapes)]
        return (*grads, res[6].reshape(p.batch, p.heads_kv, p.d, p.dv))

    return over_sequences(cu, pb, run, [q, *parts, do], [s0, dsf], (3, 2, 2, 2, 2, 2, 0))


# --------------------------------------------------------------------------- streaming
@dataclasses.dataclass(frozen=True)
class DeltaState(State):
    """Streaming state of a delta-rule mechanism: ``s`` ``(*batch, Hkv, D, Dv)``, fixed
    size; ``fixed``: per-step inputs used when a step is given none (name -> array or
    None), ``normalize_qk``, ``scale`` and ``heads_q``: settings."""

    s: np.ndarray
    fixed: dict
    normalize_qk: bool
    scale: float
    heads_q: int

    @property
    def nbytes(self) -> int:
        """Bytes of the recurrent state ``s`` (the fixed inputs are settings)."""
        return self.s.nbytes


def step_state(state, q_t, parts_t):
    """``(o_t, s)``: the state after one DPLR step with ``parts_t = (κ, ν, g, a, b)``,
    each ``(*batch, Hkv, *)``, and the grouped read-out by ``q_t (*batch, Hq, D)``."""
    kk, vv, g, a, b = parts_t
    s = state.s
    u = np.einsum("...d,...de->...e", a, s)
    s = np.exp(g)[..., None] * s + b[..., :, None] * u[..., None, :] \
        + kk[..., :, None] * vv[..., None, :]
    lead, (hkv, d, dv) = s.shape[:-3], s.shape[-3:]
    qg = q_t.reshape(lead + (hkv, state.heads_q // hkv, d))
    out = state.scale * np.einsum("...hgd,...hde->...hge", qg, s)
    return out.reshape(lead + (state.heads_q, dv)), s


def fixed_or_given(state, name, given, shape, layout, nonpositive=False):
    """A step's per-token input: ``given`` checked to broadcast to ``shape``, else the
    state's fixed one; ``ValueError`` when there is neither."""
    if given is None:
        value = state.fixed.get(name)
        if value is None:
            raise ValueError(f"{name}_t is required: this state was made without a fixed "
                             f"{name}")
        return value
    return token_input(given, f"{name}_t", shape, layout, nonpositive=nonpositive)


# --------------------------------------------------------------------------- front end
@dataclasses.dataclass(frozen=True)
class Rule:
    """One member of the family: ``inputs``, its per-token inputs' names, each
    ``"token"`` (``(..., Hkv, M)``) or ``"channel"`` (``(..., Hkv, M, D)``);
    ``nonpositive``: those that are log decays; ``to_parts(k, v, ins)`` gives the DPLR
    ``(κ, ν, g, a, b)`` (on whole sequences and on one step's tokens alike);
    ``from_parts(k, v, ins, dκ, dν, dg, da, db)`` gives ``(dk, dv, {name: grad})``."""

    what: str
    inputs: dict
    nonpositive: tuple
    to_parts: object
    from_parts: object


def _shape(rule, name, lead, pb, m):
    tail = (pb.heads_kv, m) + ((pb.d,) if rule.inputs[name] == "channel" else ())
    axes = "(..., Hkv, M" + (", D)" if rule.inputs[name] == "channel" else ")")
    return tuple(lead) + tail, axes


def setup(rule, q, k, v, ins, scale, normalize_qk, check_finite, need_v=True):
    """``(q, k, v, ins, pb, norms)``: validated float64 inputs, ``q`` normalized (if
    asked), scaled and grouped ``(B, Hkv, G, N, D)``, ``k`` normalized, per-token
    inputs flat; ``norms``: what the backward needs of the normalization (or None)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=need_v)
    flat_ins = {}
    for name, x in ins.items():
        shape, axes = _shape(rule, name, pb.batch_shape, pb, pb.m)
        arr = token_input(x, name, shape, axes, check_finite=check_finite,
                          nonpositive=name in rule.nonpositive)
        flat_ins[name] = arr.reshape((pb.batch,) + shape[len(pb.batch_shape):])
    norms = None
    if check_bool("normalize_qk", normalize_qk):
        (q, qn), (k, kn) = l2_normalize(q), l2_normalize(k)
        norms = (q, qn, k, kn)
    q = (q * resolve_scale(scale, pb.d)).reshape(pb.batch, pb.heads_kv, pb.group, pb.n,
                                                 pb.d)
    return q, k, v, flat_ins, pb, norms


def run(rule, q, k, v, ins, *, scale, normalize_qk, method, chunk_size, initial_state,
        return_final_state, cu_seqlens, check_finite, memory_budget):
    """The forward of ``rule`` as its registered function takes it."""
    q, k, v, ins, pb, _ = setup(rule, q, k, v, ins, scale, normalize_qk, check_finite)
    cu = check_packed(pb, cu_seqlens)
    s0 = states(initial_state, pb, cu, "initial_state", check_finite)
    return_final_state = check_bool("return_final_state", return_final_state)
    out, final = forward(q, rule.to_parts(k, v, ins), pb, s0, cu, method=method,
                         chunk_size=chunk_size, memory_budget=memory_budget, what=rule.what)
    out = pb.unflatten(out)
    return (out, final.reshape(state_shape(pb, cu))) if return_final_state else out


def run_matrix(rule, q, k, ins, *, scale, normalize_qk, check_finite, memory_budget):
    """The implied ``(..., Hq, N, M)`` matrix: ``out = A ν`` from a zero state (``ν``
    the written values, ``v`` itself or ``βv``: ``ins`` enter through ``rule``)."""
    q, k, _, ins, pb, _ = setup(rule, q, k, None, ins, scale, normalize_qk, check_finite,
                                 need_v=False)
    check_memory(parallel_bytes(pb), memory_budget, f"the {rule.what} matrix",
                 f"{rule.what}(method='chunkwise')")
    ones = np.ones((pb.batch, pb.heads_kv, pb.m, 1))
    parts = rule.to_parts(k, ones, ins)
    a = matrix(q, parts, pb) * parts[1][:, :, None, None, :, 0]   # ν = scale_j · v_j
    return pb.unflatten(a.reshape(pb.batch, pb.heads_q, pb.n, pb.m))


def run_vjp(rule, q, k, v, grad_out, ins, *, scale, normalize_qk, method, chunk_size,
            initial_state, grad_final_state, cu_seqlens, check_finite):
    """The VJP of ``rule``'s forward (every ``method`` by the reverse-time recurrence,
    ``chunk_size`` checked): gradients keyed by the inputs' names."""
    shapes = [shape_of(x) for x in (q, k, v)]
    in_shapes = {name: shape_of(x) for name, x in ins.items()}
    check_choice("method", method, METHODS, none="chunkwise")
    check_int("chunk_size", chunk_size, minimum=1)
    q, k, v, ins, pb, norms = setup(rule, q, k, v, ins, scale, normalize_qk, check_finite)
    cu = check_packed(pb, cu_seqlens)
    s0 = states(initial_state, pb, cu, "initial_state", check_finite)
    grad_out, grad_final_state = split_cotangent(grad_out, grad_final_state)
    do = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv)) if grad_out is None \
        else grouped_cotangent(grad_out, pb, check_finite)
    dsf = states(grad_final_state, pb, cu, "grad_final_state", check_finite)
    dq, *dparts, ds0 = backward(q, rule.to_parts(k, v, ins), do, pb, s0, dsf, cu)
    dk, dv, dins = rule.from_parts(k, v, ins, *dparts)
    dq = dq.reshape(pb.batch, pb.heads_q, pb.n, pb.d) * resolve_scale(scale, pb.d)
    if norms is not None:
        qu, qn, ku, kn = norms
        dq, dk = l2_normalize_vjp(qu, qn, dq), l2_normalize_vjp(ku, kn, dk)
    grads = qkv_gradients(dq, dk, dv, pb, shapes)
    for name, g in dins.items():
        grads[name] = sum_to_shape(pb.unflatten(g), in_shapes[name])
    if initial_state is not None:
        grads["initial_state"] = ds0.reshape(state_shape(pb, cu))
    return grads


def init_state(rule, *, batch_shape, heads_q, heads_kv, d, dv, scale, normalize_qk,
               fixed, memory_budget=None):
    """An empty :class:`DeltaState`; ``fixed``: per-step inputs for steps given none. The
    state's size is checked against ``memory_budget`` (None: 8 GiB) before anything is
    allocated (:func:`check_state_size`)."""
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d,
                                                        dv)
    check_state_size(f"{rule.what} init_state", memory_budget, batch_shape, heads_kv, d, dv)
    checked = {}
    for name, x in fixed.items():
        tail = (heads_kv,) + ((d,) if rule.inputs[name] == "channel" else ())
        checked[name] = None if x is None else token_input(
            x, name, batch_shape + tail, "(*batch, Hkv" + (", D)" if len(tail) == 2
                                                          else ")"),
            nonpositive=name in rule.nonpositive).copy()
    return DeltaState(position=0, s=np.zeros(batch_shape + (heads_kv, d, dv)),
                      fixed=checked, normalize_qk=check_bool("normalize_qk", normalize_qk),
                      scale=resolve_scale(scale, d), heads_q=heads_q)


def step(rule, state, q_t, k_t, v_t, given):
    """One token of ``rule``: ``(o_t, new_state)``; ``given``: per-step inputs by name
    (None: the state's fixed one)."""
    *lead, hkv, d, dv = state.s.shape
    q_t, k_t, v_t = check_tokens(q_t, k_t, v_t, lead, state.heads_q, hkv, d, dv)
    ins = {}
    for name, x in given.items():
        tail = (hkv,) + ((d,) if rule.inputs[name] == "channel" else ())
        ins[name] = fixed_or_given(state, name, x, tuple(lead) + tail,
                                   "(*batch, Hkv" + (", D)" if len(tail) == 2 else ")"),
                                   nonpositive=name in rule.nonpositive)
    if state.normalize_qk:
        q_t, k_t = l2_normalize(q_t)[0], l2_normalize(k_t)[0]
    out, s = step_state(state, q_t, rule.to_parts(k_t, v_t, ins))
    return out, state.replace(position=state.position + 1, s=s)
