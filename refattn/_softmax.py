"""Stable masked softmax and its backward pass, written once (array API).

A row whose keys are all masked out has probabilities 0 and log-sum-exp
``-inf``; its output and its gradients are 0 (PyTorch, FlashAttention).
"""

from __future__ import annotations

from .typing import Array, Namespace

__all__ = ["masked_softmax", "probs_from_lse", "softmax_backward"]


def _masked_scores(xp: Namespace, scores: Array, keep: Array | None) -> Array:
    if keep is None:
        return scores
    return xp.where(keep, scores, xp.asarray(-xp.inf, dtype=scores.dtype))


def masked_softmax(xp: Namespace, scores: Array,
                   keep: Array | None = None) -> tuple[Array, Array]:
    """Row-wise softmax over the last axis of ``scores`` where ``keep`` is True.

    Parameters
    ----------
    scores : array (..., L, S)
        Scaled scores (bias already added; ``-inf`` entries count as masked).
    keep : bool array broadcastable to ``scores``, or None

    Returns
    -------
    p : array (..., L, S)
        Probabilities; rows with no key left are all zero.
    lse : array (..., L)
        ``log(sum_j exp(s_ij))`` over kept keys; ``-inf`` for empty rows.
    """
    s = _masked_scores(xp, scores, keep)
    row_max = xp.max(s, axis=-1, keepdims=True)
    # An empty row has max -inf; shift it by 0 so exp() gives exact zeros, not NaN.
    shift = xp.where(xp.isfinite(row_max), row_max, xp.zeros_like(row_max))
    e = xp.exp(s - shift)
    total = xp.sum(e, axis=-1, keepdims=True)
    nonempty = total > 0
    p = e / xp.where(nonempty, total, xp.ones_like(total))
    lse = xp.where(nonempty, shift + xp.log(xp.where(nonempty, total, xp.ones_like(total))),
                   xp.full_like(total, -xp.inf))
    return p, lse[..., 0]


def probs_from_lse(xp: Namespace, scores: Array, keep: Array | None, lse: Array) -> Array:
    """Recompute the probabilities from saved log-sum-exp (FlashAttention-2 backward)."""
    s = _masked_scores(xp, scores, keep)
    lse = lse[..., None]
    finite = xp.isfinite(lse)
    return xp.where(finite, xp.exp(s - xp.where(finite, lse, xp.zeros_like(lse))),
                    xp.zeros_like(s))


def softmax_backward(xp: Namespace, p: Array, dp: Array, row_dot: Array | None = None) -> Array:
    """Gradient of the scores given the gradient of the probabilities.

    ``dS = P * (dP - D)`` with ``D = rowsum(P * dP)``; ``row_dot`` may pass a
    precomputed ``D`` of shape ``(..., L)`` (for attention ``D = rowsum(dO * O)``).
    """
    if row_dot is None:
        row_dot = xp.sum(p * dp, axis=-1)
    return p * (dp - row_dot[..., None])
