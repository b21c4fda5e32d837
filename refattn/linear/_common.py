"""The engine of feature-map attention shared by linear attention and Performer:
normalized ``φ(Q)(φ(K)^T V)`` in its non-causal, quadratic, recurrent and chunkwise
forms, and its implied matrix.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from .._core.checks import check_choice, check_memory
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


@njit(cache=True)
def _recurrent_scan(fq, fk, v, last, group):   # pragma: no cover - compiled
    """Numba scan: ``S += φ(k_j) v_j^T``, ``z += φ(k_j)``; read out query ``i`` after key
    ``last[i]`` (queries with ``last < 0`` stay 0). fq ``(B, Hq, N, F)``."""
    nb, hq, n, nf = fq.shape
    hkv, m = fk.shape[1], fk.shape[2]
    dv = v.shape[3]
    out = np.zeros((nb, hq, n, dv))
    s = np.zeros((nf, dv))
    z = np.zeros(nf)
    num = np.zeros(dv)
    for b in range(nb):
        for hk in range(hkv):
            s[:, :] = 0.0
            z[:] = 0.0
            i = 0
            while i < n and last[i] < 0:
                i += 1
            for j in range(m):
                for f in range(nf):
                    a = fk[b, hk, j, f]
                    z[f] += a
                    for e in range(dv):
                        s[f, e] += a * v[b, hk, j, e]
                while i < n and last[i] == j:
                    for g in range(group):
                        h = hk * group + g
                        den = 0.0
                        num[:] = 0.0
                        for f in range(nf):
                            a = fq[b, h, i, f]
                            den += a * z[f]
                            for e in range(dv):
                                num[e] += a * s[f, e]
                        if den != 0.0:
                            for e in range(dv):
                                out[b, h, i, e] = num[e] / den
                    i += 1
    return out


def _grouped(fq: np.ndarray, hkv: int) -> np.ndarray:
    """``(B, Hq, N, F) -> (B, Hkv, G, N, F)``."""
    nb, hq = fq.shape[:2]
    return fq.reshape((nb, hkv, hq // hkv) + fq.shape[2:])


def _core_quadratic(fq, fk, v, last):
    nb, hkv, m = fk.shape[:3]
    a = _grouped(fq, hkv) @ fk[:, :, None].swapaxes(-1, -2)     # (B, Hkv, G, N, M)
    a = np.where(np.arange(m)[None, :] <= last[:, None], a, 0.0)   # (NaN-safe mask)
    out = safe_divide(a @ v[:, :, None], a.sum(-1))
    return out.reshape(fq.shape[:3] + (v.shape[-1],))


def _core_chunkwise(fq, fk, v, last, chunk):
    nb, hkv, m, nf = fk.shape
    dv = v.shape[-1]
    fqg = _grouped(fq, hkv)                                    # (B, Hkv, G, N, F)
    out = np.zeros(fqg.shape[:4] + (dv,))
    s = np.zeros((nb, hkv, 1, nf, dv))
    z = np.zeros((nb, hkv, 1, nf, 1))
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
    return out.reshape(fq.shape[:3] + (dv,))


def feature_attention(fq, fk, v, pb, *, causal, method, chunk_size, memory_budget, what):
    """Normalized linear attention of features ``fq (B, Hq, N, F)``, ``fk (B, Hkv, M, F)``
    and values ``v (B, Hkv, M, Dv)`` in the form ``method`` (already checked)."""
    last = last_visible(pb.n, pb.m, causal)
    if method == "linear":
        kv = fk.swapaxes(-1, -2) @ v                           # (B, Hkv, F, Dv)
        ksum = fk.sum(-2)                                      # (B, Hkv, F)
        fqg = _grouped(fq, pb.heads_kv)
        out = safe_divide(fqg @ kv[:, :, None], (fqg @ ksum[:, :, None, :, None])[..., 0])
        return out.reshape(fq.shape[:3] + (v.shape[-1],))
    if method == "quadratic":
        check_memory(pb.batch * pb.heads_q * pb.n * pb.m * 16.0, memory_budget,
                     f"{what}(method='quadratic')", f"{what}(method='chunkwise')")
        return _core_quadratic(fq, fk, v, last)
    if method == "recurrent":
        return _recurrent_scan(fq, fk, v, last, pb.group)
    return _core_chunkwise(fq, fk, v, last, chunk_size)


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
