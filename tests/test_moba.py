"""MoBA (refattn.sparse.moba): against a float64 transcription of the paper's gating
written here query by query, against exact attention under its own selection's mask
(hypothesis shapes), in the limits where it is exact or chunked attention, and the VJP
against central differences. flash-linear-attention ships MoBA only as a flash-attn
kernel (``parallel_moba``), which needs CUDA: that comparison skips without it.
"""
import contextlib
import importlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.sparse import moba_attention, moba_attention_matrix
from refattn.testing import max_rel_error, strategies as rst
from refattn.testing.gradients import numerical_vjp

_common = importlib.import_module("refattn.sparse._common")
PATHS = ["lists", "dense"]


@contextlib.contextmanager
def keys_as(path):
    """Force each query's keys to be gathered as lists (``"lists"``) or attended under
    a dense mask (``"dense"``); the mechanisms choose by cost otherwise."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "GATHER_COST", 0 if path == "lists" else 10**9)
        yield


@pytest.fixture(params=PATHS)
def path(request):
    """Run the test with the keys gathered as lists, then under a dense mask."""
    with keys_as(request.param):
        yield request.param


def paper_moba(q, k, v, *, block_size, topk, causal):
    """MoBA for one batch element, ``q (Hq, N, D)``, ``k (Hkv, M, D)``: the gate
    ``s_i = <q, mean_pool(K[I_i])>`` per block, the current block always chosen, future
    blocks never (causal), the top-k of the rest; attention over the chosen blocks'
    keys with the causal mask. Returns (out, chosen blocks per (head, query))."""
    hq, n, dim = q.shape
    hkv, m, _ = k.shape
    blocks = [range(s, min(s + block_size, m)) for s in range(0, m, block_size)]
    out, chosen = np.zeros((hq, n, v.shape[-1])), {}
    for h in range(hq):
        kh, vh = k[h // (hq // hkv)], v[h // (hq // hkv)]
        for t in range(n):
            tp = t + m - n
            own = tp // block_size if tp >= 0 else None
            gate = {c: q[h, t] @ kh[list(b)].mean(0) for c, b in enumerate(blocks)}
            rest = [c for c in gate if c != own and (not causal or (own is not None
                                                                       and c < own))]
            rest.sort(key=lambda c: (-gate[c], c))
            pick = ([] if own is None else [own]) + rest
            pick = sorted(pick[:topk]) if (own is not None or not causal) else []
            chosen[h, t] = pick
            keys = [j for c in pick for j in blocks[c] if not causal or j <= tp]
            if keys:
                s = kh[keys] @ q[h, t] / np.sqrt(dim)
                p = np.exp(s - s.max())
                out[h, t] = p @ vh[keys] / p.sum()
    return out, chosen


@pytest.mark.parametrize("shape", [(3, 3, 17, 17), (4, 2, 20, 20), (2, 1, 9, 23),
                                   (2, 2, 19, 11)], ids=["MHA", "GQA", "N<M", "N>M"])
@pytest.mark.parametrize("block_size, topk", [(3, 2), (4, 3), (1, 4), (5, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_papers_gating(shape, block_size, topk, causal, path):
    hq, hkv, n, m = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, hq, n, 5))
    k, v = rng.standard_normal((2, 2, hkv, m, 5))
    out, lse, sel = moba_attention(q, k, v, block_size=block_size, topk=topk,
                                   causal=causal, return_lse=True, return_selection=True)
    assert sel.shape == (2, hq, n, topk) and lse.shape == (2, hq, n)
    for b in range(2):
        ref, chosen = paper_moba(q[b], k[b], v[b], block_size=block_size, topk=topk,
                                 causal=causal)
        assert max_rel_error(out[b], ref) <= 1e-12
        for (h, t), pick in chosen.items():
            row = sel[b, h, t]
            assert row[row >= 0].tolist() == pick and (row[len(pick):] == -1).all()


def _selection_mask(sel, block_size, m):
    return (sel[..., None] == np.arange(m) // block_size).any(-2)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), block_size=st.integers(1, 6), topk=st.integers(1, 4),
       causal=st.booleans())
def test_equals_exact_attention_under_its_selection(path, data, block_size, topk, causal):
    sh = data.draw(rst.shapes(max_len=30))
    q, k, v = data.draw(rst.attention_inputs(st.just(sh), dtype="float64"))
    with keys_as(path):
        out, lse, sel = moba_attention(q, k, v, block_size=block_size, topk=topk,
                                       causal=causal, return_lse=True,
                                       return_selection=True)
    mask = _selection_mask(sel, block_size, sh.m)
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    assert max_rel_error(out, ref) <= 1e-12 and max_rel_error(lse, ref_lse) <= 1e-12
    kept = sel >= 0
    assert (kept.sum(-1) <= topk).all()
    pos = np.arange(sh.n) + sh.m - sh.n
    own = np.broadcast_to((pos // block_size)[:, None], sel.shape)
    if causal:                           # the current block always, no future block
        assert ((sel == own).any(-1) | (pos < 0)).all()
        assert (np.where(kept, sel, -10**9) <= own).all()
        assert not kept[..., pos < 0, :].any()


@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_kept_is_exact_attention(causal):
    q, k, v = np.random.default_rng(2).standard_normal((3, 2, 2, 14, 6))
    for topk in (5, 9):                               # ceil(14 / 3) = 5 blocks
        out = moba_attention(q, k, v, block_size=3, topk=topk, causal=causal)
        assert max_rel_error(out, ra.attention(q, k, v, causal=causal)) <= 1e-13


@pytest.mark.parametrize("n, m", [(16, 16), (7, 16)])
def test_one_block_is_chunked_attention(n, m):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, n, 5))
    k, v = rng.standard_normal((2, 2, 2, m, 5))
    out = moba_attention(q, k, v, block_size=3, topk=1, causal=True)
    assert max_rel_error(out, ra.chunked_attention(q, k, v, chunk_size=3,
                                                   causal=True)) <= 1e-13


def test_each_query_head_chooses_its_own_blocks():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((4, 24, 4))
    k, v = rng.standard_normal((2, 1, 24, 4))
    _, sel = moba_attention(q, k, v, block_size=2, topk=3, causal=True,
                            return_selection=True)
    assert (sel != sel[:1]).any()
    one = moba_attention(q[2:3], k, v, block_size=2, topk=3, causal=True)
    assert max_rel_error(one, moba_attention(q, k, v, block_size=2, topk=3,
                                             causal=True)[2:3]) <= 1e-15


@pytest.mark.parametrize("block_q", [1, 4, 100])
def test_blocks_of_query_rows_change_nothing(block_q, path):
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 2, 2, 19, 4))
    kw = dict(block_size=3, topk=2, causal=True, return_selection=True, return_lse=True)
    out, lse, sel = moba_attention(q, k, v, **kw)
    out2, lse2, sel2 = moba_attention(q, k, v, block_q=block_q, **kw)
    assert np.isfinite(out).all() and np.isfinite(lse).all() and (sel >= -1).all()
    assert np.array_equal(sel, sel2)
    assert max_rel_error(out2, out) <= 1e-14 and max_rel_error(lse2, lse) <= 1e-14


_moba = importlib.import_module("refattn.sparse.moba")


@pytest.mark.parametrize("causal", [True, False])
def test_key_block_forward_matches_the_per_query_gather(causal, path):
    """The forward runs key block by key block, merging partial softmax states online;
    the implied matrix gathers each query's keys: they must agree, also when the queries
    of a block are taken a couple at a time and with rows that see nothing (N > M)."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 23, 5))
    k, v = rng.standard_normal((2, 2, 2, 19, 5))
    kw = dict(block_size=3, topk=3, causal=causal)
    ref = moba_attention_matrix(q, k, **kw) @ np.repeat(v, 2, -3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_moba, "BLOCK_ELEMENTS", 7)           # pieces of 2 queries
        out = moba_attention(q, k, v, **kw)
    assert max_rel_error(out, ref) <= 1e-13
    assert (out[:, :, :4] == 0).all() == causal          # t' < 0: nothing when causal


