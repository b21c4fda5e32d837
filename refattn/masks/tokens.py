"""Token sets: masks that single out positions rather than distances: the summary
positions of :func:`fixed` (Sparse Transformer), the first keys of :func:`sinks` and
:func:`prefix_lm`, the positions of :func:`global_tokens`, and the packed sequences of
:func:`document` (keep iff query and key share a document id).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_count
from .bands import _BlockBand, causal
from .base import EMPTY, FULL, PARTIAL, Mask, _Named, _offset

__all__ = ["fixed", "sinks", "prefix_lm", "global_tokens", "document"]


# ---------------------------------------------------------------- periodic keys
class _KeyPeriodic(Mask):
    """Keep key ``j`` iff ``j % period >= period - count`` (the last ``count`` positions of
    every period)."""

    analytic = True

    def __init__(self, period, count, name):
        self.period, self.count, self.name = period, count, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        keep = kv_idx % self.period >= self.period - self.count
        return np.broadcast_to(keep, np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))

    def _kept_below(self, x):
        """How many of the positions ``0 .. x - 1`` are kept."""
        return (x // self.period) * self.count + np.maximum(
            0, x % self.period - (self.period - self.count))

    def _classify(self, t):
        kept = self._kept_below(t.k_hi + 1) - self._kept_below(t.k_lo)
        size = t.k_hi - t.k_lo + 1
        return np.where(kept == size, FULL, np.where(kept == 0, EMPTY, PARTIAL))[None, :]


def fixed(block: int, summary: int = 1) -> Mask:
    """The Sparse Transformer's fixed pattern (Child et al. 2019): a query keeps the keys
    of its own block of ``block`` positions and the last ``summary`` positions of every
    block: keep iff ``i' // block == j // block`` or ``j % block >= block - summary``.
    Combine with ``causal()`` for autoregressive models."""
    block = check_count("block", block, minimum=1)
    summary = check_count("summary", summary)
    if summary > block:
        raise ValueError(f"summary={summary} must not exceed block={block}")
    return _Named(_BlockBand(0, block, "") | _KeyPeriodic(block, summary, ""),
                  f"fixed({block}, summary={summary})")


# --------------------------------------------------------------------- key prefix
class _KeyPrefix(Mask):
    """Keep key ``j`` iff ``j < count`` (attention sinks, the prefix of a prefix LM)."""

    analytic = True

    def __init__(self, count, name):
        self.count, self.name = count, name

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        return np.broadcast_to(kv_idx < self.count,
                               np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))

    def _classify(self, t):
        labels = np.where(t.k_hi < self.count, FULL,
                          np.where(t.k_lo >= self.count, EMPTY, PARTIAL))
        return labels[None, :].astype(np.int8)


def sinks(count: int) -> Mask:
    """Keep the first ``count`` keys for every query: the attention sinks of
    StreamingLLM (Xiao et al. 2024), usually ``sinks(4) | sliding_window(w)``."""
    count = check_count("count", count)
    return _KeyPrefix(count, f"sinks({count})")


def prefix_lm(prefix: int) -> Mask:
    """Prefix language model: every query sees the first ``prefix`` keys
    (bidirectional within the prefix), and beyond it attends causally (T5, UniLM)."""
    prefix = check_count("prefix", prefix)
    return _Named(_KeyPrefix(prefix, "") | causal(), f"prefix_lm({prefix})")


# ------------------------------------------------------------------ global tokens
class _GlobalTokens(Mask):
    analytic = True

    def __init__(self, indices, queries=True, keys=True):
        idx = np.unique(np.asarray(indices).reshape(-1))
        if idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0):
            raise ValueError(f"global_tokens indices must be non-negative integer "
                             f"positions, got {np.asarray(indices)!r}")
        self.indices = idx.astype(np.int64)
        self.queries, self.keys = queries, keys
        shown = ", ".join(map(str, self.indices[:6])) + (", ..." if idx.size > 6 else "")
        self.name = f"global_tokens([{shown}]" + ("" if queries else ", queries=False") + (
            "" if keys else ", keys=False") + ")"

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        pos = q_idx + _offset("bottom_right", n, m)
        rows = np.isin(pos, self.indices) if self.queries else np.zeros(np.shape(pos), bool)
        cols = np.isin(kv_idx, self.indices) if self.keys else \
            np.zeros(np.shape(kv_idx), bool)
        return rows | cols

    def _classify(self, t):
        n, m = t.n, t.m
        off = m - n
        size = max(m, n + max(off, 0), int(self.indices.max(initial=-1)) + 1) + 1
        member = np.zeros(size + 1, np.int64)  # prefix counts of global positions
        member[self.indices + 1] = 1
        cum = np.cumsum(member)

        def count(lo, hi):  # global positions within [lo, hi], positions < 0 excluded
            lo, hi = np.clip(lo, 0, size), np.clip(hi + 1, 0, size)
            return cum[hi] - cum[lo]

        cq = count(t.q_lo + off, t.q_hi + off)[:, None] * int(self.queries)
        ck = count(t.k_lo, t.k_hi)[None, :] * int(self.keys)
        full = (((cq == (t.q_hi - t.q_lo + 1)[:, None]) & self.queries)
                | ((ck == (t.k_hi - t.k_lo + 1)[None, :]) & self.keys))
        return np.where(full, FULL, np.where((cq == 0) & (ck == 0), EMPTY, PARTIAL))


def global_tokens(indices, *, queries: bool = True, keys: bool = True) -> Mask:
    """Global tokens (Longformer, BigBird): the positions in ``indices`` attend to every
    key and every query attends to them: keep iff ``i' in G`` or ``j in G``.
    ``queries=False`` drops the first part (keep iff ``j in G``), ``keys=False`` the
    second (keep iff ``i' in G``: the rows of global queries only).

    >>> import refattn as ra
    >>> ra.masks.global_tokens([1], keys=False).materialize(3, 3).astype(int).tolist()
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    """
    return _GlobalTokens(indices, check_bool("queries", queries), check_bool("keys", keys))


# ----------------------------------------------------------------------- documents
class _Document(Mask):
    analytic = True

    def __init__(self, q_ids, kv_ids, name):
        self.q_ids, self.kv_ids, self.name = q_ids, kv_ids, name

    def _ids(self, n, m):
        """Document id of each query row and each key, checked against the lengths."""
        kv = self.kv_ids
        if m is not None and kv.shape[0] != m:
            raise ValueError(f"document ids have length {kv.shape[0]} but there are "
                             f"M={m} keys")
        if self.q_ids is not None:
            if n is not None and self.q_ids.shape[0] != n:
                raise ValueError(f"document q_ids have length {self.q_ids.shape[0]} but "
                                 f"there are N={n} queries")
            return self.q_ids, kv
        off = _offset("bottom_right", n, m)
        if n is not None and off < 0:
            raise ValueError(f"document(ids) with N={n} > M={m} has queries before the "
                             f"first key position; pass document(q_ids, kv_ids)")
        return kv[off:off + (len(kv) if n is None else n)], kv

    def _eval(self, b, h, q_idx, kv_idx, n, m):
        q_ids, kv_ids = self._ids(n, m)
        return q_ids[q_idx] == kv_ids[kv_idx]

    def _classify(self, t):
        q_ids, kv_ids = self._ids(t.n, t.m)
        if 0 in t.shape:
            return np.zeros(t.shape, np.int8)
        q_ids = q_ids[t.q_lo[0]:t.q_hi[-1] + 1]
        qs = t.q_lo - t.q_lo[0]
        q_min, q_max = np.minimum.reduceat(q_ids, qs), np.maximum.reduceat(q_ids, qs)
        k_min = np.minimum.reduceat(kv_ids, t.k_lo)
        k_max = np.maximum.reduceat(kv_ids, t.k_lo)
        disjoint = (q_max[:, None] < k_min[None, :]) | (k_max[None, :] < q_min[:, None])
        same = ((q_min == q_max)[:, None] & (k_min == k_max)[None, :]
                & (q_min[:, None] == k_min[None, :]))
        return np.where(same, FULL, np.where(disjoint, EMPTY, PARTIAL))


def document(ids, kv_ids=None) -> Mask:
    """Block-diagonal mask of packed sequences: keep iff query and key belong to the
    same document.

    ``document(ids)``: ``ids[j]`` is the document of key position ``j`` (length ``M``)
    and query ``i`` belongs to ``ids[i']``. ``document(q_ids, kv_ids)``: separate ids of
    length ``N`` and ``M``. Combine with ``causal()`` for packed causal training.
    """
    def check(x, name):
        arr = np.asarray(x)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
            raise ValueError(f"document {name} must be a 1-D integer array, got "
                             f"dtype {arr.dtype} shape {arr.shape}")
        return arr.astype(np.int64)
    if kv_ids is None:
        ids = check(ids, "ids")
        return _Document(None, ids, f"document({len(ids)} positions, "
                                    f"{len(np.unique(ids))} documents)")
    q, kv = check(ids, "q_ids"), check(kv_ids, "kv_ids")
    return _Document(q, kv, f"document({len(q)} queries, {len(kv)} keys)")
