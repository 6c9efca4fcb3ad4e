"""Compiles shared between processes: the cache lock of `numba_support.jit` and the
compile-ahead worker (`refattn.backends.compile_ahead`)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from numba.core.errors import TypingError

from refattn.backends import compile_ahead
from refattn.backends import numba_support as ns

ROOT = Path(__file__).resolve().parents[2]

#: A cacheable kernel (a module file: Numba caches functions of real source files only).
_MODULE = """
import numpy as np
from refattn.backends.numba_support import jit

@jit
def poly(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = ((x[i] * 3 + 2) * x[i] - 1) * x[i]
    return out
"""

#: Prints the kernel's lock file without compiling anything.
_LOCK_PATH = "import kernels; print(kernels.poly._cache._cache_file._index_path + '.lock')"

#: Compiles (or loads) poly(float32[:]) and reports what Numba did.
_COMPILE = """
import json, numpy as np, kernels
out = kernels.poly(np.arange(4, dtype=np.float32))
print(json.dumps({"hits": sum(kernels.poly.stats.cache_hits.values()),
                  "misses": sum(kernels.poly.stats.cache_misses.values()),
                  "out": out.tolist()}))
"""

#: Compiles and saves poly(float32[:]) the way Numba does, without refattn's lock.
_COMPILE_UNLOCKED = """
import numpy as np, numba, kernels
type(kernels.poly).compile(kernels.poly, (numba.float32[::1],))
"""


def _env(tmp_path, **extra):
    return dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
                PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT),
                                            os.environ.get("PYTHONPATH", "")]),
                **extra)


def _python(code, env, **kwargs):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=False, **kwargs)


@pytest.fixture
def kernel_module(tmp_path):
    (tmp_path / "kernels.py").write_text(textwrap.dedent(_MODULE))
    return tmp_path


def test_a_compile_waits_for_another_process_and_loads_its_result(kernel_module):
    env = _env(kernel_module)
    found = _python(_LOCK_PATH, env)
    assert found.returncode == 0, found.stderr
    lock_path = found.stdout.strip()
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)                   # "another process" compiling
        waiting = subprocess.Popen([sys.executable, "-c", _COMPILE], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)
        assert waiting.poll() is None                      # blocked on the lock
        # the holder compiles and saves meanwhile (Numba's own compile, no lock)
        other = _python(_COMPILE_UNLOCKED, env)
        assert other.returncode == 0, other.stderr
        assert waiting.poll() is None
    out, err = waiting.communicate(timeout=300)            # lock released: it goes on
    assert waiting.returncode == 0, err
    report = json.loads(out)
    assert report == {**report, "hits": 1, "misses": 0}    # loaded, not compiled again
    assert report["out"] == [((x * 3 + 2) * x - 1) * x for x in range(4)]


def test_concurrent_compiles_of_two_signatures_keep_the_cache_consistent(kernel_module):
    """Two processes write different signatures of one kernel at the same moment; a third
    then loads both, each giving its own dtype's result (Numba's unlocked index update can
    give two signatures one data file)."""
    env = _env(kernel_module)
    go = kernel_module / "go"
    compile_one = textwrap.dedent("""
        import os, sys, time, numpy as np, kernels
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.005)
        kernels.poly(np.arange(4, dtype=sys.argv[2]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", compile_one, str(go), dtype], env=env,
                              stderr=subprocess.PIPE) for dtype in ("float32", "float64")]
    time.sleep(1.0)                                        # both imported and waiting
    go.write_text("")
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    check = _python(textwrap.dedent("""
        import json, numpy as np, kernels
        outs = {d: kernels.poly(np.full(3, 0.1, d)) for d in ("float32", "float64")}
        print(json.dumps({"hits": sum(kernels.poly.stats.cache_hits.values()),
                          "misses": sum(kernels.poly.stats.cache_misses.values()),
                          "dtypes": [outs[d].dtype.name for d in outs]}))
    """), env)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout) == {"hits": 2, "misses": 0,
                                        "dtypes": ["float32", "float64"]}


@ns.jit
def _untypable(x):
    return x.no_such_attribute


def test_a_failed_compile_releases_the_lock():
    if not ns.shares_compiles() or not ns.cache_status()["enabled"]:
        pytest.skip("no cross-process lock here (no fcntl, or the cache is off)")
    with pytest.raises(TypingError):
        _untypable(1.0)
    lock_path = _untypable._cache._cache_file._index_path + ".lock"
    with open(lock_path, "a+") as probe:                   # a fresh descriptor: it conflicts
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # with a lock still held


#: A cold process: the first float32 forward starts a worker for the backward, which the
#: vjp then loads from the cache.
_COLD_VJP = """
import json, numpy as np, refattn
from refattn.backends import compile_ahead
from refattn.cores.sdpa import numba as kernels
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 33, 8), dtype=np.float32) for _ in range(3))
o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True, backend="numba")
started = sorted(compile_ahead.workers())
grads = pullback(np.ones_like(o))
refattn.sdpa(q, k, v, backend="numba")                 # warm: starts nothing more
o64, pullback64 = refattn.vjp(refattn.sdpa, q, k, v, causal=True, backend="reference")
expected = pullback64(np.ones_like(o64))
print(json.dumps({
    "started": started, "all": sorted(compile_ahead.workers()),
    "ended": {key: code for key, (code, _) in compile_ahead.wait(timeout=300).items()},
    "hits": sum(kernels._backward_kernel.stats.cache_hits.values()),
    "misses": sum(kernels._backward_kernel.stats.cache_misses.values()),
    "error": max(float(np.max(abs(g - e))) for g, e in zip(grads, expected)),
}))
"""


def test_the_first_forward_compiles_the_backward_in_a_worker(tmp_path):
    done = _python(_COLD_VJP, _env(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    key = "sdpa numba backward float32"
    assert report["started"] == report["all"] == [key]
    assert report["ended"] == {key: 0}
    assert (report["hits"], report["misses"]) == (1, 0)    # the backward came from the cache
    assert report["error"] < 1e-5


def test_switched_off_there_is_no_worker(tmp_path):
    done = _python(_COLD_VJP, _env(tmp_path, REFATTN_COMPILE_AHEAD="0"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["all"] == [] and report["ended"] == {}
    assert (report["hits"], report["misses"]) == (0, 1)    # compiled here
    assert report["error"] < 1e-5


def test_a_failing_worker_reports_and_raises_nothing():
    if not compile_ahead.enabled():
        pytest.skip("compile-ahead workers are off here (one CPU, no cache or no lock)")
    assert compile_ahead.start("a failing test worker", "import refattn.no_such_module")
    assert not compile_ahead.start("a failing test worker", "pass")          # once per name
    code, err = compile_ahead.wait(timeout=120)["a failing test worker"]
    assert code != 0 and "ModuleNotFoundError" in err
