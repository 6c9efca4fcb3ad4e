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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import masks as _masks
from .._masks import causal_offset
from . import params as _params

__all__ = ["Unsupported", "LayerSpec", "Layer", "accepts", "named_keyword",
           "default_torch_call", "default_jax_call", "call_keywords", "torch_sdpa",
           "torch_flex_attention", "jax_dot_product_attention", "torch_multihead_attention",
           "reject_unless", "empty_row_check", "torch_keep", "CAUSAL_KEYWORDS",
           "FRAMEWORK_NAMES", "framework_keywords"]


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
        ``empty_rows=`` switch, or the reference layer's own core option;
        ``docs/conventions.md``.
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


def named_keyword(fn, name: str) -> bool:
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
            names = [n for n in ("attn_mask", "attention_mask", "key_padding_mask")
                     if named_keyword(fn, n)]
            hint = (f" (it takes {names[0]}=, whose convention differs: pass call=, or use a "
                    f"built-in adapter of refattn.verify)" if names else "; pass call= to adapt it")
            raise Unsupported(f"the candidate takes no mask= keyword{hint}")
        kwargs["mask"] = mask
    for name in CAUSAL_KEYWORDS:
        if named_keyword(fn, name):
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
    masks_additively : bool
        The module *adds* its mask to the scores (``scores + finfo.min``, Hugging
        Face's ``attention_mask``) rather than filling them.  Under
        ``verify(..., empty_rows="uniform")`` such a row's output is the mean of
        the values, but its score gradient reaches ``q`` and ``k``, which the
        cores' policy does not model: verify then compares the empty rows'
        output only (``report.comparisons``).  Default False: a fill
        (``masked_fill``, ``jnp.where``), compared exactly.
    """

    factory: Callable
    params: Any = None
    call: Callable | None = None
    name: str | None = None
    masks_additively: bool = False

    def param_map(self, spec):
        return self.params(spec) if callable(self.params) else self.params


def _keep(xp_from, mask, causal, causal_align, L, S, window=None, q_lens=None, k_lens=None):
    """The combined NumPy keep-mask of a case (None when every key is kept).

    ``mask`` AND the causal rule AND the sliding ``window`` (refattn's ``(left, right)``, or
    one int) AND JAX-style padding (``q_lens``, ``k_lens`` of the batch shape, or None);
    with padding, ``causal_align="lower_right"`` aligns each batch element at its own lengths.
    """
    keep = None if mask is None else np.asarray(xp_from(mask))
    if q_lens is None and k_lens is None:
        offset: Any = causal_offset(causal_align, L, S)
        i, j = np.arange(L)[:, None], np.arange(S)[None, :]
        pad = None
    else:
        lq = np.full((), L) if q_lens is None else np.asarray(_host(q_lens))
        lk = np.full((), S) if k_lens is None else np.asarray(_host(k_lens))
        lq, lk = (x[..., None, None, None] for x in np.broadcast_arrays(lq, lk))  # (*batch,1,1,1)
        i, j = np.arange(L)[:, None], np.arange(S)[None, :]
        pad = (i < lq) & (j < lk)
        offset = 0 if causal_align == "upper_left" else lk - lq
    rules = [] if pad is None else [pad]
    if causal:
        rules.append(j <= i + offset)
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        if left >= 0:
            rules.append(j >= i + offset - left)
        if right >= 0:
            rules.append(j <= i + offset + right)
    for rule in rules:
        keep = rule if keep is None else np.logical_and(keep, rule)
    return keep


def _host(x):
    """A framework array (torch tensor, JAX array) or NumPy array as NumPy."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _packed_keep(cu_q, cu_k, causal, causal_align, window, mask=None):
    """Block-diagonal NumPy keep-mask ``(Tq, Tk)`` of packed sequences (FlashAttention varlen)."""
    cu_q, cu_k = np.asarray(_host(cu_q)), np.asarray(_host(cu_k))
    keep = np.zeros((int(cu_q[-1]), int(cu_k[-1])), bool)
    for n in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        block = _keep(np.asarray, None, causal, causal_align, q1 - q0, k1 - k0, window)
        keep[q0:q1, k0:k1] = True if block is None else block
    return keep if mask is None else np.logical_and(np.asarray(_host(mask)), keep)


#: refattn's core options and the names frameworks give them, tried in order when a
#: candidate takes no keyword of refattn's name (FlashAttention's ``window_size`` and
#: ``softmax_scale``, JAX's ``local_window_size``, PyTorch's and JAX's ``is_causal``).
#: ``softcap``, ``alibi_slopes``, ``cu_seqlens_q``/``cu_seqlens_k`` (FlashAttention) and
#: ``query_seq_lengths``/``key_value_seq_lengths`` (JAX) are refattn's names already.
FRAMEWORK_NAMES = {
    "causal": ("is_causal",),
    "scale": ("softmax_scale",),
    "window": ("window_size", "local_window_size"),
}


def _window_for(alias, window, wide):
    """refattn's window as ``alias`` takes it: FlashAttention's ``(left, right)`` with ``-1``
    unbounded is refattn's own; JAX's ``local_window_size`` has no ``-1`` (``wide`` instead)."""
    left, right = (window, window) if isinstance(window, int) else window
    if alias == "window_size":
        return (left, right)
    return tuple(wide if w < 0 else w for w in (left, right))


def framework_keywords(fn, options: dict, wide: int) -> dict:
    """``options`` under the names ``fn`` takes: refattn's, else a :data:`FRAMEWORK_NAMES` one.

    ``wide`` is a window size larger than any query-key distance of the case (JAX's
    unbounded side).  Raises :class:`Unsupported` for an option ``fn`` takes under no name.
    """
    out = {}
    for key, value in options.items():
        if accepts(fn, key):
            out[key] = value
            continue
        alias = next((a for a in FRAMEWORK_NAMES.get(key, ()) if named_keyword(fn, a)), None)
        if alias is None:
            raise Unsupported(f"the candidate takes no {key}= keyword")
        out[alias] = _window_for(alias, value, wide) if key == "window" else value
    return out


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
                                     dropout_p=0.0, window=None, query_seq_lengths=None,
                                     key_value_seq_lengths=None):
        if dropout_mask is not None or dropout_p:
            raise Unsupported("torch SDPA draws its own dropout mask; an explicit keep-mask "
                              "cannot be passed")
        L, S = q.shape[-2], k.shape[-2]
        kwargs = {"scale": scale}
        if k.shape[-3] != q.shape[-3]:
            kwargs["enable_gqa"] = True
        padded = query_seq_lengths is not None or key_value_seq_lengths is not None
        if (causal and mask is None and bias is None and causal_align == "upper_left"
                and window is None and not padded):
            kwargs["is_causal"] = True
            keep = None
        else:       # window and padding as a mask: torch gives a row with no key 0, like refattn
            keep = _keep(_host, mask, causal, causal_align, L, S, window, query_seq_lengths,
                         key_value_seq_lengths)
        attn_mask = None if keep is None else torch.from_numpy(keep).to(q.device)
        if bias is not None:
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, -math.inf)
        return fn(q, k, v, attn_mask=attn_mask, **kwargs)

    return scaled_dot_product_attention


