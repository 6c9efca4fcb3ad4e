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
    backward(q, k, v, o, lse, do, opts) -> (dq, dk, dv, dscores, dslopes)
        dscores (B, H, L, S): gradient of the pre-softmax scores (= of a float
        bias); only when ``opts.need_bias_grad``, else None.
        dslopes (B, H): gradient of the ALiBi slopes ((N, H), one row per sequence,
        with ``opts.sequences``); only when ``opts.need_alibi_grad``, else None.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import array_api_compat
import numpy as np

from ... import _empty_rows
from ... import backends as _backends
from . import cuda_mods as _cuda_mods
from . import numba as _numba_kernels
from . import reference as _reference
from . import segments as _segments
from ..._array import (as_batched_4d, flatten_batch, namespace, native_byte_order, product,
                       sum_to_shape)
from ..._masks import CAUSAL_ALIGNS, causal_offset, causal_pairs, window_bounds
from ..._vjp import attach_vjp
from ...rotary import ROTARY_STYLES, apply_rotary, apply_rotary_backward
from ..._validate import (AttentionShapes, attention_shapes, check_bool_array, check_broadcastable,
                          check_choice, check_cotangent, check_dropout, check_float_array,
                          check_same_dtype, reject_framework_keywords)
from ...typing import Array, Backend, CausalAlign

__all__ = ["SDPAOptions", "SDPAResiduals", "sdpa", "forward", "backward", "IMPLEMENTED",
           "as_batched_4d", "flops", "check_scale", "prepare", "implementation", "causal_pairs",
           "FLOAT32_MATHS", "option_route", "sequences_options", "compile_numba_backward"]

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
    window : (int or None, int or None) or None
        Sliding window: key ``j`` is kept for query ``i`` iff ``lo <= j - i <= hi``
        (a side of None is unbounded); None when there is no window.
    softcap : float or None
        Scores become ``softcap * tanh(scores / softcap)`` before the bias.
    alibi : array or None
        ALiBi slopes as ``(B|1, H, 1, 1)``: the bias ``-slope * |i + c - j|``.
    alibi_offset : int or None
        ``c`` of the ALiBi distance; None: ``S - L`` (the public call's).  A block of a
        sharded call passes its own (:mod:`refattn.distributed.geometry`); the reference
        and numba backends take it, the CUDA kernels do not (sharded calls run CuPy blocks
        with ALiBi on the reference).
    need_alibi_grad : bool
        Whether the backward pass must return the gradient of the slopes.
    tiles : (int, int) or None
        numba: queries x keys per tile; None = the backend's default.
    float32_math : {"tf32x3", "simt"} or None
        cupy: how float32 products run; None = the backend's default.
    empty_rows : {"zero", "uniform", "nan"}
        What a query row with no kept key gives; the kernels compute ``"zero"`` and
        the front end post-processes the others (:mod:`refattn._empty_rows`).
    mask_mod : callable or None
        ``mask_mod(b, h, i, j) -> bool array`` on index arrays broadcastable to
        ``(B, H, L, S)`` (:func:`refattn._masks.score_indices`); ANDed with the kept pairs.
    score_mod, score_mod_grad : callable or None
        ``score_mod(score, b, h, i, j) -> score`` applied last to the scores, and its
        derivative with respect to ``score`` (same signature) for the backward pass.
        The numba backend calls them pair by pair on scalars
        (:mod:`refattn.cores.sdpa.numba_mods`); the cupy kernels evaluate their CUDA
        expressions (:func:`refattn.cuda_expression`, :mod:`refattn.cores.sdpa.cuda_mods`),
        and cupy routes functions without one to the reference.
    sequences : :class:`~refattn.cores.sdpa.segments.SequenceLayout` or None
        Packed or padded sequences handed whole to the numba or cupy kernels (then
        ``causal_offset`` and ``window`` are None: the layout holds the per-sequence
        rule, and ``alibi`` is ``(1 | N, H, 1, 1)`` per sequence).  The reference backend
        never sees it: it gets one call per group of sequences
        (:mod:`~refattn.cores.sdpa.segments`).

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
    window: tuple | None = None
    softcap: float | None = None
    alibi: Any = None
    alibi_offset: int | None = None
    need_alibi_grad: bool = False
    tiles: tuple | None = None
    float32_math: str | None = None
    empty_rows: str = "zero"
    mask_mod: Any = None
    score_mod: Any = None
    score_mod_grad: Any = None
    sequences: Any = None


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
    alibi_shape: tuple | None = None
    rotary: dict | None = None        # apply_rotary keywords and the queries' offset


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


def _check_window(window):
    if window is None:
        return None
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        window = (window, window)                       # JAX: one int is a symmetric window
    if isinstance(window, np.ndarray) and window.dtype.kind in "iu" and window.shape == (2,):
        window = tuple(window.tolist())                 # e.g. read back from a golden file
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1
                   for w in window)):
        raise ValueError(f"window must be None or (left, right) with ints >= -1 (-1 = "
                         f"unbounded), got {window!r}")
    return (int(window[0]), int(window[1]))


