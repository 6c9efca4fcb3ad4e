"""Study ``dask-scaling``: strong scaling of key-sharded SDPA forward+backward on Dask.

Key-sharded SDPA (:func:`refattn.distributed.vjp` of :func:`refattn.sdpa`, key
blocks of ``S / n_blocks``, one query block) on a ``LocalCluster`` of one and one
of two single-threaded worker processes, against the single-machine
``refattn.vjp`` in a fresh single-threaded process.  Method:

* everything runs in a child process whose environment has
  ``NUMBA_NUM_THREADS=1`` (and the BLAS/OpenMP variables) *before* it starts:
  workers inherit it at spawn.  ``LocalCluster(env=...)`` is too late for Numba,
  which a worker imports before it applies ``env`` (measured: a worker given
  ``env={"NUMBA_NUM_THREADS": "1"}`` ran its kernels on every core);
* the clusters run without the periodic work the study does not need
  (:data:`QUIET_CLUSTER`: Dask's profiler, event-loop tick, system and memory monitors
  at their default intervals took 13-15 % of a core from the kernels on an idle 2-worker
  cluster);
* inputs are persisted on the workers and the query chunk replicated to every
  worker before timing (key sharding sends the queries to every key block); the
  kernels are loaded (compiled or read from the cache) by a small warm-up graph
  of the same dtype in every worker;
* one untimed round at the measured size before the timed ones: the scheduler
  places tasks by their durations, learnt from the rounds before; after the
  small warm-up alone it split the 16 block tasks of the first round 9 / 7
  between the two workers (twice in two tries at L = 16384, 8 key blocks), and
  8 / 8 in every later round;
* a timed round is ``client.compute`` of the fwd+bwd graph until every result
  is in worker memory (``wait``): neither building the graph (reported
  separately) nor bringing the results back to the client is in it; the
  single-process round is the same ``vjp`` and pullback on arrays in memory;
* rounds interleave single process, 1 worker and 2 workers, so that load drift
  on a shared machine hits all three alike; the medians are reported.

Reported: ``efficiency = T1 / (2 T2)`` (target >= 0.8 at size ``"full"``, L =
32768); ``T1 / T_single`` (what one worker costs over the plain call); the
merge's and the gradient sums' shares of the task time; peak resident memory
of each worker against the single-process call; tasks per ``(query block, key
block)``; the calculated communication volume per worker at L = 1M on 64
workers (:mod:`refattn.distributed.volume`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numba
import numpy as np

from .._vjp import vjp
from ..cores.sdpa import sdpa
from .study import Study, StudyResult

try:                        # the optional extra; without it the study is skipped (requires=)
    from .. import distributed as _distributed
    from ..distributed.volume import LAYOUTS, communication_volume
except ImportError:
    _distributed = None  # type: ignore[assignment]

__all__ = ["EFFICIENCY_TARGET", "QUIET_CLUSTER", "STUDY", "dask_scaling"]

EFFICIENCY_TARGET = 0.8
SINGLE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1"}
#: (H, L, E, key blocks, dtype, rounds) of each size.
#: Warm-up length: long enough that the numba backend's tile choice (timed at first use on
#: blocks of >= 512 queries and keys, refattn.backends.tuning) is made before the timed rounds.
WARM_UP = 512
SIZES = {"quick": (1, 4096, 64, 4, "float32", 3), "full": (1, 32768, 64, 16, "float32", 2)}
#: Dask settings of the study's clusters (given to ``LocalCluster`` through ``dask.config.set``;
#: the nannies hand them to their workers).  Each is a periodic callback on the event loops of
#: the scheduler, nannies and workers that the study does not need, and on a 2-core machine
#: whose both cores run a worker's kernels, their CPU is taken from the kernels (measured idle,
#: two workers: 13-15 % of one core with Dask's defaults, 1.6-1.9 % with these; docs/benchmarks.md):
#: the statistical profiler (samples every thread every 10 ms), the event-loop tick (20 ms, a
#: blocked-loop warning), the system monitor (500 ms, dashboard figures) and the memory monitor
#: (100 ms; 1 s still pauses or restarts a worker long before this study's memory matters).
QUIET_CLUSTER = {"distributed.worker.profile.enabled": False,
                 "distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "5s",
                 "distributed.worker.memory.monitor-interval": "1s"}


def _inputs(H, L, E, dtype):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, H, L, E)).astype(dtype) for _ in range(3)]


def _graph(dq, dk, dv):
    import dask.array as da

    o, pullback = _distributed.vjp(sdpa, dq, dk, dv)
    return [o, *pullback(da.ones_like(o))]


def _chunks(H, L, E, blocks):
    kc = (1, H, L // blocks, E)
    return ((1, H, L, E), kc, kc)


def _single_rounds(H, L, E, dtype):
    """Serve single-machine fwd+bwd rounds: one line ``{"seconds", "peak"}`` per input line.

    Runs in a fresh process of its own (its peak RSS is the single-process call's).
    """
    q, k, v = _inputs(H, L, E, dtype)
    small = [x[..., :WARM_UP, :] for x in (q, k, v)]
    o, pullback = vjp(sdpa, *small)                          # load the kernels, choose tiles
    pullback(np.ones_like(o))
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        o, pullback = vjp(sdpa, q, k, v)
        pullback(np.ones_like(o))
        seconds = time.perf_counter() - t0
        del o, pullback
        print(json.dumps({"seconds": seconds, "peak": _peak()}), flush=True)


class _SingleProcess:
    """A fresh single-threaded process answering :func:`_single_rounds` requests."""

    def __init__(self, H, L, E, dtype, env):
        code = ("import sys, json; from refattn.bench import dask_scaling as d; "
                "d._single_rounds(*json.loads(sys.argv[1]))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps([H, L, E, dtype])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"dask-scaling: the single-process child exited with "
                               f"{self.proc.wait()}")
        return line

    def round(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _warm_up(n, E, dtype):
    """In a worker: the single-machine fwd+bwd on ``n`` tokens (loads the kernels, and
    the tile choice of refattn.backends.tuning, recorded by the first process to time it)."""
    q, k, v = _inputs(1, n, E, dtype)
    o, pullback = vjp(sdpa, q, k, v)
    pullback(np.ones_like(o))


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _numba_threads():
    return int(numba.config.NUMBA_NUM_THREADS)


def _child(args, env):
    code = ("import sys, json; from refattn.bench import dask_scaling as d; "
            "print(json.dumps(getattr(d, sys.argv[1])(*json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, *args],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"dask-scaling child {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _task_seconds(stream):
    """``(total, merge, sums)`` seconds of compute in a task stream."""
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
    return total, merge, sums


class _Cluster:
    """A LocalCluster of ``n`` single-threaded workers holding the persisted inputs."""

    def __init__(self, n, arrays, chunks, config=None):
        import dask
        import dask.array as da
        from distributed import Client, LocalCluster, futures_of, wait

        with dask.config.set(QUIET_CLUSTER if config is None else config):
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=40)
        self.client = Client(self.cluster)
        workers = sorted(self.client.scheduler_info()["workers"])
        q = self.client.persist(da.from_array(arrays[0], chunks=chunks[0]))
        wait(q)
        self.client.replicate(futures_of(q))               # the queries, to every worker
        self.inputs = [q]
        for x in arrays[1:]:                                # key block j on worker j n / blocks
            size = chunks[1][2]
            blocks = x.shape[2] // size
            pieces = [self.client.persist(da.from_array(x[..., j * size:(j + 1) * size, :]),
                                          workers=[workers[j * n // blocks]])
                      for j in range(blocks)]
            self.inputs.append(self.client.persist(da.concatenate(pieces, axis=2)))
        wait(self.inputs)
        small = [da.from_array(x[..., :WARM_UP, :], chunks=(1, x.shape[1], WARM_UP // 2,
                                                            x.shape[3]))
                 for x in arrays]
        self.client.run(_warm_up, WARM_UP, arrays[0].shape[3], arrays[0].dtype.name)                  # kernels and tiles, every worker
        wait(self.client.compute(_graph(*small)))           # and the block tasks themselves
        self.round()              # untimed: the scheduler learns the block tasks' durations
        self.threads = sorted(set(self.client.run(_numba_threads).values()))

    def round(self):
        """``(seconds, graph seconds, task stream)`` of one fwd+bwd."""
        from distributed import get_task_stream, wait

        t0 = time.perf_counter()
        graph = _graph(*self.inputs)
        built = time.perf_counter() - t0
        with get_task_stream(self.client) as ts:
            t0 = time.perf_counter()
            futures = self.client.compute(graph)
            wait(futures)
            seconds = time.perf_counter() - t0
        keys = {f.key for f in futures}
        del futures
        while keys & set(self.client.who_has()):           # released before the next round
            time.sleep(0.01)
        return seconds, built, ts.data

    def close(self):
        peaks = self.client.run(_peak)
        self.client.close()
        self.cluster.close()
        return max(peaks.values())


def _measure(H, L, E, blocks, dtype, rounds):
    """In the single-threaded child: interleaved rounds of single process, 1 and 2 workers."""
    arrays = _inputs(H, L, E, dtype)
    chunks = _chunks(H, L, E, blocks)
    env = {**os.environ, **SINGLE_THREAD}
    solo = _SingleProcess(H, L, E, dtype, env)
    one, two = _Cluster(1, arrays, chunks), _Cluster(2, arrays, chunks)
    single, t1, t2, built, streams1, streams2, blocks_per_worker = [], [], [], [], [], [], []
    try:
        for _ in range(rounds):
            single.append(solo.round())
            seconds, b, stream = one.round()
            t1.append(seconds)
            built.append(b)
            streams1.append(stream)
            seconds, b, stream = two.round()
            t2.append(seconds)
            streams2.append(stream)
            counts: dict = {}
            for task in stream:
                if "sdpa-block-" in str(task["key"]):
                    counts[task["worker"]] = counts.get(task["worker"], 0) + 1
            blocks_per_worker.append(sorted(counts.values()))
        threads = sorted(set(one.threads + two.threads))
    finally:
        solo.close()
        peak1, peak2 = one.close(), two.close()
    seconds1 = [_task_seconds(s) for s in streams1]
    seconds2 = [_task_seconds(s) for s in streams2]
    shares1 = [[x / max(tot, 1e-300) for x in (merge, sums)] for tot, merge, sums in seconds1]
    shares = [[x / max(tot, 1e-300) for x in (merge, sums)] for tot, merge, sums in seconds2]
    return {"single": statistics.median(r["seconds"] for r in single),
            "single_peak": max(r["peak"] for r in single),
            "t1": statistics.median(t1), "t2": statistics.median(t2),
            "t1_all": t1, "t2_all": t2, "single_all": [r["seconds"] for r in single],
            "graph": statistics.median(built), "peak1": peak1, "peak2": peak2,
            "merge1": statistics.median(s[0] for s in shares1),
            "sums1": statistics.median(s[1] for s in shares1),
            "merge2": statistics.median(s[0] for s in shares),
            "sums2": statistics.median(s[1] for s in shares),
            "busy1": statistics.median(s[0] / t for s, t in zip(seconds1, t1)),
            "busy2": statistics.median(s[0] / (2 * t) for s, t in zip(seconds2, t2)),
            "blocks_per_worker": blocks_per_worker[-1], "worker_threads": threads}


def _tasks_per_block(H, L, E, blocks, dtype):
    import dask.array as da

    arrays = [np.zeros((1, H, L, E), dtype) for _ in range(3)]
    graph = _graph(*(da.from_array(x, chunks=c) for x, c in zip(arrays, _chunks(H, L, E,
                                                                                 blocks))))
    keys: set[object] = set()
    for collection in graph:
        keys.update(dict(collection.__dask_graph__()))
    # refattn's own tasks (their names start with "sdpa-"): not the inputs nor the cotangent
    total = sum(1 for key in keys if isinstance(key, tuple) and key[0].startswith("sdpa-"))
    return total, total / (H * blocks)


def dask_scaling(size: str = "quick") -> StudyResult:
    H, L, E, blocks, dtype, rounds = SIZES["full" if size == "full" else "quick"]
    all_tasks, tasks_per_block = _tasks_per_block(H, L, E, blocks, dtype)
    load_before = os.getloadavg()[0]
    m = _child(["_measure", json.dumps([H, L, E, blocks, dtype, rounds])],
               {**os.environ, **SINGLE_THREAD})
    load_after = os.getloadavg()[0]
    efficiency = m["t1"] / (2 * m["t2"])
    overhead = m["t1"] / m["single"]
    mib = 2.0 ** 20
    rows = [
        ["single process, 1 thread", f"{m['single']:.3f}", "-", "-", "-",
         f"{m['single_peak'] / mib:.0f}"],
        ["1 worker", f"{m['t1']:.3f}", "-", f"{m['merge1']:.1%}", f"{m['sums1']:.1%}",
         f"{m['peak1'] / mib:.0f}"],
        ["2 workers", f"{m['t2']:.3f}", f"{efficiency:.2f}", f"{m['merge2']:.1%}",
         f"{m['sums2']:.1%}", f"{m['peak2'] / mib:.0f}"],
    ]
    volume = {lay: communication_volume(lay, 2 ** 20, 2 ** 20, 64, 64, 64) / mib
              for lay in LAYOUTS}
    failures = []
    if size == "full" and efficiency < EFFICIENCY_TARGET:
        failures.append(f"strong-scaling efficiency {efficiency:.2f} < {EFFICIENCY_TARGET}")
    rounds_text = ", ".join(f"{a:.3f}/{b:.3f}/{c:.3f}" for a, b, c in
                            zip(m["single_all"], m["t1_all"], m["t2_all"]))
    return StudyResult(
        title=f"key-sharded SDPA fwd+bwd on Dask, {dtype}, (B, H, L=S, E) = {(1, H, L, E)}, "
              f"{blocks} key blocks, median of {rounds} interleaved rounds",
        headers=["run", "seconds", "efficiency T1/(2 T2)", "merge share", "grad-sum share",
                 "peak MiB per process"],
        rows=rows,
        metrics={"efficiency": efficiency, "worker_overhead": overhead,
                 "merge_share": m["merge2"], "grad_sum_share": m["sums2"],
                 "peak_ratio": m["peak2"] / m["single_peak"],
                 "tasks_per_block": tasks_per_block},
        failures=failures,
        notes=[(f"one worker / single process: {overhead:.2f}x; rounds (single / 1 worker / "
                f"2 workers, s): {rounds_text}"),
               (f"tasks per (query block, key block): {tasks_per_block:.2f} "
                f"({all_tasks} tasks of refattn, inputs excluded); block tasks per worker "
                f"(2 workers, last round): {m['blocks_per_worker']}"),
               (f"numba threads per worker: {m['worker_threads']}; graph built in "
                f"{m['graph']:.3f} s (not timed); workers busy running tasks "
                f"{m['busy1']:.0%} (1 worker), {m['busy2']:.0%} (2 workers) of the round"),
               f"peak ratio (worker of 2 / single process): {m['peak2'] / m['single_peak']:.2f}",
               ("communication per worker and head, L = S = 1M, E = Ev = 64, float32, 64 "
                "workers (calculated, refattn.distributed.volume): "
                + ", ".join(f"{lay} {v:.0f} MiB" for lay, v in volume.items())),
               f"cluster settings (dask.config, QUIET_CLUSTER): {QUIET_CLUSTER}",
               (f"load average (1 min) before / after the measurement: {load_before:.1f} / "
                f"{load_after:.1f} on {os.cpu_count()} CPUs (other processes' load takes cores "
                "from the 2-worker rounds first: judge the target on a quiet machine)"),
               f"target: efficiency >= {EFFICIENCY_TARGET} at size 'full' (L = 32768)"])


STUDY = Study("dask-scaling", "key-sharded SDPA fwd+bwd on 1 vs 2 Dask workers: "
                     "efficiency, merge share, memory, tasks per block", dask_scaling,
                     requires=("dask", "distributed"),
                     metric_names=("efficiency", "worker_overhead", "merge_share", "peak_ratio",
                                   "tasks_per_block"),
                     main_job=False,
                     main_job_note="its target is judged at L = 32768 only; at the quick size the "
                                   "start-up of two Dask clusters takes most of its 40-90 s")
