"""SDPA numba backend: FlashAttention-2 on the CPU, O(L) extra memory per head.

Design (``docs/backends/numba.md`` has the full story):

* Tiles of ``block_q`` queries x ``block_k`` keys (``SDPAOptions.tiles``, default
  :data:`DEFAULT_TILES`).  Each tile product is one
  BLAS call (:func:`~refattn.backends.numba_support.gemm`, ``sgemm``/``dgemm``) on contiguous
  row blocks of ``q``, ``k``, ``v``.
* Forward: scores in the natural layout ``S = (scale Q_i) K_j^T`` of shape
  ``(queries, keys)``, so that the second product ``P V_j`` takes both operands
  untransposed (OpenBLAS runs it about 15 % faster than ``(P^T)^T V_j``).  Online
  softmax over key tiles; saves only ``lse`` ``(B, H, L)``.  Lazy rescaling: once
  every row of a query tile has a finite shift, each key tile is exponentiated
  against it in one pass (:func:`_exp_row`: no max pass, no rescale of the
  accumulator, the row sum vectorised); the shift is renewed, two-pass, only when
  a row sum exceeds ``exp(RESHIFT)``.  Work items: spans x heads x query tiles
  (zig-zag order, so that causal tiles of unequal cost split evenly between
  threads).
* Backward: scores kept TRANSPOSED, ``S^T = K_j Q_i^T`` of shape ``(keys,
  queries)``: three of its five products then take untransposed operands, and the
  row statistics (``lse``, ``D``) become element-wise updates of length-``block_q``
  vectors, which LLVM vectorises without fast-math.
  It recomputes ``P = exp(S - lse)``; work items: spans x kv heads
  (x key-tile chunks when there are fewer of those than threads).  Each work
  item owns its key tiles' ``dK``/``dV`` (GQA: it loops over the query heads of
  its group, so the group sum needs no synchronisation); ``dQ`` is accumulated
  in one buffer per chunk (one chunk, hence no copy, when batch x kv heads
  already feeds every thread) and the chunks are summed at the end.  No races.
* Threads: the kernels are serial ``nogil`` loops over a list of work items;
  :func:`~refattn.backends.numba_support.run_split` cuts the items into one run of about
  equal cost per thread (:func:`~refattn.backends.numba_support.num_threads`) and runs
  them on a thread pool.  Serial kernels compile in about half the time of ``prange``
  ones (docs/benchmarks.md, "Cold start"); one score helper (:func:`_scores`) serves both
  passes, and absent masks, biases and keep-masks are stand-ins of the same array type as
  real ones, so one dtype compiles one forward and one backward, whatever the options.
* Spans (:func:`span_table`): a batch row, or one sequence of a packed or padded call
  (``opts.sequences``), with its query and key rows and its rules (causal offset, window
  bounds, ALiBi distance offset) moved to the 4-D view's rows and columns.  All sequences of
  a call run in one :func:`~refattn.backends.numba_support.run_split` per pass, on the same
  compiled kernels as a call without sequences (one span per batch row).
* Causal and window: key tiles entirely outside the kept band are skipped.  A tile
  that crosses the diagonal or a window edge runs in blocks of :data:`DIAGONAL_ROWS`
  queries (forward) or keys (backward), each over the keys (queries) its rows keep,
  so the products skip most of the masked triangle instead of computing it and
  discarding it; only those blocks are masked element-wise.
* FlexAttention-style ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` are called pair by
  pair on the tiles that causal rule and window leave (no other tile is skipped), through
  module-level placeholders that :mod:`.numba_mods` rebinds in uncached copies of the
  kernels (:data:`MOD_KERNELS`); the default kernels stay cached and unchanged.
* Masks, bias and the dropout keep-mask arrive as zero-stride broadcast views
  of shape ``(B, H, L, S)``: nothing L x S is materialised, except ``dscores``
  when the bias gradient is requested (L x S by definition).
* float32 inputs are computed and accumulated in float32, like PyTorch's CPU
  kernel: every reduction is either a BLAS dot product over ``E``,
  ``block_q`` or ``block_k`` terms or a sum of positive terms (no
  cancellation), whose rounding error (``~ n u`` with ``u = 6e-8``) stays near
  1e-6 relative for the lengths used here; the tests measure it against the
  float64 reference and against the float32 NumPy reference's own error.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np

from ...backends import compile_ahead
from ...backends.numba_support import (
    cached_signatures,
    fast_exp,
    fast_tanh,
    gemm,
    jit,
    minmax_reductions,
    num_threads,
    run_split,
    wide_vectors,
)
from ...backends.tuning import tuned_choice
from . import numba_mods

__all__ = ["DEFAULT_TILES", "backward", "forward", "forward_products"]

#: ``(queries, keys)`` per tile for problems shorter than :data:`TUNE_MIN_LEN` (where one or
#: two tiles cover a head, and the shape hardly matters).
DEFAULT_TILES = (256, 256)
#: Tile shapes timed on this machine at first use (:func:`~refattn.backends.tuning.tuned_choice`,
#: per pass, dtype and head size) for problems of at least :data:`TUNE_MIN_LEN` queries and
#: keys; the fastest is kept.  No shape is best on every CPU: the BLAS's small-product
#: kernels differ (one host's OpenBLAS ran 256 x 64 x 256 at a third of its rate).
TILE_CANDIDATES = ((128, 256), (256, 256), (256, 512), (512, 256))
TUNE_MIN_LEN = 512
#: The forward renews a row's exp() shift only when a score exceeds it by this much.
#: Probabilities relative to the shift then stay below exp(30) = 1.1e13, so sums over
#: S <= 1e5 keys of them times |v| stay finite in float32 (3.4e38) for |v| < 1e20.
RESHIFT = 30.0


# The user's mask and score functions (FlexAttention's mask_mod / score_mod) are called
# through these three names.  The cached kernels below call these placeholders, guarded by
# the flags of ``mods`` (False unless the call has the function, so they never run);
# :mod:`.numba_mods` builds uncached copies of the kernels whose globals bind the names to
# the user's compiled functions instead.
@jit
def _MASK_MOD(b, h, i, j):
    """Placeholder of ``mask_mod(b, h, i, j) -> bool``: keeps every pair."""
    return True


@jit
def _SCORE_MOD(score, b, h, i, j):
    """Placeholder of ``score_mod(score, b, h, i, j) -> score``: the identity."""
    return score


@jit
def _SCORE_MOD_GRAD(score, b, h, i, j):
    """Placeholder of ``score_mod_grad(score, b, h, i, j)``: the identity's derivative, 1."""
    return score - score + 1


#: The kernels that reach a placeholder (directly or through a callee), in call order;
#: :mod:`.numba_mods` rebuilds exactly these for user functions.
MOD_KERNELS = ("_scores", "_forward_step", "_backward_step", "_forward_kernel",
               "_backward_kernel")


@jit(inline="always")
def _fill_where_positive(row, base, step, value):
    """``row[r] = value`` wherever ``base + step * r > 0`` (``step`` is +1 or -1)."""
    n = row.shape[0]
    if step > 0:
        start, stop = min(n, max(0, 1 - base)), n
    else:
        start, stop = 0, min(n, max(0, base))
    for r in range(start, stop):
        row[r] = value