def _check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be None or a real number > 0, got "
                        f"{type(softcap).__name__}")
    if not (math.isfinite(float(softcap)) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
    return float(softcap)


def _check_mods(mask_mod, score_mod, score_mod_grad):
    """FlexAttention-style callables: each None or callable; a derivative needs its score_mod."""
    for name, fn, signature in (("mask_mod", mask_mod, "(b, h, i, j) -> bool array"),
                                ("score_mod", score_mod, "(score, b, h, i, j) -> score"),
                                ("score_mod_grad", score_mod_grad,
                                 "(score, b, h, i, j) -> d score_mod / d score")):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be None or a callable {signature}, got "
                            f"{type(fn).__name__}")
    if score_mod_grad is not None and score_mod is None:
        raise ValueError("score_mod_grad= is the derivative of score_mod=, which is missing")


def _alibi_4d(xp, slopes, q, shapes):
    """Validate ALiBi slopes ``(H,)`` or ``(*batch, H)``; return them as ``(B|1, H, 1, 1)``."""
    check_float_array(slopes, "alibi_slopes")
    check_same_dtype(q=q, alibi_slopes=slopes)
    H, batch = shapes.heads, shapes.batch
    if tuple(slopes.shape) not in ((H,), (*batch, H)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({H},) or (*batch, H) = "
                         f"{(*batch, H)}, got {tuple(slopes.shape)}")
    lead = product(batch) if slopes.ndim > 1 else 1
    return xp.reshape(slopes, (lead, H, 1, 1))


def prepare(q, k, v, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
            dropout_mask=None, dropout_p=0.0, tiles=None, float32_math=None, window=None,
            softcap=None, alibi_slopes=None, empty_rows="zero", mask_mod=None, score_mod=None,
            score_mod_grad=None):
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
    offset = causal_offset(causal_align, shapes.q_len, shapes.kv_len)
    window = _check_window(window)
    _check_mods(mask_mod, score_mod, score_mod_grad)
    options = SDPAOptions(
        scale=float(scale),
        causal_offset=offset if causal else None,
        mask=None if mask is None else as_batched_4d(xp, mask, batch),
        bias=None if bias is None else as_batched_4d(xp, bias, batch),
        dropout_mask=None if dropout_mask is None else as_batched_4d(xp, dropout_mask, batch),
        dropout_scale=dropout_scale,
        need_bias_grad=bias is not None,
        window=None if window is None else window_bounds(window, offset),
        softcap=_check_softcap(softcap),
        alibi=None if alibi_slopes is None else _alibi_4d(xp, alibi_slopes, q, shapes),
        need_alibi_grad=alibi_slopes is not None,
        tiles=_check_tiles(tiles),
        float32_math=float32_math,
        empty_rows=_empty_rows.check_empty_rows(empty_rows),
        mask_mod=mask_mod,
        score_mod=score_mod,
        score_mod_grad=score_mod_grad,
    )
    return xp, shapes, options


def option_route(backend: str, options: SDPAOptions, *, cuda_mods: bool = False) -> str:
    """``backend``, or ``"reference"`` for the options that backend's kernels do not take.

    The functions ``mask_mod`` / ``score_mod`` (and ``score_mod_grad``) run tile-wise on
    numba, and on cupy (with ``cuda_mods``: SDPA's own kernels) when every one of them
    carries a CUDA expression (:func:`refattn.cuda_expression`); a cupy call with a function
    that has none runs on the reference formulas, on the CuPy arrays (``O(L S)`` memory).
    The CUDA kernels take ``window``, ``softcap`` and ALiBi slopes, compiled in per call
    (``docs/backends/cupy.md``).  Shared with the cores that reduce to SDPA's kernels
    (quaternion, without ``cuda_mods``: its functions run on the reference), so both route
    a call alike.
    """
    if (options.mask_mod is not None or options.score_mod is not None) and backend != "numba":
        if backend == "cupy" and cuda_mods and _cuda_mods.of_options(options) is not None:
            return backend
        return "reference"
    return backend