def test_implied_matrix(path):
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 4, 11, 5))
    k, v = rng.standard_normal((2, 2, 2, 13, 5))
    a = moba_attention_matrix(q, k, block_size=2, topk=3, causal=True)
    assert max_rel_error(a @ np.repeat(v, 2, -3), moba_attention(
        q, k, v, block_size=2, topk=3, causal=True)) <= 1e-13
    assert max_rel_error(a.sum(-1), np.ones((2, 4, 11))) <= 1e-14


def test_bad_arguments_name_themselves():
    q = np.zeros((2, 6, 4))
    with pytest.raises(ValueError, match="topk must be an integer >= 1 .*counting its own"):
        moba_attention(q, q, q, block_size=2, topk=0)
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1 \(k has "
                                         r"M=6 keys\)"):
        moba_attention(q, q, q, block_size=0, topk=2)
    with pytest.raises(TypeError, match="causal must be True or False"):
        moba_attention(q, q, q, block_size=2, topk=2, causal=1)
    with pytest.raises(ValueError, match=r"grad_lse must have the output's shape"):
        ra.vjp("moba_attention", q, q, q, np.ones((2, 6, 4)), block_size=2, topk=2,
               grad_lse=np.ones(6))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("shape, causal", [((4, 2, 7, 7), True), ((2, 1, 5, 9), True),
                                           ((2, 2, 8, 6), False), ((2, 2, 7, 7), False)])
