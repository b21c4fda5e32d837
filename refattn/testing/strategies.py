"""Hypothesis strategies for attention inputs, for refattn's tests and yours.

>>> from hypothesis import given, settings
>>> import refattn as ra
>>> from refattn.testing import strategies as st_attn
>>> @settings(max_examples=5, deadline=None)
... @given(st_attn.attention_inputs(), st_attn.masks())
... def test_tiled(inputs, mask):
...     q, k, v = inputs
...     ra.testing.assert_close(ra.tiled_attention(q, k, v, mask=mask, block_q=7),
...                             ra.attention(q, k, v, mask=mask), rtol=1e-12, atol=1e-12)
>>> test_tiled()
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .. import masks as mask_kinds

__all__ = ["Shapes", "shapes", "dtypes", "attention_inputs", "masks", "document_masks",
           "seeds"]

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Shapes:
    """Sizes of one attention problem: ``q (*batch, hq, n, d)``, ``k (*batch, hkv, m, d)``,
    ``v (*batch, hkv, m, dv)``."""

    batch: tuple
    hq: int
    hkv: int
    n: int
    m: int
    d: int
    dv: int


@st.composite
def shapes(draw, *, max_batch_dims: int = 2, max_kv_heads: int = 3, max_group: int = 3,
           max_len: int = 40, max_dim: int = 16, min_len: int = 1) -> Shapes:
    """Attention shapes including GQA/MQA (``hq = group * hkv``), ``n != m`` and odd
    lengths."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=max_batch_dims)))
    hkv = draw(st.integers(1, max_kv_heads))
    hq = hkv * draw(st.integers(1, max_group))
    n = draw(st.integers(min_len, max_len))
    m = draw(st.one_of(st.just(n), st.integers(min_len, max_len)))
    d = draw(st.integers(1, max_dim))
    dv = draw(st.one_of(st.just(d), st.integers(1, max_dim)))
    return Shapes(batch, hq, hkv, n, m, d, dv)


def dtypes() -> st.SearchStrategy:
    """Names of the input dtypes the references accept."""
    return st.sampled_from(DTYPES)


def seeds() -> st.SearchStrategy:
    return st.integers(0, 2**32 - 1)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


@st.composite
def attention_inputs(draw, shape_strategy=None, *, dtype=None, logit_scale=None):
    """``(q, k, v)`` arrays of drawn shapes, standard normal times a drawn spread
    (logits of order ``spread**2``), in ``dtype`` (drawn from :func:`dtypes` if None,
    default float64 when ``dtype="float64"``)."""
    sh = draw(shape_strategy if shape_strategy is not None else shapes())
    dt = draw(dtypes()) if dtype is None else dtype
    spread = draw(st.sampled_from((0.1, 1.0, 3.0))) if logit_scale is None else logit_scale
    rng = np.random.default_rng(draw(seeds()))
    q = rng.standard_normal(sh.batch + (sh.hq, sh.n, sh.d)) * spread
    k = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.d)) * spread
    v = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.dv))
    return _cast(q, dt), _cast(k, dt), _cast(v, dt)


@st.composite
def masks(draw, *, max_len: int = 40, compose: bool = True) -> mask_kinds.Mask:
    """Masks of every kind in :mod:`refattn.masks`, some composed with ``& | ~``.

    Block layouts are sized for up to ``max_len`` keys. Document masks carry their
    lengths, so they come from :func:`document_masks` instead.
    """
    small = st.integers(0, max_len)
    kinds = [
        st.builds(mask_kinds.causal, st.sampled_from(("bottom_right", "top_left"))),
        st.builds(mask_kinds.sliding_window, small, st.integers(0, 5), st.integers(1, 4)),
        st.builds(mask_kinds.sinks, st.integers(0, 6)),
        st.builds(mask_kinds.prefix_lm, small),
        st.builds(mask_kinds.strided, st.integers(1, 6)),
        st.builds(mask_kinds.global_tokens,
                  st.lists(st.integers(0, max_len - 1), min_size=1, max_size=4)),
        st.builds(lambda c, bs, s: mask_kinds.random_blocks(c, bs, s),
                  st.integers(0, 3), st.integers(1, 8), seeds()),
        st.builds(mask_kinds.block_window, st.integers(0, 3), st.integers(1, 8)),
        st.builds(mask_kinds.fixed, st.integers(4, 8), st.integers(0, 4)),
        st.builds(mask_kinds.chunks, st.integers(1, 8), st.integers(0, 10)),
        st.builds(lambda left, dils: mask_kinds.sliding_window(left, dilation=dils), small,
                  st.lists(st.integers(1, 4), min_size=1, max_size=3)),
        st.builds(lambda bs, s: mask_kinds.block_layout(
            np.random.default_rng(s).random((-(-max_len // bs),) * 2) < 0.5, bs),
            st.integers(1, 8), seeds()),
    ]
    base = st.one_of(kinds)
    if not compose:
        return draw(base)
    return draw(st.recursive(base, lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner)), max_leaves=3))


@st.composite
def document_masks(draw, n: int, m: int) -> mask_kinds.Mask:
    """Document masks for ``n`` queries and ``m`` keys: sorted ids (packed sequences) or
    arbitrary ones, given as ``document(ids)`` when ``n <= m`` or as
    ``document(q_ids, kv_ids)``."""
    def ids(length):
        return st.lists(st.integers(0, 3), min_size=length, max_size=length).map(
            lambda xs: np.asarray(xs, dtype=np.int64))
    kv = draw(ids(m))
    if draw(st.booleans()):
        kv = np.sort(kv)
    if n <= m and draw(st.booleans()):
        return mask_kinds.document(kv)
    return mask_kinds.document(draw(ids(n)), kv)
