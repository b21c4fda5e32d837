r"""The generalized (diagonal-plus-low-rank) delta rule of RWKV-7 (Peng et al. 2025,
"RWKV-7 'Goose' with Expressive Dynamic State Evolution"), flash-linear-attention's
``fla.ops.generalized_delta_rule`` (``dplr``) and ``fla.ops.rwkv7``.

.. math:: S_t = (\operatorname{Diag}(w_t) + b_t a_t^\top)\, S_{t-1} + k_t v_t^\top,
          \qquad o_i = s\, S_{i'}^\top q_i,

the state ``(D, Dv)`` (keys by values, flash-linear-attention's layout; in the paper's
``Dv x D`` layout :math:`S_t = S_{t-1}(\operatorname{Diag}(w_t) + a_t b_t^\top) + v_t
k_t^\top`), decays :math:`w_t = e^{g_t} \in (0, 1]^D` given as ``log_w = g <= 0``
(flash-linear-attention's ``gk``; RWKV-7's ``w`` is this log decay), ``a``, ``b`` the
low-rank transition (``dplr_recurrence``'s ``alpha`` and ``beta``: ``S += beta (alphaᵀ
S)``), :math:`i' = i + M - N` and ``s`` the scale (default ``1/sqrt(D)`` like
``dplr_recurrence``; RWKV-7 uses ``scale=1``). RWKV-7 takes ``a = -κ̂``, ``b = κ̂ ⊙ a_7``
(``κ̂`` its normalised removal key, ``a_7`` its in-context learning rate); DeltaNet is
``log_w = 0``, ``a = -βk``, ``b = k`` with values ``βv``.

Forms, states and ``cu_seqlens`` as :func:`refattn.recurrent.deltanet`: recurrent
(Numba), chunkwise (the WY/UT transform generalised to DPLR transitions) and parallel
(one chunk), all equal; every decay inside a chunk is ``exp`` of a non-positive sum.
Nothing bounds the transition: with ``|w + b·a|`` beyond 1 the state grows.
"""
from __future__ import annotations

from ..registry import attach, register
from . import _delta

__all__ = ["generalized_delta_rule", "generalized_delta_rule_matrix",
           "generalized_delta_rule_init_state", "generalized_delta_rule_step",
           "generalized_delta_rule_vjp"]


def _to_parts(k, v, ins):
    return k, v, ins["log_w"], ins["a"], ins["b"]


def _from_parts(k, v, ins, dkk, dvv, dg, da, db):
    return dkk, dvv, {"a": da, "b": db, "log_w": dg}


RULE = _delta.Rule("generalized_delta_rule",
                   {"a": "channel", "b": "channel", "log_w": "channel"}, ("log_w",),
                   _to_parts, _from_parts)


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·(C + D)) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"a": -0.05, "b": 0.05, "log_w": -0.1},
          tokens=("a", "b", "log_w"))
def generalized_delta_rule(q, k, v, *, a, b, log_w, scale=None, method=None, chunk_size=64,
                           causal=True, initial_state=None, return_final_state=False,
                           cu_seqlens=None, check_finite=True, memory_budget=None):
    """The generalized delta rule (module docstring for the equation).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    a, b : the low-rank transition, each broadcastable to ``(..., Hkv, M, D)``.
    log_w : log decays ``<= 0``, broadcastable to ``(..., Hkv, M, D)``.
    The other arguments as :func:`refattn.recurrent.deltanet`.

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> kk = rng.standard_normal((2, 9, 4)); kk /= np.linalg.norm(kk, axis=-1)[..., None]
    >>> w = -rng.uniform(0, 1, (2, 9, 4))
    >>> x = generalized_delta_rule(q, k, v, a=-kk, b=0.5 * kk, log_w=w, chunk_size=4)
    >>> y = generalized_delta_rule(q, k, v, a=-kk, b=0.5 * kk, log_w=w, method="recurrent")
    >>> bool(np.allclose(x, y))
    True
    """
    return _delta.run(RULE, q, k, v, {"a": a, "b": b, "log_w": log_w}, scale=scale,
                      normalize_qk=False, method=method, chunk_size=chunk_size,
                      initial_state=initial_state, return_final_state=return_final_state,
                      cu_seqlens=cu_seqlens, check_finite=check_finite,
                      memory_budget=memory_budget)


