"""``refattn`` (no command): check and time every variant on every backend.

For each variant of the catalogue (refattn.catalog), each available backend that implements it and
each dtype, the default problem is run and:

* the forward output is compared with the float64 reference;
* the backward pass is compared with central finite differences (float64) or
  with the float64 reference gradients (float32);
* forward and forward+backward are timed, each sample a batch of back-to-back
  calls lasting at least :data:`TIMING_MIN_BATCH_SECONDS` (the median of 3 such
  batches), far above the clock's resolution.

The references are computed once per variant (:class:`References`) and shared by
its rows: the float64 reference output and gradients, and the float32 reference
(the bound of a float32 row), which is the reference backend's own float32 row.
Each row records its wall and CPU seconds (``--json``).

Each row is printed as soon as it is done, under a progress bar (count, ETA,
what runs now).  Then the performance studies run at ``size="quick"``.  Exit
status (:mod:`refattn.cli._errors`): 1 when a check fails or a study raises,
2 for a usage error (unknown name, unavailable backend, nothing to check), 3
with ``--strict`` when a study target is not met, else 0.  ``--json FILE``
writes everything the run printed: the rows, the timings, the study tables,
metrics and targets.
"""

from __future__ import annotations

import datetime
import platform
import time
import traceback

import numpy as np

from .._version import __version__
from ..backends import BACKENDS, available_backends
from ..bench.timing import clock_resolution, cpu_seconds, time_per_call
from ..catalog import get_variant, variants
from ..testing import TOLERANCES, check_grads, max_errors, reference_error_bound
from ._errors import UsageError, check_names
from ._outcome import check_json_path, exit_status, summary_lines, write_json
from ._progress import Progress
from .bench import bench_only, run_studies, select_studies

NAME = "report"
HELP = "check forward/backward of every variant on every backend and time it (the default)"

#: Pass rules of the report, from the one tolerance table of :mod:`refattn.testing`: a
#: float64 forward agrees with the reference to this relative error, its gradients pass
#: :func:`~refattn.testing.check_grads`; a float32 row is within the float32 reference's own
#: error (:func:`~refattn.testing.reference_error_bound`).
FLOAT64_FORWARD_RTOL = TOLERANCES["float64"][0]
RULES = {"float64": f"forward relative error <= {FLOAT64_FORWARD_RTOL:g}; gradients by central "
                    "finite differences (check_grads, rtol 1e-6)",
         "float32": "forward and gradients within 2x / 3x the float32 reference's own error "
                    "plus 16 ulps (reference_error_bound)"}
DTYPES = ("float64", "float32")
#: Each timed sample of the main job is a batch of calls lasting at least this long (and
#: at least 1000 clock ticks, :func:`~refattn.bench.timing.time_per_call`): many calls of
#: these small default problems per sample, so none is quantised by the clock; a batch
#: that the scheduler interrupts is outvoted by the median of three.  The library default
#: (:data:`refattn.bench.timing.MIN_BATCH_SECONDS`, 50 ms) made the timings of 84 rows take
#: 58 s of CPU, 20 ms about 19 s (docs/benchmarks.md).
TIMING_MIN_BATCH_SECONDS = 0.02


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to run (default: the whole catalogue; see `refattn variants`)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="backends to run (default: all available; see `refattn info`)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--studies", nargs="+", metavar="STUDY",
                        help="studies to run after the checks (default: all but those "
                             "`refattn bench --list` marks [refattn bench only])")
    parser.add_argument("--no-studies", action="store_true",
                        help="skip the performance studies")
    parser.add_argument("--strict", action="store_true",
                        help="exit status 3 when a study target is not met")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the whole report (checks, timings, study tables, "
                             "metrics, targets) as JSON")


def _grad_errors(grads, grads_ref):
    worst = 0.0
    for g, r in zip(grads, grads_ref):
        pairs = [(g[k], r[k]) for k in r] if isinstance(r, dict) else [(g, r)]
        for a, b in pairs:
            worst = max(worst, max_errors(a, b)[1])
    return worst


def _leaves(grads):
    return [x for g in grads for x in (g.values() if isinstance(g, dict) else [g])]


def _within_reference_error(out, out_ref, low_out, grads, grads_ref, low_grads, dtype):
    """Output and every gradient within the bound of :func:`reference_error_bound`."""
    triples = [(out, out_ref, low_out, False)] + [
        (g, r, lo, True) for g, r, lo in zip(_leaves(grads), _leaves(grads_ref), _leaves(low_grads))]
    scale = max(float(np.max(np.abs(np.asarray(r)), initial=0.0)) for _, r, _, _ in triples)
    for got, ref, low, gradient in triples:
        err, bound = reference_error_bound(got, ref, low, dtype, gradient=gradient,
                                           problem_scale=scale)
        if not err <= bound:
            return False
    return True