def _rotary_keywords(rotary, base, rotary_dim):
    """``apply_rotary`` keywords for ``rotary`` in ``ROTARY_STYLES``, or None without rotary."""
    if rotary is None:
        return None
    check_choice(rotary, "rotary", (None,) + ROTARY_STYLES)
    return {"base": base, "rotary_dim": rotary_dim, "interleaved": rotary == "interleaved"}


@reject_framework_keywords
def forward(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
            dropout_mask=None, dropout_p=0.0, window=None, softcap=None, alibi_slopes=None,
            cu_seqlens_q=None, cu_seqlens_k=None, query_seq_lengths=None,
            key_value_seq_lengths=None, mask_mod=None, score_mod=None, score_mod_grad=None,
            rotary=None, rotary_base=10000.0, rotary_dim=None, rotary_q_offset=0,
            backend="auto", tiles=None, float32_math=None, empty_rows="zero"):
    """SDPA forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`sdpa`.  ``residuals.lse`` holds the per-row
    log-sum-exp ``(B, H, L)`` that the backward pass uses to recompute the
    probabilities (FlashAttention-2).  Packed or padded sequences give
    :class:`~refattn.cores.sdpa.segments.SegmentedResiduals` (one core call per sequence).
    """
    if _segments.is_segmented(cu_seqlens_q, cu_seqlens_k, query_seq_lengths,
                              key_value_seq_lengths):
        kernels = _maps_sequences(q, k, v, bias, alibi_slopes, backend, mask_mod, score_mod,
                                  score_mod_grad, rotary, empty_rows)
        fused = (None if kernels is None
                 else functools.partial(_sequences_forward, kernels=kernels))
        return _segments.forward(
            forward, q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            mask=mask, bias=bias, dropout_mask=dropout_mask, alibi_slopes=alibi_slopes,
            mask_mod=mask_mod, score_mod=score_mod, score_mod_grad=score_mod_grad,
            causal=causal, causal_align=causal_align, scale=scale, dropout_p=dropout_p,
            window=window, softcap=softcap, rotary=rotary, rotary_base=rotary_base,
            rotary_dim=rotary_dim, rotary_q_offset=rotary_q_offset, backend=backend, tiles=tiles,
            float32_math=float32_math, empty_rows=empty_rows, fused_core=fused)
    q, k, v, bias, alibi_slopes = (None if x is None else native_byte_order(x)
                                   for x in (q, k, v, bias, alibi_slopes))
    rope = _rotary_keywords(rotary, rotary_base, rotary_dim)
    if rope is not None:          # a separate pass before the kernel (docs/rotary.md)
        attention_shapes(q, k, v)
        q = apply_rotary(q, offset=rotary_q_offset, **rope)
        k = apply_rotary(k, **rope)
        rope = {**rope, "q_offset": rotary_q_offset}
    xp, shapes, options = prepare(q, k, v, mask, bias, causal, causal_align, scale,
                                  dropout_mask, dropout_p, tiles, float32_math, window, softcap,
                                  alibi_slopes, empty_rows, mask_mod, score_mod, score_mod_grad)
    backend = _backends.resolve(backend, IMPLEMENTED, q, core="sdpa")
    backend = option_route(_backends.route(backend, xp, (q, k, v, options.alibi), options.bias),
                           options, cuda_mods=True)
    impl = implementation(backend)
    q4, k4, v4 = (flatten_batch(xp, x, shapes.batch) for x in (q, k, v))
    o4, lse = impl.forward(q4, k4, v4, options)
    # The residuals keep the kernel's output (its backward reads o): the policy is on top.
    out4 = _empty_rows.fill_output(options.empty_rows, o4, v4, _rows(xp, options, q4, k4),
                                   options)
    res = SDPAResiduals(backend, q4, k4, v4, o4, lse, options, shapes,
                        None if bias is None else tuple(bias.shape),
                        None if alibi_slopes is None else tuple(alibi_slopes.shape), rope)
    return xp.reshape(out4, shapes.output), res


