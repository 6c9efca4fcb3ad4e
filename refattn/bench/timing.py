"""Timing helpers for side-by-side measurements on a noisy machine."""

from __future__ import annotations

import resource
import statistics
import time

__all__ = ["time_call", "compare", "interleaved_calls", "time_per_call", "clock_resolution",
           "cpu_seconds", "MIN_BATCH_SECONDS"]

#: A timed sample lasts at least this long (many calls of a fast function): far above
#: the clock's resolution and the scheduler's tick (1-10 ms), which would otherwise
#: quantise the time of one short call to a multiple of the tick.
MIN_BATCH_SECONDS = 0.05


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


def clock_resolution() -> float:
    """Resolution of :func:`time.perf_counter` in seconds, as the OS reports it."""
    return time.get_clock_info("perf_counter").resolution


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, every thread, and of its waited-for children.

    On a shared machine wall time stretches with the load while CPU time stays close
    to the work done: the main job records both.

    Examples
    --------
    >>> t0 = cpu_seconds(); _ = sum(range(10 ** 5)); cpu_seconds() >= t0
    True
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_per_call(fn, *, min_batch=MIN_BATCH_SECONDS, batches=3, warmup=1, max_calls=1 << 16):
    """Median seconds per call of ``fn()``, each sample a batch of ``n`` back-to-back calls.

    Every sample is a batch lasting at least ``max(min_batch, 1000 *
    clock_resolution())``, so that neither the clock's resolution nor the
    scheduler's tick quantises the result: ``n`` starts at 1 and grows (the
    samples so far are dropped) whenever a batch is shorter; the median of
    ``batch time / n`` over ``batches`` samples is returned.

    Returns
    -------
    seconds : float
        Per call.
    n : int
        Calls per timed batch.

    Examples
    --------
    >>> seconds, n = time_per_call(lambda: sum(range(100)), min_batch=0.005)
    >>> n > 1 and 0 < seconds < 0.005
    True
    """
    for _ in range(warmup):
        _sync(fn())
    floor = max(min_batch, 1000 * clock_resolution())
    n, samples = 1, []
    while len(samples) < batches:
        t0 = time.perf_counter()
        for _ in range(n):
            _sync(fn())
        elapsed = time.perf_counter() - t0
        if elapsed >= floor or n >= max_calls:
            samples.append(elapsed / n)
        else:                              # too short: more calls per batch, start over
            grow = 2 if elapsed <= 0 else 1.2 * floor / elapsed
            n, samples = min(max_calls, max(2 * n, int(n * grow))), []
    return statistics.median(samples), n


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


def interleaved_calls(contenders: dict, rounds: int) -> dict:
    """Median seconds of single calls, contenders interleaved (one warm-up call each).

    Single calls, unlike :func:`compare`'s repeated ones, keep the study affordable when a
    NumPy reference call at L = 2048 takes seconds.
    """
    for fn in contenders.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}
