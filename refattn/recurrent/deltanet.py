r"""DeltaNet: linear attention whose state is written by the delta rule (Schlag, Irie &
Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight Programmers"; Yang, Wang,
Zhang, Shen & Kim 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length").

.. math:: S_t = (I - \beta_t k_t k_t^\top)\, S_{t-1} + \beta_t k_t v_t^\top, \qquad
          o_i = s\, S_{i'}^\top q_i,

the state :math:`S` ``(D, Dv)`` (keys by values: the transpose of the papers'
:math:`S_t = S_{t-1}(I - \beta_t k_t k_t^\top) + \beta_t v_t k_t^\top`, ``o_t = S_t
q_t``, and flash-linear-attention's layout), :math:`i' = i + M - N` the bottom-right
aligned query position and ``s`` the scale (default ``1/sqrt(D)``). Each step replaces
the value stored under :math:`k_t` by :math:`\beta_t`-weighted interpolation towards
:math:`v_t`: :math:`S_t = S_{t-1} + \beta_t k_t (v_t - S_{t-1}^\top k_t)^\top`.

Keys are meant to be L2-normalised (then :math:`I - \beta k k^\top` has eigenvalues 1 and
:math:`1 - \beta`, a contraction for :math:`0 \le \beta \le 2`); models normalise them,
and so does ``normalize_qk=True`` (queries and keys, exactly; flash-linear-attention's
``use_qk_l2norm_in_kernel`` adds ``1e-6`` under the square root). Unnormalised keys with
:math:`\beta \|k\|^2 > 2` make the recurrence grow without bound.

Forms (``method=``): ``"recurrent"`` (Numba, one token at a time, O(D·Dv) state),
``"chunkwise"`` (default: the WY/UT transform inside chunks of ``chunk_size`` keys, the
state carried between them) and ``"parallel"`` (the same over one chunk: ``M x M``
matrices); all agree to float64 rounding. The output is linear in ``v``:
:func:`deltanet_matrix` is the implied ``(N, M)`` matrix. States, ``initial_state``,
``return_final_state`` and ``cu_seqlens`` follow :func:`refattn.gated_linear_attention`
(flash-linear-attention's ``fla.ops.delta_rule`` conventions).
"""
from __future__ import annotations

import numpy as np

from ..registry import attach, register
from . import _delta

__all__ = ["deltanet", "deltanet_matrix", "deltanet_init_state", "deltanet_step",
           "deltanet_vjp"]


def _to_parts(k, v, ins):
    beta = ins["beta"][..., None]
    return k, beta * v, np.zeros(k.shape), -beta * k, k


def _from_parts(k, v, ins, dkk, dvv, dg, da, db):
    beta = ins["beta"][..., None]
    dbeta = np.einsum("...e,...e->...", dvv, v) - np.einsum("...d,...d->...", da, k)
    return dkk + db - beta * da, beta * dvv, {"beta": dbeta}


RULE = _delta.Rule("deltanet", {"beta": "token"}, (), _to_parts, _from_parts)


@register(family="recurrent", exact=False, time="O(N·D·Dv + N·C·(C + D)) chunkwise",
          state="O(D·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False, row_stochastic=False,
          constant_state=True, example={"beta": 0.5, "normalize_qk": True},
          tokens=("beta",))
def deltanet(q, k, v, *, beta, scale=None, normalize_qk=False, method=None, chunk_size=64,
             causal=True, initial_state=None, return_final_state=False, cu_seqlens=None,
             check_finite=True, memory_budget=None):
    """DeltaNet (module docstring for the equation and the forms).

    q : (..., Hq, N, D); k : (..., Hkv, M, D); v : (..., Hkv, M, Dv).
    beta : writing strengths, broadcastable to ``(..., Hkv, M)`` (a number: the same
        for every token); with ``layout="bnhd"`` a full ``(..., M, Hkv)`` array, laid out
        like ``k``, is moved with it.
    normalize_qk : L2-normalise ``q`` and ``k`` first (a zero vector stays zero).
    method : ``"chunkwise"`` (default), ``"parallel"`` (memory-checked) or
        ``"recurrent"``; chunk_size : keys per chunk.
    initial_state : the state before the first key ``(..., Hkv, D, Dv)``
        (``(num_seqs, Hkv, D, Dv)`` with ``cu_seqlens``); default 0.
    return_final_state : also return the state after the last key.
    cu_seqlens : ``(num_seqs + 1,)`` integers ``[0, ..., N]``: sequences packed along the
        tokens of a batch of one (``N = M``), the state restarting at each start.
    causal : accepted; the recurrence is causal whatever it says.

    Returns float64 ``(..., Hq, N, Dv)``, or ``(out, final_state)``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> beta = rng.uniform(0, 1, (2, 9))
    >>> a = deltanet(q, k, v, beta=beta, normalize_qk=True, chunk_size=4)
    >>> b = deltanet(q, k, v, beta=beta, normalize_qk=True, method="recurrent")
    >>> bool(np.allclose(a, b))
    True
    >>> x, s = deltanet(q[:, :4], k[:, :4], v[:, :4], beta=beta[:, :4], normalize_qk=True,
    ...                 return_final_state=True)
    >>> y = deltanet(q[:, 4:], k[:, 4:], v[:, 4:], beta=beta[:, 4:], normalize_qk=True,
    ...              initial_state=s)
    >>> bool(np.allclose(np.concatenate([x, y], -2), a))
    True
    """
    return _delta.run(RULE, q, k, v, {"beta": beta}, scale=scale, normalize_qk=normalize_qk,
                      method=method, chunk_size=chunk_size, initial_state=initial_state,
                      return_final_state=return_final_state, cu_seqlens=cu_seqlens,
                      check_finite=check_finite, memory_budget=memory_budget)


