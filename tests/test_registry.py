"""Properties every registered mechanism must have. A mechanism is covered by these
tests by being registered: no new test code is needed."""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn import registry
from refattn.testing import strategies as rst

SPECS = list(ra.mechanisms().values())
IDS = [s.name for s in SPECS]


def _inputs(spec):
    """Float64 attention inputs that ``spec`` accepts."""
    shapes = rst.shapes()
    if spec.self_attention_only:
        shapes = shapes.map(lambda s: rst.Shapes(s.batch, s.hq, s.hkv, s.n, s.n, s.d, s.dv))
    return rst.attention_inputs(shapes, dtype="float64")


def _call(spec, q, k, v, **kwargs):
    if spec.randomized:
        kwargs.setdefault("rng", 0)
    return spec.fn(q, k, v, **spec.example, **kwargs)


def test_registry_lists_the_exact_oracles():
    names = {s.name for s in SPECS}
    assert {"attention", "tiled_attention"} <= names
    for spec in SPECS:
        assert spec.name == spec.fn.__name__
        assert spec.family and spec.time.startswith("O(") and spec.doc


@pytest.mark.parametrize("spec", [s for s in SPECS if s.position_free], ids=lambda s: s.name)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_permuting_keys_and_values_together_changes_nothing(spec, data, seed):
    q, k, v = data.draw(_inputs(spec))
    perm = np.random.default_rng(seed).permutation(k.shape[-2])
    out = _call(spec, q, k, v)
    permuted = _call(spec, q, k[..., perm, :], v[..., perm, :])
    np.testing.assert_allclose(permuted, out, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.implied_matrix], ids=lambda s: s.name)
@given(data=st.data(), causal=st.booleans())
def test_implied_matrix_is_row_stochastic_and_reproduces_output(spec, data, causal):
    q, k, v = data.draw(_inputs(spec))
    kwargs = {"causal": causal} if spec.supports_causal else {}
    if spec.randomized:
        kwargs["rng"] = 0
    a = spec.implied_matrix(q, k, **spec.example, **kwargs)
    assert a.shape == np.broadcast_shapes(q.shape[:-1], k.shape[:-3] + (1, 1)) + (k.shape[-2],)
    if spec.row_stochastic:
        assert (a >= 0).all()
        sums = a.sum(-1)
        kept = sums > 0        # rows that see no key (bottom-right causal, N > M) are 0
        np.testing.assert_allclose(sums[kept], 1.0, rtol=1e-12)
        if causal and spec.supports_causal:
            assert (~kept).sum() == np.prod(sums.shape[:-1]) * max(0, q.shape[-2] - k.shape[-2])
    group = q.shape[-3] // k.shape[-3]
    np.testing.assert_allclose(a @ np.repeat(v, group, axis=-3), _call(spec, q, k, v, **(
        {"causal": causal} if spec.supports_causal else {})), rtol=1e-11, atol=1e-12)


ADVERSARIAL = {
    "huge logits": lambda r: (r.standard_normal((2, 9, 16)) * 40,
                              r.standard_normal((2, 9, 16)) * 40),
    "near ties": lambda r: (np.ones((2, 9, 16)) * 5,
                            np.ones((2, 9, 16)) * 5 + 1e-13 * r.standard_normal((2, 9, 16))),
    "one dominant key": lambda r: (np.ones((2, 9, 16)), np.concatenate(
        [np.full((2, 1, 16), 30.0), -np.ones((2, 8, 16))], 1)),
    "zeros": lambda r: (np.zeros((2, 9, 16)), np.zeros((2, 9, 16))),
}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_outputs_are_finite_on_adversarial_inputs(spec, case):
    rng = np.random.default_rng(5)
    q, k = ADVERSARIAL[case](rng)
    v = rng.standard_normal((2, 9, 4)) * 1e3
    for causal in ((False, True) if spec.supports_causal else (False,)):
        out = _call(spec, q, k, v, **({"causal": causal} if spec.supports_causal else {}))
        assert out.shape == (2, 9, 4) and np.isfinite(out).all()
        assert np.abs(out).max() <= np.abs(v).max() * (1 + 1e-12) or not spec.row_stochastic


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_same_rng_gives_bit_identical_results(spec):
    q, k, v = np.random.default_rng(9).standard_normal((3, 2, 3, 21, 8))
    first = _call(spec, q, k, v)
    np.testing.assert_array_equal(first, _call(spec, q, k, v))
    if spec.randomized:
        again = spec.fn(q, k, v, **spec.example, rng=np.random.default_rng(123))
        np.testing.assert_array_equal(again, spec.fn(q, k, v, **spec.example,
                                                     rng=np.random.default_rng(123)))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_validation_names_the_argument(spec):
    q = np.zeros((2, 5, 8))
    with pytest.raises(ValueError, match=r"q and k must share the last dimension D; got q "
                                         r"\(2, 5, 8\), k \(2, 5, 7\)"):
        _call(spec, q, np.zeros((2, 5, 7)), q)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        _call(spec, np.zeros((3, 5, 8)), q, q)
    with pytest.raises(ValueError, match="non-finite"):
        _call(spec, np.full((2, 5, 8), np.nan), q, q)
    with pytest.raises(TypeError, match="real numeric dtype"):
        _call(spec, q.astype(complex), q, q)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.randomized], ids=lambda s: s.name)
