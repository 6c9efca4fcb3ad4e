"""Conventions for a query row that keeps no key, and how verify detects and accepts them.

A query row whose keys are all masked out (by ``mask`` and causality) has no
softmax to take.  Frameworks disagree on its output:

``"zero"``
    refattn, PyTorch's SDPA, FlashAttention: the row is 0 (and sends no gradient).
``"uniform"``
    an additive mask of ``finfo(dtype).min`` (Hugging Face, JAX): every score of
    the row is the same, so the row attends uniformly: the mean of **all**
    values, ``o_i = (1/S) sum_j v_j`` (of the query head's key/value head; a
    preconditioned core then scales that row by its ``c_i``).
``"nan"``
    a mask of ``-inf``: ``softmax(-inf, ..., -inf) = 0/0``, the row is NaN.

:func:`detect` names the convention a failing candidate follows; verify's
``empty_rows=`` keyword compares those rows under it (:func:`expected_out`,
:func:`zero_rows`, :func:`nan_region`).  The expected values are recomputed here
from the problem's own inputs (:mod:`refattn.verify.recompute`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The cores' policies (refattn._empty_rows): verify(..., empty_rows=) takes the same names.
from .._empty_rows import EMPTY_ROWS
from .recompute import CoreCall, Recompute, empty_query_rows, expand_kv_heads, head_axis

__all__ = ["CONVENTIONS", "EMPTY_ROWS", "check_policy", "detect", "expected_out", "fill",
           "nan_region", "zero_rows"]


#: How the report names each convention.
CONVENTIONS = {
    "zero": "refattn's convention for empty rows (a query row that keeps no key is 0)",
    "uniform": "the finfo.min convention for empty rows (a query row that keeps no key "
               "attends uniformly to all keys: the mean of the values)",
    "nan": "the -inf/NaN convention for empty rows (a query row that keeps no key is NaN)",
}


def check_policy(empty_rows: str) -> str:
    """Validate ``empty_rows=``."""
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROWS}, got {empty_rows!r}")
    return empty_rows


def fill(convention: str, layout: str) -> Callable[[CoreCall], CoreCall]:
    """A core change: the rows with no key get ``convention``'s value instead of 0."""

    def change(base: CoreCall) -> CoreCall:
        def call(q, k, v, options):
            o = np.array(base(q, k, v, options), dtype=np.float64)
            empty = empty_query_rows(q, k, options, layout)          # (*batch, H, L)
            if empty is None or convention == "zero":
                return o
            if convention == "nan":
                o[empty] = np.nan
                return o
            axis = head_axis(layout)
            mean = expand_kv_heads(np.asarray(v, np.float64), q.shape[axis], layout)
            mean = mean.mean(axis=axis + 1, keepdims=True)           # (*batch, H, 1, F)
            o = np.where(empty.reshape(empty.shape + (1,) * (-axis - 2)), mean, o)
            return o
        return call

    return change


def expected_out(recompute: Recompute, convention: str) -> np.ndarray:
    """The float64 output of the problem under ``convention``."""
    return recompute.out(fill(convention, recompute.layout))


def zero_rows(cotangent: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``cotangent`` with the output rows ``rows`` set to 0.

    The gradients then do not depend on what a convention puts in those rows
    (``0 x`` anything finite is 0): a finfo.min candidate's gradients equal the
    reference's exactly, and a -inf candidate's differ only by NaN.
    """
    if rows is None:
        return cotangent
    out = np.array(cotangent, dtype=np.float64)
    out[rows] = 0.0
    return out


def nan_region(rows: np.ndarray | None, batch: tuple, shape: tuple,
               batched: bool) -> np.ndarray:
    """Where a gradient may be NaN under the -inf/NaN convention (broadcastable to ``shape``).

    NaN of an empty row reaches, through the backward pass, the gradients of its
    sequence (its batch element): every entry of a per-sequence gradient
    (``batched``: ``dq``, ``dxq``, ...) whose batch index holds an empty row, and
    any entry of a gradient summed over the batch (the parameters').
    """
    if rows is None:
        return np.zeros((), bool)
    nb = len(batch)
    if not batched or nb == 0 or tuple(shape[:nb]) != tuple(batch):
        return np.ones((), bool)
    per_batch = rows.reshape(*batch, -1).any(axis=-1)               # (*batch)
    return per_batch.reshape(per_batch.shape + (1,) * (len(shape) - nb))


def detect(recompute: Recompute, got: np.ndarray, allowed: float, scale: float,
           rows: np.ndarray | None = None) -> str | None:
    """The convention ``got`` follows on its empty rows, when it matches the reference elsewhere.

    ``allowed`` is the relative error the output check accepts and ``scale`` the
    output's scale (``allowed x scale`` is the accepted absolute error); ``rows``
    the empty output rows (recomputed when not given).  Returns ``"nan"`` (every
    empty row NaN), ``"uniform"`` or ``"zero"`` (that convention's values within
    ``allowed``), or None: no empty rows, other rows wrong too, or no convention fits.
    """
    rows = recompute.empty_rows() if rows is None else rows
    if rows is None:
        return None
    got = np.asarray(got, np.float64)
    rows = np.broadcast_to(rows.reshape(rows.shape + (1,) * (got.ndim - rows.ndim)), got.shape)
    rest, empty = got[~rows], got[rows]
    reference = expected_out(recompute, "zero")
    with np.errstate(invalid="ignore"):
        if rest.size and not (np.all(np.isfinite(rest))
                              and np.max(np.abs(rest - reference[~rows])) <= allowed * scale):
            return None
        if np.isnan(empty).all():
            return "nan"
        if not np.all(np.isfinite(empty)):
            return None
        for convention in ("zero", "uniform"):
            values = reference[rows] if convention == "zero" else \
                expected_out(recompute, convention)[rows]
            bound = allowed * max(scale, float(np.max(np.abs(values), initial=0.0)))
            if np.max(np.abs(empty - values), initial=0.0) <= bound:
                return convention
    return None
