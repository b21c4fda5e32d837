r"""Clustered attention: k-means decides which keys (or which query vector) a query uses.

* :func:`routing_attention`: Routing Transformer (Roy et al. 2021, "Efficient
  Content-Based Sparse Attention with Routing Transformers"). Queries and keys,
  normalized to unit length, are clustered together by spherical k-means; a query
  attends, with exact logits, only to the keys of its own cluster.
* :func:`clustered_attention`: clustered attention of fast-transformers (Vyas et al.
  2020, "Fast Transformers with Clustered Attention"). Queries are clustered; each
  cluster's centroid (the mean of its queries) attends to all keys and every query of
  the cluster receives the centroid's attention weights.
* :func:`improved_clustered_attention`: the paper's "i-clustered" variant: exact logits
  of each query on the ``topk`` keys its centroid weights most, the centroid's weights on
  the rest.

**k-means.** Lloyd's algorithm with k-means++ initialisation (Arthur & Vassilvitskii
2007), run per batch element and query head, at most ``n_iters`` iterations (stopping
early at a fixed point). Routing uses spherical k-means (unit points, assignment by the
largest cosine similarity, centroids renormalized means); clustered attention uses plain
Euclidean k-means on the raw queries (the paper clusters Hamming codes of LSH hashes
instead; Euclidean k-means on the queries is the quantity those hashes approximate).
Ties in an assignment go to the lower cluster index.

**Order independence.** k-means++ draws points by index, which would make the result
depend on the order of the points. Here the points are first put in a canonical order
(lexicographic order of their coordinates) and k-means runs on that, so the clustering is
a function of the *set* of points: permuting keys (with their values) leaves every
output unchanged, and permuting queries permutes the outputs. Hence ``position_free``.

**Randomness.** ``rng`` is required: an int seed or a ``numpy.random.Generator`` (whose
state is advanced).
Each clustering draws ``min(n_clusters, #points)`` uniforms from one generator, in the
order of the (broadcast, flattened) batch elements and query heads; the same ``rng``
gives bit-identical results.

**Cluster counts.** ``n_clusters`` may exceed the number of points clustered (``N + M``
for routing, ``N`` for clustered attention): at most that many clusters can be
non-empty, and the result equals the one for ``n_clusters = #points`` (the same way
``topk > M`` keeps all keys).
"""
from __future__ import annotations

import numpy as np

from .._core.backward import head_summed_product, softmax_backward, softmax_block_vjp
from .._core.checks import check_int
from .._core.problem import prepare_qkv
from .._core.select import block_rows, topk_keep
from .._core.softmax import normalize_rows
from ..registry import attach, register
from ._common import logit_blocks
from .clusters import (_check_clustering, _query_kmeans, _router, _seen, query_clusters,
                       routing_clusters)

__all__ = ["routing_attention", "routing_attention_matrix", "routing_clusters",
           "clustered_attention", "clustered_attention_matrix",
           "improved_clustered_attention", "improved_clustered_attention_matrix",
           "query_clusters", "routing_attention_vjp", "clustered_attention_vjp",
           "improved_clustered_attention_vjp"]


