"""Array-namespace helpers shared by every backend.

The reference implementations are written once against the Python array API
(via ``array_api_compat``), so the same source runs on NumPy, CuPy and
``array_api_strict`` arrays.  This module holds the few operations the
standard spells awkwardly.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import array_api_compat
import numpy as np

from .typing import Array, Namespace

__all__ = [
    "namespace",
    "is_numpy",
    "is_cupy",
    "sum_to_shape",
    "matrix_transpose",
    "flatten_batch",
    "upcast_half",
    "all_finite",
    "native_byte_order",
    "as_batched_4d",
    "expand_kv_heads",
    "sum_head_groups",
]


def namespace(*arrays: Array | None) -> Namespace:
    """Return the array-API namespace shared by ``arrays`` (``None`` entries ignored)."""
    return array_api_compat.array_namespace(*[a for a in arrays if a is not None])


def is_numpy(x: object) -> bool:
    return array_api_compat.is_numpy_array(x)


def is_cupy(x: object) -> bool:
    return array_api_compat.is_cupy_array(x)


def matrix_transpose(xp: Namespace, x: Array) -> Array:
    """Swap the last two axes: ``(..., m, n) -> (..., n, m)``."""
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else xp.swapaxes(x, -1, -2)


def sum_to_shape(xp: Namespace, g: Array, shape: Sequence[int]) -> Array:
    """Sum ``g`` down to ``shape``, the inverse of broadcasting ``shape`` to ``g.shape``.

    This is the gradient of a broadcast: a parameter of shape ``shape`` that was
    broadcast against a larger array receives the sum over the broadcast axes.
    """
    shape = tuple(shape)
    extra = g.ndim - len(shape)
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return g


def upcast_half(xp: Namespace, *arrays: Array) -> tuple[Array, ...]:
    """Cast float16 arrays to float32 for the arithmetic (accumulate in float32).

    Arrays of any other dtype come back unchanged; ``None`` entries stay ``None``.
    """
    if getattr(xp, "float16", None) is not None and arrays[0].dtype == xp.float16:
        return tuple(None if a is None else xp.astype(a, xp.float32) for a in arrays)
    return arrays


def flatten_batch(xp: Namespace, x: Array, batch: Sequence[int]) -> Array:
    """``(*batch, ...) -> (B, ...)`` with ``B = prod(batch)`` (1 when there are no batch dims)."""
    return xp.reshape(x, (product(batch),) + tuple(x.shape[len(batch):]))


def product(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def to_numpy(x: Array) -> np.ndarray:
    """Copy any supported array to a NumPy array (host)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def all_finite(xp, x) -> bool:
    """Whether every entry of ``x`` is finite, in one reduction (no temporary array).

    The sum of finite entries is finite unless it overflows; an overflow answers
    ``False``, which only sends the call down the exact non-finite path.
    """
    if x is None or product(x.shape) == 0:
        return True
    half = getattr(xp, "float16", None)           # array-api-strict has no float16
    total = xp.sum(x, dtype=xp.float32) if half is not None and x.dtype == half else xp.sum(x)
    return bool(xp.isfinite(total))


def no_nan_or_posinf(xp, x) -> bool:
    """Whether ``x`` (a bias, where ``-inf`` means "masked") holds no NaN and no ``+inf``."""
    if x is None or product(x.shape) == 0:
        return True
    return not bool(xp.any(xp.isnan(x) | (x == xp.inf)))


def native_byte_order(x):
    """``x`` itself, or a copy in native byte order for a byte-swapped NumPy array.

    Kernels compiled for native floats (Numba, BLAS) cannot read big-endian data;
    every other library's arrays come back unchanged.
    """
    if isinstance(x, np.ndarray) and x.dtype.byteorder not in ("=", "|"):
        return x.astype(x.dtype.newbyteorder("="))
    return x


def as_batched_4d(xp, m, batch):
    """Reshape an array broadcastable to ``(*batch, H, L, S)`` into 4-D ``(B|1, H|1, L|1, S|1)``."""
    nb = len(batch)
    m = xp.reshape(m, (1,) * (nb + 3 - m.ndim) + tuple(m.shape))
    lead, tail = tuple(m.shape[:nb]), tuple(m.shape[nb:])
    if all(d == 1 for d in lead):
        return xp.reshape(m, (1,) + tail)
    m = xp.broadcast_to(m, tuple(batch) + tail)
    return xp.reshape(m, (product(batch),) + tail)


def expand_kv_heads(xp: Namespace, x: Array, group: int) -> Array:
    """``(*lead, Hkv, n, F) -> (*lead, Hkv * group, n, F)``: kv head ``g`` serves the query
    heads ``g * group ... (g + 1) * group - 1`` (grouped-query attention)."""
    if group == 1:
        return x
    lead, (hkv, n, f) = tuple(x.shape[:-3]), tuple(x.shape[-3:])
    x = xp.broadcast_to(xp.reshape(x, lead + (hkv, 1, n, f)), lead + (hkv, group, n, f))
    return xp.reshape(x, lead + (hkv * group, n, f))


def sum_head_groups(xp: Namespace, x: Array, group: int) -> Array:
    """Adjoint of :func:`expand_kv_heads`: ``(*lead, H, n, F) -> (*lead, H / group, n, F)``,
    the sum over each group's query heads."""
    if group == 1:
        return x
    lead, (h, n, f) = tuple(x.shape[:-3]), tuple(x.shape[-3:])
    return xp.sum(xp.reshape(x, lead + (h // group, group, n, f)), axis=-3)
