"""Element-wise attention, Numba backend: fused CPU kernels, O(L D) memory.

Implements the backend contract of :mod:`refattn.cores.elementwise.api` on
NumPy float32/float64 arrays (``psi = sqrt(scale) q``, ``kappa = sqrt(scale) k``).

* exact form: for each query, one pass over the keys with per-channel online
  softmax accumulators (running max, sum, weighted sum): O(L S D) time, no
  ``L x S`` array; the backward pass recomputes the weights from the saved
  per-channel log-sum-exp (FlashAttention-2 style), one kernel for ``dq``
  (loop over keys) and one for ``dk, dv`` (loop over queries).
* Taylor form: a scan per (batch, head, channel) carrying the ``2 (t + 1)``
  shifted moments: keys enter as the causal frontier reaches them, each query
  reads a Horner polynomial.  The backward pass reruns the scan for ``dq`` and
  runs the reversed scan (suffix sums over queries) for ``dk, dv``.

Accumulators are float64 for both input dtypes: a scalar scan gains nothing
from float32 registers, and a prefix sum over 65536 keys in float32 would lose
up to ``L * 2^-24 ~ 4e-3`` relative.  The kernels see C-contiguous arrays only
(:func:`_as_kernel_input`; a layer's head-split views are not contiguous and are
copied once): one compiled signature per kernel and dtype instead of one per
dtype x array layout, which removed 4 of the 8 Taylor-kernel compilations of a cold
``refattn`` run (docs/benchmarks.md, "Cold start").  Widening float32 inputs to float64 as
well (one signature per kernel) was measured and rejected: the float32 Taylor
kernels run 1.6-1.8x faster than on widened inputs.  Parallelism: the kernels are serial
``nogil`` loops over work items, batch x heads x tiles of 32 queries or keys (exact) or
batch x heads x blocks of 16 channels (Taylor), cut into one run of about equal cost per
thread and run on a thread pool (:func:`~refattn.backends.numba_support.run_split`); a
serial kernel compiles in about half the time of a ``prange`` one.
Per-query-head ``dk, dv`` are summed over GQA groups afterwards.
"""

from __future__ import annotations

import math

import numpy as np

from ...backends.numba_support import jit, run_split
from .taylor import taylor_coefficients

__all__ = ["forward", "backward"]

_TILE = 32          # queries (exact forward / dq) or keys (exact dk, dv) per parallel task
_CHANNELS = 16      # channels per Taylor scan task: contiguous loads, one state per channel
_NO_OFFSET = 1 << 62


def _visible_end(i, S, offset):
    """Keys ``[0, end)`` are visible to query ``i`` (before the mask)."""
    return min(S, max(0, i + offset + 1))


_visible_end = jit(_visible_end, inline="always")


@jit
def _exact_forward(q, k, v, keep, has_mask, offset, o, lse, items):
    B, H, L, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    tiles = (L + _TILE - 1) // _TILE
    for task in items:
        bh, tile = task // tiles, task % tiles
        b, h = bh // H, bh % H
        hk = h // group
        qi = np.empty(D)
        mx = np.empty(D)
        den = np.empty(D)
        acc = np.empty(D)
        for i in range(tile * _TILE, min(L, (tile + 1) * _TILE)):
            end = _visible_end(i, S, offset)
            for c in range(D):
                qi[c] = q[b, h, i, c]
            # two passes over the keys (row max, then sums): branch-free inner loops run
            # about twice as fast as an online softmax that rescales per channel
            mx[:] = -np.inf
            for j in range(end):
                if has_mask and not keep[b, h, i, j]:
                    continue
                for c in range(D):
                    d = qi[c] - np.float64(k[b, hk, j, c])
                    mx[c] = max(mx[c], -d * d)
            den[:] = 0.0
            acc[:] = 0.0
            for j in range(end):
                if has_mask and not keep[b, h, i, j]:
                    continue
                for c in range(D):
                    d = qi[c] - np.float64(k[b, hk, j, c])
                    e = math.exp(-d * d - mx[c])
                    den[c] += e
                    acc[c] += e * v[b, hk, j, c]
            for c in range(D):
                if den[c] > 0.0:
                    o[b, h, i, c] = acc[c] / den[c]
                    lse[b, h, i, c] = mx[c] + math.log(den[c])
                else:                                   # no key: o = 0, lse = -inf
                    o[b, h, i, c] = 0.0
                    lse[b, h, i, c] = -np.inf


@jit(inline="always")
def _lse_or_inf(x):
    """``lse`` with ``-inf`` (an empty row) mapped to ``+inf``, so ``exp(s - lse) = 0`` there."""
    return x if x > -np.inf else np.inf


