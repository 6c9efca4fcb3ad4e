r"""Rotary position embeddings (RoPE), forward and hand-derived backward, on any array library.

Rotary embeddings (Su et al., *RoFormer*, arXiv 2104.09864) rotate pairs of
features of the queries and keys by an angle proportional to the token's
position, so that the score ``q_i . k_j`` depends on positions only through
``i - j``.  For a vector ``x`` of width ``D`` at position ``p``, with
``r = rotary_dim`` (even, ``<= D``) rotated features and ``r / 2`` pairs
``(a_m, b_m)``:

.. math::

    \theta_m = p\, \text{base}^{-2m/r}, \qquad
    \begin{pmatrix} a'_m \\ b'_m \end{pmatrix} =
    \begin{pmatrix} \cos\theta_m & -\sin\theta_m \\ \sin\theta_m & \cos\theta_m \end{pmatrix}
    \begin{pmatrix} a_m \\ b_m \end{pmatrix}, \qquad m = 0, \dots, r/2 - 1,

and the features ``r ... D - 1`` pass through unchanged (partial rotary, as in
GPT-NeoX and GPT-J).  Two conventions pair the features differently:

* **half-split** (``interleaved=False``; GPT-NeoX, Llama, HF ``rotate_half``):
  ``a_m = x_m``, ``b_m = x_{m + r/2}``;
* **interleaved** (``interleaved=True``; GPT-J, the RoFormer paper):
  ``a_m = x_{2m}``, ``b_m = x_{2m+1}``.

The map is linear and orthogonal in ``x``, so its backward pass is the
transpose, the rotation by ``-theta``: ``dx = R(theta)^T dy = R(-theta) dy``
(``docs/rotary.md``).  Positions are not differentiated.

Shape legend: ``x (..., T, D)``: ``T`` tokens of width ``D`` (e.g. heads
``(*batch, H, L, d_k)``); ``positions`` broadcastable to ``x.shape[:-1]``.
"""

from __future__ import annotations

import numbers

import array_api_compat

from ._array import namespace
from ._vjp import attach_vjp
from ._validate import check_array, check_float_array

__all__ = ["apply_rotary", "apply_rotary_backward", "rotary_angles", "ROTARY_STYLES"]

#: Layer spelling of the two conventions: ``Attention(..., rotary="half" | "interleaved")``.
ROTARY_STYLES = ("half", "interleaved")