def deltanet_matrix(q, k, *, beta, scale=None, normalize_qk=False, causal=True,
                    check_finite=True, memory_budget=None, method=None, chunk_size=None):
    r"""The ``(..., Hq, N, M)`` matrix ``A`` with ``deltanet(q, k, v) = A v`` (zero
    initial state): :math:`A = (s\,Q K^\top \odot M)\, T\, \operatorname{diag}(\beta)`,
    :math:`T = (I + \operatorname{tril}(\operatorname{diag}(\beta) K K^\top, -1))^{-1}`
    (Yang et al. 2024, eq. 5), ``M`` the causal mask; not row-stochastic."""
    return _delta.run_matrix(RULE, q, k, {"beta": beta}, scale=scale,
                             normalize_qk=normalize_qk, check_finite=check_finite,
                             memory_budget=memory_budget)


def deltanet_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, beta=None,
                        scale=None, normalize_qk=False, memory_budget=None):
    """Empty streaming state of :func:`deltanet` (``memory_budget``: the state's
    size is checked against it first);
    ``beta`` (optional): a fixed strength, broadcastable to ``(*batch_shape, Hkv)``, for
    steps given none.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4)); beta = rng.random((1, 6))
    >>> s = deltanet_init_state(heads_q=1, heads_kv=1, d=4, dv=4, normalize_qk=True)
    >>> outs = []
    >>> for t in range(6):
    ...     o, s = deltanet_step(s, q[:, t], k[:, t], v[:, t], beta_t=beta[:, t])
    ...     outs.append(o)
    >>> ref = deltanet(q, k, v, beta=beta, normalize_qk=True)
    >>> bool(np.allclose(np.stack(outs, 1), ref)), s.nbytes
    (True, 128)
    """
    return _delta.init_state(RULE, batch_shape=batch_shape, heads_q=heads_q,
                             heads_kv=heads_kv, d=d, dv=dv, scale=scale,
                             normalize_qk=normalize_qk, fixed={"beta": beta},
                             memory_budget=memory_budget)


def deltanet_step(state, q_t, k_t, v_t, beta_t=None):
    """One token: ``S = (I - β k kᵀ) S + β k vᵀ``, ``o_t = s Sᵀ q_t``; returns
    ``(o_t, new_state)``. ``beta_t`` broadcastable to ``(*batch, Hkv)``; default: the
    state's fixed one. Example: see :func:`deltanet_init_state`."""
    return _delta.step(RULE, state, q_t, k_t, v_t, {"beta": beta_t})


def deltanet_vjp(q, k, v, grad_out, *, beta, scale=None, normalize_qk=False, method=None,
                 chunk_size=64, causal=True, initial_state=None, return_final_state=False,
                 grad_final_state=None, cu_seqlens=None, check_finite=True,
                 memory_budget=None):
    r"""Gradients of :func:`deltanet` for the cotangent ``grad_out`` ``(..., Hq, N, Dv)``
    (``None``: zero) and ``grad_final_state`` (``None``: zero; or ``grad_out=(grad_out,
    grad_final_state)``): ``{"q", "k", "v", "beta"}`` (and ``"initial_state"`` when one
    is given), each float64 in its input's shape (broadcast inputs summed, a KV head
    summing its query heads). The other arguments are the forward's.

    Every ``method`` computes the reverse-time recurrence of the state's cotangent,
    :math:`\bar S_{t-1} = (I - \beta_t k_t k_t^\top) \bar S_t + s\,q_i do_i^\top`
    (``i' = t - 1``) from :math:`\bar S_{M-1}` = ``grad_final_state`` + the last query's
    term, with :math:`u_t = -\beta_t S_{t-1}^\top k_t`, :math:`z_t = \bar S_t^\top k_t`:

    .. math:: dv_t = \beta_t z_t, \quad
              dk_t = \bar S_t (\beta_t v_t + u_t) - \beta_t S_{t-1} z_t, \quad
              d\beta_t = z_t \cdot v_t - k_t^\top S_{t-1} z_t,

    :math:`dq_i = s\, S_{i'} do_i`, :math:`dS_{-1} = \bar S_{-1}`; the states are
    recomputed from checkpoints (O(M/64·D·Dv) memory). With ``normalize_qk`` the
    gradients go through the normalisation.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 9, 4))
    >>> g = ra.vjp("deltanet", q, k, v, np.ones((2, 9, 4)), beta=0.5, normalize_qk=True)
    >>> sorted(g), g["beta"].shape
    (['beta', 'k', 'q', 'v'], ())
    """
    return _delta.run_vjp(RULE, q, k, v, grad_out, {"beta": beta}, scale=scale,
                          normalize_qk=normalize_qk, method=method, chunk_size=chunk_size,
                          initial_state=initial_state, grad_final_state=grad_final_state,
                          cu_seqlens=cu_seqlens, check_finite=check_finite)


attach(deltanet, implied=deltanet_matrix, init_state=deltanet_init_state,
       step=deltanet_step, vjp=deltanet_vjp)
