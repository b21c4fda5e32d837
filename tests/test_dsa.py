"""DSA (refattn.sparse.dsa): the lightning indexer and top-k against a float64
transcription written here query by query, exact attention under its own selection's
mask (hypothesis shapes), flash-linear-attention's ``naive_dsa`` on CPU, and the VJP
against central differences (the indexer gets no gradient)."""
import contextlib
import importlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.sparse import dsa_attention, dsa_attention_matrix, lightning_indexer
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


def paper_dsa(q, k, v, qi, ki, w, *, topk, causal):
    """DSA for one batch element: ``I_{t,s} = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s)``
    over the visible keys, the top-k of them (lowest index on ties), exact attention
    over those for every head. ``q (Hq, N, D)``, ``qi (H_I, N, D_I)``, ``ki (M, D_I)``,
    ``w (H_I, N)``. Returns (out, kept keys per query)."""
    hq, n, dim = q.shape
    hkv, m, _ = k.shape
    out, kept = np.zeros((hq, n, v.shape[-1])), []
    for t in range(n):
        tp = t + m - n
        visible = [s for s in range(m) if not causal or s <= tp]
        index = {s: sum(w[j, t] * max(qi[j, t] @ ki[s], 0.0) for j in range(len(qi)))
                 for s in visible}
        keys = sorted(sorted(visible, key=lambda s: (-index[s], s))[:topk])
        kept.append(keys)
        for h in range(hq):
            if keys:
                kh, vh = k[h // (hq // hkv), keys], v[h // (hq // hkv), keys]
                s = kh @ q[h, t] / np.sqrt(dim)
                p = np.exp(s - s.max())
                out[h, t] = p @ vh / p.sum()
    return out, kept


def _problem(seed, hq, hkv, n, m, *, hi=3, di=4, batch=(2,)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(batch + (hq, n, 5))
    k = rng.standard_normal(batch + (hkv, m, 5))
    v = rng.standard_normal(batch + (hkv, m, 3))
    qi = rng.standard_normal(batch + (hi, n, di))
    ki = rng.standard_normal(batch + (m, di))
    w = rng.standard_normal(batch + (hi, n))
    return q, k, v, qi, ki, w


SHAPES = {"MHA": (2, 2, 15, 15), "GQA": (4, 2, 18, 18), "N < M": (2, 1, 8, 20),
          "N > M": (2, 2, 17, 10)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1, 4, 30])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_papers_indexer_and_selection(shape, topk, causal, path):
    q, k, v, qi, ki, w = _problem(1, *SHAPES[shape])
    out, lse, sel = dsa_attention(q, k, v, topk=topk, q_index=qi, k_index=ki, weights=w,
                                  causal=causal, return_lse=True, return_selection=True)
    assert sel.shape == (2, q.shape[-2], topk) and sel.dtype == np.int64
    for b in range(2):
        ref, kept = paper_dsa(q[b], k[b], v[b], qi[b], ki[b], w[b], topk=topk,
                              causal=causal)
        assert max_rel_error(out[b], ref) <= 1e-12
        for t, keys in enumerate(kept):
            assert sel[b, t][sel[b, t] >= 0].tolist() == keys
            assert (sel[b, t, len(keys):] == -1).all()


def test_lightning_indexer_scores():
    _, _, _, qi, ki, w = _problem(2, 2, 2, 6, 9)
    scores = lightning_indexer(qi, ki, w, causal=True)
    ref = np.einsum("bjt,bjts->bts", w, np.maximum(np.einsum("bjtd,bsd->bjts", qi, ki), 0))
    ref[:, np.arange(9)[None, :] > np.arange(6)[:, None] + 3] = -np.inf
    assert scores.shape == (2, 6, 9) and max_rel_error(scores, ref) <= 1e-14
    ones = lightning_indexer(qi, ki[0])                           # weights 1, k broadcast
    assert max_rel_error(ones, np.maximum(np.einsum("bjtd,sd->bjts", qi, ki[0]),
                                          0).sum(1)) <= 1e-14


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), topk=st.integers(1, 12), causal=st.booleans(),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_equals_exact_attention_under_its_selection(path, data, topk, causal, heads, seed):
    sh = data.draw(rst.shapes(max_len=30))
    q, k, v = data.draw(rst.attention_inputs(st.just(sh), dtype="float64"))
    rng = np.random.default_rng(seed)
    qi = rng.standard_normal(sh.batch + (heads, sh.n, 3))
    ki = rng.standard_normal((sh.m, 3))                     # broadcast over the batch
    with keys_as(path):
        out, lse, sel = dsa_attention(q, k, v, topk=topk, q_index=qi, k_index=ki,
                                      causal=causal, return_lse=True,
                                      return_selection=True)
    mask = (sel[..., None] == np.arange(sh.m)).any(-2)[..., None, :, :]   # every head
    ref, ref_lse = ra.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    assert max_rel_error(out, ref) <= 1e-12 and max_rel_error(lse, ref_lse) <= 1e-12
    pos = np.arange(sh.n) + sh.m - sh.n
    seen = np.clip(pos + 1, 0, sh.m) if causal else np.full(sh.n, sh.m)
    assert ((sel >= 0).sum(-1) == np.minimum(topk, seen)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_all_keys_kept_is_exact_attention(causal):
    q, k, v, qi, ki, w = _problem(3, 4, 2, 9, 12)
    out = dsa_attention(q, k, v, topk=12, q_index=qi, k_index=ki, weights=w, causal=causal)
    assert max_rel_error(out, ra.attention(q, k, v, causal=causal)) <= 1e-13


def test_default_indexer_is_q_and_k():
    """Without an indexer, q and k index: with one KV head that is the indexer with
    ``q_index = q``, ``k_index = k``, weights 1."""
    q, k, v, *_ = _problem(4, 3, 1, 11, 11)
    kw = dict(topk=4, causal=True, return_selection=True)
    default = dsa_attention(q, k, v, **kw)
    given_ = dsa_attention(q, k, v, q_index=q, k_index=k[:, 0], weights=np.ones((2, 3, 11)),
                           **kw)
    assert all(np.array_equal(a, b) for a, b in zip(default, given_))


@pytest.mark.parametrize("block_q", [1, 3, 64])
def test_blocks_of_query_rows_change_nothing(block_q, path):
    q, k, v, qi, ki, w = _problem(5, 4, 2, 13, 16)
    kw = dict(topk=5, q_index=qi, k_index=ki, weights=w, causal=True, return_lse=True,
              return_selection=True)
    out, lse, sel = dsa_attention(q, k, v, **kw)
    out2, lse2, sel2 = dsa_attention(q, k, v, block_q=block_q, **kw)
    assert np.isfinite(out).all() and np.isfinite(lse).all() and (sel >= -1).all()
    assert np.array_equal(sel, sel2)
    assert max_rel_error(out2, out) <= 1e-14 and max_rel_error(lse2, lse) <= 1e-14


def test_implied_matrix(path):
    q, k, v, qi, ki, w = _problem(6, 4, 2, 10, 13)
    kw = dict(topk=4, q_index=qi, k_index=ki, weights=w, causal=True)
    a = dsa_attention_matrix(q, k, **kw)
    assert max_rel_error(a @ np.repeat(v, 2, -3), dsa_attention(q, k, v, **kw)) <= 1e-13
    assert ((a > 0).sum(-1) == np.minimum(4, np.arange(10) + 4)).all()


def test_bad_arguments_name_themselves():
    q, k, v, qi, ki, w = _problem(7, 2, 1, 6, 8)
    with pytest.raises(ValueError, match="give both q_index and k_index"):
        dsa_attention(q, k, v, topk=2, q_index=qi)
    with pytest.raises(ValueError, match="weights weighs the indexer heads"):
        dsa_attention(q, k, v, topk=2, weights=w)
    with pytest.raises(ValueError, match=r"q_index must be \(..., H_I, N, D_I\) and "
                                         r"k_index \(..., M, D_I\) with N=6, M=8.*got "
                                         r"q_index "
                                         r"\(2, 3, 6, 4\), k_index \(2, 8, 5\)"):
        dsa_attention(q, k, v, topk=2, q_index=qi, k_index=np.zeros((2, 8, 5)))
    with pytest.raises(ValueError, match=r"weights must be \(..., H_I, N\) = \(..., 3, 6\)"
                                         r".*got \(2, 6, 3\)"):
        dsa_attention(q, k, v, topk=2, q_index=qi, k_index=ki, weights=np.ones((2, 6, 3)))
    with pytest.raises(ValueError, match=r"batch dimensions of the indexer .* must "
                                         r"broadcast to those of q, k, v \(2,\)"):
        dsa_attention(q, k, v, topk=2, q_index=np.zeros((3, 3, 6, 4)), k_index=ki)
    with pytest.raises(ValueError, match="topk must be an integer >= 1 .*M=8 keys"):
        dsa_attention(q, k, v, topk=0)
    with pytest.raises(ValueError, match="k_index .* non-finite"):
        dsa_attention(q, k, v, topk=2, q_index=qi, k_index=np.full((8, 4), np.inf))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("shape, causal", [((4, 2, 7, 7), True), ((2, 1, 5, 9), True),
                                           ((2, 2, 8, 6), False), ((2, 2, 7, 7), False)])
def test_vjp_matches_finite_differences(shape, causal, path):
    hq, hkv, n, m = shape
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, hq, n, 3))
    k = rng.standard_normal((hkv, m, 3))                         # broadcast over the batch
    v = rng.standard_normal((2, hkv, m, 2))
    qi, ki, w = (rng.standard_normal(s) for s in ((2, 2, n, 4), (m, 4), (2, 2, n)))
    kw = dict(topk=3, q_index=qi, k_index=ki, weights=w, causal=causal)
    g, glse = rng.standard_normal((2, hq, n, 2)), rng.standard_normal((2, hq, n))
    _, lse = dsa_attention(q, k, v, return_lse=True, **kw)
    glse = np.where(np.isneginf(lse), 0.0, glse)                 # rows that see nothing
    exact = ra.vjp("dsa_attention", q, k, v, g, grad_lse=glse, **kw)
    assert sorted(exact) == ["k", "q", "v"]                      # the indexer gets none
    numeric = numerical_vjp(lambda **x: dsa_attention(**x, return_lse=True, **kw),
                            dict(q=q, k=k, v=v), (g, glse))
    for name in "qkv":
        assert exact[name].shape == numeric[name].shape
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"
    # the output is locally constant in the indexer: its derivative is zero
    rest = {a: b for a, b in kw.items() if a not in ("q_index", "k_index", "weights")}
    index = numerical_vjp(lambda **x: dsa_attention(q, k, v, **x, **rest),
                          dict(q_index=qi, k_index=ki, weights=w), g)
    assert not any(x.any() for x in index.values())


