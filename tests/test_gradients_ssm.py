"""VJPs of S4D and Mamba's selective scan: central finite differences (complex parameters
by their real and imaginary parts), PyTorch float64 autograd of independent
transcriptions (``selective_scan_ref``'s equations, S4D's ZOH recurrence), agreement of
the forms, bad cotangents named, long sequences and extreme steps finite."""
import math

import numpy as np
import pytest

import refattn as ra
from refattn.ssm import s4d, selective_scan
from refattn.ssm.s4d import s4d_vjp
from refattn.ssm.selective_scan import selective_scan_vjp
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

from mamba_reference import torch_selective_scan   # same folder

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- transcriptions
def torch_s4d(u, A, B, C, delta, D=None):
    """S4D's ZOH recurrence in float64 PyTorch (``expm1`` for B̄), one step at a time."""
    cplx = any(x.is_complex() for x in (A, B, C))
    if cplx:
        A, B, C = (x.to(torch.complex128) for x in (A, B, C))
    w = delta[..., None] * A
    abar, bbar = torch.exp(w), torch.expm1(w) / A * B
    h = torch.zeros(u.shape[:-1] + A.shape[-1:], dtype=abar.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = abar * h + bbar * u[..., t, None]
        y = (C * h).sum(-1)
        ys.append(2 * y.real if cplx else y)
    y = torch.stack(ys, -1)
    return (y if D is None else y + D[..., None] * u), h


def autograd(fn, inputs, grads, **kwargs):
    """``{name: gradient}`` of ``fn(**inputs)`` (a tuple of outputs) for cotangents
    ``grads``, by torch autograd (complex: PyTorch's ``∂/∂Re + i ∂/∂Im``)."""
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    outs = fn(**ts, **kwargs)
    pairs = [(o, torch.tensor(g)) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in pairs], list(ts.values()),
                              [g for _, g in pairs])
    return {k: g.numpy() for k, g in zip(ts, got)}


def close(mine, ref, tol, what=""):
    assert sorted(mine) == sorted(ref), (what, sorted(mine), sorted(ref))
    for k in ref:
        assert mine[k].shape == np.shape(ref[k]), (what, k, mine[k].shape, np.shape(ref[k]))
        assert mine[k].dtype == np.asarray(ref[k]).dtype, (what, k, mine[k].dtype)
        err = max_rel_error(mine[k], ref[k], normwise=True)
        assert err <= tol, (what, k, err)


def split_complex(fn, names, inputs):
    """``fn`` of real arguments: each complex input ``x`` in ``names`` becomes ``x_re``
    and ``x_im``; complex outputs become their (real, imaginary) parts."""
    def wrapped(**kw):
        args = dict(kw)
        for n in names:
            args[n] = args.pop(n + "_re") + 1j * args.pop(n + "_im")
        out = fn(**args)
        outs = out if isinstance(out, tuple) else (out,)
        flat = []
        for o in outs:
            flat += [o.real, o.imag] if np.iscomplexobj(o) else [o]
        return tuple(flat)
    real_inputs = {}
    for k, v in inputs.items():
        if k in names:
            real_inputs[k + "_re"], real_inputs[k + "_im"] = v.real.copy(), v.imag.copy()
        else:
            real_inputs[k] = v
    return wrapped, real_inputs


def join_complex(num, names):
    out = dict(num)
    for n in names:
        out[n] = out.pop(n + "_re") + 1j * out.pop(n + "_im")
    return out


def flat_cotangents(*gs):
    flat = []
    for g in gs:
        flat += [g.real, g.imag] if np.iscomplexobj(g) else [g]
    return tuple(flat)


# --------------------------------------------------------------------------- selective
def selective_inputs(rng, batch, dim, nstate, length, layout, complex_a, groups=1,
                     interleaved=(False, True)):
    u = rng.standard_normal((batch, dim, length))
    delta = rng.uniform(-3, 1, (batch, dim, length))
    A = -np.exp(rng.uniform(-2, 1, (dim, nstate)))
    if complex_a:
        A = A + 1j * rng.uniform(-3, 3, (dim, nstate))

    def make(pairs):
        if layout == "constant":
            X = rng.standard_normal((dim, nstate))
            return X + 1j * rng.standard_normal(X.shape) if complex_a else X
        shape = (batch, nstate) if layout == "shared" else (batch, groups, nstate)
        if complex_a and pairs:     # the reference's interleaved real pairs (2L)
            return rng.standard_normal(shape + (2 * length,))
        if complex_a:
            return rng.standard_normal(shape + (length,)) + 1j * rng.standard_normal(
                shape + (length,))
        return rng.standard_normal(shape + (length,))

    return dict(u=u, delta=delta, A=A, B=make(interleaved[0]), C=make(interleaved[1]))


