"""How a backend is chosen, and what each one needs.  No attention math here.

Backends:

``reference``
    Array-API code (NumPy, CuPy, any array-API library); O(L^2) memory; exact.
``numba``
    Jitted, fused CPU kernels on NumPy arrays (float32 and float64).
``cupy``
    CUDA kernels on CuPy arrays.

``backend="auto"`` picks ``cupy`` for CuPy arrays, ``numba`` for NumPy arrays
of float32/float64 and ``reference`` otherwise, among those the core implements.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .._array import all_finite, is_cupy, is_numpy, no_nan_or_posinf, product
from .._validate import check_choice
from ..typing import Array, Namespace

BACKENDS = ("reference", "numba", "cupy")

__all__ = ["BACKENDS", "available_backends", "numba_available", "cupy_available", "resolve",
           "needs_exact_path", "route"]


def numba_available() -> bool:
    """True: Numba is a dependency (the numba backend runs wherever refattn installs)."""
    return True


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def available_backends() -> tuple[str, ...]:
    """Backends usable on this machine, in order of preference for ``"auto"``."""
    out = ["reference"]
    if numba_available():
        out.append("numba")
    if cupy_available():
        out.append("cupy")
    return tuple(out)


def resolve(backend: str, implemented: Sequence[str], *arrays: Array,
            core: str = "this core") -> str:
    """Return the concrete backend for ``arrays`` (``backend`` may be ``"auto"``)."""
    check_choice(backend, "backend", ("auto",) + BACKENDS)
    x = arrays[0]
    dtype = str(getattr(x.dtype, "name", x.dtype))
    if backend == "auto":
        if is_cupy(x) and "cupy" in implemented and cupy_available():
            return "cupy"
        if is_numpy(x) and "numba" in implemented and numba_available() and dtype in (
                "float32", "float64"):
            return "numba"
        return "reference"
    if backend not in implemented:
        raise ValueError(
            f"backend={backend!r} is not implemented for {core}; implemented: "
            f"{', '.join(implemented)}"
        )
    if backend == "numba":
        if not is_numpy(x):
            raise TypeError(f"backend='numba' needs NumPy arrays, got {type(x).__module__}."
                            f"{type(x).__name__}")
        if dtype not in ("float32", "float64"):
            raise TypeError(f"backend='numba' supports float32 and float64, got {dtype}")
    if backend == "cupy":
        if not cupy_available():
            raise RuntimeError("backend='cupy' needs CuPy and a CUDA device; none is available")
        if not is_cupy(x):
            raise TypeError("backend='cupy' needs CuPy arrays (use cupy.asarray)")
    return backend


def needs_exact_path(xp: Namespace, arrays: Sequence[Array], bias: Array | None = None) -> bool:
    """Whether a call must run on the reference backend to keep the non-finite policy.

    The fused kernels (numba, cupy) are written for finite data of non-zero size; a
    NaN or +-Inf anywhere in ``arrays``, a NaN or ``+inf`` in ``bias`` (``-inf`` is a
    mask), or a zero-size array send the call to the reference backend, which follows
    ``docs/conventions.md`` exactly ("Non-finite values and empty inputs").  Checking
    costs one reduction per array: O(n) against the kernel's O(L S E).
    """
    if any(product(a.shape) == 0 for a in arrays if a is not None):
        return True
    return not (all(all_finite(xp, a) for a in arrays) and no_nan_or_posinf(xp, bias))


def route(backend: str, xp: Namespace, arrays: Sequence[Array],
          bias: Array | None = None) -> str:
    """``backend``, or ``"reference"`` when :func:`needs_exact_path` says so."""
    if backend != "reference" and needs_exact_path(xp, arrays, bias):
        return "reference"
    return backend
