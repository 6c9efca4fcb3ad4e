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
The default call passes the mask as ``mask=`` and the case's causality as
``causal=`` or ``is_causal=``, whichever the module's ``forward`` names; a
case it cannot pass is reported ``n/a`` with the reason.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from .. import masks as _masks
from .._empty_rows import check_empty_rows
from .._masks import causal_keep, causal_offset
from ..layers import Attention
from . import params as _params

__all__ = ["Unsupported", "LayerSpec", "Layer", "accepts", "default_torch_call",
           "default_jax_call", "call_keywords", "torch_sdpa",
           "jax_dot_product_attention", "torch_multihead_attention", "reject_unless",
           "empty_row_check", "under_empty_rows", "torch_keep", "CAUSAL_KEYWORDS"]


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
        The layer's other keywords: the scheme's (``seq_len`` for ``"super"``,
        ``kv_heads`` for grouped-query ``"standard"``) and rotary's (``rotary``,
        ``rotary_base``, ``rotary_dim``).  Read them through the properties below.
    core_options : dict
        Core options (e.g. ``scale``, ``causal_align``); the reference's empty-row
        policy is not among them (it is :attr:`empty_rows`).
    dtype : str
        The dtype of this run (the runner casts a torch module to it).
    layer : refattn.Attention
        The reference layer itself.
    cross : bool
        Cross-attention (the case has ``xkv``); False for self-attention.
    L, S : int
        Query and key lengths of the case (``S == L`` for self-attention).
    empty_rows : {"zero", "uniform", "nan"}
        The convention a query row with no kept key is compared under: verify's
        ``empty_rows=`` switch, or the reference layer's core option (cases from
        :func:`under_empty_rows`); ``docs/conventions.md``.
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
    cross: bool = False
    L: int = 0
    S: int = 0
    empty_rows: str = "zero"

    @classmethod
    def from_layer(cls, layer, dtype="float64", *, L=0, S=None, cross=False):
        c = layer.config
        core_options = {k: v for k, v in layer.core_options.items() if k != "empty_rows"}
        return cls(c.d_model, c.n_heads, layer.projection_name, layer.core_name, c.causal, c.bias,
                   {**c.options, **getattr(layer, "rotary_options", {})},
                   core_options, dtype, layer, bool(cross), int(L),
                   int(L if S is None else S), layer.core_options.get("empty_rows", "zero"))

    @classmethod
    def from_case(cls, case, dtype="float64"):
        """The spec of a layer case (its layer and the lengths of its inputs)."""
        xq, *rest = case.arrays[1:]
        return cls.from_layer(case.fn, dtype, L=xq.shape[-2],
                              S=(rest[0] if rest else xq).shape[-2], cross=bool(rest))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention when fewer than ``n_heads``)."""
        return self.options.get("kv_heads", self.n_heads)

    @property
    def rotary(self):
        """``None``, ``"half"`` (GPT-NeoX/Llama pairs) or ``"interleaved"`` (GPT-J pairs)."""
        return self.options.get("rotary")

    @property
    def rotary_base(self) -> float:
        return self.options.get("rotary_base", 10000.0)

    @property
    def rotary_dim(self) -> int:
        """Rotated features per head (the head width unless partial)."""
        return self.options.get("rotary_dim", self.head_dim)

    @property
    def scheme_options(self) -> dict:
        """The projection scheme's options alone (``seq_len``, ``kv_heads``)."""
        return {k: v for k, v in self.options.items() if not k.startswith("rotary")}


