"""The logit pipeline shared by the softmax references: one block of
``s = mask(score_mod(softcap(scale * q @ k.T)))`` at a time.

Dense attention calls it once per (batch, KV head) with the whole ``N x M`` block; tiled
attention calls it per ``(block_q, block_k)`` tile; the sparse engine's gather path lists
the kept pairs (:meth:`Logits.kept_pairs`) and forms their logits one by one
(:meth:`Logits.pairs`). All therefore define the logits in exactly one place. A call's
learned sink logits (gpt-oss, ``sinks=``: one per query head, in the softmax denominator
only) travel with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .. import masks
from ..boundary.arrays import to_float64
from ..masks.scores import ScoreMod, as_score_mod
from .checks import check_bool, resolve_scale, resolve_softcap
from .problem import Problem


@dataclass(frozen=True)
class Logits:
    """How to turn ``q`` and ``k`` into masked logits for one attention call."""

    scale: float
    softcap: float | None
    score_mod: ScoreMod | None
    mask: masks.Mask | None
    n: int
    m: int
    #: Learned sink logits ``(Hq,)`` (``-inf``: no sink for that head), or None.
    sinks: np.ndarray | None = None

    def block(self, q_scaled: np.ndarray, k: np.ndarray, b: int, heads: np.ndarray,
              rows: np.ndarray, cols: np.ndarray, apply_mask: bool = True,
              buffer: np.ndarray | None = None, derivative: bool = False):
        """Logits of one block.

        ``q_scaled``: ``(G, r, D)``, already multiplied by ``scale``; ``k``: ``(c, D)``;
        ``b``: flat batch index; ``heads``: ``(G,)`` query heads; ``rows``: ``(r,)`` query
        rows; ``cols``: ``(c,)`` key indices. Returns a ``(G, r, c)`` float64 array with
        ``-inf`` where the mask drops a key (skipped when ``apply_mask`` is false, for
        tiles known to be full). It is written into ``buffer`` (a flat float64 array of
        at least ``G * r * c`` elements, reused between tiles) when one is given.

        ``derivative=True`` returns ``(s, ds_dx)`` instead, ``ds_dx`` the derivative of
        the final logit in the raw one ``x = q_scaled·k`` through the softcap and the
        score modifier (``1 - tanh²(x / c)`` times the modifier's derivative), ``None``
        where both are absent (the derivative is 1).
        """
        g, r, d = q_scaled.shape
        size = g * r * len(cols)
        out = None if buffer is None or buffer.size < size else \
            buffer[:size].reshape(g * r, len(cols))
        s = np.matmul(q_scaled.reshape(g * r, d), k.T, out=out).reshape(g, r, len(cols))
        chain = None
        if self.softcap is not None:
            s /= self.softcap
            np.tanh(s, out=s)
            if derivative:
                chain = 1.0 - s * s
            s *= self.softcap
        if self.score_mod is not None or (apply_mask and self.mask is not None):
            bi, hi = np.asarray(b), heads[:, None, None]
            qi, ki = rows[None, :, None], cols[None, None, :]
            if self.score_mod is not None:
                if derivative and not self.score_mod.additive:
                    dmod = self.score_mod._derivative(s, bi, hi, qi, ki, self.n, self.m)
                    chain = dmod if chain is None else chain * dmod
                s = np.array(np.broadcast_to(
                    self.score_mod._apply(s, bi, hi, qi, ki, self.n, self.m), s.shape),
                    dtype=np.float64)
            if apply_mask and self.mask is not None:
                keep = np.asarray(self.mask._eval(bi, hi, qi, ki, self.n, self.m))
                np.copyto(s, -np.inf, where=~keep)
        return (s, chain) if derivative else s

    def kept_pairs(self, b: int, h: int, rows: np.ndarray, block_k: int, tiles):
        """Row-major ``(row, col)`` int arrays of the pairs the mask keeps among the
        consecutive query ``rows`` of flat batch ``b``, query head ``h``; ``tiles`` is
        ``(key tile indices, labels)`` of the ``block_k``-wide key tiles to look at
        (:meth:`refattn.masks.TileRows.row`): ``FULL`` tiles keep every pair, others are
        evaluated element by element."""
        found_r, found_c = [], []
        for kb, label in zip(*tiles):
            cols = np.arange(kb * block_k, min((kb + 1) * block_k, self.m))
            if label == masks.FULL:
                rr, cc = np.meshgrid(rows, cols, indexing="ij")
            else:
                keep = np.broadcast_to(self.mask._eval(
                    np.asarray(b), np.asarray(h), rows[:, None], cols[None, :], self.n,
                    self.m), (len(rows), len(cols)))
                i, j = np.nonzero(keep)
                rr, cc = rows[i], cols[j]
            found_r.append(rr.ravel())
            found_c.append(cc.ravel())
        if not found_r:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        r, c = np.concatenate(found_r), np.concatenate(found_c)
        order = np.lexsort((c, r))
        return r[order], c[order]

    def pairs(self, q_scaled: np.ndarray, k: np.ndarray, b: int, h: int, r: np.ndarray,
              c: np.ndarray, row0: int) -> np.ndarray:
        """Logits of listed pairs (no mask: they are the kept ones): ``q_scaled (r', D)``
        the scaled query rows from ``row0``, ``k (M, D)`` the keys of query head ``h``,
        ``r``, ``c`` the pairs' query rows and key columns; returns ``(len(r),)``."""
        s = _pair_logits(q_scaled, k, r - row0, c)
        if self.softcap is not None:
            s = self.softcap * np.tanh(s / self.softcap)
        if self.score_mod is not None:
            s = np.array(np.broadcast_to(self.score_mod._apply(
                s, np.asarray(b), np.asarray(h), r, c, self.n, self.m), s.shape),
                dtype=np.float64)
        return s


@njit(cache=True, nogil=True)
def _pair_logits(q, k, rows, cols):  # pragma: no cover - compiled
    """``s[p] = q[rows[p]] . k[cols[p]]`` for each listed pair."""
    s = np.empty(len(rows))
    for p in range(len(rows)):
        total = 0.0
        for d in range(q.shape[1]):
            total += q[rows[p], d] * k[cols[p], d]
        s[p] = total
    return s


def check_sinks(sinks, heads_q: int, check_finite: bool = True):
    """``sinks``: the learned sink logits, one per query head, shape ``(Hq,)`` (``-inf``
    allowed: no sink for that head); float64, or None."""
    if sinks is None:
        return None
    s = to_float64(sinks, "sinks", check_finite=False)
    if s.shape != (heads_q,):
        raise ValueError(f"sinks must be the learned sink logits, one per query head, "
                         f"shape (Hq,) = ({heads_q},); got shape {s.shape} (the number "
                         f"of StreamingLLM sink tokens is refattn.masks.sinks(n) or "
                         f"sink_attention's sinks=)")
    if check_finite and (np.isnan(s).any() or np.isposinf(s).any()):
        raise ValueError(f"sinks {s.shape} contains nan or +inf; pass check_finite=False "
                         f"to allow them (-inf, no sink, is allowed)")
    return s


def make_logits(problem: Problem, *, mask, causal, scale, bias, softcap,
                check_finite: bool = True, sinks=None) -> Logits:
    """Validate the logit options of an attention call and combine ``causal=True``
    with ``mask=`` (as ``causal() & mask``); ``sinks``: :func:`check_sinks`."""
    check_bool("causal", causal)
    m = None if mask is None else masks.as_mask(mask, problem.batch_shape)
    if causal:
        m = masks.causal() if m is None else masks.causal() & m
    return Logits(resolve_scale(scale, problem.d), resolve_softcap(softcap),
                  as_score_mod(bias, problem.batch_shape, check_finite=check_finite),
                  m, problem.n, problem.m,
                  check_sinks(sinks, problem.heads_q, check_finite))
