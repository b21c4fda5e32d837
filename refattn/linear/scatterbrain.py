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

from .._core.checks import (check_choice, check_cotangent, check_int, check_memory,
                            resolve_rng, resolve_scale)
from .._core.backward import head_summed_product
from .._core.problem import prepare_qkv
from .._core.select import topk_keep
from ..registry import attach, register
from ..sparse.lsh import lsh_buckets
from .features import (resolve_omega, scaled_pair, stabilized_features,
                       stabilized_features_vjp)

__all__ = ["scatterbrain_attention", "scatterbrain_attention_matrix",
           "scatterbrain_attention_vjp"]

_SUPPORTS = ("topk", "lsh")


def _setup(q, k, v, *, num_features, support, topk, n_buckets, n_hashes, kernel, orthogonal,
           scale, rng, check_finite, where, memory_budget=None):
    """Validate; check the features' and hashes' memory; draw them; return what both
    forms need."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    if support not in _SUPPORTS:
        raise ValueError(f"support must be one of {_SUPPORTS}, got {support!r}")
    if kernel == "trigonometric":
        raise ValueError("scatterbrain needs a kernel with positive features ('positive' or "
                         "'hyperbolic'); 'trigonometric' weights can be negative")
    check_choice("kernel", kernel, ("positive", "hyperbolic"))
    unused = {"topk": [("n_buckets", n_buckets, None), ("n_hashes", n_hashes, 1)],
              "lsh": [("topk", topk, None)]}[support]
    for name, value, default in unused:
        if value is not default and value != default:
            raise ValueError(f"{name}={value!r} has no effect with support={support!r}; "
                             f"leave it unset")
    if support == "topk":
        topk = check_int("topk", topk, minimum=1, context=" (keys in each query's exact "
                          "support)")
    else:
        n_buckets = check_int("n_buckets", n_buckets, minimum=2)
        n_hashes = check_int("n_hashes", n_hashes, minimum=1)
    gen = resolve_rng(rng, where)           # features first, then LSH rotations
    rows = pb.batch * (pb.heads_q * pb.n + pb.heads_kv * pb.m)
    omega = resolve_omega(None, num_features, pb.d, orthogonal, gen, where, rows=rows,
                          cells=pb.batch * pb.heads_kv * (pb.dv + 1),
                          width=1 if kernel == "positive" else 2,
                          memory_budget=memory_budget)
    s = resolve_scale(scale, pb.d)
    x, y = scaled_pair(q, k, s)
    with np.errstate(over="ignore"):
        fq, cq = stabilized_features(x, omega, kernel, "row", True)       # (B,Hq,N,F)
        fk, ck = stabilized_features(y, omega, kernel, "global", True)    # (B,Hkv,M,F)
    buckets = None
    if support == "lsh":   # shared rotations: (rounds, B, H, L) bucket ids
        rounds = lsh_buckets(np.concatenate([_unit(q), np.repeat(_unit(k), pb.group, 1)], 2),
                             n_buckets, gen, n_hashes=n_hashes, memory_budget=memory_budget)
        buckets = rounds[..., :pb.n], rounds[..., pb.n:]
    return pb, q, k, v, x, y, fq, cq, fk, ck, buckets, topk, (omega, kernel, s)


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
                           scale=None, rng, block_q=256, check_finite=True,
                           memory_budget=None):
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
    memory_budget : bytes (default 8 GiB) the features and LSH buckets may take; more
        raises :class:`refattn.MemoryBudgetError` naming the parameter, before drawing.

    Returns float64 ``(..., Hq, N, Dv)``. Non-causal.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4))
    >>> out = ra.scatterbrain_attention(q, k, v, num_features=4, topk=8, rng=0)
    >>> bool(np.allclose(out, ra.attention(q, k, v)))      # support = every key: exact
    True
    """
    pb, q, k, v, x, y, fq, cq, fk, ck, buckets, topk, _ = _setup(
        q, k, v, num_features=num_features, support=support, topk=topk, n_buckets=n_buckets,
        n_hashes=n_hashes, kernel=kernel, orthogonal=orthogonal, scale=scale, rng=rng,
        check_finite=check_finite, where="scatterbrain_attention",
        memory_budget=memory_budget)
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
    pb, q, k, _, x, y, fq, cq, fk, ck, buckets, topk, _ = _setup(
        q, k, None, num_features=num_features, support=support, topk=topk,
        n_buckets=n_buckets, n_hashes=n_hashes, kernel=kernel, orthogonal=orthogonal,
        scale=scale, rng=rng, check_finite=check_finite,
        where="scatterbrain_attention_matrix", memory_budget=memory_budget)
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


