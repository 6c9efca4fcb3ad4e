"""What a performance study is: ``run(size) -> StudyResult``, a table of ratios and targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Study", "StudyResult"]


@dataclass
class StudyResult:
    """A table: ``headers`` and ``rows`` (lists of cells), ``metrics`` (name -> float) and notes.

    ``metrics`` are the headline numbers (ratios, exponents) that asv tracks and
    that targets are judged by; ``failures`` lists targets not met (strings).
    """

    title: str
    headers: list
    rows: list
    metrics: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def format(self) -> str:
        cells = [list(map(str, self.headers))] + [[str(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        line = "  ".join("-" * w for w in widths)
        out = [self.title, line]
        for j, r in enumerate(cells):
            out.append("  ".join(c.rjust(w) if j else c.ljust(w) for c, w in zip(r, widths)))
            if j == 0:
                out.append(line)
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


@dataclass(frozen=True)
class Study:
    """``run(size) -> StudyResult`` with ``size`` in ``("quick", "full")``."""

    name: str
    summary: str
    run: Callable
    requires: tuple = ()   # optional modules (e.g. "torch"); the study is skipped without them
    metric_names: tuple = ()  # names of ``StudyResult.metrics`` that asv tracks
    #: Whether the main job ``refattn`` runs it (at size "quick").  False for a study whose
    #: quick size cannot judge its claim in seconds (why: ``main_job_note``); ``refattn
    #: bench`` runs every study, ``refattn --studies NAME`` adds it to the main job.
    main_job: bool = True
    main_job_note: str = ""
