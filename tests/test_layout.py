"""The layout's promises: every public import path of the flat layout still works, the
packages keep their private names to themselves, and no source file outgrows one concept.
"""
import ast
import importlib
import importlib.util
import pathlib

import pytest

import refattn as ra

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The source trees and the package each one is imported as.
SOURCES = {"refattn": "refattn", "analysis": "refattn.analysis", "gpu": "refattn.gpu"}

#: ``refattn.__all__`` before the family packages.
PUBLIC = ["DEFAULT_MEMORY_BUDGET", "Mechanism", "MemoryBudgetError", "associative_scan",
          "attention", "attention_probs", "bigbird_attention",
          "block_sparse_attention", "chunked_attention", "clustered_attention",
          "compressive_attention", "fixed_attention", "gated_linear_attention",
          "improved_clustered_attention", "kmeans_kv_attention",
          "knn_memory_attention", "kvcache", "landmark_attention",
          "linear_attention", "linear_rnn", "linformer_attention",
          "longformer_attention", "lsh_attention", "lsh_buckets",
          "luna_attention", "masks", "mechanisms", "merge_partials",
          "neighborhood_attention", "nystrom_attention", "patch_merging",
          "performer_attention", "performer_features",
          "persistent_memory_attention", "pooled_attention", "retention",
          "reversible", "routing_attention", "s4d", "s4d_kernel",
          "scatterbrain_attention", "scores", "selective_scan",
          "shifted_window_attention", "sink_attention",
          "sliding_window_attention", "softmax_kernel_estimate",
          "sparse_attention", "spatial_reduction_attention", "streaming",
          "strided_attention", "strided_kv_attention", "testing",
          "tiled_attention", "topk_attention", "transformer_xl_attention",
          "window_attention"]

#: Every public module of the flat layout and the public names it held.
PATHS = {
    "refattn.chunked": ["ChunkState", "chunked_attention", "chunked_init_state",
                       "chunked_step"],
    "refattn.clustered": ["clustered_attention", "clustered_attention_matrix",
                         "improved_clustered_attention",
                         "improved_clustered_attention_matrix",
                         "query_clusters", "routing_attention",
                         "routing_attention_matrix",
                         "routing_clusters"],
    "refattn.compression": ["BLOCK_ELEMENTS", "kmeans_kv_attention",
                           "kmeans_kv_attention_matrix",
                           "landmark_attention",
                           "landmark_attention_matrix",
                           "landmark_indices",
                           "pooled_attention",
                           "pooled_attention_matrix",
                           "strided_kv_attention",
                           "strided_kv_attention_matrix"],
    "refattn.drawing": ["draw_mask", "parse_mask"],
    "refattn.exact": ["attention", "attention_probs", "merge_partials"],
    "refattn.gla": ["GLAState", "gated_linear_attention", "gla_init_state", "gla_matrix",
                   "gla_step"],
    "refattn.kvcache": ["FullCacheState", "PagedCacheState", "QuantizedCacheState",
                       "SinkWindowState", "dequantize",
                       "full_cache_from", "full_cache_init",
                       "full_cache_step", "paged_init", "paged_step",
                       "quantization_error", "quantize",
                       "quantized_init", "quantized_step",
                       "ring_init", "ring_step", "sink_init",
                       "sink_step", "split_kv_decode",
                       "state_size_table"],
    "refattn.linear": ["FEATURE_MAPS", "LinearAttentionState", "METHODS", "linear_attention",
                      "linear_attention_init_state",
                      "linear_attention_matrix",
                      "linear_attention_step"],
    "refattn.linear_rnn": ["LinearRNNState", "METHODS", "associative_scan", "linear_rnn",
                          "linear_rnn_init_state",
                          "linear_rnn_step"],
    "refattn.lowrank": ["iterative_pinv", "linformer_attention",
                       "linformer_attention_matrix",
                       "linformer_projections", "luna_attention",
                       "luna_attention_matrix", "nystrom_attention",
                       "nystrom_attention_matrix", "segment_means"],
    "refattn.lsh": ["DEFAULT_CHUNK_SIZE", "SELF_LOGIT", "lsh_attention",
                   "lsh_attention_matrix", "lsh_buckets"],
    "refattn.masks": ["EMPTY", "FULL", "Mask", "PARTIAL", "Tiles", "as_mask", "block_layout",
                     "block_window", "causal", "chunks", "document",
                     "fixed", "from_array", "from_function",
                     "global_tokens", "prefix_lm", "random_blocks",
                     "sinks", "sliding_window", "strided"],
    "refattn.memory": ["SegmentMemoryState", "compress_memory", "compressive_attention",
                      "compressive_attention_matrix",
                      "compressive_init_state", "compressive_step",
                      "knn_memory_attention",
                      "knn_memory_attention_matrix",
                      "persistent_memory_attention",
                      "persistent_memory_attention_matrix",
                      "random_memory", "transformer_xl_attention",
                      "transformer_xl_attention_matrix",
                      "transformer_xl_init_state",
                      "transformer_xl_mask", "transformer_xl_step"],
    "refattn.performer": ["KERNELS", "PerformerState", "draw_omega", "performer_attention",
                         "performer_attention_matrix",
                         "performer_features",
                         "performer_init_state", "performer_step",
                         "softmax_kernel_estimate"],
    "refattn.registry": ["COMMON_PARAMS", "Mechanism", "mechanisms", "register"],
    "refattn.retnet": ["RetentionState", "retention", "retention_init_state",
                      "retention_matrix", "retention_step"],
    "refattn.reversible": ["chunked_feed_forward", "reversible_forward", "reversible_inverse"],
    "refattn.scatterbrain": ["scatterbrain_attention", "scatterbrain_attention_matrix"],
    "refattn.scores": ["ScoreMod", "alibi", "alibi_slopes", "as_score_mod", "from_array",
                      "from_function", "relative_bias", "softcap"],
    "refattn.sparse": ["GATHER_BLOCK_Q", "GATHER_COST_RATIO", "SPARSE_BLOCK",
                      "bigbird_attention", "block_sparse_attention",
                      "fixed_attention", "longformer_attention",
                      "sink_attention", "sliding_window_attention",
                      "sparse_attention", "strided_attention"],
    "refattn.ssm": ["S4DState", "S4D_METHODS", "SELECTIVE_SCAN_METHODS",
                   "SelectiveScanState", "s4d", "s4d_init_state",
                   "s4d_kernel", "s4d_step", "selective_scan",
                   "selective_scan_init_state", "selective_scan_step"],
    "refattn.streaming": ["State", "Window", "attend_token", "check_sizes", "check_token",
                         "check_tokens"],
    "refattn.testing": ["TOLERANCES", "assert_as_accurate_as", "assert_close",
                       "low_precision_attention", "round_to",
                       "tolerance"],
    "refattn.testing.strategies": ["DTYPES", "Shapes", "attention_inputs", "document_masks",
                                  "dtypes", "masks",
                                  "seeds", "shapes"],
    "refattn.tiled": ["DEFAULT_BLOCK_K", "TILE_ELEMENTS", "default_blocks",
                     "online_softmax_tiles", "tiled_attention"],
    "refattn.topk": ["BLOCK_ELEMENTS", "topk_attention", "topk_attention_matrix"],
    "refattn.vision": ["draw_query_pixel", "neighborhood_attention", "neighborhood_mask",
                      "patch_merging", "shifted_window_attention",
                      "shifted_window_mask",
                      "spatial_reduction_attention",
                      "window_attention", "window_mask", "with_global"],
}


