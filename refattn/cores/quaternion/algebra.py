"""Quaternion algebra: the multiplication table, written once.

Components are indexed ``0, 1, 2, 3`` for ``r, i, j, k``.  The product of two
basis quaternions is a signed basis quaternion whose index is the bitwise XOR
of the factors' indices::

    e_a e_b = SIGN[a][b] * e_(a ^ b)

(``i j = k``: ``1 ^ 2 = 3``, ``SIGN[1][2] = +1``; ``j i = -k``: ``SIGN[2][1] = -1``.)
Every quaternion formula in refattn (the linear layer, the Hamilton score maps,
their backward passes) is generated from :data:`SIGN`, so the table is checked
once (``tests/cores/test_quaternion.py``) and trusted everywhere.
"""

from __future__ import annotations

__all__ = ["COMPONENTS", "SIGN", "MODES", "product_terms", "hamilton_product", "score_terms",
           "n_maps"]

#: Component names in storage order (``[r | i | j | k]`` blocks, component axis 0..3).
COMPONENTS = ("r", "i", "j", "k")

#: ``SIGN[a][b]``: the sign of ``e_a e_b = +-e_(a ^ b)``.
SIGN = (
    (1, 1, 1, 1),      # r e_b = e_b
    (1, -1, 1, -1),    # i r = i, i i = -1, i j = k, i k = -j
    (1, -1, -1, 1),    # j r = j, j i = -k, j j = -1, j k = i
    (1, 1, -1, -1),    # k r = k, k i = j, k j = -i, k k = -1
)


def product_terms():
    """The 16 terms of a Hamilton product ``p (x) q`` as ``(a, b, c, sign)`` tuples.

    ``(p (x) q)_c = sum over terms (a, b, c, sign) of sign * p_a * q_b``.
    """
    return tuple((a, b, a ^ b, SIGN[a][b]) for a in range(4) for b in range(4))


def hamilton_product(xp, p, q):
    """Hamilton product of quaternion arrays with the component axis last.

    Parameters
    ----------
    p, q : arrays (..., 4), broadcast against each other

    Returns
    -------
    array (..., 4)

    Examples
    --------
    >>> import numpy as np
    >>> i, j = np.array([0., 1, 0, 0]), np.array([0., 0, 1, 0])
    >>> hamilton_product(np, i, j).tolist(), hamilton_product(np, j, i).tolist()
    ([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0])
    """
    out = [None] * 4
    for a, b, c, s in product_terms():
        term = s * (p[..., a] * q[..., b])
        out[c] = term if out[c] is None else out[c] + term
    return xp.stack(out, axis=-1)


# -- the two attention cores, as tables over the product terms -------------------------------
#: Score-map modes of the quaternion cores.
MODES = ("shared", "hamilton")


def score_terms(mode: str):
    """Terms ``(a, b, m, sign)`` of the score maps: ``S_m = sum sign * Q_a K_b^T``.

    ``"hamilton"``: the four components ``m = c`` of ``sum_u q_u (x) k_u`` (16 terms).
    ``"shared"``: the single map ``Re(Q (x) K*) = sum_c Q_c K_c^T`` (4 terms; the
    conjugate flips the signs of the imaginary parts, so every term is ``+``).
    """
    if mode == "hamilton":
        return product_terms()
    if mode == "shared":
        return tuple((c, c, 0, 1) for c in range(4))
    raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")


def n_maps(mode: str) -> int:
    """Number of score maps (= softmaxes): 4 for ``"hamilton"``, 1 for ``"shared"``.

    Output component ``c`` uses map ``c`` when there are four maps, map 0 otherwise.
    """
    return 1 + max(m for _, _, m, _ in score_terms(mode))
