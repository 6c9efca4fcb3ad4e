"""Studies of the numba backend: against PyTorch, its memory bound, against the reference.

* ``sdpa-vs-torch``: forward and forward+backward throughput of the numba SDPA
  kernel over ``torch.nn.functional.scaled_dot_product_attention`` (CPU), float32
  and float64, causal and not, interleaved in one process; with this machine's GEMM
  rate (NumPy matmul) as the ceiling.  Needs torch (the ``bench`` extra).
* ``sdpa-memory``: peak resident memory of numba SDPA forward+backward above its
  inputs and outputs, measured in a fresh subprocess (Numba's allocations escape
  ``tracemalloc``, so this reads the kernel's RSS high-water mark).
* ``numba-vs-reference``: every registered core with a numba backend, numba over
  the NumPy reference, forward and forward+backward.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import cores as _cores
from ..backends import blas
from ..cores.sdpa import api
from ..cores.sdpa import numba as sdpa_numba
from .study import Study, StudyResult
from .timing import compare, interleaved_calls, time_call

__all__ = ["sdpa_vs_torch", "sdpa_memory", "numba_vs_reference"]

#: Targets of issue 7 (ratios of throughput, MiB).
TORCH_RATIO_TARGET = 1.0
MEMORY_TARGET_MIB = 64.0
REFERENCE_SPEEDUP_TARGET = 5.0


def _gemm_contenders(n: int, dtype=np.float32):
    """Square matmuls on all threads, ``{library: fn}``, and their FLOPs: the ceiling is the
    best of them (see :func:`_gemm_seconds` for when they are timed): NumPy's, and each BLAS
    the kernels can call (:mod:`refattn.backends.blas`) other than SciPy's OpenBLAS (the same
    library as NumPy's)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    contenders: dict[str, Callable[[], Any]] = {"NumPy": lambda: a @ b}
    for name, provider in blas.available().items():
        if name != "openblas":
            contenders[name] = functools.partial(blas.matmul, provider, a, b)
    return contenders, 2.0 * n ** 3


def _gemm_seconds(gemm_fn) -> float:
    """Median seconds of the ceiling GEMM, timed apart from the contenders.

    Not interleaved with them: OpenBLAS's threads keep spinning for a while after a
    multi-threaded call, and the contender timed next ran 33 % slower (measured: numba
    causal forward at (1, 8, 2048, 64), 46 ms alone or after torch, 62 ms after the GEMM).
    A pause lets them sleep before the next contender.
    """
    seconds = time_call(gemm_fn, min_time=0.2)
    time.sleep(0.5)
    return seconds


#: ``(B, H, L, E, dtype)`` judged at size "full" (issue 17), and the quick stand-ins.
TORCH_PROBLEMS = {"full": ((1, 8, 2048, 64, "float32"), (4, 16, 1024, 64, "float32"),
                           (1, 8, 8192, 64, "float32"), (1, 8, 2048, 64, "float64")),
                  "quick": ((1, 4, 512, 64, "float32"), (1, 4, 512, 64, "float64"))}
#: numba's non-causal float32 forward as a fraction of the float32 GEMM rate.
GEMM_FRACTION_TARGET = 0.8


def _problem_name(B, H, L, E, dtype) -> str:
    return f"{B}x{H}x{L}x{E}_{dtype}"


def _torch_metric_names() -> tuple:
    names = []
    for problem in TORCH_PROBLEMS["quick"]:
        for label in ("full", "causal"):
            for what in ("fwd", "fwd+bwd"):
                names.append(f"{_problem_name(*problem)}_{label}_{what}_ratio")
        if problem[4] == "float32":
            names.append(f"{_problem_name(*problem)}_full_fwd_gemm_fraction")
            names.append(f"{_problem_name(*problem)}_full_fwd_products_gemm_fraction")
    return tuple(names)


