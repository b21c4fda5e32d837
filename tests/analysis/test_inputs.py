"""Synthetic input generators: shapes, seeding, and the property each one controls."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.analysis import inputs
from refattn.analysis.metrics import attention_entropy
from refattn.analysis.spectrum import numerical_rank


@pytest.mark.parametrize("kind", sorted(inputs.GENERATORS))
def test_shapes_dtype_and_seeding(kind):
    a = inputs.generate(kind, 12, 6, rng=3, batch=2, heads=3)
    b = inputs.generate(kind, 12, 6, rng=np.random.default_rng(3), batch=2, heads=3)
    c = inputs.generate(kind, 12, 6, rng=4, batch=2, heads=3)
    for x, y, z in zip(a, b, c):
        assert x.shape == (2, 3, 12, 6) and x.dtype == np.float64
        assert np.array_equal(x, y)           # int seed == Generator with that seed
        assert not np.array_equal(x, z)


@pytest.mark.parametrize("kind", sorted(inputs.GENERATORS))
def test_rng_is_required(kind):
    with pytest.raises(TypeError, match="rng"):
        inputs.GENERATORS[kind](8, 4, rng=None, **inputs.DEFAULTS[kind])


def test_temperature_orders_entropy():
    """Lower temperature, lower mean attention entropy; the limits 0 and ln N."""
    temps = [0.05, 0.3, 1.0, 3.0, 30.0]
    ent = [attention_entropy(ra.attention_probs(*inputs.temperature(
        128, 32, temperature=t, rng=0, heads=2)[:2])).mean() for t in temps]
    assert all(a < b for a, b in zip(ent, ent[1:]))
    assert ent[0] < 0.5
    assert np.log(128) - ent[-1] < 0.01


def test_temperature_scales_logits():
    q1, k1, v1 = inputs.temperature(16, 4, temperature=1.0, rng=5)
    q2, k2, v2 = inputs.temperature(16, 4, temperature=0.25, rng=5)
    np.testing.assert_allclose(q2 @ np.swapaxes(k2, -1, -2),
                               4 * (q1 @ np.swapaxes(k1, -1, -2)), rtol=1e-13)
    assert np.array_equal(v1, v2)


def test_clustered_block_structure():
    """Each query puts most of its weight on keys of its own cluster: with spread 0
    queries/keys equal centres; compare same-centre weight with a random baseline."""
    q, k, _ = inputs.clustered(200, 32, clusters=4, spread=0.1, rng=2)
    p = ra.attention_probs(q, k)[0, 0]
    # cluster of each token = nearest centre; recover by rounding distances
    same = np.linalg.norm(q[0, 0][:, None] - k[0, 0][None], axis=-1) < 2.0
    assert (p * same).sum(axis=1).mean() > 0.95
    assert same.mean() < 0.5


@given(n=st.integers(1, 30), d=st.integers(1, 12), r=st.integers(1, 12))
def test_low_rank_logit_rank(n, d, r):
    if r > d:
        with pytest.raises(ValueError, match="rank"):
            inputs.low_rank(n, d, rank=r, rng=0)
        return
    q, k, _ = inputs.low_rank(n, d, rank=r, rng=0)
    s = q[0, 0] @ k[0, 0].T
    assert numerical_rank(s, tol=1e-9 * max(1.0, np.abs(s).max())) == min(r, n)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        inputs.temperature(4, 4, temperature=0.0, rng=0)
    with pytest.raises(ValueError, match="spread"):
        inputs.clustered(4, 4, clusters=2, spread=-1.0, rng=0)
    with pytest.raises(ValueError, match="n must be"):
        inputs.low_rank(0, 4, rank=1, rng=0)
    with pytest.raises(ValueError, match="known kinds"):
        inputs.generate("nope", 4, 4, rng=0)
