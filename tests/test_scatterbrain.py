"""Scatterbrain: low-rank plus exact sparse correction, against its parts and limits."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.performer import performer_attention
from refattn.scatterbrain import scatterbrain_attention, scatterbrain_attention_matrix
from refattn.testing import strategies as rst
from refattn.topk import topk_attention


@given(rst.attention_inputs(dtype="float64"), st.sampled_from(["positive", "hyperbolic"]))
def test_full_support_is_exact_attention(inputs, kernel):
    q, k, v = inputs
    out = scatterbrain_attention(q, k, v, num_features=3, topk=k.shape[-2], kernel=kernel,
                                 rng=0)
    np.testing.assert_allclose(out, ra.attention(q, k, v), rtol=1e-10, atol=1e-12)


@given(rst.attention_inputs(dtype="float64"), st.sampled_from(["topk", "lsh"]),
       st.integers(1, 6), st.integers(1, 3))
def test_fast_form_equals_the_dense_matrix_form(inputs, support, topk, rounds):
    q, k, v = inputs
    kw = dict(num_features=8, support=support, rng=3, block_q=5,
              **({"topk": topk} if support == "topk" else {"n_buckets": 4, "n_hashes": rounds}))
    a = scatterbrain_attention_matrix(q, k, **kw)
    assert (a >= 0).all()
    group = q.shape[-3] // k.shape[-3]
    np.testing.assert_allclose(scatterbrain_attention(q, k, v, **kw),
                               a @ np.repeat(v, group, axis=-3), rtol=1e-10, atol=1e-12)


def test_exact_on_the_support_low_rank_elsewhere(rng):
    q, k, v = rng.standard_normal((3, 1, 12, 4))
    a = scatterbrain_attention_matrix(q, k, num_features=64, topk=3, rng=5)[0]
    exact = ra.attention_probs(q, k)[0]
    top = np.argsort(-(q[0] @ k[0].T), axis=-1)[:, :3]
    rows = np.arange(12)[:, None]
    # on the support the weights are the exact kernel up to the row's normalizer
    ratio = a[rows, top] / exact[rows, top]
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, 1), rtol=1e-12)


def _mean_errors(sigma, seeds=12, n=256, d=16, m=32, topk=16):
    errs = np.zeros(3)
    for seed in range(seeds):
        r = np.random.default_rng(seed)
        q, k, v = r.standard_normal((3, 4, n, d)) * [[[[sigma]]], [[[sigma]]], [[[1.0]]]]
        exact = ra.attention(q, k, v)
        for i, out in enumerate((scatterbrain_attention(q, k, v, num_features=m, topk=topk,
                                                        rng=seed),
                                 performer_attention(q, k, v, num_features=m, rng=seed),
                                 topk_attention(q, k, v, topk=topk))):
            errs[i] += np.linalg.norm(out - exact) / np.linalg.norm(exact) / seeds
    return errs


@pytest.mark.parametrize("sigma", [1.0, 1.1, 1.2])
def test_beats_both_parts_at_mid_entropy(sigma):
    """Where neither part dominates (mean attention entropy 4.6-5.1 nats of ln 256 =
    5.5), the combination is more accurate than either alone, on average over seeds; the
    low-rank part uses the very same features (same rng)."""
    r = np.random.default_rng(0)
    q, k = r.standard_normal((2, 4, 256, 16)) * sigma
    p = ra.attention_probs(q, k)
    entropy = -(p * np.log(p)).sum(-1).mean()
    assert 4.5 < entropy < 5.2
    scatter, lowrank, sparse = _mean_errors(sigma)
    assert scatter < min(lowrank, sparse), (scatter, lowrank, sparse)


def test_sparse_part_wins_at_low_entropy_and_combination_tracks_it():
    """At low entropy (sigma = 3) top-k alone is near exact and Scatterbrain matches it."""
    scatter, lowrank, sparse = _mean_errors(3.0, seeds=4)
    assert sparse < 0.01 and scatter < 2 * sparse + 1e-3 and lowrank > 0.5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_features=4, topk=2, kernel="trigonometric"), ValueError, "positive features"),
    (dict(num_features=4, topk=0), ValueError, "topk must be an integer >= 1"),
    (dict(num_features=4, support="lsh", n_buckets=3), ValueError, "n_buckets"),
    (dict(num_features=4, support="window", topk=2), ValueError, "support must be one of"),
    (dict(num_features=0, topk=2), ValueError, "num_features"),
])
def test_bad_arguments(kwargs, error, message):
    q = np.zeros((1, 6, 4))
    with pytest.raises(error, match=message):
        scatterbrain_attention(q, q, q, rng=0, **kwargs)
