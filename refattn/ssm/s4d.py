r"""S4D (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"), float64 reference: the diagonal LTI state-space layer,
its convolution kernel, three parallel forms and streaming.

Per channel ``d`` a diagonal continuous system
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

Forms: ``method="recurrent"`` (Numba, parallel over batch·channels), ``"fft"`` (the
convolution with the SSM kernel :math:`K_l = s\,\mathrm{Re}(\sum_n C_n \bar A_n^l \bar
B_n)`, zero-padded to at least ``2L - 1`` so nothing wraps around) and ``"scan"`` (the
parallel associative scan of :func:`refattn.linear_rnn.associative_scan`). None divides
by a product of decays, so decays near 0 underflow to true zeros and decays near 1 over
a million steps stay accurate.

Streaming: :func:`s4d_init_state` / :func:`s4d_step` carry the state ``h (batch, dim,
N)``. Not q/k/v attention: not in the attention registry.

>>> import numpy as np
>>> from refattn.ssm import s4d
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

from .._core.checks import check_bool, check_choice, check_int, check_memory
from ..boundary.arrays import to_float64
from ..gradients import check_cotangent, sum_to_shape
from ..recurrent.linear_rnn import associative_scan
from ..streaming import State
from ._common import TILE, check_shape, number_array, scan_vjp

__all__ = ["s4d", "s4d_kernel", "s4d_init_state", "s4d_step", "S4DState", "S4D_METHODS",
           "s4d_vjp"]

#: Forms of :func:`s4d`.
S4D_METHODS = ("recurrent", "fft", "scan")


def _s4d_setup(u, A, B, C, delta, D, check_finite):
    u = to_float64(u, "u", check_finite=check_finite)
    if u.ndim < 2:
        raise ValueError(f"u must have shape (..., dim, L) with at least 2 dimensions, "
                         f"got {u.shape}")
    dim = u.shape[-2]
    A = number_array(A, "A", check_finite=check_finite)
    if A.ndim != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} from u {u.shape} "
                         f"and N >= 1, got {A.shape}")
    if not (A.real < 0).all():
        bad = tuple(int(i) for i in np.argwhere(~(A.real < 0))[0])
        raise ValueError(f"A {A.shape} must have a negative real part (a stable "
                         f"continuous system); got {A[bad]!r} at index {bad}")
    B = number_array(B, "B", check_finite=check_finite)
    C = number_array(C, "C", check_finite=check_finite)
    check_shape(B, "B", A.shape, "(dim, N) like A")
    check_shape(C, "C", A.shape, "(dim, N) like A")
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
        acc = np.empty(TILE)
        for t0 in range(0, length, TILE):
            m = min(TILE, length - t0)
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
    >>> one = np.array([[1.0]])
    >>> s4d_kernel(-one, one, one, 0.5, 3).round(4)
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
    method = check_choice("method", method, S4D_METHODS)
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
                            scipy.fft.rfft(kern, nfft, axis=-1), nfft,
                            axis=-1)[..., :length]
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


# --------------------------------------------------------------------------- gradients
def _zoh_chi(w):
    r""":math:`\chi(w) = (w e^w - \mathrm{expm1}(w)) / w^2 = \sum_j \frac{j+1}{(j+2)!} w^j`
    (so that :math:`\partial \bar B / \partial A = \Delta^2 \chi(\Delta A) B`), by its
    series where :math:`|w| < 1/2`, where the closed form would cancel."""
    small = np.abs(w) < 0.5
    ws, wl = np.where(small, w, 0.0), np.where(small, 1.0, w)
    series = sum((j + 1) / math.factorial(j + 2) * ws**j for j in range(18))
    return np.where(small, series, (wl * np.exp(wl) - np.expm1(wl)) / wl**2)


def s4d_vjp(u, A, B, C, delta, grad_out, *, D=None, method="recurrent",
            return_last_state=False, grad_last_state=None, check_finite=True,
            memory_budget=None):
    r"""Gradients of :func:`s4d` for ``u``, ``A``, ``B``, ``C``, ``delta`` (and ``D``),
    float64, each of its argument's shape (a number ``delta``/``D``: a number);
    complex arguments get :math:`\partial L/\partial\mathrm{Re} + i\,\partial L/
    \partial\mathrm{Im}` (PyTorch's convention), a real argument promoted to the complex
    convention the real part. ``grad_out``: cotangent of the output ``(..., dim, L)``
    (or the pair ``(grad_out, grad_last_state)``); ``grad_last_state``: of the last state
    ``(..., dim, N)``. Other arguments as in the forward.

    With :math:`w = \Delta A`, :math:`\bar A = e^w`, :math:`\bar B = \mathrm{expm1}(w)
    B / A` and :math:`G_{\bar A}`, :math:`G_{\bar B}`, :math:`dC` the gradients of the
    recurrence (those of :func:`refattn.ssm.selective_scan.selective_scan_vjp` with
    :math:`\delta = 1`, the shared ``_common.scan_vjp``): :math:`G_w = \overline{\bar A}
    G_{\bar A}` and

    .. math:: dA = \Delta G_w + \overline{\Delta^2 \chi(w) B}\, G_{\bar B}, \quad
              dB = \overline{\mathrm{expm1}(w)/A}\, G_{\bar B}, \quad
              d\Delta = \textstyle\sum_n \mathrm{Re}(\overline{A} G_w
              + \overline{e^w B}\, G_{\bar B}),

    :math:`\chi(w) = (w e^w - \mathrm{expm1}(w))/w^2` (a series near 0: small steps stay
    exact), :math:`dD = \sum g u`. Forms: ``"recurrent"`` (the reverse-time recurrence,
    Numba, memory O(N) per running channel), ``"scan"`` (the two-level scan, forward then
    reversed, in bounded blocks) and ``"fft"`` (through the kernel: :math:`dK_l =
    \sum_t g_t u_{t-l}` and :math:`du_s = \sum_l g_{s+l} K_l`, correlations by FFT, then
    :math:`K_l = s\,\mathrm{Re}\sum_n W_n e^{l w_n}`, :math:`W = C \bar B`, gives
    :math:`G_W = s \sum_l dK_l \overline{e^{l w}}`, :math:`G_w = s \sum_l l\, dK_l
    \overline{W e^{l w}}`; checks ``memory_budget``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u, A = rng.standard_normal((2, 5)), -rng.uniform(0.5, 1, (2, 3)) + 1j
    >>> B, C = rng.standard_normal((2, 2, 3))
    >>> g = s4d_vjp(u, A, B, C, 0.1, np.ones((2, 5)))
    >>> g["A"].dtype, g["B"].dtype, np.shape(g["delta"])
    (dtype('complex128'), dtype('float64'), ())
    >>> f = s4d_vjp(u, A, B, C, 0.1, np.ones((2, 5)), method="fft")
    >>> all(np.allclose(g[k], f[k]) for k in g)
    True
    """
    method = check_choice("method", method, S4D_METHODS)
    check_bool("return_last_state", return_last_state)
    given = dict(A=A, B=B, C=C, delta=delta, D=D)
    u, abar, bbar, c, w, D, factor = _s4d_setup(u, A, B, C, delta, D, check_finite)
    if isinstance(grad_out, tuple):
        if len(grad_out) != 2 or grad_last_state is not None:
            raise ValueError("grad_out as a tuple must be (grad_out, grad_last_state), "
                             "with grad_last_state= not given as well")
        grad_out, grad_last_state = grad_out
    batch_shape, (dim, length) = u.shape[:-2], u.shape[-2:]
    nb, nstate = math.prod(batch_shape), abar.shape[1]
    A = number_array(A, "A", check_finite=check_finite).astype(abar.dtype)
    B = number_array(B, "B", check_finite=check_finite).astype(abar.dtype)
    delta = np.broadcast_to(to_float64(delta, "delta", check_finite=check_finite), (dim,))
    uf = np.ascontiguousarray(u).reshape(nb, dim, length)
    g = check_cotangent(grad_out, "grad_out", u.shape, check_finite=check_finite)
    g = np.zeros((nb, dim, length)) if g is None else g.reshape(nb, dim, length)
    glast = None
    if grad_last_state is not None:
        glast = number_array(grad_last_state, "grad_last_state", check_finite=check_finite,
                             allow_complex=factor == 2.0)
        check_shape(glast, "grad_last_state", batch_shape + (dim, nstate),
                    "(..., dim, N), the last state")
        glast = glast.reshape(nb, dim, nstate).astype(abar.dtype)
    if method == "fft":
        check_memory(dim * nstate * length * 16.0 * 4, memory_budget,
                     "the S4D kernel's gradient (dim·N·L)", "method='recurrent'")
        nfft = scipy.fft.next_fast_len(max(2 * length - 1, 1), real=True)
        G, U = scipy.fft.rfft(g, nfft, axis=-1), scipy.fft.rfft(uf, nfft, axis=-1)
        kf = scipy.fft.rfft(_kernel(bbar, c, w, factor, length), nfft, axis=-1)
        du = scipy.fft.irfft(G * np.conj(kf), nfft, axis=-1)[..., :length]
        dK = scipy.fft.irfft((G * np.conj(U)).sum(axis=0), nfft, axis=-1)[:, :length]
        lags = np.arange(length)
        powers = np.conj(np.exp(w[:, :, None] * lags))                  # (dim, N, L)
        gW = factor * np.einsum("dl,dnl->dn", dK, powers)
        gw = factor * np.conj(c * bbar) * np.einsum("dl,dnl->dn", dK * lags, powers)
        gbbar, dC = np.conj(c) * gW, np.conj(bbar) * gW
        if glast is not None:        # h_{L-1} = B̄ Σ_l Ā^{L-1-l} u_l
            back = powers[:, :, ::-1]
            gbbar = gbbar + np.einsum("bdn,bdl,dnl->dn", glast, uf, back)
            du = du + np.einsum("bdn,dnl->bdl", np.conj(bbar) * glast, back).real
            gw = gw + np.conj(bbar) * np.einsum("bdn,bdl,dnl->dn", glast, uf,
                                                back * lags[::-1])
    else:
        if glast is None:
            glast = np.zeros((nb, dim, nstate), abar.dtype)
        du, _, _, gw, gbbar, dC = scan_vjp(
            uf, np.ones(uf.shape), w, bbar[None, :, :, None], c[None, :, :, None], g,
            None, factor, glast, (False, False),
            "recurrent" if method == "recurrent" else "chunkwise")
        gbbar, dC = gbbar[0, :, :, 0], dC[0, :, :, 0]
    dA = delta[:, None] * gw + np.conj(delta[:, None]**2 * _zoh_chi(w) * B) * gbbar
    ddelta = (np.conj(A) * gw + np.conj(abar * B) * gbbar).real.sum(axis=-1)
    dB = np.conj(np.expm1(w) / A) * gbbar
    grads = {"u": du, "A": dA, "B": dB, "C": dC, "delta": ddelta}
    if D is not None:
        grads["u"] = du + D[:, None] * g
        grads["D"] = (g * uf).sum(axis=(0, 2))
    grads["u"] = grads["u"].reshape(u.shape)
    for name in ("A", "B", "C"):
        if not np.iscomplexobj(given[name]):
            grads[name] = np.ascontiguousarray(grads[name].real)
    for name in ("delta", "D"):
        if name in grads:
            grads[name] = sum_to_shape(grads[name], np.shape(given[name]))
    return grads


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
    check_shape(u_t, "u_t", state.h.shape[:2], "(batch, dim)")
    h = state.abar * state.h + state.bbar * u_t[..., None]
    y = state.factor * np.einsum("dn,bdn->bd", state.C, h).real
    if state.D is not None:
        y = y + state.D * u_t
    return y, state.replace(position=state.position + 1, h=h)


s4d.vjp = s4d_vjp
