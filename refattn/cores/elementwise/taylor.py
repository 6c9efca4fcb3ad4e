"""The Taylor form's constants, shared by the front end and every backend.

``exp(2 x) ~ T_t(2 x) = sum_(n <= t) (2^n / n!) x^n`` for an even order ``t``
(``docs/cores/elementwise.md``).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["TAYLOR_BLOCK", "taylor_coefficients", "check_order"]

#: Query block of the reference causal Taylor scan: keys on the diagonal block are
#: weighted pair by pair (O(L * block * D)), earlier keys through moments.
TAYLOR_BLOCK = 32


def taylor_coefficients(order: int) -> list:
    """``[2^n / n! for n in 0..order]``: ``exp(2 x) ~ sum_n (2^n / n!) x^n``."""
    return [2.0 ** n / math.factorial(n) for n in range(order + 1)]


def check_order(order):
    """``None`` (exact form) or the validated even Taylor order ``t >= 2``."""
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"order must be None (exact form) or an even integer, got "
                        f"{type(order).__name__}")
    if order % 2:
        raise ValueError(
            f"order must be None (exact form) or an even integer >= 2, got {order}: the truncated "
            "exponential sum_(n<=t) x^n/n! is positive for every x only when t is even, so an odd "
            "order could make the denominator vanish or change sign")
    if order < 2:
        raise ValueError(f"order must be None (exact form) or an even integer >= 2, got {order} "
                         "(order 0 would ignore the queries)")
    return int(order)
