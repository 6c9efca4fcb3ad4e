"""Quaternion projections: quaternion linear layers and heads that own units of every component.

A quaternion vector of ``n`` units is stored as four contiguous blocks
``[r | i | j | k]`` of width ``n`` (``docs/variants.md`` section 3).  The quaternion
linear layer ``y = W (x) x`` (Hamilton product, weight on the left) is the real
product ``y = x @ M`` with the block matrix ``M[b, c] = SIGN[b^c][b] W_(b^c)``
(:mod:`refattn.cores.quaternion.algebra`): four ``(n_in, n_out)`` blocks, a
quarter of a real layer's parameters.  See ``docs/projections/quaternion.md``.

Heads (layer option ``head_layout``): by default (``"units"``) head ``h`` owns units
``h*dh ... (h+1)*dh - 1`` of EACH component (``dh = d_model / (4 H)``), not the
contiguous chunk ``h*d_k ... (h+1)*d_k - 1`` of the flat vector, which for ``H = 4``
would hand each head one component.  ``head_layout="chunks"`` is that contiguous
split, then four quarters of each chunk as the head's components: the layout of
the official shared-score code (``docs/projections/quaternion.md``, "Head layouts").

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``d`` = ``d_model``, ``H`` heads, ``n = d / 4`` units per component,
``dh = n / H`` units per component and head.
"""

from __future__ import annotations

from .._array import namespace
from .._validate import check_float_array, check_same_dtype
from .._vjp import attach_vjp
from ..cores.quaternion.algebra import SIGN
from ..typing import Array
from ._base import OutputProjection, linear_backward, linear_forward

__all__ = ["quaternion_linear", "linear_matrix", "linear_matrix_adjoint",
           "quaternion_linear_forward", "quaternion_linear_backward", "split_quaternion_heads",
           "merge_quaternion_heads", "HEAD_LAYOUTS", "QuaternionProjection"]

#: Head layouts of the quaternion projection (layer option ``head_layout``).
HEAD_LAYOUTS = ("units", "chunks")


def linear_matrix(xp, w):
    """The real block matrix of ``x -> w (x) x``: ``(4, n_in, n_out) -> (4 n_in, 4 n_out)``.

    Block row ``b`` (input component), block column ``c`` (output component):
    ``M[b, c] = SIGN[b^c][b] w[b^c]``, i.e. the rows
    ``[W_r W_i W_j W_k; -W_i W_r W_k -W_j; -W_j -W_k W_r W_i; -W_k W_j -W_i W_r]``.
    """
    return xp.concat([
        xp.concat([w[b ^ c] if SIGN[b ^ c][b] > 0 else -w[b ^ c] for c in range(4)], axis=1)
        for b in range(4)], axis=0)


def linear_matrix_adjoint(xp, dm):
    """Adjoint of :func:`linear_matrix`: ``dW_a = sum_b SIGN[a][b] dM[b, a^b]``."""
    n_in, n_out = dm.shape[0] // 4, dm.shape[1] // 4
    blocks = xp.reshape(dm, (4, n_in, 4, n_out))                 # (b, n_in, c, n_out)
    dw = []
    for a in range(4):
        terms = [blocks[b, :, a ^ b, :] if SIGN[a][b] > 0 else -blocks[b, :, a ^ b, :]
                 for b in range(4)]
        dw.append(terms[0] + terms[1] + terms[2] + terms[3])
    return xp.stack(dw, axis=0)                                   # (4, n_in, n_out)


def quaternion_linear_forward(xp, x, w, b=None):
    """``y = w (x) x + b``: ``x (..., 4 n_in)`` -> ``y (..., 4 n_out)`` (one real GEMM)."""
    return linear_forward(xp, x, linear_matrix(xp, w), b)


def quaternion_linear_backward(xp, x, w, dy, has_bias: bool):
    """``(dx, dw, db)`` of :func:`quaternion_linear_forward` (``db`` None without bias).

    With ``y = x M + b``: ``dx = dy M^T``, ``dM = x^T dy``, ``dw = adjoint(dM)``, ``db = sum dy``.
    """
    dx, dm, db = linear_backward(xp, x, linear_matrix(xp, w), dy, has_bias)
    return dx, linear_matrix_adjoint(xp, dm), db


def _check_linear(x, w, b):
    check_float_array(x, "x")
    check_float_array(w, "w")
    if w.ndim != 3 or w.shape[0] != 4:
        raise ValueError(f"w must have shape (4, n_in, n_out) (components r, i, j, k), got "
                         f"{tuple(w.shape)}")
    n_in, n_out = w.shape[1], w.shape[2]
    if x.ndim < 1 or x.shape[-1] != 4 * n_in:
        raise ValueError(f"x must have shape (..., 4 n_in) = (..., {4 * n_in}) for w of shape "
                         f"{tuple(w.shape)}, got {tuple(x.shape)}")
    if b is not None:
        check_float_array(b, "b")
        if tuple(b.shape) != (4 * n_out,):
            raise ValueError(f"b must have shape (4 n_out,) = ({4 * n_out},), got {tuple(b.shape)}")
    check_same_dtype(x=x, w=w, b=b)


