"""The result of :func:`refattn.verify.verify`: one row per compared quantity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .empty_rows import CONVENTIONS

__all__ = ["Check", "VerifyReport"]

#: Row statuses.  ``ok``/``FAIL``: a comparison was made.  ``n/a``: the candidate
#: cannot express the case (e.g. an explicit dropout keep-mask); reported, not failed.
#: ``error``: the candidate raised or returned something unusable (counts as a failure).
STATUSES = ("ok", "FAIL", "n/a", "error")


@dataclass(frozen=True)
class Check:
    """One compared quantity of one case in one dtype.

    Attributes
    ----------
    case, dtype, quantity : str
        ``quantity`` is ``"out"`` or a gradient ``"d<input>"`` (``"dq"``, ``"dw_q"``,
        ``"dxq"``, ...), or ``"-"`` for a case that did not run.
    max_abs : float or None
        ``max |candidate - reference|`` against the float64 reference: NaN when
        the candidate is NaN where the reference is not; None when not measured
        (a case that did not run).
    rel : float
        ``max_abs / max |reference|``.
    reference_rel : float
        The same error of refattn's own reference in the candidate's dtype
        (see :mod:`refattn.verify.tolerance`).
    allowed : float
        The largest accepted ``rel``.
    status : {"ok", "FAIL", "n/a", "error"}
    note : str
        Why a row failed or did not run.
    scale : float or None
        The quantity's scale (``rel = max_abs / scale``).
    """

    case: str
    dtype: str
    quantity: str
    max_abs: float | None = None
    rel: float | None = None
    reference_rel: float | None = None
    allowed: float | None = None
    status: str = "ok"
    note: str = ""
    scale: float | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "error")


def _num(x) -> str:
    """``-`` for not measured, ``NaN``, ``inf``, else three significant digits."""
    if x is None:
        return "-"
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2e}"


@dataclass
class VerifyReport:
    """Errors of a candidate against the float64 reference, per case, dtype and quantity.

    ``repr(report)`` is a table; :meth:`assert_` raises an ``AssertionError``
    listing the failures (use it in pytest); :attr:`ok` is the verdict;
    :meth:`to_dict` is the same as plain data (JSON-serialisable).

    Attributes
    ----------
    empty_rows : str
        The empty-row convention the report compared under (``verify(empty_rows=)``).
    conventions : dict
        ``{case: "zero" | "uniform" | "nan"}``: failing cases whose output is
        right except on its empty rows, where it follows that convention instead
        of :attr:`empty_rows` (:mod:`refattn.verify.empty_rows`).
    diagnosis : refattn.verify.diagnose.Diagnosis or None
        The likely cause of the other failures (None when nothing else failed).
    """

    variant: str
    candidate: str
    framework: str
    checks: list = field(default_factory=list)
    empty_rows: str = "zero"
    conventions: dict = field(default_factory=dict)
    diagnosis: Any = None
    legend: str = ("rel err = max|candidate - float64 reference| / scale; allowed = factor x "
                   "ref err + floor, ref err = refattn's own error in that dtype "
                   "(refattn.verify.tolerance)")

    @property
    def compared(self) -> list:
        return [c for c in self.checks if c.status in ("ok", "FAIL")]

    @property
    def failures(self) -> list:
        return [c for c in self.checks if c.failed]

    @property
    def not_run(self) -> list:
        return [c for c in self.checks if c.status == "n/a"]

    @property
    def ok(self) -> bool:
        """True when nothing failed and at least one comparison was made."""
        return not self.failures and bool(self.compared)

    def summary(self) -> str:
        verdict = "PASSED" if self.ok else "FAILED"
        text = (f"{verdict}: {self.candidate} ({self.framework}) vs refattn {self.variant!r}: "
                f"{len(self.compared) - sum(c.status == 'FAIL' for c in self.compared)} of "
                f"{len(self.compared)} checks within tolerance")
        raised = {c.case for c in self.checks if c.status == "error"}
        if raised:
            text += f", {len(raised)} case(s) raised"
        not_run = {c.case for c in self.not_run}
        if not_run:
            text += f", {len(not_run)} case(s) not expressible by the candidate (n/a)"
        if not self.compared:
            text += " (nothing was compared)"
        return text

    @property
    def convention(self) -> str | None:
        """The empty-row convention detected in every case that shows one (None: none or mixed)."""
        found = set(self.conventions.values())
        return found.pop() if len(found) == 1 else None

    def explanation(self) -> str:
        """The empty-row convention and the diagnosis, as text lines ("" when nothing failed)."""
        lines = []
        for convention in sorted(set(self.conventions.values())):
            cases = [c for c, v in self.conventions.items() if v == convention]
            compared = ("refattn gives 0" if self.empty_rows == "zero" else
                        f"compared under empty_rows={self.empty_rows!r}")
            lines.append(f"empty rows: the candidate follows {CONVENTIONS[convention]} in "
                         f"{len(cases)} case(s) ({', '.join(cases)}); {compared}. Pass "
                         f"empty_rows={convention!r} to verify() to compare those rows under it.")
        if self.diagnosis is not None:
            lines.append(self.diagnosis.text())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as plain data: verdict, summary, rows, conventions, diagnosis.

        Non-finite numbers become the strings ``"nan"``, ``"inf"``, ``"-inf"``.
        """
        def plain(x):
            return x if not isinstance(x, float) or math.isfinite(x) else str(x)

        return {"variant": self.variant, "candidate": self.candidate,
                "framework": self.framework, "ok": self.ok, "summary": self.summary(),
                "empty_rows": self.empty_rows,
                "conventions": dict(self.conventions),
                "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
                "checks": [{k: plain(v) for k, v in asdict(c).items()} for c in self.checks]}

    def table(self, checks=None) -> str:
        """The rows as an aligned text table (all rows by default)."""
        checks = self.checks if checks is None else checks
        head = ("case", "dtype", "value", "max abs", "rel err", "allowed", "ref err", "status")
        rows = [(c.case, c.dtype, c.quantity, _num(c.max_abs), _num(c.rel), _num(c.allowed),
                 _num(c.reference_rel), c.status + (f"  {c.note}" if c.note else ""))
                for c in checks]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        lines = []
        for r in [head, *rows]:
            cells = [r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i])
                     for i in range(len(widths))]
            lines.append("  ".join(cells + [r[-1]]).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        explanation = self.explanation()
        return "\n".join([self.summary(), *([explanation] if explanation else []), self.legend,
                          self.table()])

    def assert_(self) -> "VerifyReport":
        """Raise ``AssertionError`` with the failing rows unless :attr:`ok`; return ``self``."""
        if not self.ok:
            shown = self.failures or self.checks
            explanation = self.explanation()
            raise AssertionError(f"{self.summary()}\n"
                                 + (f"{explanation}\n" if explanation else "")
                                 + self.table(shown))
        return self
