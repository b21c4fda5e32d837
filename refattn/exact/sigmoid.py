r"""Sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention"; FlashSigmoid): each logit through a sigmoid, no normalisation,

.. math::

    O = \sigma(S + b)\, V, \qquad
    S_{ij} = \text{mask}\big(\text{score\_mod}(\text{softcap}(\tfrac{1}{\sqrt{D}}
    q_i \cdot k_j))\big), \qquad b = -\log M \text{ by default},

where :math:`M` is the number of keys (the paper's :math:`b = -\log n`, which keeps the
initial output norm that of softmax attention) and a masked pair (:math:`S_{ij} = -\infty`)
contributes :math:`\sigma(-\infty) = 0`. The rows of :math:`\sigma(S + b)` do not sum to 1
(the registry's ``row_stochastic=False``), and there is no log-sum-exp.

Three forms, equal to float64 rounding: ``"dense"`` (one ``(G, N, M)`` block per batch
element and KV head), ``"tiled"`` (FlashSigmoid: ``(block_q, block_k)`` tiles, skipping
those the mask empties, O(block) memory) and ``"sparse"`` (the kept pairs listed and
reduced one by one, as :func:`refattn.sparse_attention`'s gather path). The backward runs
on tiles: ``dV = σᵀ dO``, ``dS = (dO Vᵀ) ∘ σ(1 - σ)``, ``dQ``, ``dK`` from ``dS`` as for
softmax attention.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from numba import njit

from .._core.backward import head_summed_product
from .._core.checks import check_block, check_choice, check_cotangent, check_memory
from .._core.logits import Logits, make_logits
from .._core.problem import Problem, prepare_qkv, sum_to_shape
from .._core.threads import run_items
from ..boundary.arrays import to_float64
from ..masks import FULL, TileRows
from ..registry import attach, register
from .tiled import default_blocks

__all__ = ["sigmoid_attention", "sigmoid_attention_matrix", "sigmoid_attention_vjp"]

METHODS = ("tiled", "dense", "sparse")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``σ(x)`` in place, without overflow (``σ(-inf) = 0``; NaN stays NaN)."""
    t = np.exp(-np.abs(x))
    np.divide(np.where(x >= 0, 1.0, t), 1.0 + t, out=x)
    return x


def _sigmoid_slope(x: np.ndarray):
    """``(σ(x), σ'(x))``, ``σ' = σ(x) σ(-x) = t / (1 + t)²`` with ``t = e^{-|x|}``
    (accurate where ``1 - σ`` would cancel); ``x`` is overwritten."""
    t = np.exp(-np.abs(x))
    one_t = 1.0 + t
    slope = t / (one_t * one_t)
    np.divide(np.where(x >= 0, 1.0, t), one_t, out=x)
    return x, slope


