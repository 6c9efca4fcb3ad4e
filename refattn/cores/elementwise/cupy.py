"""Element-wise attention, CuPy backend: fused CUDA kernels (``elementwise.cu`` beside this file).

Implements the backend contract of :mod:`refattn.cores.elementwise.api` on CuPy
arrays (``psi = sqrt(scale) q``, ``kappa = sqrt(scale) k``).  The kernels are the
loops of :mod:`refattn.cores.elementwise.numba`, one thread per output element:

* exact form: one thread per (batch, head, query, channel) runs two passes over
  the keys (row max, then the sums) and saves the per-channel log-sum-exp; the
  backward pass recomputes the weights from it, one kernel for ``dq`` (a thread
  per query and channel, loop over keys) and one for ``dk, dv`` (a thread per key
  and channel, loop over the queries that see it).  O(L S D) time, O(L D) memory:
  never an ``L x S`` array.
* Taylor form: one thread per (batch, head, channel) scans the sequence with the
  ``2 (t + 1)`` shifted moments in registers (the order is a template parameter);
  the backward pass reruns the scan for ``dq`` and runs the reversed scan (suffix
  sums over queries) for ``dk, dv``.  O(t (L + S) D) time, O(L D) memory.  The
  scan is sequential in the sequence, so a problem has only ``B H D`` threads:
  plenty for wide batches, few for one long sequence.

Sums accumulate in float64 for every input dtype (as the numba kernels, for the
same reason: a float32 sum over ``S`` terms may lose ``S 2^-24`` relative).
float16 inputs run the float32 kernels (upcast on the device); the output is cast
back and ``saved`` stays in float32.  Per-query-head ``dk, dv`` are summed over
GQA groups afterwards.  Nothing leaves the device.
"""

from __future__ import annotations

import os

import numpy as np

from ...backends import cupy_support as cs
from .taylor import check_order as _check_order

__all__ = ["forward", "backward", "kernel_names", "SOURCE"]

_EXACT_THREADS = 128     # threads per block, exact kernels (a thread per output element)
_SCAN_THREADS = 32       # threads per block, Taylor scans: few threads, spread them over SMs


def _ctype(dtype) -> str:
    """C type of the kernels for a storage dtype (float16 runs as float32)."""
    name = np.dtype(dtype).name
    if name in ("float16", "float32"):
        return "float"
    if name == "float64":
        return "double"
    raise TypeError(f"backend='cupy' supports float16, float32 and float64, got {name}")


def kernel_names(dtype, order=None) -> dict:
    """Template name expressions of the kernels for ``dtype`` and ``order`` (None: exact).

    Returns
    -------
    dict with ``fwd`` and ``bwd`` (Taylor: one kernel each) or ``fwd``, ``dq`` and
    ``dkdv`` (exact).
    """
    ct = _ctype(dtype)
    if order is None:
        return {"fwd": f"ew_exact_fwd<{ct}>", "dq": f"ew_exact_dq<{ct}>",
                "dkdv": f"ew_exact_dkdv<{ct}>"}
    order = _check_order(order)
    return {"fwd": f"ew_taylor_fwd<{ct},{order}>", "bwd": f"ew_taylor_bwd<{ct},{order}>"}


def _instantiations():
    """Each kernel for both C types; Taylor orders 2 (shortest loops) and 6, 8."""
    names = []
    for dtype in ("float32", "float64"):
        for order in (None, 2, 6, 8):
            names += kernel_names(dtype, order).values()
    return tuple(names)


SOURCE = cs.KernelSource(os.path.join(os.path.dirname(__file__), "elementwise.cu"),
                         _instantiations)


def _launch(name, n_threads, block, args):
    if n_threads > 0:
        SOURCE.function(name)((-(-n_threads // block),), (block,), args)


def _work(cp, *arrays):
    """C-contiguous operands in the kernels' type (float16 -> float32; no copy otherwise)."""
    return tuple(cp.ascontiguousarray(a, dtype=np.float32 if a.dtype == np.float16 else a.dtype)
                 for a in arrays)


def _common_args(cp, q, k, opts):
    """Mask pointer and strides, sizes and causal flag/offset shared by every kernel."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask = opts.mask
    if mask is None:
        mask_args = [cs.NULL] + [np.int64(0)] * 4
    else:
        mask = cp.asarray(mask)
        if mask.dtype != np.bool_:
            mask = mask.astype(np.bool_)
        mask_args = [mask] + [np.int64(s) for s in cs.strides4(mask)]
    causal = opts.causal_offset is not None
    return mask_args + list(cs.scalar_args(B, H, Hkv, L, S, D, int(causal),
                                           int(opts.causal_offset) if causal else 0))


def forward(q, k, v, opts):
    cp = cs.cupy()
    dtype = q.dtype
    q, k, v = _work(cp, q, k, v)
    B, H, L, D = q.shape
    names = kernel_names(q.dtype, opts.order)
    common = _common_args(cp, q, k, opts)
    o = cp.empty_like(q)
    if opts.order is None:
        lse = cp.empty_like(q)
        _launch(names["fwd"], q.size, _EXACT_THREADS, [q, k, v] + common + [o, lse])
        saved = (lse,)
    else:
        m, den = cp.empty_like(q), cp.empty_like(q)
        _launch(names["fwd"], B * H * D if L else 0, _SCAN_THREADS,
                [q, k, v] + common + [o, m, den])
        saved = (m, den)
    # saved stays in float32 for float16 inputs (lse up to ~100 would round in steps of 0.06)
    return o.astype(dtype, copy=False), saved


def _reduce_groups(g, kv_heads):
    """``(B, H, S, D) -> (B, Hkv, S, D)``: sum each group of query heads."""
    B, H, S, D = g.shape
    if H == kv_heads:
        return g
    return g.reshape(B, kv_heads, H // kv_heads, S, D).sum(axis=2)   # (B, Hkv, group, S, D)


def backward(q, k, v, o, saved, do, opts):
    cp = cs.cupy()
    dtype = q.dtype
    q, k, v, o, do = _work(cp, q, k, v, o, do)
    saved = _work(cp, *saved)
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    names = kernel_names(q.dtype, opts.order)
    common = _common_args(cp, q, k, opts)
    dq = cp.empty_like(q)
    dk = cp.empty((B, H, S, D), dtype=q.dtype)        # per query head
    dv = cp.empty((B, H, S, D), dtype=q.dtype)
    if opts.order is None:
        (lse,) = saved
        _launch(names["dq"], dq.size, _EXACT_THREADS, [q, k, v, o, lse, do] + common + [dq])
        _launch(names["dkdv"], dk.size, _EXACT_THREADS,
                [q, k, v, o, lse, do] + common + [dk, dv])
    else:
        m, den = saved
        if L == 0:                                    # no query: nothing sees any key
            dk.fill(0)
            dv.fill(0)
        else:
            _launch(names["bwd"], B * H * D, _SCAN_THREADS,
                    [q, k, v, o, m, den, do] + common + [dq, dk, dv])
    out = (dq, _reduce_groups(dk, Hkv), _reduce_groups(dv, Hkv))
    return tuple(g.astype(dtype, copy=False) for g in out)
