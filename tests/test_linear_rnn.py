"""Linear RNN h_t = a_t h_{t-1} + b_t x_t: recurrent, scan and chunked forms agree, stepping
equals them, gates near 0 and 1 and a million steps stay exact, bad input is named."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refattn.linear_rnn import (METHODS, associative_scan, linear_rnn,
                                linear_rnn_init_state, linear_rnn_step)
from refattn.testing import max_rel_error


def _loop(a, b, x, h0):
    """The definition, one channel and one step at a time (a, b, x: (L, D))."""
    h = np.array(h0, dtype=float)
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for d in range(x.shape[1]):
            h[d] = a[t, d] * h[d] + b[t, d] * x[t, d]
        out[t] = h
    return out


@given(st.integers(0, 70), st.integers(1, 4), st.sampled_from([(), (1,), (2,), (2, 3)]),
       st.integers(1, 11), st.floats(1e-6, 1.0), st.integers(0, 2**32 - 1))
def test_three_forms_agree(length, dim, batch, chunk, low, seed):
    rng = np.random.default_rng(seed)
    shape = batch + (length, dim)
    a = rng.uniform(low, 1.0, shape)
    b, x = rng.standard_normal((2,) + shape)
    h0 = rng.standard_normal(batch + (dim,))
    ref, last = linear_rnn(a, b, x, h0=h0, return_last_state=True)
    assert ref.shape == shape and ref.dtype == np.float64
    assert not np.isnan(ref).any()
    for method in ("scan", "chunked"):
        out, out_last = linear_rnn(a, b, x, h0=h0, method=method, chunk=chunk,
                                   return_last_state=True)
        assert not np.isnan(out).any()
        assert max_rel_error(out, ref, normwise=True) <= 1e-10, method
        assert max_rel_error(out_last, last, normwise=True) <= 1e-10, method
    np.testing.assert_array_equal(last, ref[..., -1, :] if length else h0)


def test_definition_by_loops_and_broadcasting(rng):
    a = rng.uniform(0.2, 1.0, (9, 1))                 # one gate shared by 3 channels
    x = rng.standard_normal((2, 9, 3))
    h0 = rng.standard_normal(3)
    for method in METHODS:
        out = linear_rnn(a, 0.5, x, h0=h0, method=method, chunk=4)
        for i in range(2):
            ref = _loop(np.broadcast_to(a, (9, 3)), np.full((9, 3), 0.5), x[i], h0)
            np.testing.assert_allclose(out[i], ref, rtol=1e-13, atol=1e-15)


def test_float32_input_gives_float64(rng):
    a = rng.uniform(0.5, 1, (6, 2)).astype(np.float32)
    x = rng.standard_normal((6, 2)).astype(np.float16)
    for method in METHODS:
        out = linear_rnn(a, 1, x, method=method)
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, _loop(a.astype(float), np.ones((6, 2)),
                                              x.astype(float), np.zeros(2)), rtol=1e-13)


def test_stepping_equals_the_parallel_forms_with_constant_state(rng):
    a = rng.uniform(0.3, 1, (2, 25, 4))
    b, x = rng.standard_normal((2, 2, 25, 4))
    h0 = rng.standard_normal((2, 4))
    state = linear_rnn_init_state(batch_shape=(2,), dim=4, h0=h0)
    size, outs = state.nbytes, []
    assert size == 2 * 4 * 8
    for t in range(25):
        old = state
        h, state = linear_rnn_step(state, a[:, t], b[:, t], x[:, t])
        assert state.nbytes == size and state.position == t + 1
        assert old.position == t                   # the old state is left unchanged
        outs.append(h)
    for method in METHODS:
        np.testing.assert_allclose(np.stack(outs, 1), linear_rnn(a, b, x, h0=h0,
                                                                 method=method, chunk=7),
                                   rtol=1e-12, atol=1e-14)


def test_associative_scan_is_the_recurrence_for_any_coefficients(rng):
    """The scan itself is generic: complex and growing coefficients too."""
    a = rng.standard_normal((3, 37)) * 1.1 + 1j * rng.standard_normal((3, 37))
    c = rng.standard_normal((3, 37)) + 0.5j
    p, h = associative_scan(a, c, axis=1)
    hh, pp = np.zeros(3, complex), np.ones(3, complex)
    for t in range(37):
        hh, pp = a[:, t] * hh + c[:, t], pp * a[:, t]
        np.testing.assert_allclose(h[:, t], hh, rtol=1e-12)
        np.testing.assert_allclose(p[:, t], pp, rtol=1e-12)


@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
def test_gates_near_one_and_near_zero_stay_finite_and_exact(rng, gates):
    shape = (3000, 3)
    if gates == "near_one":
        a = 1 - rng.uniform(0, 1e-12, shape)
    elif gates == "near_zero":
        a = rng.uniform(1e-300, 1e-200, shape)
    else:   # long stretches of gates ~1 after gates ~1e-300: the segment sums matter
        a = np.where(rng.random(shape) < 0.05, 1e-300, 1 - 1e-13)
    x = rng.standard_normal(shape)
    ref = linear_rnn(a, 1.0, x)
    assert np.isfinite(ref).all()
    for method, chunk in (("scan", 1), ("chunked", 64), ("chunked", 1000)):
        out = linear_rnn(a, 1.0, x, method=method, chunk=chunk)
        assert np.isfinite(out).all()
        assert max_rel_error(out, ref, normwise=True) <= 1e-10, (method, chunk)
    if gates == "near_zero":   # h_t = x_t + a_t x_{t-1} + ...: x_t to 1e-200 relative
        np.testing.assert_allclose(ref, x, rtol=1e-150)


def test_constant_gate_matches_the_closed_form(rng):
    """x = 1, h0 = 0, constant a: h_t = (1 - a^(t+1)) / (1 - a), evaluated with expm1."""
    a, n = 1 - 1e-4, 50_000
    t = np.arange(n)
    closed = np.expm1((t + 1) * np.log(a)) / np.expm1(np.log(a))
    for method in METHODS:
        out = linear_rnn(np.full((n, 1), a), 1.0, np.ones((n, 1)), method=method)[:, 0]
        assert max_rel_error(out, closed, normwise=True) <= 1e-10, method


@pytest.mark.slow
def test_a_million_steps_all_forms_agree(rng):
    """1M steps, gates 1 - U(0, 1e-6) (products down to e^-0.5) with 1% gates near 0:
    scan and chunked equal the float64 recurrence and the constant-gate closed form."""
    n = 1 << 20
    a = 1 - rng.uniform(0, 1e-6, (n, 2))
    a[rng.random((n, 2)) < 0.01] = 1e-250
    x = rng.standard_normal((n, 2))
    ref = linear_rnn(a, 1.0, x)
    for method in ("scan", "chunked"):
        out = linear_rnn(a, 1.0, x, method=method, chunk=128)
        assert np.isfinite(out).all()
        assert max_rel_error(out, ref, normwise=True) <= 1e-10, method
    g = 1 - 1e-7
    closed = np.expm1(np.arange(1, n + 1) * np.log(g)) / np.expm1(np.log(g))
    for method in METHODS:
        out = linear_rnn(np.full((n, 1), g), 1.0, np.ones((n, 1)), method=method)[:, 0]
        assert max_rel_error(out, closed, normwise=True) <= 1e-10, method


@pytest.mark.parametrize("gate", [0.0, 1.5, -0.2])
def test_gates_outside_zero_one_are_refused(gate):
    a = np.full((4, 2), 0.5)
    a[2, 1] = gate
    with pytest.raises(ValueError, match=r"a \(the gate, shape \(4, 2\)\) must lie in "
                                         r"\(0, 1\].*index \(2, 1\)"):
        linear_rnn(a, 1.0, np.ones((4, 2)))
    state = linear_rnn_init_state(dim=2)
    with pytest.raises(ValueError, match=r"a_t .* must lie in \(0, 1\]"):
        linear_rnn_step(state, a[2], 1.0, np.ones(2))


def test_bad_shapes_dtypes_and_options():
    a, x = np.full((4, 2), 0.5), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"broadcast.*a \(4, 2\), b \(3,\), x \(4, 2\)"):
        linear_rnn(a, np.ones(3), x)
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*a \(4,\)"):
        linear_rnn(np.full(4, 0.5), 1.0, np.ones(4))
    with pytest.raises(ValueError, match=r"h0 must broadcast to .*\(2,\).*got h0 \(3,\)"):
        linear_rnn(a, 1.0, x, h0=np.zeros(3))
    with pytest.raises(TypeError, match="x must have a real numeric dtype"):
        linear_rnn(a, 1.0, x + 1j)
    with pytest.raises(ValueError, match="x .* non-finite"):
        linear_rnn(a, 1.0, np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="method must be one of"):
        linear_rnn(a, 1.0, x, method="parallel")
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        linear_rnn(a, 1.0, x, method="chunked", chunk=0)
    with pytest.raises(TypeError, match="chunk must be an integer"):
        linear_rnn(a, 1.0, x, method="chunked", chunk=2.5)
    state = linear_rnn_init_state(batch_shape=(3,), dim=2)
    with pytest.raises(ValueError, match=r"x_t must broadcast to the state's shape "
                                         r"\(3, 2\).*got \(2, 2\)"):
        linear_rnn_step(state, 0.5, 1.0, np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"h0 must broadcast to .*\(3, 2\)"):
        linear_rnn_init_state(batch_shape=(3,), dim=2, h0=np.ones(3))


def test_memory_budget_is_checked_before_allocating():
    from refattn import MemoryBudgetError
    a, x = np.full((3000, 2), 0.5), np.ones((3000, 2))
    with pytest.raises(MemoryBudgetError, match="chunk = 3000.*method='recurrent'"):
        linear_rnn(a, 1.0, x, method="chunked", chunk=10**6, memory_budget=2**20)
    with pytest.raises(MemoryBudgetError, match="associative scan"):
        linear_rnn(a, 1.0, x, method="scan", memory_budget=2**10)


def test_empty_sequence_returns_the_initial_state():
    out, last = linear_rnn(np.ones((0, 2)), 1.0, np.ones((0, 2)), h0=np.array([1.0, 2.0]),
                           method="chunked", return_last_state=True)
    assert out.shape == (0, 2)
    np.testing.assert_array_equal(last, [1.0, 2.0])


def test_associative_scan_refuses_operands_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"a \(4,\) and c \(5,\)"):
        associative_scan(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match=r"a \(\) and c \(\).*at least one dimension"):
        associative_scan(0.5, 1.0)
    with pytest.raises(TypeError, match="c must be a numeric array"):
        associative_scan(np.ones(3), np.array(["x", "y", "z"]))
    with pytest.raises(ValueError, match=r"axis must be an integer in \[-1, 1\)"):
        associative_scan(np.ones(3), np.ones(3), axis=1)
    with pytest.raises(TypeError, match="axis must be an integer"):
        associative_scan(np.ones(3), np.ones(3), axis=0.0)


def test_associative_scan_broadcasts_a_shared_gate(rng):
    a = rng.uniform(0.5, 1.0, (9, 1))                 # one gate for every channel
    c = rng.standard_normal((9, 3))
    p, h = associative_scan(a, c, axis=0)
    p_full, h_full = associative_scan(np.repeat(a, 3, axis=1), c, axis=0)
    assert h.shape == p.shape == (9, 3)
    np.testing.assert_array_equal(h, h_full)
    np.testing.assert_array_equal(p, p_full)
    state = np.zeros(3)
    for t in range(9):
        state = a[t] * state + c[t]
    np.testing.assert_allclose(h[-1], state, rtol=1e-13)
