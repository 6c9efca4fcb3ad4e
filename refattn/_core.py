"""What an attention core is: a plain description, with no registration and no side effect.

A core is an attention operator on head-first arrays: a forward/backward pair, the
backends that implement it, the options a layer may pass through and its FLOP model.
Each core package (``refattn/cores/<core>/``) exports its :class:`Core`; the
inventory ``refattn.cores.CORES`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Core", "COMMON_OPTIONS", "LAYOUTS"]

#: Options every core takes besides its ``Core.options`` (a layer always passes them).
COMMON_OPTIONS = ("mask", "causal")

#: Head layouts: ``"real"`` ``(..., H, L, E)``; ``"quaternion"`` ``(..., H, L, 4, d)``.
LAYOUTS = ("real", "quaternion")


@dataclass(frozen=True)
class Core:
    """An attention core: ``forward(q, k, v, *, backend, **options) -> (out, residuals)``.

    Attributes
    ----------
    name : str
    forward : callable
        ``forward(q, k, v, *, backend="auto", **options) -> (out, residuals)``.
    backward : callable
        ``backward(residuals, dout) -> (dq, dk, dv[, dbias])``.
    layout : {"real", "quaternion"}
        ``"real"``: ``(..., H, L, E)``; ``"quaternion"``: ``(..., H, L, 4, d)``.
    backends : tuple of str
        Backends that implement this core.
    options : tuple of str
        Keyword options a layer may pass through (``Attention(..., **core_options)``),
        besides :data:`COMMON_OPTIONS`.
    flops : callable
        ``flops(batch, H, L, S, E, Ev, **options) -> float``: forward FLOPs.
    summary : str
    inner : str or None
        For a core wrapped around another (``preconditioned-<core>``): the inner core.
    call_options : tuple of str
        Keyword options of the core's function that a layer cannot pass, because they
        change the arrays' layout (packed ``cu_seqlens_q``/``cu_seqlens_k``: tokens first);
        a core wrapped around this one (preconditioned) passes them on.
    """

    name: str
    forward: Callable
    backward: Callable
    layout: str = "real"
    backends: tuple = ("reference",)
    options: tuple = ()
    flops: Callable | None = None
    summary: str = ""
    inner: str | None = None
    call_options: tuple = ()

    @property
    def feature_axes(self) -> int:
        """Trailing axes of one head's feature vector: 1 (``E``) or 2 (``4, d``)."""
        return 2 if self.layout == "quaternion" else 1
