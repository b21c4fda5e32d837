"""What the sparse family shares: registration of a mask-defined pattern (a mechanism
whose implied matrix is dense attention under the same mask), and the start of the
content-based selections that hold ``(heads, block_q, M)`` logit blocks."""
from __future__ import annotations

import inspect

import numpy as np

from .._core.backward import head_summed_product
from .._core.checks import check_cotangent
from .._core.logits import make_logits
from .._core.select import block_rows
from .._core.softmax import normalize_rows
from ..exact.dense import attention_probs
from ..registry import attach, register
from .engine import sparse_attention_vjp


def pattern(factory, **register_kwargs):
    """Register a mask-defined mechanism: ``fn(q, k, v, *, <params>, **options)`` is
    ``sparse_attention(q, k, v, factory(<params>), **options)``; its implied matrix is
    the dense attention matrix under the same mask, its VJP the sparse engine's
    (:func:`refattn.sparse.engine.sparse_attention_vjp`), and ``fn.mask`` is
    ``factory``. All three take the engine's ``sinks=`` (learned sink logits)."""
    def deco(fn):
        # learned sink logits (the engine's sinks=), unless the mask's own parameter is
        # called sinks (sink_attention: StreamingLLM's sink tokens)
        own = "sinks" in inspect.signature(factory).parameters

        def implied(q, k, *, causal=False, scale=None, bias=None, softcap=None,
                    check_finite=True, method=None, block_q=None, block_k=None,
                    workers=None, **params):
            sinks = None if own else params.pop("sinks", None)
            return attention_probs(q, k, mask=factory(**params), causal=causal, scale=scale,
                                   bias=bias, softcap=softcap, sinks=sinks,
                                   check_finite=check_finite)

        def vjp(q, k, v, grad_out, *, grad_lse=None, causal=False, scale=None, bias=None,
                softcap=None, check_finite=True, method="auto", block_q=None,
                block_k=None, workers=None, **params):
            sinks = None if own else params.pop("sinks", None)
            return sparse_attention_vjp(q, k, v, grad_out, mask=factory(**params),
                                        grad_lse=grad_lse, causal=causal, scale=scale,
                                        bias=bias, softcap=softcap, sinks=sinks,
                                        check_finite=check_finite, method=method,
                                        block_q=block_q, block_k=block_k, workers=workers)
        fn.mask = factory
        fn = register(family="sparse", exact=False, supports_causal=True,
                      supports_mask=False, supports_gqa=True, position_free=False,
                      mask=factory, **register_kwargs)(fn)
        implied.__name__, vjp.__name__ = f"{fn.__name__}_matrix", f"{fn.__name__}_vjp"
        attach(fn, implied=implied, vjp=vjp)
        return fn
    return deco


def logit_blocks(q, pb, block_q, heads: int, **options):
    """``(logits, rows_per_block, q_scaled)`` for a reference that forms the logits of
    ``heads`` query heads against all ``M`` keys one block of rows at a time: the logit
    pipeline of ``options`` (mask, causal, scale, bias, softcap, check_finite), the rows
    per block (``block_q``, or about ``BLOCK_ELEMENTS`` logits) and ``q * scale``."""
    logits = make_logits(pb, **options)
    return logits, block_rows(block_q, heads, pb.n, pb.m), q * logits.scale


# --------------------------------------------- attention over each query's own keys
# Shared by the trainable sparse attentions (NSA, MoBA, DSA): each query row attends to
# its own keys, given either as lists ``cols (S, r, T)`` with ``keep (S, r, T)`` marking
# the real entries (padding and causally hidden keys False, their ``cols`` any valid
# index), or -- when that is cheaper -- as a slice ``cols`` of the keys (None: all) and
# a dense mask ``keep ([S,] r, L)`` over them. ``S = 1``: one set for the ``G`` query
# heads of a KV head; ``S = G``: a set per query head.

#: A gathered key costs about this many logits of a dense masked block (NumPy fancy
#: indexing and per-row products against one BLAS product; measured 2-8 at D = 64):
#: sets of more than ``M / GATHER_COST`` keys are attended densely under a mask.
GATHER_COST = 4


def dense_is_cheaper(width: int, m: int) -> bool:
    """Whether ``width`` keys per query cost more gathered than all ``m`` masked."""
    return width * GATHER_COST >= m


