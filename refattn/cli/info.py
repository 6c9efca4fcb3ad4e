"""``refattn info``: versions, backends, Numba threading and the GPU, if any."""

from __future__ import annotations

import platform

NAME = "info"
HELP = "print versions, available backends, Numba threads and the GPU if any"


def add_arguments(parser):
    pass


def collect() -> dict:
    """Facts about this installation, as an ordered dict of strings."""
    import numpy
    import scipy

    import refattn
    from refattn.backends import available_backends

    facts = {
        "refattn": refattn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "backends": ", ".join(available_backends()),
    }
    try:
        import numba

        facts["numba"] = numba.__version__
        facts["numba threads"] = str(numba.config.NUMBA_NUM_THREADS)
        facts["numba threading layer"] = str(numba.config.THREADING_LAYER)
        facts["numba cache dir"] = numba.config.CACHE_DIR or "(beside the sources)"
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


def run(args) -> int:
    facts = collect()
    width = max(map(len, facts))
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    return 0
