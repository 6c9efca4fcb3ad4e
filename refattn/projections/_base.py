"""What a projection scheme is, and the linear algebra every real scheme shares.

A projection scheme turns the layer inputs into the per-head ``q, k, v`` of an
attention core and turns the core's output back into ``d_model`` features.
Each direction is a forward/backward pair; a layer's backward pass is the
chain ``scheme.backward_out -> core.backward -> scheme.backward_in``.

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``d`` = ``d_model``, ``H`` heads, ``d_k = d / H``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._array import matrix_transpose, namespace
from ..typing import Array, Namespace

#: ``{name: array}``: a layer's parameters, or their gradients.
Params = dict[str, Array]

__all__ = ["LayerConfig", "Projection", "linear_forward", "linear_backward", "split_heads",
           "merge_heads", "OutputProjection", "RealOutputProjection"]


@dataclass(frozen=True)
class LayerConfig:
    """The layer settings a projection scheme may read."""

    d_model: int
    n_heads: int
    causal: bool = False
    bias: bool = False
    options: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def linear_forward(xp: Namespace, x: Array, w: Array, b: Array | None = None) -> Array:
    """``y = x @ w + b``: ``x (..., d_in)``, ``w (d_in, d_out)``, ``b (d_out,)``."""
    y = x @ w
    return y if b is None else y + b


def linear_backward(xp: Namespace, x: Array, w: Array, dy: Array,
                    has_bias: bool) -> tuple[Array, Array, Array | None]:
    """Gradients of :func:`linear_forward`: ``(dx, dw, db)`` (``db`` None without bias).

    ``dx = dy w^T``, ``dw = sum_batch x^T dy``, ``db = sum_batch dy``.
    """
    d_in, d_out = w.shape
    x2 = xp.reshape(x, (-1, d_in))                      # (N, d_in), N = prod(batch) * L
    dy2 = xp.reshape(dy, (-1, d_out))                   # (N, d_out)
    dw = matrix_transpose(xp, x2) @ dy2                 # (d_in, d_out)
    db = xp.sum(dy2, axis=0) if has_bias else None      # (d_out,)
    dx = dy @ matrix_transpose(xp, w)                   # (..., d_in)
    return dx, dw, db


def split_heads(xp: Namespace, x: Array, n_heads: int) -> Array:
    """``(*batch, L, H * d_k) -> (*batch, H, L, d_k)``: head ``h`` owns columns ``h d_k ... (h+1) d_k - 1``."""
    *batch, L, d = x.shape
    x = xp.reshape(x, (*batch, L, n_heads, d // n_heads))   # (*batch, L, H, d_k)
    return xp.permute_dims(x, (*range(len(batch)), len(batch) + 1, len(batch), len(batch) + 2))


def merge_heads(xp: Namespace, x: Array) -> Array:
    """Inverse of :func:`split_heads`: ``(*batch, H, L, d_k) -> (*batch, L, H * d_k)``."""
    *batch, H, L, dk = x.shape
    nb = len(batch)
    x = xp.permute_dims(x, (*range(nb), nb + 1, nb, nb + 2))   # (*batch, L, H, d_k)
    return xp.reshape(x, (*batch, L, H * dk))


class Projection:
    """Base class of projection schemes; see the module docstring.

    Subclasses define ``name``, ``layout`` (the core layout they produce),
    ``options`` (layer keywords they consume) and the methods below.
    """

    name: str = ""
    layout: str = "real"
    options: tuple[str, ...] = ()

    def check(self, cfg: LayerConfig) -> None:
        """Raise ``ValueError`` for settings the scheme cannot serve."""
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")

    def param_shapes(self, cfg: LayerConfig) -> dict[str, tuple[tuple[int, ...], int]]:
        """``{name: (shape, fan_in)}`` of every parameter, in a fixed order."""
        raise NotImplementedError

    def check_inputs(self, cfg: LayerConfig, xq: Array, xkv: Array) -> None:
        """Extra input checks (e.g. a maximum sequence length)."""

    def project_in(self, params: Params, xq: Array, xkv: Array,
                   cfg: LayerConfig) -> tuple[Array, Array, Array, Any]:
        """``(q, k, v, residuals)`` in the core's layout."""
        raise NotImplementedError

    def backward_in(self, params: Params, res: Any, dq: Array, dk: Array, dv: Array,
                    cfg: LayerConfig) -> tuple[Params, Array, Array]:
        """``(dparams, dxq, dxkv)`` from the gradients of ``q, k, v``."""
        raise NotImplementedError

    def project_out(self, params: Params, o: Array, cfg: LayerConfig) -> tuple[Array, Any]:
        """``(y, residuals)``: the core output ``o`` back to ``(*batch, L, d_model)``."""
        raise NotImplementedError

    def backward_out(self, params: Params, res: Any, dy: Array,
                     cfg: LayerConfig) -> tuple[Params, Array]:
        """``(dparams, do)``."""
        raise NotImplementedError

    def flops(self, cfg: LayerConfig, q_len: int, kv_len: int) -> float:
        """Forward FLOPs of the projections (input and output) per batch element."""
        raise NotImplementedError


class OutputProjection(Projection):
    """Output projection ``y = merge_heads(O) W_O + b_O``, written once for every scheme.

    A scheme picks its linear map and head layout through four hooks
    (``_linear_forward``, ``_linear_backward``, ``_merge_heads``, ``_split_heads``), or
    overrides ``_merge`` / ``_split`` when the head layout depends on the configuration;
    the real schemes use a plain linear map on contiguous head slices, the
    quaternion scheme a Hamilton-product layer on per-unit heads.
    """

    _linear_forward = staticmethod(linear_forward)
    _linear_backward = staticmethod(linear_backward)
    _merge_heads = staticmethod(merge_heads)
    _split_heads = staticmethod(split_heads)

    def _merge(self, xp: Namespace, o: Array, cfg: LayerConfig) -> Array:
        """The core output's heads merged into features (a scheme may read ``cfg``)."""
        return self._merge_heads(xp, o)

    def _split(self, xp: Namespace, x: Array, cfg: LayerConfig) -> Array:
        """Features split into the core's heads: the adjoint of :meth:`_merge`."""
        return self._split_heads(xp, x, cfg.n_heads)

    def project_out(self, params: Params, o: Array, cfg: LayerConfig) -> tuple[Array, Array]:
        xp = namespace(o)
        merged = self._merge(xp, o, cfg)                             # (*batch, L, d)
        return self._linear_forward(xp, merged, params["w_o"], params.get("b_o")), merged

    def backward_out(self, params: Params, merged: Array, dy: Array,
                     cfg: LayerConfig) -> tuple[Params, Array]:
        xp = namespace(dy)
        dmerged, dw, db = self._linear_backward(xp, merged, params["w_o"], dy, cfg.bias)
        grads = {"w_o": dw}
        if cfg.bias:
            grads["b_o"] = db
        return grads, self._split(xp, dmerged, cfg)                  # the core's head layout


class RealOutputProjection(OutputProjection):
    """Output projection ``y = concat_h(O_h) W_O + b_O`` shared by the real schemes."""

    def out_shapes(self, cfg: LayerConfig) -> dict[str, tuple[tuple[int, ...], int]]:
        shapes: dict[str, tuple[tuple[int, ...], int]] = {"w_o": ((cfg.d_model, cfg.d_model), cfg.d_model)}
        if cfg.bias:
            shapes["b_o"] = ((cfg.d_model,), cfg.d_model)
        return shapes

    def out_flops(self, cfg: LayerConfig, q_len: int) -> float:
        return 2.0 * q_len * cfg.d_model * cfg.d_model
