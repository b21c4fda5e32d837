"""refattn.gpu: CUDA attention kernels launched through CuPy, checked against the
float64 references.

:func:`flash_attention` is exact softmax attention (FlashAttention-2's forward pass) on
the GPU, with two kernels behind one function:

* ``variant="fast"``: tensor cores (``mma.sync`` m16n8k16, fp16/bf16 inputs, fp32
  accumulation), ``ldmatrix``, ``cp.async`` double buffering, swizzled shared memory,
  online softmax in registers; it mirrors :func:`refattn.tiled_attention`'s block
  algorithm. float32 inputs run the simple kernel.
* ``variant="simple"``: one warp per query row, float32 arithmetic, no shared memory —
  written to be obviously correct.

:func:`flash_attention_backward` computes ``dq, dk, dv`` from the forward's output and
log-sum-exp (FlashAttention-2's backward, :mod:`refattn.gpu.backward`): tensor cores for
fp16/bf16 at D <= 128 (``variant="fast"``), float32 arithmetic otherwise.

Both support head dims 32, 64, 96, 128, 256, causal masks and sliding windows
(bottom-right aligned), GQA/MQA, softcap, any N and M, the log-sum-exp, and block masks
(any refattn mask, classified into the kernel's tiles; empty tiles are skipped).

**Verification status.** Kernels count as verified only when a selfcheck record for the
current kernel sources (sha256 in the record, under ``reports/gpu/``) says so. At the
time of writing no GPU had run these kernels: they compile for sm_80 and sm_90 without
spills (``python -m refattn.gpu.compile_check``) and everything but the launch is tested
on the CPU, but their results are **not verified**. ``gpu/run_on_device.sh`` runs the
selfcheck, the device tests, compute-sanitizer and the benchmark in one go.

Importing never needs CUDA (nor CuPy); :func:`available` says whether a device is usable
and why not, as a result that is false without one:

>>> from refattn import gpu
>>> found = gpu.available()
>>> ok, reason = found                        # it also unpacks
>>> bool(found) == ok and found.reason == reason != ""
True
>>> gpu.plan((8, 500, 64), (2, 700, 64), (2, 700, 64), "float16", causal=True).kernel
'flash_fwd_fast<__half, 64, 64, 64, 4>'
"""
from __future__ import annotations

from typing import NamedTuple

from .host import plan, Plan, UNBOUNDED, dtype_name, flops, reference_mask
from .blockmask import BlockMask, build as build_block_mask
from .paged import paged_decode
from .backward import flash_attention_backward

__all__ = ["device_status", "require_device", "missing_device", "available", "Availability",
           "flash_attention", "plan", "Plan", "UNBOUNDED", "BlockMask", "build_block_mask",
           "dtype_name", "flops", "reference_mask", "paged_decode",
           "flash_attention_backward"]


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


class Availability(NamedTuple):
    """Whether the kernels can run here: true when a CUDA device is usable, false
    otherwise, so ``if refattn.gpu.available():`` takes the GPU branch only with a device.
    ``reason`` is the device's name, or why none is usable. It unpacks as
    ``ok, reason = refattn.gpu.available()``.

    >>> found = Availability(False, "CuPy found no CUDA device")
    >>> bool(found), found.reason
    (False, 'CuPy found no CUDA device')
    >>> found
    Availability(ok=False, reason='CuPy found no CUDA device')
    """

    ok: bool
    reason: str

    def __bool__(self) -> bool:              # a tuple of two would always be true
        return self.ok


def available() -> Availability:
    """:class:`Availability`: true with the device's name as ``reason`` when the kernels
    can run, false with the reason why not (no CuPy, no driver, no device)."""
    status = device_status()
    return Availability(True, status[4:]) if status.startswith("ok") \
        else Availability(False, status)


def missing_device(program: str):
    """For command-line programs: why ``program`` cannot run (no usable device), or
    ``None`` when it can."""
    status = device_status()
    return None if status.startswith("ok") else f"{program} needs a CUDA device: {status}"


def require_device() -> None:
    """Raise ``RuntimeError`` with :func:`device_status`'s reason when no device is
    usable."""
    status = device_status()
    if not status.startswith("ok"):
        raise RuntimeError(f"refattn.gpu needs a CUDA device: {status}")


def flash_attention(q, k, v, *, causal=False, window=None, scale=None, softcap=None,
                    block_mask=None, return_lse=False, variant="fast", check_finite=True):
    """Exact softmax attention on the GPU (FlashAttention-2 forward).

    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, D)``, all
        float16, bfloat16 (NumPy ``ml_dtypes.bfloat16``, PyTorch ``bfloat16``, or CuPy
        ``uint16`` bits) or float32, one dtype; ``Hq`` a multiple of ``Hkv`` (GQA/MQA);
        ``D`` in 32, 64, 96, 128, 256; leading dims broadcast.
    causal : key ``j`` kept for query ``i`` iff ``j <= i + (M - N)`` (bottom-right).
    window : ``w`` or ``(left, right)`` (``None`` for an unbounded side): keep iff
        ``-right <= i + (M - N) - j <= left`` (``refattn.masks.sliding_window``).
    scale : logit scale, ``1/sqrt(D)`` when None.
    softcap : ``s -> softcap * tanh(s / softcap)`` on the scaled logits.
    block_mask : a refattn mask (or ``mask_mod`` function / boolean array, or a
        :class:`BlockMask` built for this call's tiling), the same for every batch and
        head; tiles it leaves empty are skipped.
    return_lse : also return the log-sum-exp ``(..., Hq, N)`` in float32 (``-inf`` for
        rows with no key kept, whose output is 0).
    variant : ``"fast"`` or ``"simple"``.
    check_finite : raise ``ValueError`` if q, k or v hold inf or NaN (one pass over each
        on the device; ``False`` skips it).

    Returns ``out (..., Hq, N, D)`` in the input dtype: NumPy in, NumPy out; CuPy or
    ``__dlpack__`` in, CuPy out (bfloat16 as ``uint16`` bits). Raises ``ValueError`` /
    ``TypeError`` for bad arguments before touching the device, ``RuntimeError`` when no
    device is usable.
    """
    names = [dtype_name(x) for x in (q, k, v)]
    if len(set(names)) != 1:
        raise TypeError(f"q, k, v must share one dtype; got q {names[0]}, k {names[1]}, "
                        f"v {names[2]}")
    p = plan(tuple(q.shape), tuple(k.shape), tuple(v.shape), names[0], causal=causal,
             window=window, scale=scale, softcap=softcap, block_mask=block_mask,
             variant=variant)
    require_device()
    from . import launch
    (qd, kind), (kd, _), (vd, _) = (launch.to_device(x, p.dtype, n)
                                    for x, n in ((q, "q"), (k, "k"), (v, "v")))
    if check_finite:
        for x, n in ((qd, "q"), (kd, "k"), (vd, "v")):
            launch.check_finite(x, p.dtype, n)
    out, lse = launch.run(p, qd, kd, vd)
    if kind == "numpy":
        out = out.get()
        if p.dtype == "bfloat16":
            import ml_dtypes
            out = out.view(ml_dtypes.bfloat16)
        lse = lse.get()
    return (out, lse) if return_lse else out
