r"""MoBA, Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention
for Long-Context LLMs", Moonshot AI): the keys are cut into blocks of ``B`` positions and
each query attends to the ``topk`` blocks its gate picks.

For query ``t`` of query head ``h`` (bottom-right aligned position ``t' = t + M - N``),
with block ``c`` covering keys ``[c B, min((c+1) B, M))``:

.. math::

    s_c = q_t \cdot \operatorname{mean}_{j \in c} k_j, \qquad
    I_t = \{\lfloor t'/B \rfloor\} \cup \operatorname{top}_{k-1}\{ c < \lfloor t'/B
    \rfloor : s_c \}, \qquad
    o_t = \operatorname{softmax}_{j \in I_t,\ j \le t'}(s\, q_t k_j^\top)\, v_j :

the query's **current block is always kept** (and causally masked inside), the other
``topk - 1`` are the best-scoring blocks **before** it (future blocks are never routed
to); ties go to the lower block index; a query with fewer earlier blocks keeps them all.
The gate uses the unscaled ``q`` (a positive scale changes no ranking) and has no
parameters; the kept keys are attended exactly, so the output equals
:func:`refattn.attention` under the selection's mask. GQA: every query head chooses its
own blocks, scoring them with its KV head's block means.

The paper's models are decoders: ``causal=True`` is MoBA as published. ``causal=False``
(refattn's default, as everywhere) lets a query pick among all blocks but its own, which
it keeps whole. A query before the first key (``t' < 0``, only when ``N > M``) sees
nothing when causal and has no current block otherwise.

flash-linear-attention ships MoBA only as ``parallel_moba``, a flash-attn (CUDA)
kernel; with ``topk = 1`` it falls back to full causal attention, where MoBA's definition
(and this reference) attends to the current block alone
(:func:`refattn.chunked_attention` with ``chunk_size = B``).

**Gradients** (:func:`moba_attention_vjp`): the selection held fixed, as MoBA trains
(the gate has no parameters, and top-k is not differentiable): the softmax backward over
each query's kept keys.

**Memory and order of work.** The forward runs **key block by key block**, as MoBA's
own implementation does: the gate picks each query's blocks (one block of query rows at
a time: ``G x rows x M/B`` scores), then the queries that kept block ``c`` are gathered
and attend its ``B`` keys, their partial softmax states merged online (FlashAttention's
rescaling). Working memory is the running state of one KV group's queries plus one
piece of at most ``BLOCK_ELEMENTS`` logits, and the gather moves ``N·topk·D`` query
values, not ``N·topk·B·D`` key values (32k tokens, ``B = 512``, ``topk = 4``: 131 s
before, 10 s now). The implied matrix and the VJP go query block by query block: each
row's ``topk·B`` keys either gathered or, when that is more than ``M / GATHER_COST``
(:mod:`refattn.sparse._common`), attended densely under a mask over the span of keys
the block's rows keep; the forward is tested against them.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int, check_size_memory, resolve_scale
from .._core.problem import prepare_qkv
from .._core.select import BLOCK_ELEMENTS, block_rows, topk_keep
from .._core.softmax import finish_rows
from ..registry import attach, register
from ._common import (block_keys, dense_is_cheaper, gather_attention, selection_vjp,
                      ranked_indices, spread_rows)

__all__ = ["moba_attention", "moba_attention_matrix", "moba_attention_vjp"]


class _Plan:
    """Blocks, their mean keys and the query positions of one call."""

    def __init__(self, k, pb, block_size, topk, causal, block_q):
        ctx = f" (k has M={pb.m} keys)"
        # a block past the keys holds them all: the same as one block of M keys
        self.size = min(check_int("block_size", block_size, minimum=1, context=ctx),
                        max(pb.m, 1))
        self.topk = check_int("topk", topk, minimum=1,
                              context=" (blocks kept per query, counting its own)")
        self.causal = check_bool("causal", causal)
        self.m = pb.m
        starts = np.arange(0, pb.m, self.size)
        self.nb = len(starts)
        self.keep = max(min(self.topk, self.nb), 1)   # topk of fewer blocks: all of them
        if self.nb:
            sizes = np.minimum(starts + self.size, pb.m) - starts
            self.means = np.add.reduceat(k, starts, axis=2) / sizes[:, None]
        else:
            self.means = k[:, :, :0]
        self.pos = np.arange(pb.n) + (pb.m - pb.n)
        width = self.keep * self.size
        per_key = 3 if dense_is_cheaper(width, pb.m) else pb.d + pb.dv + 3
        per_row = pb.group * (self.nb * 2 + min(width, pb.m) * per_key)
        self.rows = (block_rows(block_q, 1, 1, 1) if block_q is not None
                     else max(1, BLOCK_ELEMENTS // max(per_row, 1)))
        # the forward's gate alone: G x rows x nb scores and their top-k temporaries
        self.gate_rows = (self.rows if block_q is not None
                          else max(1, BLOCK_ELEMENTS // max(4 * pb.group * self.nb, 1)))

    def choose(self, qb, means, pos):
        """``(G, r, nb)``: the blocks kept by the unscaled query block ``qb (G, r, D)``
        scoring its KV head's block ``means (nb, D)``."""
        c = np.arange(self.nb)[None, :]
        own = np.where(pos >= 0, np.floor_divide(pos, self.size), -1)[:, None]
        cand = (c < own) if self.causal else (c != own)
        g, r, d = qb.shape
        score = np.where(cand, (qb.reshape(g * r, d) @ means.T).reshape(g, r, -1), -np.inf)
        score = np.where(c == own, np.inf, score)           # the current block, always
        return topk_keep(score, self.keep)

    def keys(self, qb, means, rows):
        """``(chosen, cols, keep)``: the kept blocks ``(G, r, nb)`` and their keys."""
        pos = self.pos[rows]
        chosen = self.choose(qb, means, pos)
        return (chosen,) + block_keys(chosen, self.size, self.m, pos, self.causal,
                                      self.keep)


