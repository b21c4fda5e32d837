"""Paged split-KV decoding on the GPU (flash-decoding over a vLLM / FlashInfer paged KV
cache): argument checks, the launch plan, the two launches, and :func:`paged_decode`.

One or a few query tokens per sequence attend to the sequence's keys in a paged pool
(``key_cache (num_blocks, block_size, Hkv, D)``, NHD; ``block_table (B, max_blocks)``
int32; ``seq_lens (B,)`` int32), as :func:`refattn.paged_attention` defines it (its float64
oracle). ``paged_decode_split<T, D, ROWS>`` cuts each sequence's keys into ``num_splits``
chunks of ``ceil(L_b / num_splits)`` keys, one block per (chunk, KV head and tile of
``ROWS`` packed query rows, sequence), each writing a float32 partial output and lse;
``paged_decode_merge<T, D>`` merges them as :func:`refattn.merge_partials` does (Dao et
al. 2023, "Flash-Decoding for long-context inference"; PagedAttention, Kwon et al. 2023).
GQA: the ``Hq / Hkv`` query heads of a KV head (times the query tokens) are packed into
the rows of one block, so each key is read once per tile of rows. Several query tokens
(``q (B, n, Hq, D)``, a sequence's last ``n`` tokens) are masked causally, bottom-right:
token ``i`` sees key ``j <= i + L_b - n``.

Everything here but :func:`run` and :func:`paged_decode` (which need CuPy and a device,
or the CPU emulator's CuPy-like module) runs on the CPU:

>>> p = plan((4, 32, 128), (1000, 16, 8, 128), (1000, 16, 8, 128), (4, 64), (4,),
...          "bfloat16", num_splits=8)
>>> p.kernel, p.merge_kernel
('paged_decode_split<__nv_bfloat16, 128, 8>', 'paged_decode_merge<__nv_bfloat16, 128>')
>>> p.grid, p.block, p.merge_grid, p.out_shape(), p.lse_shape()
((8, 8, 4), (128, 1, 1), (32, 1, 1), (4, 32, 128), (4, 32))
>>> plan((4, 32, 128), (1000, 16, 8, 128), (1000, 16, 8, 128), (4, 64), (4,),
...      "bfloat16").num_splits          # default: fill the device, >= 256 keys each
4
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from refattn._core.checks import check_int, resolve_scale, resolve_softcap

from . import kernels_spec as ks

__all__ = ["PagedPlan", "plan", "default_splits", "check_indices", "run", "paged_decode",
           "kv_bytes"]

_MAX_GRID_YZ = 65535
#: Streaming multiprocessors assumed by the default ``num_splits`` (an H100 / H200 has
#: 132; more splits than needed only cost the merge).
SM_COUNT = 132
#: Fewest keys a split is given by the default ``num_splits``.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 256
_lock = threading.Lock()
_ELEM = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


@dataclass(frozen=True)
class PagedPlan:
    """A checked paged decode call: sizes, kernels, launch configurations, scalars."""

    dtype: str
    batch: int
    n: int                  # query tokens per sequence
    decode: bool            # q was (B, Hq, D): one token, out (B, Hq, D)
    heads_q: int
    heads_kv: int
    d: int
    num_blocks: int
    block_size: int
    max_blocks: int
    num_splits: int
    scale: float
    softcap: float          # 0.0: no soft-capping
    rows: int               # ROWS: packed query rows per split block
    kernel: str             # paged_decode_split<...>
    merge_kernel: str       # paged_decode_merge<...>
    grid: tuple
    block: tuple
    shared_bytes: int
    merge_grid: tuple
    source: str = ks.PAGED

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def empty(self) -> bool:
        return self.batch == 0 or self.n == 0

    def out_shape(self) -> tuple:
        head = (self.heads_q, self.d)
        return (self.batch,) + head if self.decode else (self.batch, self.n) + head

    def lse_shape(self) -> tuple:
        """The lse pairs with the output: ``out_shape()[:-1]`` (FlashInfer's order)."""
        return self.out_shape()[:-1]

    def partial_shapes(self) -> tuple:
        """``(o (B, n, Hq, S, D), lse (B, n, Hq, S))`` of the float32 partials."""
        lead = (self.batch, self.n, self.heads_q, self.num_splits)
        return lead + (self.d,), lead


def default_splits(batch: int, heads_kv: int, tiles: int, max_len: int) -> int:
    """Splits per sequence so that about two waves of blocks fill ``SM_COUNT``
    multiprocessors, with at least ``MIN_KEYS_PER_SPLIT`` keys per split.

    >>> default_splits(1, 8, 1, 32768), default_splits(256, 8, 1, 32768)
    (33, 1)
    """
    want = -(-2 * SM_COUNT // max(1, batch * heads_kv * tiles))
    cap = max(1, -(-max_len // MIN_KEYS_PER_SPLIT))
    return int(max(1, min(want, cap, MAX_SPLITS)))


def _shape(shape) -> tuple:
    return tuple(int(s) for s in shape)


def plan(q_shape, key_shape, value_shape, table_shape, lens_shape, dtype: str, *,
         num_splits=None, scale=None, softcap=None, max_len=None) -> PagedPlan:
    """Check the shapes of a call and compute its launches (see the module docstring).
    ``max_len``: the longest sequence, for the default ``num_splits`` (default: what
    the block table can hold)."""
    if dtype not in ks.DTYPES:
        raise TypeError(f"dtype {dtype!r} has no GPU kernel; supported: "
                        f"{sorted(ks.DTYPES)}")
    qs, kshape, vshape = _shape(q_shape), _shape(key_shape), _shape(value_shape)
    ts, ls = _shape(table_shape), _shape(lens_shape)
    shapes = (f"q {qs}, key_cache {kshape}, value_cache {vshape}, block_table {ts}, "
              f"seq_lens {ls}")
    if len(qs) not in (3, 4):
        raise ValueError(f"q must be (B, Hq, D) (decode) or (B, n, Hq, D) (the last n "
                         f"tokens of each sequence); got {shapes}")
    batch, n = qs[0], (1 if len(qs) == 3 else qs[1])
    hq, d = qs[-2], qs[-1]
    if len(kshape) != 4 or vshape != kshape:
        raise ValueError(f"key_cache and value_cache must be equal-shaped pools "
                         f"(num_blocks, block_size, Hkv, D) (NHD, Dv == D); got {shapes}")
    num_blocks, block_size, hkv, dk = kshape
    if dk != d:
        raise ValueError(f"q and key_cache must share the head dimension D; got {shapes}")
    if d not in ks.HEAD_DIMS:
        raise ValueError(f"head dimension D={d} has no GPU kernel (supported: "
                         f"{ks.HEAD_DIMS}); got {shapes}")
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"query heads Hq={hq} must be a positive multiple of KV heads "
                         f"Hkv={hkv}; got {shapes}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive; got {shapes}")
    if len(ts) != 2 or ts[0] != batch:
        raise ValueError(f"block_table must be (B, max_blocks) with B={batch} rows (q's "
                         f"first dim); got {shapes}")
    if ls != (batch,):
        raise ValueError(f"seq_lens must be (B,) = ({batch},); got {shapes}")
    max_blocks = ts[1]
    if max_blocks * block_size >= 2**31 or num_blocks * block_size >= 2**31:
        raise ValueError(f"sequences and the pool must hold fewer than 2^31 tokens; got "
                         f"{shapes}")
    rows = ks.paged_rows(dtype, d)
    tiles = -(-(hq // hkv * n) // rows)
    if max_len is None:
        max_len = max_blocks * block_size
    if num_splits is None:
        num_splits = default_splits(batch, hkv, tiles, int(max_len))
    num_splits = check_int("num_splits", num_splits, minimum=1)
    if hkv * tiles > _MAX_GRID_YZ or batch > _MAX_GRID_YZ or num_splits > 2**31 - 1:
        raise ValueError(f"at most {_MAX_GRID_YZ} (KV heads x row tiles) and sequences per "
                         f"call; got Hkv={hkv} x {tiles} tiles, B={batch}")
    split, merge = ks.paged_kernel_names(dtype, d)
    cap = resolve_softcap(softcap)
    return PagedPlan(dtype, batch, n, len(qs) == 3, hq, hkv, d, num_blocks, block_size,
                     max_blocks, num_splits, float(resolve_scale(scale, d)),
                     0.0 if cap is None else float(cap), rows, split, merge,
                     (num_splits, hkv * tiles, batch), (128, 1, 1),
                     ks.paged_shared_memory_bytes(dtype, d),
                     (-(-batch * n * hq // 4), 1, 1))


def check_indices(p: PagedPlan, block_table, seq_lens) -> None:
    """Refuse ``seq_lens`` outside ``[0, max_blocks * block_size]`` (or below the query
    tokens ``n``, other than 0, a padding slot) and block ids outside ``[0, num_blocks)``
    among the entries a sequence reads (the padding after them is never read). Host
    (NumPy) values."""
    lens = np.asarray(seq_lens)
    table = np.asarray(block_table)
    cap = p.max_blocks * p.block_size
    for b in range(p.batch):
        length = int(lens[b])
        if length < 0 or length > cap:
            raise ValueError(f"seq_lens[{b}] = {length} is outside [0, {cap}] (block_table "
                             f"{table.shape} x block_size {p.block_size})")
        if 0 < length < p.n:
            raise ValueError(f"sequence {b} has {p.n} query tokens but seq_lens[{b}] = "
                             f"{length}: the queries are its last tokens (0 marks padding)")
        ids = table[b, :-(-length // p.block_size)]
        bad = np.flatnonzero((ids < 0) | (ids >= p.num_blocks))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(ids[j])} is not a block of the "
                             f"pool (num_blocks={p.num_blocks}); sequence {b} reads its "
                             f"first {len(ids)} entries")


def kv_bytes(p: PagedPlan, seq_lens) -> int:
    """Bytes of keys and values the split kernel reads (each once per row tile)."""
    tiles = p.grid[1] // p.heads_kv
    item = 4 if p.dtype == "float32" else 2
    return int(np.asarray(seq_lens, np.int64).sum()) * p.heads_kv * tiles * 2 * p.d * item


def _module():
    """One module holding every paged instantiation (one NVRTC build), per device."""
    import cupy

    from . import launch
    key = (cupy.cuda.Device().id, ks.PAGED)
    with _lock:
        mod = launch.module_cache.get(key)
        if mod is None:
            from .compile_check import cuda_include_dir
            inc = cuda_include_dir()
            names = [i.name for i in ks.paged_instantiations()]
            mod = cupy.RawModule(code=ks.source(ks.PAGED),
                                 options=ks.NVRTC_OPTIONS + ((f"-I{inc}",) if inc else ()),
                                 name_expressions=names)
            launch.module_cache[key] = mod
    return mod


def _index_device(x, name: str):
    """``x`` as a contiguous int32 CuPy array (NumPy and lists converted)."""
    import cupy

    from refattn.boundary import is_cupy_array
    if is_cupy_array(x):
        dev = x
    elif hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        dev = cupy.from_dlpack(x)
    else:
        return cupy.asarray(_index_host(x, name))
    if dev.dtype != np.int32:
        raise TypeError(f"{name} must be int32 on the device, got {dev.dtype} "
                        f"{tuple(dev.shape)}")
    return cupy.ascontiguousarray(dev)


def _index_host(x, name: str) -> np.ndarray:
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    elif hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        x = np.from_dlpack(x.cpu() if hasattr(x, "cpu") else x)
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (int32), got dtype {arr.dtype} "
                        f"with shape {arr.shape}")
    if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
        raise ValueError(f"{name} {arr.shape} holds values outside int32")
    return np.ascontiguousarray(arr, np.int32)


def run(p: PagedPlan, q, key_cache, value_cache, block_table, seq_lens, out=None, lse=None,
        partials=None):
    """Launch the split and merge kernels of ``p`` on device arrays (of the kernel's
    element type, contiguous; index arrays int32); fills and returns ``(out, lse)``.
    ``out``, ``lse`` and ``partials = (o, lse)`` may be given (poisoned buffers in
    tests)."""
    import cupy
    elem = np.dtype(_ELEM[p.dtype])
    if out is None:
        out = cupy.empty(p.out_shape(), elem)
    if lse is None:
        lse = cupy.empty(p.lse_shape(), cupy.float32)
    po_shape, pl_shape = p.partial_shapes()
    if partials is None:
        partials = cupy.empty(po_shape, cupy.float32), cupy.empty(pl_shape, cupy.float32)
    for name, arr, shape, dt in (("out", out, p.out_shape(), elem),
                                 ("lse", lse, p.lse_shape(), np.float32),
                                 ("partial o", partials[0], po_shape, np.float32),
                                 ("partial lse", partials[1], pl_shape, np.float32)):
        if arr.shape != shape or arr.dtype != dt or not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous {dt} array of shape {shape}, "
                             f"got {arr.dtype} {tuple(arr.shape)}")
    if p.empty:
        return out, lse
    mod = _module()
    split, merge = mod.get_function(p.kernel), mod.get_function(p.merge_kernel)
    if p.shared_bytes > 48 * 1024 and split.max_dynamic_shared_size_bytes < p.shared_bytes:
        split.max_dynamic_shared_size_bytes = p.shared_bytes
    i32, f32 = np.int32, np.float32
    split(p.grid, p.block, (q, key_cache, value_cache, block_table, seq_lens, partials[0],
                            partials[1], i32(p.heads_q), i32(p.heads_kv), i32(p.n),
                            i32(p.block_size), i32(p.max_blocks), i32(p.num_splits),
                            f32(p.scale), f32(p.softcap)), shared_mem=p.shared_bytes)
    merge(p.merge_grid, (128, 1, 1), (partials[0], partials[1], out, lse,
                                      i32(p.batch * p.n * p.heads_q), i32(p.num_splits)))
    return out, lse


def paged_decode(q, key_cache, value_cache, block_table, seq_lens, *, num_splits=None,
                 scale=None, softcap=None, return_lse=False):
    """Attention of the last query token(s) of each sequence over a paged KV cache, on the
    GPU (split-KV flash-decoding; see :mod:`refattn.gpu.paged`).

    q : ``(B, Hq, D)`` (decode: one token per sequence) or ``(B, n, Hq, D)`` (each
        sequence's last ``n`` tokens, causal bottom-right), float16, bfloat16 (NumPy
        ``ml_dtypes.bfloat16``, PyTorch ``bfloat16`` or CuPy ``uint16`` bits) or float32.
    key_cache, value_cache : ``(num_blocks, block_size, Hkv, D)`` pools (vLLM / FlashInfer
        NHD), q's dtype; ``Hq`` a multiple of ``Hkv``; D in 32, 64, 96, 128, 256.
    block_table : int32 ``(B, max_blocks)``: sequence ``b``'s token ``t`` is row
        ``t % block_size`` of block ``block_table[b, t // block_size]``; only the first
        ``ceil(seq_lens[b] / block_size)`` entries are read (and checked).
    seq_lens : int32 ``(B,)``: tokens cached per sequence, its queries included; 0 gives
        output 0 and lse ``-inf``.
    num_splits : chunks each sequence's keys are cut into (default: enough blocks to fill
        the device, at least 256 keys each); more splits than keys leave some empty.
    scale, softcap : as :func:`refattn.gpu.flash_attention`.
    return_lse : also return the lse, float32, ``out.shape[:-1]`` (``(B, Hq)`` /
        ``(B, n, Hq)``; :func:`refattn.paged_attention` returns its transpose).

    Returns ``out`` in q's shape and dtype (NumPy in, NumPy out; CuPy / ``__dlpack__`` in,
    CuPy out). The oracle is :func:`refattn.paged_attention` (float64). Index arrays are
    copied to the host for the checks. Raises ``ValueError`` / ``TypeError`` for bad
    arguments before launching, ``RuntimeError`` when no device is usable.
    """
    from . import dtype_name, require_device
    names = [dtype_name(x) for x in (q, key_cache, value_cache)]
    if len(set(names)) != 1:
        raise TypeError(f"q, key_cache, value_cache must share one dtype; got q "
                        f"{names[0]}, key_cache {names[1]}, value_cache {names[2]}")
    for x, name in ((block_table, "block_table"), (seq_lens, "seq_lens")):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name} must be an int32 array, got {type(x).__name__}")
    lens_h = _index_host(seq_lens, "seq_lens")
    p = plan(q.shape, key_cache.shape, value_cache.shape, block_table.shape, lens_h.shape,
             names[0], num_splits=num_splits, scale=scale, softcap=softcap,
             max_len=int(lens_h.max(initial=0)))
    check_indices(p, _index_host(block_table, "block_table"), lens_h)
    require_device()
    from . import launch
    (qd, kind), (kd, _), (vd, _) = (launch.to_device(x, p.dtype, n) for x, n in
                                    ((q, "q"), (key_cache, "key_cache"),
                                     (value_cache, "value_cache")))
    out, lse = run(p, qd, kd, vd, _index_device(block_table, "block_table"),
                   _index_device(seq_lens, "seq_lens"))
    if kind == "numpy":
        out = out.get()
        if p.dtype == "bfloat16":
            import ml_dtypes
            out = out.view(ml_dtypes.bfloat16)
        lse = lse.get()
    return (out, lse) if return_lse else out
