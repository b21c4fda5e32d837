r"""Attention over compressed keys and values: pooling, strided selection, landmarks
and k-means centroids. The keys and values are compressed to ``C < M`` rows first, then
the queries attend to the compressed rows with exact softmax attention.

Every mechanism here computes, for query ``i``,

.. math::

    o_i = \sum_{c \in V_i} \frac{e^{s\, q_i \cdot \hat k_c + b_c}}
                                {\sum_{c' \in V_i} e^{s\, q_i \cdot \hat k_{c'} + b_{c'}}}
          \, \hat v_c, \qquad \hat v_c = \sum_j W_{cj} v_j ,

where ``(k̂_c, v̂_c)`` are the compressed keys and values, ``W`` (``C x M``) the
compression map of the values, ``b_c`` an optional log-count bias and ``V_i`` the
compressed rows query ``i`` may see (all of them unless causal). Where ``W`` is linear
the *implied matrix* is ``A = softmax(...) W`` (``N x M``), with ``out == A @ v``; it is
row-stochastic whenever ``W``'s rows are averages (mean pooling, selection, cluster
means).

* :func:`pooled_attention`: mean or max pooling of windows of ``stride`` consecutive
  keys/values (the memory-compressed attention of Liu et al. 2018 compresses with a
  learned strided convolution; the pooling attention of MViT, Fan et al. 2021, pools
  keys and values).
* :func:`strided_kv_attention`: every ``stride``-th key/value is kept.
* :func:`landmark_attention`: given key positions, or the keys of largest norm.
* :func:`kmeans_kv_attention`: keys clustered by k-means; a cluster's key is the mean of
  its keys, its value the mean of its values, and its logit gains ``log |cluster|``
  (each key replaced by its centroid: exact when keys are duplicated).

**Causality** (bottom-right aligned, query ``i`` at position ``i' = i + M - N``): a
compressed row may be seen only when *every* key it summarises is visible, i.e. when the
last position it covers is ``<= i'``; so changing a future key or value never changes an
earlier output. Queries with ``i' < 0``, or seeing no compressed row, give output 0.

Shapes: ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``, GQA with
query head ``h`` using KV head ``h // (Hq // Hkv)``; the compression is done per KV head
and shared by its query heads. Logits are ``scale * q · k̂`` (default ``1/sqrt(D)``); no
mask, bias or softcap. float64 throughout.

**Memory.** Queries are processed in blocks of about ``BLOCK_ELEMENTS`` logits, so the
working memory is O(block · (C + T)) for ``C`` compressed rows and ``T`` raw local keys
per query, never O(N · M) (except the implied matrices, which are ``N x M``, and causal
norm-selected landmarks, which need an ``M x M`` rank table).
"""
from ._common import BLOCK_ELEMENTS
from .pooled import pooled_attention, pooled_attention_matrix
from .strided_kv import strided_kv_attention, strided_kv_attention_matrix
from .landmark import landmark_attention, landmark_attention_matrix, landmark_indices
from .kmeans_kv import kmeans_kv_attention, kmeans_kv_attention_matrix

__all__ = ["BLOCK_ELEMENTS", "kmeans_kv_attention", "kmeans_kv_attention_matrix",
           "landmark_attention", "landmark_attention_matrix", "landmark_indices",
           "pooled_attention", "pooled_attention_matrix", "strided_kv_attention",
           "strided_kv_attention_matrix"]

# gradients (refattn.vjp finds them through the registry)
from .pooled import pooled_attention_vjp
from .strided_kv import strided_kv_attention_vjp
from .landmark import landmark_attention_vjp
from .kmeans_kv import kmeans_kv_attention_vjp
__all__ += ["pooled_attention_vjp", "strided_kv_attention_vjp", "landmark_attention_vjp",
            "kmeans_kv_attention_vjp"]
