r"""Native Sparse Attention (NSA; Yuan et al. 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention", DeepSeek-AI): three attention
branches over differently chosen keys, each its own softmax, mixed by per-query gates.

For query ``t`` (bottom-right aligned position ``t' = t + M - N``, scale ``s``):

.. math::

    o_t = g^{cmp}_t \operatorname{Attn}(q_t, \tilde K^{cmp}_t, \tilde V^{cmp}_t)
        + g^{slc}_t \operatorname{Attn}(q_t, \tilde K^{slc}_t, \tilde V^{slc}_t)
        + g^{win}_t \operatorname{Attn}(q_t, \tilde K^{win}_t, \tilde V^{win}_t),

* **compressed**: blocks of ``l`` keys every ``d`` positions, block ``i`` covering keys
  ``[i d, i d + l)`` (complete blocks only, ``i d + l <= M``), compressed by
  ``φ`` (default: the mean of the block's keys, and of its values):
  :math:`\tilde k_i = φ_K(k_{id:id+l})`. Causal: block ``i`` is seen once its last key is,
  ``i d + l - 1 <= t'`` (Eq. 7's :math:`0 \le i \le \lfloor (t-l)/d \rfloor`).
* **selected**: keys in selection blocks of ``l'`` keys, block ``j`` covering
  ``[j l', (j+1) l')``. The importance of block ``j`` comes from the compressed branch's
  probabilities :math:`p^{cmp}_t = \operatorname{softmax}(s\, q_t \tilde K^{cmp\top}_t)`
  (Eq. 8), summed over the compression blocks it overlaps, each counted by the stride
  units of ``d`` keys they share (Eq. 9, whose block indices count from 1:
  :math:`p^{slc}_t[j] = \sum_{m<l'/d}\sum_{n<l/d} p^{cmp}_t[\tfrac{l'}{d} j - m - n]`;
  ``l = l' = d`` gives :math:`p^{slc} = p^{cmp}`; sizes the paper does not cover, with
  ``d`` not dividing ``l`` or ``l'``, count the shared keys / ``d`` the same way), then
  **summed over the query heads of
  a GQA group** (Eq. 10), so a KV head's query heads share one selection. Each query
  keeps ``top_n`` blocks (Eq. 11) *including* the always-on ones: the first
  ``initial_blocks`` blocks and ``local_blocks`` local blocks (its own block
  ``⌊t'/l'⌋`` and the ones just before it) -- the paper's 1 initial and 2 local blocks of
  ``n = 16``. The others are the most important blocks holding a key the query may see;
  ties go to the lower block index. Causal: keys ``j <= t'`` of the kept blocks.
* **sliding window**: the ``w`` keys ``t' - w < j <= t'`` (flash-linear-attention's
  ``window_size``; ``refattn.masks.sliding_window(w - 1)``).

The gates ``g (..., Hq, N, 3)`` (``cmp, slc, win`` in that order) are inputs: the paper's
gate MLP with a sigmoid sits outside the attention. A branch that sees no key for a query
contributes 0 (e.g. the compressed branch before the first complete block).

The paper's models are decoders: ``causal=True`` is NSA as published. ``causal=False``
(refattn's default, as everywhere) drops only the causal limit: every complete
compression block is seen, every selection block may be chosen (the always-on blocks
stay), the selected blocks' keys are all seen, and the window stays the ``w`` keys up to
the query (a window of refattn's sliding-window kind, one-sided).

Paper settings: ``l = 32, d = 16, l' = 64, n = 16, w = 512`` (the defaults here).
flash-linear-attention's ``naive_nsa`` uses ``l = l' = d = block_size``, one initial and
two local blocks, the importance averaged (not summed) over the group -- the same ranking.

**Gradients** (:func:`nsa_attention_vjp`): for ``q, k, v`` and ``gates``, with the
selection held fixed, as implementations train it (the top-n choice is discrete: the
importance scores get no gradient; the compressed branch's own probabilities do), and
through the mean pooling of the compressed branch.

**Memory.** One block of query rows of a KV head at a time, never ``N x M``: the
``G x rows x C`` compressed logits, and the selected and window keys of each row either
gathered (``rows x (n l' + w)`` keys and values) or, when a row keeps more than
``M / GATHER_COST`` keys (:mod:`refattn.sparse._common`), attended densely under a mask
over the span of keys the block's rows keep (``G x rows x span`` logits).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .._core.checks import (check_bool, check_cotangent, check_int, check_size_memory,
                            resolve_scale)
from .._core.problem import prepare_qkv, sum_to_shape
from .._core.select import BLOCK_ELEMENTS, block_rows, topk_keep
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (block_keys, dense_is_cheaper, gather_attention,
                      gather_attention_vjp, ranked_indices, spread_rows)

__all__ = ["nsa_attention", "nsa_attention_matrix", "nsa_attention_vjp"]


class _Geometry:
    """Block layout of one call: compression blocks, selection blocks and the band of
    overlap weights (Eq. 9) from the first to the second."""

    def __init__(self, pb, block_size, stride, select_size, top_n, window, initial_blocks,
                 local_blocks, causal):
        ctx = f" (k has M={pb.m} keys)"
        self.l = check_int("block_size", block_size, minimum=1, context=ctx)
        self.d = check_int("stride", stride, minimum=1, context=ctx)
        # a selection block past the keys holds them all: the same as one of M keys
        self.ls = min(check_int("select_size", select_size, minimum=1, context=ctx),
                      max(pb.m, 1))
        self.w = check_int("window", window, minimum=0, context=ctx)
        self.initial = check_int("initial_blocks", initial_blocks, minimum=0)
        self.local = check_int("local_blocks", local_blocks, minimum=0)
        self.top_n = check_int("top_n", top_n, minimum=max(1, self.initial + self.local),
                               context=f" (blocks kept per query, counting the "
                               f"initial_blocks={self.initial} and local_blocks="
                               f"{self.local} always kept)")
        self.causal = check_bool("causal", causal)
        m, l, d, ls = pb.m, self.l, self.d, self.ls
        self.m = m
        self.c = (m - l) // d + 1 if m >= l else 0            # complete blocks
        self.starts = np.arange(self.c) * d
        self.j = -(-m // ls)                                   # selection blocks
        self.keep = max(min(self.top_n, self.j), 1)   # top_n of fewer blocks: all of them
        j = np.arange(self.j)
        lo = np.maximum((j * ls - l) // d + 1, 0)
        hi = np.minimum(-(-((j + 1) * ls) // d) - 1, self.c - 1)
        span = int(max((hi - lo + 1).max(initial=0), 0))
        idx = lo[:, None] + np.arange(span)
        live = idx <= hi[:, None]
        overlap = (np.minimum(idx * d + l, (j[:, None] + 1) * ls)
                   - np.maximum(idx * d, j[:, None] * ls))
        self.band = np.where(live, np.minimum(idx, max(self.c - 1, 0)), 0)
        self.weight = np.where(live, overlap / d, 0.0)
        self.pos = np.arange(pb.n) + (m - pb.n)
        per_key = pb.d + pb.dv + 2 * pb.group + 2           # a listed key
        width = self.keep * ls                               # selected keys
        per_row = (self.c * pb.group + self.j * (span + 3)
                   + (3 * m * pb.group if dense_is_cheaper(width, m) else width * per_key)
                   + self.w * max(per_key, 12 * pb.group))  # window: lists or band
        self.rows = max(1, BLOCK_ELEMENTS // max(per_row, 1))

    def visible_blocks(self, pos):
        """``(r, C)``: the compression blocks each query position sees."""
        if not self.causal:
            return np.ones((len(pos), self.c), dtype=bool)
        return self.starts[None, :] + self.l - 1 <= pos[:, None]

    def select(self, p_cmp, pos):
        """``(r, J)``: the selection blocks kept given the compressed probabilities
        ``p_cmp (G, r, C)`` of a KV head's query heads."""
        j = np.arange(self.j)[None, :]
        if self.c:
            imp = (p_cmp.sum(axis=0)[:, self.band] * self.weight).sum(axis=-1)
        else:
            imp = np.zeros((len(pos), self.j))
        cand = (j * self.ls <= pos[:, None]) if self.causal else np.ones(imp.shape, bool)
        own = np.floor_divide(pos, self.ls)[:, None]
        forced = cand & ((j < self.initial) | ((j <= own) & (j > own - self.local)))
        score = np.where(forced, np.inf, np.where(cand, imp, -np.inf))
        return topk_keep(score, self.keep)

    def window_keys(self, pos):
        """``(cols, keep)`` (:func:`gather_attention`): the ``w`` keys up to each query,
        as lists, or as the band of keys the block's rows see when that is cheaper."""
        lo = max(int(pos[0]) - self.w + 1, 0)
        hi = max(min(int(pos[-1]) + 1, self.m), lo)
        if self.w and dense_is_cheaper(self.w, hi - lo):
            at = np.arange(lo, hi)
            return slice(lo, hi), (at <= pos[:, None]) & (at > pos[:, None] - self.w)
        cols = pos[:, None] - self.w + 1 + np.arange(self.w)
        keep = (cols >= 0) & (cols < self.m)
        return np.where(keep, cols, 0)[None], keep[None]


