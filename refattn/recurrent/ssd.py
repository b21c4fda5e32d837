r"""Mamba-2's state-space duality (SSD; Dao & Gu 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality"): a
selective state-space model whose decay is one scalar per head and step, which makes it
linear attention with a decay mask.

.. math:: S_t = a_t S_{t-1} + B_t X_t^\top, \qquad Y_i = s\, S_{i'}^\top C_i, \qquad
          Y = (L \circ s\, C B^\top)\, X, \quad L_{ij} = \prod_{j < t \le i'} a_t,

in refattn's names ``q = C`` ``(..., Hq, N, D)`` (``D``: the state size), ``k = B``
``(..., Hkv, M, D)``, ``v = X`` ``(..., Hkv, M, Dv)`` (``Dv``: the head dimension),
:math:`a_t = e^{g_t} \in (0, 1]` given as ``log_a = g <= 0`` ``(..., Hkv, M)``,
:math:`i' = i + M - N` and the scale ``s`` (``1`` by default: SSD has none). Mamba-2's
discretisation enters through the inputs: ``log_a = Δ·A`` and ``v = Δ·x`` (its ``D``
skip and gate are outside). The state :math:`S` is ``(D, Dv)`` per KV head.

Three forms (``method=``), written separately:

* ``"parallel"``: the quadratic "attention" form :math:`Y = (L \circ C B^\top) X`, the
  ``N x M`` mask :math:`L_{ij} = e^{G_{i'} - G_j}` from cumulative log decays
  :math:`G` (memory-checked).
* ``"chunkwise"``: Mamba-2's chunked algorithm (``ssd_minimal_discrete``): (1) the
  quadratic form inside each chunk, (2) every chunk's own final state, (3) a recurrence
  over the chunk states, (4) the states' contribution to the outputs.
* ``"recurrent"``: Numba, one step at a time, O(D·Dv) state.

All equal to float64 rounding, and equal to :func:`refattn.selective_scan` with ``A``
one scalar per head (a fourth form). Every decay is ``exp`` of a non-positive sum.
States, ``initial_state``, ``return_final_state`` and ``cu_seqlens`` follow
:func:`refattn.gated_linear_attention` (SSD is GLA with one gate per head).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .._core.checks import check_bool, check_memory
from .._core.varlen import check_packed, over_sequences
from ..registry import attach, register
from . import _delta
from ._common import choose_form

__all__ = ["ssd", "ssd_matrix", "ssd_init_state", "ssd_step", "ssd_vjp"]


def _to_parts(k, v, ins):
    g = ins["log_a"][..., None]
    zeros = np.zeros(k.shape)
    return k, v, np.broadcast_to(g, k.shape), zeros, zeros


def _from_parts(k, v, ins, dkk, dvv, dg, da, db):
    return dkk, dvv, {"log_a": dg.sum(-1)}


RULE = _delta.Rule("ssd", {"log_a": "token"}, ("log_a",), _to_parts, _from_parts)


def _mask(cum, pos, m):
    """``L (B, Hkv, rows, M)``: ``exp(G[pos_i] - G[j])`` for ``j <= pos_i``, else 0."""
    if m == 0:
        return np.zeros(cum.shape[:2] + (len(pos), 0))
    diff = cum[:, :, np.maximum(pos, 0), None] - cum[:, :, None, :]
    keep = pos[:, None] >= np.arange(m)[None, :]
    return np.where(keep, np.exp(np.minimum(diff, 0.0)), 0.0)


def _quadratic(q, k, v, g, pb, s0):
    cum = np.cumsum(g, axis=-1)
    pos = np.arange(pb.n) + pb.m - pb.n
    scores = np.einsum("bhgnd,bhmd->bhgnm", q, k) * _mask(cum, pos, pb.m)[:, :, None]
    out = scores @ v[:, :, None]
    last = cum[:, :, -1] if pb.m else np.zeros((pb.batch, pb.heads_kv))
    final = np.einsum("bhm,bhmd,bhme->bhde", np.exp(last[..., None] - cum), k, v)
    if s0 is not None:
        entry = np.where(pos >= 0, np.exp(cum[:, :, np.maximum(pos, 0)]), 0.0) \
            if pb.m else np.zeros((pb.batch, pb.heads_kv, pb.n))
        out += entry[:, :, None, :, None] * np.einsum("bhgnd,bhde->bhgne", q, s0)
        final += np.exp(last)[..., None, None] * s0
    return out, final


def _chunked(q, k, v, g, pb, chunk, s0):
    """Mamba-2's four steps, chunks of ``chunk`` keys (the last one padded with zero
    keys and unit decays, which change nothing; a chunk longer than the keys is one
    chunk of all of them, as in the other chunkwise forms)."""
    chunk = min(chunk, max(pb.m, 1))
    nc = -(-pb.m // chunk)
    pad = nc * chunk - pb.m

    def split(x):
        x = np.concatenate([x, np.zeros(x.shape[:2] + (pad,) + x.shape[3:])], axis=2)
        return x.reshape(x.shape[:2] + (nc, chunk) + x.shape[3:])

    kc, vc, cum = split(k), split(v), np.cumsum(split(g), axis=-1)    # in-chunk sums
    # (2) each chunk's own final state, from a zero state
    own = np.einsum("bhct,bhctd,bhcte->bhcde", np.exp(cum[..., -1:] - cum), kc, vc)
    # (3) the states between chunks: before[c] = state after chunk c - 1
    before = np.zeros((pb.batch, pb.heads_kv, nc + 1, pb.d, pb.dv))
    if s0 is not None:
        before[:, :, 0] = s0
    for c in range(nc):
        before[:, :, c + 1] = np.exp(cum[:, :, c, -1])[..., None, None] * before[:, :, c] \
            + own[:, :, c]
    # (1) + (4) per chunk: the quadratic form inside, the carried state's contribution
    out = np.zeros((pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv))
    shift = pb.m - pb.n
    for c in range(nc):
        r0, r1 = max(c * chunk - shift, 0), max(min((c + 1) * chunk, pb.m) - shift, 0)
        if r1 <= r0:
            continue
        at = np.arange(r0, r1) + shift - c * chunk
        qc = q[..., r0:r1, :]
        scores = np.einsum("bhgnd,bhmd->bhgnm", qc, kc[:, :, c]) * _mask(
            cum[:, :, c], at, chunk)[:, :, None]
        out[..., r0:r1, :] = scores @ vc[:, :, c, None] + np.exp(
            cum[:, :, c, at])[:, :, None, :, None] * np.einsum("bhgnd,bhde->bhgne", qc,
                                                               before[:, :, c])
    return out, before[:, :, nc]


@njit(cache=True)
def _recurrent_kernel(q, k, v, g, shift, s0, final):  # pragma: no cover - compiled
    bh, group, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    out = np.zeros((bh, group, n, dv))
    s = np.zeros((d, dv))
    for x in range(bh):
        s[:, :] = s0[x]
        for j in range(m):
            a = np.exp(g[x, j])
            for c in range(d):
                for e in range(dv):
                    s[c, e] = a * s[c, e] + k[x, j, c] * v[x, j, e]
            i = j - shift
            if i >= 0:
                for r in range(group):
                    for c in range(d):
                        for e in range(dv):
                            out[x, r, i, e] += q[x, r, i, c] * s[c, e]
        final[x, :, :] = s
    return out


def _recurrent(q, k, v, g, pb, s0):
    final = np.empty((pb.batch * pb.heads_kv, pb.d, pb.dv))
    s0 = np.zeros((pb.batch, pb.heads_kv, pb.d, pb.dv)) if s0 is None else s0
    out = _recurrent_kernel(*(_delta.flat(x) for x in (q, k, v, g)), pb.m - pb.n,
                            _delta.flat(s0), final)
    return (out.reshape(pb.batch, pb.heads_kv, pb.group, pb.n, pb.dv),
            final.reshape(pb.batch, pb.heads_kv, pb.d, pb.dv))


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·D) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"log_a": -0.2}, tokens=("log_a",))
def ssd(q, k, v, *, log_a, scale=1.0, method=None, chunk_size=64, causal=True,
        initial_state=None, return_final_state=False, cu_seqlens=None, check_finite=True,
        memory_budget=None):
    """Mamba-2's SSD (module docstring for the equations and the names).

    q : ``C`` (..., Hq, N, D); k : ``B`` (..., Hkv, M, D); v : ``X`` (..., Hkv, M, Dv).
    log_a : log decays ``<= 0`` (``Δ·A``), broadcastable to ``(..., Hkv, M)``
        (with ``layout="bnhd"`` a full ``(..., M, Hkv)`` array, laid out like ``k``).
    scale : multiplies ``q`` (default 1; None: ``1/sqrt(D)``).
    method : ``"chunkwise"`` (default), ``"parallel"`` (the quadratic form, ``N·M``
        memory) or ``"recurrent"``; chunk_size : keys per chunk (at most M are used).
    initial_state, return_final_state, cu_seqlens : as
        :func:`refattn.gated_linear_attention` (states ``(..., Hkv, D, Dv)``).
    causal : accepted; SSD is causal whatever it says.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> c, b, x = rng.standard_normal((3, 2, 9, 4))
    >>> log_a = -rng.uniform(0, 1, (2, 9))
    >>> y = ssd(c, b, x, log_a=log_a, chunk_size=4)
    >>> bool(np.allclose(y, ssd(c, b, x, log_a=log_a, method="parallel")))
    True
    >>> bool(np.allclose(y, ssd(c, b, x, log_a=log_a, method="recurrent")))
    True
    """
    q, k, v, ins, pb, _ = _delta.setup(RULE, q, k, v, {"log_a": log_a}, scale, False,
                                        check_finite)
    cu = check_packed(pb, cu_seqlens)
    s0 = _delta.states(initial_state, pb, cu, "initial_state", check_finite)
    return_final_state = check_bool("return_final_state", return_final_state)

    def run(p, tokens, states):
        (qs, ks, vs, gs), (s,) = tokens, states
        return choose_form(
            method, chunk_size, memory_budget, "ssd",
            p.batch * p.heads_q * p.n * p.m * 24.0,
            parallel=lambda: _quadratic(qs, ks, vs, gs, p, s),
            recurrent=lambda: _recurrent(qs, ks, vs, gs, p, s),
            chunkwise=lambda chunk: _chunked(qs, ks, vs, gs, p, chunk, s))

    out, final = over_sequences(cu, pb, run, [q, k, v, ins["log_a"]], [s0], (3, 0))
    out = pb.unflatten(out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv))
    return (out, final.reshape(_delta.state_shape(pb, cu))) if return_final_state else out


def ssd_matrix(q, k, *, log_a, scale=1.0, causal=True, check_finite=True,
               memory_budget=None, method=None, chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``L ∘ s C Bᵀ`` with ``ssd(q, k, v) = A v`` (zero
    initial state); not row-stochastic."""
    q, k, _, ins, pb, _ = _delta.setup(RULE, q, k, None, {"log_a": log_a}, scale, False,
                                        check_finite, need_v=False)
    check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 24.0, memory_budget,
                 "the SSD matrix", "ssd(method='chunkwise')")
    cum = np.cumsum(ins["log_a"], axis=-1)
    mask = _mask(cum, np.arange(pb.n) + pb.m - pb.n, pb.m)
    a = np.einsum("bhgnd,bhmd->bhgnm", q, k) * mask[:, :, None]
    return pb.unflatten(a.reshape(pb.batch, pb.heads_q, pb.n, pb.m))


