"""The kernel sources and every template instantiation the launchers may ask for.

Two kernels, both templated on the element type, the head dimension ``D`` and the tile
``(BM, BN)`` (the ``(block_q, block_k)`` tiling that a block mask is classified at):

* ``flash_fwd_fast<T, D, BM, BN, WARPS>`` in ``kernels/flash_fast.cu`` — tensor cores
  (``mma.sync`` m16n8k16), ``ldmatrix``, ``cp.async`` double buffering, swizzled shared
  memory (the building blocks in ``kernels/mma.cuh``, shared with the backward's
  tensor-core kernels); ``T`` is ``__half`` or ``__nv_bfloat16``.
* ``flash_fwd_simple<T, D, BM, BN>`` in ``kernels/flash_simple.cu`` — one warp per query
  row, float32 arithmetic; ``T`` is ``float``, ``__half`` or ``__nv_bfloat16``. It is
  also the float32 path of ``variant="fast"``.

and the paged split-KV decode pair in ``kernels/paged_decode.cu``
(:mod:`refattn.gpu.paged`), ``paged_decode_split<T, D, ROWS>`` and
``paged_decode_merge<T, D>`` for every dtype and head dim: :func:`paged_instantiations`
(:func:`instantiations` stays the forward list; :func:`all_instantiations` is both, what
the compile check builds).

The backward (:mod:`refattn.gpu.backward`, ``kernels/flash_bwd.cu``):
``flash_bwd_preprocess<T, D>`` (``delta = rowsum(dO * O)``), then
``flash_bwd_dkdv_fast<T, D, BM, BN>`` and ``flash_bwd_dq_fast<T, D, BM, BN, WARPS>``
(tensor cores, fp16/bf16, D <= 128) or ``flash_bwd_dkdv_simple<T, D, BM, BN>`` and
``flash_bwd_dq_simple<T, D, BM, BN>`` (float32 arithmetic, every dtype):
:func:`backward_instantiations`.

>>> from refattn.gpu import kernels_spec as ks
>>> ks.tiles(128)
(64, 64, 4)
>>> ks.kernel_name("fast", "bfloat16", 128)
'flash_fwd_fast<__nv_bfloat16, 128, 64, 64, 4>'
>>> ks.kernel_name("fast", "float32", 64)    # float32 runs the simple kernel
'flash_fwd_simple<float, 64, 64, 64>'
>>> len(ks.instantiations())
25
>>> ks.paged_kernel_names("bfloat16", 128)
('paged_decode_split<__nv_bfloat16, 128, 8>', 'paged_decode_merge<__nv_bfloat16, 128>')
>>> ks.backward_kernel_names("simple", "float16", 64)[1]
'flash_bwd_dkdv_simple<__half, 64, 64, 64>'
>>> ks.backward_kernel_names("fast", "bfloat16", 128)[2]
'flash_bwd_dq_fast<__nv_bfloat16, 128, 64, 64, 4>'
>>> len(ks.backward_instantiations()), len(ks.all_instantiations())
(61, 116)
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["HEAD_DIMS", "DTYPES", "VARIANTS", "ARCHS", "NVRTC_OPTIONS", "Instantiation", "tiles",
           "kernel_name", "instantiations", "source", "sources_sha256",
           "shared_memory_bytes", "PAGED", "ALL_SOURCES", "paged_rows",
           "paged_kernel_names", "paged_instantiations", "all_instantiations",
           "paged_shared_memory_bytes", "BACKWARD", "BACKWARD_FAST_DIMS",
           "backward_kernel_names", "backward_shared_bytes", "backward_instantiations",
           "launch_shared_bytes"]

#: Head dimensions with a compiled kernel (``D`` of q and k, equal to ``Dv`` of v).
HEAD_DIMS = (32, 64, 96, 128, 256)
#: dtype name -> CUDA element type.
DTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
VARIANTS = ("simple", "fast")
#: Architectures the compile check builds for.
ARCHS = ("sm_80", "sm_90")
#: NVRTC options shared by the compile check and the run-time build (CuPy adds the
#: architecture).
NVRTC_OPTIONS = ("--std=c++17",)
SOURCES = {"simple": "flash_simple.cu", "fast": "flash_fast.cu"}
#: The paged split-KV decode kernels' source key (not a forward variant).
PAGED = "paged"
#: The backward kernels' source key.
BACKWARD = "backward"
#: Every kernel source: the forward variants', the paged decode pair's, the backward's.
ALL_SOURCES = {**SOURCES, PAGED: "paged_decode.cu", BACKWARD: "flash_bwd.cu"}
#: The headers the ``.cu`` files include (``kernels/``): ``mma.cuh``, the tensor-core
#: building blocks of the fast kernels (``SmemRows``, ``load_tile``, ``cp.async``,
#: ``ldmatrix``, ``Mma<T>``; included by flash_fast.cu and flash_bwd.cu), and
#: ``common.cuh`` (every kernel). :func:`source` inlines them at their ``#include`` lines;
#: they include none of each other.
HEADERS = ("common.cuh", "mma.cuh")


def tiles(d: int) -> tuple[int, int, int]:
    """``(BM, BN, WARPS)`` for head dimension ``d``: 64 query rows (4 warps of 16) and
    64 keys; 32 keys at ``d = 256`` (to keep the fp32 accumulators in registers) and at
    ``d = 32`` (where ptxas capped 64-key tiles at 128 registers and spilled)."""
    if d not in HEAD_DIMS:
        raise ValueError(f"head dimension D={d} has no kernel; supported: {HEAD_DIMS}")
    return 64, (32 if d > 128 or d < 64 else 64), 4


def kernel_name(variant: str, dtype: str, d: int) -> str:
    """The template instantiation (a ``name_expressions`` entry) that runs a call."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype {dtype!r} has no kernel; supported: {sorted(DTYPES)}")
    bm, bn, warps = tiles(d)
    if variant == "fast" and dtype != "float32":
        return f"flash_fwd_fast<{DTYPES[dtype]}, {d}, {bm}, {bn}, {warps}>"
    return f"flash_fwd_simple<{DTYPES[dtype]}, {d}, {bm}, {bn}>"


