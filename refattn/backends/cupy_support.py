"""CuPy plumbing shared by every ``cupy.py`` backend module.  No attention math here.

* :func:`available` - CuPy imports and sees a CUDA device.
* :class:`KernelSource` - a ``.cu`` file shipped beside a core, with the template
  instantiations the backend launches.  Declaring one registers it for the
  NVRTC compile test (``tests/backends/test_cuda_compile.py``), which compiles
  every ``.cu`` file under ``refattn/`` on CI machines without a GPU.
* :meth:`KernelSource.function` - the compiled kernel, cached per process
  (``cupy.RawModule``; CuPy also caches the binary on disk).
* :func:`nvrtc_compile` - compile CUDA C++ to PTX with NVRTC alone (no device
  needed), raising :class:`CudaCompileError` with the compiler log.
* :func:`strides4` - element strides of a 4-D operand, 0 on broadcast axes.

The kernels include no CUDA headers (they use inline PTX for float16 and the
tensor cores), so a bare NVRTC compiles them: the ``nvidia-cuda-nvrtc`` wheel
ships the library and no headers, and CuPy finds the library through
``cuda.pathfinder`` (site-packages first, then conda, the system and
``CUDA_PATH``).
"""

from __future__ import annotations

import functools
import os
import re
import threading

import numpy as np

from . import cupy_available

__all__ = ["available", "cupy", "KernelSource", "kernel_sources", "inline_local_includes",
           "nvrtc_compile",
           "CudaCompileError", "NVRTC_OPTIONS", "strides4", "scalar_args", "NULL",
           "pointer_or_null"]

#: Options for every kernel: C++17 (``if constexpr``, generic lambdas) and device as
#: the default execution space (NVRTC treats an unannotated lambda as host code).
NVRTC_OPTIONS = ("-std=c++17", "-default-device")

#: Architecture the CI compile test targets (Hopper; runtime compiles target the device).
CI_ARCH = "compute_90"

_SOURCES: dict = {}
_LOCK = threading.Lock()


def available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return cupy_available()


def cupy():
    """The ``cupy`` module (imported lazily: refattn imports without it)."""
    import cupy as cp

    return cp


class CudaCompileError(RuntimeError):
    """NVRTC rejected a source; the message holds the compiler log."""


class KernelSource:
    """A CUDA source file beside a core and the kernels a backend instantiates from it.

    Parameters
    ----------
    path : str
        The ``.cu`` file.
    instantiations : callable returning a sequence of str
        Every template name expression (e.g. ``"sdpa_fwd<1,64,64,4,64>"``)
        the compile test must instantiate: a representative set covering each
        code path.  Templates are only type-checked when instantiated.
    """

    def __init__(self, path, instantiations=tuple):
        self.path = os.path.abspath(path)
        self._instantiations = instantiations
        self._modules: dict = {}
        _SOURCES[self.path] = self

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @functools.cached_property
    def code(self) -> str:
        """The source with its local headers pasted in (:func:`inline_local_includes`)."""
        return inline_local_includes(self.path)

    def instantiations(self) -> tuple:
        return tuple(self._instantiations())

    def function(self, name_expression: str, prelude: str = ""):
        """The compiled kernel ``name_expression`` (one ``RawModule`` per instantiation).

        Compiling one instantiation per module keeps a first call short: only
        the configuration in use is built.  ``prelude`` is code pasted in front of the
        source (the SDPA kernels' user functions, :mod:`refattn.cores.sdpa.cuda_mods`):
        one module per ``(name_expression, prelude)``.
        """
        key = (name_expression, prelude)
        fn = self._modules.get(key)
        if fn is None:
            cp = cupy()
            with _LOCK:
                fn = self._modules.get(key)
                if fn is None:
                    module = cp.RawModule(code=prelude + self.code, options=NVRTC_OPTIONS,
                                          name_expressions=(name_expression,))
                    fn = module.get_function(name_expression)
                    self._modules[key] = fn
        return fn


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def inline_local_includes(path: str, _seen=None) -> str:
    """The text of ``path`` with each ``#include "name"`` replaced by the file ``name``
    beside it (recursively, each header once).

    The compiled text is then self-contained: NVRTC needs no include path, and CuPy's
    cache, keyed on the source text, sees a change of a header.
    """
    seen = set() if _seen is None else _seen
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def paste(match):
        header = os.path.join(folder, match.group(1))
        if not os.path.isfile(header):
            raise FileNotFoundError(f"{path}: #include \"{match.group(1)}\" is not beside it")
        header = os.path.abspath(header)
        if header in seen:
            return f"// {match.group(1)}: pasted above"
        seen.add(header)
        return inline_local_includes(header, seen)

    return _LOCAL_INCLUDE.sub(paste, text)


def kernel_sources() -> dict:
    """``{absolute path: KernelSource}`` declared by the imported backend modules."""
    return dict(_SOURCES)


def nvrtc_compile(code: str, name: str = "kernel.cu", name_expressions=(), arch: str = CI_ARCH,
                  options=NVRTC_OPTIONS, warnings_are_errors: bool = True):
    """Compile CUDA C++ with NVRTC; no GPU needed.

    A virtual architecture (``compute_90``) gives PTX; a real one (``sm_90``)
    also runs NVRTC's built-in assembler and gives a cubin, which is the only
    way inline PTX (``asm(...)``) gets checked: the PTX pass copies it verbatim.

    Parameters
    ----------
    code : str
        The source.
    name : str
        File name used in the compiler's messages.
    name_expressions : sequence of str
        Template instantiations to force (and check).
    arch : str
        Virtual architecture, ``"compute_90"`` by default.
    warnings_are_errors : bool
        Whether a compiler warning fails the compile (refattn's own kernels: yes; a
        user's expression, :mod:`refattn.cores.sdpa.cuda_mods`: no).

    Returns
    -------
    str or bytes
        The PTX (virtual architecture) or the cubin (real architecture).

    Raises
    ------
    CudaCompileError
        With the compiler log when NVRTC rejects the source or (``warnings_are_errors``)
        a warning is printed.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(code, name, [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *options])
        except Exception as exc:
            raise CudaCompileError(f"{name}: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog).strip()
        if log and warnings_are_errors:  # they usually are bugs in kernel code
            raise CudaCompileError(f"{name}: compiler warnings\n{log}")
        for expr in name_expressions:
            nvrtc.getLoweredName(prog, expr)
        if arch.startswith("sm_"):
            return nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def strides4(x):
    """Element strides of a 4-D array with 0 on axes of length 1 (broadcast)."""
    item = x.dtype.itemsize
    return tuple(0 if n == 1 else s // item for n, s in zip(x.shape, x.strides))


def scalar_args(*values):
    """Kernel scalars with exact C types: int -> ``int``, float -> ``double``.

    CuPy passes NumPy scalars by their dtype, so the kernel's parameter types
    are matched exactly (64-bit strides are passed as ``np.int64`` directly).
    """
    out = []
    for v in values:
        if isinstance(v, (bool, int)) and not isinstance(v, np.integer):
            out.append(np.int32(v))
        elif isinstance(v, float):
            out.append(np.float64(v))
        else:
            out.append(v)
    return tuple(out)


#: A null device pointer for optional kernel arguments (pointers travel as 8 bytes).
NULL = np.uint64(0)


def pointer_or_null(x):
    """``x`` (a CuPy array) or the null pointer for ``None``."""
    return NULL if x is None else x