def _named(fn, name: str) -> bool:
    """Whether ``fn`` names a keyword parameter ``name`` (``**kwargs`` does not count)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    p = sig.parameters.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


#: The causality keywords the default call looks for, in order.
CAUSAL_KEYWORDS = ("causal", "is_causal")


def call_keywords(fn, mask, spec) -> dict:
    """The keywords the default call passes to ``fn``: ``mask=`` and ``causal=``/``is_causal=``.

    ``mask`` goes as ``mask=`` when ``fn`` takes it (else :class:`Unsupported`:
    the case is reported ``n/a``).  The case's causality goes as ``causal=`` or
    ``is_causal=``, whichever ``fn`` names; a module naming neither must take its
    causality from ``spec.causal`` in the factory (a module that ignores it fails
    the causal cases).
    """
    kwargs = {}
    if mask is not None:
        if not accepts(fn, "mask"):
            names = [n for n in ("attn_mask", "attention_mask", "key_padding_mask") if _named(fn, n)]
            hint = (f" (it takes {names[0]}=, whose convention differs: pass call=, or use a "
                    f"built-in adapter of refattn.verify)" if names else "; pass call= to adapt it")
            raise Unsupported(f"the candidate takes no mask= keyword{hint}")
        kwargs["mask"] = mask
    for name in CAUSAL_KEYWORDS:
        if _named(fn, name):
            kwargs[name] = spec.causal
            break
    return kwargs


def default_torch_call(module, xq, xkv, mask, spec):
    """``module(xq[, xkv], **call_keywords(...))``: the default ``call`` of a PyTorch :class:`Layer`."""
    args = (xq,) if xkv is None else (xq, xkv)
    return module(*args, **call_keywords(getattr(module, "forward", module), mask, spec))


def default_jax_call(fn, params, xq, xkv, mask, spec):
    """``fn(params, xq[, xkv], **call_keywords(...))``: the default ``call`` of a JAX :class:`Layer`."""
    args = (params, xq) if xkv is None else (params, xq, xkv)
    return fn(*args, **call_keywords(fn, mask, spec))


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
        self-attention; ``mask`` is a boolean keep-mask (``True`` = attend)
        broadcastable to the scores ``(B, H, L, S)``: ``(L, S)``, or a key-padding
        mask ``(B, 1, 1, S)`` (:mod:`refattn.masks` converts it), or None.  The
        case's causality is ``spec.causal``.  Default: ``module(xq[, xkv],
        mask=mask, causal=|is_causal=spec.causal)`` with the keywords the module
        takes (:func:`call_keywords`).
    name : str, optional
        The candidate's name in the report (default: the factory's qualified name).
    """

    factory: Callable
    params: Any = None
    call: Callable | None = None
    name: str | None = None

    def param_map(self, spec):
        return self.params(spec) if callable(self.params) else self.params


def _keep(xp_from, mask, causal, causal_align, L, S):
    """The combined NumPy keep-mask of ``mask`` and ``causal`` (None when every key is kept)."""
    keep = None if mask is None else np.asarray(xp_from(mask))
    if causal:
        tri = causal_keep(np, L, S, causal_offset(causal_align, L, S))
        keep = tri if keep is None else np.logical_and(keep, tri)
    return keep


def torch_sdpa(fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
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


def jax_dot_product_attention(fn: Callable[..., Any] | None = None,
                              **fixed: Any) -> Callable[..., Any]:
    """``jax.nn.dot_product_attention`` (or a drop-in) as a core candidate.

    JAX puts tokens before heads (``(B, T, N, H)``, one batch axis): the adapter
    flattens the batch dimensions, transposes, and folds ``causal`` into the mask
    when it is combined with one or lower-right aligned.  ``fixed`` keywords
    (e.g. ``implementation="xla"``) are passed through.

    JAX gives a query row with no key left the mean of all values (it masks with
    the dtype's minimum instead of ``-inf``); refattn, PyTorch and FlashAttention
    give 0.  Such cases are reported as not expressible unless the reference runs
    under the cores' ``empty_rows="uniform"`` (cases from :func:`under_empty_rows`, which
    pass the adapter ``empty_rows=``), like values narrower or wider than keys (JAX
    needs ``Ev == E``).  JAX computes the softmax in float32
    whatever the input dtype, so its float64 results have float32 accuracy: the
    report says so (verify it in float32).
    """
    import jax
    import jax.numpy as jnp

    fn = jax.nn.dot_product_attention if fn is None else fn

    def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False,
                              causal_align="upper_left", scale=None, dropout_mask=None,
                              dropout_p=0.0, empty_rows="zero"):
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
            if not rows.all() and empty_rows != "uniform":
                raise Unsupported("jax.nn.dot_product_attention gives a query row with no key "
                                  "left the mean of all values (refattn and torch: 0); "
                                  "cases=under_empty_rows(cases, 'uniform') compares it")

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


