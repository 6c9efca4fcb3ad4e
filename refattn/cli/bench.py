"""``refattn bench``: run the performance studies (side-by-side ratios).

Each study prints its table as soon as it finishes, then its unmet targets;
the run ends with a summary line.  ``--plot DIR`` writes one PNG per study
(:mod:`refattn.cli._study_plot`), ``--json FILE`` the tables, metrics and
targets, ``--strict`` makes unmet targets exit status 3.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from ..bench import studies
from ..bench.timing import cpu_seconds
from ._errors import UsageError, check_names
from ._outcome import StudyOutcome, check_json_path, exit_status, summary_lines, write_json
from ._progress import Progress
from ._study_plot import plot_study

NAME = "bench"
HELP = "run the performance studies (ratios measured side by side in one process)"


def add_arguments(parser):
    parser.add_argument("studies", nargs="*", metavar="STUDY",
                        help="studies to run (default: all); see --list")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument("--plot", metavar="DIR", help="write one PNG per study into DIR "
                        "(created if absent; needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", help="write the tables, metrics and targets "
                        "as JSON")
    parser.add_argument("--strict", action="store_true",
                        help="exit status 3 when a study target is not met")


def select_studies(names, argument="STUDY", main_job=False) -> dict:
    """``{name: Study}`` of ``names``; :class:`UsageError` for an unknown one.

    Without names: every study, or with ``main_job`` those whose ``Study.main_job`` is set.
    """
    available = studies()
    check_names(argument, names or [], available, "study")
    if names:
        return {n: available[n] for n in names}
    return {n: s for n, s in available.items() if s.main_job or not main_job}


def bench_only(selected: dict) -> dict:
    """``{name: Study}`` of the studies that the main job leaves to ``refattn bench``."""
    return {n: s for n, s in studies().items() if not s.main_job and n not in selected}


def run_studies(selected: dict, size: str, emit=print, progress=None) -> list:
    """Run studies in turn, print each table as it finishes; return their :class:`StudyOutcome`."""
    outcomes = []
    for name, study in selected.items():
        missing = [m for m in study.requires if importlib.util.find_spec(m) is None]
        emit("")
        if missing:
            emit(f"{name}: skipped (needs {', '.join(missing)})")
            outcomes.append(StudyOutcome(name, size, "skipped",
                                         message=f"needs {', '.join(missing)}"))
            if progress is not None:
                progress.advance()
            continue
        if progress is not None:
            progress.doing(f"study {name} (size {size})")
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        try:
            result = study.run(size)
        except Exception as exc:        # a broken study is reported; the others still run
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{name}: ERROR {message}", file=sys.stderr)
            outcomes.append(StudyOutcome(name, size, "error", seconds, message=message,
                                         cpu_seconds=cpu))
        else:
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            emit(result.format())
            for f in result.failures:
                emit(f"  target not met: {f}")
            emit(f"  ({name}, size={size}, {seconds:.1f}s, {cpu:.1f} CPU s)")
            outcomes.append(StudyOutcome(name, size, "ok", seconds, result, cpu_seconds=cpu))
        if progress is not None:
            progress.advance()
    return outcomes


def write_plots(outcomes, folder, emit=print) -> list:
    """One PNG per study that ran, ``folder/<study>.png``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for o in outcomes:
        if o.status != "ok":
            continue
        path = os.path.join(folder, f"{o.name}.png")
        plot_study(o.result, path, name=o.name, size=o.size)
        emit(f"wrote {path}")
        paths.append(path)
    return paths


def _check_plot_folder(folder):
    if folder is None:
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--plot: {folder} exists and is not a folder")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed: "
                         "pip install 'refattn[plot]'")


def run(args) -> int:
    if args.list:
        for name, s in select_studies([]).items():
            where = "" if s.main_job else " [refattn bench only]"
            print(f"{name:<28} {s.summary}{where}")
        return 0
    selected = select_studies(args.studies)
    _check_plot_folder(args.plot)
    check_json_path(args.json)
    size = "quick" if args.quick else "full"
    with Progress(len(selected), "studies") as bar:
        outcomes = run_studies(selected, size, emit=bar.emit, progress=bar)
    if args.plot:
        write_plots(outcomes, args.plot)
    if all(o.status == "skipped" for o in outcomes):   # nothing measured is not a success
        raise UsageError(f"no study ran: {'; '.join(f'{o.name} {o.message}' for o in outcomes)}"
                         f" (install the extras, e.g. pip install 'refattn[test]')")
    status = exit_status(0, outcomes, args.strict)
    print()
    for line in summary_lines(0, 0, outcomes, args.strict):
        print(line)
    if args.json:
        write_json(args.json, {"command": "bench", "size": size,
                               "studies": [o.record() for o in outcomes],
                               "exit_status": status})
        print(f"wrote {args.json}")
    return status
