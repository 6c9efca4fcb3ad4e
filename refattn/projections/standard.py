"""The standard multi-head projection: ``Q = xq W_Q``, ``K = xkv W_K``, ``V = xkv W_V``.

Parameters (no bias) ``4 d^2``; see ``docs/projections/standard.md``.  With the
option ``kv_heads=Hkv`` (grouped-query attention, ``Hkv`` dividing ``H``) the key
and value maps are ``(d, Hkv d_k)`` and query head ``h`` reads kv head
``h // (H / Hkv)`` (the core's GQA convention).
"""

from __future__ import annotations

import numbers

from .._array import namespace
from ._base import RealOutputProjection, linear_backward, linear_forward, merge_heads, split_heads

__all__ = ["StandardProjection", "linear_param_shapes", "project_linear",
           "project_linear_backward", "kv_heads"]


def linear_param_shapes(cfg, names, heads=None):
    """``{w_<name>: ((d, n d_k), d), b_<name>: ((n d_k,), d)}`` for each ``name``, ``n = heads`` (default ``H``).

    Biases only with ``cfg.bias``.
    """
    d = cfg.d_model
    width = d if heads is None else heads * cfg.head_dim
    shapes = {}
    for n in names:
        shapes[f"w_{n}"] = ((d, width), d)
        if cfg.bias:
            shapes[f"b_{n}"] = ((width,), d)
    return shapes


def kv_heads(cfg) -> int:
    """The number of key/value heads ``Hkv`` (option ``kv_heads``, default ``H``)."""
    return cfg.options.get("kv_heads", cfg.n_heads)


def project_linear(xp, params, name, x, cfg):
    """``split_heads(x @ w_<name> + b_<name>)``: ``(*batch, L, d) -> (*batch, n, L, d_k)``.

    ``n`` is the map's width over ``d_k``: ``H``, or ``Hkv`` for GQA keys and values.
    """
    w = params[f"w_{name}"]
    y = linear_forward(xp, x, w, params.get(f"b_{name}"))
    return split_heads(xp, y, w.shape[-1] // cfg.head_dim)


def project_linear_backward(xp, params, name, x, dheads, cfg, grads):
    """Adjoint of :func:`project_linear`; stores ``dw_<name>`` (``db_<name>``) in ``grads``, returns ``dx``."""
    dx, dw, db = linear_backward(xp, x, params[f"w_{name}"], merge_heads(xp, dheads), cfg.bias)
    grads[f"w_{name}"] = dw
    if cfg.bias:
        grads[f"b_{name}"] = db
    return dx


class StandardProjection(RealOutputProjection):
    name = "standard"
    options = ("kv_heads",)
    #: Input-projection matrix products per head (``Q_h``, ``K_h``, ``V_h``).
    matmuls_per_head = 3

    def check(self, cfg):
        super().check(cfg)
        n = kv_heads(cfg)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or cfg.n_heads % n:
            raise ValueError(f"kv_heads must be a positive integer dividing n_heads="
                             f"{cfg.n_heads}, got {n!r}")

    def param_shapes(self, cfg):
        return {**linear_param_shapes(cfg, ("q",)),
                **linear_param_shapes(cfg, ("k", "v"), heads=kv_heads(cfg)),
                **self.out_shapes(cfg)}

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
        d, d_kv = cfg.d_model, kv_heads(cfg) * cfg.head_dim
        return 2.0 * d * (d * q_len + 2 * d_kv * kv_len) + self.out_flops(cfg, q_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
STANDARD = StandardProjection()
