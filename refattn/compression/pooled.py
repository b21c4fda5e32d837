r"""Pooled attention: the keys and values are mean- or max-pooled in windows of
``stride`` consecutive positions, then the queries attend to the pooled rows (the
memory-compressed attention of Liu et al. 2018 compresses with a learned strided
convolution; the pooling attention of MViT, Fan et al. 2021, pools keys and values).
Causal, a window is seen only once complete; optional raw ``local`` keys of the query's
own open window. The family's conventions (shapes, causality, the implied matrix,
memory) are those of :mod:`refattn.compression`.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int
from ..registry import attach, register
from ._common import Plan, attend, attend_vjp, positions, seen

__all__ = ["pooled_attention", "pooled_attention_matrix", "pooled_attention_vjp"]


def _pooled_plans(k, v, pb, *, stride, pool, causal, local, log_count):
    stride = check_int("stride", stride, minimum=1,
                       context=f" (keys per window; {seen(pb)})")
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
    causal = check_bool("causal", causal)
    local = check_bool("local", local)
    log_count = check_bool("log_count", log_count)
    starts = np.arange(0, pb.m, stride)
    sizes = np.minimum(starts + stride, pb.m) - starts
    last = starts + sizes - 1

    def cmap():
        w = np.zeros((len(starts), pb.m))
        for c, (a, n) in enumerate(zip(starts, sizes)):
            w[c, a:a + n] = 1.0 / n
        return w
    bias = np.log(sizes.astype(np.float64)) if log_count else None
    pos = positions(pb)

    def whole_windows(rows):        # whole window visible: its last key <= i'
        return last[None, :] <= pos[rows, None]

    def open_window_keys(rows):     # keys j <= i' of the query's own, open window
        p = pos[rows]
        own = np.clip(p, 0, None) // stride
        open_window = (p >= 0) & (last[own] > p)
        cols = starts[own][:, None] + np.arange(width)
        lkeep = open_window[:, None] & (cols <= p[:, None])
        return np.minimum(cols, pb.m - 1), lkeep

    width = min(stride, pb.m) if causal and local and pb.m else 0   # T, raw keys per query
    keep_fn = whole_windows if causal else None
    local_fn = open_window_keys if width else None

    reduce = np.add.reduceat if pool == "mean" else np.maximum.reduceat

    def pooled(x):
        if pb.m == 0:
            return x[:0]
        r = reduce(x, starts, axis=0)
        return r / sizes[:, None] if pool == "mean" else r

    def spread(dx):                 # mean: each key of window c gets dx_c / |W_c|
        return np.repeat(dx / sizes[:, None], sizes, axis=0)

    def to_argmax(x, dx):           # max: the arg-max of each channel, ties to the first
        out = np.zeros(x.shape)
        if pb.m:
            padded = np.full((len(starts) * stride, x.shape[1]), -np.inf)
            padded[:pb.m] = x
            arg = padded.reshape(len(starts), stride, -1).argmax(axis=1)
            out[starts[:, None] + arg, np.arange(x.shape[1])[None, :]] = dx
        return out

    def plans(b, hk):
        kb, vb = k[b, hk], None if v is None else v[b, hk]
        if pool == "mean":
            def pull(dkc, dvc):
                return spread(dkc), spread(dvc)
        else:
            def pull(dkc, dvc):
                return to_argmax(kb, dkc), to_argmax(vb, dvc)
        return Plan(pooled(kb), None if vb is None else pooled(vb), bias,
                    keep_fn, cmap if pool == "mean" else None, local_fn, width, pull)
    return plans


@register(family="compression", exact=False, time="O(N·(M/stride + stride)·(D+Dv))",
          state="O(M/stride·(D+Dv)) pooled keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False, row_stochastic=True,
          example={"stride": 2, "local": True},
          budget=lambda n, b: {"stride": max(1, 2 * n // b), "local": True})
def pooled_attention(q, k, v, *, stride, pool="mean", causal=False, local=False,
                     log_count=False, scale=None, check_finite=True, memory_budget=None):
    r"""Attention over keys and values pooled in windows of ``stride`` positions.

    .. math:: \hat k_c = \operatorname{pool}_{j \in W_c} k_j,\quad
              \hat v_c = \operatorname{pool}_{j \in W_c} v_j,\quad
              o_i = \sum_c \operatorname{softmax}_c\big(s\, q_i\cdot\hat k_c
              + [\log |W_c|]\big)\, \hat v_c

    with windows :math:`W_c = \{c\,\mathrm{stride}, \dots,
    \min((c+1)\,\mathrm{stride}, M) - 1\}` starting at key 0; the **last window is
    ragged** (it holds the ``M mod stride`` remaining keys, pooled over those only).
    (Memory-compressed attention, Liu et al. 2018, uses a learned strided convolution
    in place of the fixed pooling; MViT's pooling attention, Fan et al. 2021, pools
    keys and values.)

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    stride : int >= 1, keys per window (``stride >= M``: one window of all keys).
        ``stride=1`` is exact attention (causal or not).
    pool : ``"mean"`` (average of the window) or ``"max"`` (channel-wise maximum of the
        keys and of the values; not linear in ``v``, so no implied matrix).
    causal : a query at ``i' = i + M - N`` sees window ``c`` only if the whole window is
        visible, ``min((c+1) stride, M) - 1 <= i'``: no pooled key contains a future key.
    local : with ``causal``, also attend, uncompressed, to the keys ``j <= i'`` of the
        query's own window when that window is not complete yet (so every query with
        ``i' >= 0`` sees at least itself). Without ``causal`` every window is complete
        and ``local`` changes nothing.
    log_count : add ``log |W_c|`` to the logit of window ``c`` (each pooled row stands
        for ``|W_c|`` keys; local raw keys count 1). Default off, as in those methods; with
        it, keys and values that repeat inside each window give exact attention even
        with a ragged last window or ``local`` keys.
    scale : float, default ``1/sqrt(D)``.
    check_finite, memory_budget : as :func:`refattn.attention`.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``; rows that see nothing (``i' < 0``, or no complete
    window without ``local``) are 0.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 7, 4))
    >>> ra.pooled_attention(q, k, v, stride=3, causal=True, local=True).shape
    (2, 7, 4)
    >>> bool(np.allclose(ra.pooled_attention(q, k, v, stride=1, causal=True),
    ...                  ra.attention(q, k, v, causal=True)))
    True
    """
    return attend(_pooled_plans, q, k, v, implied=False, name="pooled_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  stride=stride, pool=pool, causal=causal, local=local, log_count=log_count)


def pooled_attention_matrix(q, k, *, stride, pool="mean", causal=False, local=False,
                            log_count=False, scale=None, check_finite=True,
                            memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`pooled_attention` (mean pooling;
    same arguments): the window probabilities spread evenly over each window's keys,
    plus the local keys' probabilities. Row-stochastic (rows that see nothing are 0).
    ``pool="max"`` raises ``ValueError``: max pooling is not linear in ``v``.

    >>> import numpy as np, refattn as ra
    >>> q = k = np.zeros((1, 5, 2))                          # all logits equal
    >>> # windows {0,1} {2,3} {4}
    >>> ra.compression.pooled_attention_matrix(q, k, stride=2)[0, 0]
    array([0.16666667, 0.16666667, 0.16666667, 0.16666667, 0.33333333])
    """
    return attend(_pooled_plans, q, k, None, implied=True, name="pooled_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  stride=stride, pool=pool, causal=causal, local=local, log_count=log_count)


def pooled_attention_vjp(q, k, v, grad_out, *, stride, pool="mean", causal=False,
                         local=False, log_count=False, scale=None, check_finite=True,
                         memory_budget=None):
    r"""Gradients of :func:`pooled_attention`: ``{"q", "k", "v"}`` in the inputs' shapes.

    With ``P`` the probabilities over the pooled rows ``(k̂, v̂)`` (and the local raw
    keys), ``O = P [V̂; V_loc]`` and the cotangent ``dO`` (``grad_out``,
    ``(..., Hq, N, Dv)``), the softmax backward (FlashAttention-2's, Dao 2023, without
    tiling) gives

    .. math:: D_i = \textstyle\sum_d dO_{id} O_{id}, \quad
              dS = P \circ (dO\, [\hat V; V_{loc}]^\top - D), \quad
              dQ = s\, dS\, [\hat K; K_{loc}], \\
              d\hat K = s\, dS_c^\top Q, \quad d\hat V = P_c^\top dO, \quad
              dK_{loc} = s\, dS_l^\top Q, \quad dV_{loc} = P_l^\top dO,

    and the pooling is then transposed:

    * ``"mean"``: :math:`dk_j \mathrel{+}= d\hat k_{c(j)} / |W_{c(j)}|` (the same for
      ``v``), ``c(j)`` the window of key ``j``;
    * ``"max"``: :math:`dk_{j,f} \mathrel{+}= d\hat k_{c,f}` for the key ``j`` of window
      ``c`` holding the maximum of channel ``f`` (the first on ties; PyTorch's
      ``max_pool1d`` backward), likewise for ``v`` with its own arg-max.

    The window layout, visibility and ``log |W_c|`` bias are constants. GQA: a KV head
    sums over its query heads; a broadcast input gets its gradient summed. Working
    memory: blocks of query rows, as the forward.

    >>> import numpy as np, refattn as ra
    >>> from refattn.compression.pooled import pooled_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 4))
    >>> g = pooled_attention_vjp(q, k, v, np.ones((2, 6, 4)), stride=2)
    >>> g["k"].shape, bool(np.allclose(g["v"].sum(-2), 6.0))   # rows of P sum to 1
    ((2, 6, 4), True)
    """
    return attend_vjp(_pooled_plans, q, k, v, grad_out, scale=scale,
                      check_finite=check_finite, stride=stride, pool=pool, causal=causal,
                      local=local, log_count=log_count)


attach(pooled_attention, implied=pooled_attention_matrix, vjp=pooled_attention_vjp)
