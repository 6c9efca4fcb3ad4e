r"""Where a block of queries x keys sits in the full score matrix, and what that changes.

A block holds queries ``[l0, l1)`` and keys ``[s0, s1)`` of an ``L x S`` problem;
inside it they are numbered from 0 (``i = l0 + i'``, ``j = s0 + j'``).  Every
position-dependent rule of SDPA depends on ``j - i`` only, which is the local
``j' - i'`` shifted by ``s0 - l0``:

* causal (``j <= i + offset``): the local offset is ``offset + l0 - s0``;
* window (``lo <= j - i <= hi``, :func:`refattn._masks.window_bounds`): the local
  bounds are ``lo + l0 - s0`` and ``hi + l0 - s0``;
* ALiBi distance ``|i + S - L - j|``: locally ``|i' - j' + c|`` with
  ``c = l0 - s0 + S - L``.  The backends compute ``|i' + S_b - L_b - j'|`` from the
  block's own lengths, which is the same exactly when ``c = S_b - L_b``, i.e.
  when ``S - s1 = L - l1`` (the block's last query and last key are as far from
  the ends as each other).

The differences ``j - i`` in a block are every integer of ``[s0 - l1 + 1, s1 - 1 - l0]``,
so a block has a kept pair (ignoring the data-dependent mask and bias) iff that
range meets ``[lo, min(hi, offset)]``; a rule whose band contains the whole range
keeps every pair of the block and is dropped from it.
"""

from __future__ import annotations

from .._masks import alibi_distance

__all__ = ["alibi_distance_block", "alibi_offset", "block_band", "block_visibility"]


def block_band(l_range, s_range, offset=None, window=None):
    """``(visible, local_offset, local_window)`` of the block of queries ``l_range`` and keys ``s_range``.

    Parameters
    ----------
    l_range, s_range : (int, int)
        ``[start, stop)`` of the block's queries and keys.
    offset : int or None
        Causal rule ``j <= i + offset``; None when not causal.
    window : (int or None, int or None) or None
        ``(lo, hi)``: key ``j`` kept for query ``i`` iff ``lo <= j - i <= hi`` (a side of
        None unbounded); None without a window.

    Returns
    -------
    visible : bool
        False when no pair of the block is kept (no task is made for it).
    local_offset : int or None
        The causal offset in block coordinates, None when every pair satisfies it.
    local_window : (int or None, int or None) or None
        The window in block coordinates (sides every pair satisfies are None), None
        when every pair is inside it.

    Examples
    --------
    >>> block_band((0, 4), (4, 8), offset=0)                   # above the diagonal
    (False, None, None)
    >>> block_band((8, 12), (0, 4), window=(-3, 0))            # left of a 3-key band
    (False, None, None)
    >>> block_band((4, 8), (0, 4), offset=0, window=(-3, 0))   # crosses the band's left edge
    (True, None, (1, None))
    """
    (l0, l1), (s0, s1) = l_range, s_range
    if l1 <= l0 or s1 <= s0:
        return False, None, None
    lo, hi = window if window is not None else (None, None)
    dmin, dmax = s0 - (l1 - 1), (s1 - 1) - l0
    uppers = [x for x in (offset, hi) if x is not None]
    upper = min([dmax] + uppers)
    lower = dmin if lo is None else max(dmin, lo)
    if lower > upper:
        return False, None, None
    shift = l0 - s0
    local_offset = offset + shift if offset is not None and dmax > offset else None
    local_lo = lo + shift if lo is not None and dmin < lo else None
    local_hi = hi + shift if hi is not None and dmax > hi else None
    local_window = None if local_lo is None and local_hi is None else (local_lo, local_hi)
    return True, local_offset, local_window


def block_visibility(l_range, s_range, offset):
    """``(visible, local_offset)``: :func:`block_band` under the causal rule alone.

    Examples
    --------
    >>> block_visibility((0, 4), (4, 8), 0)          # above the diagonal: no task
    (False, None)
    >>> block_visibility((4, 8), (0, 4), 0)          # below it: every key kept
    (True, None)
    >>> block_visibility((4, 8), (4, 8), 0)          # on it: masked, local offset 0
    (True, 0)
    """
    visible, local_offset, _ = block_band(l_range, s_range, offset)
    return visible, local_offset


def alibi_offset(l_range, s_range, q_len, kv_len):
    """``c`` of the block's ALiBi distance ``|i' - j' + c|``: ``l0 - s0 + S - L``.

    Examples
    --------
    >>> alibi_offset((0, 4), (0, 8), 4, 8)      # the whole problem: c = S - L
    4
    >>> alibi_offset((4, 8), (0, 4), 8, 8)      # a block below the diagonal
    4
    """
    return l_range[0] - s_range[0] + kv_len - q_len


def alibi_distance_block(xp, q_len, kv_len, c, dtype, device=None):
    """``|i' - j' + c|`` ``(L_b, S_b)``: the ALiBi distance in block coordinates.

    :func:`refattn._masks.alibi_distance` with ``offset=c`` (what the backends compute
    from ``SDPAOptions.alibi_offset``); with ``c = S_b - L_b`` it is the block's own.

    Examples
    --------
    >>> import numpy as np
    >>> alibi_distance_block(np, 2, 3, 1, np.float64)
    array([[1., 0., 1.],
           [2., 1., 0.]])
    """
    return alibi_distance(xp, q_len, kv_len, dtype, device=device, offset=c)
