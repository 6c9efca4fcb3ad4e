r"""Adam (Kingma & Ba 2015) over a flat ``{name: array}`` parameter dict.

For every parameter, step ``t = 1, 2, ...`` with gradient ``g``:

.. math::

    m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,
    \quad \theta \leftarrow \theta - \eta\, \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)}
    + \epsilon}

(the update of ``torch.optim.Adam`` without weight decay).  Under a constant gradient
``m / (1 - beta_1^t) = g`` and ``v / (1 - beta_2^t) = g^2`` exactly, so every step moves
each entry by ``eta g / (|g| + eps)``: the tests check this closed form.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["Adam"]


class Adam:
    """Adam state for one parameter dict; :meth:`step` updates the parameters in place.

    Parameters
    ----------
    params : dict of ndarray
    lr : float > 0
    betas : (float, float) in [0, 1)
    eps : float > 0

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.adam import Adam
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> opt = Adam(params, lr=0.1)
    >>> opt.step({"w": np.array([3.0, -0.5])})
    >>> params["w"].round(6).tolist()      # first step: lr * sign(g)
    [0.9, -1.9]
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        if not isinstance(params, dict) or not all(isinstance(p, np.ndarray)
                                                   for p in params.values()):
            raise TypeError("params must be a dict of NumPy arrays")
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.params = params
        self.lr, self.betas, self.eps = float(lr), tuple(map(float, betas)), float(eps)
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self, grads):
        """One update from ``grads`` (same keys and shapes as the parameters)."""
        if set(grads) != set(self.params):
            raise ValueError(f"grads has keys {sorted(grads)}, expected {sorted(self.params)}")
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] has shape {g.shape}, expected {p.shape}")
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * g * g
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
