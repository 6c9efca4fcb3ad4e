"""The BLAS behind the numba kernels' tile products: the providers found here, one chosen per
dtype by measurement.

Providers (each an ``sgemm`` and a ``dgemm`` with the reference Fortran interface, 32-bit
integers):

* ``"openblas"``: SciPy's OpenBLAS (``scipy.linalg.cython_blas``), always present;
* ``"mkl"``: Intel MKL's ``libmkl_rt`` from the ``mkl`` wheel (``pip install "refattn[mkl]"``),
  when it loads and accepts the LP64 interface.

The kernels call the symbols ``refattn_sgemm`` / ``refattn_dgemm`` (by name, so cached
kernels stay valid whichever provider is bound); :func:`bind` points them at the chosen
provider once per process, before any kernel is compiled or loaded.  The choice is made by
:func:`~refattn.backends.tuning.tuned_choice`: the providers' single-thread products of
the SDPA kernels' tile shapes, interleaved, once per machine, recorded beside the Numba
cache; ``REFATTN_BLAS=openblas`` (or ``mkl``) overrides it for a process.  No provider is
best everywhere: on the 2-core Intel host of 2026-12-02 MKL ran these products 5-25 %
faster than OpenBLAS (docs/benchmarks.md).

Threads: the kernels call the BLAS from their own threads, one call per thread; OpenBLAS is
held at one thread while kernels run (``numba_support._SingleThreadedBlas``), MKL per thread
(:func:`single_thread_here`, ``mkl_set_num_threads_local``), so that neither spawns threads
of its own under the kernels'.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import llvmlite.binding as llvm
import numpy as np
import scipy.linalg.cython_blas as cython_blas

from .tuning import tuned_choice

__all__ = ["SYMBOLS", "Provider", "available", "bind", "bound", "matmul", "restore_threads",
           "single_thread_here"]

#: The symbol the kernels call for each dtype.
SYMBOLS = {"float32": "refattn_sgemm", "float64": "refattn_dgemm"}
_SWITCH = "REFATTN_BLAS"


@dataclass(frozen=True)
class Provider:
    """One BLAS: its ``gemm`` entry points (addresses) and how to keep it on one thread."""

    name: str
    gemm: dict[str, int]                               # dtype name -> address of ?gemm
    library: str
    set_local_threads: Any = field(default=None, compare=False)   # ctypes fn or None


def _capsule_address(capsule) -> int:
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                  ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


def _openblas() -> Provider:
    capi = cython_blas.__pyx_capi__
    return Provider("openblas", {"float32": _capsule_address(capi["sgemm"]),
                                 "float64": _capsule_address(capi["dgemm"])},
                    cython_blas.__file__)


def _mkl_paths() -> list[str]:
    """Where the ``mkl`` wheel puts ``libmkl_rt`` (``<prefix>/lib``), newest soname first."""
    found: list[str] = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    return found


_MKL_INTERFACE_LP64 = 0


def _mkl() -> Provider | None:
    for path in _mkl_paths():
        try:
            lib = ctypes.CDLL(path)
            layer = lib.MKL_Set_Interface_Layer
            set_local = lib.MKL_Set_Num_Threads_Local
            sgemm, dgemm = lib.sgemm, lib.dgemm
        except (OSError, AttributeError):
            continue
        layer.restype, layer.argtypes = ctypes.c_int, [ctypes.c_int]
        if layer(_MKL_INTERFACE_LP64) != _MKL_INTERFACE_LP64:   # ILP64 already in force
            continue
        set_local.restype, set_local.argtypes = ctypes.c_int, [ctypes.c_int]
        address = ctypes.cast(sgemm, ctypes.c_void_p).value
        d_address = ctypes.cast(dgemm, ctypes.c_void_p).value
        if address and d_address:
            return Provider("mkl", {"float32": address, "float64": d_address}, path, set_local)
    return None


_LOCK = threading.Lock()
_AVAILABLE: dict[str, Provider] = {}
_BOUND: dict[str, Provider] = {}


def available() -> dict[str, Provider]:
    """``{name: provider}`` of the BLAS libraries that load here (OpenBLAS first)."""
    with _LOCK:
        if not _AVAILABLE:
            _AVAILABLE["openblas"] = _openblas()
            mkl = _mkl()
            if mkl is not None:
                _AVAILABLE["mkl"] = mkl
        return dict(_AVAILABLE)


_GEMM_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, *[ctypes.c_void_p] * 11)


@functools.lru_cache(maxsize=None)
def _fortran_gemm(address: int):
    return _GEMM_TYPE(address)


def _gemm_rows(provider: Provider, c: np.ndarray, a: np.ndarray, b: np.ndarray,
               trans_b: bool = False) -> None:
    """Row-major ``c = a @ op(b)`` (C-contiguous 2-D arrays of one float dtype; ``op(b)`` is
    ``b.T`` with ``trans_b``) through the provider's Fortran ``gemm``: it is the column-major
    ``c^T = op(b)^T a^T``, so the operands swap."""
    (m, k), n = a.shape, c.shape[1]
    scalar = np.ctypeslib.as_ctypes_type(c.dtype)
    i32 = (lambda x: ctypes.byref(ctypes.c_int(x)))
    _fortran_gemm(provider.gemm[c.dtype.name])(
        b"T" if trans_b else b"N", b"N", i32(n), i32(m), i32(k), ctypes.byref(scalar(1.0)),
        ctypes.c_void_p(b.ctypes.data), i32(b.shape[1]), ctypes.c_void_p(a.ctypes.data),
        i32(k), ctypes.byref(scalar(0.0)), ctypes.c_void_p(c.ctypes.data), i32(n))


def _seconds(provider: Provider, dtype: np.dtype) -> float:
    """Seconds of the SDPA kernels' two tile products (256 x 64 x 256 with B transposed, then
    256 x 256 x 64), single-threaded, through the provider's Fortran interface."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((256, 64)).astype(dtype) for _ in range(3))
    s = np.empty((256, 256), dtype)
    o = np.empty((256, 64), dtype)
    previous = provider.set_local_threads(1) if provider.set_local_threads else None
    try:
        start = time.perf_counter()
        for _ in range(8):
            _gemm_rows(provider, s, q, k, trans_b=True)        # S = Q K^T
            _gemm_rows(provider, o, s, v)                      # O = S V
        return time.perf_counter() - start
    finally:
        if previous is not None:
            provider.set_local_threads(previous)


