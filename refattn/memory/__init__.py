"""Attention with memory: Transformer-XL segment recurrence, the Compressive
Transformer, persistent memory vectors and kNN-retrieved memories.
"""
from .memory import (SegmentMemoryState, compress_memory, compressive_attention,
                     compressive_attention_matrix, compressive_init_state, compressive_step,
                     knn_memory_attention, knn_memory_attention_matrix,
                     persistent_memory_attention, persistent_memory_attention_matrix,
                     random_memory, transformer_xl_attention,
                     transformer_xl_attention_matrix, transformer_xl_init_state,
                     transformer_xl_mask, transformer_xl_step)

__all__ = ["SegmentMemoryState", "compress_memory", "compressive_attention",
           "compressive_attention_matrix", "compressive_init_state", "compressive_step",
           "knn_memory_attention", "knn_memory_attention_matrix",
           "persistent_memory_attention", "persistent_memory_attention_matrix",
           "random_memory", "transformer_xl_attention", "transformer_xl_attention_matrix",
           "transformer_xl_init_state", "transformer_xl_mask", "transformer_xl_step"]
