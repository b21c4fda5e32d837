"""The kernels' compile-only check: every instantiation (forward, paged decode and
backward), sm_80 and sm_90, NVRTC, no spills and no local memory. Runs without a GPU;
skips only without NVRTC or headers."""
import pytest

from refattn.gpu import compile_check, kernels_spec as ks

status = compile_check.nvrtc_status()
pytestmark = [pytest.mark.slow,   # about 10-30 s on 2 cores
              pytest.mark.skipif(not status.startswith("ok"), reason=status)]


@pytest.fixture(scope="module")
def results():
    return compile_check.run()


def test_every_instantiation_compiles_without_spills(results):
    assert compile_check.problems(results) == []
    built = {(name, r.arch) for r in results for name, f in r.kernels.items() if f}
    want = {(i.name, arch) for i in ks.all_instantiations() for arch in ks.ARCHS}
    assert built == want
    assert {i.name for i in ks.paged_instantiations()} < {name for name, _ in built}
    assert {i.name for i in ks.backward_instantiations()} < {name for name, _ in built}


def test_fast_kernel_fits_the_register_file(results):
    for r in results:
        for name, f in r.kernels.items():
            assert 0 < f["registers"] <= 255, name
            assert f["smem_static"] == 0, name   # the fast kernel's tiles are dynamic


def test_a_broken_kernel_is_reported():
    r = compile_check.compile_source("simple", "sm_90", ["flash_fwd_simple<float, 48, 64, 64>"])
    assert not r.ok and "multiple of 32" in r.log
