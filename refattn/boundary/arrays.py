"""Arrays in: the one place refattn turns a caller's array into float64 NumPy.

Every reference converts its array arguments here, so what is accepted (NumPy arrays,
sequences, 16- and 8-bit floats from ``ml_dtypes``, PyTorch tensors on any device and with
``requires_grad``, JAX and CuPy arrays) and what is refused (strings, complex numbers,
non-finite values unless allowed) is decided once. Conversion is exact: a bfloat16 or
float8 tensor's bits are reinterpreted as ``ml_dtypes``' type of the same name, never
rounded through another type. Framework tensors are recognised through ``sys.modules``, so
nothing is imported that the caller has not.
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["to_float64", "host_array", "torch_to_numpy", "is_torch_tensor",
           "is_cupy_array", "dtype_name"]

#: The low-precision float types of ``ml_dtypes`` accepted as inputs.
ML_DTYPE_NAMES = frozenset({
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn",
    "float6_e3m2fn", "float4_e2m1fn"})


def is_torch_tensor(x) -> bool:
    """Whether ``x`` is a PyTorch tensor (False without importing torch when the caller
    has not imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy_array(x) -> bool:
    """Whether ``x`` is a CuPy array (False without importing CuPy)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def dtype_name(x) -> str:
    """The name of ``x``'s element type, the same for NumPy, ``ml_dtypes``, PyTorch and
    CuPy: ``"float16"``, ``"bfloat16"``, ``"float32"``, ... (``"float64"`` for objects
    without a dtype, such as Python lists)."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return "float64"
    return str(dt).removeprefix("torch.")


def torch_to_numpy(x, name: str) -> np.ndarray:
    """A PyTorch tensor's values as a host NumPy array of the same element type, exactly:
    detached from autograd, copied from its device, bfloat16/float8 bits reinterpreted
    as the ``ml_dtypes`` type of the same name."""
    torch = sys.modules["torch"]
    t = x.detach()
    if t.layout is not torch.strided:
        raise TypeError(f"{name}: a {t.layout} tensor of shape {tuple(t.shape)}; pass a "
                        f"dense (strided) tensor, e.g. {name}.to_dense()")
    t = t.cpu().resolve_conj().resolve_neg()
    dname = dtype_name(t)
    if dname in ML_DTYPE_NAMES:              # NumPy has no such type: move the bits
        import ml_dtypes
        bits = {1: torch.uint8, 2: torch.int16}[t.element_size()]
        return t.contiguous().view(bits).numpy().view(getattr(ml_dtypes, dname))
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{name}: cannot read a torch.{dname} tensor of shape "
                        f"{tuple(t.shape)} ({exc})") from exc


def host_array(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array on the host, of its own element type: NumPy arrays, Python
    sequences and anything with ``__array__`` (JAX) as :func:`numpy.asarray` reads them,
    PyTorch tensors through :func:`torch_to_numpy`, CuPy arrays copied from the device."""
    if is_torch_tensor(x):
        return torch_to_numpy(x, name)
    if is_cupy_array(x):
        return x.get()
    try:
        return np.asarray(x)
    except Exception as exc:  # name the argument, keep the cause
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to a NumPy array "
                        f"({exc})") from exc


def to_float64(x, name: str, *, check_finite: bool = True) -> np.ndarray:
    """Return ``x`` as a float64 array; reject non-numeric, complex and non-finite input.

    Accepts float16/32/64, integer and bool arrays, and the ``ml_dtypes`` low-precision
    floats (bfloat16, float8 ...), as NumPy arrays, sequences, PyTorch tensors (any device,
    ``requires_grad`` or not), JAX or CuPy arrays (:func:`host_array`); every such value
    is exactly representable in float64. Raises ``TypeError`` naming ``name`` otherwise.

    >>> import ml_dtypes, numpy as np
    >>> to_float64(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16), "q")
    array([ 1.5, -2. ])
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    arr = host_array(x, name)
    kind = arr.dtype.kind
    if not (kind in "fiub" or arr.dtype.name in ML_DTYPE_NAMES):
        raise TypeError(f"{name} must have a real numeric dtype, got {arr.dtype} "
                        f"with shape {arr.shape}")
    out = arr.astype(np.float64, copy=False)
    if check_finite and not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"{name} {arr.shape} contains non-finite values (first at index "
                         f"{tuple(int(i) for i in bad)}: {out[tuple(bad)]}); pass "
                         f"check_finite=False to allow them")
    return out
