"""Low-rank attention: Linformer, Nystromformer and Luna.
"""
from .lowrank import (iterative_pinv, linformer_attention, linformer_attention_matrix,
                      linformer_projections, luna_attention, luna_attention_matrix,
                      nystrom_attention, nystrom_attention_matrix, segment_means)

__all__ = ["iterative_pinv", "linformer_attention", "linformer_attention_matrix",
           "linformer_projections", "luna_attention", "luna_attention_matrix",
           "nystrom_attention", "nystrom_attention_matrix", "segment_means"]
