r"""Compressed attention: the keys and values are compressed to ``C < M`` rows first, then
the queries attend to the compressed rows with exact softmax attention.

Every mechanism here computes, for query ``i``,

.. math::

    o_i = \sum_{c \in V_i} \frac{e^{s\, q_i \cdot \hat k_c + b_c}}
                                {\sum_{c' \in V_i} e^{s\, q_i \cdot \hat k_{c'} + b_{c'}}}
          \, \hat v_c, \qquad \hat v_c = \sum_j W_{cj} v_j ,

where ``(k̂_c, v̂_c)`` are the compressed keys and values, ``W`` (``C x M``) the
compression map of the values, ``b_c`` an optional log-count bias and ``V_i`` the
compressed rows query ``i`` may see (all of them unless causal). Where ``W`` is linear
the *implied matrix* is ``A = softmax(...) W`` (``N x M``), with ``out == A @ v``; it is
row-stochastic whenever ``W``'s rows are averages (mean pooling, selection, cluster
means).

* :func:`pooled_attention`: mean or max pooling of windows of ``stride`` consecutive
  keys/values (the memory-compressed attention of Liu et al. 2018 compresses with a
  learned strided convolution; the pooling attention of MViT, Fan et al. 2021, pools
  keys and values).
* :func:`strided_kv_attention`: every ``stride``-th key/value is kept.
* :func:`landmark_attention`: given key positions, or the keys of largest norm.
* :func:`kmeans_kv_attention`: keys clustered by k-means; a cluster's key is the mean of
  its keys, its value the mean of its values, and its logit gains ``log |cluster|``
  (each key replaced by its centroid: exact when keys are duplicated).

**Causality** (bottom-right aligned, query ``i`` at position ``i' = i + M - N``): a
compressed row may be seen only when *every* key it summarises is visible, i.e. when the
last position it covers is ``<= i'``; so changing a future key or value never changes an
earlier output. Queries with ``i' < 0``, or seeing no compressed row, give output 0.

Shapes: ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``, GQA with
query head ``h`` using KV head ``h // (Hq // Hkv)``; the compression is done per KV head
and shared by its query heads. Logits are ``scale * q · k̂`` (default ``1/sqrt(D)``); no
mask, bias or softcap. float64 throughout.

**Memory.** Queries are processed in blocks of about ``BLOCK_ELEMENTS`` logits, so the
working memory is O(block · (C + T)) for ``C`` compressed rows and ``T`` raw local keys
per query, never O(N · M) (except the implied matrices, which are ``N x M``, and causal
norm-selected landmarks, which need an ``M x M`` rank table).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int, check_memory, resolve_rng, resolve_scale
from .._core.kmeans import kmeans
from .._core.problem import prepare_qkv
from .._core.softmax import normalize_rows
from ..registry import attach, register

__all__ = ["pooled_attention", "pooled_attention_matrix", "strided_kv_attention",
           "strided_kv_attention_matrix", "landmark_attention", "landmark_attention_matrix",
           "landmark_indices", "kmeans_kv_attention", "kmeans_kv_attention_matrix"]


# ---------------------------------------------------------------------- the engine
class _Plan:
    """The compressed keys of one (batch element, KV head).

    ``kc (C, D)``, ``vc (C, Dv)`` or None, ``bias (C,)`` or None;
    ``keep(rows) -> (r, C)`` bool, the compressed rows each query of ``rows`` may see
    (None: all); ``cmap()`` the ``(C, M)`` value compression map, built only for the
    implied matrix (None: not linear in ``v``); ``local(rows) -> (cols (r, T),
    keep (r, T))``: raw keys attended uncompressed by each query (None: none).
    """

    __slots__ = ("kc", "vc", "bias", "keep", "cmap", "local", "width")

    def __init__(self, kc, vc, bias=None, keep=None, cmap=None, local=None, width=0):
        self.kc, self.vc, self.bias, self.keep, self.cmap = kc, vc, bias, keep, cmap
        self.local, self.width = local, width          # width: T, raw keys per query


def _positions(pb) -> np.ndarray:
    """Bottom-right-aligned query positions ``i' = i + M - N``."""
    return np.arange(pb.n) + (pb.m - pb.n)


#: Query rows are processed in blocks of about this many logits (and gathered elements).
BLOCK_ELEMENTS = 2**20


