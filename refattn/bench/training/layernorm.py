r"""Layer normalisation over the feature axis, forward and hand-derived backward.

.. math::

    \mu = \tfrac1d \sum_c x_c, \quad r = (\tfrac1d \sum_c (x_c - \mu)^2 + \epsilon)^{-1/2},
    \quad \hat x = (x - \mu)\, r, \quad y = \hat x \odot g + b

Backward, with ``dxhat = dy * g``::

    dg = sum_rows dy * xhat,   db = sum_rows dy
    dx = r * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))

(derivation: ``docs/fidelity.md``, "The study's own layers").

Shape legend: ``...`` any leading axes (rows), ``d`` features.
"""

from __future__ import annotations

import numpy as np

from ..._vjp import attach_vjp

from ._checks import check_features, check_vector

__all__ = ["layer_norm", "layer_norm_forward", "layer_norm_backward", "EPS"]

#: ``epsilon`` of the variance, as in ``torch.nn.LayerNorm``.
EPS = 1e-5


def layer_norm_forward(x, g, b, eps=EPS):
    """``(y, residuals)``: ``x (..., d)``, ``g, b (d,)`` -> ``y (..., d)``."""
    mu = x.mean(axis=-1, keepdims=True)                        # (..., 1)
    xc = x - mu                                                # (..., d)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = xc * rstd                                           # (..., d)
    return xhat * g + b, (xhat, rstd, g)


def layer_norm_backward(res, dy):
    """``(dx, dg, db)`` of :func:`layer_norm_forward`."""
    xhat, rstd, g = res
    d = xhat.shape[-1]
    dxhat = dy * g                                             # (..., d)
    dg = (dy * xhat).reshape(-1, d).sum(axis=0)                # (d,)
    db = dy.reshape(-1, d).sum(axis=0)                         # (d,)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


def _check(x, g, b):
    d = check_features(x, "x")
    check_vector(g, "g", d)
    check_vector(b, "b", d)


def layer_norm(x, g, b):
    """Layer normalisation ``y = (x - mean) / sqrt(var + 1e-5) * g + b`` over the last axis.

    Parameters
    ----------
    x : ndarray (..., d), float
    g, b : ndarray (d,)
        Gain and shift.

    Returns
    -------
    y : ndarray (..., d)

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.layernorm import layer_norm
    >>> y = layer_norm(np.array([[1.0, 2.0, 3.0]]), np.ones(3), np.zeros(3))
    >>> np.round(y, 4).tolist()
    [[-1.2247, 0.0, 1.2247]]
    """
    _check(x, g, b)
    return layer_norm_forward(x, g, b)[0]


def _checked_forward(x, g, b):
    _check(x, g, b)
    return layer_norm_forward(x, g, b)


attach_vjp(layer_norm, _checked_forward, layer_norm_backward)