class References:
    """One variant's reference results, computed once and shared by its rows.

    ``float64_output()`` and ``float64_grads()``: the float64 reference's output and its
    gradients for a fixed cotangent ``dout``; ``low(dtype)``: the reference backend's output
    and gradients on the ``dtype`` case (the bound of a ``dtype`` row, and the reference's
    own ``dtype`` row); ``case(dtype)``: the variant's default case (built once per dtype).
    """

    def __init__(self, variant) -> None:
        self.variant = variant
        self._cases: dict = {}
        self._low: dict = {}
        self._float64: list = []         # [out, pullback, dout, grads or None]

    def case(self, dtype):
        if dtype not in self._cases:
            self._cases[dtype] = self.variant.cases("default", dtype)[0]
        return self._cases[dtype]

    def float64_output(self):
        """``(out, dout)``: the float64 reference's output and the fixed cotangent ``dout``."""
        if not self._float64:
            out, pull = self.case("float64").vjp("reference")
            self._float64 = [out, pull, np.random.default_rng(1).standard_normal(np.shape(out)),
                             None]
        return self._float64[0], self._float64[2]

    def float64_grads(self):
        """The float64 reference's gradients for ``dout`` (its backward runs once)."""
        self.float64_output()
        if self._float64[3] is None:
            self._float64[3] = self._float64[1](self._float64[2])
        return self._float64[3]

    def low(self, dtype):
        """``(out, grads)`` of the reference backend on the ``dtype`` case."""
        if dtype not in self._low:
            dout = self.float64_output()[1]
            out, pull = self.case(dtype).vjp("reference")
            self._low[dtype] = (out, pull(dout.astype(dtype)))
        return self._low[dtype]


def check_row(variant, backend, dtype, doing=lambda what: None, refs=None):
    """Run one (variant, backend, dtype) row; returns a dict of results.

    ``doing(text)`` is told what runs now (for the progress bar).  ``refs``: the
    variant's :class:`References`, shared between its rows (default: its own).
    """
    refs = References(variant) if refs is None else refs
    label = f"{variant.name} {backend} {dtype}"
    case = refs.case(dtype)
    doing(f"{label}: float64 reference")
    out_ref, dout = refs.float64_output()
    doing(f"{label}: first call" + (" (compiles the numba kernels unless cached)"
                                    if backend == "numba" else ""))
    if dtype == "float64":
        # The reference backend's float64 row is the float64 reference itself: not computed twice.
        out = out_ref if backend == "reference" else case.vjp(backend)[0]
        fwd_err = max_errors(out, out_ref)[1]
        doing(f"{label}: finite differences")
        report = check_grads(case.fn, *case.arrays, backend=backend, raise_on_failure=False,
                             **case.options)
        grad_err, grad_what = report.max_rel_error, "fd"
        ok = fwd_err <= FLOAT64_FORWARD_RTOL and report.ok
    else:
        if backend == "reference":             # the row is its own low-precision reference
            out, grads = refs.low(dtype)
            low_out, low_grads = out, grads
        else:
            out, pull = case.vjp(backend)
            grads = pull(dout.astype(dtype))
        doing(f"{label}: {dtype} reference (its own error sets the bound)")
        grads_ref = refs.float64_grads()
        if backend != "reference":
            low_out, low_grads = refs.low(dtype)
        fwd_err = max_errors(out, out_ref)[1]
        grad_err, grad_what = _grad_errors(grads, grads_ref), "ref"
        ok = _within_reference_error(out, out_ref, low_out, grads, grads_ref, low_grads, dtype)
    dout_t = dout.astype(dtype)
    # The check above already ran forward and backward (compiled, caches filled): no warm-up.
    doing(f"{label}: timing forward")
    t_fwd, n_fwd = time_per_call(lambda: case.run(backend), warmup=0,
                                 min_batch=TIMING_MIN_BATCH_SECONDS)
    doing(f"{label}: timing forward+backward")
    t_bwd, n_bwd = time_per_call(lambda: case.vjp(backend)[1](dout_t), warmup=0,
                                 min_batch=TIMING_MIN_BATCH_SECONDS)
    return dict(variant=variant.name, case=case.name, backend=backend, dtype=dtype,
                fwd_err=fwd_err, grad_err=grad_err, grad_what=grad_what, t_fwd=t_fwd,
                t_fwdbwd=t_bwd, calls_per_sample_fwd=n_fwd, calls_per_sample_fwdbwd=n_bwd,
                gflops=case.flops / t_fwd / 1e9, ok=ok)


HEADERS = ("variant", "backend", "dtype", "fwd err", "grad err", "fwd ms", "fwd+bwd ms",
           "GFLOP/s", "ok")


def row_cells(r) -> list:
    """The printed cells of one row (as the JSON's numbers, formatted)."""
    if "error" in r:
        return [r["variant"], r["backend"], r["dtype"], "-", "-", "-", "-", "-", "ERROR"]
    return [r["variant"], r["backend"], r["dtype"], f"{r['fwd_err']:.1e}",
            f"{r['grad_err']:.1e} ({r['grad_what']})", f"{r['t_fwd'] * 1e3:.3f}",
            f"{r['t_fwdbwd'] * 1e3:.3f}", f"{r['gflops']:.2f}", "yes" if r["ok"] else "FAIL"]