def quaternion_linear(x: Array, w: Array, b: Array | None = None) -> Array:
    r"""Quaternion linear layer ``y = w (x) x + b`` on the ``[r | i | j | k]`` block layout.

    .. math::

        y_r &= x_r W_r - x_i W_i - x_j W_j - x_k W_k \\
        y_i &= x_r W_i + x_i W_r - x_j W_k + x_k W_j \\
        y_j &= x_r W_j + x_i W_k + x_j W_r - x_k W_i \\
        y_k &= x_r W_k - x_i W_j + x_j W_i + x_k W_r

    (the Hamilton product with the weight on the left, unit by unit).

    Parameters
    ----------
    x : array (..., 4 n_in)
        Blocks ``x[..., c*n_in:(c+1)*n_in]`` are component ``c`` (``r, i, j, k``).
    w : array (4, n_in, n_out)
        ``w[0], w[1], w[2], w[3]`` are ``W_r, W_i, W_j, W_k``.
    b : array (4 n_out,), optional

    Returns
    -------
    y : array (..., 4 n_out)

    Examples
    --------
    >>> import numpy as np, refattn
    >>> w = np.zeros((4, 1, 1)); w[1] = 1.0                 # the quaternion i
    >>> x = np.array([0.0, 0.0, 1.0, 0.0])                   # the quaternion j
    >>> refattn.quaternion_linear(x, w).tolist()             # i (x) j = k
    [0.0, 0.0, 0.0, 1.0]
    >>> y, pullback = refattn.vjp(refattn.quaternion_linear, x, w)
    >>> [g.shape for g in pullback(np.ones(4))]
    [(4,), (4, 1, 1)]
    """
    _check_linear(x, w, b)
    return quaternion_linear_forward(namespace(x, w, b), x, w, b)


def _quaternion_linear_forward(x: Array, w: Array,
                               b: Array | None = None) -> tuple[Array, tuple]:
    """``(y, residuals)`` of :func:`quaternion_linear`."""
    _check_linear(x, w, b)
    xp = namespace(x, w, b)
    y = quaternion_linear_forward(xp, x, w, b)
    return y, (xp, x, w, b is not None, tuple(y.shape), y.dtype)


def _quaternion_linear_backward(residuals: tuple, dy: Array) -> tuple[Array, ...]:
    """``(dx, dw)``, plus ``db`` with a bias."""
    xp, x, w, has_bias, shape, dtype = residuals
    check_float_array(dy, "cotangent")
    if tuple(dy.shape) != shape:
        raise ValueError(f"cotangent has shape {tuple(dy.shape)}, expected {shape}")
    dx, dw, db = quaternion_linear_backward(xp, x, w, xp.astype(dy, dtype), has_bias)
    return (dx, dw, db) if has_bias else (dx, dw)


attach_vjp(quaternion_linear, _quaternion_linear_forward, _quaternion_linear_backward)


def split_quaternion_heads(xp, x, n_heads: int, layout: str = "units"):
    """``(*batch, L, 4 n) -> (*batch, H, L, 4, dh)``, a permutation of the features.

    ``layout="units"``: head ``h``, component ``c``, unit ``u`` is flat feature
    ``c n + h dh + u`` (head ``h`` owns units ``h dh ... (h+1) dh - 1`` of EACH component).
    ``layout="chunks"``: it is flat feature ``h (4 dh) + c dh + u`` (head ``h`` is the
    contiguous chunk ``h 4dh ... (h+1) 4dh - 1``, its components the chunk's quarters).
    Both agree for ``H = 1``.  The adjoint (and inverse) is :func:`merge_quaternion_heads`.
    """
    *batch, L, d = x.shape
    nb = len(batch)
    dh = d // (4 * n_heads)
    if layout == "chunks":
        x = xp.reshape(x, (*batch, L, n_heads, 4, dh))                # (*batch, L, H, 4, dh)
        return xp.permute_dims(x, (*range(nb), nb + 1, nb, nb + 2, nb + 3))
    x = xp.reshape(x, (*batch, L, 4, n_heads, dh))                    # (*batch, L, 4, H, dh)
    return xp.permute_dims(x, (*range(nb), nb + 2, nb, nb + 1, nb + 3))