def scatterbrain_attention_vjp(q, k, v, grad_out, *, num_features, support="topk",
                               topk=None, n_buckets=None, n_hashes=1, kernel="positive",
                               orthogonal=True, scale=None, rng, block_q=256,
                               check_finite=True, memory_budget=None):
    r"""Gradients of :func:`scatterbrain_attention` with the **random features and the
    sparse support held fixed**: the same ``ω`` and (for ``support="lsh"``) the same
    rotations as the forward (the same int seed ``rng``; a ``Generator`` advances), and
    the support ``S`` (each query's top-k keys, or the pairs sharing a bucket) a
    constant, as Scatterbrain trains; ``ω`` gets no gradient.

    With the weights :math:`W_{ij} = K_{ij}` on ``S`` and
    :math:`\phi(x_i)\cdot\phi(y_j)` elsewhere (``K_ij = e^{x_i·y_j}``), the row sums
    :math:`d_i = \sum_j W_{ij}` and :math:`o_i = \sum_j W_{ij} v_j / d_i`:

    .. math:: \overline{W}_{ij} = rac{dO_i\cdot (v_j - o_i)}{d_i}, \quad
              dv_j = \sum_i rac{W_{ij}}{d_i} dO_i, \quad
              ar x_i \mathrel{+}= \sum_{j \in S_i} \overline{W}_{ij} K_{ij}\, y_j,
              \quad ar y_j \mathrel{+}= \sum_{i : j \in S_i}
              \overline{W}_{ij} K_{ij}\, x_i, \
              \overline{\phi(x_i)} = \sum_{j 
otin S_i} \overline{W}_{ij}\phi(y_j),
              \quad \overline{\phi(y_j)} = \sum_{i : j 
otin S_i}
              \overline{W}_{ij}\phi(x_i),

    the low-rank sums formed over all keys by the two products
    (:math:`\sum_j \overline W_{ij}\phi(y_j) = (\phi(Y)^	op V\, dO_i
    - \phi(Y)^	op 1\; dO_i\cdot o_i)/d_i`) minus their part on ``S``; the feature
    gradients then pass through the feature map as in
    :func:`refattn.linear.performer.performer_attention_vjp`, and
    ``dq = sqrt|s| x̄``, ``dk = sign(s) sqrt|s| ȳ``. The stabilizer shifts (per query,
    per KV head, and the row rescaling ``e^{-t_i}``) cancel in ``o`` and are constants.
    Rows with ``d_i = 0`` (output 0) get zero gradients. ``grad_out (..., Hq, N, Dv)``.
    Returns ``{"q", "k", "v"}`` float64 in the inputs' shapes (GQA summed).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = np.ones((1, 6, 4))
    >>> every = ra.vjp("scatterbrain_attention", q, k, v, g, num_features=4, topk=6, rng=0)
    >>> all(np.allclose(every[x], ra.vjp("attention", q, k, v, g)[x]) for x in "qkv")
    True
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    pb, q, k, v, x, y, fq, cq, fk, ck, buckets, topk, (omega, kernel, s) = _setup(
        q, k, v, num_features=num_features, support=support, topk=topk, n_buckets=n_buckets,
        n_hashes=n_hashes, kernel=kernel, orthogonal=orthogonal, scale=scale, rng=rng,
        check_finite=check_finite, where="scatterbrain_attention_vjp",
        memory_budget=memory_budget)
    block_q = check_int("block_q", block_q, minimum=1)
    shape = (pb.heads_q, pb.n, pb.dv)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + shape,
                         check_finite=check_finite).reshape((pb.batch,) + shape)
    kv_sums = np.einsum("bhmf,bhmd->bhfd", fk, v)
    k_sums = fk.sum(axis=2)
    dx, dy = np.zeros(x.shape), np.zeros(y.shape)
    dfq, dfk, dv = np.zeros(fq.shape), np.zeros(fk.shape), np.zeros(v.shape)
    for b, hs, hk, rs, keep, exact, low, rescale in _blocks(pb, x, y, fq, cq, fk, ck,
                                                            buckets, topk, block_q):
        fqb, dob, vb = fq[b, hs, rs], do[b, hs, rs], v[b, hk]
        delta = np.where(keep, exact - low, 0.0)             # the exact correction
        num = (fqb @ kv_sums[b, hk]) * rescale + delta @ vb   # (G, r, Dv)
        den = (fqb @ k_sums[b, hk])[..., None] * rescale + delta.sum(-1, keepdims=True)
        live = den > 0
        inv = np.divide(1.0, den, out=np.zeros_like(den), where=live)   # (G, r, 1)
        out = num * inv
        a = dob * inv                                         # dO_i / d_i
        ao = np.einsum("grd,grd->gr", a, out)[..., None]      # dO_i·o_i / d_i
        dw = a @ vb.T - ao                                    # dW on every pair
        # dv: the low-rank part over every key, then the correction on S
        fa = fqb * rescale                                    # φ(x_i) e^{-t_i}
        dv[b, hk] += fk[b, hk] @ head_summed_product(fa, a) \
            + head_summed_product(delta, a)
        # the exact part on S
        dsk = np.where(keep, dw * exact, 0.0)
        dx[b, hs, rs] += dsk @ y[b, hk]
        dy[b, hk] += head_summed_product(dsk, x[b, hs, rs])
        # the low-rank part: over every key, minus on S
        dw_low = np.where(keep, dw, 0.0) * rescale
        dfq[b, hs, rs] += (a @ kv_sums[b, hk].swapaxes(-1, -2) - ao * k_sums[b, hk]) \
            * rescale - dw_low @ fk[b, hk]
        dfk[b, hk] += vb @ head_summed_product(fa, a).T - (fa * ao).sum(axis=(0, 1)) \
            - head_summed_product(dw_low, fqb)
    with np.errstate(over="ignore", invalid="ignore"):
        dx += stabilized_features_vjp(x, omega, kernel, "row", dfq)
        dy += stabilized_features_vjp(y, omega, kernel, "global", dfk)
    r = np.sqrt(abs(s))
    dq, dk = dx * r, dy * (np.copysign(r, s) if s != 0 else 0.0)
    return {"q": pb.input_gradient(dq, shapes["q"]),
            "k": pb.input_gradient(dk, shapes["k"]),
            "v": pb.input_gradient(dv, shapes["v"])}


attach(scatterbrain_attention, implied=scatterbrain_attention_matrix,
       vjp=scatterbrain_attention_vjp)
