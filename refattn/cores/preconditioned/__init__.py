"""Preconditioned attention: ``O = diag(c) core(q, k, v)``, a drop-in around any core.

``api.py`` holds the generic wrapper (any inner core, its backends for free),
``preconditioners.py`` the diagonals ``c = C(q, k, v, A)``.
Definitions and derivation: ``docs/cores/preconditioned.md``.
"""

from __future__ import annotations

from .api import DEFAULT_EPS, INNER_CORES, backward, forward, make_core, preconditioned_sdpa
from .preconditioners import (Preconditioner, get_preconditioner, preconditioners,
                              register_preconditioner)

__all__ = ["preconditioned_sdpa", "forward", "backward", "make_core", "Preconditioner",
           "register_preconditioner", "get_preconditioner", "preconditioners", "CORE",
           "DEFAULT_EPS", "DROP_INS", "INNER_CORES"]

#: ``preconditioned``: the diagonal around SDPA.
CORE = make_core(INNER_CORES["sdpa"], name="preconditioned")

#: The drop-ins around the other cores, ``{inner core name: Core}``: one line per core.
DROP_INS = {name: make_core(INNER_CORES[name]) for name in ("elementwise", "shared", "hamilton")}
