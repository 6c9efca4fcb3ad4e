"""Masks in refattn's convention, and converters to and from the frameworks' conventions.

refattn's boolean ``mask`` is a **keep-mask**: ``True`` where a query may attend
to a key, broadcastable to the scores ``(*batch, H, L, S)``.  ``causal=True``
keeps key ``j`` for query ``i`` when ``j <= i + offset`` (``docs/conventions.md``).
The frameworks spell the same thing four ways:

============================================  =======================================
convention                                    converter
============================================  =======================================
PyTorch ``nn.MultiheadAttention``             :func:`from_torch_attn_mask`,
``attn_mask`` (bool: ``True`` = masked out;   :func:`to_torch_attn_mask`
float: added to the scores)
PyTorch ``key_padding_mask`` ``(B, S)``       :func:`from_torch_key_padding_mask`,
(``True`` = padding, ignored)                 :func:`to_torch_key_padding_mask`
``F.scaled_dot_product_attention``, JAX,      the keep-mask itself
timm (bool ``True`` = attend)
Hugging Face ``attention_mask``: 2-D          :func:`from_hf_padding_mask`,
``(B, S)`` ``1`` = token, ``0`` = padding;    :func:`to_hf_additive_mask`,
4-D additive ``(B, 1, L, S)``: ``0`` kept,    :func:`from_hf_additive_mask`
``finfo(dtype).min`` masked
============================================  =======================================

A query row with no key left (every key masked) gives ``0`` in refattn,
PyTorch's SDPA and FlashAttention; an **additive** mask of ``finfo.min`` (Hugging
Face, JAX) gives it the *mean of the values* instead, since every score drops by
the same amount.  :func:`empty_rows` finds such rows, so a comparison can treat
them apart.

All functions take and return NumPy arrays (convert framework tensors with
``.numpy()`` / ``np.asarray``).

Examples
--------
>>> import numpy as np
>>> from refattn import masks
>>> padding = np.array([[False, False, True]])          # torch: True = ignore key 2
>>> keep = masks.from_torch_key_padding_mask(padding)
>>> keep.shape, keep[0, 0, 0].tolist()
((1, 1, 1, 3), [True, True, False])
>>> masks.to_torch_key_padding_mask(keep).tolist()
[[False, False, True]]
>>> additive = masks.to_hf_additive_mask(keep, np.float32, q_len=2)
>>> additive.shape, bool(additive[0, 0, 0, 2] == np.finfo(np.float32).min)
((1, 1, 2, 3), True)
>>> bool((masks.from_hf_additive_mask(additive) == keep).all())
True
"""

from __future__ import annotations

import numpy as np

from ._masks import (CAUSAL_ALIGNS, causal_keep, causal_offset, from_torch_attn_mask,
                     from_torch_key_padding_mask, keep_mask)

__all__ = ["CAUSAL_ALIGNS", "causal_keep", "causal_offset", "keep_mask",
           "from_torch_attn_mask", "from_torch_key_padding_mask", "to_torch_attn_mask",
           "to_torch_key_padding_mask", "is_key_padding", "from_hf_padding_mask",
           "to_hf_additive_mask", "from_hf_additive_mask", "combined_keep", "empty_rows"]


def _bool(mask, name):
    m = np.asarray(mask)
    if m.dtype != bool:
        raise TypeError(f"{name} must be a boolean keep-mask (True = attend), got dtype {m.dtype}")
    return m


def to_torch_attn_mask(keep):
    """The boolean ``attn_mask`` of ``nn.MultiheadAttention`` (``True`` = masked out): ``~keep``."""
    return ~_bool(keep, "keep")


def is_key_padding(keep) -> bool:
    """Whether ``keep`` is a key-padding keep-mask ``(B, 1, 1, S)`` (or ``(1, S)`` / ``(S,)``)."""
    m = np.asarray(keep)
    return m.ndim in (1, 2, 4) and all(n == 1 for n in m.shape[:-1][(1 if m.ndim == 4 else 0):])


def to_torch_key_padding_mask(keep, batch=None):
    """``key_padding_mask (B, S)`` (``True`` = ignore) from a keep-mask on keys only.

    ``keep`` must be ``(B, 1, 1, S)``, ``(1, S)`` or ``(S,)``; ``batch`` broadcasts
    the last two to ``B`` rows.  A mask that depends on the query is a
    ``ValueError``: use :func:`to_torch_attn_mask` for it.
    """
    m = _bool(keep, "keep")
    if not is_key_padding(m):
        raise ValueError(f"a key-padding mask needs a keep-mask on keys only, shape (B, 1, 1, S), "
                         f"(1, S) or (S,); got {m.shape}")
    rows = m.reshape(-1, m.shape[-1])                              # (B or 1, S)
    if batch is not None:
        rows = np.broadcast_to(rows, (batch, m.shape[-1]))
    return ~rows


def from_hf_padding_mask(attention_mask):
    """Hugging Face's 2-D ``attention_mask (B, S)`` (``1`` = token, ``0`` = padding) -> ``(B, 1, 1, S)``."""
    m = np.asarray(attention_mask)
    if m.ndim != 2:
        raise ValueError(f"attention_mask must have shape (B, S), got {m.shape}")
    return (m != 0)[:, None, None, :]


def to_hf_additive_mask(keep, dtype, q_len=None):
    """Hugging Face's 4-D additive mask: ``0`` where ``keep``, ``finfo(dtype).min`` elsewhere.

    ``keep`` broadcasts to ``(B, 1, L, S)`` (``q_len`` gives ``L`` for a
    key-padding mask ``(B, 1, 1, S)``).  Note the empty-row behaviour of additive
    masks (module doc).
    """
    m = _bool(keep, "keep")
    if m.ndim < 2:
        m = m.reshape(1, -1)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape) if m.ndim < 4 else m
    if q_len is not None:
        m = np.broadcast_to(m, (*m.shape[:2], q_len, m.shape[-1]))
    dtype = np.dtype(dtype)
    return np.where(m, dtype.type(0), np.finfo(dtype).min).astype(dtype)


def from_hf_additive_mask(additive):
    """The keep-mask of an additive mask: ``True`` where the added value is above ``finfo.min / 2``."""
    a = np.asarray(additive)
    if a.dtype.kind != "f":
        raise TypeError(f"an additive mask is a float array, got dtype {a.dtype}")
    return a > np.finfo(a.dtype).min / 2


def combined_keep(mask, causal, q_len, kv_len, causal_align="upper_left"):
    """The NumPy keep-mask of ``mask`` AND ``causal`` (None when every key is kept)."""
    offset = causal_offset(causal_align, q_len, kv_len) if causal else None
    keep = None if mask is None else _bool(mask, "mask")
    return keep_mask(np, keep, offset, q_len, kv_len)


def empty_rows(mask, causal, q_len, kv_len, causal_align="upper_left") -> bool:
    """Whether some query row keeps no key under ``mask`` and ``causal``."""
    keep = combined_keep(mask, causal, q_len, kv_len, causal_align)
    return keep is not None and not bool(np.broadcast_to(keep, (*keep.shape[:-2], q_len, kv_len))
                                         .any(axis=-1).all())
