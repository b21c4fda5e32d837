"""Spatial-reduction attention (PVT): keys and values average-pooled over blocks of
the grid, then full attention to the pooled tokens. Holds the pooling, the forward
(:func:`spatial_reduction_attention`) and its implied matrix over the original keys.
"""
from __future__ import annotations

import numpy as np

from ..exact.dense import attention_probs
from ..exact.tiled import tiled_attention, tiled_attention_vjp
from ..registry import attach, register
from ._common import _Grid, _int_tuple, flatten_grid

__all__ = ["spatial_reduction_attention", "spatial_reduction_attention_vjp"]


def _pool(x, ratio):
    """Mean over blocks of ``ratio`` along the last ``len(ratio)`` axes before the
    feature axis; a short last block (axis not divisible) averages the tokens it has."""
    nd = len(ratio)
    for a, r in enumerate(ratio):
        axis = x.ndim - 1 - nd + a
        length = x.shape[axis]
        starts = np.arange(0, length, r)
        counts = np.diff(np.append(starts, length)).astype(np.float64)
        x = np.add.reduceat(x, starts, axis=axis) / counts.reshape(
            (-1,) + (1,) * (x.ndim - 1 - axis))
    return x


def _pool_vjp(g, ratio, grid):
    """The adjoint of :func:`_pool`: ``g`` over the pooled grid (last ``len(ratio)``
    axes before the feature axis) spread back onto ``grid``, each block's gradient
    divided by its size and given to every token of the block."""
    nd = len(ratio)
    for a, (r, length) in enumerate(zip(ratio, grid)):
        axis = g.ndim - 1 - nd + a
        block = np.arange(length) // r
        counts = np.bincount(block).astype(np.float64)
        g = np.take(g, block, axis=axis) / counts[block].reshape(
            (-1,) + (1,) * (g.ndim - 1 - axis))
    return g


def _pool_matrix(grid, ratio):
    """``P (M', M)`` with ``pool(x).flatten() = P @ x.flatten()`` over the grid."""
    p = np.ones((1, 1))
    for length, r in zip(grid, ratio):
        block = np.arange(length) // r
        pa = (block[None, :] == np.arange(block[-1] + 1)[:, None]).astype(np.float64)
        p = np.kron(p, pa / pa.sum(1, keepdims=True))
    return p


def _sra_probs(q, k, ratio, *, scale=None, softcap=None, check_finite=True):
    """The implied matrix of :func:`spatial_reduction_attention` over the original
    keys: ``softmax(q pool(k)^T) P`` with ``P`` the pooling matrix, ``(..., Hq, N, M)``."""
    rt = _int_tuple("ratio", ratio, None)
    g = _Grid(q, k, None, len(rt), check_finite=check_finite, same_grid=False)
    pooled = _pool(g.grid_k, rt)
    kp = flatten_grid(pooled, len(rt))
    return attention_probs(g.q, kp, scale=scale, softcap=softcap,
                           check_finite=check_finite) @ _pool_matrix(g.k_grid, rt)


@register(family="vision", exact=False, time="O(N·(M/r^d)·D)", state="O((M/r^d)·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=False,
          example={"ratio": (2,)})
def spatial_reduction_attention(q, k, v, ratio, *, cls_tokens=None, scale=None,
                                softcap=None, return_lse=False, check_finite=True):
    r"""Spatial-reduction attention (PVT): keys and values average-pooled over
    ``r x r`` blocks, then full attention to the pooled tokens.

    .. math:: o_t = \operatorname{softmax}_j\big(q_t \cdot \bar k_j \cdot
              \text{scale}\big)\, \bar v_j, \qquad
              \bar k_j = \frac{1}{|B_j|}\sum_{u \in B_j} k_u,\
              \bar v_j = \frac{1}{|B_j|}\sum_{u \in B_j} v_u

    over the ``ceil(S / r)`` blocks ``B_j`` of the key grid. Wang et al. 2021, "Pyramid
    Vision Transformer" (SRA; PVT v1 reduces with a learned strided convolution, PVT v2's
    linear SRA with average pooling -- apply a learned reduction yourself and call
    :func:`refattn.attention` for the former).

    q : ``(..., Hq, *Sq, D)``; k, v : ``(..., Hkv, *Sk, D)``, ``(..., Hkv, *Sk, Dv)``
    (``Sq`` and ``Sk`` may differ). ratio : int (2-D) or tuple, ``>= 1`` per axis.
    **Padding rule**: when ``r`` does not divide an axis, the last block is shorter and
    averages the tokens it has (average pooling with ``ceil_mode=True``,
    ``count_include_pad=False``); a ratio larger than an axis pools it to one token.
    cls_tokens : global tokens (:mod:`refattn.vision`), not pooled: every query attends to
    them and CLS queries attend to the pooled keys. scale, softcap, return_lse,
    check_finite : as :func:`refattn.attention` (computed with
    :func:`refattn.tiled_attention`, bounded memory).

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 6, 4))
    >>> out = spatial_reduction_attention(q, k, v, 3)                   # 4 pooled keys
    >>> kp = k.reshape(1, 2, 3, 2, 3, 4).mean((2, 4)).reshape(1, 4, 4)
    >>> vp = v.reshape(1, 2, 3, 2, 3, 4).mean((2, 4)).reshape(1, 4, 4)
    >>> from refattn import attention
    >>> bool(np.allclose(out.reshape(1, 36, 4), attention(q.reshape(1, 36, 4), kp, vp)))
    True
    """
    rt = _int_tuple("ratio", ratio, None)
    nd = len(rt)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens,
              same_grid=False)
    kp, vp = _pool(g.grid_k, rt), _pool(g.grid_v, rt)
    kp, vp = flatten_grid(kp, nd), flatten_grid(vp, nd)
    qf = g.q
    if g.num_global:
        kp = np.concatenate([g.cls[1], np.broadcast_to(kp, g.batch + kp.shape[-3:])], -2)
        vp = np.concatenate([g.cls[2], np.broadcast_to(vp, g.batch + vp.shape[-3:])], -2)
    out, lse = tiled_attention(qf, kp, vp, scale=scale, softcap=softcap, return_lse=True,
                               check_finite=check_finite)
    return g.finish(out, lse, return_lse)