# ---------------------------------------------------------------- routing attention
def _routing_blocks(q, k, v, *, n_clusters, n_iters, mask, causal, scale, bias, softcap,
                    rng, check_finite, block_q):
    """Validate, cluster, then yield ``(b, hk, h, row_slice, p, lse)`` per query head
    and block of rows, ``p`` the ``(r, M)`` routed attention probabilities."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries and keys; {_seen(pb, 'q', 'k')})")
    logits, rows_per_block, q_scaled = logit_blocks(
        q, pb, block_q, 1, mask=mask, causal=causal, scale=scale, bias=bias,
        softcap=softcap, check_finite=check_finite)
    cols = np.arange(pb.m)

    def blocks():             # clusters on the first step, after all validation
        keep = _router(q, k, pb, n_clusters, n_iters, gen)
        for b in range(pb.batch):
            for h in range(pb.heads_q):
                hk = h // pb.group
                for r0 in range(0, pb.n, rows_per_block):
                    rs = slice(r0, min(r0 + rows_per_block, pb.n))
                    rows = np.arange(rs.start, rs.stop)
                    s = logits.block(q_scaled[b, h:h + 1, rs], k[b, hk], b, np.array([h]),
                                     rows, cols)[0]
                    s[~keep(b, h, rs, s)] = -np.inf
                    lse = normalize_rows(s)
                    yield b, hk, h, rs, s, lse
    return pb, v, blocks()


@register(family="sparse", exact=False, time="O((N+M)·C·D·I + N·M·D/C)",
          state="O(M·D) KV cache", supports_causal=True, supports_mask=True,
          supports_gqa=True, position_free=True, self_attention_only=False,
          example={"n_clusters": 2},
          budget=lambda n, b: {"n_clusters": max(1, n // b)})
def routing_attention(q, k, v, *, n_clusters, n_iters=10, mask=None, causal=False,
                      scale=None, bias=None, softcap=None, rng, return_lse=False,
                      check_finite=True, block_q=None):
    r"""Routing attention: each query attends to the keys of its own k-means cluster.

    Queries and keys are normalized to unit length and clustered together by spherical
    k-means with ``n_clusters`` centroids ``mu_c`` (Roy et al. 2021, "Efficient
    Content-Based Sparse Attention with Routing Transformers"); with ``c(x)`` the
    cluster of ``x``,

    .. math:: o_i = \sum_{j \in R_i} \operatorname{softmax}_{R_i}(s_i)_j \, v_j, \qquad
              R_i = \{ j : c(k_j) = c(q_i),\ s_{ij} > -\infty \},

    with ``s`` the logits of :func:`refattn.attention` (scale, softcap, bias, mask,
    causality: the cluster restriction is combined with them). If ``R_i`` is empty
    although query ``i`` may attend to some key (its cluster holds no key, or, under
    causality or a mask, no key it may see), the query is routed to the next cluster in
    order of ``q̂_i · mu_c`` that holds one; only queries with no allowed key at all give
    output 0 and lse ``-inf``. So every row is a softmax, and ``n_clusters=1`` is exact
    attention.

    The paper's balanced variant (each cluster takes its ``w`` nearest queries and keys)
    is not implemented: it leaves some queries unrouted and others routed twice.
    The paper's k-means is an online (EMA) mini-batch estimate across training steps;
    here it is Lloyd's algorithm on this call's queries and keys (see the module notes on
    initialisation, order independence and ``rng``).

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``; with GQA
        each query head is clustered with the keys of its KV head.
    n_clusters : int >= 1 (more than ``N + M`` acts like ``N + M``).
    n_iters : int >= 0, most Lloyd iterations after the k-means++ initialisation.
    mask, causal, scale, bias, softcap, check_finite : as :func:`refattn.attention`.
    rng : int seed, ``numpy.random.Generator`` or None (= 0).
    return_lse : also return ``log sum_{j in R_i} exp(s_ij)`` ``(..., Hq, N)``.
    block_q : query rows per block (working memory O(block_q · M)).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 16, 8))
    >>> ra.routing_attention(q, k, v, n_clusters=4, causal=True, rng=1).shape
    (2, 16, 8)
    >>> # one cluster: every query sees every key it may, as in exact attention
    >>> bool(np.allclose(ra.routing_attention(q, k, v, n_clusters=1, causal=True, rng=0),
    ...                  ra.attention(q, k, v, causal=True)))
    True
    """
    pb, v, blocks = _routing_blocks(q, k, v, n_clusters=n_clusters, n_iters=n_iters,
                                    mask=mask, causal=causal, scale=scale, bias=bias,
                                    softcap=softcap, rng=rng, check_finite=check_finite,
                                    block_q=block_q)
    return pb.outputs_from_blocks(v, blocks, return_lse)


def routing_attention_matrix(q, k, *, n_clusters, n_iters=10, mask=None, causal=False,
                             scale=None, bias=None, softcap=None, rng,
                             check_finite=True, block_q=None, memory_budget=None):
    """The implied attention matrix ``A`` ``(..., Hq, N, M)`` of
    :func:`routing_attention` (same arguments and ``rng``):
    ``routing_attention(q, k, v) == A @ v``. ``A_ij`` is nonzero only for keys in the
    cluster query ``i`` is routed to.

    >>> import numpy as np, refattn as ra
    >>> q = k = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])   # three directions
    >>> # own clusters
    >>> ra.sparse.routing_attention_matrix(q, k, n_clusters=3, scale=0.0, rng=0)
    array([[[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]]])
    """
    pb, _, blocks = _routing_blocks(q, k, None, n_clusters=n_clusters, n_iters=n_iters,
                                    mask=mask, causal=causal, scale=scale, bias=bias,
                                    softcap=softcap, rng=rng, check_finite=check_finite,
                                    block_q=block_q)
    return pb.matrix_from_blocks(blocks, memory_budget,
                                 "the attention matrix of routing_attention_matrix",
                                 "refattn.clustered.routing_attention")


# -------------------------------------------------------------- clustered attention
def _clustered_setup(q, k, v, *, n_clusters, n_iters, topk, mask, causal, scale, bias,
                     softcap, rng, check_finite, block_q):
    """Validate the arguments of the clustered attentions: ``(q, k, v, pb, gen, topk,
    logits, rows_per_block, q_scaled)`` (``q, k, v`` flat)."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries; {_seen(pb, 'q')})")
    if topk is not None:
        topk = check_int("topk", topk, minimum=1,
                          context=f" (keys recomputed per query; k has M={pb.m} keys)")
    logits, rows_per_block, q_scaled = logit_blocks(
        q, pb, block_q, pb.group, mask=mask, causal=causal, scale=scale, bias=bias,
        softcap=softcap, check_finite=check_finite)
    return q, k, v, pb, (n_clusters, n_iters, gen), topk, logits, rows_per_block, q_scaled


