r"""Linear attention (Katharopoulos, Vyas, Pappas & Fleuret, ICML 2020, "Transformers are
RNNs: Fast Autoregressive Transformers with Linear Attention"), float64 reference.

**Definition.** With a feature map :math:`\phi: \mathbb{R}^D \to \mathbb{R}^F` applied to
every query and key row, softmax's :math:`e^{q \cdot k}` is replaced by the kernel
:math:`\phi(q)\cdot\phi(k)`:

.. math::

    o_i = \frac{\sum_{j \in V_i} \big(\phi(q_i)\cdot\phi(k_j)\big)\, v_j}
               {\sum_{j \in V_i} \phi(q_i)\cdot\phi(k_j)}
        = \frac{\phi(q_i)^\top S_i}{\phi(q_i)^\top z_i}, \qquad
    S_i = \sum_{j \in V_i} \phi(k_j)\, v_j^\top, \quad
    z_i = \sum_{j \in V_i} \phi(k_j),

where :math:`V_i` is every key (non-causal) or, causal, the keys
:math:`j \le i + (M - N)` (bottom-right alignment when ``N != M``, refattn's convention).
Non-causal this is :math:`\phi(Q)(\phi(K)^\top V) / \phi(Q)(\phi(K)^\top 1)`: two
products of cost O((N + M)·F·Dv), never an ``N x M`` matrix. The scale of ``q · k`` does
not enter (the paper applies ``φ`` to the raw projections).

**Feature maps** (``feature_map=``): ``"elu"`` (default; :math:`\mathrm{elu}(x) + 1`,
positive), ``"relu"`` (:math:`\max(x, 0)`, nonnegative; a row can be all zero),
``"identity"`` (:math:`x`, signed) or a callable ``φ(x)`` mapping a float64 array
``(..., H, L, D)`` to ``(..., H, L, F)`` row by row (the same map for every row; the
causal forms and the streaming step apply it to pieces of the sequence). A callable's
output is checked: it must have the input's leading shape, ``F >= 1`` features, be finite
(unless ``check_finite=False``) and be **nonnegative**, because the normalizer
:math:`\phi(q_i)\cdot z_i` is a meaningful (positive) total weight only then; signed
features raise ``ValueError`` unless ``allow_negative=True``. ``"identity"`` is signed by
choice and needs no opt-out.

**Zero denominators.** Where :math:`\phi(q_i)\cdot z_i = 0` exactly — no visible key
(causal with ``N > M``), or nonnegative features whose products all vanish (``relu``
rows that are all zero, ``elu`` features underflowing for inputs below about ``-745``) —
the output row is **0**, never NaN. Nonzero denominators are used as they are: with
signed features (``identity``, ``allow_negative=True``) a denominator can be negative or
tiny, and the output is then what the formula gives (large, or of flipped sign).

**Implied matrix.** :func:`linear_attention_matrix` returns
:math:`A_{ij} = \phi(q_i)\cdot\phi(k_j) / \sum_{j' \in V_i} \phi(q_i)\cdot\phi(k_{j'})`
on :math:`V_i` (0 elsewhere, and 0 rows where the denominator is 0), so that
``linear_attention(q, k, v) == A @ v``. With nonnegative features (``elu``, ``relu``,
nonnegative callables) ``A`` is row-stochastic on rows with a nonzero denominator; the
registry's ``row_stochastic=True`` refers to the registered example (``elu``). With
signed features ``A`` is returned as it is: rows still sum to 1 where the denominator is
nonzero, but entries can be negative, so the output is not a convex combination of the
values.

**Causal forms** (``method=``), all computing the same function:

* ``"quadratic"``: the masked ``N x M`` matrix :math:`(\phi(Q)\phi(K)^\top \odot
  \text{mask})\,V`, normalized by its row sums;
* ``"recurrent"``: the RNN of the paper, a Numba scan over the keys with
  :math:`S \leftarrow S + \phi(k_j) v_j^\top`, :math:`z \leftarrow z + \phi(k_j)` and
  query :math:`i` read out after key :math:`i + M - N`;
* ``"chunkwise"`` (causal default): keys cut into chunks of ``chunk_size``; a query
  combines the state of all earlier chunks with a masked quadratic product inside its own
  chunk, O((N + M)·chunk_size·F + (N + M)/chunk_size·F·Dv) work and O(F·Dv) state.

Non-causal, ``method=None`` uses the two products above; the three named forms are valid
too (every query then sees every key) and serve as independent checks. GQA: the state
:math:`(S, z)` belongs to a KV head and is shared by the ``Hq // Hkv`` query heads of its
group.

**Streaming.** :func:`linear_attention_init_state` / :func:`linear_attention_step`
(:mod:`refattn.streaming`) carry :math:`S` ``(*batch, Hkv, F, Dv)`` and :math:`z`
``(*batch, Hkv, F)``: constant memory however many tokens are consumed.

**States and packed sequences** (flash-linear-attention's conventions). The state is the
streaming form's pair ``(S, z)``: ``initial_state=(S_0, z_0)`` stands for the keys
before the first one, summed (``S_0 (..., Hkv, F, Dv)``, ``z_0 (..., Hkv, F)``), so
:math:`S_i = S_0 + \sum_{j \in V_i} \phi(k_j) v_j^\top`, :math:`z_i = z_0 + \sum_{j
\in V_i} \phi(k_j)` in the definition above (non-causal: every query sees the initial
state and every key); ``return_final_state=True`` also returns :math:`(S_0 + \sum_j
\phi(k_j) v_j^\top, z_0 + \sum_j \phi(k_j))` over all keys. The normalizer state
:math:`z` is refattn's (flash-linear-attention's ``naive_recurrent_linear_attn`` keeps it
only with ``normalize=True``, as the pair ``(kv, z)``; it has no feature map and adds
``1e-10`` to the denominator). ``cu_seqlens`` (``(num_seqs + 1,)`` integers, 0 first,
``N`` last) packs sequences along the tokens of a batch of one, ``q (1, Hq, N, D)``,
``k (1, Hkv, N, D)``: each sequence attends within itself (causal or not) from its own
initial state, states are ``(num_seqs, Hkv, F, Dv)`` and ``(num_seqs, Hkv, F)``, and
each sequence is computed exactly as a call of its own. A query that sees no key
(causal with ``N > M``) gives 0, whatever the state.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from .._core.checks import check_bool, check_int, check_state_memory
from .._core.problem import prepare_qkv
from .._core.varlen import check_packed, over_sequences, split_cotangent
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ..streaming import check_sizes
from ..gradients import check_cotangent
from ._common import (METHODS, FeatureState, check_gradients_finite, check_method,
                      feature_attention, feature_attention_matrix, feature_attention_vjp,
                      input_gradients, output_cotangents, read_state, state_out, state_pair,
                      step_tokens)

__all__ = ["linear_attention", "linear_attention_matrix", "linear_attention_init_state",
           "linear_attention_step", "linear_attention_vjp", "LinearAttentionState",
           "FEATURE_MAPS", "METHODS"]

#: Names of the built-in feature maps.
FEATURE_MAPS = ("elu", "relu", "identity")


# --------------------------------------------------------------------------- helpers


def _check_feature_map(feature_map):
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable "
                             f"phi(x (..., L, D)) -> (..., L, F), got {feature_map!r}")
        return feature_map
    if not callable(feature_map):
        raise TypeError(f"feature_map must be one of {FEATURE_MAPS} or a callable "
                        f"phi(x (..., L, D)) -> (..., L, F), got {feature_map!r}")
    return feature_map


def _elu_plus_one(x: np.ndarray) -> np.ndarray:
    """``elu(x) + 1``: ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise (exactly >= 0)."""
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _features(feature_map, x: np.ndarray, name: str, *, allow_negative: bool,
              check_finite: bool) -> np.ndarray:
    """``φ(x)`` for float64 ``x (..., L, D)``, validated; float64 ``(..., L, F)``."""
    if feature_map == "elu":
        return _elu_plus_one(x)
    if feature_map == "relu":
        return np.maximum(x, 0.0)
    if feature_map == "identity":
        return x.copy()
    label = f"feature_map({name})"
    out = to_float64(feature_map(x), label, check_finite=check_finite)
    if out.ndim != x.ndim or out.shape[:-1] != x.shape[:-1] or out.shape[-1] < 1:
        raise ValueError(f"{label} must map {name} of shape {x.shape} to shape "
                         f"{x.shape[:-1] + ('F',)} with F >= 1 features, got {out.shape}")
    if not allow_negative and (out < 0).any():
        bad = tuple(int(i) for i in np.argwhere(out < 0)[0])
        raise ValueError(
            f"{label} returned negative features (first at index {bad}: {out[bad]!r}); "
            f"linear attention normalizes by phi(q)·sum_j phi(k_j), a total weight only "
            f"for nonnegative features. Pass allow_negative=True to use signed features "
            f"(weights may then be negative and denominators zero or negative)")
    return np.ascontiguousarray(out)


def _feature_pair(feature_map, q, k, pb, *, allow_negative, check_finite):
    """``φ(q) (B, Hq, N, F)`` and ``φ(k) (B, Hkv, M, F)``; a callable sees the caller's
    batch dimensions ``(*batch, H, L, D)``."""
    def apply(x, name):
        if isinstance(feature_map, str):
            return _features(feature_map, x, name, allow_negative=allow_negative,
                             check_finite=check_finite)
        f = _features(feature_map, x.reshape(pb.batch_shape + x.shape[1:]), name,
                      allow_negative=allow_negative, check_finite=check_finite)
        return f.reshape(x.shape[:-1] + f.shape[-1:])
    fq, fk = apply(q, "q"), apply(k, "k")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map must give queries and keys the same number of "
                         f"features F; got phi(q) {fq.shape}, phi(k) {fk.shape}")
    return fq, fk


# --------------------------------------------------------------------------- public
@register(family="linear", exact=False,
          time="O((N+M)·F·Dv) (+ O((N+M)·chunk·F) causal)",
          state="O(F·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=True, row_stochastic=True, constant_state=True,
          example={"feature_map": "elu"})
def linear_attention(q, k, v, *, feature_map="elu", causal=False, method=None,
                     chunk_size=64, allow_negative=False, initial_state=None,
                     return_final_state=False, cu_seqlens=None, check_finite=True,
                     memory_budget=None):
    r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    .. math:: o_i = \frac{\phi(q_i)^\top \sum_{j \in V_i} \phi(k_j) v_j^\top}
                         {\phi(q_i)^\top \sum_{j \in V_i} \phi(k_j)}

    with :math:`V_i` all keys, or ``j <= i + M - N`` when causal (bottom-right aligned).
    Rows with a zero denominator (no visible key, all-zero features) give 0.

    Parameters
    ----------
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, M, D)``; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h``
        uses KV head ``h // (Hq // Hkv)``, whose state it shares).
    v : array ``(..., Hkv, M, Dv)``
    feature_map : ``"elu"`` (``elu(x) + 1``, default), ``"relu"``, ``"identity"``, or a
        callable ``φ(x (..., H, L, D)) -> (..., H, L, F)`` acting row by row; a callable
        must return nonnegative features unless ``allow_negative=True``.
    causal : bool.
    method : ``None`` (causal: ``"chunkwise"``; non-causal: ``φ(Q)(φ(K)^T V)``),
        ``"quadratic"``, ``"recurrent"`` or ``"chunkwise"``; all give the same result up to
        rounding.
    chunk_size : int >= 1, keys per chunk of the ``"chunkwise"`` form.
    allow_negative : accept signed features from a callable (see the module docs).
    initial_state : the pair ``(S_0, z_0)`` of :func:`linear_attention_step`'s state,
        ``S_0 (..., Hkv, F, Dv)`` and ``z_0 (..., Hkv, F)`` (``(num_seqs, ...)`` with
        ``cu_seqlens``; a part None: zero): keys before the first one, summed. Default 0.
    return_final_state : also return the state after the last key, ``(S, z)``, likewise
        shaped.
    cu_seqlens : ``(num_seqs + 1,)`` integers ``[0, ..., N]``: sequences packed along the
        tokens of ``q (1, Hq, N, D)``, ``k (1, Hkv, N, D)`` (batch size 1, ``N = M``;
        flash-linear-attention's convention), each attending within itself.
    check_finite : raise on non-finite ``q``, ``k``, ``v`` (and callable features).
    memory_budget : bytes allowed for the ``N x M`` matrix of ``method="quadratic"``.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``, or ``(out, (S, z))`` with ``return_final_state``.

    Example
    -------
    >>> import numpy as np
    >>> from refattn.linear import linear_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))          # 2 heads, 6 tokens
    >>> out = linear_attention(q, k, v, causal=True)
    >>> out.shape
    (2, 6, 4)
    >>> bool(np.allclose(out[:, 0], v[:, 0]))                 # query 0 sees key 0 only
    True
    >>> forms = [linear_attention(q, k, v, causal=True, method=m, chunk_size=4)
    ...          for m in ("quadratic", "recurrent", "chunkwise")]
    >>> all(np.allclose(f, out, rtol=1e-13) for f in forms)
    True
    >>> x, state = linear_attention(q[:, :2], k[:, :2], v[:, :2], causal=True,
    ...                             return_final_state=True)   # state = (S, z)
    >>> y = linear_attention(q[:, 2:], k[:, 2:], v[:, 2:], causal=True, initial_state=state)
    >>> bool(np.allclose(np.concatenate([x, y], -2), out))     # the state carries over
    True
    """
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    feature_map = _check_feature_map(feature_map)
    causal = check_bool("causal", causal)
    allow_negative = check_bool("allow_negative", allow_negative)
    method = check_method(method, causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    return_final_state = check_bool("return_final_state", return_final_state)
    cu = check_packed(pb, cu_seqlens)
    fq, fk = _feature_pair(feature_map, q, k, pb, allow_negative=allow_negative,
                           check_finite=check_finite)
    s0, z0 = state_pair(initial_state, "initial_state", pb, cu, fk.shape[-1], check_finite)

    def run(p, tokens, states):
        return feature_attention(*tokens, p, causal=causal, method=method,
                                 chunk_size=chunk_size, memory_budget=memory_budget,
                                 what="linear_attention", s0=states[0], z0=states[1],
                                 return_state=True)

    out, sf, zf = over_sequences(cu, pb, run, [fq, fk, v], [s0, z0], (2, 0, 0))
    out = pb.unflatten(out)
    return (out, state_out(sf, zf, pb, cu)) if return_final_state else out


def linear_attention_matrix(q, k, *, feature_map="elu", causal=False, method=None,
                            chunk_size=64, allow_negative=False, check_finite=True,
                            memory_budget=None):
    r"""The implied attention matrix of :func:`linear_attention`, float64
    ``(..., Hq, N, M)``:

    .. math:: A_{ij} = \frac{\phi(q_i)\cdot\phi(k_j)}
                            {\sum_{j' \in V_i} \phi(q_i)\cdot\phi(k_{j'})}
              \quad (j \in V_i), \qquad A_{ij} = 0 \text{ otherwise},

    and a zero row where the denominator is 0, so that ``linear_attention(q, k, v) ==
    A @ v`` (``v`` repeated over the query heads of a GQA group). Nonnegative for
    nonnegative features; with signed ones (``"identity"``, ``allow_negative=True``)
    entries can be negative (rows still sum to 1 where the denominator is nonzero).
    Same arguments as :func:`linear_attention` (``method``, ``chunk_size`` are checked
    but do not change the matrix); ``memory_budget`` bounds the matrix.

    >>> import numpy as np
    >>> from refattn.linear import linear_attention_matrix
    >>> q = k = np.zeros((1, 3, 2))               # elu(0) + 1 = 1: uniform weights
    >>> linear_attention_matrix(q, k, causal=True)
    array([[[1.        , 0.        , 0.        ],
            [0.5       , 0.5       , 0.        ],
            [0.33333333, 0.33333333, 0.33333333]]])
    """
    q, k, _, pb = prepare_qkv(q, k, None, check_finite=check_finite, need_v=False)
    feature_map = _check_feature_map(feature_map)
    causal = check_bool("causal", causal)
    allow_negative = check_bool("allow_negative", allow_negative)
    check_method(method, causal)
    check_int("chunk_size", chunk_size, minimum=1)
    pb.check_matrix_memory(memory_budget, "the attention matrix of linear_attention_matrix",
                           "refattn.linear.linear_attention", copies=2)
    fq, fk = _feature_pair(feature_map, q, k, pb, allow_negative=allow_negative,
                           check_finite=check_finite)
    return pb.unflatten(feature_attention_matrix(fq, fk, pb, causal))


@dataclasses.dataclass(frozen=True)
class LinearAttentionState(FeatureState):
    """Streaming state of :func:`linear_attention`: ``s = Σ_j φ(k_j) v_j^T``
    ``(*batch, Hkv, F, Dv)`` and ``z = Σ_j φ(k_j)`` ``(*batch, Hkv, F)`` over the keys
    consumed, one per KV head; the other fields are settings."""

    feature_map: str | Callable
    allow_negative: bool


def linear_attention_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv,
                                feature_map="elu", allow_negative=False,
                                check_finite=True,
                                memory_budget=None) -> LinearAttentionState:
    """Empty streaming state for :func:`linear_attention_step` (:mod:`refattn.streaming`).

    ``S = 0`` ``(*batch_shape, heads_kv, F, dv)`` and ``z = 0``
    ``(*batch_shape, heads_kv, F)``, with ``F = d`` for the built-in feature maps and,
    for a callable, the ``F`` it returns on a probe ``zeros((1, 1, d))``. The state's
    ``nbytes`` never changes as tokens are consumed; a state larger than
    ``memory_budget`` (bytes, default :data:`refattn.DEFAULT_MEMORY_BUDGET`) raises
    :class:`refattn.MemoryBudgetError` before anything is allocated.

    >>> from refattn.linear import linear_attention_init_state
    >>> st = linear_attention_init_state(batch_shape=(2,), heads_q=4, heads_kv=2, d=8, dv=3)
    >>> st.s.shape, st.z.shape, st.nbytes
    ((2, 2, 8, 3), (2, 2, 8), 1024)
    """
    feature_map = _check_feature_map(feature_map)
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    allow_negative = check_bool("allow_negative", allow_negative)
    sizes = dict(batch_shape=batch_shape, heads_kv=heads_kv, d=d, dv=dv)
    if isinstance(feature_map, str):
        nf = d
    else:
        check_state_memory(8.0 * d, memory_budget, "the feature map's probe", d=d)
        probe = _features(feature_map, np.zeros((1, 1, d)), "a probe zeros((1, 1, d))",
                          allow_negative=True, check_finite=False)
        nf = probe.shape[-1]
    check_state_memory(8.0 * math.prod(batch_shape) * heads_kv * nf * (dv + 1),
                       memory_budget, "linear_attention_init_state", **sizes)
    return LinearAttentionState(
        position=0, s=np.zeros(batch_shape + (heads_kv, nf, dv)),
        z=np.zeros(batch_shape + (heads_kv, nf)), feature_map=feature_map,
        allow_negative=allow_negative, check_finite=bool(check_finite),
        batch_shape=batch_shape, heads_q=heads_q, heads_kv=heads_kv, d=d, dv=dv)