@jit
def _exact_dq(q, k, v, o, lse, do, keep, has_mask, offset, dq, items):
    B, H, L, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    tiles = (L + _TILE - 1) // _TILE
    for task in items:
        bh, tile = task // tiles, task % tiles
        b, h = bh // H, bh % H
        hk = h // group
        acc = np.empty(D)
        for i in range(tile * _TILE, min(L, (tile + 1) * _TILE)):
            acc[:] = 0.0
            for j in range(_visible_end(i, S, offset)):
                if has_mask and not keep[b, h, i, j]:
                    continue
                for c in range(D):
                    d = np.float64(q[b, h, i, c]) - np.float64(k[b, hk, j, c])
                    p = math.exp(-d * d - _lse_or_inf(lse[b, h, i, c]))
                    # dS = P (dP - rowdot), dP = do_i v_j, rowdot = do_i o_i; dS/dpsi = -2 d
                    ds = p * do[b, h, i, c] * (v[b, hk, j, c] - o[b, h, i, c])
                    acc[c] -= 2.0 * ds * d
            for c in range(D):
                dq[b, h, i, c] = acc[c]


@jit
def _exact_dkdv(q, k, v, o, lse, do, keep, has_mask, offset, dk, dv, items):
    """Per query head: ``dk, dv (B, H, S, D)``."""
    B, H, L, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    tiles = (S + _TILE - 1) // _TILE
    for task in items:
        bh, tile = task // tiles, task % tiles
        b, h = bh // H, bh % H
        hk = h // group
        gk = np.empty(D)
        gv = np.empty(D)
        for j in range(tile * _TILE, min(S, (tile + 1) * _TILE)):
            gk[:] = 0.0
            gv[:] = 0.0
            first = 0 if offset == _NO_OFFSET else max(0, j - offset)   # j <= i + offset
            for i in range(first, L):
                if has_mask and not keep[b, h, i, j]:
                    continue
                for c in range(D):
                    d = np.float64(q[b, h, i, c]) - np.float64(k[b, hk, j, c])
                    p = math.exp(-d * d - _lse_or_inf(lse[b, h, i, c]))
                    g = do[b, h, i, c]
                    gv[c] += p * g
                    gk[c] += 2.0 * p * g * (v[b, hk, j, c] - o[b, h, i, c]) * d
            for c in range(D):
                dk[b, h, j, c] = gk[c]
                dv[b, h, j, c] = gv[c]


@jit(inline="always")
def _add_key(A, Bm, mu, cc, kk, vv, order):
    """Add one key to channel ``cc`` of the shifted moments ``A, Bm (t + 1, width)``."""
    x = kk * kk
    if x < mu[cc]:                                      # smaller kappa^2: shift down, rescale
        if mu[cc] < np.inf:
            r = math.exp(x - mu[cc])
            for n in range(order + 1):
                A[n, cc] *= r
                Bm[n, cc] *= r
        mu[cc] = x
    p = math.exp(mu[cc] - x)
    for n in range(order + 1):
        A[n, cc] += p * vv
        Bm[n, cc] += p
        p *= kk


@jit(inline="always")
def _add_keys_until(A, Bm, mu, k, v, keep, has_mask, b, h, hk, c0, added, end, order):
    """Add keys ``[added, end)`` (the kept ones) to channels ``c0 ...``; returns ``end``."""
    for j in range(added, end):
        if has_mask and not keep[b, h, 0, j]:
            continue
        for cc in range(mu.shape[0]):
            _add_key(A, Bm, mu, cc, np.float64(k[b, hk, j, c0 + cc]),
                     np.float64(v[b, hk, j, c0 + cc]), order)
    return max(added, end)


@jit
def _taylor_forward(q, k, v, keep, has_mask, offset, coeffs, o, m, den, items):
    B, H, L, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    order = coeffs.shape[0] - 1
    blocks = (D + _CHANNELS - 1) // _CHANNELS
    for task in items:
        b, h, c0 = task // (H * blocks), (task // blocks) % H, (task % blocks) * _CHANNELS
        width = min(D, c0 + _CHANNELS) - c0
        hk = h // group
        A = np.zeros((order + 1, width))
        Bm = np.zeros((order + 1, width))
        mu = np.full(width, np.inf)
        added = 0
        for i in range(L):
            added = _add_keys_until(A, Bm, mu, k, v, keep, has_mask, b, h, hk, c0, added,
                                    _visible_end(i, S, offset), order)
            for cc in range(width):
                c = c0 + cc
                if mu[cc] == np.inf:                    # no key yet
                    o[b, h, i, c] = 0.0
                    m[b, h, i, c] = np.inf
                    den[b, h, i, c] = 0.0
                    continue
                psi = np.float64(q[b, h, i, c])
                num = 0.0
                dd = 0.0
                for n in range(order, -1, -1):          # Horner in psi
                    num = num * psi + coeffs[n] * A[n, cc]
                    dd = dd * psi + coeffs[n] * Bm[n, cc]
                o[b, h, i, c] = num / dd
                m[b, h, i, c] = mu[cc]
                den[b, h, i, c] = dd