def test_vjp_is_the_masked_attention_vjp(path):
    q, k, v, qi, ki, w = _problem(9, 4, 2, 12, 12)
    rng = np.random.default_rng(9)
    g, glse = rng.standard_normal((2, 4, 12, 3)), rng.standard_normal((2, 4, 12))
    kw = dict(topk=4, q_index=qi, k_index=ki, weights=w, causal=True)
    _, sel = dsa_attention(q, k, v, return_selection=True, **kw)
    mask = (sel[..., None] == np.arange(12)).any(-2)[:, None]
    mine = ra.vjp("dsa_attention", q, k, v, g, grad_lse=glse, **kw)
    ref = ra.vjp("attention", q, k, v, g, grad_lse=glse, causal=True, mask=mask)
    for name in "qkv":
        assert max_rel_error(mine[name], ref[name], normwise=True) <= 1e-13, name


# ---------------------------------------------- flash-linear-attention's naive DSA
@pytest.fixture
def fla64(monkeypatch):
    """flash-linear-attention's naive references cast their inputs with ``.float()``;
    here ``.float()`` means float64, so they compute in float64 (checked by their
    output's dtype and by an agreement float32 could not reach)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return torch


@pytest.mark.parametrize("topk", [3, 8])
def test_agrees_with_flash_linear_attention_naive_dsa(topk, fla64):
    """fla's ``naive_dsa`` is tokens-first (``q_idx (B, T, H_I, D_I)``, ``w_idx (B, T,
    H_I)``; refattn's indexer arrays are heads-first), scales the indexer by
    ``1/sqrt(D_I)`` (no change to the ranking) and returns the kept keys in score order
    (here: ascending); its float32 casts run in float64 here (``fla64``). Positive
    indexer inputs keep the scores apart (no ReLU ties), so both choose the same keys."""
    torch = fla64
    naive = pytest.importorskip("fla.ops.dsa.naive")
    rng = np.random.default_rng(10)
    b, hq, hkv, t, dim, hi, di = 2, 4, 2, 24, 8, 3, 6
    q = rng.standard_normal((b, hq, t, dim))
    k, v = rng.standard_normal((2, b, hkv, t, dim))
    qi, ki = np.abs(rng.standard_normal((b, hi, t, di))), np.abs(rng.standard_normal((b, t,
                                                                                     di)))
    w = rng.standard_normal((b, hi, t))
    out, sel = dsa_attention(q, k, v, topk=topk, q_index=qi, k_index=ki, weights=w,
                             causal=True, return_selection=True)
    tf = (lambda x: torch.tensor(np.swapaxes(x, 1, 2)))
    theirs, idx = naive.naive_dsa(tf(q), tf(k), tf(v), tf(qi), torch.tensor(ki),
                                  torch.tensor(np.swapaxes(w, 1, 2)), topk=topk,
                                  return_indices=True)
    assert theirs.dtype == torch.float64
    assert max_rel_error(np.swapaxes(theirs.numpy(), 1, 2), out) <= 1e-12
    assert np.array_equal(np.sort(np.where(idx.numpy() < 0, t, idx.numpy()), -1),
                          np.where(sel < 0, t, sel))
