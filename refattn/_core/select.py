"""Selecting keys: the top-k keep rule of top-k, routing and memory attention, and the
query-block size of references that hold ``block_q x M`` logits at a time.
"""
from __future__ import annotations

import numpy as np

from .checks import check_int

__all__ = ["BLOCK_ELEMENTS", "block_rows", "topk_keep"]


#: Default number of logits in one query block (``G * block_q * M``): 8 MiB of float64.
BLOCK_ELEMENTS = 2**20


def block_rows(block_q, heads: int, n: int, m: int) -> int:
    """Query rows per block: ``block_q`` if given, else about ``BLOCK_ELEMENTS`` logits."""
    if block_q is not None:
        return check_int("block_q", block_q, minimum=1)
    return max(1, min(max(n, 1), BLOCK_ELEMENTS // (heads * max(m, 1))))


def topk_keep(s: np.ndarray, topk: int) -> np.ndarray:
    """Boolean ``(..., M)``: the keys each row of logits ``s`` keeps.

    The ``topk`` largest finite-or-``+inf`` logits; among those equal to the k-th largest
    the lowest indices; all non-``-inf`` logits when fewer than ``topk`` remain. NaN
    logits are always kept, so that NaN propagates to the output instead of vanishing.
    """
    live = ~np.isneginf(s)
    if topk >= s.shape[-1]:
        return live
    # k-th largest logit of each row (partition of -s puts NaN last, -inf logits last).
    kth = -np.partition(-s, topk - 1, axis=-1)[..., topk - 1:topk]
    keep = s > kth
    tie = (s == kth) & live
    need = topk - keep.sum(axis=-1, keepdims=True)
    keep |= tie & (np.cumsum(tie, axis=-1) <= need)
    keep |= np.isnan(s)
    return keep