def linear_attention_step(state: LinearAttentionState, q_t, k_t, v_t):
    r"""One token of causal linear attention:

    .. math:: S \leftarrow S + \phi(k_t) v_t^\top, \quad z \leftarrow z + \phi(k_t),
              \quad o_t = \frac{\phi(q_t)^\top S}{\phi(q_t)^\top z}\ (0 \text{ if the
              denominator is } 0).

    ``q_t (*batch, Hq, D)``, ``k_t (*batch, Hkv, D)``, ``v_t (*batch, Hkv, Dv)``;
    returns ``(o_t (*batch, Hq, Dv), new_state)``; the old state is unchanged. Running
    it over a sequence equals ``linear_attention(q, k, v, causal=True)``.

    >>> import numpy as np
    >>> from refattn.linear import (linear_attention, linear_attention_init_state,
    ...                             linear_attention_step)
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 2, 5, 4))
    >>> st = linear_attention_init_state(heads_q=2, heads_kv=2, d=4, dv=4)
    >>> outs = []
    >>> for t in range(5):
    ...     o, st = linear_attention_step(st, q[:, t], k[:, t], v[:, t])
    ...     outs.append(o)
    >>> bool(np.allclose(np.stack(outs, -2), linear_attention(q, k, v, causal=True)))
    True
    """
    q_t, k_t, v_t = step_tokens(state, LinearAttentionState, "linear_attention_init_state",
                                q_t, k_t, v_t)
    kw = dict(allow_negative=state.allow_negative, check_finite=state.check_finite)
    fq = _features(state.feature_map, q_t[..., None, :], "q_t", **kw)[..., 0, :]
    fk = _features(state.feature_map, k_t[..., None, :], "k_t", **kw)[..., 0, :]
    nf = state.z.shape[-1]
    if fq.shape[-1] != nf or fk.shape[-1] != nf:
        raise ValueError(f"feature_map gave {fq.shape[-1]} query and {fk.shape[-1]} key "
                         f"features; the state holds F={nf}")
    s = state.s + fk[..., :, None] * v_t[..., None, :]
    z = state.z + fk
    return read_state(fq, s, z, state), state.replace(position=state.position + 1, s=s, z=z)


