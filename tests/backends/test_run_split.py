"""The thread pool that runs the serial numba kernels: split_items and run_split."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from refattn.backends import numba_support as ns

ROOT = Path(__file__).resolve().parents[2]


@ns.jit
def _count_items(out, items):
    for t in items:
        out[t] += 1


@pytest.mark.parametrize("seed", range(20))
def test_split_items_are_contiguous_disjoint_and_balanced(seed):
    rng = np.random.default_rng(seed)
    n, parts = int(rng.integers(1, 60)), int(rng.integers(1, 9))
    costs = rng.random(n) * rng.choice([1.0, 100.0], n)
    runs = ns.split_items(costs, parts)
    assert len(runs) == min(n, parts)
    assert all(r.size and r.dtype == np.int64 for r in runs)
    assert np.array_equal(np.concatenate(runs), np.arange(n))     # in order, each once
    share = costs.sum() / len(runs)
    for r in runs:      # a run is off its share by less than its largest item
        assert abs(costs[r].sum() - share) <= costs.max() + 1e-9


def test_split_items_of_equal_costs_are_equal_runs():
    assert [r.size for r in ns.split_items(np.ones(12), 4)] == [3, 3, 3, 3]
    assert ns.split_items([], 4) == []


def test_run_split_runs_every_item_once_on_the_kernel_threads():
    items = np.arange(1000)
    out = np.zeros(1000, np.int64)
    ns.run_split(_count_items, (out,), items, np.ones(items.size))
    assert np.array_equal(out, np.ones(1000))

    seen: dict[int, list] = {}
    lock = threading.Lock()

    def record(part):
        with lock:
            seen.setdefault(threading.get_ident(), []).extend(part.tolist())
    ns.run_split(record, (), items[::-1], np.ones(items.size))
    assert sorted(t for part in seen.values() for t in part) == list(range(1000))
    assert threading.get_ident() in seen                    # the caller runs a part itself
    assert len(seen) <= ns.num_threads()
    assert (len(seen) > 1) == (ns.num_threads() > 1)        # the others run on pool threads


def test_run_split_keeps_the_blas_single_threaded_while_parts_run():
    before = ns.blas_threads()
    during = []
    ns.run_split(lambda part: during.append(ns.blas_threads()), (), np.arange(4), np.ones(4))
    if before is None:
        pytest.skip("the BLAS is not OpenBLAS: nothing to hold")   # MKL handles nesting itself
    assert set(during) == {1}
    assert ns.blas_threads() == before


@pytest.mark.parametrize("failing", ["first", "last"],
                         ids=["the caller's part", "a pool thread's part"])
def test_run_split_raises_the_error_of_a_part_after_all_parts_end(failing):
    item = 0 if failing == "first" else 7
    done = []

    def one_part_fails(part):
        if item in part:
            raise ValueError(f"part with item {item}")
        done.extend(part.tolist())
    with pytest.raises(ValueError, match=f"item {item}"):
        ns.run_split(one_part_fails, (), np.arange(8), np.ones(8))
    parts = ns.split_items(np.ones(8), ns.num_threads())
    others = [part for part in parts if item not in part]
    assert sorted(done) == sorted(t for part in others for t in part.tolist())


def test_run_split_rejects_costs_not_shaped_like_the_items():
    with pytest.raises(ValueError, match=r"costs must have the shape of items \(10,\), got \(6,\)"):
        ns.run_split(lambda part: None, (), np.arange(10), np.ones(6))


def test_a_sweep_of_thread_counts_keeps_one_pool():
    """Each call gets a pool of enough threads; a larger count replaces the pool."""
    items, costs = np.arange(64), np.ones(64)
    out = np.zeros(64, np.int64)
    for threads in (2, 3, 5, 3, 2):
        ns.numba.set_num_threads(min(threads, ns.numba.config.NUMBA_NUM_THREADS))
        ns.run_split(_count_items, (out,), items, costs)
    ns.numba.set_num_threads(ns.numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(out, np.full(64, 5))
    assert len(ns._POOLS) <= 1


def test_one_numba_thread_keeps_every_call_on_the_calling_thread():
    """A Dask worker started with NUMBA_NUM_THREADS=1 must stay single-threaded."""
    script = textwrap.dedent("""
        import threading
        import numpy as np
        import refattn
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((2, 4, 64, 8)) for _ in range(3))
        o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True, backend="numba",
                                  tiles=(16, 16))
        pullback(np.ones_like(o))
        refattn.elementwise_attention(q, k, v, backend="numba")
        print(sorted({t.name.split("_")[0] for t in threading.enumerate()}))
    """)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['MainThread']", done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists on POSIX only")
def test_a_forked_child_runs_kernels_on_its_own_pool():
    """A child forked after a call inherits no pool threads: it must not wait for them."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        import refattn
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 4, 64, 8)) for _ in range(3))
        from refattn.backends import numba_support as ns
        o = refattn.sdpa(q, k, v, backend="numba", tiles=(16, 16))
        before = ns.blas_threads()
        pid = os.fork()
        if pid == 0:
            o2 = refattn.sdpa(q, k, v, backend="numba", tiles=(16, 16))
            os._exit(0 if np.array_equal(o, o2) else 3)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

        # forked while a part runs (the BLAS held at one thread, the lock maybe taken):
        # the child gets the BLAS's thread count back and runs kernels itself
        def fork_in_a_part(part):
            if 0 not in part:
                return
            pid = os.fork()
            if pid == 0:
                o3 = refattn.sdpa(q, k, v, backend="numba", tiles=(16, 16))
                os._exit(0 if np.array_equal(o, o3) and ns.blas_threads() == before else 4)
            print("child in a run", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        ns.run_split(fork_in_a_part, (), np.arange(4), np.ones(4))
    """)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["child 0", "child in a run 0"], done.stdout
