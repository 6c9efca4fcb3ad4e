"""Optimised Attention (Hosseini & Hosseini, arXiv 2403.01643): no value projection.

Per head ``Q_h = xq W_Q,h``, ``K_h = xkv W_K,h`` and ``V_h = xkv_h``, the head's own
slice of the unprojected input; ``W_O`` is kept.  Parameters (no bias) ``3 d^2``,
0.75 of standard; one input-projection matmul per head fewer.  Derivation:
``docs/projections/optimised.md``.

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``d = d_model``, ``H`` heads, ``d_k = d / H``.
"""

from __future__ import annotations

from .._array import namespace
from ._base import RealOutputProjection, merge_heads, split_heads
from .standard import linear_param_shapes, project_linear, project_linear_backward

__all__ = ["OptimisedProjection"]


class OptimisedProjection(RealOutputProjection):
    """``Q = xq W_Q + b_Q``, ``K = xkv W_K + b_K``, ``V = xkv`` split into heads.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(16, 4, projection="optimised")
    >>> sorted(layer.param_shapes())
    ['w_k', 'w_o', 'w_q']
    >>> layer.num_params() / refattn.Attention(16, 4).num_params()
    0.75
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16))
    >>> layer(layer.init(seed=0), x).shape
    (2, 5, 16)
    """

    name = "optimised"
    #: Input-projection matrix products per head (``Q_h``, ``K_h``).
    matmuls_per_head = 2

    def param_shapes(self, cfg):
        return {**linear_param_shapes(cfg, ("q", "k")), **self.out_shapes(cfg)}

    def project_in(self, params, xq, xkv, cfg):
        xp = namespace(xq, xkv)
        q = project_linear(xp, params, "q", xq, cfg)             # (*batch, H, L, d_k)
        k = project_linear(xp, params, "k", xkv, cfg)            # (*batch, H, S, d_k)
        v = split_heads(xp, xkv, cfg.n_heads)                    # (*batch, H, S, d_k)
        return q, k, v, (xq, xkv)

    def backward_in(self, params, res, dq, dk, dv, cfg):
        xq, xkv = res
        xp = namespace(dq)
        grads = {}
        dxq = project_linear_backward(xp, params, "q", xq, dq, cfg, grads)
        # V is the identity on xkv, so its gradient reaches xkv unchanged.
        dxkv = project_linear_backward(xp, params, "k", xkv, dk, cfg, grads) + merge_heads(xp, dv)
        return grads, dxq, dxkv

    def flops(self, cfg, q_len, kv_len):
        d = cfg.d_model
        return 2.0 * d * d * (q_len + kv_len) + self.out_flops(cfg, q_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
OPTIMISED = OptimisedProjection()
