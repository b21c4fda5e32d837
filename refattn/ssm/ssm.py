r"""Diagonal state-space models, float64 references: the LTI S4D layer and Mamba's selective
scan (S6).

**S4D** (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"): per channel ``d`` a diagonal continuous system
:math:`h'(t) = A h(t) + B u(t)`, :math:`y = \mathrm{Re}(C h) + D u`, discretized with
step :math:`\Delta_d` by the zero-order hold,

.. math:: \bar A = e^{\Delta A}, \qquad \bar B = \frac{e^{\Delta A} - 1}{A}\, B, \qquad
          h_t = \bar A \odot h_{t-1} + \bar B\, u_t, \qquad
          y_t = s\,\mathrm{Re}\Big(\sum_n C_n h_{t,n}\Big) + D u_t,

from :math:`h_{-1} = 0`. **Convention for** ``s``: when any of ``A``, ``B``, ``C`` is
complex the ``N`` complex states stand for ``N`` conjugate pairs (``2N`` real states,
the S4D code's ``2 * Re(...)`` kernel and ``selective_scan_ref``'s ``y.real * 2``) and
``s = 2``; when all three are real the state is real and ``s = 1``. :math:`\bar B` uses
``expm1`` (accurate for small :math:`\Delta A`).

**Selective scan** (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"), with exactly the arguments of ``selective_scan_ref`` in ``mamba_ssm``
(``mamba_ssm/ops/selective_scan_interface.py``): with
:math:`\delta = \mathrm{softplus}(\Delta + \Delta_{bias})` (softplus only when asked),

.. math:: h_t = e^{\delta_t A} \odot h_{t-1} + \delta_t B_t u_t, \qquad
          y_t = s\,\mathrm{Re}(C_t \cdot h_t) + D u_t, \qquad
          \mathrm{out}_t = y_t \cdot \mathrm{silu}(z_t),

per batch row and channel, the state ``(N,)`` per channel; ``s = 2`` for complex ``A``,
1 for real ``A`` (as in the reference). :math:`A` is discretized by the zero-order hold,
:math:`B` by Euler's rule (:math:`\delta B`), as in the reference and the CUDA kernel.
Softplus is PyTorch's (threshold 20: :math:`x` for :math:`x > 20`, else
:math:`\log(1 + e^x)`), as in the reference and the kernel.

Forms: S4D ``method="recurrent"`` (Numba, parallel over batch·channels), ``"fft"`` (the
convolution with the SSM kernel :math:`K_l = s\,\mathrm{Re}(\sum_n C_n \bar A_n^l \bar
B_n)`, zero-padded to at least ``2L - 1`` so nothing wraps around) and ``"scan"`` (the
parallel associative scan of :func:`refattn.linear_rnn.associative_scan`); selective
scan ``"recurrent"`` (Numba) and ``"chunked"`` (a two-level parallel scan: inside chunks,
then across chunk ends, the state carried between blocks). None divides by a product of
decays, so decays near 0 underflow to true zeros and decays near 1 over a million steps
stay accurate.

Streaming: :func:`selective_scan_init_state` / :func:`selective_scan_step` carry the
state ``h (batch, dim, N)`` (the decode step of Mamba, ``selective_state_update``'s
arguments). Not q/k/v attention: not in the attention registry.

>>> import numpy as np
>>> from refattn.ssm import s4d, selective_scan
>>> rng = np.random.default_rng(0)
>>> u = rng.standard_normal((1, 2, 6))
>>> A = -rng.uniform(0.5, 1, (2, 3)) + 1j * rng.standard_normal((2, 3))
>>> B, C = rng.standard_normal((2, 2, 3)) + 0j
>>> y = s4d(u, A, B, C, delta=np.array([0.1, 0.2]))
>>> bool(np.allclose(y, s4d(u, A, B, C, delta=np.array([0.1, 0.2]), method="fft")))
True
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.fft
from numba import njit, prange

from .._core.checks import check_bool, check_int, check_memory
from ..boundary.arrays import to_float64
from ..recurrent.linear_rnn import associative_scan
from ..streaming import State

__all__ = ["s4d", "s4d_kernel", "s4d_init_state", "s4d_step", "S4DState",
           "selective_scan", "selective_scan_init_state",
           "selective_scan_step", "SelectiveScanState", "S4D_METHODS",
           "SELECTIVE_SCAN_METHODS"]

#: Forms of :func:`s4d`.
S4D_METHODS = ("recurrent", "fft", "scan")
#: Forms of :func:`selective_scan`.
SELECTIVE_SCAN_METHODS = ("recurrent", "chunked")

#: Time steps the compiled kernels process per tile (per-thread scratch, cache sized).
_TILE = 512
#: Elements (batch·dim·positions·N) one block of the chunked selective scan holds.
_BLOCK_ELEMENTS = 2**20


# --------------------------------------------------------------------------- inputs
def _number_array(x, name, *, check_finite=True, allow_complex=True) -> np.ndarray:
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


def _check_shape(arr, name, expected, what):
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got "
                         f"{arr.shape}")


def _check_method(method, allowed):
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    return method


@njit(cache=True, inline="always")
def _silu(z):   # pragma: no cover - compiled
    if z >= 0.0:
        return z / (1.0 + math.exp(-z))
    e = math.exp(z)
    return z * e / (1.0 + e)


def _silu_np(z):
    """``z · sigmoid(z)`` without overflow warnings."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, z / (1.0 + e), z * e / (1.0 + e))


