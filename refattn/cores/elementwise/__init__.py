"""Element-wise attention (``VARIANTS.md`` section 5): exact, Taylor and recurrent forms.

``reference.py`` (array API) and ``numba.py`` implement the backend contract
documented in :mod:`refattn.cores.elementwise.api`.
"""

from __future__ import annotations

from .api import (IMPLEMENTED, ElementwiseState, TaylorError, backward, elementwise_attention,
                  elementwise_state, elementwise_step, elementwise_taylor_error, flops, forward)

__all__ = ["elementwise_attention", "elementwise_state", "elementwise_step",
           "elementwise_taylor_error", "ElementwiseState", "TaylorError", "forward", "backward",
           "flops"]
