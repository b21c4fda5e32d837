"""What the attention-like recurrences share: the three forms ``method=`` selects
(``"parallel"``: the masked ``N x M`` matrix; ``"recurrent"``: one token at a time;
``"chunkwise"``: parallel inside chunks, the state carried between them), run by one
dispatcher that checks the choice and the parallel form's memory.
"""
from __future__ import annotations

from .._core.checks import check_choice, check_int, check_memory

#: Names of the forms ``method=`` selects (``None``: ``"chunkwise"``).
METHODS = ("parallel", "recurrent", "chunkwise")


def run_form(method, chunk_size, pb, memory_budget, *, what: str, parallel_bytes: float,
             parallel, recurrent, chunkwise):
    """Check ``method`` and run its form: ``parallel()`` after checking its
    ``parallel_bytes`` against ``memory_budget``, ``recurrent()``, or
    ``chunkwise(chunk_size)``. Their ``(B, Hkv, G, N, Dv)`` result is returned as
    ``(..., Hq, N, Dv)``."""
    method = check_choice("method", method, METHODS, none="chunkwise")
    if method == "parallel":
        check_memory(parallel_bytes, memory_budget, f"parallel {what}", "method='chunkwise'")
        out = parallel()
    elif method == "recurrent":
        out = recurrent()
    else:
        out = chunkwise(check_int("chunk_size", chunk_size, minimum=1))
    return pb.unflatten(out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv))
