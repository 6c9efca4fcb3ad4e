"""Median per-head condition numbers of P, A = P V and diag(c) A against the sequence length."""

import matplotlib.pyplot as plt
import numpy as np
import refattn

rng = np.random.default_rng(0)
lengths = [8, 16, 32, 64, 128]
kappa = {"p": [], "a": [], "o": []}
for L in lengths:
    q, k, v = (rng.standard_normal((4, L, 8)) for _ in range(3))      # (H, L = S, E = Ev)
    res = refattn.attention_conditioning(q, k, v, backend="reference")
    for name in kappa:
        kappa[name].append(np.median(getattr(res, f"kappa_{name}")))
fig, ax = plt.subplots()
ax.loglog(lengths, kappa["p"], "^:", label="P, the L x S probabilities")
ax.loglog(lengths, kappa["a"], "o-", label="A = P V, the L x Ev output")
ax.loglog(lengths, kappa["o"], "s--", label="diag(c) A, row-norm preconditioned")
ax.set_xlabel("sequence length L = S (4 heads, E = Ev = 8, no mask)")
ax.set_ylabel("median 2-norm condition number")
ax.set_xticks(lengths, [str(n) for n in lengths])
ax.legend()
