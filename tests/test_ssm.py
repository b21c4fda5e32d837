"""S4D and Mamba's selective scan: every form agrees with the others and with an independent
transcription of the definitions; streaming equals the parallel forms; decays near 0 and 1
and a million steps stay exact; bad input is named."""
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, strategies as st

from refattn.ssm import (S4D_METHODS, s4d, s4d_kernel, selective_scan,
                         selective_scan_init_state, selective_scan_step)
from refattn.testing import max_rel_error


def _s4d_params(rng, dim, nstate, kind):
    A = -rng.uniform(0.05, 2.0, (dim, nstate))
    B, C = rng.standard_normal((2, dim, nstate))
    if kind == "complex":
        A = A + 1j * rng.uniform(-5, 5, (dim, nstate))
        B = B + 1j * rng.standard_normal((dim, nstate))
        C = C + 1j * rng.standard_normal((dim, nstate))
    return A, B, C


# --------------------------------------------------------------------------- S4D
def _s4d_by_definition(u, A, B, C, delta, D):
    """ZOH from the matrix exponential of the augmented system [[A, B], [0, 0]]·Δ (not the
    closed form the module uses), then the recurrence one state at a time."""
    dim, nstate = A.shape
    factor = 2.0 if any(np.iscomplexobj(x) for x in (A, B, C)) else 1.0
    y = np.zeros(u.shape)
    for d in range(dim):
        for n in range(nstate):
            m = scipy.linalg.expm(np.array([[A[d, n], B[d, n]], [0, 0]], dtype=complex)
                                  * delta[d])
            abar, bbar = m[0, 0], m[0, 1]
            h = 0j
            for t in range(u.shape[-1]):
                h = abar * h + bbar * u[d, t]
                y[d, t] += factor * (C[d, n] * h).real
    return y + D[:, None] * u


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_s4d_matches_the_matrix_exponential_definition(rng, kind):
    A, B, C = _s4d_params(rng, 3, 4, kind)
    u = rng.standard_normal((3, 20))
    delta, D = rng.uniform(0.01, 1.0, 3), rng.standard_normal(3)
    ref = _s4d_by_definition(u, A, B, C, delta, D)
    for method in S4D_METHODS:
        assert max_rel_error(s4d(u, A, B, C, delta, D, method=method), ref, normwise=True) <= 1e-12, method


