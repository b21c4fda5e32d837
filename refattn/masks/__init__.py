"""Masks: predicates ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
signature) that compose with ``&``, ``|``, ``~`` and classify tiles; score modifiers
(:mod:`refattn.masks.scores`); drawing (:mod:`refattn.masks.drawing`).
"""
from .masks import (EMPTY, FULL, Mask, PARTIAL, Tiles, as_mask, block_layout, block_window,
                    causal, chunks, document, fixed, from_array, from_function,
                    global_tokens, prefix_lm, random_blocks, sinks, sliding_window, strided)
from . import scores
from . import drawing

__all__ = ["EMPTY", "FULL", "Mask", "PARTIAL", "Tiles", "as_mask", "block_layout",
           "block_window", "causal", "chunks", "document", "fixed", "from_array",
           "from_function", "global_tokens", "prefix_lm", "random_blocks", "sinks",
           "sliding_window", "strided", "scores", "drawing"]
