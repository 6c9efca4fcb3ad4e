"""Super Attention (Hosseini & Hosseini, arXiv 2403.01643): a token-mixing value kernel.

Per head ``Q_h = xq W_Q,h``, ``K_h = xkv_h`` and ``V_h = W_A xkv_h``: the alignment
kernel ``W_A (l, l)``, ONE per layer and shared by all heads, multiplies from the
LEFT, mixing the ``S`` key/value tokens (rows) of each head's slice.  A sequence of
``S <= l`` tokens uses the top-left block ``W_A[:S, :S]``; longer ones are an
error.  With ``causal=True`` the block is restricted to its lower triangle (token
``i`` mixes only tokens ``j <= i``), in the forward pass and in the gradient.

The value path is evaluated as ``P (W_A X)`` (``2 S^2 d`` FLOPs once per layer),
never as ``(P W_A) X`` (an ``L x S x S`` product per head).  Parameters (no bias)
``2 d^2 + l^2``: at most 0.75 of standard only while ``l <= d_model``.
Derivation: ``docs/projections/super.md``.

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``l`` = ``seq_len``, ``d = d_model``, ``H`` heads, ``d_k = d / H``.
"""

from __future__ import annotations

import numbers

import array_api_compat

from .._array import matrix_transpose, namespace
from .._masks import causal_keep
from ._base import RealOutputProjection, merge_heads, split_heads
from .standard import linear_param_shapes, project_linear, project_linear_backward

__all__ = ["SuperProjection"]


class SuperProjection(RealOutputProjection):
    """``Q = xq W_Q + b_Q``, ``K = xkv``, ``V = W_A[:S, :S] xkv``, each split into heads.

    Layer option ``seq_len`` (required): the context length ``l`` of ``w_a (l, l)``.
    ``w_a`` carries no bias (the paper's ``V' = W_A V`` has none); ``bias=True``
    adds ``b_q`` and ``b_o``.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(16, 4, projection="super", seq_len=6, causal=True)
    >>> layer.param_shapes()["w_a"]
    (6, 6)
    >>> layer.num_params() == 2 * 16**2 + 6**2
    True
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16))  # 5 <= seq_len tokens
    >>> y, pullback = refattn.vjp(layer, layer.init(seed=0), x)
    >>> dparams, dx = pullback(np.ones_like(y))
    >>> bool(np.all(np.triu(dparams["w_a"], 1) == 0))  # causal: no gradient above the diagonal
    True
    """

    name = "super"
    options = ("seq_len",)
    #: Input matrix products per head (``Q_h`` and ``W_A x_h``).
    matmuls_per_head = 2

    @staticmethod
    def seq_len(cfg) -> int:
        return int(cfg.options["seq_len"])

    def check(self, cfg):
        super().check(cfg)
        if "seq_len" not in cfg.options:
            raise ValueError("projection='super' needs seq_len=l, the context length of its "
                             "(l, l) alignment kernel w_a, e.g. Attention(256, 8, "
                             "projection='super', seq_len=196)")
        l = cfg.options["seq_len"]
        if isinstance(l, bool) or not isinstance(l, numbers.Integral) or l < 1:
            raise ValueError(f"seq_len must be a positive integer (the context length of the "
                             f"super projection's w_a), got {l!r}")

    def param_shapes(self, cfg):
        l = self.seq_len(cfg)
        return {**linear_param_shapes(cfg, ("q",)), "w_a": ((l, l), l), **self.out_shapes(cfg)}

    def check_inputs(self, cfg, xq, xkv):
        self._check_kv_len(cfg, xkv.shape[-2], "xq (self-attention)" if xkv is xq else "xkv")

    def _check_kv_len(self, cfg, kv_len, name="xkv"):
        l = self.seq_len(cfg)
        if kv_len > l:
            raise ValueError(f"{name} has {kv_len} tokens but the super projection's w_a is "
                             f"({l}, {l}) (seq_len={l}): sequences longer than seq_len have no "
                             f"alignment weights; build the layer with seq_len >= {kv_len}")

    def _restrict(self, xp, a, cfg):
        """Keep the lower triangle of a square ``(S, S)`` block when causal, else ``a``."""
        if not cfg.causal:
            return a
        S = a.shape[0]
        keep = causal_keep(xp, S, S, 0, device=array_api_compat.device(a))   # (S, S) j <= i
        return xp.where(keep, a, xp.zeros_like(a))

    def project_in(self, params, xq, xkv, cfg):
        xp = namespace(xq, xkv)
        S = xkv.shape[-2]
        self._check_kv_len(cfg, S)
        w_a = self._restrict(xp, params["w_a"][:S, :S], cfg)     # (S, S)
        q = project_linear(xp, params, "q", xq, cfg)             # (*batch, H, L, d_k)
        k = split_heads(xp, xkv, cfg.n_heads)                    # (*batch, H, S, d_k)
        # One (S, S) x (S, d) product for all heads: mixing tokens commutes with the
        # split of features into heads.
        v = split_heads(xp, w_a @ xkv, cfg.n_heads)              # (*batch, H, S, d_k)
        return q, k, v, (xq, xkv, w_a)

    def backward_in(self, params, res, dq, dk, dv, cfg):
        xq, xkv, w_a = res
        xp = namespace(dq)
        *_, S, d = xkv.shape
        grads = {}
        dxq = project_linear_backward(xp, params, "q", xq, dq, cfg, grads)
        dmixed = merge_heads(xp, dv)                             # (*batch, S, d): dL/d(W_A X)
        # dL/dW_A = sum_batch dmixed X^T: fold the batch into the contracted axis.
        x_rows = xp.reshape(xp.permute_dims(xp.reshape(xkv, (-1, S, d)), (1, 0, 2)),
                            (S, -1))                             # (S, B d)
        dm_rows = xp.reshape(xp.permute_dims(xp.reshape(dmixed, (-1, S, d)), (1, 0, 2)),
                             (S, -1))                            # (S, B d)
        block = self._restrict(xp, dm_rows @ matrix_transpose(xp, x_rows), cfg)   # (S, S)
        dw_a = xp.zeros_like(params["w_a"])                      # (l, l): unused entries get 0
        dw_a[:S, :S] = block
        grads["w_a"] = dw_a
        dxkv = merge_heads(xp, dk) + matrix_transpose(xp, w_a) @ dmixed   # (*batch, S, d)
        return grads, dxq, dxkv

    def flops(self, cfg, q_len, kv_len):
        d = cfg.d_model
        # Causal: only the lower triangle of W_A[:S, :S] is arithmetic that matters.
        kept = kv_len * (kv_len + 1) // 2 if cfg.causal else kv_len * kv_len
        return 2.0 * d * d * q_len + 2.0 * kept * d + self.out_flops(cfg, q_len)


#: The scheme instance the inventory (:data:`refattn.projections.PROJECTIONS`) lists.
SUPER = SuperProjection()