def ssd_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, log_a=None, scale=1.0,
                   memory_budget=None):
    """Empty streaming state of :func:`ssd`, ``S (*batch_shape, Hkv, D, Dv)``, refused
    (:class:`refattn.MemoryBudgetError`) beyond ``memory_budget`` bytes (None: 8 GiB)
    before it is allocated; ``log_a`` (optional, broadcastable to ``(*batch_shape,
    Hkv)``): a fixed decay for steps given none.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> c, b, x = rng.standard_normal((3, 1, 6, 4))
    >>> s = ssd_init_state(heads_q=1, heads_kv=1, d=4, dv=4, log_a=-0.3)
    >>> outs = []
    >>> for t in range(6):
    ...     y, s = ssd_step(s, c[:, t], b[:, t], x[:, t]); outs.append(y)
    >>> bool(np.allclose(np.stack(outs, 1), ssd(c, b, x, log_a=-0.3))), s.nbytes
    (True, 128)
    """
    return _delta.init_state(RULE, batch_shape=batch_shape, heads_q=heads_q,
                             heads_kv=heads_kv, d=d, dv=dv, scale=scale, normalize_qk=False,
                             fixed={"log_a": log_a}, memory_budget=memory_budget)


def ssd_step(state, q_t, k_t, v_t, log_a_t=None):
    """One step: ``S = a S + B Xᵀ``, ``Y = s Sᵀ C``; returns ``(y_t, new_state)``.
    ``log_a_t`` broadcastable to ``(*batch, Hkv)``; default: the state's fixed one."""
    return _delta.step(RULE, state, q_t, k_t, v_t, {"log_a": log_a_t})


