"""How candidates are called, and ready-made adapters for the frameworks' own attention.

A **core candidate** is a callable in refattn's convention, on framework arrays::

    candidate(q, k, v, **options) -> o
    q (..., H, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev) -> o (..., H, L, Ev)

receiving only the options a case sets (``mask`` boolean with ``True`` = attend,
``bias``, ``causal``, ``causal_align``, ``scale``, ``dropout_mask``, ``dropout_p``,
or the core's own options).  A case whose options the candidate's signature does
not accept is reported as not expressible (``n/a``), not as a failure; a
candidate raises :class:`Unsupported` for the same purpose.

A **layer candidate** is a :class:`Layer`: ``factory(spec)`` builds the
framework module (PyTorch ``nn.Module``) or function (JAX) for one case's
:class:`LayerSpec`; ``params`` maps its parameters to refattn's
(:mod:`refattn.verify.params`); ``call(module, xq, xkv, mask, spec)`` runs it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .._masks import causal_keep, causal_offset
from . import params as _params

__all__ = ["Unsupported", "LayerSpec", "Layer", "accepts", "default_torch_call",
           "default_jax_call", "torch_sdpa",
           "jax_dot_product_attention", "torch_multihead_attention"]


class Unsupported(Exception):
    """Raised by a candidate (or an adapter) for a case it cannot express; reported as ``n/a``."""


def accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):              # builtins without a signature: assume yes
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
               for p in sig.parameters.values())


@dataclass(frozen=True)
class LayerSpec:
    """The configuration of one layer case, for a candidate's ``factory``.

    Attributes
    ----------
    d_model, n_heads : int
    projection, core : str
        refattn's projection scheme and core (``"standard"``, ``"sdpa"``, ...).
    causal, bias : bool
        Causal self-attention; whether the linear maps carry biases.
    options : dict
        Projection options (e.g. ``seq_len`` for ``"super"``).
    core_options : dict
        Core options (e.g. ``scale``, ``causal_align``).
    dtype : str
        The dtype of this run (the runner casts a torch module to it).
    layer : refattn.Attention
        The reference layer itself.
    """

    d_model: int
    n_heads: int
    projection: str
    core: str
    causal: bool
    bias: bool
    options: dict = field(default_factory=dict)
    core_options: dict = field(default_factory=dict)
    dtype: str = "float64"
    layer: Any = None

    @classmethod
    def from_layer(cls, layer, dtype="float64"):
        c = layer.config
        return cls(c.d_model, c.n_heads, layer.projection_name, layer.core_name, c.causal, c.bias,
                   dict(c.options), dict(layer.core_options), dtype, layer)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def default_torch_call(module, xq, xkv, mask, spec):
    """``module(xq[, xkv][, mask=mask])``: the default ``call`` of a PyTorch :class:`Layer`."""
    args = (xq,) if xkv is None else (xq, xkv)
    if mask is None:
        return module(*args)
    if not accepts(getattr(module, "forward", module), "mask"):
        raise Unsupported("the candidate takes no mask= keyword; pass call= to adapt it")
    return module(*args, mask=mask)


def default_jax_call(fn, params, xq, xkv, mask, spec):
    """``fn(params, xq[, xkv][, mask=mask])``: the default ``call`` of a JAX :class:`Layer`."""
    args = (params, xq) if xkv is None else (params, xq, xkv)
    if mask is None:
        return fn(*args)
    if not accepts(fn, "mask"):
        raise Unsupported("the candidate takes no mask= keyword; pass call= to adapt it")
    return fn(*args, mask=mask)


@dataclass
class Layer:
    """A layer candidate.

    Parameters
    ----------
    factory : callable
        ``factory(spec: LayerSpec)`` -> a ``torch.nn.Module`` (PyTorch) or a
        function ``f(params, xq, xkv=None, mask=None)`` (JAX).  Called once per case.
    params : dict or callable, optional
        Parameter map ``{candidate_name: converter}`` (:mod:`refattn.verify.params`),
        or ``params(spec) -> dict``.  Default: the candidate's parameters are
        named and laid out exactly like refattn's (``w_q (d_in, d_out)``, ...).
        The runner loads refattn's seeded parameters into the candidate through it
        and maps the candidate's gradients back.
    call : callable, optional
        ``call(module, xq, xkv, mask, spec) -> y`` (PyTorch) or
        ``call(fn, params, xq, xkv, mask, spec) -> y`` (JAX).  ``xkv`` is None for
        self-attention; ``mask`` is a boolean ``(L, S)`` keep-mask (``True`` =
        attend) or None.  Default: ``module(xq[, xkv][, mask=mask])``.
    """

    factory: Callable
    params: Any = None
    call: Callable | None = None

    def param_map(self, spec):
        return self.params(spec) if callable(self.params) else self.params


def _keep(xp_from, mask, causal, causal_align, L, S):
    """The combined NumPy keep-mask of ``mask`` and ``causal`` (None when every key is kept)."""
    keep = None if mask is None else np.asarray(xp_from(mask))
    if causal:
        tri = causal_keep(np, L, S, causal_offset(causal_align, L, S))
        keep = tri if keep is None else np.logical_and(keep, tri)
    return keep


def torch_sdpa(fn=None):
    """``torch.nn.functional.scaled_dot_product_attention`` (or a drop-in) as a core candidate.

    Maps refattn's options onto torch's: ``mask`` -> boolean ``attn_mask``
    (``True`` = attend in both), ``bias`` -> float ``attn_mask`` (combined with a
    mask as ``-inf``), ``causal`` -> ``is_causal`` (or folded into the mask when
    combined with one or lower-right aligned), GQA -> ``enable_gqa=True``.
    An explicit dropout keep-mask is not expressible (torch draws its own).
    """
    import torch

    fn = torch.nn.functional.scaled_dot_product_attention if fn is None else fn

    def scaled_dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False,
                                     causal_align="upper_left", scale=None, dropout_mask=None,
                                     dropout_p=0.0):
        if dropout_mask is not None or dropout_p:
            raise Unsupported("torch SDPA draws its own dropout mask; an explicit keep-mask "
                              "cannot be passed")
        L, S = q.shape[-2], k.shape[-2]
        kwargs = {"scale": scale}
        if k.shape[-3] != q.shape[-3]:
            kwargs["enable_gqa"] = True
        if causal and mask is None and bias is None and causal_align == "upper_left":
            kwargs["is_causal"] = True
            keep = None
        else:
            keep = _keep(lambda m: m.cpu().numpy(), mask, causal, causal_align, L, S)
        attn_mask = None if keep is None else torch.from_numpy(keep).to(q.device)
        if bias is not None:
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, -math.inf)
        return fn(q, k, v, attn_mask=attn_mask, **kwargs)

    return scaled_dot_product_attention


def jax_dot_product_attention(fn=None, **fixed):
    """``jax.nn.dot_product_attention`` (or a drop-in) as a core candidate.

    JAX puts tokens before heads (``(B, T, N, H)``, one batch axis): the adapter
    flattens the batch dimensions, transposes, and folds ``causal`` into the mask
    when it is combined with one or lower-right aligned.  ``fixed`` keywords
    (e.g. ``implementation="xla"``) are passed through.

    JAX gives a query row with no key left the mean of all values (it masks with
    the dtype's minimum instead of ``-inf``); refattn, PyTorch and FlashAttention
    give 0.  Such cases are reported as not expressible, like values narrower or
    wider than keys (JAX needs ``Ev == E``).  JAX computes the softmax in float32
    whatever the input dtype, so its float64 results have float32 accuracy: the
    report says so (verify it in float32).
    """
    import jax
    import jax.numpy as jnp

    fn = jax.nn.dot_product_attention if fn is None else fn

    def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False,
                              causal_align="upper_left", scale=None, dropout_mask=None,
                              dropout_p=0.0):
        if dropout_mask is not None or dropout_p:
            raise Unsupported("jax.nn.dot_product_attention has no dropout")
        *batch, H, L, E = q.shape
        Hkv, S, Ev = k.shape[-3], k.shape[-2], v.shape[-1]
        if Ev != E:
            raise Unsupported(f"jax.nn.dot_product_attention needs values as wide as keys "
                              f"(Ev={Ev}, E={E})")
        B = math.prod(batch)
        plain_causal = causal and mask is None and causal_align == "upper_left"
        keep = _keep(np.asarray, mask, causal and not plain_causal, causal_align, L, S)
        if keep is not None:
            rows = np.broadcast_to(keep, (*batch, H, L, S)).any(axis=-1)
            if not rows.all():
                raise Unsupported("jax.nn.dot_product_attention gives a query row with no key "
                                  "left the mean of all values (refattn and torch: 0)")

        def tokens_first(x, heads, length, width):
            x = jnp.reshape(x, (B, heads, length, width))          # (B, heads, T, width)
            return jnp.transpose(x, (0, 2, 1, 3))                  # (B, T, heads, width)

        def scores_4d(m):
            m = jnp.broadcast_to(m, (*batch, H, L, S))
            return jnp.reshape(m, (B, H, L, S))                    # (B, N, T, S)

        o = fn(tokens_first(q, H, L, E), tokens_first(k, Hkv, S, E), tokens_first(v, Hkv, S, Ev),
               bias=None if bias is None else scores_4d(bias),
               mask=None if keep is None else scores_4d(jnp.asarray(keep)),
               scale=scale, is_causal=plain_causal, **fixed)
        o = jnp.transpose(o, (0, 2, 1, 3))                         # (B, H, L, Ev)
        return jnp.reshape(o, (*batch, H, L, Ev))

    return dot_product_attention


def torch_multihead_attention(module_class=None):
    """``torch.nn.MultiheadAttention`` (or a subclass) as a layer candidate.

    Verified against ``refattn.Attention(projection="standard", core="sdpa")``:
    parameters map through :data:`refattn.verify.params.MHA_PARAMS`
    (``in_proj_weight`` packs ``[W_q^T; W_k^T; W_v^T]``), the keep-mask is negated
    into ``attn_mask`` (``True`` = masked out there) and ``causal`` is folded into it.
    """
    import torch

    cls = torch.nn.MultiheadAttention if module_class is None else module_class

    def factory(spec):
        extra = {k: v for k, v in spec.core_options.items() if k != "causal_align"}
        if spec.projection != "standard" or spec.core != "sdpa" or spec.options or extra:
            raise Unsupported("nn.MultiheadAttention is the standard projection over plain SDPA")
        return cls(spec.d_model, spec.n_heads, bias=spec.bias, batch_first=True)

    def call(module, xq, xkv, mask, spec):
        kv = xq if xkv is None else xkv
        L, S = xq.shape[-2], kv.shape[-2]
        keep = _keep(lambda m: m.cpu().numpy(), mask, spec.causal,
                     spec.core_options.get("causal_align", "upper_left"), L, S)
        # nn.MultiheadAttention's boolean attn_mask is True = masked out: the negation of a
        # keep-mask (the inverse of refattn._masks.from_torch_attn_mask).
        attn_mask = None if keep is None else torch.from_numpy(~keep).to(xq.device)
        return module(xq, kv, kv, attn_mask=attn_mask, need_weights=False)[0]

    return Layer(factory, params=_params.MHA_PARAMS, call=call)

