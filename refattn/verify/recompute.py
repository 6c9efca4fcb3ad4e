"""The float64 reference output of one verify problem, recomputed with one thing changed.

The empty-row conventions (:mod:`refattn.verify.empty_rows`) and the diagnoses
(:mod:`refattn.verify.diagnose`) both need refattn's forward pass of a case with
the attention core's call altered (a scale, an axis, a mask, a fill of some
rows), the layer's parameters altered (a transposed weight), or the heads laid
out differently.  :class:`Recompute` runs that pass from the problem's rounded
inputs, in float64, with the reference backend.

A **core call** is ``call(q, k, v, options) -> o`` on NumPy arrays in the core's
layout; ``options`` are the keywords the core receives (``mask``, ``causal``,
``causal_align``, ``scale``, ``bias``, its own).  A *core change* is a function
``change(base) -> call`` wrapping the reference call ``base``.

Shape legend: ``*batch`` batch dims, ``H``/``Hkv`` query/key-value heads, ``L``
queries, ``S`` keys, ``F`` the feature axes of one head (``E``, or ``4, d`` for
quaternion cores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._core import Core
from ..cores import get_core
from ..cores.preconditioned.api import DEFAULT_EPS, apply_preconditioner
from ..cores.preconditioned.preconditioners import get_preconditioner
from ..layers import Attention
from ..masks import combined_keep
from ..rotary import apply_rotary

__all__ = ["CoreCall", "NotApplicable", "Recompute", "empty_query_rows", "expand_kv_heads",
           "head_axis", "lengths"]

#: ``call(q, k, v, options) -> o``: one call of an attention core on NumPy arrays.
CoreCall = Callable[[np.ndarray, np.ndarray, np.ndarray, dict], np.ndarray]


class NotApplicable(Exception):
    """Raised by a change that does not apply to a case (no causality to misalign, ...)."""


def head_axis(layout: str) -> int:
    """The head axis of a core's ``q, k, v`` and output: -3 (real) or -4 (quaternion)."""
    return -4 if layout == "quaternion" else -3


def lengths(q, k, layout: str) -> tuple[int, int]:
    """``(L, S)``: the query and key lengths of core inputs in ``layout``."""
    axis = head_axis(layout) + 1
    return q.shape[axis], k.shape[axis]


#: Options :func:`empty_query_rows` does not model.
_ROWS_NOT_MODELLED = ("window", "mask_mod", "cu_seqlens_q", "cu_seqlens_k", "query_seq_lengths",
                      "key_value_seq_lengths")


def empty_query_rows(q, k, options: dict, layout: str) -> np.ndarray | None:
    """``(*batch, H, L)`` True where a query row keeps no key (None when none does).

    From the options' ``mask``, ``causal`` and ``causal_align`` (the kept pairs of
    ``docs/conventions.md``, without a sliding window).  A case with options whose rows
    this does not model answers None: a window or ``mask_mod`` (the catalogue's cases of
    them keep a key in every row), packed sequences (another layout) and padding (JAX
    itself gives its padded query rows 0, like refattn).
    """
    if any(options.get(name) is not None for name in _ROWS_NOT_MODELLED):
        return None
    L, S = lengths(q, k, layout)
    keep = combined_keep(options.get("mask"), bool(options.get("causal", False)), L, S,
                         options.get("causal_align", "upper_left"))
    if keep is None:
        return None
    lead = q.shape[:head_axis(layout) + 1]                       # (*batch, H)
    empty = np.logical_not(np.broadcast_to(np.asarray(keep), (*lead, L, S)).any(axis=-1))
    return empty if empty.any() else None


def expand_kv_heads(x, heads: int, layout: str, order: str = "blocked") -> np.ndarray:
    """Key/value heads ``(..., Hkv, S, F)`` -> ``(..., heads, S, F)``.

    ``"blocked"`` (refattn, ``repeat_interleave``): query head ``h`` reads key/value
    head ``h // (heads / Hkv)``; ``"tiled"`` (``repeat``): head ``h mod Hkv``.
    """
    axis = head_axis(layout)
    reps = heads // x.shape[axis]
    return np.repeat(x, reps, axis=axis) if order == "blocked" else np.tile(
        x, (1,) * (x.ndim + axis) + (reps,) + (1,) * (-axis - 1))


#: Options of the preconditioned wrapper (the rest go to its inner core) and of the
#: public core functions only (``mode`` selects the quaternion core).
_WRAPPER_OPTIONS = ("eps", "stop_gradient", "preconditioner", "inner_core", "return_diagonal")
_SELECTORS = ("mode",)