def _run(q, k, v, pb, scale, plans, *, implied: bool, memory_budget, name):
    """Attend every query head to its KV head's plan, one block of query rows at a
    time. Returns ``out (B, Hq, N, Dv)`` or, with ``implied``, the ``(B, Hq, N, M)``
    implied matrix."""
    if implied:
        check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 8.0 * 2, memory_budget,
                     f"the implied matrix of {name}",
                     f"refattn.compression.{name} (it never forms the matrix)")
        result = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    else:
        result = np.full((pb.batch, pb.heads_q, pb.n, pb.dv), np.nan)
    qs = q * scale
    for b in range(pb.batch):
        for hk in range(pb.heads_kv):
            plan = plans(b, hk)
            if implied and plan.cmap is None:
                raise ValueError(f"{name}: this compression is not linear in v, so there "
                                 f"is no implied matrix (use pool='mean')")
            cmap = plan.cmap() if implied else None
            hs = slice(hk * pb.group, (hk + 1) * pb.group)
            c, t = plan.kc.shape[0], plan.width
            per_row = pb.group * (c + t) + t * (pb.d + pb.dv + 2)
            step = max(1, BLOCK_ELEMENTS // max(per_row, 1))
            for r0 in range(0, pb.n, step):
                rows = np.arange(r0, min(r0 + step, pb.n))
                qb = qs[b, hs, r0:rows[-1] + 1] if len(rows) else qs[b, hs, :0]
                s = qb @ plan.kc.T                                  # (G, r, C)
                if plan.bias is not None:
                    s += plan.bias
                keep = None if plan.keep is None else plan.keep(rows)
                if keep is not None:
                    s[:, ~keep] = -np.inf
                if plan.local is not None:
                    cols, lkeep = plan.local(rows)                  # (r, T)
                    sl = np.einsum("grd,rtd->grt", qb, k[b, hk][cols])
                    sl[:, ~lkeep] = -np.inf
                    s = np.concatenate([s, sl], axis=-1)
                normalize_rows(s)                                  # probabilities
                pc, pl = s[..., :c], s[..., c:]
                if implied:
                    a = pc @ cmap
                    if plan.local is not None:
                        g = np.arange(pb.group)[:, None, None]
                        np.add.at(a, (g, np.arange(len(rows))[None, :, None], cols[None]), pl)
                    result[b, hs, r0:r0 + len(rows)] = a
                else:
                    o = pc @ plan.vc
                    if plan.local is not None:
                        o += np.einsum("grt,rtd->grd", pl, v[b, hk][cols])
                    result[b, hs, r0:r0 + len(rows)] = o
    return result


def _prepare(q, k, v, scale, check_finite):
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    return q, k, v, pb, resolve_scale(scale, pb.d)


def _check_causal(causal):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    return bool(causal)


def _seen(pb) -> str:
    return f"k {pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"


def _selection_map(idx: np.ndarray, m: int) -> np.ndarray:
    """``(len(idx), M)`` one-hot rows: the compression map of a key selection."""
    w = np.zeros((len(idx), m))
    w[np.arange(len(idx)), idx] = 1.0
    return w


# -------------------------------------------------------------------------- pooling
def _pooled_plans(k, v, pb, *, stride, pool, causal, local, log_count):
    stride = check_int("stride", stride, minimum=1, context=f" (keys per window; {_seen(pb)})")
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
    causal = _check_causal(causal)
    for name, flag in (("local", local), ("log_count", log_count)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    starts = np.arange(0, pb.m, stride)
    sizes = np.minimum(starts + stride, pb.m) - starts
    last = starts + sizes - 1

    def cmap():
        w = np.zeros((len(starts), pb.m))
        for c, (a, n) in enumerate(zip(starts, sizes)):
            w[c, a:a + n] = 1.0 / n
        return w
    bias = np.log(sizes.astype(np.float64)) if log_count else None
    pos = _positions(pb)
    keep_fn = local_fn = None
    width = 0
    if causal:
        def keep_fn(rows):          # whole window visible: its last key <= i'
            return last[None, :] <= pos[rows, None]
        if local and pb.m:
            width = min(stride, pb.m)

            def local_fn(rows):      # keys j <= i' of the query's own, open window
                p = pos[rows]
                own = np.clip(p, 0, None) // stride
                open_window = (p >= 0) & (last[own] > p)
                cols = starts[own][:, None] + np.arange(width)
                lkeep = open_window[:, None] & (cols <= p[:, None])
                return np.minimum(cols, pb.m - 1), lkeep

    reduce = np.add.reduceat if pool == "mean" else np.maximum.reduceat

    def pooled(x):
        if pb.m == 0:
            return x[:0]
        r = reduce(x, starts, axis=0)
        return r / sizes[:, None] if pool == "mean" else r

    def plans(b, hk):
        return _Plan(pooled(k[b, hk]), None if v is None else pooled(v[b, hk]), bias,
                     keep_fn, cmap if pool == "mean" else None, local_fn, width)
    return plans


@register(family="compression", exact=False, time="O(N·(M/stride + stride)·(D+Dv))",
          state="O(M/stride·(D+Dv)) pooled keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False, row_stochastic=True, example={"stride": 2, "local": True},
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
    >>> from refattn.compression import pooled_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 7, 4))
    >>> pooled_attention(q, k, v, stride=3, causal=True, local=True).shape
    (2, 7, 4)
    >>> bool(np.allclose(pooled_attention(q, k, v, stride=1, causal=True),
    ...                  ra.attention(q, k, v, causal=True)))
    True
    """
    q, k, v, pb, s = _prepare(q, k, v, scale, check_finite)
    plans = _pooled_plans(k, v, pb, stride=stride, pool=pool, causal=causal, local=local,
                          log_count=log_count)
    return pb.unflatten(_run(q, k, v, pb, s, plans, implied=False,
                             memory_budget=memory_budget, name="pooled_attention"))


def pooled_attention_matrix(q, k, *, stride, pool="mean", causal=False, local=False,
                            log_count=False, scale=None, check_finite=True,
                            memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`pooled_attention` (mean pooling;
    same arguments): the window probabilities spread evenly over each window's keys,
    plus the local keys' probabilities. Row-stochastic (rows that see nothing are 0).
    ``pool="max"`` raises ``ValueError``: max pooling is not linear in ``v``.

    >>> import numpy as np
    >>> from refattn.compression import pooled_attention_matrix
    >>> q = k = np.zeros((1, 5, 2))                          # all logits equal
    >>> pooled_attention_matrix(q, k, stride=2)[0, 0]        # windows {0,1} {2,3} {4}
    array([0.16666667, 0.16666667, 0.16666667, 0.16666667, 0.33333333])
    """
    q, k, _, pb, s = _prepare(q, k, None, scale, check_finite)
    plans = _pooled_plans(k, None, pb, stride=stride, pool=pool, causal=causal, local=local,
                          log_count=log_count)
    return pb.unflatten(_run(q, k, None, pb, s, plans, implied=True,
                             memory_budget=memory_budget, name="pooled_attention"))


# -------------------------------------------------------------- strided downsampling
def _strided_plans(k, v, pb, *, stride, offset, causal):
    stride = check_int("stride", stride, minimum=1, context=f" ({_seen(pb)})")
    offset = check_int("offset", offset, minimum=0, context=f" (with stride={stride})")
    if offset >= stride:
        raise ValueError(f"offset must satisfy 0 <= offset < stride={stride}, got {offset}")
    causal = _check_causal(causal)
    idx = np.arange(offset, pb.m, stride)
    pos = _positions(pb)
    keep = (lambda rows: idx[None, :] <= pos[rows, None]) if causal else None

    def plans(b, hk):
        return _Plan(k[b, hk, idx], None if v is None else v[b, hk, idx], None, keep,
                     lambda: _selection_map(idx, pb.m))
    return plans


@register(family="compression", exact=False, time="O(N·(M/stride)·(D+Dv))",
          state="O(M/stride·(D+Dv)) kept keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False, row_stochastic=True, example={"stride": 2},
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
    >>> from refattn.compression import strided_kv_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 6, 4))
    >>> out = strided_kv_attention(q, k, v, stride=2, offset=1)      # keys 1, 3, 5
    >>> bool(np.allclose(out, ra.attention(q, k[..., 1::2, :], v[..., 1::2, :])))
    True
    """
    q, k, v, pb, s = _prepare(q, k, v, scale, check_finite)
    plans = _strided_plans(k, v, pb, stride=stride, offset=offset, causal=causal)
    return pb.unflatten(_run(q, k, v, pb, s, plans, implied=False,
                             memory_budget=memory_budget, name="strided_kv_attention"))


def strided_kv_attention_matrix(q, k, *, stride, offset=0, causal=False, scale=None,
                                check_finite=True, memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`strided_kv_attention` (same
    arguments): the softmax over the kept keys, 0 in the other columns. Row-stochastic.

    >>> import numpy as np
    >>> from refattn.compression import strided_kv_attention_matrix
    >>> strided_kv_attention_matrix(np.zeros((1, 1, 2)), np.zeros((1, 5, 2)), stride=2)
    array([[[0.33333333, 0.        , 0.33333333, 0.        , 0.33333333]]])
    """
    q, k, _, pb, s = _prepare(q, k, None, scale, check_finite)
    plans = _strided_plans(k, None, pb, stride=stride, offset=offset, causal=causal)
    return pb.unflatten(_run(q, k, None, pb, s, plans, implied=True,
                             memory_budget=memory_budget, name="strided_kv_attention"))


