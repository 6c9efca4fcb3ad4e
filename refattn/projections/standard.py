"""The standard multi-head projection: ``Q = xq W_Q``, ``K = xkv W_K``, ``V = xkv W_V``.

Parameters (no bias) ``4 d^2``; see ``docs/projections/standard.md``.
"""

from __future__ import annotations

from .._array import namespace
from ._base import RealOutputProjection, linear_backward, linear_forward, merge_heads, split_heads

__all__ = ["StandardProjection", "linear_param_shapes", "project_linear",
           "project_linear_backward"]


def linear_param_shapes(cfg, names):
    """``{w_<name>: ((d, d), d), b_<name>: ((d,), d)}`` for each ``name`` (biases only with ``cfg.bias``)."""
    d = cfg.d_model
    shapes = {}
    for n in names:
        shapes[f"w_{n}"] = ((d, d), d)
        if cfg.bias:
            shapes[f"b_{n}"] = ((d,), d)
    return shapes


def project_linear(xp, params, name, x, cfg):
    """``split_heads(x @ w_<name> + b_<name>)``: ``(*batch, L, d) -> (*batch, H, L, d_k)``."""
    y = linear_forward(xp, x, params[f"w_{name}"], params.get(f"b_{name}"))
    return split_heads(xp, y, cfg.n_heads)


def project_linear_backward(xp, params, name, x, dheads, cfg, grads):
    """Adjoint of :func:`project_linear`; stores ``dw_<name>`` (``db_<name>``) in ``grads``, returns ``dx``."""
    dx, dw, db = linear_backward(xp, x, params[f"w_{name}"], merge_heads(xp, dheads), cfg.bias)
    grads[f"w_{name}"] = dw
    if cfg.bias:
        grads[f"b_{name}"] = db
    return dx


class StandardProjection(RealOutputProjection):
    name = "standard"
    #: Input-projection matrix products per head (``Q_h``, ``K_h``, ``V_h``).
    matmuls_per_head = 3

    def param_shapes(self, cfg):
        return {**linear_param_shapes(cfg, ("q", "k", "v")), **self.out_shapes(cfg)}

    def project_in(self, params, xq, xkv, cfg):
        xp = namespace(xq, xkv)
        q = project_linear(xp, params, "q", xq, cfg)
        k = project_linear(xp, params, "k", xkv, cfg)
        v = project_linear(xp, params, "v", xkv, cfg)
        return q, k, v, (xq, xkv)

    def backward_in(self, params, res, dq, dk, dv, cfg):
        xq, xkv = res
        xp = namespace(dq)
        grads = {}
        dxq = project_linear_backward(xp, params, "q", xq, dq, cfg, grads)
        dxkv = (project_linear_backward(xp, params, "k", xkv, dk, cfg, grads)
                + project_linear_backward(xp, params, "v", xkv, dv, cfg, grads))
        return grads, dxq, dxkv

    def flops(self, cfg, q_len, kv_len):
        d = cfg.d_model
        return 2.0 * d * d * (q_len + 2 * kv_len) + self.out_flops(cfg, q_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
STANDARD = StandardProjection()
