"""refattn.gpu.emulator: the real CUDA kernel sources run on the CPU, with checks.

The unmodified kernel sources (every file of ``kernels_spec.ALL_SOURCES``, as
:func:`refattn.gpu.kernels_spec.source` assembles them) are compiled by g++ against a CUDA
emulation header (``cuda_emu.h``; ``cuda_fp16.h`` / ``cuda_bf16.h`` from the CUDA toolkit,
compiled for the host) and run one block at a time, each CUDA thread a fiber:

* ``__syncthreads`` is a block barrier; shuffles, votes, ``__syncwarp``, ``ldmatrix`` and
  ``mma`` are warp collectives that check every non-exited lane of the mask arrives at
  the same call (``ldmatrix``/``mma``: the whole warp); a deadlock is reported, not hung;
* inline PTX runs from its own string: each ``asm volatile("..." : outs : ins)`` is
  rewritten (same line) into a call that parses the PTX and executes it with the PTX
  ISA's semantics — ``cp.async`` ca/cg with src-size, ``commit_group`` / ``wait_group`` /
  ``wait_all``, ``ldmatrix`` m8n8 x1/x2/x4 (``.trans``), ``mma.sync`` m16n8k16 f32 <-
  f16/bf16, ``ex2.approx``; any other instruction is an error;
* checks: ``cp.async`` destinations are poisoned and pending until the issuing thread's
  ``wait_group``; a shadow record per shared-memory byte reports read-after-write,
  write-after-read and write-after-write races between barriers, reads of never-written
  bytes and accesses past the launch's shared size; ``cp.async`` sources outside the
  launch's buffers; lanes that exit while others wait; threads leaving with copies in
  flight; loads and stores past a device array (guard pages) and fiber stack overflows.

Diagnostics come back to Python (:class:`Diagnostic`: kind, file, line, the call chain,
count, block, thread, message) in each :class:`LaunchRecord`. :func:`installed` puts a
CuPy-like module (:func:`cupy_like`) in ``sys.modules["cupy"]`` so the real launch path
(``host.plan``, ``launch.run``, the selfcheck) runs on the emulator. What it does not
check is in ``gpu/emulator/README.md``: NVRTC/ptxas acceptance, hardware memory ordering
and timing, registers, occupancy and speed, large-index overflow, bitwise numerics.
``python -m refattn.gpu.emulator [selfcheck options]`` runs the selfcheck on it.

>>> from refattn.gpu import emulator
>>> ok = emulator.status().startswith("ok")   # g++ and the CUDA headers found
>>> emulator.DEVICE_NAME
'refattn CPU emulator (not a GPU)'
"""
from __future__ import annotations

from .native import (FLAGS, Diagnostic, EmulatorBuildError, EmulatorError,
                    EmulatorLaunchError, Kernel, LaunchRecord, Module, build, cache_dir,
                    compiler_status as status)
from .cupy_like import (DEVICE_NAME, EmulatorDiagnosticsError, cupy_like, installed,
                        kernel_source)
from .source import EmulatorSourceError, assemble, rewrite_asm, translation_unit

__all__ = ["status", "build", "cupy_like", "installed", "kernel_source", "Module", "Kernel",
           "Diagnostic", "LaunchRecord", "EmulatorError", "EmulatorBuildError",
           "EmulatorLaunchError", "EmulatorDiagnosticsError", "EmulatorSourceError",
           "assemble", "rewrite_asm", "translation_unit", "cache_dir", "FLAGS",
           "DEVICE_NAME"]
