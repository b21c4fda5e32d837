r"""Strided KV attention: every ``stride``-th key and value is kept (strided
downsampling of the key/value sequence) and the queries attend to those; equal to
:func:`refattn.attention` with the other keys masked out. The family's conventions
(shapes, causality, the implied matrix, memory) are those of :mod:`refattn.compression`.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int
from ..registry import attach, register
from ._common import attend, attend_vjp, seen, selection_plans

__all__ = ["strided_kv_attention", "strided_kv_attention_matrix",
           "strided_kv_attention_vjp"]


def _strided_plans(k, v, pb, *, stride, offset, causal):
    stride = check_int("stride", stride, minimum=1, context=f" ({seen(pb)})")
    offset = check_int("offset", offset, minimum=0, context=f" (with stride={stride})")
    if offset >= stride:
        raise ValueError(f"offset must satisfy 0 <= offset < stride={stride}, got {offset}")
    causal = check_bool("causal", causal)
    return selection_plans(k, v, pb, np.arange(offset, pb.m, stride), causal)


@register(family="compression", exact=False, time="O(N·(M/stride)·(D+Dv))",
          state="O(M/stride·(D+Dv)) kept keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False, row_stochastic=True,
          example={"stride": 2},
          budget=lambda n, b: {"stride": max(1, n // b)})
def strided_kv_attention(q, k, v, *, stride, offset=0, causal=False, scale=None,
                         check_finite=True, memory_budget=None):
    r"""Attention over every ``stride``-th key and value (strided downsampling of the
    key/value sequence).

    .. math:: o_i = \sum_{j \in J} \operatorname{softmax}_{J}(s\, q_i \cdot k_j)\, v_j,
              \qquad J = \{\text{offset}, \text{offset} + \text{stride}, \dots\} \cap [0, M)

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    stride : int >= 1; ``stride=1`` is exact attention.
    offset : int, ``0 <= offset < stride``, the first kept key. ``offset >= M`` keeps no
        key (every output row 0).
    causal : key ``j`` is visible to query ``i`` iff ``j <= i + M - N``.
    scale, check_finite, memory_budget : as :func:`refattn.attention`.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``; rows that see no kept key are 0. Equal to
    :func:`refattn.attention` with the keys outside ``J`` masked out.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4))
    >>> out = ra.strided_kv_attention(q, k, v, stride=2, offset=1)      # keys 1, 3, 5
    >>> bool(np.allclose(out, ra.attention(q, k[..., 1::2, :], v[..., 1::2, :])))
    True
    """
    return attend(_strided_plans, q, k, v, implied=False, name="strided_kv_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  stride=stride, offset=offset, causal=causal)


def strided_kv_attention_matrix(q, k, *, stride, offset=0, causal=False, scale=None,
                                check_finite=True, memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`strided_kv_attention` (same
    arguments): the softmax over the kept keys, 0 in the other columns. Row-stochastic.

    >>> import numpy as np, refattn as ra
    >>> ra.compression.strided_kv_attention_matrix(np.zeros((1, 1, 2)), np.zeros((1, 5,
    ...                                            2)), stride=2)
    array([[[0.33333333, 0.        , 0.33333333, 0.        , 0.33333333]]])
    """
    return attend(_strided_plans, q, k, None, implied=True, name="strided_kv_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  stride=stride, offset=offset, causal=causal)


def strided_kv_attention_vjp(q, k, v, grad_out, *, stride, offset=0, causal=False,
                             scale=None, check_finite=True, memory_budget=None):
    r"""Gradients of :func:`strided_kv_attention`: ``{"q", "k", "v"}`` in the inputs'
    shapes.

    The softmax backward over the kept keys ``J`` (FlashAttention-2's, Dao 2023, without
    tiling), with ``P`` the probabilities, ``O = P V_J`` and ``dO`` the cotangent
    (``grad_out``, ``(..., Hq, N, Dv)``):

    .. math:: D_i = \textstyle\sum_d dO_{id} O_{id}, \quad
              dS = P \circ (dO\, V_J^\top - D), \quad dQ = s\, dS\, K_J, \quad
              dK_J = s\, dS^\top Q, \quad dV_J = P^\top dO;

    the keys and values outside ``J`` get 0. Equal to the gradients of
    :func:`refattn.attention` with those keys masked out. GQA: a KV head sums over its
    query heads.

    >>> import numpy as np
    >>> from refattn.compression.strided_kv import strided_kv_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = strided_kv_attention_vjp(q, k, v, np.ones((1, 6, 4)), stride=2, offset=1)
    >>> bool(g["k"][:, 0::2].any()), bool(g["v"][:, 1::2].any())   # keys 0, 2, 4 unused
    (False, True)
    """
    return attend_vjp(_strided_plans, q, k, v, grad_out, scale=scale,
                      check_finite=check_finite, stride=stride, offset=offset,
                      causal=causal)


attach(strided_kv_attention, implied=strided_kv_attention_matrix,
       vjp=strided_kv_attention_vjp)
