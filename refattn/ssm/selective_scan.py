r"""Mamba's selective scan (S6; Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces"), float64 reference: two parallel forms and streaming.

With exactly the arguments of ``selective_scan_ref`` in ``mamba_ssm``
(``mamba_ssm/ops/selective_scan_interface.py``): with
:math:`\delta = \mathrm{softplus}(\Delta + \Delta_{bias})` (softplus only when asked),

.. math:: h_t = e^{\delta_t A} \odot h_{t-1} + \delta_t B_t u_t, \qquad
          y_t = s\,\mathrm{Re}(C_t \cdot h_t) + D u_t, \qquad
          \mathrm{out}_t = y_t \cdot \mathrm{silu}(z_t),

per batch row and channel, the state ``(N,)`` per channel; ``s = 2`` for complex ``A``
(``N`` conjugate pairs, the reference's ``y.real * 2``), 1 for real ``A`` (as in the
reference). :math:`A` is discretized by the zero-order hold, :math:`B` by Euler's rule
(:math:`\delta B`), as in the reference and the CUDA kernel. Softplus is PyTorch's
(threshold 20: :math:`x` for :math:`x > 20`, else :math:`\log(1 + e^x)`), as in the
reference and the kernel.

Forms: ``method="recurrent"`` (Numba) and ``"chunkwise"`` (a two-level parallel scan:
inside chunks, then across chunk ends, the state carried between blocks). Neither
divides by a product of decays, so decays near 0 underflow to true zeros and decays
near 1 over a million steps stay accurate.

Streaming: :func:`selective_scan_init_state` / :func:`selective_scan_step` carry the
state ``h (batch, dim, N)`` (the decode step of Mamba, ``selective_state_update``'s
arguments). Not q/k/v attention: not in the attention registry.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit, prange

from .._core.checks import check_bool, check_choice, check_int
from .._core.varlen import check_cu_seqlens, sequence_starts
from ..boundary.arrays import to_float64
from ..gradients import check_cotangent
from ..recurrent.linear_rnn import associative_scan
from ..streaming import State
from ._common import (BLOCK_ELEMENTS, TILE, check_shape, dsilu, number_array, scan_vjp,
                      silu, silu_np, softplus_np)

__all__ = ["selective_scan", "selective_scan_init_state", "selective_scan_step",
           "SelectiveScanState", "SELECTIVE_SCAN_METHODS", "selective_scan_vjp"]

#: Forms of :func:`selective_scan`.
SELECTIVE_SCAN_METHODS = ("recurrent", "chunkwise")

#: Elements (batch·dim·positions·N) one block of the chunkwise selective scan holds.
_BLOCK_ELEMENTS = BLOCK_ELEMENTS


# --------------------------------------------------------------------------- selective
def _resets(cu_seqlens, length):
    """Boolean ``(L,)`` marking where a packed sequence starts (the state restarts), or
    None without ``cu_seqlens`` (checked as every recurrent mechanism checks it)."""
    if cu_seqlens is None:
        return None
    return sequence_starts(check_cu_seqlens(cu_seqlens, length, what="L"), length)


def _variable(X, name, a_complex, batch, dim, nstate, length, check_finite):
    """``B`` or ``C`` as ``(batch | 1, groups, N, L | 1)`` in ``A``'s dtype."""
    if X is None:
        raise TypeError(f"{name} must be an array, got None")
    if np.iscomplexobj(X) and not a_complex:
        raise TypeError(f"{name} is complex ({np.shape(X)}) but A is real; the reference "
                        f"would drop the imaginary part: pass a real {name} or a complex A")
    X = number_array(X, name, check_finite=check_finite)
    given = X.shape
    shapes = (f"(dim, N) = ({dim}, {nstate}), (batch, N, L) = ({batch}, {nstate}, "
              f"{length}) or (batch, groups, N, L) with groups dividing dim = {dim}")
    if X.ndim == 2:
        if X.shape != (dim, nstate):
            raise ValueError(f"{name} must have shape {shapes}; got {X.shape}")
        X = X.reshape(1, dim, nstate, 1)
    elif X.ndim in (3, 4):
        if X.ndim == 3:
            X = X[:, None]
        b, g, n, lx = X.shape
        interleaved = a_complex and not np.iscomplexobj(X)
        want = 2 * length if interleaved else length
        if b != batch or n != nstate or lx != want or g < 1 or dim % g:
            extra = (" (complex A with a real variable B/C: the last axis holds 2L "
                     "interleaved real, imaginary parts)" if interleaved else "")
            raise ValueError(f"{name} must have shape {shapes}{extra}; got {given}")
        if interleaved:
            X = X[..., 0::2] + 1j * X[..., 1::2]
    else:
        raise ValueError(f"{name} must have shape {shapes}; got {X.shape}")
    return np.ascontiguousarray(X, dtype=np.complex128 if a_complex else np.float64)


