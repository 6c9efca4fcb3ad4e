"""The catalogue: every variant with its seeded cases, as an explicit inventory.

A variant is a core on its own (``sdpa``, ``quaternion-shared``, ...) or a layer
(``mha-standard``, ...); the generic tests, the asv suite and the ``refattn`` report
iterate :data:`VARIANTS`.  One module per family; a new variant is its cases and
one line here.
"""

from __future__ import annotations

from . import elementwise, layers, preconditioned, quaternion, sdpa
from .builders import EMPTY_ROWS, core_case, layer_case
from .._listing import lookup
from .case import CASE_KINDS, Case, Variant

__all__ = ["VARIANTS", "variants", "get_variant", "Case", "Variant", "CASE_KINDS", "layer_case",
           "core_case", "EMPTY_ROWS"]

#: Every variant, by name.
VARIANTS = {variant.name: variant for variant in (
    sdpa.VARIANT,
    *quaternion.VARIANTS,
    *elementwise.VARIANTS,
    preconditioned.VARIANT,
    *preconditioned.DROP_IN_VARIANTS,
    *layers.LAYER_VARIANTS,
)}


def variants() -> dict:
    """``{name: Variant}`` of every variant (a copy of :data:`VARIANTS`)."""
    return dict(VARIANTS)


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ``ValueError`` lists the valid names."""
    return lookup(VARIANTS, "variant", name)
