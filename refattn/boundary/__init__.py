"""Where callers' data enters refattn: framework tensors and dtypes (:mod:`.arrays`).

Layouts and variable-length batches join here, so that every mechanism sees one form:
float64 NumPy ``(B, H, N, D)``.
"""
from .arrays import dtype_name, is_cupy_array, is_torch_tensor, to_float64

__all__ = ["to_float64", "is_torch_tensor", "is_cupy_array", "dtype_name"]
