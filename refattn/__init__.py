"""refattn: a framework-free reference engine for attention mechanisms.

Every variant has a forward pass and a hand-derived backward pass, on three
backends (``reference`` array-API code, ``numba`` CPU kernels, ``cupy`` GPU
kernels) behind one API.  See ``docs/`` for the conventions and derivations.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import testing  # noqa: F401
from ._registry import cores, get_core, get_variant, projections, variants
from ._vjp import vjp
from .backends import available_backends
from .cores.sdpa import sdpa
from .layers import Attention

try:
    __version__ = _version("refattn")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "sdpa",
    "vjp",
    "Attention",
    "available_backends",
    "cores",
    "projections",
    "variants",
    "get_core",
    "get_variant",
    "testing",
    "verify",
    "__version__",
]


def __getattr__(name):
    # refattn.verify is imported on first use; it imports torch/JAX only for their candidates.
    if name == "verify":
        import importlib

        return importlib.import_module(f"{__name__}.verify")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
