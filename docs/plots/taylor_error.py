"""Relative error of the Taylor form of element-wise attention against the exact form, by order."""

import matplotlib.pyplot as plt
import numpy as np
import refattn

rng = np.random.default_rng(0)
orders = [2, 4, 6, 8, 10]
fig, ax = plt.subplots()
for sigma in (0.25, 0.5, 1.0):
    q, k, v = (sigma * rng.standard_normal((2, 64, 8)) for _ in range(3))   # (H, L, D)
    errors = [refattn.elementwise_taylor_error(q, k, v, t) for t in orders]
    ax.semilogy(orders, [e.max_rel for e in errors], "o-",
                label=f"inputs N(0, {sigma}^2): max |x| = {errors[0].max_abs_x:.1f}")
ax.set_xlabel("Taylor order t")
ax.set_ylabel("max |O_taylor - O_exact| / max |O_exact|")
ax.set_xticks(orders)
ax.set_title("Element-wise attention: Taylor form against the exact form (float64)")
ax.legend()
