"""refattn: float64 reference implementations of efficient attention mechanisms.

The references are numerical oracles: import them in a test suite to check a kernel.

>>> import numpy as np, refattn as ra
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 1, 2, 16, 8))      # batch 1, 2 heads, N = M = 16
>>> ref = ra.attention(q, k, v, mask=ra.masks.sliding_window(4), causal=True)
>>> ra.testing.assert_close(ref.astype(np.float32), ref, dtype="float32")
"""
import sys as _sys
import types as _types

from . import masks, streaming
from ._core.checks import DEFAULT_MEMORY_BUDGET, MemoryBudgetError
from .masks import scores
from .registry import Mechanism, mechanisms
from .gradients import vjp
from .exact import (attention, attention_probs, differential_attention,
                    forgetting_attention, merge_partials, mla_attention,
                    mla_attention_absorbed, paged_attention, sigmoid_attention,
                    tiled_attention)
from .sparse import (sparse_attention, sliding_window_attention, strided_attention,
                     fixed_attention, block_sparse_attention, bigbird_attention,
                     longformer_attention, sink_attention, chunked_attention, topk_attention,
                     routing_attention, clustered_attention, improved_clustered_attention,
                     lsh_attention, lsh_buckets, reversible, nsa_attention, moba_attention,
                     dsa_attention)
from .linear import (linear_attention, performer_attention, performer_features,
                     softmax_kernel_estimate, scatterbrain_attention)
from .lowrank import linformer_attention, nystrom_attention, luna_attention
from .compression import (pooled_attention, strided_kv_attention, landmark_attention,
                          kmeans_kv_attention)
from .memory import (transformer_xl_attention, compressive_attention,
                     persistent_memory_attention, knn_memory_attention)
from .recurrent import (retention, gated_linear_attention, linear_rnn, associative_scan,
                        deltanet, gated_deltanet, kimi_delta_attention,
                        generalized_delta_rule, ssd)
from .ssm import s4d, s4d_kernel, selective_scan
from .vision import (window_attention, shifted_window_attention, neighborhood_attention,
                     spatial_reduction_attention, patch_merging)
from . import testing  # noqa: E402  (uses the references above)

#: Module paths of the flat layout before the family packages, kept importable
#: (``from refattn.performer import draw_omega``): old path -> the module now holding it,
#: or the modules whose public names it gathers.
STABLE_PATHS = {
    "refattn.kvcache": ("refattn.exact.kvcache", "refattn.exact.quantize",
                        "refattn.exact.merge", "refattn.sparse.local", "refattn.streaming"),
    "refattn.scores": "refattn.masks.scores", "refattn.drawing": "refattn.masks.drawing",
    "refattn.tiled": "refattn.exact.tiled",
    "refattn.topk": "refattn.sparse.topk", "refattn.clustered": "refattn.sparse.clustered",
    "refattn.lsh": "refattn.sparse.lsh", "refattn.reversible": "refattn.sparse.reversible",
    "refattn.chunked": "refattn.sparse.chunked",
    "refattn.performer": "refattn.linear.performer",
    "refattn.scatterbrain": "refattn.linear.scatterbrain",
    "refattn.retnet": "refattn.recurrent.retention", "refattn.gla": "refattn.recurrent.gla",
    "refattn.linear_rnn": "refattn.recurrent.linear_rnn",
}


def _stable_module(old: str, new):
    """The module now at ``new``, or one gathering the public names of the modules
    ``new`` (the first one's docstring describes it)."""
    if isinstance(new, str):
        return _sys.modules[new]
    gathered = _types.ModuleType(old, _sys.modules[new[0]].__doc__)
    for source in new:
        module = _sys.modules[source]
        gathered.__dict__.update({n: getattr(module, n) for n in module.__all__})
    gathered.__all__ = sorted(n for n in vars(gathered) if not n.startswith("_"))
    return gathered


for _old, _new in STABLE_PATHS.items():
    _sys.modules[_old] = _stable_module(_old, _new)
    globals().setdefault(_old.split(".")[1], _sys.modules[_old])

__version__ = "0.1.0"


def __getattr__(name):
    """``refattn.gpu`` and ``refattn.analysis`` are imported on first use, so a plain
    ``import refattn`` stays light (neither imports CuPy, and nothing here imports them)."""
    if name in ("gpu", "analysis"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention", "attention_probs", "tiled_attention", "merge_partials", "paged_attention",
    "mla_attention", "mla_attention_absorbed", "differential_attention", "sigmoid_attention",
    "forgetting_attention", "masks", "scores",
    "mechanisms", "Mechanism", "vjp", "testing", "MemoryBudgetError", "DEFAULT_MEMORY_BUDGET",
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
    "s4d_kernel", "selective_scan", "deltanet", "gated_deltanet", "kimi_delta_attention",
    "generalized_delta_rule", "ssd", "nsa_attention", "moba_attention", "dsa_attention",
]
