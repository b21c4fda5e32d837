r"""Exact attention in tiles with the online softmax (FlashAttention, Dao et al. 2022).

For each block of queries the key blocks are visited in order, keeping per row a
running maximum :math:`m`, normaliser :math:`\ell` and unnormalised output :math:`a`:

.. math::

    m' = \max(m, \max_j S_{ij}), \quad
    \ell' = e^{m - m'} \ell + \sum_j e^{S_{ij} - m'}, \quad
    a' = e^{m - m'} a + \sum_j e^{S_{ij} - m'} v_j,

and finally :math:`o = a / \ell`, :math:`\text{lse} = m + \log \ell` (learned sink
logits, ``sinks=``, join :math:`m` and :math:`\ell` once the key blocks are done,
as one more key without a value: :func:`refattn.attention`). The result equals
dense attention up to float64 rounding, while the working memory is a few
``(block_q, block_k)`` tiles per worker thread, independent of ``N`` and ``M``. Tiles
that the mask classifies as empty are skipped; full tiles skip mask evaluation.
"""
from __future__ import annotations

from .._core.backward import softmax_backward
from .._core.checks import check_block
from .._core.logits import make_logits
from .._core.online import online_softmax_tiles, online_softmax_tiles_backward
from .._core.problem import prepare_qkv
from ..registry import attach, register

__all__ = ["tiled_attention", "tiled_attention_vjp"]

#: Default number of logits in one tile (``G * block_q * block_k``): 4 MiB of float64,
#: large enough for efficient matrix products and small enough to stay in cache.
TILE_ELEMENTS = 2**19
DEFAULT_BLOCK_K = 1024


@register(family="exact", exact=True, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True,
          example={"block_q": 3, "block_k": 5})
def tiled_attention(q, k, v, *, block_q=None, block_k=None, mask=None, causal=False,
                    scale=None, bias=None, softcap=None, sinks=None, return_lse=False,
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
                         softcap=softcap, check_finite=check_finite, sinks=sinks)
    block_q, block_k = default_blocks(pb, logits.mask is not None, block_q, block_k)
    out, lse = online_softmax_tiles(q, k, v, pb, logits, block_q, block_k,
                                    check_block("workers", workers))
    out, lse = pb.unflatten(out, lse)
    return (out, lse) if return_lse else out


def tiled_attention_vjp(q, k, v, grad_out, *, grad_lse=None, block_q=None, block_k=None,
                        mask=None, causal=False, scale=None, bias=None, softcap=None,
                        sinks=None, check_finite=True, workers=None, out=None, lse=None):
    """Gradients of :func:`tiled_attention` by FlashAttention-2's backward (Dao 2023,
    Algorithm 2): the forward again for ``O`` and ``lse``, ``D = rowsum(dO ∘ O) - dlse``,
    then per key tile over the non-empty query tiles ``P = exp(S - lse)``,
    ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - D)``, ``dK += dXᵀ Q``, ``dQ += dX K`` (the
    equations of :func:`refattn.exact.dense.attention_vjp`). The same gradients as the
    dense backward, in O(block) working memory beyond inputs, outputs and gradients;
    threads work on different key tiles. Arguments as :func:`tiled_attention`, plus
    ``grad_out`` ``(..., Hq, N, Dv)`` and ``grad_lse`` ``(..., Hq, N)``; ``out`` and
    ``lse``, the forward's results (``return_lse=True``), skip recomputing them, as a
    kernel that saved them does (give both or neither). With ``sinks``, also
    ``"sinks"``: ``-Σ_i exp(s_h - lse_i) D_i`` per head.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 50, 8))
    >>> do = np.random.default_rng(1).standard_normal((2, 50, 8))
    >>> a = ra.vjp("tiled_attention", q, k, v, do, block_q=16, block_k=8, causal=True)
    >>> b = ra.vjp("attention", q, k, v, do, causal=True)
    >>> all(np.allclose(a[x], b[x], rtol=1e-12, atol=1e-14) for x in "qkv")
    True
    """
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                          check_finite=check_finite)
    block_q, block_k = default_blocks(bw.pb, bw.logits.mask is not None, block_q, block_k)
    return bw.gradients(*online_softmax_tiles_backward(
        bw.q, bw.k, bw.v, bw.do, bw.dlse, bw.pb, bw.logits, block_q, block_k,
        check_block("workers", workers), bw.parameter, bw.saved(out, lse)))


def default_blocks(pb, masked: bool, block_q=None, block_k=None) -> tuple[int, int]:
    """Tile sizes: ``block_k = 1024`` and ``block_q`` filling ``TILE_ELEMENTS`` logits
    with all ``G`` heads of a KV head; with a mask, square tiles of at most a quarter of
    ``M`` (at least 128), so that tiles the mask empties can be skipped at short lengths."""
    block_k = check_block("block_k", block_k)
    block_q = check_block("block_q", block_q)
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


def _implied_probs(q, k, *, block_q=None, block_k=None, workers=None, **kwargs):
    """Tiled attention computes exactly the dense attention matrix."""
    from .dense import attention_probs
    return attention_probs(q, k, **kwargs)


attach(tiled_attention, implied=_implied_probs, vjp=tiled_attention_vjp)
