"""Angular locality-sensitive hashing for Reformer LSH attention
(:mod:`refattn.sparse.lsh`) and Scatterbrain's LSH support: ``h(x) = argmax [xR; -xR]``
with a standard normal rotation ``R`` (Kitaev et al. 2020, Sec. 2). The buckets are
discrete choices: the attentions' gradients hold them fixed.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import check_int, check_size_memory, resolve_budget, resolve_rng
from ..boundary.arrays import to_float64

__all__ = ["lsh_buckets"]


# --------------------------------------------------------------------------- checks
def _check_n_buckets(n_buckets):
    n_buckets = check_int("n_buckets", n_buckets, minimum=2)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even (angular LSH takes argmax([xR; -xR]) "
                         f"with R of shape (D, n_buckets/2)), got n_buckets={n_buckets}")
    return n_buckets


def check_hash_memory(n_hashes: int, n_buckets: int, d: int, vectors: int, memory_budget,
                      what: str, per_round: float = 0.0, fixed: float = 0.0,
                      rounds_at_once=None) -> None:
    """Raise :class:`refattn.MemoryBudgetError`, naming ``n_hashes`` and ``n_buckets``,
    before the rotations ``(n_hashes, D, n_buckets/2)`` and the buckets of ``vectors``
    vectors per round (and ``per_round`` more bytes per round: the sorted layout or
    chunks of LSH attention; ``fixed`` bytes once; ``rounds_at_once(r)`` bytes for what
    ``r`` rounds hold together, non-decreasing in ``r``) are allocated beyond
    ``memory_budget``: the one check of every LSH user. The advice names the largest
    ``n_hashes`` that fits."""
    half = n_buckets // 2
    round_bytes = 8.0 * (d * half + vectors) + per_round
    blocks = 24.0 * min(max(vectors, 1), max(1, HASH_BLOCK_ELEMENTS // half)) * half + fixed
    budget = resolve_budget(memory_budget)

    def total(r):
        return r * round_bytes + blocks + (rounds_at_once(r) if rounds_at_once else 0.0)

    if total(n_hashes) <= budget:
        return
    lo, hi = 0, n_hashes                     # total(lo) fits (or lo = 0), total(hi) not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    if lo >= 1:
        advice = f"n_hashes <= {lo:,} at this n_buckets"
    elif 8.0 * d * half >= total(1) - 8.0 * d * half - blocks:   # the rotations
        advice = "fewer n_buckets (at most a few times the sequence length is useful)"
    else:                                       # one round's layout and chunks
        advice = ("shorter sequences per call (each round's sorted layout and chunks "
                  "grow with the sequence length)")
    check_size_memory(total(n_hashes), budget, what,
                      f"n_hashes={n_hashes:,}, n_buckets={n_buckets:,}", advice)


def _given_buckets(buckets, name, n_hashes, n_buckets, batch_shape, heads, n):
    """Buckets given instead of drawn, ``(n_hashes, ..., H, N)`` integers in
    ``[0, n_buckets)`` broadcast over the batch: int64 ``(n_hashes, B, H, N)``."""
    arr = np.asarray(buckets)
    target = (n_hashes,) + tuple(batch_shape) + (heads, n)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of shape (n_hashes, ..., H, N) "
                        f"= {target}, got dtype {arr.dtype} with shape {arr.shape}")
    if arr.ndim < 3 or arr.ndim > len(target) or arr.shape[0] != n_hashes:
        raise ValueError(f"{name} must have shape (n_hashes, ..., H, N) broadcastable to "
                         f"{target}, got shape {arr.shape}")
    arr = arr.reshape((n_hashes,) + (1,) * (len(target) - arr.ndim) + arr.shape[1:])
    try:
        arr = np.broadcast_to(arr, target)
    except ValueError:
        raise ValueError(f"{name} must have shape (n_hashes, ..., H, N) broadcastable to "
                         f"{target}, got shape {np.shape(buckets)}") from None
    if arr.size and (arr.min() < 0 or arr.max() >= n_buckets):
        raise ValueError(f"{name} values must lie in [0, n_buckets={n_buckets}), got "
                         f"values from {arr.min()} to {arr.max()}")
    return arr.reshape((n_hashes, math.prod(batch_shape), heads, n)).astype(np.int64)


def _rotations(rng, n_hashes: int, d: int, n_buckets: int) -> np.ndarray:
    """``(n_hashes, D, n_buckets // 2)`` standard normal rotations."""
    return resolve_rng(rng, "LSH hashing").standard_normal((n_hashes, d, n_buckets // 2))


#: Projections formed at once while hashing (elements): bounds its working memory.
HASH_BLOCK_ELEMENTS = 2**20


def _hash(x: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Buckets ``argmax([xR; -xR])`` of ``x (..., L, D)`` for each of the rotations
    ``rot (R, D, b/2)``: int64 ``(R, ..., L)``. The projections ``xR`` are formed a block
    of vectors at a time (``HASH_BLOCK_ELEMENTS``), so memory does not grow with
    ``L · b``; the first maximum of ``[xR; -xR]`` is taken without concatenating."""
    r, d, half = rot.shape
    flat = x.reshape(-1, d)
    out = np.empty((r, flat.shape[0]), np.int64)
    step = max(1, HASH_BLOCK_ELEMENTS // half)
    for i in range(r):
        for lo in range(0, flat.shape[0], step):
            proj = flat[lo:lo + step] @ rot[i]
            up, down = proj.argmax(axis=-1), proj.argmin(axis=-1)
            rows = np.arange(len(proj))
            out[i, lo:lo + step] = np.where(proj[rows, up] >= -proj[rows, down], up,
                                            half + down)
    return out.reshape((r,) + x.shape[:-1])


# --------------------------------------------------------------------------- hash
def lsh_buckets(x, n_buckets, rng, *, n_hashes=None, memory_budget=None):
    r"""Angular LSH buckets :math:`h(x) = \arg\max\,[xR; -xR]` (Reformer, Sec. 2).

    Parameters
    ----------
    x : array ``(..., L, D)``; every vector ``x[..., l, :]`` is hashed (with the same
        rotation for all of them).
    n_buckets : even integer ``b >= 2``; ``R`` has shape ``(D, b/2)``, entries i.i.d.
        standard normal.
    rng : int seed or ``numpy.random.Generator`` (advanced by the draw). The rotations are ``rng.standard_normal((n_hashes or 1, D, b // 2))``.
    n_hashes : ``None`` for one hash, or the number of independent rotations.
    memory_budget : bytes (default :data:`refattn.DEFAULT_MEMORY_BUDGET`) the rotations
        and buckets may take; beyond it :class:`refattn.MemoryBudgetError` is raised
        before they are drawn.

    Returns
    -------
    int64 ``(..., L)`` in ``[0, b)``, or ``(n_hashes, ..., L)`` when ``n_hashes`` is given.
    Hashing depends only on the direction of ``x``; a zero vector goes to bucket 0.

    With ``b = 2``, vectors at angle :math:`\theta` collide with probability
    :math:`1 - \theta/\pi` over the draw of ``R``.

    >>> import numpy as np
    >>> from refattn.lsh import lsh_buckets
    >>> x = np.array([[1.0, 0.0], [0.999, 0.01], [-1.0, 0.0]])
    >>> h = lsh_buckets(x, 2, rng=0, n_hashes=1000)     # 1000 independent hashes
    >>> h.shape
    (1000, 3)
    >>> bool((h[:, 0] != h[:, 2]).all())       # antipodal vectors never collide
    True
    >>> float((h[:, 0] == h[:, 1]).mean()) > 0.99
    True
    """
    n_buckets = _check_n_buckets(n_buckets)
    x = to_float64(x, "x")
    if x.ndim < 2 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., L, D) with D >= 1, got shape {x.shape}")
    rounds = 1 if n_hashes is None else check_int("n_hashes", n_hashes, minimum=1)
    check_hash_memory(rounds, n_buckets, x.shape[-1], x.size // x.shape[-1], memory_budget,
                      "lsh_buckets")
    out = _hash(x, _rotations(rng, rounds, x.shape[-1], n_buckets))
    return out[0] if n_hashes is None else out