def _compress(k, v, pb, geo, compress):
    """Compressed keys ``(B, Hkv, C, D)`` and values ``(B, Hkv, C, Dv)`` (or None)."""
    mean = isinstance(compress, str) and compress == "mean"
    if not mean and not callable(compress) and not (
            isinstance(compress, tuple) and len(compress) == 2
            and all(callable(f) for f in compress)):
        raise ValueError(f"compress must be 'mean', a function phi(blocks) or a pair "
                         f"(phi_k, phi_v) of them, got {compress!r}")
    fk, fv = (compress if isinstance(compress, tuple) else (compress, compress))

    def one(x, f, what):
        if x is None:
            return None
        if geo.c == 0:
            return x[:, :, :0]
        blocks = sliding_window_view(x, geo.l, axis=2)[:, :, ::geo.d]   # (B, H, C, *, l)
        if mean:
            return blocks.mean(axis=-1)
        out = to_float64(f(pb.unflatten(blocks.swapaxes(-1, -2))), f"compress({what})",
                         check_finite=False)
        want = pb.batch_shape + (pb.heads_kv, geo.c, x.shape[-1])
        if out.shape != want:
            raise ValueError(f"compress must map the {what} blocks "
                             f"{pb.batch_shape + blocks.shape[1:3] + (geo.l, x.shape[-1])}"
                             f" (..., Hkv, C, l, dim) to {want}, got {out.shape}")
        return out.reshape((pb.batch,) + want[len(pb.batch_shape):])
    return one(k, fk, "key"), one(v, fv, "value")


