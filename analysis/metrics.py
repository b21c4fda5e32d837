r"""Error measures of an approximate attention against the exact one.

Output errors (``approx``, ``exact`` of the same shape, e.g. ``(..., N, Dv)``):

* :func:`relative_frobenius` :math:`\|\tilde O - O\|_F / \|O\|_F` over the whole array;
* :func:`max_abs_error` :math:`\max |\tilde O - O|`;
* :func:`cosine_similarity` per row (last axis) :math:`\tilde o\cdot o/(\|\tilde o\|\|o\|)`.

Attention-matrix measures (``P`` exact, ``Q`` approximate, ``(..., N, M)``, rows are
distributions over the keys):

* :func:`relative_frobenius` as above;
* :func:`kl_divergence` row-wise :math:`\mathrm{KL}(P\|Q) = \sum_j p_j \ln(p_j/q_j)`
  (nats), with :math:`0 \ln(0/q) = 0`; where :math:`q_j = 0 < p_j` the row's divergence
  is ``+inf`` (the approximation gives zero weight to a key the exact attention uses —
  e.g. a sparse pattern missing a key); an all-zero exact row (fully masked) gives 0;
* :func:`total_variation` row-wise :math:`\tfrac12\sum_j |p_j - q_j|` (always finite,
  in ``[0, 1]`` for distributions);
* :func:`attention_entropy` row-wise :math:`-\sum_j p_j \ln p_j` (nats, ``0 ln 0 = 0``),
  between 0 (one-hot) and :math:`\ln M` (uniform).

All return float64; shape mismatches raise ``ValueError`` naming both shapes.

>>> import numpy as np
>>> from refattn.analysis.metrics import relative_frobenius, total_variation
>>> p = np.array([[0.5, 0.5], [1.0, 0.0]])
>>> q = np.array([[0.25, 0.75], [1.0, 0.0]])
>>> round(relative_frobenius(q, p), 4), total_variation(p, q).tolist()
(0.2887, [0.25, 0.0])
"""
from __future__ import annotations

import numpy as np

from refattn.boundary import to_float64

__all__ = ["relative_frobenius", "max_abs_error", "cosine_similarity", "kl_divergence",
           "total_variation", "attention_entropy"]


def _pair(a, b, name_a: str, name_b: str, min_ndim: int = 0):
    a = to_float64(a, name_a, check_finite=False)
    b = to_float64(b, name_b, check_finite=False)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {name_a} "
                         f"{a.shape} and {name_b} {b.shape}")
    if a.ndim < min_ndim:
        raise ValueError(f"{name_a} and {name_b} need at least {min_ndim} dimension(s); "
                         f"got shape {a.shape}")
    return a, b


def _fro(x: np.ndarray) -> float:
    """Frobenius norm without under/overflow of the squares (scaled by max |x|)."""
    big = float(np.abs(x).max(initial=0.0))
    return 0.0 if big == 0 else big * float(np.linalg.norm((x / big).ravel()))


def relative_frobenius(approx, exact) -> float:
    r""":math:`\|\tilde A - A\|_F / \|A\|_F` over the whole array (any shape). If
    :math:`\|A\|_F = 0` the result is 0 when ``approx`` is also 0, else ``inf``.

    >>> import numpy as np
    >>> from refattn.analysis.metrics import relative_frobenius
    >>> float(relative_frobenius(np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])))
    0.10000000000000009
    """
    a, e = _pair(approx, exact, "approx", "exact")
    num, den = _fro(a - e), _fro(e)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def max_abs_error(approx, exact) -> float:
    """:math:`\\max_i |\\tilde a_i - a_i|` (0 for empty arrays).

    >>> from refattn.analysis.metrics import max_abs_error
    >>> max_abs_error([1.0, 2.0], [1.5, 2.0])
    0.5
    """
    a, e = _pair(approx, exact, "approx", "exact")
    return float(np.abs(a - e).max(initial=0.0))


