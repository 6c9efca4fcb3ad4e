"""What a catalogue entry is: a :class:`Variant` that makes seeded :class:`Case` objects.

A variant is something a user runs and that the tests, the benchmarks and the CLI
iterate: a core on its own or a whole layer.  ``make_cases(kind, dtype, seed)``
gives its seeded problems of one :data:`CASE_KINDS` kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .._vjp import vjp
from ..cores import get_core

__all__ = ["Case", "Variant", "CASE_KINDS"]

#: The case sets a variant can make: ``"test"`` (small, covering the options),
#: ``"default"`` (one problem for the ``refattn`` report), ``"bench"`` (asv sizes).
CASE_KINDS = ("test", "default", "bench")


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

    def run(self, backend: str = "auto"):
        return self.fn(*self.arrays, backend=backend, **self.options)

    def vjp(self, backend: str = "auto"):
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

    def cases(self, kind: str = "test", dtype: Any = "float64", seed: int = 0):
        return self.make_cases(kind, dtype, seed)

    @property
    def backends(self) -> tuple:
        """Backends implementing this variant's core."""
        return get_core(self.core).backends
