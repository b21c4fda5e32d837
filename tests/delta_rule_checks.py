"""Checks shared by the tests of the delta-rule family and SSD (tests/test_deltanet.py,
test_gated_deltanet.py, test_kda.py, test_rwkv7.py, test_ssd.py). Each test file
describes its mechanism with a :class:`Mech` and calls these; nothing here is collected.

Every check compares independent computations: the recurrent (Numba), chunkwise and
parallel forms; the implied matrix; the streaming steps; packed sequences against their
own calls; the hand-written VJP against central finite differences and against PyTorch
float64 autograd through a transcription of the mechanism's own equation (written in
each test file, not through refattn's DPLR engine).
"""
import dataclasses

import numpy as np

import refattn as ra
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

FORMS = ("recurrent", "chunkwise", "parallel")


def err(a, b):
    return max_rel_error(a, b, normwise=True)


@dataclasses.dataclass
class Mech:
    """``name``: registered name; ``make(rng, shape, d, regime)``: its per-token inputs
    for keys of ``shape = (*batch, Hkv, M)`` and head dimension ``d`` (``regime``:
    ``"normal"``, ``"near0"``: gates near 0, ``"near1"``: gates near 1);
    ``torch_update(torch, S, k_t, v_t, ins_t)``: the state update transcribed in torch;
    ``extra``: fixed keyword arguments (``normalize_qk``)."""

    name: str
    make: object
    torch_update: object
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def spec(self):
        return ra.mechanisms()[self.name]

    def __call__(self, q, k, v, ins, **kw):
        return self.spec.fn(q, k, v, **ins, **self.extra, **kw)

    def grads(self, q, k, v, do, ins, **kw):
        return ra.vjp(self.name, q, k, v, do, **ins, **self.extra, **kw)


def qkv(rng, *, batch=(2,), hq=4, hkv=2, n=9, m=9, d=3, dv=2):
    q = rng.standard_normal(batch + (hq, n, d))
    k = rng.standard_normal(batch + (hkv, m, d))
    v = rng.standard_normal(batch + (hkv, m, dv))
    return q, k, v


def forms_agree(mech, rng, *, n, m, chunk, regime="normal", batch=(2,), hq=4, hkv=2, d=3,
                dv=2, tol=1e-11):
    """Outputs and final states of the three forms (from a random initial state), and
    the implied matrix, agree to ``tol``; returns the recurrent output."""
    q, k, v = qkv(rng, batch=batch, hq=hq, hkv=hkv, n=n, m=m, d=d, dv=dv)
    ins = mech.make(rng, batch + (hkv, m), d, regime)
    s0 = rng.standard_normal(batch + (hkv, d, dv))
    ref, ref_final = mech(q, k, v, ins, method="recurrent", initial_state=s0,
                          return_final_state=True)
    for method in FORMS[1:]:
        out, final = mech(q, k, v, ins, method=method, chunk_size=chunk, initial_state=s0,
                          return_final_state=True)
        assert err(out, ref) <= tol, (method, err(out, ref))
        assert err(final, ref_final) <= tol, (method, err(final, ref_final))
    plain = mech(q, k, v, ins, method="recurrent")
    a = mech.spec.implied_matrix(q, k, **ins, **mech.extra)
    assert err(a @ np.repeat(v, hq // hkv, axis=-3), plain) <= tol
    if regime != "near0":            # the initial state mattered (near 0: forgotten)
        assert err(plain, ref) > 1e-6
    return ref


def streaming_equals_forward(mech, rng, step_names, *, n=11):
    """Stepping with per-token inputs equals the forward; the state stays fixed-size."""
    q, k, v = qkv(rng, batch=(2,), n=n, m=n)
    ins = mech.make(rng, (2, 2, n), 3, "normal")
    spec = mech.spec
    state = spec.init_state(batch_shape=(2,), heads_q=4, heads_kv=2, d=3, dv=2,
                            **mech.extra)
    size, outs = state.nbytes, []
    for t in range(n):
        tok = {step_names[name]: x[:, :, t] for name, x in ins.items()}
        o, state = spec.step(state, q[:, :, t], k[:, :, t], v[:, :, t], **tok)
        outs.append(o)
    assert state.nbytes == size == 2 * 2 * 3 * 2 * 8
    ref, final = mech(q, k, v, ins, return_final_state=True)
    assert err(np.stack(outs, axis=-2), ref) <= 1e-13
    assert err(state.s, final) <= 1e-13


def packed_equals_sequences(mech, rng, method):
    """``cu_seqlens`` (an empty sequence among them) equals the per-sequence calls bit
    for bit, outputs, final states and gradients."""
    cu = np.array([0, 3, 3, 40, 41, 70])
    t, ns = cu[-1], len(cu) - 1
    q, k, v = qkv(rng, batch=(1,), n=t, m=t)
    ins = mech.make(rng, (1, 2, t), 3, "normal")
    s0, ds = rng.standard_normal((2, ns, 2, 3, 2))
    do = rng.standard_normal((1, 4, t, 2))
    out, final = mech(q, k, v, ins, method=method, chunk_size=16, initial_state=s0,
                      return_final_state=True, cu_seqlens=cu)
    grads = mech.grads(q, k, v, do, ins, method=method, initial_state=s0,
                       grad_final_state=ds, cu_seqlens=cu)
    for s, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        cut = {name: x[:, :, lo:hi] for name, x in ins.items()}
        o, f = mech(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], cut, method=method,
                    chunk_size=16, initial_state=s0[s:s + 1], return_final_state=True)
        assert np.array_equal(out[:, :, lo:hi], o) and np.array_equal(final[s:s + 1], f)
        g = mech.grads(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], do[:, :, lo:hi],
                       cut, method=method, initial_state=s0[s:s + 1],
                       grad_final_state=ds[s:s + 1])
        for name in ("q", "k", "v", *ins):
            assert np.array_equal(grads[name][:, :, lo:hi], g[name]), (s, name)
        assert np.array_equal(grads["initial_state"][s:s + 1], g["initial_state"])
    if hi == lo:
        assert np.array_equal(final[-1], s0[-1])