def test_vjp_matches_finite_differences(shape, causal, path):
    hq, hkv, n, m = shape
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, hq, n, 3))
    k = rng.standard_normal((hkv, m, 3))                         # broadcast over the batch
    v = rng.standard_normal((2, hkv, m, 2))
    kw = dict(block_size=2, topk=2, causal=causal)
    g, glse = rng.standard_normal((2, hq, n, 2)), rng.standard_normal((2, hq, n))
    _, lse = moba_attention(q, k, v, return_lse=True, **kw)
    glse = np.where(np.isneginf(lse), 0.0, glse)                 # rows that see nothing
    exact = ra.vjp("moba_attention", q, k, v, g, grad_lse=glse, **kw)
    numeric = numerical_vjp(lambda **x: moba_attention(**x, return_lse=True, **kw),
                            dict(q=q, k=k, v=v), (g, glse))
    for name in "qkv":
        assert exact[name].shape == numeric[name].shape
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


def test_vjp_is_the_masked_attention_vjp(path):
    """With the selection fixed, MoBA's gradients are exact attention's under the
    selection's mask."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 15, 6))
    k, v = rng.standard_normal((2, 2, 2, 15, 6))
    g, glse = rng.standard_normal((2, 4, 15, 6)), rng.standard_normal((2, 4, 15))
    kw = dict(block_size=3, topk=2, causal=True)
    _, sel = moba_attention(q, k, v, return_selection=True, **kw)
    mine = ra.vjp("moba_attention", q, k, v, g, grad_lse=glse, **kw)
    ref = ra.vjp("attention", q, k, v, g, grad_lse=glse, causal=True,
                 mask=_selection_mask(sel, 3, 15))
    for name in "qkv":
        assert max_rel_error(mine[name], ref[name], normwise=True) <= 1e-13, name


def test_agrees_with_flash_linear_attention_parallel_moba():
    """fla's only MoBA is ``parallel_moba`` on flash-attn kernels (CUDA, float16 or
    bfloat16); it counts ``topk`` with the current block, as here (except ``topk=1``,
    where it falls back to full causal attention)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("flash_attn", reason="fla's parallel_moba needs flash-attn")
    if not torch.cuda.is_available():
        pytest.skip("fla's parallel_moba needs a CUDA device")
    from fla.ops.moba import parallel_moba
    rng = np.random.default_rng(9)
    t, h, dim = 256, 2, 64
    q, k, v = (rng.standard_normal((1, t, h, dim)) for _ in range(3))
    tq, tk, tv = (torch.tensor(x, dtype=torch.float16, device="cuda") for x in (q, k, v))
    out = parallel_moba(tq, tk, tv, torch.tensor([0, t], device="cuda", dtype=torch.int32),
                        t, 32, 3)
    ref = moba_attention(q, k, v, block_size=32, topk=3, causal=True, layout="bnhd")
    ra.testing.assert_close(out.float().cpu().numpy(), ref, dtype="float16")
