"""The BLAS behind the numba kernels' tile products (`refattn.backends.blas`)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import refattn
from refattn.backends import blas, tuning
from refattn.backends import numba_support as ns

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = sorted(blas.available())


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_each_provider_multiplies(name, dtype):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((37, 64)).astype(dtype), rng.standard_normal((64, 29)).astype(dtype)
    out = blas.matmul(blas.available()[name], a, b)
    tol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(out, a.astype(float) @ b.astype(float), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="must be"):
        blas.matmul(blas.available()[name], a, b.T)


def test_the_kernels_symbols_are_bound_and_recorded():
    bound = blas.bind()
    assert set(bound) == {"float32", "float64"}
    assert all(p.name in PROVIDERS for p in bound.values())
    path = tuning.tuning_file()
    if len(PROVIDERS) > 1 and not os.environ.get("REFATTN_BLAS") and path is not None:
        with open(path) as f:                      # measured once per machine and recorded
            recorded = json.load(f)
        for dtype, provider in bound.items():
            choices = {v for k, v in recorded.items() if k.endswith(f"|blas:{dtype}")}
            assert provider.name in choices


#: A forced provider: the kernels' results against the float64 reference, and what is bound.
_FORCED = """
import json, numpy as np, refattn
from refattn.backends import blas
rng = np.random.default_rng(1)
errors = {}
for dtype in ("float32", "float64"):
    q, k, v = (rng.standard_normal((2, 4, 77, 16)).astype(dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]                       # GQA
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True, backend="numba")
    grads = pullback(np.ones_like(o))
    r, ref_pullback = refattn.vjp(refattn.sdpa, *(x.astype(float) for x in (q, k, v)),
                                  causal=True, backend="reference")
    expected = ref_pullback(np.ones_like(r))
    errors[dtype] = max(float(np.max(abs(a - b))) for a, b in zip((o, *grads), (r, *expected)))
print(json.dumps({"bound": {d: p.name for d, p in blas.bound().items()}, "errors": errors}))
"""


@pytest.mark.parametrize("name", PROVIDERS)
def test_kernels_run_on_each_provider(name, tmp_path):
    env = dict(os.environ, REFATTN_BLAS=name, NUMBA_CACHE_DIR=str(tmp_path),
               REFATTN_COMPILE_AHEAD="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _FORCED], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bound"] == {"float32": name, "float64": name}
    assert report["errors"]["float32"] < 1e-4 and report["errors"]["float64"] < 1e-12


def test_an_unknown_provider_warns_and_is_measured(tmp_path):
    env = dict(os.environ, REFATTN_BLAS="no-such-blas", NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    code = "import refattn.backends.blas as b; print(sorted({p.name for p in b.bound().values()}))"
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "REFATTN_BLAS='no-such-blas': no such BLAS here" in done.stderr
    assert set(json.loads(done.stdout.replace("'", '"'))) <= set(PROVIDERS)


@pytest.mark.skipif("mkl" not in PROVIDERS, reason="MKL is not installed here (the mkl extra)")
def test_mkl_stays_on_one_thread_in_kernel_threads():
    """MKL spawns threads of its own unless told otherwise per thread: inside run_split
    every kernel thread (the caller's and the pool's) must see one."""
    mkl = ctypes.CDLL(blas.available()["mkl"].library)
    mkl.MKL_Get_Max_Threads.restype = ctypes.c_int
    outside = mkl.MKL_Get_Max_Threads()
    seen = []
    from refattn.backends.numba_support import run_split

    def kernel(out, items):                    # a Python stand-in for a kernel
        seen.append(mkl.MKL_Get_Max_Threads())

    run_split(kernel, (None,), np.arange(8), np.ones(8))
    assert seen and set(seen) == {1}
    assert mkl.MKL_Get_Max_Threads() == outside        # the caller's setting is restored
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 300, 32), dtype=np.float32)
    expected = refattn.sdpa(*(q.astype(float),) * 3, backend="reference")
    np.testing.assert_allclose(refattn.sdpa(q, q, q, backend="numba"), expected, rtol=1e-5,
                               atol=1e-5)