def _torch_contenders(q, k, v, do, causal, torch):
    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
    sdpa_t = torch.nn.functional.scaled_dot_product_attention

    def numba_fwd():
        return api.forward(q, k, v, causal=causal, backend="numba")[0]

    def numba_fwd_bwd():
        o, res = api.forward(q, k, v, causal=causal, backend="numba")
        return api.backward(res, do)

    def torch_fwd():
        with torch.no_grad():
            return sdpa_t(tq, tk, tv, is_causal=causal)

    def torch_fwd_bwd():
        a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
        sdpa_t(a, b, c, is_causal=causal).backward(tdo)
        return a.grad

    contenders = {"numba fwd": numba_fwd, "torch fwd": torch_fwd,
                  "numba fwd+bwd": numba_fwd_bwd, "torch fwd+bwd": torch_fwd_bwd}
    if not causal:      # the forward's tile products alone: the bound of its GEMM fraction
        opts = api.prepare(q, k, v)[2]
        contenders["numba products"] = lambda: sdpa_numba.forward_products(q, k, v, opts)
    return contenders


def sdpa_vs_torch(size: str = "quick") -> StudyResult:
    import torch

    rounds = 5 if size == "full" else 2
    rng = np.random.default_rng(0)
    timed, metrics, failures = [], {}, []
    gemm_rates: dict[str, list] = {}
    best_library: dict[str, tuple[float, str]] = {}
    for B, H, L, E, dtype in TORCH_PROBLEMS[size]:
        q, k, v, do = (rng.standard_normal((B, H, L, E)).astype(dtype) for _ in range(4))
        gemm_fns, gemm_flops = _gemm_contenders(2048 if size == "full" else 1024, dtype)
        for causal in (False, True):
            contenders = _torch_contenders(q, k, v, do, causal, torch)
            # calls of a second and more: single calls interleaved (compare repeats each 3x)
            t = (interleaved_calls(contenders, rounds) if L >= 4096 else
                 compare(contenders, rounds=rounds))
            for library, gemm_fn in gemm_fns.items():
                rate = gemm_flops / _gemm_seconds(gemm_fn) / 1e9
                gemm_rates.setdefault(dtype, []).append(rate)
                best_library[dtype] = max(best_library.get(dtype, (0.0, "")), (rate, library))
            timed.append(((B, H, L, E, dtype), causal, t))
    # The ceiling: the best rate the square GEMM reached in the run (a slow moment of one
    # measurement must not make a row look closer to it).
    ceiling = {dtype: max(rates) for dtype, rates in gemm_rates.items()}
    rows = []
    for (B, H, L, E, dtype), causal, t in timed:
        name, gemm = _problem_name(B, H, L, E, dtype), ceiling[dtype]
        fwd_flops = api.flops((B,), H, L, L, E, E, causal=causal)
        # forward+backward = 2 + 5 tile products: 3.5x the forward FLOPs (FlashAttention)
        label = "causal" if causal else "full"
        for what, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            tn, tt = t[f"numba {what}"], t[f"torch {what}"]
            ratio = tt / tn
            fraction = flops / tn / 1e9 / gemm
            metrics[f"{name}_{label}_{what}_ratio"] = ratio
            rows.append([f"({B}, {H}, {L}, {E})", dtype, f"{label} {what}",
                         f"{tn * 1e3:.1f}", f"{tt * 1e3:.1f}", f"{ratio:.2f}",
                         f"{flops / tn / 1e9:.0f}", f"{flops / tt / 1e9:.0f}",
                         f"{fraction:.0%}", f"{flops / tt / 1e9 / gemm:.0%}"])
            if size == "full" and ratio < TORCH_RATIO_TARGET:
                failures.append(f"sdpa {name} {label} {what}: numba/torch throughput "
                                f"{ratio:.2f} < {TORCH_RATIO_TARGET}")
            if dtype == "float32" and label == "full" and what == "fwd":
                bound = flops / t["numba products"] / 1e9 / gemm
                metrics[f"{name}_full_fwd_gemm_fraction"] = fraction
                metrics[f"{name}_full_fwd_products_gemm_fraction"] = bound
                rows.append([f"({B}, {H}, {L}, {E})", dtype, "full fwd: tile products only",
                             f"{t['numba products'] * 1e3:.1f}", "", "",
                             f"{flops / t['numba products'] / 1e9:.0f}", "", f"{bound:.0%}",
                             ""])
                if size == "full" and fraction < GEMM_FRACTION_TARGET:
                    failures.append(f"sdpa {name} full fwd: {fraction:.2f} of the float32 "
                                    f"GEMM rate < {GEMM_FRACTION_TARGET} (its tile products "
                                    f"alone: {bound:.2f})")
    for dtype, rate in ceiling.items():
        metrics[f"gemm_gflops_{dtype}"] = rate
    ceilings = ", ".join(f"{d} {max(r):.0f} ({best_library[d][1]}; all of the run: "
                         f"{min(r):.0f}-{max(r):.0f})" for d, r in gemm_rates.items())
    return StudyResult(
        title="numba vs torch SDPA (CPU), forward and forward+backward",
        headers=["(B, H, L, E)", "dtype", "pass", "numba ms", "torch ms", "numba/torch",
                 "numba GFLOP/s", "torch GFLOP/s", "numba / GEMM", "torch / GEMM"],
        rows=rows, metrics=metrics, failures=failures,
        notes=[f"ceiling: square GEMM of the same dtype (NumPy's matmul and each other BLAS "
               f"the kernels may call, all threads, timed after each set of contenders, then "
               f"a pause), the best rate of the run, GFLOP/s: {ceilings}",
               "BLAS in the kernels: " + ", ".join(
                   f"{d} {p.name}" for d, p in blas.bind().items()),
               "ratio = torch time / numba time (> 1: numba faster); medians of "
               f"{rounds} interleaved rounds; FLOPs: forward 4 B H L S E over kept pairs, "
               "forward+backward 3.5x that",
               f"targets at size 'full': numba/torch >= {TORCH_RATIO_TARGET} on every row; "
               f"float32 non-causal forward >= {GEMM_FRACTION_TARGET:.0%} of the GEMM rate",
               "'tile products only': the forward's two BLAS products per tile pair on its "
               "tiles and threads, without the soft-max (refattn.cores.sdpa.numba."
               "forward_products): the bound of the forward's GEMM fraction"])


