"""Attention over a paged KV cache in the vLLM / FlashInfer layout
(``refattn.exact.paged_attention``): bit-identical to ``refattn.attention`` on the
contiguous per-sequence keys, against the streaming caches, an independent loop form, a
hand-written PyTorch float64 reference of the vLLM layout, and every validation error."""
import numpy as np
import pytest
from conftest import naive_attention

import refattn as ra
from refattn.exact import attention_vjp, paged_attention, paged_attention_vjp
from refattn.kvcache import full_cache_init, full_cache_step, paged_init, paged_step
from refattn.testing.gradients import numerical_vjp

LENS = (1, 17, 128, 300)                        # decode batch: lengths 1 ... 300


def _paged(rng, lens, *, block_size, hkv, d, dv, spare=3, layout="NHD", share=0):
    """A pool holding sequences of ``lens`` tokens in blocks allocated out of order (a
    random permutation), unused blocks, block tails and table padding filled with
    garbage (NaN, ids out of range) that must never be read. The first ``share`` blocks
    of sequence 0 are shared by the sequences they fill (prefix caching). Returns
    ``(key_cache, value_cache, block_table int32, seq_lens int32, keys, values)`` with
    ``keys[b] (Hkv, L_b, D)`` the contiguous cache of sequence ``b``."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare
    order = iter(rng.permutation(num_blocks))
    table = np.full((len(lens), max(need, default=0) + 2), -7, dtype=np.int32)
    table[:, -1] = num_blocks + 11                  # padding: out of range, never read
    for b, n in enumerate(lens):
        for j in range(need[b]):
            full = (j + 1) * block_size <= min(n, lens[0])   # only full blocks are shared
            table[b, j] = table[0, j] if b and j < share and full else next(order)
    shape = (num_blocks, block_size, hkv)
    kc, vc = np.full(shape + (d,), np.nan), np.full(shape + (dv,), np.nan)
    keys, values = [], []
    for b, n in enumerate(lens):
        for pool, out, dim in ((kc, keys, d), (vc, values, dv)):
            blocks = pool[table[b, :need[b]]]
            fresh = np.isnan(blocks[:, :, 0, 0])      # not yet written (shared blocks are)
            blocks[fresh] = rng.standard_normal((int(fresh.sum()), hkv, dim))
            flat = blocks.reshape(-1, hkv, dim)
            flat[n:] = np.nan                         # the tail past the sequence
            pool[table[b, :need[b]]] = flat.reshape(blocks.shape)
            out.append(flat[:n].transpose(1, 0, 2))
    if layout == "HND":
        kc, vc = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (kc, vc))
    return kc, vc, table, np.array(lens, dtype=np.int32), keys, values


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_is_bit_identical_to_attention_on_the_contiguous_cache(rng, layout):
    kc, vc, table, lens, keys, values = _paged(rng, LENS, block_size=16, hkv=2, d=16,
                                               dv=8, layout=layout)
    q = rng.standard_normal((4, 8, 16))             # GQA: 8 query heads, 2 KV heads
    out, lse = paged_attention(q, kc, vc, table, lens, return_lse=True, kv_layout=layout)
    assert out.shape == (4, 8, 8) and lse.shape == (8, 4)
    for b in range(4):                              # the query is the last position
        ref, ref_lse = ra.attention(q[b][:, None], keys[b], values[b], causal=True,
                                    return_lse=True)
        np.testing.assert_array_equal(out[b], ref[:, 0])
        np.testing.assert_array_equal(lse[:, b], ref_lse[:, 0])
    assert np.isfinite(out).all()                   # no garbage block or tail was read


def test_decode_equals_the_streaming_paged_and_full_caches(rng):
    n, page_size = 23, 5
    q, k, v = rng.standard_normal((3, 4, n, 6))
    k, v = k[:2], v[:2]                             # 4 query heads, 2 KV heads
    pages = -(-n // page_size) + 2
    paged = paged_init(heads_q=4, heads_kv=2, d=6, dv=6, page_size=page_size,
                       num_pages=pages, allocation=tuple(rng.permutation(pages)))
    full = full_cache_init(heads_q=4, heads_kv=2, d=6, dv=6)
    for t in range(n):
        streamed, paged = paged_step(paged, q[:, t], k[:, t], v[:, t])
        _, full = full_cache_step(full, q[:, t], k[:, t], v[:, t])
        out = paged_attention(q[None, :, t], paged.key_pages, paged.value_pages,
                              [paged.page_table], [t + 1], kv_layout="HND")[0]
        # the same computation as attention on the full cache: bit for bit
        np.testing.assert_array_equal(out, ra.attention(q[:, t:t + 1], full.keys,
                                                        full.values)[:, 0])
        # the streaming step computes it in another order (attend_token)
        np.testing.assert_allclose(out, streamed, rtol=1e-13, atol=1e-14)


def test_paged_step_copies_one_page_and_leaves_old_states_unchanged(rng):
    k = rng.standard_normal((9, 1, 2))
    s = paged_init(heads_q=1, heads_kv=1, d=2, dv=2, page_size=4, num_pages=5,
                   allocation=(4, 1, 3))
    states = [s]
    for t in range(9):
        s = paged_step(s, k[t], k[t], k[t])[1]
        states.append(s)
    pools = [x.key_pages for x in states]
    branch = paged_step(states[6], k[0], -k[0], -k[0])[1]    # a second future of t = 6
    assert np.array_equal(branch.key_pages[1][0, 2], -k[0, 0])
    for x, pool in zip(states, pools):                        # no state has changed
        np.testing.assert_array_equal(x.key_pages, pool)
    assert np.array_equal(states[7].key_pages[1][0, 2], k[6, 0])
    # a step holds a new array only for the page it writes
    assert states[8].key_blocks[0] is states[7].key_blocks[0]
    assert states[8].key_blocks[1] is not states[7].key_blocks[1]
    assert all(x is y for x, y in zip(states[8].key_blocks, states[9].key_blocks[:2]))
    assert states[9].nbytes == states[0].nbytes == 5 * 4 * 2 * 2 * 8


@pytest.mark.parametrize("window, softcap", [(None, None), (20, None), (None, 2.0),
                                             (0, 5.0)])
def test_prefill_chunks_are_causal_bottom_right(rng, window, softcap):
    lens, q_lens = (5, 40, 77, 33), (5, 1, 16, 3)    # full prefill, decode, chunk, spec.
    kc, vc, table, seq_lens, keys, values = _paged(rng, lens, block_size=8, hkv=1, d=4,
                                                   dv=3)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((cu[-1], 2, 4))
    out, lse = paged_attention(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, return_lse=True,
                               window_left=window, softcap=softcap, scale=0.7)
    mask = None if window is None else ra.masks.sliding_window(window)
    # FlashAttention's varlen call on the packed contiguous cache, bit for bit
    packed = [np.concatenate([x.transpose(1, 0, 2) for x in xs]) for xs in (keys, values)]
    ref, ref_lse = ra.attention(q, *packed, cu_seqlens_q=cu, causal=True, mask=mask,
                                cu_seqlens_k=np.concatenate([[0], np.cumsum(lens)]),
                                softcap=softcap, scale=0.7, return_lse=True)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, ref_lse)
    for b, (m, n) in enumerate(zip(lens, q_lens)):
        qb = q[cu[b]:cu[b + 1]].transpose(1, 0, 2)
        ref, ref_lse = ra.attention(qb, keys[b], values[b], causal=True, mask=mask,
                                    softcap=softcap, scale=0.7, return_lse=True)
        np.testing.assert_array_equal(out[cu[b]:cu[b + 1]], ref.transpose(1, 0, 2))
        np.testing.assert_array_equal(lse[:, cu[b]:cu[b + 1]], ref_lse)
        # an independent loop with the alignment written out: position i' = i + m - n
        pos = np.arange(n)[:, None] + m - n
        keep = np.arange(m)[None, :] <= pos
        if window is not None:
            keep &= pos - np.arange(m)[None, :] <= window
        bias = None
        if softcap is not None:                      # softcap(s) - s, as an additive bias
            s = 0.7 * np.einsum("hnd,md->hnm", qb, keys[b][0])
            bias = softcap * np.tanh(s / softcap) - s
        naive, naive_lse = naive_attention(qb, keys[b], values[b], np.broadcast_to(
            keep, (2, n, m)), scale=0.7, bias=bias)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], naive.transpose(1, 0, 2),
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(lse[:, cu[b]:cu[b + 1]], naive_lse, rtol=1e-12)


def test_not_causal_sees_every_cached_key(rng):
    kc, vc, table, lens, keys, values = _paged(rng, (6, 11), block_size=4, hkv=2, d=3,
                                               dv=3)
    q = rng.standard_normal((5, 2, 3))
    cu = np.array([0, 2, 5])
    out = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, causal=False)
    for b in range(2):
        ref = ra.attention(q[cu[b]:cu[b + 1]].transpose(1, 0, 2), keys[b], values[b])
        np.testing.assert_array_equal(out[cu[b]:cu[b + 1]], ref.transpose(1, 0, 2))
    np.testing.assert_array_equal(out, paged_attention(q, kc, vc, table, lens, causal=False,
                                                       cu_seqlens_q=cu, window_left=-1))
    # a window without causality: i' - j <= 2 only, i' = i + L - n
    windowed = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, causal=False,
                               window_left=2)
    for b in range(2):
        n, m = cu[b + 1] - cu[b], lens[b]
        keep = np.arange(n)[:, None] + m - n - np.arange(m)[None, :] <= 2
        ref = ra.attention(q[cu[b]:cu[b + 1]].transpose(1, 0, 2), keys[b], values[b],
                           mask=keep)
        np.testing.assert_allclose(windowed[cu[b]:cu[b + 1]], ref.transpose(1, 0, 2),
                                   rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="3 query tokens but seq_lens"):   # causal: no
        paged_attention(q, kc, vc, table, [6, 2], cu_seqlens_q=cu)
    many = paged_attention(q, kc, vc, table, [6, 2], cu_seqlens_q=cu, causal=False)
    assert np.isfinite(many).all()


def test_block_size_one_and_empty_sequences(rng):
    lens = (0, 1, 9, 0)
    kc, vc, table, seq_lens, keys, values = _paged(rng, lens, block_size=1, hkv=1, d=2,
                                                   dv=2)
    q = rng.standard_normal((4, 3, 2))
    out, lse = paged_attention(q, kc, vc, table, seq_lens, return_lse=True)
    for b in (1, 2):
        np.testing.assert_array_equal(out[b], ra.attention(q[b][:, None], keys[b],
                                                           values[b])[:, 0])
    for b in (0, 3):                                 # padding slots: no key at all
        assert np.array_equal(out[b], np.zeros((3, 2))) and np.all(lse[:, b] == -np.inf)
    # packed: a sequence with no query, a padding slot with two queries
    out, lse = paged_attention(q, kc, vc, table, seq_lens, cu_seqlens_q=[0, 2, 2, 3, 4],
                               return_lse=True)
    assert np.array_equal(out[:2], np.zeros((2, 3, 2))) and np.all(lse[:, :2] == -np.inf)
    np.testing.assert_array_equal(out[2], ra.attention(q[2][:, None], keys[2],
                                                       values[2])[:, 0])
    assert out.shape == (4, 3, 2) and not np.isnan(out).any()
    empty = paged_attention(np.zeros((0, 3, 2)), kc, vc, table[:0], seq_lens[:0])
    assert empty.shape == (0, 3, 2)


def test_shared_prefix_blocks(rng):
    lens = (20, 23, 9)
    kc, vc, table, seq_lens, keys, values = _paged(rng, lens, block_size=4, hkv=1, d=3,
                                                   dv=2, share=3)
    assert table[1, 2] == table[0, 2] and table[2, 1] == table[0, 1]
    q = rng.standard_normal((3, 2, 3))
    out = paged_attention(q, kc, vc, table, seq_lens)
    for b in range(3):
        np.testing.assert_array_equal(out[b], ra.attention(q[b][:, None], keys[b],
                                                           values[b])[:, 0])
    np.testing.assert_array_equal(keys[1][:, :12], keys[0][:, :12])


def test_only_the_blocks_read_are_gathered(rng):
    kc, vc, table, lens, _, _ = _paged(rng, (7, 3), block_size=2, hkv=1, d=2, dv=2,
                                       spare=6)

    class Pool:                                      # a framework's array, by block
        def __init__(self, a):
            self.a, self.shape, self.read = a, a.shape, []

        def __getitem__(self, i):
            if isinstance(i, slice):
                return self.a[i]
            self.read.append(i)
            return self.a[i]

    pk, pv = Pool(kc), Pool(vc)
    q = rng.standard_normal((2, 1, 2))
    out = paged_attention(q, pk, pv, table, lens)
    wanted = sorted(table[0, :4].tolist() + table[1, :2].tolist())
    assert sorted(pk.read) == sorted(pv.read) == wanted
    np.testing.assert_array_equal(out, paged_attention(q, kc, vc, table, lens))


def test_low_precision_pool_converts_exactly(rng):
    import ml_dtypes
    kc, vc, table, lens, _, _ = _paged(rng, (9, 4), block_size=4, hkv=1, d=4, dv=4)
    bf = [x.astype(ml_dtypes.bfloat16) for x in (kc, vc)]
    q = rng.standard_normal((2, 2, 4)).astype(np.float16)
    out = paged_attention(q, *bf, table, lens)
    ref = paged_attention(q.astype(np.float64), *(x.astype(np.float64) for x in bf),
                          table, lens)
    np.testing.assert_array_equal(out, ref)


def _torch_reference(torch, query, key_cache, value_cache, query_lens, kv_lens,
                     block_tables, scale, sliding_window=None, soft_cap=None):
    """A float64 PyTorch reference of the vLLM layout written independently of refattn
    (the structure of vLLM's ``ref_paged_attn``: gather the blocks, repeat the KV heads,
    mask above the bottom-right diagonal); returns ``(out (total_q, Hq, Dv),
    lse (Hq, total_q))``."""
    _, block_size, hkv, _ = key_cache.shape
    outs, lses, start = [], [], 0
    for i, (n, m) in enumerate(zip(query_lens, kv_lens)):
        q = query[start:start + n] * scale
        blocks = block_tables[i, :(m + block_size - 1) // block_size].long()
        k = key_cache[blocks].reshape(-1, hkv, key_cache.shape[-1])[:m]
        v = value_cache[blocks].reshape(-1, hkv, value_cache.shape[-1])[:m]
        group = q.shape[1] // hkv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k)
        if soft_cap is not None:
            s = soft_cap * torch.tanh(s / soft_cap)
        ones = torch.ones(n, m, dtype=torch.float64)
        masked = torch.triu(ones, diagonal=m - n + 1).bool()
        if sliding_window is not None:
            masked |= ~torch.triu(ones, diagonal=m - n - sliding_window + 1).bool()
        s = s.masked_fill(masked, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v))
        lses.append(torch.logsumexp(s, dim=-1))
        start += n
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("sliding_window, soft_cap", [(None, None), (7, 3.0)])
def test_against_a_torch_float64_reference_of_the_vllm_layout(rng, sliding_window,
                                                               soft_cap):
    torch = pytest.importorskip("torch")
    q_lens, kv_lens = (1, 5, 13), (29, 18, 13)
    kc, vc, table, lens, _, _ = _paged(rng, kv_lens, block_size=4, hkv=2, d=8, dv=8)
    kc, vc = np.nan_to_num(kc), np.nan_to_num(vc)     # torch reads whole blocks
    table[table < 0] = 0
    table[table >= kc.shape[0]] = 0
    q = rng.standard_normal((sum(q_lens), 4, 8))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, kc, vc))
    tt, tl, tcu = (torch.tensor(x, dtype=torch.int32) for x in (table, lens, cu))
    ref, ref_lse = _torch_reference(torch, tq, tk, tv, q_lens, kv_lens, tt, 0.3,
                                    sliding_window, soft_cap)
    window = None if sliding_window is None else sliding_window - 1
    options = dict(cu_seqlens_q=tcu, scale=0.3, softcap=soft_cap, window_left=window)
    out, lse = paged_attention(tq, tk, tv, tt, tl, return_lse=True, **options)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse.detach().numpy(), rtol=1e-12)
    np.testing.assert_array_equal(out, paged_attention(q, kc, vc, table, lens,
                                                       **dict(options, cu_seqlens_q=cu)))
    do, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    ((ref * torch.tensor(do)).sum() + (ref_lse * torch.tensor(dlse)).sum()).backward()
    g = paged_attention_vjp(q, kc, vc, table, lens, do, grad_lse=dlse, **dict(
        options, cu_seqlens_q=cu))
    for name, t in (("q", tq), ("key_cache", tk), ("value_cache", tv)):
        np.testing.assert_allclose(g[name], t.grad.numpy(), rtol=1e-11, atol=1e-12,
                                   err_msg=name)


def test_vjp_scatters_the_contiguous_gradients_into_the_pool(rng):
    lens = (13, 6)
    kc, vc, table, seq_lens, keys, values = _paged(rng, lens, block_size=4, hkv=1, d=3,
                                                   dv=2, layout="HND")
    cu = np.array([0, 4, 6])                         # 4 and 2 query tokens
    q = rng.standard_normal((6, 2, 3))
    do = rng.standard_normal((6, 2, 2))
    g = ra.vjp(paged_attention, q, kc, vc, table, seq_lens, do, cu_seqlens_q=cu,
               kv_layout="HND")
    expect_k, expect_v = np.zeros(kc.shape), np.zeros(vc.shape)
    for b in range(2):
        gb = attention_vjp(q[cu[b]:cu[b + 1]].transpose(1, 0, 2), keys[b], values[b],
                           do[cu[b]:cu[b + 1]].transpose(1, 0, 2), causal=True)
        np.testing.assert_array_equal(g["q"][cu[b]:cu[b + 1]], gb["q"].transpose(1, 0, 2))
        for t in range(lens[b]):
            blk, off = table[b, t // 4], t % 4
            expect_k[blk, :, off], expect_v[blk, :, off] = gb["k"][:, t], gb["v"][:, t]
    np.testing.assert_array_equal(g["key_cache"], expect_k)
    np.testing.assert_array_equal(g["value_cache"], expect_v)


def test_vjp_matches_central_differences_with_shared_blocks(rng):
    kc, vc, table, lens, _, _ = _paged(rng, (5, 6), block_size=2, hkv=1, d=2, dv=2,
                                       share=2, spare=1)
    kc, vc = np.nan_to_num(kc), np.nan_to_num(vc)
    q = rng.standard_normal((3, 2, 2))
    cu = [0, 1, 3]
    do, dlse = rng.standard_normal((3, 2, 2)), rng.standard_normal((2, 3))

    def fn(q, key_cache, value_cache):
        return paged_attention(q, key_cache, value_cache, table, lens, cu_seqlens_q=cu,
                               softcap=4.0, return_lse=True)

    num = numerical_vjp(fn, dict(q=q, key_cache=kc, value_cache=vc), (do, dlse))
    g = paged_attention_vjp(q, kc, vc, table, lens, do, grad_lse=dlse, cu_seqlens_q=cu,
                            softcap=4.0)
    for name in num:
        np.testing.assert_allclose(g[name], num[name], rtol=1e-7, atol=1e-8, err_msg=name)
    assert np.any(g["key_cache"][table[0, 0]] != 0)       # the shared block
    assert np.all(g["key_cache"][np.setdiff1d(np.arange(kc.shape[0]), table[:, :3])] == 0)


def _good(rng):
    kc, vc, table, lens, _, _ = _paged(rng, (5, 9), block_size=4, hkv=2, d=3, dv=2)
    return rng.standard_normal((2, 4, 3)), kc, vc, table, lens


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(block_table=np.where(a["block_table"] == a["block_table"][1, 2],
                                             99, a["block_table"])),
     ValueError, r"block_table\[1, 2\] = 99 is not a block of key_cache"),
    (lambda a: a["block_table"].__setitem__((0, 1), -1), ValueError,
     r"block_table\[0, 1\] = -1"),
    (lambda a: a.update(seq_lens=np.array([5, 25])), ValueError,
     r"seq_lens\[1\] = 25 needs 7 blocks of block_size 4, but block_table \(2, 5\)"),
    (lambda a: a.update(seq_lens=np.array([-1, 9])), ValueError,
     r"seq_lens\[0\] = -1 is negative"),
    (lambda a: a.update(seq_lens=np.array([5])), ValueError, "one entry per row"),
    (lambda a: a.update(block_table=a["block_table"].astype(float)), TypeError,
     r"block_table must be an integer array .* float64 with shape \(2, 5\)"),
    (lambda a: a.update(seq_lens=[5.0, 9.0]), TypeError, "seq_lens must be an integer"),
    (lambda a: a.update(block_table=a["block_table"][0]), ValueError,
     r"block_table must have 2 dimensions, got shape \(5,\)"),
    (lambda a: a.update(q=np.zeros((2, 3, 3))), ValueError,
     r"Hq=3 must be a positive multiple of KV heads Hkv=2"),
    (lambda a: a.update(q=np.zeros((2, 4, 5))), ValueError,
     r"share the head dimension D; got q \(2, 4, 5\), key_cache \(.*, 4, 2, 3\)"),
    (lambda a: a.update(q=np.zeros((3, 4, 3))), ValueError,
     "one query token per sequence, B=2"),
    (lambda a: a.update(q=np.zeros((2, 1, 4, 3))), ValueError, r"q must have shape \(B"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :2]), ValueError,
     "key_cache and value_cache must share"),
    (lambda a: a.update(key_cache=a["key_cache"][0]), ValueError, "4-dimensional pool"),
    (lambda a: a.update(key_cache=a["key_cache"].astype(complex)), TypeError,
     "key_cache must have a real numeric dtype"),
    (lambda a: a.update(cu_seqlens_q=[0, 1]), ValueError, r"cu_seqlens_q must .* \(3,\)"),
    (lambda a: a.update(cu_seqlens_q=[1, 1, 2]), ValueError, "cu_seqlens_q must"),
    (lambda a: a.update(cu_seqlens_q=[0, 2, 1]), ValueError, "nondecreasing"),
    (lambda a: a.update(cu_seqlens_q=[0, 1, 3]), ValueError, "to total_q=2"),
    (lambda a: a.update(cu_seqlens_q=np.array([0.0, 1, 2])), TypeError,
     "cu_seqlens_q must be an integer"),
    (lambda a: a.update(kv_layout="nhd"), ValueError, "kv_layout must be one of"),
    (lambda a: a.update(window_left=-2), ValueError, "window_left must be an integer >= 0"),
    (lambda a: a.update(causal="yes"), ValueError, "causal must be one of"),
    (lambda a: a.update(causal=1), TypeError, "causal must be True or False"),
    (lambda a: a.update(return_lse="no"), TypeError, "return_lse must be True or False"),
    (lambda a: a.update(check_finite=None), TypeError, "check_finite must be True or"),
])
def test_bad_input_raises_naming_the_argument(rng, change, error, match):
    q, kc, vc, table, lens = _good(rng)
    args = dict(q=q, key_cache=kc, value_cache=vc, block_table=table, seq_lens=lens)
    change(args)
    with pytest.raises(error, match=match):
        paged_attention(**args)


def test_non_finite_values_that_are_read_raise(rng):
    q, kc, vc, table, lens = _good(rng)
    blk = table[1, 1]
    kc[blk, 3, 1, 0] = np.inf                        # token 7 of sequence 1, KV head 1
    where = rf"sequence 1 reads: block {blk}, offset 3, KV head 1 \(its token 7\)"
    with pytest.raises(ValueError, match=where):
        paged_attention(q, kc, vc, table, lens)
    with np.errstate(invalid="ignore"):              # inf - inf in sequence 1's softmax
        out = paged_attention(q, kc, vc, table, lens, check_finite=False)
    assert np.isfinite(out[0]).all()
    q[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="q .* non-finite"):
        paged_attention(q, np.nan_to_num(kc), vc, table, lens)


def test_vjp_checks_the_cotangents(rng):
    q, kc, vc, table, lens = _good(rng)
    with pytest.raises(ValueError, match=r"grad_out must have .* shape \(2, 4, 2\)"):
        paged_attention_vjp(q, kc, vc, table, lens, np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"grad_lse must have the output's shape \(4, 2\)"):
        paged_attention_vjp(q, kc, vc, table, lens, np.zeros((2, 4, 2)),
                            grad_lse=np.zeros((2, 4)))