def _per_channel(x, name, dim, check_finite):
    """``None``, or ``x`` as float64 of shape ``(dim,)`` (``D``, ``delta_bias``)."""
    if x is None:
        return None
    x = to_float64(x, name, check_finite=check_finite)
    check_shape(x, name, (dim,), "(dim,)")
    return x


def _selective_setup(u, delta, A, B, C, D, z, delta_bias, delta_softplus, check_finite):
    u = to_float64(u, "u", check_finite=check_finite)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {u.shape}")
    batch, dim, length = u.shape
    delta = to_float64(delta, "delta", check_finite=check_finite)
    check_shape(delta, "delta", u.shape, "(batch, dim, L) like u")
    A = number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} from u {u.shape} "
                         f"and N >= 1, got {A.shape}")
    nstate, a_complex = A.shape[1], np.iscomplexobj(A)
    B = _variable(B, "B", a_complex, batch, dim, nstate, length, check_finite)
    C = _variable(C, "C", a_complex, batch, dim, nstate, length, check_finite)
    D = _per_channel(D, "D", dim, check_finite)
    if z is not None:
        z = to_float64(z, "z", check_finite=check_finite)
        check_shape(z, "z", u.shape, "(batch, dim, L) like u")
    delta_bias = _per_channel(delta_bias, "delta_bias", dim, check_finite)
    softplus = check_bool("delta_softplus", delta_softplus)
    return u, delta, A, B, C, D, z, delta_bias, softplus, (2.0 if a_complex else 1.0)


@njit(cache=True, parallel=True)
def _selective_kernel(u, delta, dbias, softplus, A, B, C, dskip, z, has_z, reset,
                      has_reset, factor, state, out):   # pragma: no cover - compiled
    """The recurrence, one (batch row, channel) per parallel iteration, ``TILE`` steps
    at a time with the state index ``n`` outside the time loop. ``B``, ``C``:
    ``(batch | 1, groups, N, L | 1)``; ``state (batch, dim, N)`` in/out; the state
    restarts from 0 at steps ``t`` with ``reset[t]`` (packed sequences)."""
    nb, dim, length = u.shape
    nstate = A.shape[1]
    per_b, per_c = dim // B.shape[1], dim // C.shape[1]
    for idx in prange(nb * dim):
        i = idx // dim
        d = idx - i * dim
        ib = i if B.shape[0] > 1 else 0
        ic = i if C.shape[0] > 1 else 0
        gb, gc = d // per_b, d // per_c
        var_b, var_c = B.shape[3] > 1, C.shape[3] > 1
        dt = np.empty(TILE)
        dtu = np.empty(TILE)
        acc = np.empty(TILE)
        for t0 in range(0, length, TILE):
            m = min(TILE, length - t0)
            for j in range(m):
                v = delta[i, d, t0 + j] + dbias[d]
                if softplus and v <= 20.0:
                    v = math.log1p(math.exp(v))
                dt[j] = v
                dtu[j] = v * u[i, d, t0 + j]
                acc[j] = 0.0
            for n in range(nstate):
                a = A[d, n]
                h = state[i, d, n]
                if has_reset:
                    for j in range(m):
                        bj = B[ib, gb, n, t0 + j if var_b else 0]
                        cj = C[ic, gc, n, t0 + j if var_c else 0]
                        if reset[t0 + j]:
                            h = dtu[j] * bj
                        else:
                            h = np.exp(dt[j] * a) * h + dtu[j] * bj
                        acc[j] += (h * cj).real
                else:          # the hot loop, without the test
                    for j in range(m):
                        bj = B[ib, gb, n, t0 + j if var_b else 0]
                        cj = C[ic, gc, n, t0 + j if var_c else 0]
                        h = np.exp(dt[j] * a) * h + dtu[j] * bj
                        acc[j] += (h * cj).real
                state[i, d, n] = h
            for j in range(m):
                t = t0 + j
                y = factor * acc[j] + dskip[d] * u[i, d, t]
                if has_z:
                    y *= silu(z[i, d, t])
                out[i, d, t] = y


