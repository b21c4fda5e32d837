"""Low-rank attention: Linformer, Nystromformer and Luna.
"""
from ._common import segment_means
from .linformer import (linformer_attention, linformer_attention_matrix,
                        linformer_attention_vjp, linformer_projections)
from .nystrom import (PINV_INITS, iterative_pinv, iterative_pinv_vjp, nystrom_attention,
                      nystrom_attention_matrix, nystrom_attention_vjp)
from .luna import luna_attention, luna_attention_matrix, luna_attention_vjp

__all__ = ["iterative_pinv", "linformer_attention", "linformer_attention_matrix",
           "linformer_projections", "luna_attention", "luna_attention_matrix",
           "nystrom_attention", "nystrom_attention_matrix", "segment_means",
           "linformer_attention_vjp", "nystrom_attention_vjp", "luna_attention_vjp",
           "iterative_pinv_vjp", "PINV_INITS"]