# -------------------------------------------------------------------------- landmarks
def _norm_order(kb: np.ndarray) -> np.ndarray:
    """Key indices by decreasing Euclidean norm, ties to the lower index."""
    return np.argsort(-np.sqrt(np.einsum("md,md->m", kb, kb)), kind="stable")


def _landmark_plans(k, v, pb, *, indices, num_landmarks, select, causal, memory_budget):
    causal = _check_causal(causal)
    if (indices is None) == (num_landmarks is None):
        raise TypeError("landmark_attention needs exactly one of indices= (key positions) "
                        "and num_landmarks= (how many keys to select)")
    pos = _positions(pb)
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.size == 0):
            raise ValueError(f"indices must be a 1-D array of integer key positions, got "
                             f"shape {idx.shape} and dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= pb.m):
            raise ValueError(f"indices must lie in [0, M) with M={pb.m} ({_seen(pb)}); got "
                             f"min {idx.min()}, max {idx.max()}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"indices must be distinct, got {idx.tolist()}")
        keep = (lambda rows: idx[None, :] <= pos[rows, None]) if causal else None

        def plans(b, hk):
            return _Plan(k[b, hk, idx], None if v is None else v[b, hk, idx], None, keep,
                         lambda: _selection_map(idx, pb.m))
        return plans

    num = check_int("num_landmarks", num_landmarks, minimum=1,
                     context=f" (keys selected; {_seen(pb)})")
    if select != "norm":
        raise ValueError(f"select must be 'norm' (the keys of largest norm), got {select!r}")
    num = min(num, pb.m)
    if not causal:
        def plans(b, hk):
            idx = np.sort(_norm_order(k[b, hk])[:num])
            return _Plan(k[b, hk, idx], None if v is None else v[b, hk, idx], None, None,
                         lambda: _selection_map(idx, pb.m))
        return plans

    check_memory(pb.m * pb.m * 9.0 + pb.n * pb.m, memory_budget,
                 "causal landmark selection (an M x M prefix-rank table)",
                 "landmark_attention with explicit indices=")

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
        return _Plan(k[b, hk], None if v is None else v[b, hk], None, keep,
                     lambda: np.eye(pb.m))
    return plans


def landmark_indices(k, *, num_landmarks, select="norm", check_finite=True):
    """The keys :func:`landmark_attention` selects without causality: int64
    ``(..., Hkv, L)``, ``L = min(num_landmarks, M)``, the positions of the keys of largest
    Euclidean norm per KV head (ties to the lower position), in increasing order.

    >>> import numpy as np
    >>> from refattn.compression import landmark_indices
    >>> k = np.array([[[0.1, 0.0], [3.0, 0.0], [0.0, -2.0], [1.0, 1.0]]])
    >>> landmark_indices(k, num_landmarks=2)
    array([[1, 2]])
    """
    _, k, _, pb = prepare_qkv(k, k, None, check_finite=check_finite, need_v=False)
    num = check_int("num_landmarks", num_landmarks, minimum=1, context=f" ({_seen(pb)})")
    if select != "norm":
        raise ValueError(f"select must be 'norm' (the keys of largest norm), got {select!r}")
    num = min(num, pb.m)
    out = np.empty((pb.batch, pb.heads_kv, num), np.int64)
    for b in range(pb.batch):
        for hk in range(pb.heads_kv):
            out[b, hk] = np.sort(_norm_order(k[b, hk])[:num])
    return pb.unflatten(out)


@register(family="compression", exact=False, time="O(N·L·(D+Dv) + M·D)",
          state="O(L·(D+Dv)) landmark keys and values", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=True, row_stochastic=True, example={"num_landmarks": 2},
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
    >>> from refattn.compression import landmark_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> landmark_attention(q, k, v, num_landmarks=3, causal=True).shape
    (2, 6, 4)
    >>> out = landmark_attention(q, k, v, indices=[0, 4])
    >>> bool(np.allclose(out, ra.attention(q, k[..., [0, 4], :], v[..., [0, 4], :])))
    True
    """
    q, k, v, pb, s = _prepare(q, k, v, scale, check_finite)
    plans = _landmark_plans(k, v, pb, indices=indices, num_landmarks=num_landmarks,
                            select=select, causal=causal, memory_budget=memory_budget)
    return pb.unflatten(_run(q, k, v, pb, s, plans, implied=False,
                             memory_budget=memory_budget, name="landmark_attention"))


def landmark_attention_matrix(q, k, *, indices=None, num_landmarks=None, select="norm",
                              causal=False, scale=None, check_finite=True,
                              memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`landmark_attention` (same
    arguments): the softmax over each query's landmarks, 0 elsewhere. Row-stochastic.

    >>> import numpy as np
    >>> from refattn.compression import landmark_attention_matrix
    >>> k = np.array([[[0.1, 0.0], [3.0, 0.0], [0.0, -2.0]]])
    >>> landmark_attention_matrix(np.zeros((1, 1, 2)), k, num_landmarks=2)
    array([[[0. , 0.5, 0.5]]])
    """
    q, k, _, pb, s = _prepare(q, k, None, scale, check_finite)
    plans = _landmark_plans(k, None, pb, indices=indices, num_landmarks=num_landmarks,
                            select=select, causal=causal, memory_budget=memory_budget)
    return pb.unflatten(_run(q, k, None, pb, s, plans, implied=True,
                             memory_budget=memory_budget, name="landmark_attention"))


# --------------------------------------------------------------------------- k-means
def _kmeans_plans(k, v, pb, *, n_centroids, n_iters, rng, log_count):
    n_centroids = check_int("n_centroids", n_centroids, minimum=1,
                             context=f" (clusters of keys; {_seen(pb)})")
    n_iters = check_int("n_iters", n_iters, minimum=0)
    if not isinstance(log_count, (bool, np.bool_)):
        raise TypeError(f"log_count must be True or False, got {log_count!r}")
    gen = resolve_rng(rng, "kmeans_kv_attention (k-means of the keys)")

    def plans(b, hk):
        kb = k[b, hk]
        _, assign = kmeans(kb, n_centroids, n_iters, gen, spherical=False)
        c = min(n_centroids, pb.m)
        counts = np.bincount(assign, minlength=c)
        live = counts > 0

        def means(x):                           # the mean of each cluster's rows of x
            sums = np.zeros((c, x.shape[1]))
            np.add.at(sums, assign, x)
            sums[live] /= counts[live, None]
            return sums

        def cmap():
            w = np.zeros((c, pb.m))
            w[assign, np.arange(pb.m)] = 1.0 / counts[assign]
            return w
        kc = means(kb)
        vc = None if v is None else means(v[b, hk])
        bias = None
        if log_count:
            bias = np.zeros(c)
            bias[live] = np.log(counts[live])
        keep = None if live.all() else (lambda rows: np.broadcast_to(live, (len(rows), c)))
        return _Plan(kc, vc, bias, keep, cmap)
    return plans


@register(family="compression", exact=False, time="O(M·C·D·I + N·C·(D+Dv))",
          state="O(C·(D+Dv)) centroids", supports_causal=False, supports_mask=False,
          supports_gqa=True, position_free=True, row_stochastic=True, example={"n_centroids": 2},
          budget=lambda n, b: {"n_centroids": b})
def kmeans_kv_attention(q, k, v, *, n_centroids, n_iters=10, rng, log_count=True,
                        scale=None, check_finite=True, memory_budget=None):
    r"""Attention over k-means centroids of the keys and the matching means of the
    values.

    .. math:: \hat k_c = \frac{1}{|S_c|}\sum_{j \in S_c} k_j,\quad
              \hat v_c = \frac{1}{|S_c|}\sum_{j \in S_c} v_j,\quad
              o_i = \frac{\sum_c |S_c|\, e^{s\, q_i\cdot\hat k_c}\, \hat v_c}
                         {\sum_c |S_c|\, e^{s\, q_i\cdot\hat k_c}}

    where ``S_c`` are the clusters of Euclidean k-means on each KV head's keys
    (Lloyd's algorithm with k-means++ initialisation, at most ``n_iters`` iterations,
    the same k-means as :mod:`refattn.clustered`, run on the keys in a canonical order so
    the result does not depend on their order). The weight ``|S_c|`` (``log |S_c|``
    added to the logit, ``log_count=True``) makes this attention over the ``M`` keys with
    each key replaced by its centroid, :math:`o_i = \sum_j \mathrm{softmax}_j(s\, q_i
    \cdot \hat k_{c(j)})\, v_j`: exact when every cluster holds copies of one key (with
    any values), in particular with ``n_centroids = M`` distinct keys. With
    ``log_count=False`` every centroid counts once. (Compressing the KV sequence by
    clustering; cf. the cluster-level attention of Vyas et al. 2020 for queries and of
    Roy et al. 2021 for routing.)

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    n_centroids : int >= 1 (more than ``M`` acts like ``M``). Clusters that end empty
        are dropped.
    n_iters : int >= 0, most Lloyd iterations.
    rng : int seed or ``numpy.random.Generator`` (required): the k-means++ draws, per
        batch element and KV head in order.
    log_count : weight each centroid by its cluster size (default).
    scale, check_finite, memory_budget : as :func:`refattn.attention`.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. Not causal: the clustering sees every key.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> from refattn.compression import kmeans_kv_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 5, 4))
    >>> kmeans_kv_attention(q, k, v, n_centroids=2, rng=0).shape
    (1, 5, 4)
    >>> kd = np.repeat(k[:, :2], 3, axis=1)                # 2 distinct keys, 3 copies each
    >>> vd = rng.standard_normal((1, 6, 4))                # values need not repeat
    >>> bool(np.allclose(kmeans_kv_attention(q, kd, vd, n_centroids=2, rng=0),
    ...                  ra.attention(q, kd, vd)))
    True
    """
    q, k, v, pb, s = _prepare(q, k, v, scale, check_finite)
    plans = _kmeans_plans(k, v, pb, n_centroids=n_centroids, n_iters=n_iters, rng=rng,
                          log_count=log_count)
    return pb.unflatten(_run(q, k, v, pb, s, plans, implied=False,
                             memory_budget=memory_budget, name="kmeans_kv_attention"))


def kmeans_kv_attention_matrix(q, k, *, n_centroids, n_iters=10, rng, log_count=True,
                               scale=None, check_finite=True, memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`kmeans_kv_attention` (same
    arguments and ``rng``): each centroid's probability spread evenly over its cluster's
    keys, so with ``log_count`` ``A_ij = softmax_j(s q_i · k̂_c(j))``. Row-stochastic.

    >>> import numpy as np
    >>> from refattn.compression import kmeans_kv_attention_matrix
    >>> k = np.array([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    >>> kmeans_kv_attention_matrix(np.zeros((1, 1, 2)), k, n_centroids=2, rng=0).round(3)
    array([[[0.333, 0.333, 0.333]]])
    """
    q, k, _, pb, s = _prepare(q, k, None, scale, check_finite)
    plans = _kmeans_plans(k, None, pb, n_centroids=n_centroids, n_iters=n_iters, rng=rng,
                          log_count=log_count)
    return pb.unflatten(_run(q, k, None, pb, s, plans, implied=True,
                             memory_budget=memory_budget, name="kmeans_kv_attention"))


attach(pooled_attention, implied=pooled_attention_matrix)
attach(strided_kv_attention, implied=strided_kv_attention_matrix)
attach(landmark_attention, implied=landmark_attention_matrix)
attach(kmeans_kv_attention, implied=kmeans_kv_attention_matrix)
