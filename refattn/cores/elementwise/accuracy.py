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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._array import to_numpy
from .api import elementwise_attention, forward
from .taylor import check_order
from ...typing import Array, CausalAlign

__all__ = ["kernel_error", "error_table", "TABLE_X", "TABLE_ORDERS", "TaylorError",
           "elementwise_taylor_error"]

#: ``x = 2 s q k`` values of the documented table and the orders ``t`` it covers.
TABLE_X = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0)
TABLE_ORDERS = (2, 4, 6, 8, 12)


def kernel_error(x: float, order: int) -> float:
    """``|T_t(x) exp(-x) - 1|``: the relative error of one Taylor weight.

    Examples
    --------
    >>> from refattn.cores.elementwise.accuracy import kernel_error
    >>> round(kernel_error(-1.0, 6), 6)   # docs/variants.md: 5e-4 at x = -1 for t = 6
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


@dataclass(frozen=True)
class TaylorError:
    """Error of the Taylor form against the exact form on given inputs.

    Attributes
    ----------
    max_abs : float
        ``max |o_taylor - o_exact|``.
    max_rel : float
        ``max_abs / max |o_exact|``.
    max_abs_x : float
        Largest ``|x| = |2 s q_ic k_jc|`` over the pairs that were kept (the
        quantity that governs the truncation error).
    order : int
    """

    max_abs: float
    max_rel: float
    max_abs_x: float
    order: int


def elementwise_taylor_error(q: Array, k: Array, v: Array, order: int, *, causal: bool = False,
                             causal_align: CausalAlign = "upper_left", scale: float = 1.0,
                             mask: Array | None = None) -> TaylorError:
    """How far the Taylor form of ``order`` is from the exact form on these inputs.

    Both forms are computed in float64 with the reference backend (O(L S D) for
    the exact one).  Returns a :class:`TaylorError`.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.4 * rng.standard_normal((2, 32, 8)) for _ in range(3))
    >>> errors = [refattn.elementwise_taylor_error(q, k, v, t).max_rel for t in (2, 4, 6)]
    >>> errors == sorted(errors, reverse=True)
    True
    """
    if check_order(order) is None:
        raise ValueError("order must be an even integer (the Taylor form to assess)")
    q64, k64, v64 = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q, k, v))
    options: dict[str, Any] = dict(causal=causal, causal_align=causal_align, scale=scale,
                   mask=None if mask is None else np.asarray(to_numpy(mask)), backend="reference")
    exact, res = forward(q64, k64, v64, order=None, **options)
    taylor = elementwise_attention(q64, k64, v64, order=order, **options)
    diff = float(np.max(np.abs(taylor - exact), initial=0.0))
    top = float(np.max(np.abs(exact), initial=0.0))
    # largest |2 psi_i kappa_j| over kept pairs, per channel: (B, H, D, L, 1) x (B, H, D, 1, S)
    shapes, opts = res.shapes, res.options
    group = shapes.group
    kh = np.repeat(res.k, group, axis=1)                       # (B, H, S, D)
    psi_c, kappa_c = np.swapaxes(res.q, -1, -2), np.swapaxes(kh, -1, -2)  # (B, H, D, L|S)
    x = 2.0 * np.abs(psi_c[..., :, None] * kappa_c[..., None, :])            # (B, H, D, L, S)
    keep = np.ones((shapes.q_len, shapes.kv_len), dtype=bool)
    if opts.causal_offset is not None:
        keep &= np.arange(shapes.kv_len)[None, :] <= np.arange(shapes.q_len)[:, None] + \
            opts.causal_offset
    keep = keep if opts.mask is None else keep & opts.mask     # (B|1, H|1, L|1, S|1) or (L, S)
    keep = keep[..., None, :, :] if keep.ndim == 4 else keep   # channel axis for (B, H, D, L, S)
    max_x = float(np.max(np.where(keep, x, 0.0), initial=0.0))
    return TaylorError(diff, diff / top if top > 0 else 0.0, max_x, int(order))


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(error_table())
