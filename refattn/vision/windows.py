"""Swin's window attention: non-overlapping windows on a grid and the shifted
windows of the next block. Holds the masks (:func:`window_mask`,
:func:`shifted_window_mask`), :func:`window_attention` (the mask on the sparse engine),
:func:`shifted_window_attention` (Swin's literal roll / partition / mask / roll-back),
and their implied matrices.
"""
from __future__ import annotations

import math

import numpy as np

from ..exact.dense import attention, attention_probs
from ..exact.merge import merge_partials
from ..masks import Mask
from ..masks.scores import ScoreMod, as_score_mod
from ..registry import attach, register
from ._common import _Grid, _grid_shape, _GridMask, _int_tuple

__all__ = ["window_attention", "shifted_window_attention", "window_mask",
           "shifted_window_mask"]


# ---------------------------------------------------------------------- window masks
def window_mask(shape, window, shift=0) -> Mask:
    r"""(Shifted) window attention (Swin) as a mask over the flattened grid ``shape``.

    On each axis the coordinates are cut into consecutive windows of ``w`` tokens
    starting at ``-(w - s) % w``: token ``x`` belongs to window
    ``(x + (w - s) \bmod w) // w``. With ``shift = 0`` these are Swin's regular windows
    ``x // w``; with ``shift = s > 0`` they are Swin's shifted windows drawn on the
    original (unrolled) grid: ``[0, s)``, ``[s, s + w)``, ... A key is kept iff it is in
    the query's window on every axis.

    **Padding rule.** When ``w`` does not divide the grid, the windows at the end of an
    axis are cut short (the tokens Swin would pad with are masked out, never attended
    to), so every window holds only real tokens. Swin's reference code instead attends
    to its zero-padded tokens (their keys equal the ``qkv`` bias), which is not a
    function of ``q, k, v``.

    >>> window_mask((6,), (3,)).materialize(6, 6)[4].astype(int)
    array([0, 0, 0, 1, 1, 1])
    >>> window_mask((6,), (3,), shift=1).materialize(6, 6)[3].astype(int)
    array([0, 1, 1, 1, 0, 0])
    """
    win = _int_tuple("window", window, None)
    nd = len(win)
    shape = _grid_shape(shape, nd)
    sh = _int_tuple("shift", shift, nd, minimum=0)
    for axis, (length, w, s) in enumerate(zip(shape, win, sh)):
        if w > length:
            raise ValueError(f"window {win} does not fit the grid {shape}: {w} > {length} "
                             f"on axis {axis}")
        if s >= w:
            raise ValueError(f"shift {sh} must be smaller than the window {win} on every "
                             f"axis (axis {axis}: shift {s} >= window {w})")
    lo, hi = [], []
    for length, w, s in zip(shape, win, sh):
        off = (w - s) % w
        first = ((np.arange(length) + off) // w) * w - off
        lo.append(np.maximum(first, 0))
        hi.append(np.minimum(first + w - 1, length - 1))
    name = f"window_mask({shape}, window={win}" + (
        f", shift={sh})" if any(sh) else ")")
    return _GridMask(shape, lo, hi, (1,) * nd, name)


def shifted_window_mask(shape, window, shift=None) -> Mask:
    """Swin's shifted windows: :func:`window_mask` with ``shift`` defaulting to
    ``window // 2`` on every axis (the displacement of the paper).

    >>> shifted_window_mask((8, 8), 4)
    window_mask((8, 8), window=(4, 4), shift=(2, 2))
    """
    win = _int_tuple("window", window, None)
    return window_mask(shape, win, tuple(w // 2 for w in win) if shift is None else shift)


# --------------------------------------------------------------------- window attention
def _window_probs(q, k, window, *, shift=0, scale=None, bias=None, softcap=None,
                  check_finite=True, method=None, block_q=None, block_k=None, workers=None):
    """Dense attention matrix of :func:`window_attention` over the flattened grid."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, None, len(win), check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=window_mask(g.q_grid, win, shift), scale=scale,
                           bias=bias, softcap=softcap, check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·w^d·D)", state="O(N·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=True,
          example={"window": (1,)})
def window_attention(q, k, v, window, *, shift=0, cls_tokens=None, scale=None, bias=None,
                     softcap=None, return_lse=False, check_finite=True, method="auto",
                     block_q=None, block_k=None, workers=None):
    r"""Window attention (Swin): attention within non-overlapping ``w x w`` windows,
    computed from its mask on the flattened grid (:func:`window_mask`).

    .. math:: o_t = \operatorname{softmax}_{u \in W(t)}(s_{tu})\, v_u, \qquad
              W(t) = \{u : \lfloor (u_a + o_a) / w_a \rfloor =
              \lfloor (t_a + o_a) / w_a \rfloor \ \forall a\},\ o_a = (w_a - s_a) \bmod w_a

    Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
    Windows" (W-MSA; with ``shift`` the SW-MSA of the next block, here evaluated as the
    equivalent mask on the original grid -- :func:`shifted_window_attention` performs
    Swin's literal roll / partition / mask / roll-back and equals this).

    Parameters
    ----------
    q, k, v : ``(..., Hq, *S, D)``, ``(..., Hkv, *S, D)``, ``(..., Hkv, *S, Dv)``;
        ``len(S) = len(window)`` (an int window means 2-D).
    window : int or tuple, ``window <= S`` on every axis (``ValueError`` otherwise). When
        it does not divide ``S`` the last windows of an axis are cut short (padding rule
        of :func:`window_mask`: padded tokens are never attended to).
    shift : int or tuple, ``0 <= shift < window``: Swin's cyclic shift (``window // 2``
        in the paper).
    cls_tokens : global tokens (:mod:`refattn.vision`): result ``(out, out_cls)``.
    Others as :func:`neighborhood_attention`.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 8, 4))
    >>> out = window_attention(q, k, v, 4)
    >>> from refattn import attention
    >>> win = lambda x: x[:, 4:, :4].reshape(1, 16, 4)          # the bottom-left window
    >>> bool(np.allclose(out[:, 4:, :4].reshape(1, 16, 4),
    ...                  attention(win(q), win(k), win(v))))
    True
    """
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, v, len(win), check_finite=check_finite, cls_tokens=cls_tokens)
    return g.attend(window_mask(g.q_grid, win, shift), scale=scale, bias=bias,
                    softcap=softcap, return_lse=return_lse, check_finite=check_finite,
                    method=method, block_q=block_q, block_k=block_k, workers=workers)


window_attention.mask = window_mask


# ------------------------------------------------------------ shifted windows, literally
def _partition(x, window):
    """``(B, H, *Sp, C)`` -> ``(B, *n, H, prod(window), C)``: Swin's window_partition."""
    nd = len(window)
    b, h, c = x.shape[0], x.shape[1], x.shape[-1]
    counts = tuple(s // w for s, w in zip(x.shape[2:2 + nd], window))
    x = x.reshape((b, h) + sum(((n, w) for n, w in zip(counts, window)), ()) + (c,))
    perm = (0,) + tuple(2 + 2 * a for a in range(nd)) + (1,) + \
        tuple(3 + 2 * a for a in range(nd)) + (2 + 2 * nd,)
    return x.transpose(perm).reshape((b,) + counts + (h, math.prod(window), c))


def _unpartition(x, window, padded):
    """Inverse of :func:`_partition` (Swin's window_reverse)."""
    nd = len(window)
    b, h, c = x.shape[0], x.shape[1 + nd], x.shape[-1]
    counts = tuple(s // w for s, w in zip(padded, window))
    x = x.reshape((b,) + counts + (h,) + tuple(window) + (c,))
    perm = (0, 1 + nd) + sum(((1 + a, 2 + nd + a) for a in range(nd)), ()) + (2 + 2 * nd,)
    return x.transpose(perm).reshape((b, h) + tuple(padded) + (c,))


class _Reindexed(ScoreMod):
    """A score modifier of the whole flattened sequence (``total`` tokens, CLS first)
    seen from a part of it: the windows of the literal form (batch ``b = b0 * windows +
    w``, window token ``t`` is grid token ``index[w, t]``, -1 for padding) or the CLS
    rows / columns (``row_offset``, ``col_offset``)."""

    def __init__(self, inner, total, *, index=None, first=0, row_offset=0, col_offset=0):
        self.inner, self.total, self.index, self.first = inner, total, index, first
        self.row_offset, self.col_offset = row_offset, col_offset
        self.additive, self.name = inner.additive, inner.name

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        b, q_idx, kv_idx = np.asarray(b), np.asarray(q_idx), np.asarray(kv_idx)
        if self.index is not None:
            b, w = np.divmod(b, self.index.shape[0])
            q_idx = self.first + np.maximum(self.index[w, q_idx], 0)    # padding: any
            kv_idx = self.first + np.maximum(self.index[w, kv_idx], 0)  # (masked, cropped)
        return self.inner._apply(score, b, h, q_idx + self.row_offset,
                                 kv_idx + self.col_offset, self.total, self.total)


def _swin_literal(q, k, v, window, shift, scale, softcap, check_finite=True, bias=None,
                  first=0):
    """Swin's SW-MSA on ``q (B, Hq, *S, D)``...: pad to whole windows, roll by
    ``-shift``, partition, mask pairs from different regions (and padded keys), attend
    per window (adding ``bias``, a modifier of the flattened sequence whose grid starts at
    token ``first``, at each pair's grid tokens, as Swin adds its relative position bias
    per window), reverse, roll by ``+shift``, crop. Returns ``out, lse`` on the grid."""
    nd = len(window)
    grid = q.shape[2:2 + nd]
    padded = tuple(-(-s // w) * w for s, w in zip(grid, window))
    pads = [(0, 0), (0, 0)] + [(0, p - s) for p, s in zip(padded, grid)] + [(0, 0)]
    q, k, v = (np.pad(x, pads) for x in (q, k, v))
    valid = np.zeros(padded, bool)
    valid[tuple(slice(0, s) for s in grid)] = True
    # Swin's img_mask: per axis slices (0, -w), (-w, -s), (-s, None) on the rolled map
    region = np.zeros(padded, np.int64)
    for a, (p, w, s) in enumerate(zip(padded, window, shift)):
        lab = np.zeros(p, np.int64)
        if s:
            lab[p - w:p - s] = 1
            lab[p - s:] = 2
        region = region * 3 + lab.reshape((1,) * a + (p,) + (1,) * (nd - a - 1))
    spatial = tuple(range(2, 2 + nd))
    index = np.full(padded, -1, np.int64)          # the grid token at each position
    index[tuple(slice(0, s) for s in grid)] = np.arange(math.prod(grid)).reshape(grid)
    if any(shift):   # torch.roll(x, shifts=(-s1, -s2), dims=(1, 2))
        q, k, v = (np.roll(x, tuple(-s for s in shift), axis=spatial) for x in (q, k, v))
        valid = np.roll(valid, tuple(-s for s in shift), axis=tuple(range(nd)))
        index = np.roll(index, tuple(-s for s in shift), axis=tuple(range(nd)))
    # region labels are defined on the rolled map already (no roll)
    lab_w = _partition(region[None, None, ..., None], window)[0, ..., 0, :, 0]
    val_w = _partition(valid[None, None, ..., None], window)[0, ..., 0, :, 0]
    mask = (lab_w[..., :, None] == lab_w[..., None, :]) & val_w[..., None, :]
    if bias is not None:
        idx_w = _partition(index[None, None, ..., None], window)[0, ..., 0, :, 0]
        bias = _Reindexed(bias, first + math.prod(grid), first=first,
                          index=idx_w.reshape(-1, idx_w.shape[-1]))
    out, lse = attention(_partition(q, window), _partition(k, window),
                         _partition(v, window), mask=mask[..., None, :, :], scale=scale,
                         bias=bias, softcap=softcap, return_lse=True,
                         check_finite=check_finite)
    out = _unpartition(out, window, padded)
    lse = _unpartition(lse[..., None], window, padded)[..., 0]
    if any(shift):
        out = np.roll(out, shift, axis=spatial)
        lse = np.roll(lse, shift, axis=spatial)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in grid)
    return out[crop], lse[crop]


def _shifted_probs(q, k, window, *, shift=None, scale=None, bias=None, softcap=None,
                   check_finite=True):
    """Dense attention matrix of :func:`shifted_window_attention` (flattened grid)."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, None, len(win), check_finite=check_finite)
    return attention_probs(g.q, g.k, mask=shifted_window_mask(g.q_grid, win, shift),
                           scale=scale, bias=bias, softcap=softcap,
                           check_finite=check_finite)


@register(family="vision", exact=False, time="O(N·w^d·D)", state="O(N·D)",
          supports_causal=False, supports_mask=False, supports_gqa=True,
          position_free=False, row_stochastic=True, self_attention_only=True,
          example={"window": (1,)})
def shifted_window_attention(q, k, v, window, *, shift=None, cls_tokens=None, scale=None,
                             bias=None, softcap=None, return_lse=False, check_finite=True):
    r"""Shifted-window attention (Swin SW-MSA), computed literally as Swin does.

    The grid is padded to whole windows, cyclically shifted by ``-shift``
    (``torch.roll``), partitioned into ``w x w`` windows, attention is computed per
    window with Swin's attention mask (pairs from different regions of the wrapped
    border windows are masked), and the result is partitioned back and shifted by
    ``+shift``. Padded tokens are masked as keys (padding rule of :func:`window_mask`).
    Equals :func:`window_attention` ``(..., shift=shift)``, the same pattern as a mask
    on the original grid, to rounding.

    Liu et al. 2021, "Swin Transformer", Sec. 3.2 ("efficient batch computation for
    shifted configuration").

    q, k, v : grids as :func:`window_attention`. window : int or tuple
    (``<= S``). shift : int or tuple, default ``window // 2``; ``0 <= shift < window``.
    cls_tokens : global tokens: the grid's window result is merged with attention to
    the CLS keys by log-sum-exp (:func:`refattn.merge_partials`); CLS queries attend to
    every token. bias : as :func:`window_attention` takes it, on the flattened sequence
    (CLS tokens first): an array broadcastable to ``(..., Hq, N, N)`` or a score
    modifier (e.g. Swin's relative position bias, ``B[h, t, u]`` from the relative
    coordinates of tokens ``t`` and ``u``); each window adds it at its pairs' original
    tokens, as Swin adds its bias table per window after the roll (for a pair in one
    region, relative coordinates are the same before and after the roll). scale,
    softcap, return_lse, check_finite : as :func:`refattn.attention`. Dense per window:
    memory ``O(N w^d)``.

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 10, 4))
    >>> a = shifted_window_attention(q, k, v, 4)                # shift (2, 2), padded
    >>> b = window_attention(q, k, v, 4, shift=2)
    >>> bool(np.allclose(a, b, rtol=1e-12, atol=0))
    True
    >>> bias = np.random.default_rng(1).standard_normal((2, 90, 90))   # (Hq, N, N)
    >>> a = shifted_window_attention(q, k, v, 4, bias=bias)
    >>> bool(np.allclose(a, window_attention(q, k, v, 4, shift=2, bias=bias), rtol=1e-12))
    True
    """
    win = _int_tuple("window", window, None)
    nd = len(win)
    g = _Grid(q, k, v, nd, check_finite=check_finite, cls_tokens=cls_tokens)
    mod = as_score_mod(bias, g.batch, check_finite=check_finite)
    total = g.num_global + math.prod(g.q_grid)
    sh = tuple(w // 2 for w in win) if shift is None else _int_tuple("shift", shift, nd,
                                                                     minimum=0)
    window_mask(g.q_grid, win, sh)        # the same checks (window fits, shift < window)

    def batched(x):     # (*batch, H, *S, C) -> (B, H, *S, C)
        x = np.broadcast_to(x, g.batch + x.shape[-nd - 2:])
        return x.reshape((math.prod(x.shape[:-nd - 2]),) + x.shape[-nd - 2:])

    out, lse = _swin_literal(batched(g.grid_q), batched(g.grid_k), batched(g.grid_v), win,
                             sh, scale, softcap, check_finite, mod, g.num_global)
    out = out.reshape(g.batch + out.shape[1:])
    lse = lse.reshape(g.batch + lse.shape[1:])
    if not g.num_global:
        return (out, lse) if return_lse else out
    gc, n = g.num_global, math.prod(g.q_grid)
    qc, kc, vc = g.cls
    flat_out = out.reshape(g.batch + (g.heads_q, n, out.shape[-1]))
    flat_lse = lse.reshape(g.batch + (g.heads_q, n))
    # grid queries: their window, merged with the CLS keys by log-sum-exp
    to_cls, to_cls_lse = attention(
        g.q[..., gc:, :], kc, vc, scale=scale, softcap=softcap, return_lse=True,
        bias=None if mod is None else _Reindexed(mod, total, row_offset=gc))
    merged, merged_lse = merge_partials([flat_out, to_cls], [flat_lse, to_cls_lse])
    # CLS queries attend to every token
    cls_out, cls_lse = attention(qc, g.k, g.v, scale=scale, softcap=softcap,
                                 return_lse=True,
                                 bias=None if mod is None else _Reindexed(mod, total))
    grid_out = merged.reshape(out.shape)
    grid_lse = merged_lse.reshape(lse.shape)
    return (grid_out, grid_lse, cls_out, cls_lse) if return_lse else (grid_out, cls_out)


shifted_window_attention.mask = shifted_window_mask


def window_attention_vjp(q, k, v, grad_out, *, window, grad_lse=None, shift=0,
                         cls_tokens=None, scale=None, bias=None, softcap=None,
                         check_finite=True, method="auto", block_q=None, block_k=None,
                         workers=None):
    """Gradients of :func:`window_attention` (``{"q", "k", "v"}`` in the grid shapes):
    exact attention under :func:`window_mask`, differentiated by the sparse engine's
    tiled backward over the non-empty tiles. ``grad_out``: the output's shape
    ``(..., Hq, *S, Dv)``, with ``cls_tokens`` the pair ``(grid, cls)`` the forward returns
    (then the result also has ``"cls_tokens"``, their gradients)."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, v, len(win), check_finite=check_finite, cls_tokens=cls_tokens)
    return g.attend_vjp(window_mask(g.q_grid, win, shift), grad_out, grad_lse, scale=scale,
                        bias=bias, softcap=softcap, check_finite=check_finite,
                        method=method, block_q=block_q, block_k=block_k, workers=workers)


def shifted_window_attention_vjp(q, k, v, grad_out, *, window, grad_lse=None, shift=None,
                                 cls_tokens=None, scale=None, bias=None, softcap=None,
                                 check_finite=True):
    """Gradients of :func:`shifted_window_attention`: its mask form
    (:func:`shifted_window_mask`, the same function as Swin's literal roll form) through
    the sparse engine's tiled backward, ``{"q", "k", "v"}`` in the grid shapes (and
    ``"cls_tokens"`` with CLS tokens: ``grad_out`` is then the pair ``(grid, cls)``)."""
    win = _int_tuple("window", window, None)
    g = _Grid(q, k, v, len(win), check_finite=check_finite, cls_tokens=cls_tokens)
    return g.attend_vjp(shifted_window_mask(g.q_grid, win, shift), grad_out, grad_lse,
                        scale=scale, bias=bias, softcap=softcap, check_finite=check_finite,
                        method="auto", block_q=None, block_k=None, workers=None)


attach(window_attention, implied=_window_probs, vjp=window_attention_vjp)
attach(shifted_window_attention, implied=_shifted_probs, vjp=shifted_window_attention_vjp)
