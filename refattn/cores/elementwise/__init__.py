"""Element-wise attention (Feng, arXiv 2501.05730): exact, Taylor and recurrent forms.

``api.py`` (front end and backend contract), ``reference.py`` (array API),
``numba.py`` (CPU kernels) and ``cupy.py`` (CUDA kernels in ``elementwise.cu``)
side by side; ``taylor.py`` (the Taylor form's constants), ``recurrent.py``
(token-by-token inference), ``accuracy.py`` (Taylor against exact),
``nonfinite.py`` (the NaN/Inf policy).  Definitions: ``docs/cores/elementwise.md``.
"""

from __future__ import annotations

from ..._core import Core
from .accuracy import TaylorError, elementwise_taylor_error
from .api import IMPLEMENTED, backward, elementwise_attention, flops, forward
from .recurrent import ElementwiseState, elementwise_state, elementwise_step

__all__ = ["elementwise_attention", "elementwise_state", "elementwise_step",
           "elementwise_taylor_error", "ElementwiseState", "TaylorError", "forward", "backward",
           "flops", "CORE"]

CORE = Core(
    name="elementwise",
    forward=forward,
    backward=backward,
    layout="real",
    backends=IMPLEMENTED,
    options=("order", "scale", "causal_align"),
    flops=flops,
    summary="per-channel exp(-s (q-k)^2) weights; exact O(L^2 D) or Taylor O(t L D)",
)
