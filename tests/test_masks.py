"""Mask semantics, composition, tile classification and errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.masks import EMPTY, FULL
from refattn.testing import strategies as rst


def test_sliding_window_counts_positions():
    keep = ra.masks.sliding_window(3).materialize(8, 8)
    assert keep.sum(1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4]
    keep = ra.masks.sliding_window(2, right=1).materialize(5, 5)
    assert keep[2].tolist() == [True, True, True, True, False]
    keep = ra.masks.sliding_window(6, dilation=3).materialize(8, 8)
    assert np.flatnonzero(keep[7]).tolist() == [1, 4, 7]


def test_bottom_right_and_top_left_alignment():
    br = ra.masks.causal().materialize(2, 5)
    assert br.sum(1).tolist() == [4, 5]
    tl = ra.masks.causal(align="top_left").materialize(2, 5)
    assert tl.sum(1).tolist() == [1, 2]
    win = ra.masks.sliding_window(1).materialize(2, 5)
    assert np.flatnonzero(win[0]).tolist() == [2, 3]


def test_kinds_by_definition():
    n = 10
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    np.testing.assert_array_equal(ra.masks.sinks(2).materialize(n, n),
                                  np.broadcast_to(j < 2, (n, n)))
    np.testing.assert_array_equal(ra.masks.prefix_lm(4).materialize(n, n), (j < 4) | (j <= i))
    np.testing.assert_array_equal(ra.masks.strided(3).materialize(n, n), (i - j) % 3 == 0)
    np.testing.assert_array_equal(ra.masks.global_tokens([0, 5]).materialize(n, n),
                                  np.isin(i, [0, 5]) | np.isin(j, [0, 5]))
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(ra.masks.document(ids).materialize(n, n),
                                  ids[:, None] == ids[None, :])
    layout = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
    np.testing.assert_array_equal(ra.masks.block_layout(layout, 4).materialize(n, n),
                                  layout[i // 4, j // 4])
    np.testing.assert_array_equal(ra.masks.chunks(4).materialize(n, n), i // 4 == j // 4)
    np.testing.assert_array_equal(ra.masks.chunks(4, overlap=2).materialize(n, n),
                                  (i // 4 == j // 4) | ((j < i // 4 * 4) & (j >= i // 4 * 4 - 2)))


def test_random_blocks_reproducible_and_counted():
    a = ra.masks.random_blocks(2, 4, rng=7)
    b = ra.masks.random_blocks(2, 4, rng=7)
    np.testing.assert_array_equal(a.materialize(32, 32), b.materialize(32, 32))
    layout = a.layout(32)
    assert layout.shape == (8, 8) and (layout.sum(1) == 2).all()
    gen = np.random.default_rng(3)
    c = ra.masks.random_blocks(2, 4, rng=gen)
    np.testing.assert_array_equal(c.materialize(32, 32), c.materialize(32, 32))


def test_composition_and_names():
    m = (ra.masks.causal() & ra.masks.sliding_window(4)) | ra.masks.sinks(2)
    assert repr(m) == "(causal() & sliding_window(4)) | sinks(2)"
    assert repr(~ra.masks.sinks(1)) == "~sinks(1)"
    expected = (ra.masks.causal().materialize(9, 9) & ra.masks.sliding_window(4).materialize(
        9, 9)) | ra.masks.sinks(2).materialize(9, 9)
    np.testing.assert_array_equal(m.materialize(9, 9), expected)
    np.testing.assert_array_equal((~m).materialize(9, 9), ~expected)
    plain = ra.masks.causal() & (lambda b, h, q, kv: (q + kv) % 2 == 0)
    assert not plain.analytic
    np.testing.assert_array_equal(plain.materialize(5, 5), np.tril(
        (np.arange(5)[:, None] + np.arange(5)) % 2 == 0))


def test_flexattention_signature_and_bind():
    m = ra.masks.causal()
    assert bool(m(0, 0, 3, 3)) and not bool(m(0, 0, 2, 3))
    bound = m.bind(2, 5)  # query 0 sits at position 3
    assert bool(bound(0, 0, 0, 3)) and not bool(bound(0, 0, 0, 4))
    assert bound.materialize(2, 5).sum() == 9


@given(st.data(), st.integers(1, 40), st.integers(1, 40), st.integers(1, 9),
       st.integers(1, 9))
def test_tile_labels_agree_with_materialized_mask(data, n, m, bq, bk):
    """EMPTY tiles keep nothing, FULL tiles keep everything (PARTIAL may be either), for
    every head of head-dependent masks."""
    mask = data.draw(rst.masks(n, m))       # every kind, block layouts sized for m too
    labels = mask.classify_tiles(n, m, bq, bk)
    assert labels.shape == (-(-n // bq), -(-m // bk))
    for h in range(3):
        keep = mask.materialize(n, m, h=h)
        for (a, b), label in np.ndenumerate(labels):
            tile = keep[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
            if label == EMPTY:
                assert not tile.any(), (mask, h, a, b)
            elif label == FULL:
                assert tile.all(), (mask, h, a, b)


@given(st.data(), st.integers(1, 30), st.integers(1, 30), st.integers(1, 7),
       st.integers(1, 7))
def test_document_tile_labels(data, n, m, bq, bk):
    mask = data.draw(rst.document_masks(n, m))
    keep = mask.materialize(n, m)
    for (a, b), label in np.ndenumerate(mask.classify_tiles(n, m, bq, bk)):
        tile = keep[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
        assert (label != EMPTY or not tile.any()) and (label != FULL or tile.all())


def test_analytic_labels_are_tight_for_bands():
    """For the primitive masks the O(tiles) labels equal labels from evaluation."""
    np.testing.assert_array_equal(ra.masks.causal().classify_tiles(8, 8, 4, 4),
                                  [[1, 0], [2, 1]])
    for mask in (ra.masks.causal(), ra.masks.sliding_window(3, right=2), ra.masks.sinks(5),
                 ra.masks.global_tokens([3, 17]), ra.masks.chunks(5, 3), ra.masks.chunks(4),
                 ra.masks.block_layout(
                     np.random.default_rng(0).random((6, 6)) < 0.5, 4)):
        for n, m in ((23, 23), (9, 23)):
            exact = ra.masks.from_function(mask.bind(n, m)).classify_tiles(n, m, 4, 3)
            np.testing.assert_array_equal(mask.classify_tiles(n, m, 4, 3), exact,
                                          err_msg=repr(mask))


@pytest.mark.parametrize("make, message", [
    (lambda: ra.masks.sliding_window(-1), "left must be an integer >= 0"),
    (lambda: ra.masks.sliding_window(2, dilation=0), "dilation must be an integer >= 1"),
    (lambda: ra.masks.causal(align="top"), "align must be one of"),
    (lambda: ra.masks.block_layout(np.ones((2, 2)), 4), "2-D boolean array"),
    (lambda: ra.masks.global_tokens([-1]), "non-negative integer"),
    (lambda: ra.masks.document(np.zeros((2, 2), int)), "1-D integer array"),
    (lambda: ra.masks.random_blocks(1, 4, rng="x"), "rng must be"),
    (lambda: ra.masks.as_mask("causal"), "mask must be a refattn mask"),
])
def test_bad_arguments_name_themselves(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_length_mismatches_are_reported():
    with pytest.raises(ValueError, match="covers 8 query and 8 key positions; M=10"):
        ra.masks.block_layout(np.ones((2, 2), bool), 4).materialize(10, 10)
    with pytest.raises(ValueError, match="document ids have length 3 but there are M=4"):
        ra.masks.document([0, 0, 1]).materialize(4, 4)
    q = np.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="does not broadcast to M=4"):
        ra.attention(q, q, q, mask=np.ones((4, 3), bool))
    with pytest.raises(TypeError, match="mask_mod must return booleans"):
        ra.attention(q, q, q, mask=lambda b, h, i, j: i - j)


@given(st.data(), st.integers(1, 40), st.integers(1, 40), st.integers(1, 9),
       st.integers(1, 9), st.integers(1, 5))
def test_strips_and_tile_lists_agree_with_the_full_grid(data, n, m, bq, bk, strip):
    mask = data.draw(rst.masks(n, m))
    full = mask.classify_tiles(n, m, bq, bk)
    for r0 in range(0, full.shape[0], 2):
        np.testing.assert_array_equal(mask.classify_tiles(n, m, bq, bk, rows=slice(r0, r0 + 2)),
                                      full[r0:r0 + 2])
    indptr, key_tiles, labels = mask.tile_lists(n, m, bq, bk, strip_elements=strip)
    rows, cols = np.nonzero(full)
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(
        np.bincount(rows, minlength=full.shape[0]))]))
    np.testing.assert_array_equal(key_tiles, cols)
    np.testing.assert_array_equal(labels, full[rows, cols])


def test_per_head_dilations_classify_soundly():
    """Regression: a tile is empty only if empty for every head's dilation (found by
    hypothesis: distance 3 is a multiple of 3, not of 2)."""
    mask = ra.masks.sliding_window(3, dilation=[3, 2])
    labels = mask.classify_tiles(4, 4, 1, 1)
    assert labels[3, 0] != EMPTY and mask.materialize(4, 4, h=0)[3, 0]
    for h in (0, 1):
        keep = mask.materialize(9, 9, h=h)
        labels = mask.classify_tiles(9, 9, 2, 3)
        for (a, b), label in np.ndenumerate(labels):
            tile = keep[a * 2:(a + 1) * 2, b * 3:(b + 1) * 3]
            assert (label != EMPTY or not tile.any()) and (label != FULL or tile.all())