def _clustered_blocks(q, k, v, *, n_clusters, n_iters, topk, mask, causal, scale, bias,
                      softcap, rng, check_finite, block_q):
    """Validate, cluster the queries, then yield ``(b, hk, head_slice, row_slice, a,
    lse)`` per KV head and block of rows, ``a`` the ``(G, r, M)`` attention weights
    (clustered, or i-clustered when ``topk`` is given) and ``lse`` the centroid's."""
    q, k, v, pb, clustering, topk, logits, rows_per_block, q_scaled = _clustered_setup(
        q, k, v, n_clusters=n_clusters, n_iters=n_iters, topk=topk, mask=mask,
        causal=causal, scale=scale, bias=bias, softcap=softcap, rng=rng,
        check_finite=check_finite, block_q=block_q)
    cols = np.arange(pb.m)

    def blocks():             # clusters on the first step, after all validation
        qa, cent = _query_kmeans(q, pb, *clustering)
        # Each query replaced by its centroid (the mean of its cluster).
        q_cent = np.take_along_axis(cent, qa[..., None], axis=2) * logits.scale
        for b, hk, hs, rs in pb.query_blocks(rows_per_block):
            heads, rows = np.arange(hs.start, hs.stop), np.arange(rs.start, rs.stop)
            a = logits.block(q_cent[b, hs, rs], k[b, hk], b, heads, rows, cols)
            keep = None if topk is None else topk_keep(a, topk)
            lse = normalize_rows(a)
            if keep is not None:
                mass = np.where(keep, a, 0.0).sum(axis=-1, keepdims=True)
                exact = logits.block(q_scaled[b, hs, rs], k[b, hk], b, heads, rows, cols)
                exact[~keep] = -np.inf
                normalize_rows(exact)
                a = np.where(keep, mass * exact, a)
            yield b, hk, hs, rs, a, lse
    return pb, v, blocks()


def _clustered_matrix(pb, blocks, memory_budget, name):
    return pb.matrix_from_blocks(blocks, memory_budget,
                                 f"the attention matrix of {name}_matrix",
                                 f"refattn.clustered.{name}")


@register(family="sparse", exact=False, time="O(N·C·D·I + C·M·(D+Dv))",
          state="O(M·D) KV cache", supports_causal=True, supports_mask=True,
          supports_gqa=True, position_free=True, self_attention_only=False,
          example={"n_clusters": 2},
          budget=lambda n, b: {"n_clusters": b})