def generalized_delta_rule_matrix(q, k, *, a, b, log_w, scale=None, causal=True,
                                  check_finite=True, memory_budget=None, method=None,
                                  chunk_size=None):
    """The ``(..., Hq, N, M)`` matrix ``A`` with ``generalized_delta_rule(q, k, v) =
    A v`` (zero initial state); not row-stochastic."""
    return _delta.run_matrix(RULE, q, k, {"a": a, "b": b, "log_w": log_w}, scale=scale,
                             normalize_qk=False, check_finite=check_finite,
                             memory_budget=memory_budget)


def generalized_delta_rule_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, a=None,
                                      b=None, log_w=None, scale=None, memory_budget=None):
    """Empty streaming state of :func:`generalized_delta_rule`; ``a``, ``b``, ``log_w``
    (optional, each broadcastable to ``(*batch_shape, Hkv, D)``): fixed per-step inputs.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4))
    >>> s = generalized_delta_rule_init_state(heads_q=1, heads_kv=1, d=4, dv=4, a=-0.1,
    ...                                       b=0.2, log_w=-0.3)
    >>> outs = []
    >>> for t in range(6):
    ...     o, s = generalized_delta_rule_step(s, q[:, t], k[:, t], v[:, t]); outs.append(o)
    >>> ref = generalized_delta_rule(q, k, v, a=-0.1, b=0.2, log_w=-0.3)
    >>> bool(np.allclose(np.stack(outs, 1), ref))
    True
    """
    return _delta.init_state(RULE, batch_shape=batch_shape, heads_q=heads_q,
                             heads_kv=heads_kv, d=d, dv=dv, scale=scale, normalize_qk=False,
                             fixed={"a": a, "b": b, "log_w": log_w},
                             memory_budget=memory_budget)


def generalized_delta_rule_step(state, q_t, k_t, v_t, a_t=None, b_t=None, log_w_t=None):
    """One token: ``S = (Diag(w) + b aᵀ) S + k vᵀ``, ``o_t = s Sᵀ q_t``; returns
    ``(o_t, new_state)``. ``a_t``, ``b_t``, ``log_w_t`` broadcastable to ``(*batch,
    Hkv, D)``; default: the state's fixed ones."""
    return _delta.step(RULE, state, q_t, k_t, v_t, {"a": a_t, "b": b_t, "log_w": log_w_t})


def generalized_delta_rule_vjp(q, k, v, grad_out, *, a, b, log_w, scale=None, method=None,
                               chunk_size=64, causal=True, initial_state=None,
                               return_final_state=False, grad_final_state=None,
                               cu_seqlens=None, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`generalized_delta_rule`: ``{"q", "k", "v", "a", "b",
    "log_w"}`` (and ``"initial_state"``), each in its input's shape; arguments as
    :func:`refattn.recurrent.deltanet_vjp`. With the state's cotangent running backwards,
    :math:`\bar S_{t-1} = (\operatorname{Diag}(w_t) + a_t b_t^\top) \bar S_t + s\, q_i
    do_i^\top` (``i' = t - 1``), :math:`u_t = S_{t-1}^\top a_t`, :math:`z_t = \bar
    S_t^\top b_t`:

    .. math:: dk_t = \bar S_t v_t, \quad dv_t = \bar S_t^\top k_t, \quad
              da_t = S_{t-1} z_t, \quad db_t = \bar S_t u_t, \quad
              dg_{td} = w_{td} \sum_e (\bar S_t)_{de} (S_{t-1})_{de}.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 4))
    >>> g = ra.vjp("generalized_delta_rule", q, k, v, np.ones((2, 9, 4)), a=-0.1, b=0.1,
    ...            log_w=-0.2)
    >>> sorted(g)
    ['a', 'b', 'k', 'log_w', 'q', 'v']
    """
    return _delta.run_vjp(RULE, q, k, v, grad_out, {"a": a, "b": b, "log_w": log_w},
                          scale=scale, normalize_qk=False, method=method,
                          chunk_size=chunk_size, initial_state=initial_state,
                          grad_final_state=grad_final_state, cu_seqlens=cu_seqlens,
                          check_finite=check_finite)


attach(generalized_delta_rule, implied=generalized_delta_rule_matrix,
       init_state=generalized_delta_rule_init_state, step=generalized_delta_rule_step,
       vjp=generalized_delta_rule_vjp)
