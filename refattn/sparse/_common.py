"""What the mask-defined patterns of the sparse family share: registration as a
mechanism whose implied matrix is dense attention under the same mask."""
from __future__ import annotations

from ..exact.dense import attention_probs
from ..registry import attach, register


def pattern(factory, **register_kwargs):
    """Register a mask-defined mechanism: ``fn(q, k, v, *, <params>, **options)`` is
    ``sparse_attention(q, k, v, factory(<params>), **options)``; its implied matrix is
    the dense attention matrix under the same mask, and ``fn.mask`` is ``factory``."""
    def deco(fn):
        def implied(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                    check_finite=True, method=None, block_q=None, block_k=None,
                    workers=None, **params):
            return attention_probs(q, k, mask=factory(**params), causal=causal, scale=scale,
                                   bias=bias, softcap=softcap, check_finite=check_finite)
        fn.mask = factory
        register(family="sparse", exact=False, supports_causal=True, supports_mask=False,
                 supports_gqa=True, position_free=False, mask=factory,
                 **register_kwargs)(fn)
        attach(fn, implied=implied)
        return fn
    return deco