def _softplus(x):
    """PyTorch's softplus (beta 1, threshold 20): ``x`` above 20, ``log1p(exp(x))``."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


# --------------------------------------------------------------------------- S4D
def _s4d_setup(u, A, B, C, delta, D, check_finite):
    u = to_float64(u, "u", check_finite=check_finite)
    if u.ndim < 2:
        raise ValueError(f"u must have shape (..., dim, L) with at least 2 dimensions, "
                         f"got {u.shape}")
    dim = u.shape[-2]
    A = _number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} from u {u.shape} "
                         f"and N >= 1, got {A.shape}")
    if not (A.real < 0).all():
        bad = tuple(int(i) for i in np.argwhere(~(A.real < 0))[0])
        raise ValueError(f"A {A.shape} must have a negative real part (a stable "
                         f"continuous system); got {A[bad]!r} at index {bad}")
    B = _number_array(B, "B", check_finite=check_finite)
    C = _number_array(C, "C", check_finite=check_finite)
    _check_shape(B, "B", A.shape, "(dim, N) like A")
    _check_shape(C, "C", A.shape, "(dim, N) like A")
    delta = to_float64(delta, "delta", check_finite=check_finite)
    if delta.ndim > 1 or (delta.ndim == 1 and delta.shape[0] != dim):
        raise ValueError(f"delta must be a number or have shape (dim,) = ({dim},), got "
                         f"{delta.shape}")
    if not (delta > 0).all():
        raise ValueError(f"delta (the step) must be positive, got {delta!r}")
    delta = np.broadcast_to(delta, (dim,))
    if D is not None:
        D = to_float64(D, "D", check_finite=check_finite)
        if D.ndim > 1 or (D.ndim == 1 and D.shape[0] != dim):
            raise ValueError(f"D must be a number or have shape (dim,) = ({dim},), got "
                             f"{D.shape}")
        D = np.broadcast_to(D, (dim,))
    is_complex = any(np.iscomplexobj(x) for x in (A, B, C))
    if is_complex:
        A, B, C = (x.astype(np.complex128) for x in (A, B, C))
    dA = delta[:, None] * A
    abar = np.exp(dA)
    bbar = np.expm1(dA) / A * B
    return u, abar, bbar, C, dA, D, (2.0 if is_complex else 1.0)


@njit(cache=True, parallel=True)
def _lti_kernel(u, abar, bbar, c, factor, state, out):   # pragma: no cover - compiled
    """``h = abar h + bbar u_t``, ``out_t = factor Re(c · h)`` for ``u (B, dim, L)``;
    ``state (B, dim, N)`` is the initial state and receives the last one."""
    nb, dim, length = u.shape
    nstate = abar.shape[1]
    for idx in prange(nb * dim):
        i = idx // dim
        d = idx - i * dim
        acc = np.empty(_TILE)
        for t0 in range(0, length, _TILE):
            m = min(_TILE, length - t0)
            acc[:m] = 0.0
            for n in range(nstate):
                a, b, cc = abar[d, n], bbar[d, n], c[d, n]
                h = state[i, d, n]
                for j in range(m):
                    h = a * h + b * u[i, d, t0 + j]
                    acc[j] += (cc * h).real
                state[i, d, n] = h
            for j in range(m):
                out[i, d, t0 + j] = factor * acc[j]


def s4d_kernel(A, B, C, delta, length):
    r"""The S4D convolution kernel :math:`K_{d,l} = s\,\mathrm{Re}\big(\sum_n C_{d,n}
    \bar A_{d,n}^{\,l} \bar B_{d,n}\big)`, ``(dim, length)`` float64, so that the
    output of :func:`s4d` (without ``D``) is the causal convolution of ``u`` with ``K``.
    :math:`\bar A^l` is formed as :math:`e^{l \Delta A}` (no repeated products).

    >>> import numpy as np
    >>> s4d_kernel(np.array([[-1.0]]), np.array([[1.0]]), np.array([[1.0]]), 0.5, 3).round(4)
    array([[0.3935, 0.2387, 0.1447]])
    """
    u = np.zeros((np.shape(A)[0], 1))
    _, _, bbar, c, dA, _, factor = _s4d_setup(u, A, B, C, delta, None, True)
    length = check_int("length", length, minimum=0)
    return _kernel(bbar, c, dA, factor, length)


def _kernel(bbar, c, dA, factor, length):
    powers = np.exp(dA[:, :, None] * np.arange(length))           # (dim, N, L)
    return factor * np.einsum("dn,dnl->dl", c * bbar, powers).real


def s4d(u, A, B, C, delta, D=None, *, method="recurrent", return_last_state=False,
        check_finite=True, memory_budget=None):
    r"""S4D (module docstring): a diagonal LTI state-space layer, ZOH-discretized.

    Parameters
    ----------
    u : ``(..., dim, L)`` real input (mamba's ``(batch, dim, L)`` layout).
    A : ``(dim, N)`` real or complex, real part < 0 (``ValueError`` otherwise).
    B, C : ``(dim, N)`` real or complex.
    delta : step :math:`\Delta` ``(dim,)`` or a number, > 0.
    D : skip ``(dim,)`` or a number, optional.
    method : ``"recurrent"`` (default), ``"fft"`` or ``"scan"``; the last two hold
        ``O(dim·N·L)`` and check ``memory_budget``.
    return_last_state : also return :math:`h_{L-1}` ``(..., dim, N)`` (complex128 in
        the complex convention, else float64).

    Returns float64 ``(..., dim, L)`` (and the last state).

    >>> import numpy as np
    >>> u = np.array([[1.0, 0.0, 0.0]])                    # an impulse: y = K
    >>> A, B, C = np.array([[-1.0]]), np.array([[1.0]]), np.array([[1.0]])
    >>> s4d(u, A, B, C, 0.5, method="scan").round(4)
    array([[0.3935, 0.2387, 0.1447]])
    """
    method = _check_method(method, S4D_METHODS)
    u, abar, bbar, c, dA, D, factor = _s4d_setup(u, A, B, C, delta, D, check_finite)
    batch_shape, (dim, length) = u.shape[:-2], u.shape[-2:]
    nb, nstate = math.prod(batch_shape), abar.shape[1]
    uf = np.ascontiguousarray(u).reshape(nb, dim, length)
    if method == "recurrent":
        state = np.zeros((nb, dim, nstate), dtype=abar.dtype)
        y = np.full((nb, dim, length), np.nan)   # poisoned: every element is written
        _lti_kernel(uf, abar, bbar, c, factor, state, y)
    elif method == "fft":
        check_memory(dim * nstate * length * 16.0 * 3, memory_budget,
                     "the S4D kernel (dim·N·L)", "method='recurrent'")
        kern = _kernel(bbar, c, dA, factor, length)
        nfft = scipy.fft.next_fast_len(max(2 * length - 1, 1), real=True)
        y = scipy.fft.irfft(scipy.fft.rfft(uf, nfft, axis=-1) *
                            scipy.fft.rfft(kern, nfft, axis=-1), nfft, axis=-1)[..., :length]
        if return_last_state:     # h_{L-1} = Σ_l Ā^{L-1-l} B̄ u_l
            back = np.exp(dA[:, :, None] * np.arange(length - 1, -1, -1))
            state = bbar * np.einsum("bdl,dnl->bdn", uf, back)
    else:
        check_memory(nb * dim * nstate * length * 16.0 * 6, memory_budget,
                     "the S4D associative scan (batch·dim·N·L)", "method='recurrent'")
        cc = bbar[None, :, :, None] * uf[:, :, None, :]               # (B, dim, N, L)
        aa = np.broadcast_to(abar[None, :, :, None], cc.shape)
        h = associative_scan(aa, cc, axis=-1)[1]
        y = factor * np.einsum("dn,bdnl->bdl", c, h).real
        state = h[..., -1] if length else np.zeros((nb, dim, nstate), abar.dtype)
    if D is not None:
        y = y + D[:, None] * uf
    y = y.reshape(batch_shape + (dim, length))
    if return_last_state:
        return y, state.reshape(batch_shape + (dim, nstate))
    return y


@dataclasses.dataclass(frozen=True)
class S4DState(State):
    """``h``: ``(batch, dim, N)`` after ``position`` steps, with the discretized layer
    (``abar``, ``bbar``, ``C``, ``D``, the output ``factor``). ``nbytes`` counts ``h``
    only: the layer's weights are shared by every stream."""

    h: np.ndarray
    abar: np.ndarray
    bbar: np.ndarray
    C: np.ndarray
    D: np.ndarray | None
    factor: float

    @property
    def nbytes(self) -> int:
        return self.h.nbytes


def s4d_init_state(*, batch, A, B, C, delta, D=None, check_finite=True) -> S4DState:
    """The state of :func:`s4d` before the first step (``h = 0``, ``(batch, dim, N)``),
    with ``A``, ``B``, ``C``, ``delta``, ``D`` as there.

    >>> import numpy as np
    >>> A, B, C = -np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))
    >>> u = np.random.default_rng(0).standard_normal((1, 2, 5))
    >>> s = s4d_init_state(batch=1, A=A, B=B, C=C, delta=0.1)
    >>> outs = []
    >>> for t in range(5):
    ...     y, s = s4d_step(s, u[..., t]); outs.append(y)
    >>> bool(np.allclose(np.stack(outs, -1), s4d(u, A, B, C, 0.1))), s.nbytes
    (True, 48)
    """
    batch = check_int("batch", batch, minimum=1)
    if np.ndim(A) != 2:
        raise ValueError(f"A must have shape (dim, N), got {np.shape(A)}")
    _, abar, bbar, c, _, D, factor = _s4d_setup(np.zeros((np.shape(A)[0], 1)), A, B, C,
                                                delta, D, check_finite)
    return S4DState(position=0, h=np.zeros((batch,) + abar.shape, abar.dtype), abar=abar,
                    bbar=bbar, C=c, D=D, factor=factor)


def s4d_step(state: S4DState, u_t, *, check_finite=True):
    """``h = Ā h + B̄ u_t``, ``y_t = s Re(C h) + D u_t`` for ``u_t (batch, dim)``; returns
    ``(y_t (batch, dim), new_state)``. Example: see :func:`s4d_init_state`."""
    u_t = to_float64(u_t, "u_t", check_finite=check_finite)
    _check_shape(u_t, "u_t", state.h.shape[:2], "(batch, dim)")
    h = state.abar * state.h + state.bbar * u_t[..., None]
    y = state.factor * np.einsum("dn,bdn->bd", state.C, h).real
    if state.D is not None:
        y = y + state.D * u_t
    return y, state.replace(position=state.position + 1, h=h)


# --------------------------------------------------------------------------- selective
def _variable(X, name, a_complex, batch, dim, nstate, length, check_finite):
    """``B`` or ``C`` as ``(batch | 1, groups, N, L | 1)`` in ``A``'s dtype."""
    if X is None:
        raise TypeError(f"{name} must be an array, got None")
    if np.iscomplexobj(X) and not a_complex:
        raise TypeError(f"{name} is complex ({np.shape(X)}) but A is real; the reference "
                        f"would drop the imaginary part: pass a real {name} or a complex A")
    X = _number_array(X, name, check_finite=check_finite)
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


def _selective_setup(u, delta, A, B, C, D, z, delta_bias, delta_softplus, check_finite):
    u = to_float64(u, "u", check_finite=check_finite)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {u.shape}")
    batch, dim, length = u.shape
    delta = to_float64(delta, "delta", check_finite=check_finite)
    _check_shape(delta, "delta", u.shape, "(batch, dim, L) like u")
    A = _number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} from u {u.shape} "
                         f"and N >= 1, got {A.shape}")
    nstate, a_complex = A.shape[1], np.iscomplexobj(A)
    B = _variable(B, "B", a_complex, batch, dim, nstate, length, check_finite)
    C = _variable(C, "C", a_complex, batch, dim, nstate, length, check_finite)
    if D is not None:
        D = to_float64(D, "D", check_finite=check_finite)
        _check_shape(D, "D", (dim,), "(dim,)")
    if z is not None:
        z = to_float64(z, "z", check_finite=check_finite)
        _check_shape(z, "z", u.shape, "(batch, dim, L) like u")
    if delta_bias is not None:
        delta_bias = to_float64(delta_bias, "delta_bias", check_finite=check_finite)
        _check_shape(delta_bias, "delta_bias", (dim,), "(dim,)")
    softplus = check_bool("delta_softplus", delta_softplus)
    return u, delta, A, B, C, D, z, delta_bias, softplus, (2.0 if a_complex else 1.0)


