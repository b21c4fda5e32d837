"""Swin's patch merging: the hierarchical step between stages that concatenates the
features of each 2 x 2 block of tokens (:func:`patch_merging`).
"""
from __future__ import annotations

import numpy as np

from ..boundary.arrays import to_float64

__all__ = ["patch_merging"]


def patch_merging(x, *, check_finite=True):
    """Swin's patch merging: concatenate the features of each 2 x 2 block of tokens.

    ``x (..., X, Y, C)`` -> ``(..., ceil(X/2), ceil(Y/2), 4C)`` with the blocks'
    tokens in Swin's order ``[x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)]``
    (``x0, x1, x2, x3`` of ``PatchMerging``). Odd ``X`` or ``Y`` are zero-padded at the
    end first, as Swin does. Swin then applies ``LayerNorm(4C)`` and a learned
    ``Linear(4C, 2C)``: the hierarchical compression between stages (each stage has a
    quarter of the tokens of the one before). For head-split grids
    ``(..., heads, X, Y, D)`` the heads axis is a leading axis.

    Liu et al. 2021, "Swin Transformer", Sec. 3.1.

    >>> import numpy as np
    >>> x = np.arange(2 * 2 * 3).reshape(2, 2, 3)         # a 2 x 2 grid, C = 3
    >>> patch_merging(x).astype(int)
    array([[[ 0,  1,  2,  6,  7,  8,  3,  4,  5,  9, 10, 11]]])
    """
    x = to_float64(x, "x", check_finite=check_finite)
    if x.ndim < 3 or 0 in x.shape[-3:]:
        raise ValueError(f"x must have shape (..., X, Y, C) with non-empty X, Y, C, got "
                         f"shape {x.shape}")
    px, py = x.shape[-3] % 2, x.shape[-2] % 2
    if px or py:
        x = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, px), (0, py), (0, 0)])
    return np.concatenate([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                           x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], axis=-1)
