"""What the first call of each core costs: compiling its kernels, or loading them from the cache."""

from __future__ import annotations

import time

import numpy as np

from ..backends.numba_support import kernels
from ..catalog import VARIANTS

__all__ = ["first_call_times"]


def first_call_times() -> dict:
    """Seconds of the first numba call (forward + backward) of each core, per dtype.

    Runs the first ``"test"`` case of every core variant whose core has a numba
    backend, ``sdpa`` first (other cores reuse its kernels, so each row counts only
    the kernels no earlier row needed).  The first call compiles the kernels or
    loads them from the cache;
    ``"cache"`` holds ``(hits, misses)`` summed over refattn's dispatchers, so a
    reader can tell which.  For ``refattn info``.
    """
    out: dict[str, float | tuple[int, int]] = {}
    sdpa_first = sorted(VARIANTS.items(), key=lambda item: (item[0] != "sdpa", item[0]))
    for name, variant in sdpa_first:
        if variant.kind != "core" or "numba" not in variant.backends:
            continue
        for dtype in ("float32", "float64"):
            case = variant.cases("test", dtype)[0]
            t0 = time.perf_counter()
            o, pullback = case.vjp("numba")
            pullback(np.ones_like(o))
            out[f"{name} {dtype}"] = time.perf_counter() - t0
    hits = sum(sum(d.stats.cache_hits.values()) for d in kernels())
    misses = sum(sum(d.stats.cache_misses.values()) for d in kernels())
    out["cache"] = (hits, misses)
    return out
