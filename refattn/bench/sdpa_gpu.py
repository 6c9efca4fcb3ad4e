"""Study ``sdpa-gpu-vs-torch``: the CuPy kernels against PyTorch on the same GPU.

Throughput ratio = PyTorch time / refattn time (> 1: refattn is faster), for
float32 (PyTorch picks its memory-efficient kernel) and float16 (PyTorch's
FlashAttention kernel, forced), causal and not, forward and forward+backward.
Timed with device synchronisation around a batch of calls, contenders
interleaved in rounds (medians).  Targets (issue 8): float32 >= 1.0x, float16
>= 0.5x.  Without a CUDA device (or PyTorch built without CUDA) the study
reports itself skipped.
"""

from __future__ import annotations

import statistics
import time

from ..backends import cupy_support as cs
from ..cores.sdpa import api
from .study import Study, StudyResult

__all__ = ["STUDY", "run"]

SIZES = {"quick": (1, 8, 1024, 64), "full": (4, 16, 4096, 64)}
TARGETS = {"float32": 1.0, "float16": 0.5}


def _device_ready():

    if not cs.available():
        return "no CUDA device for CuPy"
    import torch

    if not torch.cuda.is_available():
        return "PyTorch has no CUDA device"
    return None


def _timer(sync, calls):
    def measure(fn):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls
    return measure


def _interleaved(contenders, measure, rounds):
    samples = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: compilation, allocator, autotuning
        measure(fn)
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(measure(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def run(size="quick") -> StudyResult:
    B, H, L, E = SIZES[size]
    title = (f"sdpa-gpu-vs-torch: (B, H, L, E) = ({B}, {H}, {L}, {E}), "
             "throughput ratio torch/refattn")
    headers = ["dtype", "causal", "pass", "refattn ms", "torch ms", "refattn TFLOP/s", "ratio",
               "target"]
    skipped = _device_ready()
    if skipped:
        return StudyResult(title, headers, [], notes=[f"skipped: {skipped}"])

    import cupy as cp
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel


    def sync():
        torch.cuda.synchronize()
        cp.cuda.Device().synchronize()

    measure = _timer(sync, calls=3 if size == "full" else 5)
    rows, metrics, failures = [], {}, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in ("float32", "float16"):
        tdtype = getattr(torch, dtype)
        q, k, v, do = (torch.randn(B, H, L, E, device="cuda", dtype=tdtype, generator=gen)
                       for _ in range(4))
        qc, kc, vc, doc = (cp.from_dlpack(x.detach()) for x in (q, k, v, do))
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        torch_backends = ([SDPBackend.FLASH_ATTENTION] if dtype == "float16" else
                          [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                           SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH])
        for causal in (False, True):
            def torch_fwd():
                with sdpa_kernel(torch_backends), torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def torch_fwd_bwd():
                with sdpa_kernel(torch_backends):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                return torch.autograd.grad(o, (qg, kg, vg), do)

            def ours_fwd():
                return api.sdpa(qc, kc, vc, causal=causal, backend="cupy")

            def ours_fwd_bwd():
                _, res = api.forward(qc, kc, vc, causal=causal, backend="cupy")
                return api.backward(res, doc)

            flops = api.flops((B,), H, L, L, E, E, causal=causal)
            for label, mine, theirs, work in (("fwd", ours_fwd, torch_fwd, flops),
                                              ("fwd+bwd", ours_fwd_bwd, torch_fwd_bwd,
                                               3.5 * flops)):
                t = _interleaved({"refattn": mine, "torch": theirs}, measure,
                                 rounds=5 if size == "full" else 3)
                ratio = t["torch"] / t["refattn"]
                key = f"{dtype}_{'causal' if causal else 'full'}_{label}"
                metrics[key] = ratio
                rows.append([dtype, causal, label, f"{1e3 * t['refattn']:.3f}",
                             f"{1e3 * t['torch']:.3f}", f"{work / t['refattn'] / 1e12:.1f}",
                             f"{ratio:.2f}x", f"{TARGETS[dtype]:.1f}x"])
                if size == "full" and ratio < TARGETS[dtype]:
                    failures.append(f"{key}: {ratio:.2f}x < {TARGETS[dtype]:.1f}x torch")
        del q, k, v, do, qc, kc, vc, doc, qg, kg, vg
    notes = [f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
             f"torch {torch.__version__}, cupy {cp.__version__}",
             "fwd+bwd FLOPs counted as 3.5x the forward's (FlashAttention-2 convention)",
             "float16 torch = FlashAttention (forced); float32 torch = its default choice"]
    return StudyResult(title, headers, rows, metrics=metrics, notes=notes, failures=failures)


STUDY = Study(
    name="sdpa-gpu-vs-torch",
    summary="CuPy SDPA kernels vs torch scaled_dot_product_attention on one GPU (ratios)",
    run=run,
    requires=("cupy", "torch"),
    metric_names=tuple(f"{dtype}_{mask}_{label}" for dtype in ("float32", "float16")
                       for mask in ("full", "causal") for label in ("fwd", "fwd+bwd")),
)