@given(st.integers(1, 90), st.integers(1, 3), st.integers(1, 5),
       st.sampled_from([(), (1,), (2,), (2, 2)]), st.sampled_from(["real", "complex"]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_s4d_three_forms_agree(length, dim, nstate, batch, kind, with_d, seed):
    rng = np.random.default_rng(seed)
    A, B, C = _s4d_params(rng, dim, nstate, kind)
    u = rng.standard_normal(batch + (dim, length))
    delta = rng.uniform(1e-3, 2.0, dim)
    D = rng.standard_normal(dim) if with_d else None
    ref, last = s4d(u, A, B, C, delta, D, return_last_state=True)
    assert ref.shape == u.shape and ref.dtype == np.float64 and not np.isnan(ref).any()
    assert last.shape == batch + (dim, nstate)
    assert last.dtype == (np.complex128 if kind == "complex" else np.float64)
    for method in ("fft", "scan"):
        out, out_last = s4d(u, A, B, C, delta, D, method=method, return_last_state=True)
        assert max_rel_error(out, ref, normwise=True) <= 1e-10, method
        assert max_rel_error(out_last, last, normwise=True) <= 1e-10, method


def test_s4d_kernel_is_the_impulse_response_and_convolves(rng):
    A, B, C = _s4d_params(rng, 2, 6, "complex")
    delta = np.array([0.1, 0.7])
    kern = s4d_kernel(A, B, C, delta, 30)
    impulse = np.zeros((2, 30))
    impulse[:, 0] = 1
    np.testing.assert_allclose(s4d(impulse, A, B, C, delta), kern, rtol=1e-12, atol=1e-15)
    u = rng.standard_normal((2, 30))
    conv = np.stack([np.convolve(u[d], kern[d])[:30] for d in range(2)])
    assert max_rel_error(s4d(u, A, B, C, delta), conv, normwise=True) <= 1e-12


def test_s4d_conjugate_pair_convention_doubles_the_real_output(rng):
    """Complex dtype: N conjugate pairs, y = 2 Re(C h); all-real: y = C h."""
    A, B, C = _s4d_params(rng, 2, 3, "real")
    u = rng.standard_normal((2, 15))
    real = s4d(u, A, B, C, 0.3)
    np.testing.assert_allclose(s4d(u, A + 0j, B, C, 0.3), 2 * real, rtol=1e-13)
    np.testing.assert_allclose(s4d(u, A, B, C + 0j, 0.3, method="fft"), 2 * real,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-9, 1e4])
def test_s4d_small_and_large_steps_stay_exact(rng, scale):
    """ΔA tiny (Ā -> 1; B̄ ≈ ΔB needs expm1) and huge (Ā underflows to 0)."""
    A, B, C = _s4d_params(rng, 2, 3, "complex")
    u = rng.standard_normal((2, 400))
    delta = np.array([1.0, 3.0]) * scale
    ref = _s4d_by_definition(u[:, :40], A, B, C, delta, np.zeros(2))
    out = {m: s4d(u, A, B, C, delta, method=m) for m in S4D_METHODS}
    assert max_rel_error(out["recurrent"][:, :40], ref, normwise=True) <= 1e-10
    for method in ("fft", "scan"):
        assert np.isfinite(out[method]).all()
        # the FFT's rounding is relative to the whole output, not to each element
        assert max_rel_error(out[method], out["recurrent"], normwise=True) <= 1e-10, method


def test_s4d_a_million_steps_with_a_decay_near_one(rng):
    """|Ā| = e^(-1e-7) (a memory of ~1e7 steps) beside a fast mode, L = 2^20: the three
    forms agree, and the last output matches an extended-precision (long double) sum of
    the convolution."""
    n = 1 << 20
    A = np.array([[-1e-7 + 0.3j, -0.5 + 2j]])
    B, C = np.array([[1 + 0.5j, 0.3 - 1j]]), np.array([[0.7 + 0.1j, -1 + 0.2j]])
    u = rng.standard_normal((1, 1, n))
    out = {m: s4d(u, A, B, C, 1.0, method=m) for m in S4D_METHODS}
    for method in ("fft", "scan"):
        assert np.isfinite(out[method]).all()
        assert max_rel_error(out[method], out["recurrent"], normwise=True) <= 1e-10, method
    dA = A[0].astype(np.clongdouble)
    bbar = np.expm1(dA) / dA * B[0]
    lags = np.arange(n, dtype=np.longdouble)[::-1]
    last = sum((2 * (C[0, k] * bbar[k] * np.exp(dA[k] * lags)).real * u[0, 0]).sum()
               for k in range(2))
    for method in S4D_METHODS:
        assert abs(out[method][0, 0, -1] - last) <= 1e-10 * np.abs(out["recurrent"]).max()


# --------------------------------------------------------------------------- selective
def _torch_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                     delta_softplus=False, cu_seqlens=None):
    """selective_scan_ref's equations in float64 PyTorch (tests/mamba_reference.py), on
    NumPy arrays."""
    torch = pytest.importorskip("torch")
    from mamba_reference import torch_selective_scan   # same folder

    def t(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))
    out, last = torch_selective_scan(t(u), t(delta), t(A), t(B), t(C), t(D), t(z),
                                     t(delta_bias), delta_softplus, cu_seqlens)
    return out.numpy(), last.numpy()


def _selective_inputs(rng, batch, dim, nstate, length, layout, complex_a, groups=1):
    u = rng.standard_normal((batch, dim, length))
    delta = rng.uniform(-3, 1, (batch, dim, length))
    A = -np.exp(rng.uniform(-2, 1, (dim, nstate)))
    if complex_a:
        A = A + 1j * rng.uniform(-3, 3, (dim, nstate))

    def make():
        if layout == "constant":
            X = rng.standard_normal((dim, nstate))
            return X + 1j * rng.standard_normal(X.shape) if complex_a else X
        shape = (batch, nstate) if layout == "shared" else (batch, groups, nstate)
        if complex_a:     # half the time as the reference's interleaved real pairs
            if rng.random() < 0.5:
                return rng.standard_normal(shape + (2 * length,))
            return rng.standard_normal(shape + (length,)) + 1j * rng.standard_normal(
                shape + (length,))
        return rng.standard_normal(shape + (length,))

    return u, delta, A, make(), make()


@pytest.mark.parametrize("layout, groups", [("constant", 1), ("shared", 1), ("grouped", 1),
                                            ("grouped", 2), ("grouped", 4)])