def matmul(provider: Provider, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (C-contiguous 2-D arrays of one float dtype) through ``provider``, on the
    provider's own threads (all cores, as NumPy's matmul): the ceiling of the
    ``sdpa-vs-torch`` study.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.arange(6.0).reshape(2, 3), np.ones((3, 2))
    >>> matmul(available()["openblas"], a, b).tolist()
    [[3.0, 3.0], [12.0, 12.0]]
    """
    if a.ndim != 2 or b.ndim != 2 or b.shape[0] != a.shape[1] or a.dtype != b.dtype \
            or a.dtype.name not in SYMBOLS:
        raise ValueError(f"matmul: a {a.shape} {a.dtype} and b {b.shape} {b.dtype} must be "
                         "(m, k) and (k, n) of one float dtype")
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    c = np.empty((a.shape[0], b.shape[1]), a.dtype)
    _gemm_rows(provider, c, a, b)
    return c


def _choose(dtype: np.dtype, providers: dict[str, Provider]) -> Provider:
    forced = os.environ.get(_SWITCH)
    if forced in providers:
        return providers[forced]
    if forced:
        warnings.warn(f"{_SWITCH}={forced!r}: no such BLAS here (found: {', '.join(providers)});"
                      " choosing by measurement", RuntimeWarning, stacklevel=2)
    if len(providers) == 1:
        return next(iter(providers.values()))
    return providers[tuned_choice(f"blas:{dtype.name}", sorted(providers),
                                  lambda name: _seconds(providers[name], dtype), rounds=5)]


def bind(one_thread=contextlib.nullcontext) -> dict[str, Provider]:
    """Point ``refattn_sgemm`` / ``refattn_dgemm`` at the chosen providers (once per process);
    ``{dtype name: provider}``.  ``one_thread()`` is entered while the providers are timed
    (it keeps OpenBLAS on one thread, as inside the kernels)."""
    with _LOCK:
        if _BOUND:
            return dict(_BOUND)
    providers = available()
    with one_thread():
        chosen = {name: _choose(np.dtype(name), providers) for name in SYMBOLS}
    with _LOCK:
        if not _BOUND:
            for dtype, provider in chosen.items():
                llvm.add_symbol(SYMBOLS[dtype], provider.gemm[dtype])
            _BOUND.update(chosen)
        return dict(_BOUND)


def bound() -> dict[str, Provider]:
    """The providers bound in this process so far (empty before :func:`bind`)."""
    with _LOCK:
        return dict(_BOUND)


def single_thread_here() -> list[tuple[Provider, int]]:
    """Hold the bound providers that have per-thread settings (MKL) at one thread in the
    calling thread; returns what to restore (``[(provider, previous), ...]``)."""
    restore = []
    for provider in {p.name: p for p in bound().values()}.values():
        if provider.set_local_threads is not None:
            restore.append((provider, provider.set_local_threads(1)))
    return restore


def restore_threads(restore: list[tuple[Provider, int]]) -> None:
    """Undo :func:`single_thread_here`."""
    for provider, previous in restore:
        provider.set_local_threads(previous)