def extras(rng, dim, shape, inputs):
    inputs["delta"] = inputs["delta"] * 10      # both sides of softplus's threshold 20 ...
    kw = dict(D=rng.standard_normal(dim), z=rng.standard_normal(shape) * 3,
              delta_bias=rng.standard_normal(dim) * 5)
    inputs["delta"][:, :, 3::4] = 20.25 - kw["delta_bias"][:, None]   # ... just above
    return kw


LAYOUTS = [("constant", 1), ("shared", 1), ("grouped", 1), ("grouped", 2), ("grouped", 4)]


@pytest.mark.parametrize("layout, groups", LAYOUTS)
@pytest.mark.parametrize("complex_a", [False, True])
@pytest.mark.parametrize("with_extras", [False, True])
def test_selective_scan_vjp_matches_torch_autograd(rng, layout, groups, complex_a,
                                                   with_extras):
    """Every gradient mamba's backward returns, in its input's shape and dtype (complex A,
    interleaved real B, complex C), with the last state's cotangent, both forms."""
    ins = selective_inputs(rng, 2, 4, 3, 23, layout, complex_a, groups)
    kw = extras(rng, 4, ins["u"].shape, ins) if with_extras else {}
    g = rng.standard_normal(ins["u"].shape)
    gl = rng.standard_normal((2, 4, 3)) * (1 + 1j if complex_a else 1)
    ref = autograd(torch_selective_scan, {**ins, **kw}, (g, gl),
                   delta_softplus=with_extras)
    for method, chunk in (("recurrent", 64), ("chunkwise", 1), ("chunkwise", 5),
                          ("chunkwise", 64)):
        mine = selective_scan_vjp(*ins.values(), g, **kw, delta_softplus=with_extras,
                                  grad_last_state=gl, method=method, chunk=chunk)
        close(mine, ref, 1e-12, (method, chunk))


@pytest.mark.parametrize("complex_a", [False, True])
def test_selective_scan_vjp_packed_sequences(rng, complex_a):
    """cu_seqlens restarts (an empty sequence among them): torch autograd, both forms."""
    cu = np.array([0, 7, 8, 8, 30, 41])
    ins = selective_inputs(rng, 1, 4, 3, 41, "grouped", complex_a, 2, (False, False))
    kw = dict(D=rng.standard_normal(4), z=rng.standard_normal(ins["u"].shape))
    g = rng.standard_normal(ins["u"].shape)
    ref = autograd(torch_selective_scan, {**ins, **kw}, (g, None), cu_seqlens=cu)
    for method in ("recurrent", "chunkwise"):
        mine = selective_scan_vjp(*ins.values(), g, **kw, cu_seqlens=cu, method=method,
                                  chunk=3)
        close(mine, ref, 1e-12, method)
    plain = selective_scan_vjp(*ins.values(), g, **kw)
    assert max_rel_error(plain["A"], ref["A"], normwise=True) > 1e-3     # it matters


