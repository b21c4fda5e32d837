"""Vision attention on 1-3D grids: Swin windows and shifted windows, neighborhood
attention (NATTEN), PVT's spatial reduction, and patch merging.
"""
from .vision import (draw_query_pixel, neighborhood_attention, neighborhood_mask,
                     patch_merging, shifted_window_attention, shifted_window_mask,
                     spatial_reduction_attention, window_attention, window_mask,
                     with_global)

__all__ = ["draw_query_pixel", "neighborhood_attention", "neighborhood_mask",
           "patch_merging", "shifted_window_attention", "shifted_window_mask",
           "spatial_reduction_attention", "window_attention", "window_mask", "with_global"]
