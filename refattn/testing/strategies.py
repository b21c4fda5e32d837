"""Hypothesis strategies for attention inputs, for refattn's tests and yours.

They compose without hidden size couplings:

* :func:`shapes` draws the sizes of a problem, :func:`attention_inputs` arrays of drawn
  (or given) shapes;
* :func:`masks` without lengths draws masks valid for **every** ``N`` and ``M`` (each
  kind is defined by positions, windows and blocks, not by a grid sized for some
  length), so it pairs with any shapes; ``masks(n, m)`` takes the lengths and also draws
  the kinds that need them: fixed block layouts and documents (:func:`document_masks`);
* dtypes default to :data:`PORTABLE_DTYPES` (float64, float32, float16), which every
  framework takes (``torch.from_numpy``, JAX, CuPy); bfloat16 when asked for
  (``dtypes=DTYPES``, ``dtype="bfloat16"``).

>>> from hypothesis import given, settings, strategies as st
>>> import refattn as ra
>>> from refattn.testing import strategies as st_attn
>>> @settings(max_examples=5, deadline=None)
... @given(st_attn.attention_inputs(), st_attn.masks())
... def test_tiled(inputs, mask):
...     q, k, v = inputs
...     ra.testing.assert_close(ra.tiled_attention(q, k, v, mask=mask, block_q=7),
...                             ra.attention(q, k, v, mask=mask), rtol=1e-12, atol=1e-12)
>>> test_tiled()

Lengths first, then masks for exactly those lengths (block layouts and documents too):

>>> @settings(max_examples=5, deadline=None)
... @given(st.data())
... def test_with_lengths(data):
...     sh = data.draw(st_attn.shapes(max_len=60))
...     q, k, v = data.draw(st_attn.attention_inputs(st.just(sh), dtype="float64"))
...     mask = data.draw(st_attn.masks(sh.n, sh.m))
...     assert ra.attention(q, k, v, mask=mask).shape[-2] == sh.n
>>> test_with_lengths()
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .. import masks as mask_kinds
from .._core.checks import check_bool, check_choice, check_int

__all__ = ["Shapes", "shapes", "dtypes", "attention_inputs", "masks", "document_masks",
           "seeds", "DTYPES", "PORTABLE_DTYPES"]

#: Every input dtype the references accept.
DTYPES = ("float64", "float32", "float16", "bfloat16")
#: The dtypes every framework takes from NumPy (``torch.from_numpy`` has no bfloat16):
#: the default of :func:`dtypes` and :func:`attention_inputs`.
PORTABLE_DTYPES = ("float64", "float32", "float16")


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


def _dtype_names(dtypes, what: str = "dtypes") -> tuple:
    """Checked dtype names from a sequence of names or NumPy / ``ml_dtypes`` types."""
    if isinstance(dtypes, str) or not hasattr(dtypes, "__iter__"):
        raise TypeError(f"{what} must be a sequence of dtype names such as "
                        f"{PORTABLE_DTYPES}, got {dtypes!r}")
    def name(d):
        try:
            return d if isinstance(d, str) else np.dtype(d).name
        except TypeError:
            raise TypeError(f"{what}: {d!r} is not a dtype; use one of {DTYPES}") from None
    names = tuple(check_choice(what, name(d), DTYPES) for d in dtypes)
    if not names:
        raise ValueError(f"{what} must name at least one dtype of {DTYPES}")
    return names


def dtypes(names=PORTABLE_DTYPES) -> st.SearchStrategy:
    """Names of input dtypes, drawn from ``names`` (default :data:`PORTABLE_DTYPES`;
    :data:`DTYPES` adds bfloat16)."""
    return st.sampled_from(_dtype_names(names, "names"))


def seeds() -> st.SearchStrategy:
    return st.integers(0, 2**32 - 1)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


def attention_inputs(shape_strategy=None, *, dtype=None, dtypes=None,
                     logit_scale=None) -> st.SearchStrategy:
    """``(q, k, v)`` NumPy arrays ``(*batch, hq, n, d)``, ``(*batch, hkv, m, d)``,
    ``(*batch, hkv, m, dv)`` of shapes drawn from ``shape_strategy`` (default
    :func:`shapes`), standard normal; ``q`` and ``k`` times a spread drawn from
    ``(0.1, 1, 3)`` or given as ``logit_scale`` (logits of order ``spread**2``).

    ``dtype``: one dtype name for all three; else one drawn per example from ``dtypes``
    (default :data:`PORTABLE_DTYPES`, which ``torch.from_numpy`` takes; add
    ``"bfloat16"`` to draw ``ml_dtypes.bfloat16`` arrays too).
    """
    if dtype is not None and dtypes is not None:
        raise ValueError(f"give dtype= (one dtype) or dtypes= (names to draw from), not "
                         f"both; got dtype={dtype!r}, dtypes={dtypes!r}")
    if dtype is not None:
        names = _dtype_names([dtype], "dtype")
    else:
        names = _dtype_names(PORTABLE_DTYPES if dtypes is None else dtypes)
    shape_strategy = shapes() if shape_strategy is None else shape_strategy

    @st.composite
    def draw_inputs(draw):
        sh = draw(shape_strategy)
        dt = draw(st.sampled_from(names))
        spread = draw(st.sampled_from((0.1, 1.0, 3.0))) if logit_scale is None \
            else logit_scale
        rng = np.random.default_rng(draw(seeds()))
        q = rng.standard_normal(sh.batch + (sh.hq, sh.n, sh.d)) * spread
        k = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.d)) * spread
        v = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.dv))
        return _cast(q, dt), _cast(k, dt), _cast(v, dt)
    return draw_inputs()


def _any_length_kinds(scale: int) -> list:
    """Mask strategies whose masks are valid for every ``N`` and ``M``; ``scale`` sizes
    the drawn positions and widths."""
    small = st.integers(0, scale)
    return [
        st.builds(mask_kinds.causal, st.sampled_from(("bottom_right", "top_left"))),
        st.builds(mask_kinds.sliding_window, small, st.integers(0, 5), st.integers(1, 4)),
        st.builds(mask_kinds.sinks, st.integers(0, 6)),
        st.builds(mask_kinds.prefix_lm, small),
        st.builds(mask_kinds.strided, st.integers(1, 6)),
        st.builds(mask_kinds.global_tokens,
                  st.lists(st.integers(0, max(scale - 1, 0)), min_size=1, max_size=4)),
        # BigBird's random blocks: the block grid is drawn for each key length
        st.builds(lambda c, bs, s: mask_kinds.random_blocks(c, bs, s),
                  st.integers(0, 3), st.integers(1, 8), seeds()),
        st.builds(mask_kinds.block_window, st.integers(0, 3), st.integers(1, 8)),
        st.builds(mask_kinds.fixed, st.integers(4, 8), st.integers(0, 4)),
        st.builds(mask_kinds.chunks, st.integers(1, 8), st.integers(0, 10)),
        st.builds(lambda left, dils: mask_kinds.sliding_window(left, dilation=dils), small,
                  st.lists(st.integers(1, 4), min_size=1, max_size=3)),
    ]


def _fixed_layouts(m: int) -> st.SearchStrategy:
    """Fixed block layouts covering ``m`` keys (and the queries aligned to them), some
    with spare blocks."""
    def layout(bs, extra, seed):
        blocks = -(-m // bs) + extra
        return mask_kinds.block_layout(np.random.default_rng(seed).random((blocks,) * 2)
                                       < 0.5, bs)
    return st.builds(layout, st.integers(1, 8), st.integers(0, 2), seeds())


def masks(n=None, m=None, *, max_len: int = 40, compose: bool = True) -> st.SearchStrategy:
    """Masks of every kind in :mod:`refattn.masks`, some composed with ``& | ~``.

    ``masks()``: masks valid for **any** ``n`` queries and ``m`` keys, to pair with
    independently drawn shapes; ``max_len`` only sizes the drawn positions and widths
    (windows, prefixes, global tokens), it does not bound the lengths. ``masks(n, m)``:
    masks for those lengths, adding the kinds sized by them (fixed block layouts covering
    ``m`` keys, and :func:`document_masks`); positions and widths then scale with
    ``max(n, m)``. ``compose=False`` draws single masks only.
    """
    if (n is None) != (m is None):
        raise ValueError(f"masks takes both lengths or neither; got n={n!r}, m={m!r}")
    max_len = check_int("max_len", max_len, minimum=1)
    compose = check_bool("compose", compose)
    if n is None:
        kinds = _any_length_kinds(max_len)
    else:
        n, m = check_int("n", n, minimum=1), check_int("m", m, minimum=1)
        kinds = _any_length_kinds(max(n, m)) + [_fixed_layouts(m), document_masks(n, m)]
    base = st.one_of(kinds)
    if not compose:
        return base
    return st.recursive(base, lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner)), max_leaves=3)


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
