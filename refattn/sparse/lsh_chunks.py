"""The sorted-chunk layout of Reformer LSH attention (:mod:`refattn.sparse.lsh`, whose
docstring states the definitions): every round's queries and keys sorted by
``(bucket, position)`` and cut into chunks, the logits of a slice of chunks with the
duplicate correction, the per-round softmax, the online merge of rounds, and the maps
from the sorted layout back to positions.
"""
from __future__ import annotations

import numpy as np

#: The logit a shared-QK token gets for attending to itself (Reformer, Sec. 2).
SELF_LOGIT = -1e5
#: Working memory, in bytes, that one group of heads (or one slice of sorted chunks in
#: the forward) may use inside the reference.
_BLOCK_BYTES = 2**24


def _layout(bq, bk, chunk, shared_qk):
    """The sorted-chunk layout of every round: ``qi (R, P, nc, C)`` the query positions
    of each sorted chunk (-1 for padding), ``kw (R, P, nc, 2C)`` the key positions of its
    window (previous chunk, then its own; -1 for padding), and ``chunk_q``, ``chunk_k
    (R, P, N)`` the sorted chunk of each query and key position. ``O(R·P·N)`` integers."""
    r_count, p_count, n = bq.shape
    c = chunk
    nc = -(-n // c)
    positions = np.arange(n)

    def sort(b):
        order = np.argsort(b, axis=-1, kind="stable")        # by (bucket, position)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, positions[None, None, :], axis=-1)
        return order, rank // c

    order_q, chunk_q = sort(bq)
    order_k, chunk_k = (order_q, chunk_q) if shared_qk else sort(bk)
    sq = np.full((r_count, p_count, nc * c), -1)
    sq[..., :n] = order_q
    qi = sq.reshape(r_count, p_count, nc, c)
    sk = np.full((r_count, p_count, (nc + 1) * c), -1)
    sk[..., c:c + n] = order_k
    kc = sk.reshape(r_count, p_count, nc + 1, c)
    kw = np.concatenate([kc[:, :, :-1], kc[:, :, 1:]], axis=-1)
    return qi, kw, chunk_q, chunk_k


def _rounds(qf, kf, bq, bk, layout, *, shared_qk, causal, scale, chunks=slice(None)):
    """The per-round attention logits of a group of heads for the sorted chunks
    ``chunks`` of every round (all of them by default).

    Returns ``(qi, kw, s)``: the layout's ``qi (R, P, nc', C)`` and ``kw (R, P, nc', 2C)``
    for those chunks and their logits ``s (R, P, nc', C, 2C)`` with the duplicate
    correction applied and ``-inf`` for pairs not attended in that round.
    """
    qi, kw, chunk_q, chunk_k = layout
    qi, kw = qi[:, :, chunks], kw[:, :, chunks]
    r_count, p_count = bq.shape[:2]
    i_idx, j_idx = qi[..., :, None], kw[..., None, :]        # (R,P,nc,C,1), (R,P,nc,1,2C)
    base = (i_idx >= 0) & (j_idx >= 0)
    if causal:
        base &= j_idx <= i_idx
    ic, jc = np.maximum(i_idx, 0), np.maximum(j_idx, 0)
    pidx = np.arange(p_count)[None, :, None, None, None]

    # N_ij: in how many rounds the pair is attended (same bucket, inside the window).
    count = np.zeros(base.shape, dtype=np.int64)
    for r in range(r_count):
        same = bq[r][pidx, ic] == bk[r][pidx, jc]
        gap = chunk_k[r][pidx, jc] - chunk_q[r][pidx, ic]
        count += same & ((gap == 0) | (gap == -1)) & base
    round_ids = np.arange(r_count)[:, None, None, None, None]
    attended = base & (bq[round_ids, pidx, ic] == bk[round_ids, pidx, jc])
    if not shared_qk:
        count += i_idx == j_idx          # the own-position part holds key i

    qg = qf[pidx[..., 0], np.maximum(qi, 0)]                 # (R, P, nc, C, D)
    kg = kf[pidx[..., 0], np.maximum(kw, 0)]                 # (R, P, nc, 2C, D)
    s = np.matmul(qg, np.swapaxes(kg, -1, -2))
    s *= scale
    if shared_qk:
        np.copyto(s, SELF_LOGIT, where=i_idx == j_idx)
    s -= np.log(np.maximum(count, 1))
    np.copyto(s, -np.inf, where=~attended)
    return qi, kw, s


def _self_logit(qf, kf, bq, bk, layout, scale):
    """Separate-QK mode's own-position part: the corrected logit ``(P, N)`` of key ``i``
    for query ``i`` (counted once, plus once per round that attends the pair anyway)."""
    chunk_q, chunk_k = layout[2:]
    n_self = np.ones(bq.shape[1:], dtype=np.int64)
    for r in range(bq.shape[0]):
        gap = chunk_k[r] - chunk_q[r]
        n_self += (bq[r] == bk[r]) & ((gap == 0) | (gap == -1))
    return scale * np.einsum("pnd,pnd->pn", qf, kf) - np.log(n_self)


def _whole_rounds(qf, kf, bq, bk, *, chunk, shared_qk, causal, scale):
    """Every sorted chunk of every round at once (the implied matrix and the VJP):
    ``(qi, kw, s, self_logit)``, ``self_logit`` None in shared-QK mode."""
    layout = _layout(bq, bk, chunk, shared_qk)
    qi, kw, s = _rounds(qf, kf, bq, bk, layout, shared_qk=shared_qk, causal=causal,
                        scale=scale)
    return qi, kw, s, None if shared_qk else _self_logit(qf, kf, bq, bk, layout, scale)


def _merge_part(state, part_out, part_lse, qi):
    """Merge one round's normalized outputs ``part_out (P, nc', C, Dv)`` and log-sum-exps
    ``part_lse (P, nc', C)`` of the sorted queries ``qi (P, nc', C)`` (-1: padding) into
    the running softmax state ``(acc (P, N, Dv), row_max (P, N), row_sum (P, N))`` (a
    position occurs once per round): the online softmax over parts, so parts of equal
    lse get exactly equal weights."""
    acc, row_max, row_sum = state
    valid = qi >= 0
    p_idx = np.nonzero(valid)[0]
    pos = qi[valid]
    part = part_lse[valid]
    old = row_max[p_idx, pos]
    new = np.maximum(old, part)
    safe = np.where(np.isneginf(new), 0.0, new)
    alpha, beta = np.exp(old - safe), np.exp(part - safe)
    acc[p_idx, pos] = acc[p_idx, pos] * alpha[:, None] + part_out[valid] * beta[:, None]
    row_sum[p_idx, pos] = row_sum[p_idx, pos] * alpha + beta
    row_max[p_idx, pos] = new


def _round_softmax(s):
    """``p = exp(s - max)`` in place, per-round row sums and lse (``-inf`` if empty)."""
    top = s.max(axis=-1)
    safe = np.where(np.isneginf(top), 0.0, top)
    s -= safe[..., None]
    np.exp(s, out=s)
    total = s.sum(axis=-1)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, safe + np.log(total), -np.inf)
    return total, lse


