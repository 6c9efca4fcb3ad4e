"""Attention cores: one package per core, reference and kernels side by side.

:data:`CORES` is the explicit inventory (each core package exports a plain
:class:`~refattn._core.Core`); a new core is a new package here plus one line in it.
``refattn.cores()`` lists them (this package is callable, for the public API).
"""

from __future__ import annotations

from .._core import Core
from .._listing import lookup, make_package_callable
from . import elementwise, preconditioned, quaternion, sdpa

__all__ = ["CORES", "get_core", "cores", "Core"]

#: Every core, by name.
CORES = {core.name: core for core in (
    sdpa.CORE,
    quaternion.SHARED,
    quaternion.HAMILTON,
    elementwise.CORE,
    preconditioned.CORE,
    *preconditioned.DROP_INS.values(),
)}


def cores() -> dict:
    """``{name: Core}`` of every core (a copy of :data:`CORES`)."""
    return dict(CORES)


def get_core(name: str) -> Core:
    """The core called ``name``; a ``ValueError`` lists the valid names."""
    return lookup(CORES, "core", name)


make_package_callable(__name__, cores)      # refattn.cores() lists the cores