# --------------------------------------------------------------------------- gradient


def _check_differentiable(feature_map):
    """A built-in map, or a callable carrying its derivative as ``feature_map.vjp``."""
    if not isinstance(feature_map, str) and not callable(getattr(feature_map, "vjp", None)):
        raise TypeError(
            f"linear_attention_vjp cannot differentiate the feature_map {feature_map!r}: a "
            f"callable feature map must provide its derivative as an attribute "
            f"feature_map.vjp(x, grad_phi) -> grad_x (x (..., H, L, D), grad_phi "
            f"(..., H, L, F), grad_x of x's shape), or use one of {FEATURE_MAPS}")


def _feature_map_vjp(feature_map, x, grad_phi, batch_shape, name, check_finite):
    """``dx = (∂φ(x)/∂x)ᵀ grad_phi`` for ``x (B, H, L, D)`` with the flat batch ``B`` of
    ``batch_shape`` (a callable map sees the caller's batch dimensions)."""
    if feature_map == "elu":            # φ' = 1 for x > 0, exp(x) otherwise
        return np.where(x > 0, grad_phi, grad_phi * np.exp(np.minimum(x, 0.0)))
    if feature_map == "relu":           # φ' = 1 for x > 0, 0 otherwise
        return np.where(x > 0, grad_phi, 0.0)
    if feature_map == "identity":
        return grad_phi
    xb = x.reshape(tuple(batch_shape) + x.shape[1:])
    label = f"feature_map.vjp({name}, grad_phi)"
    out = to_float64(feature_map.vjp(xb, grad_phi.reshape(xb.shape[:-1] + grad_phi.shape[-1:])),
                     label, check_finite=check_finite)
    if out.shape != xb.shape:
        raise ValueError(f"{label} must return the shape of {name}, {xb.shape}, got "
                         f"{out.shape}")
    return out.reshape(x.shape)


