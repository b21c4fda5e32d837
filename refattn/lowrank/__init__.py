"""Low-rank attention: Linformer, Nystromformer and Luna.
"""
from ._common import segment_means
from .linformer import (linformer_attention, linformer_attention_matrix,
                        linformer_projections)
from .nystrom import iterative_pinv, nystrom_attention, nystrom_attention_matrix
from .luna import luna_attention, luna_attention_matrix

__all__ = ["iterative_pinv", "linformer_attention", "linformer_attention_matrix",
           "linformer_projections", "luna_attention", "luna_attention_matrix",
           "nystrom_attention", "nystrom_attention_matrix", "segment_means"]
