"""Performance studies: side-by-side measurements reported as ratios.

A :class:`Study` measures something that a single time cannot say (a scheme
against standard attention, shared against Hamilton quaternion attention,
numba against PyTorch, the scaling exponent of a linear-time form).  Studies
run inside one process, interleaving their contenders, so the ratios hold on
a noisy machine.  ``refattn`` (the main report) runs every study at
``size="quick"``; ``refattn bench`` runs them at ``size="full"``; the asv suite
tracks their ``metrics``.

Register a study with :func:`register_study` from the module that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .timing import compare, time_call  # noqa: F401

__all__ = ["Study", "StudyResult", "register_study", "studies", "compare", "time_call"]


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


_STUDIES: dict = {}


def register_study(study: Study) -> Study:
    if study.name in _STUDIES:
        raise ValueError(f"study {study.name!r} is already registered")
    _STUDIES[study.name] = study
    return study


def studies() -> dict:
    from .._registry import _load_all

    _load_all()
    from . import numba_studies  # noqa: F401  (registers the numba studies)
    from . import dask_scaling  # noqa: F401  (registers dask-scaling; runs only with dask)
    return dict(_STUDIES)