def clustered_attention(q, k, v, *, n_clusters, n_iters=10, mask=None, causal=False,
                        scale=None, bias=None, softcap=None, rng, return_lse=False,
                        check_finite=True, block_q=None):
    r"""Clustered attention: every query gets the attention weights of its cluster's
    centroid.

    The queries of each head are clustered by k-means into ``n_clusters`` groups with
    centroids ``q^c`` (the mean of their queries); query ``i`` in cluster ``c(i)`` gets

    .. math:: o_i = \sum_j \operatorname{softmax}_j\big(s(q^{c(i)}, k_j)\big) \, v_j ,

    where ``s(q^c, k_j)`` are the logits of :func:`refattn.attention` with the centroid
    in place of the query (Vyas et al. 2020, "Fast Transformers with Clustered
    Attention"). Without a mask or position-dependent bias all queries of a cluster share
    one row of weights, ``C x M`` logits in all. A mask, causality or bias is applied
    with the *query's* own position, so each query keeps exactly its allowed keys (the
    paper has no causal form). With ``n_clusters = N`` and distinct queries every query
    is its own centroid and the result is exact attention.

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    n_clusters : int >= 1 (more than ``N`` acts like ``N``).
    n_iters : int >= 0, most Lloyd iterations after the k-means++ initialisation.
    mask, causal, scale, bias, softcap, check_finite : as :func:`refattn.attention`.
    rng : int seed, ``numpy.random.Generator`` or None (= 0).
    return_lse : also return the log-sum-exp of the centroid's logits ``(..., Hq, N)``.
    block_q : query rows per block (working memory O(G · block_q · M)).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the lse); rows with no allowed key give 0, ``-inf``.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 12, 8))
    >>> out = ra.clustered_attention(q, k, v, n_clusters=3, rng=0)
    >>> len(np.unique(out[0].round(12), axis=0))          # 3 distinct rows per head
    3
    >>> exact = ra.clustered_attention(q, k, v, n_clusters=12, causal=True, rng=0)
    >>> bool(np.allclose(exact, ra.attention(q, k, v, causal=True)))
    True
    """
    pb, v, blocks = _clustered_blocks(q, k, v, n_clusters=n_clusters, n_iters=n_iters,
                                      topk=None, mask=mask, causal=causal, scale=scale,
                                      bias=bias, softcap=softcap, rng=rng,
                                      check_finite=check_finite, block_q=block_q)
    return pb.outputs_from_blocks(v, blocks, return_lse)


def clustered_attention_matrix(q, k, *, n_clusters, n_iters=10, mask=None, causal=False,
                               scale=None, bias=None, softcap=None, rng,
                               check_finite=True, block_q=None, memory_budget=None):
    """The implied attention matrix ``A`` ``(..., Hq, N, M)`` of
    :func:`clustered_attention` (same arguments and ``rng``):
    ``A_i = softmax(s(q^{c(i)}, k))``, so ``clustered_attention(q, k, v) == A @ v``.

    >>> import numpy as np, refattn as ra
    >>> q = np.array([[[1.0, 0.0], [3.0, 0.0]]])          # one cluster, centroid (2, 0)
    >>> k = np.array([[[0.0, 0.0], [1.0, 0.0]]])
    >>> a = ra.sparse.clustered_attention_matrix(q, k, n_clusters=1,
    ...                                          scale=np.log(2) / 2, rng=0)
    >>> a.round(6)                                       # logits 0 and log 2
    array([[[0.333333, 0.666667],
            [0.333333, 0.666667]]])
    """
    pb, _, blocks = _clustered_blocks(q, k, None, n_clusters=n_clusters, n_iters=n_iters,
                                      topk=None, mask=mask, causal=causal, scale=scale,
                                      bias=bias, softcap=softcap, rng=rng,
                                      check_finite=check_finite, block_q=block_q)
    return _clustered_matrix(pb, blocks, memory_budget, "clustered_attention")