@jit
def _scores(s, queries_in_rows, i0, j0, b, h, mods, mask, bias, slopes, causal, has_lo, has_hi,
            store_grads, tanh_tile, mod_grad_tile):
    """Scores tile ``s`` (scaled already), in place: soft-cap, bias, ALiBi, ``score_mod``,
    then masking (mask, ``mask_mod``, causal rule, window).

    One helper for both passes (one compile per dtype): with ``queries_in_rows`` the tile
    is the forward's ``(queries, keys)``, element ``(p, r)`` the pair ``(i0 + p, j0 + r)``;
    else the backward's transposed ``(keys, queries)``, the pair ``(i0 + r, j0 + p)``.  Every
    inner loop runs along a contiguous row of ``s``; along it the pair moves by
    ``(di, dj)``, ``(0, 1)`` or ``(1, 0)``, and the causal and window rules become a run of
    ``r`` where an affine function of ``r`` is positive.  The flags must be runtime
    booleans (``np.bool_(...)``): a literal ``True`` would compile a second copy.

    ``mods`` holds the flags and numbers of :func:`_modifiers`; ``causal``, ``has_lo`` and
    ``has_hi`` say whether this tile crosses the causal diagonal or a window edge (tiles
    inside the band skip those loops).  With ``store_grads`` the soft-cap's ``tanh`` goes to
    ``tanh_tile`` and ``score_mod_grad`` at the score before ``score_mod`` to
    ``mod_grad_tile`` (both shaped like ``s``), for the backward pass.
    """
    wide_vectors()
    (has_mask, has_bias, has_softcap, has_alibi, offset, lo, hi, softcap, inv_softcap,
     dist_offset, neg_inf, _, _, has_mask_mod, has_score_mod, slope_row, mod_b, q_origin,
     k_origin) = mods
    n_rows, n = s.shape
    di = 0 if queries_in_rows else 1           # query step along a row
    dj = 1 - di                                # key step along a row
    step = dj - di                             # step of j - i along a row
    slope = slopes[slope_row, h] if has_alibi else softcap - softcap
    for p in range(n_rows):
        row = s[p]
        ib = i0 + p * dj                       # the pair (ib, jb) of the row's first element
        jb = j0 + p * di
        # two loops, not a branch inside one: the runtime flag kept the loop scalar
        if has_softcap and store_grads:
            trow = tanh_tile[p]
            for r in range(n):
                t = fast_tanh(row[r] * inv_softcap)
                trow[r] = t
                row[r] = softcap * t
        elif has_softcap:
            for r in range(n):
                row[r] = softcap * fast_tanh(row[r] * inv_softcap)
        if has_bias:
            for r in range(n):
                row[r] += bias[b, h, ib + r * di, jb + r * dj]
        if has_alibi:                          # - slope |i - j + S - L|
            for r in range(n):
                row[r] -= slope * abs(ib - jb + dist_offset - r * step)
        if has_score_mod:   # a -inf bias masks the pair whatever score_mod makes of it
            grow = mod_grad_tile[p]
            for r in range(n):
                i, j = ib + r * di, jb + r * dj
                if has_bias and bias[b, h, i, j] == neg_inf:
                    row[r] = neg_inf
                    if store_grads:
                        grow[r] = softcap - softcap
                else:
                    if store_grads:
                        grow[r] = _SCORE_MOD_GRAD(row[r], mod_b, h, i - q_origin, j - k_origin)
                    row[r] = _SCORE_MOD(row[r], mod_b, h, i - q_origin, j - k_origin)
        if has_mask:
            for r in range(n):
                if not mask[b, h, ib + r * di, jb + r * dj]:
                    row[r] = neg_inf
        if has_mask_mod:
            for r in range(n):
                if not _MASK_MOD(mod_b, h, ib + r * di - q_origin, jb + r * dj - k_origin):
                    row[r] = neg_inf
        gap = jb - ib                          # j - i at r = 0
        if causal:          # kept iff j - i <= offset
            _fill_where_positive(row, gap - offset, step, neg_inf)
        if has_hi:          # window: kept iff j - i <= hi
            _fill_where_positive(row, gap - hi, step, neg_inf)
        if has_lo:          # window: kept iff j - i >= lo
            _fill_where_positive(row, lo - gap, -step, neg_inf)


@jit(fastmath={"contract", "reassoc"})
def _exp_row(row, shift):
    """``row = exp(row - shift)`` in place; returns the row's sum.

    ``reassoc`` lets LLVM vectorise the sum (terms are positive: any order is as
    accurate); it applies to this function's own additions only, not to the inlined
    :func:`fast_exp`, whose range reduction keeps its order.
    """
    wide_vectors()
    total = shift - shift
    for c in range(row.shape[0]):
        p = fast_exp(row[c] - shift)
        row[c] = p
        total += p
    return total


@jit
def _row_max(row, start):
    """``max(start, max(row))``, vectorised (:func:`minmax_reductions`).  With a NaN in the
    row the result is a NaN or one of the values: the caller's row then sums to NaN
    anyway, in both branches it may take."""
    minmax_reductions()
    wide_vectors()
    top = start
    for c in range(row.shape[0]):
        x = row[c]
        top = x if x > top else top
    return top


@jit(inline="always")
def _modifies_scores(mods, causal, has_lo, has_hi):
    """Whether :func:`_scores` has anything to do on a tile: an option (mask, bias,
    soft-cap, ALiBi, ``mask_mod``, ``score_mod``) or a band edge.  Plain tiles skip the
    pass (measured 5 % of the forward)."""
    return (mods[0] or mods[1] or mods[2] or mods[3] or mods[13] or mods[14] or causal
            or has_lo or has_hi)


#: Queries (forward) or keys (backward) per block on a tile that crosses the causal
#: diagonal or a window edge: each block runs over the pairs its rows keep.
DIAGONAL_ROWS = 64

#: Columns of the span table (:func:`span_table`): one row per sequence, or per batch row of
#: a call without sequences.  Rows and columns are those of the 4-D arrays; the rules are
#: moved to them (a sequence's own rule with ``i``, ``j`` counted from its start ``q0``,
#: ``k0`` is the same rule with its offsets shifted by ``k0 - q0``).
SPAN_COLUMNS = ("b", "q0", "q1", "k0", "k1", "row", "causal", "lo", "hi", "dist")
(SPAN_B, SPAN_Q0, SPAN_Q1, SPAN_K0, SPAN_K1, SPAN_ROW, SPAN_CAUSAL, SPAN_LO, SPAN_HI,
 SPAN_DIST) = range(len(SPAN_COLUMNS))