def linear_attention_vjp(q, k, v, grad_out, *, feature_map="elu", causal=False, method=None,
                         chunk_size=64, allow_negative=False, initial_state=None,
                         return_final_state=False, grad_final_state=None, cu_seqlens=None,
                         check_finite=True, memory_budget=None):
    r"""Gradients of :func:`linear_attention` for the cotangent ``grad_out`` of its output.

    With :math:`n_i = \phi(q_i)^\top S_i`, :math:`d_i = \phi(q_i)^\top z_i`,
    :math:`o_i = n_i / d_i` and :math:`g_i` = ``grad_out[i]``:

    .. math::

        \bar n_i = g_i / d_i, \quad \bar d_i = -(g_i \cdot o_i) / d_i, \quad
        \overline{\phi(q_i)} = S_i \bar n_i + z_i \bar d_i,

        \overline{\phi(k_j)} = \sum_{i:\, j \in V_i} \phi(q_i)\,(\bar n_i \cdot v_j
        + \bar d_i), \quad
        \bar v_j = \sum_{i:\, j \in V_i} (\phi(q_i) \cdot \phi(k_j))\, \bar n_i,

    and ``dq = φ'(q) ∘ dφ(q)`` (``elu + 1``: ``φ' = 1`` for ``x > 0``, ``e^x`` otherwise;
    ``relu``: 1 for ``x > 0``, else 0; ``identity``: 1), likewise ``dk``. Rows with a zero
    denominator (output 0) get zero gradient and pass none to the keys. GQA: a KV head's
    ``dk``, ``dv`` sum over its query heads; broadcast batch dims are summed.

    Every ``method`` has its own backward, all equal up to rounding: ``"quadratic"`` (the
    masked ``N x M`` ``dA = (n̄ vᵀ + d̄) ∘ mask``, checked against ``memory_budget``),
    ``"recurrent"`` (a forward Numba scan for ``dφ(q)``, then a reverse scan over the keys
    carrying :math:`R = \sum \phi(q_i)\bar n_i^\top` ``(F, Dv)`` and
    :math:`r = \sum \phi(q_i)\bar d_i`: O(F·Dv) state), ``"chunkwise"`` (chunks forward,
    then in reverse) and, non-causal by default, the two products
    :math:`\bar S = \phi(Q)^\top \bar N`, :math:`\bar z = \phi(Q)^\top \bar d`.

    A callable ``feature_map`` is differentiated only if it provides its derivative as an
    attribute ``feature_map.vjp(x, grad_phi) -> grad_x`` (``x (..., H, L, D)``,
    ``grad_phi (..., H, L, F)``); otherwise ``TypeError``.

    With an initial state :math:`(S_0, z_0)` (in :math:`S_i`, :math:`z_i` above) and the
    final state's cotangent :math:`(\bar S_f, \bar z_f)` (``grad_final_state``, a pair
    whose parts may be None), every key also gets :math:`\overline{\phi(k_j)}
    \mathrel{+}= \bar S_f v_j + \bar z_f`, :math:`\bar v_j \mathrel{+}= \bar S_f^\top
    \phi(k_j)`, and :math:`\bar S_0 = \bar S_f + \sum_i \phi(q_i) \bar n_i^\top`,
    :math:`\bar z_0 = \bar z_f + \sum_i \phi(q_i) \bar d_i` (the reverse scan's
    :math:`R`, :math:`r` started from :math:`\bar S_f`, :math:`\bar z_f` end there).
    With ``cu_seqlens``, each packed sequence separately.

    Arguments are :func:`linear_attention`'s plus ``grad_out (..., Hq, N, Dv)``, the
    output's shape (``ValueError`` naming it otherwise; ``None``: zero; or the pair
    ``(grad_out, grad_final_state)``); ``return_final_state`` is accepted and changes
    nothing. Returns ``{"q", "k", "v"}`` (and ``"initial_state"``, the pair
    ``(dS_0, dz_0)``, when one is given), float64, each of its input's shape. With
    ``check_finite``, a non-finite gradient (a denominator below float64's normal range,
    where ``1/d_i`` overflows) raises a ``ValueError`` naming it.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 4))
    >>> g = np.ones((2, 5, 4))
    >>> grads = ra.vjp("linear_attention", q, k, v, g, causal=True)
    >>> [grads[x].shape for x in "qkv"]
    [(2, 5, 4), (2, 5, 4), (2, 5, 4)]
    >>> bool(np.allclose(grads["v"].sum(-2), 5.0))   # each query's weights sum to 1
    True
    >>> state = (np.ones((2, 4, 4)), np.ones((2, 4)))              # (S_0, z_0)
    >>> grads = ra.vjp("linear_attention", q, k, v, g, causal=True, initial_state=state)
    >>> [x.shape for x in grads["initial_state"]]
    [(2, 4, 4), (2, 4)]
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    feature_map = _check_feature_map(feature_map)
    _check_differentiable(feature_map)
    causal = check_bool("causal", causal)
    allow_negative = check_bool("allow_negative", allow_negative)
    method = check_method(method, causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_bool("return_final_state", return_final_state)
    cu = check_packed(pb, cu_seqlens)
    grad_out, grad_final_state = split_cotangent(grad_out, grad_final_state)
    out_shape = (pb.batch, pb.heads_q, pb.n, pb.dv)
    g = np.zeros(out_shape) if grad_out is None else check_cotangent(
        grad_out, "grad_out", pb.batch_shape + out_shape[1:],
        check_finite=check_finite).reshape(out_shape)
    fq, fk = _feature_pair(feature_map, q, k, pb, allow_negative=allow_negative,
                           check_finite=check_finite)
    nf = fk.shape[-1]
    s0, z0 = state_pair(initial_state, "initial_state", pb, cu, nf, check_finite)
    dsf, dzf = state_pair(grad_final_state, "grad_final_state", pb, cu, nf, check_finite)

    def run(p, tokens, states):
        return feature_attention_vjp(*tokens, p, causal=causal, method=method,
                                     chunk_size=chunk_size, memory_budget=memory_budget,
                                     what="linear_attention", s0=states[0], z0=states[1],
                                     dsf=states[2], dzf=states[3], return_state=True)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        dfq, dfk, dv, ds0, dz0 = over_sequences(cu, pb, run, [fq, fk, v, g],
                                                [s0, z0, dsf, dzf], (2, 2, 2, 0, 0))
        dq = _feature_map_vjp(feature_map, q, dfq, pb.batch_shape, "q", check_finite)
        dk = _feature_map_vjp(feature_map, k, dfk, pb.batch_shape, "k", check_finite)
    grads = input_gradients(pb, shapes, q=dq, k=dk, v=dv)
    if initial_state is not None:
        grads.update({"initial_state S": ds0, "initial_state z": dz0})
    if check_finite:
        check_gradients_finite(grads, "linear_attention")
    if initial_state is not None:
        grads["initial_state"] = state_out(grads.pop("initial_state S"),
                                           grads.pop("initial_state z"), pb, cu)
    return grads


def linear_attention_step_vjp(state, q_t, k_t, v_t, grad_out, *, grad_state=None):
    r"""Gradients of one :func:`linear_attention_step` (the streaming state's gradient, for
    training through a recurrent state or checking a decoding kernel's backward).

    With :math:`S' = S + \phi(k)v^\top`, :math:`z' = z + \phi(k)`,
    :math:`o = \phi(q)^\top S' / \phi(q)^\top z'`, the cotangent :math:`g` of ``o``
    (``grad_out (*batch, Hq, Dv)``) and :math:`\bar S', \bar z'` of the new state
    (``grad_state``: ``{"s", "z"}`` of the state's shapes, or None):
    :math:`\bar n = g/d`, :math:`\bar d = -(g\cdot o)/d`,
    :math:`\overline{\phi(q)} = S'\bar n + z'\bar d`,
    :math:`\bar S = \bar S' + \sum_{heads} \phi(q)\bar n^\top`,
    :math:`\bar z = \bar z' + \sum_{heads} \phi(q)\bar d`,
    :math:`\overline{\phi(k)} = \bar S v + \bar z`, :math:`\bar v = \bar S^\top\phi(k)`;
    then through ``φ`` as :func:`linear_attention_vjp`. Returns ``{"state": {"s", "z"},
    "q_t", "k_t", "v_t"}``, float64 in their shapes.

    >>> import numpy as np, refattn as ra
    >>> st = ra.linear.linear_attention_init_state(heads_q=2, heads_kv=1, d=3, dv=2)
    >>> q, k, v = np.ones((2, 3)), np.ones((1, 3)), np.ones((1, 2))
    >>> g = ra.vjp(ra.linear.linear_attention_step, st, q, k, v, np.ones((2, 2)))
    >>> g["state"]["s"].shape, g["v_t"].tolist()      # o = v: dv = the summed cotangent
    ((1, 3, 2), [[2.0, 2.0]])
    """
    q_t, k_t, v_t = step_tokens(state, LinearAttentionState, "linear_attention_init_state",
                                q_t, k_t, v_t)
    _check_differentiable(state.feature_map)
    bs, hq, hkv = state.batch_shape, state.heads_q, state.heads_kv
    g = check_cotangent(grad_out, "grad_out", bs + (hq, state.dv),
                        check_finite=state.check_finite)
    dnext = {"s": np.zeros(state.s.shape), "z": np.zeros(state.z.shape)}
    for name in ("s", "z"):
        if grad_state is not None and grad_state.get(name) is not None:
            dnext[name] = check_cotangent(grad_state[name], f"grad_state['{name}']",
                                          getattr(state, name).shape)
    kw = dict(allow_negative=state.allow_negative, check_finite=state.check_finite)
    fq = _features(state.feature_map, q_t[..., None, :], "q_t", **kw)[..., 0, :]
    fk = _features(state.feature_map, k_t[..., None, :], "k_t", **kw)[..., 0, :]
    s, z = state.s + fk[..., :, None] * v_t[..., None, :], state.z + fk
    fqg = fq.reshape(bs + (hkv, hq // hkv, fq.shape[-1]))
    n_bar, d_bar = output_cotangents(g.reshape(fqg.shape[:-1] + (state.dv,)),
                                     np.einsum("...hgf,...hfe->...hge", fqg, s),
                                     np.einsum("...hgf,...hf->...hg", fqg, z))
    dfq = np.einsum("...hfe,...hge->...hgf", s, n_bar) + z[..., None, :] * d_bar[..., None]
    ds = dnext["s"] + np.einsum("...hgf,...hge->...hfe", fqg, n_bar)
    dz = dnext["z"] + np.einsum("...hgf,...hg->...hf", fqg, d_bar)
    dfk = np.einsum("...hfe,...he->...hf", ds, v_t) + dz
    dv = np.einsum("...hfe,...hf->...he", ds, fk)
    flat = (-1,) if bs else (1,)
    dq, dk = (_feature_map_vjp(state.feature_map, x.reshape(flat + x.shape[-2:])[..., None, :],
                               d.reshape(flat + d.shape[-2:])[..., None, :], bs, name,
                               state.check_finite)[..., 0, :].reshape(x.shape)
              for x, d, name in ((q_t, dfq.reshape(q_t.shape[:-1] + (-1,)), "q_t"),
                                 (k_t, dfk, "k_t")))
    return {"state": {"s": ds, "z": dz}, "q_t": dq, "k_t": dk, "v_t": dv}


linear_attention_step.vjp = linear_attention_step_vjp


attach(linear_attention, implied=linear_attention_matrix,
       init_state=linear_attention_init_state, step=linear_attention_step,
       vjp=linear_attention_vjp)
