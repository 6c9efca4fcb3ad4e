"""Projection schemes: one module each, and :data:`PROJECTIONS`, their explicit inventory.

A scheme turns the layer inputs into the per-head ``q, k, v`` of a core and the
core's output back into ``d_model`` features (:mod:`._base`).  A new scheme is a
module here plus one line in the inventory.  ``refattn.projections()`` lists them
(this package is callable, for the public API).
"""

from __future__ import annotations

from .._listing import lookup, make_package_callable
from . import efficient, optimised, quaternion, standard, super
from ._base import LayerConfig, OutputProjection, Projection, RealOutputProjection

__all__ = ["PROJECTIONS", "get_projection", "projections", "LayerConfig", "Projection",
           "OutputProjection", "RealOutputProjection"]

#: Every projection scheme, by name: standard and the Hosseini & Hosseini schemes
#: (Optimised, Efficient, Super), and the quaternion layers.
PROJECTIONS = {scheme.name: scheme for scheme in (
    standard.STANDARD,
    optimised.OPTIMISED,
    efficient.EFFICIENT,
    super.SUPER,
    quaternion.QUATERNION,
)}


def projections() -> dict:
    """``{name: Projection}`` of every scheme (a copy of :data:`PROJECTIONS`)."""
    return dict(PROJECTIONS)


def get_projection(name: str) -> Projection:
    """The scheme called ``name``; a ``ValueError`` lists the valid names."""
    return lookup(PROJECTIONS, "projection", name)


make_package_callable(__name__, projections)    # refattn.projections() lists the schemes
