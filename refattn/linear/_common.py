"""The engine of feature-map attention shared by linear attention and Performer:
normalized ``φ(Q)(φ(K)^T V)`` in its non-causal, quadratic, recurrent and chunkwise
forms, and its implied matrix. Every form also starts from a given state ``(S_0, z_0)``
(the keys before the first one, summed) and gives the final state
``(S_0 + Σ_j φ(k_j) v_jᵀ, z_0 + Σ_j φ(k_j))``; a query that sees no key gives 0 whatever
the state.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from .._core.checks import check_choice, check_memory
from .._core.varlen import initial_states, state_batch
from ..gradients import sum_to_shape
from ..streaming import State, check_tokens

#: Names of the forms ``method=`` selects.
METHODS = ("quadratic", "recurrent", "chunkwise")


@dataclasses.dataclass(frozen=True)
class FeatureState(State):
    """What the streaming states of feature attention share: ``s = Σ_j φ(k_j) v_jᵀ``
    ``(*batch, Hkv, F, Dv)`` and ``z = Σ_j φ(k_j)`` ``(*batch, Hkv, F)`` over the keys
    consumed, and the sizes and input checking they were made for."""

    s: np.ndarray
    z: np.ndarray
    check_finite: bool
    batch_shape: tuple
    heads_q: int
    heads_kv: int
    d: int
    dv: int


def step_tokens(state, kind, init: str, q_t, k_t, v_t):
    """The tokens of one streaming step, checked against ``state``, which must be a
    ``kind`` made by ``init`` (a ``TypeError`` naming it otherwise)."""
    if not isinstance(state, kind):
        raise TypeError(f"state must be a {kind.__name__} from {init}, got "
                        f"{type(state).__name__}")
    return check_tokens(q_t, k_t, v_t, state.batch_shape, state.heads_q, state.heads_kv,
                        state.d, state.dv, check_finite=state.check_finite)


def read_state(fq, s, z, state):
    """The output of one streaming step, ``φ(q_t)ᵀS / φ(q_t)ᵀz`` for each query head
    from its KV head's ``s (*b, Hkv, F, Dv)`` and ``z (*b, Hkv, F)``;
    ``fq (*b, Hq, F)`` -> ``(*b, Hq, Dv)``."""
    bs = state.batch_shape
    fqg = fq.reshape(bs + (state.heads_kv, state.heads_q // state.heads_kv, fq.shape[-1]))
    num = np.einsum("...hgf,...hfe->...hge", fqg, s)
    den = np.einsum("...hgf,...hf->...hg", fqg, z)
    return safe_divide(num, den).reshape(bs + (state.heads_q, state.dv))


def state_pair(x, name, pb, cu, nf, check_finite):
    """``(S, z)`` flat ``(S, Hkv, F, Dv)``, ``(S, Hkv, F)`` from the pair ``x`` (an
    initial state, or a final state's cotangent; a part None: zero), or ``(None, None)``
    for ``x=None``: ``S`` one per batch row, or per packed sequence of ``cu``."""
    if x is None:
        return None, None
    lead, text = state_batch(pb.batch_shape, cu)
    tails = (pb.heads_kv, nf, pb.dv), (pb.heads_kv, nf)
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name} must be the pair (S, z) of linear attention's state, "
                        f"S ({text}, Hkv, F, Dv) = {lead + tails[0]} and z ({text}, Hkv, "
                        f"F) = {lead + tails[1]}; got {type(x).__name__}")
    parts = []
    for i, (part, tail, what) in enumerate(zip(x, tails, ("Hkv, F, Dv", "Hkv, F"))):
        label = f"{name}[{i}] ({'Sz'[i]})"
        parts.append(np.zeros((int(np.prod(lead)),) + tail) if part is None else
                     initial_states(part, pb.batch_shape, cu, tail, what, name=label,
                                    check_finite=check_finite))
    return tuple(parts)


def state_out(s, z, pb, cu):
    """The flat states ``s``, ``z`` given their leading dimensions back."""
    lead = state_batch(pb.batch_shape, cu)[0]
    return s.reshape(lead + s.shape[1:]), z.reshape(lead + z.shape[1:])


def check_method(method, causal: bool) -> str:
    """The form to compute: a name from :data:`METHODS`, or for ``method=None``
    ``"chunkwise"`` (causal) or ``"linear"`` (non-causal two-product form)."""
    return check_choice("method", method, METHODS, none="chunkwise" if causal else "linear")


def last_visible(n: int, m: int, causal: bool) -> np.ndarray:
    """Index of the last key query ``i`` sees (``-1``: none): ``i + M - N`` causal
    (bottom-right), ``M - 1`` otherwise. Non-decreasing in ``i``."""
    if causal:
        return np.arange(n, dtype=np.int64) + (m - n)
    return np.full(n, m - 1, dtype=np.int64)


def safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den[..., None]``, 0 where ``den == 0`` (NaN propagates)."""
    out = np.zeros(num.shape)
    np.divide(num, den[..., None], out=out, where=(den != 0)[..., None])
    return out


@njit(cache=True, inline="always")
def _add_key(s, z, fk_row, v_row):   # pragma: no cover - compiled
    """One key into the state: ``S += φ(k) vᵀ``, ``z += φ(k)``."""
    for f in range(z.shape[0]):
        a = fk_row[f]
        z[f] += a
        for e in range(s.shape[1]):
            s[f, e] += a * v_row[e]


@njit(cache=True, inline="always")
def _read_query(fq_row, s, z, num):   # pragma: no cover - compiled
    """One query's read-out: ``num = φ(q)ᵀS`` in place; returns ``den = φ(q)ᵀz``."""
    den = 0.0
    num[:] = 0.0
    for f in range(z.shape[0]):
        a = fq_row[f]
        den += a * z[f]
        for e in range(s.shape[1]):
            num[e] += a * s[f, e]
    return den


@njit(cache=True)
def _recurrent_scan(fq, fk, v, last, group, s0, z0, sf, zf):   # pragma: no cover - compiled
    """Numba scan: ``S += φ(k_j) v_j^T``, ``z += φ(k_j)`` from ``(s0, z0)``
    ``(B, Hkv, F, Dv | )``; read out query ``i`` after key ``last[i]`` (queries with
    ``last < 0`` stay 0); the final states into ``sf``, ``zf``. fq ``(B, Hq, N, F)``."""
    nb, hq, n, nf = fq.shape
    hkv, m = fk.shape[1], fk.shape[2]
    dv = v.shape[3]
    out = np.zeros((nb, hq, n, dv))
    s = np.zeros((nf, dv))
    z = np.zeros(nf)
    num = np.zeros(dv)
    for b in range(nb):
        for hk in range(hkv):
            s[:, :] = s0[b, hk]
            z[:] = z0[b, hk]
            i = 0
            while i < n and last[i] < 0:
                i += 1
            for j in range(m):
                _add_key(s, z, fk[b, hk, j], v[b, hk, j])
                while i < n and last[i] == j:
                    for g in range(group):
                        h = hk * group + g
                        den = _read_query(fq[b, h, i], s, z, num)
                        if den != 0.0:
                            for e in range(dv):
                                out[b, h, i, e] = num[e] / den
                    i += 1
            sf[b, hk, :, :] = s
            zf[b, hk, :] = z
    return out


def _grouped(fq: np.ndarray, hkv: int) -> np.ndarray:
    """``(B, Hq, N, F) -> (B, Hkv, G, N, F)``."""
    nb, hq = fq.shape[:2]
    return fq.reshape((nb, hkv, hq // hkv) + fq.shape[2:])


def _core_quadratic(fq, fk, v, last, s0, z0):
    nb, hkv, m = fk.shape[:3]
    fqg = _grouped(fq, hkv)
    a = fqg @ fk[:, :, None].swapaxes(-1, -2)                  # (B, Hkv, G, N, M)
    a = np.where(np.arange(m)[None, :] <= last[:, None], a, 0.0)   # (NaN-safe mask)
    num, den = a @ v[:, :, None], a.sum(-1)
    if s0 is not None:                  # the state, for the queries that see a key
        seen = (last >= 0)[:, None]
        num = num + np.where(seen, fqg @ s0[:, :, None], 0.0)
        den = den + np.where(seen, fqg @ z0[:, :, None, :, None], 0.0)[..., 0]
    out = safe_divide(num, den)
    return out.reshape(fq.shape[:3] + (v.shape[-1],))


def _core_chunkwise(fq, fk, v, last, chunk, s0, z0):
    nb, hkv, m, nf = fk.shape
    dv = v.shape[-1]
    fqg = _grouped(fq, hkv)                                    # (B, Hkv, G, N, F)
    out = np.zeros(fqg.shape[:4] + (dv,))
    s = np.zeros((nb, hkv, 1, nf, dv)) if s0 is None else s0[:, :, None].copy()
    z = np.zeros((nb, hkv, 1, nf, 1)) if z0 is None else z0[:, :, None, :, None].copy()
    for c0 in range(0, m, chunk):
        c1 = min(c0 + chunk, m)
        r0, r1 = np.searchsorted(last, [c0, c1])               # queries ending in chunk
        kc, vc = fk[:, :, None, c0:c1], v[:, :, None, c0:c1]
        if r1 > r0:
            qc = fqg[:, :, :, r0:r1]                           # (B, Hkv, G, r, F)
            a = qc @ kc.swapaxes(-1, -2)                       # (B, Hkv, G, r, c)
            a = np.where(np.arange(c0, c1)[None, :] <= last[r0:r1, None], a, 0.0)
            num = qc @ s + a @ vc
            den = (qc @ z)[..., 0] + a.sum(-1)
            out[:, :, :, r0:r1] = safe_divide(num, den)
        s += kc.swapaxes(-1, -2) @ vc
        z += kc.sum(-2)[..., None]
    return out.reshape(fq.shape[:3] + (dv,)), s[:, :, 0], z[:, :, 0, :, 0]


def _summed_state(fk, v, s0, z0):
    """The final state of the parallel forms: ``(s0 + φ(K)ᵀV, z0 + Σ φ(k))``."""
    sf, zf = fk.swapaxes(-1, -2) @ v, fk.sum(-2)               # (B, Hkv, F, Dv), (.., F)
    return (sf, zf) if s0 is None else (s0 + sf, z0 + zf)


def feature_attention(fq, fk, v, pb, *, causal, method, chunk_size, memory_budget, what,
                      s0=None, z0=None, return_state=False):
    """Normalized linear attention of features ``fq (B, Hq, N, F)``, ``fk (B, Hkv, M, F)``
    and values ``v (B, Hkv, M, Dv)`` in the form ``method`` (already checked), from the
    state ``s0 (B, Hkv, F, Dv)``, ``z0 (B, Hkv, F)`` (both or neither; None: 0).
    Returns ``out (B, Hq, N, Dv)``, or ``(out, sf, zf)`` with the final state when
    ``return_state``."""
    last = last_visible(pb.n, pb.m, causal)
    if method == "linear":
        kv, ksum = _summed_state(fk, v, s0, z0)
        fqg = _grouped(fq, pb.heads_kv)
        out = safe_divide(fqg @ kv[:, :, None], (fqg @ ksum[:, :, None, :, None])[..., 0])
        if pb.m == 0:                   # no key: every query gives 0
            out[:] = 0.0
        out = out.reshape(fq.shape[:3] + (v.shape[-1],))
        return (out, kv, ksum) if return_state else out
    if method == "quadratic":
        check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 16.0, memory_budget,
                     f"{what}(method='quadratic')", f"{what}(method='chunkwise')")
        out = _core_quadratic(fq, fk, v, last, s0, z0)
        return (out,) + _summed_state(fk, v, s0, z0) if return_state else out
    if method == "recurrent":
        nf = fk.shape[-1]
        sf = np.empty((pb.batch, pb.heads_kv, nf, pb.dv))
        zf = np.empty((pb.batch, pb.heads_kv, nf))
        out = _recurrent_scan(fq, fk, v, last, pb.group,
                              np.zeros(sf.shape) if s0 is None else s0,
                              np.zeros(zf.shape) if z0 is None else z0, sf, zf)
        return (out, sf, zf) if return_state else out
    out, sf, zf = _core_chunkwise(fq, fk, v, last, chunk_size, s0, z0)
    return (out, sf, zf) if return_state else out


def feature_attention_matrix(fq, fk, pb, causal):
    """``A = φ(Q)φ(K)^T`` masked and row-normalized, ``(B, Hq, N, M)``; 0 rows for a
    zero denominator."""
    last = last_visible(pb.n, pb.m, causal)
    a = _grouped(fq, pb.heads_kv) @ fk[:, :, None].swapaxes(-1, -2)
    a = np.where(np.arange(pb.m)[None, :] <= last[:, None], a, 0.0)
    den = a.sum(-1)
    out = np.zeros(a.shape)
    np.divide(a, den[..., None], out=out, where=(den != 0)[..., None])
    return out.reshape((pb.batch, pb.heads_q, pb.n, pb.m))


# --------------------------------------------------------------------------- backward
#
# With num_i = φq_iᵀS_i, den_i = φq_iᵀz_i and o_i = num_i / den_i, a cotangent g_i of o_i
# gives dnum_i = g_i / den_i and dden_i = -(g_i · o_i) / den_i (both 0 where den_i = 0),
# then dφq_i = S_i dnum_i + z_i dden_i, and every key j in V_i receives
# dφk_j += φq_i (dnum_i · v_j + dden_i) and dv_j += (φq_i · φk_j) dnum_i.


def output_cotangents(g, num, den):
    """``(dnum, dden)`` of ``o = num / den`` for the cotangent ``g`` of ``o``: ``g / den``
    and ``-(g·o) / den``, both 0 where ``den == 0`` (NaN propagates)."""
    out = safe_divide(num, den)
    dnum = safe_divide(g, den)
    dden = -safe_divide((g * out).sum(-1)[..., None], den)[..., 0]
    return dnum, dden


@njit(cache=True)
def _recurrent_scan_vjp(fq, fk, v, g, last, group, s0, z0, dsf,
                        dzf):   # pragma: no cover - compiled
    """Numba backward of :func:`_recurrent_scan`: a forward scan from ``(s0, z0)``
    recomputes each query's ``(S_i, z_i)`` read-out and its ``dφq_i``; a reverse scan over
    the keys carries ``R = dS_f + Σ_{i: last_i >= j} φq_i dnum_iᵀ`` ``(F, Dv)`` and
    ``r = dz_f + Σ φq_i dden_i`` ``(F)`` (``dS_f``, ``dz_f``: the final state's
    cotangent), giving ``dφk_j = R v_j + r``, ``dv_j = Rᵀ φk_j`` and at the end the
    initial state's gradient ``(R, r)``. O(F·Dv) state."""
    nb, hq, n, nf = fq.shape
    hkv, m = fk.shape[1], fk.shape[2]
    dv_ = v.shape[3]
    dfq = np.zeros((nb, hq, n, nf))
    dfk = np.zeros((nb, hkv, m, nf))
    dvv = np.zeros((nb, hkv, m, dv_))
    ds0 = np.zeros((nb, hkv, nf, dv_))
    dz0 = np.zeros((nb, hkv, nf))
    dnum = np.zeros((group, n, dv_))
    dden = np.zeros((group, n))
    s = np.zeros((nf, dv_))
    z = np.zeros(nf)
    num = np.zeros(dv_)
    for b in range(nb):
        for hk in range(hkv):
            # forward: the read-outs, their cotangents and dφq
            s[:, :] = s0[b, hk]
            z[:] = z0[b, hk]
            dnum[:, :, :] = 0.0
            dden[:, :] = 0.0
            i = 0
            while i < n and last[i] < 0:
                i += 1
            for j in range(m):
                _add_key(s, z, fk[b, hk, j], v[b, hk, j])
                while i < n and last[i] == j:
                    for gi in range(group):
                        h = hk * group + gi
                        den = _read_query(fq[b, h, i], s, z, num)
                        if den != 0.0:
                            go = 0.0
                            for e in range(dv_):
                                dnum[gi, i, e] = g[b, h, i, e] / den
                                go += g[b, h, i, e] * (num[e] / den)
                            dden[gi, i] = -go / den
                            for f in range(nf):
                                acc = z[f] * dden[gi, i]
                                for e in range(dv_):
                                    acc += s[f, e] * dnum[gi, i, e]
                                dfq[b, h, i, f] = acc
                    i += 1
            # reverse: keys from last to first, adding the queries that end at each
            s[:, :] = dsf[b, hk]                # R
            z[:] = dzf[b, hk]                   # r
            i = n - 1
            for j in range(m - 1, -1, -1):
                while i >= 0 and last[i] == j:
                    for gi in range(group):
                        h = hk * group + gi
                        for f in range(nf):
                            a = fq[b, h, i, f]
                            z[f] += a * dden[gi, i]
                            for e in range(dv_):
                                s[f, e] += a * dnum[gi, i, e]
                    i -= 1
                for f in range(nf):
                    acc = z[f]
                    for e in range(dv_):
                        acc += s[f, e] * v[b, hk, j, e]
                        dvv[b, hk, j, e] += s[f, e] * fk[b, hk, j, f]
                    dfk[b, hk, j, f] = acc
            ds0[b, hk, :, :] = s
            dz0[b, hk, :] = z
    return dfq, dfk, dvv, ds0, dz0


def _masked(x, cols, last_rows):
    """``x`` with 0 where key ``cols`` lies after a query's ``last_rows`` (NaN-safe)."""
    return np.where(cols[None, :] <= last_rows[:, None], x, 0.0)


def _state_terms(fqg, dnum, dden, dsf, dzf):
    """``(dS_0, dz_0)`` of the parallel forms: the final state's cotangent plus
    ``Σ_i φq_i dnum_iᵀ`` and ``Σ_i φq_i dden_i`` over the KV head's queries."""
    ds0 = np.einsum("bhgnf,bhgne->bhfe", fqg, dnum)
    dz0 = np.einsum("bhgnf,bhgn->bhf", fqg, dden)
    return (ds0, dz0) if dsf is None else (ds0 + dsf, dz0 + dzf)


def _final_terms(fk, v, dsf, dzf):
    """The final state's cotangent into the keys and values: ``dφk_j = dS_f v_j + dz_f``,
    ``dv_j = dS_fᵀ φk_j`` (zeros without one)."""
    if dsf is None:
        return 0.0, 0.0
    return v @ dsf.swapaxes(-1, -2) + dzf[:, :, None, :], fk @ dsf


def _vjp_quadratic(fqg, fk, v, gg, last, s0, z0, dsf, dzf):
    m = fk.shape[2]
    cols = np.arange(m)
    kt = fk[:, :, None]                                        # (B, Hkv, 1, M, F)
    a = _masked(fqg @ kt.swapaxes(-1, -2), cols, last)         # (B, Hkv, G, N, M)
    num, den = a @ v[:, :, None], a.sum(-1)
    seen = (last >= 0)[:, None]
    if s0 is not None:
        num = num + np.where(seen, fqg @ s0[:, :, None], 0.0)
        den = den + np.where(seen, fqg @ z0[:, :, None, :, None], 0.0)[..., 0]
    dnum, dden = output_cotangents(gg, num, den)
    da = _masked(dnum @ v[:, :, None].swapaxes(-1, -2) + dden[..., None], cols, last)
    dfq = da @ kt
    if s0 is not None:
        dfq += (dnum @ s0[:, :, None].swapaxes(-1, -2)
                + dden[..., None] * z0[:, :, None, None])
    dfk = np.einsum("bhgnm,bhgnf->bhmf", da, fqg)
    dv = np.einsum("bhgnm,bhgne->bhme", a, dnum)
    tk, tv = _final_terms(fk, v, dsf, dzf)
    return (dfq, dfk + tk, dv + tv) + _state_terms(fqg, dnum, dden, dsf, dzf)


def _vjp_linear(fqg, fk, v, gg, s0, z0, dsf, dzf):
    kv, ksum = _summed_state(fk, v, s0, z0)
    kv, ksum = kv[:, :, None], ksum[:, :, None, None, :]       # (B, Hkv, 1, F, Dv | 1, F)
    num = fqg @ kv
    den = (fqg * ksum).sum(-1)
    if fk.shape[2] == 0:                # no key: every query gives 0 (no gradient)
        den = np.zeros(den.shape)
    dnum, dden = output_cotangents(gg, num, den)
    dfq = dnum @ kv.swapaxes(-1, -2) + dden[..., None] * ksum
    ds, dz = _state_terms(fqg, dnum, dden, dsf, dzf)           # dS (B, Hkv, F, Dv)
    return dfq, v @ ds.swapaxes(-1, -2) + dz[:, :, None, :], fk @ ds, ds, dz


def _vjp_chunkwise(fqg, fk, v, gg, last, chunk, s0, z0, dsf, dzf):
    nb, hkv, m, nf = fk.shape
    dv_ = v.shape[-1]
    dnum, dden = np.zeros(gg.shape), np.zeros(gg.shape[:-1])
    dfq = np.zeros(fqg.shape)
    s = np.zeros((nb, hkv, 1, nf, dv_)) if s0 is None else s0[:, :, None].copy()
    z = np.zeros((nb, hkv, 1, 1, nf)) if z0 is None else z0[:, :, None, None].copy()
    bounds = [(c0, min(c0 + chunk, m)) for c0 in range(0, m, chunk)]
    rows = [np.searchsorted(last, bd) for bd in bounds]        # queries ending in chunk
    for (c0, c1), (r0, r1) in zip(bounds, rows):               # forward: dnum, dden, dφq
        kc, vc = fk[:, :, None, c0:c1], v[:, :, None, c0:c1]
        if r1 > r0:
            qc, cols, lr = fqg[:, :, :, r0:r1], np.arange(c0, c1), last[r0:r1]
            a = _masked(qc @ kc.swapaxes(-1, -2), cols, lr)
            dn, dd = output_cotangents(gg[:, :, :, r0:r1], qc @ s + a @ vc,
                                       (qc * z).sum(-1) + a.sum(-1))
            da = _masked(dn @ vc.swapaxes(-1, -2) + dd[..., None], cols, lr)
            dfq[:, :, :, r0:r1] = dn @ s.swapaxes(-1, -2) + dd[..., None] * z + da @ kc
            dnum[:, :, :, r0:r1], dden[:, :, :, r0:r1] = dn, dd
        s += kc.swapaxes(-1, -2) @ vc
        z += kc.sum(-2, keepdims=True)
    dfk, dv = np.zeros(fk.shape), np.zeros(v.shape)
    # Σ φq dnumᵀ and Σ φq dden over later queries, from the final state's cotangent
    big_r = np.zeros((nb, hkv, nf, dv_)) if dsf is None else dsf.copy()
    small_r = np.zeros((nb, hkv, 1, nf)) if dzf is None else dzf[:, :, None].copy()
    for (c0, c1), (r0, r1) in zip(bounds[::-1], rows[::-1]):   # reverse: dφk, dv
        kc, vc = fk[:, :, c0:c1], v[:, :, c0:c1]
        dfk[:, :, c0:c1] = vc @ big_r.swapaxes(-1, -2) + small_r
        dv[:, :, c0:c1] = kc @ big_r
        if r1 > r0:
            qc, cols, lr = fqg[:, :, :, r0:r1], np.arange(c0, c1), last[r0:r1]
            dn, dd = dnum[:, :, :, r0:r1], dden[:, :, :, r0:r1]
            a = _masked(qc @ kc[:, :, None].swapaxes(-1, -2), cols, lr)
            da = _masked(dn @ vc[:, :, None].swapaxes(-1, -2) + dd[..., None], cols, lr)
            dfk[:, :, c0:c1] += np.einsum("bhgrc,bhgrf->bhcf", da, qc)
            dv[:, :, c0:c1] += np.einsum("bhgrc,bhgre->bhce", a, dn)
            big_r += np.einsum("bhgrf,bhgre->bhfe", qc, dn)
            small_r += np.einsum("bhgrf,bhgr->bhf", qc, dd)[:, :, None]
    return dfq, dfk, dv, big_r, small_r[:, :, 0]


def feature_attention_vjp(fq, fk, v, g, pb, *, causal, method, chunk_size, memory_budget,
                          what, s0=None, z0=None, dsf=None, dzf=None, return_state=False):
    r"""Backward of :func:`feature_attention` for the cotangent ``g (B, Hq, N, Dv)`` of
    its output and ``(dsf, dzf)`` of its final state (both or neither; None: 0), from
    the initial state ``(s0, z0)``: ``(dφq (B, Hq, N, F), dφk (B, Hkv, M, F),
    dv (B, Hkv, M, Dv))`` and, when ``return_state``, the initial state's gradient
    ``ds0 (B, Hkv, F, Dv)``, ``dz0 (B, Hkv, F)``; GQA groups summed into their KV head,
    by the form ``method`` (each with its own backward: the quadratic
    ``dA = (dnum vᵀ + dden) ∘ mask``, the two products ``dS = Σ_i φq_i dnum_iᵀ``, the
    Numba reverse scan, or chunks in reverse)."""
    grads = _feature_vjp(fq, fk, v, g, pb, causal, method, chunk_size, memory_budget, what,
                         s0, z0, dsf, dzf)
    return grads if return_state else grads[:3]


def _feature_vjp(fq, fk, v, g, pb, causal, method, chunk_size, memory_budget, what, s0, z0,
                 dsf, dzf):
    last = last_visible(pb.n, pb.m, causal)
    if method == "recurrent":
        shape = (pb.batch, pb.heads_kv, fk.shape[-1])
        zeros = np.zeros(shape + (pb.dv,)), np.zeros(shape)
        return _recurrent_scan_vjp(fq, fk, v, g, last, pb.group,
                                   zeros[0] if s0 is None else s0,
                                   zeros[1] if z0 is None else z0,
                                   zeros[0] if dsf is None else dsf,
                                   zeros[1] if dzf is None else dzf)
    fqg, gg = _grouped(fq, pb.heads_kv), _grouped(g, pb.heads_kv)
    if method == "linear":
        dfq, dfk, dv, ds0, dz0 = _vjp_linear(fqg, fk, v, gg, s0, z0, dsf, dzf)
    elif method == "quadratic":
        check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 32.0, memory_budget,
                     f"the gradient of {what}(method='quadratic')",
                     f"{what}(method='chunkwise')")
        dfq, dfk, dv, ds0, dz0 = _vjp_quadratic(fqg, fk, v, gg, last, s0, z0, dsf, dzf)
    else:
        dfq, dfk, dv, ds0, dz0 = _vjp_chunkwise(fqg, fk, v, gg, last, chunk_size, s0, z0,
                                                dsf, dzf)
    return dfq.reshape(fq.shape), dfk, dv, ds0, dz0


def input_gradients(pb, shapes, **grads) -> dict:
    """Flat ``(B, H, L, *)`` gradients back in the caller's batch dimensions, summed to
    the inputs' own ``shapes`` (``{name: shape}``; broadcast dimensions summed)."""
    return {name: sum_to_shape(pb.unflatten(grad), shapes[name])
            for name, grad in grads.items()}


def check_gradients_finite(grads: dict, what: str) -> dict:
    """``grads`` unchanged if finite; otherwise a ``ValueError`` naming the first
    non-finite gradient, its index and the cause (``check_finite=False`` skips this)."""
    for name, grad in grads.items():
        if not np.isfinite(grad).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(grad))[0])
            raise ValueError(
                f"the gradient of {what} for {name} is not finite (first at index {bad}): "
                f"a denominator φ(q_i)·Σ_j φ(k_j) below float64's normal range (~2e-308; "
                f"features underflowing, e.g. logits of thousands) makes 1/denominator "
                f"overflow, and the forward's output of that row has lost its precision "
                f"too. Use smaller inputs, or pass check_finite=False to get the "
                f"non-finite result")
    return grads