def cosine_similarity(approx, exact, axis: int = -1) -> np.ndarray:
    r"""Cosine :math:`\tilde o\cdot o / (\|\tilde o\| \|o\|)` of corresponding vectors
    along ``axis`` (default: rows of ``(..., N, Dv)`` outputs); returns the other axes'
    shape. Two zero vectors have cosine 1; one zero vector against a nonzero one, 0.

    >>> import numpy as np
    >>> from refattn.analysis.metrics import cosine_similarity
    >>> cosine_similarity(np.array([[1.0, 0.0], [0.0, 0.0]]),
    ...                   np.array([[1.0, 1.0], [0.0, 0.0]])).round(4).tolist()
    [0.7071, 1.0]
    """
    a, e = _pair(approx, exact, "approx", "exact", min_ndim=1)
    def unit(x):
        # divide by the largest magnitude first, then by the norm: squares of tiny or
        # huge entries would under- or overflow
        big = np.abs(x).max(axis=axis, keepdims=True, initial=0.0)
        x = np.divide(x, big, out=np.zeros_like(x), where=big > 0)
        n = np.linalg.norm(x, axis=axis, keepdims=True)
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0), big == 0
    ua, za = unit(a)
    ue, ze = unit(e)
    out = (ua * ue).sum(axis=axis)
    out[np.squeeze(za & ze, axis=axis)] = 1.0
    return out


def _check_nonnegative(x, name, shape_note):
    if (x < 0).any():
        idx = tuple(int(i) for i in np.argwhere(x < 0)[0])
        raise ValueError(f"{name} {shape_note} has negative entries (first at {idx}: "
                         f"{x[idx]}); KL divergence and entropy need nonnegative weights")


def kl_divergence(p, q) -> np.ndarray:
    r"""Row-wise :math:`\mathrm{KL}(P\|Q) = \sum_j p_j \ln(p_j / q_j)` in nats, ``P`` the
    exact attention matrix and ``Q`` the approximation, ``(..., N, M)`` -> ``(..., N)``.

    Terms with :math:`p_j = 0` contribute 0 (whatever :math:`q_j`); a row with
    :math:`q_j = 0 < p_j` for some ``j`` is ``+inf``. Rows are used as given (not
    renormalized): for rows that are distributions the result is ``>= 0``, 0 iff
    ``P == Q`` on that row. Negative entries in ``P`` or ``Q`` raise ``ValueError``
    (signed approximations such as trigonometric random features have no KL).

    >>> import numpy as np
    >>> from refattn.analysis.metrics import kl_divergence
    >>> p = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    >>> q = np.array([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    >>> kl_divergence(p, q).round(4).tolist()           # ln 2, then a missed key
    [0.6931, inf]
    """
    p, q = _pair(p, q, "p", "q", min_ndim=1)
    _check_nonnegative(p, "p", p.shape)
    _check_nonnegative(q, "q", q.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0))
                                     - np.log(np.where(q > 0, q, 1.0))), 0.0)
    out = terms.sum(axis=-1)
    out[((p > 0) & (q == 0)).any(axis=-1)] = np.inf
    return out


def total_variation(p, q) -> np.ndarray:
    r"""Row-wise total variation :math:`\tfrac12 \sum_j |p_j - q_j|`,
    ``(..., N, M)`` -> ``(..., N)``; finite for any finite input (also signed ``Q``).

    >>> import numpy as np
    >>> from refattn.analysis.metrics import total_variation
    >>> total_variation(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])).tolist()
    [1.0]
    """
    p, q = _pair(p, q, "p", "q", min_ndim=1)
    return 0.5 * np.abs(p - q).sum(axis=-1)


def attention_entropy(p) -> np.ndarray:
    r"""Row-wise entropy :math:`H(p) = -\sum_j p_j \ln p_j` (nats; ``0 ln 0 = 0``),
    ``(..., N, M)`` -> ``(..., N)``. Negative entries raise ``ValueError``.

    >>> import numpy as np
    >>> from refattn.analysis.metrics import attention_entropy
    >>> attention_entropy(np.array([[0.25] * 4, [1.0, 0, 0, 0]])).round(4).tolist()
    [1.3863, 0.0]
    """
    p = to_float64(p, "p", check_finite=False)
    if p.ndim < 1:
        raise ValueError(f"p needs at least one dimension, got shape {p.shape}")
    _check_nonnegative(p, "p", p.shape)
    safe = np.where(p > 0, p, 1.0)
    return 0.0 - (p * np.log(safe)).sum(axis=-1)        # 0.0 - x: no negative zeros
