"""refattn: float64 reference implementations of efficient attention mechanisms.

The references are numerical oracles: import them in a test suite to check a kernel.

>>> import numpy as np, refattn as ra
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 1, 2, 16, 8))      # batch 1, 2 heads, N = M = 16
>>> ref = ra.attention(q, k, v, mask=ra.masks.sliding_window(4), causal=True)
>>> ra.testing.assert_close(ref.astype(np.float32), ref, dtype="float32")
"""
from . import masks, scores
from ._inputs import DEFAULT_MEMORY_BUDGET, MemoryBudgetError
from .exact import attention, attention_probs, merge_partials
from .registry import Mechanism, mechanisms
from .tiled import tiled_attention
from .sparse import (sparse_attention, sliding_window_attention, strided_attention,
                     fixed_attention, block_sparse_attention, bigbird_attention,
                     longformer_attention, sink_attention)
from .topk import topk_attention
from .clustered import routing_attention, clustered_attention, improved_clustered_attention
from .lsh import lsh_attention, lsh_buckets
from . import reversible
from .linear import linear_attention
from .performer import performer_attention, performer_features, softmax_kernel_estimate
from .scatterbrain import scatterbrain_attention
from .lowrank import linformer_attention, nystrom_attention, luna_attention
from .compression import (pooled_attention, strided_kv_attention, landmark_attention,
                          kmeans_kv_attention)
from .memory import (transformer_xl_attention, compressive_attention,
                     persistent_memory_attention, knn_memory_attention)
from . import streaming
from .retnet import retention
from .gla import gated_linear_attention
from .chunked import chunked_attention
from .linear_rnn import linear_rnn, associative_scan
from .ssm import s4d, s4d_kernel, selective_scan
from . import kvcache   # registers the KV-cache streaming forms of attention and sinks
from .vision import (window_attention, shifted_window_attention, neighborhood_attention,
                     spatial_reduction_attention, patch_merging)
from . import testing  # noqa: E402  (uses the references above)

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_probs", "tiled_attention", "merge_partials", "masks", "scores",
    "mechanisms", "Mechanism", "testing", "MemoryBudgetError", "DEFAULT_MEMORY_BUDGET",
    "sparse_attention", "sliding_window_attention", "strided_attention", "fixed_attention",
    "block_sparse_attention", "bigbird_attention", "longformer_attention", "sink_attention",
    "topk_attention", "routing_attention", "clustered_attention",
    "improved_clustered_attention", "lsh_attention", "lsh_buckets", "reversible",
    "transformer_xl_attention", "compressive_attention", "persistent_memory_attention",
    "knn_memory_attention", "streaming", "linear_attention", "performer_attention",
    "performer_features", "softmax_kernel_estimate", "scatterbrain_attention",
    "linformer_attention", "nystrom_attention", "luna_attention", "pooled_attention",
    "strided_kv_attention", "landmark_attention", "kmeans_kv_attention",
    "window_attention", "shifted_window_attention", "neighborhood_attention",
    "spatial_reduction_attention", "patch_merging", "kvcache", "retention",
    "gated_linear_attention", "chunked_attention", "linear_rnn", "associative_scan", "s4d",
    "s4d_kernel", "selective_scan",
]