def _check_options(x, positions, offset, base, rotary_dim, interleaved, name="x"):
    check_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., T, D), got {tuple(x.shape)}")
    D = x.shape[-1]
    r = D if rotary_dim is None else rotary_dim
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 2 or r % 2 or r > D:
        raise ValueError(f"rotary_dim must be an even integer in [2, D={D}] (or None for D), "
                         f"got {rotary_dim!r}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0:
        raise ValueError(f"base must be a positive number, got {base!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if positions is None:
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
            raise TypeError(f"offset must be an integer, got {type(offset).__name__}")
    else:
        if offset != 0:
            raise ValueError("pass positions or offset, not both")
        check_array(positions, "positions")
        dtype = str(getattr(positions.dtype, "name", positions.dtype)).rsplit(".", 1)[-1]
        if not dtype.startswith(("int", "uint", "float")):
            raise TypeError(f"positions must be an integer or float array, got dtype {dtype}")
        target = tuple(x.shape[:-1])
        shape = tuple(positions.shape)
        ok = len(shape) <= len(target) and all(
            s in (1, t) for s, t in zip(shape[::-1], target[::-1]))
        if not ok:
            raise ValueError(f"positions must broadcast to x.shape[:-1] = {target} (..., T), "
                             f"got shape {shape}")
    return int(r)


def rotary_angles(xp, positions, rotary_dim: int, base: float, dtype, device=None):
    r"""``(cos, sin)`` of ``theta_m = p base^{-2m/r}``, shape ``(*positions.shape, r/2)``.

    The angles are formed in float64 and rounded once to ``dtype``, so a float32
    run rotates by correctly rounded cosines and sines.

    Examples
    --------
    >>> import numpy as np
    >>> cos, sin = rotary_angles(np, np.arange(3), 4, 10000.0, np.float64)
    >>> cos.shape, float(sin[1, 0]) == float(np.sin(1.0)), float(sin[1, 1]) == float(np.sin(0.01))
    ((3, 2), True, True)
    """
    m = xp.arange(0, rotary_dim // 2, dtype=xp.float64, device=device)
    inv_freq = float(base) ** (-2.0 * m / rotary_dim)                    # (r/2,)
    p = xp.astype(positions, xp.float64)
    theta = p[..., None] * inv_freq                                      # (..., T, r/2)
    return xp.astype(xp.cos(theta), dtype), xp.astype(xp.sin(theta), dtype)


def _rotate(xp, x, cos, sin, r, interleaved):
    """Rotate the ``r`` leading features of ``x (..., T, D)`` pairwise by ``(cos, sin) (..., T, r/2)``."""
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        pairs = xp.reshape(rot, (*rot.shape[:-1], r // 2, 2))           # (..., T, r/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = xp.stack((a * cos - b * sin, b * cos + a * sin), axis=-1)
        out = xp.reshape(out, (*out.shape[:-2], r))
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = xp.concat((a * cos - b * sin, b * cos + a * sin), axis=-1)
    return out if r == x.shape[-1] else xp.concat((out, rest), axis=-1)


def _angles_for(x, positions, offset, base, r):
    xp = namespace(x)
    device = array_api_compat.device(x)
    if positions is None:
        positions = xp.arange(offset, offset + x.shape[-2], device=device)
    return rotary_angles(xp, positions, r, base, x.dtype, device=device)


def apply_rotary(x, *, positions=None, offset=0, base=10000.0, rotary_dim=None,
                 interleaved=False):
    r"""Rotate features of ``x`` by rotary position embeddings (see the module doc).

    Parameters
    ----------
    x : float array (..., T, D)
        Queries or keys, tokens on axis -2 (e.g. heads ``(*batch, H, L, d_k)``).
    positions : int or float array broadcastable to (..., T), optional
        Position of every token.  Default ``offset + arange(T)``.
    offset : int
        Position of the first token when ``positions`` is not given (e.g. the
        number of cached tokens when decoding).
    base : float
        ``theta`` of the frequencies ``base^{-2m/r}`` (10000 in RoFormer, Llama 2;
        500000 in Llama 3).
    rotary_dim : even int, optional
        Number of rotated features ``r`` (default ``D``); features ``r ...`` pass
        through (partial rotary).
    interleaved : bool
        ``True``: pairs ``(x_{2m}, x_{2m+1})`` (GPT-J); ``False``: pairs
        ``(x_m, x_{m+r/2})`` (GPT-NeoX, Llama).

    Returns
    -------
    array (..., T, D), the dtype of ``x``.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5, 8))
    >>> y = refattn.apply_rotary(x, base=10000.0)
    >>> y.shape, bool(np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1)))
    ((2, 3, 5, 8), True)
    >>> bool(np.allclose(y[..., 0, :], x[..., 0, :]))          # position 0: no rotation
    True
    >>> y, pullback = refattn.vjp(refattn.apply_rotary, x, offset=4, rotary_dim=4)
    >>> (dx,) = pullback(np.ones_like(y))
    >>> dx.shape
    (2, 3, 5, 8)
    """
    r = _check_options(x, positions, offset, base, rotary_dim, interleaved)
    cos, sin = _angles_for(x, positions, offset, base, r)
    return _rotate(namespace(x), x, cos, sin, r, interleaved)


def apply_rotary_backward(dy, *, positions=None, offset=0, base=10000.0, rotary_dim=None,
                          interleaved=False):
    r"""The vector-Jacobian product of :func:`apply_rotary`: ``dx = R(theta)^T dy = R(-theta) dy``.

    Takes the same options as the forward pass; ``dy`` has the shape of ``x``.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> x = np.random.default_rng(1).standard_normal((4, 6))
    >>> y = refattn.apply_rotary(x, interleaved=True)
    >>> bool(np.allclose(refattn.apply_rotary_backward(y, interleaved=True), x))   # R^T R = I
    True
    """
    r = _check_options(dy, positions, offset, base, rotary_dim, interleaved, name="dy")
    cos, sin = _angles_for(dy, positions, offset, base, r)
    return _rotate(namespace(dy), dy, cos, -sin, r, interleaved)


def _forward(x, **options):
    """``(y, residuals)``: the residuals are the options (the map is linear in ``x``)."""
    return apply_rotary(x, **options), options


def _backward(options, dy):
    return (apply_rotary_backward(dy, **options),)


attach_vjp(apply_rotary, _forward, _backward)
