r"""The Reformer's two memory savers besides LSH attention (Kitaev, Kaiser & Levskaya,
"Reformer: The Efficient Transformer", ICLR 2020, Sec. 3), as float64 references.

**Reversible residual layers** (RevNet, Gomez et al. 2017). The activations are split in
two halves :math:`(x_1, x_2)` and a block computes

.. math:: y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1),

whose inverse needs only the outputs:

.. math:: x_2 = y_2 - G(y_1), \qquad x_1 = y_1 - F(x_2).

A network of such blocks need not store its activations for back-propagation: each
block's inputs are recomputed from its outputs. In floating point the reconstruction is
exact up to rounding: the error of :math:`x_2` is that of one addition and one
subtraction of :math:`G(y_1)`, about ``eps * (|x_2| + |G(y_1)|)``, and :math:`x_1`
inherits it through :math:`F`'s Lipschitz constant.

**Chunked feed-forward.** A position-wise layer treats each row of the sequence
independently, so applying it to ``chunk_size`` rows at a time gives the same result
with working memory for one chunk instead of the whole sequence (the paper's Eq. 10).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import is_int
from ..boundary.arrays import to_float64

__all__ = ["reversible_forward", "reversible_inverse", "chunked_feed_forward"]


def _halves(a, b, names):
    a = to_float64(a, names[0])
    b = to_float64(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (the two "
                         f"halves of the activations); got {names[0]} {a.shape}, "
                         f"{names[1]} {b.shape}")
    return a, b


def _apply(fn, name, x, expected_shape):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    y = to_float64(fn(x), f"{name}(...)")
    if y.shape != expected_shape:
        raise ValueError(f"{name} must map an array of shape {x.shape} to the same shape "
                         f"{expected_shape} (a residual branch); it returned shape "
                         f"{y.shape}")
    return y


def reversible_forward(x1, x2, f, g):
    r"""One reversible residual block: :math:`y_1 = x_1 + F(x_2)`,
    :math:`y_2 = x_2 + G(y_1)` (Gomez et al. 2017; Reformer Sec. 3).

    Parameters
    ----------
    x1, x2 : arrays of one shape ``(..., N, D)`` (any shape, as long as both match),
        converted to float64.
    f, g : callables mapping an array of that shape to one of the same shape (in a
        Reformer layer, ``F`` is attention and ``G`` the feed-forward network).

    Returns
    -------
    ``(y1, y2)``, float64 arrays of the input shape.

    >>> import numpy as np
    >>> from refattn.reversible import reversible_forward, reversible_inverse
    >>> rng = np.random.default_rng(0)
    >>> w1, w2 = rng.standard_normal((2, 4, 4))
    >>> f = lambda x: np.tanh(x @ w1)
    >>> g = lambda x: np.sin(x @ w2)
    >>> x1, x2 = rng.standard_normal((2, 6, 4))
    >>> y1, y2 = reversible_forward(x1, x2, f, g)
    >>> r1, r2 = reversible_inverse(y1, y2, f, g)
    >>> float(np.abs(r1 - x1).max()) < 1e-14, float(np.abs(r2 - x2).max()) < 1e-14
    (True, True)
    """
    x1, x2 = _halves(x1, x2, ("x1", "x2"))
    y1 = x1 + _apply(f, "f", x2, x1.shape)
    y2 = x2 + _apply(g, "g", y1, x2.shape)
    return y1, y2


def reversible_inverse(y1, y2, f, g):
    r"""Invert :func:`reversible_forward`: :math:`x_2 = y_2 - G(y_1)`,
    :math:`x_1 = y_1 - F(x_2)`.

    Parameters
    ----------
    y1, y2 : the block's outputs, arrays of one shape; ``f``, ``g`` the same callables
        as in the forward pass.

    Returns
    -------
    ``(x1, x2)``, float64, equal to the block's inputs up to rounding (see the module
    docstring).

    >>> import numpy as np
    >>> from refattn.reversible import reversible_forward, reversible_inverse
    >>> f = g = np.tanh
    >>> x1, x2 = np.array([[0.5, -1.0]]), np.array([[2.0, 0.25]])
    >>> r1, r2 = reversible_inverse(*reversible_forward(x1, x2, f, g), f, g)
    >>> float(np.abs(r1 - x1).max()) < 1e-15, float(np.abs(r2 - x2).max()) < 1e-15
    (True, True)
    """
    y1, y2 = _halves(y1, y2, ("y1", "y2"))
    x2 = y2 - _apply(g, "g", y1, y2.shape)
    x1 = y1 - _apply(f, "f", x2, y1.shape)
    return x1, x2


def chunked_feed_forward(x, fn, chunk_size, *, axis=-2):
    r"""Apply a row-wise function to a sequence ``chunk_size`` rows at a time (Reformer
    Sec. 3, "chunking"):

    .. math:: Y = \big[\,\text{fn}(X_{0:c});\ \text{fn}(X_{c:2c});\ \dots\big]
              = \text{fn}(X)

    for any ``fn`` that treats rows independently (a position-wise feed-forward layer).
    ``fn`` never sees more than ``chunk_size`` rows, so its working memory is that of
    one chunk; the result is preallocated and filled chunk by chunk.

    Parameters
    ----------
    x : array ``(..., N, D)`` (rows along ``axis``), converted to float64.
    fn : callable taking ``(..., c, D)`` to ``(..., c, D_out)``: the same shape except
        the last axis, with the rows along ``axis`` kept.
    chunk_size : positive integer; ``N`` need not be a multiple (the last chunk is
        shorter).
    axis : the sequence axis (default ``-2``); it may not be the last axis, which is the
        feature axis ``fn`` may change.

    Returns
    -------
    float64 ``(..., N, D_out)``.

    >>> import numpy as np
    >>> from refattn.reversible import chunked_feed_forward
    >>> rng = np.random.default_rng(0)
    >>> w1, w2 = rng.standard_normal((8, 32)), rng.standard_normal((32, 8))
    >>> ffn = lambda x: np.maximum(x @ w1, 0) @ w2
    >>> x = rng.standard_normal((2, 100, 8))
    >>> y = chunked_feed_forward(x, ffn, chunk_size=16)
    >>> y.shape, bool(np.allclose(y, ffn(x), rtol=1e-13, atol=1e-13))
    ((2, 100, 8), True)
    """
    x = to_float64(x, "x")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, D) with at least 2 dimensions, got "
                         f"shape {x.shape}")
    if not is_int(axis) or not -x.ndim <= axis < x.ndim or axis % x.ndim == x.ndim - 1:
        raise ValueError(f"axis must name a sequence axis of x {x.shape} other than the "
                         f"last (feature) axis, got axis={axis!r}")
    axis = int(axis) % x.ndim
    n = x.shape[axis]
    out = None
    for start in range(0, n, int(chunk_size)):
        stop = min(start + int(chunk_size), n)
        piece = x[(slice(None),) * axis + (slice(start, stop),)]
        y = to_float64(fn(piece), "fn(...)")
        if y.shape[:-1] != piece.shape[:-1]:
            raise ValueError(f"fn must be row-wise, keeping every axis but the last: it "
                             f"mapped a chunk of shape {piece.shape} to shape {y.shape}")
        if out is None:
            out = np.empty(x.shape[:-1] + y.shape[-1:])
        elif y.shape[-1] != out.shape[-1]:
            raise ValueError(f"fn returned {y.shape[-1]} features for rows {start}:{stop} "
                             f"but {out.shape[-1]} for earlier rows")
        out[(slice(None),) * axis + (slice(start, stop),)] = y
    if out is None:                          # N == 0: ask fn for the feature count
        y = to_float64(fn(x), "fn(...)")
        out = np.empty(x.shape[:-1] + y.shape[-1:])
    return out
