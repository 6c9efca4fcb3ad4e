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
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat

from ... import _empty_rows
from ... import backends as _backends
from ..._array import flatten_batch, namespace, native_byte_order, sum_to_shape
from ..._validate import (AttentionShapes, attention_shapes, check_choice, check_cotangent,
                          reject_framework_keywords)
from ..._vjp import attach_vjp
from ..sdpa import api as _sdpa_api
from . import reference as _reference
from .algebra import MODES, n_maps, score_terms
from .reduction import SDPAReduction
from ...typing import Array, Backend, CausalAlign

__all__ = ["quaternion_attention", "forward", "backward", "score_maps", "pair_costs", "PairCosts",
           "flops", "IMPLEMENTED", "MODES", "implementation", "core_forward", "prepare"]

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

    @property
    def output(self) -> tuple:
        s = self.shapes
        return (*s.batch, s.heads, s.q_len, 4, s.value_dim)


def _flat_components(xp, x):
    return xp.reshape(x, (*x.shape[:-2], 4 * x.shape[-1]))        # (..., 4f)


def prepare(q, k, v, mode, mask=None, bias=None, causal=False, causal_align="upper_left",
            scale=None, empty_rows="zero"):
    """Validate the arguments of :func:`quaternion_attention`: ``(xp, shapes, SDPAOptions)``."""
    check_choice(mode, "mode", MODES)
    shapes = attention_shapes(q, k, v, feature_axes=2, legend_feature="d")
    xp = namespace(q, k, v)
    scale = _sdpa_api.check_scale(scale, 4 * shapes.head_dim, legend="4 d")
    # SDPA's own validation on the flattened problem: same errors, same mask semantics.
    _, _, options = _sdpa_api.prepare(
        *(_flat_components(xp, x) for x in (q, k, v)), mask, bias, causal, causal_align, scale,
        empty_rows=empty_rows)
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
            return SDPAReduction(_sdpa_api.implementation(backend))


@reject_framework_keywords
def forward(q, k, v, *, mode="shared", mask=None, bias=None, causal=False,
            causal_align="upper_left", scale=None, backend="auto", empty_rows="zero"):
    """Quaternion attention forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`quaternion_attention`.
    """
    q, k, v, bias = (None if x is None else native_byte_order(x) for x in (q, k, v, bias))
    xp, shapes, options = prepare(q, k, v, mode, mask, bias, causal, causal_align, scale,
                                  empty_rows)
    backend = _backends.resolve(backend, IMPLEMENTED, q, core=f"quaternion attention ({mode})")
    backend = _backends.route(backend, xp, (q, k, v), options.bias)
    q5, k5, v5 = (flatten_batch(xp, x, shapes.batch) for x in (q, k, v))   # (B, H|Hkv, L|S, 4, d|dv)
    o5, saved = implementation(backend).forward(q5, k5, v5, options, mode)
    # The empty-row policy on the rows' 4 dv features (every component shares the row).
    rows = _rows(xp, options, q5, k5)
    o5 = xp.reshape(_empty_rows.fill_output(options.empty_rows, _flat_rows(xp, o5),
                                            _flat_rows(xp, v5), rows, options), tuple(o5.shape))
    res = QuaternionResiduals(mode, backend, saved, options, shapes, q.dtype,
                              None if bias is None else tuple(bias.shape), rows)
    return xp.reshape(o5, res.output), res


def _flat_rows(xp, x):
    """``(B, H, T, 4, f) -> (B, H, T, 4f)``."""
    return xp.reshape(x, (*x.shape[:3], 4 * x.shape[-1]))


def backward(res: QuaternionResiduals, do):
    """Backward pass: ``(dq, dk, dv)``, plus ``dbias`` (summed to its shape) with a float bias."""
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
    dq, dk, dv, dscores = impl.backward(res.saved, do5, res.options, res.mode)
    dv = xp.reshape(_empty_rows.value_gradient(policy, _flat_rows(xp, dv), do_flat, rows,
                                               res.options), tuple(dv.shape))
    batch = shapes.batch
    grads = tuple(xp.reshape(g, (*batch, *g.shape[1:])) for g in (dq, dk, dv))
    if res.bias_shape is not None:
        dscores = xp.reshape(dscores, shapes.scores)                   # (..., H, L, S)
        grads = grads + (sum_to_shape(xp, dscores, res.bias_shape),)
    return grads


@reject_framework_keywords
def quaternion_attention(q: Array, k: Array, v: Array, *,
                         mode: Literal["shared", "hamilton"] = "shared", mask: Array | None = None,
                         bias: Array | None = None, causal: bool = False,
                         causal_align: CausalAlign = "upper_left", scale: float | None = None,
                         backend: Backend = "auto",
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
    backend : {"auto", "reference", "numba", "cupy"}
        ``"reference"`` evaluates the explicit formulas; the others run SDPA's kernels
        through an exact reduction (available wherever :func:`refattn.sdpa` has them).
    empty_rows : {"zero", "uniform", "nan"}
        What a query row with no kept key gives, as for :func:`refattn.sdpa`:
        ``"uniform"`` (the official shared-score code's ``finfo.min`` fill) makes every
        component of the row the mean of that component of ``v`` over all keys.

    Returns
    -------
    o : array (..., H, L, 4, dv)

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
    """
    return forward(q, k, v, mode=mode, mask=mask, bias=bias, causal=causal,
                   causal_align=causal_align, scale=scale, backend=backend,
                   empty_rows=empty_rows)[0]


attach_vjp(quaternion_attention, forward, backward)


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
