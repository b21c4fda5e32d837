"""Everything about a GPU attention call except the launch: argument checks, shape,
dtype, GQA and window normalization, the block mask, and the launch parameters.

:func:`plan` turns shapes, a dtype name and the keyword arguments of
:func:`refattn.gpu.flash_attention` into a :class:`Plan`: the kernel (a template
instantiation from :mod:`refattn.gpu.kernels_spec`), grid, block, dynamic shared memory
and the scalar kernel arguments. It needs neither CuPy nor a device, so it is tested on
the CPU.

Masking. Query row ``i`` sits at position ``i + (M - N)`` (bottom-right alignment) and
key ``j`` is kept iff ``-right <= i + (M - N) - j <= left``; ``causal`` sets ``right = 0``,
``window=w`` means ``(left, right) = (w, 0)`` (``refattn.masks.sliding_window(w)``),
``window=(left, right)`` takes ``None`` for an unbounded side. A ``block_mask`` (a refattn
mask) is classified together with that band into the kernel's tiles
(:mod:`refattn.gpu.blockmask`); empty tiles are skipped.

>>> p = plan((2, 8, 1000, 128), (2, 2, 1000, 128), (2, 2, 1000, 128), "bfloat16",
...          causal=True)
>>> p.kernel, p.grid, p.block, p.shared_bytes
('flash_fwd_fast<__nv_bfloat16, 128, 64, 64, 4>', (16, 8, 2), (128, 1, 1), 81920)
>>> p.group, p.left == UNBOUNDED, p.right
(4, True, 0)
>>> plan((4, 100, 64), (4, 100, 64), (4, 100, 64), "float16", variant="simple").grid
(25, 4, 1)
"""
from __future__ import annotations

from dataclasses import dataclass

from refattn import masks as _masks
from refattn._core.checks import check_bool, is_int, resolve_scale, resolve_softcap
from refattn._core.problem import Problem, problem_from_shapes
from refattn.boundary import dtype_name as array_dtype_name, is_cupy_array

from . import kernels_spec as ks
from .blockmask import BlockMask, build

__all__ = ["UNBOUNDED", "Plan", "plan", "dtype_name", "check_shapes", "normalize_window",
           "reference_mask", "flops"]

#: An unbounded side of the band (passed to the kernels as a 64-bit integer).
UNBOUNDED = 2**60
_MAX_GRID_YZ = 65535
_SIMPLE_ROWS_PER_BLOCK = 4


def dtype_name(x) -> str:
    """``"float16"``, ``"bfloat16"`` or ``"float32"`` for an array's dtype, else TypeError.

    NumPy ``ml_dtypes.bfloat16`` and PyTorch ``torch.bfloat16`` are bfloat16; a CuPy
    ``uint16`` array is read as bfloat16 bits (CuPy has no bfloat16 dtype).

    >>> import numpy as np, ml_dtypes
    >>> dtype_name(np.zeros(2, ml_dtypes.bfloat16)), dtype_name(np.zeros(2, np.float16))
    ('bfloat16', 'float16')
    """
    if getattr(x, "dtype", None) is None:
        raise TypeError(f"expected an array (NumPy, CuPy or __dlpack__), got {type(x).__name__}")
    name = array_dtype_name(x)
    if name == "uint16" and is_cupy_array(x):
        name = "bfloat16"
    if name not in ks.DTYPES:
        raise TypeError(f"dtype {name} has no GPU kernel; use float16, bfloat16 or float32 "
                        f"(CuPy: uint16 holds bfloat16 bits)")
    return name


def check_shapes(q_shape, k_shape, v_shape) -> Problem:
    """The :class:`refattn` problem of ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``,
    ``v (..., Hkv, M, D)``: the references' shape rules (leading dims broadcast, ``Hq`` a
    multiple of ``Hkv``), plus the kernels' own: ``D`` must have a kernel, ``v``'s last
    dim must equal it and ``N``, ``M`` must be below 2^31."""
    pb = problem_from_shapes(q_shape, k_shape, v_shape)
    shapes = f"q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}"
    if pb.dv != pb.d:
        raise ValueError(f"the GPU kernels need v's head dimension equal to D={pb.d}; "
                         f"got {shapes}")
    if pb.d not in ks.HEAD_DIMS:
        raise ValueError(f"head dimension D={pb.d} has no GPU kernel (supported: "
                         f"{ks.HEAD_DIMS}); got {shapes}")
    if pb.n >= 2**31 or pb.m >= 2**31:
        raise ValueError(f"N and M must be below 2^31; got {shapes}")
    return pb


def _side(value, name):
    if value is None:
        return UNBOUNDED
    if not is_int(value) or value < 0:
        raise ValueError(f"window {name} must be a non-negative integer or None, got {value!r}")
    return min(int(value), UNBOUNDED)