def _selection(q, pb, plan, b, hk, hs, rows):
    """``(G, r, keep)`` int64: the blocks each query row of KV group ``(b, hk)`` in
    ``rows`` keeps, ascending, ``-1`` padded; the gate scores one block of rows at a
    time."""
    sel = np.empty((hs.stop - hs.start, rows.stop - rows.start, plan.keep), np.int64)
    for r0 in range(rows.start, rows.stop, plan.gate_rows):
        part = slice(r0, min(r0 + plan.gate_rows, rows.stop))
        chosen = plan.choose(q[b, hs, part], plan.means[b, hk], plan.pos[part])
        sel[:, part.start - rows.start:part.stop - rows.start] = ranked_indices(
            chosen, plan.keep)
    return sel


def _block_major(q, k, v, pb, plan, scale, out, lse, sel_out=None):
    """The forward key block by key block (as MoBA's own implementation runs it): the
    queries that kept block ``c`` are gathered and attend its ``B`` keys, their partial
    softmax states merged online per query (FlashAttention's rescaling). Gathers
    ``N·topk·D`` query values instead of ``N·topk·B·D`` key values. Query rows go in
    chunks whose (row, kept block) index lists stay within ``2·BLOCK_ELEMENTS`` entries,
    logits in pieces of at most ``BLOCK_ELEMENTS``. Fills ``out (B, Hq, N, Dv)`` (it
    holds the running sums), ``lse (B, Hq, N)`` and, if given, ``sel_out``."""
    piece = max(1, BLOCK_ELEMENTS // plan.size)
    for b, hk, hs in pb.kv_groups():
        g = hs.stop - hs.start
        chunk = max(1, 2 * BLOCK_ELEMENTS // (g * plan.keep))
        for r0 in range(0, pb.n, chunk):
            rows = slice(r0, min(r0 + chunk, pb.n))
            sel = _selection(q, pb, plan, b, hk, hs, rows)
            if sel_out is not None:
                sel_out[b, hs, rows] = -1
                sel_out[b, hs, rows, :plan.keep] = sel
            _attend_blocks(q[b, hs, rows], k[b, hk], v[b, hk], plan.pos[rows], sel, plan,
                           scale, piece, out[b, hs, rows], lse[b, hs, rows])


def _attend_blocks(qs, keys, values, pos, sel, plan, scale, piece, out, lse):
    """``qs (G, r, D)`` attend the blocks ``sel (G, r, keep)`` of ``keys (M, D)``,
    ``values (M, Dv)``, a block at a time; writes ``out (G, r, Dv)`` (a view, used for
    the running sums) and ``lse (G, r)``."""
    blocks = sel.reshape(-1)
    kept = np.flatnonzero(blocks >= 0)
    order = kept[np.argsort(blocks[kept], kind="stable")]
    pairs = order // plan.keep                       # flat (head, row) of each pair
    heads, rows = np.divmod(pairs, qs.shape[1])
    sorted_blocks = blocks[order]
    starts = np.flatnonzero(np.diff(sorted_blocks, prepend=-1))
    ends = np.append(starts[1:], len(order))
    run_max = np.full(qs.shape[:2], -np.inf)
    run_sum = np.zeros(qs.shape[:2])
    out[...] = 0.0
    for a, z in zip(starts, ends):                   # the blocks some query kept
        c = int(sorted_blocks[a])
        c0, c1 = c * plan.size, min((c + 1) * plan.size, plan.m)
        kb, vb = keys[c0:c1], values[c0:c1]
        for p0 in range(a, z, piece):
            h, r = heads[p0:min(p0 + piece, z)], rows[p0:min(p0 + piece, z)]
            s = qs[h, r] @ kb.T
            s *= scale
            if plan.causal:
                np.copyto(s, -np.inf, where=np.arange(c0, c1) > pos[r, None])
            new_max = np.maximum(run_max[h, r], s.max(axis=-1))
            safe = np.where(np.isneginf(new_max), 0.0, new_max)
            s -= safe[:, None]
            np.exp(s, out=s)
            alpha = np.exp(run_max[h, r] - safe)
            run_sum[h, r] = run_sum[h, r] * alpha + s.sum(axis=-1)
            out[h, r] = out[h, r] * alpha[:, None] + s @ vb
            run_max[h, r] = new_max
    run_max[np.isneginf(run_max)] = 0.0
    finish_rows(out, run_max, run_sum, out, lse)


def _run(q, k, v, pb, plan, scale):
    """Yield ``(b, hk, heads, rows, chosen, (p, lse, out, kg, vg), cols)`` per block."""
    for b, hk, hs, rows in pb.query_blocks(plan.rows):
        qb = q[b, hs, rows]
        chosen, cols, keep = plan.keys(qb, plan.means[b, hk], rows)
        res = gather_attention(qb * scale, k[b, hk], None if v is None else v[b, hk],
                               cols, keep)
        yield b, hk, hs, rows, chosen, res, cols


@register(family="sparse", exact=False, time="O(N·(M/B + topk·B)·D)",
          state="O(M·D) KV cache", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=False,
          example={"block_size": 3, "topk": 2},
          budget=lambda n, b: {"block_size": max(1, b // 4), "topk": 4})
def moba_attention(q, k, v, *, block_size, topk, causal=False, scale=None,
                   return_lse=False, return_selection=False, check_finite=True,
                   block_q=None):
    r"""MoBA: each query attends to its current key block and the ``topk - 1`` earlier
    blocks whose mean key scores highest (module docstring; Lu et al. 2025).

    Parameters
    ----------
    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)``; ``Hq`` a
        multiple of ``Hkv`` (each query head selects its own blocks).
    block_size : ``B``, keys per block (the last block may be shorter; ``B >= M``: one
        block of all the keys).
    topk : blocks kept per query, counting its current block (``topk >= M/B``: all
        earlier blocks, i.e. exact attention when causal).
    causal : MoBA as published (see the module docstring for ``False``).
    scale : logit scale (default ``1/sqrt(D)``); the gate is unscaled.
    return_lse : also return the ``(..., Hq, N)`` log-sum-exp over the kept keys.
    return_selection : also return the kept blocks, int64 ``(..., Hq, N, topk)``
        ascending, ``-1`` padded (heads-first in any layout).
    block_q : query rows per block (default: by memory).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (then the lse, then the selection, as asked).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 12, 4))             # 2 heads, 12 tokens
    >>> out, sel = ra.sparse.moba_attention(q, k, v, block_size=3, topk=2, causal=True,
    ...                                     return_selection=True)
    >>> sel[0, 11].tolist()                           # its own block 3 and one earlier
    [1, 3]
    >>> keep = np.zeros((12, 12), bool); keep[11, [3, 4, 5, 9, 10, 11]] = True
    >>> bool(np.allclose(out[0, 11], ra.attention(q[:1], k[:1], v[:1], mask=keep)[0, 11]))
    True
    """
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    plan = _Plan(k, pb, block_size, topk, causal, block_q)
    out, lse = pb.poisoned_outputs()
    return_selection = check_bool("return_selection", return_selection)
    if return_selection:
        check_size_memory(8.0 * pb.batch * pb.heads_q * pb.n * plan.topk, None,
                          "moba_attention's selection", f"topk={plan.topk:,}",
                          f"topk <= {plan.nb:,} (all the blocks) or return_selection=False",
                          adjustable=False)
        sel = np.full((pb.batch, pb.heads_q, pb.n, plan.topk), -2, dtype=np.int64)
    _block_major(q, k, v, pb, plan, resolve_scale(scale, pb.d), out, lse,
                 sel if return_selection else None)
    result = pb.unflatten(out)
    extra = ((pb.unflatten(lse),) if return_lse else ()) + (
        (pb.unflatten(sel),) if return_selection else ())
    return (result,) + extra if extra else result


def moba_attention_matrix(q, k, *, block_size, topk, causal=False, scale=None,
                          check_finite=True, block_q=None, memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`moba_attention` (same
    arguments): the softmax over each query's kept keys, 0 elsewhere; row-stochastic
    (rows that see nothing are 0).

    >>> import numpy as np, refattn as ra
    >>> q = k = np.zeros((1, 4, 2))                   # ties: the lowest block wins
    >>> ra.sparse.moba_attention_matrix(q, k, block_size=1, topk=2, causal=True)[0, 3]
    array([0.5, 0. , 0. , 0.5])
    """
    q, k, _, pb = prepare_qkv(q, k, None, check_finite=check_finite, need_v=False)
    plan = _Plan(k, pb, block_size, topk, causal, block_q)
    pb.check_matrix_memory(memory_budget, "the implied matrix of moba_attention",
                           "refattn.sparse.moba_attention", copies=2)
    a = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    for b, _, hs, rows, _, (p, *_), cols in _run(q, k, None, pb, plan,
                                                 resolve_scale(scale, pb.d)):
        block = np.zeros((len(p), rows.stop - rows.start, pb.m))
        spread_rows(block, cols, p)
        a[b, hs, rows] = block
    return pb.unflatten(a)


def moba_attention_vjp(q, k, v, grad_out, *, block_size, topk, grad_lse=None,
                       causal=False, scale=None, return_lse=False, return_selection=False,
                       check_finite=True, block_q=None):
    """Gradients ``{"q", "k", "v"}`` of :func:`moba_attention` with the block selection
    held fixed: the softmax backward (FlashAttention-2's equations) over each query's kept
    keys; keys outside them get nothing from that query. ``grad_lse``: the cotangent of
    the returned lse.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4))
    >>> do = np.ones((1, 8, 4))
    >>> g = ra.vjp("moba_attention", q, k, v, do, block_size=2, topk=4, causal=True)
    >>> ref = ra.vjp("attention", q, k, v, do, causal=True)    # every block kept: exact
    >>> all(np.allclose(g[x], ref[x]) for x in "qkv")
    True
    """
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    plan = _Plan(k, pb, block_size, topk, causal, block_q)
    s = resolve_scale(scale, pb.d)
    return selection_vjp(_run(q, k, v, pb, plan, s), q, k, v, pb, grad_out, grad_lse, s,
                         shapes, check_finite)


attach(moba_attention, implied=moba_attention_matrix, vjp=moba_attention_vjp)
