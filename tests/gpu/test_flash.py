"""flash_attention on a device against the float64 references (skipped without one).

The selfcheck's cases (both variants, every dtype, masks, GQA ...) run here too, with
fresh seeds per test, NaN-poisoned outputs and NaN after K/V in memory."""
import ml_dtypes
import numpy as np
import pytest

import refattn as ra
import refattn.gpu as gpu
from refattn.gpu import selfcheck

status = gpu.device_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not status.startswith("ok"), reason=status)]


@pytest.mark.parametrize("case", selfcheck.cases(quick=True), ids=lambda c: c.label)
def test_selfcheck_case(case):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    entry = selfcheck.run_case(case, np.random.default_rng(seed))
    assert entry["passed"], (seed, entry)


@pytest.mark.parametrize("variant", ["simple", "fast"])
def test_numpy_in_numpy_out(variant):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 50, 64)).astype(ml_dtypes.bfloat16) for _ in range(3))
    out, lse = gpu.flash_attention(q, k, v, causal=True, return_lse=True, variant=variant)
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (2, 3, 50, 64)
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32
    ra.testing.assert_close(out, ra.attention(q, k, v, causal=True), dtype="bfloat16")


def test_cupy_stays_on_device_and_broadcasts_batch():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 4, 40, 128)).astype(np.float16)
    k = rng.standard_normal((1, 2, 70, 128)).astype(np.float16)
    v = rng.standard_normal((1, 2, 70, 128)).astype(np.float16)
    out = gpu.flash_attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v))
    assert isinstance(out, cupy.ndarray) and out.shape == (3, 4, 40, 128)
    ra.testing.assert_close(out.get(), ra.attention(q, k, v), dtype="float16")


def test_torch_dlpack_bfloat16():
    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    out = gpu.flash_attention(q, k, v, causal=True)
    got = torch.from_dlpack(out.view(cupy.int16)).view(torch.bfloat16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (got.float() - ref.float()).abs().max().item() < 0.05
    ra.testing.assert_close(got.cpu().float().numpy(),
                            ra.attention(q.float().cpu().numpy(), k.float().cpu().numpy(),
                                         v.float().cpu().numpy(), causal=True),
                            dtype="bfloat16")


def test_block_mask_skips_tiles_and_matches():
    rng = np.random.default_rng(3)
    n = 1000
    q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(np.float16) for _ in range(3))
    mask = ra.masks.sliding_window(64, 64) | ra.masks.global_tokens([0, 1, 2, 3])
    out = gpu.flash_attention(q, k, v, block_mask=mask)
    ra.testing.assert_close(out, ra.attention(q, k, v, mask=mask), dtype="float16")


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 90, 64)).astype(np.float16)
    k = rng.standard_normal((1, 2, 30, 64)).astype(np.float16)
    for variant in ("simple", "fast"):
        out, lse = gpu.flash_attention(q, k, k, causal=True, return_lse=True, variant=variant)
        assert (out[:, :, :60] == 0).all() and np.isneginf(lse[:, :, :60]).all()
        assert np.isfinite(lse[:, :, 60:]).all()


def test_fast_and_simple_agree():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 4, 333, 128)).astype(np.float16) for _ in range(3))
    a = gpu.flash_attention(q, k, v, window=(100, 10), variant="fast").astype(np.float64)
    b = gpu.flash_attention(q, k, v, window=(100, 10), variant="simple").astype(np.float64)
    assert np.abs(a - b).max() < 5e-3
