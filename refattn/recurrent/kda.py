r"""Kimi Delta Attention (KDA; Kimi Team 2025, "Kimi Linear: An Expressive, Efficient
Attention Architecture"): Gated DeltaNet (:mod:`.gated_deltanet`) with a decay per key
channel instead of per head.

.. math:: S_t = (I - \beta_t k_t k_t^\top) \operatorname{Diag}(\alpha_t)\, S_{t-1}
                + \beta_t k_t v_t^\top, \qquad o_i = s\, S_{i'}^\top q_i,

with :math:`\alpha_t = e^{g_t} \in (0, 1]^D` given as log-gates ``g <= 0`` ``(..., Hkv,
M, D)`` (flash-linear-attention's ``g`` of ``fla.ops.kda``), the state ``(D, Dv)`` (the
transpose of the paper's), :math:`i' = i + M - N` and ``s`` the scale. The order is
flash-linear-attention's ``naive_recurrent_kda``: decay first, then the delta write
:math:`S_t = \tilde S + \beta_t k_t (v_t - \tilde S^\top k_t)^\top`, :math:`\tilde S =
\operatorname{Diag}(\alpha_t) S_{t-1}`. A gate constant over the channels is Gated
DeltaNet.

Forms, states, ``cu_seqlens`` and ``normalize_qk`` as :func:`refattn.recurrent.deltanet`;
decays as in :func:`refattn.gated_linear_attention` (``(N, M, D)`` decay tensors inside a
chunk, each ``exp`` of a non-positive sum), stable for gates near 0 and 1.
"""
from __future__ import annotations

import numpy as np

from ..registry import attach, register
from . import _delta

__all__ = ["kimi_delta_attention", "kda_matrix", "kda_init_state", "kda_step",
           "kimi_delta_attention_vjp"]


def _to_parts(k, v, ins):
    beta, g = ins["beta"][..., None], ins["log_gates"]
    return k, beta * v, g, -beta * np.exp(g) * k, k


def _from_parts(k, v, ins, dkk, dvv, dg, da, db):
    beta, alpha = ins["beta"][..., None], np.exp(ins["log_gates"])
    dbeta = np.einsum("...e,...e->...", dvv, v) - np.einsum("...d,...d->...", da,
                                                            alpha * k)
    return (dkk + db - beta * alpha * da, beta * dvv,
            {"beta": dbeta, "log_gates": dg - da * beta * alpha * k})


RULE = _delta.Rule("kimi_delta_attention", {"beta": "token", "log_gates": "channel"},
                   ("log_gates",), _to_parts, _from_parts)


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·(C + D)) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True,
          example={"beta": 0.5, "log_gates": -0.2, "normalize_qk": True},
          tokens=("beta", "log_gates"))
def kimi_delta_attention(q, k, v, *, beta, log_gates, scale=None, normalize_qk=False,
                         method=None, chunk_size=64, causal=True, initial_state=None,
                         return_final_state=False, cu_seqlens=None, check_finite=True,
                         memory_budget=None):
    """Kimi Delta Attention (module docstring for the equation).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    beta : writing strengths, broadcastable to ``(..., Hkv, M)``.
    log_gates : log decays ``<= 0`` per key channel, broadcastable to
        ``(..., Hkv, M, D)``.
    The other arguments as :func:`refattn.recurrent.deltanet`.

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> beta, g = rng.uniform(0, 1, (2, 9)), -rng.uniform(0, 1, (2, 9, 4))
    >>> a = kimi_delta_attention(q, k, v, beta=beta, log_gates=g, normalize_qk=True,
    ...                          chunk_size=4)
    >>> b = kimi_delta_attention(q, k, v, beta=beta, log_gates=g, normalize_qk=True,
    ...                          method="recurrent")
    >>> bool(np.allclose(a, b))
    True
    """
    return _delta.run(RULE, q, k, v, {"beta": beta, "log_gates": log_gates}, scale=scale,
                      normalize_qk=normalize_qk, method=method, chunk_size=chunk_size,
                      initial_state=initial_state, return_final_state=return_final_state,
                      cu_seqlens=cu_seqlens, check_finite=check_finite,
                      memory_budget=memory_budget)


