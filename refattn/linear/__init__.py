"""Linear and kernelized attention: feature-map linear attention, Performer's random
features (FAVOR+), and Scatterbrain's sparse + low-rank sum.
"""
from .linear import (FEATURE_MAPS, LinearAttentionState, METHODS, linear_attention,
                     linear_attention_init_state, linear_attention_matrix,
                     linear_attention_step)
from .performer import (KERNELS, PerformerState, draw_omega, performer_attention,
                        performer_attention_matrix, performer_features,
                        performer_init_state, performer_step, softmax_kernel_estimate)
from .scatterbrain import (scatterbrain_attention, scatterbrain_attention_matrix)

__all__ = ["FEATURE_MAPS", "LinearAttentionState", "METHODS", "linear_attention",
           "linear_attention_init_state", "linear_attention_matrix",
           "linear_attention_step", "KERNELS", "PerformerState", "draw_omega",
           "performer_attention", "performer_attention_matrix", "performer_features",
           "performer_init_state", "performer_step", "softmax_kernel_estimate",
           "scatterbrain_attention", "scatterbrain_attention_matrix"]
