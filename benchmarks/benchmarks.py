"""asv suite generated from the refattn catalogue (refattn.catalog.VARIANTS).

For every variant of the catalogue: ``time_forward``, ``time_forward_backward`` and
``peakmem_forward_backward`` over its ``"bench"`` cases x backends x dtypes
(a backend that is not available, or not implemented for the variant, shows
as n/a).  For every performance study: ``track_`` benchmarks of its metrics
(ratios, exponents), measured side by side inside one process.  ``ColdStart``:
``time_`` of a first call in a fresh process with an empty Numba cache (so it
compiles every kernel it calls): a float32 SDPA forward+backward, and the README's
"A taste" (full matrix only).

Two selections (environment variables, read when asv discovers the suite):

* default, the **quick selection**: one variant per core (``sdpa``,
  ``elementwise``, ``quaternion-hamilton``, ..., :func:`quick_variants`), its
  first bench case, float32, the fused backends (numba; cupy where a GPU is
  visible), ``time_forward_backward`` only, one process and at most 5 samples
  per benchmark, the cold start of the float32 SDPA forward+backward (one sample),
  plus the studies: 10 benchmarks.
  ``asv continuous HEAD~1 HEAD`` finishes in about 15 minutes on 2 cores (README).
* ``REFATTN_ASV_FULL=1``: the full matrix, every bench case x backend
  (reference too) x dtype, with asv's default sampling, and the cold start of
  "A taste" too (about 1 h 40 min on 2 cores).

Numba kernels are compiled and warmed up in ``setup`` so compile time never
counts; CUDA work is synchronised before the clock stops.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import ClassVar

import numpy as np

import refattn
from refattn.backends import BACKENDS, available_backends
from refattn.bench import studies
from refattn.bench.cold_start import SCRIPTS, cold_start_seconds

#: ``REFATTN_ASV_FULL=1``: the full matrix; otherwise the quick selection (module docstring).
FULL = os.environ.get("REFATTN_ASV_FULL", "") not in ("", "0")
DTYPES = ["float32", "float64"] if FULL else ["float32"]
SUITE_BACKENDS = list(BACKENDS) if FULL else [b for b in BACKENDS if b != "reference"]
#: ``REFATTN_ASV_SMOKE=1`` swaps the bench sizes for the small "default" problems:
#: CI runs every benchmark once that way, so the suite never rots, in seconds.
CASE_KIND = "default" if os.environ.get("REFATTN_ASV_SMOKE") else "bench"
#: asv sampling of the quick selection: one process, 1 to 5 samples within 5 s.
QUICK_SAMPLING = {} if FULL else {"processes": 1, "repeat": (1, 5, 5.0)}


@functools.lru_cache(maxsize=None)
def _labels(variant_name):
    labels = tuple(c.name for c in refattn.get_variant(variant_name).cases(CASE_KIND, "float32"))
    return labels if FULL else labels[:1]


def _to_backend(backend, x):
    if backend != "cupy":
        return x
    import cupy

    if isinstance(x, dict):
        return {k: cupy.asarray(v) for k, v in x.items()}
    return cupy.asarray(x)


def _sync(backend):
    if backend == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def quick_variants() -> list:
    """One variant per core: the core variant itself where the catalogue has one, else the first layer."""
    chosen = {}
    for name, v in sorted(refattn.variants().items(), key=lambda nv: (nv[1].kind != "core",
                                                                      nv[0])):
        chosen.setdefault(v.core, name)
    return sorted(chosen.values())


def _variant_suite(variant_name):
    class VariantSuite:
        params = [list(_labels(variant_name)), SUITE_BACKENDS, DTYPES]
        param_names = ["case", "backend", "dtype"]
        timeout = 600

        def setup(self, label, backend, dtype):
            variant = refattn.get_variant(variant_name)
            if backend not in available_backends() or backend not in variant.backends:
                raise NotImplementedError(f"{backend} not available for {variant_name}")
            case = next(c for c in variant.cases(CASE_KIND, dtype) if c.name == label)
            if case.backends is not None and backend not in case.backends:
                raise NotImplementedError(f"{label} is not meant for {backend}")
            self.backend = backend
            self.fn = case.fn
            self.arrays = tuple(_to_backend(backend, a) for a in case.arrays)
            self.options = {k: _to_backend(backend, v) if isinstance(v, np.ndarray) else v
                            for k, v in case.options.items()}
            out, pullback = refattn.vjp(self.fn, *self.arrays, backend=backend, **self.options)
            self.dout = _to_backend(backend, np.ones(out.shape, dtype=dtype))
            pullback(self.dout)          # warm up: compile kernels, fill caches
            _sync(backend)

        def time_forward(self, *_):
            self.fn(*self.arrays, backend=self.backend, **self.options)
            _sync(self.backend)

        def time_forward_backward(self, *_):
            _, pullback = refattn.vjp(self.fn, *self.arrays, backend=self.backend, **self.options)
            pullback(self.dout)
            _sync(self.backend)

        def peakmem_forward_backward(self, *_):
            _, pullback = refattn.vjp(self.fn, *self.arrays, backend=self.backend, **self.options)
            pullback(self.dout)

    for attribute, value in QUICK_SAMPLING.items():
        setattr(VariantSuite, attribute, value)
    if not FULL:                     # the quick selection times forward+backward only
        del VariantSuite.time_forward, VariantSuite.peakmem_forward_backward
    VariantSuite.__name__ = VariantSuite.__qualname__ = (
        "Variant_" + variant_name.replace("-", "_"))
    return VariantSuite


for _name in (sorted(refattn.variants()) if FULL else quick_variants()):
    _suite = _variant_suite(_name)
    globals()[_suite.__name__] = _suite


class Studies:
    """Headline ratios of the performance studies (quick size), tracked across commits."""

    params = [[f"{s.name}:{m}" for s in studies().values() for m in s.metric_names]
              or ["none:none"]]
    param_names = ["study_metric"]
    timeout = 900
    unit = "ratio"

    def setup_cache(self):
        import importlib.util

        metrics, broken, measured = {}, set(), set()
        for name, study in studies().items():
            if any(importlib.util.find_spec(m) is None for m in study.requires):
                continue                 # its optional dependencies are not in this env: n/a
            try:
                result = study.run("quick")
            except Exception:  # a broken study fails its metrics, the others still run
                broken.add(name)
                continue
            metrics.update({f"{name}:{k}": float(v) for k, v in result.metrics.items()})
            if result.metrics:
                measured.add(name)
        return metrics, broken, measured

    def track_metric(self, cache, study_metric):
        metrics, broken, measured = cache
        if study_metric in metrics:
            return metrics[study_metric]
        study = study_metric.split(":", 1)[0]
        if study in broken:
            raise RuntimeError(f"study of {study_metric} raised (run `refattn bench` to see)")
        if study in measured:       # a metric renamed or dropped: not a silent n/a
            raise RuntimeError(f"study {study} ran but reported no {study_metric!r}")
        # Not measurable in this environment (e.g. torch, dask or a GPU absent from asv's
        # virtualenv): NaN, which asv shows as n/a rather than as a failure.
        return float("nan")


class ColdStart:
    """A first call in a fresh process with an empty Numba cache: Python start, import, compile.

    Each sample gets its own empty ``NUMBA_CACHE_DIR``; one sample per run (a
    sample compiles for tens of seconds).
    """

    params: ClassVar[list] = [list(SCRIPTS) if FULL else ["sdpa-float32"]]
    param_names: ClassVar[list] = ["script"]
    timeout = 900
    number = 1
    repeat = (1, 3, 600.0) if FULL else 1
    warmup_time = 0
    processes = 1

    def setup(self, script):
        self.cache_dirs = []

    def teardown(self, script):
        for path in self.cache_dirs:
            shutil.rmtree(path, ignore_errors=True)

    def time_first_call(self, script):
        self.cache_dirs.append(tempfile.mkdtemp(prefix="refattn-asv-cold-"))
        cold_start_seconds(script, cache_dir=self.cache_dirs[-1])

