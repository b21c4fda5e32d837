"""Work per query counted from the definitions (refattn.analysis.work), and state sizes
in a model's dtype (refattn.analysis.state_sizes)."""
import numpy as np
import pytest

import refattn as ra
from refattn.analysis.state_sizes import DTYPE_BYTES, state_sizes
from refattn.analysis.work import FORMULAS, describe, work_per_query


def test_mask_mechanisms_count_the_kept_pairs_of_their_pattern():
    spec = ra.mechanisms()["sliding_window_attention"]
    n = 64
    params = spec.budget(n, 16)
    kept = spec.mask(**params).materialize(n, n).sum() / n
    assert work_per_query("sliding_window_attention", params, n, 32) == kept
    # interior rows keep 17 keys, the edges fewer: the count sees it
    assert 14 < kept < 17
    assert describe("sliding_window_attention") == "kept pairs of its mask"


def test_formulas_follow_the_definitions():
    n, d = 512, 32
    assert work_per_query("attention", {}, n, d) == n
    want = (n * d + 64 * d) / (2 * d)                 # scores every key, sums 64 values
    assert work_per_query("topk_attention", {"topk": 64}, n, d) == want
    assert work_per_query("strided_kv_attention", {"stride": 8}, n, d) == n / 8
    assert work_per_query("linformer_attention", {"rank": 16}, n, d) == 32
    # Nyström's pseudo-inverse makes large landmark counts superlinear
    small = work_per_query("nystrom_attention", {"num_landmarks": 16}, n, d)
    big = work_per_query("nystrom_attention", {"num_landmarks": 128}, n, d)
    assert big / small > 8 * 2
    # the call's defaults enter (k-means iterations)
    assert work_per_query("kmeans_kv_attention", {"n_centroids": 8, "n_iters": 20}, n, d) \
        > work_per_query("kmeans_kv_attention", {"n_centroids": 8}, n, d)


def test_every_counted_budgeted_mechanism_costs_a_positive_finite_work():
    for name, spec in ra.mechanisms().items():
        if spec.budget is None or not (name in FORMULAS or spec.mask is not None):
            continue
        for b in (8, 64):
            w = work_per_query(name, spec.budget(256, b), 256, 32)
            assert np.isfinite(w) and 0 < w <= 4 * 256, (name, b, w)


def test_a_mechanism_without_formula_or_mask_is_not_counted():
    assert np.isnan(work_per_query("retention", {"gamma": 0.9}, 64, 8))
    assert describe("retention") == "not counted"
    with pytest.raises(ValueError, match="unknown mechanism"):
        work_per_query("flash", {}, 8, 8)


def test_state_sizes_scale_with_the_storage_dtype():
    f64 = state_sizes((1000,), dtype="f64", heads_q=8, heads_kv=2, d=16)
    for dtype, size in DTYPE_BYTES.items():
        t = state_sizes((1000,), dtype=dtype, heads_q=8, heads_kv=2, d=16)
        for name in ("attention", "attention_mha", "attention_mqa", "mla_attention"):
            assert t[name][1000] * 8 == f64[name][1000] * size
    bf16 = state_sizes((1000,), dtype="bf16", heads_q=8, heads_kv=2, d=16)
    assert bf16["attention"][1000] == 2 * 1000 * 2 * 16 * 2       # K and V, 2 bytes
    assert bf16["mla_attention"][1000] == 1000 * 576 * 2
    with pytest.raises(ValueError, match="dtype must be one of"):
        state_sizes((1000,), dtype="int4")
