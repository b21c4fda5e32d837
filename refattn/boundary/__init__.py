"""Where callers' data enters refattn: framework tensors and dtypes (:mod:`.arrays`);
layouts, causal alignment by name and variable-length batches (:mod:`.calls`), so that
every mechanism sees one form: float64 NumPy ``(B, H, N, D)``.
"""
from .arrays import (dtype_name, host_array, is_cupy_array, is_torch_tensor, to_float64,
                     torch_to_numpy)

__all__ = ["to_float64", "host_array", "torch_to_numpy", "is_torch_tensor", "is_cupy_array",
           "dtype_name"]
