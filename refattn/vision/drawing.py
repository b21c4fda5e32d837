"""Pictures of vision attention patterns: :func:`draw_query_pixel` draws the keys one
query pixel attends to on its grid (a mechanism with its parameters, or any mask over
the flattened grid), as an annotated matplotlib figure or a pixel-exact PNG.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import is_int
from ..masks import as_mask
from ._common import _grid_shape, _int_tuple, with_global
from .neighborhood import neighborhood_attention
from .spatial_reduction import spatial_reduction_attention
from .windows import shifted_window_attention, window_attention

__all__ = ["draw_query_pixel"]


_MECHANISMS = (neighborhood_attention, window_attention, shifted_window_attention,
               spatial_reduction_attention)
_WHITE, _KEPT, _KEPT_ALT = (255, 255, 255), (31, 59, 102), (86, 126, 186)
_QUERY, _QUERY_UNSEEN, _GAP = (214, 39, 40), (244, 163, 163), (200, 200, 200)


def _pattern_row(pattern, shape, pixel, params):
    """``(row, num_global, checker, name)``: which of the ``G + prod(shape)`` tokens the
    query at ``pixel`` keeps (bool), and for spatial reduction the checkerboard parity
    of each key's pooled block."""
    if isinstance(pattern, str):
        named = {fn.__name__: fn for fn in _MECHANISMS}
        if pattern not in named:
            raise ValueError(f"unknown vision mechanism {pattern!r}; expected one of "
                             f"{sorted(named)}, a mask or a mask_mod function")
        pattern = named[pattern]
    shape = _grid_shape(shape)
    idx = np.asarray(pixel)
    if idx.shape != (len(shape),) or idx.dtype.kind not in "iu" or \
            not all(0 <= i < s for i, s in zip(idx.tolist(), shape)):
        raise ValueError(f"pixel must be {len(shape)} integer coordinates inside the grid "
                         f"{shape}, got {pixel!r}")
    flat = int(np.ravel_multi_index(tuple(idx.tolist()), shape))
    n = math.prod(shape)
    count = params.pop("num_global", 0)
    if pattern is spatial_reduction_attention:
        if "ratio" not in params:
            raise TypeError("drawing spatial_reduction_attention needs ratio=")
        rt = _int_tuple("ratio", params.pop("ratio"), len(shape))
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")
        checker = sum(np.indices(shape)[a] // r for a, r in enumerate(rt)) % 2
        return (np.ones(count + n, bool), count, checker.reshape(-1),
                f"spatial_reduction_attention(ratio={rt})")
    if pattern in _MECHANISMS:
        mask = pattern.mask(shape, **params)
    else:
        if params:
            raise TypeError(f"parameters {sorted(params)} are only for vision mechanisms")
        mask = as_mask(pattern)
    mask = with_global(mask, count)
    g = getattr(mask, "num_global", 0)
    total = g + n
    row = np.asarray(mask._eval(np.asarray(0), np.asarray(0), np.asarray([[g + flat]]),
                                np.arange(total)[None, :], total, total))
    return np.broadcast_to(row, (1, total))[0].copy(), g, None, mask.name


def _layout(values, shape, fill):
    """Arrange per-token cell colors ``(*shape, 3)`` as an image: 1-D as a row, 2-D as
    is, 3-D as its slices side by side with a one-cell gap."""
    if len(shape) == 1:
        return values[None]
    if len(shape) == 2:
        return values
    if len(shape) == 3:
        gap = np.full((shape[1], 1, 3), fill, np.uint8)
        parts = []
        for t in range(shape[0]):
            parts += ([gap] if t else []) + [values[t]]
        return np.concatenate(parts, axis=1)
    raise ValueError(f"pictures are drawn for grids of 1, 2 or 3 axes, got shape {shape}")


def _query_image(row, g, pools, shape, flat, cell):
    grid = row[g:].reshape(shape)
    colors = np.empty(shape + (3,), np.uint8)
    colors[...] = _WHITE
    colors[grid] = _KEPT
    if pools is not None:
        alt = (pools.reshape(shape) == 1) & grid        # pooled blocks as a checkerboard
        colors[alt] = _KEPT_ALT
    where = np.unravel_index(flat, shape)
    colors[where] = _QUERY if grid[where] else _QUERY_UNSEEN
    img = _layout(colors, shape, _GAP)
    if g:
        width = img.shape[1]
        rows = -(-g // width)
        strip = np.empty((rows * width, 3), np.uint8)
        strip[...] = _GAP
        strip[:g] = np.where(row[:g, None], np.array(_KEPT, np.uint8),
                             np.array(_WHITE, np.uint8))
        img = np.concatenate([strip.reshape(rows, width, 3),
                              np.full((1, width, 3), _GAP, np.uint8), img])
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


def draw_query_pixel(pattern, shape, pixel, path=None, *, raw=False, cell=8, title=None,
                     **params):
    """Picture of the keys one query pixel attends to, on the grid, as a PNG.

    pattern : a vision mechanism (:func:`neighborhood_attention`,
        :func:`window_attention`, :func:`shifted_window_attention`,
        :func:`spatial_reduction_attention`) or its name, with its parameters as
        ``**params`` (``kernel_size=..., dilation=..., causal=...``, ``window=...,
        shift=...``, ``ratio=...``; ``num_global=G`` adds ``G`` CLS tokens); or any mask
        over the flattened grid (a :class:`refattn.masks.Mask` such as
        :func:`neighborhood_mask`, or a FlexAttention ``mask_mod`` function).
    shape : the grid, 1 to 3 axes (3-D grids are drawn as their slices side by side).
    pixel : the query's coordinates.
    path : where to write the PNG (nothing is written when None).
    raw : write the pixel-exact image instead of an annotated figure: ``cell x cell``
        pixels per token, kept keys dark blue ``(31, 59, 102)`` (the pooled blocks of
        spatial reduction alternate with ``(86, 126, 186)`` as a checkerboard), other
        tokens white, the query red ``(214, 39, 40)`` (pink ``(244, 163, 163)`` if it
        does not see itself), gaps grey ``(200, 200, 200)``; CLS tokens are a strip
        above the grid, followed by a grey row.

    Returns the matplotlib figure (annotated), or with ``raw=True`` the uint8 RGB image
    that was written.

    >>> img = draw_query_pixel("neighborhood_attention", (6, 6), (0, 0), raw=True,
    ...                        cell=1, kernel_size=(3, 3))
    >>> (img == 255).all(-1).astype(int)         # white: keys the corner query ignores
    array([[0, 0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1, 1],
           [1, 1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1, 1]])
    """
    if not is_int(cell) or cell < 1:
        raise ValueError(f"cell must be a positive integer, got {cell!r}")
    shape = _grid_shape(shape)
    row, g, pools, name = _pattern_row(pattern, shape, pixel, dict(params))
    flat = int(np.ravel_multi_index(tuple(np.asarray(pixel).tolist()), shape))
    img = _query_image(row, g, pools, shape, flat, int(cell))
    import matplotlib
    matplotlib.use("Agg", force=False)
    if raw:
        if path is not None:
            import matplotlib.image
            matplotlib.image.imsave(path, img)
        return img
    import matplotlib.pyplot as plt
    small = _query_image(row, g, pools, shape, flat, 1)
    h, w = small.shape[:2]
    fig, ax = plt.subplots(figsize=(6, max(1.2, 6 * h / w) + 0.8))
    ax.imshow(small, interpolation="nearest")
    kept = int(row[g:].sum())
    ax.set_title(title or f"{name}\nquery {tuple(np.asarray(pixel).tolist())} sees "
                          f"{kept} of {row.size - g} grid tokens"
                 + (f" and {int(row[:g].sum())} CLS tokens" if g else ""), fontsize=9)
    axes = {1: ("", "x"), 2: ("x", "y"),
            3: ("x", "y  (slices t = 0, 1, ... left to right)")}
    ax.set_ylabel(axes[len(shape)][0])
    ax.set_xlabel(axes[len(shape)][1])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
