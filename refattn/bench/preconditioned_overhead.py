"""Study ``preconditioned-overhead``: the cost of ``diag(c)`` and what it does to kappa.

Times :func:`refattn.preconditioned_sdpa` against :func:`refattn.sdpa` on the same
problem and backend, interleaved (:func:`refattn.bench.compare`), forward and
forward+backward, and reports the median condition numbers ``kappa(A)``,
``kappa(CA)`` over the heads of one fixed seeded problem.
"""

from __future__ import annotations

import numpy as np

from .._vjp import vjp
from ..conditioning import attention_conditioning
from ..cores.preconditioned import preconditioned_sdpa
from ..cores.sdpa import sdpa
from .study import Study, StudyResult
from .timing import compare

#: ``(batch, H, L, E)`` of the timed problem per size.
SIZES = {"quick": (1, 4, 128, 32), "full": (1, 8, 1024, 64)}
#: The fixed problem of the kappa metrics (the same at every size, so asv compares like with
#: like): q, k, v ~ N(0, 1), seeded, with and without a causal mask.
KAPPA_PROBLEM = {"shape": (2, 8, 128, 32), "seed": 0}
#: Target of the forward overhead at size "full": the diagonal costs O(L Ev) next to O(L S E).
TARGET_FORWARD_RATIO = 1.10


def _kappa_metrics():

    rng = np.random.default_rng(KAPPA_PROBLEM["seed"])
    q, k, v = (rng.standard_normal(KAPPA_PROBLEM["shape"]) for _ in range(3))
    metrics = {}
    for label, causal in (("causal", True), ("full", False)):
        res = attention_conditioning(q, k, v, causal=causal)
        metrics.update({
            f"{label}_median_kappa_a": float(np.median(res.kappa_a)),
            f"{label}_median_kappa_ca": float(np.median(res.kappa_o)),
            f"{label}_median_kappa_ratio": float(np.median(res.ratio)),
            f"{label}_fraction_heads_raised": float(np.mean(res.ratio > 1)),
        })
        if not causal:
            # causal P of random scores is numerically singular (kappa = inf): tracked unmasked only
            metrics["full_median_kappa_p"] = float(np.median(res.kappa_p))
    return metrics


def run(size="quick") -> StudyResult:

    B, H, L, E = SIZES[size]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E)) for _ in range(3))
    w = rng.standard_normal((B, H, L, E))

    def fwd_bwd(fn, **options):
        def go():
            out, pullback = vjp(fn, q, k, v, causal=True, **options)
            return pullback(w)
        return go

    times = compare({
        "sdpa fwd": lambda: sdpa(q, k, v, causal=True),
        "preconditioned fwd": lambda: preconditioned_sdpa(q, k, v, causal=True),
        "sdpa fwd+bwd": fwd_bwd(sdpa),
        "preconditioned fwd+bwd (stop_gradient)": fwd_bwd(preconditioned_sdpa),
        "preconditioned fwd+bwd (full)": fwd_bwd(preconditioned_sdpa, stop_gradient=False),
    }, rounds=3 if size == "quick" else 5)
    base_f, base_b = times["sdpa fwd"], times["sdpa fwd+bwd"]
    metrics = {
        "forward_time_ratio": times["preconditioned fwd"] / base_f,
        "fwd_bwd_time_ratio": times["preconditioned fwd+bwd (stop_gradient)"] / base_b,
        "fwd_bwd_full_gradient_time_ratio": times["preconditioned fwd+bwd (full)"] / base_b,
        **_kappa_metrics(),
    }
    rows = [[name, f"{t * 1e3:.3f}", f"{t / (base_f if 'bwd' not in name else base_b):.3f}"]
            for name, t in times.items()]
    failures = []
    if size == "full" and metrics["forward_time_ratio"] > TARGET_FORWARD_RATIO:
        failures.append(f"forward overhead {metrics['forward_time_ratio']:.3f} > "
                        f"{TARGET_FORWARD_RATIO} at B{B} H{H} L{L} E{E}")
    for label in ("causal", "full"):
        if metrics[f"{label}_median_kappa_ratio"] >= 1:
            failures.append(f"{label} attention: median kappa(CA)/kappa(A) = "
                            f"{metrics[f'{label}_median_kappa_ratio']:.3f} >= 1 (row_norm did "
                            f"not lower kappa on the median head)")
    shape = KAPPA_PROBLEM["shape"]
    notes = [f"kappa on q, k, v ~ N(0,1) {shape} seed {KAPPA_PROBLEM['seed']}, {label}: median "
             f"kappa(A) {metrics[f'{label}_median_kappa_a']:.3g} -> kappa(CA) "
             f"{metrics[f'{label}_median_kappa_ca']:.3g} (median ratio "
             f"{metrics[f'{label}_median_kappa_ratio']:.3f}; "
             f"{metrics[f'{label}_fraction_heads_raised']:.0%} of heads raised)"
             for label in ("causal", "full")]
    return StudyResult(
        title=f"preconditioned vs plain sdpa, B{B} H{H} L{L} E{E} causal float64 "
              f"(median ms, ratio to sdpa)",
        headers=["contender", "ms", "ratio"],
        rows=rows,
        metrics=metrics,
        notes=notes,
        failures=failures,
    )


#: The metrics asv tracks (every one is in ``run(size).metrics``).
METRIC_NAMES = (
    "forward_time_ratio", "fwd_bwd_time_ratio", "fwd_bwd_full_gradient_time_ratio",
    *(f"{label}_{m}" for label in ("causal", "full")
      for m in ("median_kappa_a", "median_kappa_ca", "median_kappa_ratio",
                "fraction_heads_raised")),
    "full_median_kappa_p",
)

STUDY = Study(
    name="preconditioned-overhead",
    summary="preconditioned_sdpa vs sdpa time (forward, fwd+bwd) and median kappa before/after",
    run=run,
    metric_names=METRIC_NAMES,
)
