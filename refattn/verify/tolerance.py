"""Dtype-aware acceptance of a candidate's error: :mod:`refattn._tolerance`, re-exported.

The rule lives below :mod:`refattn.testing` and :mod:`refattn.verify` so that both
apply the same bound (see :mod:`refattn._tolerance` for the rule and its sources).
"""

from .._tolerance import (DTYPES, FLOOR_ULPS, GRADIENT_FACTOR, OUTPUT_FACTOR,  # noqa: F401
                          bound, eps, reference_error, scale)

__all__ = ["OUTPUT_FACTOR", "GRADIENT_FACTOR", "FLOOR_ULPS", "DTYPES", "eps", "scale",
           "reference_error", "bound"]
