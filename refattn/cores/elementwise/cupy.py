"""Element-wise attention, CuPy backend: fused CUDA kernels (``elementwise.cu`` beside this file).

Implements the backend contract of :mod:`refattn.cores.elementwise.api` on CuPy
arrays (``psi = sqrt(scale) q``, ``kappa = sqrt(scale) k``), float16, float32
and float64.

* exact form: one thread per (query, channel) runs an online softmax of
  ``-(psi_ic - kappa_jc)^2`` over the keys: O(L S D) time, O(L D) memory, never
  an ``L x S x D`` array; the backward pass recomputes the weights from the
  saved per-channel log-sum-exp, one kernel for ``dq`` (loop over keys) and one
  for ``dk, dv`` (loop over the queries of every head of the GQA group).
* Taylor form: one thread per (batch, head, channel) scans the sequence carrying
  the ``2 (t + 1)`` shifted moments in float64 (the Numba backend's algorithm),
  O(t L D); the backward pass reruns the scan for ``dq`` and runs the reversed
  scan (suffix sums over queries) for ``dk, dv``, summed over GQA groups after.

``saved`` is kept in float32 for float16 inputs (as the reference does).
"""

from __future__ import annotations

import os

import numpy as np

from ...backends import cupy_support as cs
from .api import taylor_coefficients

__all__ = ["forward", "backward", "SOURCE", "MAX_ORDER"]

#: Highest Taylor order the scan kernels hold moments for (thread-local arrays).
MAX_ORDER = 16

_THREADS = 128
_DT = {"float16": 0, "float32": 1, "float64": 2}
_KERNELS = ("ew_exact_fwd", "ew_exact_dq", "ew_exact_dkdv", "ew_taylor_fwd", "ew_taylor_bwd")

SOURCE = cs.KernelSource(
    os.path.join(os.path.dirname(__file__), "elementwise.cu"),
    lambda: tuple(f"{name}<{dt}>" for dt in _DT.values() for name in _KERNELS))


def _dt(dtype) -> int:
    name = np.dtype(dtype).name
    if name not in _DT:
        raise TypeError(f"backend='cupy' supports float16, float32 and float64, got {name}")
    return _DT[name]


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _launch(name, dtype, grid, args):
    fn = SOURCE.function(f"{name}<{_dt(dtype)}>")
    fn(grid, (_THREADS,), args)


def _mask_args(opts, H, Hkv, L, S, D):
    m = opts.mask
    args = [cs.pointer_or_null(m)]
    args += [np.int64(s) for s in (cs.strides4(m) if m is not None else (0, 0, 0, 0))]
    causal = opts.causal_offset is not None
    return args + list(cs.scalar_args(H, Hkv, L, S, D, int(causal),
                                      int(opts.causal_offset) if causal else 0))


def _blocks(n):
    return max(1, -(-n // _THREADS))


def _coefficients(order):
    if order > MAX_ORDER:
        raise ValueError(f"backend='cupy' supports Taylor orders up to {MAX_ORDER}, got {order}; "
                         "use backend='reference'")
    cp = cs.cupy()
    return cp.asarray(np.asarray(taylor_coefficients(order), dtype=np.float64))


def forward(q, k, v, opts):
    cp = cs.cupy()
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v = (cp.ascontiguousarray(x) for x in (q, k, v))
    o = cp.empty_like(q)
    acc = _acc(q.dtype)
    mask = _mask_args(opts, H, Hkv, L, S, D)
    if opts.order is None:
        lse = cp.empty(q.shape, dtype=acc)
        if o.size:
            _launch("ew_exact_fwd", q.dtype, (_blocks(L * D), B * H), [q, k, v, o, lse] + mask)
        return o, (lse,)
    coef = _coefficients(opts.order)
    m, den = cp.empty(q.shape, dtype=acc), cp.empty(q.shape, dtype=acc)
    if o.size:
        _launch("ew_taylor_fwd", q.dtype, (_blocks(B * H * D),),
                [q, k, v, coef, np.int32(opts.order), np.int32(B), o, m, den] + mask)
    return o, (m, den)


def backward(q, k, v, o, saved, do, opts):
    cp = cs.cupy()
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v, o, do = (cp.ascontiguousarray(x) for x in (q, k, v, o, do))
    acc = _acc(q.dtype)
    saved = tuple(cp.ascontiguousarray(s.astype(acc, copy=False)) for s in saved)
    mask = _mask_args(opts, H, Hkv, L, S, D)
    dq = cp.zeros_like(q)
    if opts.order is None:
        dk, dv = cp.zeros_like(k), cp.zeros_like(v)
        if q.size and k.size:
            (lse,) = saved
            _launch("ew_exact_dq", q.dtype, (_blocks(L * D), B * H),
                    [q, k, v, o, lse, do, dq] + mask)
            _launch("ew_exact_dkdv", q.dtype, (_blocks(S * D), B * Hkv),
                    [q, k, v, o, lse, do, dk, dv] + mask)
        return dq, dk, dv
    m, den = saved
    dk = cp.zeros((B, H, S, D), dtype=q.dtype)      # per query head, summed over groups below
    dv = cp.zeros((B, H, S, D), dtype=q.dtype)
    if q.size and k.size:
        _launch("ew_taylor_bwd", q.dtype, (_blocks(B * H * D),),
                [q, k, v, o, m, den, do, _coefficients(opts.order), np.int32(opts.order),
                 np.int32(B), dq, dk, dv] + mask)
    group = H // Hkv
    if group > 1:   # (B, H, S, D) -> (B, Hkv, group, S, D) -> sum over the group
        dk = dk.reshape(B, Hkv, group, S, D).sum(axis=2, dtype=acc).astype(q.dtype)
        dv = dv.reshape(B, Hkv, group, S, D).sum(axis=2, dtype=acc).astype(q.dtype)
    return dq, dk, dv