@register(family="sparse", exact=False,
          time="O(N·C·D·I + C·M·(D+Dv) + N·k·(D+Dv))", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True, position_free=True,
          self_attention_only=False,
          example={"n_clusters": 2, "topk": 3},
          budget=lambda n, b: {"n_clusters": max(1, b // 2), "topk": max(1, b // 2)})
def improved_clustered_attention(q, k, v, *, n_clusters, topk, n_iters=10, mask=None,
                                 causal=False, scale=None, bias=None, softcap=None,
                                 rng, return_lse=False, check_finite=True,
                                 block_q=None):
    r"""Improved clustered attention ("i-clustered", Vyas et al. 2020): exact weights on
    the keys the centroid weights most, the centroid's weights on the rest.

    With ``A^c_i = softmax(s(q^{c(i)}, k))`` the clustered weights of query ``i``
    (:func:`clustered_attention`), ``T_i`` the ``topk`` keys with the largest centroid
    logits (among the keys query ``i`` may attend to; ties to the lower key index) and
    ``\hat m_i = \sum_{j \in T_i} A^c_{ij}`` the centroid's mass on them,

    .. math:: A^t_{ij} = \begin{cases} \hat m_i \,
              \operatorname{softmax}_{T_i}(s(q_i, k))_j & j \in T_i \\
              A^c_{ij} & j \notin T_i \end{cases}, \qquad o_i = \sum_j A^t_{ij} v_j .

    Rows stay stochastic, and ``sum_j |A^t_ij - A_ij| <= sum_j |A^c_ij - A_ij|`` for the
    exact weights ``A`` (the triangle inequality on ``T_i``). ``topk >= M`` or
    ``n_clusters = N`` (distinct queries) give exact attention.

    Arguments as :func:`clustered_attention`, plus ``topk`` (int >= 1). ``return_lse``
    gives the lse of the centroid's logits, which is also the log-normalizer of
    ``A^t`` (``A^t_ij = exp(s'_ij - lse)`` for logits ``s'`` that agree with the
    centroid's outside ``T_i``).

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 20, 8))
    >>> exact = ra.attention(q, k, v)
    >>> err_c = np.abs(ra.clustered_attention(q, k, v, n_clusters=2, rng=0) - exact).max()
    >>> err_i = np.abs(ra.improved_clustered_attention(q, k, v, n_clusters=2, topk=5, rng=0)
    ...          - exact).max()
    >>> bool(err_i < err_c)
    True
    """
    if topk is None:
        raise TypeError("improved clustered attention needs topk (an integer >= 1: the "
                        "keys recomputed exactly per query)")
    pb, v, blocks = _clustered_blocks(q, k, v, n_clusters=n_clusters, n_iters=n_iters,
                                      topk=topk, mask=mask, causal=causal, scale=scale,
                                      bias=bias, softcap=softcap, rng=rng,
                                      check_finite=check_finite, block_q=block_q)
    return pb.outputs_from_blocks(v, blocks, return_lse)


def improved_clustered_attention_matrix(q, k, *, n_clusters, topk, n_iters=10, mask=None,
                                        causal=False, scale=None, bias=None, softcap=None,
                                        rng, check_finite=True, block_q=None,
                                        memory_budget=None):
    """The implied attention matrix ``A^t`` ``(..., Hq, N, M)`` of
    :func:`improved_clustered_attention` (same arguments and ``rng``).

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 6, 4))
    >>> # topk = M
    >>> a = ra.sparse.improved_clustered_attention_matrix(q, k, n_clusters=1, topk=6, rng=0)
    >>> bool(np.allclose(a, ra.attention_probs(q, k)))
    True
    """
    if topk is None:
        raise TypeError("improved clustered attention needs topk (an integer >= 1: the "
                        "keys recomputed exactly per query)")
    pb, _, blocks = _clustered_blocks(q, k, None, n_clusters=n_clusters, n_iters=n_iters,
                                      topk=topk, mask=mask, causal=causal, scale=scale,
                                      bias=bias, softcap=softcap, rng=rng,
                                      check_finite=check_finite, block_q=block_q)
    return _clustered_matrix(pb, blocks, memory_budget, "improved_clustered_attention")


# ------------------------------------------------------------------------ gradients
def _logit_gradients(ds, chain, bw, b, heads, rows, cols):
    """``dS`` into the score modifier's parameters (an array bias), then ``dX``: the
    gradient of the raw logits ``x = scale q·k`` (``dS`` times the softcap/modifier
    derivative ``chain``)."""
    if bw.parameter is not None:
        bw.parameter[1](bw.parameter[0], ds, b, heads, rows, cols, bw.pb.n, bw.pb.m)
    return ds if chain is None else ds * chain


def routing_attention_vjp(q, k, v, grad_out, *, n_clusters, n_iters=10, grad_lse=None,
                          mask=None, causal=False, scale=None, bias=None, softcap=None,
                          rng, check_finite=True, block_q=None):
    r"""Gradients of :func:`routing_attention` with the **clusters held fixed**: the
    k-means of the unit queries and keys (the same ``rng`` as the forward: pass the same
    int seed, a ``Generator`` advances) and the cluster each query is routed to are
    constants, as the Routing Transformer trains them (its centroids are updated by an
    EMA outside the gradient). The gradient is then that of the softmax over each
    query's routed keys ``R_i`` (:func:`refattn.exact.dense.attention_vjp`'s equations
    with ``P`` zero outside ``R_i``):

    .. math:: dV = P^	op dO, \quad dS = P \circ (dO\,V^	op - D), \quad
              D_i = dO_i \cdot O_i - dlse_i, \quad dQ = 	ext{scale}\; dX\,K, \quad
              dK = 	ext{scale}\; dX^	op Q

    (``dX = dS ∘ ∂S/∂X`` through softcap and score modifier); keys outside ``R_i`` get
    nothing from query ``i``, and the normalization used for clustering passes no
    gradient. ``grad_out (..., Hq, N, Dv)``, ``grad_lse (..., Hq, N)`` (the cotangent
    of the returned lse) or None. Returns ``{"q", "k", "v"}`` (and ``"bias"`` for an
    array bias), float64, each in its input's shape (GQA: summed over a KV head's query
    heads; broadcast dims summed). One query head and ``block_q`` rows at a time, as
    the forward.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = np.ones((1, 6, 4))
    >>> one = ra.vjp("routing_attention", q, k, v, g, n_clusters=1, causal=True, rng=0)
    >>> dense = ra.vjp("attention", q, k, v, g, causal=True)
    >>> all(np.allclose(one[x], dense[x]) for x in "qkv")      # one cluster: exact
    True
    """
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap,
                          check_finite=check_finite)
    pb, logits = bw.pb, bw.logits
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries and keys; {_seen(pb, 'q', 'k')})")
    rows_per_block = block_rows(block_q, 1, pb.n, pb.m)
    q_scaled = bw.q * logits.scale
    keep = _router(bw.q, bw.k, pb, n_clusters, n_iters, gen)
    dq, dk, dv = np.zeros(bw.q.shape), np.zeros(bw.k.shape), np.zeros(bw.v.shape)
    cols = np.arange(pb.m)
    for b in range(pb.batch):
        for h in range(pb.heads_q):
            hk, head = h // pb.group, np.array([h])
            for r0 in range(0, pb.n, rows_per_block):
                rs = slice(r0, min(r0 + rows_per_block, pb.n))
                rows = np.arange(rs.start, rs.stop)
                s, chain = logits.block(q_scaled[b, h:h + 1, rs], bw.k[b, hk], b, head,
                                        rows, cols, derivative=True)
                s[0][~keep(b, h, rs, s[0])] = -np.inf
                normalize_rows(s)
                ds, dvb = softmax_block_vjp(
                    s, bw.v[b, hk], bw.do[b, h:h + 1, rs],
                    None if bw.dlse is None else bw.dlse[b, h:h + 1, rs])
                dv[b, hk] += dvb
                dx = _logit_gradients(ds, chain, bw, b, head, rows, cols)[0]
                dq[b, h, rs] = (dx @ bw.k[b, hk]) * logits.scale
                dk[b, hk] += dx.T @ q_scaled[b, h, rs]
    return bw.gradients(dq, dk, dv)


def _clustered_vjp(q, k, v, grad_out, grad_lse, *, n_clusters, n_iters, topk, mask,
                   causal, scale, bias, softcap, rng, check_finite, block_q):
    """The backward of :func:`clustered_attention` (``topk`` None) and of
    :func:`improved_clustered_attention`; see their VJPs' docstrings."""
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap,
                          check_finite=check_finite)
    pb, logits = bw.pb, bw.logits
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries; {_seen(pb, 'q')})")
    if topk is not None:
        topk = check_int("topk", topk, minimum=1,
                         context=f" (keys recomputed per query; k has M={pb.m} keys)")
    rows_per_block = block_rows(block_q, pb.group, pb.n, pb.m)
    k, v, do, dlse = bw.k, bw.v, bw.do, bw.dlse
    q_scaled = bw.q * logits.scale
    qa, cent = _query_kmeans(bw.q, pb, n_clusters, n_iters, gen)
    q_cent = np.take_along_axis(cent, qa[..., None], axis=2) * logits.scale
    dq = np.zeros(bw.q.shape)          # through the exact logits (i-clustered)
    d_cent = np.zeros(bw.q.shape)      # of each query's copy of its centroid
    dk, dv = np.zeros(k.shape), np.zeros(v.shape)
    cols = np.arange(pb.m)
    for b, hk, hs, rs in pb.query_blocks(rows_per_block):
        heads, rows = np.arange(hs.start, hs.stop), np.arange(rs.start, rs.stop)
        a, chain = logits.block(q_cent[b, hs, rs], k[b, hk], b, heads, rows, cols,
                                derivative=True)
        keep = None if topk is None else topk_keep(a, topk)
        normalize_rows(a)
        dob, dl = do[b, hs, rs], None if dlse is None else dlse[b, hs, rs]
        if keep is None:
            ds, dvb = softmax_block_vjp(a, v[b, hk], dob, dl)
        else:
            mass = np.where(keep, a, 0.0).sum(axis=-1, keepdims=True)
            e, chain_e = logits.block(q_scaled[b, hs, rs], k[b, hk], b, heads, rows, cols,
                                      derivative=True)
            e[~keep] = -np.inf
            normalize_rows(e)                                # 0 outside T_i
            weights = np.where(keep, mass * e, a)
            d_weights = dob @ v[b, hk].T                     # dA = dO Vᵀ
            dvb = head_summed_product(weights, dob)
            d_mass = (e * d_weights).sum(axis=-1, keepdims=True)
            de = mass * d_weights
            ds_e = e * (de - (e * de).sum(axis=-1, keepdims=True))
            dx = _logit_gradients(ds_e, chain_e, bw, b, heads, rows, cols)
            dq[b, hs, rs] += (dx @ k[b, hk]) * logits.scale
            dk[b, hk] += head_summed_product(dx, q_scaled[b, hs, rs])
            da = np.where(keep, d_mass, d_weights)           # A^c outside T_i, m̂ on it
            ds = a * (da - (a * da).sum(axis=-1, keepdims=True))
            if dl is not None:
                ds += dl[..., None] * a
        dv[b, hk] += dvb
        dx = _logit_gradients(ds, chain, bw, b, heads, rows, cols)
        d_cent[b, hs, rs] = (dx @ k[b, hk]) * logits.scale
        dk[b, hk] += head_summed_product(dx, q_cent[b, hs, rs])
    # A centroid is the mean of its cluster's queries: its gradient, divided by the
    # cluster's size, goes to every query of the cluster.
    for b in range(pb.batch):
        for h in range(pb.heads_q):
            c = cent.shape[2]
            sums = np.zeros((c, pb.d))
            np.add.at(sums, qa[b, h], d_cent[b, h])
            counts = np.bincount(qa[b, h], minlength=c)
            dq[b, h] += sums[qa[b, h]] / counts[qa[b, h], None]
    return bw.gradients(dq, dk, dv)


