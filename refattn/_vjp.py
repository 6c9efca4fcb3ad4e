"""``refattn.vjp``: forward pass plus a pullback, for cores and layers alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .typing import Pullback, VjpRule

__all__ = ["vjp", "attach_vjp", "drop_output_only"]

F = TypeVar("F", bound=Callable[..., Any])


def vjp(fn: Callable[..., Any], *arrays: Any, **options: Any) -> tuple[Any, Pullback]:
    """Run ``fn(*arrays, **options)`` and return ``(out, pullback)``.

    ``pullback(cotangent)`` returns one gradient per positional array, in order
    (a parameter dict gets a dict of gradients).  For :func:`refattn.sdpa` that is
    ``(dq, dk, dv)``, plus ``dbias`` when a float ``bias`` is given.  For a layer
    ``refattn.vjp(layer, params, xq[, xkv], mask=...)`` gives
    ``(dparams, dxq[, dxkv])``.

    Every backward pass is hand-derived (see ``docs/``); nothing here traces.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
    >>> o, pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True)
    >>> dq, dk, dv = pullback(np.ones_like(o))
    >>> dq.shape, dk.shape, dv.shape
    ((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    """
    rule: VjpRule | None = getattr(fn, "__refattn_vjp__", None)
    if rule is None:
        raise TypeError(
            f"{getattr(fn, '__name__', type(fn).__name__)} has no refattn backward pass; vjp takes "
            "refattn functions (sdpa, quaternion_attention, ...) and refattn.Attention layers"
        )
    return rule(*arrays, **options)


def drop_output_only(name: str, options: dict, flags: tuple[str, ...]) -> None:
    """Remove ``flags`` (``return_lse``, ...) from ``options``; an error naming those that are
    set, since ``vjp`` of ``name`` differentiates its output alone."""
    extras = [flag for flag in flags if options.pop(flag, False)]
    if extras:
        raise ValueError(f"vjp({name}, ...) differentiates the output o only; drop "
                         f"{' and '.join(extras)}")


def attach_vjp(fn: F, forward: Callable[..., tuple[Any, Any]],
               backward: Callable[[Any, Any], Any], *, output_only: tuple[str, ...] = ()) -> F:
    """Give ``fn`` its backward pass for :func:`vjp`; returns ``fn``.

    ``forward(*arrays, **options) -> (out, residuals)`` and
    ``backward(residuals, cotangent) -> gradients`` are the core's pair; the rule runs
    the forward pass once and binds the pullback to its residuals.  ``output_only`` names
    the flags of ``fn`` that return more than its output (``return_lse``, ...): ``vjp``
    differentiates the output alone, so a call that sets one is an error naming it.
    """
    def rule(*arrays: Any, **options: Any) -> tuple[Any, Pullback]:
        drop_output_only(fn.__name__, options, output_only)
        out, residuals = forward(*arrays, **options)
        return out, lambda cotangent: backward(residuals, cotangent)

    setattr(fn, "__refattn_vjp__", rule)     # a function attribute (mypy rejects fn.attr = ...)
    return fn
