r"""Low-rank attention: the ``N x M`` attention matrix is never formed; the keys and values
are summarised by a few rows (projections, landmarks or a packed sequence) and the
queries attend to those.

* :func:`linformer_attention` (Wang et al. 2020, "Linformer: Self-Attention with Linear
  Complexity"): keys and values are projected along the sequence by ``E, F``
  ``(rank x M)``,

  .. math:: O = \operatorname{softmax}\!\big(s\, Q (E K)^\top\big)\,(F V).

* :func:`nystrom_attention` (Xiong et al. 2021, "Nyströmformer: A Nyström-Based
  Algorithm for Approximating Self-Attention"): with segment-mean landmarks
  :math:`\tilde Q, \tilde K` (``c`` rows each),

  .. math:: O = \tilde F\, \tilde A^{+}\, \tilde B\, V, \quad
            \tilde F = \operatorname{softmax}(s\, Q \tilde K^\top),\
            \tilde A = \operatorname{softmax}(s\, \tilde Q \tilde K^\top),\
            \tilde B = \operatorname{softmax}(s\, \tilde Q K^\top),

  with :math:`\tilde A^{+}` from the paper's iterative pseudoinverse
  (:func:`iterative_pinv`) or, with ``pinv_iters=None``, the exact one.

* :func:`luna_attention` (Ma et al. 2021, "Luna: Linear Unified Nested Attention"):
  a packed sequence ``P`` (``l`` rows) attends to the keys (pack), then the queries
  attend to the packed context (unpack):

  .. math:: \Pi = \operatorname{softmax}(s\, P K^\top),\quad
            C_K = \Pi K,\ C_V = \Pi V,\quad
            O = \operatorname{softmax}(s\, Q C_K^\top)\, C_V .

``s`` is ``scale`` (default ``1/sqrt(D)``) everywhere and every softmax is over the last
axis. All three are non-causal (none of the papers defines a causal form of these
operators that the same formula covers) and take no mask. Each has an *implied matrix*
``A`` ``(..., Hq, N, M)`` with ``out == A @ v`` (``v`` repeated over the query heads of
a group): :func:`linformer_attention_matrix`, :func:`nystrom_attention_matrix`,
:func:`luna_attention_matrix`. Only Luna's is row-stochastic (a product of two
row-stochastic matrices); Linformer's has the signs of ``F`` and Nyström's those of
:math:`\tilde A^{+}`.

Shapes follow refattn's layout, ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``,
``v (..., Hkv, M, Dv)``, with grouped-query attention (query head ``h`` uses KV head
``h // (Hq // Hkv)``). Everything is computed in float64.
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import check_int, check_memory, resolve_rng, resolve_scale
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..registry import attach, register

__all__ = ["linformer_attention", "linformer_attention_matrix", "linformer_projections",
           "nystrom_attention", "nystrom_attention_matrix", "iterative_pinv",
           "segment_means", "luna_attention", "luna_attention_matrix"]


# ------------------------------------------------------------------------- helpers
def _softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max-subtracted). Every row here has at least one
    finite logit when the inputs are finite; NaN/inf inputs (``check_finite=False``)
    propagate as NaN."""
    if s.shape[-1] == 0:                  # no keys (M = 0): an empty, all-zero softmax
        return np.zeros(s.shape)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - top)
    return e / e.sum(axis=-1, keepdims=True)


def _grouped(q: np.ndarray, pb) -> np.ndarray:
    """``q (B, Hq, N, D)`` as ``(B, Hkv, G, N, D)``: the query heads of each KV head."""
    return q.reshape(pb.batch, pb.heads_kv, pb.group, *q.shape[2:])


def _ungrouped(x: np.ndarray, pb) -> np.ndarray:
    """``(B, Hkv, G, ...)`` back to ``(B, Hq, ...)``."""
    return x.reshape(pb.batch, pb.heads_q, *x.shape[3:])


def _implied_memory(pb, memory_budget, name: str, alternative: str) -> None:
    check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 8.0 * 3, memory_budget,
                 f"the implied matrix of {name}", alternative)