@jit
def _taylor_backward(q, k, v, o, m, den, do, keep, has_mask, offset, coeffs, dq, dk, dv, items):
    """``dq (B, H, L, D)``; per query head ``dk, dv (B, H, S, D)``."""
    B, H, L, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    order = coeffs.shape[0] - 1
    blocks = (D + _CHANNELS - 1) // _CHANNELS
    for task in items:
        b, h, c0 = task // (H * blocks), (task // blocks) % H, (task % blocks) * _CHANNELS
        width = min(D, c0 + _CHANNELS) - c0
        hk = h // group
        # forward sweep: dpsi_i = r_i sum_n n a_n psi^(n-1) (A_n - o_i B_n), r_i = do_i / den_i
        A = np.zeros((order + 1, width))
        Bm = np.zeros((order + 1, width))
        mu = np.full(width, np.inf)
        added = 0
        for i in range(L):
            added = _add_keys_until(A, Bm, mu, k, v, keep, has_mask, b, h, hk, c0, added,
                                    _visible_end(i, S, offset), order)
            for cc in range(width):
                c = c0 + cc
                if mu[cc] == np.inf:
                    dq[b, h, i, c] = 0.0
                    continue
                psi = np.float64(q[b, h, i, c])
                oi = np.float64(o[b, h, i, c])
                acc = 0.0
                for n in range(order, 0, -1):
                    acc = acc * psi + n * coeffs[n] * (A[n, cc] - oi * Bm[n, cc])
                dq[b, h, i, c] = do[b, h, i, c] / den[b, h, i, c] * acc
        # reversed sweep: suffix sums G_n = sum_i a_n psi_i^n r_i exp(m_i - nu), H_n = ... o_i
        G = np.zeros((order + 1, width))
        Hs = np.zeros((order + 1, width))
        nu = np.full(width, -np.inf)
        for j in range(_visible_end(L - 1, S, offset), S):   # keys no query sees
            for cc in range(width):
                dk[b, h, j, c0 + cc] = 0.0
                dv[b, h, j, c0 + cc] = 0.0
        for i in range(L - 1, -1, -1):
            for cc in range(width):
                c = c0 + cc
                mi = np.float64(m[b, h, i, c])
                if mi == np.inf:
                    continue
                if mi > nu[cc]:                         # m_i grows backwards: shift up
                    if nu[cc] > -np.inf:
                        r = math.exp(nu[cc] - mi)
                        for n in range(order + 1):
                            G[n, cc] *= r
                            Hs[n, cc] *= r
                    nu[cc] = mi
                p = do[b, h, i, c] / den[b, h, i, c] * math.exp(mi - nu[cc])
                psi = np.float64(q[b, h, i, c])
                oi = np.float64(o[b, h, i, c])
                for n in range(order + 1):
                    G[n, cc] += coeffs[n] * p
                    Hs[n, cc] += coeffs[n] * p * oi
                    p *= psi
            # keys first seen by query i: every query from i on sees them
            lo = 0 if i == 0 else _visible_end(i - 1, S, offset)
            for j in range(lo, _visible_end(i, S, offset)):
                kept = not has_mask or keep[b, h, 0, j]
                for cc in range(width):
                    c = c0 + cc
                    if not kept or nu[cc] == -np.inf:
                        dk[b, h, j, c] = 0.0
                        dv[b, h, j, c] = 0.0
                        continue
                    kk = np.float64(k[b, hk, j, c])
                    vv = np.float64(v[b, hk, j, c])
                    g = math.exp(nu[cc] - kk * kk)
                    gv = 0.0
                    gk = 0.0
                    pw = 1.0                            # kappa^n
                    pm = 0.0                            # n kappa^(n-1)
                    for n in range(order + 1):
                        gv += pw * G[n, cc]
                        # d/dkappa exp(-kappa^2) kappa^n
                        #     = exp(-kappa^2) (n kappa^(n-1) - 2 kappa^(n+1))
                        gk += (pm - 2.0 * pw * kk) * (vv * G[n, cc] - Hs[n, cc])
                        pm = (n + 1) * pw
                        pw *= kk
                    dk[b, h, j, c] = g * gk
                    dv[b, h, j, c] = g * gv