def _time_major(x, k, chunk, pad, fill=0.0):
    """``(..., T)`` (last axis time, ``T = k·chunk - pad``) -> ``(chunk, k, ...)``
    contiguous, padded at the end with ``fill``: the scans then slice whole slabs."""
    if pad:
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
    x = x.reshape(x.shape[:-1] + (k, chunk))
    return np.ascontiguousarray(np.moveaxis(x, (-1, -2), (0, 1)))


def _grouped_time_major(X, p0, p1, k, chunk, pad):
    """``(batch | 1, groups, N, L | 1)`` -> ``(chunk | 1, k | 1, batch | 1, groups, 1, N)``
    to multiply a ``(chunk, k, batch, groups, dim // groups, N)`` view: no gather."""
    if X.shape[3] > 1:
        xt = _time_major(X[..., p0:p1], k, chunk, pad)      # (T, k, B|1, G, N)
        return xt[:, :, :, :, None, :]
    return X[None, None, :, :, None, :, 0]                  # (1, 1, 1, G, 1, N)


def _chunkwise_selective(u, delta, dbias, softplus, A, B, C, D, z, reset, factor, state,
                       chunk):
    """Two-level parallel scan per block of positions: associative scan inside each chunk,
    associative scan across the chunk ends (from the carried state), then every state is
    ``P_t · h_before_chunk + H_t``. Arrays are time-major ``(chunk, k, batch, dim, N)``
    so that each level of the scan works on contiguous slabs; ``δ``, ``D`` and ``z`` are
    applied block by block too (memory O(block), not O(L)). Returns ``(out, state)``."""
    nb, dim, length = u.shape
    nstate = A.shape[1]
    y = np.full((nb, dim, length), np.nan)
    per_block = max(1, _BLOCK_ELEMENTS // max(1, nb * dim * nstate * chunk))
    span = chunk * per_block
    for p0 in range(0, length, span):
        p1 = min(p0 + span, length)
        k = -(-(p1 - p0) // chunk)
        pad = k * chunk - (p1 - p0)
        # identity steps after the end (a = 1, c = 0): they change nothing
        dt = delta[:, :, p0:p1] if dbias is None else delta[:, :, p0:p1] + dbias[:, None]
        dt = softplus_np(dt) if softplus else dt
        ub = u[:, :, p0:p1]
        dtt = _time_major(dt, k, chunk, pad)[..., None]                 # (T, k, B, dim, 1)
        a = np.exp(dtt * A)                                             # (T, k, B, dim, N)
        if reset is not None:      # a = 0 at a sequence start: the state restarts
            a[_time_major(reset[p0:p1], k, chunk, pad, fill=False)] = 0.0
        dtu = _time_major(dt * ub, k, chunk, pad)[..., None]
        gb = B.shape[1]
        c = (dtu.reshape(chunk, k, nb, gb, dim // gb, 1) *
             _grouped_time_major(B, p0, p1, k, chunk, pad)).reshape(a.shape)
        p_in, h_in = associative_scan(a, c, axis=0)     # inside chunks, from h = 0
        ends_c = h_in[-1].copy()                         # (k, B, dim, N)
        ends_c[0] += p_in[-1, 0] * state                 # the carried state enters
        ends = associative_scan(p_in[-1], ends_c, axis=0)[1]   # state after chunk j
        before = np.concatenate([state[None], ends[:-1]], axis=0)
        h = p_in * before + h_in                         # (T, k, B, dim, N)
        gc = C.shape[1]
        hc = h.reshape(chunk, k, nb, gc, dim // gc, nstate) * \
            _grouped_time_major(C, p0, p1, k, chunk, pad)
        yt = hc.real.sum(axis=-1).reshape(chunk, k, nb, dim)
        yb = factor * np.moveaxis(yt, (0, 1), (-1, -2)).reshape(
            nb, dim, k * chunk)[:, :, :p1 - p0]
        if D is not None:
            yb = yb + D[:, None] * ub
        if z is not None:
            yb = yb * silu_np(z[:, :, p0:p1])
        y[:, :, p0:p1] = yb
        state = ends[-1]
    return y, state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, *, return_last_state=False, method="recurrent",
                   chunk=64, cu_seqlens=None, check_finite=True):
    r"""Mamba's selective scan (S6), the semantics of ``mamba_ssm``'s
    ``selective_scan_ref`` in float64 (module docstring for the equations).

    Parameters
    ----------
    u, delta : ``(batch, dim, L)`` real.
    A : ``(dim, N)`` real or complex (no sign restriction, like the reference; decays
        :math:`e^{\delta A}` lie in (0, 1] when :math:`\delta \ge 0` and
        :math:`\mathrm{Re} A \le 0`).
    B, C : ``(dim, N)`` (constant over time), ``(batch, N, L)`` or
        ``(batch, groups, N, L)`` (channel ``d`` uses group ``d // (dim // groups)``).
        For complex ``A`` a constant ``B``/``C`` may be complex; a variable one is either
        complex with last axis ``L`` or, as in the reference, real with last axis ``2L``
        holding interleaved (real, imaginary) pairs. For real ``A`` they must be real
        (``TypeError``: the reference would silently drop an imaginary part).
    D : ``(dim,)`` skip, optional. z : ``(batch, dim, L)`` gate, ``out * silu(z)``.
    delta_bias : ``(dim,)`` added to ``delta`` (before the softplus).
    delta_softplus : apply PyTorch's softplus (threshold 20) to ``delta``.
    return_last_state : also return the state after the last step ``(batch, dim, N)``
        (float64, or complex128 for complex ``A``).
    method : ``"recurrent"`` (Numba, default; O(N) memory per channel) or
        ``"chunkwise"`` (two-level parallel scan over chunks of ``chunk`` steps, NumPy,
        processed in bounded blocks).
    cu_seqlens : optional cumulative lengths ``[0, l_1, l_1 + l_2, ..., L]`` of
        sequences packed along ``L`` (flash-linear-attention's varlen convention;
        mamba's ``selective_scan_ref`` takes no such argument): the state restarts
        from 0 at each start ``cu_seqlens[1:-1]``, in every batch row.

    Returns ``out`` float64 ``(batch, dim, L)`` (and the last state).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u, delta = rng.standard_normal((1, 4, 10)), rng.uniform(0, 1, (1, 4, 10))
    >>> A = -rng.uniform(0.5, 2, (4, 3))
    >>> B, C = rng.standard_normal((2, 1, 3, 10))            # (batch, N, L): shared
    >>> out = selective_scan(u, delta, A, B, C, D=np.ones(4))
    >>> bool(np.allclose(out, selective_scan(u, delta, A, B, C, D=np.ones(4),
    ...                                      method="chunkwise", chunk=3)))
    True
    """
    method = check_choice("method", method, SELECTIVE_SCAN_METHODS)
    u, delta, A, B, C, D, z, delta_bias, softplus, factor = _selective_setup(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, check_finite)
    return_last_state = check_bool("return_last_state", return_last_state)
    batch, dim, length = u.shape
    reset = _resets(cu_seqlens, length)
    state = np.zeros((batch, dim, A.shape[1]), dtype=A.dtype)
    if method == "recurrent":
        out = np.full((batch, dim, length), np.nan)
        _selective_kernel(u, delta, np.zeros(dim) if delta_bias is None else delta_bias,
                          softplus, A, B, C, np.zeros(dim) if D is None else D,
                          np.zeros((1, 1, 1)) if z is None else z, z is not None,
                          np.zeros(1, bool) if reset is None else reset,
                          reset is not None, factor, state, out)
    else:
        out, state = _chunkwise_selective(u, delta, delta_bias, softplus, A, B, C, D, z,
                                        reset, factor, state,
                                        check_int("chunk", chunk, minimum=1))
    return (out, state) if return_last_state else out


# --------------------------------------------------------------------------- gradients
def _variable_grad(G, X_given, a_complex):
    """The gradient of ``B``/``C`` (internal ``(batch | 1, groups, N, L | 1)``) in the
    shape and kind of the argument given: complex as ``∂/∂Re + i ∂/∂Im`` (PyTorch's
    convention), interleaved real pairs for the reference's real ``2L`` layout, the real
    part for a real argument promoted to complex."""
    shape = np.shape(X_given)
    if len(shape) == 2:
        G = G[0, :, :, 0]
    elif len(shape) == 3:
        G = G[:, 0]
    if a_complex and not np.iscomplexobj(X_given) and len(shape) >= 3:   # (.., 2L) pairs
        out = np.empty(shape)
        out[..., 0::2], out[..., 1::2] = G.real, G.imag
        return out
    return np.ascontiguousarray(G if np.iscomplexobj(X_given) else G.real)


def selective_scan_vjp(u, delta, A, B, C, grad_out, *, D=None, z=None, delta_bias=None,
                       delta_softplus=False, grad_last_state=None, return_last_state=False,
                       method="recurrent", chunk=64, cu_seqlens=None, check_finite=True):
    r"""Gradients of :func:`selective_scan` (the gradients mamba's backward returns:
    ``du, ddelta, dA, dB, dC`` and ``dD, dz, ddelta_bias`` for those given), float64.

    ``grad_out``: cotangent of ``out`` ``(batch, dim, L)`` (or the pair ``(grad_out,
    grad_last_state)`` for ``return_last_state=True``); ``grad_last_state``: cotangent
    of the last state ``(batch, dim, N)`` (complex for complex ``A``). Other arguments as
    in the forward. Returns ``{"u", "delta", "A", "B", "C"[, "D", "z", "delta_bias"]:
    gradient}``, each of its argument's shape. A complex argument gets
    :math:`\partial L/\partial \mathrm{Re} + i\,\partial L/\partial \mathrm{Im}`
    (PyTorch's convention, hence mamba's); a real ``(…, 2L)`` interleaved ``B``/``C``
    gets the two parts interleaved.

    With :math:`g_y = g \cdot \mathrm{silu}(z)` and the reverse-time recurrence
    :math:`\bar h_t = s\,g_{y,t}\,\overline{C_t} + \overline{a_{t+1}}\,\bar h_{t+1}`
    (:math:`a_t = e^{\delta_t A}`; 0 across a ``cu_seqlens`` restart; :math:`\bar
    h_{L-1}` starts from ``grad_last_state``), :math:`q_t = \overline{a_t h_{t-1}}
    \odot \bar h_t`:

    .. math:: dC_t = s\,g_{y,t}\,\overline{h_t}, \quad dB_t = \delta_t u_t \bar h_t,
              \quad dA = \sum_t \delta_t q_t, \quad
              d\delta_t = \textstyle\sum_n \mathrm{Re}(\overline{A} q_t
              + u_t \overline{B_t} \bar h_t),

    .. math:: du_t = \delta_t \textstyle\sum_n \mathrm{Re}(\overline{B_t} \bar h_t)
              + D g_{y,t}, \quad dD = \textstyle\sum g_y u, \quad
              dz = g\,y\,\mathrm{silu}'(z),

    :math:`d\Delta = d\delta \cdot \sigma(\Delta + \Delta_{bias})` under the softplus
    (1 above its threshold 20), :math:`d\Delta_{bias} = \sum_{b, t} d\Delta`; grouped or
    batch-shared ``B``/``C`` sum over the channels and rows sharing them. Forms:
    ``"recurrent"`` (Numba; the state at every ``TILE``-th step kept per running
    channel, each tile's states recomputed from it, as mamba's kernel does per chunk)
    and ``"chunkwise"`` (the forward's two-level scan for the states and the same scan
    reversed in time for :math:`\bar h`, in bounded blocks); they agree to rounding.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u, delta = rng.standard_normal((1, 2, 6)), rng.uniform(0, 1, (1, 2, 6))
    >>> A, B, C = -np.ones((2, 3)), rng.standard_normal((1, 3, 6)), np.ones((2, 3))
    >>> g = selective_scan_vjp(u, delta, A, B, C, np.ones((1, 2, 6)), D=np.ones(2))
    >>> sorted(g), g["B"].shape, g["A"].shape
    (['A', 'B', 'C', 'D', 'delta', 'u'], (1, 3, 6), (2, 3))
    """
    method = check_choice("method", method, SELECTIVE_SCAN_METHODS)
    given = dict(B=B, C=C)
    u, delta, A, B, C, D, z, delta_bias, softplus, factor = _selective_setup(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, check_finite)
    check_bool("return_last_state", return_last_state)
    if isinstance(grad_out, tuple):
        if len(grad_out) != 2 or grad_last_state is not None:
            raise ValueError("grad_out as a tuple must be (grad_out, grad_last_state), "
                             "with grad_last_state= not given as well")
        grad_out, grad_last_state = grad_out
    batch, dim, length = u.shape
    nstate, a_complex = A.shape[1], np.iscomplexobj(A)
    g = check_cotangent(grad_out, "grad_out", u.shape, check_finite=check_finite)
    g = np.zeros(u.shape) if g is None else g
    glast = np.zeros((batch, dim, nstate), A.dtype)
    if grad_last_state is not None:
        gl = number_array(grad_last_state, "grad_last_state", check_finite=check_finite,
                          allow_complex=a_complex)
        check_shape(gl, "grad_last_state", glast.shape, "(batch, dim, N), the last state")
        glast[...] = gl
    reset = _resets(cu_seqlens, length)
    x = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = softplus_np(x) if softplus else x
    gy = g if z is None else g * silu_np(z)
    variable = tuple(np.ndim(given[k]) >= 3 for k in "BC")
    du, ddt, ysum, dA, dB, dC = scan_vjp(u, dt, A, B, C, gy, reset, factor, glast, variable,
                                         method, check_int("chunk", chunk, minimum=1))
    # softplus' = sigmoid below PyTorch's threshold 20, 1 above
    dx = ddt * np.where(x > 20.0, 1.0, 0.5 * (1.0 + np.tanh(0.5 * x))) if softplus else ddt
    grads = {"u": du + (0.0 if D is None else D[:, None] * gy), "delta": dx,
             "A": dA if a_complex else dA.real,
             "B": _variable_grad(dB, given["B"], a_complex),
             "C": _variable_grad(dC, given["C"], a_complex)}
    if D is not None:
        grads["D"] = (gy * u).sum(axis=(0, 2))
    if z is not None:
        y = factor * ysum + (0.0 if D is None else D[:, None] * u)
        grads["z"] = g * y * dsilu(z)
    if delta_bias is not None:
        grads["delta_bias"] = dx.sum(axis=(0, 2))
    return grads


# --------------------------------------------------------------------------- streaming
@dataclasses.dataclass(frozen=True)
class SelectiveScanState(State):
    """``h``: ``(batch, dim, N)`` state after ``position`` steps, with the layer's
    parameters (``A``, ``D``, ``delta_bias``, ``delta_softplus``). ``nbytes`` counts
    ``h`` only, the recurrent state (the parameters are the layer's weights, shared by
    every stream): constant in the number of steps."""

    h: np.ndarray
    A: np.ndarray
    D: np.ndarray | None
    delta_bias: np.ndarray | None
    delta_softplus: bool

    @property
    def nbytes(self) -> int:
        return self.h.nbytes


def selective_scan_init_state(*, batch, A, D=None, delta_bias=None, delta_softplus=False,
                              h0=None, check_finite=True) -> SelectiveScanState:
    """The state before the first step: ``h0`` (default 0) of shape ``(batch, dim, N)``
    for ``A (dim, N)``; ``D``, ``delta_bias``, ``delta_softplus`` as in
    :func:`selective_scan`.

    >>> import numpy as np
    >>> s = selective_scan_init_state(batch=2, A=-np.ones((4, 16)))
    >>> s.nbytes                                            # 2 * 4 * 16 float64
    1024
    """
    batch = check_int("batch", batch, minimum=1)
    A = number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or min(A.shape) < 1:
        raise ValueError(f"A must have shape (dim, N), got {A.shape}")
    dim, nstate = A.shape
    D = _per_channel(D, "D", dim, check_finite)
    delta_bias = _per_channel(delta_bias, "delta_bias", dim, check_finite)
    h = np.zeros((batch, dim, nstate), dtype=A.dtype)
    if h0 is not None:
        h0 = number_array(h0, "h0", check_finite=check_finite,
                          allow_complex=np.iscomplexobj(A))
        check_shape(h0, "h0", h.shape, "(batch, dim, N)")
        h[...] = h0
    return SelectiveScanState(position=0, h=h, A=A, D=D, delta_bias=delta_bias,
                              delta_softplus=check_bool("delta_softplus",
                                                        delta_softplus))


def selective_scan_step(state: SelectiveScanState, u_t, delta_t, B_t, C_t, z_t=None, *,
                        check_finite=True):
    r"""One step of the selective scan (``selective_state_update``'s arguments):
    ``u_t``, ``delta_t``, ``z_t`` ``(batch, dim)``; ``B_t``, ``C_t`` ``(batch, N)`` or
    ``(batch, groups, N)`` (a constant ``(dim, N)`` ``B`` is ``groups = dim``:
    ``np.broadcast_to(B, (batch, dim, N))``). Returns ``(out_t (batch, dim),
    new_state)``; stepping over a sequence equals :func:`selective_scan`.

    >>> import numpy as np
    >>> s = selective_scan_init_state(batch=1, A=-np.ones((2, 1)))
    >>> out, s = selective_scan_step(s, np.ones((1, 2)), np.ones((1, 2)),
    ...                              np.ones((1, 1)), np.ones((1, 1)))
    >>> out.tolist(), s.h[..., 0].tolist()                  # h = e^{-1}·0 + 1·1·1
    ([[1.0, 1.0]], [[1.0, 1.0]])
    """
    batch, dim, nstate = state.h.shape
    a_complex = np.iscomplexobj(state.A)
    u_t = to_float64(u_t, "u_t", check_finite=check_finite)
    check_shape(u_t, "u_t", (batch, dim), "(batch, dim)")
    delta_t = to_float64(delta_t, "delta_t", check_finite=check_finite)
    check_shape(delta_t, "delta_t", (batch, dim), "(batch, dim)")
    bc = []
    for name, X in (("B_t", B_t), ("C_t", C_t)):
        X = number_array(X, name, check_finite=check_finite, allow_complex=a_complex)
        given = X.shape
        if X.ndim == 2:
            X = X[:, None]
        if X.ndim != 3 or X.shape[0] != batch or X.shape[2] != nstate or X.shape[1] < 1 \
                or dim % X.shape[1]:
            raise ValueError(f"{name} must have shape (batch, N) = ({batch}, {nstate}) or "
                             f"(batch, groups, N) with groups dividing dim = {dim}, got "
                             f"{given}")
        bc.append(X[:, np.arange(dim) // (dim // X.shape[1])])        # (batch, dim, N)
    dt = delta_t if state.delta_bias is None else delta_t + state.delta_bias
    dt = softplus_np(dt) if state.delta_softplus else dt
    h = np.exp(dt[..., None] * state.A) * state.h + (dt * u_t)[..., None] * bc[0]
    y = (2.0 if a_complex else 1.0) * np.einsum("bdn,bdn->bd", h, bc[1]).real
    if state.D is not None:
        y = y + state.D * u_t
    if z_t is not None:
        z_t = to_float64(z_t, "z_t", check_finite=check_finite)
        check_shape(z_t, "z_t", (batch, dim), "(batch, dim)")
        y = y * silu_np(z_t)
    return y, state.replace(position=state.position + 1, h=h)


selective_scan.vjp = selective_scan_vjp
