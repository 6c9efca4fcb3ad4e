"""The non-finite policy of element-wise attention: compute on finite numbers, then poison.

The Taylor form sums moments of the keys, in which a masked key is marked by an
infinite shift and a plain ``0 * NaN`` would cross every mask; so, on every backend,
NaN/Inf inputs are replaced by 0 before the kernels run and every output entry that
depends on one is set to NaN afterwards.  Channels are independent; per channel
``c`` and kept pair ``(i, j)`` (mask and causal rule):

* ``o_ic`` depends on ``q_ic`` and the kept ``k_jc, v_jc`` (a row with no kept key
  is 0 and depends on nothing);
* ``dq_ic`` on those and ``do_ic``; ``dk_jc`` on everything ``dq_ic`` depends on, for
  every query ``i`` keeping ``j``; ``dv_jc`` likewise, without the values (the weights
  do not depend on them).

Shape legend: ``B`` batch, ``H`` query heads, ``Hkv`` kv heads, ``L`` queries,
``S`` keys, ``D`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._array import all_finite
from ..._masks import keep_mask
from ..sdpa.reference import expand_kv_heads, reduce_kv_heads

__all__ = ["NonFinite", "find", "finite", "poison_output", "poison_gradients",
           "cotangent_flags"]


@dataclass
class NonFinite:
    """Where the inputs of one call are not finite (float 0/1 arrays, for matmuls).

    ``q (B, H, L, D)``; ``k, v`` expanded to the query heads ``(B, H, S, D)``;
    ``keep (B, H, L, S)``; ``rows (B, H, L, 1)``: 1 for a row that keeps a key.
    """

    q: Any
    k: Any
    v: Any
    keep: Any
    rows: Any


def _flags(xp, x, like):
    ones, zeros = xp.ones_like(like), xp.zeros_like(like)
    return xp.where(xp.isfinite(x), zeros, ones)


def find(xp, q, k, v, opts, *, always=False):
    """A :class:`NonFinite` for batch-flattened ``q, k, v``; None when all are finite
    (unless ``always``: a non-finite cotangent needs the kept pairs of finite inputs)."""
    if not always and all(all_finite(xp, x) for x in (q, k, v)):
        return None
    B, H, L, _ = q.shape
    S = k.shape[2]
    group = H // max(k.shape[1], 1)
    kept = keep_mask(xp, opts.mask, opts.causal_offset, L, S)
    ones = xp.ones((B, H, L, S), dtype=q.dtype)
    keep = ones if kept is None else xp.where(kept, ones, xp.zeros_like(ones))  # (B, H, L, S)
    rows = xp.astype(xp.any(keep > 0, axis=-1, keepdims=True), q.dtype)        # (B, H, L, 1)
    return NonFinite(_flags(xp, q, q), expand_kv_heads(xp, _flags(xp, k, k), group),
                     expand_kv_heads(xp, _flags(xp, v, v), group), keep, rows)


def finite(xp, x):
    """``x`` with NaN and +-Inf replaced by 0 (what the kernels see)."""
    return xp.where(xp.isfinite(x), x, xp.zeros_like(x))


def cotangent_flags(xp, do):
    """Float 0/1 flags of the non-finite entries of ``do``, or None when it is finite."""
    return None if all_finite(xp, do) else _flags(xp, do, do)


def _nan_where(xp, flags, x):
    return xp.where(flags > 0, xp.asarray(xp.nan, dtype=x.dtype), x)


def _weights_and_values(nf):
    """``(F, V)`` ``(B, H, L, D)``: rows whose weights / kept values see a non-finite entry."""
    weights = nf.q + nf.keep @ nf.k
    values = nf.keep @ nf.v
    return weights, values


def poison_output(xp, nf, o):
    weights, values = _weights_and_values(nf)
    return _nan_where(xp, nf.rows * (weights + values), o)


def poison_gradients(xp, nf, do_flags, dq, dk, dv):
    """NaN into the gradients that depend on a non-finite input or cotangent entry."""
    weights, values = _weights_and_values(nf)
    bdo = 0.0 if do_flags is None else do_flags
    row = nf.rows * (weights + values + bdo)                        # (B, H, L, D)
    row_without_values = nf.rows * (weights + bdo)
    keep_t = xp.permute_dims(nf.keep, (0, 1, 3, 2))                  # (B, H, S, L)
    kv_heads = dk.shape[1]
    dk_flags = reduce_kv_heads(xp, keep_t @ row, kv_heads)           # (B, Hkv, S, D)
    dv_flags = reduce_kv_heads(xp, keep_t @ row_without_values, kv_heads)
    return _nan_where(xp, row, dq), _nan_where(xp, dk_flags, dk), _nan_where(xp, dv_flags, dv)