def _unsort(x_sorted, qi, n):
    """Sorted-chunk layout ``(R, P, nc, C, ...)`` -> positions ``(R, P, N, ...)``."""
    r_count, p_count = qi.shape[:2]
    flat = x_sorted.reshape((r_count, p_count, x_sorted.shape[2] * x_sorted.shape[3])
                            + x_sorted.shape[4:])[:, :, :n]
    order = qi.reshape(r_count, p_count, -1)[:, :, :n]
    out = np.empty_like(flat)
    rr = np.arange(r_count)[:, None, None]
    pp = np.arange(p_count)[None, :, None]
    out[rr, pp, order] = flat
    return out


def _head_groups(p_total, n_hashes, n, chunk, d, dv, copies=5):
    per_head = n_hashes * (-(-n // chunk)) * chunk * (2 * chunk * copies * 8
                                                      + 3 * (d + dv) * 8)
    size = max(1, int(_BLOCK_BYTES // max(per_head, 1)))
    return [slice(a, min(a + size, p_total)) for a in range(0, p_total, size)]


def _chunk_slices(nc, n_hashes, heads, chunk, d, dv, copies=5):
    """Slices of the ``nc`` sorted chunks whose logits, masks and gathered rows (for
    ``heads`` heads and every round) fit in ``_BLOCK_BYTES``: the forward's working
    memory beyond its ``O(R·P·N)`` layout does not grow with ``N``."""
    per_chunk = n_hashes * heads * chunk * (2 * chunk * copies * 8 + 3 * (d + dv) * 8)
    step = max(1, int(_BLOCK_BYTES // max(per_chunk, 1)))
    return [slice(a, min(a + step, nc)) for a in range(0, nc, step)]


def _combine_weights(lse_parts):
    """``lse = log sum_r exp(lse_r)`` and the weights ``exp(lse_r - lse)``."""
    top = lse_parts.max(axis=0)
    safe = np.where(np.isneginf(top), 0.0, top)
    w = np.exp(lse_parts - safe)
    total = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(total > 0, safe + np.log(total), -np.inf)
        w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    return lse, w


def _keys_from_windows(x, kw, n):
    """Sum values in key-window layout ``(R, P, nc, 2C, ...)`` (the previous chunk, then
    the own chunk of each query chunk) onto key positions ``(R, P, N, ...)``: every key
    lies in two windows (as the own chunk of its chunk and as the previous chunk of the
    next)."""
    r_count, p_count, nc, c2 = kw.shape
    c = c2 // 2
    acc = np.zeros((r_count, p_count, nc + 1, c) + x.shape[4:])
    acc[:, :, :-1] += x[:, :, :, :c]
    acc[:, :, 1:] += x[:, :, :, c:]
    pos = np.concatenate([kw[:, :, :1, :c], kw[:, :, :, c:]], axis=2)   # sorted keys
    pos = pos.reshape(r_count, p_count, -1)
    acc = acc.reshape((r_count, p_count, -1) + x.shape[4:])
    valid = pos >= 0
    rr, pp = np.nonzero(valid)[:2]
    out = np.zeros((r_count, p_count, n) + x.shape[4:])
    out[rr, pp, pos[valid]] = acc[valid]       # each position once per round
    return out
