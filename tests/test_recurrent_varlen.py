"""Packed variable-length batches (flash-linear-attention's ``cu_seqlens``) and initial /
final states of the recurrent mechanisms: linear attention (causal and not), retention,
gated linear attention and the diagonal linear RNN.

* A packed batch of 5 sequences (lengths 1 ... 300) equals the 5 calls of its own
  sequences **bit for bit** (``np.array_equal``), in every form, outputs, final states and
  gradients: each packed sequence is computed by literally the same arithmetic as the
  call of its own (the same code on the same values, cut to a fresh contiguous array).
* Final states equal the streaming form's state after each sequence (``<= 1e-13``
  relative: ``step`` is separate code, whose sums may round differently).
* Initial states chain: a sequence run in two halves, the first half's final state as the
  second half's initial state, equals the sequence run whole; bit for bit in the
  recurrent forms (the same steps on the same state), ``<= 1e-13`` in the others (their
  chunks or matrices then cut the sequence at other places).
* Gradients, the initial state's included, match central finite differences
  (``<= 1e-7``) and the forms' VJPs agree (``<= 1e-11``).
* flash-linear-attention's naive references (where installed) with initial states, run
  per sequence as its ``cu_seqlens`` defines (each sequence from its own initial state).
"""
import re

import numpy as np
import pytest

import refattn as ra
from refattn.linear.linear import (linear_attention_init_state, linear_attention_step,
                                   linear_attention_vjp)
from refattn.recurrent.gla import gated_linear_attention_vjp, gla_init_state, gla_step
from refattn.recurrent.linear_rnn import (linear_rnn_init_state, linear_rnn_step,
                                          linear_rnn_vjp)
from refattn.recurrent.retention import (retention_init_state, retention_step,
                                         retention_vjp)
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

LENS = (1, 300, 17, 64, 5)                      # 5 packed sequences, lengths 1 ... 300
CU = np.concatenate([[0], np.cumsum(LENS)])
HQ, HKV, D, DV = 4, 2, 3, 5                     # GQA: 2 query heads per KV head
GAMMA = np.array([0.9, 0.5, 0.99, 1.0])         # retention: one decay per query head


def _err(a, b):
    """Normwise relative error; pairs (linear attention's ``(S, z)``) part by part."""
    if isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b)
        return max(_err(x, y) for x, y in zip(a, b))
    return max_rel_error(a, b, normwise=True)