@jit
def _forward_step(q_rows, k_tile, v_tile, s_flat, acc, shift, row_sum, tile_sum, i0, j0, b, h,
                  mods, mask, bias, slopes, drop, has_drop, drop_scale, causal, has_lo, has_hi,
                  reshift_sum):
    """One online-softmax step of queries ``i0 ..`` over keys ``j0 ..``: ``acc += P V``.

    ``q_rows (n, E)`` scaled queries, ``k_tile (nc, E)``, ``v_tile (nc, Ev)``; the rows'
    running state ``acc (n, Ev)``, ``shift``, ``row_sum`` (and scratch ``tile_sum``) ``(n,)``
    is updated in place.  ``causal``, ``has_lo``, ``has_hi``: whether the block crosses the
    diagonal or a window edge (see :func:`_scores`).
    """
    wide_vectors()
    n, nc = q_rows.shape[0], k_tile.shape[0]
    zero = reshift_sum - reshift_sum
    neg_inf = mods[10]
    rows_are_queries = np.bool_(True)             # runtime flags: see _scores
    no_grads = np.bool_(False)
    s = s_flat.reshape((n, nc))                   # scores (n, nc)
    gemm(s, q_rows, False, k_tile, True, False)   # S = (scale Q_i) K_j^T
    modified = _modifies_scores(mods, causal, has_lo, has_hi)
    if modified:
        _scores(s, rows_are_queries, i0, j0, b, h, mods, mask, bias, slopes, causal, has_lo,
                has_hi, no_grads, s, s)
    # Lazy rescaling: once every row has a finite shift, exponentiate against it directly
    # (one pass, no max pass).  The shift only has to keep exp() finite: a row sum above
    # exp(RESHIFT) (some score climbed about RESHIFT above it) recomputes this step the
    # two-pass way, which renews the shift (rare).
    lazy = True
    for r in range(n):
        if not shift[r] > neg_inf:                # a row without a kept key so far
            lazy = False
    if lazy:
        for r in range(n):
            tile_sum[r] = _exp_row(s[r], shift[r])
            if tile_sum[r] > reshift_sum:
                lazy = False
        if lazy:
            for r in range(n):
                row_sum[r] += tile_sum[r]
        else:                                     # recompute the scores of this step
            gemm(s, q_rows, False, k_tile, True, False)
            if modified:
                _scores(s, rows_are_queries, i0, j0, b, h, mods, mask, bias, slopes, causal,
                        has_lo, has_hi, no_grads, s, s)
    if not lazy:
        for r in range(n):
            row = s[r]
            new_shift = _row_max(row, shift[r])   # -inf while the row has no kept key
            if new_shift == neg_inf:              # no kept key, or NaN scores only
                for c in range(nc):
                    if row[c] != row[c]:
                        new_shift = row[c]
            # a NaN score (whatever _row_max made of it) must reach the row's output
            if new_shift > neg_inf or new_shift != new_shift:
                alpha = fast_exp(shift[r] - new_shift)    # 0 for the first kept key
                shift[r] = new_shift
                row_sum[r] = row_sum[r] * alpha + _exp_row(row, new_shift)
                for e in range(acc.shape[1]):
                    acc[r, e] *= alpha
            else:                                 # no kept key so far: P = 0
                for c in range(nc):
                    row[c] = zero
    if has_drop:
        for r in range(n):
            row = s[r]
            for c in range(nc):
                row[c] = row[c] * drop_scale if drop[b, h, i0 + r, j0 + c] else zero
    gemm(acc, s, False, v_tile, False, True)      # acc += P_ij V_j


@jit(inline="always")
def _span_modifiers(mods, spans, n, slopes):
    """``mods`` with the causal offset, window bounds, ALiBi distance offset and slope row of
    span ``n`` (row ``n`` of :func:`span_table`): every rule then reads the view's rows and
    columns."""
    slope_row = spans[n, SPAN_ROW] if slopes.shape[0] > 1 else 0      # (1, H) slopes: row 0
    return (mods[0], mods[1], mods[2], mods[3], spans[n, SPAN_CAUSAL], spans[n, SPAN_LO],
            spans[n, SPAN_HI], mods[7], mods[8], spans[n, SPAN_DIST], mods[10], mods[11],
            mods[12], mods[13], mods[14], slope_row, spans[n, SPAN_ROW], spans[n, SPAN_Q0],
            spans[n, SPAN_K0])