def ranked_indices(keep, count: int):
    """The indices of the ``True`` entries of each row of ``keep (..., L)``, ascending,
    as ``(..., count)`` int64 padded with ``-1`` (surplus ``True`` entries dropped)."""
    flat = keep.reshape(-1, keep.shape[-1])
    rows, cols = np.nonzero(flat)                   # row-major: ascending in each row
    first = np.searchsorted(rows, np.arange(flat.shape[0]))
    rank = np.arange(len(rows)) - first[rows]
    ok = rank < count
    out = np.full((flat.shape[0], count), -1, dtype=np.int64)
    out[rows[ok], rank[ok]] = cols[ok]
    return out.reshape(keep.shape[:-1] + (count,))


def block_columns(blocks, size: int, m: int):
    """Key columns of the blocks ``blocks (..., n)`` (``-1``: none) of ``size`` keys:
    ``(cols, valid)``, both ``(..., n * size)``; invalid entries (padding, keys past
    ``m``) point at key 0. No keys (``m = 0``): empty lists."""
    if m == 0:
        empty = np.zeros(blocks.shape[:-1] + (0,), dtype=np.int64)
        return empty, empty.astype(bool)
    cols = blocks[..., :, None] * size + np.arange(size)
    valid = (blocks[..., :, None] >= 0) & (cols < m)
    cols = np.where(valid, cols, 0).reshape(blocks.shape[:-1] + (-1,))
    return cols, valid.reshape(cols.shape)


def dense_span(keep):
    """``(cols, keep)`` for a dense mask ``keep (..., r, M)``: the slice from the first
    to the last key any row keeps, and the mask cut to it."""
    found = np.flatnonzero(keep.reshape(-1, keep.shape[-1]).any(axis=0))
    if len(found) == 0:
        return slice(0, 0), keep[..., :0]
    return slice(int(found[0]), int(found[-1]) + 1), keep[..., found[0]:found[-1] + 1]


def block_keys(chosen, size: int, m: int, pos, causal: bool, count: int):
    """The keys of chosen blocks of ``size`` keys, ``chosen (S, r, nb)`` bool (at most
    ``count`` per row), for the queries at positions ``pos (r,)``; causal: keys
    ``<= pos``. Returns ``(cols, keep)`` for :func:`gather_attention`: lists of
    ``count * size`` keys, or a dense mask when that is cheaper."""
    if not dense_is_cheaper(count * size, m):
        cols, keep = block_columns(ranked_indices(chosen, count), size, m)
        if causal:
            keep &= cols <= pos[:, None]
        return cols, keep
    keep = np.repeat(chosen, size, axis=-1)[..., :m]
    if causal:
        keep &= np.arange(m) <= pos[:, None]
    return dense_span(keep)


def key_lists(chosen, m: int, count: int):
    """``(cols, keep)`` of the keys ``chosen (r, M)`` bool (at most ``count`` per row)
    for :func:`gather_attention`, shared by every head: ``(1, r, count)`` lists, or the
    mask itself when that is cheaper."""
    if dense_is_cheaper(count, m):
        return dense_span(chosen[None])
    idx = ranked_indices(chosen, count)[None]
    return np.maximum(idx, 0), idx >= 0


def gather_attention(qs, keys, values, cols, keep):
    """Softmax attention of one block of query rows over each row's own keys.

    ``qs (G, r, D)``: scaled queries of the ``G`` heads sharing a KV head; ``keys (M, D)``,
    ``values (M, Dv)`` or None; ``cols``, ``keep``: the keys (above). Returns
    ``(p, lse (G, r), out (G, r, Dv) or None, kg, vg)``: ``p`` the probabilities over the
    listed keys ``(G, r, T)`` (over the slice, ``(G, r, L)``, when ``cols`` is one) and
    ``kg``, ``vg`` the gathered (or sliced) keys and values.
    Rows that keep nothing give ``p = 0``, ``out = 0``, ``lse = -inf``. (Products are
    arranged as 2-D or per-row BLAS calls: NumPy's stacked ``(G, r, M) @ (M, Dv)`` can
    be orders of magnitude slower.)"""
    g, r, d = qs.shape
    if cols is None or isinstance(cols, slice):
        kg = keys[cols or slice(None)]
        vg = None if values is None else values[cols or slice(None)]
        s = (qs.reshape(g * r, d) @ kg.T).reshape(g, r, -1)
        np.copyto(s, -np.inf, where=~keep)
    else:
        kg = keys[cols]
        vg = None if values is None else values[cols]
        s = _per_row(kg, qs, transpose=True)
        np.copyto(s, -np.inf, where=~keep)
    lse = normalize_rows(s)
    if values is None:
        return s, lse, None, kg, vg
    if cols is None or isinstance(cols, slice):
        out = (s.reshape(g * r, -1) @ vg).reshape(g, r, -1)
    else:
        out = _per_row(vg, s, transpose=False)
    return s, lse, out, kg, vg