def _gates(gates, pb, check_finite):
    """Flat ``(B, Hq, N, 3)`` gates and the shape they were given in."""
    g = to_float64(gates, "gates", check_finite=check_finite)
    want = pb.batch_shape + (pb.heads_q, pb.n, 3)
    try:
        full = np.broadcast_to(g, want)
    except ValueError:
        raise ValueError(f"gates must broadcast to (..., Hq, N, 3) = {want} (the cmp, slc "
                         f"and win gates of each query and head), got {g.shape}") from None
    return full.reshape((pb.batch,) + want[len(pb.batch_shape):]), g.shape


def _setup(q, k, v, gates, *, check_finite, scale, compress, **geometry):
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    geo = _Geometry(pb, **geometry)
    g, gshape = _gates(gates, pb, check_finite)
    kc, vc = _compress(k, v, pb, geo, compress)
    return q, k, v, pb, geo, g, gshape, kc, vc, resolve_scale(scale, pb.d)


def _branches(geo, qs, kb, vb, kc, vc, rows):
    """The three branches of one block of rows: ``[(p, lse, out, kg, vg, cols), ...]``
    and the chosen selection blocks ``(r, J)``."""
    pos = geo.pos[rows]
    cmp = gather_attention(qs, kc, vc, None, geo.visible_blocks(pos)) + (None,)
    chosen = geo.select(cmp[0], pos)
    cols, keep = block_keys(chosen[None], geo.ls, geo.m, pos, geo.causal, geo.keep)
    slc = gather_attention(qs, kb, vb, cols, keep) + (cols,)
    cols, keep = geo.window_keys(pos)
    win = gather_attention(qs, kb, vb, cols, keep) + (cols,)
    return (cmp, slc, win), chosen