@pytest.mark.parametrize("complex_a", [False, True])
@pytest.mark.parametrize("extras", [False, True])
def test_selective_scan_matches_the_transcribed_reference(rng, layout, groups, complex_a,
                                                          extras):
    u, delta, A, B, C = _selective_inputs(rng, 2, 4, 3, 23, layout, complex_a, groups)
    kw = {}
    if extras:
        kw = dict(D=rng.standard_normal(4), z=rng.standard_normal(u.shape) * 3,
                  delta_bias=rng.standard_normal(4) * 5, delta_softplus=True)
        delta = delta * 10          # both sides of softplus's threshold (20) ...
        delta[:, :, 3::4] = 20.25 - kw["delta_bias"][:, None]   # ... and just above it
    ref, ref_last = _torch_reference(u, delta, A, B, C, **kw)
    for method, chunk in (("recurrent", 0), ("chunked", 1), ("chunked", 5), ("chunked", 64)):
        out, last = selective_scan(u, delta, A, B, C, **kw, return_last_state=True,
                                   method=method, chunk=max(chunk, 1))
        assert out.dtype == np.float64 and last.shape == (2, 4, 3)
        assert last.dtype == (np.complex128 if complex_a else np.float64)
        assert max_rel_error(out, ref, normwise=True) <= 1e-12, (method, chunk)
        assert max_rel_error(last, ref_last, normwise=True) <= 1e-12, (method, chunk)
    assert not np.array_equal(selective_scan(u, delta, A, B, C), selective_scan(
        u, delta, A, B, C, D=np.ones(4)))


@pytest.mark.parametrize("complex_a", [False, True])
def test_packed_sequences_restart_the_state(rng, complex_a):
    """cu_seqlens: the transcribed reference, and the sequences run one by one."""
    cu = np.array([0, 7, 8, 8, 30, 41])
    u, delta, A, B, C = _selective_inputs(rng, 1, 4, 3, 41, "grouped", complex_a, 2)
    if complex_a and not np.iscomplexobj(B):
        B = B[..., 0::2] + 1j * B[..., 1::2]
    if complex_a and not np.iscomplexobj(C):
        C = C[..., 0::2] + 1j * C[..., 1::2]
    kw = dict(D=rng.standard_normal(4), z=rng.standard_normal(u.shape))
    ref = _torch_reference(u, delta, A, B, C, **kw, cu_seqlens=cu)[0]
    pieces = [selective_scan(u[..., a:b], delta[..., a:b], A, B[..., a:b], C[..., a:b],
                             kw["D"], kw["z"][..., a:b]) for a, b in zip(cu[:-1], cu[1:])]
    for method in ("recurrent", "chunked"):
        out = selective_scan(u, delta, A, B, C, **kw, cu_seqlens=cu, method=method,
                             chunk=5)
        assert max_rel_error(out, ref, normwise=True) <= 1e-12, method
        assert max_rel_error(out, np.concatenate(pieces, -1), normwise=True) <= 1e-12, method
    assert max_rel_error(selective_scan(u, delta, A, B, C, **kw), ref, normwise=True) > 1e-3   # it matters


