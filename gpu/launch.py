"""Launching the kernels with CuPy: array hand-over, per-device module cache, launch.

Needs CuPy and a device; imported lazily by :func:`refattn.gpu.flash_attention`.
Arrays: NumPy arrays are copied to the device and results copied back; CuPy arrays stay
on the device; other ``__dlpack__`` objects (PyTorch CUDA tensors) are taken zero-copy
with ``cupy.from_dlpack`` and the results are CuPy arrays (``torch.from_dlpack`` takes
them back). bfloat16 travels as ``uint16`` bits (CuPy has no bfloat16 dtype): NumPy
``ml_dtypes.bfloat16`` results come back as bfloat16, device results as ``uint16``.
"""
from __future__ import annotations

import threading

import numpy as np

from refattn.boundary import is_cupy_array, is_torch_tensor

from . import kernels_spec as ks
from .host import Plan

__all__ = ["get_kernel", "to_device", "check_finite", "run", "module_cache"]

_lock = threading.Lock()
#: ``(device id, kernel name) -> cupy.RawModule``; modules are per device because a
#: module is loaded into one device's context.
module_cache: dict = {}
_CUPY_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}


def get_kernel(p: Plan):
    """The compiled ``cupy.RawKernel`` for ``p.kernel`` on the current device."""
    import cupy
    dev = cupy.cuda.Device().id
    key = (dev, p.kernel)
    with _lock:
        mod = module_cache.get(key)
        if mod is None:
            from .compile_check import cuda_include_dir
            inc = cuda_include_dir()
            opts = ks.NVRTC_OPTIONS + ((f"-I{inc}",) if inc else ())
            mod = cupy.RawModule(code=ks.source(p.source), options=opts,
                                 name_expressions=[p.kernel])
            module_cache[key] = mod
    fn = mod.get_function(p.kernel)
    if p.shared_bytes > 48 * 1024 and fn.max_dynamic_shared_size_bytes < p.shared_bytes:
        fn.max_dynamic_shared_size_bytes = p.shared_bytes
    return fn


def _kind(x) -> str:
    if is_cupy_array(x):
        return "cupy"
    if isinstance(x, np.ndarray):
        return "numpy"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    raise TypeError(f"expected a NumPy array, a CuPy array or an object with __dlpack__, "
                    f"got {type(x).__name__}")


def to_device(x, dtype: str, name: str):
    """``x`` as a C-contiguous, 16-byte aligned CuPy array of the kernel's element type."""
    import cupy
    kind = _kind(x)
    if kind == "numpy":
        arr = np.ascontiguousarray(x)
        if dtype == "bfloat16":
            arr = arr.view(np.uint16)
        dev = cupy.asarray(arr)
    elif kind == "cupy":
        dev = x
    else:
        if dtype == "bfloat16" and is_torch_tensor(x):
            import torch
            x = x.view(torch.int16)
        dev = cupy.from_dlpack(x)
        if dtype == "bfloat16":
            dev = dev.view(cupy.uint16)
    want = np.dtype(_CUPY_DTYPES[dtype])
    if dev.dtype != want:
        raise TypeError(f"{name} has device dtype {dev.dtype}, expected {want} for {dtype}")
    if not dev.flags.c_contiguous:
        dev = cupy.ascontiguousarray(dev)
    if dev.data.ptr % 16:          # cp.async moves 16-byte chunks
        dev = dev.copy()
    return dev, kind


def check_finite(dev, dtype: str, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if the device array holds inf or NaN (for
    bfloat16 ``uint16`` bits: an all-ones exponent)."""
    import cupy
    if dtype == "bfloat16":
        bad = (dev & 0x7F80) == 0x7F80
    else:
        bad = ~cupy.isfinite(dev)
    if bool(bad.any()):
        idx = tuple(int(i) for i in np.unravel_index(int(bad.ravel().argmax()), dev.shape))
        raise ValueError(f"{name} {tuple(dev.shape)} contains non-finite values (first at "
                         f"index {idx}); pass check_finite=False to allow them")


def _broadcast(dev, batch_shape):
    import cupy
    target = tuple(batch_shape) + dev.shape[-3:]
    if dev.shape != target:
        dev = cupy.ascontiguousarray(cupy.broadcast_to(dev, target))
    return dev


def run(p: Plan, q, k, v, out=None, lse=None):
    """Launch ``p`` on CuPy arrays ``q, k, v`` (already of the kernel's element type and
    contiguous); fills and returns ``(out, lse)``. ``out``/``lse`` may be given
    (e.g. NaN-poisoned buffers in tests)."""
    import cupy
    q, k, v = (_broadcast(x, p.batch_shape) for x in (q, k, v))
    elem = np.dtype(_CUPY_DTYPES[p.dtype])
    if out is None:
        out = cupy.empty(p.out_shape(), elem)
    if lse is None:
        lse = cupy.empty(p.lse_shape(), cupy.float32)
    if out.shape != p.out_shape() or out.dtype != elem or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {elem} array of shape {p.out_shape()}")
    if lse.shape != p.lse_shape() or lse.dtype != np.float32 or not lse.flags.c_contiguous:
        raise ValueError(f"lse must be a contiguous float32 array of shape {p.lse_shape()}")
    if p.empty:
        return out, lse
    if p.tiles is not None:
        t = p.tiles
        lists = [cupy.asarray(a) for a in (t.indptr, t.tile_k, t.tile_bits, t.bits)]
        use_list = 1
    else:
        dummy = cupy.zeros(1, cupy.int32)
        lists = [dummy, dummy, dummy, cupy.zeros(1, cupy.uint32)]
        use_list = 0
    fn = get_kernel(p)
    args = (q, k, v, out, lse, np.int32(p.batch), np.int32(p.heads_q), np.int32(p.heads_kv),
            np.int32(p.n), np.int32(p.m), np.float32(p.scale), np.float32(p.softcap),
            np.int64(p.left), np.int64(p.right), *lists, np.int32(use_list))
    fn(p.grid, p.block, args, shared_mem=p.shared_bytes)
    return out, lse
