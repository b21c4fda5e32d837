"""A CuPy-like module whose "device" is host memory and whose kernels run on the emulator.

:func:`cupy_like` makes a module object with the parts of CuPy that ``refattn.gpu`` uses
(``ndarray``, ``asarray``, ``empty``, ``zeros``, ``full``, ``RawModule``, ``cuda.Device``,
``cuda.runtime`` ...). :func:`installed` puts it in ``sys.modules["cupy"]`` (and gives
``refattn.gpu.launch`` an empty module cache) for the duration of a ``with`` block, so
:func:`refattn.gpu.flash_attention`, :func:`refattn.gpu.launch.run` and the selfcheck
launch the real kernel sources exactly as they would with CuPy: ``RawModule(code=...,
options=..., name_expressions=[...])`` compiles ``code`` with g++ against the emulation
header, and a launch checks its arguments against the kernel's parameter types. A
``code`` equal to :func:`refattn.gpu.kernels_spec.source` of any key of
``kernels_spec.ALL_SOURCES`` is compiled as that file (with ``#line`` directives, so
diagnostics name it), with all of its instantiations in one build.

Every launch is recorded (``cp.launches``: kernel, grid, block, shared memory, whether it
completed, its :class:`~refattn.gpu.emulator.native.Diagnostic` list); with
``strict=True`` a launch with diagnostics raises :class:`EmulatorDiagnosticsError`.

>>> cp = cupy_like()
>>> x = cp.asarray([1.0, 2.0], dtype="float32")
>>> isinstance(x, cp.ndarray), x.data.ptr % 16, x.get().tolist()
(True, 0, [1.0, 2.0])
>>> cp.cuda.runtime.getDeviceProperties(0)["name"]
b'refattn CPU emulator (not a GPU)'
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import types
from importlib import resources

import numpy as np

from .. import kernels_spec as ks
from .native import EmulatorError, build
from .source import assemble

__all__ = ["ndarray", "cupy_like", "installed", "kernel_source", "EmulatorDiagnosticsError",
           "DEVICE_NAME"]

DEVICE_NAME = "refattn CPU emulator (not a GPU)"
_ALIGN = 16    # cp.async moves 16-byte chunks; arrays end 16-byte aligned at a guard page


class EmulatorDiagnosticsError(EmulatorError):
    """A strict launch produced diagnostics (``.record`` holds the launch)."""

    def __init__(self, record):
        self.record = record
        lines = "\n".join(str(d) for d in record.diagnostics)
        super().__init__(f"{record.kernel}: {len(record.diagnostics)} diagnostics"
                         f"{'' if record.completed else ' (launch stopped)'}:\n{lines}")


class _Memory:
    def __init__(self, ptr):
        self.ptr = ptr


class ndarray(np.ndarray):
    """An emulator device array: a NumPy array posing as a CuPy one (``.get()``,
    ``.data.ptr``), in memory followed by a guard page (see ``_alloc``)."""

    def copy(self, order="C"):
        """A C-contiguous copy in fresh emulator memory (guard pages, 16-byte aligned),
        as ``cupy.ndarray.copy`` gives a fresh device allocation."""
        if order not in ("C", "A", "K"):
            raise ValueError(f"the emulator's ndarray.copy makes C-contiguous copies "
                             f"only, got order={order!r}")
        return _device(np.asarray(self))

    def get(self, stream=None, order="C", out=None):
        host = np.array(np.asarray(self), order=order)
        if out is not None:
            out[...] = host
            return out
        return host

    @property
    def data(self):
        return _Memory(self.__array_interface__["data"][0])


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _alloc(shape, dtype) -> ndarray:
    """A device array placed so that it ends (16-byte aligned) right before a page with no
    access rights, with another such page before its first page: a kernel load or store
    past the end faults, and the emulator reports a ``memory-fault``."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = -(-max(nbytes, 1) // _PAGE) * _PAGE
    mem = mmap.mmap(-1, body + 2 * _PAGE)
    raw = np.frombuffer(mem, np.uint8)
    base = raw.ctypes.data
    for page in (base, base + _PAGE + body):
        if _libc.mprotect(page, _PAGE, 0):
            raise OSError(ctypes.get_errno(), "mprotect failed for an emulator guard page")
    start = _PAGE + body - (-(-nbytes // _ALIGN) * _ALIGN)
    return raw[start:start + nbytes].view(dtype).reshape(shape).view(ndarray)


def _device(a, dtype=None) -> ndarray:
    host = np.asarray(a, dtype=dtype)
    out = _alloc(host.shape, host.dtype)
    out[...] = host
    return out


def kernel_source(kind: str, cu_text: str | None = None) -> str:
    """The source of kernel source ``kind`` (a key of
    :data:`refattn.gpu.kernels_spec.ALL_SOURCES`: "simple", "fast", "paged", ...) as the
    emulator compiles it: the ``.cu`` file (or ``cu_text``, e.g. a mutated copy) with its
    headers inlined as :func:`refattn.gpu.kernels_spec.source` does, plus ``#line``
    directives."""
    if kind not in ks.ALL_SOURCES:
        raise ValueError(f"kind must be one of {sorted(ks.ALL_SOURCES)}, got {kind!r}")
    name = ks.ALL_SOURCES[kind]
    return assemble(_read(name) if cu_text is None else cu_text, name,
                    {h: _read(h) for h in ks.HEADERS})


def _read(name: str) -> str:
    return resources.files("refattn.gpu").joinpath("kernels", name).read_text(
        encoding="utf-8")


def _known_source(code) -> str | None:
    """The key of :data:`~refattn.gpu.kernels_spec.ALL_SOURCES` whose assembled source
    (:func:`refattn.gpu.kernels_spec.source`) is ``code``, else None. A key whose file
    does not exist (yet) cannot be ``code``."""
    if not isinstance(code, str):
        return None
    for kind in ks.ALL_SOURCES:
        try:
            if code == ks.source(kind):
                return kind
        except OSError:
            continue
    return None


def cupy_like(*, prebuild: bool = True, sources: dict | None = None, strict: bool = False):
    """A new CuPy-like module (see the module docstring).

    prebuild : when ``RawModule`` gets one of refattn's kernel sources, compile every
        instantiation of that source (those of
        :func:`refattn.gpu.kernels_spec.all_instantiations` with its key) at once: one
        build per source instead of one per kernel.
    sources : ``{"fast": cu_text}``: when ``RawModule`` gets that kernel source (any key
        of :data:`~refattn.gpu.kernels_spec.ALL_SOURCES`), compile ``cu_text`` instead
        (the mutation tests plant bugs this way).
    strict : raise :class:`EmulatorDiagnosticsError` after a launch with diagnostics.
    """
    cp = types.ModuleType("cupy")
    cp.__version__ = "refattn-emulator"
    cp.__doc__ = "CuPy-like module over NumPy running kernels on refattn's CPU emulator."
    cp.ndarray = ndarray
    cp.launches = []
    cp.builds = []
    overrides = dict(sources or {})
    unknown = set(overrides) - set(ks.ALL_SOURCES)
    if unknown:
        raise ValueError(f"sources: unknown kernels {sorted(unknown)}; known "
                         f"{sorted(ks.ALL_SOURCES)}")

    def record(rec):
        cp.launches.append(rec)
        if strict and rec.diagnostics:
            raise EmulatorDiagnosticsError(rec)

    class RawModule:
        """``cupy.RawModule(code=..., options=..., name_expressions=...)``, emulated."""

        def __init__(self, code=None, *, options=(), name_expressions=None, **_):
            names = list(name_expressions or [])
            file = "<cupy source>"
            kind = _known_source(code)
            if kind is not None:
                file = ks.ALL_SOURCES[kind]
                code = kernel_source(kind, overrides.get(kind))
                if prebuild:   # the same list for every kernel of the source: one build
                    every = [i.name for i in ks.all_instantiations() if i.kernel == kind]
                    names = every + [n for n in names if n not in every]
            incs = [o[2:] for o in options if o.startswith("-I")]
            self._module = build(code, names, include=incs, file=file)
            cp.builds.append(self._module)

        def get_function(self, name):
            fn = self._module.get_function(name)
            fn.on_launch = record
            fn.is_device = lambda a: isinstance(a, ndarray)
            return fn

    cp.RawModule = RawModule
    cp.asarray = lambda a, dtype=None: (a if isinstance(a, ndarray) and
                                        (dtype is None or a.dtype == np.dtype(dtype))
                                        else _device(a, dtype))
    cp.array = lambda a, dtype=None, copy=True: _device(a, dtype)
    cp.empty = lambda shape, dtype=np.float32: _alloc(shape, dtype)
    cp.zeros = lambda shape, dtype=np.float32: _device(np.zeros(shape, dtype))
    cp.ones = lambda shape, dtype=np.float32: _device(np.ones(shape, dtype))
    cp.full = lambda shape, value, dtype=None: _device(np.full(shape, value, dtype))
    cp.ascontiguousarray = lambda a: (a if isinstance(a, ndarray) and a.flags.c_contiguous
                                      else _device(np.ascontiguousarray(a)))
    cp.broadcast_to = lambda a, shape: np.broadcast_to(a, shape).view(ndarray)
    cp.from_dlpack = lambda x: _device(np.from_dlpack(x))
    cp.asnumpy = lambda a: np.array(np.asarray(a))
    cp.isfinite = np.isfinite
    for name in ("float16", "float32", "float64", "uint16", "int16", "int32", "uint32",
                 "int64", "uint64", "uint8", "int8", "bool_"):
        setattr(cp, name, getattr(np, name))
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)

    class Device:
        def __init__(self, device=0):
            self.id = int(device)

        def synchronize(self):
            return None

        def use(self):
            return None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    props = {"name": DEVICE_NAME.encode(), "major": 8, "minor": 0,
             "sharedMemPerBlockOptin": 227 * 1024, "multiProcessorCount": 1}
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0,
        getDeviceProperties=lambda i: dict(props))
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    return cp


@contextlib.contextmanager
def installed(cp=None):
    """``with installed() as cp:`` — ``cp`` (default: a new :func:`cupy_like`) is
    ``sys.modules["cupy"]`` inside the block and ``refattn.gpu.launch`` starts with an
    empty module cache; both are restored afterwards."""
    from .. import launch
    cp = cupy_like() if cp is None else cp
    missing = object()
    saved_mod, saved_cache = sys.modules.get("cupy", missing), launch.module_cache
    sys.modules["cupy"] = cp
    launch.module_cache = {}
    try:
        yield cp
    finally:
        launch.module_cache = saved_cache
        if saved_mod is missing:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved_mod
