"""The tiled online-softmax engine (FlashAttention, Dao et al. 2022) shared by
:func:`refattn.tiled_attention` (whose docstring states the recurrence) and
:func:`refattn.sparse_attention`: per query tile, a running row maximum, normaliser and
unnormalised output over the key tiles the mask leaves non-empty.
"""
from __future__ import annotations

import threading

import numpy as np

from ..masks import FULL, PARTIAL
from .softmax import finish_rows
from .threads import run_items

__all__ = ["online_softmax_tiles"]


def online_softmax_tiles(q, k, v, pb, logits, block_q: int, block_k: int, workers=None):
    """The tiled online-softmax engine on validated inputs (``q (B, Hq, N, D)`` ...).

    Visits, for each query tile, the key tiles that the mask does not classify as empty
    (every tile for masks without an analytic classification). Returns flat
    ``out (B, Hq, N, Dv)`` and ``lse (B, Hq, N)``.
    """
    g, n, m = pb.group, pb.n, pb.m
    mask = logits.mask
    n_q_tiles, n_k_tiles = -(-n // block_q), -(-m // block_k)
    if mask is not None and mask.analytic:   # visit the non-empty tiles only
        indptr, key_tiles, labels = mask.tile_lists(n, m, block_q, block_k)
    else:                                    # every tile; a mask is evaluated on each
        indptr = np.arange(n_q_tiles + 1) * n_k_tiles
        key_tiles = np.tile(np.arange(n_k_tiles), n_q_tiles)
        labels = np.full(len(key_tiles), FULL if mask is None else PARTIAL, np.int8)

    out, lse = pb.poisoned_outputs()
    local = threading.local()          # one reusable logit tile per worker thread

    def run(item):
        if not hasattr(local, "tile"):
            local.tile = np.empty(g * min(block_q, n) * min(block_k, m))
        b, hk, hs, qb = item
        heads = np.arange(hs.start, hs.stop)
        r0 = qb * block_q
        rows = np.arange(r0, min(r0 + block_q, n))
        qt = q[b, hs, r0:r0 + len(rows)] * logits.scale     # (G, r, D), scaled per tile
        run_max = np.full((g, len(rows)), -np.inf)
        run_sum = np.zeros((g, len(rows)))
        acc = np.zeros((g, len(rows), pb.dv))
        for kb, label in zip(key_tiles[indptr[qb]:indptr[qb + 1]],
                             labels[indptr[qb]:indptr[qb + 1]]):
            c0 = kb * block_k
            cols = np.arange(c0, min(c0 + block_k, m))
            s = logits.block(qt, k[b, hk, c0:c0 + len(cols)], b, heads, rows, cols,
                             apply_mask=label != FULL, buffer=local.tile)
            new_max = np.maximum(run_max, s.max(axis=-1))
            safe = np.where(np.isneginf(new_max), 0.0, new_max)
            alpha = np.exp(run_max - safe)             # 0 while nothing was kept
            s -= safe[..., None]
            np.exp(s, out=s)
            run_sum *= alpha
            run_sum += s.sum(axis=-1)
            acc *= alpha[..., None]
            acc += s @ v[b, hk, c0:c0 + len(cols)]
            run_max = new_max
        finish_rows(acc, np.where(np.isneginf(run_max), 0.0, run_max), run_sum,
                out[b, hs, r0:r0 + len(rows)], lse[b, hs, r0:r0 + len(rows)])

    items = [(b, hk, hs, qb) for b, hk, hs in pb.kv_groups() for qb in range(n_q_tiles)]
    visited = float(len(key_tiles)) * block_q * block_k * pb.batch * pb.heads_q
    run_items(run, items, workers, visited)
    return out, lse
