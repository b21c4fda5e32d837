r"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"): DeltaNet (:mod:`.deltanet`) whose state also decays by a
data-dependent scalar gate per head and token, as in Mamba-2.

.. math:: S_t = \alpha_t (I - \beta_t k_t k_t^\top)\, S_{t-1} + \beta_t k_t v_t^\top,
          \qquad o_i = s\, S_{i'}^\top q_i,

with :math:`\alpha_t = e^{g_t} \in (0, 1]` given as log-gates ``g <= 0`` ``(..., Hkv,
M)`` (flash-linear-attention's ``g``), the state ``(D, Dv)`` (the transpose of the
paper's), :math:`i' = i + M - N` and ``s`` the scale. Equivalently (the order of
flash-linear-attention's ``naive_recurrent_gated_delta_rule``): decay, then the delta
write :math:`S_t = \alpha_t S_{t-1} + \beta_t k_t (v_t - \alpha_t S_{t-1}^\top k_t)^\top`.
``log_gates = 0`` is DeltaNet; ``beta = 0`` leaves pure decay.

Forms, states, ``cu_seqlens`` and ``normalize_qk`` as :func:`refattn.recurrent.deltanet`.
Every decay is ``exp`` of a non-positive sum of log-gates inside one chunk, so gates near
0 (``g -> -inf``) give exact zeros and gates near 1 over a million tokens stay accurate.
"""
from __future__ import annotations

import numpy as np

from ..registry import attach, register
from . import _delta

__all__ = ["gated_deltanet", "gated_deltanet_matrix", "gated_deltanet_init_state",
           "gated_deltanet_step", "gated_deltanet_vjp"]


def _to_parts(k, v, ins):
    beta, g = ins["beta"][..., None], ins["log_gates"][..., None]
    return k, beta * v, np.broadcast_to(g, k.shape), -np.exp(g) * beta * k, k


def _from_parts(k, v, ins, dkk, dvv, dg, da, db):
    beta, alpha = ins["beta"][..., None], np.exp(ins["log_gates"])[..., None]
    da_k = np.einsum("...d,...d->...", da, k)
    dbeta = np.einsum("...e,...e->...", dvv, v) - alpha[..., 0] * da_k
    dgate = dg.sum(-1) - alpha[..., 0] * ins["beta"] * da_k
    return (dkk + db - alpha * beta * da, beta * dvv,
            {"beta": dbeta, "log_gates": dgate})


RULE = _delta.Rule("gated_deltanet", {"beta": "token", "log_gates": "token"},
                   ("log_gates",), _to_parts, _from_parts)


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·(C + D)) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True,
          example={"beta": 0.5, "log_gates": -0.2, "normalize_qk": True},
          tokens=("beta", "log_gates"))
def gated_deltanet(q, k, v, *, beta, log_gates, scale=None, normalize_qk=False, method=None,
                   chunk_size=64, causal=True, initial_state=None, return_final_state=False,
                   cu_seqlens=None, check_finite=True, memory_budget=None):
    """Gated DeltaNet (module docstring for the equation).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    beta : writing strengths, broadcastable to ``(..., Hkv, M)``.
    log_gates : log decays ``<= 0``, broadcastable to ``(..., Hkv, M)``.
    With ``layout="bnhd"``, full ``(..., M, Hkv)`` ``beta`` and ``log_gates`` are laid out
    like ``k`` and moved with it.
    The other arguments as :func:`refattn.recurrent.deltanet`.

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> beta, g = rng.uniform(0, 1, (2, 9)), -rng.uniform(0, 1, (2, 9))
    >>> a = gated_deltanet(q, k, v, beta=beta, log_gates=g, normalize_qk=True, chunk_size=4)
    >>> b = gated_deltanet(q, k, v, beta=beta, log_gates=g, normalize_qk=True,
    ...                    method="recurrent")
    >>> bool(np.allclose(a, b))
    True
    """
    return _delta.run(RULE, q, k, v, {"beta": beta, "log_gates": log_gates}, scale=scale,
                      normalize_qk=normalize_qk, method=method, chunk_size=chunk_size,
                      initial_state=initial_state, return_final_state=return_final_state,
                      cu_seqlens=cu_seqlens, check_finite=check_finite,
                      memory_budget=memory_budget)


def gated_deltanet_matrix(q, k, *, beta, log_gates, scale=None, normalize_qk=False,
                          causal=True, check_finite=True, memory_budget=None, method=None,
                          chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``A`` with ``gated_deltanet(q, k, v) = A v`` (zero
    initial state); not row-stochastic."""
    return _delta.run_matrix(RULE, q, k, {"beta": beta, "log_gates": log_gates},
                             scale=scale, normalize_qk=normalize_qk,
                             check_finite=check_finite, memory_budget=memory_budget)


def gated_deltanet_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, beta=None,
                              log_gates=None, scale=None, normalize_qk=False,
                              memory_budget=None):
    """Empty streaming state of :func:`gated_deltanet`; ``beta``, ``log_gates``
    (optional): fixed per-step inputs, broadcastable to ``(*batch_shape, Hkv)``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4))
    >>> s = gated_deltanet_init_state(heads_q=1, heads_kv=1, d=4, dv=4, beta=0.5)
    >>> outs = []
    >>> for t in range(6):
    ...     o, s = gated_deltanet_step(s, q[:, t], k[:, t] / 3, v[:, t], log_gates_t=-0.1)
    ...     outs.append(o)
    >>> ref = gated_deltanet(q, k / 3, v, beta=0.5, log_gates=-0.1)
    >>> bool(np.allclose(np.stack(outs, 1), ref))
    True
    """
    return _delta.init_state(RULE, batch_shape=batch_shape, heads_q=heads_q,
                             heads_kv=heads_kv, d=d, dv=dv, scale=scale,
                             normalize_qk=normalize_qk,
                             fixed={"beta": beta, "log_gates": log_gates},
                             memory_budget=memory_budget)


def gated_deltanet_step(state, q_t, k_t, v_t, beta_t=None, log_gates_t=None):
    """One token: ``S = α (I - β k kᵀ) S + β k vᵀ``, ``o_t = s Sᵀ q_t``; returns
    ``(o_t, new_state)``. ``beta_t``, ``log_gates_t`` broadcastable to ``(*batch,
    Hkv)``; default: the state's fixed ones."""
    return _delta.step(RULE, state, q_t, k_t, v_t,
                       {"beta": beta_t, "log_gates": log_gates_t})


def gated_deltanet_vjp(q, k, v, grad_out, *, beta, log_gates, scale=None,
                       normalize_qk=False, method=None, chunk_size=64, causal=True,
                       initial_state=None, return_final_state=False, grad_final_state=None,
                       cu_seqlens=None, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`gated_deltanet`: ``{"q", "k", "v", "beta", "log_gates"}``
    (and ``"initial_state"``), each in its input's shape; arguments as
    :func:`refattn.recurrent.deltanet_vjp`. The reverse-time recurrence is
    :math:`\bar S_{t-1} = \alpha_t (I - \beta_t k_t k_t^\top) \bar S_t + s\, q_i
    do_i^\top` (``i' = t - 1``) and :math:`dg_t = \alpha_t \langle \bar S_t, (I - \beta_t
    k_t k_t^\top) S_{t-1} \rangle`: a product of the gate and the state, never a
    cumulative sum, so gates near 0 and 1 lose nothing.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> g = ra.vjp("gated_deltanet", q, k, v, np.ones((2, 9, 4)), beta=0.5, log_gates=-0.1)
    >>> sorted(g)
    ['beta', 'k', 'log_gates', 'q', 'v']
    """
    return _delta.run_vjp(RULE, q, k, v, grad_out, {"beta": beta, "log_gates": log_gates},
                          scale=scale, normalize_qk=normalize_qk, method=method,
                          chunk_size=chunk_size, initial_state=initial_state,
                          grad_final_state=grad_final_state, cu_seqlens=cu_seqlens,
                          check_finite=check_finite)


attach(gated_deltanet, implied=gated_deltanet_matrix, init_state=gated_deltanet_init_state,
       step=gated_deltanet_step, vjp=gated_deltanet_vjp)
