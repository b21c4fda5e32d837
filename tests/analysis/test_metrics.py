"""Error measures: definitions on hand-computed cases, invariants, zero handling."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from refattn.analysis import metrics as M


def _rows(draw_shape=(3, 5)):
    return hnp.arrays(np.float64, draw_shape, elements=st.floats(0, 1, allow_subnormal=False))


def _normalize(a):
    a = a + 1e-3
    return a / a.sum(-1, keepdims=True)


def test_hand_values():
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.25, 0.5]])
    np.testing.assert_allclose(M.kl_divergence(p, q), [np.log(2)], rtol=1e-15)
    np.testing.assert_allclose(M.total_variation(p, q), [0.5], rtol=1e-15)
    np.testing.assert_allclose(M.attention_entropy(q), [1.5 * np.log(2)],
                               rtol=1e-15)
    assert M.max_abs_error([[1.0, -2.0]], [[0.0, 1.0]]) == 3.0
    assert M.relative_frobenius([3.0, 4.0], [0.0, 0.0]) == np.inf
    assert M.relative_frobenius([0.0], [0.0]) == 0.0


def test_kl_zero_handling():
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.3, 0.7]])
    kl = M.kl_divergence(p, q)
    assert kl[0] == 0.0                # 0 ln(0/0) = 0
    assert kl[1] == np.inf             # q = 0 < p: a missed key
    assert kl[2] == 0.0                # fully masked exact row
    with pytest.raises(ValueError, match="negative"):
        M.kl_divergence(p, -q)


@given(hnp.arrays(np.float64, (3, 6), elements=st.floats(0, 1)),
       hnp.arrays(np.float64, (3, 6), elements=st.floats(0, 1)))
def test_divergence_properties(a, b):
    p, q = _normalize(a), _normalize(b)
    kl, tv = M.kl_divergence(p, q), M.total_variation(p, q)
    assert (kl >= -1e-12).all() and (tv >= 0).all() and (tv <= 1 + 1e-12).all()
    assert (tv ** 2 * 2 <= kl + 1e-9).all()                       # Pinsker
    np.testing.assert_allclose(M.kl_divergence(p, p), 0, atol=1e-15)
    h = M.attention_entropy(p)
    assert ((h >= -1e-15) & (h <= np.log(6) + 1e-12)).all()
    # KL(p || uniform) = ln M - H(p)
    np.testing.assert_allclose(M.kl_divergence(p, np.full_like(p, 1 / 6)),
                               np.log(6) - h, atol=1e-12)


@given(hnp.arrays(np.float64, (4, 3), elements=st.floats(-10, 10, allow_subnormal=False)),
       st.floats(0.1, 10))
def test_cosine_invariances(a, c):
    """Scaling a row keeps its direction (rows of normal numbers: a subnormal row times
    0.5 can round to the zero vector, whose cosine with a nonzero row is 0)."""
    cos = M.cosine_similarity(c * a, a)
    nz = (a != 0).any(axis=-1)
    np.testing.assert_allclose(cos[nz], 1.0, rtol=1e-12)
    assert (cos[~nz] == 1.0).all()
    assert (np.abs(M.cosine_similarity(-a, a)[nz] + 1) < 1e-12).all()


def test_shape_mismatch_names_both_shapes():
    for fn in (M.relative_frobenius, M.max_abs_error, M.cosine_similarity):
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
            fn(np.ones((2, 3)), np.ones((3, 2)))
    for fn in (M.kl_divergence, M.total_variation):
        with pytest.raises(ValueError, match=r"p \(2, 3\) and q \(2, 4\)"):
            fn(np.ones((2, 3)) / 3, np.ones((2, 4)) / 4)


_MODERATE = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))


@given(hnp.arrays(np.float64, (3, 4), elements=_MODERATE),
       hnp.arrays(np.float64, (3, 4), elements=_MODERATE),
       st.sampled_from([1e-200, 1e-5, 1.0, 1e200]))
def test_relative_frobenius_scale_invariant(a, b, c):
    ref = M.relative_frobenius(a, b)
    if np.isfinite(ref):
        np.testing.assert_allclose(M.relative_frobenius(c * a, c * b), ref, rtol=1e-12)
