"""Recurrent forms of attention: retention (RetNet), gated linear attention (GLA)
and the diagonal linear RNN, each with parallel, recurrent and chunkwise forms.
"""
from .retention import (RetentionState, retention, retention_init_state, retention_matrix,
                        retention_step, retention_vjp)
from .gla import (GLAState, gated_linear_attention, gated_linear_attention_vjp,
                  gla_init_state, gla_matrix, gla_step)
from .linear_rnn import (LinearRNNState, associative_scan, linear_rnn,
                         linear_rnn_init_state, linear_rnn_step, linear_rnn_vjp)

__all__ = ["RetentionState", "retention", "retention_init_state", "retention_matrix",
           "retention_step", "GLAState", "gated_linear_attention", "gla_init_state",
           "gla_matrix", "gla_step", "LinearRNNState", "associative_scan", "linear_rnn",
           "linear_rnn_init_state", "linear_rnn_step", "retention_vjp",
           "gated_linear_attention_vjp", "linear_rnn_vjp"]
