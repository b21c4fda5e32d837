"""The tiled online-softmax engine (FlashAttention, Dao et al. 2022) shared by
:func:`refattn.tiled_attention` (whose docstring states the recurrence) and
:func:`refattn.sparse_attention`: per query tile, a running row maximum, normaliser and
unnormalised output over the key tiles the mask leaves non-empty.
"""
from __future__ import annotations

import threading

import numpy as np

from ..masks import FULL
from ..masks.tile_rows import TileRows
from .backward import head_summed_product, sink_gradient
from .softmax import finish_rows, merge_sinks
from .threads import run_items

__all__ = ["online_softmax_tiles", "online_softmax_tiles_backward"]


def online_softmax_tiles(q, k, v, pb, logits, block_q: int, block_k: int, workers=None):
    """The tiled online-softmax engine on validated inputs (``q (B, Hq, N, D)`` ...).

    Visits, for each query tile, the key tiles that the mask does not classify as empty
    (every tile for masks without an analytic classification), then adds the call's sink
    logits (``logits.sinks``) to the denominator. Returns flat ``out (B, Hq, N, Dv)`` and
    ``lse (B, Hq, N)``.
    """
    g, n, m = pb.group, pb.n, pb.m
    tiles = TileRows(logits.mask, n, m, block_q, block_k)     # classified lazily

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
        for kb, label in zip(*tiles.row(qb)):
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
        run_max = np.where(np.isneginf(run_max), 0.0, run_max)
        if logits.sinks is not None:
            run_max, run_sum = merge_sinks(acc, run_max, run_sum, logits.sinks[hs, None])
        finish_rows(acc, run_max, run_sum,
                out[b, hs, r0:r0 + len(rows)], lse[b, hs, r0:r0 + len(rows)])

    items = [(b, hk, hs, qb) for b, hk, hs in pb.kv_groups() for qb in range(tiles.n_rows)]
    work = float(tiles.grid_tiles) * block_q * block_k * pb.batch * pb.heads_q  # at most
    run_items(run, items, workers, work)
    return out, lse


def online_softmax_tiles_backward(q, k, v, do, dlse, pb, logits, block_q: int,
                                  block_k: int, workers=None, parameter=None, saved=None):
    r"""The tiled backward (FlashAttention-2, Dao 2023, Algorithm 2) on validated flat
    inputs, ``do (B, Hq, N, Dv)`` and ``dlse (B, Hq, N)`` or None.

    Runs the forward for ``O`` and ``lse`` (unless ``saved`` holds them, flat, as a
    kernel saves them), takes ``D_i = rowsum(dO ∘ O) - dlse_i``, then
    for each key tile (one work item, owning its rows of ``dK``, ``dV``) visits the query
    tiles the mask leaves non-empty, recomputing ``P = exp(S - lse)`` per tile:
    ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - D)``, ``dK += dXᵀ Q``, ``dQ += dX K`` (under a
    lock, as the atomic adds of the GPU kernel), ``dX = dS ∘ ∂S/∂X``. ``parameter``: a
    score modifier's ``(grad, add, result)`` accumulator (:meth:`ScoreMod
    ._parameter_gradient`). With sink logits (``logits.sinks``, included in ``lse``) the
    loop is unchanged and ``dsinks = -Σ_i exp(s_h - lse_i) D_i``
    (:func:`refattn._core.backward.sink_gradient`). Working memory: a few
    ``(G, block_q, block_k)`` tiles per worker beyond inputs, outputs and gradients.
    Returns flat ``dq, dk, dv`` and ``dsinks (Hq,)`` (None without sinks).
    """
    n, m = pb.n, pb.m
    out, lse = saved or online_softmax_tiles(q, k, v, pb, logits, block_q, block_k, workers)
    delta = np.einsum("bhnd,bhnd->bhn", do, out)
    del out
    if dlse is not None:
        delta -= dlse
    dsinks = None if logits.sinks is None else sink_gradient(logits.sinks, lse, delta)
    lse = np.where(np.isneginf(lse), np.inf, lse)      # empty rows: P = exp(-inf) = 0
    tiles = TileRows(logits.mask, n, m, block_q, block_k)
    key_ptr, query_tiles, labels = tiles.columns()      # the visited tiles, key-major
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    lock = threading.Lock()

    def run(item):
        b, hk, hs, kb = item
        heads = np.arange(hs.start, hs.stop)
        cols = np.arange(kb * block_k, min((kb + 1) * block_k, m))
        kt, vt = k[b, hk, cols[0]:cols[-1] + 1], v[b, hk, cols[0]:cols[-1] + 1]
        dkt, dvt = np.zeros(kt.shape), np.zeros(vt.shape)
        for pair in range(key_ptr[kb], key_ptr[kb + 1]):
            qb = query_tiles[pair]
            rs = slice(qb * block_q, min((qb + 1) * block_q, n))
            rows = np.arange(rs.start, rs.stop)
            qt, dot = q[b, hs, rs] * logits.scale, do[b, hs, rs]
            s, chain = logits.block(qt, kt, b, heads, rows, cols,
                                    apply_mask=labels[pair] != FULL, derivative=True)
            s -= lse[b, hs, rs][..., None]
            p = np.exp(s, out=s)
            dvt += head_summed_product(p, dot)
            ds = dot @ vt.T                                # dP, then dS in place
            ds -= delta[b, hs, rs][..., None]
            ds *= p
            if chain is not None:
                ds_logit, ds = ds, ds * chain
            else:
                ds_logit = ds
            dkt += head_summed_product(ds, qt)
            with lock:
                dq[b, hs, rs] += (ds @ kt) * logits.scale
                if parameter is not None:
                    parameter[1](parameter[0], ds_logit, b, heads, rows, cols, n, m)
        dk[b, hk, cols[0]:cols[-1] + 1], dv[b, hk, cols[0]:cols[-1] + 1] = dkt, dvt

    items = [(b, hk, hs, kb) for b, hk, hs in pb.kv_groups()
             for kb in range(tiles.n_cols) if key_ptr[kb + 1] > key_ptr[kb]]
    visited = float(len(query_tiles)) * block_q * block_k * pb.batch * pb.heads_q
    run_items(run, items, workers, visited)
    return dq, dk, dv, dsinks
