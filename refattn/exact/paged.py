r"""Attention over a paged KV cache in the vLLM / FlashInfer layout: the oracle for a
paged-attention (decode, prefill, chunked-prefill or speculative-decoding) kernel.

A pool of fixed-size blocks holds the keys and values of every sequence; sequence ``b``
owns the blocks ``block_table[b, :ceil(L_b / block_size)]`` in logical order, and its
token ``t`` lives at offset ``t % block_size`` of block ``block_table[b, t // block_size]``
(PagedAttention, Kwon et al. 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention"; FlashInfer, Ye et al. 2025). With ``K_b``, ``V_b`` the
``L_b = seq_lens[b]`` tokens gathered in that order and ``Q_b`` the sequence's ``n_b``
query tokens (its LAST ``n_b`` tokens),

.. math:: O_b = \operatorname{softmax}\big(\text{mask}(\text{softcap}(
          \text{scale}\cdot Q_b K_b^\top))\big) V_b ,

causal aligned bottom-right: query ``i`` (position ``i' = i + L_b - n_b``) sees key
``j`` iff ``j <= i'`` (and ``i' - j <= window_left`` with a window). Each sequence is
computed by :func:`refattn.attention` on its gathered keys, so a result is bit-identical
to that call on the contiguous cache. Only the blocks a sequence reads are gathered (and
converted, and checked for non-finite values): pools are large, and the unused blocks and
the tail of a last block often hold garbage (``torch.empty``).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_choice, check_cotangent, check_int
from ..boundary.arrays import host_array, to_float64
from ..masks import sliding_window
from .dense import attention, attention_vjp

__all__ = ["paged_attention", "paged_attention_vjp", "KV_LAYOUTS"]

#: Pool layouts (FlashInfer's ``kv_layout``): ``"NHD"`` is ``(num_blocks, block_size,
#: Hkv, D)`` (vLLM, FlashInfer's default, FlashAttention's ``block_table`` API),
#: ``"HND"`` is ``(num_blocks, Hkv, block_size, D)`` (FlashInfer's alternative, and the
#: pool of :func:`refattn.kvcache.paged_init` with ``batch_shape=()``).
KV_LAYOUTS = ("NHD", "HND")


def _index_array(x, name: str, ndim: int) -> np.ndarray:
    """An integer array (int32 as vLLM/FlashInfer use, any integer type accepted) of
    ``ndim`` dimensions as int64; a ``TypeError`` for a non-integer dtype."""
    arr = host_array(x, name)
    if not hasattr(x, "dtype") and arr.size == 0:
        arr = arr.astype(np.int64)                      # [] from a Python list
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (int32 in vLLM and FlashInfer), "
                        f"got dtype {arr.dtype} with shape {arr.shape}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' * (ndim > 1)}, got shape "
                         f"{arr.shape}")
    return arr.astype(np.int64)


def _pool(x, name: str):
    """``x`` as a pool that can be indexed by block (kept in its own framework and dtype,
    so only the blocks read are converted); its dtype is checked here."""
    if not (hasattr(x, "shape") and hasattr(x, "__getitem__")):
        x = to_float64(x, name, check_finite=False)     # a Python sequence
    if len(x.shape) != 4:
        raise ValueError(f"{name} must be a 4-dimensional pool (num_blocks, block_size, "
                         f"Hkv, D) (NHD) or (num_blocks, Hkv, block_size, D) (HND), got "
                         f"shape {tuple(x.shape)}")
    to_float64(x[:0], name)                              # a real numeric dtype
    return x, tuple(int(s) for s in x.shape)


class _Plan:
    """A validated call: float64 ``q (T, Hq, D)``, the pools, ``table (B, W)``, ``lens
    (B,)``, ``starts (B + 1,)``, the sizes, and how to gather a sequence's tokens."""

    def __init__(self, q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q,
                 causal, window_left, kv_layout, check_finite):
        self.layout = check_choice("kv_layout", kv_layout, KV_LAYOUTS)
        if isinstance(causal, str):
            self.causal = check_choice("causal", causal, ("bottom_right", "top_left"))
        else:
            self.causal = "bottom_right" if check_bool("causal", causal) else None
        if window_left is not None and not (isinstance(window_left, (int, np.integer))
                                            and window_left == -1):
            window_left = check_int("window_left", window_left, minimum=0)
        self.window = None if window_left in (None, -1) else window_left
        self.check_finite = check_finite = check_bool("check_finite", check_finite)
        q = to_float64(q, "q", check_finite=check_finite)
        self.key_cache, ks = _pool(key_cache, "key_cache")
        self.value_cache, vs = _pool(value_cache, "value_cache")
        self.key_shape, self.value_shape = ks, vs
        nhd = self.layout == "NHD"
        self.num_blocks, self.block_size = ks[0], ks[1 if nhd else 2]
        self.hkv, self.d, self.dv = ks[2 if nhd else 1], ks[3], vs[3]
        shapes = f"key_cache {ks}, value_cache {vs}"
        if vs[:3] != ks[:3]:
            raise ValueError(f"key_cache and value_cache must share (num_blocks, "
                             f"block_size, Hkv) ({self.layout}); got {shapes}")
        if self.block_size < 1 or self.hkv < 1 or self.d < 1:
            raise ValueError(f"block_size, Hkv and D must be positive; got {shapes} "
                             f"(kv_layout={self.layout!r})")
        if q.ndim != 3:
            raise ValueError(f"q must have shape (B, Hq, D) (decode) or (total_q, Hq, D) "
                             f"with cu_seqlens_q (packed, FlashAttention's varlen layout); "
                             f"got shape {q.shape}")
        self.hq = q.shape[1]
        if q.shape[2] != self.d:
            raise ValueError(f"q and key_cache must share the head dimension D; got q "
                             f"{q.shape}, {shapes} (kv_layout={self.layout!r})")
        if self.hq == 0 or self.hq % self.hkv:
            raise ValueError(f"query heads Hq={self.hq} must be a positive multiple of KV "
                             f"heads Hkv={self.hkv} (grouped-query attention); got q "
                             f"{q.shape}, {shapes} (kv_layout={self.layout!r})")
        self.q = q
        self._lengths(block_table, seq_lens, cu_seqlens_q)

    def _lengths(self, block_table, seq_lens, cu_seqlens_q):
        table = _index_array(block_table, "block_table", 2)
        lens = _index_array(seq_lens, "seq_lens", 1)
        batch, width = table.shape
        if lens.shape != (batch,):
            raise ValueError(f"seq_lens must have one entry per row of block_table, shape "
                             f"({batch},); got seq_lens {lens.shape}, block_table "
                             f"{table.shape}")
        if cu_seqlens_q is None:
            if self.q.shape[0] != batch:
                raise ValueError(f"decode: q (B, Hq, D) needs one query token per "
                                 f"sequence, B={batch} rows of block_table; got q "
                                 f"{self.q.shape}, "
                                 f"block_table {table.shape} (pass cu_seqlens_q for "
                                 f"several query tokens per sequence)")
            starts = np.arange(batch + 1)
        else:
            starts = _index_array(cu_seqlens_q, "cu_seqlens_q", 1)
            if starts.shape != (batch + 1,) or starts[0] != 0 or \
                    np.any(np.diff(starts) < 0) or starts[-1] != self.q.shape[0]:
                raise ValueError(f"cu_seqlens_q must be nondecreasing offsets (B + 1,) = "
                                 f"({batch + 1},) from 0 to total_q={self.q.shape[0]} "
                                 f"(q {self.q.shape}); got {starts.tolist()}")
        for b in range(batch):
            length, n = int(lens[b]), int(starts[b + 1] - starts[b])
            if length < 0:
                raise ValueError(f"seq_lens[{b}] = {length} is negative (seq_lens "
                                 f"{lens.shape})")
            need = -(-length // self.block_size)
            if need > width:
                raise ValueError(f"seq_lens[{b}] = {length} needs {need} blocks of "
                                 f"block_size {self.block_size}, but block_table "
                                 f"{table.shape} has {width} columns")
            ids = table[b, :need]
            bad = np.flatnonzero((ids < 0) | (ids >= self.num_blocks))
            if bad.size:
                j = int(bad[0])
                raise ValueError(f"block_table[{b}, {j}] = {int(ids[j])} is not a block of "
                                 f"key_cache {self.key_shape} (num_blocks="
                                 f"{self.num_blocks}); sequence {b} reads its first "
                                 f"{need} entries (entries past them are never read)")
            if self.causal == "bottom_right" and 0 < length < n:
                raise ValueError(f"sequence {b} has {n} query tokens but seq_lens[{b}] = "
                                 f"{length}: the queries are a sequence's last tokens, so "
                                 f"seq_lens counts them too (seq_lens 0 marks a padding "
                                 f"slot, whose rows give 0)")
        self.table, self.lens, self.starts = table, lens, starts

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    def attention_kwargs(self, b: int) -> dict:
        """``mask`` and ``causal`` of :func:`refattn.attention` for sequence ``b``."""
        causal = {"bottom_right": True, None: False}.get(self.causal, self.causal)
        mask = None
        if self.window is not None:
            align = "top_left" if self.causal == "top_left" else "bottom_right"
            right = 0 if self.causal else int(self.lens[b]) + int(self.q.shape[0])
            mask = sliding_window(self.window, right, align=align)
        return {"mask": mask, "causal": causal}

    def positions(self, b: int):
        """``(blocks, offsets)`` of the ``L_b`` tokens of sequence ``b``."""
        t = np.arange(int(self.lens[b]))
        return self.table[b, t // self.block_size], t % self.block_size

    def tokens(self, b: int):
        """``(k (Hkv, L, D), v (Hkv, L, Dv))`` of sequence ``b``, float64, gathered from
        its blocks only (the layout of :func:`refattn.attention`)."""
        length = int(self.lens[b])
        ids = self.table[b, :-(-length // self.block_size)]
        return tuple(self._gather(pool, ids, length, name, b) for pool, name in
                     ((self.key_cache, "key_cache"), (self.value_cache, "value_cache")))

    def _gather(self, pool, ids, length, name, b):
        if isinstance(pool, np.ndarray):
            blocks = to_float64(pool[ids], name, check_finite=False)
        elif len(ids):                                 # any framework: one block at a time
            blocks = np.stack([to_float64(pool[int(i)], name, check_finite=False)
                               for i in ids])
        else:
            blocks = np.zeros((0,) + tuple(int(s) for s in pool.shape[1:]))
        n, *rest = blocks.shape
        if self.layout == "NHD":                       # (n, bs, H, D) -> (H, L, D)
            x = blocks.reshape((n * rest[0],) + tuple(rest[1:]))[:length]
            x = x.transpose(1, 0, 2)
        else:                                          # (n, H, bs, D) -> (H, L, D)
            x = blocks.transpose(1, 0, 2, 3).reshape(rest[0], n * rest[1], rest[2])
            x = x[:, :length]
        if self.check_finite and not np.isfinite(x).all():
            h, t, _ = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise ValueError(f"{name} {tuple(pool.shape)} holds a non-finite value that "
                             f"sequence {b} reads: block {int(ids[t // self.block_size])}, "
                             f"offset {t % self.block_size}, KV head {h} (its token {t}); "
                             f"pass check_finite=False to allow it")
        return x


def paged_attention(q, key_cache, value_cache, block_table, seq_lens, *, cu_seqlens_q=None,
                    causal=True, scale=None, softcap=None, window_left=None,
                    kv_layout="NHD", return_lse=False, check_finite=True,
                    memory_budget=None):
    """Exact attention over a paged KV cache (vLLM / FlashInfer / FlashAttention
    ``block_table`` layout), float64.

    Parameters
    ----------
    q : ``(B, Hq, D)`` for decoding (one query token per sequence, vLLM's
        ``paged_attention`` and FlashInfer's batch decode), or ``(total_q, Hq, D)`` with
        ``cu_seqlens_q`` (prefill, chunked prefill, speculative decoding: the packed
        layout of FlashAttention's ``flash_attn_varlen_func`` and vLLM's
        ``query_start_loc``). A sequence's queries are its LAST tokens.
    key_cache : pool ``(num_blocks, block_size, Hkv, D)`` (``kv_layout="NHD"``) or
        ``(num_blocks, Hkv, block_size, D)`` (``"HND"``). A combined FlashInfer cache
        ``(num_blocks, 2, ...)`` is passed as ``kv[:, 0], kv[:, 1]``. Any framework and
        dtype; only the blocks read are converted to float64.
    value_cache : the same with ``Dv``.
    block_table : integer ``(B, max_blocks_per_seq)``, physical block ids in logical
        order. Only the first ``ceil(seq_lens[b] / block_size)`` entries of row ``b`` are
        read (and checked to lie in ``[0, num_blocks)``); the padding after them may hold
        anything. Blocks may be shared between sequences (prefix caching).
    seq_lens : integer ``(B,)``, the tokens cached per sequence, its queries included
        (vLLM's ``seq_lens``/``seqused_k``; FlashInfer's ``(len(pages) - 1) *
        page_size + last_page_len``). ``0`` marks a padding slot: its query rows give
        output 0 and lse ``-inf``, as fully masked rows do everywhere in refattn.
    cu_seqlens_q : integer ``(B + 1,)`` offsets of each sequence's queries in ``q``
        (``None``: decode, ``arange(B + 1)``). With causal masking a sequence needs
        ``seq_lens[b] >= n_b`` query tokens (or ``seq_lens[b] == 0``).
    causal : ``True`` (default, as every paged kernel decodes; unlike
        :func:`refattn.attention`'s default) or ``"bottom_right"``: query ``i`` sees key
        ``j <= i + L_b - n_b``; ``False``: every query sees all ``L_b`` keys;
        ``"top_left"`` is passed on to :func:`refattn.attention`.
    scale : float, default ``1/sqrt(D)`` (vLLM's ``scale``, FlashInfer's ``sm_scale``).
    softcap : logits become ``softcap * tanh(s / softcap)`` (Gemma 2; vLLM's
        ``soft_cap``, FlashInfer's ``logits_soft_cap``).
    window_left : keep keys with ``i' - j <= window_left`` (FlashInfer's
        ``window_left``, FlashAttention's ``window_size[0]``, vLLM's ``sliding_window -
        1``); ``None`` or ``-1``: no window.
    kv_layout : ``"NHD"`` (default) or ``"HND"``, see :data:`KV_LAYOUTS`.
    return_lse : also return the log-sum-exp ``(Hq, total_q)`` (``(Hq, B)`` for decode),
        as refattn's and FlashAttention's varlen calls give it (FlashInfer's
        ``return_lse`` is its transpose, ``(total_q, Hq)``).
    check_finite : raise on non-finite values in ``q`` or in the cached tokens read.
    memory_budget : bytes of working memory per sequence (see :func:`refattn.attention`).

    Returns
    -------
    float64 ``(total_q, Hq, Dv)`` (``(B, Hq, Dv)`` for decode), and the lse if asked.
    Row ``cu_seqlens_q[b] + i`` is ``refattn.attention(Q_b, K_b, V_b, causal=...)`` bit for
    bit, with ``Q_b (Hq, n_b, D)`` and the gathered ``K_b (Hkv, L_b, D)``. GQA: query
    head ``h`` reads KV head ``h // (Hq // Hkv)``. ALiBi and other score modifiers are
    not taken here.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> k_pool, v_pool = rng.standard_normal((2, 6, 4, 1, 8))  # 6 blocks of 4 tokens
    >>> table = np.array([[5, 2], [0, 0]], dtype=np.int32)     # sequence 0: blocks 5, 2
    >>> lens = np.array([7, 3], dtype=np.int32)
    >>> q = rng.standard_normal((2, 2, 8))                     # decode, 2 query heads
    >>> out = paged_attention(q, k_pool, v_pool, table, lens)
    >>> k0, v0 = (np.concatenate([p[5], p[2]])[:7].transpose(1, 0, 2)
    ...           for p in (k_pool, v_pool))                   # (Hkv, 7, D)
    >>> bool(np.array_equal(out[0], ra.attention(q[0][:, None], k0, v0)[:, 0]))
    True
    """
    return_lse = check_bool("return_lse", return_lse)
    plan = _Plan(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, causal,
                 window_left, kv_layout, check_finite)
    total = plan.q.shape[0]
    out = np.full((total, plan.hq, plan.dv), np.nan)      # poisoned: every row is written
    lse = np.full((plan.hq, total), np.nan)
    for b in range(plan.batch):
        rows = slice(int(plan.starts[b]), int(plan.starts[b + 1]))
        if rows.start == rows.stop:
            continue
        k, v = plan.tokens(b)
        o, s = attention(plan.q[rows].transpose(1, 0, 2), k, v, scale=scale,
                         softcap=softcap, return_lse=True, check_finite=False,
                         memory_budget=memory_budget, **plan.attention_kwargs(b))
        out[rows], lse[:, rows] = o.transpose(1, 0, 2), s
    return (out, lse) if return_lse else out


def paged_attention_vjp(q, key_cache, value_cache, block_table, seq_lens, grad_out, *,
                        grad_lse=None, cu_seqlens_q=None, causal=True, scale=None,
                        softcap=None, window_left=None, kv_layout="NHD", check_finite=True,
                        memory_budget=None):
    """Gradients of :func:`paged_attention`: ``{"q", "key_cache", "value_cache"}``, each
    float64 in its input's shape (``block_table`` and ``seq_lens`` are positional, as in
    the forward, and not differentiated).

    Each sequence's gradients come from :func:`refattn.exact.attention_vjp` on its
    gathered keys; a token's key/value gradient is added at its place in the pool, so a
    block shared by several sequences (prefix caching) sums their gradients, and blocks
    (or the tail of a block) no sequence reads get 0. ``grad_out``: ``(total_q, Hq,
    Dv)`` (the output's shape), ``grad_lse``: ``(Hq, total_q)`` (the lse's) or None.
    The pool gradients are pool-sized float64 arrays. ``refattn.vjp(paged_attention, q,
    key_cache, value_cache, block_table, seq_lens, grad_out, ...)`` calls this.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> k_pool, v_pool = rng.standard_normal((2, 3, 2, 1, 4))  # 3 blocks of 2 tokens
    >>> q = rng.standard_normal((1, 1, 4))
    >>> g = paged_attention_vjp(q, k_pool, v_pool, [[2, 0]], [3], np.ones((1, 1, 4)))
    >>> w = g["value_cache"][:, :, 0, 0]      # the weights of the 3 tokens read
    >>> w.round(3)                            # block 2, then block 0's first token
    array([[0.368, 0.   ],
           [0.   , 0.   ],
           [0.097, 0.535]])
    >>> float(w.sum().round(12))
    1.0
    """
    plan = _Plan(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, causal,
                 window_left, kv_layout, check_finite)
    total = plan.q.shape[0]
    do = check_cotangent(grad_out, "grad_out", (total, plan.hq, plan.dv),
                         check_finite=check_finite)
    dlse = check_cotangent(grad_lse, "grad_lse", (plan.hq, total),
                           check_finite=check_finite)
    dq = np.zeros(plan.q.shape)
    dk, dv = np.zeros(plan.key_shape), np.zeros(plan.value_shape)
    for b in range(plan.batch):
        rows = slice(int(plan.starts[b]), int(plan.starts[b + 1]))
        if rows.start == rows.stop:
            continue
        k, v = plan.tokens(b)
        g = attention_vjp(plan.q[rows].transpose(1, 0, 2), k, v,
                          do[rows].transpose(1, 0, 2),
                          grad_lse=None if dlse is None else dlse[:, rows], scale=scale,
                          softcap=softcap, check_finite=False, memory_budget=memory_budget,
                          **plan.attention_kwargs(b))
        dq[rows] = g["q"].transpose(1, 0, 2)
        blocks, offsets = plan.positions(b)
        where = ((blocks, offsets) if plan.layout == "NHD"
                 else (blocks, slice(None), offsets))
        np.add.at(dk, where, g["k"].transpose(1, 0, 2))   # (L, Hkv, D) per token
        np.add.at(dv, where, g["v"].transpose(1, 0, 2))
    return {"q": dq, "key_cache": dk, "value_cache": dv}


paged_attention.vjp = paged_attention_vjp
