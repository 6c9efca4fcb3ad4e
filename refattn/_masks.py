"""Causal alignment and boolean masks, defined once for every core.

Convention (``docs/variants.md`` section 0): a boolean ``mask`` is ``True`` where a
query may attend to a key.  ``causal=True`` keeps key ``j`` for query ``i``
when ``j <= i + offset``, with ``offset = 0`` for ``"upper_left"`` (PyTorch,
JAX) and ``offset = S - L`` for ``"lower_right"`` (FlashAttention).
"""

from __future__ import annotations

import numpy as np

CAUSAL_ALIGNS = ("upper_left", "lower_right")

__all__ = ["CAUSAL_ALIGNS", "causal_offset", "causal_keep", "keep_mask", "causal_pairs",
           "window_keep", "window_bounds", "alibi_distance", "score_indices",
           "from_torch_key_padding_mask", "from_torch_attn_mask"]


def causal_offset(causal_align: str, q_len: int, kv_len: int) -> int:
    """Diagonal offset of the causal mask: key ``j`` is kept for query ``i`` iff ``j <= i + offset``."""
    return 0 if causal_align == "upper_left" else kv_len - q_len


def causal_pairs(q_len: int, kv_len: int, offset: int = 0) -> int:
    """Number of kept (query, key) pairs under the causal rule ``j <= i + offset``."""
    return sum(min(kv_len, max(0, i + 1 + offset)) for i in range(q_len))


def causal_keep(xp, q_len: int, kv_len: int, offset: int, device=None):
    """Boolean ``(L, S)`` causal keep-mask."""
    i = xp.reshape(xp.arange(q_len, device=device), (q_len, 1))
    j = xp.reshape(xp.arange(kv_len, device=device), (1, kv_len))
    return j <= i + offset


def window_keep(xp, q_len: int, kv_len: int, window, device=None):
    """Boolean ``(L, S)`` band: key ``j`` is kept for query ``i`` iff ``lo <= j - i <= hi``.

    ``window = (lo, hi)``, either side ``None`` for unbounded (:func:`window_bounds`).
    """
    lo, hi = window
    i = xp.reshape(xp.arange(q_len, device=device), (q_len, 1))
    j = xp.reshape(xp.arange(kv_len, device=device), (1, kv_len))
    keep = xp.ones((q_len, kv_len), dtype=xp.bool, device=device)
    if lo is not None:
        keep = keep & (j - i >= lo)
    if hi is not None:
        keep = keep & (j - i <= hi)
    return keep


def window_bounds(window, offset: int):
    """``(lo, hi)`` of :func:`window_keep` for a FlashAttention ``window = (left, right)``.

    Key ``j`` is kept for query ``i`` iff ``i + offset - left <= j <= i + offset + right``
    (``offset`` the causal alignment's: 0 upper-left, ``S - L`` lower-right); a negative
    side (FlashAttention's ``-1``) is unbounded.
    """
    left, right = window
    return (None if left < 0 else offset - left, None if right < 0 else offset + right)


def keep_mask(xp, mask, causal_offset_or_none, q_len: int, kv_len: int, device=None, bias=None,
              window=None):
    """The kept pairs: a user keep-mask AND the causal rule AND the window AND ``bias != -inf``.

    A ``-inf`` bias entry masks its pair out exactly as ``mask=False`` does; a NaN or
    ``+inf`` bias entry keeps its pair (and poisons its row, see :mod:`refattn._softmax`).
    ``window`` is ``(lo, hi)`` of :func:`window_keep` or None.  Returns a boolean array
    broadcastable to the scores ``(..., H, L, S)``, or ``None`` when every key is kept.
    """
    keep = mask
    if causal_offset_or_none is not None:
        tri = causal_keep(xp, q_len, kv_len, causal_offset_or_none, device=device)
        keep = tri if keep is None else xp.logical_and(keep, tri)
    if window is not None:
        band = window_keep(xp, q_len, kv_len, window, device=device)
        keep = band if keep is None else xp.logical_and(keep, band)
    if bias is not None:
        finite_or_nan = bias != -xp.inf
        keep = finite_or_nan if keep is None else xp.logical_and(keep, finite_or_nan)
    return keep


def from_torch_key_padding_mask(key_padding_mask):
    """Convert ``nn.MultiheadAttention``'s ``key_padding_mask`` (``(N, S)``, ``True`` = ignore).

    Returns a refattn keep-mask of shape ``(N, 1, 1, S)`` (``True`` = attend) that
    broadcasts against scores ``(N, H, L, S)``.
    """
    m = np.asarray(key_padding_mask)
    if m.dtype != bool:
        raise TypeError("key_padding_mask must be boolean (True = ignore the key)")
    return ~m[:, None, None, :]


def from_torch_attn_mask(attn_mask):
    """Convert ``nn.MultiheadAttention``'s ``attn_mask``.

    A boolean ``attn_mask`` there means ``True`` = NOT allowed: the keep-mask is its
    negation.  A float ``attn_mask`` is an additive bias: pass it as ``bias``.
    Returns ``(mask, bias)`` with one of them ``None``.
    """
    m = np.asarray(attn_mask)
    if m.dtype == bool:
        return ~m, None
    return None, m


def alibi_distance(xp, q_len: int, kv_len: int, dtype, device=None, offset=None):
    """``|i + c - j|`` ``(L, S)``: FlashAttention's ALiBi distance (bias ``-slope * it``).

    ``c = S - L`` (``offset=None``, the last query and the last key aligned) or ``offset``:
    the distance of a block of a larger problem in its own coordinates
    (:func:`refattn.distributed.geometry.alibi_offset`).
    """
    c = kv_len - q_len if offset is None else int(offset)
    i = xp.reshape(xp.arange(q_len, device=device), (q_len, 1))
    j = xp.reshape(xp.arange(kv_len, device=device), (1, kv_len))
    return xp.astype(xp.abs(i + c - j), dtype)


def score_indices(xp, batch: int, heads: int, q_len: int, kv_len: int, device=None):
    """Index arrays ``(b, h, i, j)`` that broadcast to the scores ``(B, H, L, S)``.

    ``b (B, 1, 1, 1)``, ``h (1, H, 1, 1)``, ``i (1, 1, L, 1)``, ``j (1, 1, 1, S)``: what the
    array functions ``mask_mod(b, h, i, j)`` and ``score_mod(score, b, h, i, j)`` of
    :func:`refattn.sdpa` receive (FlexAttention's arguments, evaluated on every pair at once).
    """
    def axis(n, at):
        shape = [1, 1, 1, 1]
        shape[at] = n
        return xp.reshape(xp.arange(n, device=device), tuple(shape))

    return axis(batch, 0), axis(heads, 1), axis(q_len, 2), axis(kv_len, 3)