_MEMORY_SCRIPT = """
import json, sys
import numpy as np
from refattn.cores.sdpa import api

L, E, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

rng = np.random.default_rng(0)
# Warm up on a problem with the same tile shapes: compiles (or loads) the kernels and lets
# the BLAS allocate its per-thread work buffers, a fixed cost that is not the kernel's.
small = [rng.standard_normal((1, 1, 512, E)).astype(np.float32) for _ in range(4)]
o, res = api.forward(*small[:3], causal=causal, backend="numba")
api.backward(res, small[3])
q, k, v, do = (rng.standard_normal((1, 1, L, E)).astype(np.float32) for _ in range(4))
with open("/proc/self/clear_refs", "w") as f:    # reset the high-water mark (VmHWM)
    f.write("5")
base = status("VmRSS")
o, res = api.forward(q, k, v, causal=causal, backend="numba")
grads = api.backward(res, do)
peak = status("VmHWM")
outputs = o.nbytes + res.lse.nbytes + sum(g.nbytes for g in grads)
print(json.dumps({"extra": peak - base - outputs, "outputs": outputs,
                  "inputs": 4 * q.nbytes, "scores": L * L * 4}))
"""


def _measure_memory(L, E, causal):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        root, os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEMORY_SCRIPT), str(L), str(E),
                           "1" if causal else "0"], capture_output=True, text=True, env=env,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sdpa_memory(size: str = "quick") -> StudyResult:
    L = 16384 if size == "full" else 4096
    E = 64
    rows, metrics, failures, notes = [], {}, [], []
    if not os.path.exists("/proc/self/clear_refs"):
        return StudyResult(title="numba SDPA peak memory", headers=["L"], rows=[],
                           notes=["needs Linux /proc (VmHWM reset); not measured here"])
    for causal in (False, True):
        m = _measure_memory(L, E, causal)
        extra = max(m["extra"], 0) / 2 ** 20
        label = "causal" if causal else "full"
        metrics[f"{label}_extra_mib"] = extra
        rows.append([label, L, f"{m['inputs'] / 2 ** 20:.0f}", f"{m['outputs'] / 2 ** 20:.0f}",
                     f"{extra:.1f}", f"{m['scores'] / 2 ** 20:.0f}"])
        if extra >= MEMORY_TARGET_MIB:
            failures.append(f"sdpa memory {label}, L = {L}: {extra:.1f} MiB >= "
                            f"{MEMORY_TARGET_MIB} MiB")
    notes.append(f"target < {MEMORY_TARGET_MIB:.0f} MiB at every size: at L = 16384 (size "
                 f"'full') a 16th of one L x L float32 map, at L = 4096 (size 'quick') less "
                 f"than one map, which a kernel that stores the scores cannot meet")
    notes.append("extra = RSS high-water mark during forward+backward minus RSS before it, "
                 "minus the outputs (o, lse, dq, dk, dv); fresh subprocess, kernels warm")
    return StudyResult(
        title=f"numba SDPA forward+backward peak memory, H=1, E={E}, float32",
        headers=["mask", "L", "inputs MiB", "outputs MiB", "extra MiB", "one L x L MiB"],
        rows=rows, metrics=metrics, failures=failures, notes=notes)


