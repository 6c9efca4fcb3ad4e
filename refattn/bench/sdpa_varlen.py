"""Study ``sdpa-varlen``: packed sequences (``cu_seqlens``) on the numba backend.

Packed sequences run as one kernel call per pass whatever their lengths: the numba kernels
walk the sequences themselves (:func:`refattn.cores.sdpa.numba.span_table`,
:mod:`refattn.cores.sdpa.segments`).  For ``T`` tokens split into ``N`` equal sequences
the study times, forward + backward, float32, 8 heads of 64 features, causal:

* one sequence of ``T`` tokens (packed, ``N = 1``);
* ``N`` sequences packed (``cu_seqlens_q = cu_seqlens_k = [0, T/N, 2T/N, ..., T]``);
* the same ``N`` sequences as one batch ``(N, 8, T/N, 64)``: one kernel call over the same
  pairs, the floor the packed layout is measured against;
* ``N`` sequences of random lengths packed: about ``N`` distinct lengths (the same one call;
  one call per distinct length before the kernels walked the sequences).

Reported: the speed-up of the packed layouts over one long sequence against the ratio of kept
pairs (1 = the cost follows the pairs), the packed layout against the batch and the
difference per sequence in microseconds.  Single calls of the
contenders interleaved in one process (medians of 3 rounds after a warm-up call).
"""

from __future__ import annotations

import numpy as np

from .._masks import causal_pairs
from .._vjp import vjp
from ..cores.sdpa import sdpa
from .study import Study, StudyResult
from .timing import interleaved_calls

__all__ = ["STUDY"]

#: Tokens T per size, and the sequence counts N it is split into.
_SIZES = {"quick": 2048, "full": 8192}
_COUNTS = (8, 128)
_HEADS, _DIM = 8, 64


def run(size: str = "quick") -> StudyResult:
    T, counts = _SIZES[size], _COUNTS
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((T, _HEADS, _DIM), dtype=np.float32) for _ in range(4))

    def uniform(n):
        return np.arange(0, T + 1, T // n, dtype=np.int32)

    def mixed(n):           # random lengths: about as many distinct lengths as sequences
        cuts = np.sort(np.random.default_rng(n).choice(np.arange(1, T), n - 1, replace=False))
        return np.concatenate([[0], cuts, [T]]).astype(np.int32)

    def packed(cu):
        def call():
            _, pullback = vjp(sdpa, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                              backend="numba")
            return pullback(do)
        return call

    def batched(n):
        def heads_first(x):                        # (T, H, E) -> (n, H, T/n, E)
            return np.ascontiguousarray(x.reshape(n, T // n, _HEADS, _DIM).transpose(0, 2, 1, 3))

        qb, kb, vb, dob = (heads_first(x) for x in (q, k, v, do))

        def call():
            _, pullback = vjp(sdpa, qb, kb, vb, causal=True, backend="numba")
            return pullback(dob)
        return call

    contenders = {"1 x T": packed(uniform(1))}
    for n in counts:
        contenders[f"{n} x T/{n} packed"] = packed(uniform(n))
        contenders[f"{n} x T/{n} as a batch"] = batched(n)
        contenders[f"{n} of mixed lengths packed"] = packed(mixed(n))
    times = interleaved_calls(contenders, rounds=3)
    base = times["1 x T"]
    metrics, notes = {}, []
    for n in counts:
        t_packed, t_batch = times[f"{n} x T/{n} packed"], times[f"{n} x T/{n} as a batch"]
        pair_ratio = causal_pairs(T, T) / (n * causal_pairs(T // n, T // n))
        metrics[f"n{n}_speedup_over_pair_ratio"] = (base / t_packed) / pair_ratio
        metrics[f"n{n}_packed_over_batch"] = t_packed / t_batch
        metrics[f"n{n}_call_overhead_us"] = max(t_packed - t_batch, 0.0) / n * 1e6
        lengths = np.diff(mixed(n))
        mixed_ratio = causal_pairs(T, T) / sum(causal_pairs(int(m), int(m)) for m in lengths)
        t_mixed = times[f"{n} of mixed lengths packed"]
        metrics[f"n{n}_mixed_speedup_over_pair_ratio"] = (base / t_mixed) / mixed_ratio
        notes.append(f"N = {n}: {base / t_packed:.1f}x faster than one sequence for "
                     f"{pair_ratio:.1f}x fewer pairs; {t_packed / t_batch:.2f}x the batch, "
                     f"{metrics[f'n{n}_call_overhead_us']:.0f} us per sequence; mixed lengths "
                     f"({len(set(lengths.tolist()))} distinct): "
                     f"{base / t_mixed:.1f}x faster for {mixed_ratio:.1f}x fewer pairs")
    rows = [[name, f"{t * 1e3:.1f}", f"{t / base:.3f}"] for name, t in times.items()]
    return StudyResult(
        title=f"numba SDPA packed sequences, forward+backward, T = {T} tokens, "
              f"{_HEADS} heads x {_DIM}, float32, causal",
        headers=["contender", "ms", "x one sequence"], rows=rows, metrics=metrics,
        failures=[], notes=notes)


STUDY = Study("sdpa-varlen", "numba SDPA packed sequences (one kernel call for all of them) "
              "against one long sequence and against a batch", run,
              metric_names=tuple(f"n{n}_{m}" for n in _COUNTS
                                 for m in ("speedup_over_pair_ratio", "packed_over_batch",
                                           "call_overhead_us", "mixed_speedup_over_pair_ratio")))