def reject_unless(spec, *, what, projection=("standard",), core=("sdpa",), kv_heads=False,
                  rotary=(), cross=True, core_options=("causal_align",)):
    """Raise :class:`Unsupported` (the case is ``n/a``) for a spec a module cannot express.

    ``what`` names the module in the reason; the keywords say what it can do:
    the projection schemes and cores it implements, whether it has fewer
    key/value heads than query heads, the rotary conventions it applies
    (``("half",)``), whether it does cross-attention, the core options it takes.
    """
    if spec.projection not in projection or spec.core not in core:
        raise Unsupported(f"{what} is the {'/'.join(projection)} projection over "
                          f"{'/'.join(core)} attention, not {spec.projection!r} x {spec.core!r}")
    extra = sorted(set(spec.core_options) - set(core_options))
    if extra:
        raise Unsupported(f"{what} has no core option(s) {extra}")
    other = sorted(set(spec.scheme_options) - {"kv_heads"})
    if other:
        raise Unsupported(f"{what} has no option(s) {other}")
    if spec.kv_heads != spec.n_heads and not kv_heads:
        raise Unsupported(f"{what} has as many key/value heads as query heads (no grouped-query "
                          f"attention, kv_heads={spec.kv_heads})")
    if spec.rotary is not None and spec.rotary not in rotary:
        raise Unsupported(f"{what} applies no {spec.rotary} rotary embeddings"
                          + (f" (only {'/'.join(rotary)})" if rotary else ""))
    if spec.cross and not cross:
        raise Unsupported(f"{what} is self-attention only")


def empty_row_check(mask, spec, what, convention, policy=None):
    """Raise :class:`Unsupported` when a query row keeps no key and ``what`` answers otherwise.

    ``convention`` says what the module gives such a row (e.g. "the mean of the values");
    ``policy`` names it among refattn's empty-row policies (``"uniform"``, ``"nan"``):
    when the reference runs under that policy (``spec.empty_rows``) the case is compared.
    """
    if policy is not None and spec.empty_rows == policy:
        return
    keep = _keep(np.asarray, mask, spec.causal, spec.core_options.get("causal_align",
                                                                       "upper_left"),
                 spec.L, spec.S)
    if keep is not None and not np.broadcast_to(keep, (*keep.shape[:-2], spec.L, spec.S)) \
            .any(axis=-1).all():
        raise Unsupported(f"a query row keeps no key: {what} gives it {convention} "
                          f"(refattn, torch SDPA and FlashAttention: 0)"
                          + (f"; verify(..., empty_rows={policy!r}) compares it" if policy
                             else ""))


def under_empty_rows(cases, policy):
    """The cases with their reference run under the empty-row ``policy``.

    A core case gets the option ``empty_rows=policy`` (a candidate that does not
    take it is not passed it); a layer case is rebuilt with the core option.
    ``"zero"`` returns the cases unchanged.  ``ValueError`` for a policy that is
    not one of :data:`refattn._empty_rows.EMPTY_ROWS` or a case whose core has no
    such option (element-wise attention).
    """
    check_empty_rows(policy)
    if policy == "zero":
        return list(cases)
    out = []
    for case in cases:
        layer = case.fn
        if isinstance(layer, Attention):
            if "empty_rows" not in layer.core.options:
                raise ValueError(f"empty_rows={policy!r}: the {layer.core_name!r} core of case "
                                 f"{case.name!r} has no empty-row policy")
            c = layer.config
            rebuilt = Attention(c.d_model, c.n_heads, projection=layer.projection_name,
                                core=layer.core_name, causal=c.causal, bias=c.bias,
                                **c.options, **layer.rotary_options,
                                **{**layer.core_options, "empty_rows": policy})
            out.append(replace(case, fn=rebuilt))
        else:
            if not accepts(case.fn, "empty_rows"):
                raise ValueError(f"empty_rows={policy!r}: {getattr(case.fn, '__name__', case.fn)} "
                                 f"(case {case.name!r}) has no empty-row policy")
            out.append(replace(case, options={**case.options, "empty_rows": policy}))
    return out