def _maps_sequences(q, k, v, bias, alibi_slopes, backend, mask_mod, score_mod, score_mod_grad,
                    rotary, empty_rows) -> str | None:
    """The backend (``"numba"`` or ``"cupy"``) whose kernels run a packed or padded call in
    one call, mapping their work onto the sequences; None: one core call per group of
    sequences (:mod:`~refattn.cores.sdpa.segments`).

    Not with rotary (positions per sequence), an ``empty_rows`` policy other than
    ``"zero"``, inputs that the non-finite policy sends to the reference backend, or
    ``mask_mod``/``score_mod`` on a backend whose kernels do not evaluate them (numba always
    does; cupy when they all carry CUDA expressions, :func:`option_route`).  Their ``b`` is
    then the sequence, ``i``, ``j`` positions within it, as on the reference.
    """
    if rotary is not None or empty_rows != "zero" or not is_array(q):
        return None
    kernels = _backends.resolve(backend, IMPLEMENTED, q, core="sdpa")
    if kernels not in ("numba", "cupy"):
        return None
    if (mask_mod is not None or score_mod is not None) and kernels == "cupy" \
            and _cuda_mods.of_functions(mask_mod, score_mod, score_mod_grad) is None:
        return None
    arrays = (q, k, v) + (() if alibi_slopes is None else (alibi_slopes,))
    return kernels if _backends.route(kernels, namespace(q, k, v), arrays, bias) == kernels \
        else None


def sequences_options(q4, k4, v4, operands, slopes, spans, *, causal=False,
                      causal_align="upper_left", scale=None, dropout_p=0.0, window=None,
                      softcap=None, tiles=None, float32_math=None, empty_rows="zero",
                      mask_mod=None, score_mod=None, score_mod_grad=None):
    """``(xp, shapes, options)`` of one call on the 4-D view of packed or padded sequences.

    ``operands`` holds the 4-D mask, bias and dropout mask, ``slopes`` the ALiBi slopes
    ``(1 | N, H)`` or None, ``spans`` the sequences (:mod:`~refattn.cores.sdpa.segments`);
    ``mask_mod`` / ``score_mod`` see the sequence ``n`` as ``b`` (cupy kernels only).
    The options are validated as for one call, then the causal rule, the window and the
    slopes move into ``SDPAOptions.sequences`` (per sequence).
    """
    xp, shapes, options = prepare(q4, k4, v4, operands.get("mask"), operands.get("bias"), causal,
                                  causal_align, scale, operands.get("dropout_mask"), dropout_p,
                                  tiles, float32_math, window, softcap, None, empty_rows,
                                  mask_mod, score_mod, score_mod_grad)
    layout = _segments.SequenceLayout(_segments.span_array(spans), options.causal_offset
                                      is not None, causal_align == "lower_right",
                                      _check_window(window))
    alibi = None if slopes is None else xp.reshape(slopes, (slopes.shape[0], shapes.heads, 1, 1))
    options = replace(options, causal_offset=None, window=None, alibi=alibi,
                      need_alibi_grad=slopes is not None, sequences=layout)
    return xp, shapes, options


def _sequences_forward(q4, k4, v4, operands, slopes, spans, *, kernels, backend="auto",
                       **options):
    """One call of the ``kernels`` backend (numba or cupy) on the 4-D view of packed or
    padded sequences: ``(o4, residuals)`` (arguments of :func:`sequences_options`; rotary is
    never set here)."""
    for name in ("rotary", "rotary_base", "rotary_dim", "rotary_q_offset"):
        options.pop(name, None)
    xp, shapes, options = sequences_options(q4, k4, v4, operands, slopes, spans, **options)
    o4, lse = implementation(kernels).forward(q4, k4, v4, options)
    bias = operands.get("bias")
    res = SDPAResiduals(kernels, q4, k4, v4, o4, lse, options, shapes,
                        None if bias is None else tuple(bias.shape),
                        None if slopes is None else tuple(slopes.shape))
    return o4, res


