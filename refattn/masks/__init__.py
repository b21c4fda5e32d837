"""Masks: predicates ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
signature) that compose with ``&``, ``|``, ``~`` and classify tiles
(:mod:`refattn.masks.base`); the named masks: position bands
(:mod:`refattn.masks.bands`), token sets (:mod:`refattn.masks.tokens`) and block layouts
(:mod:`refattn.masks.layouts`); the tiles a tiled computation visits, row by row
(:mod:`refattn.masks.tile_rows`); score modifiers (:mod:`refattn.masks.scores`); drawing
(:mod:`refattn.masks.drawing`).
"""
from .base import EMPTY, FULL, Mask, PARTIAL, Tiles, as_mask, from_array, from_function
from .bands import block_window, causal, chunks, sliding_window, strided
from .tokens import document, fixed, global_tokens, prefix_lm, sinks
from .layouts import bigbird_layout, block_layout, random_blocks
from .tile_rows import TileRows
from . import scores
from . import drawing

__all__ = ["EMPTY", "FULL", "Mask", "PARTIAL", "Tiles", "as_mask", "bigbird_layout",
           "block_layout",
           "block_window", "causal", "chunks", "document", "fixed", "from_array",
           "from_function", "global_tokens", "prefix_lm", "random_blocks", "sinks",
           "sliding_window", "strided", "scores", "drawing", "TileRows"]
