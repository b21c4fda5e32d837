r"""Landmark attention: the queries attend to a subset of the keys, given positions
or the keys of largest Euclidean norm per KV head (causal: the largest among the keys
each query can see). The family's conventions (shapes, causality, the implied matrix,
memory) are those of :mod:`refattn.compression`.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int, check_memory
from .._core.problem import prepare_qkv
from ..registry import attach, register
from ._common import (Plan, attend, attend_vjp, positions, seen, selected,
                      selection_plans)

__all__ = ["landmark_attention", "landmark_attention_matrix", "landmark_attention_vjp",
           "landmark_indices"]


def _norm_order(kb: np.ndarray) -> np.ndarray:
    """Key indices by decreasing Euclidean norm, ties to the lower index."""
    return np.argsort(-np.sqrt(np.einsum("md,md->m", kb, kb)), kind="stable")


def _norm_count(pb, num_landmarks, select, context: str) -> int:
    """How many keys the norm selection keeps: ``min(num_landmarks, M)``, after checking
    ``num_landmarks`` (``context`` in its message) and ``select``."""
    num = check_int("num_landmarks", num_landmarks, minimum=1, context=context)
    if select != "norm":
        raise ValueError(f"select must be 'norm' (the keys of largest norm), got "
                         f"{select!r}")
    return min(num, pb.m)


def _landmark_plans(k, v, pb, *, indices, num_landmarks, select, causal, budget):
    causal = check_bool("causal", causal)
    if (indices is None) == (num_landmarks is None):
        raise TypeError("landmark_attention needs exactly one of indices= (key positions) "
                        "and num_landmarks= (how many keys to select)")
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.size == 0):
            raise ValueError(f"indices must be a 1-D array of integer key positions, got "
                             f"shape {idx.shape} and dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= pb.m):
            raise ValueError(f"indices must lie in [0, M) with M={pb.m} ({seen(pb)}); got "
                             f"min {idx.min()}, max {idx.max()}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"indices must be distinct, got {idx.tolist()}")
        return selection_plans(k, v, pb, idx, causal)

    num = _norm_count(pb, num_landmarks, select, f" (keys selected; {seen(pb)})")
    if not causal:
        def plans(b, hk):
            return selected(k, v, b, hk, np.sort(_norm_order(k[b, hk])[:num]), None, pb.m)
        return plans

    check_memory(pb.m * pb.m * 9.0 + pb.n * pb.m, budget,
                 "causal landmark selection (an M x M prefix-rank table)",
                 "landmark_attention with explicit indices=")
    pos = positions(pb)

    def plans(b, hk):
        rank = np.empty(pb.m, np.int64)
        rank[_norm_order(k[b, hk])] = np.arange(pb.m)
        # better[p, j]: keys j' <= p that rank above key j.
        better = np.cumsum(rank[:, None] < rank[None, :], axis=0)

        def keep(rows):              # the num best-ranked keys among those j <= i'
            p = pos[rows]
            if pb.m == 0:
                return np.zeros((len(rows), 0), bool)
            return (p[:, None] >= 0) & (np.arange(pb.m)[None, :] <= p[:, None]) \
                & (better[np.clip(p, 0, None)] < num)
        return Plan(k[b, hk], None if v is None else v[b, hk], None, keep,
                    lambda: np.eye(pb.m), pull=lambda dkc, dvc: (dkc, dvc))
    return plans


def landmark_indices(k, *, num_landmarks, select="norm", check_finite=True):
    """The keys :func:`landmark_attention` selects without causality: int64
    ``(..., Hkv, L)``, ``L = min(num_landmarks, M)``, the positions of the keys of largest
    Euclidean norm per KV head (ties to the lower position), in increasing order.

    >>> import numpy as np, refattn as ra
    >>> k = np.array([[[0.1, 0.0], [3.0, 0.0], [0.0, -2.0], [1.0, 1.0]]])
    >>> ra.compression.landmark_indices(k, num_landmarks=2)
    array([[1, 2]])
    """
    _, k, _, pb = prepare_qkv(k, k, None, check_finite=check_finite, need_v=False)
    num = _norm_count(pb, num_landmarks, select, f" ({seen(pb)})")
    out = np.empty((pb.batch, pb.heads_kv, num), np.int64)
    for b, hk, _ in pb.kv_groups():
        out[b, hk] = np.sort(_norm_order(k[b, hk])[:num])
    return pb.unflatten(out)


@register(family="compression", exact=False, time="O(N·L·(D+Dv) + M·D)",
          state="O(L·(D+Dv)) landmark keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=True, row_stochastic=True,
          example={"num_landmarks": 2},
          budget=lambda n, b: {"num_landmarks": b})
def landmark_attention(q, k, v, *, indices=None, num_landmarks=None, select="norm",
                       causal=False, scale=None, check_finite=True, memory_budget=None):
    r"""Attention over a subset of the keys (landmarks): given positions, or the
    ``num_landmarks`` keys of largest norm.

    .. math:: o_i = \sum_{j \in L_i} \operatorname{softmax}_{L_i}(s\, q_i\cdot k_j)\, v_j

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    indices : 1-D distinct key positions in ``[0, M)``, shared by all batch elements and
        heads. ``L_i`` = those positions (causal: those ``<= i'``). All positions:
        exact attention.
    num_landmarks : int >= 1, instead of ``indices``: per KV head the keys of largest
        Euclidean norm (``select="norm"``, the only rule; ties to the lower position;
        see :func:`landmark_indices`). ``num_landmarks >= M`` keeps every key (exact).
        Without exact norm ties the result does not depend on the order of the keys.
        **Causal**: query ``i`` (position ``i' = i + M - N``) uses the
        ``num_landmarks`` largest-norm keys among the keys ``j <= i'`` it can see, so the
        selection never looks at the future (when ``i' >= M - 1`` this is the non-causal
        selection). This needs an ``M x M`` table.
    select : ``"norm"``.
    causal : bottom-right aligned, as :func:`refattn.attention`.
    scale, check_finite, memory_budget : as :func:`refattn.attention`.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``; rows that see no landmark are 0.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 4))
    >>> ra.landmark_attention(q, k, v, num_landmarks=3, causal=True).shape
    (2, 6, 4)
    >>> out = ra.landmark_attention(q, k, v, indices=[0, 4])
    >>> bool(np.allclose(out, ra.attention(q, k[..., [0, 4], :], v[..., [0, 4], :])))
    True
    """
    return attend(_landmark_plans, q, k, v, implied=False, name="landmark_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  indices=indices, num_landmarks=num_landmarks, select=select,
                  causal=causal, budget=memory_budget)


def landmark_attention_matrix(q, k, *, indices=None, num_landmarks=None, select="norm",
                              causal=False, scale=None, check_finite=True,
                              memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`landmark_attention` (same
    arguments): the softmax over each query's landmarks, 0 elsewhere. Row-stochastic.

    >>> import numpy as np, refattn as ra
    >>> k = np.array([[[0.1, 0.0], [3.0, 0.0], [0.0, -2.0]]])
    >>> ra.compression.landmark_attention_matrix(np.zeros((1, 1, 2)), k, num_landmarks=2)
    array([[[0. , 0.5, 0.5]]])
    """
    return attend(_landmark_plans, q, k, None, implied=True, name="landmark_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  indices=indices, num_landmarks=num_landmarks, select=select,
                  causal=causal, budget=memory_budget)


