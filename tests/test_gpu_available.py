"""``refattn.gpu.available()`` works in an ``if``, and ``import refattn`` exposes
``refattn.gpu`` without importing CuPy or a framework."""
import subprocess
import sys

import refattn.gpu as gpu


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_available_is_false_with_its_reason_when_no_device(monkeypatch):
    why = "CuPy found no CUDA device"
    monkeypatch.setattr(gpu, "device_status", lambda: why)
    found = gpu.available()
    assert not found and found.ok is False
    assert found.reason == why
    ok, reason = found                                   # existing callers unpack it
    assert (ok, reason) == (False, why)
    branch = "gpu" if gpu.available() else "cpu"
    assert branch == "cpu"
    assert repr(found) == f"Availability(ok=False, reason={why!r})"


def test_available_is_true_with_the_device_name(monkeypatch):
    monkeypatch.setattr(gpu, "device_status", lambda: "ok: NVIDIA H200")
    found = gpu.available()
    assert found and found.ok is True and found.reason == "NVIDIA H200"
    ok, name = found
    assert ok is True and name == "NVIDIA H200"
    assert "NVIDIA H200" in repr(found)


def test_available_without_cupy_is_false_and_says_why():
    """CuPy blocked, whatever this machine has: false, with a non-empty reason."""
    res = _run("import sys; sys.modules['cupy'] = None\n"
               "import refattn.gpu as g\n"
               "found = g.available()\n"
               "assert not found and type(found.ok) is bool, found\n"
               "ok, why = found\n"
               "assert ok is False and why == found.reason and 'CuPy' in why, why\n"
               "print('cpu' if not g.available() else 'gpu')\n")
    assert res.stdout.strip() == "cpu", res.stderr


def test_import_refattn_gpu_imports_no_cupy_or_framework():
    res = _run("import sys, refattn.gpu\n"
               "print(sorted({'cupy', 'torch', 'jax'} & set(sys.modules)))\n")
    assert res.stdout.strip() == "[]", res.stderr


def test_import_refattn_exposes_gpu_without_cupy():
    """``refattn.gpu`` by attribute after a plain ``import refattn``, in a fresh process,
    importing neither CuPy nor a framework."""
    res = _run("import sys, refattn\n"
               "g = refattn.gpu\n"
               "assert g is sys.modules['refattn.gpu'] and callable(g.available)\n"
               "print(sorted({'cupy', 'torch', 'jax'} & set(sys.modules)))\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