class Recompute:
    """Recompute a problem's float64 reference output with one change.

    A change applies to the innermost attention core: for a preconditioned core
    (``O = diag(c) A``) it changes ``A``, and the preconditioner is applied to
    the changed ``A`` (:func:`refattn.cores.preconditioned.api.apply_preconditioner`).

    Parameters
    ----------
    problem : refattn.verify.run.Problem
        Its rounded inputs and options are used (held as float64).
    core : refattn.cores.Core, optional
        The core of a core case (a layer case uses its layer's).
    """

    def __init__(self, problem: Any, core: Core | None = None):
        self.problem = problem
        self.layer: Attention | None = problem.case.fn if problem.is_layer else None
        core = self.layer.core if self.layer is not None else core
        if core is None:
            raise ValueError("Recompute of a core case needs its core= (refattn.cores.get_core)")
        self.core: Core = core
        inner = problem.options.get("inner_core", core.inner) if self.layer is None else core.inner
        self.inner: Core = get_core(inner) if isinstance(inner, str) else (inner or core)
        self.layout = self.inner.layout

    @property
    def core_name(self) -> str:
        """The name of the core a change applies to (a preconditioned core's inner core)."""
        return self.inner.name

    # -- the reference core call ------------------------------------------------------
    def base(self, q, k, v, options) -> np.ndarray:
        """The reference (inner) core on ``q, k, v`` with ``options``."""
        return np.asarray(self.inner.forward(q, k, v, backend="reference", **options)[0])

    def _preconditioned(self, call: CoreCall) -> CoreCall:
        """``call`` with the inner core's options, then the core's preconditioner if any.

        A preconditioned core gives ``O = diag(c) A`` with ``A = call(...)``.
        """
        def wrapped(q, k, v, options):
            inner = {n: x for n, x in options.items() if n not in _WRAPPER_OPTIONS + _SELECTORS}
            if self.inner is self.core:
                return call(q, k, v, inner)
            a = np.asarray(call(q, k, v, inner), np.float64)
            pre = get_preconditioner(options.get("preconditioner", "row_norm"))
            c, rows = apply_preconditioner(pre, q, k, v, a, options.get("eps", DEFAULT_EPS),
                                           self.inner.feature_axes)
            return np.reshape(c[..., None] * rows, a.shape)

        return wrapped

    # -- the pipeline -------------------------------------------------------------------
    def out(self, change: Callable[[CoreCall], CoreCall] | None = None,
            params: dict | None = None,
            heads: tuple[Callable, Callable] | None = None) -> np.ndarray:
        """The output with the core call wrapped by ``change``.

        For a layer case, ``params`` replaces the parameters and ``heads =
        (to_core, from_core)`` re-lays the per-head ``q, k, v`` before the core
        and its output after it.
        """
        call = self._preconditioned(self.base if change is None else change(self.base))
        p = self.problem
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if self.layer is None:
                q, k, v = p.arrays
                return np.asarray(call(q, k, v, dict(p.options)), np.float64)
            return self._layer_out(call, params, heads)

    def _layer_out(self, call, params, heads):
        layer, p = self.layer, self.problem
        params = p.arrays[0] if params is None else params
        xq = p.arrays[1]
        xkv = p.arrays[2] if len(p.arrays) > 2 else xq
        config = layer.config
        q, k, v, _ = layer.scheme.project_in(params, xq, xkv, config)
        if layer.rotary_options:
            q = apply_rotary(q, **layer._rotary_keywords())
            k = apply_rotary(k, **layer._rotary_keywords())
        options = {"mask": p.options.get("mask"), "causal": config.causal, **layer.core_options}
        if heads is not None:
            to_core, from_core = heads
            q, k, v = to_core(q), to_core(k), to_core(v)
            o = from_core(call(q, k, v, options))
        else:
            o = call(q, k, v, options)
        return np.asarray(layer.scheme.project_out(params, o, config)[0], np.float64)

    # -- rows ---------------------------------------------------------------------------
    def empty_rows(self) -> np.ndarray | None:
        """True on the output rows that read a query row with no key (None when none).

        Core case: ``(*batch, H, L)``; layer case: ``(*batch, L)``, a row of the
        output being affected when any head's query row keeps no key.
        """
        seen: list = []

        def record(base):
            def call(q, k, v, options):
                seen.append(empty_query_rows(q, k, options, self.layout))
                return base(q, k, v, options)
            return call

        self.out(record)
        rows = seen[0] if seen else None
        if rows is None or self.layer is None:
            return rows
        return rows.any(axis=-2)                                     # over the heads
