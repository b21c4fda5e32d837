"""Neighborhood attention (NATTEN): each token of a grid attends to the
``k_1 x ... x k_d`` tokens around it, optionally dilated and causal per axis. Holds the
mask (:func:`neighborhood_mask`), the forward (:func:`neighborhood_attention`, on the
sparse engine) and its implied matrix.
"""
from __future__ import annotations

import numpy as np

from ..exact.dense import attention_probs
from ..masks import Mask
from ..registry import attach, register
from ._common import _bool_tuple, _Grid, _grid_shape, _GridMask, _int_tuple

__all__ = ["neighborhood_attention", "neighborhood_mask"]


# ----------------------------------------------------------------- neighborhood mask
def _natten_window(length: int, kernel: int, dilation: int, causal: bool):
    """Per coordinate ``x`` of an axis, the first and last key coordinate of its
    neighborhood (keys in between with ``(u - x) % dilation == 0`` are kept)."""
    x = np.arange(length)
    g, j = x % dilation, x // dilation
    group_len = length // dilation + (g < length % dilation)   # tokens in x's group
    if causal:
        start = np.maximum(j - (kernel - 1), 0)
        return g + dilation * start, x
    start = np.clip(j - kernel // 2, 0, group_len - kernel)
    return g + dilation * start, g + dilation * (start + kernel - 1)


def neighborhood_mask(shape, kernel_size, dilation=1, causal=False) -> Mask:
    r"""Neighborhood attention (NATTEN) as a mask over the flattened grid ``shape``.

    On each axis of length ``L``, with kernel ``k`` and dilation ``d``, the tokens split
    into ``d`` dilation groups ``{x : x % d = g}``; a query at ``x`` (group ``g``, index
    ``i = x // d`` in it, group length ``L_g``) attends to the ``k`` group members with
    group indices ``s .. s + k - 1``,

    .. math:: s = \operatorname{clip}(i - \lfloor k/2 \rfloor,\ 0,\ L_g - k),

    i.e. the window centered on the query, shifted inwards at the borders so that every
    query sees exactly ``k`` keys per axis (``k^d`` in all); even ``k`` put
    ``k/2`` keys before the center and ``k/2 - 1`` after, as NATTEN does. ``causal``
    (per axis) keeps group indices ``max(0, i - k + 1) .. i`` instead. A key is kept iff
    it is in the neighborhood on every axis (Hassani et al. 2023, "Neighborhood
    Attention Transformer"; Hassani & Shi 2022, "Dilated Neighborhood Attention
    Transformer"). Requires ``kernel_size * dilation <= shape`` on every axis.

    >>> m = neighborhood_mask((5,), (3,))
    >>> m.materialize(5, 5).astype(int)
    array([[1, 1, 1, 0, 0],
           [1, 1, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 1, 1],
           [0, 0, 1, 1, 1]])
    >>> int(neighborhood_mask((6, 7), (3, 3), dilation=2).materialize(42, 42).sum(1).min())
    9
    """
    ks = _int_tuple("kernel_size", kernel_size, None)
    nd = len(ks)
    shape = _grid_shape(shape, nd)
    dil = _int_tuple("dilation", dilation, nd)
    cz = _bool_tuple("causal", causal, nd)
    for axis, (length, kk, dd) in enumerate(zip(shape, ks, dil)):
        if kk > length:
            raise ValueError(f"kernel_size {ks} is larger than the grid {shape} on axis "
                             f"{axis} ({kk} > {length}); every query needs a full window")
        if kk * dd > length:
            raise ValueError(f"kernel_size * dilation = {kk} * {dd} = {kk * dd} exceeds "
                             f"the grid {shape} on axis {axis} (size {length}); each "
                             f"dilation group must hold a full window: kernel_size * "
                             f"dilation <= size")
    lo, hi = zip(*(_natten_window(length, kk, dd, c)
                   for length, kk, dd, c in zip(shape, ks, dil, cz)))
    extra = ([f"dilation={dil}"] if any(d > 1 for d in dil) else []) + (
        [f"causal={cz}"] if any(cz) else [])
    name = f"neighborhood_mask({shape}, kernel_size={ks}" + "".join(
        ", " + e for e in extra) + ")"
    return _GridMask(shape, lo, hi, dil, name)


# --------------------------------------------------------------- neighborhood attention
def _na_args(kernel_size, dilation, causal):
    ks = _int_tuple("kernel_size", kernel_size, None)
    return len(ks), ks, _int_tuple("dilation", dilation, len(ks)), \
        _bool_tuple("causal", causal, len(ks))


def _na_probs(q, k, kernel_size, *, dilation=1, causal=False, scale=None, bias=None,
              softcap=None, check_finite=True, method=None, block_q=None, block_k=None,
              workers=None):
    """The dense attention matrix of :func:`neighborhood_attention` over the flattened
    grid, ``(..., Hq, N, N)`` with ``N = prod(grid)``."""
    nd, ks, dil, cz = _na_args(kernel_size, dilation, causal)
    g = _Grid(q, k, None, nd, check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=neighborhood_mask(g.q_grid, ks, dil, cz),
                           scale=scale, bias=bias, softcap=softcap,
                           check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·k^d·D)", state="O(N·D)",
          supports_causal=True, supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=True, self_attention_only=True,
          example={"kernel_size": (1,)})
