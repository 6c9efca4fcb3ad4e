"""Element-wise attention (Feng, arXiv 2501.05730; ``docs/variants.md`` section 5): the front end.

Shape legend
------------
``*batch``  any number of batch dimensions (zero or more)
``H``       query heads;  ``Hkv`` key/value heads (``H % Hkv == 0``, GQA)
``L``       query length; ``S`` key length
``D``       channels (queries, keys and values all have ``D`` of them)
``t``       Taylor order (even)

Per channel ``c`` the weight of key ``j`` for query ``i`` is
``w_ijc = exp(-scale (q_ic - k_jc)^2)`` and ``o_ic = sum_j w_ijc v_jc / sum_j w_ijc``.

Backend contract
----------------
The front end validates the arguments, flattens the batch dimensions
(``B = prod(batch)``), multiplies queries and keys by ``sqrt(scale)``
(``psi = sqrt(scale) q``, ``kappa = sqrt(scale) k``; the backward pass
multiplies ``dq, dk`` by ``sqrt(scale)``), and calls the backend module
(``reference``, ``numba``, ``cupy``) with an :class:`ElementwiseOptions`::

    forward(psi, kappa, v, opts) -> (o, saved)
        psi (B, H, L, D), kappa (B, Hkv, S, D), v (B, Hkv, S, D) -> o (B, H, L, D)
        exact (opts.order is None): saved = (lse,), lse (B, H, L, D) =
            log sum_j exp(-(psi_i - kappa_j)^2) over kept keys, -inf for an empty row
        Taylor: saved = (m, den), both (B, H, L, D): m_i = min kappa_j^2 over the keys row i
            sees (+inf if none), den_i = sum_j exp(m_i - kappa_j^2) T_t(2 psi_i kappa_j)
            (0 if none)
    backward(psi, kappa, v, o, saved, do, opts) -> (dpsi, dkappa, dv)
        dpsi (B, H, L, D); dkappa, dv (B, Hkv, S, D) (summed over each GQA group)

Rows with no key (masked out, or before the first key under ``lower_right``
causal alignment) give ``o = 0`` and zero gradients, as in :func:`refattn.sdpa`.
float16 is computed in float32 (and ``saved`` kept in float32).  Kernels must not materialise ``L x S x D``
arrays for the Taylor form (O(t L D) time, O(L D) memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ... import backends as _backends
from ..._array import flatten_batch, namespace, native_byte_order, product
from ..._masks import CAUSAL_ALIGNS, causal_offset, causal_pairs
from ..._validate import (AttentionShapes, attention_shapes, check_bool_array, check_broadcastable,
                          check_choice, check_cotangent, check_positive_float,
                          reject_framework_keywords)
from ..._vjp import attach_vjp
from ..sdpa.api import as_batched_4d
from . import nonfinite as _nonfinite
from . import numba as _numba_kernels
from . import reference as _reference
from .taylor import check_order
from ...typing import Array, Backend, CausalAlign

__all__ = ["ElementwiseOptions", "ElementwiseResiduals", "elementwise_attention", "forward",
           "backward", "flops", "implementation", "IMPLEMENTED"]

#: Backends with an implementation of this core (modules beside this file).
IMPLEMENTED = ("reference", "numba", "cupy")

_SCORES = "(..., H, L, S)"


def implementation(backend: str):
    """The module implementing the backend contract above for ``backend``."""
    match backend:
        case "reference":
            return _reference
        case "numba":
            return _numba_kernels
        case "cupy":
            from . import cupy as cupy_kernels    # optional: compiles CUDA through CuPy
            return cupy_kernels
    raise ValueError(f"backend must be one of {', '.join(map(repr, IMPLEMENTED))}; got {backend!r}")


@dataclass(frozen=True)
class ElementwiseOptions:
    """Options as every backend receives them (already validated).

    Attributes
    ----------
    order : int or None
        ``None``: exact form; an even ``t``: Taylor form of order ``t``.
    causal_offset : int or None
        ``None`` when not causal; otherwise key ``j`` is kept for query ``i`` iff
        ``j <= i + causal_offset``.
    mask : bool array or None
        4-D, each axis full or 1, broadcastable to ``(B, H, L, S)``; ``True`` = keep.
        For the Taylor form its ``L`` axis is 1 (a mask on keys only).
    """

    order: Any = None
    causal_offset: Any = None
    mask: Any = None


@dataclass
class ElementwiseResiduals:
    """What the backward pass needs: the (scaled) inputs, the output and ``saved``."""

    backend: str
    q: Any
    k: Any
    v: Any
    o: Any
    saved: tuple
    options: ElementwiseOptions
    shapes: AttentionShapes
    root_scale: float
    nonfinite: Any = None           # a nonfinite.NonFinite when an input held NaN or Inf


def _prepare(q, k, v, order, causal, causal_align, scale, mask):
    shapes = attention_shapes(q, k, v, legend_feature="D", same_value_dim=True)
    xp = namespace(q, k, v)
    order = check_order(order)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_choice(causal_align, "causal_align", CAUSAL_ALIGNS)
    scale = check_positive_float(scale, "scale")
    if mask is not None:
        check_bool_array(mask, "mask", hint=" (True = attend)")
        check_broadcastable(mask, "mask", shapes.scores, _SCORES)
        if order is not None and mask.ndim >= 2 and mask.shape[-2] != 1 and shapes.q_len != 1:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} depends on the query, which the Taylor form "
                "cannot honour (its moments are shared by all queries); the Taylor form takes a "
                "mask on keys only, broadcastable to (..., H, 1, S) (key padding), plus causal=; "
                "use order=None for an arbitrary mask")
        mask = as_batched_4d(xp, mask, shapes.batch)
    offset = causal_offset(causal_align, shapes.q_len, shapes.kv_len) if causal else None
    return xp, shapes, ElementwiseOptions(order, offset, mask), scale


@reject_framework_keywords
def forward(q, k, v, *, order=None, causal=False, causal_align="upper_left", scale=1.0, mask=None,
            backend="auto"):
    """Element-wise attention forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`elementwise_attention`.
    """
    q, k, v = (native_byte_order(x) for x in (q, k, v))
    xp, shapes, options, scale = _prepare(q, k, v, order, causal, causal_align, scale, mask)
    backend = _backends.resolve(backend, IMPLEMENTED, q, core="elementwise")
    if any(product(x.shape) == 0 for x in (q, k, v)):
        backend = "reference"                   # the kernels are written for non-empty arrays
    impl = implementation(backend)
    root = math.sqrt(scale)
    # psi = sqrt(scale) q, kappa = sqrt(scale) k: exp(-scale (q - k)^2) = exp(-(psi - kappa)^2)
    q4, k4, v4 = (flatten_batch(xp, x, shapes.batch) for x in (q, k, v))       # (B, H|Hkv, L|S, D)
    bad = _nonfinite.find(xp, q4, k4, v4, options)
    if bad is not None:                         # the kernels see finite numbers; poison after
        q4, k4, v4 = (_nonfinite.finite(xp, x) for x in (q4, k4, v4))
    if root != 1.0:
        q4, k4 = q4 * root, k4 * root
    o4, saved = impl.forward(q4, k4, v4, options)
    res = ElementwiseResiduals(backend, q4, k4, v4, o4, saved, options, shapes, root, bad)
    if bad is not None:
        o4 = _nonfinite.poison_output(xp, bad, o4)
    return xp.reshape(o4, shapes.output), res


def backward(res: ElementwiseResiduals, do):
    """Element-wise attention backward pass: ``(dq, dk, dv)``."""
    shapes = res.shapes
    xp = namespace(res.q)
    check_cotangent(do, shapes.output, "(..., H, L, D)", like=res.o)
    impl = implementation(res.backend)
    do4 = flatten_batch(xp, xp.astype(native_byte_order(do), res.o.dtype), shapes.batch)
    do_flags = _nonfinite.cotangent_flags(xp, do4)
    if do_flags is not None:
        do4 = _nonfinite.finite(xp, do4)
    dq, dk, dv = impl.backward(res.q, res.k, res.v, res.o, res.saved, do4, res.options)
    if res.root_scale != 1.0:                                   # chain rule of the pre-scaling
        dq, dk = dq * res.root_scale, dk * res.root_scale
    if res.nonfinite is not None or do_flags is not None:
        bad = res.nonfinite or _nonfinite.find(xp, res.q, res.k, res.v, res.options, always=True)
        dq, dk, dv = _nonfinite.poison_gradients(xp, bad, do_flags, dq, dk, dv)
    batch = shapes.batch
    return tuple(xp.reshape(g, (*batch,) + tuple(g.shape[1:])) for g in (dq, dk, dv))


@reject_framework_keywords
def elementwise_attention(q: Array, k: Array, v: Array, *, order: int | None = None,
                          causal: bool = False, causal_align: CausalAlign = "upper_left",
                          scale: float = 1.0, mask: Array | None = None,
                          backend: Backend = "auto") -> Array:
    r"""Element-wise attention: every channel normalises its own distance weights.

    .. math::

        o_{ic} = \frac{\sum_j w_{ijc} v_{jc}}{\sum_j w_{ijc}}, \qquad
        w_{ijc} = e^{-s (q_{ic} - k_{jc})^2}\ \text{(exact)}, \quad
        e^{-s k_{jc}^2}\, T_t(2 s\, q_{ic} k_{jc})\ \text{(Taylor, order } t)

    with :math:`T_t(x) = \sum_{n \le t} x^n / n!` (the :math:`e^{-s q^2}` factor
    cancels).  The Taylor form runs in O(t L D) time through moments of the keys
    (prefix sums when causal); it is accurate only while :math:`|2 s q k|` is small
    (see :func:`elementwise_taylor_error` and ``docs/cores/elementwise.md``).
    A row with no key left gives ``o = 0`` and zero gradients (as :func:`refattn.sdpa`).

    Parameters
    ----------
    q : array (..., H, L, D)
    k : array (..., Hkv, S, D)
        ``Hkv`` must divide ``H``; query head ``h`` reads kv head ``h // (H // Hkv)``.
    v : array (..., Hkv, S, D)
    order : None or even int >= 2
        ``None``: exact O(L S D) form; ``t``: Taylor form of order ``t``.  Odd orders
        raise (the truncated exponential must stay positive).
    causal : bool
        Keep key ``j`` for query ``i`` only when ``j <= i`` (``"upper_left"``) or
        ``j <= i + S - L`` (``"lower_right"``).
    causal_align : {"upper_left", "lower_right"}
    scale : float > 0
        ``s`` in ``exp(-s (q - k)^2)``; 1 by default.  The paper's abstract writes
        ``exp(q k)``, i.e. ``s = 1/2`` in this parametrisation (reconstruction).
    mask : bool array broadcastable to (..., H, L, S), optional
        ``True`` = attend.  The Taylor form honours exactly the masks on keys only,
        broadcastable to ``(..., H, 1, S)`` (key padding); others raise ``ValueError``.
    backend : {"auto", "reference", "numba", "cupy"}

    Returns
    -------
    o : array (..., H, L, D), the dtype of ``q``

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.3 * rng.standard_normal((2, 4, 16, 8)) for _ in range(3))
    >>> exact = refattn.elementwise_attention(q, k, v, causal=True)
    >>> taylor = refattn.elementwise_attention(q, k, v, order=6, causal=True)
    >>> exact.shape
    (2, 4, 16, 8)
    >>> bool(np.abs(taylor - exact).max() < 1e-4)   # |2qk| is small here
    True
    """
    return forward(q, k, v, order=order, causal=causal, causal_align=causal_align, scale=scale,
                   mask=mask, backend=backend)[0]


attach_vjp(elementwise_attention, forward, backward)


def flops(batch, heads, q_len, kv_len, head_dim, value_dim, causal=False, order=None, **_):
    """Forward FLOPs: exact ~6 per (query, key, channel); Taylor ~4 t per (token, channel)."""
    n = product(batch) * heads
    if order is None:
        pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
        return 6.0 * n * pairs * head_dim
    # keys: exp + t powers + 2 t multiply-adds; queries: 2 Horner chains of t steps + divide
    return float(n * head_dim * ((3 * order + 2) * kv_len + (4 * order + 2) * q_len))
