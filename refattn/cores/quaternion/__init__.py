"""Quaternion attention: the ``shared`` (Yamauchi et al. 2026) and ``hamilton`` (Tay et al. 2019) cores.

``algebra.py`` (the multiplication table), ``api.py`` (front end),
``reference.py`` (explicit formulas), ``reduction.py`` (exact reduction to SDPA,
the kernel backends).  Definitions: ``docs/cores/quaternion.md``.
"""

from __future__ import annotations

from ..._core import Core
from .api import (IMPLEMENTED, MODES, OPTIONS, backward, core_forward, flops, forward,
                  pair_costs, quaternion_attention, score_maps)

__all__ = ["quaternion_attention", "forward", "backward", "score_maps", "pair_costs", "flops",
           "CORES", "SHARED", "HAMILTON", "SUMMARIES", "MODES", "IMPLEMENTED"]

SUMMARIES = {
    "shared": "quaternion attention, one shared score map Re(Q K*) and one softmax (Yamauchi 2026)",
    "hamilton": "quaternion attention, four Hamilton score maps and four softmaxes (Tay 2019)",
}



def _core(mode):
    return Core(name=mode, forward=core_forward(mode), backward=backward, layout="quaternion",
                backends=IMPLEMENTED, options=OPTIONS,
                flops=lambda *args, **options: flops(*args, mode=mode, **options),
                summary=SUMMARIES[mode], call_options=("cu_seqlens_q", "cu_seqlens_k"))


SHARED, HAMILTON = _core("shared"), _core("hamilton")
CORES = {"shared": SHARED, "hamilton": HAMILTON}
