r"""Scatterbrain: a low-rank estimate of attention plus an exact sparse correction
(Chen, Dao et al. 2021).

With Performer features :math:`\phi` (:mod:`refattn.performer`), the kernel
:math:`K_{ij} = e^{s\,q_i\cdot k_j}` is estimated as

.. math:: \hat K_{ij} = \phi(x_i)\cdot\phi(y_j) + \mathbb 1[(i, j) \in S]\,
          \big(K_{ij} - \phi(x_i)\cdot\phi(y_j)\big),

exact on a sparse support :math:`S` (each query's ``topk`` highest-scoring keys, or the
pairs that share an LSH bucket) and low-rank elsewhere; the output is
:math:`o_i = \sum_j \hat K_{ij} v_j / \sum_j \hat K_{ij}`. It is computed as the
Performer's two ``O((N + M) m D)`` products plus an ``O(|S| (D + m))`` correction.
Sparse attention wins where attention is peaked (low entropy), low-rank where it is
spread out (high entropy); Scatterbrain is meant to beat both in between.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int, check_memory, resolve_rng, resolve_scale
from .._core.problem import prepare_qkv
from .._core.select import topk_keep
from ..registry import attach, register
from ..sparse.lsh import lsh_buckets
from .features import resolve_omega, scaled_pair, stabilized_features

__all__ = ["scatterbrain_attention", "scatterbrain_attention_matrix"]

_SUPPORTS = ("topk", "lsh")


def _setup(q, k, v, *, num_features, support, topk, n_buckets, n_hashes, kernel, orthogonal,
           scale, rng, check_finite, where):
    """Validate; draw features; return what both forms need."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    if support not in _SUPPORTS:
        raise ValueError(f"support must be one of {_SUPPORTS}, got {support!r}")
    if kernel == "trigonometric":
        raise ValueError("scatterbrain needs a kernel with positive features ('positive' or "
                         "'hyperbolic'); 'trigonometric' weights can be negative")
    if support == "topk":
        topk = check_int("topk", topk, minimum=1, context=" (keys in each query's exact "
                          "support)")
    else:
        n_buckets = check_int("n_buckets", n_buckets, minimum=2)
        n_hashes = check_int("n_hashes", n_hashes, minimum=1)
    gen = resolve_rng(rng, where)           # features first, then LSH rotations
    omega = resolve_omega(None, num_features, pb.d, orthogonal, gen, where)
    s = resolve_scale(scale, pb.d)
    x, y = scaled_pair(q, k, s)
    with np.errstate(over="ignore"):
        fq, cq = stabilized_features(x, omega, kernel, "row", True)       # (B,Hq,N,F)
        fk, ck = stabilized_features(y, omega, kernel, "global", True)    # (B,Hkv,M,F)
    buckets = None
    if support == "lsh":   # shared rotations: (rounds, B, H, L) bucket ids
        rounds = lsh_buckets(np.concatenate([_unit(q), np.repeat(_unit(k), pb.group, 1)], 2),
                             n_buckets, gen, n_hashes=n_hashes)
        buckets = rounds[..., :pb.n], rounds[..., pb.n:]
    return pb, q, k, v, x, y, fq, cq, fk, ck, buckets, topk


