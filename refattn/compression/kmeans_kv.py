r"""k-means KV attention: each KV head's keys are clustered by k-means; a cluster's
key is the mean of its keys, its value the mean of its values, and its logit gains
``log |cluster|`` (each key replaced by its centroid: exact when keys are duplicated).
Not causal. The family's conventions (shapes, the implied matrix, memory) are those of
:mod:`refattn.compression`.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int, resolve_rng
from .._core.kmeans import kmeans
from ..registry import attach, register
from ._common import Plan, attend, attend_vjp, seen

__all__ = ["kmeans_kv_attention", "kmeans_kv_attention_matrix", "kmeans_kv_attention_vjp"]


def _kmeans_plans(k, v, pb, *, n_centroids, n_iters, rng, log_count):
    n_centroids = check_int("n_centroids", n_centroids, minimum=1,
                            context=f" (clusters of keys; {seen(pb)})")
    n_iters = check_int("n_iters", n_iters, minimum=0)
    log_count = check_bool("log_count", log_count)
    gen = resolve_rng(rng, "kmeans_kv_attention (k-means of the keys)")

    def plans(b, hk):
        kb = k[b, hk]
        _, assign = kmeans(kb, n_centroids, n_iters, gen, spherical=False)
        c = min(n_centroids, pb.m)
        counts = np.bincount(assign, minlength=c)
        live = counts > 0

        def means(x):                           # the mean of each cluster's rows of x
            sums = np.zeros((c, x.shape[1]))
            np.add.at(sums, assign, x)
            sums[live] /= counts[live, None]
            return sums

        def cmap():
            w = np.zeros((c, pb.m))
            w[assign, np.arange(pb.m)] = 1.0 / counts[assign]
            return w
        kc = means(kb)
        vc = None if v is None else means(v[b, hk])
        bias = None
        if log_count:
            bias = np.zeros(c)
            bias[live] = np.log(counts[live])
        keep = None if live.all() else (lambda rows: np.broadcast_to(live, (len(rows), c)))
        def pull(dkc, dvc):                     # key j gets its cluster's dx / |S_c|
            share = 1.0 / counts[assign, None]
            return dkc[assign] * share, dvc[assign] * share
        return Plan(kc, vc, bias, keep, cmap, pull=pull)
    return plans


@register(family="compression", exact=False, time="O(M·C·D·I + N·C·(D+Dv))",
          state="O(C·(D+Dv)) centroids", supports_causal=False, supports_mask=False,
          supports_gqa=True, position_free=True, row_stochastic=True,
          example={"n_centroids": 2},
          budget=lambda n, b: {"n_centroids": b})
def kmeans_kv_attention(q, k, v, *, n_centroids, n_iters=10, rng, log_count=True,
                        scale=None, check_finite=True, memory_budget=None):
    r"""Attention over k-means centroids of the keys and the matching means of the
    values.

    .. math:: \hat k_c = \frac{1}{|S_c|}\sum_{j \in S_c} k_j,\quad
              \hat v_c = \frac{1}{|S_c|}\sum_{j \in S_c} v_j,\quad
              o_i = \frac{\sum_c |S_c|\, e^{s\, q_i\cdot\hat k_c}\, \hat v_c}
                         {\sum_c |S_c|\, e^{s\, q_i\cdot\hat k_c}}

    where ``S_c`` are the clusters of Euclidean k-means on each KV head's keys
    (Lloyd's algorithm with k-means++ initialisation, at most ``n_iters`` iterations,
    the same k-means as :mod:`refattn.clustered`, run on the keys in a canonical order so
    the result does not depend on their order). The weight ``|S_c|`` (``log |S_c|``
    added to the logit, ``log_count=True``) makes this attention over the ``M`` keys with
    each key replaced by its centroid, :math:`o_i = \sum_j \mathrm{softmax}_j(s\, q_i
    \cdot \hat k_{c(j)})\, v_j`: exact when every cluster holds copies of one key (with
    any values), in particular with ``n_centroids = M`` distinct keys. With
    ``log_count=False`` every centroid counts once. (Compressing the KV sequence by
    clustering; cf. the cluster-level attention of Vyas et al. 2020 for queries and of
    Roy et al. 2021 for routing.)

    Parameters
    ----------
    q, k, v : ``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, ``(..., Hkv, M, Dv)``.
    n_centroids : int >= 1 (more than ``M`` acts like ``M``). Clusters that end empty
        are dropped.
    n_iters : int >= 0, most Lloyd iterations.
    rng : int seed or ``numpy.random.Generator`` (required): the k-means++ draws, per
        batch element and KV head in order.
    log_count : weight each centroid by its cluster size (default).
    scale, check_finite, memory_budget : as :func:`refattn.attention`.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``. Not causal: the clustering sees every key.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 5, 4))
    >>> ra.kmeans_kv_attention(q, k, v, n_centroids=2, rng=0).shape
    (1, 5, 4)
    >>> kd = np.repeat(k[:, :2], 3, axis=1)                # 2 distinct keys, 3 copies each
    >>> vd = rng.standard_normal((1, 6, 4))                # values need not repeat
    >>> bool(np.allclose(ra.kmeans_kv_attention(q, kd, vd, n_centroids=2, rng=0),
    ...                  ra.attention(q, kd, vd)))
    True
    """
    return attend(_kmeans_plans, q, k, v, implied=False, name="kmeans_kv_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  n_centroids=n_centroids, n_iters=n_iters, rng=rng, log_count=log_count)


def kmeans_kv_attention_matrix(q, k, *, n_centroids, n_iters=10, rng, log_count=True,
                               scale=None, check_finite=True, memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`kmeans_kv_attention` (same
    arguments and ``rng``): each centroid's probability spread evenly over its cluster's
    keys, so with ``log_count`` ``A_ij = softmax_j(s q_i · k̂_c(j))``. Row-stochastic.

    >>> import numpy as np, refattn as ra
    >>> k = np.array([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    >>> ra.compression.kmeans_kv_attention_matrix(np.zeros((1, 1, 2)), k,
    ...                                           n_centroids=2, rng=0).round(3)
    array([[[0.333, 0.333, 0.333]]])
    """
    return attend(_kmeans_plans, q, k, None, implied=True, name="kmeans_kv_attention",
                  scale=scale, check_finite=check_finite, memory_budget=memory_budget,
                  n_centroids=n_centroids, n_iters=n_iters, rng=rng, log_count=log_count)