def segment_means(x, num_segments: int):
    """Means of ``num_segments`` contiguous segments of the rows of ``x``.

    ``x``: ``(..., L, D)``; returns ``(..., num_segments, D)``. Segments follow
    ``np.array_split``: with ``L = num_segments * q + r``, the first ``r`` segments hold
    ``q + 1`` rows and the others ``q`` rows (all equal when ``num_segments`` divides
    ``L``, the paper's case). Requires ``1 <= num_segments <= L``.

    >>> import numpy as np
    >>> from refattn.lowrank import segment_means
    >>> segment_means(np.arange(5.0)[:, None], 2)       # segments [0, 1, 2] and [3, 4]
    array([[1. ],
           [3.5]])
    """
    x = np.asarray(x, dtype=np.float64)
    length = x.shape[-2]
    num_segments = check_int("num_segments", num_segments, minimum=1,
                              context=f" (rows of x {x.shape})")
    if num_segments > length:
        raise ValueError(f"num_segments={num_segments} exceeds the {length} rows of x "
                         f"{x.shape}: every segment needs at least one row")
    sizes = np.full(num_segments, length // num_segments)
    sizes[:length % num_segments] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.add.reduceat(x, starts, axis=-2) / sizes[:, None]


# ----------------------------------------------------------------------- Linformer
def linformer_projections(m: int, rank: int, *, kind: str = "gaussian", rng=None,
                          shared: bool = False):
    r"""Projections ``(E, F)`` for :func:`linformer_attention`: float64 ``(rank, M)``.

    * ``kind="gaussian"`` (what ``linformer_attention`` draws when ``proj=None``):
      i.i.d. :math:`N(0, 1/\text{rank})` entries, the Johnson-Lindenstrauss projection
      of Linformer's Theorem 1 (Wang et al. 2020; the model learns ``E, F``). ``E`` is
      drawn first, then ``F``; ``rng`` (int seed or ``numpy.random.Generator``) is
      required.
    * ``kind="mean"``: mean pooling over ``rank`` contiguous segments (the paper's
      "general projections"; segments as :func:`segment_means`), deterministic,
      ``rng`` unused. ``rank = M`` gives ``E = F = I``.

    With ``shared=True`` ``F is E`` (only ``E`` is drawn).

    >>> import numpy as np
    >>> from refattn.lowrank import linformer_projections
    >>> e, f = linformer_projections(6, 2, rng=0)
    >>> e.shape, f.shape, bool((e != f).any())
    ((2, 6), (2, 6), True)
    >>> e2, f2 = linformer_projections(6, 2, rng=0, shared=True)
    >>> bool(np.array_equal(e, e2)) and f2 is e2
    True
    >>> linformer_projections(5, 2, kind="mean")[0].round(3)
    array([[0.333, 0.333, 0.333, 0.   , 0.   ],
           [0.   , 0.   , 0.   , 0.5  , 0.5  ]])
    """
    m = check_int("m", m, minimum=1, context=" (the number of keys M)")
    rank = check_int("rank", rank, minimum=1, context=f" (rows of the projections; M={m})")
    if rank > m:
        raise ValueError(f"rank={rank} exceeds the number of keys M={m}: Linformer projects "
                         f"the M keys onto rank <= M rows")
    if kind == "mean":
        e = segment_means(np.eye(m), rank)
        return e, (e if shared else e.copy())
    if kind != "gaussian":
        raise ValueError(f"kind must be 'gaussian' or 'mean', got {kind!r}")
    gen = resolve_rng(rng, "linformer_projections(kind='gaussian')")
    e = gen.standard_normal((rank, m)) / math.sqrt(rank)
    if shared:
        return e, e
    return e, gen.standard_normal((rank, m)) / math.sqrt(rank)


def _linformer_proj(pb, rank, proj, shared, rng, check_finite):
    """Validate the Linformer options; return ``E``, ``F`` broadcastable to
    ``(B, Hkv, rank, M)`` (each ``(1, 1, rank, M)`` or ``(B, Hkv, rank, M)``)."""
    if not isinstance(shared, (bool, np.bool_)):
        raise TypeError(f"shared must be True or False, got {shared!r}")
    target = pb.batch_shape + (pb.heads_kv,)
    if proj is None:
        if rank is None:
            raise TypeError("linformer_attention needs rank= (rows of the random "
                            "projections) when proj is None")
        gen = resolve_rng(rng, "linformer_attention (random projections, proj=None)")
        e, f = linformer_projections(pb.m, rank, rng=gen, shared=bool(shared))
        return e[None, None], f[None, None]
    if shared:
        if isinstance(proj, (tuple, list)):
            raise TypeError(f"with shared=True, proj must be one matrix E = F of shape "
                            f"(..., rank, M), got a {type(proj).__name__} of "
                            f"{len(proj)} items")
        pair = (("proj", proj),)
    else:
        if not (isinstance(proj, (tuple, list)) and len(proj) == 2):
            what = f"{len(proj)} items" if isinstance(proj, (tuple, list)) else \
                f"shape {np.shape(proj)}"
            raise TypeError(f"proj must be a pair (E, F) of (..., rank, M) matrices, or one "
                            f"matrix with shared=True; got {type(proj).__name__} of {what}")
        pair = (("proj[0] (E)", proj[0]), ("proj[1] (F)", proj[1]))
    mats = []
    for name, x in pair:
        a = to_float64(x, name, check_finite=check_finite)
        if a.ndim < 2 or a.shape[-1] != pb.m or a.ndim > len(target) + 2:
            raise ValueError(f"{name} must have shape (..., rank, M) with M={pb.m} keys and "
                             f"leading dims broadcasting to (*batch, Hkv)={target}; got "
                             f"{a.shape}")
        try:
            ok = np.broadcast_shapes(a.shape[:-2], target) == target
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {a.shape}: leading dims must broadcast to "
                             f"(*batch, Hkv)={target}")
        mats.append(a)
    got = {a.shape[-2] for a in mats}
    if len(got) != 1:
        raise ValueError(f"E and F must have the same rank; got E {mats[0].shape}, "
                         f"F {mats[1].shape}")
    r = got.pop()
    if rank is not None and check_int("rank", rank, minimum=1) != r:
        raise ValueError(f"rank={rank} does not match the projections' {r} rows "
                         f"(proj shape {mats[0].shape})")
    check_int("rank", r, minimum=1, context=f" (rows of proj {mats[0].shape})")
    if r > pb.m:
        raise ValueError(f"rank={r} exceeds the number of keys M={pb.m} (proj shape "
                         f"{mats[0].shape}): Linformer projects the M keys onto rank <= M "
                         f"rows")

    def flat(a):
        if a.ndim == 2:
            return a[None, None]
        a = np.broadcast_to(a, target + a.shape[-2:])
        return a.reshape((pb.batch, pb.heads_kv) + a.shape[-2:])
    e = flat(mats[0])
    return e, (e if shared else flat(mats[1]))