def ssd_vjp(q, k, v, grad_out, *, log_a, scale=1.0, method=None, chunk_size=64,
            causal=True, initial_state=None, return_final_state=False,
            grad_final_state=None, cu_seqlens=None, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`ssd`: ``{"q", "k", "v", "log_a"}`` (and
    ``"initial_state"``), each in its input's shape; arguments as
    :func:`refattn.recurrent.deltanet_vjp`. Every ``method`` runs the reverse-time
    recurrence :math:`\bar S_{t-1} = a_t \bar S_t + s\, C_i dY_i^\top` (``i' = t - 1``):
    :math:`dB_t = \bar S_t X_t`, :math:`dX_t = \bar S_t^\top B_t`, :math:`dg_t = a_t
    \langle \bar S_t, S_{t-1} \rangle`, :math:`dC_i = s\, S_{i'} dY_i`.

    >>> import numpy as np, refattn as ra
    >>> c, b, x = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> g = ra.vjp("ssd", c, b, x, np.ones((2, 9, 4)), log_a=-0.1 * np.ones((2, 9)))
    >>> sorted(g), g["log_a"].shape
    (['k', 'log_a', 'q', 'v'], (2, 9))
    """
    return _delta.run_vjp(RULE, q, k, v, grad_out, {"log_a": log_a}, scale=scale,
                          normalize_qk=False, method=method, chunk_size=chunk_size,
                          initial_state=initial_state, grad_final_state=grad_final_state,
                          cu_seqlens=cu_seqlens, check_finite=check_finite)


attach(ssd, implied=ssd_matrix, init_state=ssd_init_state, step=ssd_step, vjp=ssd_vjp)
