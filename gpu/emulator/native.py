"""Compile a kernel source for the emulator with g++, cache the shared object, load it
with ctypes, launch kernels and read their diagnostics.

The runtime (``emu_runtime.cpp``, ``emu_ptx.cpp``, ``emu_shadow.cpp``) is compiled once
into object files; each kernel source becomes one translation unit
(:func:`refattn.gpu.emulator.source.translation_unit`) linked with them into a shared
object named by the sha256 of everything that went into it (compiler, flags, runtime and
translation unit), under :func:`cache_dir`. A second build of the same source and names
only loads the cached file.

>>> compiler_status().startswith(("ok", "no "))
True
>>> FLAGS[:2]
('-std=c++20', '-O1')
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .source import translation_unit

__all__ = ["FLAGS", "EmulatorError", "EmulatorBuildError", "EmulatorLaunchError",
           "Diagnostic", "LaunchRecord", "Module", "Kernel", "cache_dir", "compiler",
           "include_dirs", "compiler_status", "build", "SCALARS", "POINTEES"]

HERE = Path(__file__).resolve().parent
RUNTIME = ("emu_runtime.cpp", "emu_ptx.cpp", "emu_shadow.cpp")
HEADERS = ("cuda_emu.h", "emu_internal.h")
#: g++ flags: C++20 (std::source_location names the call sites of collectives), no
#: strict aliasing (kernels type-pun registers), no TLS init calls for the extern
#: thread_local shared array and built-ins, no FMA contraction, stack probes (a fiber's
#: stack overflow hits its guard page), line tables for diagnostics' call chains.
FLAGS = ("-std=c++20", "-O1", "-g1", "-fPIC", "-fno-strict-aliasing",
         "-fno-extern-tls-init", "-fvisibility=hidden", "-ffp-contract=off",
         "-fstack-clash-protection", "-w")
#: Kernel scalar parameter types -> the NumPy scalar a launch must pass.
SCALARS = {"int": np.int32, "unsigned": np.uint32, "long long": np.int64,
           "unsigned long long": np.uint64, "float": np.float32, "double": np.float64,
           "short": np.int16, "unsigned short": np.uint16, "signed char": np.int8,
           "unsigned char": np.uint8, "bool": np.bool_}
#: Pointer parameter element types -> the device array dtype (bfloat16 travels as uint16).
POINTEES = {**{k: np.dtype(v) for k, v in SCALARS.items()}, "__half": np.dtype(np.float16),
            "__nv_bfloat16": np.dtype(np.uint16)}
_CTYPES = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
           np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float,
           np.float64: ctypes.c_double,
           np.int16: ctypes.c_int16, np.uint16: ctypes.c_uint16, np.int8: ctypes.c_int8,
           np.uint8: ctypes.c_uint8, np.bool_: ctypes.c_bool}
_lock = threading.Lock()
#: One launch at a time in the process: a launch installs process-wide SIGSEGV/SIGBUS
#: handlers (memory faults become diagnostics) and restores them afterwards.
_launch_lock = threading.Lock()
_loaded: dict = {}


class EmulatorError(RuntimeError):
    """The emulator cannot do what was asked (no compiler, bad launch, ...)."""


class EmulatorBuildError(EmulatorError):
    """g++ rejected the translation unit, or the runtime refused a PTX string; the
    message holds the compiler's output or the PTX site."""


class EmulatorLaunchError(EmulatorError, TypeError):
    """A launch whose configuration or arguments a GPU would reject or misread."""