def torch_flex_attention(fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """PyTorch FlexAttention (``torch.nn.attention.flex_attention.flex_attention``) as a core candidate.

    refattn's options become FlexAttention's functions: ``softcap`` and a float ``bias`` a
    ``score_mod`` (``softcap * tanh(score / softcap) + bias[b, h, i, j]``); ``mask``, ``causal``
    (both alignments), ``window``, JAX-style padding and packed sequences (``cu_seqlens_q``,
    ``cu_seqlens_k``: one batch row, a block-diagonal ``mask_mod``, FlexAttention's document
    masking) a ``mask_mod`` over the case's keep-mask; GQA -> ``enable_gqa=True``.  FlexAttention
    gives a row with no key 0, like refattn.  Torch 2.13 has no FlexAttention backward on the
    CPU: verify it there with ``verify(..., gradients=False)``.
    """
    import torch
    from torch.nn.attention import flex_attention as flex

    fn = flex.flex_attention if fn is None else fn

    def flex_attention(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left",
                       scale=None, window=None, softcap=None, cu_seqlens_q=None,
                       cu_seqlens_k=None, query_seq_lengths=None, key_value_seq_lengths=None):
        packed = cu_seqlens_q is not None
        if packed:                                         # (T, H, E) -> (1, H, T, E)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            keep = _packed_keep(cu_seqlens_q, cu_seqlens_k, causal, causal_align, window, mask)
        else:
            keep = _keep(_host, mask, causal, causal_align, q.shape[-2], k.shape[-2], window,
                         query_seq_lengths, key_value_seq_lengths)
        *batch, H, L, _ = q.shape
        Hkv, S, Ev = k.shape[-3], k.shape[-2], v.shape[-1]
        B = math.prod(batch)
        q4, k4, v4 = (x.reshape(B, h, n, x.shape[-1])
                      for x, h, n in ((q, H, L), (k, Hkv, S), (v, Hkv, S)))
        block_mask = None
        if keep is not None:
            table = torch.from_numpy(np.ascontiguousarray(
                np.broadcast_to(keep, (*batch, H, L, S)).reshape(B, H, L, S))).to(q.device)
            block_mask = flex.create_block_mask(lambda b, h, i, j: table[b, h, i, j], B, H, L, S,
                                                device=str(q.device))
        bias4 = None if bias is None else bias.expand(*batch, H, L, S).reshape(B, H, L, S)

        def score_mod(score, b, h, i, j):
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            return score if bias4 is None else score + bias4[b, h, i, j]

        o = fn(q4, k4, v4, score_mod=score_mod if softcap is not None or bias is not None
               else None, block_mask=block_mask, scale=scale, enable_gqa=Hkv != H)
        o = o.reshape(*batch, H, L, Ev)
        return o[0].transpose(0, 1) if packed else o

    return flex_attention


def jax_dot_product_attention(fn: Callable[..., Any] | None = None,
                              **fixed: Any) -> Callable[..., Any]:
    """``jax.nn.dot_product_attention`` (or a drop-in) as a core candidate.

    JAX puts tokens before heads (``(B, T, N, H)``, one batch axis): the adapter
    flattens the batch dimensions, transposes, and folds ``causal`` and ``window`` into the
    mask when they are combined with one or lower-right aligned (JAX aligns both at the
    first query and key); otherwise ``window`` goes as ``local_window_size`` (an unbounded
    side as a size wider than the problem).  ``query_seq_lengths`` and
    ``key_value_seq_lengths`` are JAX's own arguments.  ``fixed`` keywords
    (e.g. ``implementation="xla"``) are passed through.

    JAX gives a query row with no key left the mean of all values (it masks with
    the dtype's minimum instead of ``-inf``); refattn, PyTorch and FlashAttention
    give 0.  Such cases are reported as not expressible unless
    ``verify(..., empty_rows="uniform")`` runs the reference under the cores'
    ``empty_rows="uniform"`` (it passes the adapter ``empty_rows=``), like values
    narrower or wider than keys (JAX needs ``Ev == E``).  JAX computes the softmax in float32
    whatever the input dtype, so its float64 results have float32 accuracy: the
    report says so (verify it in float32).
    """
    import jax
    import jax.numpy as jnp

    fn = jax.nn.dot_product_attention if fn is None else fn

    def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False,
                              causal_align="upper_left", scale=None, dropout_mask=None,
                              dropout_p=0.0, window=None, query_seq_lengths=None,
                              key_value_seq_lengths=None, empty_rows="zero"):
        if dropout_mask is not None or dropout_p:
            raise Unsupported("jax.nn.dot_product_attention has no dropout")
        *batch, H, L, E = q.shape
        Hkv, S, Ev = k.shape[-3], k.shape[-2], v.shape[-1]
        if Ev != E:
            raise Unsupported(f"jax.nn.dot_product_attention needs values as wide as keys "
                              f"(Ev={Ev}, E={E})")
        B = math.prod(batch)
        lengths = {n: None if x is None else np.asarray(_host(x))
                   for n, x in (("query_seq_lengths", query_seq_lengths),
                                ("key_value_seq_lengths", key_value_seq_lengths))}
        # JAX aligns causal rule and window at the first query and key (refattn's upper_left)
        native = mask is None and (causal_align == "upper_left" or (L == S and not any(
            x is not None for x in lengths.values())))
        folded = (None, None) if native else (lengths["query_seq_lengths"],
                                              lengths["key_value_seq_lengths"])
        keep = _keep(np.asarray, mask, causal and not native, causal_align, L, S,
                     None if native else window, *folded)
        valid = _keep(np.asarray, keep, causal, causal_align, L, S, window,
                      lengths["query_seq_lengths"], lengths["key_value_seq_lengths"])
        if valid is not None:
            rows = np.broadcast_to(valid, (*batch, H, L, S)).any(axis=-1)
            if lengths["query_seq_lengths"] is not None:    # padded queries: 0 in JAX as well
                padded = np.arange(L) >= lengths["query_seq_lengths"][..., None]
                rows = rows | padded.reshape((*batch, 1, L))
            if not rows.all() and empty_rows != "uniform":
                raise Unsupported("jax.nn.dot_product_attention gives a query row with no key "
                                  "left the mean of all values (refattn and torch: 0); "
                                  "verify(..., empty_rows='uniform') compares it")
        extra = {n: jnp.asarray(np.reshape(x, (B,)), jnp.int32)
                 for n, x in lengths.items() if x is not None}
        if native and window is not None:
            extra["local_window_size"] = _window_for("local_window_size", window, L + S)

        def tokens_first(x, heads, length, width):
            x = jnp.reshape(x, (B, heads, length, width))          # (B, heads, T, width)
            return jnp.transpose(x, (0, 2, 1, 3))                  # (B, T, heads, width)

        def scores_4d(m):
            m = jnp.broadcast_to(m, (*batch, H, L, S))
            return jnp.reshape(m, (B, H, L, S))                    # (B, N, T, S)

        o = fn(tokens_first(q, H, L, E), tokens_first(k, Hkv, S, E), tokens_first(v, Hkv, S, Ev),
               bias=None if bias is None else scores_4d(bias),
               mask=None if keep is None else scores_4d(jnp.asarray(keep)),
               scale=scale, is_causal=bool(causal and native), **extra, **fixed)
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
