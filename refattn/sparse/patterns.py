r"""Fixed sparse patterns: strided and fixed (Sparse Transformer), block-sparse layouts,
BigBird and Longformer. Each is exact attention under its mask, computed by
:func:`refattn.sparse_attention`; ``fn.mask(**params)`` gives that mask.
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .._core.checks import check_count
from ..boundary.arrays import to_float64
from ..exact.dense import attention_probs
from ..masks.layouts import bigbird_layout
from ..registry import attach, register
from ._common import pattern
from .engine import sparse_attention, sparse_attention_vjp

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


def _registered(factory, implied, vjp, **register_kwargs):
    """Register a mask-defined mechanism as :func:`refattn.sparse._common.pattern` does,
    with its own implied matrix and VJP (for masks built from more than the parameters:
    the heads of ``q``, separate global projections)."""
    def deco(fn):
        fn.mask = factory
        fn = register(family="sparse", exact=False, supports_causal=True,
                      supports_mask=False, supports_gqa=True, position_free=False,
                      mask=factory, **register_kwargs)(fn)
        implied.__name__, vjp.__name__ = f"{fn.__name__}_matrix", f"{fn.__name__}_vjp"
        attach(fn, implied=implied, vjp=vjp)
        return fn
    return deco


def _query_heads(q):
    """``Hq`` of ``q (..., Hq, N, D)`` (None when ``q`` has fewer dimensions)."""
    shape = tuple(getattr(q, "shape", None) or np.shape(q))
    return int(shape[-3]) if len(shape) >= 3 else None


def _bigbird_mask(block_size, window_blocks=1, global_blocks=1, global_at="ends",
                  random_blocks=None, rng=None, random_indices=None, heads=None):
    if rng is None and random_indices is None:
        raise TypeError("bigbird_attention needs rng (an int seed or a numpy Generator) "
                        "for its random blocks, or random_indices (H, R, r)")
    return bigbird_layout(block_size, window_blocks=window_blocks,
                          global_blocks=global_blocks, global_at=global_at,
                          random_blocks=random_blocks, rng=rng,
                          random_indices=random_indices, heads=heads)


def _bigbird_heads(q, params):
    """The mask of a call on ``q``: drawn layouts for its ``Hq`` heads, given ones
    checked against them."""
    heads = _query_heads(q)
    given = params.get("random_indices")
    if given is not None and heads is not None:
        h = np.shape(given)[0] if np.ndim(given) == 3 else 1
        if h not in (1, heads):
            raise ValueError(f"random_indices of shape {np.shape(given)} has {h} heads; q "
                             f"{tuple(np.shape(q))} has Hq={heads} (give 1 or Hq)")
    return _bigbird_mask(**params, heads=heads)


def _bigbird_matrix(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                    sinks=None, check_finite=True, memory_budget=None, method=None,
                    block_q=None, block_k=None, workers=None, **params):
    return attention_probs(q, k, mask=_bigbird_heads(q, params), causal=causal,
                           scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                           check_finite=check_finite, memory_budget=memory_budget)


def _bigbird_vjp(q, k, v, grad_out, *, grad_lse=None, causal=False, scale=None, bias=None,
                 softcap=None, sinks=None, check_finite=True, method="auto", block_q=None,
                 block_k=None, workers=None, **params):
    block = params.get("block_size")
    return sparse_attention_vjp(q, k, v, grad_out, mask=_bigbird_heads(q, params),
                                grad_lse=grad_lse, causal=causal, scale=scale, bias=bias,
                                softcap=softcap, sinks=sinks, check_finite=check_finite, method=method,
                                block_q=block_q or block, block_k=block_k or block,
                                workers=workers)


@_registered(_bigbird_mask, _bigbird_matrix, _bigbird_vjp,
             time="O(N·b·(w + g + r)·D)", state="O(N·D)",
             example={"block_size": 2, "window_blocks": 1, "global_blocks": 1,
                      "random_blocks": 1},
             budget=lambda n, b: {"block_size": max(1, b // 7), "window_blocks": 1,
                                  "global_blocks": 1, "random_blocks": 2})
def bigbird_attention(q, k, v, *, block_size, window_blocks=1, global_blocks=1,
                      global_at="ends", random_blocks=None, rng=None, random_indices=None,
                      **options):
    r"""BigBird (Zaheer et al. 2020), ITC form, as published: exact attention under
    :func:`refattn.masks.layouts.bigbird_layout`, in blocks of ``block_size``
    positions (``nb = ceil(M / block_size)``):

    * the first and last ``global_blocks`` blocks are global (``global_at="ends"``, the
      paper, its code and HuggingFace): their queries attend to every key and every
      query attends to their keys; ``global_at="start"`` makes only the first
      ``global_blocks`` blocks global (refattn's layout before);
    * every other query block keeps the blocks within ``window_blocks`` of its own
      (a blocked sliding window) and ``random_blocks`` (default 2) random key blocks **per
      query head**, drawn without replacement among the blocks it does not keep already,
      so that a row keeps :math:`(2w + 1 + 2g + r)` blocks away from the edges; drawn
      from ``rng`` (an int seed or a ``numpy.random.Generator``), or given as
      ``random_indices``, an integer array ``(H, nb - #global, r)`` (or ``(nb - #global,
      r)`` for every head) of key blocks per non-global query block, ascending --
      HuggingFace's ``rand_attn`` -- to reproduce a model's pattern. Give ``rng`` or
      ``random_indices``.

    ``H`` is 1 or the query heads ``Hq``. The mask for a call with ``Hq`` heads is
    ``bigbird_attention.mask(..., heads=Hq)`` (without ``heads`` it keeps the same keys,
    its tiles are just classified conservatively). Equal to HuggingFace's
    ``BigBirdBlockSparseAttention`` (training mode) given its ``rand_attn``, up to
    rounding: ``tests/test_bigbird_published.py``. Gradients: the sparse engine's
    (``refattn.vjp("bigbird_attention", ...)``), the blocks held fixed.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 64, 8))
    >>> out = ra.bigbird_attention(q, k, v, block_size=8, rng=0)
    >>> mask = ra.bigbird_attention.mask(block_size=8, rng=0, heads=2)
    >>> bool(np.allclose(out, ra.attention(q, k, v, mask=mask), rtol=1e-12))
    True
    >>> keep = mask.materialize(64, 64, h=1)[::8, ::8].astype(int)   # one row per block
    >>> keep[0].tolist(), keep[3].tolist()
    ([1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1, 1])
    """
    options.setdefault("block_q", block_size)   # tiles aligned with the pattern's blocks
    options.setdefault("block_k", block_size)
    params = dict(block_size=block_size, window_blocks=window_blocks,
                  global_blocks=global_blocks, global_at=global_at,
                  random_blocks=random_blocks, rng=rng, random_indices=random_indices)
    return sparse_attention(q, k, v, _bigbird_heads(q, params), **options)


def _longformer_mask(window, global_tokens=(), dilation=1):
    window = check_count("window", window)
    return masks.sliding_window(window, right=window, dilation=dilation) | \
        masks.global_tokens(global_tokens)


_GLOBAL_PROJECTIONS = ("q_global", "k_global", "v_global")


class _GlobalSplit:
    """Longformer with separate global projections: the local rows (window and global
    keys, with ``q, k, v``) and the global rows (every key, with the global
    projections), as two masks on the sparse engine."""

    def __init__(self, q, k, v, projections, window, global_tokens=(), dilation=1):
        window = check_count("window", window)
        self.local = (masks.sliding_window(window, right=window, dilation=dilation)
                      | masks.global_tokens(global_tokens, queries=False))
        self.rows = masks.global_tokens(global_tokens, keys=False)
        self.given = {name: x for name, x in projections.items() if x is not None}
        base = dict(q_global=q, k_global=k, v_global=v)
        for name, x in self.given.items():
            want, got = tuple(np.shape(base[name])), tuple(np.shape(x))
            if want != got:
                raise ValueError(f"longformer_attention: {name} must have the shape of "
                                 f"{name[0]} {want}, got {got}")
        self.q, self.k, self.v = (projections[n] if projections[n] is not None else x
                                  for n, x in zip(_GLOBAL_PROJECTIONS, (q, k, v)))
        n, m = np.shape(q)[-2], np.shape(k)[-2]
        self.is_global = np.isin(np.arange(n) + (m - n), self.rows.indices)

    def pick(self, local, glob, vector=True):
        """Rows of the global queries from ``glob``, the others from ``local``."""
        rows = self.is_global[:, None] if vector else self.is_global
        return np.where(rows, glob, local)


def _projections(params):
    """The global projections among ``params`` (removed from it), or None."""
    found = {name: params.pop(name, None) for name in _GLOBAL_PROJECTIONS}
    return found if any(x is not None for x in found.values()) else None


def _longformer_matrix(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                       sinks=None, check_finite=True, memory_budget=None, method=None,
                       block_q=None, block_k=None, workers=None, **params):
    found = _projections(params)
    opts = dict(causal=causal, scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                check_finite=check_finite, memory_budget=memory_budget)
    if found is None:
        return attention_probs(q, k, mask=_longformer_mask(**params), **opts)
    if found["v_global"] is not None:
        raise NotImplementedError(
            "longformer_attention with v_global has no implied matrix: its global rows "
            "average v_global, the others v, so the output is not A @ v")
    split = _GlobalSplit(q, k, k, found, **params)
    return split.pick(attention_probs(q, k, mask=split.local, **opts),
                      attention_probs(split.q, split.k, mask=split.rows, **opts))


def _longformer_vjp(q, k, v, grad_out, *, grad_lse=None, causal=False, scale=None,
                    bias=None, softcap=None, sinks=None, check_finite=True, method="auto",
                    block_q=None, block_k=None, workers=None, **params):
    opts = dict(causal=causal, scale=scale, bias=bias, softcap=softcap, sinks=sinks,
                check_finite=check_finite, method=method, block_q=block_q,
                block_k=block_k, workers=workers)
    found = _projections(params)
    if found is None:
        return sparse_attention_vjp(q, k, v, grad_out, mask=_longformer_mask(**params),
                                    grad_lse=grad_lse, **opts)
    split = _GlobalSplit(q, k, v, found, **params)
    do = to_float64(grad_out, "grad_out", check_finite=check_finite)
    dlse = None if grad_lse is None else to_float64(grad_lse, "grad_lse",
                                                    check_finite=check_finite)
    zero = np.zeros((), np.float64)
    local = sparse_attention_vjp(
        q, k, v, split.pick(do, zero), mask=split.local, **opts,
        grad_lse=None if dlse is None else split.pick(dlse, zero, vector=False))
    glob = sparse_attention_vjp(
        split.q, split.k, split.v, split.pick(zero, do), mask=split.rows, **opts,
        grad_lse=None if dlse is None else split.pick(zero, dlse, vector=False))
    grads = {}
    for name in local:
        if f"{name}_global" in split.given:
            grads[name], grads[f"{name}_global"] = local[name], glob[name]
        else:                   # the same array in both parts (q, k, v, a bias)
            grads[name] = local[name] + glob[name]
    return grads


@_registered(_longformer_mask, _longformer_matrix, _longformer_vjp,
             time="O(N·(w + g)·D)", state="O(N·D)", tokens=_GLOBAL_PROJECTIONS,
             example={"window": 2, "global_tokens": [0], "dilation": [1, 2]},
             budget=lambda n, b: {"window": b // 2, "global_tokens": [0]})
def longformer_attention(q, k, v, *, window, global_tokens=(), dilation=1, q_global=None,
                         k_global=None, v_global=None, **options):
    r"""Longformer (Beltagy et al. 2020): a symmetric sliding window of ``window``
    positions each side, dilated per head if ``dilation`` is a sequence, plus global
    tokens (positions in ``global_tokens``) that attend to every key and are attended by
    every query.

    **Global projections** (the paper's Sec. 3.1 and HuggingFace's
    ``LongformerSelfAttention``): ``q_global``, ``k_global``, ``v_global``, shaped like
    ``q``, ``k``, ``v`` (each defaults to its local counterpart). A global token's row
    is then :math:`\operatorname{softmax}(s\, q^g_i K_g^\top) V_g` over every key;
    every other row keeps its window and the global keys with the local ``q, k, v``:

    .. math:: o_i = \begin{cases}
              \operatorname{softmax}_{j}(s\, q^g_i \cdot k^g_j)\, v^g_j & i' \in G \\
              \operatorname{softmax}_{j \in W(i) \cup G}(s\, q_i \cdot k_j)\, v_j
              & \text{otherwise}.\end{cases}

    Equal to HuggingFace's ``LongformerSelfAttention`` given the same projections
    (``tests/test_longformer_global.py``). Gradients (``refattn.vjp``) include
    ``q_global``, ``k_global``, ``v_global`` for those given; the implied matrix
    exists without ``v_global`` only.

    >>> import numpy as np, refattn as ra
    >>> keep = ra.longformer_attention.mask(window=1, global_tokens=[0]).materialize(6, 6)
    >>> keep.astype(int)[3], keep.astype(int)[0]
    (array([1, 0, 1, 1, 1, 0]), array([1, 1, 1, 1, 1, 1]))
    >>> q, k, v, qg = np.random.default_rng(0).standard_normal((4, 1, 6, 4))
    >>> out = ra.longformer_attention(q, k, v, window=1, global_tokens=[0], q_global=qg)
    >>> bool(np.allclose(out[:, 0], ra.attention(qg[:, :1], k, v)[:, 0], rtol=1e-12))
    True
    """
    mask = _longformer_mask(window, global_tokens, dilation)
    found = _projections(dict(q_global=q_global, k_global=k_global, v_global=v_global))
    if found is None:
        return sparse_attention(q, k, v, mask, **options)
    split = _GlobalSplit(q, k, v, found, window, global_tokens, dilation)
    return_lse = options.pop("return_lse", False)
    out, lse = sparse_attention(q, k, v, split.local, return_lse=True, **options)
    out_g, lse_g = sparse_attention(split.q, split.k, split.v, split.rows,
                                    return_lse=True, **options)
    out, lse = split.pick(out, out_g), split.pick(lse, lse_g, vector=False)
    return (out, lse) if return_lse else out
