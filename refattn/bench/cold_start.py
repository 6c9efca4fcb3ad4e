"""What a cold start costs: compiling numba kernels, or loading them from the cache.

* :func:`first_call_times`: in this process, the first forward+backward call of
  every core (``refattn info --first-calls``).
* :func:`cold_start_seconds`: a script in a fresh Python process whose Numba cache
  is an empty folder, so that every kernel it calls compiles (the asv ``ColdStart``
  benchmarks; docs/benchmarks.md, "Cold start").  :data:`SCRIPTS` holds the
  README's "A taste" and a float32 SDPA forward+backward.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..backends.numba_support import kernels
from ..catalog import VARIANTS

__all__ = ["SCRIPTS", "TASTE", "cold_start_seconds", "first_call_times"]

#: The README's "A taste", verbatim (a test keeps the two equal).
TASTE = '''\
import numpy as np
import refattn

rng = np.random.default_rng(0)
q = rng.standard_normal((2, 8, 128, 64), dtype=np.float32)    # (batch, H, L, E)
k = rng.standard_normal((2, 2, 128, 64), dtype=np.float32)    # (batch, Hkv, S, E): GQA
v = rng.standard_normal((2, 2, 128, 64), dtype=np.float32)

o = refattn.sdpa(q, k, v, causal=True)                       # backend="auto": numba here
o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True)
dq, dk, dv = pullback(np.ones_like(o))

layer = refattn.Attention(d_model=256, n_heads=8, projection="standard", causal=True)
params = layer.init(seed=0)
x = rng.standard_normal((2, 128, 256))
y, pullback = refattn.vjp(layer, params, x)
dparams, dx = pullback(np.ones_like(y))

# Llama-style: grouped-query heads and rotary embeddings on q and k (docs/rotary.md)
llama_like = refattn.Attention(256, 8, kv_heads=2, rotary="half", rotary_base=500000.0,
                               causal=True)
y = llama_like(llama_like.init(seed=0), x)

refattn.testing.check_grads(refattn.sdpa, q.astype(float), k.astype(float), v.astype(float))
'''

#: Scripts whose cold start :func:`cold_start_seconds` measures, by name.
SCRIPTS = {
    "taste": TASTE,
    "sdpa-float32": '''\
import numpy as np
import refattn

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, 256, 64), dtype=np.float32) for _ in range(3))
o, pullback = refattn.vjp(refattn.sdpa, q, k, v, backend="numba")
pullback(np.ones_like(o))
''',
}


def cold_start_seconds(script: str, *, cache_dir: str | None = None) -> float:
    """Wall seconds of ``python -c script`` with an empty Numba cache (or ``cache_dir``).

    ``script`` is a key of :data:`SCRIPTS` or Python source.  The child process
    starts Python, imports refattn and runs the script; with the default fresh
    empty ``NUMBA_CACHE_DIR`` every kernel it calls compiles.  A failing script
    raises :class:`RuntimeError` with its stderr.
    """
    source = SCRIPTS.get(script, script)
    with tempfile.TemporaryDirectory(prefix="refattn-cold-") as empty:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir or empty)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True,
                              text=True, check=False)
        seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"cold-start script failed (exit {done.returncode}):\n{done.stderr}")
    return seconds


def first_call_times() -> dict:
    """Seconds of the first numba call (forward + backward) of each core, per dtype.

    Runs the first ``"test"`` case of every core variant whose core has a numba
    backend, ``sdpa`` first (other cores reuse its kernels, so each row counts only
    the kernels no earlier row needed).  The first call compiles the kernels or
    loads them from the cache;
    ``"cache"`` holds ``(hits, misses)`` summed over refattn's dispatchers, so a
    reader can tell which.  For ``refattn info --first-calls``.
    """
    out: dict[str, float | tuple[int, int]] = {}
    sdpa_first = sorted(VARIANTS.items(), key=lambda item: (item[0] != "sdpa", item[0]))
    for name, variant in sdpa_first:
        if variant.kind != "core" or "numba" not in variant.backends:
            continue
        for dtype in ("float32", "float64"):
            case = variant.cases("test", dtype)[0]
            t0 = time.perf_counter()
            o, pullback = case.vjp("numba")
            pullback(np.ones_like(o))
            out[f"{name} {dtype}"] = time.perf_counter() - t0
    hits = sum(sum(d.stats.cache_hits.values()) for d in kernels())
    misses = sum(sum(d.stats.cache_misses.values()) for d in kernels())
    out["cache"] = (hits, misses)
    return out