def landmark_attention_vjp(q, k, v, grad_out, *, indices=None, num_landmarks=None,
                           select="norm", causal=False, scale=None, check_finite=True,
                           memory_budget=None):
    r"""Gradients of :func:`landmark_attention`: ``{"q", "k", "v"}`` in the inputs'
    shapes.

    The softmax backward over each query's landmarks ``L_i`` (with ``P`` the
    probabilities, ``O = P V_L``, ``dO`` the cotangent ``grad_out``,
    ``(..., Hq, N, Dv)``):

    .. math:: dS = P \circ (dO\, V_L^\top - D), \quad D_i = \textstyle\sum_d
              dO_{id} O_{id}, \quad dQ = s\, dS\, K_L, \quad dK_L = s\, dS^\top Q,
              \quad dV_L = P^\top dO,

    the other keys and values getting 0. **The selection is held fixed**: the landmarks
    chosen by key norm (``num_landmarks``; causal: per query among the keys it sees) are
    a discrete choice, differentiated as implementations train them (the norm ranking
    has zero derivative almost everywhere). GQA: a KV head sums over its query heads.

    >>> import numpy as np
    >>> from refattn.compression.landmark import landmark_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = landmark_attention_vjp(q, k, v, np.ones((1, 6, 4)), indices=[0, 4])
    >>> np.flatnonzero(g["v"][0].any(-1))                  # only the landmarks' values
    array([0, 4])
    """
    return attend_vjp(_landmark_plans, q, k, v, grad_out, scale=scale,
                      check_finite=check_finite, indices=indices,
                      num_landmarks=num_landmarks, select=select, causal=causal,
                      budget=memory_budget)


attach(landmark_attention, implied=landmark_attention_matrix, vjp=landmark_attention_vjp)