def _linformer(q, k, v, *, rank, proj, shared, rng, scale, check_finite):
    """Validate; return ``(pb, p (B, Hkv, G, N, rank), F (..., rank, M), v)``."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    if rank is not None:
        seen = f"k {pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
        rank = check_int("rank", rank, minimum=1, context=f" (rows of E and F; {seen})")
        if rank > pb.m:
            raise ValueError(f"rank={rank} exceeds the number of keys M={pb.m} ({seen}): "
                             f"Linformer projects the M keys onto rank <= M rows")
    s = resolve_scale(scale, pb.d)
    e, f = _linformer_proj(pb, rank, proj, shared, rng, check_finite)
    ek = e @ k                                              # (B, Hkv, r, D)
    logits = s * (_grouped(q, pb) @ ek[:, :, None].swapaxes(-1, -2))
    return pb, _softmax(logits), f, v


@register(family="lowrank", exact=False, time="O(r·(N+M)·(D+Dv))",
          state="O(r·(D+Dv)) projected keys and values per KV head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=False,
          example={"rank": 1}, budget=lambda n, b: {"rank": b})
def linformer_attention(q, k, v, *, rank=None, proj=None, shared=False, rng=None,
                        scale=None, check_finite=True):
    r"""Linformer attention: keys and values projected along the sequence to ``rank``
    rows.

    .. math:: O = \operatorname{softmax}\!\big(s\, Q (E K)^\top\big)\,(F V), \qquad
              E, F \in \mathbb{R}^{r \times M}

    (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

    Parameters
    ----------
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, M, D)``; GQA: query head ``h`` uses KV head ``h // (Hq//Hkv)``.
    v : array ``(..., Hkv, M, Dv)``
    rank : int, ``1 <= rank <= M`` (``rank > M`` raises ``ValueError``: projecting ``M``
        keys onto more rows compresses nothing). Required when ``proj`` is None; with
        ``proj`` it may be omitted (it is read from ``proj``) or must match it.
    proj : None, a pair ``(E, F)``, or with ``shared=True`` one matrix ``E = F``; each
        ``(rank, M)`` (shared by every batch element and head) or ``(..., Hkv, rank, M)``
        broadcasting to ``(*batch, Hkv, rank, M)`` (one projection per KV head).
        None draws ``E`` and ``F`` (in that order) with i.i.d. :math:`N(0, 1/r)`
        entries from ``rng``, one pair for the whole call (the paper's
        Johnson-Lindenstrauss choice; Linformer learns them): see
        :func:`linformer_projections`, which also builds the paper's mean-pooling
        projections (``kind="mean"``).
    shared : use ``F = E`` (the paper's key-value sharing).
    rng : int seed or ``numpy.random.Generator``; required (``TypeError``) only when
        ``proj`` is None.
    scale : float, default ``1/sqrt(D)``.
    check_finite : raise on non-finite inputs (and projections).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. Not causal: Linformer's projections mix every position,
    so the paper's model has no causal form. The result depends on the order of the keys
    (column ``j`` of ``E`` belongs to position ``j``). ``rank = M`` with ``E = F = I``
    (or mean pooling with one key per segment) is exact attention. Random Gaussian
    projections do **not** approach exact attention as ``rank`` grows (the softmax of
    mixed logits is not a mixture of softmaxes; their Johnson-Lindenstrauss guarantee is
    about :math:`P F^\top F V \approx P V`); mean pooling does, on inputs that vary
    smoothly along the sequence.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> from refattn.lowrank import linformer_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))          # 2 heads, 6 tokens
    >>> linformer_attention(q, k, v, rank=3, rng=0).shape
    (2, 6, 4)
    >>> eye = np.eye(6)
    >>> bool(np.allclose(linformer_attention(q, k, v, proj=(eye, eye)), ra.attention(q, k, v)))
    True
    """
    pb, p, f, v = _linformer(q, k, v, rank=rank, proj=proj, shared=shared, rng=rng,
                             scale=scale, check_finite=check_finite)
    fv = f @ v                                              # (B, Hkv, r, Dv)
    return pb.unflatten(_ungrouped(p @ fv[:, :, None], pb))


def linformer_attention_matrix(q, k, *, rank=None, proj=None, shared=False, rng=None,
                               scale=None, check_finite=True, memory_budget=None):
    r"""The implied matrix ``A = softmax(s Q (E K)^T) F`` ``(..., Hq, N, M)`` of
    :func:`linformer_attention` (same arguments, same ``rng``), so that
    ``linformer_attention(q, k, v) == A @ v`` (``v`` repeated over the query heads of a
    group). Not row-stochastic in general: ``F`` has entries of both signs, so rows of
    ``A`` sum to ``softmax(...) F 1``, not 1. ``memory_budget`` bounds the matrix.

    >>> import numpy as np
    >>> from refattn.lowrank import linformer_attention_matrix
    >>> q = k = np.random.default_rng(0).standard_normal((1, 4, 2))
    >>> a = linformer_attention_matrix(q, k, proj=np.full((1, 4), 0.25), shared=True)
    >>> a.round(3)                       # one averaging projection: uniform attention
    array([[[0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25]]])
    """
    pb, p, f, _ = _linformer(q, k, None, rank=rank, proj=proj, shared=shared, rng=rng,
                             scale=scale, check_finite=check_finite)
    _implied_memory(pb, memory_budget, "linformer_attention",
                    "refattn.lowrank.linformer_attention (it never forms the matrix)")
    return pb.unflatten(_ungrouped(p @ f[:, :, None], pb))


# -------------------------------------------------------------------- Nyströmformer
def iterative_pinv(a, iters: int):
    r"""Nyströmformer's iterative Moore-Penrose pseudoinverse of ``a`` ``(..., c, c)``.

    .. math:: Z_0 = \frac{A^\top}{\|A\|_1 \|A\|_\infty}, \qquad
              Z_{j+1} = \tfrac14 Z_j\big(13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))\big)

    (Xiong et al. 2021, after Razavi et al. 2014). ``‖A‖₁`` is the largest absolute
    column sum and ``‖A‖∞`` the largest absolute row sum, **per matrix** (the paper's
    definition; the official code takes the maxima over the whole batch and all heads,
    which changes ``Z_0`` and so every finite iterate, but not the limit). The error
    :math:`E_j = I - A Z_j` obeys :math:`E_{j+1} = \tfrac34 E_j^3 + \tfrac14 E_j^4`, so
    the iteration converges with third order to :math:`A^{+}` once
    :math:`\|E_j\| < 1`; with an ill-conditioned ``a`` it first spends about
    :math:`\log_{13/4}(1/(1 - \|E_0\|))` iterations near :math:`\|E\| \approx 1`
    (so the paper's 6 iterations can be far from :math:`A^{+}`). For a singular ``a`` the
    iterates converge to :math:`A^{+}` in exact arithmetic; in floating point the
    rounding along the left null space (an eigenvalue 1 of ``E``, a repelling fixed
    point of slope 13/4) grows 13/4-fold per iteration, so many iterations drift away
    again. Returns ``Z_iters`` (float64, shape of ``a``); an all-zero matrix gives 0.

    >>> import numpy as np
    >>> from refattn.lowrank import iterative_pinv
    >>> a = np.array([[0.7, 0.3], [0.2, 0.8]])
    >>> bool(np.allclose(iterative_pinv(a, 6), np.linalg.inv(a), rtol=1e-12))
    True
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"iterative_pinv needs square matrices (..., c, c), got shape "
                         f"{a.shape}")
    iters = check_int("iters", iters, minimum=0)
    norm1 = np.abs(a).sum(axis=-2).max(axis=-1, initial=0.0)
    norm_inf = np.abs(a).sum(axis=-1).max(axis=-1, initial=0.0)
    denom = (norm1 * norm_inf)[..., None, None]
    z = np.divide(a.swapaxes(-1, -2), denom, out=np.zeros_like(a), where=denom > 0)
    eye = np.eye(a.shape[-1])
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _nystrom(q, k, v, *, num_landmarks, pinv_iters, scale, check_finite):
    """Validate; return ``(pb, f (B,Hkv,G,N,c), z (B,Hkv,G,c,c), b (B,Hkv,G,c,M), v)``."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    seen = f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, k " \
           f"{pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
    c = check_int("num_landmarks", num_landmarks, minimum=1, context=f" ({seen})")
    if c > min(pb.n, pb.m):
        raise ValueError(f"num_landmarks={c} exceeds min(N, M)={min(pb.n, pb.m)}: each "
                         f"landmark is the mean of a segment of at least one query and one "
                         f"key; got {seen}")
    if pinv_iters is not None:
        pinv_iters = check_int("pinv_iters", pinv_iters, minimum=0,
                                context=" (or None for the exact pseudoinverse)")
    s = resolve_scale(scale, pb.d)
    qg = _grouped(q, pb)                                    # (B, Hkv, G, N, D)
    q_land = segment_means(qg, c)                           # (B, Hkv, G, c, D)
    k_land = segment_means(k, c)[:, :, None]                # (B, Hkv, 1, c, D)
    f = _softmax(s * (qg @ k_land.swapaxes(-1, -2)))
    a = _softmax(s * (q_land @ k_land.swapaxes(-1, -2)))
    b = _softmax(s * (q_land @ k[:, :, None].swapaxes(-1, -2)))
    z = np.linalg.pinv(a) if pinv_iters is None else iterative_pinv(a, pinv_iters)
    return pb, f, z, b, v


@register(family="lowrank", exact=False, time="O(c·(N+M)·(D+Dv) + c³·I)",
          state="O(c·(D+Dv)) landmarks per query head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=False,
          row_stochastic=False,
          example={"num_landmarks": 1}, budget=lambda n, b: {"num_landmarks": b})
def nystrom_attention(q, k, v, *, num_landmarks, pinv_iters=6, scale=None,
                      check_finite=True):
    r"""Nyströmformer attention: the Nyström approximation of ``softmax(s Q K^T)``
    through ``num_landmarks`` segment-mean landmarks.

    .. math:: O = \tilde F\, \tilde A^{+}\, (\tilde B V), \quad
              \tilde F = \operatorname{softmax}(s\, Q \tilde K^\top),\
              \tilde A = \operatorname{softmax}(s\, \tilde Q \tilde K^\top),\
              \tilde B = \operatorname{softmax}(s\, \tilde Q K^\top)

    (Xiong et al. 2021, "Nyströmformer"). ``Q̃`` (``c x D``) holds the means of
    ``c`` contiguous segments of the queries, ``K̃`` those of the keys.

    **Segments.** The paper needs ``c`` to divide the length (the official code pads the
    input). Here any ``1 <= c <= min(N, M)`` is accepted and the segments follow
    ``np.array_split`` (:func:`segment_means`): with ``L = c·q + r`` the first ``r``
    segments have ``q + 1`` tokens, the rest ``q``. When ``c`` divides ``L`` this is the
    paper's rule. ``c > min(N, M)`` raises ``ValueError``.

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``; ``N != M``
        allowed (queries and keys have separate landmarks). GQA: each query head has its
        own query landmarks and uses its KV head's key landmarks.
    num_landmarks : int ``c``.
    pinv_iters : int >= 0, iterations of :func:`iterative_pinv` (the paper uses 6), or
        None for the exact pseudoinverse (``np.linalg.pinv``). Six iterations are not
        converged when :math:`\tilde A` is ill-conditioned (small logits, many landmarks);
        that is the paper's operator, not a defect of the reference.
    scale : float, default ``1/sqrt(D)``.
    check_finite : raise on non-finite inputs.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. The paper's depthwise-convolution skip connection on
    ``V`` is a separate learned layer and not part of this operator. Non-causal.
    With ``c = N = M`` (one token per segment) and the exact pseudoinverse the result is
    exact attention (:math:`P P^{+} P = P`).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> from refattn.lowrank import nystrom_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 8, 4)) * 0.5
    >>> nystrom_attention(q, k, v, num_landmarks=4).shape
    (2, 8, 4)
    >>> exact = nystrom_attention(q, k, v, num_landmarks=8, pinv_iters=None)
    >>> bool(np.allclose(exact, ra.attention(q, k, v)))
    True
    """
    pb, f, z, b, v = _nystrom(q, k, v, num_landmarks=num_landmarks, pinv_iters=pinv_iters,
                              scale=scale, check_finite=check_finite)
    bv = b @ v[:, :, None]                                  # (B, Hkv, G, c, Dv)
    return pb.unflatten(_ungrouped(f @ (z @ bv), pb))


def nystrom_attention_matrix(q, k, *, num_landmarks, pinv_iters=6, scale=None,
                             check_finite=True, memory_budget=None):
    r"""The implied matrix :math:`\tilde F \tilde A^{+} \tilde B` ``(..., Hq, N, M)`` of
    :func:`nystrom_attention` (same arguments), so that ``nystrom_attention(q, k, v) ==
    A @ v``. Not row-stochastic in general (:math:`\tilde A^{+}` has negative entries).
    Rows sum to 1 when :math:`\tilde A` is invertible and its inverse exact
    (``pinv_iters=None``): :math:`\tilde B 1 = 1` and :math:`\tilde A^{-1} 1 = 1`.
    ``memory_budget`` bounds the matrix.

    >>> import numpy as np
    >>> from refattn.lowrank import nystrom_attention_matrix
    >>> q, k = np.random.default_rng(1).standard_normal((2, 1, 6, 3))
    >>> a = nystrom_attention_matrix(q, k, num_landmarks=3, pinv_iters=None)
    >>> bool(np.allclose(a.sum(-1), 1.0)), bool((a < 0).any())
    (True, True)
    """
    pb, f, z, b, _ = _nystrom(q, k, None, num_landmarks=num_landmarks,
                              pinv_iters=pinv_iters, scale=scale, check_finite=check_finite)
    _implied_memory(pb, memory_budget, "nystrom_attention",
                    "refattn.lowrank.nystrom_attention (it never forms the matrix)")
    return pb.unflatten(_ungrouped(f @ (z @ b), pb))


# ----------------------------------------------------------------------------- Luna
def _luna(q, k, v, *, packed, scale, check_finite):
    """Validate; return ``(pb, pi (B,Hkv,G,l,M), u (B,Hkv,G,N,l), cv, v)`` where ``pi``
    is the pack attention, ``u`` the unpack attention and ``cv = pi @ v`` (None
    without ``v``)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    seen = f"q {pb.batch_shape + (pb.heads_q, pb.n, pb.d)}, k " \
           f"{pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"
    s = resolve_scale(scale, pb.d)
    qg = _grouped(q, pb)
    if isinstance(packed, (int, np.integer)) and not isinstance(packed, (bool, np.bool_)):
        l_ = check_int("packed", packed, minimum=1, context=f" (packed length l; {seen})")
        if l_ > pb.n:
            raise ValueError(f"packed={l_} segment means of the queries need l <= N={pb.n}; "
                             f"got {seen}")
        p = segment_means(qg, l_)                           # (B, Hkv, G, l, D)
    else:
        p = to_float64(packed, "packed", check_finite=check_finite)
        if p.ndim < 2 or p.shape[-1] != pb.d or p.shape[-2] < 1:
            raise ValueError(f"packed must have shape (l, D) or (..., H, l, D) with D={pb.d} "
                             f"and l >= 1; got packed {p.shape} with {seen}")
        if p.ndim == 2:
            p = np.broadcast_to(p, (pb.batch, pb.heads_kv, pb.group) + p.shape)
        else:
            hp = p.shape[-3]
            lead = p.shape[:-3]
            try:
                ok = len(lead) <= len(pb.batch_shape) and \
                    np.broadcast_shapes(lead, pb.batch_shape) == pb.batch_shape
            except ValueError:
                ok = False
            if not ok or hp not in (1, pb.heads_kv, pb.heads_q):
                raise ValueError(f"packed {p.shape}: the head dim must be 1, Hkv={pb.heads_kv} "
                                 f"or Hq={pb.heads_q} and the leading dims must broadcast to "
                                 f"the batch dims {pb.batch_shape}; got {seen}")
            p = np.broadcast_to(p, pb.batch_shape + p.shape[-3:])
            p = p.reshape((pb.batch,) + p.shape[-3:])
            if hp == pb.heads_q:
                p = p.reshape(pb.batch, pb.heads_kv, pb.group, *p.shape[-2:])
            else:          # 1 or Hkv heads: shared by the query heads of a group
                p = np.broadcast_to(p[:, :, None], (pb.batch, pb.heads_kv, pb.group)
                                    + p.shape[-2:])
    kg = k[:, :, None]                                      # (B, Hkv, 1, M, D)
    pi = _softmax(s * (p @ kg.swapaxes(-1, -2)))            # (B, Hkv, G, l, M)
    ck = pi @ kg                                            # packed keys (.., l, D)
    u = _softmax(s * (qg @ ck.swapaxes(-1, -2)))            # (B, Hkv, G, N, l)
    cv = None if v is None else pi @ v[:, :, None]          # packed values (.., l, Dv)
    return pb, pi, u, ck, cv, v