def _equal(a, b):
    if isinstance(b, tuple):
        return isinstance(a, tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return a.shape == b.shape and np.array_equal(a, b)


def _row(state, s):
    """Sequence ``s``'s state, kept as a batch of one."""
    if isinstance(state, tuple):
        return tuple(x[s:s + 1] for x in state)
    return state[s:s + 1]


def _tokens(inputs, lo, hi):
    """Every token-aligned input (tokens on axis -2) cut to ``lo:hi`` (views, as a user
    would slice)."""
    return {name: x[..., lo:hi, :] for name, x in inputs.items()}


# --------------------------------------------------------------------------- the cases
class Case:
    """One mechanism: its function and VJP, the name of its chunk argument, its forms,
    a maker of inputs / initial states / cotangents, and its streaming form."""

    def __init__(self, name, fn, vjp, forms, chunk_arg, make, stream, **kw):
        self.name, self.fn, self.vjp, self.forms = name, fn, vjp, forms
        self.chunk_arg, self.make, self.stream, self.kw = chunk_arg, make, stream, kw
        self.causal = kw.get("causal", True)

    def __call__(self, inputs, method, **kw):
        return self.fn(**inputs, method=method, **{self.chunk_arg: 7}, **self.kw, **kw)

    def grads(self, inputs, grad_out, method, **kw):
        """The VJP: the token inputs positionally (``q, k, v`` / ``a, b, x``), the
        others (``log_gates``) by keyword, as ``refattn.vjp`` takes them."""
        args = [x for name, x in inputs.items() if name in "qkvabx"]
        extra = {name: x for name, x in inputs.items() if name not in "qkvabx"}
        return self.vjp(*args, grad_out, method=method, **{self.chunk_arg: 7}, **self.kw,
                        **extra, **kw)

    def __repr__(self):
        return self.name


def _attention(rng, n, states, *, gates=False):
    ins = dict(q=rng.standard_normal((1, HQ, n, D)), k=rng.standard_normal((1, HKV, n, D)),
               v=rng.standard_normal((1, HKV, n, DV)))
    if gates:
        ins["log_gates"] = np.log(rng.uniform(0.6, 1.0, (1, HKV, n, D)))
    return ins, rng.standard_normal((states,) + (HQ if not gates else HKV, D, DV))


def _make_retention(rng, n, states):
    ins, s0 = _attention(rng, n, states)
    return ins, s0, rng.standard_normal((1, HQ, n, DV)), rng.standard_normal(s0.shape)


def _make_gla(rng, n, states):
    ins, s0 = _attention(rng, n, states, gates=True)
    return ins, s0, rng.standard_normal((1, HQ, n, DV)), rng.standard_normal(s0.shape)


def _make_linear(rng, n, states):
    ins, _ = _attention(rng, n, states)
    s0 = (rng.uniform(0, 1, (states, HKV, D, DV)), rng.uniform(0.5, 1, (states, HKV, D)))
    ds = (rng.standard_normal(s0[0].shape), rng.standard_normal(s0[1].shape))
    return ins, s0, rng.standard_normal((1, HQ, n, DV)), ds


def _make_rnn(rng, n, states):
    ins = dict(a=rng.uniform(0.5, 1.0, (1, HKV, n, D)),
               b=rng.standard_normal((1, HKV, n, D)),
               x=rng.standard_normal((1, HKV, n, D)))
    s0 = rng.standard_normal((states, HKV, D))
    return ins, s0, rng.standard_normal((1, HKV, n, D)), rng.standard_normal(s0.shape)


def _stream_retention(ins, s0):
    st = retention_init_state(batch_shape=(1,), heads_q=HQ, heads_kv=HKV, d=D, dv=DV,
                              gamma=GAMMA).replace(s=s0.copy())
    outs = []
    for t in range(ins["q"].shape[-2]):
        o, st = retention_step(st, *(ins[x][:, :, t] for x in "qkv"))
        outs.append(o)
    return outs, st.s


def _stream_gla(ins, s0):
    st = gla_init_state(batch_shape=(1,), heads_q=HQ, heads_kv=HKV, d=D,
                        dv=DV).replace(s=s0.copy())
    outs = []
    for t in range(ins["q"].shape[-2]):
        o, st = gla_step(st, *(ins[x][:, :, t] for x in "qkv"),
                         log_gates_t=ins["log_gates"][:, :, t])
        outs.append(o)
    return outs, st.s


def _stream_linear(ins, s0):
    st = linear_attention_init_state(batch_shape=(1,), heads_q=HQ, heads_kv=HKV, d=D,
                                     dv=DV).replace(s=s0[0].copy(), z=s0[1].copy())
    outs = []
    for t in range(ins["q"].shape[-2]):
        o, st = linear_attention_step(st, *(ins[x][:, :, t] for x in "qkv"))
        outs.append(o)
    return outs, (st.s, st.z)


def _stream_rnn(ins, s0):
    st = linear_rnn_init_state(batch_shape=(1, HKV), dim=D, h0=s0)
    outs = []
    for t in range(ins["a"].shape[-2]):
        o, st = linear_rnn_step(st, *(ins[x][:, :, t] for x in "abx"))
        outs.append(o)
    return outs, st.h


ATTENTION_FORMS = ("parallel", "recurrent", "chunkwise")
CASES = [
    Case("retention", ra.retention, retention_vjp, ATTENTION_FORMS, "chunk_size",
         _make_retention, _stream_retention, gamma=GAMMA),
    Case("gated_linear_attention", ra.gated_linear_attention, gated_linear_attention_vjp,
         ATTENTION_FORMS, "chunk_size", _make_gla, _stream_gla),
    Case("linear_attention", ra.linear_attention, linear_attention_vjp,
         ("quadratic", "recurrent", "chunkwise"), "chunk_size", _make_linear,
         _stream_linear, causal=True),
    Case("linear_attention_noncausal", ra.linear_attention, linear_attention_vjp,
         (None, "quadratic", "recurrent", "chunkwise"), "chunk_size", _make_linear,
         _stream_linear, causal=False),
    Case("linear_rnn", ra.linear_rnn, linear_rnn_vjp, ("recurrent", "scan", "chunkwise"),
         "chunk", _make_rnn, _stream_rnn),
]
CAUSAL = [c for c in CASES if c.causal]
FORM_CASES = [(c, m) for c in CASES for m in c.forms]


# --------------------------------------------------------------------------- packed
@pytest.mark.parametrize("case, method", FORM_CASES, ids=str)
def test_packed_batch_equals_the_calls_of_its_sequences_bit_for_bit(rng, case, method):
    ins, s0, _, _ = case.make(rng, CU[-1], len(LENS))
    for initial in (s0, None):
        out, final = case(ins, method, initial_state=initial, return_final_state=True,
                          cu_seqlens=CU)
        assert out.shape[-2] == CU[-1] and not np.isnan(out).any()
        for s, (lo, hi) in enumerate(zip(CU[:-1], CU[1:])):
            alone, alone_final = case(_tokens(ins, lo, hi), method,
                                      initial_state=None if initial is None
                                      else _row(initial, s), return_final_state=True)
            assert np.array_equal(out[..., lo:hi, :], alone), (s, initial is None)
            assert _equal(_row(final, s), alone_final), (s, initial is None)
    # without states asked for, the output alone and the same values
    assert np.array_equal(case(ins, method, cu_seqlens=CU), case(
        ins, method, cu_seqlens=CU, return_final_state=True)[0])


@pytest.mark.parametrize("case, method", FORM_CASES, ids=str)
def test_packed_gradients_equal_those_of_its_sequences_bit_for_bit(rng, case, method):
    ins, s0, g, gs = case.make(rng, CU[-1], len(LENS))
    grads = case.grads(ins, g, method, initial_state=s0, grad_final_state=gs,
                       cu_seqlens=CU)
    assert sorted(grads) == sorted(list(ins) + ["initial_state"])
    for s, (lo, hi) in enumerate(zip(CU[:-1], CU[1:])):
        alone = case.grads(_tokens(ins, lo, hi), g[..., lo:hi, :], method,
                           initial_state=_row(s0, s), grad_final_state=_row(gs, s))
        for name in ins:
            assert np.array_equal(grads[name][..., lo:hi, :], alone[name]), (s, name)
        assert _equal(_row(grads["initial_state"], s), alone["initial_state"]), s


@pytest.mark.parametrize("case", CASES, ids=str)
def test_final_states_are_the_streaming_state_after_each_sequence(rng, case):
    ins, s0, _, _ = case.make(rng, CU[-1], len(LENS))
    for method in case.forms:
        out, final = case(ins, method, initial_state=s0, return_final_state=True,
                          cu_seqlens=CU)
        for s, (lo, hi) in enumerate(zip(CU[:-1], CU[1:])):
            outs, state = case.stream(_tokens(ins, lo, hi), _row(s0, s))
            assert _err(_row(final, s), state) <= 1e-13, (method, s)
            if case.causal:                  # the streamed outputs too
                assert _err(out[..., lo:hi, :], np.stack(outs, axis=-2)) <= 1e-13


@pytest.mark.parametrize("case", CAUSAL, ids=str)
def test_initial_states_chain(rng, case):
    ins, s0, _, _ = case.make(rng, 50, 1)
    for method in case.forms:
        whole, whole_final = case(ins, method, initial_state=s0, return_final_state=True)
        first, mid = case(_tokens(ins, 0, 23), method, initial_state=s0,
                          return_final_state=True)
        second, end = case(_tokens(ins, 23, 50), method, initial_state=mid,
                           return_final_state=True)
        joined = np.concatenate([first, second], axis=-2)
        if method == "recurrent":           # the same steps on the same state
            assert np.array_equal(joined, whole) and _equal(end, whole_final)
        else:
            assert _err(joined, whole) <= 1e-13 and _err(end, whole_final) <= 1e-13
        assert _err(second, case(_tokens(ins, 23, 50), method)) > 1e-3   # it mattered


def test_empty_sequences_pass_their_state_through(rng):
    ins, s0, _, _ = _make_gla(rng, 4, 3)
    out, final = ra.gated_linear_attention(**ins, initial_state=s0, return_final_state=True,
                                           cu_seqlens=[0, 0, 4, 4])
    assert out.shape == (1, HQ, 4, DV)
    assert np.array_equal(final[0], s0[0]) and np.array_equal(final[2], s0[2])
    g = gated_linear_attention_vjp(ins["q"], ins["k"], ins["v"], None,
                                   log_gates=ins["log_gates"], initial_state=s0,
                                   grad_final_state=np.ones(s0.shape),
                                   cu_seqlens=[0, 0, 4, 4])
    assert np.array_equal(g["initial_state"][[0, 2]], np.ones((2, HKV, D, DV)))


# --------------------------------------------------------------------------- gradients
SMALL_CU = np.array([0, 2, 2, 5, 6])            # an empty sequence among them


def _flat(out):
    """``(out, state)`` flattened to a tuple of arrays for the finite differences."""
    out, state = out
    return (out,) + (state if isinstance(state, tuple) else (state,))


@pytest.mark.parametrize("case, queries", [
    pytest.param(c, n, id=f"{c}-{label}") for c in CASES
    for n, label in ((None, "packed"), (3, "batch"), (7, "N>M"))
    if not (c.name == "linear_rnn" and n == 7)])
def test_gradients_match_finite_differences(rng, case, queries):
    """Every input and the initial state, with a cotangent for the final state too:
    packed (an empty sequence among them), or a batch of 2 rows with 5 keys and fewer or
    more queries (bottom-right aligned; the queries before the first key give 0)."""
    if queries is None:
        ins, s0, g, gs = case.make(rng, SMALL_CU[-1], len(SMALL_CU) - 1)
        kw = dict(cu_seqlens=SMALL_CU)
    else:
        ins, s0, g, gs = case.make(rng, 5, 2)
        ins = {name: np.concatenate([x, x[..., ::-1, :] * 0.5]) for name, x in ins.items()}
        g = np.concatenate([g, -g])
        kw = {}
        if case.name != "linear_rnn":       # N = 3 or 7 queries for M = 5 keys
            q = rng.standard_normal((2, HQ, queries, D))
            ins["q"], g = q, rng.standard_normal((2, HQ, queries, DV))
    pairs = isinstance(s0, tuple)
    inputs = dict(ins, **({"s0": s0[0], "z0": s0[1]} if pairs else {"initial_state": s0}))

    def forward(**arrays):
        state = (arrays.pop("s0"), arrays.pop("z0")) if pairs else arrays.pop(
            "initial_state")
        return _flat(case(arrays, case.forms[0], initial_state=state,
                          return_final_state=True, **kw))

    num = numerical_vjp(forward, inputs, (g,) + (gs if pairs else (gs,)))
    if pairs:
        num["initial_state"] = (num.pop("s0"), num.pop("z0"))
    results = {}
    for method in case.forms:
        got = case.grads(ins, g, method, initial_state=s0, grad_final_state=gs, **kw)
        assert sorted(got) == sorted(num)
        for name in num:
            assert _err(got[name], num[name]) <= 1e-7, (method, name)
        results[method] = got
    for method, got in results.items():        # the forms agree far more closely
        for name in num:
            assert _err(got[name], results[case.forms[0]][name]) <= 1e-11, (method, name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vjp_forms_agree_on_the_packed_batch(rng, case):
    ins, s0, g, gs = case.make(rng, CU[-1], len(LENS))
    got = [case.grads(ins, g, m, initial_state=s0, grad_final_state=gs, cu_seqlens=CU)
           for m in case.forms]
    for other in got[1:]:
        for name in got[0]:
            assert _err(other[name], got[0][name]) <= 1e-11, name
    # the final state's cotangent as the second part of grad_out, as the forward returns
    pair = case.grads(ins, (g, gs), case.forms[0], initial_state=s0, cu_seqlens=CU)
    assert all(_equal(pair[name], got[0][name]) for name in got[0])
    # without an initial state, no gradient for one
    plain = case.grads(ins, g, case.forms[0], cu_seqlens=CU)
    assert sorted(plain) == sorted(ins)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_cu_seqlens_and_states_raise_clear_errors(rng, case):
    ins, s0, _, _ = case.make(rng, 6, 2)
    what = "L" if case.name == "linear_rnn" else "N"
    for cu, problem in (([1, 3, 6], "it starts at 1, not 0"),
                        ([0, 4, 3, 6], "it decreases from 4 to 3 at index 2"),
                        ([0, 3, 5], f"it ends at 5, not at the packed length {what} = 6")):
        with pytest.raises(ValueError, match=f"cu_seqlens must rise from 0 to {what} = 6 "
                                             fr".*{problem}"):
            case(ins, case.forms[0], cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer array"):
        case(ins, case.forms[0], cu_seqlens=np.array([0.0, 6.0]))
    batch2 = {name: np.concatenate([x, x]) for name, x in ins.items()}
    with pytest.raises(ValueError, match="batch of one"):
        case(batch2, case.forms[0], cu_seqlens=[0, 6])
    name = r"initial_state\[0\] \(S\)" if isinstance(s0, tuple) else "initial_state"
    shape = {"retention": (3, HQ, D, DV), "linear_rnn": (3, HKV, D)}.get(case.name,
                                                                        (3, HKV, D, DV))
    with pytest.raises(ValueError, match=fr"{name} must .*\(num_seqs, .*\) = "
                                         + re.escape(str(shape))):
        case(ins, case.forms[0], cu_seqlens=[0, 2, 4, 6], initial_state=s0)   # 2 for 3


def test_packed_attention_needs_as_many_queries_as_keys(rng):
    ins, _, _, _ = _make_retention(rng, 6, 1)
    with pytest.raises(ValueError, match="N must equal M"):
        ra.retention(ins["q"][..., :4, :], ins["k"], ins["v"], gamma=0.9, cu_seqlens=[0, 6])


def test_state_argument_errors(rng):
    ins, s0, g, _ = _make_linear(rng, 6, 1)
    with pytest.raises(TypeError, match=r"initial_state must be the pair \(S, z\)"):
        ra.linear_attention(**ins, causal=True, initial_state=s0[0])
    with pytest.raises(ValueError, match=r"grad_final_state\[1\] \(z\) must have shape "
                                         r"\(\*batch, Hkv, F\) = \(1, 2, 3\)"):
        linear_attention_vjp(*ins.values(), g, causal=True, grad_final_state=(None, s0[0]))
    rins, r0, rg, _ = _make_rnn(rng, 6, 1)
    with pytest.raises(TypeError, match="not both"):
        ra.linear_rnn(**rins, h0=r0[0], initial_state=r0[0])
    with pytest.raises(ValueError, match="grad_out as a tuple"):
        retention_vjp(*_make_retention(rng, 6, 1)[0].values(), (rg, rg),
                      grad_final_state=rg, gamma=0.9)
    with pytest.raises(TypeError, match="return_final_state must be True or False"):
        ra.retention(*_make_retention(rng, 6, 1)[0].values(), gamma=0.9,
                     return_final_state="yes")
    # linear_rnn keeps its older names: h0 gives the gradient "h0"
    got = linear_rnn_vjp(*rins.values(), rg, h0=r0[0], grad_last_state=r0)
    assert sorted(got) == ["a", "b", "h0", "x"]


def test_torch_cu_seqlens_and_states_are_accepted(rng):
    """Tensors as flash-linear-attention's callers hold them: an int32 ``cu_seqlens``
    tensor, the inputs and the initial state as float64 tensors (converted exactly)."""
    torch = pytest.importorskip("torch")
    ins, s0, _, _ = _make_gla(rng, CU[-1], len(LENS))
    want = ra.gated_linear_attention(**ins, initial_state=s0, return_final_state=True,
                                     cu_seqlens=CU)
    got = ra.gated_linear_attention(**{n: torch.from_numpy(x) for n, x in ins.items()},
                                    initial_state=torch.from_numpy(s0),
                                    return_final_state=True,
                                    cu_seqlens=torch.tensor(CU, dtype=torch.int32))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_selective_scan_shares_the_validator():
    u = np.zeros((1, 2, 6))
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to L = 6 .*it "
                                         r"starts at 2, not 0"):
        ra.selective_scan(u, u, -np.ones((2, 1)), np.ones((2, 1)), np.ones((2, 1)),
                          cu_seqlens=[2, 6])


# --------------------------------------------------------------------------- FLA
@pytest.fixture
def fla64(monkeypatch):
    """flash-linear-attention's naive references cast their inputs with ``.float()``;
    for this test ``.float()`` means float64, so they compute in float64. (A state they
    add in place into a float32 buffer is given float32-representable values, so that
    add is exact.) That they did run in float64 is checked by their output's dtype and
    by an agreement float32 arithmetic could not reach."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return torch


def _fla(module):
    return pytest.importorskip(module, reason="flash-linear-attention is not installed")


def _bthd(torch, x):
    """refattn's ``(1, H, T, D)`` as flash-linear-attention's ``(1, T, H, D)``."""
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))


def _fla_per_sequence(call, cu):
    """flash-linear-attention's ``cu_seqlens``: each sequence from its own initial state;
    ``call(s, lo, hi) -> (out (1, T, H, Dv), final)``, joined as refattn returns them."""
    outs, finals = zip(*(call(s, lo, hi) for s, (lo, hi) in enumerate(zip(cu[:-1],
                                                                           cu[1:]))))
    return np.concatenate([np.swapaxes(o.numpy(), 1, 2) for o in outs], axis=2), finals


def _f32(x):
    return x.astype(np.float32).astype(np.float64)


def test_gla_matches_flash_linear_attention_with_states(rng, fla64):
    naive = _fla("fla.ops.gla.naive")
    torch = fla64
    q, k, v = rng.standard_normal((3, 1, 2, CU[-1], 4))
    g = np.log(rng.uniform(0.7, 1.0, q.shape))
    s0 = _f32(rng.standard_normal((len(LENS), 2, 4, 4)))

    def call(s, lo, hi):
        o, h = naive.naive_recurrent_gla(
            *(_bthd(torch, x[:, :, lo:hi]) for x in (q, k, v, g)),
            initial_state=torch.from_numpy(s0[s:s + 1]), output_final_state=True)
        assert o.dtype == torch.float64
        return o, h.numpy()[0]

    theirs, finals = _fla_per_sequence(call, CU)
    for method in ATTENTION_FORMS:
        ours, final = ra.gated_linear_attention(q, k, v, log_gates=g, initial_state=s0,
                                                return_final_state=True, cu_seqlens=CU,
                                                method=method)
        assert _err(ours, theirs) <= 1e-12 and _err(final, np.stack(finals)) <= 1e-12
    wrong = ra.gated_linear_attention(q, k, v, log_gates=g, cu_seqlens=CU)   # no state
    assert _err(wrong, theirs) > 1e-3


def test_retention_matches_flash_linear_attention_simple_gla_with_states(rng, fla64):
    naive = _fla("fla.ops.simple_gla.naive")
    torch = fla64
    gamma = 1 - 2.0 ** (-5.0 - np.arange(3))               # RetNet's per-head decays
    q, k, v = rng.standard_normal((3, 1, 3, CU[-1], 4))
    s0 = rng.standard_normal((len(LENS), 3, 4, 4))
    logs = np.tile(np.log(gamma), (1, CU[-1], 1))          # (B, T, H): one per head

    def call(s, lo, hi):
        o, h = naive.naive_recurrent_simple_gla(
            *(_bthd(torch, x[:, :, lo:hi]) for x in (q, k, v)),
            torch.from_numpy(np.ascontiguousarray(logs[:, lo:hi])),
            initial_state=torch.from_numpy(s0[s:s + 1]), output_final_state=True)
        assert o.dtype == torch.float64
        return o, h.numpy()[0]

    theirs, finals = _fla_per_sequence(call, CU)
    for method in ATTENTION_FORMS:
        ours, final = ra.retention(q, k, v, gamma=gamma, initial_state=s0,
                                   return_final_state=True, cu_seqlens=CU, method=method)
        assert _err(ours, theirs) <= 1e-12 and _err(final, np.stack(finals)) <= 1e-12


def test_linear_rnn_matches_flash_linear_attention_hgrn_with_states(rng, fla64):
    naive = _fla("fla.ops.hgrn.naive")
    torch = fla64
    x = rng.standard_normal((1, CU[-1], 6))                # (B, T, D), as refattn's
    g = np.log(rng.uniform(0.5, 1.0, x.shape))
    h0 = _f32(rng.standard_normal((len(LENS), 6)))

    def call(s, lo, hi):
        o, h = naive.naive_recurrent_hgrn(torch.from_numpy(x[:, lo:hi]),
                                          torch.from_numpy(g[:, lo:hi]),
                                          initial_state=torch.from_numpy(h0[s:s + 1]),
                                          output_final_state=True)
        assert o.dtype == torch.float64
        return o.numpy(), h.numpy()[0]

    outs, finals = zip(*(call(s, lo, hi)
                         for s, (lo, hi) in enumerate(zip(CU[:-1], CU[1:]))))
    for method in ("recurrent", "scan", "chunkwise"):
        ours, final = ra.linear_rnn(np.exp(g), 1.0, x, initial_state=h0, method=method,
                                    return_final_state=True, cu_seqlens=CU)
        assert _err(ours, np.concatenate(outs, axis=1)) <= 1e-12
        assert _err(final, np.stack(finals)) <= 1e-12


def test_linear_attention_matches_flash_linear_attention_normalized(rng):
    """``naive_recurrent_linear_attn(normalize=True)`` with the state ``(kv, z)``: no
    feature map (refattn's ``"identity"``, on positive inputs), a ``1e-10`` added to the
    denominator, and its arithmetic in float32 (``.to(torch.float32)``, which cannot be
    redirected): agreement at float32 accuracy, with a planted difference failing."""
    torch = pytest.importorskip("torch")
    naive = _fla("fla.ops.linear_attn.naive")
    q, k, v = rng.uniform(0.1, 1.0, (3, 1, 2, CU[-1], 4))
    v = v - 0.5
    s0 = _f32(rng.uniform(0, 1, (len(LENS), 2, 4, 4)))     # their state is float32
    z0 = _f32(rng.uniform(0.5, 1, (len(LENS), 2, 4)))

    def call(s, lo, hi):
        o, (kv, z) = naive.naive_recurrent_linear_attn(
            *(_bthd(torch, x[:, :, lo:hi]) for x in (q, k, v)),
            initial_state=(torch.from_numpy(s0[s:s + 1]).float(),
                           torch.from_numpy(z0[s:s + 1, None]).float()),   # (B, 1, H, K)
            output_final_state=True, normalize=True)
        return o.double(), (kv.double().numpy()[0], z.double().numpy()[0, 0])

    theirs, finals = _fla_per_sequence(call, CU)
    ours, (s_f, z_f) = ra.linear_attention(q, k, v, feature_map="identity", causal=True,
                                           initial_state=(s0, z0), return_final_state=True,
                                           cu_seqlens=CU)
    assert _err(ours, theirs) <= 1e-5
    assert _err(s_f, np.stack([f[0] for f in finals])) <= 1e-5
    assert _err(z_f, np.stack([f[1] for f in finals])) <= 1e-5
    planted = ra.linear_attention(q, k, v, feature_map="identity", causal=True,
                                  initial_state=(s0, z0 * 1.01), cu_seqlens=CU)
    assert _err(planted, theirs) > 1e-4
