r"""What S4D and the selective scan share: the conversion of parameters that may be complex
(kept complex128, else float64), the check of a shape (naming the expected layout), the
tile of time steps their compiled kernels work on, the gates (silu, softplus), packed
sequence restarts, the two-level chunkwise scan, and :func:`scan_vjp`, the backward of
their common diagonal recurrence :math:`h_t = e^{\delta_t A} h_{t-1} + \delta_t u_t B_t`,
:math:`y_t = s\,\mathrm{Re}(C_t \cdot h_t)` (S4D is the case :math:`\delta = 1`,
:math:`A \to \Delta A`, :math:`B \to \bar B` constant).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..boundary.arrays import to_float64
from ..recurrent.linear_rnn import associative_scan

#: Time steps the compiled kernels process per tile (per-thread scratch, cache sized).
TILE = 512

#: Elements (batch·dim·positions·N) one block of a chunkwise scan holds.
BLOCK_ELEMENTS = 2**20


def number_array(x, name, *, check_finite=True, allow_complex=True) -> np.ndarray:
    """``x`` as complex128 if it is complex (when allowed), else float64."""
    if x is not None and np.iscomplexobj(x):
        if not allow_complex:
            raise TypeError(f"{name} must be real here, got complex dtype "
                            f"{np.asarray(x).dtype} with shape {np.shape(x)}")
        arr = np.asarray(x).astype(np.complex128)
        if check_finite and not np.isfinite(arr).all():
            raise ValueError(f"{name} {arr.shape} contains non-finite values; pass "
                             f"check_finite=False to allow them")
        return arr
    return to_float64(x, name, check_finite=check_finite)


def check_shape(arr, name, expected, what):
    """``ValueError`` unless ``arr`` has shape ``expected`` (``what``: its layout)."""
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got "
                         f"{arr.shape}")


@njit(cache=True, inline="always")
def silu(z):   # pragma: no cover - compiled
    if z >= 0.0:
        return z / (1.0 + math.exp(-z))
    e = math.exp(z)
    return z * e / (1.0 + e)


def silu_np(z):
    """``z · sigmoid(z)`` without overflow warnings."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, z / (1.0 + e), z * e / (1.0 + e))


