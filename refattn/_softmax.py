"""Stable masked softmax, its backward pass and the kept-pair product, written once (array API).

Vocabulary (``docs/conventions.md``, "Non-finite values and empty inputs"):

* a pair ``(i, j)`` is **kept** when the mask, the causal rule and the bias
  (``-inf`` = masked) let query ``i`` see key ``j``;
* a row with no kept key is **empty**: probabilities 0, log-sum-exp ``-inf``,
  output 0 and zero gradients (PyTorch's fused kernels, FlashAttention);
* a row with a kept score that is not finite (NaN or +-Inf in ``q_i``, in a kept
  ``k_j`` or in a kept bias entry) is **poisoned**: its log-sum-exp and its
  probabilities at the kept pairs are NaN, so everything computed from them is NaN;
* a pair that is not kept contributes an exact zero to every sum, even against a
  non-finite operand (:func:`kept_matmul`): ``0 * NaN`` never leaks across a mask.
"""

from __future__ import annotations

from .typing import Array, Namespace

__all__ = ["masked_softmax", "probs_from_lse", "softmax_backward", "kept_matmul", "zero_unkept"]


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
        Scaled scores, bias already added.
    keep : bool array broadcastable to ``scores``, or None (every pair kept)
        The kept pairs: mask, causal rule and ``bias != -inf`` combined (a ``-inf``
        score at a kept pair comes from a non-finite input and poisons its row).

    Returns
    -------
    p : array (..., L, S)
        Probabilities; 0 at pairs that are not kept and in empty rows; NaN at the
        kept pairs of a poisoned row.
    lse : array (..., L)
        ``log(sum_j exp(s_ij))`` over kept keys; ``-inf`` for empty rows, NaN for
        poisoned ones.
    """
    if scores.shape[-1] == 0:                       # S = 0: every row is empty
        return scores, xp.full(scores.shape[:-1], -xp.inf, dtype=scores.dtype)
    bad = ~xp.isfinite(scores) if keep is None else ~xp.isfinite(scores) & keep
    poisoned = xp.any(bad, axis=-1, keepdims=True)                       # (..., L, 1)
    # A poisoned row is evaluated on zero scores at its kept pairs, then set to NaN.
    s = xp.where(poisoned, xp.zeros_like(scores), scores)
    s = _masked_scores(xp, s, keep)
    row_max = xp.max(s, axis=-1, keepdims=True)
    # An empty row has max -inf; shift it by 0 so exp() gives exact zeros, not NaN.
    nonempty = row_max > -xp.inf
    shift = xp.where(nonempty, row_max, xp.zeros_like(row_max))
    e = xp.exp(s - shift)
    total = xp.where(nonempty, xp.sum(e, axis=-1, keepdims=True), xp.ones_like(row_max))
    lse = xp.where(nonempty, shift + xp.log(total), xp.full_like(total, -xp.inf))
    nan = xp.asarray(xp.nan, dtype=s.dtype)
    poisoned_pairs = poisoned if keep is None else poisoned & keep
    return xp.where(poisoned_pairs, nan, e / total), xp.where(poisoned, nan, lse)[..., 0]


def probs_from_lse(xp: Namespace, scores: Array, keep: Array | None, lse: Array) -> Array:
    """Recompute the probabilities from saved log-sum-exp (FlashAttention-2 backward).

    ``p_ij = exp(s_ij - lse_i)`` at kept pairs (NaN where ``lse_i`` is NaN), 0 elsewhere;
    an empty row (``lse_i = -inf``) has no kept pair.
    """
    if scores.shape[-1] == 0:
        return scores
    lse = lse[..., None]
    shift = xp.where(lse == -xp.inf, xp.zeros_like(lse), lse)
    if keep is None:
        return xp.exp(scores - shift)
    zero = xp.zeros_like(scores)
    return xp.where(keep, xp.exp(xp.where(keep, scores, zero) - shift), zero)


def softmax_backward(xp: Namespace, p: Array, dp: Array, row_dot: Array | None = None,
                     keep: Array | None = None) -> Array:
    """Gradient of the scores given the gradient of the probabilities.

    ``dS = P * (dP - D)`` with ``D = rowsum(P * dP)`` at kept pairs, exactly 0 at the
    others (even where ``dP`` or ``D`` is not finite); ``row_dot`` may pass a
    precomputed ``D`` of shape ``(..., L)`` (for attention ``D = rowsum(dO * O)``).
    """
    if row_dot is None:
        pdp = p * dp
        if keep is not None:
            pdp = xp.where(keep, pdp, xp.zeros_like(pdp))
        row_dot = xp.sum(pdp, axis=-1)
    if keep is None:
        return p * (dp - row_dot[..., None])
    zero = xp.zeros_like(dp)
    ds = p * (xp.where(keep, dp, zero) - row_dot[..., None])
    return xp.where(keep, ds, zero)


def kept_matmul(xp: Namespace, a: Array, b: Array, keep: Array | None) -> Array:
    """``a @ b`` summing only the kept terms: ``out_ik = sum_(j: keep_ij) a_ij b_jk``.

    ``a (..., M, N)`` is zero wherever ``keep (broadcastable to a)`` is False and may hold
    NaN at kept entries; ``b (..., N, K)`` may hold NaN or +-Inf anywhere.  A plain matmul
    would turn ``0 * Inf`` at a pair that is not kept into NaN; here such terms are exact
    zeros, and the kept terms follow IEEE arithmetic (an Inf times a positive weight is
    that Inf; Infs of both signs, or an Inf times a zero or NaN weight, give NaN).  When
    ``b`` is finite (the usual case) this is one matmul.
    """
    finite = xp.isfinite(b)
    if keep is None or bool(xp.all(finite)):
        return a @ b
    zero_b = xp.zeros_like(b)
    out = a @ xp.where(finite, b, zero_b)                 # the finite part of the sum
    ones, zeros = xp.ones_like(a), xp.zeros_like(a)
    k = xp.where(xp.broadcast_to(keep, a.shape), ones, zeros)
    k_pos, k_neg = k * xp.where(a > 0, ones, zeros), k * xp.where(a < 0, ones, zeros)
    k_other = k - k_pos - k_neg                           # kept and zero or NaN
    ones_b = xp.ones_like(b)
    b_pinf = xp.where(b == xp.inf, ones_b, zero_b)
    b_ninf = xp.where(b == -xp.inf, ones_b, zero_b)
    b_nan = xp.where(xp.isnan(b), ones_b, zero_b)
    # Counts of kept terms that are +Inf, -Inf or NaN (0/1 matrices: exact in floating point).
    plus = (k_pos @ b_pinf + k_neg @ b_ninf > 0) | (out == xp.inf)
    minus = (k_pos @ b_ninf + k_neg @ b_pinf > 0) | (out == -xp.inf)
    nan = (k_other @ (b_pinf + b_ninf) + k @ b_nan > 0) | xp.isnan(out) | (plus & minus)
    inf = xp.asarray(xp.inf, dtype=out.dtype)
    out = xp.where(plus, inf, xp.where(minus, -inf, out))
    return xp.where(nan, xp.asarray(xp.nan, dtype=out.dtype), out)


def zero_unkept(xp: Namespace, ds: Array, keep: Array | None) -> Array:
    """``ds`` with exact zeros at the pairs that are not kept (a NaN factor there stays out)."""
    return ds if keep is None else xp.where(keep, ds, xp.zeros_like(ds))