def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, causal=False,
                           cls_tokens=None, scale=None, bias=None, softcap=None,
                           return_lse=False, check_finite=True, method="auto", block_q=None,
                           block_k=None, workers=None):
    r"""Neighborhood attention (NATTEN) in 1, 2 or 3 (any number of) spatial dimensions.

    Each query attends to the ``k_1 x ... x k_d`` keys around it: on every axis the
    window of ``kernel_size`` tokens centered on the query, with its center clamped at
    the borders so that every query sees a full window, taken within the query's
    dilation group (tokens ``dilation`` apart) -- :func:`neighborhood_mask`:

    .. math:: o_t = \operatorname{softmax}_{u \in \mathcal{N}(t)}(s_{tu})\, v_u,
              \qquad |\mathcal{N}(t)| = \textstyle\prod_a k_a .

    Hassani, Walton, Li, Li & Shi 2023 (NAT, CVPR); Hassani & Shi 2022 (DiNAT: dilation).

    Parameters
    ----------
    q, k, v : ``(..., Hq, *S, D)``, ``(..., Hkv, *S, D)``, ``(..., Hkv, *S, Dv)``; the
        number of spatial axes ``S`` is ``len(kernel_size)`` (an int means 2-D).
    kernel_size : int or tuple, ``1 <= kernel_size * dilation <= S`` on every axis
        (``ValueError`` otherwise).
    dilation : int or tuple (per axis).
    causal : bool or tuple of bools (per axis): keep the ``kernel_size`` group members up
        to and including the query (a query near the start sees fewer).
    cls_tokens : ``(q_cls, k_cls, v_cls)``, global tokens (:mod:`refattn.vision`); then the
        result is ``(out, out_cls)``.
    scale, bias, softcap, return_lse, check_finite : as :func:`refattn.attention`; a
        ``bias`` array or score modifier is indexed by flattened token indices.
    method, block_q, block_k, workers : passed to :func:`refattn.sparse_attention`.

    Returns ``(..., Hq, *S, Dv)`` (and the lse ``(..., Hq, *S)`` with ``return_lse``).
    Time ``O(N k^d D)``, working memory bounded by the engine's blocks.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 7, 7, 4))
    >>> out = neighborhood_attention(q, k, v, (3, 3))
    >>> from refattn import attention
    >>> corner = attention(q[:, None, 0, 0], k[:, :3, :3].reshape(1, 9, 4),
    ...                    v[:, :3, :3].reshape(1, 9, 4))   # (0, 0) sees the 3 x 3 corner
    >>> bool(np.allclose(out[:, 0, 0], corner[:, 0]))
    True
    """
    nd, ks, dil, cz = _na_args(kernel_size, dilation, causal)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens)
    return g.attend(neighborhood_mask(g.q_grid, ks, dil, cz), scale=scale, bias=bias,
                    softcap=softcap, return_lse=return_lse, check_finite=check_finite,
                    method=method, block_q=block_q, block_k=block_k, workers=workers)


def neighborhood_attention_vjp(q, k, v, grad_out, *, kernel_size, grad_lse=None,
                               dilation=1, causal=False, cls_tokens=None, scale=None,
                               bias=None, softcap=None, check_finite=True, method="auto",
                               block_q=None, block_k=None, workers=None):
    """Gradients of :func:`neighborhood_attention` (``{"q", "k", "v"}`` in the grid
    shapes): exact attention under :func:`neighborhood_mask`, differentiated by the
    sparse engine's tiled backward over the non-empty tiles. ``grad_out``: the output's
    shape ``(..., Hq, *S, Dv)``, with ``cls_tokens`` the pair ``(grid, cls)`` the forward returns
    (then the result also has ``"cls_tokens"``, their gradients)."""
    nd, ks, dil, cz = _na_args(kernel_size, dilation, causal)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens)
    return g.attend_vjp(neighborhood_mask(g.q_grid, ks, dil, cz), grad_out, grad_lse,
                        scale=scale, bias=bias, softcap=softcap, check_finite=check_finite,
                        method=method, block_q=block_q, block_k=block_k, workers=workers)


neighborhood_attention.mask = neighborhood_mask


attach(neighborhood_attention, implied=_na_probs, vjp=neighborhood_attention_vjp)