def _blocks(pb, geo, block_q):
    """``(b, hk, heads, rows)`` per block of query rows of each KV head."""
    rows = block_rows(block_q, 1, 1, 1) if block_q is not None else geo.rows
    return pb.query_blocks(rows)


@register(family="sparse", exact=False,
          time="O(N·(M/d·(1 + l/l') + n·l' + w)·D)",
          state="O(M·D) KV cache + O(M/d·D) compressed keys",
          supports_causal=True, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=False, tokens=("gates",),
          example={"block_size": 2, "stride": 1, "select_size": 2, "top_n": 3,
                   "window": 2, "initial_blocks": 1, "local_blocks": 1,
                   "gates": (0.5, 0.3, 0.2)},
          budget=lambda n, b: {"block_size": max(1, -(-4 * n // b)),
                               "stride": max(1, -(-4 * n // b)),
                               "select_size": max(1, b // 8),
                               "top_n": max(3, (b // 2) // max(1, b // 8)),
                               "window": max(1, b // 4), "gates": (1 / 3, 1 / 3, 1 / 3)})
def nsa_attention(q, k, v, *, gates, block_size=32, stride=16, select_size=64, top_n=16,
                  window=512, initial_blocks=1, local_blocks=2, compress="mean",
                  causal=False, scale=None, return_selection=False, check_finite=True,
                  block_q=None):
    r"""Native Sparse Attention: gated compressed, selected and sliding-window branches
    (module docstring for the equations; Yuan et al. 2025).

    Parameters
    ----------
    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)``.
    gates : broadcastable to ``(..., Hq, N, 3)``: the gates of the compressed, selected and
        window branches per query and head (the paper's sigmoid outputs; any reals).
        With ``layout="bnhd"``: ``(..., N, Hq, 3)``.
    block_size, stride : ``l`` and ``d`` of the compression blocks (keys
        ``[i d, i d + l)``).
    select_size, top_n : ``l'``, keys per selection block, and ``n``, blocks kept per query
        counting the always-on ones (``top_n >= initial_blocks + local_blocks``); with
        ``n`` at least the number of blocks ``ceil(M / l')`` every block is kept, and an
        ``l' >= M`` is one block of all the keys.
    window : ``w``, keys of the sliding window ending at the query (0: no window branch).
    initial_blocks, local_blocks : always-on selection blocks: the first ones, and the
        query's own block with the ``local_blocks - 1`` before it.
    compress : ``"mean"`` (default), or ``phi(blocks)`` mapping the blocks
        ``(..., Hkv, C, l, dim)`` to ``(..., Hkv, C, dim)`` (used for keys and values), or a
        pair ``(phi_k, phi_v)``: the paper's learned compression (forward only).
    causal : NSA as published (see the module docstring for ``False``).
    scale : default ``1/sqrt(D)``; block_q : query rows per block (default: by memory).
    return_selection : also return the selected blocks, int64 ``(..., Hkv, N, top_n)``
        ascending, ``-1`` padded (heads-first in any layout).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and the selection).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 16, 4))             # 2 heads, 16 tokens
    >>> kw = dict(block_size=4, stride=2, select_size=4, top_n=3, window=3,
    ...           local_blocks=1, causal=True)
    >>> out, sel = ra.sparse.nsa_attention(q, k, v, gates=(0.2, 0.5, 0.3),
    ...                                    return_selection=True, **kw)
    >>> out.shape, sel[0, 15].tolist()         # blocks 0 and 3 always, one more chosen
    ((2, 16, 4), [0, 2, 3])
    >>> win = ra.sparse.nsa_attention(q, k, v, gates=(0, 0, 1), **kw)   # window alone
    >>> bool(np.allclose(win, ra.attention(q, k, v, mask=ra.masks.sliding_window(2))))
    True
    """
    q, k, v, pb, geo, g, _, kc, vc, s = _setup(
        q, k, v, gates, check_finite=check_finite, scale=scale, compress=compress,
        block_size=block_size, stride=stride, select_size=select_size, top_n=top_n,
        window=window, initial_blocks=initial_blocks, local_blocks=local_blocks,
        causal=causal)
    out, _ = pb.poisoned_outputs()
    return_selection = check_bool("return_selection", return_selection)
    if return_selection:
        check_size_memory(8.0 * pb.batch * pb.heads_kv * pb.n * geo.top_n, None,
                          "nsa_attention's selection", f"top_n={geo.top_n:,}",
                          f"top_n <= {geo.j:,} (all the selection blocks) or "
                          f"return_selection=False", adjustable=False)
        sel = np.full((pb.batch, pb.heads_kv, pb.n, geo.top_n), -2, dtype=np.int64)
    for b, hk, hs, rows in _blocks(pb, geo, block_q):
        branches, chosen = _branches(geo, q[b, hs, rows] * s, k[b, hk], v[b, hk],
                                     kc[b, hk], vc[b, hk], rows)
        if return_selection:               # -1 past the keep <= top_n blocks there are
            sel[b, hk, rows] = -1
            sel[b, hk, rows, :geo.keep] = ranked_indices(chosen, geo.keep)
        gb = g[b, hs, rows]
        out[b, hs, rows] = sum(gb[..., c, None] * branches[c][2] for c in range(3))
    out = pb.unflatten(out)
    return (out, pb.unflatten(sel)) if return_selection else out


def nsa_attention_matrix(q, k, *, gates, block_size=32, stride=16, select_size=64,
                         top_n=16, window=512, initial_blocks=1, local_blocks=2,
                         compress="mean", causal=False, scale=None, check_finite=True,
                         block_q=None, memory_budget=None):
    """The implied matrix ``A (..., Hq, N, M)`` of :func:`nsa_attention` (same arguments;
    mean compression): ``A = g_cmp P_cmp W + g_slc P_slc + g_win P_win`` with ``W`` the
    ``(C, M)`` mean-pooling map and the selected and window probabilities placed at their
    keys, so that ``nsa_attention(q, k, v) == A @ v`` (``v`` repeated over a group's
    heads). Rows sum to the gates of the branches that see a key, not to 1.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 1, 8, 4))
    >>> kw = dict(gates=(0.3, 0.3, 0.4), block_size=2, stride=2, select_size=2, top_n=2,
    ...           window=2, initial_blocks=1, local_blocks=1, causal=True)
    >>> a = ra.sparse.nsa_attention_matrix(q, k, **kw)
    >>> bool(np.allclose(a @ v, ra.sparse.nsa_attention(q, k, v, **kw)))
    True
    >>> round(float(a[0, 7].sum()), 12)           # every branch sees a key: 0.3+0.3+0.4
    1.0
    """
    if not (isinstance(compress, str) and compress == "mean"):
        raise ValueError("nsa_attention_matrix: a learned compress is not linear in v, so "
                         "there is no implied matrix (use compress='mean')")
    q, k, _, pb, geo, g, _, kc, _, s = _setup(
        q, k, None, gates, check_finite=check_finite, scale=scale, compress=compress,
        block_size=block_size, stride=stride, select_size=select_size, top_n=top_n,
        window=window, initial_blocks=initial_blocks, local_blocks=local_blocks,
        causal=causal)
    pb.check_matrix_memory(memory_budget, "the implied matrix of nsa_attention",
                           "refattn.sparse.nsa_attention", copies=2)
    a = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    for b, hk, hs, rows in _blocks(pb, geo, block_q):
        (cmp, slc, win), _ = _branches(geo, q[b, hs, rows] * s, k[b, hk], None, kc[b, hk],
                                       None, rows)
        gb = g[b, hs, rows]
        block = np.zeros((pb.group, rows.stop - rows.start, pb.m))
        for t in range(geo.l):                 # mean pooling: p_i / l to each of its keys
            block[..., geo.starts + t] += gb[..., 0, None] * cmp[0] / geo.l
        spread_rows(block, slc[5], gb[..., 1, None] * slc[0])
        spread_rows(block, win[5], gb[..., 2, None] * win[0])
        a[b, hs, rows] = block
    return pb.unflatten(a)


def nsa_attention_vjp(q, k, v, grad_out, *, gates, block_size=32, stride=16,
                      select_size=64, top_n=16, window=512, initial_blocks=1,
                      local_blocks=2, compress="mean", causal=False, scale=None,
                      return_selection=False, check_finite=True, block_q=None):
    r"""Gradients of :func:`nsa_attention`: ``{"q", "k", "v", "gates"}`` in the inputs'
    shapes (a broadcast ``gates`` gets its gradient summed), the selection held fixed.

    With ``O_c`` the output of branch ``c`` and ``dO`` the cotangent,
    ``dg_c = Σ_d dO ∘ O_c``; each branch is a softmax over its own keys, differentiated
    with cotangent ``g_c dO`` (FlashAttention-2's equations, Dao 2023), and the
    compressed keys' and values' gradients flow back through the mean pooling:
    :math:`dk_j \mathrel{+}= \sum_{i:\, j \in [id, id+l)} d\tilde k_i / l`.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> kw = dict(gates=(0.3, 0.3, 0.4), block_size=2, stride=2, select_size=2, top_n=2,
    ...           window=2, initial_blocks=1, local_blocks=1, causal=True)
    >>> g = ra.vjp("nsa_attention", q, k, v, np.ones((1, 6, 4)), **kw)
    >>> sorted(g), g["gates"].shape                   # gates (3,): summed over queries
    (['gates', 'k', 'q', 'v'], (3,))
    """
    if not (isinstance(compress, str) and compress == "mean"):
        raise TypeError("nsa_attention_vjp differentiates the default compress='mean' "
                        "only; a learned compress needs its own backward (differentiate "
                        "through its output, the compressed keys and values)")
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb, geo, g, gshape, kc, vc, s = _setup(
        q, k, v, gates, check_finite=check_finite, scale=scale, compress=compress,
        block_size=block_size, stride=stride, select_size=select_size, top_n=top_n,
        window=window, initial_blocks=initial_blocks, local_blocks=local_blocks,
        causal=causal)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                         check_finite=check_finite).reshape(pb.batch, pb.heads_q, pb.n,
                                                            pb.dv)
    dq, dk, dv, dg = (np.zeros(x.shape) for x in (q, k, v, g))
    dkc, dvc = np.zeros(kc.shape), np.zeros(vc.shape)
    for b, hk, hs, rows in _blocks(pb, geo, block_q):
        qs = q[b, hs, rows] * s
        branches, _ = _branches(geo, qs, k[b, hk], v[b, hk], kc[b, hk], vc[b, hk], rows)
        gb, dob = g[b, hs, rows], do[b, hs, rows]
        dqs = np.zeros(qs.shape)
        for c, (p, _, out, kg, vg, cols) in enumerate(branches):
            dg[b, hs, rows, c] = np.einsum("grd,grd->gr", dob, out)
            keys, values = (dkc[b, hk], dvc[b, hk]) if c == 0 else (dk[b, hk], dv[b, hk])
            dqs += gather_attention_vjp(qs, p, out, kg, vg, cols, gb[..., c, None] * dob,
                                        None, keys, values)
        dq[b, hs, rows] = dqs * s
    for t in range(geo.l):                      # back through the mean pooling
        dk[:, :, geo.starts + t] += dkc / geo.l
        dv[:, :, geo.starts + t] += dvc / geo.l
    grads = {name: pb.input_gradient(x, shape)
             for name, x, shape in zip("qkv", (dq, dk, dv), shapes)}
    grads["gates"] = sum_to_shape(pb.unflatten(dg), gshape)
    return grads


attach(nsa_attention, implied=nsa_attention_matrix, vjp=nsa_attention_vjp)