@register(family="lowrank", exact=False, time="O(l·(N+M)·(D+Dv))",
          state="O(l·(D+Dv)) packed keys and values per query head", supports_causal=False,
          supports_mask=False, supports_gqa=True, position_free=True,
          row_stochastic=True, example={"packed": 1},
          budget=lambda n, b: {"packed": b})
def luna_attention(q, k, v, *, packed, scale=None, return_packed=False,
                   check_finite=True):
    r"""Luna attention: pack the keys and values into ``l`` rows with a packed query
    sequence ``P``, then let the queries attend to the packed rows.

    .. math:: \Pi = \operatorname{softmax}(s\, P K^\top)\ (l \times M), \quad
              C_K = \Pi K,\ C_V = \Pi V, \quad
              O = \operatorname{softmax}(s\, Q C_K^\top)\, C_V

    (Ma et al. 2021, "Luna: Linear Unified Nested Attention"). In the paper
    the pack is :math:`C_P = \mathrm{Attn}(P W_q, X W_k, X W_v)` and the unpack
    :math:`\mathrm{Attn}(X W_q', C_P W_k', C_P W_v')`. This reference works on
    already-projected ``q, k, v``; it packs the key and the value projections with the
    same weights :math:`\Pi`, which is the paper's computation when the unpack's key and
    value projections equal the pack's (:math:`\Pi (X W) = (\Pi X) W`), and needs no
    parameters or ``Dv == D``. Other unpack projections: pass ``return_packed=True``
    and project ``C_K``, ``C_V`` yourself.

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    packed : the packed sequence ``P``: an array ``(l, D)`` (shared by all heads) or
        ``(..., H, l, D)`` with ``H`` in ``{1, Hkv, Hq}`` and leading dims broadcasting
        to the batch dims (with ``H = Hq`` each query head packs with its own ``P``);
        or an int ``l`` (``1 <= l <= N``), meaning ``P`` = the means of ``l`` contiguous
        segments of each query head's queries (:func:`segment_means`), a parameter-free
        stand-in for the learned ``P`` of the paper's first layer.
    scale : float, default ``1/sqrt(D)``, for both the pack and the unpack logits.
    return_packed : also return ``(C_K, C_V)``, ``(..., Hq, l, D)`` and
        ``(..., Hq, l, Dv)`` (Luna's next layer uses the packed context).
    check_finite : raise on non-finite inputs.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the packed keys and values). Linear in ``N`` and
    ``M``; the implied matrix :math:`\operatorname{softmax}(s Q C_K^\top)\,\Pi` is
    row-stochastic; permuting keys with their values changes nothing. Non-causal (the
    paper's causal Luna replaces the softmax unpack by a different, cumulative
    operator). With ``l = 1`` every query receives the pack attention of the one packed
    row.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> from refattn.lowrank import luna_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> p = rng.standard_normal((3, 4))                       # l = 3 packed rows
    >>> luna_attention(q, k, v, packed=p).shape
    (2, 6, 4)
    >>> one = luna_attention(q, k, v, packed=p[:1])            # l = 1: the packed context
    >>> ctx = ra.attention(np.broadcast_to(p[:1], (2, 1, 4)), k, v)   # (2 heads, 1, 4)
    >>> bool(np.allclose(one, ctx))                             # for every query
    True
    """
    pb, _, u, ck, cv, v = _luna(q, k, v, packed=packed, scale=scale,
                                check_finite=check_finite)
    out = pb.unflatten(_ungrouped(u @ cv, pb))
    if not return_packed:
        return out
    ck = np.broadcast_to(ck, cv.shape[:-1] + ck.shape[-1:])
    return out, pb.unflatten(_ungrouped(np.ascontiguousarray(ck), pb)), \
        pb.unflatten(_ungrouped(cv, pb))


