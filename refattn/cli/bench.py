"""``refattn bench``: run the performance studies (side-by-side ratios)."""

from __future__ import annotations

import importlib.util
import sys
import time

NAME = "bench"
HELP = "run the performance studies (ratios measured side by side in one process)"


def add_arguments(parser):
    parser.add_argument("studies", nargs="*", metavar="STUDY",
                        help="studies to run (default: all); see --list")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")


def run_studies(selected: dict, size: str) -> list:
    """Run studies, print their tables, return the results (skipping missing extras)."""
    results = []
    for name, study in selected.items():
        missing = [m for m in study.requires if importlib.util.find_spec(m) is None]
        print()
        if missing:
            print(f"{name}: skipped (needs {', '.join(missing)})")
            continue
        t0 = time.perf_counter()
        try:
            result = study.run(size)
        except Exception as exc:
            print(f"{name}: ERROR {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(result.format())
        for f in result.failures:
            print(f"  target not met: {f}")
        print(f"  ({name}, size={size}, {time.perf_counter() - t0:.1f}s)")
        results.append(result)
    return results


def run(args) -> int:
    from refattn.bench import studies

    available = studies()
    if args.list:
        for name, s in available.items():
            print(f"{name:<28} {s.summary}")
        return 0
    unknown = [s for s in args.studies if s not in available]
    if unknown:
        print(f"unknown study {', '.join(unknown)}; available: {', '.join(available)}",
              file=sys.stderr)
        return 2
    selected = {n: available[n] for n in (args.studies or available)}
    run_studies(selected, "quick" if args.quick else "full")
    return 0
