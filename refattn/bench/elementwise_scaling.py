"""The ``elementwise-scaling`` study: causal Taylor element-wise attention is linear in L.

For L doubling (quick: 1024 ... 8192; full: 1024 ... 65536; B = 1, H = 4,
D = 64, float32, forward pass, ``backend="auto"``) it times causal Taylor
attention of orders 2, 4, 6 side by side (interleaved) with causal SDPA and
(size "full" only) the exact form where those O(L^2) contenders fit, and measures the peak memory of
one call with ``tracemalloc`` (NumPy registers its buffers there).

Metrics: ``time_exponent_t{2,4,6}`` and ``memory_exponent_t6``, the slopes of
least-squares fits of ``log(time)`` / ``log(peak)`` against ``log(L)`` (target
about 1.0: doubling L doubles the cost), and ``speedup_vs_sdpa_t{t}_L1024``,
causal SDPA's time over causal Taylor's at L = 1024.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from functools import partial

import numpy as np

from ..cores.elementwise import elementwise_attention
from ..cores.sdpa import sdpa
from .study import Study, StudyResult
from .timing import compare

__all__ = ["run", "STUDY", "ORDERS"]

ORDERS = (2, 4, 6)
_LENGTHS = {"quick": (1024, 2048, 4096, 8192),
            "full": (1024, 2048, 4096, 8192, 16384, 32768, 65536)}
#: Largest L at which the O(L^2) contenders still run: causal SDPA (reference, L x L
#: arrays) and the exact form (numba, O(L^2 D) exponentials: seconds at L = 1024).
_SDPA_MAX = {"quick": 1024, "full": 2048}
_EXACT_MAX = {"quick": 0, "full": 1024}
_H, _D = 4, 64
#: A fit slope above this is reported as a failure (linear time/memory is the claim).
EXPONENT_LIMIT = 1.2
#: SDPA runs at the smallest L of every size, so the speed ratio is always measured there.
_BASE_L = 1024


def _metric_names() -> tuple:
    return tuple(f"time_exponent_t{t}" for t in ORDERS) + ("memory_exponent_t6",) + tuple(
        f"speedup_vs_sdpa_t{t}_L{_BASE_L}" for t in ORDERS)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _slope(xs, ys) -> float:
    """Least-squares slope of ``log(ys)`` against ``log(xs)``."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def run(size: str = "quick") -> StudyResult:

    lengths = _LENGTHS[size]
    rng = np.random.default_rng(0)
    times: dict[int, list[float]] = {t: [] for t in ORDERS}
    peaks: dict[int, list[float]] = {t: [] for t in ORDERS}
    rows, quadratic = [], {}
    for L in lengths:
        # (B, H, L, D) with |2 q k| mostly below 1, where the Taylor form is accurate
        q, k, v = ((0.5 * rng.standard_normal((1, _H, L, _D))).astype(np.float32)
                   for _ in range(3))
        contenders: dict[str, Callable[[], object]] = {
            f"t={t}": partial(elementwise_attention, q, k, v, order=t, causal=True)
            for t in ORDERS}
        if L <= _EXACT_MAX[size]:
            contenders["exact"] = lambda: elementwise_attention(q, k, v, causal=True)
        fits = L <= _SDPA_MAX[size]
        if fits:
            contenders["sdpa"] = lambda: sdpa(q, k, v, causal=True)
        med = compare(contenders, rounds=3 if size == "quick" else 5, min_time=0.01)
        mem = {name: _peak_bytes(fn) for name, fn in contenders.items()}
        for t in ORDERS:
            times[t].append(med[f"t={t}"])
            peaks[t].append(mem[f"t={t}"])
        if fits:
            quadratic[L] = med
        ms = lambda name: f"{med[name] * 1e3:.2f}" if name in med else "-"          # noqa: E731
        mib = lambda name: f"{mem[name] / 2**20:.1f}" if name in mem else "-"      # noqa: E731
        rows.append([L] + [ms(f"t={t}") for t in ORDERS] + [ms("exact"), ms("sdpa"),
                                                             mib("t=6"), mib("sdpa")])
    metrics = {f"time_exponent_t{t}": _slope(lengths, times[t]) for t in ORDERS}
    metrics["memory_exponent_t6"] = _slope(lengths, peaks[6])
    for t in ORDERS:
        metrics[f"speedup_vs_sdpa_t{t}_L{_BASE_L}"] = (quadratic[_BASE_L]["sdpa"]
                                                      / quadratic[_BASE_L][f"t={t}"])
    metrics = {name: metrics[name] for name in _metric_names()}
    failures = [f"{name} = {value:.2f} > {EXPONENT_LIMIT} (not linear in L)"
                for name, value in metrics.items()
                if "exponent" in name and value > EXPONENT_LIMIT]
    exact = (f"exact form up to L={_EXACT_MAX[size]}" if _EXACT_MAX[size] >= lengths[0]
             else "exact form at size 'full' only")
    notes = [f"B=1 H={_H} D={_D} float32, forward, backend auto; O(L^2) contenders only where "
             f"they fit: causal sdpa (backend auto, numba here) up to L={_SDPA_MAX[size]}, {exact}; peak "
             "memory by tracemalloc",
             "exponents: least-squares slope of log(cost) against log(L); 1.0 is linear"]
    return StudyResult(
        title="elementwise-scaling: causal Taylor element-wise attention vs L",
        headers=["L", "t=2 ms", "t=4 ms", "t=6 ms", "exact ms", "sdpa ms", "t=6 MiB", "sdpa MiB"],
        rows=rows, metrics=metrics, notes=notes, failures=failures)


STUDY = Study(
    name="elementwise-scaling",
    summary="causal Taylor element-wise attention: time and memory exponents in L, "
            "speed against causal sdpa",
    run=run,
    metric_names=_metric_names(),
)
