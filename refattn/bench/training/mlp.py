r"""The transformer block's two-layer perceptron with a GELU, forward and hand-derived backward.

.. math::

    h = x W_1 + b_1, \qquad a = \mathrm{gelu}(h), \qquad y = a W_2 + b_2, \\
    \mathrm{gelu}(h) = \tfrac12 h (1 + \tanh u), \quad u = \sqrt{2/\pi}\,(h + 0.044715\, h^3)

(the tanh form of GELU).  Backward::

    da = dy W_2^T,  dW_2 = sum_rows a^T dy,  db_2 = sum_rows dy
    dh = da * gelu'(h),
    gelu'(h) = (1 + tanh u)/2 + h (1 - tanh^2 u)/2 * sqrt(2/pi) (1 + 3 0.044715 h^2)
    dx = dh W_1^T,  dW_1 = sum_rows x^T dh,  db_1 = sum_rows dh

Shape legend: ``...`` leading axes (rows), ``d`` features, ``m`` hidden units.
"""

from __future__ import annotations

import math

import numpy as np

from ..._vjp import attach_vjp

from ...projections._base import linear_backward, linear_forward
from ._checks import check_features, check_matrix, check_vector

__all__ = ["gelu", "gelu_derivative", "mlp", "mlp_forward", "mlp_backward"]

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu(h):
    """The tanh form of GELU, elementwise."""
    return 0.5 * h * (1.0 + np.tanh(_C * (h + _A * h ** 3)))


def gelu_derivative(h):
    """``d gelu(h) / dh``, elementwise."""
    t = np.tanh(_C * (h + _A * h ** 3))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * h * h)


def mlp_forward(x, w1, b1, w2, b2):
    """``(y, residuals)``: ``x (..., d)`` -> ``y (..., d_out)``."""
    h = linear_forward(np, x, w1, b1)                          # (..., m)
    a = gelu(h)                                                # (..., m)
    return linear_forward(np, a, w2, b2), (x, h, a, w1, w2)


def mlp_backward(res, dy):
    """``(dx, dw1, db1, dw2, db2)`` of :func:`mlp_forward`."""
    x, h, a, w1, w2 = res
    da, dw2, db2 = linear_backward(np, a, w2, dy, True)
    dh = da * gelu_derivative(h)
    dx, dw1, db1 = linear_backward(np, x, w1, dh, True)
    return dx, dw1, db1, dw2, db2


def _check(x, w1, b1, w2, b2):
    d = check_features(x, "x")
    m = check_matrix(w1, "w1", d)
    check_vector(b1, "b1", m)
    d_out = check_matrix(w2, "w2", m)
    check_vector(b2, "b2", d_out)


def mlp(x, w1, b1, w2, b2):
    """``gelu(x W_1 + b_1) W_2 + b_2``.

    Parameters
    ----------
    x : ndarray (..., d)
    w1 : ndarray (d, m)
    b1 : ndarray (m,)
    w2 : ndarray (m, d_out)
    b2 : ndarray (d_out,)

    Returns
    -------
    y : ndarray (..., d_out)

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.mlp import mlp
    >>> x = np.array([[1.0, -1.0]])
    >>> mlp(x, np.eye(2), np.zeros(2), np.eye(2), np.zeros(2)).round(4).tolist()
    [[0.8412, -0.1588]]
    """
    _check(x, w1, b1, w2, b2)
    return mlp_forward(x, w1, b1, w2, b2)[0]


def _checked_forward(x, w1, b1, w2, b2):
    _check(x, w1, b1, w2, b2)
    return mlp_forward(x, w1, b1, w2, b2)


attach_vjp(mlp, _checked_forward, mlp_backward)
