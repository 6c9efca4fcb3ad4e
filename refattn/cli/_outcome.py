"""What a run of checks and studies ended with: the summary lines, the exit status, the JSON.

Shared by ``refattn`` (the main job) and ``refattn bench``.  Exit statuses:
:mod:`refattn.cli._errors`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..bench.study import StudyResult
from ._errors import FAILED, OK, TARGETS_NOT_MET, UsageError

__all__ = ["StudyOutcome", "summary_lines", "exit_status", "write_json", "check_json_path"]


@dataclass
class StudyOutcome:
    """One study of a run: ``status`` "ok" (it ran), "skipped" (missing extra) or "error"."""

    name: str
    size: str
    status: str
    seconds: float = 0.0
    result: StudyResult | None = None   # when status == "ok"
    cpu_seconds: float = 0.0            # of this process and its finished children
    message: str = ""

    @property
    def targets_not_met(self) -> list:
        return list(self.result.failures) if self.result is not None else []

    def record(self) -> dict:
        """A JSON-ready dict: the table, the metrics, the targets."""
        rec = {"name": self.name, "size": self.size, "status": self.status,
               "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
               "message": self.message}
        if self.result is not None:
            r = self.result
            rec.update(title=r.title, headers=[str(h) for h in r.headers],
                       rows=[[str(c) for c in row] for row in r.rows],
                       metrics={k: _finite(v) for k, v in r.metrics.items()},
                       notes=list(r.notes), targets_not_met=list(r.failures),
                       targets_met=not r.failures)
        return rec


def _finite(x):
    """A JSON number, or ``None`` for NaN/Inf (strict JSON has neither)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def jsonable(obj):
    """``obj`` with NaN/Inf floats replaced by ``None``, tuples by lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float) or hasattr(obj, "__float__"):
        return _finite(obj)
    return str(obj)


def exit_status(n_failed: int, studies: list, strict: bool) -> int:
    """1 if a check failed or a study raised; else 3 if ``strict`` and a target was missed."""
    if n_failed or any(s.status == "error" for s in studies):
        return FAILED
    if strict and any(s.targets_not_met for s in studies):
        return TARGETS_NOT_MET
    return OK


def summary_lines(n_checks: int, n_failed: int, studies: list, strict: bool) -> list:
    """The closing lines: the verdict of the checks, then of the study targets."""
    lines = []
    if n_checks:
        lines.append(f"{n_failed} of {n_checks} check(s) FAILED" if n_failed
                     else f"all {n_checks} checks passed")
    errors = [s.name for s in studies if s.status == "error"]
    if errors:
        lines.append(f"{len(errors)} study(ies) raised an error: {', '.join(errors)}")
    skipped = [s.name for s in studies if s.status == "skipped"]
    if skipped:
        lines.append(f"{len(skipped)} study(ies) skipped (missing extras): {', '.join(skipped)}")
    ran = [s for s in studies if s.status == "ok"]
    unmet = [(s.name, t) for s in ran for t in s.targets_not_met]
    if unmet:
        where = ", ".join(sorted({name for name, _ in unmet}))
        lines.append(f"{len(unmet)} study target(s) not met ({where})" +
                     (": exit status 3 (--strict)" if strict else
                      "; --strict makes this exit status 3"))
    elif ran:
        lines.append(f"all targets of {len(ran)} study(ies) met")
    return lines


def check_json_path(path):
    """Fail before a long run, not after it, when ``--json FILE`` cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--json: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--json: {path} is a folder; give a file name")


def write_json(path, report: dict):
    """Write ``report`` as strict JSON (NaN/Inf as null), indented."""
    with open(path, "w") as f:
        json.dump(jsonable(report), f, indent=1, allow_nan=False)
        f.write("\n")
