"""The k-means clusterings of the clustered attentions (:mod:`refattn.sparse.clustered`):
spherical k-means of unit queries and keys together (routing attention, with the rule
that routes each query to a cluster holding a key it may attend to) and Euclidean
k-means of the queries (clustered and i-clustered attention), with their public views
:func:`routing_clusters` and :func:`query_clusters`. The clusters are discrete choices:
the attentions' gradients hold them fixed.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int, resolve_rng
from .._core.kmeans import kmeans
from .._core.problem import prepare_qkv

__all__ = ["routing_clusters", "query_clusters"]


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length; zero rows stay zero."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _seen(pb, *names) -> str:
    """The shapes of ``q``/``k`` as the caller passed them (batch dims broadcast)."""
    shapes = {"q": (pb.heads_q, pb.n, pb.d), "k": (pb.heads_kv, pb.m, pb.d)}
    return ", ".join(f"{x} {pb.batch_shape + shapes[x]}" for x in names)


def _check_clustering(n_clusters, n_iters, rng, where: str):
    return (check_int("n_clusters", n_clusters, minimum=1, context=where),
            check_int("n_iters", n_iters, minimum=0), resolve_rng(rng, "k-means clustering"))


def _routing_kmeans(q, k, pb, n_clusters, n_iters, gen):
    """Spherical k-means of each query head's unit queries together with the unit keys
    of its KV head. Returns ``q_assign (B, Hq, N)``, ``k_assign (B, Hq, M)``,
    ``centroids (B, Hq, C, D)`` and the unit queries."""
    qu, ku = _unit(q), _unit(k)
    c = min(n_clusters, pb.n + pb.m)
    qa = np.zeros((pb.batch, pb.heads_q, pb.n), np.int64)
    ka = np.zeros((pb.batch, pb.heads_q, pb.m), np.int64)
    cent = np.zeros((pb.batch, pb.heads_q, c, pb.d))
    for b in range(pb.batch):
        for h in range(pb.heads_q):
            points = np.concatenate([qu[b, h], ku[b, h // pb.group]])
            cent[b, h], assign = kmeans(points, n_clusters, n_iters, gen, spherical=True)
            qa[b, h], ka[b, h] = assign[:pb.n], assign[pb.n:]
    return qa, ka, cent, qu


def _query_kmeans(q, pb, n_clusters, n_iters, gen):
    """Euclidean k-means of each query head's queries: ``assign (B, Hq, N)`` and the
    cluster means ``(B, Hq, C, D)``."""
    c = min(n_clusters, pb.n)
    qa = np.zeros((pb.batch, pb.heads_q, pb.n), np.int64)
    cent = np.zeros((pb.batch, pb.heads_q, c, pb.d))
    for b in range(pb.batch):
        for h in range(pb.heads_q):
            cent[b, h], qa[b, h] = kmeans(q[b, h], n_clusters, n_iters, gen,
                                           spherical=False)
    return qa, cent


def routing_clusters(q, k, *, n_clusters, n_iters=10, rng, check_finite=True):
    """The clusters :func:`refattn.routing_attention` routes with (same arguments, same
    ``rng``).

    Returns ``(q_clusters, k_clusters, centroids)``: int64 ``(..., Hq, N)`` and
    ``(..., Hq, M)`` cluster indices, and the unit centroids ``(..., Hq, C, D)`` with
    ``C = min(n_clusters, N + M)``. With GQA each query head clusters its own queries
    with the keys of its KV head, so ``k_clusters`` has one row per *query* head. Equal
    to what :func:`refattn.routing_attention` uses when ``q`` and ``k`` already have the
    full batch shape (clusterings are drawn per element of the broadcast batch).

    >>> import numpy as np, refattn as ra
    >>> q = k = np.array([[[1.0, 0.1], [0.9, -0.1], [-1.0, 0.2], [-1.1, 0.0]]])
    >>> qc, kc, cent = ra.sparse.routing_clusters(q, k, n_clusters=2, rng=0)
    >>> bool((qc == kc).all()), bool(qc[0, 0] == qc[0, 1] != qc[0, 2] == qc[0, 3])
    (True, True)
    """
    q, k, _, pb = prepare_qkv(q, k, None, check_finite=check_finite, need_v=False)
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries and keys; {_seen(pb, 'q', 'k')})")
    qa, ka, cent, _ = _routing_kmeans(q, k, pb, n_clusters, n_iters, gen)
    return pb.unflatten(qa, ka, cent)


def query_clusters(q, *, n_clusters, n_iters=10, rng, check_finite=True):
    """The query clusters of :func:`refattn.clustered_attention` (same arguments and
    ``rng``).

    Returns ``(clusters, centroids)``: int64 ``(..., Hq, N)`` cluster indices and the
    centroids ``(..., Hq, C, D)``, ``C = min(n_clusters, N)``, each the mean of its
    cluster's queries (Euclidean k-means, k-means++ init). Equal to what the clustered
    attentions use when ``q`` has the full broadcast batch shape of ``q, k, v``.

    >>> import numpy as np, refattn as ra
    >>> q = np.array([[[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]]])
    >>> clusters, centroids = ra.sparse.query_clusters(q, n_clusters=2, rng=0)
    >>> sorted(map(tuple, centroids[0].tolist()))
    [(0.0, 0.5), (10.0, 10.5)]
    """
    qf, _, _, pb = prepare_qkv(q, q, None, check_finite=check_finite, need_v=False)
    n_clusters, n_iters, gen = _check_clustering(
        n_clusters, n_iters, rng, f" (clusters of queries; {_seen(pb, 'q')})")
    qa, cent = _query_kmeans(qf, pb, n_clusters, n_iters, gen)
    return pb.unflatten(qa, cent)


# ---------------------------------------------------------------- routing attention
def _router(q, k, pb, n_clusters, n_iters, gen):
    """Cluster (:func:`_routing_kmeans`), then return ``keep(b, h, rs, s)``: the boolean
    ``(r, M)`` keys the rows ``rs`` of query head ``h`` attend to, given their logits
    ``s (r, M)`` (``-inf`` where mask or causality drop a key): the allowed keys of the
    cluster each query is routed to (its own, else the most similar one holding an
    allowed key)."""
    qa, ka, cent, qu = _routing_kmeans(q, k, pb, n_clusters, n_iters, gen)
    order = {}

    def keep(b, h, rs, s):
        key_cluster = ka[b, h]
        if (b, h) not in order:
            by_cluster = np.argsort(key_cluster, kind="stable")
            present, starts = np.unique(key_cluster[by_cluster], return_index=True)
            order.clear()
            order[b, h] = by_cluster, present, starts
        by_cluster, present, starts = order[b, h]
        rows = np.arange(rs.start, rs.stop)
        allowed = ~np.isneginf(s)
        # Clusters holding at least one key this query may attend to.
        avail = np.zeros((len(rows), cent.shape[2]), bool)
        if pb.m:
            avail[:, present] = np.logical_or.reduceat(
                allowed[:, by_cluster], starts, axis=1)
        # Own cluster first, then the others by similarity to their centroid.
        pref = qu[b, h, rs] @ cent[b, h].T
        pref[np.arange(len(rows)), qa[b, h, rs]] = np.inf
        pref[~avail] = -np.inf
        chosen = pref.argmax(axis=1)
        return allowed & (key_cluster[None, :] == chosen[:, None])
    return keep
