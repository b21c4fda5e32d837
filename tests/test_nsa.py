"""Native Sparse Attention (refattn.sparse.nsa): against a float64 transcription of the
paper's equations written here query by query (Eqs. 7-11 with Eq. 9's 1-based block
indices), each branch against exact attention under its own keys (the selection's mask,
the window mask, the compressed keys), against flash-linear-attention's naive NSA
branches on CPU, and the VJP against central differences and PyTorch float64 autograd.
"""
import contextlib
import importlib

import numpy as np
import pytest

import refattn as ra
from refattn.sparse import nsa_attention, nsa_attention_matrix
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

_common = importlib.import_module("refattn.sparse._common")


@contextlib.contextmanager
def keys_as(path):
    """Force each query's keys to be gathered as lists (``"lists"``) or attended under
    a dense mask (``"dense"``); the mechanisms choose by cost otherwise."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "GATHER_COST", 0 if path == "lists" else 10**9)
        yield


PATHS = ["lists", "dense"]


@pytest.fixture(params=PATHS)
def path(request):
    """Run the test with the keys gathered as lists, then under a dense mask."""
    with keys_as(request.param):
        yield request.param


@pytest.fixture
def fla64(monkeypatch):
    """flash-linear-attention's naive references cast their inputs with ``.float()``;
    here ``.float()`` means float64, so they compute in float64 (checked by their
    output's dtype and by an agreement float32 could not reach)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return torch


def _softmax_attend(qv, keys, values, scale):
    """One query's softmax attention over the rows of ``keys``; 0 when there are none."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1]), np.zeros(0)
    s = scale * keys @ qv
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ values, p


def paper_nsa(q, k, v, gates, *, l, d, ls, n, w, initial, local, causal):
    """NSA for one batch element, ``q (Hq, N, D)``, ``k (Hkv, M, D)``, written from the
    paper: Eq. 7 (compressed blocks, mean phi), Eq. 8 (p_cmp), Eq. 9 as printed with
    1-based block indices, Eq. 10 (sum over the GQA group), Eq. 11 (top-n with the fixed
    initial and local blocks), Eq. 5 (gated sum). Returns (out, selection sets)."""
    hq, nq, dim = q.shape
    hkv, m, _ = k.shape
    group, scale = hq // hkv, 1 / np.sqrt(dim)
    n_cmp = (m - l) // d + 1 if m >= l else 0
    n_slc = -(-m // ls)
    out = np.zeros(q.shape[:2] + (v.shape[-1],))
    selections = {}
    for t in range(nq):
        tp = t + m - nq                                      # bottom-right position
        seen = tp + 1                                        # tokens up to and incl. t'
        for hk in range(hkv):
            kc = np.array([k[hk, i * d:i * d + l].mean(0) for i in range(n_cmp)])
            vc = np.array([v[hk, i * d:i * d + l].mean(0) for i in range(n_cmp)])
            vis = [i for i in range(n_cmp) if not causal or i * d + l <= seen]
            heads = range(hk * group, (hk + 1) * group)
            o_cmp, p_slc = {}, np.zeros(n_slc)
            for h in heads:
                o_cmp[h], p = _softmax_attend(q[h, t], kc[vis].reshape(-1, dim),
                                              vc[vis].reshape(-1, v.shape[-1]), scale)
                p1 = np.zeros(n_cmp + 2)                    # p_cmp with 1-based indices
                p1[[i + 1 for i in vis]] = p
                for j1 in range(1, n_slc + 1):               # Eq. 9, 1-based j
                    for mm in range(ls // d):
                        for nn in range(l // d):
                            idx = (ls // d) * j1 - mm - nn
                            if 1 <= idx <= n_cmp:
                                p_slc[j1 - 1] += p1[idx]
            own = tp // ls
            cand = [j for j in range(n_slc) if not causal or j * ls <= tp]
            forced = [j for j in cand if j < initial or own - local < j <= own]
            rest = sorted((j for j in cand if j not in forced),
                          key=lambda j: (-p_slc[j], j))
            chosen = sorted(forced + rest[:n - len(forced)])
            selections[hk, t] = chosen
            keys = [x for j in chosen for x in range(j * ls, min((j + 1) * ls, m))
                    if not causal or x <= tp]
            win = [x for x in range(tp - w + 1, tp + 1) if 0 <= x < m]
            for h in heads:
                o_slc, _ = _softmax_attend(q[h, t], k[hk, keys], v[hk, keys], scale)
                o_win, _ = _softmax_attend(q[h, t], k[hk, win], v[hk, win], scale)
                out[h, t] = gates[h, t] @ np.array([o_cmp[h], o_slc, o_win])
    return out, selections


CONFIGS = {
    "fla-like l=l'=d": dict(block_size=4, stride=4, select_size=4, top_n=3, window=3,
                            initial_blocks=1, local_blocks=2),
    "overlapping l=2d, l'=l": dict(block_size=4, stride=2, select_size=4, top_n=3,
                                   window=2, initial_blocks=1, local_blocks=1),
    "paper ratios l=2d, l'=4d": dict(block_size=4, stride=2, select_size=8, top_n=2,
                                     window=5, initial_blocks=1, local_blocks=1),
    "no always-on blocks": dict(block_size=2, stride=2, select_size=2, top_n=3, window=0,
                                initial_blocks=0, local_blocks=0),
    "fine selection l'=d": dict(block_size=6, stride=3, select_size=3, top_n=4, window=4,
                                initial_blocks=2, local_blocks=1),
}
SHAPES = {"MHA": (3, 3, 23, 23), "GQA": (4, 2, 26, 26), "MQA, N < M": (3, 1, 9, 24),
          "N > M": (2, 2, 20, 14)}


def _problem(seed, hq, hkv, n, m, d=5, dv=3, batch=(2,)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(batch + (hq, n, d))
    k = rng.standard_normal(batch + (hkv, m, d))
    v = rng.standard_normal(batch + (hkv, m, dv))
    gates = rng.uniform(0.1, 1.0, batch + (hq, n, 3))
    return q, k, v, gates


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_papers_equations(config, shape, causal, path):
    q, k, v, gates = _problem(1, *SHAPES[shape])
    kw = CONFIGS[config]
    out, sel = nsa_attention(q, k, v, gates=gates, causal=causal,
                             return_selection=True, **kw)
    assert sel.shape == (2, k.shape[1], q.shape[2], kw["top_n"]) and sel.dtype == np.int64
    for b in range(2):
        ref, ref_sel = paper_nsa(q[b], k[b], v[b], gates[b], l=kw["block_size"],
                                 d=kw["stride"], ls=kw["select_size"], n=kw["top_n"],
                                 w=kw["window"], initial=kw["initial_blocks"],
                                 local=kw["local_blocks"], causal=causal)
        assert max_rel_error(out[b], ref) <= 1e-12
        for (hk, t), chosen in ref_sel.items():
            row = sel[b, hk, t]
            assert row[row >= 0].tolist() == chosen, (hk, t)
            assert (row[len(chosen):] == -1).all()


def _selection_mask(sel, select_size, n, m, group):
    """Boolean ``(..., Hq, N, M)``: the keys of each query's selected blocks."""
    blocks = np.arange(m) // select_size
    keep = (sel[..., None] == blocks).any(-2)                 # (..., Hkv, N, M)
    return np.repeat(keep, group, axis=-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_each_branch_is_exact_attention_under_its_own_keys(shape, causal, path):
    q, k, v, _ = _problem(2, *SHAPES[shape])
    hq, hkv, n, m = SHAPES[shape]
    kw = dict(block_size=4, stride=2, select_size=3, top_n=3, window=4, initial_blocks=1,
              local_blocks=1, causal=causal)
    one_hot = np.eye(3)
    _, sel = nsa_attention(q, k, v, gates=one_hot[1], return_selection=True, **kw)
    # selected branch: exact attention under the selection's mask
    slc = nsa_attention(q, k, v, gates=one_hot[1], **kw)
    mask = _selection_mask(sel, 3, n, m, hq // hkv)
    assert max_rel_error(slc, ra.attention(q, k, v, mask=mask, causal=causal)) <= 1e-13
    # window branch: the window mask (w keys up to the query)
    win = nsa_attention(q, k, v, gates=one_hot[2], **kw)
    ref = ra.sliding_window_attention(q, k, v, window=3, causal=causal)
    assert max_rel_error(win, ref) <= 1e-13
    # compressed branch: exact attention over the mean-pooled blocks that are visible
    cmp = nsa_attention(q, k, v, gates=one_hot[0], **kw)
    starts = np.arange(0, m - 4 + 1, 2)
    kc = np.stack([k[..., s:s + 4, :].mean(-2) for s in starts], axis=-2)
    vc = np.stack([v[..., s:s + 4, :].mean(-2) for s in starts], axis=-2)
    pos = np.arange(n) + m - n
    visible = (starts[None, :] + 3 <= pos[:, None]) if causal else np.ones((n, len(starts)),
                                                                             bool)
    assert max_rel_error(cmp, ra.attention(q, kc, vc, mask=visible)) <= 1e-13
    # the gates combine the branches linearly
    gates = np.random.default_rng(3).standard_normal((2, hq, n, 3))
    mixed = nsa_attention(q, k, v, gates=gates, **kw)
    parts = np.stack([cmp, slc, win], axis=-1)
    assert max_rel_error(mixed, np.einsum("...c,...dc->...d", gates, parts)) <= 1e-13


@pytest.mark.parametrize("causal", [True, False])
def test_compressed_branch_with_l_equal_d_is_pooled_attention(causal):
    q, k, v, _ = _problem(4, 4, 2, 24, 24)
    cmp = nsa_attention(q, k, v, gates=(1, 0, 0), block_size=4, stride=4, select_size=4,
                        top_n=3, window=1, causal=causal)
    ref = ra.pooled_attention(q, k, v, stride=4, causal=causal)    # M % 4 == 0
    assert max_rel_error(cmp, ref) <= 1e-13


def test_selection_rules():
    q, k, v, _ = _problem(5, 4, 2, 40, 40)
    kw = dict(block_size=4, stride=2, select_size=4, top_n=4, window=4, initial_blocks=1,
              local_blocks=2, causal=True)
    _, sel = nsa_attention(q, k, v, gates=(1, 1, 1), return_selection=True, **kw)
    for t in range(40):
        own = t // 4
        row = sel[..., t, :]
        kept = row >= 0
        assert (row[kept] * 4 <= t).all()                        # no future block
        assert ((row == 0).any(-1)).all() and ((row == own).any(-1)).all()
        if own >= 1:
            assert ((row == own - 1).any(-1)).all()
        count = min(4, own + 1)                                    # all candidates if few
        assert (kept.sum(-1) == count).all() and (row[..., count:] == -1).all()
        assert (np.diff(row[..., :count], axis=-1) > 0).all()     # ascending, unique


def test_one_selection_per_gqa_group_from_the_summed_importance():
    """Eq. 10: the heads of a group share the blocks; with Hkv = Hq each head has its
    own, and with one group the selection follows the summed probabilities."""
    q, k, v, _ = _problem(6, 4, 1, 30, 30)
    kw = dict(block_size=3, stride=3, select_size=3, top_n=3, window=2, initial_blocks=1,
              local_blocks=1, causal=True)
    _, shared = nsa_attention(q, k, v, gates=(1, 1, 1), return_selection=True, **kw)
    _, alone = nsa_attention(q, np.repeat(k, 4, -3), np.repeat(v, 4, -3), gates=(1, 1, 1),
                             return_selection=True, **kw)
    assert shared.shape[-3] == 1 and alone.shape[-3] == 4
    assert (alone != alone[..., :1, :, :]).any()              # heads alone disagree


@pytest.mark.parametrize("block_q", [1, 5, 64])
def test_blocks_of_query_rows_and_key_paths_change_nothing(block_q):
    q, k, v, gates = _problem(7, 4, 2, 21, 25)
    kw = dict(gates=gates, block_size=4, stride=2, select_size=3, top_n=3, window=3,
              causal=True, return_selection=True)
    out, sel = nsa_attention(q, k, v, **kw)
    out2, sel2 = nsa_attention(q, k, v, block_q=block_q, **kw)
    assert np.isfinite(out).all() and (sel >= -1).all()          # no poisoned entry left
    assert np.array_equal(sel, sel2) and max_rel_error(out2, out) <= 1e-14
    for forced in PATHS:
        with keys_as(forced):
            out3, sel3 = nsa_attention(q, k, v, block_q=block_q, **kw)
        assert np.array_equal(sel, sel3) and max_rel_error(out3, out) <= 1e-14


def test_learned_compression_functions():
    q, k, v, _ = _problem(8, 2, 1, 16, 16)
    kw = dict(block_size=4, stride=2, select_size=4, top_n=2, window=2, local_blocks=1,
              causal=True)
    mean = nsa_attention(q, k, v, gates=(1, 1, 1), **kw)
    seen = []

    def phi(blocks):
        seen.append(blocks.shape)
        return blocks.mean(-2)
    assert max_rel_error(nsa_attention(q, k, v, gates=(1, 1, 1), compress=phi, **kw),
                         mean) <= 1e-15
    assert seen[0] == (2, 1, 7, 4, 5)                        # (..., Hkv, C, l, D)
    # a pair: max-pooled keys, last-token values; the compressed branch is exact
    # attention over them
    pair = (lambda b: b.max(-2), lambda b: b[..., -1, :])
    cmp = nsa_attention(q, k, v, gates=(1, 0, 0), compress=pair, **kw)
    starts = np.arange(0, 13, 2)
    kc = np.stack([k[..., s:s + 4, :].max(-2) for s in starts], -2)
    vc = np.stack([v[..., s + 3, :] for s in starts], -2)
    visible = starts[None, :] + 3 <= np.arange(16)[:, None]
    assert max_rel_error(cmp, ra.attention(q, kc, vc, mask=visible)) <= 1e-13
    with pytest.raises(TypeError, match="compress='mean' only"):
        ra.vjp("nsa_attention", q, k, v, np.ones((2, 2, 16, 3)), gates=(1, 1, 1),
               compress=phi, **kw)
    with pytest.raises(ValueError, match="not linear in v"):
        nsa_attention_matrix(q, k, gates=(1, 1, 1), compress=phi, **kw)
    with pytest.raises(ValueError, match=r"compress must map the key blocks .* to "
                                         r"\(2, 1, 7, 5\), got \(2, 1, 7\)"):
        nsa_attention(q, k, v, gates=(1, 1, 1), compress=lambda b: b.sum((-1, -2)), **kw)


def test_bad_arguments_name_themselves():
    q, k, v, _ = _problem(9, 2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"gates must broadcast to \(..., Hq, N, 3\) = "
                                         r"\(2, 2, 8, 3\).*got \(2, 7, 3\)"):
        nsa_attention(q, k, v, gates=np.ones((2, 7, 3)))
    with pytest.raises(ValueError, match="top_n must be an integer >= 3 .*initial_blocks=1 "
                                         "and local_blocks=2"):
        nsa_attention(q, k, v, gates=(1, 1, 1), top_n=2)
    with pytest.raises(ValueError, match="compress must be 'mean'"):
        nsa_attention(q, k, v, gates=(1, 1, 1), compress="max")
    with pytest.raises(TypeError, match="block_size must be an integer"):
        nsa_attention(q, k, v, gates=(1, 1, 1), block_size=2.0)
    with pytest.raises(ValueError, match="gates .* non-finite"):
        nsa_attention(q, k, v, gates=(1, np.nan, 1))
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape"):
        ra.vjp("nsa_attention", q, k, v, np.ones((2, 2, 8, 2)), gates=(1, 1, 1))


def test_layout_bnhd_moves_the_gates_with_the_tokens():
    q, k, v, gates = _problem(10, 4, 2, 9, 9)
    kw = dict(block_size=2, stride=2, select_size=2, top_n=3, window=2, local_blocks=1,
              causal=True)
    ref = nsa_attention(q, k, v, gates=gates, **kw)
    t = (lambda x: np.swapaxes(x, -3, -2))
    out = nsa_attention(t(q), t(k), t(v), gates=t(gates), layout="bnhd", **kw)
    assert np.array_equal(t(out), ref)
    g = np.random.default_rng(0).standard_normal(ref.shape)
    grads = ra.vjp("nsa_attention", q, k, v, g, gates=gates, **kw)
    moved = ra.vjp("nsa_attention", t(q), t(k), t(v), t(g), gates=t(gates),
                   layout="bnhd", **kw)
    for name in ("q", "k", "v", "gates"):
        assert max_rel_error(t(moved[name]), grads[name]) <= 1e-14, name


# ------------------------------------------------------------------ gradients
GRAD_CASES = {
    "causal GQA": dict(shape=(4, 2, 7, 7), causal=True, gates="full"),
    "causal N < M, gates broadcast": dict(shape=(2, 1, 5, 9), causal=True, gates="vector"),
    "non-causal N > M": dict(shape=(2, 2, 8, 6), causal=False, gates="per head"),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_vjp_matches_finite_differences(case, path):
    c = GRAD_CASES[case]
    hq, hkv, n, m = c["shape"]
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, hq, n, 3))
    k = rng.standard_normal((hkv, m, 3))                         # broadcast over the batch
    v = rng.standard_normal((2, hkv, m, 2))
    gates = {"full": rng.uniform(0.1, 1, (2, hq, n, 3)),
             "vector": np.array([0.3, 0.5, 0.9]),
             "per head": rng.uniform(0.1, 1, (hq, 1, 3))}[c["gates"]]
    kw = dict(block_size=2, stride=1, select_size=2, top_n=3, window=2, initial_blocks=1,
              local_blocks=1, causal=c["causal"])
    g = rng.standard_normal((2, hq, n, 2))
    exact = ra.vjp("nsa_attention", q, k, v, g, gates=gates, **kw)
    numeric = numerical_vjp(nsa_attention, dict(q=q, k=k, v=v, gates=gates), g, **kw)
    assert sorted(exact) == ["gates", "k", "q", "v"]
    for name in numeric:
        assert exact[name].shape == numeric[name].shape
        err = max_rel_error(exact[name], numeric[name], normwise=True)
        assert err <= 1e-7, f"d{name}: {err:.2e}"


def test_vjp_matches_torch_autograd_with_the_selection_fixed(path):
    """A PyTorch float64 transcription: mean pooling by unfold, each branch a masked
    softmax (the selection passed in as a mask), gated sum; autograd's gradients."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    hq, hkv, n, m, l, d, ls, w = 4, 2, 13, 17, 4, 2, 3, 3
    q, k, v = (rng.standard_normal(s) for s in ((2, hq, n, 5), (2, hkv, m, 5),
                                                (2, hkv, m, 4)))
    gates, g = rng.uniform(0.1, 1, (2, hq, n, 3)), rng.standard_normal((2, hq, n, 4))
    kw = dict(block_size=l, stride=d, select_size=ls, top_n=3, window=w, initial_blocks=1,
              local_blocks=1, causal=True)
    _, sel = nsa_attention(q, k, v, gates=gates, return_selection=True, **kw)
    pos = torch.arange(n)[:, None] + m - n
    keys = torch.arange(m)[None, :]
    starts = torch.arange(0, m - l + 1, d)
    masks = [starts[None, :] + l - 1 <= pos,
             torch.tensor(_selection_mask(sel, ls, n, m, hq // hkv)) & (keys <= pos),
             (keys <= pos) & (keys > pos - w)]
    tq, tk, tv, tg = (torch.tensor(x, requires_grad=True) for x in (q, k, v, gates))

    def branch(kk, vv, keep):
        kk, vv = (x.repeat_interleave(hq // hkv, dim=1) for x in (kk, vv))
        s = (tq @ kk.transpose(-1, -2) / np.sqrt(5)).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1).nan_to_num(0.0) @ vv

    kc = tk.unfold(2, l, d).mean(-1)                      # (B, Hkv, C, D)
    vc = tv.unfold(2, l, d).mean(-1)
    outs = [branch(kc, vc, masks[0]), branch(tk, tv, masks[1]), branch(tk, tv, masks[2])]
    out = sum(tg[..., i, None] * o for i, o in enumerate(outs))
    assert max_rel_error(out.detach().numpy(), nsa_attention(q, k, v, gates=gates,
                                                             **kw)) <= 1e-13
    ref = torch.autograd.grad((out * torch.tensor(g)).sum(), (tq, tk, tv, tg))
    mine = ra.vjp("nsa_attention", q, k, v, g, gates=gates, **kw)
    for name, r in zip(("q", "k", "v", "gates"), ref):
        assert max_rel_error(mine[name], r.numpy(), normwise=True) <= 1e-12, name


def test_implied_matrix_reproduces_the_output_and_sums_to_the_seen_gates():
    q, k, v, gates = _problem(13, 4, 2, 15, 15)
    kw = dict(gates=gates, block_size=4, stride=2, select_size=3, top_n=3, window=3,
              causal=True)
    a = nsa_attention_matrix(q, k, **kw)
    assert max_rel_error(a @ np.repeat(v, 2, -3), nsa_attention(q, k, v, **kw)) <= 1e-13
    pos = np.arange(15)
    seen_cmp = (pos >= 3)[None, None, :, None]                # the first block is complete
    expected = gates[..., 1] + gates[..., 2] + np.where(seen_cmp[..., 0], gates[..., 0], 0)
    assert max_rel_error(a.sum(-1), expected) <= 1e-13


# ---------------------------------------------- flash-linear-attention's naive NSA
def test_agrees_with_flash_linear_attention_naive_branches(fla64):
    """fla's ``naive_nsa`` ties ``l = l' = d = block_size`` with one initial and two
    local blocks (the query's own and the previous one); it ranks blocks by the group's
    *mean* compressed probability (the same order as the sum), is tokens-first
    ``(B, T, H, D)``, and needs flash-attn for the window branch (checked above against
    the window mask instead); its mean pooling is a Triton kernel, so the test pools the
    blocks itself. Its float32 casts run in float64 here (``fla64``)."""
    torch = fla64
    naive = pytest.importorskip("fla.ops.nsa.naive")
    rng = np.random.default_rng(14)
    b, hq, hkv, t, dim, bs, s = 2, 4, 2, 32, 8, 4, 4
    q, k, v = (rng.standard_normal(x) for x in ((b, hq, t, dim), (b, hkv, t, dim),
                                                (b, hkv, t, dim)))
    kw = dict(block_size=bs, stride=bs, select_size=bs, top_n=s, window=1,
              initial_blocks=1, local_blocks=2, causal=True)
    cmp, sel = nsa_attention(q, k, v, gates=(1, 0, 0), return_selection=True, **kw)
    slc = nsa_attention(q, k, v, gates=(0, 1, 0), **kw)
    tf = (lambda x: torch.tensor(np.swapaxes(x, 1, 2)))           # tokens-first
    tq, tk, tv = tf(q), tf(k), tf(v)
    kc, vc = (x.reshape(b, t // bs, bs, hkv, dim).mean(2) for x in (tk, tv))
    scale = dim ** -0.5
    o_cmp, _ = naive.naive_nsa_compression(tq, kc, vc, bs, scale)
    idx = naive.naive_nsa_topk(tq, kc, s, bs, scale)               # (B, T, Hkv, S)
    o_slc = naive.naive_nsa_selection(tq, tk, tv, idx, bs, scale)
    back = (lambda x: np.swapaxes(x.numpy(), 1, 2))
    assert o_cmp.dtype == o_slc.dtype == torch.float64
    assert max_rel_error(back(o_cmp), cmp) <= 1e-12
    assert max_rel_error(back(o_slc), slc) <= 1e-12
    theirs = np.swapaxes(idx.numpy(), 1, 2)                        # (B, Hkv, T, S)
    for key in np.ndindex(sel.shape[:3]):
        assert sorted(x for x in theirs[key] if x >= 0) == sorted(x for x in sel[key]
                                                                   if x >= 0), key