@pytest.mark.parametrize("layout, groups", [("constant", 1), ("shared", 1), ("grouped", 2)])
@pytest.mark.parametrize("complex_a", [False, True])
def test_selective_scan_vjp_matches_finite_differences(rng, layout, groups, complex_a):
    """Central differences of ⟨g, out⟩ + Re⟨g_last, last state⟩, complex inputs by their
    real and imaginary parts; batch 2, two groups, every option on."""
    ins = selective_inputs(rng, 2, 4, 2, 6, layout, complex_a, groups, (False, False))
    ins["delta"] = rng.uniform(-1, 1, ins["delta"].shape)
    kw = dict(D=rng.standard_normal(4), z=rng.standard_normal(ins["u"].shape),
              delta_bias=rng.uniform(-0.5, 0.5, 4))
    g = rng.standard_normal(ins["u"].shape)
    gl = rng.standard_normal((2, 4, 2)) * (1 + 1j if complex_a else 1)
    cplx = [k for k in ("A", "B", "C") if np.iscomplexobj(ins[k])]
    fn, real_inputs = split_complex(
        lambda **a: selective_scan(**a, delta_softplus=True, return_last_state=True),
        cplx, {**ins, **kw})
    num = join_complex(numerical_vjp(fn, real_inputs, flat_cotangents(g, gl)), cplx)
    for method in ("recurrent", "chunkwise"):
        mine = selective_scan_vjp(*ins.values(), (g, gl), **kw, delta_softplus=True,
                                  method=method, chunk=4)
        close(mine, num, 1e-7, method)


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("layout, groups", [("shared", 1), ("grouped", 4)])
def test_selective_scan_vjp_one_or_two_steps(rng, length, layout, groups):
    """A variable B/C with L = 1 has the shape of no constant one: still per batch row
    and group (torch autograd), both forms."""
    ins = selective_inputs(rng, 2, 4, 3, length, layout, True, groups)
    g, gl = rng.standard_normal((2, 4, length)), rng.standard_normal((2, 4, 3)) * 1j
    ref = autograd(torch_selective_scan, ins, (g, gl))
    for method in ("recurrent", "chunkwise"):
        close(selective_scan_vjp(*ins.values(), g, grad_last_state=gl, method=method), ref,
              1e-12, method)


