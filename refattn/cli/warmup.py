"""``refattn warmup``: compile every numba kernel once, into Numba's cache.

A numba kernel compiles the first time a process calls it with a new
signature (dtype, array layouts, option flags) unless Numba's cache
(``NUMBA_CACHE_DIR``, else beside the sources) already holds it for this CPU;
compiling the SDPA kernels takes several seconds each.  ``refattn warmup``
runs the first forward+backward call of every ``"test"`` case (they cover the
options) and of the ``"default"`` case of every variant with a numba backend,
per dtype, so that every later process loads the kernels from the cache
instead.  Run it once after installing or upgrading refattn, after changing
``NUMBA_CACHE_DIR``, or when ``refattn info`` reports kernels as not cached;
a run that finds everything cached takes seconds.
"""

from __future__ import annotations

import time

import numpy as np

from ..backends import numba_support as ns
from ..catalog import get_variant, variants
from ._errors import UsageError, check_names
from ._progress import Progress
from .info import cache_facts

NAME = "warmup"
HELP = "compile every numba kernel once into Numba's cache (run once after installing)"
DTYPES = ("float32", "float64")
#: The case kinds whose first calls are compiled: every option (``test``) and the
#: main job's problems (``default``).
KINDS = ("test", "default")


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to warm up (default: every variant with a numba backend; "
                             "see `refattn variants`)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)


def warmup_jobs(names, dtypes) -> list:
    """``(variant name, dtype, case)`` of every case whose first numba call is compiled."""
    jobs = []
    for name in names:
        variant = get_variant(name)
        if "numba" not in variant.backends:
            continue
        for dtype in dtypes:
            for kind in KINDS:
                cases = variant.cases(kind, dtype)
                for case in cases if kind == "test" else cases[:1]:
                    if case.backends is None or "numba" in case.backends:
                        jobs.append((name, dtype, case))
    return jobs


def run(args) -> int:
    status = ns.cache_status()
    if not status["enabled"]:
        raise UsageError(f"the Numba cache is off ({status['reason']}): warming up would "
                         "compile into memory and keep nothing")
    names = list(dict.fromkeys(check_names("--variants", args.variants or [],
                                           sorted(variants()), "variant"))) or sorted(variants())
    jobs = warmup_jobs(names, args.dtypes)
    if not jobs:
        raise UsageError(f"--variants: none of {', '.join(names)} has a numba backend")
    print(f"refattn warmup: first numba calls of {len(jobs)} cases into {status['dir']}")
    t0 = time.perf_counter()
    with Progress(len(jobs), "warming up") as bar:
        for name, dtype, case in jobs:
            bar.doing(f"{name} {dtype} {case.name}")
            out, pullback = case.vjp("numba")
            pullback(np.ones_like(out))
            bar.advance()
    hits = sum(sum(d.stats.cache_hits.values()) for d in ns.kernels())
    misses = sum(sum(d.stats.cache_misses.values()) for d in ns.kernels())
    print(f"{misses} kernel signatures compiled, {hits} loaded from the cache, in "
          f"{time.perf_counter() - t0:.1f} s")
    facts = cache_facts()
    width = max(map(len, facts))
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    return 0

