"""Timing helpers for side-by-side measurements on a noisy machine."""

from __future__ import annotations

import statistics
import time

__all__ = ["time_call", "compare"]


def _sync(result):
    # CuPy work is asynchronous: wait for the device before reading the clock.
    try:
        import cupy

        if isinstance(result, cupy.ndarray) or (
                isinstance(result, tuple) and any(isinstance(r, cupy.ndarray) for r in result)):
            cupy.cuda.get_current_stream().synchronize()
    except ImportError:
        pass
    return result


def time_call(fn, *, min_time=0.05, max_repeats=50, warmup=1):
    """Median wall time of ``fn()`` in seconds (after ``warmup`` calls)."""
    for _ in range(warmup):
        _sync(fn())
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(contenders: dict, *, rounds=5, min_time=0.02, warmup=1):
    """Median seconds of each contender, measured in interleaved rounds.

    Interleaving (A, B, A, B, ...) exposes every contender to the same machine
    load, so ratios of the returned medians are robust to noise.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            _sync(fn())
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(time_call(fn, min_time=min_time, max_repeats=10, warmup=0))
    return {name: statistics.median(s) for name, s in samples.items()}
