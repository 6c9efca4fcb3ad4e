"""Element-wise attention (Feng, arXiv 2501.05730; ``VARIANTS.md`` section 5): the front end.

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
import numbers
from dataclasses import dataclass, replace
from typing import Any

from ... import backends as _backends
from ..._array import flatten_batch, namespace, native_byte_order, product, to_numpy
from ..._masks import CAUSAL_ALIGNS, causal_offset
from ..._validate import (AttentionShapes, attention_shapes, check_bool_array, check_broadcastable,
                          check_cotangent,
                          check_choice, check_float_array, check_positive_float)
from ..sdpa.api import as_batched_4d
from . import nonfinite as _nonfinite

__all__ = ["ElementwiseOptions", "ElementwiseResiduals", "ElementwiseState", "TaylorError",
           "elementwise_attention", "elementwise_state", "elementwise_step",
           "elementwise_taylor_error", "forward", "backward", "taylor_coefficients", "flops",
           "IMPLEMENTED", "TAYLOR_BLOCK"]

#: Backends with an implementation of this core (modules beside this file).
IMPLEMENTED = ("reference", "numba", "cupy")

#: Query block of the reference causal Taylor scan: keys on the diagonal block are
#: weighted pair by pair (O(L * block * D)), earlier keys through moments.
TAYLOR_BLOCK = 32

_PACKAGE = __name__.rsplit(".", 1)[0]
_SCORES = "(..., H, L, S)"


def taylor_coefficients(order: int) -> list:
    """``[2^n / n! for n in 0..order]``: ``exp(2 x) ~ sum_n (2^n / n!) x^n``."""
    return [2.0 ** n / math.factorial(n) for n in range(order + 1)]


def _check_order(order):
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"order must be None (exact form) or an even integer, got "
                        f"{type(order).__name__}")
    if order % 2:
        raise ValueError(
            f"order must be None (exact form) or an even integer >= 2, got {order}: the truncated "
            "exponential sum_(n<=t) x^n/n! is positive for every x only when t is even, so an odd "
            "order could make the denominator vanish or change sign")
    if order < 2:
        raise ValueError(f"order must be None (exact form) or an even integer >= 2, got {order} "
                         "(order 0 would ignore the queries)")
    return int(order)


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
    order = _check_order(order)
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
    impl = _backends.load_implementation(_PACKAGE, backend)
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
    impl = _backends.load_implementation(_PACKAGE, res.backend)
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


def elementwise_attention(q, k, v, *, order=None, causal=False, causal_align="upper_left",
                          scale=1.0, mask=None, backend="auto"):
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


def _elementwise_vjp(q, k, v, **options):
    o, res = forward(q, k, v, **options)
    return o, lambda do: backward(res, do)


elementwise_attention.__refattn_vjp__ = _elementwise_vjp


# -- recurrent inference --------------------------------------------------------------------------

@dataclass(frozen=True)
class ElementwiseState:
    """Recurrent state of causal Taylor element-wise attention.

    Attributes
    ----------
    moments : array (2, t + 1, *batch, H, D)
        Shifted moments ``sum_j exp(mu - kappa_j^2) kappa_j^n (v_j, 1)`` of the keys so far.
    shift : array (*batch, H, D)
        ``mu``, the smallest ``kappa_j^2`` so far (``+inf`` before the first key).
    order : int
    scale : float
    steps : int
        Tokens consumed.
    """

    moments: Any
    shift: Any
    order: int
    scale: float
    steps: int = 0


def elementwise_state(batch_shape, H, D, order, dtype="float64", *, scale=1.0, like=None):
    """Empty recurrent state for :func:`elementwise_step`: O(t D) numbers per head.

    Parameters
    ----------
    batch_shape : tuple of int
    H, D : int
        Query heads and channels.
    order : even int
    dtype : dtype name or dtype
    scale : float > 0
    like : array, optional
        Allocate with the namespace (and device) of this array; NumPy otherwise.

    Returns
    -------
    ElementwiseState
    """
    order = _check_order(order)
    if order is None:
        raise ValueError("order must be an even integer: the exact form has no recurrent state")
    if isinstance(batch_shape, numbers.Integral) and not isinstance(batch_shape, bool):
        batch_shape = (batch_shape,)              # elementwise_state(2, H, D, t): one batch dim
    if not isinstance(batch_shape, (tuple, list)):
        raise TypeError(f"batch_shape must be a tuple of non-negative ints (or one int), got "
                        f"{type(batch_shape).__name__}")
    batch_shape = tuple(batch_shape)
    for name, n in (("H", H), ("D", D)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0
           for n in batch_shape):
        raise ValueError(f"batch_shape must be a tuple of non-negative ints, got {batch_shape}")
    scale = check_positive_float(scale, "scale")
    if like is None:
        import numpy as xp
    else:
        xp = namespace(like)
    try:                                   # "float32", np.float32, np.dtype("float32")
        import numpy as np

        name = np.dtype(dtype).name
    except TypeError:                      # a non-NumPy dtype object (array-api-strict)
        name = str(dtype).rsplit(".", 1)[-1]
    if name not in ("float32", "float64"):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    dtype = getattr(xp, name)
    shape = batch_shape + (int(H), int(D))
    return ElementwiseState(xp.zeros((2, order + 1) + shape, dtype=dtype),
                            xp.full(shape, xp.inf, dtype=dtype), order, scale, 0)


def elementwise_step(state: ElementwiseState, q_t, k_t, v_t):
    """One token of causal Taylor element-wise attention: ``o_t, state = step(state, q, k, v)``.

    Adds the key ``k_t`` (with value ``v_t``) to the moments, then reads the
    output of query ``q_t``: O(t D) per head.  Stepping through a sequence
    reproduces ``elementwise_attention(..., order=t, causal=True)`` (L = S).

    Parameters
    ----------
    state : ElementwiseState
    q_t : array (*batch, H, D)
    k_t, v_t : array (*batch, Hkv, D)

    Returns
    -------
    o_t : array (*batch, H, D)
    state : ElementwiseState
        A new state (the input one is not modified).

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.5 * rng.standard_normal((2, 6, 4)) for _ in range(3))   # (H, L, D)
    >>> state = refattn.elementwise_state((), 2, 4, order=4)
    >>> outs = []
    >>> for t in range(6):
    ...     o_t, state = refattn.elementwise_step(state, q[:, t], k[:, t], v[:, t])
    ...     outs.append(o_t)
    >>> full = refattn.elementwise_attention(q, k, v, order=4, causal=True)
    >>> bool(np.allclose(np.stack(outs, axis=1), full, rtol=1e-12, atol=1e-12))
    True
    """
    from . import reference

    if not isinstance(state, ElementwiseState):
        raise TypeError(f"state must come from elementwise_state(), got {type(state).__name__}")
    shape = tuple(state.shift.shape)                      # (*batch, H, D)
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_float_array(x, name)
        if str(x.dtype) != str(state.shift.dtype):
            raise TypeError(f"{name} has dtype {x.dtype}, the state has {state.shift.dtype}")
    if tuple(q_t.shape) != shape:
        raise ValueError(f"q_t must have shape (*batch, H, D) = {shape}, got {tuple(q_t.shape)}")
    H = shape[-2]
    if (k_t.ndim != len(shape) or tuple(k_t.shape[:-2]) != shape[:-2] or k_t.shape[-1] != shape[-1]
            or H % max(k_t.shape[-2], 1) or k_t.shape[-2] == 0):
        raise ValueError(f"k_t must have shape (*batch, Hkv, D) with Hkv dividing H = {H} and "
                         f"(*batch, D) = {shape[:-2] + shape[-1:]}, got {tuple(k_t.shape)}")
    if tuple(v_t.shape) != tuple(k_t.shape):
        raise ValueError(f"v_t must have the shape of k_t {tuple(k_t.shape)}, got "
                         f"{tuple(v_t.shape)}")
    xp = namespace(q_t, k_t, v_t, state.shift)
    group = H // k_t.shape[-2]
    if group > 1:                                         # (*batch, Hkv, D) -> (*batch, H, D)
        expand = lambda x: xp.reshape(                    # noqa: E731
            xp.broadcast_to(x[..., None, :], x.shape[:-1] + (group, x.shape[-1])), shape)
        k_t, v_t = expand(k_t), expand(v_t)
    root = math.sqrt(state.scale)
    psi, kappa = q_t[..., None, :] * root, k_t[..., None, :] * root   # (*batch, H, 1, D)
    moments = (state.moments[0], state.moments[1], state.shift)
    A, Bm, mu = reference.state_update(xp, moments, kappa, v_t[..., None, :], kappa * kappa,
                                       state.order)
    num, den = reference.state_read(xp, (A, Bm, mu), psi, mu[..., None, :],
                                    taylor_coefficients(state.order))
    o = (num / den)[..., 0, :]              # den >= min T_t > 0: the step just added a key
    return o, replace(state, moments=xp.stack([A, Bm], axis=0), shift=mu, steps=state.steps + 1)


# -- accuracy -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaylorError:
    """Error of the Taylor form against the exact form on given inputs.

    Attributes
    ----------
    max_abs : float
        ``max |o_taylor - o_exact|``.
    max_rel : float
        ``max_abs / max |o_exact|``.
    max_abs_x : float
        Largest ``|x| = |2 s q_ic k_jc|`` over the pairs that were kept (the
        quantity that governs the truncation error).
    order : int
    """

    max_abs: float
    max_rel: float
    max_abs_x: float
    order: int


def elementwise_taylor_error(q, k, v, order, *, causal=False, causal_align="upper_left", scale=1.0,
                             mask=None):
    """How far the Taylor form of ``order`` is from the exact form on these inputs.

    Both forms are computed in float64 with the reference backend (O(L S D) for
    the exact one).  Returns a :class:`TaylorError`.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.4 * rng.standard_normal((2, 32, 8)) for _ in range(3))
    >>> errors = [refattn.elementwise_taylor_error(q, k, v, t).max_rel for t in (2, 4, 6)]
    >>> errors == sorted(errors, reverse=True)
    True
    """
    import numpy as np

    if _check_order(order) is None:
        raise ValueError("order must be an even integer (the Taylor form to assess)")
    q64, k64, v64 = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q, k, v))
    options = dict(causal=causal, causal_align=causal_align, scale=scale,
                   mask=None if mask is None else np.asarray(to_numpy(mask)), backend="reference")
    exact, res = forward(q64, k64, v64, order=None, **options)
    taylor = elementwise_attention(q64, k64, v64, order=order, **options)
    diff = float(np.max(np.abs(taylor - exact), initial=0.0))
    top = float(np.max(np.abs(exact), initial=0.0))
    # largest |2 psi_i kappa_j| over kept pairs, per channel: (B, H, D, L, 1) x (B, H, D, 1, S)
    shapes, opts = res.shapes, res.options
    group = shapes.group
    kh = np.repeat(res.k, group, axis=1)                       # (B, H, S, D)
    psi_c, kappa_c = np.swapaxes(res.q, -1, -2), np.swapaxes(kh, -1, -2)  # (B, H, D, L|S)
    x = 2.0 * np.abs(psi_c[..., :, None] * kappa_c[..., None, :])            # (B, H, D, L, S)
    keep = np.ones((shapes.q_len, shapes.kv_len), dtype=bool)
    if opts.causal_offset is not None:
        keep &= np.arange(shapes.kv_len)[None, :] <= np.arange(shapes.q_len)[:, None] + \
            opts.causal_offset
    keep = keep if opts.mask is None else keep & opts.mask     # (B|1, H|1, L|1, S|1) or (L, S)
    keep = keep[..., None, :, :] if keep.ndim == 4 else keep   # channel axis for (B, H, D, L, S)
    max_x = float(np.max(np.where(keep, x, 0.0), initial=0.0))
    return TaylorError(diff, diff / top if top > 0 else 0.0, max_x, int(order))


def flops(batch, heads, q_len, kv_len, head_dim, value_dim, causal=False, order=None, **_):
    """Forward FLOPs: exact ~6 per (query, key, channel); Taylor ~4 t per (token, channel)."""
    n = max(product(batch), 1) * heads
    if order is None:
        pairs = q_len * kv_len
        if causal:
            pairs = sum(min(kv_len, max(0, i + 1)) for i in range(q_len))
        return 6.0 * n * pairs * head_dim
    # keys: exp + t powers + 2 t multiply-adds; queries: 2 Horner chains of t steps + divide
    return float(n * head_dim * ((3 * order + 2) * kv_len + (4 * order + 2) * q_len))
