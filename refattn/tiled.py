r"""Exact attention in tiles with the online softmax (FlashAttention, Dao et al. 2022).

For each block of queries the key blocks are visited in order, keeping per row a
running maximum :math:`m`, normaliser :math:`\ell` and unnormalised output :math:`a`:

.. math::

    m' = \max(m, \max_j S_{ij}), \quad
    \ell' = e^{m - m'} \ell + \sum_j e^{S_{ij} - m'}, \quad
    a' = e^{m - m'} a + \sum_j e^{S_{ij} - m'} v_j,

and finally :math:`o = a / \ell`, :math:`\text{lse} = m + \log \ell`. The result equals
dense attention up to float64 rounding, while the working memory is a few
``(block_q, block_k)`` tiles per worker thread, independent of ``N`` and ``M``. Tiles
that the mask classifies as empty are skipped; full tiles skip mask evaluation.
"""
from __future__ import annotations

import threading

import numpy as np

from ._inputs import prepare_qkv
from ._logits import make_logits
from .exact import _finish
from .masks import FULL, PARTIAL
from .registry import register
from ._threads import run_items

__all__ = ["tiled_attention"]

#: Default number of logits in one tile (``G * block_q * block_k``): 4 MiB of float64,
#: large enough for efficient matrix products and small enough to stay in cache.
TILE_ELEMENTS = 2**19
DEFAULT_BLOCK_K = 1024


def _check_block(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


@register(family="exact", exact=True, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True,
          implied="_implied_probs", example={"block_q": 3, "block_k": 5})
def tiled_attention(q, k, v, *, block_q=None, block_k=None, mask=None, causal=False,
                    scale=None, bias=None, softcap=None, return_lse=False,
                    check_finite=True, workers=None):
    """Exact softmax attention with O(block) working memory (FlashAttention's algorithm).

    Same arguments and result as :func:`refattn.attention`, plus:

    block_q, block_k : tile sizes in queries and keys (neither needs to divide ``N`` or
        ``M``); by default :func:`default_blocks` (``block_k = 1024`` and ``block_q`` such
        that a tile of all ``G = Hq / Hkv`` heads sharing a KV head holds about
        ``TILE_ELEMENTS`` logits; smaller square tiles under a mask at short lengths).
    workers : threads working on different query blocks (default: the cores available
        to this process; 1 for small problems). While they run, the BLAS library is
        limited to one thread each.

    Working memory beyond inputs and outputs: about ``3 * G * block_q * block_k`` float64
    per worker (a logit tile, its mask and a scaled query block): O(block) in N and M.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 4, 100, 16))            # 4 heads
    >>> out = ra.tiled_attention(q, k[:1], v[:1], block_q=32, block_k=48, causal=True)
    >>> bool(np.allclose(out, ra.attention(q, k[:1], v[:1], causal=True), rtol=1e-12))
    True
    """
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    block_q, block_k = default_blocks(pb, logits.mask is not None, block_q, block_k)
    out, lse = online_softmax_tiles(q, k, v, pb, logits, block_q, block_k,
                                    _check_block("workers", workers))
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


def default_blocks(pb, masked: bool, block_q=None, block_k=None) -> tuple[int, int]:
    """Tile sizes: ``block_k = 1024`` and ``block_q`` filling ``TILE_ELEMENTS`` logits
    with all ``G`` heads of a KV head; with a mask, square tiles of at most a quarter of
    ``M`` (at least 128), so that tiles the mask empties can be skipped at short lengths."""
    block_k = _check_block("block_k", block_k)
    block_q = _check_block("block_q", block_q)
    if block_k is None:
        block_k = DEFAULT_BLOCK_K
        if masked:
            block_k = max(128, min(block_k, 1 << max(0, (pb.m // 4).bit_length() - 1)))
        block_k = max(1, min(pb.m, block_k))
    if block_q is None:
        block_q = TILE_ELEMENTS // (pb.group * block_k)
        if masked:
            block_q = min(block_q, block_k)
        block_q = max(1, min(pb.n, block_q))
    return block_q, block_k


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
        b, hk, qb = item
        hs = slice(hk * g, (hk + 1) * g)
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
        _finish(acc, np.where(np.isneginf(run_max), 0.0, run_max), run_sum,
                out[b, hs, r0:r0 + len(rows)], lse[b, hs, r0:r0 + len(rows)])

    items = [(b, hk, qb) for b in range(pb.batch) for hk in range(pb.heads_kv)
             for qb in range(n_q_tiles)]
    visited = float(len(key_tiles)) * block_q * block_k * pb.batch * pb.heads_q
    run_items(run, items, workers, visited)
    return out, lse


def _implied_probs(q, k, *, block_q=None, block_k=None, workers=None, **kwargs):
    """Tiled attention computes exactly the dense attention matrix."""
    from .exact import attention_probs
    return attention_probs(q, k, **kwargs)