def clustered_attention_vjp(q, k, v, grad_out, *, n_clusters, n_iters=10, grad_lse=None,
                            mask=None, causal=False, scale=None, bias=None, softcap=None,
                            rng, check_finite=True, block_q=None):
    r"""Gradients of :func:`clustered_attention` with the **clusters held fixed** (the
    k-means assignment of the same ``rng`` as the forward: pass the same int seed; a
    ``Generator`` advances), as fast-transformers trains it. Each query ``i`` uses the
    centroid ``q^c = (1/|c|) Σ_{l ∈ c} q_l`` of its cluster ``c = c(i)``, so with
    ``P_i = softmax(s(q^c, k))`` (mask, causality and bias at query ``i``'s position):

    .. math:: dV = P^	op dO, \quad dS = P \circ (dO\,V^	op - D), \quad
              D_i = dO_i \cdot O_i - dlse_i, \quad
              dK = 	ext{scale}\; dX^	op Q^{c}, \
              \overline{q^c_i} = 	ext{scale}\; dX_i K, \qquad
              dq_l = rac{1}{|c(l)|} \sum_{i : c(i) = c(l)} \overline{q^c_i}

    (``dX = dS ∘ ∂S/∂X``): the gradient flows through the centroid to every query of
    the cluster, the assignment itself passes none. ``grad_out (..., Hq, N, Dv)``,
    ``grad_lse (..., Hq, N)`` (the centroid's lse) or None. Returns ``{"q", "k", "v"}``
    (and ``"bias"`` for an array bias) in the inputs' shapes.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 4))
    >>> g = np.ones((1, 5, 4))
    >>> every = ra.vjp("clustered_attention", q, k, v, g, n_clusters=5, rng=0)
    >>> all(np.allclose(every[x], ra.vjp("attention", q, k, v, g)[x]) for x in "qkv")
    True
    """
    return _clustered_vjp(q, k, v, grad_out, grad_lse, n_clusters=n_clusters,
                          n_iters=n_iters, topk=None, mask=mask, causal=causal, scale=scale,
                          bias=bias, softcap=softcap, rng=rng, check_finite=check_finite,
                          block_q=block_q)


