"""Recurrent forms of attention: retention (RetNet), gated linear attention (GLA), the
delta-rule family (DeltaNet, Gated DeltaNet, Kimi Delta Attention, RWKV-7's generalized
delta rule), Mamba-2's SSD and the diagonal linear RNN, each with parallel, recurrent and
chunkwise forms.
"""
from .retention import (RetentionState, retention, retention_init_state, retention_matrix,
                        retention_step, retention_vjp)
from .gla import (GLAState, gated_linear_attention, gated_linear_attention_vjp,
                  gla_init_state, gla_matrix, gla_step)
from .deltanet import (deltanet, deltanet_init_state, deltanet_matrix, deltanet_step,
                       deltanet_vjp)
from .gated_deltanet import (gated_deltanet, gated_deltanet_init_state,
                             gated_deltanet_matrix, gated_deltanet_step,
                             gated_deltanet_vjp)
from .kda import (kda_init_state, kda_matrix, kda_step, kimi_delta_attention,
                  kimi_delta_attention_vjp)
from .generalized_delta_rule import (generalized_delta_rule,
                                     generalized_delta_rule_init_state,
                                     generalized_delta_rule_matrix,
                                     generalized_delta_rule_step,
                                     generalized_delta_rule_vjp)
from .ssd import ssd, ssd_init_state, ssd_matrix, ssd_step, ssd_vjp
from .linear_rnn import (LinearRNNState, associative_scan, linear_rnn,
                         linear_rnn_init_state, linear_rnn_step, linear_rnn_vjp)

__all__ = ["RetentionState", "retention", "retention_init_state", "retention_matrix",
           "retention_step", "GLAState", "gated_linear_attention", "gla_init_state",
           "gla_matrix", "gla_step", "LinearRNNState", "associative_scan", "linear_rnn",
           "linear_rnn_init_state", "linear_rnn_step", "retention_vjp",
           "gated_linear_attention_vjp", "linear_rnn_vjp", "deltanet",
           "deltanet_init_state", "deltanet_matrix", "deltanet_step", "deltanet_vjp",
           "gated_deltanet",
           "gated_deltanet_init_state", "gated_deltanet_matrix", "gated_deltanet_step",
           "gated_deltanet_vjp", "kimi_delta_attention", "kda_init_state", "kda_matrix",
           "kda_step", "kimi_delta_attention_vjp", "generalized_delta_rule",
           "generalized_delta_rule_init_state", "generalized_delta_rule_matrix",
           "generalized_delta_rule_step", "generalized_delta_rule_vjp", "ssd",
           "ssd_init_state", "ssd_matrix", "ssd_step", "ssd_vjp"]