def _per_row(x, y, *, transpose):
    """Per-row products with gathered ``x (S, r, T, E)``: ``transpose``:
    ``y (G, r, E) -> (G, r, T)`` (``x yᵀ``); else ``y (G, r, T) -> (G, r, E)`` (``y x``).
    One list per row (``S = 1``): one ``(r, T, E)`` stacked product for all heads."""
    if x.shape[0] == 1:
        if transpose:
            return (x[0] @ y.transpose(1, 2, 0)).transpose(2, 0, 1)
        return (y.transpose(1, 0, 2) @ x[0]).transpose(1, 0, 2)
    if transpose:
        return (x @ y[..., None])[..., 0]
    return (y[..., None, :] @ x)[..., 0, :]


def gather_attention_vjp(qs, p, out, kg, vg, cols, dob, dlse, dkeys, dvalues):
    """The backward of :func:`gather_attention` for the cotangents ``dob (G, r, Dv)`` and
    ``dlse (G, r)`` (or None): ``dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O) + dlse)``; adds the key
    and value gradients into ``dkeys (M, D)``, ``dvalues (M, Dv)`` (summed over the query
    heads that share a key) and returns the gradient of the scaled queries
    ``(G, r, D)``."""
    g, r, d = qs.shape
    delta = np.einsum("grd,grd->gr", dob, out)
    if dlse is not None:
        delta -= dlse
    if cols is None or isinstance(cols, slice):
        ds = (dob.reshape(g * r, -1) @ vg.T).reshape(p.shape)
        ds -= delta[..., None]
        ds *= p
        dkeys[cols or slice(None)] += head_summed_product(ds, qs)
        dvalues[cols or slice(None)] += head_summed_product(p, dob)
        return (ds.reshape(g * r, -1) @ kg).reshape(g, r, d)
    ds = _per_row(vg, dob, transpose=True)
    ds -= delta[..., None]
    ds *= p
    if cols.shape[0] == 1:                       # one list for all heads: sum over them
        flat = cols[0].reshape(-1)
        np.add.at(dkeys, flat, (ds.transpose(1, 2, 0) @ qs.transpose(1, 0, 2))
                  .reshape(len(flat), -1))
        np.add.at(dvalues, flat, (p.transpose(1, 2, 0) @ dob.transpose(1, 0, 2))
                  .reshape(len(flat), -1))
    else:
        flat = cols.reshape(-1)
        np.add.at(dkeys, flat, (ds[..., None] * qs[:, :, None, :]).reshape(len(flat), -1))
        np.add.at(dvalues, flat, (p[..., None] * dob[:, :, None, :])
                  .reshape(len(flat), -1))
    return _per_row(kg, ds, transpose=False)


def spread_rows(a, cols, p):
    """Add the probabilities ``p`` of :func:`gather_attention` into the implied-matrix
    rows ``a (G, r, M)`` (duplicate padded entries carry 0)."""
    if cols is None or isinstance(cols, slice):
        a[..., cols or slice(None)] += p
        return
    g = np.arange(a.shape[0])[:, None, None]
    r = np.arange(a.shape[1])[None, :, None]
    np.add.at(a, (g, r, np.broadcast_to(cols, p.shape)), p)


def selection_vjp(blocks, q, k, v, pb, grad_out, grad_lse, scale, shapes, check_finite):
    """Gradients of an attention over held-fixed selections (MoBA, DSA): ``blocks`` yields
    the forward's ``(b, hk, heads, rows, _, (p, _, out, keys, values), cols)`` of each
    block of query rows (``gather_attention``'s pieces); returns ``{"q", "k", "v"}`` in
    the inputs' ``shapes``."""
    lead = pb.batch_shape + (pb.heads_q, pb.n)
    do = check_cotangent(grad_out, "grad_out", lead + (pb.dv,), check_finite=check_finite)
    dlse = check_cotangent(grad_lse, "grad_lse", lead, check_finite=check_finite)
    do = do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv)
    dlse = None if dlse is None else dlse.reshape(pb.batch, pb.heads_q, pb.n)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b, hk, hs, rows, _, (p, _, out, kg, vg), cols in blocks:
        dq[b, hs, rows] = scale * gather_attention_vjp(
            q[b, hs, rows] * scale, p, out, kg, vg, cols, do[b, hs, rows],
            None if dlse is None else dlse[b, hs, rows], dk[b, hk], dv[b, hk])
    return {name: pb.input_gradient(x, shape)
            for name, x, shape in zip("qkv", (dq, dk, dv), shapes)}
