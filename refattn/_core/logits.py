"""The logit pipeline shared by the softmax references: one block of
``s = mask(score_mod(softcap(scale * q @ k.T)))`` at a time.

Dense attention calls it once per (batch, KV head) with the whole ``N x M`` block; tiled
attention calls it per ``(block_q, block_k)`` tile. Both therefore define the logits in
exactly one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import masks
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


def make_logits(problem: Problem, *, mask, causal, scale, bias, softcap,
                check_finite: bool = True) -> Logits:
    """Validate the logit options of an attention call and combine ``causal=True``
    with ``mask=`` (as ``causal() & mask``)."""
    check_bool("causal", causal)
    m = None if mask is None else masks.as_mask(mask, problem.batch_shape)
    if causal:
        m = masks.causal() if m is None else masks.causal() & m
    return Logits(resolve_scale(scale, problem.d), resolve_softcap(softcap),
                  as_score_mod(bias, problem.batch_shape, check_finite=check_finite),
                  m, problem.n, problem.m)