@pytest.mark.parametrize("length, chunk", [(1, 1), (37, 3), (600, 7), (1100, 64)])
@pytest.mark.parametrize("complex_a", [False, True])
def test_selective_scan_vjp_forms_agree(rng, length, chunk, complex_a):
    """Recurrent (tiles of 512 steps, recomputed from checkpoints) vs chunkwise (odd
    chunks, blocks), with mixed layouts: variable grouped B, constant C."""
    ins = selective_inputs(rng, 2, 6, 3, length, "grouped", complex_a, 3)
    ins["C"] = selective_inputs(rng, 2, 6, 3, length, "constant", complex_a)["C"]
    kw = dict(D=rng.standard_normal(6), z=rng.standard_normal(ins["u"].shape),
              delta_bias=rng.standard_normal(6), delta_softplus=True,
              cu_seqlens=np.array([0, length // 3, length]))
    g = rng.standard_normal(ins["u"].shape)
    gl = rng.standard_normal((2, 6, 3)) * (1 - 1j if complex_a else 1)
    ref = selective_scan_vjp(*ins.values(), g, **kw, grad_last_state=gl)
    out = selective_scan_vjp(*ins.values(), g, **kw, grad_last_state=gl,
                             method="chunkwise", chunk=chunk)
    close(out, ref, 1e-11)


def test_selective_scan_vjp_through_the_entry_point_and_its_validation(rng):
    ins = selective_inputs(rng, 1, 2, 3, 5, "shared", False)
    g = np.ones((1, 2, 5))
    via = ra.vjp(selective_scan, *ins.values(), g, D=np.ones(2))
    assert sorted(via) == ["A", "B", "C", "D", "delta", "u"]
    assert ra.vjp("selective_scan", *ins.values(), g)["B"].shape == (1, 3, 5)
    with pytest.raises(ValueError, match=r"grad_out .*\(1, 2, 5\).*\(1, 5, 2\)"):
        selective_scan_vjp(*ins.values(), np.ones((1, 5, 2)))
    with pytest.raises(ValueError, match=r"grad_last_state .*\(1, 2, 3\)"):
        selective_scan_vjp(*ins.values(), g, grad_last_state=np.ones((1, 2)))
    with pytest.raises(TypeError, match="grad_last_state"):
        selective_scan_vjp(*ins.values(), g, grad_last_state=np.ones((1, 2, 3)) * 1j)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_vjp(ins["u"], ins["delta"], ins["A"], ins["B"][..., :4], ins["C"], g)
    with pytest.raises(ValueError, match="method"):
        selective_scan_vjp(*ins.values(), g, method="parallel")
    zero = selective_scan_vjp(*ins.values(), None)          # a zero cotangent
    assert all(not v.any() for v in zero.values())


@pytest.mark.parametrize("regime", ["near_one", "near_zero"])
def test_selective_scan_vjp_long_sequence_extreme_decays_finite(rng, regime):
    """L = 2^14, decays e^{δA} near 1 (δA ~ -1e-7) or underflowing to 0 (δA ~ -1e4):
    finite gradients, the two forms agree."""
    n, dim = 1 << 14, 2
    ins = selective_inputs(rng, 1, dim, 4, n, "shared", True)
    ins["A"] = (-1e-7 if regime == "near_one" else -1e4) * np.ones((dim, 4)) + 0.5j
    ins["delta"] = rng.uniform(0.5, 1.0, (1, dim, n))
    g = rng.standard_normal((1, dim, n))
    kw = dict(D=np.ones(dim), z=rng.standard_normal((1, dim, n)), delta_bias=np.zeros(dim),
              delta_softplus=True)
    ref = selective_scan_vjp(*ins.values(), g, **kw)
    assert all(np.isfinite(v).all() for v in ref.values())
    # underflowed decays have an exactly zero derivative (e^{δA} = 0 in float64)
    assert (np.abs(ref["A"]).max() > 0) == (regime == "near_one")
    close(selective_scan_vjp(*ins.values(), g, **kw, method="chunkwise", chunk=128), ref,
          1e-11)


# --------------------------------------------------------------------------- S4D
def s4d_params(rng, dim, nstate, kind):
    A = -rng.uniform(0.05, 2.0, (dim, nstate))
    B, C = rng.standard_normal((2, dim, nstate))
    if kind == "complex":       # B stays real: a real argument in the complex convention
        A = A + 1j * rng.uniform(-5, 5, (dim, nstate))
        C = C + 1j * rng.standard_normal((dim, nstate))
    return A, B, C


@pytest.mark.parametrize("kind", ["real", "complex"])
@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_s4d_vjp_matches_torch_autograd(rng, kind, batch):
    A, B, C = s4d_params(rng, 3, 4, kind)
    ins = dict(u=rng.standard_normal(batch + (3, 17)), A=A, B=B, C=C,
               delta=rng.uniform(0.01, 1.0, 3), D=rng.standard_normal(3))
    g = rng.standard_normal(ins["u"].shape)
    gl = rng.standard_normal(batch + (3, 4)) * (1 + 1j if kind == "complex" else 1)
    ref = autograd(torch_s4d, ins, (g, gl))
    for method in ("recurrent", "scan", "fft"):
        mine = s4d_vjp(*list(ins.values())[:5], g, D=ins["D"], grad_last_state=gl,
                       method=method)
        close(mine, ref, 1e-12, method)


@pytest.mark.parametrize("kind", ["real", "complex"])
@pytest.mark.parametrize("method", ["recurrent", "scan", "fft"])
def test_s4d_vjp_matches_finite_differences(rng, kind, method):
    """A number ``delta`` and ``D`` get number gradients; complex A and C by parts."""
    A, B, C = s4d_params(rng, 2, 3, kind)
    ins = dict(u=rng.standard_normal((2, 2, 7)), A=A, B=B, C=C, delta=np.array(0.3),
               D=np.array(0.7))
    g, gl = rng.standard_normal((2, 2, 7)), rng.standard_normal((2, 2, 3))
    cplx = [k for k in ("A", "B", "C") if np.iscomplexobj(ins[k])]
    fn, real_inputs = split_complex(
        lambda **a: s4d(**a, return_last_state=True, method=method), cplx, ins)
    gl = gl * (1 + 1j) if cplx else gl
    num = join_complex(numerical_vjp(fn, real_inputs, flat_cotangents(g, gl)), cplx)
    mine = s4d_vjp(*list(ins.values())[:5], (g, gl), D=ins["D"], method=method)
    assert mine["delta"].shape == () and mine["D"].shape == ()
    close(mine, num, 1e-7)


@pytest.mark.parametrize("kind", ["real", "complex"])
@pytest.mark.parametrize("length", [1, 40, 700])
def test_s4d_vjp_forms_agree(rng, kind, length):
    A, B, C = s4d_params(rng, 3, 5, kind)
    u = rng.standard_normal((2, 3, length))
    delta, D = rng.uniform(1e-3, 2.0, 3), rng.standard_normal(3)
    g = rng.standard_normal(u.shape)
    gl = rng.standard_normal((2, 3, 5)) * (1 + 1j if kind == "complex" else 1)
    ref = s4d_vjp(u, A, B, C, delta, g, D=D, grad_last_state=gl)
    for method in ("scan", "fft"):
        close(s4d_vjp(u, A, B, C, delta, g, D=D, grad_last_state=gl, method=method), ref,
              1e-11, method)
    assert ra.vjp(s4d, u, A, B, C, delta, g, D=D)["A"].shape == (3, 5)


@pytest.mark.parametrize("scale", [1e-9, 1e4])
def test_s4d_vjp_small_and_large_steps(rng, scale):
    """ΔA tiny (∂B̄/∂A = Δ²χ(ΔA)B by its series, no cancellation) and huge (Ā
    underflows): finite, the forms agree, and at Δ = 1e-9 dA and dΔ match the
    closed forms of the limit Ā = 1, B̄ = ΔB (y_t = s Re Σ C B Δ Σ_{s<=t} u_s)."""
    A, B, C = s4d_params(rng, 2, 3, "complex")
    u = rng.standard_normal((2, 300))
    delta = np.array([1.0, 3.0]) * scale
    g = rng.standard_normal(u.shape)
    out = {m: s4d_vjp(u, A, B, C, delta, g, method=m) for m in ("recurrent", "scan", "fft")}
    for method, grads in out.items():
        assert all(np.isfinite(v).all() for v in grads.values()), method
        close(grads, out["recurrent"], 1e-10, method)
    if scale < 1:
        # dΔ → 2 Re Σ_n C B Σ_t g_t U_t, U the cumulative sum of u (the limit, up to a
        # relative O(L·Δ|A|) ~ 1e-5)
        cum = np.cumsum(u, axis=-1)
        expect = 2 * ((C * B).sum(-1) * (g * cum).sum(-1)).real
        assert max_rel_error(out["recurrent"]["delta"], expect) <= 1e-4
        # torch's autograd is exact here except for dA (its expm1(ΔA)/A derivative
        # cancels): u, B, C, delta to 1e-12
        ref = autograd(torch_s4d, dict(u=u, A=A, B=B, C=C, delta=delta), (g, None))
        for k in ("u", "B", "C", "delta"):
            assert max_rel_error(out["recurrent"][k], ref[k], normwise=True) <= 1e-12, k


def test_zoh_chi_series_and_closed_form_agree_with_extended_precision():
    from refattn.ssm.s4d import _zoh_chi
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(0)
    mags = np.concatenate([np.logspace(-12, 2, 80), [0.4999, 0.5, 0.5001]])
    w = -mags * np.exp(1j * rng.uniform(-1.5, 1.5, mags.size))
    got = _zoh_chi(w)
    for wi, gi in zip(w, got):
        x = mpmath.mpc(wi.real, wi.imag)
        ref = complex((x * mpmath.exp(x) - mpmath.expm1(x)) / x**2)
        assert abs(gi - ref) <= 2e-15 * abs(ref), (wi, gi, ref)


def test_s4d_vjp_long_sequence_decay_near_one_finite(rng):
    """L = 2^14, |Ā| = e^{-1e-7} beside a fast mode: finite, the three forms agree."""
    n = 1 << 14
    A = np.array([[-1e-7 + 0.3j, -0.5 + 2j]])
    B, C = np.array([[1 + 0.5j, 0.3 - 1j]]), np.array([[0.7 + 0.1j, -1 + 0.2j]])
    u, g = rng.standard_normal((2, 1, 1, n))
    out = {m: s4d_vjp(u, A, B, C, 1.0, g, method=m) for m in ("recurrent", "scan", "fft")}
    for method, grads in out.items():
        assert all(np.isfinite(v).all() for v in grads.values()), method
        close(grads, out["recurrent"], 1e-10, method)


def test_s4d_vjp_bad_cotangents_are_named(rng):
    A, B, C = s4d_params(rng, 2, 3, "complex")
    u = rng.standard_normal((4, 2, 5))
    with pytest.raises(ValueError, match=r"grad_out .*\(4, 2, 5\).*\(2, 5\)"):
        s4d_vjp(u, A, B, C, 0.1, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"grad_last_state .*\(4, 2, 3\)"):
        s4d_vjp(u, A, B, C, 0.1, np.ones(u.shape), grad_last_state=np.ones((2, 3)))
    with pytest.raises(ValueError, match="delta"):
        s4d_vjp(u, A, B, C, -0.1, np.ones(u.shape))
    real = s4d_params(rng, 2, 3, "real")
    with pytest.raises(TypeError, match="grad_last_state"):
        s4d_vjp(u, *real, 0.1, np.ones(u.shape), grad_last_state=np.ones((4, 2, 3)) * 1j)
    assert math.isclose(float(s4d_vjp(u, A, B, C, 0.1, None)["delta"]), 0.0)
