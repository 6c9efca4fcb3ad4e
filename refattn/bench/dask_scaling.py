"""Study ``dask-scaling``: strong scaling of key-sharded SDPA forward+backward on Dask.

Key-sharded SDPA (:func:`refattn.distributed.vjp` of :func:`refattn.sdpa`, key
blocks of ``S / n_blocks``, one query block) on ``LocalCluster``\\ s of one and
of two single-threaded worker processes (``NUMBA_NUM_THREADS=1`` in each), on
inputs persisted on the workers first.  Reported:

* ``efficiency = T1 / (2 T2)`` (target >= 0.8 at size ``"full"``, L = 32768);
* the merge's share: time in the log-sum-exp merge tasks and in the gradient
  sums, over all task time (from the scheduler's task stream);
* peak resident memory of each worker against a single-process call of the
  same forward+backward (fresh subprocess, one thread);
* tasks per block: tasks of the fwd+bwd graph (inputs excluded) per
  ``(query block, key block)`` pair;
* the calculated communication volume per worker at L = 1M on 64 workers
  (:mod:`refattn.distributed.volume`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np

from ..cores.sdpa import sdpa
from .study import Study, StudyResult

try:                        # the optional extra; without it the study is skipped (requires=)
    from .. import distributed as _distributed
    from ..distributed.volume import LAYOUTS, communication_volume
except ImportError:
    _distributed = None  # type: ignore[assignment]

__all__ = ["EFFICIENCY_TARGET", "STUDY", "dask_scaling"]

EFFICIENCY_TARGET = 0.8
_SINGLE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1"}

_SINGLE_SCRIPT = """
import json, resource, sys, time
import numpy as np
import refattn
H, L, E, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, H, L, E)).astype(dtype) for _ in range(3))
o, pullback = refattn.vjp(refattn.sdpa, q, k, v)       # warm up (kernel cache)
pullback(np.ones_like(o))
t0 = time.perf_counter()
o, pullback = refattn.vjp(refattn.sdpa, q, k, v)
pullback(np.ones_like(o))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _worker_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _single_process(H, L, E, dtype):
    env = {**os.environ, **_SINGLE_THREAD}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SINGLE_SCRIPT), str(H), str(L),
                          str(E), dtype], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _graph(dq, dk, dv):
    import dask.array as da

    o, pullback = _distributed.vjp(sdpa, dq, dk, dv)
    return [o, *pullback(da.ones_like(o))]


def _run_cluster(n_workers, arrays, chunks, rounds):
    import dask.array as da
    from distributed import Client, LocalCluster, get_task_stream, wait

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40, env=dict(_SINGLE_THREAD))
    try:
        with Client(cluster) as client:
            inputs = [client.persist(da.from_array(x, chunks=c)) for x, c in zip(arrays, chunks)]
            wait(inputs)
            client.gather(client.compute(_graph(*inputs)))          # warm-up: kernel caches
            times, streams = [], []
            for _ in range(rounds):
                with get_task_stream(client) as ts:
                    t0 = time.perf_counter()
                    client.gather(client.compute(_graph(*inputs)))
                    times.append(time.perf_counter() - t0)
                streams.append(ts.data)
            peaks = client.run(_worker_peak)
    finally:
        cluster.close()
    return statistics.median(times), streams[-1], max(peaks.values())


def _shares(stream):
    """Fractions of task time spent merging (lse tree) and summing gradients (trees)."""
    total = merge = sums = 0.0
    for task in stream:
        seconds = sum(s["stop"] - s["start"] for s in task["startstops"]
                      if s["action"] == "compute")
        name = str(task["key"])
        total += seconds
        if "sdpa-merge-" in name:
            merge += seconds
        elif "-leaf" in name or "-tree" in name or "sdpa-dq-" in name or "sdpa-dk-" in name \
                or "sdpa-dv-" in name:
            sums += seconds
    return merge / total if total else 0.0, sums / total if total else 0.0


def dask_scaling(size: str = "quick") -> StudyResult:
    import dask.array as da

    H, L, E, blocks, dtype = (2, 32768, 64, 16, "float32") if size == "full" else \
        (1, 4096, 64, 4, "float32")
    rounds = 3 if size == "full" else 2
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, H, L, E)).astype(dtype) for _ in range(3)]
    qc = (1, H, L, E)
    kc = (1, H, L // blocks, E)
    chunks = (qc, kc, kc)
    graph = _graph(*(da.from_array(x, chunks=c) for x, c in zip(arrays, chunks)))
    keys: set[object] = set()
    for collection in graph:
        keys.update(dict(collection.__dask_graph__()))
    # refattn's own tasks (their names start with "sdpa-"): not the inputs nor the cotangent
    all_tasks = sum(1 for key in keys if isinstance(key, tuple) and key[0].startswith("sdpa-"))
    tasks_per_block = all_tasks / (H * blocks)

    single = _single_process(H, L, E, dtype)
    t1, stream1, peak1 = _run_cluster(1, arrays, chunks, rounds)
    t2, stream2, peak2 = _run_cluster(2, arrays, chunks, rounds)
    efficiency = t1 / (2 * t2)
    merge1, sums1 = _shares(stream1)
    merge2, sums2 = _shares(stream2)
    mib = 2.0 ** 20
    rows = [
        ["single process, 1 thread", f"{single['seconds']:.3f}", "-", "-", "-",
         f"{single['peak'] / mib:.0f}"],
        ["1 worker", f"{t1:.3f}", "-", f"{merge1:.1%}", f"{sums1:.1%}", f"{peak1 / mib:.0f}"],
        ["2 workers", f"{t2:.3f}", f"{efficiency:.2f}", f"{merge2:.1%}", f"{sums2:.1%}",
         f"{peak2 / mib:.0f}"],
    ]
    volume = {lay: communication_volume(lay, 2 ** 20, 2 ** 20, 64, 64, 64) / mib
              for lay in LAYOUTS}
    failures = []
    if size == "full" and efficiency < EFFICIENCY_TARGET:
        failures.append(f"strong-scaling efficiency {efficiency:.2f} < {EFFICIENCY_TARGET}")
    return StudyResult(
        title=f"key-sharded SDPA fwd+bwd on Dask, {dtype}, (B, H, L=S, E) = {(1, H, L, E)}, "
              f"{blocks} key blocks",
        headers=["run", "seconds", "efficiency T1/(2 T2)", "merge share", "grad-sum share",
                 "peak MiB per process"],
        rows=rows,
        metrics={"efficiency": efficiency, "merge_share": merge2, "grad_sum_share": sums2,
                 "peak_ratio": peak2 / single["peak"], "tasks_per_block": tasks_per_block},
        failures=failures,
        notes=[f"tasks per (query block, key block): {tasks_per_block:.2f} "
               f"({all_tasks} tasks of refattn, inputs excluded)",
               f"peak ratio (worker of 2 / single process): {peak2 / single['peak']:.2f}",
               "communication per worker and head, L = S = 1M, E = Ev = 64, float32, 64 workers "
               "(calculated, refattn.distributed.volume): " +
               ", ".join(f"{lay} {v:.0f} MiB" for lay, v in volume.items()),
               f"target: efficiency >= {EFFICIENCY_TARGET} at size 'full' (L = 32768)"])


STUDY = Study("dask-scaling", "key-sharded SDPA fwd+bwd on 1 vs 2 Dask workers: "
                     "efficiency, merge share, memory, tasks per block", dask_scaling,
                     requires=("dask", "distributed"),
                     metric_names=("efficiency", "merge_share", "peak_ratio", "tasks_per_block"))
