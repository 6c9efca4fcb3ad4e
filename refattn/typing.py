"""Type aliases used in refattn's public signatures.

``Array``
    An array of any array-API namespace: a NumPy or CuPy ``ndarray``, an
    ``array_api_strict`` array, ...  A function returns arrays of the namespace it
    was given.  These libraries share no static base type, so to a type checker
    ``Array`` is :data:`typing.Any`; in a signature it says "an array goes here"
    (the docstring gives its shape).
``Namespace``
    An array-API namespace (``array_api_compat.array_namespace(x)``), the ``xp``
    that the reference implementations are written against.
``Backend``
    The ``backend=`` argument: ``"auto"`` or one of :data:`refattn.backends.BACKENDS`.
``CausalAlign``
    The ``causal_align=`` argument (see the conventions page).
``Pullback``
    What :func:`refattn.vjp` returns next to the output: ``pullback(cotangent)``
    gives the gradients.
``VjpRule``
    The backward-pass hook a differentiable function carries:
    ``rule(*arrays, **options) -> (out, pullback)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

__all__ = ["Array", "Namespace", "Backend", "CausalAlign", "Pullback", "VjpRule"]

Array: TypeAlias = Any
Namespace: TypeAlias = Any
Backend: TypeAlias = Literal["auto", "reference", "numba", "cupy"]
CausalAlign: TypeAlias = Literal["upper_left", "lower_right"]
Pullback: TypeAlias = Callable[[Any], Any]
VjpRule: TypeAlias = Callable[..., "tuple[Any, Pullback]"]
