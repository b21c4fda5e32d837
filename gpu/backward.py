"""FlashAttention-2's backward on the GPU: argument checks, the launch plan, the launches,
and :func:`flash_attention_backward`.

Given the forward's ``q (..., Hq, N, D)``, ``k, v (..., Hkv, M, D)``, its output ``o`` and
log-sum-exp ``lse (..., Hq, N)`` (float32, natural log, ``-inf`` for rows with no key
kept) and the output's cotangent ``do``, the gradients (Dao 2023, Algorithm 2) with
``P = exp(S - lse)`` recomputed (softcap ``c``; without it ``dS' = dS · scale``):

    delta_i = rowsum(dO ∘ O)_i,   dV = Pᵀ dO,   dS = P ∘ (dO Vᵀ - delta),
    dQ = dS' K,   dK = dS'ᵀ Q,   dS' = dS · scale · (1 - tanh²(scale qk / c))

Three launches from ``kernels/flash_bwd.cu`` (deterministic, no atomics):
``flash_bwd_preprocess`` (delta, float32), then the dk/dv kernel (parallel over keys; the
``Hq / Hkv`` query heads of a KV head summed in its loop, so GQA needs no atomics) and
the dq kernel (parallel over query rows, recomputing S and dP). ``variant="fast"`` with
fp16/bf16 and D <= 128 runs the tensor-core pair (``flash_bwd_dkdv_fast``: one block
per 16·warps keys, ``flash_bwd_dq_fast``: one block per 64-row query tile; ``mma.sync``
m16n8k16, ``ldmatrix``, ``cp.async`` double buffering, fp32 accumulation); otherwise
(float32, D = 256, ``variant="simple"``) the simple pair (one warp per key row / query
row, float32 arithmetic). The masks are the forward's (:mod:`refattn.gpu.host`:
bottom-right band, block masks as CSR tile lists); the dk/dv kernel walks a block
mask's tiles key-major (:func:`transpose_tiles`).

Everything here but :func:`run` and :func:`flash_attention_backward` (which need CuPy
and a device, or the CPU emulator's CuPy-like module) runs on the CPU:

>>> p = plan((2, 8, 1000, 128), (2, 2, 1000, 128), (2, 2, 1000, 128), "bfloat16",
...          causal=True)
>>> p.dkdv_kernel, p.dkdv_grid, p.dkdv_block, p.dkdv_shared
('flash_bwd_dkdv_fast<__nv_bfloat16, 128, 64, 64>', (16, 2, 2), (128, 1, 1), 98304)
>>> p.dq_kernel, p.dq_grid
('flash_bwd_dq_fast<__nv_bfloat16, 128, 64, 64, 4>', (16, 8, 2))
>>> plan((2, 8, 1000, 128), (2, 2, 1000, 128), (2, 2, 1000, 128), "float32").dq_grid
(250, 8, 2)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from refattn.boundary import dtype_name as array_dtype_name

from . import host, kernels_spec as ks
from .blockmask import BlockMask

__all__ = ["BackwardPlan", "plan", "transpose_tiles", "run", "flash_attention_backward"]

_ROWS_PER_BLOCK = 4
_lock = threading.Lock()


@dataclass(frozen=True)
class BackwardPlan:
    """A checked backward call: the forward's plan (problem, scalars, block mask tiles),
    the three kernels and their grids, and the key-major tile lists."""

    forward: host.Plan
    variant: str
    preprocess_kernel: str
    dkdv_kernel: str
    dq_kernel: str
    preprocess_grid: tuple
    dkdv_grid: tuple
    dkdv_block: tuple
    dkdv_shared: int
    dq_grid: tuple
    dq_block: tuple
    dq_shared: int
    tiles_by_key: tuple | None   # (indptr, tile_q, tile_bits) int32, or None

    def __getattr__(self, name):   # n, m, d, heads_q, dtype, scale, left, tiles, ...
        if name.startswith("__") or name == "forward":
            raise AttributeError(name)
        return getattr(self.forward, name)

    def grad_shapes(self) -> tuple:
        """``(dq, dk, dv)`` shapes."""
        kv = self.batch_shape + (self.heads_kv, self.m, self.d)
        return self.out_shape(), kv, kv


def transpose_tiles(bm: BlockMask) -> tuple:
    """A block mask's tile lists, key-major: ``(indptr, tile_q, tile_bits)`` with
    ``tile_q[indptr[c]:indptr[c+1]]`` the query tiles visited for key tile ``c`` (in
    increasing order) and ``tile_bits`` their bitmaps' indices (``-1``: FULL).

    >>> import refattn as ra
    >>> from refattn.gpu.blockmask import build
    >>> t = transpose_tiles(build(ra.masks.causal(), 100, 100, 64, 32))
    >>> [a.tolist() for a in t]
    [[0, 2, 4, 5, 6], [0, 1, 0, 1, 1, 1], [0, -1, 1, -1, 2, 3]]
    """
    n_k = -(-bm.m // bm.block_k)
    q_of = np.repeat(np.arange(len(bm.indptr) - 1), np.diff(bm.indptr))
    order = np.lexsort((q_of, bm.tile_k))
    indptr = np.zeros(n_k + 1, np.int64)
    indptr[1:] = np.cumsum(np.bincount(bm.tile_k, minlength=n_k))
    return (indptr.astype(np.int32), q_of[order].astype(np.int32),
            bm.tile_bits[order].astype(np.int32))


def plan(q_shape, k_shape, v_shape, dtype: str, *, causal=False, window=None, scale=None,
         softcap=None, block_mask=None, variant="fast") -> BackwardPlan:
    """Check a backward call and compute its launches (the forward's checks,
    :func:`refattn.gpu.host.plan`; q, k and v must share their leading dims)."""
    fwd = host.plan(q_shape, k_shape, v_shape, dtype, causal=causal, window=window,
                    scale=scale, softcap=softcap, block_mask=block_mask, variant="simple")
    if not (tuple(q_shape[:-3]) == tuple(k_shape[:-3]) == tuple(v_shape[:-3])):
        raise ValueError(f"the GPU backward needs q, k and v with equal leading dims (no "
                         f"broadcasting); got q {tuple(q_shape)}, k {tuple(k_shape)}, "
                         f"v {tuple(v_shape)}")
    pre, dkdv, dq = ks.backward_kernel_names(variant, dtype, fwd.d)
    rows = _ROWS_PER_BLOCK
    bm, bn, warps = fwd.block_q, fwd.block_k, ks.tiles(fwd.d)[2]
    b, hq, hkv, n, m = fwd.batch, fwd.heads_q, fwd.heads_kv, fwd.n, fwd.m
    simple = ((-(-n // rows), hq, b), (32 * rows, 1, 1))
    if "_fast<" in dq:
        dq_launch = ((-(-n // bm), hq, b), (32 * warps, 1, 1))
        dkdv_launch = ((-(-m // bn), hkv, b), (32 * (bn // 16), 1, 1))
    else:
        dq_launch, dkdv_launch = simple, ((-(-m // rows), hkv, b), (32 * rows, 1, 1))
    t = None if fwd.tiles is None else transpose_tiles(fwd.tiles)
    return BackwardPlan(fwd, variant, pre, dkdv, dq, simple[0], *dkdv_launch,
                        ks.backward_shared_bytes(dkdv), *dq_launch,
                        ks.backward_shared_bytes(dq), t)


def _module():
    """One module holding every backward instantiation (one NVRTC build), per device."""
    import cupy

    from . import launch
    key = (cupy.cuda.Device().id, ks.BACKWARD)
    with _lock:
        mod = launch.module_cache.get(key)
        if mod is None:
            from .compile_check import cuda_include_dir
            inc = cuda_include_dir()
            names = [i.name for i in ks.backward_instantiations()]
            mod = cupy.RawModule(code=ks.source(ks.BACKWARD),
                                 options=ks.NVRTC_OPTIONS + ((f"-I{inc}",) if inc else ()),
                                 name_expressions=names)
            launch.module_cache[key] = mod
    return mod


def _check_buffer(name, arr, shape, dt):
    if tuple(arr.shape) != tuple(shape) or arr.dtype != dt or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous {np.dtype(dt)} array of shape "
                         f"{tuple(shape)}, got {arr.dtype} {tuple(arr.shape)}")


def run(p: BackwardPlan, q, k, v, o, do, lse, dq=None, dk=None, dv=None, delta=None):
    """Launch the backward of ``p`` on device arrays (the kernel's element type, float32
    ``lse``, contiguous); fills and returns ``(dq, dk, dv)``. The outputs and the float32
    ``delta (..., Hq, N)`` scratch may be given (poisoned buffers in tests)."""
    import cupy
    elem = np.dtype({"float16": "float16", "float32": "float32",
                     "bfloat16": "uint16"}[p.dtype])
    sq, skv, _ = p.grad_shapes()
    for name, arr, shape, dt in (("q", q, sq, elem), ("k", k, skv, elem),
                                 ("v", v, skv, elem), ("o", o, sq, elem),
                                 ("do", do, sq, elem),
                                 ("lse", lse, p.lse_shape(), np.float32)):
        _check_buffer(name, arr, shape, dt)
    dq = cupy.empty(sq, elem) if dq is None else dq
    dk = cupy.empty(skv, elem) if dk is None else dk
    dv = cupy.empty(skv, elem) if dv is None else dv
    delta = cupy.empty(p.lse_shape(), cupy.float32) if delta is None else delta
    for name, arr, shape, dt in (("dq", dq, sq, elem), ("dk", dk, skv, elem),
                                 ("dv", dv, skv, elem),
                                 ("delta", delta, p.lse_shape(), np.float32)):
        _check_buffer(name, arr, shape, dt)
    if p.batch == 0:
        return dq, dk, dv
    if p.tiles_by_key is not None:
        fwd_lists = [cupy.asarray(a) for a in (p.tiles.indptr, p.tiles.tile_k,
                                               p.tiles.tile_bits)]
        key_lists = [cupy.asarray(a) for a in p.tiles_by_key]
        bits, use_list = cupy.asarray(p.tiles.bits), 1
    else:
        dummy = cupy.zeros(1, cupy.int32)
        fwd_lists = key_lists = [dummy, dummy, dummy]
        bits, use_list = cupy.zeros(1, cupy.uint32), 0
    mod = _module()
    i32, f32, i64 = np.int32, np.float32, np.int64
    scalars = (i32(p.batch), i32(p.heads_q), i32(p.heads_kv), i32(p.n), i32(p.m),
               f32(p.scale), f32(p.softcap), i64(p.left), i64(p.right))
    if p.n > 0:
        mod.get_function(p.preprocess_kernel)(
            p.preprocess_grid, (32 * _ROWS_PER_BLOCK, 1, 1),
            (o, do, delta, i32(p.heads_q), i32(p.n)))
    if p.m > 0:
        _function(mod, p.dkdv_kernel, p.dkdv_shared)(
            p.dkdv_grid, p.dkdv_block, (q, k, v, do, lse, delta, dk, dv, *scalars,
                                        *key_lists, bits, i32(use_list)),
            shared_mem=p.dkdv_shared)
    if p.n > 0:
        _function(mod, p.dq_kernel, p.dq_shared)(
            p.dq_grid, p.dq_block, (q, k, v, do, lse, delta, dq, *scalars, *fwd_lists,
                                    bits, i32(use_list)), shared_mem=p.dq_shared)
    return dq, dk, dv


def _function(mod, name: str, shared: int):
    fn = mod.get_function(name)
    if shared > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared:
        fn.max_dynamic_shared_size_bytes = shared
    return fn


def flash_attention_backward(q, k, v, o, do, lse, *, causal=False, window=None, scale=None,
                             softcap=None, block_mask=None, variant="fast",
                             check_finite=True):
    """Gradients ``(dq, dk, dv)`` of :func:`refattn.gpu.flash_attention` on the GPU
    (FlashAttention-2's backward; see :mod:`refattn.gpu.backward`).

    q, k, v : the forward's inputs (``(..., Hq, N, D)``, ``(..., Hkv, M, D)``, equal
        leading dims), float16, bfloat16 or float32, one dtype.
    o, do : the forward's output and its cotangent, ``q``'s shape and dtype.
    lse : the forward's log-sum-exp ``(..., Hq, N)``, float32, natural log
        (``flash_attention(..., return_lse=True)``); ``-inf`` rows contribute nothing.
    causal, window, scale, softcap, block_mask : as in the forward (the same values).
    variant : ``"fast"`` (tensor cores for fp16/bf16 at D <= 128) or ``"simple"``.
    check_finite : raise ``ValueError`` if q, k, v, o or do hold inf or NaN.

    Returns ``dq, dk, dv`` in the input dtype, in q's and k's shapes (dk, dv summed over
    each KV head's query heads); NumPy in, NumPy out; CuPy or ``__dlpack__`` in, CuPy
    out (bfloat16 as ``uint16`` bits). Raises ``ValueError`` / ``TypeError`` for bad
    arguments before touching the device, ``RuntimeError`` when no device is usable.
    """
    from . import require_device
    names = [host.dtype_name(x) for x in (q, k, v, o, do)]
    if len(set(names)) != 1:
        raise TypeError(f"q, k, v, o, do must share one dtype; got q {names[0]}, k "
                        f"{names[1]}, v {names[2]}, o {names[3]}, do {names[4]}")
    p = plan(tuple(q.shape), tuple(k.shape), tuple(v.shape), names[0], causal=causal,
             window=window, scale=scale, softcap=softcap, block_mask=block_mask,
             variant=variant)
    for x, name in ((o, "o"), (do, "do")):
        if tuple(x.shape) != p.out_shape():
            raise ValueError(f"{name} must have q's shape {p.out_shape()}, got "
                             f"{tuple(x.shape)}")
    if getattr(lse, "shape", None) is None or tuple(lse.shape) != p.lse_shape():
        raise ValueError(f"lse must have shape {p.lse_shape()} (q's without D), got "
                         f"{tuple(getattr(lse, 'shape', ()))}")
    if array_dtype_name(lse) != "float32":
        raise TypeError(f"lse must be float32 (as the forward returns it), got "
                        f"{array_dtype_name(lse)}")
    require_device()
    from . import launch
    dev = [launch.to_device(x, p.dtype, n) for x, n in ((q, "q"), (k, "k"), (v, "v"),
                                                        (o, "o"), (do, "do"))]
    if check_finite:
        for (x, _), n in zip(dev, ("q", "k", "v", "o", "do")):
            launch.check_finite(x, p.dtype, n)
    lse_d, _ = launch.to_device(lse, "float32", "lse")
    dq, dk, dv = run(p, *(x for x, _ in dev), lse_d)
    if dev[0][1] == "numpy":
        out = []
        for g in (dq, dk, dv):
            g = g.get()
            if p.dtype == "bfloat16":
                import ml_dtypes
                g = g.view(ml_dtypes.bfloat16)
            out.append(g)
        dq, dk, dv = out
    return dq, dk, dv
