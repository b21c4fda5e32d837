"""refattn.gpu: CUDA kernels launched through CuPy, checked against the references.

Importing never needs CUDA. No kernel ships yet: this package holds the device
detection that the kernels will use. :func:`device_status` says whether a usable device
is present and, if not, why.

>>> from refattn import gpu
>>> isinstance(gpu.device_status(), str)
True
"""
from __future__ import annotations

__all__ = ["device_status", "require_device"]


def device_status() -> str:
    """``"ok: <device name>"`` when CuPy sees a CUDA device, else the reason it cannot."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); install refattn[gpu]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "CuPy found no CUDA device"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"ok: {name}"


def require_device() -> None:
    """Raise ``RuntimeError`` with :func:`device_status`'s reason when no device is usable."""
    status = device_status()
    if not status.startswith("ok"):
        raise RuntimeError(f"refattn.gpu needs a CUDA device: {status}")
