"""Scaled dot-product attention: the public front end shared by all backends.

Shape legend
------------
``*batch``  any number of batch dimensions (zero or more)
``H``       query heads;  ``Hkv`` key/value heads (``H % Hkv == 0``, GQA)
``L``       query length; ``S`` key length
``E``       query/key feature size; ``Ev`` value feature size

The front end validates the arguments, flattens the batch dimensions into one
(``B = prod(batch)``), normalises masks to 4-D arrays broadcastable to
``(B, H, L, S)`` and hands a :class:`SDPAOptions` to the backend module
(``reference``, ``numba`` or ``cupy``), whose contract is::

    forward(q, k, v, opts) -> (o, lse)
        q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)
        o (B, H, L, Ev), lse (B, H, L) (-inf for rows with no key left)
    backward(q, k, v, o, lse, do, opts) -> (dq, dk, dv, dscores)
        dscores (B, H, L, S): gradient of the pre-softmax scores (= of a float
        bias); only when ``opts.need_bias_grad``, else None.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ... import backends as _backends
from . import numba as _numba_kernels
from . import reference as _reference
from ..._array import flatten_batch, namespace, native_byte_order, product, sum_to_shape
from ..._masks import CAUSAL_ALIGNS, causal_offset, causal_pairs
from ..._vjp import attach_vjp
from ..._validate import (AttentionShapes, attention_shapes, check_bool_array, check_broadcastable,
                          check_cotangent,
                          check_choice, check_dropout, check_float_array, check_same_dtype)

__all__ = ["SDPAOptions", "SDPAResiduals", "sdpa", "forward", "backward", "IMPLEMENTED",
           "as_batched_4d", "flops", "check_scale", "prepare", "implementation", "causal_pairs",
           "FLOAT32_MATHS"]

#: Backends with an implementation of this core (modules beside this file).
IMPLEMENTED = ("reference", "numba", "cupy")

#: How the cupy backend runs float32 products (:class:`SDPAOptions`).
FLOAT32_MATHS = ("tf32x3", "simt")

_SCORES = "(..., H, L, S)"


@dataclass(frozen=True)
class SDPAOptions:
    """Options as every backend receives them (already validated).

    Attributes
    ----------
    scale : float
        Multiplies ``q k^T``.
    causal_offset : int or None
        ``None`` when not causal; otherwise key ``j`` is kept for query ``i`` iff
        ``j <= i + causal_offset``.
    mask, bias, dropout_mask : array or None
        4-D, each axis either full or 1, broadcastable to ``(B, H, L, S)``.
        ``mask`` and ``dropout_mask`` are boolean (``True`` = keep).
    dropout_scale : float
        ``1 / (1 - dropout_p)``, applied to kept probabilities.
    need_bias_grad : bool
        Whether the backward pass must return the score gradient.
    tiles : (int, int) or None
        numba: queries x keys per tile; None = the backend's default.
    float32_math : {"tf32x3", "simt"} or None
        cupy: how float32 products run; None = the backend's default.

    Forward and backward read these from the residuals, so the two passes of one
    call always agree.
    """

    scale: float
    causal_offset: Any = None
    mask: Any = None
    bias: Any = None
    dropout_mask: Any = None
    dropout_scale: float = 1.0
    need_bias_grad: bool = False
    tiles: tuple | None = None
    float32_math: str | None = None


@dataclass
class SDPAResiduals:
    """What the backward pass needs: the inputs, the output and the log-sum-exp."""

    backend: str
    q: Any
    k: Any
    v: Any
    o: Any
    lse: Any
    options: SDPAOptions
    shapes: AttentionShapes
    bias_shape: tuple | None = None


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


def as_batched_4d(xp, m, batch):
    """Reshape an array broadcastable to ``(*batch, H, L, S)`` into 4-D ``(B|1, H|1, L|1, S|1)``."""
    nb = len(batch)
    m = xp.reshape(m, (1,) * (nb + 3 - m.ndim) + tuple(m.shape))
    lead, tail = tuple(m.shape[:nb]), tuple(m.shape[nb:])
    if all(d == 1 for d in lead):
        return xp.reshape(m, (1,) + tail)
    m = xp.broadcast_to(m, tuple(batch) + tail)
    return xp.reshape(m, (product(batch),) + tail)


def check_scale(scale, head_dim: int, legend: str = "E") -> float:
    """The validated softmax scale: ``scale``, or ``1/sqrt(head_dim)`` when it is None.

    Any real number is accepted (Python or NumPy scalars); it must be finite.
    """
    if scale is None:
        if head_dim == 0:
            raise ValueError(f"q has feature size {legend} = 0, so the default scale 1/sqrt({legend}) "
                             "is undefined; pass scale= explicitly (the scores are then all 0)")
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite real number or None, got "
                        f"{type(scale).__name__} {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _check_tiles(tiles):
    if tiles is None:
        return None
    if (not isinstance(tiles, (tuple, list)) or len(tiles) != 2
            or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1
                   for t in tiles)):
        raise ValueError(f"tiles must be None or two positive ints (queries, keys), got {tiles!r}")
    return (int(tiles[0]), int(tiles[1]))


def prepare(q, k, v, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
            dropout_mask=None, dropout_p=0.0, tiles=None, float32_math=None):
    """Validate the arguments of :func:`sdpa` and return ``(xp, shapes, options)``.

    ``options`` is the :class:`SDPAOptions` every backend receives; other cores that
    reduce to SDPA (quaternion) validate their masks and scale here, so that the
    arguments mean exactly what they mean for :func:`sdpa`.
    """
    shapes = attention_shapes(q, k, v)
    xp = namespace(q, k, v)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    causal = bool(causal)
    check_choice(causal_align, "causal_align", CAUSAL_ALIGNS)
    scale = check_scale(scale, shapes.head_dim)
    target = shapes.scores
    if mask is not None:
        check_bool_array(mask, "mask", hint=" (True = attend); pass an additive float mask as bias=")
        check_broadcastable(mask, "mask", target, _SCORES)
    if bias is not None:
        check_float_array(bias, "bias")
        check_same_dtype(q=q, bias=bias)
        check_broadcastable(bias, "bias", target, _SCORES)
    dropout_scale = check_dropout(dropout_p, dropout_mask, target, _SCORES)
    if float32_math is not None:
        check_choice(float32_math, "float32_math", FLOAT32_MATHS)
    batch = shapes.batch
    options = SDPAOptions(
        scale=float(scale),
        causal_offset=causal_offset(causal_align, shapes.q_len, shapes.kv_len) if causal else None,
        mask=None if mask is None else as_batched_4d(xp, mask, batch),
        bias=None if bias is None else as_batched_4d(xp, bias, batch),
        dropout_mask=None if dropout_mask is None else as_batched_4d(xp, dropout_mask, batch),
        dropout_scale=dropout_scale,
        need_bias_grad=bias is not None,
        tiles=_check_tiles(tiles),
        float32_math=float32_math,
    )
    return xp, shapes, options


def forward(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
            dropout_mask=None, dropout_p=0.0, backend="auto", tiles=None, float32_math=None):
    """SDPA forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`sdpa`.  ``residuals.lse`` holds the per-row
    log-sum-exp ``(B, H, L)`` that the backward pass uses to recompute the
    probabilities (FlashAttention-2).
    """
    q, k, v, bias = (None if x is None else native_byte_order(x) for x in (q, k, v, bias))
    xp, shapes, options = prepare(q, k, v, mask, bias, causal, causal_align, scale,
                                  dropout_mask, dropout_p, tiles, float32_math)
    backend = _backends.resolve(backend, IMPLEMENTED, q, core="sdpa")
    backend = _backends.route(backend, xp, (q, k, v), options.bias)
    impl = implementation(backend)
    q4, k4, v4 = (flatten_batch(xp, x, shapes.batch) for x in (q, k, v))
    o4, lse = impl.forward(q4, k4, v4, options)
    res = SDPAResiduals(backend, q4, k4, v4, o4, lse, options, shapes,
                        None if bias is None else tuple(bias.shape))
    return xp.reshape(o4, shapes.output), res


def backward(res: SDPAResiduals, do):
    """SDPA backward pass: ``(dq, dk, dv)``, plus ``dbias`` when a float bias was given.

    ``dbias`` is summed to the bias's own (broadcast) shape.
    """
    shapes = res.shapes
    xp = namespace(res.q)
    check_cotangent(do, shapes.output, "(..., H, L, Ev)", like=res.o)
    do4 = flatten_batch(xp, xp.astype(native_byte_order(do), res.o.dtype), shapes.batch)
    impl = implementation(_backends.route(res.backend, xp, (do4,)))
    dq, dk, dv, dscores = impl.backward(res.q, res.k, res.v, res.o, res.lse, do4, res.options)
    batch = shapes.batch
    grads = (xp.reshape(dq, (*batch,) + tuple(dq.shape[1:])),
             xp.reshape(dk, (*batch,) + tuple(dk.shape[1:])),
             xp.reshape(dv, (*batch,) + tuple(dv.shape[1:])))
    if res.bias_shape is not None:
        dscores = xp.reshape(dscores, shapes.scores)
        grads = grads + (sum_to_shape(xp, dscores, res.bias_shape),)
    return grads


def sdpa(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
         dropout_mask=None, dropout_p=0.0, return_lse=False, backend="auto", tiles=None,
         float32_math=None):
    r"""Scaled dot-product attention.

    .. math::

        P = \mathrm{softmax}_j(\text{scale}\; q k^\top + \text{bias}), \qquad o = P v

    where masked-out keys get probability 0, a row with no key left gives
    ``o = 0``, and dropout multiplies kept probabilities by ``1/(1-p)``.

    Parameters
    ----------
    q : array (..., H, L, E)
    k : array (..., Hkv, S, E)
        ``Hkv`` must divide ``H``; query head ``h`` reads kv head ``h // (H // Hkv)``.
    v : array (..., Hkv, S, Ev)
    mask : bool array broadcastable to (..., H, L, S), optional
        ``True`` = attend.  Combined with ``causal`` by logical AND.
    bias : float array broadcastable to (..., H, L, S), optional
        Added to the scaled scores (``-inf`` entries mask out).
    causal : bool
        Keep key ``j`` for query ``i`` only when ``j <= i`` (``"upper_left"``) or
        ``j <= i + S - L`` (``"lower_right"``).
    causal_align : {"upper_left", "lower_right"}
    scale : float, optional
        Defaults to ``1/sqrt(E)``.
    dropout_mask : bool array broadcastable to (..., H, L, S), optional
        Explicit keep-mask of dropout; no hidden RNG.
    dropout_p : float in [0, 1)
    return_lse : bool
        Also return the log-sum-exp ``(..., H, L)`` of each row.
    backend : {"auto", "reference", "numba", "cupy"}
    tiles : (int, int), optional
        numba backend: queries x keys per tile (default 256 x 256); for tests and tuning.
    float32_math : {"tf32x3", "simt"}, optional
        cupy backend: float32 products on tensor cores with split operands (default) or
        on CUDA cores.

    Returns
    -------
    o : array (..., H, L, Ev), the dtype of ``q``
    lse : array (..., H, L), only with ``return_lse=True``

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    >>> o = refattn.sdpa(q, k, v, causal=True)
    >>> o.shape
    (2, 4, 5, 8)
    >>> bool(np.allclose(o[..., 0, :], v[..., 0, :]))  # the first query sees only the first key
    True
    """
    o, res = forward(q, k, v, mask=mask, bias=bias, causal=causal, causal_align=causal_align,
                     scale=scale, dropout_mask=dropout_mask, dropout_p=dropout_p, backend=backend,
                     tiles=tiles, float32_math=float32_math)
    if return_lse:
        xp = namespace(q)
        return o, xp.reshape(res.lse, res.shapes.scores[:-1])
    return o


def _forward_of_output(q, k, v, *, return_lse=False, **options):
    if return_lse:
        raise ValueError("vjp(sdpa, ...) differentiates the output o only; drop return_lse")
    return forward(q, k, v, **options)


attach_vjp(sdpa, _forward_of_output, backward)


def flops(batch, heads, q_len, kv_len, head_dim, value_dim, causal=False, **_):
    """Forward FLOPs (two matrix products); causal counts only the kept pairs."""
    pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
    return 2.0 * product(batch) * heads * pairs * (head_dim + value_dim)


def is_array(x) -> bool:
    return array_api_compat.is_array_api_obj(x)