def normalize_window(window, causal: bool) -> tuple[int, int]:
    """``(left, right)`` of the band: key ``j`` kept iff ``-right <= i' - j <= left``.

    >>> normalize_window(None, True), normalize_window(16, False), normalize_window((8, 2), True)
    ((1152921504606846976, 0), (16, 0), (8, 0))
    """
    check_bool("causal", causal)
    if window is None:
        left, right = UNBOUNDED, UNBOUNDED
    elif isinstance(window, tuple) and len(window) == 2:
        left, right = _side(window[0], "left"), _side(window[1], "right")
    elif is_int(window):
        left, right = _side(window, "left"), 0
    else:
        raise ValueError(f"window must be None, an integer left size or a (left, right) "
                         f"tuple, got {window!r}")
    if causal:
        right = 0
    return left, right


def reference_mask(causal: bool, window, block_mask=None, n: int = 0, m: int = 0):
    """The refattn mask (or None) equal to what the kernels apply, for the oracle."""
    left, right = normalize_window(window, causal)
    parts = []
    if left < UNBOUNDED or right < UNBOUNDED:
        big = max(n, m) + 1
        parts.append(_masks.sliding_window(min(left, big), min(right, big)))
    if block_mask is not None:
        parts.append(_masks.as_mask(block_mask))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


@dataclass(frozen=True)
class Plan:
    """A checked call: its problem (shapes), kernel, launch configuration and scalar
    arguments. The problem's sizes read as the plan's own (``p.n``, ``p.heads_q`` ...)."""

    variant: str
    dtype: str
    problem: Problem
    scale: float
    softcap: float          # 0.0: no soft-capping
    left: int
    right: int
    kernel: str             # name expression
    source: str             # "fast" or "simple": the source file holding `kernel`
    grid: tuple
    block: tuple
    shared_bytes: int
    block_q: int
    block_k: int
    tiles: BlockMask | None  # the CSR tile list, or None (band computed in the kernel)

    def __getattr__(self, name):   # batch_shape, heads_q, heads_kv, n, m, d, batch, group
        if name.startswith("__") or name == "problem":
            raise AttributeError(name)
        return getattr(self.problem, name)

    @property
    def empty(self) -> bool:
        """Nothing to launch (no query rows or no batch)."""
        return self.n == 0 or self.batch == 0

    def out_shape(self) -> tuple:
        return self.batch_shape + (self.heads_q, self.n, self.d)

    def lse_shape(self) -> tuple:
        return self.batch_shape + (self.heads_q, self.n)


def plan(q_shape, k_shape, v_shape, dtype: str, *, causal=False, window=None, scale=None,
         softcap=None, block_mask=None, variant="fast") -> Plan:
    """Check a call and compute its launch (see the module docstring)."""
    if variant not in ks.VARIANTS:
        raise ValueError(f"variant must be one of {ks.VARIANTS}, got {variant!r}")
    if dtype not in ks.DTYPES:
        raise TypeError(f"dtype {dtype!r} has no GPU kernel; supported: {sorted(ks.DTYPES)}")
    pb = check_shapes(q_shape, k_shape, v_shape)
    batch, hq, n, m, d = pb.batch_shape, pb.heads_q, pb.n, pb.m, pb.d
    scale = resolve_scale(scale, d)
    cap = resolve_softcap(softcap)
    left, right = normalize_window(window, causal)
    kernel = ks.kernel_name(variant, dtype, d)
    source = "fast" if kernel.startswith("flash_fwd_fast") else "simple"
    bm, bn, warps = ks.tiles(d)
    b = pb.batch
    if hq > _MAX_GRID_YZ or b > _MAX_GRID_YZ:
        raise ValueError(f"at most {_MAX_GRID_YZ} query heads and {_MAX_GRID_YZ} batch "
                         f"entries per call; got Hq={hq}, batch {batch}")
    if source == "fast":
        grid, block = (-(-n // bm), hq, b), (32 * warps, 1, 1)
    else:
        grid, block = (-(-n // _SIMPLE_ROWS_PER_BLOCK), hq, b), (32 * _SIMPLE_ROWS_PER_BLOCK, 1, 1)
    tiles = None
    if block_mask is not None:
        if isinstance(block_mask, BlockMask):
            if (block_mask.n, block_mask.m, block_mask.block_q, block_mask.block_k) != (n, m, bm, bn):
                raise ValueError(f"block_mask was built for (N, M, BM, BN) = "
                                 f"{(block_mask.n, block_mask.m, block_mask.block_q, block_mask.block_k)}"
                                 f", this call needs {(n, m, bm, bn)}")
            tiles = block_mask
        else:
            full = reference_mask(causal, window, block_mask, n, m)
            tiles = build(full, n, m, bm, bn, batch=b, heads=hq)
    return Plan(variant, dtype, pb, float(scale),
                0.0 if cap is None else float(cap), left, right, kernel, source, grid, block,
                ks.shared_memory_bytes(variant, dtype, d), bm, bn, tiles)


def flops(b: int, h: int, n: int, m: int, d: int, causal: bool = False) -> float:
    """Forward attention FLOPs counted as ``4 B H N M D``, halved for causal.

    >>> flops(1, 1, 1024, 1024, 128, causal=True) / 1e9
    0.268435456
    """
    return 4.0 * b * h * n * m * d / (2 if causal else 1)