class RowFormat:
    """Fixed column widths known before the first row, so rows can be printed as they finish."""

    MIN = (0, 9, 7, 7, 12, 9, 10, 8, 5)

    def __init__(self, names):
        self.widths = [max(len(h), m) for h, m in zip(HEADERS, self.MIN)]
        self.widths[0] = max(self.widths[0], *map(len, names))

    def line(self, cells) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, self.widths))).rstrip()

    def header(self) -> list:
        return [self.line(HEADERS), "  ".join("-" * w for w in self.widths)]


def _jobs(args):
    names = check_names("--variants", args.variants or [], sorted(variants()), "variant")
    names = list(dict.fromkeys(names)) or sorted(variants())   # each name once
    usable = available_backends()
    chosen = list(dict.fromkeys(check_names("--backends", args.backends or [], BACKENDS,
                                            "backend"))) or list(usable)
    missing = [b for b in chosen if b not in usable]
    if missing:
        why = {"cupy": "CuPy is not installed or sees no CUDA device"}
        raise UsageError(f"--backends: {missing[0]} is not available on this machine "
                         f"({why.get(missing[0], 'its dependency does not import')}); "
                         f"available: {', '.join(usable)}")
    jobs = [(get_variant(n), b, d) for n in names for b in chosen
            if b in get_variant(n).backends for d in args.dtypes]
    if not jobs:
        raise UsageError(f"--backends: none of {', '.join(chosen)} implements "
                         f"{', '.join(names)}: nothing to check")
    return names, chosen, jobs


def run(args) -> int:
    names, chosen, jobs = _jobs(args)
    selected = {} if args.no_studies else select_studies(args.studies, "--studies",
                                                           main_job=True)
    left_out = {} if args.no_studies or args.studies else bench_only(selected)
    check_json_path(args.json)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    fmt = RowFormat(names)
    print(f"refattn {__version__}: {len(jobs)} checks on backends {', '.join(chosen)}"
          + (f", then {len(selected)} studies (size quick)" if selected else "")
          + (f"; {len(left_out)} left to `refattn bench`" if left_out else ""))
    rows, errors = [], []
    with Progress(len(jobs), "checking") as bar:
        for line in fmt.header():
            bar.emit(line)
        refs = None
        for variant, backend, dtype in jobs:
            if refs is None or refs.variant is not variant:    # the jobs come by variant
                refs = References(variant)
            row_start, row_cpu = time.perf_counter(), cpu_seconds()
            try:
                row = check_row(variant, backend, dtype, doing=bar.doing, refs=refs)
            except Exception as exc:  # report and keep going; the exit status says it
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                row = dict(variant=variant.name, backend=backend, dtype=dtype, ok=False,
                           error=text)
                errors.append(row)
            row["seconds"] = time.perf_counter() - row_start
            row["cpu_seconds"] = cpu_seconds() - row_cpu
            rows.append(row)
            bar.emit(fmt.line(row_cells(row)))
            bar.advance()
    checks_seconds, checks_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    print(f"(errors are max |x - x_ref| / max |x_ref|; grad err 'fd' = float64 finite "
          f"differences, 'ref' = against float64 reference gradients; times are medians of "
          f"batches of calls lasting >= {TIMING_MIN_BATCH_SECONDS * 1e3:.0f} ms each; "
          f"{checks_seconds:.1f}s, {checks_cpu:.1f} CPU s)")
    for r in errors:
        print(f"\nERROR in {r['variant']} / {r['backend']} / {r['dtype']}:\n{r['error']}")
    studies = []
    if selected:
        with Progress(len(selected), "studies") as bar:
            studies = run_studies(selected, "quick", emit=bar.emit, progress=bar)
    for name, study in left_out.items():
        print(f"\n{name}: run by `refattn bench {name}` only ({study.main_job_note}; "
              f"`refattn --studies {name}` adds it here)")
    n_failed = sum(not r["ok"] for r in rows)
    status = exit_status(n_failed, studies, args.strict)
    print()
    lines = summary_lines(len(rows), n_failed, studies, args.strict)
    for line in lines:
        print(line)
    if args.json:
        write_json(args.json, {
            "command": "report", "refattn_version": __version__,
            "started_utc": started.isoformat(timespec="seconds"),
            "seconds": time.perf_counter() - t0, "checks_seconds": checks_seconds,
            "cpu_seconds": cpu_seconds() - cpu0, "checks_cpu_seconds": checks_cpu,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "python": platform.python_version()},
            "backends": chosen, "dtypes": list(args.dtypes),
            "tolerances": RULES,
            "timing": {"min_batch_seconds": TIMING_MIN_BATCH_SECONDS,
                       "clock_resolution_seconds": clock_resolution()},
            "columns": list(HEADERS), "checks": rows,
            "studies": [s.record() for s in studies],
            "studies_left_to_bench": {n: s.main_job_note for n, s in left_out.items()},
            "summary": {"checks": len(rows), "failed": n_failed,
                        "study_errors": sum(s.status == "error" for s in studies),
                        "targets_not_met": sum(len(s.targets_not_met) for s in studies),
                        "strict": bool(args.strict), "lines": lines, "exit_status": status}})
        print(f"wrote {args.json}")
    return status