def _unit(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _support(s, b, heads, rows, buckets, topk):
    """Boolean ``(G, r, M)`` support of the exact part for one block of logits ``s``."""
    if buckets is None:
        return topk_keep(s, topk)
    bq, bk = buckets
    return (bq[:, b, heads][:, :, rows, None] == bk[:, b, heads][:, :, None, :]).any(axis=0)


def _blocks(pb, x, y, fq, cq, fk, ck, buckets, topk, block_q):
    """Per (batch, KV head, query block): the rows, the exact-part support, and the
    kernel on it ``exp(s - shifts)`` and its low-rank estimate, both rescaled per row by
    ``exp(-t)`` so that nothing overflows."""
    for b, hk, hs, rs in pb.query_blocks(block_q):
        heads, rows = np.arange(hs.start, hs.stop), np.arange(rs.start, rs.stop)
        s = x[b, hs, rs] @ y[b, hk].T                                        # (G, r, M)
        keep = _support(s, b, heads, rows, buckets, topk)
        shifted = s - cq[b, hs, rs] - ck[b, hk]
        t = np.maximum(0.0, np.max(np.where(keep, shifted, -np.inf), axis=-1,
                                   initial=-np.inf))[..., None]
        exact = np.where(keep, np.exp(np.where(keep, shifted - t, -np.inf)), 0.0)
        low = (fq[b, hs, rs] @ fk[b, hk].T) * np.exp(-t)
        yield b, hs, hk, rs, keep, exact, low, np.exp(-t)


@register(family="linear", exact=False, time="O((N+M)·m·D + |S|·(D+m))",
          state="O(m·Dv) + sparse support", supports_causal=False, supports_mask=False,
          supports_gqa=True, position_free=True, row_stochastic=True,
          example={"num_features": 8, "topk": 2},
          budget=lambda n, b: {"num_features": max(1, b // 2), "topk": max(1, b // 2)})
def scatterbrain_attention(q, k, v, *, num_features, support="topk", topk=None,
                           n_buckets=None, n_hashes=1, kernel="positive", orthogonal=True,
                           scale=None, rng, block_q=256, check_finite=True):
    """Scatterbrain attention: Performer features plus the exact kernel on a sparse
    support (module docstring for the equation).

    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)`` (GQA).
    num_features : Performer projections ``m`` (:func:`refattn.performer_attention`).
    support : ``"topk"`` (each query's ``topk`` highest-scoring keys; ties to the lower
        index) or ``"lsh"`` (pairs sharing a bucket in any of ``n_hashes`` rounds of
        angular LSH with ``n_buckets`` buckets over unit queries and keys).
    kernel : ``"positive"`` or ``"hyperbolic"`` (positive features, so weights >= 0).
    rng : int seed or Generator (features and LSH rotations); required.
    block_q : query rows whose ``(G, block_q, M)`` support is formed at a time.

    Returns float64 ``(..., Hq, N, Dv)``. Non-causal.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4))
    >>> out = ra.scatterbrain_attention(q, k, v, num_features=4, topk=8, rng=0)
    >>> bool(np.allclose(out, ra.attention(q, k, v)))      # support = every key: exact
    True
    """
    pb, q, k, v, x, y, fq, cq, fk, ck, buckets, topk = _setup(
        q, k, v, num_features=num_features, support=support, topk=topk, n_buckets=n_buckets,
        n_hashes=n_hashes, kernel=kernel, orthogonal=orthogonal, scale=scale, rng=rng,
        check_finite=check_finite, where="scatterbrain_attention")
    block_q = check_int("block_q", block_q, minimum=1)
    out, _ = pb.poisoned_outputs()
    kv_sums = np.einsum("bhmf,bhmd->bhfd", fk, v)            # low-rank part: phi(K)^T V
    k_sums = fk.sum(axis=2)                                   # and phi(K)^T 1
    for b, hs, hk, rs, keep, exact, low, rescale in _blocks(pb, x, y, fq, cq, fk, ck,
                                                            buckets, topk, block_q):
        num = (fq[b, hs, rs] @ kv_sums[b, hk]) * rescale      # (G, r, Dv)
        den = (fq[b, hs, rs] @ k_sums[b, hk])[..., None] * rescale
        g, r, j = np.nonzero(keep)                            # the exact correction
        delta = exact[g, r, j] - low[g, r, j]
        np.add.at(num, (g, r), delta[:, None] * v[b, hk, j])
        np.add.at(den, (g, r, 0), delta)
        out[b, hs, rs] = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return pb.unflatten(out)


def scatterbrain_attention_matrix(q, k, *, num_features, support="topk", topk=None,
                                  n_buckets=None, n_hashes=1, kernel="positive",
                                  orthogonal=True, scale=None, rng, block_q=256,
                                  check_finite=True, memory_budget=None):
    """The ``(..., Hq, N, M)`` matrix :func:`scatterbrain_attention` applies to ``v``:
    ``where(S, K, phi(x)·phi(y))`` normalized per row, formed densely (an independent
    form of the same estimate). Same arguments; same ``rng`` gives the same features.
    """
    pb, q, k, _, x, y, fq, cq, fk, ck, buckets, topk = _setup(
        q, k, None, num_features=num_features, support=support, topk=topk,
        n_buckets=n_buckets, n_hashes=n_hashes, kernel=kernel, orthogonal=orthogonal,
        scale=scale, rng=rng, check_finite=check_finite,
        where="scatterbrain_attention_matrix")
    block_q = check_int("block_q", block_q, minimum=1)
    check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 8.0, memory_budget,
                 "the scatterbrain attention matrix", "scatterbrain_attention")
    a = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    for b, hs, hk, rs, keep, exact, low, _ in _blocks(pb, x, y, fq, cq, fk, ck, buckets,
                                                      topk, block_q):
        w = np.where(keep, exact, low)
        total = w.sum(axis=-1, keepdims=True)
        a[b, hs, rs] = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return pb.unflatten(a)


attach(scatterbrain_attention, implied=scatterbrain_attention_matrix)