def _keep(mask, shape):
    """A broadcast (no copy) boolean view of ``shape`` and whether a mask was given."""
    if mask is None:
        return np.broadcast_to(np.ones((1, 1, 1, 1), dtype=bool), shape), False
    return np.broadcast_to(mask, shape), True


def _reduce_groups(g, kv_heads):
    """``(B, H, S, D) -> (B, Hkv, S, D)``: sum each group of query heads."""
    B, H, S, D = g.shape
    return g.reshape(B, kv_heads, H // kv_heads, S, D).sum(axis=2)


def _offset(opts):
    return _NO_OFFSET if opts.causal_offset is None else int(opts.causal_offset)


def _as_kernel_input(x):
    """``x`` C-contiguous, aligned and writeable, the kernels' one array layout (no copy if it is)."""
    return np.require(x, requirements=("C", "A", "W"))


def _tile_costs(n, first, end):
    """Cost of each tile of :data:`_TILE` rows: the rows' visited ranges ``end - first``
    summed (plus one per row); ``first``/``end`` are per row."""
    return np.add.reduceat(np.maximum(0, end - first) + 1, np.arange(0, n, _TILE))


def _query_items(B, H, L, S, offset):
    """``(items, costs)`` over batch x heads x query tiles: the keys each tile visits."""
    if L == 0:
        return np.arange(0), np.zeros(0)
    end = np.minimum(S, np.maximum(0, np.arange(L) + offset + 1))     # _visible_end
    costs = _tile_costs(L, 0, end)
    return np.arange(B * H * costs.size), np.tile(costs, B * H)


def _key_items(B, H, L, S, offset):
    """``(items, costs)`` over batch x heads x key tiles: the queries each tile visits."""
    if S == 0:
        return np.arange(0), np.zeros(0)
    first = np.zeros(S, np.int64) if offset == _NO_OFFSET else np.maximum(0, np.arange(S) - offset)
    costs = _tile_costs(S, first, L)
    return np.arange(B * H * costs.size), np.tile(costs, B * H)


def _channel_items(B, H, D):
    """``(items, costs)`` over batch x heads x blocks of :data:`_CHANNELS` (equal costs)."""
    n = B * H * (-(-D // _CHANNELS))
    return np.arange(n), np.ones(n)


def forward(q, k, v, opts):
    q, k, v = (_as_kernel_input(x) for x in (q, k, v))
    B, H, L, D = q.shape
    S = k.shape[2]
    o = np.empty_like(q)
    offset = _offset(opts)
    if opts.order is None:
        keep, has_mask = _keep(opts.mask, (B, H, L, S))
        lse = np.empty_like(q)
        run_split(_exact_forward, (q, k, v, keep, has_mask, offset, o, lse),
                  *_query_items(B, H, L, S, offset))
        return o, (lse,)
    keep, has_mask = _keep(opts.mask, (B, H, 1, S))
    m, den = np.empty_like(q), np.empty_like(q)
    coeffs = np.asarray(taylor_coefficients(opts.order), dtype=np.float64)
    run_split(_taylor_forward, (q, k, v, keep, has_mask, offset, coeffs, o, m, den),
              *_channel_items(B, H, D))
    return o, (m, den)


def backward(q, k, v, o, saved, do, opts):
    q, k, v, o, do = (_as_kernel_input(x) for x in (q, k, v, o, do))
    saved = tuple(_as_kernel_input(x) for x in saved)
    B, H, L, D = q.shape
    S = k.shape[2]
    dq = np.empty_like(q)
    dk = np.empty((B, H, S, D), dtype=q.dtype)
    dv = np.empty((B, H, S, D), dtype=q.dtype)
    offset = _offset(opts)
    if opts.order is None:
        keep, has_mask = _keep(opts.mask, (B, H, L, S))
        (lse,) = saved
        run_split(_exact_dq, (q, k, v, o, lse, do, keep, has_mask, offset, dq),
                  *_query_items(B, H, L, S, offset))
        run_split(_exact_dkdv, (q, k, v, o, lse, do, keep, has_mask, offset, dk, dv),
                  *_key_items(B, H, L, S, offset))
    else:
        keep, has_mask = _keep(opts.mask, (B, H, 1, S))
        m, den = saved
        coeffs = np.asarray(taylor_coefficients(opts.order), dtype=np.float64)
        run_split(_taylor_backward, (q, k, v, o, m, den, do, keep, has_mask, offset, coeffs, dq,
                                     dk, dv), *_channel_items(B, H, D))
    return dq, _reduce_groups(dk, k.shape[1]), _reduce_groups(dv, k.shape[1])