def _rows(xp, options, q4, k4):
    """The empty rows ``(B|1, H|1, L)`` under a policy other than ``"zero"`` (else None)."""
    if options.empty_rows == "zero":
        return None
    return _empty_rows.empty_rows(xp, options, q4.shape[-2], k4.shape[-2],
                                  device=array_api_compat.device(q4))


def backward(res: SDPAResiduals | _segments.SegmentedResiduals, do):
    """SDPA backward pass: ``(dq, dk, dv)``, then ``dbias`` with a float bias, then
    ``dalibi_slopes`` with ALiBi slopes.

    ``dbias`` is summed to the bias's own (broadcast) shape, ``dalibi_slopes`` to the
    slopes' shape.
    """
    if isinstance(res, _segments.SegmentedResiduals):
        return _segments.backward(backward, res, do)
    if res.options.score_mod is not None and res.options.score_mod_grad is None:
        raise ValueError("the gradient through score_mod= needs its derivative: pass "
                         "score_mod_grad(score, b, h, i, j) = d score_mod / d score")
    shapes = res.shapes
    xp = namespace(res.q)
    check_cotangent(do, shapes.output, "(..., H, L, Ev)", like=res.o)
    do4 = flatten_batch(xp, xp.astype(native_byte_order(do), res.o.dtype), shapes.batch)
    rows = _rows(xp, res.options, res.q, res.k)
    policy = res.options.empty_rows
    do_kernel = _empty_rows.kernel_cotangent(policy, do4, rows)
    impl = implementation(_backends.route(res.backend, xp, (do_kernel,)))
    dq, dk, dv, dscores, dslopes = impl.backward(res.q, res.k, res.v, res.o, res.lse, do_kernel,
                                                 res.options)
    dv = _empty_rows.value_gradient(policy, dv, do4, rows, res.options)
    batch = shapes.batch
    grads: tuple[Array, ...] = (xp.reshape(dq, (*batch,) + tuple(dq.shape[1:])),
             xp.reshape(dk, (*batch,) + tuple(dk.shape[1:])),
             xp.reshape(dv, (*batch,) + tuple(dv.shape[1:])))
    if res.rotary is not None:    # the rotation is orthogonal: its pullback is R^T
        rope = {n: x for n, x in res.rotary.items() if n != "q_offset"}
        grads = (apply_rotary_backward(grads[0], offset=res.rotary["q_offset"], **rope),
                 apply_rotary_backward(grads[1], **rope), grads[2])
    if res.bias_shape is not None:
        dscores = xp.reshape(dscores, shapes.scores)
        grads = grads + (sum_to_shape(xp, dscores, res.bias_shape),)
    if res.alibi_shape is not None:
        if res.options.sequences is None:
            dslopes = xp.reshape(dslopes, (*batch, shapes.heads))             # (*batch, H)
        grads = grads + (sum_to_shape(xp, dslopes, res.alibi_shape),)         # else (N, H)
    return grads


