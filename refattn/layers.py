"""The layer frame: ``Attention`` = projection scheme x attention core x output projection.

Shape legend: ``*batch`` batch dims, ``L`` query length, ``S`` key length,
``d`` = ``d_model``, ``H`` heads.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import numpy as np

from ._array import namespace
from ._validate import (check_cotangent, check_float_array, check_same_dtype,
                        reject_framework_keywords)
from .cores import get_core
from .projections import LayerConfig, get_projection
from .rotary import ROTARY_STYLES, apply_rotary, apply_rotary_backward
from .typing import Array, Backend, Pullback

__all__ = ["Attention"]


class Attention:
    """A multi-head attention layer with a hand-derived backward pass.

    Parameters
    ----------
    d_model : int
        Feature size of the inputs and the output.
    n_heads : int
        Number of heads; ``d_model`` must be divisible by it.
    projection : str
        Projection scheme: ``"standard"`` and the others registered
        (:func:`refattn.projections`).
    core : str
        Attention core: ``"sdpa"`` and the others registered (:func:`refattn.cores`).
    causal : bool
        Causal self-attention (upper-left aligned unless the core option
        ``causal_align`` says otherwise).
    bias : bool
        Whether the linear maps carry biases ``b_*``.  The default ``False`` differs from
        ``torch.nn.MultiheadAttention``, whose ``bias=True`` is the default: pass
        ``bias=True`` to match it.
    rotary : {None, "half", "interleaved"}
        Rotary position embeddings applied to the per-head queries and keys after
        the projection (:func:`refattn.apply_rotary`; ``"half"``: GPT-NeoX/Llama
        pairs, ``"interleaved"``: GPT-J pairs), queries at positions ``0 ... L-1``,
        keys at ``0 ... S-1``.  Real-layout schemes only.  See ``docs/rotary.md``.
    rotary_base : float
        ``theta`` of the rotary frequencies.
    rotary_dim : even int, optional
        Rotated features per head (default ``d_model / n_heads``).
    **options
        Options of the projection scheme (e.g. ``seq_len`` for ``"super"``) and
        of the core (e.g. ``scale``).

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(16, 4, causal=True)
    >>> params = layer.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16))
    >>> y = layer(params, x)
    >>> y.shape
    (2, 5, 16)
    >>> y, pullback = refattn.vjp(layer, params, x)
    >>> dparams, dx = pullback(np.ones_like(y))
    >>> sorted(dparams), dx.shape
    (['w_k', 'w_o', 'w_q', 'w_v'], (2, 5, 16))
    >>> layer.num_params()
    1024
    """

    @reject_framework_keywords
    def __init__(self, d_model: int, n_heads: int, *, projection: str = "standard",
                 core: str = "sdpa", causal: bool = False, bias: bool = False,
                 rotary: Literal["half", "interleaved"] | None = None,
                 rotary_base: float = 10000.0, rotary_dim: int | None = None,
                 **options: Any) -> None:
        for name, value in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.scheme = get_projection(projection)
        self.core = get_core(core)
        if self.scheme.layout != self.core.layout:
            raise ValueError(
                f"projection={projection!r} produces {self.scheme.layout} heads but core={core!r} "
                f"takes {self.core.layout} heads"
            )
        scheme_options = {k: options.pop(k) for k in list(options) if k in self.scheme.options}
        unknown = sorted(set(options) - set(self.core.options))
        if unknown:
            raise TypeError(
                f"unexpected option(s) {', '.join(unknown)}: projection {projection!r} takes "
                f"{list(self.scheme.options)}, core {core!r} takes {list(self.core.options)}"
            )
        self.core_options = options
        self.rotary_options = self._rotary_options(rotary, rotary_base, rotary_dim,
                                                   int(d_model) // int(n_heads), projection)
        self.config = LayerConfig(int(d_model), int(n_heads), causal, bias, scheme_options)
        self.scheme.check(self.config)
        self.projection_name, self.core_name = projection, core

    def _rotary_options(self, rotary, base, dim, head_dim, projection):
        """The rotary keywords (``{}`` without rotary), checked; see :func:`refattn.apply_rotary`."""
        if rotary is None:
            return {}
        if rotary not in ROTARY_STYLES:
            raise ValueError(f"rotary must be None or one of {ROTARY_STYLES}, got {rotary!r}")
        if self.scheme.layout != "real":
            raise ValueError(f"rotary needs real-valued heads; projection {projection!r} makes "
                             f"{self.scheme.layout} heads")
        dim = head_dim if dim is None else dim
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 2 or dim % 2 \
                or dim > head_dim:
            raise ValueError(f"rotary_dim must be an even integer in [2, head_dim={head_dim}], "
                             f"got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0:
            raise ValueError(f"rotary_base must be a positive number, got {base!r}")
        return {"rotary": rotary, "rotary_base": float(base), "rotary_dim": int(dim)}

    def _rotary_keywords(self):
        o = self.rotary_options
        return {"base": o["rotary_base"], "rotary_dim": o["rotary_dim"],
                "interleaved": o["rotary"] == "interleaved"}

    def __repr__(self) -> str:
        c = self.config
        extra = "".join(f", {k}={v!r}" for k, v in
                        {**c.options, **self.rotary_options, **self.core_options}.items())
        return (f"Attention(d_model={c.d_model}, n_heads={c.n_heads}, projection="
                f"{self.projection_name!r}, core={self.core_name!r}, causal={c.causal}, "
                f"bias={c.bias}{extra})")

    # -- parameters -----------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every parameter."""
        return {n: shape for n, (shape, _) in self.scheme.param_shapes(self.config).items()}

    def init(self, seed: int = 0, dtype: Any = np.float64) -> dict[str, np.ndarray]:
        """Parameters drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (like ``torch.nn.Linear``)."""
        rng = np.random.default_rng(seed)
        params = {}
        for name, (shape, fan_in) in self.scheme.param_shapes(self.config).items():
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
        return params

    def num_params(self) -> int:
        return int(sum(math.prod(s) for s in self.param_shapes().values()))

    def flops(self, L: int, S: int | None = None) -> float:
        """Forward FLOPs for one batch element with ``L`` queries and ``S`` keys (default ``L``)."""
        S = L if S is None else S
        c = self.config
        q, k, v = self.scheme.core_shapes(c, L, S) if hasattr(self.scheme, "core_shapes") else (
            (c.n_heads, L, c.head_dim), (c.n_heads, S, c.head_dim), (c.n_heads, S, c.head_dim))
        assert self.core.flops is not None, f"core {self.core_name!r} has no FLOP model"
        core = self.core.flops((), q[0], L, S, math.prod(q[2:]), math.prod(v[2:]),
                               causal=c.causal, **self.core_options)
        return float(self.scheme.flops(c, L, S) + core)

    def _check_params(self, params, dtype):
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of arrays (from layer.init()), got "
                            f"{type(params).__name__}")
        expected = self.param_shapes()
        missing = [n for n in expected if n not in params]
        extra = [n for n in params if n not in expected]
        if missing or extra:
            raise ValueError(f"params has keys {sorted(params)}, expected {sorted(expected)} for "
                             f"{self!r}")
        for name, shape in expected.items():
            check_float_array(params[name], f"params[{name!r}]")
            if tuple(params[name].shape) != tuple(shape):
                raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, "
                                 f"expected {tuple(shape)}")
            if str(params[name].dtype) != dtype:
                raise TypeError(f"params[{name!r}] has dtype {params[name].dtype} but the input has "
                                f"dtype {dtype}")

    def _check_inputs(self, xq, xkv):
        d = self.config.d_model
        for name, x, t in (("xq", xq, "L"), ("xkv", xkv, "S")):
            if x is None:
                continue
            check_float_array(x, name)
            if x.ndim < 2 or x.shape[-1] != d:
                raise ValueError(f"{name} must have shape (..., {t}, d_model={d}), got "
                                 f"{tuple(x.shape)}")
        if xkv is not None:
            check_same_dtype(xq=xq, xkv=xkv)
            if tuple(xkv.shape[:-2]) != tuple(xq.shape[:-2]):
                raise ValueError(f"xkv has batch dimensions {tuple(xkv.shape[:-2])} but xq has "
                                 f"{tuple(xq.shape[:-2])}")

    # -- forward / backward ----------------------------------------------------------
    @reject_framework_keywords
    def forward(self, params: dict[str, Array], xq: Array, xkv: Array | None = None,
                mask: Array | None = None, *, backend: Backend = "auto") -> tuple[Array, Any]:
        """Return ``(y, residuals)``; ``y (*batch, L, d_model)``."""
        self._check_inputs(xq, xkv)
        self._check_params(params, str(xq.dtype))
        self_attention = xkv is None
        xkv_ = xq if self_attention else xkv
        self.scheme.check_inputs(self.config, xq, xkv_)
        q, k, v, res_in = self.scheme.project_in(params, xq, xkv_, self.config)
        if self.rotary_options:                          # a separate pass over q, k
            q = apply_rotary(q, **self._rotary_keywords())
            k = apply_rotary(k, **self._rotary_keywords())
        o, res_core = self.core.forward(q, k, v, mask=mask, causal=self.config.causal,
                                        backend=backend, **self.core_options)
        y, res_out = self.scheme.project_out(params, o, self.config)
        return y, (self_attention, res_in, res_core, res_out, params, y)

    def backward(self, residuals: Any, dy: Array) -> tuple[Any, ...]:
        """``(dparams, dxq)`` for self-attention, ``(dparams, dxq, dxkv)`` for cross-attention.

        ``dy`` must have the output's shape ``(*batch, L, d_model)``; it is cast to the
        output's dtype, and every gradient has its primal's dtype.
        """
        self_attention, res_in, res_core, res_out, params, y = residuals
        check_cotangent(dy, tuple(y.shape), "(..., L, d_model)", like=y)
        xp = namespace(y)
        dy = xp.astype(dy, y.dtype)
        dparams_out, do = self.scheme.backward_out(params, res_out, dy, self.config)
        dq, dk, dv = self.core.backward(res_core, do)[:3]
        if self.rotary_options:                          # the transpose rotation
            dq = apply_rotary_backward(dq, **self._rotary_keywords())
            dk = apply_rotary_backward(dk, **self._rotary_keywords())
        dparams_in, dxq, dxkv = self.scheme.backward_in(params, res_in, dq, dk, dv, self.config)
        dparams = {**dparams_in, **dparams_out}
        dparams = {n: xp.astype(dparams[n], params[n].dtype) for n in self.param_shapes()}
        if self_attention:
            return dparams, dxq + dxkv
        return dparams, dxq, dxkv

    @reject_framework_keywords
    def __call__(self, params: dict[str, Array], xq: Array, xkv: Array | None = None,
                 mask: Array | None = None, *, backend: Backend = "auto") -> Array:
        """``y = layer(params, xq, xkv=None, mask=None)``: ``xq (*batch, L, d)`` -> ``(*batch, L, d)``."""
        return self.forward(params, xq, xkv, mask, backend=backend)[0]

    def __refattn_vjp__(self, params: dict[str, Array], xq: Array, xkv: Array | None = None,
                        mask: Array | None = None, *,
                        backend: Backend = "auto") -> tuple[Array, Pullback]:
        y, res = self.forward(params, xq, xkv, mask, backend=backend)
        return y, lambda dy: self.backward(res, dy)