def states_chain(mech, rng):
    """A sequence run in two halves, the first's final state the second's initial
    state, equals the sequence run whole."""
    q, k, v = qkv(rng, n=30, m=30)
    ins = mech.make(rng, (2, 2, 30), 3, "normal")
    for method in FORMS:
        whole = mech(q, k, v, ins, method=method, chunk_size=8)
        cut = [{name: x[:, :, lo:hi] for name, x in ins.items()} for lo, hi in
               ((0, 13), (13, 30))]
        first, mid = mech(q[:, :, :13], k[:, :, :13], v[:, :, :13], cut[0], method=method,
                          chunk_size=8, return_final_state=True)
        second = mech(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], cut[1], method=method,
                      chunk_size=8, initial_state=mid)
        assert err(np.concatenate([first, second], axis=-2), whole) <= 1e-13, method


def vjp_matches_finite_differences(mech, rng, *, n, m):
    """Every input, the initial state included, with a cotangent for the final state;
    GQA with a broadcast batch dimension of ``k``."""
    q, k, v = qkv(rng, n=n, m=m, d=3, dv=2)
    k = k[:1]
    ins = mech.make(rng, (2, 2, m), 3, "normal")
    s0, dsf = rng.standard_normal((2, 2, 2, 3, 2))
    do = rng.standard_normal((2, 4, n, 2))

    def forward(q, k, v, initial_state, **x):
        return mech(q, k, v, x, method="recurrent", initial_state=initial_state,
                    return_final_state=True)

    num = numerical_vjp(forward, dict(q=q, k=k, v=v, initial_state=s0, **ins), (do, dsf))
    for method in FORMS:
        got = mech.grads(q, k, v, do, ins, method=method, initial_state=s0,
                         grad_final_state=dsf)
        assert sorted(got) == sorted(num)
        for name in num:
            assert got[name].shape == num[name].shape, name
            assert err(got[name], num[name]) <= 1e-7, (method, name, err(got[name],
                                                                          num[name]))


def torch_forward(torch, mech, q, k, v, ins, s0, scale, normalize):
    """The mechanism by its own equation in torch float64, one token at a time: GQA by
    repeating the state's read-out; returns ``(out, final)``."""
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
    hq, n, hkv, m = q.shape[-3], q.shape[-2], k.shape[-3], k.shape[-2]
    group = hq // hkv
    s, outs = s0, [None] * n
    for j in range(m):
        s = mech.torch_update(torch, s, k[..., j, :], v[..., j, :],
                              {name: x[..., j] if x.dim() == k.dim() - 1 else x[..., j, :]
                               for name, x in ins.items()})
        i = j - (m - n)
        if i >= 0:
            sg = s.repeat_interleave(group, dim=-3)
            outs[i] = scale * torch.einsum("...hd,...hde->...he", q[..., i, :], sg)
    zero = torch.zeros(q.shape[:-2] + (v.shape[-1],), dtype=torch.float64)
    return torch.stack([zero if o is None else o for o in outs], dim=-2), s


def vjp_matches_torch_autograd(torch, mech, rng, *, n, m, scale=0.7):
    """``<= 1e-12`` against float64 autograd through :func:`torch_forward`."""
    q, k, v = qkv(rng, n=n, m=m, d=4, dv=3)
    ins = mech.make(rng, (2, 2, m), 4, "normal")
    s0, dsf = rng.standard_normal((2, 2, 2, 4, 3))
    do = rng.standard_normal((2, 4, n, 3))
    arrays = dict(q=q, k=k, v=v, initial_state=s0, **ins)
    ts = {name: torch.tensor(x, requires_grad=True) for name, x in arrays.items()}
    out, final = torch_forward(torch, mech, ts["q"], ts["k"], ts["v"],
                               {name: ts[name] for name in ins}, ts["initial_state"], scale,
                               mech.extra.get("normalize_qk", False))
    ours_out = mech(q, k, v, ins, initial_state=s0, scale=scale)
    assert err(ours_out, out.detach().numpy()) <= 1e-12
    theirs = torch.autograd.grad((out * torch.from_numpy(do)).sum()
                                 + (final * torch.from_numpy(dsf)).sum(), list(ts.values()))
    ours = mech.grads(q, k, v, do, ins, initial_state=s0, grad_final_state=dsf, scale=scale)
    for name, t in zip(ts, theirs):
        assert err(ours[name], t.numpy()) <= 1e-12, (name, err(ours[name], t.numpy()))


def long_recurrent(mech, rng, n=2 ** 20):
    """A million tokens with gates near 1: the recurrent form (O(D·Dv) state) equals the
    chunkwise one, and the first token still reaches the last output."""
    q, k, v = qkv(rng, batch=(), hq=1, hkv=1, n=n, m=n, d=4, dv=2)
    ins = mech.make(rng, (1, n), 4, "near1")
    out, final = mech(q, k, v, ins, method="recurrent", return_final_state=True)
    assert out.shape == (1, n, 2) and final.shape == (1, 4, 2) and np.isfinite(out).all()
    chunked, chunked_final = mech(q, k, v, ins, method="chunkwise", chunk_size=64,
                                  return_final_state=True)
    assert err(out, chunked) <= 1e-11 and err(final, chunked_final) <= 1e-11
    return out