@dataclass(frozen=True)
class Instantiation:
    """One compiled kernel: which source, which template arguments."""

    kernel: str   # "simple" or "fast": the source file that holds it
    dtype: str
    d: int
    name: str     # the name expression

    @property
    def source(self) -> str:
        return ALL_SOURCES[self.kernel]


def instantiations() -> list[Instantiation]:
    """Every instantiation a call can need: fast for fp16/bf16, simple for all dtypes."""
    out = []
    for kernel in VARIANTS:
        for dtype in DTYPES:
            if kernel == "fast" and dtype == "float32":
                continue
            for d in HEAD_DIMS:
                out.append(Instantiation(kernel, dtype, d, kernel_name(kernel, dtype, d)))
    return out


def _paged_lanes(dtype: str, d: int) -> tuple[int, int]:
    """``(LPK, E)`` of ``PagedLanes<T, D>``: lanes per key row (16 bytes each per load) and
    elements per lane."""
    vec = 4 if dtype == "float32" else 8
    chunks = d // vec
    lpk = next(p for p in (32, 16, 8, 4, 2, 1) if chunks % p == 0)
    return lpk, chunks // lpk * vec


def paged_rows(dtype: str, d: int) -> int:
    """Query rows per block of ``paged_decode_split`` (query heads sharing a KV head,
    times query tokens, are tiled by this): at most 8, and at most 64 accumulators per
    lane.

    >>> paged_rows("float16", 128), paged_rows("float16", 96), paged_rows("float32", 96)
    (8, 2, 5)
    """
    if dtype not in DTYPES:
        raise TypeError(f"dtype {dtype!r} has no kernel; supported: {sorted(DTYPES)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dimension D={d} has no kernel; supported: {HEAD_DIMS}")
    return min(8, 64 // _paged_lanes(dtype, d)[1])


def paged_kernel_names(dtype: str, d: int) -> tuple[str, str]:
    """``(split, merge)`` name expressions of the paged decode pair for ``(dtype, d)``."""
    rows, t = paged_rows(dtype, d), DTYPES[dtype]
    return f"paged_decode_split<{t}, {d}, {rows}>", f"paged_decode_merge<{t}, {d}>"


def paged_instantiations() -> list[Instantiation]:
    """The paged decode pair for every dtype and head dim."""
    return [Instantiation(PAGED, dtype, d, name) for dtype in DTYPES for d in HEAD_DIMS
            for name in paged_kernel_names(dtype, d)]


#: Head dims of the backward's tensor-core kernels (at D = 256 ptxas spills the dk/dv
#: kernel's 2 x 256 accumulators per 16 keys: it runs the simple kernels).
BACKWARD_FAST_DIMS = (32, 64, 96, 128)


def backward_kernel_names(variant: str, dtype: str, d: int) -> tuple[str, str, str]:
    """``(preprocess, dkdv, dq)`` name expressions of the backward for a call: the
    tensor-core kernels for ``variant="fast"`` with fp16/bf16 and D <= 128, else the
    simple (float32-arithmetic) ones."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype {dtype!r} has no kernel; supported: {sorted(DTYPES)}")
    bm, bn, warps = tiles(d)
    t = DTYPES[dtype]
    pre = f"flash_bwd_preprocess<{t}, {d}>"
    if variant == "fast" and dtype != "float32" and d in BACKWARD_FAST_DIMS:
        return (pre, f"flash_bwd_dkdv_fast<{t}, {d}, {bm}, {bn}>",
                f"flash_bwd_dq_fast<{t}, {d}, {bm}, {bn}, {warps}>")
    return (pre, f"flash_bwd_dkdv_simple<{t}, {d}, {bm}, {bn}>",
            f"flash_bwd_dq_simple<{t}, {d}, {bm}, {bn}>")


def backward_shared_bytes(name: str) -> int:
    """Dynamic shared memory of a backward kernel: the tensor-core dq kernel holds Q and
    dO tiles and two stages of K and V, the dk/dv kernel K and V tiles and two stages of
    Q and dO (rows padded per ``SmemRows``); the others none.

    >>> backward_shared_bytes("flash_bwd_dkdv_fast<__half, 128, 64, 64>")  # 384 x 256
    98304
    """
    if "_fast<" not in name:
        return 0
    d = int(name.split(",")[1])
    bm, bn, _ = tiles(d)
    c = d // 8
    stride = c if (c % 8 == 0 or c == 4) else (c + 1 if c % 2 == 0 else c)
    rows = 2 * bm + 4 * bn if name.startswith("flash_bwd_dq") else 2 * bn + 4 * bm
    return rows * stride * 16


def backward_instantiations() -> list[Instantiation]:
    """Every backward kernel for every dtype and head dim."""
    names = {n: (dtype, d) for dtype in DTYPES for d in HEAD_DIMS for variant in VARIANTS
             for n in backward_kernel_names(variant, dtype, d)}
    return [Instantiation(BACKWARD, dtype, d, n) for n, (dtype, d) in names.items()]


def all_instantiations() -> list[Instantiation]:
    """The forward, paged decode and backward kernels' instantiations."""
    return instantiations() + paged_instantiations() + backward_instantiations()


def paged_shared_memory_bytes(dtype: str, d: int) -> int:
    """Dynamic shared memory of ``paged_decode_split``: Q rows as float, then per key
    group and row ``m``, ``l`` and a float accumulator row (the merge kernel: none).

    >>> paged_shared_memory_bytes("bfloat16", 128)    # 4 (8 x 128 + 8 groups x 8 x 130)
    37376
    """
    lpk, _ = _paged_lanes(dtype, d)
    rows, groups = paged_rows(dtype, d), 4 * (32 // lpk)
    return 4 * (rows * d + groups * rows * (d + 2))


def launch_shared_bytes(inst: Instantiation) -> int:
    """Dynamic shared memory a launch of ``inst`` asks for."""
    if inst.kernel == BACKWARD:
        return backward_shared_bytes(inst.name)
    if inst.kernel == PAGED:
        return paged_shared_memory_bytes(inst.dtype, inst.d) \
            if inst.name.startswith("paged_decode_split") else 0
    return shared_memory_bytes(inst.kernel, inst.dtype, inst.d)


def _read(name: str) -> str:
    return resources.files("refattn.gpu").joinpath("kernels", name).read_text(
        encoding="utf-8")


def source(kernel: str) -> str:
    """The self-contained source of ``kernel`` ("simple", "fast", "paged" or
    "backward"): the ``.cu`` file with each ``#include`` of a :data:`HEADERS` file
    (``common.cuh``, ``mma.cuh``) replaced by the header (NVRTC and CuPy then need no
    include path for them)."""
    if kernel not in ALL_SOURCES:
        raise ValueError(f"kernel must be one of {sorted(ALL_SOURCES)}, got {kernel!r}")
    text = _read(ALL_SOURCES[kernel])
    for header in HEADERS:
        text = re.sub(rf'^#include "{re.escape(header)}"\s*$',
                      lambda _: _read(header), text, flags=re.M)
    return text


def sources_sha256() -> str:
    """sha256 over every kernel source file (name and bytes), in a fixed order: the
    identity a selfcheck record is tied to."""
    h = hashlib.sha256()
    for name in sorted(set(ALL_SOURCES.values()) | set(HEADERS)):
        h.update(name.encode() + b"\0" + _read(name).encode("utf-8") + b"\0")
    return h.hexdigest()


def shared_memory_bytes(variant: str, dtype: str, d: int) -> int:
    """Dynamic shared memory of the kernel running ``(variant, dtype, d)``: the fast
    kernel holds a Q tile and two stages of K and V tiles (rows padded per
    ``SmemRows``); the simple kernel none.

    >>> shared_memory_bytes("fast", "float16", 128)     # (64 + 4 * 64) rows * 256 bytes
    81920
    """
    if not kernel_name(variant, dtype, d).startswith("flash_fwd_fast"):
        return 0
    bm, bn, _ = tiles(d)
    c = d // 8
    stride = c if (c % 8 == 0 or c == 4) else (c + 1 if c % 2 == 0 else c)
    return (bm + 4 * bn) * stride * 16