def luna_attention_matrix(q, k, *, packed, scale=None, check_finite=True,
                          memory_budget=None):
    r"""The implied matrix :math:`A = \operatorname{softmax}(s\, Q C_K^\top)\,\Pi`
    ``(..., Hq, N, M)`` of :func:`luna_attention` (same arguments): a product of two
    row-stochastic matrices, hence row-stochastic, with ``luna_attention(q, k, v) ==
    A @ v``. Its rank is at most ``l``. ``memory_budget`` bounds the matrix.

    >>> import numpy as np
    >>> from refattn.lowrank import luna_attention_matrix
    >>> q, k = np.random.default_rng(2).standard_normal((2, 1, 5, 3))
    >>> a = luna_attention_matrix(q, k, packed=2)
    >>> bool(np.allclose(a.sum(-1), 1.0)), int(np.linalg.matrix_rank(a[0]))
    (True, 2)
    """
    pb, pi, u, _, _, _ = _luna(q, k, None, packed=packed, scale=scale,
                               check_finite=check_finite)
    _implied_memory(pb, memory_budget, "luna_attention",
                    "refattn.lowrank.luna_attention (it never forms the matrix)")
    return pb.unflatten(_ungrouped(u @ pi, pb))


attach(linformer_attention, implied=linformer_attention_matrix)
attach(nystrom_attention, implied=nystrom_attention_matrix)
attach(luna_attention, implied=luna_attention_matrix)
