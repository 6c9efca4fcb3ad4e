"""``refattn info``: versions, backends, Numba threading and the GPU, if any."""

from __future__ import annotations

import platform

import numba
import numpy
import scipy

from .._version import __version__
from ..backends import available_backends
from ..backends import numba_support as ns
from ..bench.cold_start import first_call_times

NAME = "info"
HELP = "print versions, available backends, Numba threads and the GPU if any"


def add_arguments(parser):
    pass


def collect() -> dict:
    """Facts about this installation, as an ordered dict of strings."""
    facts = {
        "refattn": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "backends": ", ".join(available_backends()),
    }
    try:
        facts["numba"] = numba.__version__
        facts["numba threads"] = str(numba.config.NUMBA_NUM_THREADS)
        facts["numba threading layer"] = str(numba.config.THREADING_LAYER)
        facts["numba cache dir"] = numba.config.CACHE_DIR or "(beside the sources)"
        facts.update(_numba_kernel_facts())
    except Exception as exc:  # pragma: no cover
        facts["numba"] = f"unavailable ({exc})"
    try:
        import cupy

        facts["cupy"] = cupy.__version__
        if cupy.is_available():
            dev = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            facts["gpu"] = f"{props['name'].decode()} (compute {dev.compute_capability})"
        else:
            facts["gpu"] = "none visible to CuPy"
    except Exception:
        facts["cupy"] = "not installed"
    return facts


def _numba_kernel_facts() -> dict:
    """refattn's numba plumbing: cache, threading layer, BLAS threads, first-call times."""
    facts = {}
    status = ns.cache_status()
    facts["numba cache"] = (f"on: {status['dir']}" if status["enabled"]
                            else f"OFF ({status['reason']})")
    facts["numba threading layer"] = (f"{ns.threading_layer()} (available: "
                                      f"{', '.join(ns.available_threading_layers())})")
    blas = ns.blas_threads()
    facts["BLAS in kernels"] = ("OpenBLAS, 1 thread per kernel thread (was "
                                f"{blas} outside kernels)" if blas is not None
                                else "not OpenBLAS: threads left to the BLAS")
    times = first_call_times()
    hits, misses = times.pop("cache")
    how = "compiled" if misses and not hits else "loaded from cache" if hits and not misses \
        else "partly cached"
    for label, seconds in times.items():
        facts[f"first call {label}"] = f"{seconds:.2f} s (fwd+bwd)"
    facts["first calls"] = f"{how} ({hits} cache hits, {misses} compiled)"
    return facts


def run(args) -> int:
    facts = collect()
    width = max(map(len, facts))
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    return 0
