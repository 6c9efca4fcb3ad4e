"""Empty-row policies: what a query row with no kept key gives (``docs/conventions.md``).

A row ``i`` is *empty* when no key survives the mask, the causal rule, the window
and the ``-inf`` entries of the bias.  refattn's own convention (``"zero"``) gives
it ``o_i = 0`` and no gradient.  Frameworks that fill masked scores differ:

``"uniform"``
    ``scores.masked_fill(~keep, finfo.min)``: the row's scores are all equal, its
    softmax is uniform over ALL ``S`` keys, ``o_i = (1/S) sum_j v_j`` (with dropout
    ``o_i = sum_j w_ij v_j``, ``w_ij = D_ij / ((1 - p) S)``).  Backward: the
    filled scores are constants, so no gradient reaches ``q``, ``k`` or a bias
    through the row; ``dv_j += sum_i w_ij do_i`` over the empty rows ``i``.
``"nan"``
    ``scores.masked_fill(~keep, -inf)``: the softmax of ``-inf`` everywhere is
    NaN, so ``o_i`` is NaN; ``dv_j = sum_i P_ij do_i`` is NaN for every key ``j``
    of the (batch, key/value head) the row reads; ``masked_fill``'s pullback zeroes
    the score gradient at every masked pair, so ``q``, ``k`` and a bias get
    nothing from the row (exactly PyTorch's autograd on that expression).

The cores run their kernels unchanged (refattn's convention) and this module
post-processes: :func:`fill_output` after the forward kernel,
:func:`kernel_cotangent` before the backward kernel (an empty row's cotangent
does not reach the kernel) and :func:`value_gradient` after it.  With no key at
all (``S = 0``) every policy gives 0, the empty sum (as the frameworks do).

Shape legend: ``B`` flattened batch, ``H`` query heads, ``Hkv`` key/value heads,
``L`` queries, ``S`` keys, ``F`` value features of a row (``Ev``, or ``4 dv`` for
the quaternion cores, whose four components share the one row).
"""

from __future__ import annotations

import numpy as np

from ._array import expand_kv_heads, namespace, sum_head_groups

__all__ = ["EMPTY_ROWS", "check_empty_rows", "empty_rows", "fill_output", "kernel_cotangent",
           "value_gradient"]

#: The empty-row policies (core option ``empty_rows``).
EMPTY_ROWS = ("zero", "uniform", "nan")


def check_empty_rows(policy) -> str:
    """The validated policy (``ValueError`` naming the choices otherwise)."""
    if not isinstance(policy, str) or policy not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROWS} (what a query row with no "
                         f"kept key gives: 0, the finfo.min fill's mean of the values, the "
                         f"-inf fill's NaN), got {policy!r}")
    return policy


def _band(q_len, kv_len, causal_offset, window):
    """First and last key ``(a_i, b_i)`` of each row under the causal rule and the window."""
    i = np.arange(q_len)
    a = np.zeros(q_len, dtype=np.int64)
    b = np.full(q_len, kv_len - 1, dtype=np.int64)
    if causal_offset is not None:
        b = np.minimum(b, i + causal_offset)
    if window is not None:
        lo, hi = window
        if lo is not None:
            a = np.maximum(a, i + lo)
        if hi is not None:
            b = np.minimum(b, i + hi)
    return a, b


def empty_rows(xp, opts, q_len: int, kv_len: int, device=None):
    """Boolean ``(B|1, H|1, L)``: the rows with no kept key, or None when there is none.

    ``opts`` is an :class:`~refattn.cores.sdpa.api.SDPAOptions` (``mask``,
    ``causal_offset``, ``window``, ``bias``).  The causal rule and the window are a
    band ``a_i <= j <= b_i`` computed per row; a mask (and a bias's ``-inf`` entries)
    is counted inside the band by prefix sums along the keys, so nothing larger than
    the mask (or bias) is built.  None also when ``S = 0`` (every policy gives 0).
    """
    if kv_len == 0 or q_len == 0:
        return None
    a, b = _band(q_len, kv_len, opts.causal_offset, opts.window)
    kept = None if opts.mask is None else opts.mask
    if opts.bias is not None:
        finite = opts.bias != -xp.inf
        kept = finite if kept is None else xp.logical_and(kept, finite)
    if kept is None:
        rows = a > b                                                   # (L,)
        if not rows.any():
            return None
        return xp.asarray(rows.reshape(1, 1, q_len), device=device)
    kept = xp.broadcast_to(kept, (*kept.shape[:-1], kv_len))           # (B|1, H|1, L|1, S)
    counts = xp.cumulative_sum(xp.astype(kept, xp.int64), axis=-1, include_initial=True)
    lead, rows_of_mask = tuple(counts.shape[:-2]), counts.shape[-2]     # counts (.., L|1, S+1)
    lo = np.clip(a, 0, kv_len)
    hi = np.clip(b + 1, 0, kv_len)
    if rows_of_mask == 1:
        flat = xp.reshape(counts, (*lead, kv_len + 1))
        stride = np.zeros(q_len, dtype=np.int64)
    else:
        flat = xp.reshape(counts, (*lead, q_len * (kv_len + 1)))
        stride = np.arange(q_len) * (kv_len + 1)
    take = (lambda idx: xp.take(flat, xp.asarray(idx, device=device), axis=-1))
    inside = take(stride + hi) - take(stride + lo)                      # (B|1, H|1, L)
    rows = xp.logical_or(inside == 0, xp.asarray(a > b, device=device))
    if not bool(xp.any(rows)):
        return None
    return rows


