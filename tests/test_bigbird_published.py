"""BigBird as published (Zaheer et al. 2020; HuggingFace's BigBirdBlockSparseAttention):
first and last blocks global, random blocks per head that avoid the window and global
blocks, given random blocks reproducing a model's pattern, tiles classified over heads."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.masks.layouts import bigbird_layout
from refattn.testing import max_rel_error

SPEC = ra.mechanisms()["bigbird_attention"]


def _blocks(mask, m, h, block_size):
    """The kept key blocks of each block row of head ``h`` (from the element mask)."""
    keep = mask.materialize(m, m, h=h)[::block_size, ::block_size]
    return [set(np.flatnonzero(row)) for row in keep]


@pytest.mark.parametrize("nb, w, r", [(12, 1, 2), (9, 2, 1), (20, 1, 3), (8, 0, 3),
                                      (7, 0, 5)])
def test_first_and_last_blocks_global_and_random_blocks_new_per_head(nb, w, r):
    b, heads = 3, 4
    mask = bigbird_layout(b, window_blocks=w, random_blocks=r, rng=5, heads=heads)
    layouts = [_blocks(mask, nb * b, h, b) for h in range(heads)]
    choice = False                  # some row has more blocks left than it draws
    for h, rows in enumerate(layouts):
        assert rows[0] == rows[-1] == set(range(nb))          # global query blocks
        for i, kept in enumerate(rows[1:-1], start=1):
            fixed = {0, nb - 1} | set(range(max(0, i - w), min(nb, i + w + 1)))
            assert fixed <= kept
            # random blocks avoid the window and global blocks: exactly r new ones
            assert len(kept - fixed) == min(r, nb - len(fixed)), (h, i)
            choice |= nb - len(fixed) > r
    assert any(layouts[0] != layouts[h] for h in range(1, heads)) == choice   # per head


def test_heads_draw_independently_of_how_many_there_are():
    small = bigbird_layout(2, rng=np.int64(11), heads=2)
    large = bigbird_layout(2, rng=11, heads=6)
    unknown = bigbird_layout(2, rng=11)
    for h in range(2):
        for other in (large, unknown):
            np.testing.assert_array_equal(small.layout(40, h), other.layout(40, h))
    with pytest.raises(ValueError, match="built for 2 heads; query head 2"):
        small.layout(40, 2)


def test_global_at_start_keeps_the_earlier_layout():
    mask = bigbird_layout(4, window_blocks=1, global_blocks=2, global_at="start",
                          random_blocks=0, rng=0)
    old = ra.masks.block_window(1, 4) | ra.masks.global_tokens(np.arange(8))
    for n, m in ((40, 40), (33, 37)):
        np.testing.assert_array_equal(mask.materialize(n, m, h=3), old.materialize(n, m))


def test_budget_counts_the_kept_blocks():
    """Away from the edges a row keeps (2w + 1) + 2 + r blocks, and the registered budget
    keeps at most the keys it names (no overlap left uncounted)."""
    n = 512
    for budget in (8, 16, 32, 64, 128):
        params = SPEC.budget(n, budget)
        keep = SPEC.mask(**params, rng=0, heads=2).materialize(n, n, h=1)
        per_row = keep.sum(axis=1)
        b = params["block_size"]
        last = n - (-(-n // b) - 1) * b         # the last (global) block may be short
        middle = per_row[2 * b:-2 * b]          # rows whose window touches no global block
        assert (middle == 6 * b + last).all() and 7 * b <= budget


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(1, 14), b=st.integers(1, 4), extra=st.integers(0, 3),
       w=st.integers(0, 2), g=st.integers(0, 2), r=st.integers(0, 3),
       at=st.sampled_from(["ends", "start"]), heads=st.integers(1, 3),
       bq=st.integers(1, 7), bk=st.integers(1, 7), seed=st.integers(0, 99))
def test_tiles_are_classified_over_every_head(nb, b, extra, w, g, r, at, heads, bq, bk,
                                              seed):
    m = max(1, nb * b - extra)
    n = max(1, m - extra)
    mask = bigbird_layout(b, window_blocks=w, global_blocks=g, global_at=at,
                          random_blocks=r, rng=seed, heads=heads)
    keep = np.stack([mask.materialize(n, m, h=h) for h in range(heads)])
    labels = mask.classify_tiles(n, m, bq, bk)
    for a in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            tile = keep[:, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
            if labels[a, c] == ra.masks.EMPTY:
                assert not tile.any()
            elif labels[a, c] == ra.masks.FULL:
                assert tile.all()
            else:
                assert tile.any()      # the union is exact: a partial tile keeps a key
    # without heads every tile may be visited (conservatively), never skipped wrongly
    loose = bigbird_layout(b, window_blocks=w, global_blocks=g, global_at=at,
                           random_blocks=r, rng=seed).classify_tiles(n, m, bq, bk)
    assert ((loose != ra.masks.EMPTY) | (labels == ra.masks.EMPTY)).all()
    assert ((loose != ra.masks.FULL) | (labels == ra.masks.FULL)).all()


@pytest.mark.parametrize("method", ["tiles", "gather"])
def test_per_head_layouts_through_the_engine_and_the_vjp(method):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 45, 6))
    k, v = rng.standard_normal((2, 2, 2, 50, 6))
    params = dict(block_size=5, random_blocks=2, rng=9)
    out, lse = ra.bigbird_attention(q, k, v, **params, method=method, return_lse=True)
    mask = ra.bigbird_attention.mask(**params, heads=4)
    ref, ref_lse = ra.attention(q, k, v, mask=mask, return_lse=True)
    assert max_rel_error(out, ref) <= 1e-12 and max_rel_error(lse, ref_lse) <= 1e-12
    g = rng.standard_normal(out.shape)
    mine = ra.vjp("bigbird_attention", q, k, v, g, **params)
    dense = ra.vjp("attention", q, k, v, g, mask=mask)
    for x in "qkv":
        assert max_rel_error(mine[x], dense[x], normwise=True) <= 1e-12, x
    probs = SPEC.implied_matrix(q, k, **params)
    assert max_rel_error(probs, ra.attention_probs(q, k, mask=mask)) <= 1e-12


def test_given_indices_are_checked():
    x = np.zeros((1, 2, 24, 4))
    good = np.array([[[3, 5], [4, 6], [0, 0]]])
    with pytest.raises(ValueError, match="has 3 block rows; M=24 keys in blocks of 4 give "
                                         "6 blocks, 4 of them not global"):
        ra.bigbird_attention(x, x, x, block_size=4, random_indices=good)
    zeros = np.zeros((2, 4, 2), int)             # HuggingFace's eval mode
    with pytest.raises(ValueError, match=r"random_indices\[0, 0\] = \[0, 0\] \(query block "
                                         r"1\) names a block twice"):
        ra.bigbird_attention(x, x, x, block_size=4, random_indices=zeros)
    clash = np.array([[3, 4], [4, 0], [1, 5], [2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 1\] = \[4, 0\] \(query block 2\) names a "
                                         r"window or global block"):
        ra.bigbird_attention(x, x, x, block_size=4, random_indices=clash)
    with pytest.raises(ValueError, match="is not a key block of 0..5"):
        ra.bigbird_attention(x, x, x, block_size=4, random_indices=[[3, 4], [4, 6],
                                                                       [1, 5], [1, 2]])
    with pytest.raises(ValueError, match="has 3 heads; q .* has Hq=2"):
        ra.bigbird_attention(x, x, x, block_size=4, random_indices=np.zeros((3, 4, 1), int))
    with pytest.raises(TypeError, match="rng .* or random_indices .*, not both"):
        ra.bigbird_attention(x, x, x, block_size=4, rng=0, random_indices=clash)
    with pytest.raises(ValueError, match="random_blocks=1 but random_indices"):
        ra.bigbird_attention(x, x, x, block_size=4, random_blocks=1, random_indices=clash)
    with pytest.raises(ValueError, match="global_at must be one of"):
        ra.bigbird_attention(x, x, x, block_size=4, rng=0, global_at="end")


def test_memory_grows_with_the_kept_blocks():
    """2^18 keys in blocks of 1: the (N/b)² grid would take 2^36 bytes; the CSR rows are
    a few million entries."""
    mask = bigbird_layout(1, rng=0, heads=2)
    shape, indptr, cols = mask.rows(2**18)
    assert shape == (2**18, 2**18) and len(cols) < 12 * 2**18
    per_row = np.diff(indptr)[2:-2]             # 3 window + 2 global + 2 per head
    assert per_row.min() >= 7 and per_row.max() <= 9
    keep = mask.bind(2**18, 2**18)
    i, j = np.array([1000, 1000, 0, 2**18 - 1]), np.array([999, 0, 5000, 7])
    assert keep(0, 1, i, j).all()             # window, global key, global queries


# ------------------------------------------------------------------ HuggingFace's
@pytest.mark.parametrize("b, nb, r, heads, differ", [(4, 12, 2, 3, True),
                                                    (2, 16, 3, 2, True),
                                                    (2, 7, 2, 2, True),
                                                    (3, 6, 1, 2, False)])
def test_reproduces_huggingface_block_sparse_attention(b, nb, r, heads, differ):
    """HF in training mode (its random blocks drawn, dropout none in block-sparse mode),
    float64: its attention probabilities and output from its own rand_attn (HF's plans
    of where to draw: rows of a second plan part draw from the first part, nb = 16; one
    part, nb = 7; every block left taken, nb = 6)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import BigBirdConfig
    from transformers.models.big_bird import modeling_big_bird as hf

    d, n, batch = 5, b * nb, 2
    config = BigBirdConfig(hidden_size=heads * d, num_attention_heads=heads, block_size=b,
                           num_random_blocks=r, attention_type="block_sparse",
                           max_position_embeddings=4 * n)
    torch.manual_seed(0)
    layer = hf.BigBirdBlockSparseAttention(config, seed=3).double().train()
    drawn = []
    draw = layer._bigbird_block_rand_mask_with_head

    def recording(*args, **kwargs):
        drawn.append(np.stack(draw(*args, **kwargs)))
        return drawn[-1]
    layer._bigbird_block_rand_mask_with_head = recording
    hidden = torch.randn(batch, n, heads * d, dtype=torch.float64)
    blocked, band, from_mask, to_mask = hf.BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(batch, n, dtype=torch.float64), b)
    with torch.no_grad():
        context, probs = layer(hidden, band, from_mask, to_mask, blocked, blocked)
        q, k, v = ((proj(hidden).view(batch, n, heads, d).transpose(1, 2)).numpy()
                   for proj in (layer.query, layer.key, layer.value))
    (rand_attn,) = drawn
    assert rand_attn.shape == (heads, nb - 2, r)
    assert (len({tuple(x.ravel()) for x in rand_attn}) > 1) == differ   # heads differ
    mine = SPEC.implied_matrix(q, k, block_size=b, random_indices=rand_attn)
    assert max_rel_error(mine, probs.numpy()) <= 1e-12
    out = ra.bigbird_attention(q, k, v, block_size=b, random_indices=rand_attn)
    hf_out = context.view(batch, n, heads, d).transpose(1, 2).numpy()
    assert max_rel_error(out, hf_out) <= 1e-12
    # the pattern is HF's: every kept key has positive probability there, no other
    kept = ra.bigbird_attention.mask(block_size=b, random_indices=rand_attn,
                                     heads=heads)
    for h in range(heads):
        np.testing.assert_array_equal(kept.materialize(n, n, h=h), probs.numpy()[0, h] > 0)
