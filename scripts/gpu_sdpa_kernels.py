"""GPU diagnostics of the CuPy SDPA kernels (run on a CUDA machine; not part of the tests).

Prints, for each element type / float32 math at (B, H, L, E) = (4, 16, 4096, 64):
registers and local-memory bytes (spills) of each kernel, the forward and backward
times (CuPy events, median of repeats) and TFLOP/s, and the error against a float64
recomputation on a slice.  Usage: ``python scripts/gpu_sdpa_kernels.py [B H L E]``.
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

from refattn.cores.sdpa import api
from refattn.cores.sdpa import cupy as sdpa_cupy


def bench(fn, repeats=10):
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
    return float(np.median(times))


def main(B=4, H=16, L=4096, E=64):
    rng = cp.random.default_rng(0)
    print(f"(B, H, L, E) = ({B}, {H}, {L}, {E}), device "
          f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    for dtype, math in (("float16", None), ("float32", "tf32x3"), ("float32", "simt"),
                        ("float64", None)):
        if dtype == "float64" and L > 2048:
            L_, B_ = 2048, 1
        else:
            L_, B_ = L, B
        cfg = sdpa_cupy.kernel_config(dtype, E, E, math)
        q, k, v, do = (rng.standard_normal((B_, H, L_, E), dtype=np.float32).astype(dtype)
                       for _ in range(4))
        for causal in (False, True):
            o, res = api.forward(q, k, v, causal=causal, backend="cupy", float32_math=math)
            grads = api.backward(res, do)
            cp.cuda.Device().synchronize()
            fwd = bench(lambda: api.forward(q, k, v, causal=causal, backend="cupy",
                                            float32_math=math))
            bwd = bench(lambda: api.backward(res, do))
            flops = api.flops((B_,), H, L_, L_, E, E, causal=causal)
            # float64 check on the first (batch, head) and 256 queries.
            q64, k64, v64, do64 = (x[0, 0].astype(np.float64) for x in (q, k, v, do))
            s = q64[:256] @ k64.T / np.sqrt(E)
            if causal:
                s = cp.where(cp.tril(cp.ones((256, L_), dtype=bool)), s, -cp.inf)
            p = cp.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o_ref = p @ v64
            err = float(cp.abs(o[0, 0, :256] - o_ref).max() / cp.abs(o_ref).max())
            dp = do64[:256] @ v64.T
            ds = p * (dp - (do64[:256] * o_ref).sum(-1, keepdims=True))
            dq_ref = ds @ k64 / np.sqrt(E)
            gerr = float(cp.abs(grads[0][0, 0, :256] - dq_ref).max() / cp.abs(dq_ref).max())
            print(f"{dtype:8s} {math or '':6s} causal={causal!s:5s} fwd {fwd * 1e3:8.3f} ms "
                  f"{flops / fwd / 1e12:6.1f} TF/s | bwd {bwd * 1e3:8.3f} ms "
                  f"{2.5 * flops / bwd / 1e12:6.1f} TF/s | rel err o {err:.1e} dq {gerr:.1e}")
        for name in ("fwd", "bwd"):
            fn = sdpa_cupy.SOURCE.function(cfg[name])
            print(f"    {cfg[name]:28s} regs {fn.num_regs:4d} local bytes {fn.local_size_bytes:5d} "
                  f"smem {cfg[name + '_smem']}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
