r"""Fixed sparse patterns: strided and fixed (Sparse Transformer), block-sparse layouts,
BigBird and Longformer. Each is exact attention under its mask, computed by
:func:`refattn.sparse_attention`; ``fn.mask(**params)`` gives that mask.
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .._core.checks import check_count
from ._common import pattern
from .engine import sparse_attention

__all__ = ["strided_attention", "fixed_attention", "block_sparse_attention",
           "bigbird_attention", "longformer_attention"]


def _strided_mask(stride):
    check_count("stride", stride, minimum=1)
    return masks.sliding_window(stride - 1, right=stride - 1) | masks.strided(stride)


@pattern(_strided_mask, time="O(N·(s + N/s)·D)", state="O((s + N/s)·D)",
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


@pattern(masks.fixed, time="O(N·(l + c·N/l)·D)", state="O((l + c·N/l)·D)",
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
    return sparse_attention(q, k, v, masks.fixed(block, summary), **options)


def _band_layout(n, block_size):
    """Block layout for ``n`` positions, sparse (SciPy CSR): each block row keeps its
    diagonal block and the blocks on either side (3 blocks, ~3·block_size keys per
    query)."""
    import scipy.sparse
    blocks = -(-n // block_size)
    return scipy.sparse.diags_array([np.ones(max(blocks - abs(d), 0), np.int8)
                                     for d in (-1, 0, 1)], offsets=[-1, 0, 1],
                                    shape=(blocks, blocks), format="csr", dtype=np.int8)


def _block_layout_mask(block_layout, block_size):
    return masks.block_layout(block_layout, block_size)


@pattern(_block_layout_mask, time="O(nnz blocks·b²·D)", state="O(N·D)",
          example={"block_layout": np.tril(np.ones((14, 14), bool)), "block_size": 3},
          budget=lambda n, b: {"block_layout": _band_layout(n, max(1, b // 3)),
                               "block_size": max(1, b // 3)})
def block_sparse_attention(q, k, v, *, block_layout, block_size, **options):
    """Block-sparse attention over an arbitrary boolean ``block_layout``
    (:func:`refattn.masks.block_layout`; Child et al. 2019, Gray et al. 2017): the kept
    blocks of a ``(ceil(M / block_size), ceil(M / block_size))`` boolean array or SciPy
    sparse array. (``layout=`` is the tensor layout every mechanism takes.)

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4))
    >>> blocks = np.array([[1, 0], [1, 1]], bool)
    >>> out = ra.block_sparse_attention(q, k, v, block_layout=blocks, block_size=4)
    >>> bool(np.allclose(out[0, :4], ra.attention(q[:, :4], k[:, :4], v[:, :4])[0]))
    True
    """
    options.setdefault("block_q", block_size)   # tiles aligned with the layout's blocks
    options.setdefault("block_k", block_size)
    return sparse_attention(q, k, v, _block_layout_mask(block_layout, block_size),
                            **options)


def _bigbird_mask(block_size, window_blocks=1, global_blocks=1, random_blocks=2, rng=None):
    if rng is None:
        raise TypeError("bigbird_attention needs rng (an int seed or a numpy Generator) "
                        "for its random blocks")
    block_size = check_count("block_size", block_size, minimum=1)
    g = check_count("global_blocks", global_blocks) * block_size
    return (masks.block_window(check_count("window_blocks", window_blocks), block_size)
            | masks.global_tokens(np.arange(g))
            | masks.random_blocks(random_blocks, block_size, rng))


@pattern(_bigbird_mask, time="O(N·b·(w + g + r)·D)", state="O(N·D)",
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
    window = check_count("window", window)
    return masks.sliding_window(window, right=window, dilation=dilation) | \
        masks.global_tokens(global_tokens)


@pattern(_longformer_mask, time="O(N·(w + g)·D)", state="O(N·D)",
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
