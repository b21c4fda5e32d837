"""What the sparse family shares: registration of a mask-defined pattern (a mechanism
whose implied matrix is dense attention under the same mask), and the start of the
content-based selections that hold ``(heads, block_q, M)`` logit blocks."""
from __future__ import annotations

from .._core.logits import make_logits
from .._core.select import block_rows
from ..exact.dense import attention_probs
from ..registry import attach, register
from .engine import sparse_attention_vjp


def pattern(factory, **register_kwargs):
    """Register a mask-defined mechanism: ``fn(q, k, v, *, <params>, **options)`` is
    ``sparse_attention(q, k, v, factory(<params>), **options)``; its implied matrix is
    the dense attention matrix under the same mask, its VJP the sparse engine's
    (:func:`refattn.sparse.engine.sparse_attention_vjp`), and ``fn.mask`` is
    ``factory``."""
    def deco(fn):
        def implied(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                    check_finite=True, method=None, block_q=None, block_k=None,
                    workers=None, **params):
            return attention_probs(q, k, mask=factory(**params), causal=causal, scale=scale,
                                   bias=bias, softcap=softcap, check_finite=check_finite)
        def vjp(q, k, v, grad_out, *, grad_lse=None, causal=False, scale=None, bias=None,
                softcap=None, check_finite=True, method="auto", block_q=None, block_k=None,
                workers=None, **params):
            return sparse_attention_vjp(q, k, v, grad_out, mask=factory(**params),
                                        grad_lse=grad_lse, causal=causal, scale=scale,
                                        bias=bias, softcap=softcap,
                                        check_finite=check_finite, method=method,
                                        block_q=block_q, block_k=block_k, workers=workers)
        fn.mask = factory
        fn = register(family="sparse", exact=False, supports_causal=True,
                      supports_mask=False, supports_gqa=True, position_free=False,
                      mask=factory, **register_kwargs)(fn)
        implied.__name__, vjp.__name__ = f"{fn.__name__}_matrix", f"{fn.__name__}_vjp"
        attach(fn, implied=implied, vjp=vjp)
        return fn
    return deco


def logit_blocks(q, pb, block_q, heads: int, **options):
    """``(logits, rows_per_block, q_scaled)`` for a reference that forms the logits of
    ``heads`` query heads against all ``M`` keys one block of rows at a time: the logit
    pipeline of ``options`` (mask, causal, scale, bias, softcap, check_finite), the rows
    per block (``block_q``, or about ``BLOCK_ELEMENTS`` logits) and ``q * scale``."""
    logits = make_logits(pb, **options)
    return logits, block_rows(block_q, heads, pb.n, pb.m), q * logits.scale
