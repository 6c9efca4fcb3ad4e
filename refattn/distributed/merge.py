r"""The exact log-sum-exp merge of partial attention outputs (ring attention, flash-decoding).

A key block ``b`` gives each query row its partial output and log-sum-exp over
the block's kept keys,

.. math::

    \ell_b = \log \sum_{j \in b} e^{s_j}, \qquad o_b = \sum_{j \in b} e^{s_j - \ell_b} v_j ,

and the rows over the union of the blocks follow exactly:

.. math::

    \ell = \log \sum_b e^{\ell_b}, \qquad o = \sum_b e^{\ell_b - \ell}\, o_b .

A block in which the row has no key gives ``(o_b, l_b) = (0, -inf)`` and weight
``exp(-inf) = 0``; a row empty in every block keeps ``o = 0, l = -inf``.  The
merge of merges is the merge of all, so it runs as a tree.  Dropout scales
the kept probabilities after normalisation, a linear map of ``o_b``: the same
rule holds for it.
"""

from __future__ import annotations

from .._array import namespace

__all__ = ["merge_partials"]


def merge_partials(*parts):
    """Merge ``(o_b, lse_b)`` pairs: ``o_b (..., L, Ev)``, ``lse_b (..., L)``; returns ``(o, lse)``.

    Computed in the working precision of the inputs; ``exp`` never overflows
    (every exponent is ``<= 0`` after the shift by the largest ``lse_b``).

    Examples
    --------
    >>> import numpy as np
    >>> s = np.array([[0.5, -1.0, 2.0, 0.0]]); v = np.eye(4)
    >>> def part(cols):
    ...     lse = np.log(np.exp(s[:, cols]).sum(-1))
    ...     return np.exp(s[:, cols] - lse[:, None]) @ v[cols], lse
    >>> o, lse = merge_partials(part([0, 1]), part([2, 3]))
    >>> bool(np.allclose(o, np.exp(s) / np.exp(s).sum()))
    True
    >>> o, lse = merge_partials((np.zeros((1, 4)), np.array([-np.inf])), part([2, 3]))
    >>> bool(np.allclose(o[0, 2:], np.exp(s[0, 2:]) / np.exp(s[0, 2:]).sum()))
    True
    """
    if len(parts) == 1:
        return parts[0]
    xp = namespace(parts[0][0])
    lses = [lse for _, lse in parts]
    top = lses[0]
    for lse in lses[1:]:
        top = xp.maximum(top, lse)
    shift = xp.where(xp.isfinite(top), top, xp.zeros_like(top))     # 0 on rows empty everywhere
    weights = [xp.exp(lse - shift) for lse in lses]                  # exp(-inf) = 0: empty blocks
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    nonempty = total > 0
    safe = xp.where(nonempty, total, xp.ones_like(total))
    lse = xp.where(nonempty, shift + xp.log(safe), xp.full_like(total, -xp.inf))
    o = None
    for (ob, _), w in zip(parts, weights):
        term = (w / safe)[..., None] * ob
        o = term if o is None else o + term
    return xp.astype(o, parts[0][0].dtype), xp.astype(lse, parts[0][1].dtype)