def softplus_np(x):
    """PyTorch's softplus (beta 1, threshold 20): ``x`` above 20, ``log1p(exp(x))``."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def dsilu(z):
    """``d silu / dz = σ(z)·(1 + z·(1 − σ(z)))``."""
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))
    return sig * (1.0 + z * (1.0 - sig))


def two_level_scan(a, c, state, chunk):
    """``h_t = a_t h_{t-1} + c_t`` along axis 0 of time-major ``(T, ...)`` arrays from
    ``h_{-1} = state``, in two levels as the chunkwise forms do: associative scans inside
    chunks of ``chunk`` steps, then across the chunk ends. Returns ``h`` ``(T, ...)``."""
    T = a.shape[0]
    k = -(-T // chunk)
    pad = k * chunk - T
    if pad:
        a = np.concatenate([a, np.ones((pad,) + a.shape[1:], a.dtype)])
        c = np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)])
    a, c = (np.ascontiguousarray(x.reshape((k, chunk) + x.shape[1:]).swapaxes(0, 1))
            for x in (a, c))
    p_in, h_in = associative_scan(a, c, axis=0)
    ends_c = h_in[-1].copy()
    ends_c[0] += p_in[-1, 0] * state
    ends = associative_scan(p_in[-1], ends_c, axis=0)[1]
    h = p_in * np.concatenate([state[None], ends[:-1]]) + h_in
    return h.swapaxes(0, 1).reshape((k * chunk,) + h.shape[2:])[:T]


# ------------------------------------------------- backward of the diagonal recurrence
def scan_vjp(u, dt, A, B, C, gy, reset, factor, glast, variable, method, chunk=64):
    r"""The backward of ``h_t = exp(δ_t A) h_{t-1} + δ_t u_t B_t`` (``h`` restarting at
    ``reset``), ``y_t = factor · Re Σ_n C_t h_t`` for ``u, dt (batch, dim, L)``,
    ``A (dim, N)``, ``B``, ``C`` ``(batch | 1, groups, N, L | 1)`` (all in ``A``'s
    dtype), the cotangents ``gy`` of ``y`` and ``glast (batch, dim, N)`` of the last
    state. Returns ``(du, ddt, ysum, dA, dB, dC)``: the gradients of ``u`` and ``dt``
    through the state, ``Re Σ_n C h`` (the output without its factor, for a gate), and
    those of ``A``, ``B``, ``C`` in their internal layouts (complex: ``∂/∂Re +
    i ∂/∂Im``).
    ``variable``: whether ``B``, ``C`` vary over time (their shapes cannot say when
    ``L <= 1``). ``method``: ``"recurrent"`` (Numba) or ``"chunkwise"`` (two-level
    scans of ``chunk`` steps).
    """
    if method == "recurrent":
        return _recurrent_bwd(u, dt, A, B, C, gy, reset, factor, glast, variable)
    return _chunkwise_bwd(u, dt, A, B, C, gy, reset, factor, glast, variable, chunk)


@njit(cache=True, parallel=True)
def _scan_bwd_kernel(u, dt, A, B, C, var_b, var_c, gy, reset, has_reset, factor, glast,
                     per_state, block, du, ddt, ysum, dA, dB,
                     dC):   # pragma: no cover - compiled
    """Reverse-time recurrence ``dh_t = s·gy_t·conj(C_t) + conj(a_{t+1})·dh_{t+1}``,
    one tile of ``TILE`` steps at a time: a forward pass keeps the state at each tile
    start (thread-local, ``L/TILE`` states), each tile's states are recomputed from it.
    ``per_state=False``: units (batch row, channel), writing ``du``, ``ddt`` (the parts
    through the state), ``ysum`` (``Re Σ C h``, for the gate), ``dA (batch, dim, N)`` and
    a constant ``B``/``C``'s ``(batch, dim, N, 1)``. ``per_state=True``: units (batch
    row, ``block`` channels, state ``n``), writing a variable ``B``/``C``'s gradient
    ``(batch, groups, N, L)`` (channels sharing a group run in one unit: no races)."""
    nb, dim, length = u.shape
    nstate = A.shape[1]
    per_b, per_c = dim // B.shape[1], dim // C.shape[1]
    nblk = dim // block
    units = nb * nblk * nstate if per_state else nb * dim
    ntile = (length + TILE - 1) // TILE
    for unit in prange(units):
        if per_state:
            i, rest = unit // (nblk * nstate), unit % (nblk * nstate)
            d0, n0 = (rest // nstate) * block, rest % nstate
            d1, n1 = d0 + block, n0 + 1
        else:
            i, d0, n0, n1 = unit // dim, unit % dim, 0, nstate
            d1 = d0 + 1
        ib = i if B.shape[0] > 1 else 0
        ic = i if C.shape[0] > 1 else 0
        write_b, write_c = var_b == per_state, var_c == per_state
        ck = np.zeros((ntile + 1, n1 - n0), dtype=A.dtype)
        hbuf = np.zeros(TILE, dtype=A.dtype)
        abuf = np.zeros(TILE, dtype=A.dtype)
        accd, accu, accy = np.zeros(TILE), np.zeros(TILE), np.zeros(TILE)
        for d in range(d0, d1):
            gb, gc = d // per_b, d // per_c
            for nn in range(n1 - n0):            # forward: the state at each tile start
                a, h = A[d, n0 + nn], ck[0, nn] * 0
                for t in range(length):
                    if t % TILE == 0:
                        ck[t // TILE, nn] = h
                    bt = B[ib, gb, n0 + nn, t if var_b else 0]
                    h = dt[i, d, t] * u[i, d, t] * bt if has_reset and reset[t] else \
                        np.exp(dt[i, d, t] * a) * h + dt[i, d, t] * u[i, d, t] * bt
            dh = glast[i, d, n0:n1].copy()
            for k in range(ntile - 1, -1, -1):
                t0 = k * TILE
                m = min(TILE, length - t0)
                accd[:m], accu[:m], accy[:m] = 0.0, 0.0, 0.0
                for nn in range(n1 - n0):
                    n = n0 + nn
                    a, h = A[d, n], ck[k, nn]
                    for j in range(m):           # recompute the tile's states
                        t = t0 + j
                        bt = B[ib, gb, n, t if var_b else 0]
                        abuf[j] = 0.0 if has_reset and reset[t] else np.exp(dt[i, d, t] * a)
                        h = abuf[j] * h + dt[i, d, t] * u[i, d, t] * bt
                        hbuf[j] = h
                    g, da = dh[nn], A[d, n] * 0
                    for j in range(m - 1, -1, -1):
                        t = t0 + j
                        bt = B[ib, gb, n, t if var_b else 0]
                        ct = C[ic, gc, n, t if var_c else 0]
                        g = g + factor * gy[i, d, t] * np.conj(ct)          # dh_t
                        hp = hbuf[j - 1] if j > 0 else ck[k, nn]            # h_{t-1}
                        rb = (np.conj(bt) * g).real
                        accu[j] += dt[i, d, t] * rb
                        accd[j] += u[i, d, t] * rb
                        accy[j] += (ct * hbuf[j]).real
                        q = np.conj(abuf[j] * hp) * g
                        accd[j] += (np.conj(a) * q).real
                        da += dt[i, d, t] * q
                        if write_b:
                            if var_b:
                                dB[ib, gb, n, t] += dt[i, d, t] * u[i, d, t] * g
                            else:
                                dB[i, d, n, 0] += dt[i, d, t] * u[i, d, t] * g
                        if write_c:
                            if var_c:
                                dC[ic, gc, n, t] += factor * gy[i, d, t] * np.conj(hbuf[j])
                            else:
                                dC[i, d, n, 0] += factor * gy[i, d, t] * np.conj(hbuf[j])
                        g = np.conj(abuf[j]) * g
                    dh[nn] = g
                    if not per_state:
                        dA[i, d, n] += da
                if not per_state:
                    for j in range(m):
                        du[i, d, t0 + j] = accu[j]
                        ddt[i, d, t0 + j] = accd[j]
                        ysum[i, d, t0 + j] = accy[j]


def _recurrent_bwd(u, dt, A, B, C, gy, reset, factor, glast, variable):
    """The recurrent form: the Numba kernel per channel, then per state for a variable
    ``B``/``C``. Returns ``du, ddt, ysum`` (through the state), ``dA``, ``dB``, ``dC``
    (internal layouts)."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    du, ddt, ysum = (np.full(u.shape, np.nan) for _ in range(3))
    dA = np.zeros((batch, dim, nstate), A.dtype)
    grads = []
    for X, var in zip((B, C), variable):
        grads.append(np.zeros(X.shape if var else (batch, dim, nstate, 1), A.dtype))
    rs = np.zeros(1, bool) if reset is None else reset
    args = (u, dt, A, B, C, variable[0], variable[1], gy, rs, reset is not None, factor,
            glast)
    _scan_bwd_kernel(*args, False, 1, du, ddt, ysum, dA, grads[0], grads[1])
    per = [dim // X.shape[1] for X, var in zip((B, C), variable) if var]
    if per:
        _scan_bwd_kernel(*args, True, math.lcm(*per), du, ddt, ysum, dA, grads[0],
                         grads[1])
    grads = [G if var else G.sum(axis=0)[None] for G, var in zip(grads, variable)]
    return du, ddt, ysum, dA.sum(axis=0), grads[0], grads[1]


def _chunkwise_bwd(u, dt, A, B, C, gy, reset, factor, glast, variable, chunk):
    """The chunkwise form of :func:`_recurrent_bwd` (same returns): blocks of positions
    as in the forward; the states by the two-level scan (each block's start state kept
    from a first pass), :math:`\\bar h` by the same scan reversed in time."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    span = chunk * max(1, BLOCK_ELEMENTS // max(1, batch * dim * nstate * chunk))
    blocks = [(p0, min(p0 + span, length)) for p0 in range(0, length, span)]

    def full(X, p0, p1):          # (T | 1, batch | 1, dim, N) per channel
        X = X[:, np.arange(dim) // (dim // X.shape[1])]
        return np.moveaxis(X[..., p0:p1] if X.shape[3] > 1 else X, -1, 0)

    def states(p0, p1, start):
        a = np.exp(np.moveaxis(dt[:, :, p0:p1], -1, 0)[..., None] * A)
        if reset is not None:
            a[reset[p0:p1]] = 0.0
        c = np.moveaxis(dt[:, :, p0:p1] * u[:, :, p0:p1], -1, 0)[..., None]
        return a, two_level_scan(a, c * full(B, p0, p1), start, chunk)

    starts, state = [], np.zeros((batch, dim, nstate), A.dtype)
    for p0, p1 in blocks:
        starts.append(state)
        state = states(p0, p1, state)[1][-1]
    du, ddt, ysum = (np.full(u.shape, np.nan) for _ in range(3))
    dA = np.zeros((dim, nstate), A.dtype)
    grads = [np.zeros(X.shape if var else (1, dim, nstate, 1), A.dtype)
             for X, var in zip((B, C), variable)]
    carry = glast
    for (p0, p1), start in zip(blocks[::-1], starts[::-1]):
        a, h = states(p0, p1, start)
        Bt, Ct = full(B, p0, p1), full(C, p0, p1)
        gyt, dtt, ut = (np.moveaxis(x[:, :, p0:p1], -1, 0) for x in (gy, dt, u))
        e = factor * gyt[..., None] * np.conj(Ct)
        shifted = np.concatenate([np.ones((1,) + a.shape[1:], a.dtype), np.conj(a[:0:-1])])
        dh = two_level_scan(shifted, e[::-1], carry, chunk)[::-1]
        carry = np.conj(a[0]) * dh[0]
        q = np.conj(a * np.concatenate([start[None], h[:-1]])) * dh
        rb = (np.conj(Bt) * dh).real.sum(axis=-1)
        dA += np.einsum("tbd,tbdn->dn", dtt, q)
        ddt[:, :, p0:p1] = np.moveaxis((np.conj(A) * q).real.sum(axis=-1) + ut * rb, 0, -1)
        du[:, :, p0:p1] = np.moveaxis(dtt * rb, 0, -1)
        ysum[:, :, p0:p1] = np.moveaxis((Ct * h).real.sum(axis=-1), 0, -1)
        parts = ((dtt * ut)[..., None] * dh, factor * gyt[..., None] * np.conj(h))
        for G, X, var, part in zip(grads, (B, C), variable, parts):
            if var:       # (T, batch, groups, channels per group, N) -> (batch, G, N, T)
                per = part.reshape(part.shape[:2] + (X.shape[1], -1, nstate))
                G[..., p0:p1] += np.moveaxis(per.sum(axis=3), 0, -1)
            else:
                G[0, :, :, 0] += part.sum(axis=(0, 1))
    return du, ddt, ysum, dA, grads[0], grads[1]
