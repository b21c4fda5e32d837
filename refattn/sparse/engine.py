r"""Mask-defined sparse attention: the one engine the named patterns run on.

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

Working memory is bounded by the block sizes, never by ``N x M``. Learned sink logits
(``sinks=``, gpt-oss: :func:`refattn.attention`) join each row's denominator on both
paths.

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

from .._core.backward import softmax_backward
from .._core.checks import check_block, check_choice
from .._core.logits import make_logits
from .._core.online import online_softmax_tiles, online_softmax_tiles_backward
from .._core.problem import prepare_qkv
from .._core.softmax import finish_rows, merge_sinks
from .._core.threads import run_items
from ..masks import FULL, PARTIAL, TileRows

__all__ = ["sparse_attention", "sparse_attention_vjp", "SPARSE_BLOCK", "GATHER_BLOCK_Q",
           "GATHER_COST_RATIO"]

#: Default tile for the ``"tiles"`` path: small enough that a narrow band wastes little.
SPARSE_BLOCK = 128
#: Default query rows per step of the ``"gather"`` path.
GATHER_BLOCK_Q = 64
_METHODS = ("auto", "tiles", "gather")


def sparse_attention(q, k, v, mask, *, causal=False, scale=None, bias=None, softcap=None,
                     sinks=None, return_lse=False, check_finite=True, method="auto",
                     block_q=None, block_k=None, workers=None):
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
    check_choice("method", method, _METHODS)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite, sinks=sinks)
    block_k = check_block("block_k", block_k) or SPARSE_BLOCK
    workers = check_block("workers", workers)
    if method == "auto":
        method = choose_method(logits.mask, pb.n, pb.m, block_k)
    if method == "tiles":
        block_q = check_block("block_q", block_q) or SPARSE_BLOCK
        out, lse = online_softmax_tiles(q, k, v, pb, logits, block_q, block_k, workers)
    else:
        block_q = check_block("block_q", block_q) or GATHER_BLOCK_Q
        out, lse = _gather_attention(q, k, v, pb, logits, block_q, block_k, workers)
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


def sparse_attention_vjp(q, k, v, grad_out, *, mask, grad_lse=None, causal=False,
                         scale=None, bias=None, softcap=None, sinks=None, check_finite=True,
                         method="auto", block_q=None, block_k=None, workers=None):
    """Gradients of :func:`sparse_attention`: FlashAttention-2's backward
    (:func:`refattn.exact.tiled.tiled_attention_vjp`) over the tiles the mask leaves
    non-empty, in time proportional to them. Both forward paths compute the same
    function, so ``method`` selects nothing here (the backward always runs on tiles);
    ``block_q``, ``block_k`` default to ``SPARSE_BLOCK``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 40, 8))
    >>> do = np.ones((1, 40, 8))
    >>> mask = ra.masks.sliding_window(5)
    >>> a = ra.vjp("sparse_attention", q, k, v, do, mask=mask, causal=True)
    >>> b = ra.vjp("attention", q, k, v, do, mask=mask, causal=True)
    >>> all(np.allclose(a[x], b[x], rtol=1e-12, atol=1e-14) for x in "qkv")
    True
    """
    if mask is None:
        raise ValueError("sparse_attention needs a mask; for dense attention use "
                         "refattn.attention or refattn.tiled_attention")
    check_choice("method", method, _METHODS)
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                          check_finite=check_finite)
    block_q = check_block("block_q", block_q) or SPARSE_BLOCK
    block_k = check_block("block_k", block_k) or SPARSE_BLOCK
    return bw.gradients(*online_softmax_tiles_backward(
        bw.q, bw.k, bw.v, bw.do, bw.dlse, bw.pb, bw.logits, block_q, block_k,
        check_block("workers", workers), bw.parameter))


#: The gather path costs about this many times more per kept pair than the tile path
#: per visited logit (measured on 2 cores, D = 64: ~100 ns against ~4 ns).
GATHER_COST_RATIO = 25


def choose_method(mask, n, m, block, samples: int = 16) -> str:
    """``"gather"`` when the kept pairs fill less than ``1 / GATHER_COST_RATIO`` of the
    tiles the tile path would visit, estimated from a few partial tiles of a few query-tile
    rows spread over the grid (all tiles are partial for masks without an analytic
    classification)."""
    tiles = TileRows(mask, n, m, block, block)
    picked = np.unique(np.linspace(0, tiles.n_rows - 1, min(samples, tiles.n_rows))
                       .astype(int)) if tiles.n_rows else []
    visited = full = 0
    partial = []
    for a in picked:
        key_tiles, labels = tiles.row(a)
        visited += len(labels)
        full += int(np.sum(labels == FULL))
        partial += [(a, kb) for kb in key_tiles[labels == PARTIAL]]
    if not partial:
        return "tiles"
    kept = []
    for a, kb in (partial[i] for i in np.linspace(0, len(partial) - 1,
                                                   min(samples, len(partial))).astype(int)):
        qi = np.arange(a * block, min((a + 1) * block, n))
        ki = np.arange(kb * block, min((kb + 1) * block, m))
        kept.append(np.mean(mask._eval(np.asarray(0), np.asarray(0), qi[:, None], ki[None, :],
                                       n, m)))
    density = (np.mean(kept) * len(partial) + full) / visited
    return "gather" if density * GATHER_COST_RATIO < 1 else "tiles"


def _gather_attention(q, k, v, pb, logits, block_q, block_k, workers):
    """The CSR path: per query block, list the kept pairs, then a segment softmax."""
    g, n = pb.group, pb.n
    tiles = TileRows(logits.mask, n, pb.m, block_q, block_k)
    out, lse = pb.poisoned_outputs()

    def run(item):
        b, h, qb = item
        rows = np.arange(qb * block_q, min((qb + 1) * block_q, n))
        r, c = logits.kept_pairs(b, h, rows, block_k, tiles.row(qb))
        starts = np.searchsorted(r, rows[0] + np.arange(len(rows) + 1))  # CSR row pointers
        qh, kh, vh = q[b, h, rows[0]:rows[-1] + 1] * logits.scale, k[b, h // g], v[b, h // g]
        s = logits.pairs(qh, kh, b, h, r, c, rows[0])
        acc = np.zeros((len(rows), pb.dv))
        row_max, row_sum = _segment_softmax_values(s, starts, c, vh, acc)
        if logits.sinks is not None:
            row_max, row_sum = merge_sinks(acc, row_max, row_sum, logits.sinks[h])
        finish_rows(acc, row_max, row_sum, out[b, h, rows[0]:rows[-1] + 1],
                lse[b, h, rows[0]:rows[-1] + 1])

    items = [(b, h, qb) for b in range(pb.batch) for h in range(pb.heads_q)
             for qb in range(tiles.n_rows)]
    work = float(tiles.grid_tiles) * block_q * block_k * pb.batch * pb.heads_q  # at most
    run_items(run, items, workers, work)
    return out, lse


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


sparse_attention.vjp = sparse_attention_vjp
