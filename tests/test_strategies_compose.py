"""refattn.testing.strategies compose without hidden couplings: masks drawn without
lengths hold for any lengths, masks drawn for given lengths include the kinds sized by
them, and the default dtypes are the ones every framework takes."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings, strategies as st
from hypothesis.errors import NoSuchExample

import refattn as ra
from refattn.testing import strategies as rst

torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(rst.attention_inputs())
def test_default_inputs_go_straight_to_torch_from_numpy(inputs):
    """float64/float32/float16 by default: torch takes them as they are, and its SDPA on
    them (in float64) agrees with refattn."""
    q, k, v = inputs
    assert {x.dtype.name for x in inputs} <= set(rst.PORTABLE_DTYPES)
    assert len({x.dtype for x in inputs}) == 1
    tq, tk, tv = (torch.from_numpy(x) for x in inputs)
    assert all(np.array_equal(t.numpy(), x) for t, x in zip((tq, tk, tv), inputs))
    flat = [t.double().reshape((math.prod(t.shape[:-3]),) + t.shape[-3:])
            for t in (tq, tk, tv)]
    out = torch.nn.functional.scaled_dot_product_attention(
        *flat, enable_gqa=q.shape[-3] != k.shape[-3])
    ra.testing.assert_close(out.reshape(q.shape[:-1] + v.shape[-1:]).numpy(),
                            ra.attention(q, k, v), dtype="float64")


def test_bfloat16_is_drawn_only_when_asked_for():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    drawn = find(rst.attention_inputs(dtypes=rst.DTYPES), lambda x: x[0].dtype == bf16,
                 settings=settings(max_examples=500, database=None))
    assert all(x.dtype == bf16 for x in drawn)
    q, _, _ = find(rst.attention_inputs(dtype="bfloat16"), lambda x: True)
    assert q.dtype == bf16
    assert find(rst.dtypes(rst.DTYPES), lambda name: name == "bfloat16") == "bfloat16"


@SETTINGS
@given(rst.attention_inputs(dtypes=("float16", ml_dtypes.bfloat16)), rst.dtypes())
def test_dtypes_argument_limits_the_draw(inputs, name):
    assert inputs[0].dtype.name in ("float16", "bfloat16")
    assert name in rst.PORTABLE_DTYPES


@SETTINGS
@given(rst.masks(max_len=10), rst.shapes(max_len=120, max_batch_dims=1, max_dim=4),
       rst.seeds())
def test_a_mask_pairs_with_shapes_of_a_different_max_len(mask, sh, seed):
    """A mask drawn with max_len=10 on lengths up to 120 (a block layout sized for 10
    would have raised): attention with the mask equals attention with its materialized
    boolean array."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(sh.batch + (sh.hq, sh.n, sh.d))
    k = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.d))
    v = rng.standard_normal(sh.batch + (sh.hkv, sh.m, sh.dv))
    keep = np.stack([mask.materialize(sh.n, sh.m, h=h) for h in range(sh.hq)])
    np.testing.assert_array_equal(ra.attention(q, k, v, mask=mask),
                                  ra.attention(q, k, v, mask=keep))


@SETTINGS
@given(rst.masks(max_len=200), st.integers(1, 300), st.integers(1, 300),
       st.integers(1, 64), st.integers(1, 64))
def test_masks_without_lengths_hold_for_any_lengths(mask, n, m, bq, bk):
    keep = mask.materialize(n, m)
    assert keep.shape == (n, m) and keep.dtype == bool
    labels = mask.classify_tiles(n, m, bq, bk)
    assert labels.shape == (-(-n // bq), -(-m // bk))


@SETTINGS
@given(st.data(), rst.shapes(max_len=50))
def test_masks_for_given_lengths_fit_them(data, sh):
    mask = data.draw(rst.masks(sh.n, sh.m))
    assert mask.materialize(sh.n, sh.m).shape == (sh.n, sh.m)
    mask.classify_tiles(sh.n, sh.m, 8, 8)


@pytest.mark.parametrize("n, m", [(7, 30), (30, 7)])
def test_masks_for_given_lengths_include_block_layouts_and_documents(n, m):
    single = rst.masks(n, m, compose=False)
    layout = find(single, lambda mk: mk.name.startswith("block_layout"))
    assert layout.materialize(n, m).shape == (n, m)
    document = find(single, lambda mk: mk.name.startswith("document"))
    assert document.materialize(n, m).shape == (n, m)


def test_masks_without_lengths_draw_no_length_bound_kind():
    with pytest.raises(NoSuchExample):
        find(rst.masks(compose=False),
             lambda mk: mk.name.startswith(("block_layout", "document")),
             settings=settings(max_examples=300, database=None))


@pytest.mark.parametrize("make, error, message", [
    (lambda: rst.masks(5), ValueError, "both lengths or neither"),
    (lambda: rst.masks(0, 3), ValueError, "n must be an integer >= 1"),
    (lambda: rst.masks(max_len=0), ValueError, "max_len must be an integer >= 1"),
    (lambda: rst.attention_inputs(dtype="float32", dtypes=rst.DTYPES), ValueError,
     "not both"),
    (lambda: rst.attention_inputs(dtypes=("float32", "int8")), ValueError,
     "dtypes must be one of"),
    (lambda: rst.attention_inputs(dtypes="float32"), TypeError, "sequence of dtype names"),
    (lambda: rst.attention_inputs(dtypes=()), ValueError, "at least one dtype"),
    (lambda: rst.attention_inputs(dtype="bf16"), ValueError, "dtype must be one of"),
    (lambda: rst.dtypes(["float32", object()]), TypeError, "is not a dtype"),
])
def test_bad_arguments_fail_when_the_strategy_is_built(make, error, message):
    with pytest.raises(error, match=message):
        make()
