"""The cotangent a sharded pullback takes: validated, a dask array chunked like the output."""

from __future__ import annotations

from .._validate import check_cotangent
from ._plan import as_dask

__all__ = ["as_cotangent"]


def as_cotangent(do, out):
    """``do`` checked against the output ``out`` (shape, float dtype), rechunked like it.

    A NumPy/CuPy cotangent is wrapped; the dtype is cast to the output's, as the
    single-machine pullbacks do.
    """
    check_cotangent(do, tuple(out.shape))
    do = as_dask(do, "cotangent")
    if do.dtype != out.dtype:
        do = do.astype(out.dtype)
    return do.rechunk(out.chunks)
