"""Argument checks of the training study's layers: a bad argument names itself and its shape."""

from __future__ import annotations

import numpy as np

__all__ = ["check_float", "check_features", "check_vector", "check_matrix", "check_int_array"]


def check_float(x, name):
    """Raise ``TypeError`` unless ``x`` is a NumPy float32/float64 array."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def check_features(x, name, ndim_min=1):
    """Check a float array ``(..., d)`` with at least ``ndim_min`` axes; return ``d``."""
    check_float(x, name)
    if x.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} axes (..., d), got shape "
                         f"{x.shape}")
    return x.shape[-1]


def check_vector(x, name, d):
    check_float(x, name)
    if x.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},), got {x.shape}")


def check_matrix(x, name, rows, cols=None):
    """Check ``x (rows, cols)`` (``cols=None``: any); return ``cols``."""
    check_float(x, name)
    if x.ndim != 2 or x.shape[0] != rows or (cols is not None and x.shape[1] != cols):
        want = f"({rows}, {'n' if cols is None else cols})"
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    return x.shape[1]


def check_int_array(x, name, shape, upper):
    """Check an integer array of ``shape`` with entries in ``[0, upper)``."""
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be a NumPy integer array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    if x.size and (x.min() < 0 or x.max() >= upper):
        raise ValueError(f"{name} must have entries in [0, {upper}), got range "
                         f"[{x.min()}, {x.max()}]")
