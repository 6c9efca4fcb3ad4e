"""``refattn`` (no command): check and time every variant on every backend.

For each registered variant, each available backend that implements it and
each dtype, the default problem is run and:

* the forward output is compared with the float64 reference;
* the backward pass is compared with central finite differences (float64) or
  with the float64 reference gradients (float32);
* forward and forward+backward are timed.

Then every performance study runs at ``size="quick"``.  The exit status is
non-zero when any check fails; unmet performance targets are printed but do
not fail the run (timings on shared machines are noisy).
"""

from __future__ import annotations

import sys
import time
import traceback

import numpy as np

NAME = "report"
HELP = "check forward/backward of every variant on every backend and time it (the default)"

#: Pass thresholds of the report (relative to the largest reference magnitude).
#: float64 forward agrees to rounding; finite differences to 1e-6 (see check_grads);
#: float32 is judged against the float64 reference with the documented tolerance.
FORWARD_TOL = {"float64": 1e-10, "float32": 2e-4}
GRADIENT_TOL = {"float64": 1e-6, "float32": 2e-4}


def add_arguments(parser):
    parser.add_argument("--variants", nargs="*", metavar="NAME",
                        help="variants to run (default: all registered)")
    parser.add_argument("--backends", nargs="*", metavar="NAME",
                        help="backends to run (default: all available)")
    parser.add_argument("--dtypes", nargs="*", default=["float64", "float32"],
                        choices=["float64", "float32"])
    parser.add_argument("--no-studies", action="store_true",
                        help="skip the performance studies")


def _grad_errors(grads, grads_ref):
    from refattn.testing import max_errors

    worst = 0.0
    for g, r in zip(grads, grads_ref):
        pairs = [(g[k], r[k]) for k in r] if isinstance(r, dict) else [(g, r)]
        for a, b in pairs:
            worst = max(worst, max_errors(a, b)[1])
    return worst


def check_row(variant, backend, dtype):
    """Run one (variant, backend, dtype) row; returns a dict of results."""
    from refattn.bench import time_call
    from refattn.testing import check_grads, max_errors

    case = variant.cases("default", dtype)[0]
    ref = variant.cases("default", "float64")[0]
    out_ref, pull_ref = ref.vjp("reference")
    dout = np.random.default_rng(1).standard_normal(np.shape(out_ref))
    out, pull = case.vjp(backend)
    fwd_err = max_errors(out, out_ref)[1]
    if dtype == "float64":
        report = check_grads(case.fn, *case.arrays, backend=backend, raise_on_failure=False,
                             **case.options)
        grad_err, grad_what = report.max_rel_error, "fd"
    else:
        grads = pull(dout.astype(dtype))
        grad_err, grad_what = _grad_errors(grads, pull_ref(dout)), "ref"
    dout_t = dout.astype(dtype)
    t_fwd = time_call(lambda: case.run(backend), min_time=0.1, max_repeats=20)
    t_bwd = time_call(lambda: case.vjp(backend)[1](dout_t), min_time=0.1, max_repeats=20)
    ok = fwd_err <= FORWARD_TOL[dtype] and grad_err <= GRADIENT_TOL[dtype]
    return dict(variant=variant.name, case=case.name, backend=backend, dtype=dtype,
                fwd_err=fwd_err, grad_err=grad_err, grad_what=grad_what, t_fwd=t_fwd,
                t_fwdbwd=t_bwd, gflops=case.flops / t_fwd / 1e9, ok=ok)


def _format_rows(rows):
    headers = ["variant", "backend", "dtype", "fwd err", "grad err", "fwd ms", "fwd+bwd ms",
               "GFLOP/s", "ok"]
    table = [headers]
    for r in rows:
        if "error" in r:
            table.append([r["variant"], r["backend"], r["dtype"], "-", "-", "-", "-", "-",
                          "ERROR"])
            continue
        table.append([r["variant"], r["backend"], r["dtype"], f"{r['fwd_err']:.1e}",
                      f"{r['grad_err']:.1e} ({r['grad_what']})", f"{r['t_fwd'] * 1e3:.2f}",
                      f"{r['t_fwdbwd'] * 1e3:.2f}", f"{r['gflops']:.2f}",
                      "yes" if r["ok"] else "FAIL"])
    widths = [max(len(t[i]) for t in table) for i in range(len(headers))]
    lines = []
    for j, t in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(t, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    import refattn
    from refattn.backends import available_backends
    from refattn.bench import studies

    from ._progress import Progress

    names = args.variants or sorted(refattn.variants())
    for n in names:
        refattn.get_variant(n)  # clear error for an unknown name
    usable = available_backends()
    chosen = args.backends or usable
    jobs = [(refattn.get_variant(n), b, d) for n in names for b in chosen
            if b in usable and b in refattn.get_variant(n).backends for d in args.dtypes]
    print(f"refattn {refattn.__version__}: {len(jobs)} checks on backends {', '.join(chosen)}")
    progress = Progress(len(jobs), "checking")
    rows, t0 = [], time.perf_counter()
    for variant, backend, dtype in jobs:
        try:
            rows.append(check_row(variant, backend, dtype))
        except Exception as exc:  # report and keep going; the exit status says it
            rows.append(dict(variant=variant.name, backend=backend, dtype=dtype, ok=False,
                             error="".join(traceback.format_exception_only(type(exc), exc))))
        progress.update(f"{variant.name} {backend} {dtype}")
    progress.close()
    print(_format_rows(rows))
    print(f"(errors are max |x - x_ref| / max |x_ref|; grad err 'fd' = float64 finite "
          f"differences, 'ref' = against float64 reference gradients; {time.perf_counter() - t0:.1f}s)")
    for r in rows:
        if "error" in r:
            print(f"\nERROR in {r['variant']} / {r['backend']} / {r['dtype']}:\n{r['error']}",
                  file=sys.stderr)
    failed = [r for r in rows if not r["ok"]]
    if not args.no_studies:
        from .bench import run_studies

        run_studies(studies(), "quick")
    if failed:
        print(f"\n{len(failed)} check(s) FAILED", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0
