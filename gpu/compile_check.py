"""Compile-only check of every kernel instantiation with NVRTC, no GPU needed.

``python -m refattn.gpu.compile_check`` compiles each kernel source (the forward kernels,
the paged decode pair and the backward,
:func:`~refattn.gpu.kernels_spec.all_instantiations`) once per
architecture (:data:`~refattn.gpu.kernels_spec.ARCHS`, sm_80 and sm_90) with all its
template instantiations as NVRTC name expressions, straight to CUBIN with
``-Xptxas=-v``, and reads ptxas' report: registers, barriers, stack frame, spill stores
and loads per kernel. It fails (exit status 1) on a compile error, a spill or any local
memory (a non-zero stack frame), and prints one line per instantiation and architecture:
registers, static shared memory (ptxas) and dynamic shared memory (the launch's), stack
frame and spill bytes.
It uses ``cuda.bindings.nvrtc`` (``pip install cuda-bindings nvidia-cuda-nvrtc``) and the
CUDA headers (``$CUDA_PATH/include``, ``$CUDA_HOME/include``,
``/usr/local/cuda/include`` or a pip ``nvidia-cuda-runtime``'s, found by
``cuda.pathfinder``), because CuPy's own compile path asks a device for its
architecture first.

>>> from refattn.gpu.compile_check import parse_ptxas
>>> log = '''ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
... ptxas info    : Function properties for _Z1fv
...     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
... ptxas info    : Used 255 registers, used 1 barriers, 368 bytes cmem[0]'''
>>> parse_ptxas(log)['_Z1fv']
{'registers': 255, 'stack': 8, 'spill_stores': 4, 'spill_loads': 4, 'smem_static': 0}
"""
from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import kernels_spec as ks

__all__ = ["nvrtc_status", "cuda_include_dir", "nvrtc_options", "compile_source",
           "parse_ptxas", "Result", "run", "main"]


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include directory (holding ``cuda_fp16.h``), or None."""
    for env in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(env)
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    default = "/usr/local/cuda/include"
    if os.path.isfile(os.path.join(default, "cuda_fp16.h")):
        return default
    try:   # the headers of a pip-installed CUDA runtime (nvidia-cuda-runtime), if any
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory("cudart")
    except Exception:
        return None
    return found if found and os.path.isfile(os.path.join(found, "cuda_fp16.h")) else None


def nvrtc_status() -> str:
    """``"ok: NVRTC <version>"`` when the check can run here, else why not."""
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return f"NVRTC is not usable ({err})"
    except Exception as exc:
        return (f"cuda.bindings.nvrtc is not importable ({type(exc).__name__}: {exc}); "
                f"pip install cuda-bindings nvidia-cuda-nvrtc")
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h) under $CUDA_PATH, $CUDA_HOME or /usr/local/cuda"
    return f"ok: NVRTC {major}.{minor}"


def nvrtc_options(arch: str, include_dir: str | None = None) -> list[str]:
    """NVRTC options of the check (the run-time build uses the same minus ``-Xptxas``)."""
    opts = [f"--gpu-architecture={arch}", *ks.NVRTC_OPTIONS, "-Xptxas=-v"]
    if include_dir:
        opts.append(f"-I{include_dir}")
    return opts


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """``mangled name -> {registers, stack, spill_stores, spill_loads, smem_static}``
    from a ``ptxas -v`` log."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"registers": 0, "stack": 0, "spill_stores": 0,
                            "spill_loads": 0, "smem_static": 0}
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = _SMEM.search(m.group(2))
            out[current]["smem_static"] = int(s.group(1)) if s else 0
    return out


@dataclass
class Result:
    """One source compiled for one architecture."""

    kernel: str
    arch: str
    ok: bool
    log: str
    kernels: dict = field(default_factory=dict)   # name expression -> ptxas figures
    error: str = ""


def _check(result, what):
    err = result[0]
    from cuda.bindings import nvrtc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def compile_source(kernel: str, arch: str, names: list[str]) -> Result:
    """Compile ``kernel``'s source for ``arch`` with ``names`` as name expressions."""
    from cuda.bindings import nvrtc
    src = ks.source(kernel).encode()
    prog = _check(nvrtc.nvrtcCreateProgram(src, ks.ALL_SOURCES[kernel].encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in nvrtc_options(arch, cuda_include_dir())]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.decode(errors="replace").rstrip("\0")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return Result(kernel, arch, False, log, error=f"compile failed: {err}")
        figures = parse_ptxas(log)
        kernels = {}
        for name in names:
            lowered = _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()),
                             "nvrtcGetLoweredName")
            lowered = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
            kernels[name] = figures.get(lowered)
        missing = [n for n, f in kernels.items() if f is None]
        error = f"no ptxas report for {missing}" if missing else ""
        return Result(kernel, arch, not missing, log, kernels, error)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def run(archs=ks.ARCHS, workers: int = 4) -> list[Result]:
    """Compile every source for every architecture (in parallel threads)."""
    by_kernel = {}
    for inst in ks.all_instantiations():
        by_kernel.setdefault(inst.kernel, []).append(inst.name)
    jobs = [(kern, arch, names) for kern, names in by_kernel.items() for arch in archs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: compile_source(*job), jobs))


def problems(results: list[Result]) -> list[str]:
    """Every failure: compile errors, spills, local memory."""
    bad = []
    for r in results:
        if not r.ok:
            bad.append(f"{r.kernel} {r.arch}: {r.error}\n{r.log[-4000:]}")
        for name, f in r.kernels.items():
            if f and (f["spill_stores"] or f["spill_loads"] or f["stack"]):
                bad.append(f"{name} {r.arch}: {f['spill_stores']} B spill stores, "
                           f"{f['spill_loads']} B spill loads, {f['stack']} B stack frame")
    return bad


def table(results: list[Result]) -> str:
    """One line per instantiation and architecture."""
    dyn = {i.name: ks.launch_shared_bytes(i) for i in ks.all_instantiations()}
    lines = [f"{'instantiation':48} {'arch':6} {'regs':>4} {'smem st':>7} {'smem dyn':>8} "
             f"{'stack':>5} {'spill st/ld':>11}"]
    for r in results:
        for name, f in r.kernels.items():
            if f:
                lines.append(f"{name:48} {r.arch:6} {f['registers']:4d} {f['smem_static']:7d} "
                             f"{dyn[name]:8d} {f['stack']:5d} "
                             f"{f['spill_stores']:5d}/{f['spill_loads']:<5d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    status = nvrtc_status()
    if not status.startswith("ok"):
        print(f"compile check cannot run: {status}", file=sys.stderr)
        return 2
    results = run()
    print(table(results))
    bad = problems(results)
    for b in bad:
        print("FAIL", b, file=sys.stderr)
    n = sum(len(r.kernels) for r in results)
    print(f"{status}; {n} kernel builds, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
