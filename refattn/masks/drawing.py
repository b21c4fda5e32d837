"""Pictures of masks: the quickest way to check that a pattern is the one you meant.

:func:`draw_mask` renders a mask's ``N x M`` keep matrix (kept pairs dark), optionally
with its ``(block_q, block_k)`` tile classification behind it (empty tiles white, partial
pale, full tinted), and writes a PNG. ``refattn mask EXPR`` does the same from the
command line, e.g. ``refattn mask "causal() & sliding_window(16) | sinks(2)" --n 64``.
"""
from __future__ import annotations

import numpy as np

from .. import masks
from .base import EMPTY, FULL, PARTIAL

__all__ = ["draw_mask", "parse_mask"]

_MAX_PIXELS = 4096


def parse_mask(expression: str) -> masks.Mask:
    """Build a mask from an expression over :mod:`refattn.masks`' factories, e.g.
    ``"causal() & (sliding_window(128) | sinks(4))"``.

    >>> parse_mask("causal() & sliding_window(2)")
    causal() & sliding_window(2)
    """
    names = {name: getattr(masks, name) for name in masks.__all__
             if callable(getattr(masks, name)) and not name[0].isupper()}
    names["np"] = np
    try:
        mask = eval(expression, {"__builtins__": {}}, names)  # noqa: S307 (user's own CLI input)
    except Exception as exc:
        raise ValueError(f"cannot build a mask from {expression!r}: {exc}; use the "
                         f"factories {sorted(n for n in names if n != 'np')}") from exc
    if not isinstance(mask, masks.Mask):
        raise ValueError(f"{expression!r} is a {type(mask).__name__}, not a mask")
    return mask


def draw_mask(mask, n: int, m: int | None = None, path=None, *, block=None, head: int = 0,
              title: str | None = None):
    """Draw ``mask`` for ``n`` queries and ``m`` keys (default ``n``) and return the
    matplotlib figure; with ``path``, also write it as a PNG.

    ``block``: an int or ``(block_q, block_k)``: shade tiles by their classification
    (white empty, grey partial, blue full). ``head``: the query head to draw for
    head-dependent masks. Sizes above 4096 are refused (the picture would not show
    single pairs); draw a slice of interest with ``bind`` and smaller sizes instead.

    >>> import refattn as ra
    >>> fig = draw_mask(ra.masks.causal() & ra.masks.sliding_window(3), 16, block=4)
    >>> len(fig.axes)
    1
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    mask = masks.as_mask(mask)
    m = n if m is None else m
    if max(n, m) > _MAX_PIXELS:
        raise ValueError(f"draw_mask draws at most {_MAX_PIXELS} x {_MAX_PIXELS} pairs, got "
                         f"n={n}, m={m}")
    keep = mask.materialize(n, m, h=head)
    fig, ax = plt.subplots(figsize=(6, 6 * max(n, 1) / max(m, 1) + 0.6))
    if block is not None:
        bq, bk = (block, block) if np.isscalar(block) else block
        labels = mask.classify_tiles(n, m, int(bq), int(bk))
        shade = np.repeat(np.repeat(labels, bq, axis=0), bk, axis=1)[:n, :m]
        ax.imshow(shade, cmap=ListedColormap(["#ffffff", "#e3e3e3", "#cfe0f5"]),
                  vmin=EMPTY, vmax=FULL, interpolation="nearest")
        counts = {name: int((labels == lab).sum()) for name, lab in
                  (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        ax.set_xlabel(f"key j   (tiles {bq}x{bk}: " + ", ".join(
            f"{v} {k}" for k, v in counts.items()) + ")")
    else:
        ax.set_xlabel("key j")
    ax.imshow(np.ma.masked_where(~keep, keep), cmap=ListedColormap(["#1f3b66"]),
              interpolation="nearest", alpha=0.9)
    ax.set_ylabel("query i")
    density = keep.mean() if keep.size else 0.0
    ax.set_title(title or f"{mask.name}\nN={n}, M={m}, {keep.sum()} pairs kept "
                          f"({density:.1%})", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