@njit(cache=True, parallel=True)
def _selective_kernel(u, delta, dbias, softplus, A, B, C, dskip, z, has_z, reset,
                      has_reset, factor, state, out):   # pragma: no cover - compiled
    """The recurrence, one (batch row, channel) per parallel iteration, ``_TILE`` steps
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
        dt = np.empty(_TILE)
        dtu = np.empty(_TILE)
        acc = np.empty(_TILE)
        for t0 in range(0, length, _TILE):
            m = min(_TILE, length - t0)
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
                    y *= _silu(z[i, d, t])
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


def _chunked_selective(u, delta, dbias, softplus, A, B, C, D, z, reset, factor, state,
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
        dt = _softplus(dt) if softplus else dt
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
            yb = yb * _silu_np(z[:, :, p0:p1])
        y[:, :, p0:p1] = yb
        state = ends[-1]
    return y, state


def _resets(cu_seqlens, length):
    """Boolean ``(L,)`` marking the starts ``cu_seqlens[1:-1]`` (None if no packing)."""
    if cu_seqlens is None:
        return None
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or cu.dtype.kind not in "iu":
        raise TypeError(f"cu_seqlens must be a 1-D integer array [0, ..., L] of at least "
                        f"2 entries, got {cu.dtype} with shape {cu.shape}")
    if cu[0] != 0 or cu[-1] != length or (np.diff(cu) < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to L = {length} (cumulative "
                         f"sequence lengths), got {cu.tolist()}")
    reset = np.zeros(length, dtype=bool)
    starts = cu[1:-1]
    reset[starts[starts < length]] = True
    return reset


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
        ``"chunked"`` (two-level parallel scan over chunks of ``chunk`` steps, NumPy,
        processed in bounded blocks).
    cu_seqlens : optional cumulative lengths ``[0, l_1, l_1 + l_2, ..., L]`` of
        sequences packed along ``L`` (the reference's ``cu_seqlens``): the state
        restarts from 0 at each start ``cu_seqlens[1:-1]``, in every batch row.

    Returns ``out`` float64 ``(batch, dim, L)`` (and the last state).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u, delta = rng.standard_normal((1, 4, 10)), rng.uniform(0, 1, (1, 4, 10))
    >>> A = -rng.uniform(0.5, 2, (4, 3))
    >>> B, C = rng.standard_normal((2, 1, 3, 10))            # (batch, N, L): shared
    >>> out = selective_scan(u, delta, A, B, C, D=np.ones(4))
    >>> bool(np.allclose(out, selective_scan(u, delta, A, B, C, D=np.ones(4),
    ...                                      method="chunked", chunk=3)))
    True
    """
    method = _check_method(method, SELECTIVE_SCAN_METHODS)
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
        out, state = _chunked_selective(u, delta, delta_bias, softplus, A, B, C, D, z,
                                        reset, factor, state,
                                        check_int("chunk", chunk, minimum=1))
    return (out, state) if return_last_state else out


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
    A = _number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or min(A.shape) < 1:
        raise ValueError(f"A must have shape (dim, N), got {A.shape}")
    dim, nstate = A.shape
    if D is not None:
        D = to_float64(D, "D", check_finite=check_finite)
        _check_shape(D, "D", (dim,), "(dim,)")
    if delta_bias is not None:
        delta_bias = to_float64(delta_bias, "delta_bias", check_finite=check_finite)
        _check_shape(delta_bias, "delta_bias", (dim,), "(dim,)")
    h = np.zeros((batch, dim, nstate), dtype=A.dtype)
    if h0 is not None:
        h0 = _number_array(h0, "h0", check_finite=check_finite,
                           allow_complex=np.iscomplexobj(A))
        _check_shape(h0, "h0", h.shape, "(batch, dim, N)")
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
    _check_shape(u_t, "u_t", (batch, dim), "(batch, dim)")
    delta_t = to_float64(delta_t, "delta_t", check_finite=check_finite)
    _check_shape(delta_t, "delta_t", (batch, dim), "(batch, dim)")
    bc = []
    for name, X in (("B_t", B_t), ("C_t", C_t)):
        X = _number_array(X, name, check_finite=check_finite, allow_complex=a_complex)
        given = X.shape
        if X.ndim == 2:
            X = X[:, None]
        if X.ndim != 3 or X.shape[0] != batch or X.shape[2] != nstate or X.shape[1] < 1 \
                or dim % X.shape[1]:
            raise ValueError(f"{name} must have shape (batch, N) = ({batch}, {nstate}) or "
                             f"(batch, groups, N) with groups dividing dim = {dim}, got {given}")
        bc.append(X[:, np.arange(dim) // (dim // X.shape[1])])        # (batch, dim, N)
    dt = delta_t if state.delta_bias is None else delta_t + state.delta_bias
    dt = _softplus(dt) if state.delta_softplus else dt
    h = np.exp(dt[..., None] * state.A) * state.h + (dt * u_t)[..., None] * bc[0]
    y = (2.0 if a_complex else 1.0) * np.einsum("bdn,bdn->bd", h, bc[1]).real
    if state.D is not None:
        y = y + state.D * u_t
    if z_t is not None:
        z_t = to_float64(z_t, "z_t", check_finite=check_finite)
        _check_shape(z_t, "z_t", (batch, dim), "(batch, dim)")
        y = y * _silu_np(z_t)
    return y, state.replace(position=state.position + 1, h=h)