@given(st.integers(1, 80), st.integers(1, 12), st.sampled_from([(1, 1), (4, 1), (4, 2),
                                                                (6, 3), (3, 3)]),
       st.integers(1, 5), st.integers(1, 2), st.sampled_from(["constant", "shared",
                                                              "grouped"]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_selective_scan_forms_agree(length, chunk, dim_groups, nstate, batch, layout,
                                    complex_a, seed):
    rng = np.random.default_rng(seed)
    dim, groups = dim_groups
    u, delta, A, B, C = _selective_inputs(rng, batch, dim, nstate, length, layout,
                                          complex_a, groups)
    kw = dict(D=rng.standard_normal(dim), z=rng.standard_normal(u.shape),
              delta_bias=rng.standard_normal(dim), delta_softplus=bool(rng.random() < .5),
              return_last_state=True)
    if rng.random() < 0.3:       # packed sequences
        cuts = np.sort(rng.integers(0, length + 1, rng.integers(0, 4)))
        kw["cu_seqlens"] = np.concatenate([[0], cuts, [length]])
    ref, last = selective_scan(u, delta, A, B, C, **kw)
    assert not np.isnan(ref).any()
    out, out_last = selective_scan(u, delta, A, B, C, **kw, method="chunked", chunk=chunk)
    assert not np.isnan(out).any()
    assert max_rel_error(out, ref, normwise=True) <= 1e-10
    assert max_rel_error(out_last, last, normwise=True) <= 1e-10


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_s4d_is_a_selective_scan_with_constant_step_and_zoh_input_matrix(rng, kind):
    """Δ constant over time, B' = (e^{ΔA} - 1)/(ΔA) · B (so that Δ B' is the ZOH B̄):
    the selective scan of the LTI problem equals S4D."""
    A, B, C = _s4d_params(rng, 3, 4, kind)
    if kind == "real":   # S4D's convention follows the dtypes; mamba's follows A's
        assert not np.iscomplexobj(B)
    u = rng.standard_normal((2, 3, 50))
    step, D = rng.uniform(0.05, 0.5, 3), rng.standard_normal(3)
    dA = step[:, None] * A
    b_prime = np.expm1(dA) / dA * B
    delta = np.broadcast_to(step[:, None], u.shape)
    for method in ("recurrent", "chunked"):
        out, last = selective_scan(u, delta, A, b_prime, C, D=D, method=method, chunk=7,
                                   return_last_state=True)
        ref, ref_last = s4d(u, A, B, C, step, D, return_last_state=True)
        assert max_rel_error(out, ref, normwise=True) <= 1e-10, method
        assert max_rel_error(last, ref_last, normwise=True) <= 1e-10, method


@pytest.mark.parametrize("complex_a", [False, True])
def test_stepping_equals_the_selective_scan(rng, complex_a):
    dim, nstate, length = 4, 3, 17
    u, delta, A, B, C = _selective_inputs(rng, 2, dim, nstate, length, "grouped",
                                          complex_a, groups=2)
    if complex_a and not np.iscomplexobj(B):
        B = B[..., 0::2] + 1j * B[..., 1::2]
    if complex_a and not np.iscomplexobj(C):
        C = C[..., 0::2] + 1j * C[..., 1::2]
    z, D, bias = rng.standard_normal(u.shape), rng.standard_normal(dim), np.ones(dim)
    ref, last = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                               delta_softplus=True, return_last_state=True)
    state = selective_scan_init_state(batch=2, A=A, D=D, delta_bias=bias,
                                      delta_softplus=True)
    size, outs = state.nbytes, []
    assert size == 2 * dim * nstate * (16 if complex_a else 8)
    for t in range(length):
        y, state = selective_scan_step(state, u[..., t], delta[..., t], B[..., t],
                                       C[..., t], z[..., t])
        assert state.nbytes == size
        outs.append(y)
    assert state.position == length
    assert max_rel_error(np.stack(outs, -1), ref, normwise=True) <= 1e-12
    assert max_rel_error(state.h, last, normwise=True) <= 1e-12
    # a constant (dim, N) B is groups = dim
    Bc = rng.standard_normal((dim, nstate))
    s0 = selective_scan_init_state(batch=2, A=A)
    y0, _ = selective_scan_step(s0, u[..., 0], delta[..., 0],
                                np.broadcast_to(Bc, (2, dim, nstate)), C[..., 0])
    np.testing.assert_allclose(y0, selective_scan(u[..., :1], delta[..., :1], A, Bc,
                                                  C[..., :1])[..., 0], rtol=1e-12)


@pytest.mark.parametrize("regime", ["near_one", "near_zero", "mixed"])
def test_decays_near_one_and_near_zero_stay_finite_and_exact(rng, regime):
    batch, dim, nstate, length = 1, 2, 3, 3000
    u, delta, A, B, C = _selective_inputs(rng, batch, dim, nstate, length, "shared", False)
    if regime == "near_one":
        delta = rng.uniform(0, 1e-10, delta.shape)           # e^{δA} = 1 - O(1e-10)
    elif regime == "near_zero":
        delta = rng.uniform(500, 1000, delta.shape)           # e^{δA} underflows to 0
    else:
        delta = np.where(rng.random(delta.shape) < 0.02, 800.0, 1e-12)
    ref = selective_scan(u, delta, A, B, C)
    out = selective_scan(u, delta, A, B, C, method="chunked", chunk=256)
    assert np.isfinite(ref).all() and np.isfinite(out).all()
    assert max_rel_error(out, ref, normwise=True) <= 1e-10
    if regime == "near_zero":    # the state is δ B u of the current step alone
        np.testing.assert_allclose(ref, np.einsum("bdl,bnl,bnl->bdl", delta * u, B, C),
                                   rtol=1e-12)


def test_a_million_steps_chunked_equals_the_recurrence_and_the_closed_form(rng):
    """1M steps with decays 1 - O(1e-7) (products down to ~e^-0.1 per 1M) and some near
    0; a constant problem against its closed form h_t = (1 - a^(t+1))/(1 - a) δ B u."""
    n = 1 << 20
    u, delta, A, B, C = _selective_inputs(rng, 1, 2, 2, n, "shared", False)
    delta = rng.uniform(0, 1e-7, delta.shape)
    delta[rng.random(delta.shape) < 0.001] = 800.0
    ref, last = selective_scan(u, delta, A, B, C, return_last_state=True)
    out, out_last = selective_scan(u, delta, A, B, C, method="chunked", chunk=128,
                                   return_last_state=True)
    assert np.isfinite(out).all()
    assert max_rel_error(out, ref, normwise=True) <= 1e-10 and max_rel_error(out_last, last, normwise=True) <= 1e-10
    step, a_cont = 1e-7, -0.5
    t = np.arange(n)
    closed = np.expm1((t + 1) * step * a_cont) / np.expm1(step * a_cont) * step
    ones = np.ones((1, 1, n))
    for method in ("recurrent", "chunked"):
        y = selective_scan(ones, ones * step, np.array([[a_cont]]), np.ones((1, 1)),
                           np.ones((1, 1)), method=method)[0, 0]
        assert max_rel_error(y, closed, normwise=True) <= 1e-10, method


# --------------------------------------------------------------------------- errors
def test_s4d_bad_input_is_named():
    u = np.zeros((2, 5))
    A, B, C = -np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))
    with pytest.raises(ValueError, match=r"A \(2, 3\) must have a negative real part.*"
                                         r"index \(0, 2\)"):
        s4d(u, np.where(np.arange(3) == 2, 0.0, -1.0) * np.ones((2, 1)), B, C, 0.1)
    with pytest.raises(ValueError, match="negative real part"):
        s4d(u, 0.5 + 1j * np.ones((2, 3)), B, C, 0.1)
    with pytest.raises(ValueError, match=r"A must have shape \(dim, N\) with dim = 2 from "
                                         r"u \(2, 5\).*got \(3, 3\)"):
        s4d(u, -np.ones((3, 3)), B, C, 0.1)
    with pytest.raises(ValueError, match=r"B must have shape \(dim, N\) like A = \(2, 3\), "
                                         r"got \(2, 4\)"):
        s4d(u, A, np.ones((2, 4)), C, 0.1)
    with pytest.raises(ValueError, match="delta .* must be positive"):
        s4d(u, A, B, C, np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match=r"delta must be a number or have shape \(dim,\)"):
        s4d(u, A, B, C, np.ones(3))
    with pytest.raises(ValueError, match=r"D must be a number or have shape \(dim,\)"):
        s4d(u, A, B, C, 0.1, D=np.ones(5))
    with pytest.raises(ValueError, match=r"u must have shape \(\.\.\., dim, L\)"):
        s4d(np.zeros(5), A, B, C, 0.1)
    with pytest.raises(TypeError, match="u must have a real numeric dtype"):
        s4d(u + 1j, A, B, C, 0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        s4d(u, A, B, C, 0.1, method="chunked")
    with pytest.raises(ValueError, match="C .* non-finite"):
        s4d(u, A, B, np.full((2, 3), np.nan + 0j), 0.1)


def test_selective_scan_bad_input_is_named():
    u = np.zeros((2, 4, 6))
    A, B = -np.ones((4, 3)), np.ones((2, 3, 6))
    with pytest.raises(ValueError, match=r"u must have shape \(batch, dim, L\), got \(4, 6\)"):
        selective_scan(u[0], u[0], A, B, B)
    with pytest.raises(ValueError, match=r"delta must have shape \(batch, dim, L\) like u "
                                         r"= \(2, 4, 6\), got \(2, 4, 5\)"):
        selective_scan(u, u[..., :5], A, B, B)
    with pytest.raises(ValueError, match=r"A must have shape \(dim, N\) with dim = 4"):
        selective_scan(u, u, -np.ones((3, 3)), B, B)
    with pytest.raises(ValueError, match=r"C must have shape .*groups dividing dim = 4.*"
                                         r"got \(2, 3, 3, 6\)"):
        selective_scan(u, u, A, B, np.ones((2, 3, 3, 6)))
    with pytest.raises(ValueError, match=r"B must have shape .*\(batch, N, L\) = "
                                         r"\(2, 3, 6\).*got \(2, 3, 5\)"):
        selective_scan(u, u, A, np.ones((2, 3, 5)), B)
    with pytest.raises(ValueError, match=r"2L interleaved.*got \(2, 3, 6\)"):
        selective_scan(u, u, A + 0j, B, B)
    with pytest.raises(TypeError, match="B is complex .* but A is real"):
        selective_scan(u, u, A, B + 1j, B)
    with pytest.raises(ValueError, match=r"D must have shape \(dim,\) = \(4,\), got \(3,\)"):
        selective_scan(u, u, A, B, B, D=np.ones(3))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, dim, L\)"):
        selective_scan(u, u, A, B, B, z=np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"delta_bias must have shape \(dim,\)"):
        selective_scan(u, u, A, B, B, delta_bias=np.ones((4, 1)))
    with pytest.raises(TypeError, match="delta_softplus must be True or False"):
        selective_scan(u, u, A, B, B, delta_softplus="yes")
    with pytest.raises(ValueError, match="method must be one of"):
        selective_scan(u, u, A, B, B, method="fft")
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to L = 6"):
        selective_scan(u, u, A, B, B, cu_seqlens=np.array([0, 4, 3, 6]))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer array"):
        selective_scan(u, u, A, B, B, cu_seqlens=np.array([0.0, 6.0]))
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        selective_scan(u, u, A, B, B, method="chunked", chunk=0)
    state = selective_scan_init_state(batch=2, A=A)
    with pytest.raises(ValueError, match=r"B_t must have shape \(batch, N\) = \(2, 3\).*"
                                         r"got \(2, 4\)"):
        selective_scan_step(state, u[..., 0], u[..., 0], np.ones((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"u_t must have shape \(batch, dim\)"):
        selective_scan_step(state, u[0], u[..., 0], np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(TypeError, match="C_t must be real"):
        selective_scan_step(state, u[..., 0], u[..., 0], np.ones((2, 3)), np.ones((2, 3)) * 1j)


def test_low_precision_inputs_give_float64(rng):
    u, delta, A, B, C = _selective_inputs(rng, 1, 2, 3, 9, "shared", False)
    u32, d16 = u.astype(np.float32), delta.astype(np.float16)
    out = selective_scan(u32, d16, A, B, C)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, selective_scan(u32.astype(float), d16.astype(float),
                                                      A, B, C))
    A4, B4, C4 = _s4d_params(rng, 2, 3, "real")
    y = s4d(u32, A4.astype(np.float32), B4, C4, np.float32(0.1))
    assert y.dtype == np.float64


def test_empty_sequences(rng):
    A, B, C = _s4d_params(rng, 2, 3, "complex")
    for method in S4D_METHODS:
        y, last = s4d(np.zeros((1, 2, 0)), A, B, C, 0.1, method=method,
                      return_last_state=True)
        assert y.shape == (1, 2, 0) and last.shape == (1, 2, 3) and not last.any()
    u = np.zeros((1, 2, 0))
    for method in ("recurrent", "chunked"):
        out, last = selective_scan(u, u, A, B, C, method=method, return_last_state=True)
        assert out.shape == (1, 2, 0) and last.shape == (1, 2, 3) and not last.any()


def test_s4d_stepping_equals_the_parallel_forms():
    from refattn.ssm import s4d_init_state, s4d_step
    rng = np.random.default_rng(7)
    dim, n, length = 3, 4, 11
    A = -rng.uniform(0.1, 2.0, (dim, n)) + 1j * rng.standard_normal((dim, n))
    B = rng.standard_normal((dim, n)) + 1j * rng.standard_normal((dim, n))
    C = rng.standard_normal((dim, n)) + 1j * rng.standard_normal((dim, n))
    u = rng.standard_normal((2, dim, length))
    delta, D = rng.uniform(0.01, 0.5, dim), rng.standard_normal(dim)
    state = s4d_init_state(batch=2, A=A, B=B, C=C, delta=delta, D=D)
    size, outs = state.nbytes, []
    for t in range(length):
        y, state = s4d_step(state, u[..., t])
        outs.append(y)
    for method in ("recurrent", "fft", "scan"):
        ref, last = s4d(u, A, B, C, delta, D, method=method, return_last_state=True)
        np.testing.assert_allclose(np.stack(outs, -1), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.h, last, rtol=1e-10, atol=1e-12)
    assert state.nbytes == size == 2 * dim * n * 16
    with pytest.raises(ValueError, match=r"u_t"):
        s4d_step(state, np.zeros((1, dim)))
    with pytest.raises(ValueError, match=r"A must have shape \(dim, N\)"):
        s4d_init_state(batch=1, A=-np.ones(3), B=B, C=C, delta=0.1)
