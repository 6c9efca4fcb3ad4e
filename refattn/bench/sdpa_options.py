"""Study ``sdpa-options``: what the framework kernels' options cost on the numba backend.

* sliding window against full causal attention: the time should follow the kept pairs, so
  the study reports ``(t_causal / t_window) / (pairs_causal / pairs_window)`` (1 = the cost
  falls exactly with the window);
* soft-capping against plain SDPA (target: less than 1.3x, forward + backward);
* ALiBi against plain SDPA.

Forward + backward, float32, ``(1, 8, L, 64)``, single calls of the contenders interleaved
in one process (medians of 3 rounds after a warm-up call).
"""

from __future__ import annotations

import numpy as np

from .._masks import causal_pairs
from .._vjp import vjp
from ..cores.sdpa import sdpa
from .study import Study, StudyResult
from .timing import interleaved_calls

__all__ = ["STUDY", "SOFTCAP_TARGET"]

#: Soft-capping may cost at most this factor over plain SDPA (forward + backward).
SOFTCAP_TARGET = 1.3

_SIZES = {"quick": (2048, 128), "full": (16384, 512)}


def _window_pairs(L: int, left: int) -> int:
    """Kept pairs of a causal window of ``left`` keys before the diagonal (L = S)."""
    return sum(min(i, left) + 1 for i in range(L))


def run(size: str = "quick") -> StudyResult:
    L, left = _SIZES[size]
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 8, L, 64), dtype=np.float32) for _ in range(4))
    slopes = (2.0 ** -np.arange(1, 9)).astype(np.float32)

    def step(**options):
        def call():
            o, pullback = vjp(sdpa, q, k, v, backend="numba", causal=True, **options)
            return pullback(do)
        return call

    contenders = {
        "causal": step(),
        f"causal, window ({left}, 0)": step(window=(left, 0)),
        "causal, softcap 30": step(softcap=30.0),
        "causal, ALiBi": step(alibi_slopes=slopes),
    }
    times = interleaved_calls(contenders, rounds=3)
    base = times["causal"]
    pair_ratio = causal_pairs(L, L) / _window_pairs(L, left)
    window_speedup = base / times[f"causal, window ({left}, 0)"]
    metrics = {
        "window_speedup": window_speedup,
        "window_speedup_over_pair_ratio": window_speedup / pair_ratio,
        "softcap_overhead": times["causal, softcap 30"] / base,
        "alibi_overhead": times["causal, ALiBi"] / base,
    }
    rows = [[name, f"{t * 1e3:.1f}", f"{t / base:.2f}"] for name, t in times.items()]
    failures = []
    if metrics["softcap_overhead"] >= SOFTCAP_TARGET:
        failures.append(f"softcap overhead {metrics['softcap_overhead']:.2f}x >= "
                        f"{SOFTCAP_TARGET}x")
    notes = [f"kept pairs: causal / window = {pair_ratio:.1f}; the window runs "
             f"{window_speedup:.1f}x faster ({metrics['window_speedup_over_pair_ratio']:.2f} "
             "of the pair ratio)",
             f"target: softcap < {SOFTCAP_TARGET}x plain"]
    return StudyResult(
        title=f"numba SDPA options, forward+backward, (1, 8, {L}, 64) float32, causal",
        headers=["contender", "ms", "x causal"], rows=rows, metrics=metrics,
        failures=failures, notes=notes)


STUDY = Study("sdpa-options", "numba SDPA: sliding window against the kept pairs, softcap and "
              "ALiBi overheads", run,
              metric_names=("window_speedup", "window_speedup_over_pair_ratio",
                            "softcap_overhead", "alibi_overhead"))
