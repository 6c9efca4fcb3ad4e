"""Recurrent inference of causal Taylor element-wise attention: a state of O(t D) per head.

Shape legend: ``*batch`` batch dims, ``H`` query heads, ``Hkv`` kv heads, ``D``
channels, ``t`` the Taylor order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..._array import namespace
from ..._validate import check_float_array, check_positive_float
from . import reference
from .taylor import check_order, taylor_coefficients
from ...typing import Array

__all__ = ["ElementwiseState", "elementwise_state", "elementwise_step"]


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


def elementwise_state(batch_shape: tuple[int, ...], H: int, D: int, order: int,
                      dtype: Any = "float64", *, scale: float = 1.0,
                      like: Array | None = None) -> ElementwiseState:
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
    order = check_order(order)
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
    xp = np if like is None else namespace(like)
    try:                                   # "float32", np.float32, np.dtype("float32")
        name = np.dtype(dtype).name
    except TypeError:                      # a non-NumPy dtype object (array-api-strict)
        name = str(dtype).rsplit(".", 1)[-1]
    if name not in ("float32", "float64"):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    dtype = getattr(xp, name)
    shape = batch_shape + (int(H), int(D))
    return ElementwiseState(xp.zeros((2, order + 1) + shape, dtype=dtype),
                            xp.full(shape, xp.inf, dtype=dtype), order, scale, 0)


def elementwise_step(state: ElementwiseState, q_t: Array, k_t: Array,
                     v_t: Array) -> tuple[Array, ElementwiseState]:
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
