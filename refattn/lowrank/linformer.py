r"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"),
float64 reference: keys and values are projected along the sequence by ``E, F``
``(rank x M)``,

.. math:: O = \operatorname{softmax}\!\big(s\, Q (E K)^\top\big)\,(F V),

``s`` the ``scale`` (default ``1/sqrt(D)``), the softmax over the last axis. Non-causal
(the paper defines no causal form) and without a mask. The implied matrix
:func:`linformer_attention_matrix` ``A = softmax(...) F`` ``(..., Hq, N, M)``, with
``out == A @ v``, has the signs of ``F`` (not row-stochastic);
:func:`linformer_projections` builds ``E, F``.

Shapes follow refattn's layout, ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``,
``v (..., Hkv, M, Dv)``, with grouped-query attention (query head ``h`` uses KV head
``h // (Hq // Hkv)``).
"""
from __future__ import annotations

import math

import numpy as np

from .._core.checks import (check_bool, check_cotangent, check_int, resolve_rng,
                            resolve_scale)
from .._core.problem import prepare_qkv
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (broadcasts_to, grouped, implied_memory, segment_means, softmax,
                      softmax_vjp, ungrouped)

__all__ = ["linformer_attention", "linformer_attention_matrix", "linformer_attention_vjp",
           "linformer_projections"]


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

    >>> import numpy as np, refattn as ra
    >>> e, f = ra.lowrank.linformer_projections(6, 2, rng=0)
    >>> e.shape, f.shape, bool((e != f).any())
    ((2, 6), (2, 6), True)
    >>> e2, f2 = ra.lowrank.linformer_projections(6, 2, rng=0, shared=True)
    >>> bool(np.array_equal(e, e2)) and f2 is e2
    True
    >>> ra.lowrank.linformer_projections(5, 2, kind="mean")[0].round(3)
    array([[0.333, 0.333, 0.333, 0.   , 0.   ],
           [0.   , 0.   , 0.   , 0.5  , 0.5  ]])
    """
    m = check_int("m", m, minimum=1, context=" (the number of keys M)")
    rank = check_int("rank", rank, minimum=1, context=f" (rows of the projections; M={m})")
    if rank > m:
        raise ValueError(f"rank={rank} exceeds the number of keys M={m}: Linformer "
                         f"projects the M keys onto rank <= M rows")
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
    shared = check_bool("shared", shared)
    target = pb.batch_shape + (pb.heads_kv,)
    if proj is None:
        if rank is None:
            raise TypeError("linformer_attention needs rank= (rows of the random "
                            "projections) when proj is None")
        gen = resolve_rng(rng, "linformer_attention (random projections, proj=None)")
        e, f = linformer_projections(pb.m, rank, rng=gen, shared=shared)
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
            raise TypeError(f"proj must be a pair (E, F) of (..., rank, M) matrices, or "
                            f"one matrix with shared=True; got {type(proj).__name__} of "
                            f"{what}")
        pair = (("proj[0] (E)", proj[0]), ("proj[1] (F)", proj[1]))
    mats = []
    for name, x in pair:
        a = to_float64(x, name, check_finite=check_finite)
        if a.ndim < 2 or a.shape[-1] != pb.m or a.ndim > len(target) + 2:
            raise ValueError(f"{name} must have shape (..., rank, M) with M={pb.m} keys "
                             f"and leading dims broadcasting to (*batch, Hkv)={target}; "
                             f"got {a.shape}")
        if not broadcasts_to(a.shape[:-2], target):
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


def _linformer(q, k, v, *, rank, proj, shared, rng, scale, check_finite, parts=False):
    """Validate; return ``(pb, p (B, Hkv, G, N, rank), F (..., rank, M), v)``, and with
    ``parts`` also ``(qg (B, Hkv, G, N, D), k, E, E K, s)`` for the gradients."""
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
    qg = grouped(q, pb)
    p = softmax(s * (qg @ ek[:, :, None].swapaxes(-1, -2)))
    return (pb, p, f, v, (qg, k, e, ek, s)) if parts else (pb, p, f, v)


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
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))          # 2 heads, 6 tokens
    >>> ra.linformer_attention(q, k, v, rank=3, rng=0).shape
    (2, 6, 4)
    >>> eye = np.eye(6)
    >>> bool(np.allclose(ra.linformer_attention(q, k, v, proj=(eye, eye)),
    ...                  ra.attention(q, k, v)))
    True
    """
    pb, p, f, v = _linformer(q, k, v, rank=rank, proj=proj, shared=shared, rng=rng,
                             scale=scale, check_finite=check_finite)
    fv = f @ v                                              # (B, Hkv, r, Dv)
    return pb.unflatten(ungrouped(p @ fv[:, :, None], pb))


def linformer_attention_matrix(q, k, *, rank=None, proj=None, shared=False, rng=None,
                               scale=None, check_finite=True, memory_budget=None):
    r"""The implied matrix ``A = softmax(s Q (E K)^T) F`` ``(..., Hq, N, M)`` of
    :func:`linformer_attention` (same arguments, same ``rng``), so that
    ``linformer_attention(q, k, v) == A @ v`` (``v`` repeated over the query heads of a
    group). Not row-stochastic in general: ``F`` has entries of both signs, so rows of
    ``A`` sum to ``softmax(...) F 1``, not 1. ``memory_budget`` bounds the matrix.

    >>> import numpy as np, refattn as ra
    >>> q = k = np.random.default_rng(0).standard_normal((1, 4, 2))
    >>> a = ra.lowrank.linformer_attention_matrix(q, k, proj=np.full((1, 4), 0.25),
    ...                                           shared=True)
    >>> a.round(3)                       # one averaging projection: uniform attention
    array([[[0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25]]])
    """
    pb, p, f, _ = _linformer(q, k, None, rank=rank, proj=proj, shared=shared, rng=rng,
                             scale=scale, check_finite=check_finite)
    implied_memory(pb, memory_budget, "linformer_attention")
    return pb.unflatten(ungrouped(p @ f[:, :, None], pb))


def linformer_attention_vjp(q, k, v, grad_out, *, rank=None, proj=None, shared=False,
                            rng=None, scale=None, check_finite=True):
    r"""Gradients of :func:`linformer_attention` for the cotangent ``grad_out``
    ``(..., Hq, N, Dv)`` of its output (same keyword arguments, validated alike).

    With :math:`\tilde K = E K`, :math:`\tilde V = F V` ``(rank x D)``,
    :math:`P = \operatorname{softmax}(S)`, :math:`S = s\, Q \tilde K^\top` and
    :math:`dO` = ``grad_out``:

    .. math::

        d\tilde V = P^\top dO, \quad dP = dO\, \tilde V^\top, \quad
        dS = P \circ \big(dP - \operatorname{rowsum}(dP \circ P)\big), \\
        dQ = s\, dS\, \tilde K, \quad d\tilde K = s\, dS^\top Q, \quad
        dK = E^\top d\tilde K, \quad dV = F^\top d\tilde V, \quad
        dE = d\tilde K\, K^\top, \quad dF = d\tilde V\, V^\top

    (the chain rule through the two projections and the softmax; Wang et al. 2020).
    GQA: a KV head's (and its projections') gradients sum over its query heads.

    Returns ``{"q", "k", "v"}``, float64, each of its input's shape, and, when the
    projections are given as arrays, ``"proj"`` in the structure of ``proj``: a pair
    ``(dE, dF)`` (each of its matrix's shape, broadcast dims summed), or with
    ``shared=True`` the one matrix's gradient ``dE + dF``. Random projections
    (``proj=None``) are **held fixed**: drawn from ``rng`` exactly as the forward draws
    them (pass the same int seed: a ``Generator`` advances at each call) and given no
    gradient. Working memory: the ``(N, rank)`` logits per query head, never ``N x M``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 4))
    >>> e, f = ra.lowrank.linformer_projections(6, 3, rng=1)
    >>> g = ra.vjp("linformer_attention", q, k, v, np.ones((2, 6, 4)), proj=(e, f))
    >>> sorted(g), g["k"].shape, [x.shape for x in g["proj"]]
    (['k', 'proj', 'q', 'v'], (2, 6, 4), [(3, 6), (3, 6)])
    >>> eye = np.eye(6)                                # E = F = I: exact attention's
    >>> mine = ra.vjp("linformer_attention", q, k, v, np.ones((2, 6, 4)), proj=(eye, eye))
    >>> ref = ra.vjp("attention", q, k, v, np.ones((2, 6, 4)))
    >>> all(np.allclose(mine[x], ref[x]) for x in "qkv")
    True
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    pb, p, f, v, (qg, k, e, ek, s) = _linformer(
        q, k, v, rank=rank, proj=proj, shared=shared, rng=rng, scale=scale,
        check_finite=check_finite, parts=True)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                         check_finite=check_finite)
    do = grouped(do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv), pb)   # (B, Hkv, G, N, Dv)
    fv = (f @ v)[:, :, None]                                # (B, Hkv, 1, r, Dv)
    dfv = (p.swapaxes(-1, -2) @ do).sum(axis=2)             # (B, Hkv, r, Dv)
    ds = softmax_vjp(p, do @ fv.swapaxes(-1, -2))           # (B, Hkv, G, N, r)
    dqg = s * (ds @ ek[:, :, None])
    dek = s * (ds.swapaxes(-1, -2) @ qg).sum(axis=2)        # (B, Hkv, r, D)
    grads = {"q": pb.input_gradient(ungrouped(dqg, pb), shapes["q"]),
             "k": pb.input_gradient(e.swapaxes(-1, -2) @ dek, shapes["k"]),
             "v": pb.input_gradient(f.swapaxes(-1, -2) @ dfv, shapes["v"])}
    if proj is not None:
        de, df = dek @ k.swapaxes(-1, -2), dfv @ v.swapaxes(-1, -2)   # (B, Hkv, r, M)
        if shared:
            grads["proj"] = pb.input_gradient(de + df, np.shape(proj))
        else:
            grads["proj"] = (pb.input_gradient(de, np.shape(proj[0])),
                             pb.input_gradient(df, np.shape(proj[1])))
    return grads


attach(linformer_attention, implied=linformer_attention_matrix,
       vjp=linformer_attention_vjp)
