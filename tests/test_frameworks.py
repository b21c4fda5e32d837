"""JAX and CuPy arrays straight into refattn (read exactly, results float64 NumPy); each
test skips cleanly where its framework is absent. PyTorch: tests/test_torch_user.py."""
import numpy as np
import pytest

import refattn
from refattn.testing import assert_close


@pytest.fixture
def jnp():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return pytest.importorskip("jax.numpy")


def _jax_attention(jnp, q, k, v, causal):
    """An independent float64 reference written in JAX (heads-first, bottom-right; rows
    with no visible key give 0, as refattn defines them)."""
    import jax
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1])
    n, m = s.shape[-2:]
    if causal:
        keep = jnp.arange(m)[None, :] <= jnp.arange(n)[:, None] + (m - n)
        s = jnp.where(keep, s, -jnp.inf)
    top = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
    total = p.sum(-1, keepdims=True)
    return (p / jnp.where(total > 0, total, 1.0)) @ v


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16",
                                   "float8_e4m3fn"])
def test_jax_arrays_are_read_exactly(jnp, dtype):
    import jax
    q, k, v = (x.astype(dtype) for x in jax.random.normal(jax.random.PRNGKey(0),
                                                          (3, 2, 4, 16, 8)))
    out = refattn.attention(q, k, v, causal=True)
    host = [np.asarray(x).astype(np.float64) for x in (q, k, v)]
    np.testing.assert_array_equal(out, refattn.attention(*host, causal=True))


def test_jax_gradients_match_jax_autodiff(jnp):
    import jax
    q, k, v, do = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 3, 12, 8),
                                    dtype=jnp.float64)
    k, v = k[:, :, :9], v[:, :, :9]                      # N = 12 > M = 9
    do = do[..., :8]
    out, pullback = jax.vjp(lambda a, b, c: _jax_attention(jnp, a, b, c, True), q, k, v)
    assert_close(refattn.attention(q, k, v, causal=True), out, rtol=1e-13, atol=1e-13)
    mine = refattn.vjp("attention", q, k, v, do, causal=True)
    dq, dk, dv = pullback(do)        # N > M: bottom-right leaves rows 0-2 empty
    assert np.all(mine["q"][..., :3, :] == 0)
    assert_close(mine["q"], dq, rtol=1e-12, atol=1e-12, name="dq")
    assert_close(mine["k"], dk, rtol=1e-12, atol=1e-12, name="dk")
    assert_close(mine["v"], dv, rtol=1e-12, atol=1e-12, name="dv")


def test_jax_layout_bnhd(jnp):
    import jax
    q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 10, 4, 8))  # (B, N, H, D)
    out = refattn.attention(q, k, v, layout="bnhd", causal="top_left")
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    ref = jnp.swapaxes(_jax_attention(jnp, *heads_first, causal=True), 1, 2)
    assert out.shape == (2, 10, 4, 8)
    assert_close(out, np.asarray(ref, dtype=np.float64), rtol=1e-6, atol=1e-6)


def test_cupy_arrays_are_copied_from_the_device():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:          # CuPy installed, no device or driver
        pytest.skip(f"CuPy has no device: {exc}")
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 2, 16, 8))
    out = refattn.attention(*(cupy.asarray(x) for x in (q, k, v)), causal=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, refattn.attention(q, k, v, causal=True))
