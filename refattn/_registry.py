"""The registry of attention cores and variants.

Two kinds of entry:

* a :class:`Core` is an attention operator on head-first arrays
  (``sdpa``, ``preconditioned``, ``hamilton``, ``shared``, ``elementwise``): a
  forward/backward pair, the backends that implement it and its FLOP model.
  The layer frame (:class:`refattn.Attention`) looks cores up here.
* a :class:`Variant` is something a user runs and that the tests, the
  benchmarks and the CLI iterate: a core on its own or a whole layer.  It knows
  how to make seeded :class:`Case` objects of a given size and dtype.

Adding a variant touches its own folder plus one ``register_*`` call; tests,
asv benchmarks and the ``refattn`` report pick it up from here.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .typing import Backend, Pullback

if TYPE_CHECKING:  # the projection schemes import this module to register themselves
    from .projections._base import Projection

P = TypeVar("P", bound="Projection")

__all__ = ["Core", "Case", "Variant", "register_core", "register_variant", "get_core",
           "cores", "variants", "get_variant", "CASE_KINDS", "register_projection",
           "get_projection", "projections"]

#: The case sets a variant can make: ``"test"`` (small, covering the options),
#: ``"default"`` (one problem for the ``refattn`` report), ``"bench"`` (asv sizes).
CASE_KINDS = ("test", "default", "bench")


@dataclass(frozen=True)
class Core:
    """An attention core: ``forward(q, k, v, *, backend, **options) -> (out, residuals)``.

    Attributes
    ----------
    name : str
    forward : callable
        ``forward(q, k, v, *, backend="auto", **options) -> (out, residuals)``.
    backward : callable
        ``backward(residuals, dout) -> (dq, dk, dv)``.
    layout : {"real", "quaternion"}
        ``"real"``: ``(..., H, L, E)``; ``"quaternion"``: ``(..., H, L, 4, d)``.
    backends : tuple of str
        Backends that implement this core.
    options : tuple of str
        Keyword options a layer may pass through (``Attention(..., **core_options)``).
    flops : callable
        ``flops(batch, H, L, S, E, Ev, **options) -> float``: forward FLOPs.
    """

    name: str
    forward: Callable
    backward: Callable
    layout: str = "real"
    backends: tuple = ("reference",)
    options: tuple = ()
    flops: Callable | None = None
    summary: str = ""


@dataclass
class Case:
    """One seeded problem: ``fn(*arrays, backend=..., **options)``.

    ``arrays`` are the differentiable inputs (a parameter dict counts as one).
    ``backends`` restricts the backends the case is meant for (``None`` = all),
    e.g. a size only a linear-memory kernel can hold.
    """

    name: str
    fn: Callable
    arrays: tuple
    options: dict = field(default_factory=dict)
    flops: float = 0.0
    backends: tuple | None = None

    def run(self, backend: Backend = "auto") -> Any:
        """``fn(*arrays, backend=backend, **options)``."""
        return self.fn(*self.arrays, backend=backend, **self.options)

    def vjp(self, backend: Backend = "auto") -> tuple[Any, Pullback]:
        """``refattn.vjp(fn, *arrays, backend=backend, **options)``: ``(out, pullback)``."""
        from ._vjp import vjp

        return vjp(self.fn, *self.arrays, backend=backend, **self.options)


@dataclass(frozen=True)
class Variant:
    """A runnable variant: a core alone or a layer (projection scheme x core).

    ``make_cases(kind, dtype, seed) -> list[Case]`` with ``kind`` in
    :data:`CASE_KINDS`.  ``core`` names the core it runs, whose backends it
    inherits.
    """

    name: str
    kind: str
    make_cases: Callable
    core: str
    summary: str = ""
    tags: tuple = ()

    def cases(self, kind: str = "test", dtype: Any = "float64", seed: int = 0) -> list[Case]:
        """The seeded :class:`Case` list of ``kind`` (one of :data:`CASE_KINDS`) in ``dtype``."""
        return self.make_cases(kind, dtype, seed)

    @property
    def backends(self) -> tuple:
        """Backends implementing this variant's core."""
        return get_core(self.core).backends


_CORES: dict[str, Core] = {}
_VARIANTS: dict[str, Variant] = {}
_PROJECTIONS: dict[str, Any] = {}


def register_projection(scheme: P) -> P:
    """Register a projection scheme (a :class:`refattn.projections.Projection`)."""
    if scheme.name in _PROJECTIONS:
        raise ValueError(f"projection {scheme.name!r} is already registered")
    _PROJECTIONS[scheme.name] = scheme
    return scheme


def get_projection(name: str) -> Projection:
    """The registered projection scheme ``name`` (``ValueError`` naming the choices if none)."""
    _load_all()
    if name not in _PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(map(repr, sorted(_PROJECTIONS)))}; "
                         f"got {name!r}")
    return _PROJECTIONS[name]


def projections() -> dict[str, Projection]:
    """``{name: scheme}`` of every registered projection scheme."""
    _load_all()
    return dict(_PROJECTIONS)


def register_core(core: Core) -> Core:
    """Add ``core`` to the registry (``ValueError`` if its name is taken); returns it."""
    if core.name in _CORES:
        raise ValueError(f"core {core.name!r} is already registered")
    _CORES[core.name] = core
    return core


def register_variant(variant: Variant) -> Variant:
    """Add ``variant`` to the registry (``ValueError`` if its name is taken); returns it."""
    if variant.name in _VARIANTS:
        raise ValueError(f"variant {variant.name!r} is already registered")
    _VARIANTS[variant.name] = variant
    return variant


def _load_all():
    # Importing the packages runs their registrations.
    from . import cores as _cores  # noqa: F401
    from . import projections as _projections  # noqa: F401
    from . import layers as _layers  # noqa: F401


def get_core(name: str) -> Core:
    """The registered core ``name`` (``ValueError`` naming the choices if none)."""
    _load_all()
    if name not in _CORES:
        raise ValueError(f"core must be one of {', '.join(map(repr, sorted(_CORES)))}; got {name!r}")
    return _CORES[name]


def cores() -> dict[str, Core]:
    """``{name: core}`` of every registered attention core."""
    _load_all()
    return dict(_CORES)


def variants() -> dict[str, Variant]:
    """``{name: variant}`` of every registered variant: the cores alone and the layers."""
    _load_all()
    return dict(_VARIANTS)


def get_variant(name: str) -> Variant:
    """The registered variant ``name`` (``ValueError`` naming the choices if none)."""
    v = variants()
    if name not in v:
        raise ValueError(f"variant must be one of {', '.join(map(repr, sorted(v)))}; got {name!r}")
    return v[name]


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
