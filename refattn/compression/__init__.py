"""Attention over compressed keys and values: pooling, strided selection, landmarks
and k-means centroids.
"""
from .compression import (BLOCK_ELEMENTS, kmeans_kv_attention, kmeans_kv_attention_matrix,
                          landmark_attention, landmark_attention_matrix, landmark_indices,
                          pooled_attention, pooled_attention_matrix, strided_kv_attention,
                          strided_kv_attention_matrix)

__all__ = ["BLOCK_ELEMENTS", "kmeans_kv_attention", "kmeans_kv_attention_matrix",
           "landmark_attention", "landmark_attention_matrix", "landmark_indices",
           "pooled_attention", "pooled_attention_matrix", "strided_kv_attention",
           "strided_kv_attention_matrix"]
