"""Accuracy of the Taylor form: the truncated exponential against the exact weight.

The Taylor form replaces each pair's factor ``exp(x)``, ``x = 2 s q_ic k_jc``, by
``T_t(x) = sum_(n <= t) x^n / n!``, so each weight is off by the factor
``T_t(x) exp(-x)``.  :func:`kernel_error` is that relative error and
:func:`error_table` the table printed in ``docs/cores/elementwise.md``
(regenerate it with ``python -m refattn.cores.elementwise.accuracy``).  For the
error of whole outputs on given inputs see
:func:`refattn.elementwise_taylor_error`.
"""

from __future__ import annotations

import math

__all__ = ["kernel_error", "error_table", "TABLE_X", "TABLE_ORDERS"]

#: ``x = 2 s q k`` values of the documented table and the orders ``t`` it covers.
TABLE_X = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0)
TABLE_ORDERS = (2, 4, 6, 8, 12)


def kernel_error(x: float, order: int) -> float:
    """``|T_t(x) exp(-x) - 1|``: the relative error of one Taylor weight.

    Examples
    --------
    >>> from refattn.cores.elementwise.accuracy import kernel_error
    >>> round(kernel_error(-1.0, 6), 6)   # VARIANTS.md: 5e-4 at x = -1 for t = 6
    0.000479
    >>> round(kernel_error(-2.0, 6), 3)   # and 0.15 at x = -2
    0.149
    """
    taylor = math.fsum(x ** n / math.factorial(n) for n in range(order + 1))
    return abs(taylor * math.exp(-x) - 1.0)


def error_table(xs=TABLE_X, orders=TABLE_ORDERS) -> str:
    """Markdown table of :func:`kernel_error` for ``x`` (rows) and ``t`` (columns)."""
    lines = ["| x = 2 s q k | " + " | ".join(f"t = {t}" for t in orders) + " |",
             "|---:|" + "---:|" * len(orders)]
    for x in xs:
        lines.append(f"| {x:+g} | " + " | ".join(f"{kernel_error(x, t):.1e}" for t in orders)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(error_table())
