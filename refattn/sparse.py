r"""Mask-defined sparse attention: one engine, and the named patterns built on it.

Every pattern here is exact softmax attention restricted to the keys a mask keeps,

.. math:: o_i = \sum_{j \in S(i)} \frac{e^{s_{ij}}}{\sum_{l \in S(i)} e^{s_{il}}} v_j,
          \qquad S(i) = \{ j : \text{mask}(i, j) \},

so each equals ``refattn.attention(q, k, v, mask=<its mask>)``; what the engine adds is
cost proportional to the kept pairs instead of ``N x M``. :func:`sparse_attention` has
two paths:

* ``"tiles"``: the online softmax over the ``(block_q, block_k)`` tiles the mask's
  classification leaves non-empty (FlashAttention's block-sparse form; dense matrix
  products inside a tile). Time ``O(visited tiles x block_q x block_k x D)``.
* ``"gather"``: the kept pairs of each query block are listed (the mask is evaluated in
  the non-empty tiles only), their logits formed by gathered dot products and reduced
  per row (a CSR segment softmax). Time ``O(nnz x D)`` plus the listing; better when the
  kept pairs are scattered (strided, dilated, random) so that tiles are mostly empty
  inside.

Working memory is bounded by the block sizes, never by ``N x M``.

>>> import numpy as np, refattn as ra
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 2, 300, 16))
>>> mask = ra.masks.sliding_window(32) | ra.masks.sinks(4)
>>> out = ra.sparse_attention(q, k, v, mask, causal=True)
>>> bool(np.allclose(out, ra.attention(q, k, v, mask=mask, causal=True), rtol=1e-12))
True
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import masks as _masks
from ._inputs import prepare_qkv
from ._logits import make_logits
from .exact import _finish, attention_probs
from .masks import FULL, PARTIAL
from .registry import register
from .tiled import _check_block, online_softmax_tiles
from ._threads import run_items

__all__ = ["sparse_attention", "sliding_window_attention", "strided_attention",
           "fixed_attention", "block_sparse_attention", "bigbird_attention",
           "longformer_attention", "sink_attention"]

#: Default tile for the ``"tiles"`` path: small enough that a narrow band wastes little.
SPARSE_BLOCK = 128
#: Default query rows per step of the ``"gather"`` path.
GATHER_BLOCK_Q = 64
_METHODS = ("auto", "tiles", "gather")


def sparse_attention(q, k, v, mask, *, causal=False, scale=None, bias=None, softcap=None,
                     return_lse=False, check_finite=True, method="auto", block_q=None,
                     block_k=None, workers=None):
    """Exact attention over the keys ``mask`` keeps, in time proportional to them.

    Arguments and result as :func:`refattn.attention` (``mask`` is required), plus:

    method : ``"tiles"``, ``"gather"`` or ``"auto"`` (gather when the kept pairs, estimated
        from a few tiles, fill less than ``1 / GATHER_COST_RATIO`` of the tiles the tile
        path would visit).
    block_q, block_k : tile sizes (default ``SPARSE_BLOCK``; the gather path lists
        ``GATHER_BLOCK_Q`` query rows at a time).
    workers : threads (default: the available cores).
    """
    if mask is None:
        raise ValueError("sparse_attention needs a mask; for dense attention use "
                         "refattn.attention or refattn.tiled_attention")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    block_k = _check_block("block_k", block_k) or SPARSE_BLOCK
    workers = _check_block("workers", workers)
    if method == "auto":
        method = _choose_method(logits.mask, pb.n, pb.m, block_k)
    if method == "tiles":
        block_q = _check_block("block_q", block_q) or SPARSE_BLOCK
        out, lse = online_softmax_tiles(q, k, v, pb, logits, block_q, block_k, workers)
    else:
        block_q = _check_block("block_q", block_q) or GATHER_BLOCK_Q
        out, lse = _gather_attention(q, k, v, pb, logits, block_q, block_k, workers)
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


#: The gather path costs about this many times more per kept pair than the tile path
#: per visited logit (measured on 2 cores, D = 64: ~100 ns against ~4 ns).
GATHER_COST_RATIO = 25


def _choose_method(mask, n, m, block, samples: int = 16) -> str:
    """``"gather"`` when the kept pairs fill less than ``1 / GATHER_COST_RATIO`` of the
    tiles the tile path would visit, estimated from a few partial tiles (all tiles are
    partial for masks without an analytic classification)."""
    if mask.analytic:
        indptr, key_tiles, labels = mask.tile_lists(n, m, block, block)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    else:
        grid = np.indices((-(-n // block), -(-m // block))).reshape(2, -1)
        rows, key_tiles = grid
        labels = np.full(len(rows), PARTIAL, np.int8)
    if labels.size == 0:
        return "tiles"
    partial = np.flatnonzero(labels == PARTIAL)
    if partial.size == 0:
        return "tiles"
    pick = partial[np.linspace(0, partial.size - 1, min(samples, partial.size)).astype(int)]
    kept = []
    for t in pick:
        qi = np.arange(rows[t] * block, min((rows[t] + 1) * block, n))
        ki = np.arange(key_tiles[t] * block, min((key_tiles[t] + 1) * block, m))
        kept.append(np.mean(mask._eval(np.asarray(0), np.asarray(0), qi[:, None], ki[None, :],
                                       n, m)))
    density = (np.mean(kept) * partial.size + (labels == FULL).sum()) / labels.size
    return "gather" if density * GATHER_COST_RATIO < 1 else "tiles"


def _gather_attention(q, k, v, pb, logits, block_q, block_k, workers):
    """The CSR path: per query block, list the kept pairs, then a segment softmax."""
    g, n, m = pb.group, pb.n, pb.m
    mask = logits.mask
    n_q_tiles = -(-n // block_q)
    if mask.analytic:
        indptr, key_tiles, labels = mask.tile_lists(n, m, block_q, block_k)
    else:
        n_k = -(-m // block_k)
        indptr = np.arange(n_q_tiles + 1) * n_k
        key_tiles = np.tile(np.arange(n_k), n_q_tiles)
        labels = np.full(len(key_tiles), PARTIAL, np.int8)
    out, lse = pb.poisoned_outputs()

    def run(item):
        b, h, qb = item
        rows = np.arange(qb * block_q, min((qb + 1) * block_q, n))
        span = slice(indptr[qb], indptr[qb + 1])
        r, c = _kept_pairs(mask, b, h, rows, n, m, block_k, (key_tiles[span], labels[span]))
        starts = np.searchsorted(r, rows[0] + np.arange(len(rows) + 1))  # CSR row pointers
        qh, kh, vh = q[b, h, rows[0]:rows[-1] + 1] * logits.scale, k[b, h // g], v[b, h // g]
        s = _pair_logits(qh, kh, r - rows[0], c)
        if logits.softcap is not None:
            s = logits.softcap * np.tanh(s / logits.softcap)
        if logits.score_mod is not None:
            s = np.array(np.broadcast_to(logits.score_mod._apply(
                s, np.asarray(b), np.asarray(h), r, c, n, m), s.shape), dtype=np.float64)
        acc = np.zeros((len(rows), pb.dv))
        row_max, row_sum = _segment_softmax_values(s, starts, c, vh, acc)
        _finish(acc, row_max, row_sum, out[b, h, rows[0]:rows[-1] + 1],
                lse[b, h, rows[0]:rows[-1] + 1])

    items = [(b, h, qb) for b in range(pb.batch) for h in range(pb.heads_q)
             for qb in range(n_q_tiles)]
    visited = float(len(key_tiles)) * block_q * block_k * pb.batch * pb.heads_q
    run_items(run, items, workers, visited)
    return out, lse


def _kept_pairs(mask, b, h, rows, n, m, block_k, tiles):
    """Row-major ``(row, col)`` index arrays of the pairs ``mask`` keeps among the
    consecutive query ``rows`` of batch ``b``, query head ``h``; ``tiles`` is
    ``(key tile indices, labels)`` of the key tiles to look at."""
    found_r, found_c = [], []
    for kb, label in zip(*tiles):
        cols = np.arange(kb * block_k, min((kb + 1) * block_k, m))
        if label == FULL:
            rr, cc = np.meshgrid(rows, cols, indexing="ij")
        else:
            keep = np.broadcast_to(mask._eval(np.asarray(b), np.asarray(h), rows[:, None],
                                              cols[None, :], n, m), (len(rows), len(cols)))
            i, j = np.nonzero(keep)
            rr, cc = rows[i], cols[j]
        found_r.append(rr.ravel())
        found_c.append(cc.ravel())
    if not found_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r, c = np.concatenate(found_r), np.concatenate(found_c)
    order = np.lexsort((c, r))
    return r[order], c[order]


# ------------------------------------------------------------------ named patterns
def _pattern(factory, **register_kwargs):
    """Register a mask-defined mechanism: ``fn(q, k, v, *, <params>, **options)`` is
    ``sparse_attention(q, k, v, factory(<params>), **options)``; its implied matrix is
    the dense attention matrix under the same mask."""
    def deco(fn):
        def implied(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                    check_finite=True, method=None, block_q=None, block_k=None,
                    workers=None, **params):
            return attention_probs(q, k, mask=factory(**params), causal=causal, scale=scale,
                                   bias=bias, softcap=softcap, check_finite=check_finite)
        fn.mask = factory
        return register(family="sparse", exact=False, supports_causal=True,
                        supports_mask=False, supports_gqa=True, position_free=False,
                        implied=implied, mask=factory, **register_kwargs)(fn)
    return deco


def _window_mask(window, right=0, dilation=1):
    return _masks.sliding_window(window, right, dilation)


@_pattern(_window_mask, time="O(N·w·D)", state="O(w·D) rolling KV cache",
          example={"window": 3, "right": 1},
          budget=lambda n, b: {"window": b // 2, "right": b // 2})
def sliding_window_attention(q, k, v, *, window, right=0, dilation=1, **options):
    """Local attention in a sliding window (Beltagy et al. 2020; Mistral 7B).

    Query ``i`` keeps keys ``j`` with ``-right <= i' - j <= window`` and
    ``(i' - j) % dilation == 0`` (:func:`refattn.masks.sliding_window`): causal when
    ``right = 0`` (add ``causal=True`` to be explicit), symmetric with ``right = window``;
    ``dilation`` may be a per-head sequence (Longformer's dilated heads). ``options``
    as :func:`sparse_attention`.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 10, 4))
    >>> out = ra.sliding_window_attention(q, k, v, window=2)
    >>> bool(np.allclose(out[0, 5], ra.attention(q[:, 5:6], k[:, 3:6], v[:, 3:6])[0, 0]))
    True
    """
    return sparse_attention(q, k, v, _window_mask(window, right, dilation), **options)


def _strided_mask(stride):
    _masks._check_count("stride", stride, minimum=1)
    return _masks.sliding_window(stride - 1, right=stride - 1) | _masks.strided(stride)


@_pattern(_strided_mask, time="O(N·(s + N/s)·D)", state="O((s + N/s)·D)",
          example={"stride": 3}, budget=lambda n, b: {"stride": max(1, b // 2)})
def strided_attention(q, k, v, *, stride, **options):
    """Sparse Transformer, strided pattern (Child et al. 2019), both heads merged.

    Keep iff ``|i' - j| < stride`` (local) or ``(i' - j) % stride == 0`` (strided);
    with ``causal=True`` this is the paper's pattern, ``O(N sqrt N)`` pairs at
    ``stride ~ sqrt N``.

    >>> import numpy as np, refattn as ra
    >>> ra.strided_attention.mask(stride=3).materialize(7, 7)[6].astype(int)
    array([1, 0, 0, 1, 1, 1, 1])
    """
    return sparse_attention(q, k, v, _strided_mask(stride), **options)


@_pattern(_masks.fixed, time="O(N·(l + c·N/l)·D)", state="O((l + c·N/l)·D)",
          example={"block": 4, "summary": 1},
          budget=lambda n, b: {"block": b, "summary": max(1, b // 8)})
def fixed_attention(q, k, v, *, block, summary=1, **options):
    """Sparse Transformer, fixed pattern (Child et al. 2019): keep iff
    ``i' // block == j // block`` or ``j % block >= block - summary``
    (:func:`refattn.masks.fixed`); use ``causal=True`` for the autoregressive form.

    >>> import numpy as np, refattn as ra
    >>> ra.fixed_attention.mask(block=3, summary=1).materialize(6, 6)[4].astype(int)
    array([0, 0, 1, 1, 1, 1])
    """
    return sparse_attention(q, k, v, _masks.fixed(block, summary), **options)


def _band_layout(n, block_size):
    """Block layout for ``n`` positions: each block row keeps its diagonal block and the
    blocks on either side (3 blocks, ~3·block_size keys per query)."""
    blocks = -(-n // block_size)
    i = np.arange(blocks)
    return np.abs(i[:, None] - i[None, :]) <= 1


@_pattern(_masks.block_layout, time="O(nnz blocks·b²·D)", state="O(N·D)",
          example={"layout": np.tril(np.ones((14, 14), bool)), "block_size": 3},
          budget=lambda n, b: {"layout": _band_layout(n, max(1, b // 3)),
                               "block_size": max(1, b // 3)})
def block_sparse_attention(q, k, v, *, layout, block_size, **options):
    """Block-sparse attention over an arbitrary boolean block ``layout``
    (:func:`refattn.masks.block_layout`; Child et al. 2019, Gray et al. 2017).
    ``layout`` needs ``ceil(M / block_size)`` blocks each way.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4))
    >>> layout = np.array([[1, 0], [1, 1]], bool)
    >>> out = ra.block_sparse_attention(q, k, v, layout=layout, block_size=4)
    >>> bool(np.allclose(out[0, :4], ra.attention(q[:, :4], k[:, :4], v[:, :4])[0]))
    True
    """
    options.setdefault("block_q", block_size)   # tiles aligned with the layout's blocks
    options.setdefault("block_k", block_size)
    return sparse_attention(q, k, v, _masks.block_layout(layout, block_size), **options)


def _bigbird_mask(block_size, window_blocks=1, global_blocks=1, random_blocks=2, rng=None):
    if rng is None:
        raise TypeError("bigbird_attention needs rng (an int seed or a numpy Generator) "
                        "for its random blocks")
    g = _masks._check_count("global_blocks", global_blocks) * block_size
    return (_masks.block_window(window_blocks, block_size)
            | _masks.global_tokens(np.arange(g))
            | _masks.random_blocks(random_blocks, block_size, rng))


@_pattern(_bigbird_mask, time="O(N·b·(w + g + r)·D)", state="O(N·D)",
          example={"block_size": 2, "window_blocks": 1, "global_blocks": 1,
                   "random_blocks": 1},
          budget=lambda n, b: {"block_size": max(1, b // 6), "window_blocks": 1,
                               "global_blocks": 1, "random_blocks": 2})
def bigbird_attention(q, k, v, *, block_size, window_blocks=1, global_blocks=1,
                      random_blocks=2, rng, **options):
    """BigBird (Zaheer et al. 2020), ITC form, in blocks of ``block_size`` positions:
    a blocked sliding window of ``window_blocks`` blocks each side
    (:func:`refattn.masks.block_window`), the first ``global_blocks`` blocks as global
    tokens that attend everywhere and are attended by all, and ``random_blocks`` random
    key blocks per query block (:func:`refattn.masks.random_blocks`, seeded by ``rng``).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 64, 8))
    >>> out = ra.bigbird_attention(q, k, v, block_size=8, rng=0)
    >>> mask = ra.bigbird_attention.mask(block_size=8, rng=0)
    >>> bool(np.allclose(out, ra.attention(q, k, v, mask=mask), rtol=1e-12))
    True
    """
    options.setdefault("block_q", block_size)   # tiles aligned with the pattern's blocks
    options.setdefault("block_k", block_size)
    return sparse_attention(q, k, v, _bigbird_mask(block_size, window_blocks, global_blocks,
                                                   random_blocks, rng), **options)


def _longformer_mask(window, global_tokens=(), dilation=1):
    return _masks.sliding_window(window, right=window, dilation=dilation) | \
        _masks.global_tokens(np.asarray(global_tokens, dtype=np.int64))


@_pattern(_longformer_mask, time="O(N·(w + g)·D)", state="O(N·D)",
          example={"window": 2, "global_tokens": [0], "dilation": [1, 2]},
          budget=lambda n, b: {"window": b // 2, "global_tokens": [0]})
def longformer_attention(q, k, v, *, window, global_tokens=(), dilation=1, **options):
    """Longformer (Beltagy et al. 2020): a symmetric sliding window of ``window``
    positions each side, dilated per head if ``dilation`` is a sequence, plus global
    tokens (positions in ``global_tokens``) that attend to every key and are attended by
    every query.

    >>> import numpy as np, refattn as ra
    >>> keep = ra.longformer_attention.mask(window=1, global_tokens=[0]).materialize(6, 6)
    >>> keep.astype(int)[3], keep.astype(int)[0]
    (array([1, 0, 1, 1, 1, 0]), array([1, 1, 1, 1, 1, 1]))
    """
    return sparse_attention(q, k, v, _longformer_mask(window, global_tokens, dilation),
                            **options)


def _sink_mask(window, sinks=4):
    return _masks.sinks(sinks) | _masks.sliding_window(window)


@_pattern(_sink_mask, time="O(N·(w + s)·D)", state="O((w + s)·D)",
          example={"window": 3, "sinks": 2},
          budget=lambda n, b: {"window": max(0, b - 4), "sinks": 4})
def sink_attention(q, k, v, *, window, sinks=4, **options):
    """Attention sinks plus a sliding window (StreamingLLM, Xiao et al. 2024): every
    query keeps the first ``sinks`` keys and the ``window`` keys before it (and itself);
    with ``causal=True`` a decoder's rolling cache of ``sinks + window + 1`` keys.

    >>> import numpy as np, refattn as ra
    >>> ra.sink_attention.mask(window=1, sinks=2).materialize(6, 6)[5].astype(int)
    array([1, 1, 0, 0, 1, 1])
    """
    return sparse_attention(q, k, v, _sink_mask(window, sinks), **options)


@njit(cache=True, nogil=True)
def _pair_logits(q, k, rows, cols):  # pragma: no cover - compiled
    """``s[p] = q[rows[p]] . k[cols[p]]`` for each listed pair."""
    s = np.empty(len(rows))
    for p in range(len(rows)):
        total = 0.0
        for d in range(q.shape[1]):
            total += q[rows[p], d] * k[cols[p], d]
        s[p] = total
    return s


@njit(cache=True, nogil=True)
def _segment_softmax_values(s, starts, cols, v, acc):  # pragma: no cover - compiled
    """Per row ``i`` (pairs ``starts[i]:starts[i+1]``): ``acc[i] = sum_p e^(s_p - max)
    v[cols[p]]``; returns the row maxima (0 for rows with nothing kept) and sums."""
    rows = len(starts) - 1
    row_max = np.zeros(rows)
    row_sum = np.zeros(rows)
    for i in range(rows):
        top = -np.inf
        for p in range(starts[i], starts[i + 1]):
            if np.isnan(s[p]):       # NaN input (check_finite=False) propagates
                top = np.nan
                break
            top = max(top, s[p])
        if np.isnan(top):
            row_max[i] = row_sum[i] = np.nan
            continue
        if top == -np.inf:
            continue
        total = 0.0
        for p in range(starts[i], starts[i + 1]):
            w = np.exp(s[p] - top)
            total += w
            for d in range(v.shape[1]):
                acc[i, d] += w * v[cols[p], d]
        row_max[i] = top
        row_sum[i] = total
    return row_max, row_sum