def test_randomized_mechanisms_need_an_explicit_rng(spec):
    q = np.random.default_rng(1).standard_normal((2, 6, 4))
    with pytest.raises(TypeError, match="rng"):
        spec.fn(q, q, q, **spec.example)


STREAMING = [s for s in SPECS if s.init_state is not None]


@pytest.mark.parametrize("spec", STREAMING, ids=lambda s: s.name)
@given(data=st.data())
def test_stepping_equals_the_causal_parallel_form(spec, data):
    sh = data.draw(rst.shapes(max_batch_dims=1, max_len=12))
    q, k, v = data.draw(rst.attention_inputs(
        st.just(rst.Shapes(sh.batch, sh.hq, sh.hkv, sh.n, sh.n, sh.d, sh.dv)),
        dtype="float64"))
    params = dict(spec.example, **({"rng": 0} if spec.randomized else {}))
    state = spec.init_state(batch_shape=sh.batch, heads_q=sh.hq, heads_kv=sh.hkv, d=sh.d,
                            dv=sh.dv, **params)
    first_size, outs = state.nbytes, []
    for t in range(sh.n):
        out_t, new = spec.step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        assert new.position == state.position + 1
        state = new
        outs.append(out_t)
        if t == 0:
            first_size = state.nbytes
    parallel = spec.fn(q, k, v, causal=True, **params)
    np.testing.assert_allclose(np.stack(outs, axis=-2), parallel, rtol=1e-11, atol=1e-12)
    if spec.constant_state:
        assert state.nbytes == first_size


@pytest.mark.parametrize("spec", [s for s in SPECS if s.budget], ids=lambda s: s.name)
def test_budget_parameters_make_valid_calls(spec):
    """``budget(n, b)`` gives valid keyword arguments, and different ones for a larger b."""
    q, k, v = np.random.default_rng(0).standard_normal((3, 2, 48, 8))
    kw = {"rng": 0} if spec.randomized else {}
    outs = [spec.fn(q, k, v, **spec.budget(48, b), **kw) for b in (8, 16)]
    for out in outs:
        assert out.shape == (2, 48, 8) and np.isfinite(out).all()
    small, large = spec.budget(48, 8), spec.budget(48, 16)
    assert any(not np.array_equal(small[key], large[key]) for key in small), \
        "the budget changes nothing"


# ------------------------------------------------------------ attaching forms
def _forms(specs):
    return {name: [spec.family, spec.init_state is not None, spec.implied_matrix is not None,
                   spec.constant_state] for name, spec in specs.items()}


def test_the_registry_is_complete_after_import_alone():
    """Streaming forms defined in other modules (KV caches, ring buffers) are attached by
    importing refattn, with no import done for its side effect: a fresh interpreter sees
    the registry this one does."""
    code = (inspect.getsource(_forms)
            + "import json, refattn\nprint(json.dumps(_forms(refattn.mechanisms())))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    fresh = json.loads(done.stdout or "null")
    assert fresh == _forms(ra.mechanisms()), done.stderr
    for name in ("attention", "sink_attention", "sliding_window_attention",
                 "gated_linear_attention", "chunked_attention"):
        assert fresh[name][1], f"{name} lost its streaming form"
    assert fresh["sink_attention"][3]
    assert all(implied for family, _, implied, _ in fresh.values() if family != "memory")


def test_attach_takes_functions_once_and_only_for_registered_mechanisms(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in
                                                registry._REGISTRY.items()})

    @registry.register(family="test", exact=True, time="O(N·M·D)", state="O(M·D)")
    def doubled_attention(q, k, v, *, scale=None):
        return 2 * ra.attention(q, k, v, scale=scale)

    def doubled_matrix(q, k, *, scale=None):
        return 2 * ra.attention_probs(q, k, scale=scale)

    with pytest.raises(TypeError, match="implied must be a function"):
        registry.attach(doubled_attention, implied="doubled_matrix")
    with pytest.raises(ValueError, match="both init_state and step"):
        registry.attach(doubled_attention, init_state=lambda **kw: None)
    with pytest.raises(ValueError, match="not a registered mechanism"):
        registry.attach(lambda q, k, v: q, implied=doubled_matrix)
    registry.attach("doubled_attention", implied=doubled_matrix)
    assert registry.mechanisms()["doubled_attention"].implied_matrix is doubled_matrix
    with pytest.raises(ValueError, match="implied is already attached"):
        registry.attach(doubled_attention, implied=doubled_matrix)
    with pytest.raises(TypeError, match="unknown fields"):
        registry.register(family="test", exact=True, time="O(1)", state="O(1)",
                          supports_everything=True)(lambda q, k, v: q)
