"""Exact softmax attention: dense, tiled (FlashAttention's online softmax), merging of
partial results, quantized keys and values, KV-cache states for decoding, attention over
a paged KV cache in the vLLM / FlashInfer layout, and DeepSeek-V2's multi-head latent
attention (naive and absorbed forms, its latent KV cache); learned attention sinks are the
engine's ``sinks=``. The score-level variants on the same engine, each a registered
mechanism: differential attention (Ye et al. 2024), sigmoid attention (Ramapuram et al.
2024) and forgetting attention (Lin et al. 2025).
"""
from .dense import attention, attention_probs
from .tiled import tiled_attention
from .merge import merge_partials, split_kv_decode
from .quantize import dequantize, quantization_error, quantize
from .paged import paged_attention
from . import kvcache
from .mla import (MLACacheState, mla_attention, mla_attention_absorbed, mla_cache_from,
                  mla_cache_nbytes, mla_init_state, mla_step)

__all__ = ["attention", "attention_probs", "tiled_attention", "merge_partials",
           "split_kv_decode", "quantize", "dequantize", "quantization_error", "kvcache",
           "paged_attention", "mla_attention", "mla_attention_absorbed", "MLACacheState",
           "mla_init_state", "mla_cache_from", "mla_step", "mla_cache_nbytes"]

# gradients (refattn.vjp finds them through the registry)
from .dense import attention_vjp
from .tiled import tiled_attention_vjp
from .paged import paged_attention_vjp
from .mla import mla_attention_vjp
__all__ += ["attention_vjp", "tiled_attention_vjp", "paged_attention_vjp",
            "mla_attention_vjp"]

# score-level variants: registered mechanisms of their own on the exact engine
from .differential import (differential_attention, differential_attention_matrix,
                           differential_attention_vjp)
from .sigmoid import sigmoid_attention, sigmoid_attention_matrix, sigmoid_attention_vjp
from .forgetting import (forget_gate_bias, forgetting_attention,
                         forgetting_attention_matrix, forgetting_attention_vjp)
__all__ += ["differential_attention", "differential_attention_matrix",
            "differential_attention_vjp", "sigmoid_attention", "sigmoid_attention_matrix",
            "sigmoid_attention_vjp", "forgetting_attention", "forgetting_attention_matrix",
            "forgetting_attention_vjp", "forget_gate_bias"]