def spatial_reduction_attention_vjp(q, k, v, grad_out, *, ratio, cls_tokens=None,
                                    scale=None, softcap=None, grad_lse=None,
                                    check_finite=True):
    r"""Gradients of :func:`spatial_reduction_attention` (no discrete choice: the
    pooling is linear). With the pooled keys and values :math:`\bar K = \Pi K`,
    :math:`\bar V = \Pi V` (``Π`` the average pooling over the blocks ``B_j``, a short
    last block averaging the tokens it has), the softmax backward of
    :func:`refattn.tiled_attention_vjp` gives ``dq``, :math:`d\bar K`, :math:`d\bar V`,
    then back through the pooling

    .. math:: dk_u = \frac{d\bar K_{j(u)}}{|B_{j(u)}|}, \qquad
              dv_u = \frac{d\bar V_{j(u)}}{|B_{j(u)}|}

    (``j(u)`` the block of key token ``u``; ``dK = Πᵀ d\bar K``). ``ratio`` is given by
    keyword; ``grad_out`` has the grid output's shape ``(..., Hq, *Sq, Dv)``,
    ``grad_lse`` ``(..., Hq, *Sq)`` or None. Returns ``{"q", "k", "v"}`` float64 in the
    grids' shapes (GQA and broadcast batch dims summed); with ``cls_tokens``, ``grad_out``
    is the pair ``(grid, cls)`` the forward returns and ``"cls_tokens"`` holds their
    gradients. FlashAttention-2's tiled backward: O(block) memory.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 4, 4, 2))
    >>> g = ra.vjp("spatial_reduction_attention", q, k, v, np.ones((1, 4, 4, 2)), ratio=1)
    >>> flat = ra.vjp("attention", *(x.reshape(1, 16, 2) for x in (q, k, v)),
    ...               np.ones((1, 16, 2)))
    >>> all(np.allclose(g[x], flat[x].reshape(g[x].shape)) for x in "qkv")   # ratio 1
    True
    """
    rt = _int_tuple("ratio", ratio, None)
    nd = len(rt)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens,
              same_grid=False)
    do, dlse = g.flat_cotangents(grad_out, grad_lse, check_finite)
    kp, vp = _pool(g.grid_k, rt), _pool(g.grid_v, rt)
    pooled = kp.shape, vp.shape
    kp, vp = flatten_grid(kp, nd), flatten_grid(vp, nd)
    if g.num_global:                     # the same sequences as the forward
        kp = np.concatenate([g.cls[1], np.broadcast_to(kp, g.batch + kp.shape[-3:])], -2)
        vp = np.concatenate([g.cls[2], np.broadcast_to(vp, g.batch + vp.shape[-3:])], -2)
    grads = tiled_attention_vjp(g.q, kp, vp, do, grad_lse=dlse, scale=scale,
                                softcap=softcap, check_finite=check_finite)
    out = {"q": g.grid_gradient(grads["q"], g.grid_q.shape)}
    for name, shape in zip("kv", pooled):   # pooled grids back to the caller's, unpooled
        pooled_grad = g.grid_gradient(grads[name], shape)
        out[name] = _pool_vjp(pooled_grad, rt, g.k_grid)
    if g.num_global:
        out["cls_tokens"] = g.cls_gradients(grads["q"], grads["k"], grads["v"])
    return out


attach(spatial_reduction_attention, implied=_sra_probs, vjp=spatial_reduction_attention_vjp)