def improved_clustered_attention_vjp(q, k, v, grad_out, *, n_clusters, topk, n_iters=10,
                                     grad_lse=None, mask=None, causal=False, scale=None,
                                     bias=None, softcap=None, rng, check_finite=True,
                                     block_q=None):
    r"""Gradients of :func:`improved_clustered_attention` with the **clusters and each
    query's top-k set** ``T_i`` (the ``topk`` keys of largest centroid logit) **held
    fixed**. With ``A^c_i = softmax(s(q^{c(i)}, k))``, ``m̂_i = Σ_{j∈T_i} A^c_{ij}``,
    ``E_i = softmax_{T_i}(s(q_i, k))`` and ``A^t`` as in the forward, ``dA = dO Vᵀ``:

    .. math:: dV = (A^t)^	op dO, \quad
              \overline{m̂}_i = \sum_{j \in T_i} E_{ij}\, dA_{ij}, \quad
              dS^e_i = E_i \circ (m̂_i dA_i - m̂_i E_i \cdot dA_i), \
              \overline{A^c_{ij}} = egin{cases} \overline{m̂}_i & j \in T_i \
              dA_{ij} & j 
otin T_i \end{cases}, \quad
              dS^c_i = A^c_i \circ (\overline{A^c_i} - A^c_i \cdot \overline{A^c_i})
              + dlse_i\, A^c_i ;

    the exact logits give ``dq_i += scale dX^e_i K``, ``dK += scale dX^{eT} Q``, the
    centroid's logits ``dK += scale dX^{cT} Q^c`` and, through the centroid (the mean
    of its queries), ``scale dX^c_i K / |c(i)|`` to every query of query ``i``'s
    cluster (as :func:`clustered_attention_vjp`). ``grad_lse`` is the cotangent of the
    centroid's lse, which the forward returns. Returns ``{"q", "k", "v"}`` (and
    ``"bias"``) in the inputs' shapes.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 4))
    >>> g = np.ones((1, 5, 4))
    >>> full = ra.vjp("improved_clustered_attention", q, k, v, g, n_clusters=2, topk=5,
    ...               rng=0)                                  # T_i = every key: exact
    >>> all(np.allclose(full[x], ra.vjp("attention", q, k, v, g)[x]) for x in "qkv")
    True
    """
    if topk is None:
        raise TypeError("improved clustered attention needs topk (an integer >= 1: the "
                        "keys recomputed exactly per query)")
    return _clustered_vjp(q, k, v, grad_out, grad_lse, n_clusters=n_clusters,
                          n_iters=n_iters, topk=topk, mask=mask, causal=causal, scale=scale,
                          bias=bias, softcap=softcap, rng=rng, check_finite=check_finite,
                          block_q=block_q)


attach(routing_attention, implied=routing_attention_matrix, vjp=routing_attention_vjp)
attach(clustered_attention, implied=clustered_attention_matrix, vjp=clustered_attention_vjp)
attach(improved_clustered_attention, implied=improved_clustered_attention_matrix,
       vjp=improved_clustered_attention_vjp)