def test_every_top_level_name_is_still_exported():
    missing = [name for name in PUBLIC if name not in ra.__all__ or not hasattr(ra, name)]
    assert not missing, f"refattn no longer exports {missing}"


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_module_path_of_the_flat_layout_still_imports(path):
    module = importlib.import_module(path)
    missing = [name for name in PATHS[path] if not hasattr(module, name)]
    assert not missing, f"{path} no longer has {missing}"
    attribute, parts = ra, path.split(".")[1:]
    if parts[0] not in PUBLIC:                 # ra.linear_rnn is the function, as it was
        for part in parts:                     # ra.performer.draw_omega
            attribute = getattr(attribute, part)
        assert attribute is module


def _modules():
    """``(file, dotted module name, is a package __init__)`` for every source file."""
    for tree, package in SOURCES.items():
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = list(path.relative_to(ROOT / tree).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts.pop()
            yield path, ".".join([package] + parts), is_init


def _imports(tree, module: str, is_init: bool):
    """Absolute dotted names imported by a module: ``from x import y`` gives ``x.y``."""
    package = module if is_init else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}"


def _owner(parts, i):
    """The package a private ``parts[i]`` belongs to: a private module or package
    belongs to the package holding it, a private object to its module's package."""
    try:
        is_module = importlib.util.find_spec(".".join(parts[:i + 1])) is not None
    except (ImportError, ValueError):
        is_module = False
    return ".".join(parts[:i] if is_module else parts[:i - 1])


def test_no_module_imports_a_private_name_from_outside_its_package():
    """``from ..sparse.topk import _helper`` in ``refattn.linear`` fails: a ``_name``
    (module, package or object) may be imported only inside the package holding it.
    ``refattn._core`` belongs to ``refattn``, so every subpackage may use it."""
    offenders = []
    for path, module, is_init in _modules():
        package = module if is_init else module.rpartition(".")[0]
        for line, target in _imports(ast.parse(path.read_text()), module, is_init):
            parts = target.split(".")
            for i, part in enumerate(parts):
                if i and part.startswith("_") and not part.startswith("__") and \
                        not (package + ".").startswith(_owner(parts, i) + "."):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not offenders, "private names imported across packages:\n" + "\n".join(offenders)


def test_no_source_file_outgrows_one_concept():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path, _, _ in _modules()
            if (n := len(path.read_text().splitlines())) > 620]
    assert not long, f"split these by concept: {long}"