def kda_matrix(q, k, *, beta, log_gates, scale=None, normalize_qk=False, causal=True,
               check_finite=True, memory_budget=None, method=None, chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``A`` with ``kimi_delta_attention(q, k, v) = A v``
    (zero initial state); not row-stochastic."""
    return _delta.run_matrix(RULE, q, k, {"beta": beta, "log_gates": log_gates},
                             scale=scale, normalize_qk=normalize_qk,
                             check_finite=check_finite, memory_budget=memory_budget)


def kda_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, beta=None, log_gates=None,
                   scale=None, normalize_qk=False, memory_budget=None):
    """Empty streaming state of :func:`kimi_delta_attention`; ``beta`` (broadcastable to
    ``(*batch_shape, Hkv)``) and ``log_gates`` (to ``(*batch_shape, Hkv, D)``),
    optional: fixed per-step inputs.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4)); g = -rng.random((1, 6, 4))
    >>> s = kda_init_state(heads_q=1, heads_kv=1, d=4, dv=4, beta=0.5, normalize_qk=True)
    >>> outs = []
    >>> for t in range(6):
    ...     o, s = kda_step(s, q[:, t], k[:, t], v[:, t], log_gates_t=g[:, t])
    ...     outs.append(o)
    >>> ref = kimi_delta_attention(q, k, v, beta=0.5, log_gates=g, normalize_qk=True)
    >>> bool(np.allclose(np.stack(outs, 1), ref))
    True
    """
    return _delta.init_state(RULE, batch_shape=batch_shape, heads_q=heads_q,
                             heads_kv=heads_kv, d=d, dv=dv, scale=scale,
                             normalize_qk=normalize_qk,
                             fixed={"beta": beta, "log_gates": log_gates},
                             memory_budget=memory_budget)


def kda_step(state, q_t, k_t, v_t, beta_t=None, log_gates_t=None):
    """One token: ``S = (I - β k kᵀ) Diag(α) S + β k vᵀ``, ``o_t = s Sᵀ q_t``; returns
    ``(o_t, new_state)``. ``beta_t`` broadcastable to ``(*batch, Hkv)``,
    ``log_gates_t`` to ``(*batch, Hkv, D)``; default: the state's fixed ones."""
    return _delta.step(RULE, state, q_t, k_t, v_t,
                       {"beta": beta_t, "log_gates": log_gates_t})


def kimi_delta_attention_vjp(q, k, v, grad_out, *, beta, log_gates, scale=None,
                             normalize_qk=False, method=None, chunk_size=64, causal=True,
                             initial_state=None, return_final_state=False,
                             grad_final_state=None, cu_seqlens=None, check_finite=True,
                             memory_budget=None):
    r"""Gradients of :func:`kimi_delta_attention`: ``{"q", "k", "v", "beta",
    "log_gates"}`` (and ``"initial_state"``), each in its input's shape; arguments as
    :func:`refattn.recurrent.deltanet_vjp`. The reverse-time recurrence is
    :math:`\bar S_{t-1} = \operatorname{Diag}(\alpha_t) (I - \beta_t k_t k_t^\top)
    \bar S_t + s\, q_i do_i^\top` (``i' = t - 1``) and :math:`dg_{td} = \alpha_{td}
    \sum_e (S_{t-1})_{de} \big((I - \beta_t k_t k_t^\top) \bar S_t\big)_{de}`:
    a product of the gate and the states, never a cumulative sum.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> g = ra.vjp("kimi_delta_attention", q, k, v, np.ones((2, 9, 4)), beta=0.5,
    ...            log_gates=-0.1 * np.ones(4))
    >>> sorted(g), g["log_gates"].shape
    (['beta', 'k', 'log_gates', 'q', 'v'], (4,))
    """
    return _delta.run_vjp(RULE, q, k, v, grad_out, {"beta": beta, "log_gates": log_gates},
                          scale=scale, normalize_qk=normalize_qk, method=method,
                          chunk_size=chunk_size, initial_state=initial_state,
                          grad_final_state=grad_final_state, cu_seqlens=cu_seqlens,
                          check_finite=check_finite)


attach(kimi_delta_attention, implied=kda_matrix, init_state=kda_init_state, step=kda_step,
       vjp=kimi_delta_attention_vjp)