def cache_dir() -> Path:
    """Where built modules are kept: ``$REFATTN_EMULATOR_CACHE``, else
    ``$XDG_CACHE_HOME/refattn/emulator`` (``~/.cache/refattn/emulator``), else a
    folder in the temporary directory when that is not writable."""
    env = os.environ.get("REFATTN_EMULATOR_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        path = Path(base) / "refattn" / "emulator"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"refattn-emulator-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str | None:
    """The C++ compiler: ``$CXX`` or ``g++`` on the PATH (None when there is none)."""
    return shutil.which(os.environ.get("CXX", "g++"))


def include_dirs(extra=()) -> list[str]:
    """The emulator's folder, then ``extra`` (e.g. the CUDA include folder of the NVRTC
    options), then the CUDA headers the compile check finds."""
    from ..compile_check import cuda_include_dir
    dirs = [str(HERE), *extra]
    found = cuda_include_dir()
    if found and found not in dirs:
        dirs.append(found)
    return dirs


def compiler_status() -> str:
    """``"ok: <compiler> <version>; CUDA headers <dir>"``, or why the emulator cannot build
    here (no compiler, no ``cuda_fp16.h``, not x86-64 Linux)."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (g++ or $CXX) on the PATH"
    if os.name != "posix":
        return "no POSIX system: the emulator needs Linux (fibers, mmap, dlopen)"
    heads = [d for d in include_dirs() if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]
    if not heads:
        return ("no CUDA headers (cuda_fp16.h) under $CUDA_PATH, $CUDA_HOME, "
                "/usr/local/cuda or a pip nvidia-cuda-runtime")
    return f"ok: {_version(cxx)}; CUDA headers {heads[0]}"


@functools.lru_cache(maxsize=None)
def _version(cxx: str) -> str:
    done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.stdout else cxx


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cache_dir())
    if done.returncode:
        raise EmulatorBuildError(f"{what} failed:\n$ {' '.join(cmd)}\n"
                                 f"{done.stderr[-20000:]}")


def _atomic_build(target: Path, make) -> None:
    """Build ``target`` through a temporary file and rename it (concurrent builds of the
    same key are harmless)."""
    if target.exists():
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        make(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _runtime_objects(cxx: str, flags: list[str], incs: list[str],
                     version: str) -> list[Path]:
    h = hashlib.sha256("\0".join([version, *flags, *incs]).encode())
    for name in RUNTIME + HEADERS:
        h.update((HERE / name).read_bytes())
    folder = cache_dir() / f"runtime-{h.hexdigest()[:24]}"
    folder.mkdir(parents=True, exist_ok=True)
    objs = [folder / (Path(name).stem + ".o") for name in RUNTIME]

    def one(name, obj):
        _atomic_build(obj, lambda tmp: _run(
            [cxx, *flags, *(f"-I{d}" for d in incs), "-c", str(HERE / name),
             "-o", str(tmp)], f"compiling the emulator runtime {name}"))
    with ThreadPoolExecutor(max_workers=min(len(RUNTIME), os.cpu_count() or 1)) as pool:
        list(pool.map(one, RUNTIME, objs))   # list(): re-raise a build error
    return objs


#: Built modules kept in the cache (the oldest beyond this are deleted after a build).
KEEP = 96


def _prune(keep: int) -> None:
    mods = sorted(cache_dir().glob("module-*.so"), key=lambda p: p.stat().st_mtime)
    for old in mods[:max(0, len(mods) - keep)]:
        for p in (old, old.with_suffix(".cpp")):
            try:
                p.unlink()
            except OSError:
                pass


def build(code: str, names, *, include=(), file: str = "<source>"):
    """The :class:`Module` of CUDA source ``code`` with the kernel instantiations
    ``names`` (NVRTC name expressions), compiled (or taken from the cache) and loaded.
    ``include``: extra include folders; ``file``: the source's name in diagnostics when
    ``code`` has no ``#line`` directives. The emulator compiles C++20 whatever the NVRTC
    ``--std`` option (it needs ``std::source_location``)."""
    status = compiler_status()
    if not status.startswith("ok"):
        raise EmulatorError(f"the emulator cannot build here: {status}")
    names = list(dict.fromkeys(names))
    tu = translation_unit(code, names, file)
    cxx = compiler()
    version = _version(cxx)
    flags, incs = list(FLAGS), include_dirs(include)
    key = hashlib.sha256("\0".join([version, *flags, *incs, tu]).encode())
    for name in RUNTIME + HEADERS:
        key.update((HERE / name).read_bytes())
    digest = key.hexdigest()
    with _lock:
        if digest in _loaded:
            return _loaded[digest]
    target = cache_dir() / f"module-{digest[:32]}.so"
    start = time.perf_counter()
    built = not target.exists()
    if built:
        objs = _runtime_objects(cxx, flags, incs, version)

        def make(tmp: Path):
            src = tmp.with_suffix(".cpp")
            src.write_text(tu)
            try:
                _run([cxx, *flags, *(f"-I{d}" for d in incs), "-shared", "-Wl,-Bsymbolic",
                      str(src), *map(str, objs), "-o", str(tmp)],
                     "compiling the kernel source for the emulator")
            except EmulatorBuildError:
                src.unlink()
                raise
            os.replace(src, target.with_suffix(".cpp"))   # kept for reading diagnostics
        _atomic_build(target, make)
        _prune(keep=KEEP)
    module = Module(target, names, time.perf_counter() - start if built else 0.0, code)
    with _lock:
        return _loaded.setdefault(digest, module)


@dataclass
class Diagnostic:
    """One finding of a launch (several equal findings, same kind and line, are counted).

    ``kind``: ``race-raw``, ``race-war``, ``race-waw``, ``pending-read``,
    ``pending-write``, ``uninitialized-read``, ``shared-out-of-bounds``,
    ``global-out-of-bounds``, ``misaligned``, ``collective-mismatch``,
    ``collective-exited``, ``collective-mask``, ``shuffle-inactive-source``,
    ``shuffle-width``, ``deadlock``, ``barrier-mismatch``, ``barrier-after-exit``,
    ``cp-async-outstanding``, ``cp-async-src-size``, ``not-shared``; ``fatal`` ones
    stop the launch. ``chain``: the source lines of the calls that led there, innermost
    first (when the line tables allow)."""

    kind: str
    fatal: bool
    file: str
    line: int
    count: int
    block: tuple
    thread: int
    message: str
    chain: list = field(default_factory=list)

    def __str__(self) -> str:
        via = f" [via {' <- '.join(self.chain)}]" if self.chain else ""
        return (f"{self.file}:{self.line}: {self.kind}{' (fatal)' if self.fatal else ''}"
                f" x{self.count}, block {self.block}: {self.message}{via}")


@dataclass
class LaunchRecord:
    """A launch: kernel, configuration, whether it ran to the end, its diagnostics, and
    ``buffers``: ``(address, nbytes)`` of each pointer argument, in parameter order (which
    device memory the kernel got: tests check that arrays stayed where they were and
    that every buffer is 16-byte aligned)."""

    kernel: str
    grid: tuple
    block: tuple
    shared_mem: int
    completed: bool
    diagnostics: list
    seconds: float
    buffers: tuple = ()


class Module:
    """A built and loaded emulator module: ``get_function(name)`` as CuPy's RawModule."""

    def __init__(self, path: Path, names: list[str], build_seconds: float, code: str):
        self.path, self.names, self.code = path, names, code
        self.build_seconds = build_seconds
        self.lib = lib = ctypes.CDLL(str(path))
        lib.emu_init.restype = ctypes.c_char_p
        lib.emu_kernel_name.restype = ctypes.c_char_p
        lib.emu_kernel_signature.restype = ctypes.c_char_p
        lib.emu_smem_capacity.restype = ctypes.c_uint
        lib.emu_diagnostics.restype = ctypes.c_long
        lib.emu_diagnostics.argtypes = [ctypes.c_char_p, ctypes.c_long]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                   ctypes.POINTER(ctypes.c_uint), ctypes.c_uint,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_uint64),
                                   ctypes.POINTER(ctypes.c_uint64)]
        err = lib.emu_init()
        if err:
            raise EmulatorBuildError(f"the emulator cannot run this source: {err.decode()}")
        self.kernels = {lib.emu_kernel_name(i).decode(): i
                        for i in range(lib.emu_nkernels())}

    def get_function(self, name: str) -> "Kernel":
        if name not in self.kernels:
            raise EmulatorError(f"kernel {name!r} was not among the name expressions "
                                f"{sorted(self.kernels)}")
        return Kernel(self, name)