def torch_keep(mask, spec):
    """The NumPy keep-mask of a case: its mask AND its causality (None when every key is kept)."""
    m = None if mask is None else (mask.cpu().numpy() if hasattr(mask, "cpu") else mask)
    return _keep(np.asarray, m, spec.causal, spec.core_options.get("causal_align", "upper_left"),
                 spec.L, spec.S)


def torch_multihead_attention(module_class: type | None = None, *, batch_first: bool = True,
                              key_padding: bool = True) -> Layer:
    """``torch.nn.MultiheadAttention`` (or a subclass) as a layer candidate.

    Verified against ``refattn.Attention(projection="standard", core="sdpa")``:
    parameters map through :data:`refattn.verify.params.MHA_PARAMS`
    (``in_proj_weight`` packs ``[W_q^T; W_k^T; W_v^T]``).  A key-padding keep-mask
    ``(B, 1, 1, S)`` goes as ``key_padding_mask`` (``True`` = ignore; with
    ``key_padding=False`` it is folded into ``attn_mask`` instead); any other mask
    and the causality are negated into the boolean ``attn_mask`` (``True`` =
    masked out), per head ``(B H, L, S)`` when the mask has a batch axis.
    ``batch_first=False`` builds the module sequence-first and transposes the
    inputs ``(B, T, d) -> (T, B, d)`` and the output back.  Grouped-query and
    rotary cases are ``n/a`` (the module has neither).
    """
    import torch

    cls = torch.nn.MultiheadAttention if module_class is None else module_class
    what = f"nn.{cls.__name__}" if cls.__module__.startswith("torch") else cls.__qualname__

    def factory(spec):
        reject_unless(spec, what=what)
        return cls(spec.d_model, spec.n_heads, bias=spec.bias, batch_first=batch_first)

    def call(module, xq, xkv, mask, spec):
        kv = xq if xkv is None else xkv
        kwargs = {}
        np_mask = None if mask is None else mask.cpu().numpy()
        if np_mask is not None and key_padding and _masks.is_key_padding(np_mask) \
                and np_mask.ndim == 4:
            kwargs["key_padding_mask"] = torch.from_numpy(
                _masks.to_torch_key_padding_mask(np_mask, batch=xq.shape[0]).copy()).to(xq.device)
            np_mask = None
        keep = _keep(np.asarray, np_mask, spec.causal,
                     spec.core_options.get("causal_align", "upper_left"), spec.L, spec.S)
        if keep is not None:
            if keep.ndim > 2:                          # (B, 1|H, L, S) -> (B H, L, S)
                keep = np.broadcast_to(keep, (xq.shape[0], spec.n_heads, spec.L, spec.S))
                keep = keep.reshape(-1, spec.L, spec.S)
            kwargs["attn_mask"] = torch.from_numpy(_masks.to_torch_attn_mask(keep).copy()) \
                .to(xq.device)
        if not batch_first:
            xq, kv = xq.transpose(0, 1), kv.transpose(0, 1)
        out = module(xq, kv, kv, need_weights=False, **kwargs)[0]
        return out if batch_first else out.transpose(0, 1)

    layout = "" if batch_first else ", batch_first=False"
    return Layer(factory, params=_params.MHA_PARAMS, call=call,
                 name=f"torch.nn.{cls.__name__}{layout}" if cls is torch.nn.MultiheadAttention
                 else f"{cls.__qualname__}{layout}")
