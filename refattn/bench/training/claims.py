r"""Verdicts on the papers' claims from per-seed results: reproduced, not reproduced, inconclusive.

For two models ``a`` and ``b`` with per-seed scores (higher is better) the difference of
means is ``delta = mean(a) - mean(b)`` with standard error
``se = sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (sample standard deviations over seeds) and the
interval ``delta +- 2 se``.

* "``a`` outperforms ``b``": **reproduced** if the interval lies above 0; **not reproduced**
  if it lies below 0, or inside ``+-margin`` (no difference that matters at this scale);
  otherwise **inconclusive**.
* "``a`` matches ``b``" (every such claim of the seed papers is that a cheaper ``a`` loses
  nothing against ``b``, so it is judged as *not worse*): **reproduced** if the interval lies
  above ``-margin``; **not reproduced** if it lies entirely below ``-margin`` (``a`` clearly
  worse); otherwise **inconclusive**.  An ``a`` clearly better than ``b`` reproduces it too
  (the measured difference says so).

With fewer than two seeds on a side there is no spread, and every verdict is inconclusive;
so is every verdict whose reference ``b`` did not learn (see :func:`learned`): two models at
chance level "match" without saying anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Comparison", "compare_scores", "outperforms", "matches", "learned", "combine",
           "VERDICTS"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass(frozen=True)
class Comparison:
    """``delta = mean(a) - mean(b)`` and its standard error ``se`` over seeds."""

    delta: float
    se: float
    n: int          # the smaller number of seeds of the two sides

    @property
    def low(self) -> float:
        return self.delta - 2.0 * self.se

    @property
    def high(self) -> float:
        return self.delta + 2.0 * self.se

    def describe(self, scale=1.0, unit="") -> str:
        if self.n < 2:
            return f"{self.delta * scale:+.2f}{unit} (1 seed: no spread)"
        return (f"{self.delta * scale:+.2f}{unit} (+-2se [{self.low * scale:+.2f}, "
                f"{self.high * scale:+.2f}]{unit}, {self.n} seeds)")


def compare_scores(a, b) -> Comparison:
    """The :class:`Comparison` of per-seed scores ``a`` and ``b`` (sequences of floats)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or b.ndim != 1 or not len(a) or not len(b):
        raise ValueError("a and b must be non-empty 1-d sequences of per-seed scores")
    n = min(len(a), len(b))
    if n < 2:
        return Comparison(float(a.mean() - b.mean()), math.nan, n)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return Comparison(float(a.mean() - b.mean()), se, n)


def outperforms(c: Comparison, margin: float) -> str:
    """Verdict on "a outperforms b" (see the module docstring)."""
    if c.n < 2:
        return "inconclusive"
    if c.low > 0:
        return "reproduced"
    if c.high < 0 or (c.low >= -margin and c.high <= margin):
        return "not reproduced"
    return "inconclusive"


def matches(c: Comparison, margin: float) -> str:
    """Verdict on "a matches b", judged as "a is not worse than b" (see the module docstring)."""
    if c.n < 2:
        return "inconclusive"
    if c.low >= -margin:
        return "reproduced"
    if c.high < -margin:
        return "not reproduced"
    return "inconclusive"


def learned(scores, chance: float, factor: float) -> bool:
    """Whether the mean of ``scores`` is above ``factor`` times the ``chance`` accuracy."""
    return float(np.mean(scores)) > factor * chance


def combine(verdicts) -> str:
    """One verdict for a claim tested in several settings: reproduced only if reproduced in
    every one, not reproduced if not reproduced in any, otherwise inconclusive.

    Examples
    --------
    >>> from refattn.bench.training.claims import combine
    >>> combine(["reproduced", "inconclusive"]), combine(["reproduced", "not reproduced"])
    ('inconclusive', 'not reproduced')
    """
    verdicts = list(verdicts)
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if "not reproduced" in verdicts:
        return "not reproduced"
    return "inconclusive"