def _uniform_weights(xp, opts, shape, dtype):
    """``w (B, H, L, S)`` of a uniform row with dropout: ``D_ij / ((1 - p) S)``."""
    S = shape[-1]
    keep = xp.broadcast_to(opts.dropout_mask, shape)
    return xp.astype(keep, dtype) * (opts.dropout_scale / S)


def fill_output(policy, o, v, rows, opts):
    """The output ``o (B, H, L, F)`` with its empty rows set by ``policy``.

    ``v (B, Hkv, S, F)``; ``rows`` from :func:`empty_rows`.  ``"uniform"``:
    ``o_i = mean_j v_j``, or ``sum_j w_ij v_j`` under dropout; ``"nan"``: NaN.
    """
    if policy == "zero" or rows is None:
        return o
    xp = namespace(o, v)
    B, H, L, _ = o.shape
    where = xp.broadcast_to(rows, (B, H, L))[..., None]                # (B, H, L, 1)
    if policy == "nan":
        return xp.where(where, xp.asarray(xp.nan, dtype=o.dtype), o)
    vh = expand_kv_heads(xp, xp.astype(v, o.dtype), H // max(v.shape[1], 1))  # (B, H, S, F)
    if opts.dropout_mask is None:
        fill = xp.mean(vh, axis=-2, keepdims=True)                     # (B, H, 1, F)
    else:
        w = _uniform_weights(xp, opts, (B, H, L, vh.shape[-2]), o.dtype)
        fill = w @ vh                                                  # (B, H, L, F)
    return xp.where(where, fill, o)


def kernel_cotangent(policy, do, rows):
    """``do (B, H, L, F)`` with the empty rows zeroed (for ``"uniform"`` and ``"nan"``).

    The kernel's convention already gives an empty row no gradient; zeroing its
    cotangent also keeps a non-finite cotangent there (NaN ``o`` makes NaN losses)
    out of the kernel, whose ``0 * NaN`` would poison ``dq`` and ``dk``.
    """
    if policy == "zero" or rows is None:
        return do
    xp = namespace(do)
    where = xp.broadcast_to(rows, tuple(do.shape[:3]))[..., None]
    return xp.where(where, xp.zeros_like(do), do)


def value_gradient(policy, dv, do, rows, opts):
    """``dv (B, Hkv, S, F)`` of the kernel plus what the empty rows add under ``policy``.

    ``"uniform"``: ``dv_j += sum_{h in group, i empty} w_hij do_hi`` (``w = 1/S``
    without dropout).  ``"nan"``: NaN for every key of a (batch, kv head) one of
    whose query heads has an empty row.
    """
    if policy == "zero" or rows is None:
        return dv
    xp = namespace(dv, do)
    B, Hkv, S, F = dv.shape
    H, L = do.shape[1], do.shape[2]
    group = H // Hkv
    rows = xp.broadcast_to(rows, (B, H, L))
    if policy == "nan":
        poisoned = xp.any(xp.reshape(rows, (B, Hkv, group * L)), axis=-1)   # (B, Hkv)
        return xp.where(poisoned[..., None, None], xp.asarray(xp.nan, dtype=dv.dtype), dv)
    do = xp.astype(do, dv.dtype)
    de = xp.where(rows[..., None], do, xp.zeros_like(do))             # (B, H, L, F)
    if opts.dropout_mask is None:
        extra = xp.sum(de, axis=-2, keepdims=True) / S                 # (B, H, 1, F)
        extra = xp.broadcast_to(extra, (B, H, S, F))
    else:
        w = _uniform_weights(xp, opts, (B, H, L, S), dv.dtype)
        extra = xp.permute_dims(w, (0, 1, 3, 2)) @ de                   # (B, H, S, F)
    extra = sum_head_groups(xp, extra, group)                          # (B, Hkv, S, F)
    return dv + extra