def _addr2line(path: Path, offsets: list[int]) -> dict:
    """Return-address offset -> ``["file:line", ...]`` of the call (innermost inlined
    function first), when addr2line and the line tables allow."""
    tool = shutil.which("addr2line")
    if not tool or not offsets:
        return {}
    done = subprocess.run([tool, "-i", "-a", "-e", str(path),
                           *(hex(o - 1) for o in offsets)], capture_output=True, text=True)
    out, current, cwd = {}, None, str(cache_dir()) + os.sep
    for ln in done.stdout.splitlines() if done.returncode == 0 else []:
        if ln.startswith("0x"):
            current = out.setdefault(int(ln, 16) + 1, [])
        elif current is not None and not ln.startswith("??"):
            where = ln.split(" (")[0]
            where = where[len(cwd):] if where.startswith(cwd) else where
            if not where.startswith(str(HERE)):   # frames inside the emulation header
                current.append(where)
    return out


class Kernel:
    """One kernel of a :class:`Module`, launched like ``cupy.RawKernel``:
    ``kernel(grid, block, args, shared_mem=0)``. Arguments are checked against the
    kernel's parameter list as g++ instantiated it (count; C-contiguous device arrays of
    the right dtype, aligned to their element, for pointers; NumPy scalars of the exact
    type for scalars) as a GPU would misread anything else. Returns the
    :class:`LaunchRecord` (CuPy returns None)."""

    def __init__(self, module: Module, name: str):
        self.module, self.name = module, name
        self.index = module.kernels[name]
        sig = module.lib.emu_kernel_signature(self.index).decode()
        self.params = sig.split(",") if sig else []
        self.max_dynamic_shared_size_bytes = 48 * 1024
        #: which arguments are device arrays (the CuPy-like module: its ``ndarray``)
        self.is_device = lambda a: hasattr(a, "data") and hasattr(a.data, "ptr")
        #: called with each :class:`LaunchRecord` (the CuPy-like module logs them)
        self.on_launch = None

    def _pack(self, args, is_device):
        if len(args) != len(self.params):
            raise EmulatorLaunchError(f"{self.name} takes {len(self.params)} arguments "
                                      f"({', '.join(self.params)}), got {len(args)}")
        keep, ptrs, lo, hi = [], [], [], []
        for i, (ptype, arg) in enumerate(zip(self.params, args)):
            if ptype.endswith("*"):
                want = POINTEES.get(ptype.replace("const ", "")[:-1])
                if not is_device(arg):
                    raise EmulatorLaunchError(f"argument {i} ({ptype}) of {self.name} "
                                              f"must be a device array, got "
                                              f"{type(arg).__name__}")
                if want is None or arg.dtype != want:
                    raise EmulatorLaunchError(f"argument {i} ({ptype}) of {self.name} "
                                              f"points to {want}, got a {arg.dtype} array")
                if not arg.flags.c_contiguous:
                    raise EmulatorLaunchError(f"argument {i} ({ptype}) of {self.name} is "
                                              f"not C-contiguous (strides {arg.strides}): "
                                              f"the kernel would read it as contiguous")
                if arg.data.ptr % want.alignment:
                    raise EmulatorLaunchError(
                        f"argument {i} ({ptype}) of {self.name} is at address "
                        f"{arg.data.ptr:#x}, not a multiple of {want.alignment}: a GPU "
                        f"faults on the first access (misaligned address)")
                p = ctypes.c_void_p(arg.data.ptr)
                lo.append(arg.data.ptr)
                hi.append(arg.data.ptr + arg.nbytes)
            else:
                want = SCALARS.get(ptype)
                if want is None or type(arg) is not want:
                    raise EmulatorLaunchError(
                        f"argument {i} ({ptype}) of {self.name} must be a "
                        f"{getattr(want, '__name__', ptype)} scalar, got "
                        f"{type(arg).__name__} {arg!r} (a GPU would read its bytes as "
                        f"{ptype})")
                p = _CTYPES[want](arg.item() if hasattr(arg, "item") else arg)
            keep.append(p)
            ptrs.append(ctypes.cast(ctypes.pointer(p), ctypes.c_void_p))
        return keep, ptrs, lo, hi

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        grid, block = tuple(grid), tuple(block)
        if len(grid) != 3 or len(block) != 3 or min(grid + block) < 1 \
                or any(not isinstance(g, (int, np.integer)) for g in grid + block):
            raise EmulatorLaunchError(f"grid {grid} and block {block} must be three "
                                      f"positive integers each")
        if block[0] * block[1] * block[2] > 1024 or grid[1] > 65535 or grid[2] > 65535:
            raise EmulatorLaunchError(f"invalid launch: block {block} (at most 1024 "
                                      f"threads), grid {grid} (y and z at most 65535)")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise EmulatorLaunchError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the "
                f"kernel's max_dynamic_shared_size_bytes "
                f"({self.max_dynamic_shared_size_bytes}): CUDA_ERROR_INVALID_VALUE")
        keep, ptrs, lo, hi = self._pack(args, self.is_device)
        n = len(ptrs)
        lib = self.module.lib
        start = time.perf_counter()
        with _launch_lock:
            rc = lib.emu_launch(self.index, (ctypes.c_uint * 3)(*map(int, grid)),
                                (ctypes.c_uint * 3)(*map(int, block)), int(shared_mem),
                                (ctypes.c_void_p * max(n, 1))(*[p.value for p in ptrs]),
                                len(lo), (ctypes.c_uint64 * max(len(lo), 1))(*lo),
                                (ctypes.c_uint64 * max(len(hi), 1))(*hi))
            size = lib.emu_diagnostics(None, 0)
            buf = ctypes.create_string_buffer(size)
            lib.emu_diagnostics(buf, size)
        seconds = time.perf_counter() - start
        del keep
        if rc < 0:
            raise EmulatorLaunchError(f"{self.name}: the emulator refused the launch grid "
                                      f"{grid} block {block} shared {shared_mem}")
        record = LaunchRecord(self.name, grid, block, int(shared_mem), rc == 0,
                              self._diagnostics(buf.value.decode()), seconds,
                              tuple((a, b - a) for a, b in zip(lo, hi)))
        if self.on_launch is not None:
            self.on_launch(record)
        return record

    def _diagnostics(self, text: str) -> list:
        out, offsets = [], {}
        for row in text.splitlines():
            kind, fatal, file, line, count, block, tid, ra, msg = row.split("\t", 8)
            d = Diagnostic(kind, fatal == "1", file, int(line), int(count),
                           tuple(int(b) for b in block.split(",")), int(tid), msg)
            out.append(d)
            if int(ra, 16):
                offsets.setdefault(int(ra, 16), []).append(d)
        for off, chain in _addr2line(self.module.path, list(offsets)).items():
            for d in offsets[off]:
                d.chain = chain
                if not d.file and chain:   # a memory fault: where the faulting code is
                    d.file, _, line = chain[0].rpartition(":")
                    d.line = int(line) if line.isdigit() else 0
        return out
