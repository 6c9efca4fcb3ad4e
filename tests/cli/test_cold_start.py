"""Cold start: `refattn info` compiles nothing, the cache report, `refattn warmup`, the taste."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import refattn
from refattn.backends import numba_support as ns
from refattn.bench.cold_start import TASTE
from refattn.cli import main, warmup
from refattn.cores.elementwise import numba as elementwise_kernels
from refattn.cores.sdpa import numba as sdpa_kernels

ROOT = Path(__file__).resolve().parents[2]

#: Runs `refattn info` and prints the number of Numba compilations it started, last.
_INFO_COUNTING_COMPILES = """
from numba.core import event
compiles = []
class Count(event.Listener):
    def on_start(self, ev): compiles.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev): pass
event.register("numba:compile", Count())
from refattn.cli import main
status = main(["info"])
print("COMPILES", len(compiles), compiles, "STATUS", status)
"""


def test_info_compiles_nothing_and_reports_an_empty_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _INFO_COUNTING_COMPILES], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"COMPILES 0 \[\] STATUS 0", done.stdout), done.stdout
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    # no index (.nbi), lock or code (.nbc) file; only the BLAS choice, measured at import
    assert written == ["refattn-tuning.json"]
    assert re.search(r"BLAS in kernels\s+float32 \w+, float64 \w+, one thread per kernel thread "
                     r"\(found: openblas", done.stdout)
    assert "none for this CPU" in done.stdout
    assert re.search(r"sdpa\._forward_kernel\s+not cached", done.stdout)


def test_cached_signatures_lists_what_a_call_used():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 8, 4), dtype=np.float32) for _ in range(3))
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True, backend="numba")
    pullback(np.ones_like(o))
    for kernel in (sdpa_kernels._forward_kernel, sdpa_kernels._backward_kernel):
        cached = ns.cached_signatures(kernel)
        assert cached["enabled"] and os.path.isdir(cached["dir"])
        assert set(kernel.signatures) <= set(cached["here"])
    assert ns.kernel_name(sdpa_kernels._forward_kernel) == "sdpa._forward_kernel"


def test_info_lists_every_kernel_with_its_cached_dtypes(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for kernel in ns.kernels():
        if kernel.targetoptions.get("inline") != "always":
            assert ns.kernel_name(kernel) in out
    assert "numba kernels cached" in out and "first call" not in out


def test_warmup_compiles_every_case_into_the_cache(capsys):
    jobs = warmup.warmup_jobs(["elementwise", "sdpa"], ["float64"])
    names = {(name, dtype) for name, dtype, _ in jobs}
    assert names == {("elementwise", "float64"), ("sdpa", "float64")}
    n_test = len(refattn.get_variant("elementwise").cases("test", "float64"))
    assert sum(name == "elementwise" for name, _, _ in jobs) == n_test + 1   # + the default case
    assert main(["warmup", "--variants", "elementwise", "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ kernel signatures compiled, \d+ loaded from the cache", out)
    for kernel in (elementwise_kernels._exact_forward, elementwise_kernels._exact_dq,
                   elementwise_kernels._exact_dkdv):
        assert kernel.signatures and set(kernel.signatures) <= set(
            ns.cached_signatures(kernel)["here"])


def test_warmup_refuses_when_the_cache_is_off(monkeypatch, capsys):
    monkeypatch.setattr(ns, "cache_status", lambda: {"enabled": False, "dir": "/nowhere",
                                                     "reason": "not writable"})
    assert main(["warmup", "--variants", "sdpa"]) == 2
    assert "cache is off" in capsys.readouterr().err


def test_elementwise_kernels_get_one_layout_per_argument():
    """A layer's head-split (non-contiguous) views reuse the contiguous signature."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 3, 8))                  # (B, L, H, D) -> (B, H, L, D) view
    q, k, v = (np.swapaxes(x * s, 1, 2) for s in (1.0, 0.5, 2.0))
    assert not q.flags.c_contiguous
    o, pullback = refattn.vjp(refattn.elementwise_attention, q, k, v, order=4, causal=True,
                              backend="numba")
    pullback(np.ones_like(o))
    contiguous = [np.ascontiguousarray(a) for a in (q, k, v)]
    o2, pullback2 = refattn.vjp(refattn.elementwise_attention, *contiguous, order=4, causal=True,
                                backend="numba")
    pullback2(np.ones_like(o2))
    np.testing.assert_array_equal(o, o2)
    for kernel in (elementwise_kernels._taylor_forward, elementwise_kernels._taylor_backward):
        float64_sigs = [s for s in kernel.signatures if str(s[0].dtype) == "float64"]
        assert len(float64_sigs) == 1 and all(a.layout == "C" for a in float64_sigs[0][:3])


def test_the_taste_constant_is_the_readme_snippet():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## A taste\n\n```python\n(.*?)```", readme, re.DOTALL)
    assert snippet is not None and snippet.group(1) == TASTE


def test_report_json_records_seconds_per_row(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--variants", "sdpa", "--backends", "reference", "--dtypes", "float32",
                 "--no-studies", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["checks"]
    assert len(rows) == 1 and rows[0]["seconds"] > 0
