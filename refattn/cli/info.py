"""``refattn info``: versions, backends, Numba threading and cache, the GPU if any.

``refattn info`` compiles nothing: it reports which numba kernels Numba's cache
holds for this CPU (read from the cache's index files) and where.
``--first-calls`` also times the first forward+backward call of every core
(:func:`refattn.bench.cold_start.first_call_times`), which compiles whatever is
not cached yet.
"""

from __future__ import annotations

import collections
import platform

import numba
import numpy
import scipy

from .._version import __version__
from ..backends import available_backends, blas, tuning
from ..backends import numba_support as ns
from ..bench.cold_start import first_call_times

NAME = "info"
HELP = "print versions, available backends, Numba threads and cache, the GPU if any"


def add_arguments(parser):
    parser.add_argument("--first-calls", action="store_true",
                        help="also time the first forward+backward call of every core with a "
                             "numba backend (compiles the kernels that are not cached yet)")


def collect(first_calls: bool = False) -> dict:
    """Facts about this installation, as an ordered dict of strings.

    Compiles nothing unless ``first_calls`` is set.
    """
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
        facts.update(cache_facts())
        if first_calls:
            facts.update(_first_call_facts())
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


def _blas_facts() -> str:
    """The BLAS the kernels' tile products call, per dtype, and the ones found here."""
    chosen = ", ".join(f"{dtype} {p.name}" for dtype, p in blas.bind().items())
    threads = ns.blas_threads()
    openblas = f", OpenBLAS {threads} threads outside kernels" if threads is not None else ""
    return (f"{chosen}, one thread per kernel thread (found: {', '.join(blas.available())}; "
            f"REFATTN_BLAS overrides{openblas})")


def _numba_kernel_facts() -> dict:
    """refattn's numba plumbing: cache location, threading layer, BLAS threads."""
    facts = {}
    status = ns.cache_status()
    facts["numba cache"] = (f"on: {status['dir']}" if status["enabled"]
                            else f"OFF ({status['reason']})")
    facts["numba threading layer"] = (f"{ns.threading_layer()} (available: "
                                      f"{', '.join(ns.available_threading_layers())})")
    facts["BLAS in kernels"] = _blas_facts()
    return facts


def _dtype_counts(signatures) -> str:
    """``float32 x2, float64`` from the first array argument of each signature."""
    counts = collections.Counter(str(getattr(sig[0], "dtype", sig[0])) for sig in signatures)
    return ", ".join(f"{d} x{n}" if n > 1 else d for d, n in sorted(counts.items()))


def cache_facts() -> dict:
    """Which kernels Numba's cache holds for this CPU, per kernel, and the tuned choices
    recorded beside it (:mod:`refattn.backends.tuning`); compiles and measures nothing.

    Kernels marked ``inline="always"`` are left out: they are compiled into their
    callers and never cached on their own.
    """
    entries = [(ns.kernel_name(d), ns.cached_signatures(d)) for d in ns.kernels()
               if d.targetoptions.get("inline") != "always"]
    cpu = ns.kernels()[0].targetctx.codegen().magic_tuple()[1] if entries else "?"
    cached = [(name, e) for name, e in entries if e["here"]]
    n_signatures = sum(len(e["here"]) for _, e in cached)
    elsewhere = sum(e["elsewhere"] for _, e in entries)
    folders = sorted({e["dir"] for _, e in entries if e["dir"]})
    if not any(e["enabled"] for _, e in entries):
        summary = "caching is off: every process compiles the kernels it calls"
    elif cached:
        summary = (f"{n_signatures} compiled signatures of {len(cached)} of {len(entries)} "
                   f"kernels, for this CPU ({cpu})")
    else:
        summary = (f"none for this CPU ({cpu}): each kernel compiles on first use "
                   "(`refattn warmup` compiles them all once)")
    if elsewhere:
        summary += f"; {elsewhere} entries for another CPU or older sources"
    facts = {"numba kernels cached": summary}
    if folders:
        facts["numba cache folders"] = "; ".join(folders)
    for name, entry in entries:
        facts[f"  {name}"] = _dtype_counts(entry["here"]) if entry["here"] else "not cached"
    choices = tuning.recorded_choices()
    where = tuning.tuning_file() or "nowhere writable: kept in the process only"
    facts["tuned choices"] = (f"{len(choices)} recorded for this machine in {where}" if choices
                              else f"none yet for this machine (measured at first use of a "
                                   f"large enough problem; recorded in {where})")
    for name, value in sorted(choices.items()):
        facts[f"  {name}"] = str(value)
    return facts


def _first_call_facts() -> dict:
    times = first_call_times()
    hits, misses = times.pop("cache")
    how = "compiled" if misses and not hits else "loaded from cache" if hits and not misses \
        else "partly cached"
    facts = {f"first call {label}": f"{seconds:.2f} s (fwd+bwd)"
             for label, seconds in times.items()}
    facts["first calls"] = f"{how} ({hits} cache hits, {misses} compiled)"
    return facts


def run(args) -> int:
    facts = collect(first_calls=getattr(args, "first_calls", False))
    width = max(map(len, facts))
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    return 0
