r"""Weighted softmax cross-entropy, forward and hand-derived backward.

.. math::

    \ell = \frac{\sum_n w_n \big(\log \sum_c e^{z_{nc}} - z_{n y_n}\big)}{\sum_n w_n},
    \qquad \frac{\partial \ell}{\partial z_{nc}} = \frac{w_n}{\sum_m w_m}
    \big(\mathrm{softmax}(z_n)_c - [c = y_n]\big)

The weights select the items that count: all ones for image classes, ones at the query
positions of an associative-recall sequence.

Shape legend: ``...`` items (any axes), ``C`` classes.
"""

from __future__ import annotations

import numpy as np

from ..._vjp import attach_vjp

from ._checks import check_float, check_int_array

__all__ = ["cross_entropy", "cross_entropy_forward", "cross_entropy_backward", "accuracy"]


def _check(logits, labels, weights):
    check_float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError(f"logits must have shape (..., C), got {logits.shape}")
    check_int_array(labels, "labels", logits.shape[:-1], logits.shape[-1])
    if weights is not None:
        check_float(weights, "weights")
        if weights.shape != logits.shape[:-1]:
            raise ValueError(f"weights must have shape {logits.shape[:-1]} (one per label), got "
                             f"{weights.shape}")
        if np.any(weights < 0) or not weights.sum() > 0:
            raise ValueError("weights must be non-negative with a positive sum")


def cross_entropy_forward(logits, labels, weights=None):
    """``(loss, residuals)``: a float and what :func:`cross_entropy_backward` needs."""
    if weights is None:
        weights = np.ones(labels.shape, logits.dtype)
    z = logits - logits.max(axis=-1, keepdims=True)             # (..., C), max 0 per row
    lse = np.log(np.exp(z).sum(axis=-1))                        # (...)
    picked = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    total = weights.sum()
    loss = float((weights * (lse - picked)).sum() / total)
    return loss, (z, lse, labels, weights / total)


def cross_entropy_backward(res, dloss=1.0):
    """``dlogits (..., C)`` for a cotangent ``dloss`` of the loss."""
    z, lse, labels, w = res
    g = np.exp(z - lse[..., None])                              # softmax
    np.put_along_axis(g, labels[..., None], np.take_along_axis(g, labels[..., None], -1) - 1.0,
                      axis=-1)
    return g * (w * dloss)[..., None]


def cross_entropy(logits, *, labels, weights=None):
    """Mean softmax cross-entropy of ``logits (..., C)`` against integer ``labels (...)``.

    ``weights (...)`` (optional, non-negative) weight the items; the mean is over their sum.
    Returns a 0-d array (so :func:`refattn.testing.check_grads` can take it).

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.loss import cross_entropy
    >>> float(cross_entropy(np.zeros((2, 4)), labels=np.array([0, 3])))  # log 4
    1.3862943611198906
    """
    _check(logits, labels, weights)
    return np.asarray(cross_entropy_forward(logits, labels, weights)[0])


def _checked_forward(logits, *, labels, weights=None):
    _check(logits, labels, weights)
    loss, res = cross_entropy_forward(logits, labels, weights)
    return np.asarray(loss), res


attach_vjp(cross_entropy, _checked_forward,
           lambda res, dloss: cross_entropy_backward(res, float(dloss)))


def accuracy(logits, labels, weights=None) -> float:
    """Weighted fraction of items whose arg-max logit is the label."""
    _check(logits, labels, weights)
    hit = (logits.argmax(axis=-1) == labels).astype(np.float64)
    if weights is None:
        return float(hit.mean())
    return float((hit * weights).sum() / weights.sum())