@dataclass
class _Call:
    """A validated call: flat inputs, the logit pipeline and the offsets ``b`` per query
    head (``given``: the caller's ``sigmoid_bias`` shape, None for the default)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray | None
    pb: Problem
    logits: Logits
    offsets: np.ndarray
    given: tuple | None
    method: str


def _setup(q, k, v, *, sigmoid_bias, mask, causal, scale, bias, softcap, method,
           check_finite) -> _Call:
    method = check_choice("method", method, METHODS)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    if method == "sparse" and logits.mask is None:
        raise ValueError("sigmoid_attention(method='sparse') lists the pairs a mask keeps: "
                         "give mask= or causal=True (without one, use method='tiled')")
    if sigmoid_bias is None:
        return _Call(q, k, v, pb, logits, np.full(pb.heads_q, -np.log(max(pb.m, 1))), None,
                     method)
    b = to_float64(sigmoid_bias, "sigmoid_bias")
    if b.shape not in ((), (pb.heads_q,)):
        raise ValueError(f"sigmoid_bias must be a number or one per query head, shape "
                         f"(Hq,) = ({pb.heads_q},); got shape {b.shape}")
    return _Call(q, k, v, pb, logits, np.broadcast_to(b, (pb.heads_q,)).copy(), b.shape,
                 method)


def _dense_blocks(c: _Call, memory_budget):
    """``(b, hk, heads, σ(S + b))`` per batch element and KV head, ``(G, N, M)``."""
    pb, logits = c.pb, c.logits
    check_memory(pb.group * pb.n * pb.m * 17.0, memory_budget, "dense sigmoid attention",
                 "sigmoid_attention(..., method='tiled')")
    q_scaled, rows, cols = c.q * logits.scale, np.arange(pb.n), np.arange(pb.m)
    for b, hk, hs in pb.kv_groups():
        heads = np.arange(hs.start, hs.stop)
        s = logits.block(q_scaled[b, hs], c.k[b, hk], b, heads, rows, cols)
        s += c.offsets[hs, None, None]
        yield b, hk, hs, _sigmoid(s)


def _tiled(c: _Call, block_q, block_k, workers):
    """FlashSigmoid's forward: per query tile, ``acc += σ(S + b) V`` over the key tiles
    the mask leaves non-empty."""
    pb, logits, g = c.pb, c.logits, c.pb.group
    tiles = TileRows(logits.mask, pb.n, pb.m, block_q, block_k)
    out = np.full((pb.batch, pb.heads_q, pb.n, pb.dv), np.nan)
    local = threading.local()

    def run(item):
        if not hasattr(local, "tile"):
            local.tile = np.empty(g * min(block_q, pb.n) * min(block_k, pb.m))
        b, hk, hs, qb = item
        heads = np.arange(hs.start, hs.stop)
        r0 = qb * block_q
        rows = np.arange(r0, min(r0 + block_q, pb.n))
        qt = c.q[b, hs, r0:r0 + len(rows)] * logits.scale
        acc = np.zeros((g, len(rows), pb.dv))
        for kb, label in zip(*tiles.row(qb)):
            c0 = kb * block_k
            cols = np.arange(c0, min(c0 + block_k, pb.m))
            s = logits.block(qt, c.k[b, hk, c0:c0 + len(cols)], b, heads, rows, cols,
                             apply_mask=label != FULL, buffer=local.tile)
            s += c.offsets[hs, None, None]
            acc += _sigmoid(s) @ c.v[b, hk, c0:c0 + len(cols)]
        out[b, hs, r0:r0 + len(rows)] = acc

    items = [(b, hk, hs, qb) for b, hk, hs in pb.kv_groups() for qb in range(tiles.n_rows)]
    run_items(run, items, workers, float(tiles.grid_tiles) * block_q * block_k * pb.batch
              * pb.heads_q)
    return out


@njit(cache=True, nogil=True)
def _pair_sums(w, rows, cols, v, acc):  # pragma: no cover - compiled
    """``acc[rows[p]] += w[p] * v[cols[p]]`` for each listed pair."""
    for p in range(len(w)):
        for d in range(v.shape[1]):
            acc[rows[p], d] += w[p] * v[cols[p], d]


def _gathered(c: _Call, block_q, block_k, workers):
    """The pair-list form: per query block and head, the kept pairs' logits, their
    sigmoids, and a sum per row."""
    pb, logits, g = c.pb, c.logits, c.pb.group
    tiles = TileRows(logits.mask, pb.n, pb.m, block_q, block_k)
    out = np.full((pb.batch, pb.heads_q, pb.n, pb.dv), np.nan)

    def run(item):
        b, h, qb = item
        rows = np.arange(qb * block_q, min((qb + 1) * block_q, pb.n))
        r, cols = logits.kept_pairs(b, h, rows, block_k, tiles.row(qb))
        qh = c.q[b, h, rows[0]:rows[-1] + 1] * logits.scale
        w = _sigmoid(logits.pairs(qh, c.k[b, h // g], b, h, r, cols, rows[0])
                     + c.offsets[h])
        acc = np.zeros((len(rows), pb.dv))
        _pair_sums(w, r - rows[0], cols, c.v[b, h // g], acc)
        out[b, h, rows[0]:rows[-1] + 1] = acc

    items = [(b, h, qb) for b in range(pb.batch) for h in range(pb.heads_q)
             for qb in range(tiles.n_rows)]
    run_items(run, items, workers, float(tiles.grid_tiles) * block_q * block_k * pb.batch
              * pb.heads_q)
    return out


def _blocks(c: _Call, block_q, block_k):
    """Tile sizes of the tiled and sparse forms (``block_q`` query rows per step of the
    sparse form; ``default_blocks`` of :func:`refattn.tiled_attention` otherwise)."""
    if c.method == "sparse":
        from ..sparse.engine import GATHER_BLOCK_Q, SPARSE_BLOCK
        return (check_block("block_q", block_q) or GATHER_BLOCK_Q,
                check_block("block_k", block_k) or SPARSE_BLOCK)
    return default_blocks(c.pb, c.logits.mask is not None, block_q, block_k)


@register(family="exact", exact=False, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True,
          row_stochastic=False, example={"block_q": 3, "block_k": 5})
def sigmoid_attention(q, k, v, *, sigmoid_bias=None, mask=None, causal=False, scale=None,
                      bias=None, softcap=None, method="tiled", block_q=None, block_k=None,
                      workers=None, check_finite=True, memory_budget=None):
    """Sigmoid attention (module docstring for the equation; FlashSigmoid's algorithm).

    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)`` (GQA).
    sigmoid_bias : ``b``, a number or one per query head ``(Hq,)``; default ``-log M``.
    mask, causal, scale, bias, softcap : as :func:`refattn.attention` (``bias`` is the
        additive array or score modifier of the logits, applied before ``b``).
    method : ``"tiled"`` (default, O(block) working memory), ``"dense"`` (checks
        ``memory_budget``) or ``"sparse"`` (lists the pairs ``mask``/``causal`` keep).
    block_q, block_k, workers : tile sizes (:func:`refattn.exact.tiled.default_blocks`;
        the sparse form's default 64 query rows and 128-key tiles) and threads.

    Returns float64 ``(..., Hq, N, Dv)``; a row that keeps no key gives 0.

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact import sigmoid_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 8, 4))
    >>> out = sigmoid_attention(q, k, v, causal=True)
    >>> s = q @ k.swapaxes(-1, -2) / 2 - np.log(8)            # scale 1/sqrt(4), b = -log M
    >>> p = np.tril(1 / (1 + np.exp(-s)))                      # masked pairs give 0
    >>> bool(np.allclose(out, p @ v))
    True
    """
    c = _setup(q, k, v, sigmoid_bias=sigmoid_bias, mask=mask, causal=causal, scale=scale,
               bias=bias, softcap=softcap, method=method, check_finite=check_finite)
    workers = check_block("workers", workers)
    block_q, block_k = _blocks(c, block_q, block_k)
    if c.method == "dense":
        out = np.full((c.pb.batch, c.pb.heads_q, c.pb.n, c.pb.dv), np.nan)
        for b, hk, hs, p in _dense_blocks(c, memory_budget):
            out[b, hs] = p @ c.v[b, hk]
    elif c.method == "tiled":
        out = _tiled(c, block_q, block_k, workers)
    else:
        out = _gathered(c, block_q, block_k, workers)
    return c.pb.unflatten(out)


def sigmoid_attention_matrix(q, k, *, sigmoid_bias=None, mask=None, causal=False,
                             scale=None, bias=None, softcap=None, method=None, block_q=None,
                             block_k=None, workers=None, check_finite=True,
                             memory_budget=None):
    """The matrix ``σ(S + b)`` ``(..., Hq, N, M)`` of :func:`sigmoid_attention` (``out =
    A V``; rows do not sum to 1). Checks ``memory_budget`` before forming it."""
    c = _setup(q, k, None, sigmoid_bias=sigmoid_bias, mask=mask, causal=causal,
               scale=scale, bias=bias, softcap=softcap, method="dense",
               check_finite=check_finite)
    c.pb.check_matrix_memory(memory_budget, "the matrix of sigmoid_attention",
                             "refattn.exact.sigmoid_attention")
    a = np.full((c.pb.batch, c.pb.heads_q, c.pb.n, c.pb.m), np.nan)
    for b, _, hs, p in _dense_blocks(c, memory_budget):
        a[b, hs] = p
    return c.pb.unflatten(a)


def sigmoid_attention_vjp(q, k, v, grad_out, *, sigmoid_bias=None, mask=None, causal=False,
                          scale=None, bias=None, softcap=None, method="tiled",
                          block_q=None, block_k=None, workers=None, check_finite=True,
                          memory_budget=None):
    r"""Gradients of :func:`sigmoid_attention`: ``{"q", "k", "v"}``, ``"bias"`` for an
    array bias or relative table (as :func:`refattn.exact.dense.attention_vjp`) and
    ``"sigmoid_bias"`` (its shape) when ``sigmoid_bias`` is given.

    With :math:`A = \sigma(S + b)` and ``dO`` (``grad_out``, ``(..., Hq, N, Dv)``):

    .. math::

        dV = A^\top dO, \quad dS = (dO\, V^\top) \circ \sigma'(S + b), \quad
        db_h = \textstyle\sum dS_{h}, \quad dX = dS \circ \tfrac{\partial S}{\partial X},
        \quad dQ = \text{scale}\; dX K, \quad dK = \text{scale}\; dX^\top Q,

    :math:`\sigma' = \sigma(x)\sigma(-x)`; masked pairs give 0. Computed per key tile
    over the query tiles the mask leaves non-empty (``method="dense"``: one tile of all
    ``N x M``), no normalisation to recompute. GQA: a KV head sums its query heads.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> g = ra.vjp("sigmoid_attention", q, k, v, np.ones((1, 6, 4)), sigmoid_bias=-1.0)
    >>> sorted(g), g["sigmoid_bias"].shape
    (['k', 'q', 'sigmoid_bias', 'v'], ())
    """
    shapes = tuple(np.shape(x) for x in (q, k, v))
    c = _setup(q, k, v, sigmoid_bias=sigmoid_bias, mask=mask, causal=causal, scale=scale,
               bias=bias, softcap=softcap, method=method, check_finite=check_finite)
    pb = c.pb
    lead = pb.batch_shape + (pb.heads_q, pb.n, pb.dv)
    do = check_cotangent(grad_out, "grad_out", lead, check_finite=check_finite)
    do = do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv)
    if c.method == "dense":
        check_memory(pb.group * pb.n * pb.m * 24.0, memory_budget,
                     "the dense sigmoid backward", "method='tiled'")
        block_q, block_k = max(pb.n, 1), max(pb.m, 1)
    else:
        block_q, block_k = _blocks(c, block_q, block_k)
    param = None if c.logits.score_mod is None else c.logits.score_mod._parameter_gradient()
    dq, dk, dv, doff = _backward(c, do, block_q, block_k, check_block("workers", workers),
                                 param)
    grads = {name: pb.input_gradient(g, shape)
             for name, g, shape in zip("qkv", (dq, dk, dv), shapes)}
    if param is not None:
        grads["bias"] = param[2](param[0], pb.batch_shape)
    if c.given is not None:
        grads["sigmoid_bias"] = sum_to_shape(doff, c.given)
    return grads


def _backward(c: _Call, do, block_q, block_k, workers, param):
    """The tiled backward on flat ``do (B, Hq, N, Dv)``: each key tile (one work item)
    owns its ``dK``, ``dV`` rows; ``dQ`` and the parameter gradients are added under a
    lock. Returns flat ``dq, dk, dv`` and ``db (Hq,)``."""
    pb, logits, n, m = c.pb, c.logits, c.pb.n, c.pb.m
    tiles = TileRows(logits.mask, n, m, block_q, block_k)
    key_ptr, query_tiles, labels = tiles.columns()
    dq, dk, dv = np.zeros(c.q.shape), np.zeros(c.k.shape), np.zeros(c.v.shape)
    doff = np.zeros(pb.heads_q)
    lock = threading.Lock()

    def run(item):
        b, hk, hs, kb = item
        heads = np.arange(hs.start, hs.stop)
        cs = slice(kb * block_k, min((kb + 1) * block_k, m))
        cols = np.arange(cs.start, cs.stop)
        kt, vt = c.k[b, hk, cs], c.v[b, hk, cs]
        dkt, dvt, dofft = np.zeros(kt.shape), np.zeros(vt.shape), np.zeros(len(heads))
        for pair in range(key_ptr[kb], key_ptr[kb + 1]):
            qb = query_tiles[pair]
            rs = slice(qb * block_q, min((qb + 1) * block_q, n))
            rows = np.arange(rs.start, rs.stop)
            qt, dot = c.q[b, hs, rs] * logits.scale, do[b, hs, rs]
            s, chain = logits.block(qt, kt, b, heads, rows, cols,
                                    apply_mask=labels[pair] != FULL, derivative=True)
            s += c.offsets[hs, None, None]
            p, slope = _sigmoid_slope(s)
            dvt += head_summed_product(p, dot)
            ds = dot @ vt.T                               # dA, then dS in place
            ds *= slope
            dofft += ds.sum(axis=(1, 2))
            ds_logit = ds
            if chain is not None:
                ds = ds * chain
            dkt += head_summed_product(ds, qt)
            with lock:
                dq[b, hs, rs] += (ds @ kt) * logits.scale
                if param is not None:
                    param[1](param[0], ds_logit, b, heads, rows, cols, n, m)
        dk[b, hk, cs], dv[b, hk, cs] = dkt, dvt
        with lock:
            doff[hs] += dofft

    items = [(b, hk, hs, kb) for b, hk, hs in pb.kv_groups()
             for kb in range(tiles.n_cols) if key_ptr[kb + 1] > key_ptr[kb]]
    run_items(run, items, workers,
              float(len(query_tiles)) * block_q * block_k * pb.batch * pb.heads_q)
    return dq, dk, dv, doff


attach(sigmoid_attention, implied=sigmoid_attention_matrix, vjp=sigmoid_attention_vjp)
