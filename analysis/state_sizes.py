"""Streaming state sizes in the dtype a model keeps them in.

refattn's references hold every state in float64, so
:func:`refattn.streaming.state_size_table` counts float64 bytes. A model keeps its KV
cache and recurrent states in bf16 (or fp8, or f32): :func:`state_sizes` converts the
table to ``dtype`` (numbers = float64 bytes / 8, times the dtype's size), for one layer
and batch 1. The rows include the full cache as MHA (``attention_mha``, ``Hkv = Hq``),
GQA (``attention``, ``heads_kv``), MQA (``attention_mqa``, ``Hkv = 1``) and DeepSeek-V2's
MLA latent cache (``mla_attention``, 512 + 64 numbers per token), beside the bounded and
constant states of the efficient mechanisms.

>>> from refattn.analysis.state_sizes import state_sizes
>>> t = state_sizes((1000,), dtype="bf16", heads_q=4, heads_kv=1, d=8)
>>> t["attention"][1000], t["attention_mha"][1000]     # K and V: 2 x 1000 x Hkv x 8 x 2 B
(32000, 128000)
>>> state_sizes((1000,), dtype="f32", heads_q=4, heads_kv=1, d=8)["attention"][1000]
64000
"""
from __future__ import annotations

__all__ = ["DTYPE_BYTES", "state_sizes", "KV_ROWS"]

#: Bytes per number of each storage dtype a model may keep its state in.
DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "f32": 4, "f64": 8}

#: The full-cache rows, in the order the report shows them first.
KV_ROWS = ("attention_mha", "attention", "attention_mqa", "mla_attention")


def state_sizes(ns=(1_000, 1_000_000), *, dtype="bf16", heads_q=32, heads_kv=8, d=128,
                budget=4096):
    """``{name: {n: bytes}}`` after ``n`` tokens, in ``dtype`` (a key of
    :data:`DTYPE_BYTES`); other arguments as :func:`refattn.streaming.state_size_table`
    (``dv = d``)."""
    from refattn._core.checks import check_choice
    from refattn.streaming import state_size_table
    check_choice("dtype", dtype, tuple(DTYPE_BYTES))
    table = state_size_table(tuple(ns), heads_q=heads_q, heads_kv=heads_kv, d=d, dv=d,
                             budget=budget)
    size = DTYPE_BYTES[dtype]
    return {name: {n: int(b) // 8 * size for n, b in row.items()}
            for name, row in table.items()}