@reject_framework_keywords
def sdpa(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
         causal: bool = False, causal_align: CausalAlign = "upper_left",
         scale: float | None = None, dropout_mask: Array | None = None, dropout_p: float = 0.0,
         window: int | tuple[int | None, int | None] | None = None, softcap: float | None = None,
         alibi_slopes: Array | None = None, cu_seqlens_q: Array | None = None,
         cu_seqlens_k: Array | None = None, query_seq_lengths: Array | None = None,
         key_value_seq_lengths: Array | None = None, mask_mod: Callable[..., Array] | None = None,
         score_mod: Callable[..., Array] | None = None,
         score_mod_grad: Callable[..., Array] | None = None,
         rotary: Literal["half", "interleaved"] | None = None,
         rotary_base: float = 10000.0, rotary_dim: int | None = None, rotary_q_offset: int = 0,
         return_lse: bool = False, return_probs: bool = False, backend: Backend = "auto",
         tiles: tuple[int, int] | None = None,
         float32_math: Literal["tf32x3", "simt"] | None = None,
         empty_rows: Literal["zero", "uniform", "nan"] = "zero") -> Array:
    r"""Scaled dot-product attention.

    .. math::

        P = \mathrm{softmax}_j(\mathrm{cap}(\text{scale}\; q k^\top) + \text{bias}
            - \text{slope}\,|i + S - L - j|), \qquad o = P v

    where ``cap(x) = softcap * tanh(x / softcap)`` (identity without ``softcap``),
    masked-out keys (mask, causal rule, window, ``-inf`` bias) get probability 0, a
    row with no key left gives ``o = 0``, and dropout multiplies kept probabilities
    by ``1/(1-p)``.  Definitions and derivatives: ``docs/cores/sdpa.md``.

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
    window : (int, int) or int, optional
        FlashAttention's ``window_size = (left, right)``: key ``j`` is kept for query
        ``i`` iff ``i + offset - left <= j <= i + offset + right``, ``offset`` the
        causal alignment's (0 upper-left, ``S - L`` lower-right); ``-1`` leaves a
        side unbounded; one int is JAX's symmetric ``local_window_size``.  Combines
        with ``mask`` and ``causal`` by logical AND.
    softcap : float > 0, optional
        Soft-capping of the scaled scores, ``softcap * tanh(s / softcap)``, before the
        bias and masking (FlashAttention >= 2.6, Gemma 2).
    alibi_slopes : float array (H,) or (..., H), optional
        FlashAttention's ALiBi: adds ``-slope_h * |i + S - L - j|``; ``vjp`` returns
        the slopes' gradient after ``dbias`` (if any).
    cu_seqlens_q, cu_seqlens_k : int array (N + 1,), optional
        FlashAttention varlen: ``q (total_q, H, E)``, ``k (total_k, Hkv, E)``,
        ``v (total_k, Hkv, Ev)`` hold ``N`` sequences back to back, sequence ``n`` the
        tokens ``cu_seqlens[n] : cu_seqlens[n+1]``; attention stays within a sequence,
        whose positions (causal rule, window, ALiBi, rotary) start at 0.  ``o`` is
        ``(total_q, H, Ev)``; ``mask``, ``bias``, ``dropout_mask`` broadcast to
        ``(H, total_q, total_k)``; ``alibi_slopes`` is ``(H,)`` or ``(N, H)``.
    query_seq_lengths, key_value_seq_lengths : int array (...,), optional
        JAX's padding: batch element ``b`` has the queries ``0 : Lq[b]`` and keys
        ``0 : Lk[b]``; padded query rows give 0 and receive no gradient.
    mask_mod : callable, optional
        FlexAttention's ``mask_mod(b, h, i, j) -> bool`` as an array function: index
        arrays ``b (B, 1, 1, 1)``, ``h (1, H, 1, 1)``, ``i (1, 1, L, 1)``,
        ``j (1, 1, 1, S)`` (``b`` the flattened batch index, or the sequence index with
        ``cu_seqlens``); ``True`` = attend, ANDed with the other masks.
    score_mod : callable, optional
        FlexAttention's ``score_mod(score, b, h, i, j) -> score``, applied to the whole
        score (after soft-cap, bias and ALiBi, before masking).
    score_mod_grad : callable, optional
        ``d score_mod / d score`` with the same signature; required for gradients.
        On numba they run pair by pair as scalar numba-compiled functions on the tiles
        the causal rule and the window leave (``O(L)`` memory; a first call with new
        functions compiles for 10-30 s).  On cupy they run in the fused kernels when
        each carries a CUDA expression (:func:`refattn.cuda_expression`; ``O(L)``
        memory, also with packed or padded sequences; a first call with new expressions
        compiles through NVRTC); otherwise cupy routes them to the reference backend
        (``O(L S)`` memory).
    rotary : {None, "half", "interleaved"}
        Rotary position embeddings applied to ``q`` and ``k`` first
        (:func:`refattn.apply_rotary`): ``"half"`` pairs ``(x_m, x_{m+r/2})``
        (GPT-NeoX, Llama), ``"interleaved"`` pairs ``(x_{2m}, x_{2m+1})`` (GPT-J);
        keys at positions ``0 ... S-1``, queries at ``rotary_q_offset + 0 ... L-1``.
    rotary_base : float
        ``theta`` of the frequencies (10000 by default; 500000 in Llama 3).
    rotary_dim : even int, optional
        Rotated features per head (default ``E``); the rest pass through.
    rotary_q_offset : int
        Position of the first query (e.g. ``S - L`` when the queries are the last
        ``L`` of ``S`` tokens).
    return_lse : bool
        Also return the log-sum-exp ``(..., H, L)`` of each row.
    return_probs : bool
        Also return the attention probabilities ``P (..., H, L, S)`` (before dropout),
        for inspection: ``O(L S)`` memory on every backend.
    backend : {"auto", "reference", "numba", "cupy"}
        The cupy kernels take ``window``, ``softcap``, ``alibi_slopes`` and packed or
        padded sequences (``docs/backends/cupy.md``), and ``mask_mod``/``score_mod``
        given CUDA expressions (:func:`refattn.cuda_expression`); functions without one
        run on the reference backend there.
    tiles : (int, int), optional
        numba backend: queries x keys per tile (default 256 x 256); for tests and tuning.
    float32_math : {"tf32x3", "simt"}, optional
        cupy backend: float32 products on tensor cores with split operands (default) or
        on CUDA cores.
    empty_rows : {"zero", "uniform", "nan"}
        What a query row with no kept key gives (``docs/conventions.md``): ``"zero"``
        (refattn, PyTorch SDPA, FlashAttention): 0 and no gradient; ``"uniform"`` (a
        ``finfo.min`` fill, JAX): the mean of ``v`` over all keys, its
        gradient to ``v`` only; ``"nan"`` (a ``-inf`` fill): NaN, and NaN ``dv`` for
        the row's key/value head.  ``return_lse`` and ``return_probs`` are refattn's
        own (``-inf`` and 0 in such rows) whatever the policy.

    Returns
    -------
    o : array (..., H, L, Ev), the dtype of ``q``
    lse : array (..., H, L), only with ``return_lse=True``
    probs : array (..., H, L, S), only with ``return_probs=True`` (after ``lse``)

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
    >>> o, p = refattn.sdpa(q, k, v, window=(1, 0), softcap=30.0, return_probs=True)
    >>> p.shape, bool(np.all(p[..., 3, :2] == 0))      # query 3 sees keys 2 and 3 only
    ((2, 4, 5, 5), True)
    """
    o, res = forward(q, k, v, mask=mask, bias=bias, causal=causal, causal_align=causal_align,
                     scale=scale, dropout_mask=dropout_mask, dropout_p=dropout_p, window=window,
                     softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths, mask_mod=mask_mod,
                     score_mod=score_mod, score_mod_grad=score_mod_grad, rotary=rotary,
                     rotary_base=rotary_base, rotary_dim=rotary_dim,
                     rotary_q_offset=rotary_q_offset, backend=backend, tiles=tiles,
                     float32_math=float32_math, empty_rows=empty_rows)
    extra: tuple[Array, ...] = ()
    xp = namespace(q)
    if isinstance(res, _segments.SegmentedResiduals):
        if return_lse:
            extra += (res.public_lse(),)
        if return_probs:
            extra += (res.probabilities(_reference.probabilities),)
        return (o, *extra) if extra else o
    if return_lse:
        extra += (xp.reshape(res.lse, res.shapes.scores[:-1]),)
    if return_probs:
        probs = _reference.probabilities(res.q, res.k, res.lse, res.options)    # (B, H, L, S)
        extra += (xp.reshape(probs, res.shapes.scores),)
    return (o, *extra) if extra else o


attach_vjp(sdpa, forward, backward, output_only=("return_lse", "return_probs"))


def flops(batch, heads, q_len, kv_len, head_dim, value_dim, causal=False, **_):
    """Forward FLOPs (two matrix products); causal counts only the kept pairs."""
    pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
    return 2.0 * product(batch) * heads * pairs * (head_dim + value_dim)


def is_array(x) -> bool:
    return array_api_compat.is_array_api_obj(x)


def compile_numba_backward(dtype) -> None:
    """Compile (or load) the numba backend's ``dtype`` backward kernel of calls without
    ``mask_mod`` / ``score_mod``: one tiny backward call, whose argument types are those of
    every such call (one signature per dtype: ``refattn.cores.sdpa.numba``).  The SDPA
    core's compile-ahead worker runs it (:mod:`refattn.backends.compile_ahead`)."""
    dtype = np.dtype(dtype)
    q = np.ones((1, 1, 2, 4), dtype)             # (B, H, L, E)
    _numba_kernels.backward(q, q, q, q, np.zeros((1, 1, 2), dtype), q, SDPAOptions(scale=0.5))