def _core_inputs(core, L, dtype, rng):
    if core.layout == "quaternion":
        shape = (1, 2, L, 4, 16)
    else:
        shape = (1, 2, L, 64)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def numba_vs_reference(size: str = "quick") -> StudyResult:

    L = 2048 if size == "full" else 128
    rounds = 3
    dtypes = ("float32",)
    rows, metrics, failures = [], {}, []
    rng = np.random.default_rng(0)
    for name, core in sorted(_cores.CORES.items()):
        if "numba" not in core.backends:
            continue
        for dtype in dtypes:
            q, k, v = _core_inputs(core, L, dtype, rng)

            def fwd(backend):
                return lambda: core.forward(q, k, v, backend=backend)[0]

            def fwd_bwd(backend):
                def run():
                    out, res = core.forward(q, k, v, backend=backend)
                    return core.backward(res, np.ones_like(out))
                return run

            try:
                t = interleaved_calls({"numba fwd": fwd("numba"),
                                       "reference fwd": fwd("reference"),
                                       "numba fwd+bwd": fwd_bwd("numba"),
                                       "reference fwd+bwd": fwd_bwd("reference")}, rounds)
            except Exception as exc:  # report, do not hide: one core must not stop the study
                rows.append([name, dtype, "error", "", "", str(exc)[:60]])
                failures.append(f"{name} {dtype}: {type(exc).__name__}: {exc}")
                continue
            speed_f = t["reference fwd"] / t["numba fwd"]
            speed_fb = t["reference fwd+bwd"] / t["numba fwd+bwd"]
            metrics[f"{name}_{dtype}_fwd_speedup"] = speed_f
            metrics[f"{name}_{dtype}_fwd_bwd_speedup"] = speed_fb
            rows.append([name, dtype, f"{t['numba fwd'] * 1e3:.1f}",
                         f"{t['reference fwd'] * 1e3:.1f}", f"{speed_f:.1f}", f"{speed_fb:.1f}"])
            for what, s in (("fwd", speed_f), ("fwd+bwd", speed_fb)):
                if size == "full" and s < REFERENCE_SPEEDUP_TARGET:
                    failures.append(f"{name} {dtype} {what}: numba/reference {s:.1f}x < "
                                    f"{REFERENCE_SPEEDUP_TARGET}x")
    return StudyResult(
        title=f"numba over the NumPy reference, L = S = {L}, 2 heads, default options",
        headers=["core", "dtype", "numba fwd ms", "reference fwd ms", "fwd speedup",
                 "fwd+bwd speedup"],
        rows=rows, metrics=metrics, failures=failures,
        notes=[f"target: >= {REFERENCE_SPEEDUP_TARGET}x at L = 2048 (size 'full')",
               f"medians of {rounds} interleaved single calls after a warm-up call"])


STUDIES = (
    Study("sdpa-vs-torch", "numba SDPA throughput over PyTorch CPU SDPA and the GEMM ceiling",
          sdpa_vs_torch, requires=("torch",), metric_names=_torch_metric_names()),
    Study("sdpa-memory", "peak memory of numba SDPA forward+backward above its inputs and "
          "outputs", sdpa_memory),
    Study("numba-vs-reference", "every numba core over the NumPy reference",
          numba_vs_reference, main_job=False,
          main_job_note="its target is judged at L = 2048 only; at the quick size it repeats "
                        "the checks' numba and reference timings of every core"),
)