def kmeans_kv_attention_vjp(q, k, v, grad_out, *, n_centroids, n_iters=10, rng,
                            log_count=True, scale=None, check_finite=True,
                            memory_budget=None):
    r"""Gradients of :func:`kmeans_kv_attention`: ``{"q", "k", "v"}`` in the inputs'
    shapes.

    The softmax backward over the centroids (``P`` the probabilities, ``O = P V̂``, ``dO``
    the cotangent ``grad_out``, ``(..., Hq, N, Dv)``):

    .. math:: dS = P \circ (dO\, \hat V^\top - D), \quad dQ = s\, dS\, \hat K, \quad
              d\hat K = s\, dS^\top Q, \quad d\hat V = P^\top dO, \quad
              dk_j = \frac{d\hat k_{c(j)}}{|S_{c(j)}|}, \quad
              dv_j = \frac{d\hat v_{c(j)}}{|S_{c(j)}|},

    ``c(j)`` the cluster of key ``j``. **The clusters are held fixed** (the k-means
    assignments are a discrete choice, differentiated as implementations train them);
    the ``log |S_c|`` bias is a constant. ``rng`` must reproduce the forward's clusters:
    pass the same int seed (a ``Generator`` is advanced by each call). GQA: a KV head
    sums over its query heads.

    >>> import numpy as np
    >>> from refattn.compression.kmeans_kv import kmeans_kv_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 4))
    >>> g = kmeans_kv_attention_vjp(q, k, v, np.ones((1, 5, 4)), n_centroids=2, rng=0)
    >>> bool(np.allclose(g["v"].sum(-2), 5.0))                 # rows of P sum to 1
    True
    """
    return attend_vjp(_kmeans_plans, q, k, v, grad_out, scale=scale,
                      check_finite=check_finite, n_centroids=n_centroids, n_iters=n_iters,
                      rng=rng, log_count=log_count)


attach(kmeans_kv_attention, implied=kmeans_kv_attention_matrix, vjp=kmeans_kv_attention_vjp)
