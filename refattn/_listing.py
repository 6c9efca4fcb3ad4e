"""The inventories' helpers: a package that is also its listing (``refattn.cores()``), lookup."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

__all__ = ["make_package_callable", "lookup"]


def make_package_callable(module_name: str, listing: Callable) -> None:
    """Let the package ``module_name`` be called as ``listing()``.

    ``refattn.cores`` is both the package of the cores and, as the public API has it,
    the function listing them (``refattn.cores()``); the same holds for
    ``refattn.projections``.  A package's attribute on its parent cannot be two
    objects, so the package itself becomes callable.
    """

    class _ListingPackage(types.ModuleType):
        def __call__(self):
            return listing()

    sys.modules[module_name].__class__ = _ListingPackage


def lookup(inventory: dict, what: str, name: str) -> Any:
    """``inventory[name]``; a ``ValueError`` naming ``what`` lists the valid names."""
    if name not in inventory:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, sorted(inventory)))}; "
                         f"got {name!r}")
    return inventory[name]
