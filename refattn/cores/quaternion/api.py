"""Quaternion attention: the public front end shared by all backends.

Shape legend
------------
``*batch``  any number of batch dimensions (zero or more)
``H``       query heads;  ``Hkv`` key/value heads (``H % Hkv == 0``, GQA)
``L``       query length; ``S`` key length
``4``       the quaternion component axis ``(r, i, j, k)``
``d``       units per component of a query/key head; ``dv`` of a value head

The front end validates ``q, k, v`` (component axis of size 4), then validates
``mask``, ``bias``, ``causal`` and ``scale`` with SDPA's own front end on the
component-flattened problem, so they mean exactly what they mean for
:func:`refattn.sdpa`.  Backends: ``"reference"`` evaluates the explicit formulas
(:mod:`.reference`); every other backend is SDPA's kernel for that backend,
reached by an exact reduction (:mod:`.reduction`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat

from ... import _empty_rows
from ... import backends as _backends
from ..._array import flatten_batch, namespace, native_byte_order, sum_to_shape
from ..._validate import (AttentionShapes, attention_shapes, check_array, check_choice,
                          check_cotangent, reject_framework_keywords)
from ..._vjp import attach_vjp
from ..sdpa import api as _sdpa_api
from ..sdpa import segments as _segments
from . import reference as _reference
from .algebra import MODES, n_maps, score_terms
from .reduction import SDPAReduction
from ...typing import Array, Backend, CausalAlign

__all__ = ["quaternion_attention", "forward", "backward", "score_maps", "pair_costs", "PairCosts",
           "flops", "IMPLEMENTED", "MODES", "implementation", "core_forward", "prepare",
           "OPTIONS", "QuaternionResiduals", "SegmentedQuaternionResiduals"]

#: The options of :func:`quaternion_attention` besides ``mask`` and ``causal`` (``Core.options``):
#: SDPA's, applied to every score map (``docs/cores/quaternion.md``, "Options").
OPTIONS = ("scale", "causal_align", "bias", "empty_rows", "window", "softcap", "alibi_slopes",
           "query_seq_lengths", "key_value_seq_lengths", "mask_mod", "score_mod",
           "score_mod_grad")

#: Every backend of SDPA: ``"reference"`` is the explicit formulas, the others reduce to SDPA.
IMPLEMENTED = _sdpa_api.IMPLEMENTED


@dataclass(frozen=True)
class PairCosts:
    """Work per (query, key) pair and head, read off the score-term table.

    ``score_mults``: multiplications of the score maps (Hamilton ``16 d``, shared ``4 d``);
    ``value_mults``: multiplications of ``A V`` (``4 dv`` both); ``softmaxes``: score maps.
    """

    score_mults: int
    value_mults: int
    softmaxes: int


def pair_costs(mode: str, d: int, dv: int | None = None) -> PairCosts:
    """:class:`PairCosts` of a core with ``d`` (``dv``) units per component."""
    dv = d if dv is None else dv
    return PairCosts(len(score_terms(mode)) * d, 4 * dv, n_maps(mode))


def flops(batch, heads, q_len, kv_len, head_dim, value_dim, causal=False, *, mode, **_):
    """Forward FLOPs; ``head_dim = 4 d`` and ``value_dim = 4 dv`` are the flattened sizes.

    Two FLOPs per multiplication of :func:`pair_costs`, over the kept pairs (SDPA's count).
    """
    costs = pair_costs(mode, head_dim // 4, value_dim // 4)
    return _sdpa_api.flops(batch, heads, q_len, kv_len, costs.score_mults, costs.value_mults,
                           causal=causal)


@dataclass
class QuaternionResiduals:
    """What the backward pass needs: the backend's saved arrays and the validated options."""

    mode: str
    backend: str
    saved: Any
    options: Any            # SDPAOptions of the flattened problem
    shapes: AttentionShapes
    dtype: Any              # of the inputs; the cotangent is cast to it
    bias_shape: tuple | None = None
    empty_rows: Any = None  # (B|1, H|1, L) rows with no kept key, under a non-zero policy
    alibi_shape: tuple | None = None
    q: Any = None           # (B, H, L, 4, d): the batch-flattened inputs, for the probabilities
    k: Any = None           # (B, Hkv, S, 4, d)

    @property
    def output(self) -> tuple:
        s = self.shapes
        return (*s.batch, s.heads, s.q_len, 4, s.value_dim)


def _flat_components(xp, x):
    return xp.reshape(x, (*x.shape[:-2], 4 * x.shape[-1]))        # (..., 4f)


def prepare(q, k, v, mode, mask=None, bias=None, causal=False, causal_align="upper_left",
            scale=None, empty_rows="zero", window=None, softcap=None, alibi_slopes=None,
            mask_mod=None, score_mod=None, score_mod_grad=None):
    """Validate the arguments of :func:`quaternion_attention`: ``(xp, shapes, SDPAOptions)``."""
    check_choice(mode, "mode", MODES)
    shapes = attention_shapes(q, k, v, feature_axes=2, legend_feature="d")
    xp = namespace(q, k, v)
    scale = _sdpa_api.check_scale(scale, 4 * shapes.head_dim, legend="4 d")
    # SDPA's own validation on the flattened problem: same errors, same mask semantics.
    _, _, options = _sdpa_api.prepare(
        *(_flat_components(xp, x) for x in (q, k, v)), mask, bias, causal, causal_align, scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, empty_rows=empty_rows,
        mask_mod=mask_mod, score_mod=score_mod, score_mod_grad=score_mod_grad)
    return xp, shapes, options


def _rows(xp, options, q5, k5):
    """The empty rows ``(B|1, H|1, L)`` under a policy other than ``"zero"`` (else None)."""
    if options.empty_rows == "zero":
        return None
    return _empty_rows.empty_rows(xp, options, q5.shape[2], k5.shape[2],
                                  device=array_api_compat.device(q5))


def implementation(backend: str):
    """The quaternion backend for ``backend``: the explicit formulas, or SDPA's kernels reduced."""
    match backend:
        case "reference":
            return _reference
        case _:
            return SDPAReduction(_sdpa_api.implementation(backend),
                                 scalar_mods=backend == "numba")


@reject_framework_keywords
def forward(q, k, v, *, mode="shared", mask=None, bias=None, causal=False,
            causal_align="upper_left", scale=None, window=None, softcap=None, alibi_slopes=None,
            cu_seqlens_q=None, cu_seqlens_k=None, query_seq_lengths=None,
            key_value_seq_lengths=None, mask_mod=None, score_mod=None, score_mod_grad=None,
            backend="auto", empty_rows="zero"):
    """Quaternion attention forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`quaternion_attention`.  Packed or padded sequences give
    :class:`SegmentedQuaternionResiduals` (one core call per group of equal lengths).
    """
    if _segments.is_segmented(cu_seqlens_q, cu_seqlens_k, query_seq_lengths,
                              key_value_seq_lengths):
        return _segmented_forward(
            q, k, v, mode, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            mask=mask, bias=bias, alibi_slopes=alibi_slopes, mask_mod=mask_mod,
            score_mod=score_mod, score_mod_grad=score_mod_grad, causal=causal,
            causal_align=causal_align, scale=scale, window=window, softcap=softcap,
            backend=backend, empty_rows=empty_rows)
    q, k, v, bias, alibi_slopes = (None if x is None else native_byte_order(x)
                                   for x in (q, k, v, bias, alibi_slopes))
    xp, shapes, options = prepare(q, k, v, mode, mask, bias, causal, causal_align, scale,
                                  empty_rows, window, softcap, alibi_slopes, mask_mod, score_mod,
                                  score_mod_grad)
    backend = _backends.resolve(backend, IMPLEMENTED, q, core=f"quaternion attention ({mode})")
    backend = _sdpa_api.option_route(
        _backends.route(backend, xp, (q, k, v, options.alibi), options.bias), options)
    q5, k5, v5 = (flatten_batch(xp, x, shapes.batch) for x in (q, k, v))   # (B, H|Hkv, L|S, 4, d|dv)
    o5, saved = implementation(backend).forward(q5, k5, v5, options, mode)
    # The empty-row policy on the rows' 4 dv features (every component shares the row).
    rows = _rows(xp, options, q5, k5)
    o5 = xp.reshape(_empty_rows.fill_output(options.empty_rows, _flat_rows(xp, o5),
                                            _flat_rows(xp, v5), rows, options), tuple(o5.shape))
    res = QuaternionResiduals(mode, backend, saved, options, shapes, q.dtype,
                              None if bias is None else tuple(bias.shape), rows,
                              None if alibi_slopes is None else tuple(alibi_slopes.shape),
                              q5, k5)
    return xp.reshape(o5, res.output), res


def _flat_rows(xp, x):
    """``(B, H, T, 4, f) -> (B, H, T, 4f)``."""
    return xp.reshape(x, (*x.shape[:3], 4 * x.shape[-1]))


def backward(res, do):
    """Backward pass: ``(dq, dk, dv)``, then ``dbias`` (summed to its shape) with a float
    bias, then ``dalibi_slopes`` (summed to their shape) with ALiBi slopes."""
    if isinstance(res, SegmentedQuaternionResiduals):
        return _segmented_backward(res, do)
    if res.options.score_mod is not None and res.options.score_mod_grad is None:
        raise ValueError("the gradient through score_mod= needs its derivative: pass "
                         "score_mod_grad(score, b, h, i, j) = d score_mod / d score")
    shapes = res.shapes
    check_cotangent(do, res.output, "(..., H, L, 4, dv)")
    xp = namespace(do)
    do5 = flatten_batch(xp, xp.astype(native_byte_order(do), res.dtype), shapes.batch)
    # do5 (B, H, L, 4, dv); a non-finite cotangent takes SDPA's exact path (same residuals)
    policy, rows = res.options.empty_rows, res.empty_rows
    do_flat = _flat_rows(xp, do5)                                      # (B, H, L, 4 dv)
    do5 = xp.reshape(_empty_rows.kernel_cotangent(policy, do_flat, rows), tuple(do5.shape))
    impl = implementation(res.backend)
    if res.backend != "reference" and _backends.needs_exact_path(xp, (do5,)):
        impl = SDPAReduction(_sdpa_api.implementation("reference"))
    dq, dk, dv, dscores, dslopes = impl.backward(res.saved, do5, res.options, res.mode)
    dv = xp.reshape(_empty_rows.value_gradient(policy, _flat_rows(xp, dv), do_flat, rows,
                                               res.options), tuple(dv.shape))
    batch = shapes.batch
    grads = tuple(xp.reshape(g, (*batch, *g.shape[1:])) for g in (dq, dk, dv))
    if res.bias_shape is not None:
        dscores = xp.reshape(dscores, shapes.scores)                   # (..., H, L, S)
        grads = grads + (sum_to_shape(xp, dscores, res.bias_shape),)
    if res.alibi_shape is not None:
        dslopes = xp.reshape(dslopes, (*batch, shapes.heads))          # (..., H)
        grads = grads + (sum_to_shape(xp, dslopes, res.alibi_shape),)
    return grads


# -- packed and padded sequences: SDPA's segmentation on the flattened components ------------
@dataclass
class _FlatPart:
    """A quaternion core residual as :mod:`refattn.cores.sdpa.segments` sees it.

    The segmentation works on ``(B, H, T, X)`` arrays; the quaternion core's ``(4, d)``
    feature axes travel flattened to ``4 d`` through it.  No ``lse``: a quaternion row has
    one log-sum-exp per score map.
    """

    inner: QuaternionResiduals


@dataclass
class SegmentedQuaternionResiduals:
    """What the backward pass of a packed or padded quaternion call needs."""

    mode: str
    segments: Any           # SegmentedResiduals of the flattened problem
    output: tuple           # the public output shape (..., 4, dv)


def _unflat(xp, x):
    """``(..., 4f) -> (..., 4, f)``."""
    return xp.reshape(x, (*x.shape[:-1], 4, x.shape[-1] // 4))


def _check_segmented_layout(q, k, v, packed: bool):
    """The quaternion shapes of a packed ``(total, H, 4, d)`` or padded call."""
    if not packed:
        attention_shapes(q, k, v, feature_axes=2, legend_feature="d")
        return
    for name, x, legend in (("q", q, "(total_q, H, 4, d)"), ("k", k, "(total_k, Hkv, 4, d)"),
                            ("v", v, "(total_k, Hkv, 4, dv)")):
        check_array(x, name)
        if x.ndim != 4 or x.shape[-2] != 4:
            raise ValueError(f"with cu_seqlens_q and cu_seqlens_k, {name} must have the packed "
                             f"quaternion shape {legend}, got {tuple(x.shape)}")


def _flat_core_forward(mode):
    """``core_forward`` for the segmentation: flattened ``4 d`` features in and out."""
    def core_forward(q, k, v, **options):
        xp = namespace(q, k, v)
        o, res = forward(*(_unflat(xp, x) for x in (q, k, v)), mode=mode, **options)
        return _flat_components(xp, o), _FlatPart(res)
    return core_forward


def _flat_core_backward(part, do):
    xp = namespace(do)
    grads = backward(part.inner, _unflat(xp, do))
    return tuple(_flat_components(xp, g) for g in grads[:3]) + tuple(grads[3:])


def _segmented_forward(q, k, v, mode, *, cu_seqlens_q, cu_seqlens_k, **options):
    check_choice(mode, "mode", MODES)
    # one of the two cu_seqlens alone: the padded layout here, the segmentation's error next
    _check_segmented_layout(q, k, v, cu_seqlens_q is not None and cu_seqlens_k is not None)
    xp = namespace(q, k, v)
    flat = tuple(_flat_components(xp, x) for x in (q, k, v))            # (..., 4d | 4dv)
    o, seg = _segments.forward(_flat_core_forward(mode), *flat, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, **options)
    o = _unflat(xp, o)                                                  # (..., 4, dv)
    return o, SegmentedQuaternionResiduals(mode, seg, tuple(o.shape))


def _segmented_backward(res: SegmentedQuaternionResiduals, do):
    check_cotangent(do, res.output, "(..., 4, dv)")
    xp = namespace(do)
    grads = _segments.backward(_flat_core_backward, res.segments, _flat_components(xp, do))
    return tuple(_unflat(xp, g) for g in grads[:3]) + tuple(grads[3:])


def _probabilities(res):
    """``P`` of every map: ``(..., H, M, L, S)``, or ``(H, M, total_q, total_k)`` when packed."""
    if isinstance(res, QuaternionResiduals):
        p = _reference.probabilities(res.q, res.k, res.options, res.mode)   # (B, H, M, L, S)
        xp = namespace(p)
        return xp.reshape(p, (*res.shapes.batch, *p.shape[1:]))
    seg = res.segments
    xp = seg.xp
    B, H, _, L, S, _, _ = seg.view
    M = n_maps(res.mode)
    p = xp.zeros((B, H, M, L, S), dtype=seg.o.dtype, device=array_api_compat.device(seg.o))
    for group, part in seg.parts:
        inner = part.inner
        p_g = _reference.probabilities(inner.q, inner.k, inner.options, res.mode)  # (G, H, M, t, s)
        for g, span in enumerate(group):
            p[span.b, :, :, span.q0:span.q1, span.k0:span.k1] = p_g[g]
    return p[0] if seg.packed else xp.reshape(p, (*seg.batch, H, M, L, S))


@reject_framework_keywords
def quaternion_attention(q: Array, k: Array, v: Array, *,
                         mode: Literal["shared", "hamilton"] = "shared", mask: Array | None = None,
                         bias: Array | None = None, causal: bool = False,
                         causal_align: CausalAlign = "upper_left", scale: float | None = None,
                         window: int | tuple[int, int] | None = None,
                         softcap: float | None = None, alibi_slopes: Array | None = None,
                         cu_seqlens_q: Array | None = None, cu_seqlens_k: Array | None = None,
                         query_seq_lengths: Array | None = None,
                         key_value_seq_lengths: Array | None = None,
                         mask_mod: Callable[..., Array] | None = None,
                         score_mod: Callable[..., Array] | None = None,
                         score_mod_grad: Callable[..., Array] | None = None,
                         return_probs: bool = False, backend: Backend = "auto",
                         empty_rows: Literal["zero", "uniform", "nan"] = "zero") -> Array:
    r"""Quaternion self-attention with shared scores or Hamilton (component-wise) scores.

    Each head holds ``d`` quaternion units: ``q[..., h, l, c, u]`` is component ``c``
    (``r, i, j, k``) of unit ``u`` of query ``l``.

    ``mode="shared"`` (Yamauchi et al. 2026): one score map and one softmax,

    .. math:: A = \mathrm{softmax}(\text{scale}\,\mathrm{Re}(Q \otimes K^*)), \quad O_c = A V_c,
              \quad \mathrm{Re}(Q \otimes K^*) = \textstyle\sum_c Q_c K_c^\top

    ``mode="hamilton"`` (Tay et al. 2019): four maps, the components of
    :math:`\sum_u q_u \otimes k_u`, four softmaxes,
    :math:`O_c = \mathrm{softmax}(\text{scale}\,S_c) V_c`.

    Parameters
    ----------
    q : array (..., H, L, 4, d)
    k : array (..., Hkv, S, 4, d)
        ``Hkv`` must divide ``H`` (grouped-query attention, as :func:`refattn.sdpa`).
    v : array (..., Hkv, S, 4, dv)
    mode : {"shared", "hamilton"}
    mask : bool array broadcastable to (..., H, L, S), optional
        ``True`` = attend; applies to every score map.
    bias : float array broadcastable to (..., H, L, S), optional
        Added to the scaled scores of every map.
    causal : bool
    causal_align : {"upper_left", "lower_right"}
    scale : float, optional
        Defaults to ``1/sqrt(4 d)``.
    window : (int, int) or int, optional
        FlashAttention's ``window_size`` (as :func:`refattn.sdpa`): a mask, the same for
        every map.
    softcap : float > 0, optional
        ``softcap * tanh(s / softcap)`` on each map's scaled score, before the bias.
    alibi_slopes : float array (H,) or (..., H), optional
        FlashAttention's ALiBi bias ``-slope_h |i + S - L - j|``, added to every map;
        ``vjp`` returns the slopes' gradient (summed over the maps) after ``dbias``.
    cu_seqlens_q, cu_seqlens_k : int array (N + 1,), optional
        Packed sequences (FlashAttention varlen): ``q (total_q, H, 4, d)``,
        ``k (total_k, Hkv, 4, d)``, ``v (total_k, Hkv, 4, dv)``, ``o (total_q, H, 4, dv)``;
        ``mask``, ``bias`` broadcast to ``(H, total_q, total_k)``, slopes ``(H,)`` or ``(N, H)``.
    query_seq_lengths, key_value_seq_lengths : int array (...,), optional
        JAX's padding, as for :func:`refattn.sdpa`.
    mask_mod, score_mod, score_mod_grad : callable, optional
        FlexAttention-style functions, as for :func:`refattn.sdpa` (array functions on the
        reference backend, scalar numba-compiled functions on numba); ``score_mod`` is
        applied to the score of every map, ``b`` is the flattened batch index.
    return_probs : bool
        Also return every map's probabilities ``P (..., H, M, L, S)`` (``M = 4`` Hamilton,
        1 shared; ``(H, M, total_q, total_k)`` when packed), evaluated on the reference
        formulas: ``O(M L S)`` memory.
    backend : {"auto", "reference", "numba", "cupy"}
        ``"reference"`` evaluates the explicit formulas; the others run SDPA's kernels
        through an exact reduction (available wherever :func:`refattn.sdpa` has them), and
        take the options where SDPA's kernels do (cupy: window, soft-cap and ALiBi in the
        kernels; ``mask_mod`` / ``score_mod`` on the reference formulas, as for
        :func:`refattn.sdpa`).
    empty_rows : {"zero", "uniform", "nan"}
        What a query row with no kept key gives, as for :func:`refattn.sdpa`:
        ``"uniform"`` (the official shared-score code's ``finfo.min`` fill) makes every
        component of the row the mean of that component of ``v`` over all keys.

    Returns
    -------
    o : array (..., H, L, 4, dv)
        (``(total_q, H, 4, dv)`` for packed sequences.)
    p : array (..., H, M, L, S), only with ``return_probs=True``
        Every map's probabilities (see ``return_probs``).

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 6, 4, 3)) for _ in range(3))
    >>> o = refattn.quaternion_attention(q, k, v, mode="hamilton", causal=True)
    >>> o.shape
    (2, 4, 6, 4, 3)
    >>> flat = lambda x: x.reshape(*x.shape[:-2], -1)     # (..., 4, d) -> (..., 4d)
    >>> shared = refattn.quaternion_attention(q, k, v, mode="shared")
    >>> bool(np.allclose(flat(shared), refattn.sdpa(flat(q), flat(k), flat(v))))
    True
    >>> o, p = refattn.quaternion_attention(q, k, v, mode="hamilton", window=(1, 0), softcap=5.0,
    ...                                     return_probs=True)
    >>> p.shape, bool(np.all(p[..., 3, :2] == 0))   # four maps; query 3 sees keys 2 and 3 only
    ((2, 4, 4, 6, 6), True)
    """
    o, res = forward(q, k, v, mode=mode, mask=mask, bias=bias, causal=causal,
                     causal_align=causal_align, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths, mask_mod=mask_mod,
                     score_mod=score_mod, score_mod_grad=score_mod_grad, backend=backend,
                     empty_rows=empty_rows)
    return (o, _probabilities(res)) if return_probs else o


attach_vjp(quaternion_attention, forward, backward, output_only=("return_probs",))


def score_maps(q, k, *, mode="hamilton"):
    """The unscaled score maps the core softmaxes: ``(..., H, M, L, S)``, ``M = 4`` or ``1``.

    ``mode="hamilton"``: ``[..., c, :, :]`` is component ``c`` of ``sum_u q_u (x) k_u``;
    ``mode="shared"``: the single map ``Re(Q (x) K*)``.  Same computation as the
    reference backend (for inspection and tests).

    Examples
    --------
    >>> import numpy as np
    >>> q = np.zeros((1, 1, 4, 1)); k = np.zeros((1, 1, 4, 1))
    >>> q[0, 0, :, 0] = [0, 1, 0, 0]; k[0, 0, :, 0] = [0, 0, 1, 0]   # i and j
    >>> score_maps(q, k)[0, :, 0, 0].tolist()                        # i (x) j = k
    [0.0, 0.0, 0.0, 1.0]
    """
    check_choice(mode, "mode", MODES)
    shapes = attention_shapes(q, k, k, feature_axes=2, legend_feature="d")
    xp = namespace(q, k)
    q5, k5 = flatten_batch(xp, q, shapes.batch), flatten_batch(xp, k, shapes.batch)
    kh = _reference.expand_heads(xp, k5, shapes.group)                  # (B, H, S, 4, d)
    maps = _reference.score_maps(xp, q5, kh, mode)                      # (B, H, M, L, S)
    return xp.reshape(maps, (*shapes.batch, *maps.shape[1:]))


def core_forward(mode):
    """``forward(q, k, v, **options)`` of the core of one mode (``Core.forward``)."""
    return functools.partial(forward, mode=mode)
