"""Sparse attention: mask-defined patterns (sliding window, strided, fixed,
block-sparse, BigBird, Longformer, sinks, chunks) on one engine, the content-based
selections (top-k, routing / clustered, LSH), and the trainable sparse attentions (NSA,
MoBA, DSA).
"""
from .engine import GATHER_BLOCK_Q, GATHER_COST_RATIO, SPARSE_BLOCK, sparse_attention
from .local import sink_attention, sliding_window_attention
from .patterns import (bigbird_attention, block_sparse_attention, fixed_attention,
                       longformer_attention, strided_attention)
from .topk import (topk_attention, topk_attention_matrix)
from .clustered import (clustered_attention, clustered_attention_matrix,
                        improved_clustered_attention, improved_clustered_attention_matrix,
                        query_clusters, routing_attention, routing_attention_matrix,
                        routing_clusters)
from .lsh import (DEFAULT_CHUNK_SIZE, SELF_LOGIT, lsh_attention, lsh_attention_matrix,
                  lsh_buckets)
from .chunked import (ChunkState, chunked_attention, chunked_init_state, chunked_step)
from . import reversible
from .nsa import nsa_attention, nsa_attention_matrix
from .moba import moba_attention, moba_attention_matrix
from .dsa import dsa_attention, dsa_attention_matrix, lightning_indexer

__all__ = ["GATHER_BLOCK_Q", "GATHER_COST_RATIO", "SPARSE_BLOCK", "bigbird_attention",
           "block_sparse_attention", "fixed_attention", "longformer_attention",
           "sink_attention", "sliding_window_attention", "sparse_attention",
           "strided_attention", "topk_attention", "topk_attention_matrix",
           "clustered_attention", "clustered_attention_matrix",
           "improved_clustered_attention", "improved_clustered_attention_matrix",
           "query_clusters", "routing_attention", "routing_attention_matrix",
           "routing_clusters", "DEFAULT_CHUNK_SIZE", "SELF_LOGIT", "lsh_attention",
           "lsh_attention_matrix", "lsh_buckets", "ChunkState", "chunked_attention",
           "chunked_init_state", "chunked_step", "reversible", "nsa_attention",
           "nsa_attention_matrix", "moba_attention", "moba_attention_matrix",
           "dsa_attention", "dsa_attention_matrix", "lightning_indexer"]

# gradients (refattn.vjp finds them through the registry)
from .engine import sparse_attention_vjp
from .topk import topk_attention_vjp
from .clustered import (clustered_attention_vjp, improved_clustered_attention_vjp,
                        routing_attention_vjp)
from .lsh import lsh_attention_vjp
from .chunked import chunked_attention_vjp
from .nsa import nsa_attention_vjp
from .moba import moba_attention_vjp
from .dsa import dsa_attention_vjp
__all__ += ["nsa_attention_vjp", "moba_attention_vjp", "dsa_attention_vjp",
            "sparse_attention_vjp", "topk_attention_vjp", "clustered_attention_vjp",
            "improved_clustered_attention_vjp", "routing_attention_vjp",
            "lsh_attention_vjp", "chunked_attention_vjp"]
