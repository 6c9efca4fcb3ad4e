"""Efficient Attention (Hosseini & Hosseini, arXiv 2403.01643): no key or value projection.

Per head ``Q_h = xq W_Q,h`` and ``K_h = V_h = xkv_h``, the head's own slice of the
unprojected input; ``W_O`` is kept.  Parameters (no bias) ``2 d^2``, 0.50 of
standard; two input-projection matmuls per head fewer.  Derivation:
``docs/projections/efficient.md``.

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``d = d_model``, ``H`` heads, ``d_k = d / H``.
"""

from __future__ import annotations

from .._array import namespace
from ._base import RealOutputProjection, merge_heads, split_heads
from .standard import linear_param_shapes, project_linear, project_linear_backward

__all__ = ["EfficientProjection"]


class EfficientProjection(RealOutputProjection):
    """``Q = xq W_Q + b_Q``, ``K = V = xkv`` split into heads.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(16, 4, projection="efficient", bias=True)
    >>> sorted(layer.param_shapes())
    ['b_o', 'b_q', 'w_o', 'w_q']
    >>> layer.num_params() / refattn.Attention(16, 4, bias=True).num_params()
    0.5
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16))
    >>> layer(layer.init(seed=0), x).shape
    (2, 5, 16)
    """

    name = "efficient"
    #: Input-projection matrix products per head (``Q_h``).
    matmuls_per_head = 1

    def param_shapes(self, cfg):
        return {**linear_param_shapes(cfg, ("q",)), **self.out_shapes(cfg)}

    def project_in(self, params, xq, xkv, cfg):
        xp = namespace(xq, xkv)
        q = project_linear(xp, params, "q", xq, cfg)             # (*batch, H, L, d_k)
        kv = split_heads(xp, xkv, cfg.n_heads)                   # (*batch, H, S, d_k)
        return q, kv, kv, (xq,)

    def backward_in(self, params, res, dq, dk, dv, cfg):
        (xq,) = res
        xp = namespace(dq)
        grads = {}
        dxq = project_linear_backward(xp, params, "q", xq, dq, cfg, grads)
        # K and V are the same identity view of xkv: both gradients reach it.
        return grads, dxq, merge_heads(xp, dk + dv)

    def flops(self, cfg, q_len, kv_len):
        d = cfg.d_model
        return 2.0 * d * d * q_len + self.out_flops(cfg, q_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
EFFICIENT = EfficientProjection()