def merge_quaternion_heads(xp, x, layout: str = "units"):
    """Inverse of :func:`split_quaternion_heads`: ``(*batch, H, L, 4, dh) -> (*batch, L, 4Hdh)``.

    A permutation's inverse is its transpose, so this is also the backward pass of
    the split (and the split the backward pass of this merge).
    """
    *batch, H, L, _, dh = x.shape
    nb = len(batch)
    if layout == "chunks":
        x = xp.permute_dims(x, (*range(nb), nb + 1, nb, nb + 2, nb + 3))  # (*batch, L, H, 4, dh)
    else:
        x = xp.permute_dims(x, (*range(nb), nb + 1, nb + 2, nb, nb + 3))  # (*batch, L, 4, H, dh)
    return xp.reshape(x, (*batch, L, 4 * H * dh))


class QuaternionProjection(OutputProjection):
    """Quaternion ``Q, K, V`` and output layers; heads own units of every component.

    Layer option ``head_layout``: ``"units"`` (default; head ``h`` owns units
    ``h dh ... (h+1) dh - 1`` of each component) or ``"chunks"`` (head ``h`` is the
    ``h``-th contiguous chunk of the flat ``[r | i | j | k]`` vector, split in four:
    the official shared-score code's layout).  See :func:`split_quaternion_heads`.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(16, 2, projection="quaternion", core="shared",
    ...                           head_layout="chunks")
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 16))
    >>> y, pullback = refattn.vjp(layer, layer.init(seed=0), x)
    >>> y.shape, pullback(np.ones_like(y))[1].shape
    ((1, 3, 16), (1, 3, 16))
    """

    name = "quaternion"
    layout = "quaternion"
    options = ("head_layout",)
    # The shared output projection, on the Hamilton-product layer and this scheme's heads.
    _linear_forward = staticmethod(quaternion_linear_forward)
    _linear_backward = staticmethod(quaternion_linear_backward)

    @staticmethod
    def head_layout(cfg) -> str:
        return cfg.options.get("head_layout", "units")

    def _merge(self, xp, o, cfg):
        return merge_quaternion_heads(xp, o, self.head_layout(cfg))

    def _split(self, xp, x, cfg):
        return split_quaternion_heads(xp, x, cfg.n_heads, self.head_layout(cfg))

    def check(self, cfg):
        layout = self.head_layout(cfg)
        if layout not in HEAD_LAYOUTS:
            raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS} (the quaternion "
                             f"projection's head split), got {layout!r}")
        if cfg.d_model % (4 * cfg.n_heads):
            raise ValueError(
                f"projection='quaternion' needs d_model divisible by 4 * n_heads (each head owns "
                f"d_model / (4 n_heads) units of each of the 4 components); got d_model="
                f"{cfg.d_model}, n_heads={cfg.n_heads}")

    def param_shapes(self, cfg):
        d, n = cfg.d_model, cfg.d_model // 4
        shapes = {}
        for name in ("q", "k", "v", "o"):
            # fan_in = d: w (x) x is the real (d, d) product x @ M, initialised like one.
            shapes[f"w_{name}"] = ((4, n, n), d)
            if cfg.bias:
                shapes[f"b_{name}"] = ((d,), d)
        return shapes

    def core_shapes(self, cfg, q_len, kv_len):
        """Per-batch-element core input shapes ``q, k, v``: ``(H, L|S, 4, dh)``."""
        dh = cfg.d_model // (4 * cfg.n_heads)
        return ((cfg.n_heads, q_len, 4, dh), (cfg.n_heads, kv_len, 4, dh),
                (cfg.n_heads, kv_len, 4, dh))

    def _project(self, xp, params, name, x, cfg):
        y = quaternion_linear_forward(xp, x, params[f"w_{name}"], params.get(f"b_{name}"))
        return self._split(xp, y, cfg)                             # (*batch, H, L, 4, dh)

    def _project_backward(self, xp, params, name, x, dheads, cfg, grads):
        dx, dw, db = quaternion_linear_backward(xp, x, params[f"w_{name}"],
                                                self._merge(xp, dheads, cfg), cfg.bias)
        grads[f"w_{name}"] = dw
        if cfg.bias:
            grads[f"b_{name}"] = db
        return dx

    def project_in(self, params, xq, xkv, cfg):
        xp = namespace(xq, xkv)
        return (self._project(xp, params, "q", xq, cfg), self._project(xp, params, "k", xkv, cfg),
                self._project(xp, params, "v", xkv, cfg), (xq, xkv))

    def backward_in(self, params, res, dq, dk, dv, cfg):
        xq, xkv = res
        xp = namespace(dq)
        grads = {}
        dxq = self._project_backward(xp, params, "q", xq, dq, cfg, grads)
        dxkv = (self._project_backward(xp, params, "k", xkv, dk, cfg, grads)
                + self._project_backward(xp, params, "v", xkv, dv, cfg, grads))
        return grads, dxq, dxkv

    def flops(self, cfg, q_len, kv_len):
        """Each quaternion layer is one real ``(d, d)`` GEMM: ``2 d^2`` FLOPs per token."""
        d = cfg.d_model
        return 2.0 * d * d * (2 * q_len + 2 * kv_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
QUATERNION = QuaternionProjection()