@jit(inline="always")
def _tiles_per_span(spans, column_start, block):
    """Tiles of ``block`` rows of the longest span (column ``column_start`` and the next): the
    stride of the tile index in the work items (at least 1)."""
    longest = 0
    for n in range(spans.shape[0]):
        longest = max(longest, spans[n, column_start + 1] - spans[n, column_start])
    return max(1, (longest + block - 1) // block)


@jit
def _forward_kernel(q, k, v, mask, bias, slopes, drop, mods, has_drop, causal, scale, drop_scale,
                    block_q, block_k, spans, o, lse, items):
    """Forward over the work ``items``: ``t = (n H + h) n_qt + query tile`` (serial), ``n``
    a row of ``spans`` (:func:`span_table`), ``n_qt`` the tiles of its longest query range."""
    wide_vectors()
    H, E = q.shape[1], q.shape[3]
    window_lo, window_hi = mods[11], mods[12]
    Hkv, Ev = k.shape[1], v.shape[3]
    group = H // Hkv
    n_qt = _tiles_per_span(spans, SPAN_Q0, block_q)
    zero = scale - scale                          # typed zero of the working dtype
    neg_inf = np.full(1, -np.inf, q.dtype)[0]
    # a lazily shifted row sum above exp(RESHIFT) renews the shift (two-pass tile)
    reshift_sum = np.full(1, math.exp(RESHIFT), q.dtype)[0]
    q_buf = np.empty((block_q, E), q.dtype)
    s_buf = np.empty(block_q * block_k, q.dtype)
    acc_buf = np.empty((block_q, Ev), q.dtype)
    shift = np.empty(block_q, q.dtype)
    row_sum = np.empty(block_q, q.dtype)
    tile_sum = np.empty(block_q, q.dtype)
    for t in items:
        nh = t // n_qt
        tile = t % n_qt
        n = nh // H
        h = nh % H
        hk = h // group
        b, q0, q1 = spans[n, SPAN_B], spans[n, SPAN_Q0], spans[n, SPAN_Q1]
        k0, k1 = spans[n, SPAN_K0], spans[n, SPAN_K1]
        span_mods = _span_modifiers(mods, spans, n, slopes)
        offset, lo, hi = span_mods[4], span_mods[5], span_mods[6]
        i0 = q0 + tile * block_q
        i1 = min(q1, i0 + block_q)
        nr = i1 - i0
        q_tile = q_buf[:nr]                       # scale * Q_i: scores come out scaled
        for r in range(nr):
            for e in range(E):
                q_tile[r, e] = q[b, h, i0 + r, e] * scale
        acc = acc_buf[:nr]                        # unnormalised output
        acc[...] = zero
        shift[:nr] = neg_inf                      # exp() is taken of scores - shift
        row_sum[:nr] = zero
        key_start, key_end = k0, k1
        if causal:
            key_end = min(k1, max(k0, i1 + offset))     # keys beyond i1-1+offset: fully masked
        if window_hi:
            key_end = min(key_end, max(k0, i1 + hi))    # keys beyond i1-1+hi: outside
        if window_lo:
            key_start = min(key_end, max(k0, i0 + lo))  # keys before i0+lo: outside
        for j0 in range(key_start, key_end, block_k):
            j1 = min(key_end, j0 + block_k)
            crosses_causal = causal and j1 - 1 > i0 + offset
            crosses_hi = window_hi and j1 - 1 > i0 + hi
            crosses_lo = window_lo and j0 < i1 - 1 + lo
            # A tile that crosses the causal diagonal or a window edge runs in blocks of
            # DIAGONAL_ROWS queries, each over the keys its rows keep: the products skip
            # most of the masked triangles instead of computing and discarding them.
            step = DIAGONAL_ROWS if crosses_causal or crosses_hi or crosses_lo else nr
            for a0 in range(0, nr, step):
                a1 = min(nr, a0 + step)
                first, last = i0 + a0, i0 + a1 - 1      # the block's queries
                b0, b1 = j0, j1                         # and the keys they keep
                if crosses_causal:
                    b1 = min(b1, max(j0, last + offset + 1))
                if crosses_hi:
                    b1 = min(b1, max(j0, last + hi + 1))
                if crosses_lo:
                    b0 = min(b1, max(j0, first + lo))
                if b1 == b0:
                    continue
                # whether the block still crosses the diagonal or an edge
                block_causal = crosses_causal and b1 - 1 > first + offset
                block_lo = crosses_lo and b0 < last + lo
                block_hi = crosses_hi and b1 - 1 > first + hi
                _forward_step(q_tile[a0:a1], k[b, hk, b0:b1], v[b, hk, b0:b1],
                              s_buf[:(a1 - a0) * (b1 - b0)], acc[a0:a1], shift[a0:a1],
                              row_sum[a0:a1], tile_sum[a0:a1], first, b0, b, h, span_mods,
                              mask, bias, slopes, drop, has_drop, drop_scale, block_causal,
                              block_lo, block_hi, reshift_sum)
        for r in range(nr):
            # row_sum is 0 only for a row with no kept key; a NaN sum (a score that
            # overflowed to inf) must reach the output, not be taken for an empty row
            if row_sum[r] != zero:
                inv = 1 / row_sum[r]
                for e in range(Ev):
                    o[b, h, i0 + r, e] = acc[r, e] * inv
                lse[b, h, i0 + r] = shift[r] + math.log(row_sum[r])
            else:                                  # no key left: output 0, lse -inf
                for e in range(Ev):
                    o[b, h, i0 + r, e] = zero
                lse[b, h, i0 + r] = neg_inf


@jit
def _backward_step(k_tile, v_tile, dk_tile, dv_tile, q_tile, do_tile, dq_tile, lse_rows, dot_rows,
                   st_buf, dpt_buf, pd_buf, tanh_buf, mod_grad_buf, shift, i0, j0, b, h, mods,
                   mask, bias, slopes, drop, has_drop, drop_scale, need_ds, dscores, causal,
                   has_lo, has_hi, rule_causal, k0, k1, centre_slopes):
    """Backward of queries ``i0 ..`` (``q_tile (nr, E)`` scaled, ``do_tile``, ``dq_tile``, their
    ``lse`` and ``D`` rows) against keys ``j0 ..`` (``k_tile (nc, E)``, ``v_tile``, ``dk_tile``,
    ``dv_tile``): accumulates ``dQ``, ``dK``, ``dV`` in place and returns the block's ALiBi
    slope gradient.  Scores are kept transposed, ``S^T (nc, nr)``.

    ``rule_causal`` (the call has the causal rule) and the span's keys ``k0 .. k1 - 1`` give
    each query's band of keys, for the ALiBi centring below (``centre_slopes``: only when
    the call holds every key of its rows, a key block of a sharded call does not, and
    without ``score_mod``, whose derivative scales dS pair by pair: :func:`_centres_slopes`)."""
    wide_vectors()
    has_softcap, has_alibi, has_score_mod = mods[2], mods[3], mods[14]
    dist_offset, neg_inf = mods[9], mods[10]
    pos_inf = -neg_inf
    zero = drop_scale - drop_scale
    rows_are_queries = np.bool_(False)            # runtime flags: see _scores
    store_grads = np.bool_(True)
    nc, nr = k_tile.shape[0], q_tile.shape[0]
    st = st_buf[:nc * nr].reshape((nc, nr))
    tt = tanh_buf[:nc * nr].reshape((nc, nr)) if has_softcap else st
    gt = mod_grad_buf[:nc * nr].reshape((nc, nr)) if has_score_mod else st
    gemm(st, k_tile, False, q_tile, True, False)
    if _modifies_scores(mods, causal, has_lo, has_hi):
        _scores(st, rows_are_queries, i0, j0, b, h, mods, mask, bias, slopes, causal, has_lo,
                has_hi, store_grads, tt, gt)
    for r in range(nr):                           # a row with no key (lse -inf) gets P = 0
        x = lse_rows[r]
        shift[r] = x if x > neg_inf else pos_inf
    for c in range(nc):
        row = st[c]
        for r in range(nr):
            row[r] = fast_exp(row[r] - shift[r])  # P^T (nc, nr)
    dpt = dpt_buf[:nc * nr].reshape((nc, nr))
    gemm(dpt, v_tile, False, do_tile, True, False)  # dP^T = V_j dO_i^T
    if has_drop:
        pd = pd_buf[:nc * nr].reshape((nc, nr))
        for c in range(nc):
            for r in range(nr):
                if drop[b, h, i0 + r, j0 + c]:
                    pd[c, r] = st[c, r] * drop_scale
                    dpt[c, r] = dpt[c, r] * drop_scale
                else:
                    pd[c, r] = zero
                    dpt[c, r] = zero
        gemm(dv_tile, pd, False, do_tile, False, True)   # dV_j += (Z P)^T dO_i
    else:
        gemm(dv_tile, st, False, do_tile, False, True)   # dV_j += P^T dO_i
    for c in range(nc):                           # dS^T = P^T * (dP^T - D), into st
        row = st[c]
        drow = dpt[c]
        for r in range(nr):
            row[r] = row[r] * (drow[r] - dot_rows[r])
    if has_score_mod:                             # dU = dS * score_mod_grad(U), 0 if not kept
        for c in range(nc):
            row = st[c]
            grow = gt[c]
            for r in range(nr):                   # dS = 0 exactly where P = 0 (masked pairs,
                if row[r] != zero:                # whose derivative may be NaN): stays 0
                    row[r] = row[r] * grow[r]
    if need_ds:
        for c in range(nc):
            for r in range(nr):
                dscores[b, h, i0 + r, j0 + c] = st[c, r]
    slope_grad = zero
    if has_alibi:                                 # d s / d slope = -|i + S - L - j|
        # Each row of dS sums to 0, so a distance c_i per query may be taken off every
        # term: the key of the query's band nearest the ALiBi diagonal gives the smallest
        # terms, and a rounding of D_i (a shift of the whole row of dS) is not multiplied by
        # the distance (docs/cores/sdpa.md, as the CUDA kernels' alibi_center).
        lo, hi, offset = mods[5], mods[6], mods[4]
        centre = shift[:nr]                       # (the exp() shifts are spent by now)
        for r in range(nr):
            if not centre_slopes:
                centre[r] = zero
                continue
            i = i0 + r
            first, last = k0, k1 - 1
            if mods[11]:
                first = max(first, i + lo)
            if rule_causal:
                last = min(last, i + offset)
            if mods[12]:
                last = min(last, i + hi)
            diagonal = i + dist_offset
            centre[r] = abs(diagonal - max(first, min(last, diagonal)))
        for c in range(nc):
            row = st[c]
            for r in range(nr):
                slope_grad -= row[r] * (abs(i0 + r + dist_offset - (j0 + c)) - centre[r])
    if has_softcap:                               # through s = c tanh(raw / c): 1 - tanh^2
        for c in range(nc):
            row = st[c]
            trow = tt[c]
            for r in range(nr):
                row[r] = row[r] * (1 - trow[r] * trow[r])
    gemm(dk_tile, st, False, q_tile, False, True)       # dK_j += dS^T (scale Q_i)
    gemm(dq_tile, st, True, k_tile, False, True)        # dQ_i += dS K_j
    return slope_grad


@jit
def _backward_kernel(q, k, v, do, lse, row_dot, mask, bias, slopes, drop, mods, has_drop, causal,
                     scale, drop_scale, block_q, block_k, n_chunks, need_ds, centre_slopes, spans,
                     dq_parts, dk, dv, dscores, dslope_parts, items):
    """Backward over the work ``items``: ``t = (n Hkv + kv head) n_chunks + chunk`` (serial),
    ``n`` a row of ``spans`` (:func:`span_table`); chunk ``c`` owns the span's key tiles
    ``c, c + n_chunks, ...``.

    ``q`` is already scaled (scale * Q), so ``dK_j += dS^T q_i`` carries the scale.
    """
    wide_vectors()
    H = q.shape[1]
    has_softcap, has_alibi, has_score_mod = mods[2], mods[3], mods[14]
    window_lo, window_hi = mods[11], mods[12]
    Hkv = k.shape[1]
    group = H // Hkv
    zero = scale - scale
    st_buf = np.empty(block_k * block_q, q.dtype)
    dpt_buf = np.empty(block_k * block_q, q.dtype)
    pd_buf = np.empty(block_k * block_q if has_drop else 0, q.dtype)
    tanh_buf = np.empty(block_k * block_q if has_softcap else 0, q.dtype)
    mod_grad_buf = np.empty(block_k * block_q if has_score_mod else 0, q.dtype)
    shift = np.empty(block_q, q.dtype)
    for t in items:
        chunk = t % n_chunks
        n = (t // n_chunks) // Hkv
        hk = (t // n_chunks) % Hkv
        b, q0, q1 = spans[n, SPAN_B], spans[n, SPAN_Q0], spans[n, SPAN_Q1]
        k0, k1 = spans[n, SPAN_K0], spans[n, SPAN_K1]
        span_mods = _span_modifiers(mods, spans, n, slopes)
        offset, lo, hi = span_mods[4], span_mods[5], span_mods[6]
        dq = dq_parts[chunk]                       # (B, H, L, E)
        n_kt = (k1 - k0 + block_k - 1) // block_k
        for jt in range(chunk, n_kt, n_chunks):
            j0 = k0 + jt * block_k
            j1 = min(k1, j0 + block_k)
            nc = j1 - j0
            k_tile = k[b, hk, j0:j1]               # (nc, E)
            v_tile = v[b, hk, j0:j1]               # (nc, Ev)
            dk_tile = dk[b, hk, j0:j1]             # (nc, E), accumulated in place
            dv_tile = dv[b, hk, j0:j1]             # (nc, Ev)
            dk_tile[...] = 0
            dv_tile[...] = 0
            first_query, end_query = q0, q1
            if causal:
                first_query = max(q0, j0 - offset)  # queries before it see none of these keys
            if window_hi:
                first_query = max(first_query, j0 - hi)    # j - i <= hi
            if window_lo:
                end_query = min(q1, max(q0, j1 - lo))      # j - i >= lo
            first_tile = (first_query - q0) // block_q
            end_tile = (end_query - q0 + block_q - 1) // block_q
            for h in range(hk * group, (hk + 1) * group):
                slope_grad = zero
                for it in range(first_tile, end_tile):
                    i0 = q0 + it * block_q
                    i1 = min(q1, i0 + block_q)
                    crosses_causal = causal and j1 - 1 > i0 + offset
                    crosses_lo = window_lo and j0 < i1 - 1 + lo
                    crosses_hi = window_hi and j1 - 1 > i0 + hi
                    # a tile crossing the diagonal or a window edge runs in blocks of
                    # DIAGONAL_ROWS keys, each over the queries that keep its keys
                    step = DIAGONAL_ROWS if crosses_causal or crosses_lo or crosses_hi else nc
                    for c0 in range(0, nc, step):
                        c1 = min(nc, c0 + step)
                        first_key, last_key = j0 + c0, j0 + c1 - 1
                        a0, a1 = i0, i1
                        if crosses_causal:             # j <= i + offset
                            a0 = max(a0, min(a1, first_key - offset))
                        if crosses_hi:                 # j - i <= hi
                            a0 = max(a0, min(a1, first_key - hi))
                        if crosses_lo:                 # j - i >= lo
                            a1 = min(a1, max(a0, last_key - lo + 1))
                        if a1 == a0:
                            continue
                        # whether the block still crosses the diagonal or an edge
                        block_causal = crosses_causal and last_key > a0 + offset
                        block_lo = crosses_lo and first_key < a1 - 1 + lo
                        block_hi = crosses_hi and last_key > a0 + hi
                        slope_grad += _backward_step(
                            k_tile[c0:c1], v_tile[c0:c1], dk_tile[c0:c1], dv_tile[c0:c1],
                            q[b, h, a0:a1], do[b, h, a0:a1], dq[b, h, a0:a1], lse[b, h, a0:a1],
                            row_dot[b, h, a0:a1], st_buf, dpt_buf, pd_buf, tanh_buf,
                            mod_grad_buf, shift, a0, first_key, b, h, span_mods, mask, bias,
                            slopes, drop, has_drop, drop_scale, need_ds, dscores,
                            block_causal, block_lo, block_hi, causal, k0, k1, centre_slopes)
                if has_alibi:
                    dslope_parts[chunk, spans[n, SPAN_ROW], h] += slope_grad


_DEFAULT_KERNELS = {name: globals()[name] for name in MOD_KERNELS}


def _c(x, dtype):
    """C-contiguous, aligned, writeable ``dtype`` array (one compiled signature for all inputs)."""
    return np.require(x, dtype=dtype, requirements=("C", "A", "W"))


def _broadcast(x, shape, dtype):
    """Read-only view ``shape`` of ``x`` that Numba types as layout ``'A'``; a zero-stride
    stand-in when ``x`` is None.

    Every mask, bias and keep-mask (and the stand-in) reaches the kernels as the same array
    type, so that options add no compiled signature.  A broadcast view is 'A' unless it is
    contiguous (a full ``(B, H, L, S)`` array, C or Fortran order, ``(L, S)`` with
    ``B = H = 1``, a ``(1, 1, 1, S)`` one at ``L = 1``); that one is copied once into a
    buffer one column wider (two rows or more) or with every other element (one row) and
    viewed without the extra elements.  A single element stays 'C' (one more signature for
    ``L = S = 1``, whose kernels are small).
    """
    if x is None:
        return np.broadcast_to(np.zeros((1, 1, 1, 1), dtype), (1, 1, 1, 2))
    view = np.broadcast_to(np.asarray(x, dtype=dtype), shape)
    if view.size > 1 and (view.flags.c_contiguous or view.flags.f_contiguous):
        n = shape[-1]
        if math.prod(shape[:-1]) > 1:     # rows one element apart: not contiguous
            strided = np.empty(shape[:-1] + (n + 1,), dtype)[..., :n]
        else:                             # one row: a stride of two elements
            strided = np.empty(shape[:-1] + (2 * n,), dtype)[..., ::2]
        strided[...] = view
        view = strided
        view.flags.writeable = False
    return view


def _rules(opts) -> tuple[bool, bool, bool]:
    """``(causal, window has lo, window has hi)``: which rules the call has, whether they are
    the call's own (``opts.causal_offset``, ``opts.window``) or per sequence
    (``opts.sequences``)."""
    seq = opts.sequences
    if seq is None:
        lo, hi = opts.window if opts.window is not None else (None, None)
        return opts.causal_offset is not None, lo is not None, hi is not None
    left, right = seq.window if seq.window is not None else (-1, -1)
    return bool(seq.causal), left >= 0, right >= 0


def span_table(opts, B: int, L: int, S: int) -> np.ndarray:
    """The work's spans, int64 ``(N, len(SPAN_COLUMNS))``: per sequence (``opts.sequences``), or
    per batch row, its batch row ``b``, query rows ``q0 : q1``, key rows ``k0 : k1``, ALiBi
    slope row, and its rules in the 4-D view's rows and columns: key ``j`` kept for query
    ``i`` iff ``j <= i + causal`` (with the causal rule) and ``lo <= j - i <= hi`` (with the
    window), ALiBi bias ``-slope |i - j + dist|``.

    For a sequence of ``l = q1 - q0`` queries and ``s = k1 - k0`` keys with the alignment's
    offset ``c`` (``s - l`` lower-right, else 0) and FlashAttention's window
    ``(left, right)``: ``causal = c + k0 - q0``, ``lo = c - left + k0 - q0``,
    ``hi = c + right + k0 - q0``, ``dist = s - l + k0 - q0``, which is the rule of
    ``docs/cores/sdpa.md`` ("Packed and padded sequences") with positions counted from
    each sequence's start.  Unused rules hold 0.

    Examples
    --------
    >>> from refattn.cores.sdpa.api import SDPAOptions
    >>> span_table(SDPAOptions(scale=1.0, causal_offset=2), B=2, L=3, S=5)[:, :7].tolist()
    [[0, 0, 3, 0, 5, 0, 2], [1, 0, 3, 0, 5, 1, 2]]
    """
    seq = opts.sequences
    if seq is None:
        table = np.zeros((B, len(SPAN_COLUMNS)), np.int64)
        table[:, SPAN_B] = table[:, SPAN_ROW] = np.arange(B)
        table[:, SPAN_Q1], table[:, SPAN_K1] = L, S
        lo, hi = opts.window if opts.window is not None else (None, None)
        table[:, SPAN_CAUSAL] = 0 if opts.causal_offset is None else int(opts.causal_offset)
        table[:, SPAN_LO] = 0 if lo is None else int(lo)
        table[:, SPAN_HI] = 0 if hi is None else int(hi)
        table[:, SPAN_DIST] = S - L if opts.alibi_offset is None else int(opts.alibi_offset)
        return table
    spans = np.asarray(seq.spans, dtype=np.int64).reshape(-1, 5)      # (b, q0, q1, k0, k1)
    table = np.zeros((spans.shape[0], len(SPAN_COLUMNS)), np.int64)
    table[:, :5] = spans
    table[:, SPAN_ROW] = np.arange(spans.shape[0])
    lq, lk = spans[:, 2] - spans[:, 1], spans[:, 4] - spans[:, 3]
    shift = spans[:, 3] - spans[:, 1]                     # k0 - q0: local -> global offsets
    offset = (lk - lq if seq.lower_right else 0) + shift
    left, right = seq.window if seq.window is not None else (-1, -1)
    table[:, SPAN_CAUSAL] = offset if seq.causal else 0
    table[:, SPAN_LO] = offset - left if left >= 0 else 0
    table[:, SPAN_HI] = offset + right if right >= 0 else 0
    table[:, SPAN_DIST] = lk - lq + shift
    return table


def _modifiers(opts, dtype):
    """The score modifiers as one tuple of fixed types (one compiled signature per dtype).

    ``(has_mask, has_bias, has_softcap, has_alibi, causal offset, window lo, window hi,
    softcap, 1/softcap, ALiBi distance offset, -inf, window has lo, window has hi,
    has mask_mod, has score_mod, ALiBi slope row, the functions' b, first query row, first
    key row)``.  The offsets, bounds, rows and origins are 0 here: the kernels take each
    span's own (:func:`_span_modifiers`, from :func:`span_table`): ``mask_mod`` and
    ``score_mod`` see the span's row (the batch row, or the sequence) as ``b`` and positions
    counted from the span's first query and key, as on the reference backend.
    """
    _, has_lo, has_hi = _rules(opts)
    cap = opts.softcap if opts.softcap is not None else 1.0
    return (opts.mask is not None, opts.bias is not None, opts.softcap is not None,
            opts.alibi is not None, 0, 0, 0, dtype.type(cap), dtype.type(1.0 / cap), 0,
            dtype.type(-np.inf), has_lo, has_hi, opts.mask_mod is not None,
            opts.score_mod is not None, 0, 0, 0, 0)


def _operands(q, k, v, opts):
    dtype = q.dtype
    B, H, L, _ = q.shape
    S = k.shape[2]
    scores = (B, H, L, S)
    slopes = (np.zeros((1, 1), dtype) if opts.alibi is None else    # (B|1, H), or (N|1, H)
              np.ascontiguousarray(np.asarray(opts.alibi, dtype=dtype)[:, :, 0, 0]))
    return dict(
        mask=_broadcast(opts.mask, scores, np.bool_),
        bias=_broadcast(opts.bias, scores, dtype),
        drop=_broadcast(opts.dropout_mask, scores, np.bool_),
        slopes=slopes,
        mods=_modifiers(opts, dtype),
        has_drop=opts.dropout_mask is not None,
        causal=_rules(opts)[0],
        scale=dtype.type(opts.scale),
        drop_scale=dtype.type(opts.dropout_scale),
        spans=span_table(opts, B, L, S),
    )


def _longest(spans) -> tuple[int, int]:
    """``(queries, keys)`` of the longest query and key range of the spans."""
    return (int((spans[:, SPAN_Q1] - spans[:, SPAN_Q0]).max(initial=0)),
            int((spans[:, SPAN_K1] - spans[:, SPAN_K0]).max(initial=0)))


def _tiles(opts, pass_name, dtype, L, S, E, Ev):
    """The call's ``tiles``, else the shape tuned for this machine, else the default."""
    if opts.tiles is not None:
        return opts.tiles
    if min(L, S) < TUNE_MIN_LEN:
        return DEFAULT_TILES
    problem: list = []                           # built at the first measurement only

    def seconds(tiles):
        if not problem:
            rng = np.random.default_rng(0)
            H, n = num_threads(), 1024           # one head per thread, 4 tiles of the largest
            problem.extend(rng.standard_normal((1, H, n, d)).astype(dtype)
                           for d in (E, E, Ev, Ev))
        q, k, v, do = problem
        probe = type(opts)(scale=opts.scale, tiles=tuple(tiles))
        start = time.perf_counter()
        o, lse = forward(q, k, v, probe)
        if pass_name == "backward":
            start = time.perf_counter()
            backward(q, k, v, o, lse, do, probe)
        return time.perf_counter() - start

    name = f"sdpa-numba-tiles:{pass_name}:{np.dtype(dtype).name}:E{E}:Ev{Ev}"
    return tuple(tuned_choice(name, TILE_CANDIDATES, seconds))


def _kernels(opts, dtype) -> dict:
    """``{name: dispatcher}`` of :data:`MOD_KERNELS` for this call: the module's own (cached)
    kernels, or, with ``mask_mod``/``score_mod``, uncached copies bound to the call's compiled
    functions (:func:`.numba_mods.kernels`, built once per set of functions)."""
    if opts.mask_mod is None and opts.score_mod is None:
        return _DEFAULT_KERNELS
    return numba_mods.kernels(globals(), MOD_KERNELS, np.dtype(dtype), mask_mod=opts.mask_mod,
                              score_mod=opts.score_mod, score_mod_grad=opts.score_mod_grad)


def _forward_items(spans, H, block_q, rules):
    """``(items, costs)`` of the forward: every (span, head, query tile) of a span with
    queries, ``t = (n H + h) n_qt + tile`` (``n_qt`` the tiles of the longest query range),
    the tiles of a head in zig-zag order (0, n-1, 1, n-2, ...: under the causal rule
    neighbours then cost about the same, so
    :func:`~refattn.backends.numba_support.split_items` cuts evenly), and the keys each tile
    visits (times its queries) as its cost."""
    causal, has_lo, has_hi = rules
    q0, q1, k0, k1 = (spans[:, c][:, None] for c in (SPAN_Q0, SPAN_Q1, SPAN_K0, SPAN_K1))
    tiles_of = -(-(q1 - q0) // block_q)                       # (N, 1)
    n_qt = max(1, int(tiles_of.max(initial=0)))
    rank = np.arange(n_qt)[None, :]
    tiles = np.where(rank % 2 == 0, rank // 2, tiles_of - 1 - rank // 2)       # (N, n_qt)
    i0 = q0 + tiles * block_q
    i1 = np.minimum(q1, i0 + block_q)
    key_start, key_end = np.broadcast_to(k0, i0.shape), np.broadcast_to(k1, i0.shape)
    if causal:
        key_end = np.minimum(k1, np.maximum(k0, i1 + spans[:, SPAN_CAUSAL][:, None]))
    if has_hi:
        key_end = np.minimum(key_end, np.maximum(k0, i1 + spans[:, SPAN_HI][:, None]))
    if has_lo:
        key_start = np.minimum(key_end, np.maximum(k0, i0 + spans[:, SPAN_LO][:, None]))
    cost = (i1 - i0) * (key_end - key_start + 1)
    valid = np.broadcast_to(rank < tiles_of, cost.shape)      # (N, n_qt)
    heads = np.arange(H)[None, :, None]
    items = (np.arange(spans.shape[0])[:, None, None] * H + heads) * n_qt + tiles[:, None, :]
    keep = np.broadcast_to(valid[:, None, :], items.shape)
    return items[keep], np.broadcast_to(cost[:, None, :], items.shape)[keep]


def _has_dtype(signatures, dtype) -> bool:
    """Whether a kernel signature (its first argument: ``q``) is of ``dtype``."""
    wanted = numba.from_dtype(dtype)
    return any(sig[0].dtype == wanted for sig in signatures)


def _compile_backward_ahead(kernel, dtype) -> None:
    """On a cache without this dtype's forward and backward kernels, compile the backward in
    a worker process while this one compiles the forward
    (:mod:`refattn.backends.compile_ahead`): a backward
    call then loads it from the cache."""
    signatures = getattr(kernel, "signatures", None)    # None: NUMBA_DISABLE_JIT
    if (kernel is not _forward_kernel or signatures is None or _has_dtype(signatures, dtype)
            or not compile_ahead.enabled()):
        return
    if any(_has_dtype(cached_signatures(k)["here"], dtype)
           for k in (_forward_kernel, _backward_kernel)):
        return
    name = np.dtype(dtype).name
    compile_ahead.start(f"sdpa numba backward {name}",
                        f"from refattn.cores.sdpa.api import compile_numba_backward\n"
                        f"compile_numba_backward({name!r})")


def forward(q, k, v, opts):
    """``(o (B, H, L, Ev), lse (B, H, L))``; see :mod:`refattn.cores.sdpa.api`.

    With ``opts.sequences`` all sequences run in one :func:`run_split`; rows outside every
    sequence give ``o = 0``, ``lse = -inf``.
    """
    dtype = q.dtype
    q, k, v = (_c(x, dtype) for x in (q, k, v))
    B, H, L, _ = q.shape
    ops = _operands(q, k, v, opts)
    spans = ops["spans"]
    if opts.sequences is None:
        o = np.empty((B, H, L, v.shape[3]), dtype)
        lse = np.empty((B, H, L), dtype)
    else:                                        # the kernel writes the sequences' rows only
        o = np.zeros((B, H, L, v.shape[3]), dtype)
        lse = np.full((B, H, L), -np.inf, dtype)
    block_q, block_k = _tiles(opts, "forward", dtype, *_longest(spans), q.shape[3], v.shape[3])
    kernel = _kernels(opts, dtype)["_forward_kernel"]
    _compile_backward_ahead(kernel, dtype)
    items, costs = _forward_items(spans, H, block_q, _rules(opts))
    run_split(kernel, (q, k, v, ops["mask"], ops["bias"], ops["slopes"], ops["drop"], ops["mods"],
                       ops["has_drop"], ops["causal"], ops["scale"], ops["drop_scale"], block_q,
                       block_k, spans, o, lse), items, costs)
    return o, lse


@jit
def _products_kernel(q, k, v, scale, block_q, block_k, o, items):
    """The forward's tile products alone, over the same work ``items`` as
    :func:`_forward_kernel` (no causal rule, no masks, no softmax): ``O_i = sum_j (scale Q_i
    K_j^T) V_j``, the bound of :func:`forward_products`."""
    _, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    n_qt = (L + block_q - 1) // block_q
    q_buf = np.empty((block_q, E), q.dtype)
    acc_buf = np.empty((block_q, Ev), q.dtype)
    s_buf = np.empty(block_q * block_k, q.dtype)
    for t in items:
        bh, qt = t // n_qt, t % n_qt
        b, h = bh // H, bh % H
        hk = h // group
        i0 = qt * block_q
        nr = min(L, i0 + block_q) - i0
        q_tile = q_buf[:nr]
        for r in range(nr):
            for e in range(E):
                q_tile[r, e] = q[b, h, i0 + r, e] * scale
        acc = acc_buf[:nr]
        acc[...] = 0
        for j0 in range(0, S, block_k):
            nc = min(S, j0 + block_k) - j0
            s = s_buf[:nr * nc].reshape((nr, nc))                # scores (nr, nc)
            gemm(s, q_tile, False, k[b, hk, j0:j0 + nc], True, False)
            gemm(acc, s, False, v[b, hk, j0:j0 + nc], False, True)
        o[b, h, i0:i0 + nr] = acc


def forward_products(q, k, v, opts):
    """The tile products of a non-causal :func:`forward` alone: its speed bound.

    Runs the two products per tile pair that the forward runs (``S = (scale Q_i) K_j^T``,
    ``acc += S V_j``) on the same tiles, work items and threads, without the soft-max; the
    ``sdpa-vs-torch`` study times it beside the forward, so the share of the GEMM ceiling
    that the products themselves reach is measured in the same run.  Returns the
    unnormalised ``(B, H, L, Ev)`` sums (not attention).
    """
    dtype = q.dtype
    q, k, v = (_c(x, dtype) for x in (q, k, v))
    B, H, L, _ = q.shape
    o = np.empty((B, H, L, v.shape[3]), dtype)
    block_q, block_k = _tiles(opts, "forward", dtype, L, k.shape[2], q.shape[3], v.shape[3])
    # one span per batch row: the items of _forward_kernel are t = (b H + h) n_qt + tile
    items, costs = _forward_items(span_table(opts, B, L, k.shape[2]), H, block_q,
                                  _rules(opts))
    run_split(_products_kernel, (q, k, v, dtype.type(opts.scale), block_q, block_k, o), items,
              costs)
    return o


def _chunks(work_items: int, key_tiles: int) -> int:
    """Key-tile chunks per (span, kv head) so that every thread gets equal work."""
    threads = num_threads()
    return max(1, min(key_tiles, threads // math.gcd(max(work_items, 1), threads)))


def _backward_items(spans, Hkv, block_q, block_k, n_chunks, rules):
    """``(items, costs)`` of the backward: every (span, kv head, key-tile chunk) of a span
    with queries and keys, ``t = (n Hkv + kv head) n_chunks + chunk``, chunk ``c`` owning
    the span's key tiles ``c, c + n_chunks, ...``; the cost is the number of
    (query tile, key tile) pairs the chunk visits."""
    causal, has_lo, has_hi = rules
    q0, q1, k0, k1 = (spans[:, c][:, None] for c in (SPAN_Q0, SPAN_Q1, SPAN_K0, SPAN_K1))
    n_kt = -(-(k1 - k0) // block_k)                           # (N, 1)
    width = -(-max(1, int(n_kt.max(initial=0))) // n_chunks) * n_chunks
    jt = np.arange(width)[None, :]
    j0 = k0 + jt * block_k
    j1 = np.minimum(k1, j0 + block_k)
    first_query, end_query = np.broadcast_to(q0, j0.shape), np.broadcast_to(q1, j0.shape)
    if causal:
        first_query = np.maximum(q0, j0 - spans[:, SPAN_CAUSAL][:, None])
    if has_hi:
        first_query = np.maximum(first_query, j0 - spans[:, SPAN_HI][:, None])
    if has_lo:
        end_query = np.minimum(q1, np.maximum(q0, j1 - spans[:, SPAN_LO][:, None]))
    pairs = np.maximum(0, -(-(end_query - q0) // block_q) - (first_query - q0) // block_q) + 1
    pairs = np.where(jt < n_kt, pairs, 0)                     # (N, width)
    chunk_cost = pairs.reshape(spans.shape[0], -1, n_chunks).sum(axis=1)      # (N, n_chunks)
    chunk = np.arange(n_chunks)[None, None, :]
    items = (np.arange(spans.shape[0])[:, None, None] * Hkv
             + np.arange(Hkv)[None, :, None]) * n_chunks + chunk
    keep = np.broadcast_to((chunk < n_kt[:, :, None]) & (q1 > q0)[:, :, None], items.shape)
    return items[keep], np.broadcast_to(chunk_cost[:, None, :], items.shape)[keep]


def _centres_slopes(opts) -> bool:
    """Whether the ALiBi slope gradient may take each row's centre off its terms
    (:func:`_backward_step`): only where the rows of dS sum to 0, i.e. the call holds every
    key of its rows (no ``alibi_offset`` of a sharded block) and dS is not multiplied by
    ``score_mod_grad``."""
    return opts.alibi_offset is None and opts.score_mod is None


def backward(q, k, v, o, lse, do, opts):
    """``(dq, dk, dv, dscores, dslopes)``; see :mod:`refattn.cores.sdpa.api`.

    ``dslopes`` is ``(B, H)``, or ``(N, H)`` per sequence with ``opts.sequences``, whose
    sequences all run in one :func:`run_split` (rows outside every sequence get 0).
    """
    if opts.score_mod is not None and opts.score_mod_grad is None:
        raise ValueError("the gradient through score_mod= needs its derivative: pass "
                         "score_mod_grad(score, b, h, i, j) = d score_mod / d score")
    dtype = q.dtype
    kernel = _kernels(opts, dtype)["_backward_kernel"]
    q, k, v, o, lse, do = (_c(x, dtype) for x in (q, k, v, o, lse, do))
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    ops = _operands(q, k, v, opts)
    spans = ops["spans"]
    longest_q, longest_k = _longest(spans)
    block_q, block_k = _tiles(opts, "backward", dtype, longest_q, longest_k, E, Ev)
    working = int(np.count_nonzero((spans[:, SPAN_Q1] > spans[:, SPAN_Q0])
                                   & (spans[:, SPAN_K1] > spans[:, SPAN_K0])))
    n_chunks = _chunks(working * Hkv, -(-longest_k // block_k))
    dq_parts = np.zeros((n_chunks, B, H, L, E), dtype)
    # the kernel writes the key rows of the spans with queries (every row without sequences)
    every_row = opts.sequences is None and L > 0
    dk = np.empty_like(k) if every_row else np.zeros_like(k)
    dv = np.empty_like(v) if every_row else np.zeros_like(v)
    q_scaled = q * ops["scale"]                   # (B, H, L, E): O(L) per head
    need_ds = bool(opts.need_bias_grad)
    dscores = np.zeros((B, H, L, S) if need_ds else (1, 1, 1, 1), dtype)
    row_dot = np.einsum("bhle,bhle->bhl", do, o)     # D = rowsum(dO * O), (B, H, L)
    slope_rows = spans.shape[0]                      # B, or N sequences
    dslope_parts = np.zeros((n_chunks, slope_rows, H) if opts.need_alibi_grad else (1, 1, 1),
                            dtype)
    items, costs = _backward_items(spans, Hkv, block_q, block_k, n_chunks, _rules(opts))
    run_split(kernel, (q_scaled, k, v, do, lse, row_dot, ops["mask"], ops["bias"], ops["slopes"],
                       ops["drop"], ops["mods"], ops["has_drop"], ops["causal"], ops["scale"],
                       ops["drop_scale"], block_q, block_k, n_chunks, need_ds,
                       np.bool_(_centres_slopes(opts)), spans, dq_parts, dk, dv, dscores,
                       dslope_parts), items, costs)
    dq = dq_parts[0] if n_chunks == 1 else dq_parts.sum(axis=0)    # (B, H, L, E)
    dq *= ops["scale"]
    dslopes = dslope_parts.sum(axis=0) if opts.need_alibi_grad else None    # (B | N, H)
    return dq, dk, dv, (dscores if need_ds else None), dslopes
