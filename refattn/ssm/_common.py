"""What S4D and the selective scan share: the conversion of parameters that may be complex
(kept complex128, else float64), the check of a shape (naming the expected layout), and
the tile of time steps their compiled kernels work on.
"""
from __future__ import annotations

import numpy as np

from ..boundary.arrays import to_float64

#: Time steps the compiled kernels process per tile (per-thread scratch, cache sized).
TILE = 512


def number_array(x, name, *, check_finite=True, allow_complex=True) -> np.ndarray:
    """``x`` as complex128 if it is complex (when allowed), else float64."""
    if x is not None and np.iscomplexobj(x):
        if not allow_complex:
            raise TypeError(f"{name} must be real here, got complex dtype "
                            f"{np.asarray(x).dtype} with shape {np.shape(x)}")
        arr = np.asarray(x).astype(np.complex128)
        if check_finite and not np.isfinite(arr).all():
            raise ValueError(f"{name} {arr.shape} contains non-finite values; pass "
                             f"check_finite=False to allow them")
        return arr
    return to_float64(x, name, check_finite=check_finite)


def check_shape(arr, name, expected, what):
    """``ValueError`` unless ``arr`` has shape ``expected`` (``what``: its layout)."""
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got "
                         f"{arr.shape}")
