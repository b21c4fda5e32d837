"""Linear and kernelized attention: feature-map linear attention, Performer (FAVOR+)
on the random features of :mod:`.features`, and Scatterbrain's sparse + low-rank sum;
the feature-attention engine they share is in ``_common``.
"""
from .linear import (FEATURE_MAPS, METHODS, LinearAttentionState, linear_attention,
                     linear_attention_init_state, linear_attention_matrix,
                     linear_attention_step, linear_attention_vjp)
from .features import KERNELS, draw_omega, performer_features, softmax_kernel_estimate
from .performer import (PerformerState, performer_attention, performer_attention_matrix,
                        performer_attention_vjp, performer_init_state, performer_step)
from .scatterbrain import scatterbrain_attention, scatterbrain_attention_matrix

__all__ = ["FEATURE_MAPS", "LinearAttentionState", "METHODS", "linear_attention",
           "linear_attention_init_state", "linear_attention_matrix",
           "linear_attention_step", "linear_attention_vjp", "KERNELS", "PerformerState",
           "draw_omega", "performer_attention", "performer_attention_matrix",
           "performer_features", "performer_attention_vjp", "performer_init_state",
           "performer_step", "softmax_kernel_estimate", "scatterbrain_attention",
           "scatterbrain_attention_matrix"]

# gradients (refattn.vjp finds them through the registry)
from .linear import linear_attention_step_vjp
from .scatterbrain import scatterbrain_attention_vjp
__all__ += ["linear_attention_step_vjp", "scatterbrain_attention_vjp"]
