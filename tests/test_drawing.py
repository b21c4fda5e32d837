"""Mask pictures show what the mask keeps."""
import numpy as np
import pytest

import refattn as ra
from refattn.drawing import draw_mask, parse_mask


def test_picture_shows_the_kept_pairs():
    mask = ra.masks.causal() & ra.masks.sliding_window(3)
    fig = draw_mask(mask, 12, 16, block=4)
    ax = fig.axes[0]
    shade, kept = ax.images
    np.testing.assert_array_equal(~kept.get_array().mask, mask.materialize(12, 16))
    labels = mask.classify_tiles(12, 16, 4, 4)
    np.testing.assert_array_equal(shade.get_array()[::4, ::4], labels)
    assert "causal() & sliding_window(3)" in ax.get_title()


def test_parse_mask_and_limits():
    assert repr(parse_mask("sinks(4) | sliding_window(8, dilation=2)")) == \
        "sinks(4) | sliding_window(8, dilation=2)"
    with pytest.raises(ValueError, match="not a mask"):
        parse_mask("np.ones(3)")
    with pytest.raises(ValueError, match="at most 4096"):
        draw_mask(ra.masks.causal(), 5000)
