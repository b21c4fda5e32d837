"""What the memory mechanisms share. For Transformer-XL and the Compressive Transformer:
the segment recurrence (one logit block per batch, KV head and segment), the compression
of the tokens that leave the memory, the parallel body both forwards call, and
:class:`SegmentMemoryState` with the streaming step both use. For persistent and kNN
memory: the memory slots (:func:`random_memory`, the checks of ``mem_k``/``mem_v``) and
the sequence logits beside them. For all four: the softcap of logits against slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._core.checks import (check_int, check_memory, check_size_memory,
                            check_state_memory, resolve_budget, resolve_rng, resolve_scale,
                            resolve_softcap)
from .._core.logits import make_logits
from .._core.problem import prepare_qkv
from .._core.softmax import finish_rows, softmax_rows
from ..boundary.arrays import to_float64
from ..streaming import State, check_sizes, check_token

__all__ = ["SegmentMemoryState", "random_memory"]


def _softcap(s: np.ndarray, softcap) -> np.ndarray:
    """``softcap * tanh(s / softcap)`` in place, in the order of
    :mod:`refattn._core.logits`."""
    if softcap is not None:
        s /= softcap
        np.tanh(s, out=s)
        s *= softcap
    return s


def _segment_params(segment_len, mem_len):
    segment_len = check_int("segment_len", segment_len, minimum=1)
    mem_len = check_int("mem_len", mem_len, minimum=0)
    return segment_len, mem_len


def _empty_front_rows(out, lse, pb) -> None:
    """Rows at negative positions (``N > M``) see no key: output 0, lse ``-inf``."""
    front = max(0, pb.n - pb.m)
    out[:, :, :front] = 0.0
    lse[:, :, :front] = -np.inf


# ================================= compressing the tokens that leave the memory
_POOLS = ("mean", "max")


def _resolve_compress(compress, rate, d, dv):
    """``(kind, w_k, w_v)`` with kind ``"mean"``, ``"max"``, ``"kernel"`` (a shared
    ``(rate,)`` temporal kernel) or ``"conv"`` (Conv1d weights ``(F, F, rate)``);
    ``dv=None`` (no values: the implied matrix) skips checking the value weights."""
    if isinstance(compress, str):
        if compress not in _POOLS:
            raise ValueError(f"compress must be 'mean', 'max', a (rate,) kernel or a pair "
                             f"of Conv1d weights, got {compress!r}")
        return compress, None, None
    if isinstance(compress, (tuple, list)) and len(compress) == 2 and \
            all(np.ndim(w) == 3 for w in compress):
        w_k = to_float64(compress[0], "compress[0] (key convolution weights)")
        w_v = to_float64(compress[1], "compress[1] (value convolution weights)")
        for name, w, f in (("compress[0]", w_k, d), ("compress[1]", w_v, dv)):
            if f is not None and w.shape != (f, f, rate):
                raise ValueError(f"{name} must have the Conv1d weight shape (out, in, "
                                 f"kernel) = {(f, f, rate)} for rate={rate} and feature "
                                 f"size {f}, got {w.shape}")
        return "conv", w_k, w_v
    w = to_float64(compress, "compress (convolution kernel)")
    if w.shape != (rate,):
        raise ValueError(f"a compression kernel must have shape (rate,) = ({rate},) "
                         f"(kernel size and stride equal the rate); got {w.shape}")
    return "kernel", w, w


def _compress(x, rate, kind, w):
    units = x.shape[-2] // rate
    groups = x[..., :units * rate, :].reshape(x.shape[:-2] + (units, rate, x.shape[-1]))
    if kind == "mean":
        return groups.mean(axis=-2)
    if kind == "max":
        return groups.max(axis=-2)
    if kind == "kernel":
        return np.einsum("...urf,r->...uf", groups, w)
    return np.einsum("...uri,oir->...uo", groups, w)


def _compress_vjp(x, rate, kind, w, dslots):
    """The gradients ``(dx, dw)`` of ``_compress(x, rate, kind, w)`` for the slot
    cotangent ``dslots (..., U, F_out)``: ``"mean"`` spreads ``dslot / c`` over the group;
    ``"max"`` gives it to each channel's arg-max (ties to the first); a ``(c,)`` kernel
    gives ``w_r dslot`` to the group's ``r``-th token and ``dw_r = Σ x_{uc+r} · dslot_u``;
    Conv1d weights ``W (o, i, r)`` give ``Σ_o W_{oir} dslot_{uo}`` and
    ``dW_{oir} = Σ_u dslot_{uo} x_{uc+r, i}``. ``dw`` is None for the pools."""
    units = dslots.shape[-2]
    groups = x[..., :units * rate, :].reshape(x.shape[:-2] + (units, rate, x.shape[-1]))
    flat_g, flat_d = groups.reshape((-1,) + groups.shape[-2:]), dslots.reshape(
        (-1, dslots.shape[-1]))                  # every (batch, head, slot) as one axis
    dw = None
    if kind == "mean":
        dg = np.broadcast_to(dslots[..., None, :] / rate, groups.shape)
    elif kind == "max":
        dg = np.zeros(groups.shape)
        arg = groups.argmax(axis=-2)[..., None, :]
        np.put_along_axis(dg, arg, dslots[..., None, :], axis=-2)
    elif kind == "kernel":
        dg = dslots[..., None, :] * w[:, None]
        dw = np.einsum("urf,uf->r", flat_g, flat_d)
    else:
        dg = np.einsum("...uo,oir->...uri", dslots, w)
        dw = np.einsum("uo,uri->oir", flat_d, flat_g)
    dx = np.zeros(x.shape)
    dx[..., :units * rate, :] = dg.reshape(x.shape[:-2] + (units * rate, x.shape[-1]))
    return dx, dw


def _softcap_derivative(s, softcap):
    """``d softcap(x) / dx = 1 - tanh²(x / c)`` from the capped logits ``s`` (0 where
    ``s`` is ``-inf``), or None without a softcap."""
    if softcap is None:
        return None
    t = s / softcap
    return np.where(np.isfinite(s), 1.0 - t * t, 0.0)


def _compressive_params(segment_len, mem_len, cmem_len, rate):
    segment_len, mem_len = _segment_params(segment_len, mem_len)
    cmem_len = check_int("cmem_len", cmem_len, minimum=0)
    rate = check_int("rate", rate, minimum=1)
    if segment_len % rate or mem_len % rate:
        raise ValueError(f"rate={rate} must divide segment_len={segment_len} and "
                         f"mem_len={mem_len} (the paper's setting), so that the tokens "
                         f"leaving the memory form whole groups of rate tokens")
    return segment_len, mem_len, cmem_len, rate


# ======================================================= the segment recurrence
def _segment_blocks(q, k, pb, logits, segment_len, mem_len, slots=None):
    """The segment recurrence, one block per (batch, KV head, segment).

    Yields ``(b, hk, hs, r0, r1, s, slot_ids, lo, hi)``: query rows ``r0:r1`` (those at
    positions in the segment ``[s0, hi)``) of the query heads ``hs`` with logits ``s``
    of shape ``(G, r1 - r0, len(slot_ids) + hi - lo)`` over the compressed slots
    ``slot_ids`` (of ``slots``, ``(B, Hkv, U, D)``, or none) followed by the raw keys
    ``lo:hi`` (the ``mem_len`` cached positions before the segment and the segment).
    """
    s_len, off = segment_len, pb.m - pb.n
    q_scaled = q * logits.scale
    no_slots = np.zeros(0, np.int64)
    for b, hk, hs in pb.kv_groups():
        heads = np.arange(hs.start, hs.stop)
        for s0 in range(0, pb.m, s_len):
            hi = min(s0 + s_len, pb.m)
            r0, r1 = max(0, s0 - off), min(pb.n, hi - off)
            if r0 >= r1:
                continue
            rows = np.arange(r0, r1)
            lo = max(0, s0 - mem_len)                     # the cache: [lo, s0)
            cols = np.arange(lo, hi)
            s = logits.block(q_scaled[b, hs, r0:r1], k[b, hk, lo:hi], b, heads, rows, cols)
            future = cols[None, :] > rows[:, None] + off  # causal inside the segment
            np.copyto(s, -np.inf, where=future[None])
            slot_ids = no_slots
            if slots is not None:
                cmem_len, rate = slots[1], slots[2]
                u_end = lo // rate                        # slots fully evicted
                slot_ids = np.arange(max(0, u_end - cmem_len), u_end)
                sc = q_scaled[b, hs, r0:r1] @ slots[0][b, hk, slot_ids].T
                s = np.concatenate([_softcap(sc, logits.softcap), s], axis=-1)
            yield b, hk, hs, r0, r1, s, slot_ids, lo, hi


def _segment_attention(q, k, v, *, segment_len, mem_len, cmem_len, rate, compress, mask,
                       causal, scale, bias, softcap, check_finite, matrix=False,
                       memory_budget=None):
    """Shared body of the Transformer-XL and Compressive Transformer references:
    ``(out, lse)``, or the implied matrix when ``matrix``."""
    segment_len, mem_len, cmem_len, rate = _compressive_params(segment_len, mem_len,
                                                               cmem_len, rate)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=not matrix)
    kind, w_k, w_v = _resolve_compress(compress, rate, pb.d, None if matrix else pb.dv)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    slots = None
    if cmem_len:
        slots = (_compress(k, rate, kind, w_k), cmem_len, rate)
        slot_v = None if matrix else _compress(v, rate, kind, w_v)
    blocks = _segment_blocks(q, k, pb, logits, segment_len, mem_len, slots)
    if matrix:
        if cmem_len and kind not in ("mean", "kernel"):
            raise ValueError(f"compressive attention with compress={kind!r} is not linear "
                             f"in v with weights over the sequence: it has no implied "
                             f"(N, M) matrix (only 'mean' and a (rate,) kernel do)")
        coef = np.full(rate, 1.0 / rate) if kind == "mean" else w_k
        pb.check_matrix_memory(
            memory_budget, "the implied matrix of compressive/Transformer-XL attention",
            "refattn.memory.compressive_attention")
        probs = np.zeros((pb.batch, pb.heads_q, pb.n, pb.m))
        for b, _, hs, r0, r1, s, slot_ids, lo, hi in blocks:
            _, row_sum = softmax_rows(s)
            live = row_sum > 0
            np.divide(s, row_sum[..., None], out=s, where=live[..., None])
            s[~live] = 0.0
            nc = len(slot_ids)
            probs[b, hs, r0:r1, lo:hi] += s[..., nc:]
            for a, u in enumerate(slot_ids):       # a slot's weight spread over its group
                probs[b, hs, r0:r1, u * rate:(u + 1) * rate] += \
                    s[..., a, None] * coef
        return pb.unflatten(probs)
    out, lse = pb.poisoned_outputs()
    _empty_front_rows(out, lse, pb)
    for b, hk, hs, r0, r1, s, slot_ids, lo, hi in blocks:
        row_max, row_sum = softmax_rows(s)
        vals = v[b, hk, lo:hi]
        if slots is not None:
            vals = np.concatenate([slot_v[b, hk, slot_ids], vals])
        finish_rows(s @ vals, row_max, row_sum, out[b, hs, r0:r1], lse[b, hs, r0:r1])
    return pb.unflatten(out, lse)


# ------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class SegmentMemoryState(State):
    """Streaming state of Transformer-XL / Compressive Transformer attention.

    Ring buffers of constant size: ``k_buf (B, Hkv, mem_len + S, D)`` and ``v_buf``
    hold the last ``mem_len + S`` tokens (position ``p`` in slot ``p % (mem_len + S)``),
    enough for the cache and the current segment; ``ck_buf (B, Hkv, cmem_len, D)`` and
    ``cv_buf`` hold the compressed slots (slot ``u`` in ``u % cmem_len``).
    """

    k_buf: np.ndarray
    v_buf: np.ndarray
    ck_buf: np.ndarray
    cv_buf: np.ndarray
    batch_shape: tuple
    heads_q: int
    segment_len: int
    mem_len: int
    cmem_len: int
    rate: int
    kind: str
    w_k: np.ndarray | None
    w_v: np.ndarray | None
    scale: float
    softcap: float | None


def _segment_init(batch_shape, heads_q, heads_kv, d, dv, segment_len, mem_len, cmem_len,
                  rate, compress, scale, softcap, memory_budget=None):
    segment_len, mem_len, cmem_len, rate = _compressive_params(segment_len, mem_len,
                                                               cmem_len, rate)
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d,
                                                        dv, min_dv=0)
    bsz, window = math.prod(batch_shape), mem_len + segment_len
    sizes = dict(batch_shape=batch_shape, heads_kv=heads_kv, d=d, dv=dv,
                 segment_len=segment_len, mem_len=mem_len)
    check_state_memory(8.0 * bsz * heads_kv * (window + cmem_len) * (d + dv), memory_budget,
                       "the segment memory state", **sizes,
                       **({"cmem_len": cmem_len} if cmem_len else {}))
    kind, w_k, w_v = _resolve_compress(compress, rate, d, dv)
    return SegmentMemoryState(
        position=0, k_buf=np.zeros((bsz, heads_kv, window, d)),
        v_buf=np.zeros((bsz, heads_kv, window, dv)),
        ck_buf=np.zeros((bsz, heads_kv, cmem_len, d)),
        cv_buf=np.zeros((bsz, heads_kv, cmem_len, dv)), batch_shape=batch_shape,
        heads_q=heads_q, segment_len=segment_len, mem_len=mem_len, cmem_len=cmem_len,
        rate=rate, kind=kind, w_k=w_k, w_v=w_v, scale=resolve_scale(scale, d),
        softcap=resolve_softcap(softcap))


def _segment_step(state: SegmentMemoryState, q_t, k_t, v_t):
    bsz, hkv, window, d = state.k_buf.shape
    dv = state.v_buf.shape[-1]
    hq, g = state.heads_q, state.heads_q // hkv
    q_t = check_token(q_t, "q_t", state.batch_shape + (hq, d)).reshape(bsz, hkv, g, d)
    k_t = check_token(k_t, "k_t", state.batch_shape + (hkv, d)).reshape(bsz, hkv, d)
    v_t = check_token(v_t, "v_t", state.batch_shape + (hkv, dv)).reshape(bsz, hkv, dv)
    t, s_len, mem, c = state.position, state.segment_len, state.mem_len, state.rate
    s0 = (t // s_len) * s_len
    k_buf, v_buf = state.k_buf.copy(), state.v_buf.copy()
    ck_buf, cv_buf = state.ck_buf.copy(), state.cv_buf.copy()
    u_end = max(0, s0 - mem) // c                    # slots evicted before this segment
    if state.cmem_len and t == s0 and t > 0:
        # A segment starts: the groups that just left the memory (still in the ring
        # buffer, which holds positions [t - window, t)) become compressed slots.
        for u in range(max(0, s0 - s_len - mem) // c, u_end):
            pos = np.arange(u * c, (u + 1) * c) % window
            ck_buf[:, :, u % state.cmem_len] = _compress(k_buf[:, :, pos], c, state.kind,
                                                         state.w_k)[:, :, 0]
            cv_buf[:, :, u % state.cmem_len] = _compress(v_buf[:, :, pos], c, state.kind,
                                                         state.w_v)[:, :, 0]
    k_buf[:, :, t % window], v_buf[:, :, t % window] = k_t, v_t
    raw = np.arange(max(0, s0 - mem), t + 1) % window
    keys, vals = k_buf[:, :, raw], v_buf[:, :, raw]
    if state.cmem_len:
        cs = np.arange(max(0, u_end - state.cmem_len), u_end) % state.cmem_len
        keys = np.concatenate([ck_buf[:, :, cs], keys], axis=2)
        vals = np.concatenate([cv_buf[:, :, cs], vals], axis=2)
    s = _softcap(np.einsum("bhgd,bhld->bhgl", q_t * state.scale, keys), state.softcap)
    row_max, row_sum = softmax_rows(s)
    out = np.einsum("bhgl,bhlf->bhgf", s, vals) / row_sum[..., None]
    new = state.replace(position=t + 1, k_buf=k_buf, v_buf=v_buf, ck_buf=ck_buf,
                        cv_buf=cv_buf)
    return out.reshape(state.batch_shape + (hq, dv)), new


# ================================================================= memory slots
def random_memory(num_slots, *, heads_kv, d, dv, rng, memory_budget=None):
    """Standard-normal memory slots ``(mem_k (Hkv, P, D), mem_v (Hkv, P, Dv))`` drawn
    from ``rng`` (an int seed or a ``numpy.random.Generator``), keys first. This is
    what ``num_slots=P, rng=...`` means in :func:`persistent_memory_attention` and
    :func:`knn_memory_attention` (shared by every batch element). More slots than
    ``memory_budget`` (bytes, default :data:`refattn.DEFAULT_MEMORY_BUDGET`) holds raise
    :class:`refattn.MemoryBudgetError` naming ``num_slots`` before any is drawn.

    >>> from refattn.memory import random_memory
    >>> mk, mv = random_memory(4, heads_kv=2, d=3, dv=5, rng=0)
    >>> mk.shape, mv.shape
    ((2, 4, 3), (2, 4, 5))
    """
    num_slots = check_slots_memory(num_slots, 8.0 * heads_kv * (d + dv), memory_budget,
                                   "random_memory")
    gen = resolve_rng(rng, "random memory slots (num_slots=)")
    return (gen.standard_normal((heads_kv, num_slots, d)),
            gen.standard_normal((heads_kv, num_slots, dv)))


def check_slots_memory(num_slots, per_slot: float, memory_budget, what: str) -> int:
    """``num_slots`` checked (an integer >= 0), after checking that ``per_slot`` bytes
    for each fit in ``memory_budget`` (a :class:`refattn.MemoryBudgetError` naming
    ``num_slots`` and the most that fit otherwise): the check of every memory
    mechanism that draws or attends slots."""
    num_slots = check_int("num_slots", num_slots, minimum=0)
    budget = resolve_budget(memory_budget)
    check_size_memory(num_slots * per_slot, budget, f"{what}'s memory slots",
                      f"num_slots={num_slots:,}",
                      f"num_slots <= {int(budget // max(per_slot, 1.0)):,}")
    return num_slots


def _memory_slots(mem_k, mem_v, num_slots, rng, pb, where, *, need_v=True,
                  memory_budget=None):
    """The memory ``(B, Hkv, P, D)``, ``(B, Hkv, P, Dv)`` (or ``None`` for v), given as
    arrays or drawn with :func:`random_memory` after checking that the slots and their
    logits (a ``(G, N, P)`` block) fit in ``memory_budget``."""
    if num_slots is not None:
        if mem_k is not None or mem_v is not None:
            raise ValueError(f"{where}: pass either mem_k and mem_v, or num_slots and rng, "
                             f"not both")
        dv = max(pb.dv, 0)
        check_slots_memory(num_slots, 8.0 * pb.heads_kv * (pb.d + dv) + 17.0 * pb.group
                           * pb.n, memory_budget, where)
        mk, mv = random_memory(num_slots, heads_kv=pb.heads_kv, d=pb.d, dv=dv, rng=rng,
                               memory_budget=memory_budget)
    else:
        if mem_k is None or (need_v and mem_v is None):
            raise TypeError(f"{where} needs the memory: mem_k (..., Hkv, P, D) and mem_v "
                            f"(..., Hkv, P, Dv), or num_slots and rng for random slots")
        mk = to_float64(mem_k, "mem_k")
        mv = to_float64(mem_v, "mem_v") if need_v else None
        shapes = f"mem_k {mk.shape}" + (f", mem_v {mv.shape}" if mv is not None else "")
        if mk.ndim < 3 or (mv is not None and mv.ndim < 3):
            raise ValueError(f"mem_k and mem_v must have shape (..., Hkv, P, D) and "
                             f"(..., Hkv, P, Dv); got {shapes}")
        if mk.shape[-3] != pb.heads_kv or mk.shape[-1] != pb.d:
            raise ValueError(f"mem_k must have shape (..., Hkv={pb.heads_kv}, P, "
                             f"D={pb.d}) like k; got {shapes}")
        if mv is not None and (mv.shape[-3:-1] != mk.shape[-3:-1] or mv.shape[-1] != pb.dv):
            raise ValueError(f"mem_v must have shape (..., Hkv={pb.heads_kv}, P, "
                             f"Dv={pb.dv}) with the P of mem_k; got {shapes}")
        for name, x in (("mem_k", mk), ("mem_v", mv)):
            if x is None:
                continue
            try:
                ok = np.broadcast_shapes(x.shape[:-3], pb.batch_shape) == pb.batch_shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{name} of shape {x.shape} has batch dims that do not "
                                 f"broadcast to the batch dims {pb.batch_shape} of q, k, v")

    def flat(x):
        if x is None:
            return None
        x = np.broadcast_to(x, pb.batch_shape + x.shape[-3:])
        return x.reshape((pb.batch,) + x.shape[-3:])
    return flat(mk), flat(mv)


def _slot_logits(q, pb, slot_keys, *, mask, causal, scale, bias, softcap, check_finite,
                 memory_budget, what):
    """The logits of the sequence keys beside the memory slots ``slot_keys``
    ``(B, Hkv, S, D)``, after checking the working memory of one ``(G, N, S + M)``
    block: ``(logits, q_scaled, rows, cols)``, ``q_scaled = q * logits.scale`` and the
    query and key indices."""
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    check_memory(pb.group * pb.n * (pb.m + slot_keys.shape[-2]) * 17.0, memory_budget,
                 what, "refattn.attention over chunks of queries")
    return logits, q * logits.scale, np.arange(pb.n), np.arange(pb.m)
