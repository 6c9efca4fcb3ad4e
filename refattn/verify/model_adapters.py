"""One-line adapters for the attention modules of Hugging Face ``transformers`` and ``timm``.

Each function returns a :class:`~refattn.verify.Layer` for :func:`refattn.verify.verify`::

    verify(hf_bert_attention(), "mha-standard")
    verify(hf_gpt2_attention(), "mha-standard")
    verify(hf_llama_attention(), "mha-rotary")       # GQA and rotary embeddings
    verify(timm_attention(), "mha-standard")

The factory builds the real module from a small random config per case (no
download), the parameter map loads refattn's seeded weights into it
(:mod:`refattn.verify.params`), and the call converts refattn's keep-mask and
causality into the module's own convention (:mod:`refattn.masks`).  A case the
module cannot express is reported ``n/a`` with the reason: cross-attention for
a self-attention module, grouped-query heads or rotary embeddings it has not,
and, for Hugging Face modules, every case with a query row that keeps no key:
their additive ``finfo.min`` mask gives such a row the mean of the values, where
refattn (and PyTorch's SDPA) give 0.  ``verify(..., empty_rows="uniform")``
compares those rows' output (the adapters declare ``masks_additively``: the
gradient of an added mask reaches ``q`` and ``k``, which no core policy models).

Neither package is a dependency: each is imported when its adapter is called.
"""

from __future__ import annotations

import numpy as np

from . import params as P
from .adapters import Layer, Unsupported, empty_row_check, reject_unless, torch_keep

__all__ = ["hf_bert_attention", "hf_gpt2_attention", "hf_llama_attention", "timm_attention",
           "hf_additive_mask", "HF_EMPTY_ROWS"]

#: What a Hugging Face module gives a query row with no key (the reason of its n/a rows).
HF_EMPTY_ROWS = ("the mean of the values (its additive mask is finfo(dtype).min, not -inf, "
                 "so the softmax of such a row is uniform)")

_LINEAR_BIAS = P.optional


def hf_additive_mask(mask, spec, torch, like, what):
    """The 4-D additive ``attention_mask (B, 1, L, S)`` of a case (mask AND causal), like HF's.

    ``0`` where a key is kept and ``torch.finfo(dtype).min`` elsewhere, in the
    dtype of ``like`` (:func:`refattn.masks.to_hf_additive_mask` is the NumPy
    version).  Always a tensor, also when every key is kept, so that no module
    infers its own causality from a missing mask.  A case with a query row that
    keeps no key is ``n/a`` (:data:`HF_EMPTY_ROWS`) unless compared under
    ``empty_rows="uniform"``.
    """
    np_mask = None if mask is None else mask.cpu().numpy()
    empty_row_check(np_mask, spec, what, HF_EMPTY_ROWS, policy="uniform")
    keep = torch_keep(np_mask, spec)
    if keep is None:
        keep = np.ones((1, 1, spec.L, spec.S), dtype=bool)
    keep = np.broadcast_to(keep, np.broadcast_shapes(keep.shape, (1, 1, spec.L, spec.S)))
    keep = torch.from_numpy(np.array(keep)).to(like.device)
    additive = torch.zeros(keep.shape, dtype=like.dtype, device=like.device)
    return additive.masked_fill(~keep, torch.finfo(like.dtype).min)


def _set_attention(config, attn_implementation):
    config._attn_implementation = attn_implementation
    return config


def _output_pair(torch, attention, d, bias):
    """``attention`` followed by an output ``nn.Linear`` (``BertSelfOutput.dense``)."""

    class AttentionWithOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention
            self.dense = torch.nn.Linear(d, d, bias=True)

        def forward(self, *args, **kwargs):
            return self.dense(self.attention(*args, **kwargs)[0])

    return AttentionWithOutput()


def hf_bert_attention(*, attn_implementation="sdpa"):
    """``transformers`` ``BertSelfAttention`` / ``BertCrossAttention`` (+ the output dense map).

    Self-attention cases build ``BertSelfAttention``, cross-attention cases
    ``BertCrossAttention``, from a ``BertConfig`` of the case's ``d_model`` and
    ``n_heads`` (dropout 0).  The Bert attention modules compute the heads only;
    the output map of ``refattn.Attention`` is ``BertSelfOutput.dense``, an
    ``nn.Linear`` the adapter appends (without the dropout, residual and
    LayerNorm of ``BertSelfOutput``, which are not attention).  The keep-mask and
    the causality go as the 4-D additive ``attention_mask``.  Bert's linear maps
    always carry biases: for ``bias=False`` cases they are held at zero.
    ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
    """
    import torch
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

    what = "transformers Bert attention"

    def factory(spec):
        reject_unless(spec, what=what)
        config = _set_attention(BertConfig(
            hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
            intermediate_size=2 * spec.d_model, num_hidden_layers=1, vocab_size=8,
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0), attn_implementation)
        cls = BertCrossAttention if spec.cross else BertSelfAttention
        return _output_pair(torch, cls(config, is_causal=spec.causal), spec.d_model, True)

    def call(module, xq, xkv, mask, spec):
        additive = hf_additive_mask(mask, spec, torch, xq, what)
        if xkv is None:
            return module(xq, attention_mask=additive)
        return module(xq, encoder_hidden_states=xkv, attention_mask=additive)

    mapping = {f"attention.{hf}.weight": P.linear_weight(f"w_{n}")
               for hf, n in (("query", "q"), ("key", "k"), ("value", "v"))}
    mapping.update({f"attention.{hf}.bias": _LINEAR_BIAS(P.same(f"b_{n}"))
                    for hf, n in (("query", "q"), ("key", "k"), ("value", "v"))})
    mapping.update({"dense.weight": P.linear_weight("w_o"),
                    "dense.bias": _LINEAR_BIAS(P.same("b_o"))})
    return Layer(factory, params=mapping, call=call, masks_additively=True,
                 name=f"transformers BertSelfAttention/BertCrossAttention + dense "
                      f"({attn_implementation})")


def hf_gpt2_attention(*, attn_implementation="eager"):
    """``transformers`` ``GPT2Attention``: fused ``Conv1D`` weights, output ``c_proj``.

    Self-attention: ``c_attn.weight (d, 3 d) = [W_q | W_k | W_v]`` (``Conv1D``
    computes ``x @ W + b``: :func:`refattn.verify.params.column_concat`).
    Cross-attention (``is_cross_attention=True``): ``q_attn (d, d)`` and
    ``c_attn (d, 2 d) = [W_k | W_v]``, keys from ``encoder_hidden_states``.
    ``GPT2Attention`` is causal only through its mask under ``eager`` and through
    ``is_causal`` under ``sdpa`` when no mask is given: the adapter always passes
    the case's mask AND causality as the additive ``attention_mask`` (self) or
    ``encoder_attention_mask`` (cross), so every case is exactly what it says in
    both implementations.  Biases are always there: held at zero for
    ``bias=False`` cases.
    """
    import torch
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    what = "transformers GPT2Attention"

    def factory(spec):
        reject_unless(spec, what=what)
        config = _set_attention(GPT2Config(
            n_embd=spec.d_model, n_head=spec.n_heads, n_layer=1, vocab_size=8,
            n_positions=max(spec.L, spec.S, 1), attn_pdrop=0.0, resid_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
            embd_pdrop=0.0), attn_implementation)
        return GPT2Attention(config, is_cross_attention=spec.cross, layer_idx=0)

    def params(spec):
        if spec.cross:
            return {"q_attn.weight": P.same("w_q"), "q_attn.bias": _LINEAR_BIAS(P.same("b_q")),
                    "c_attn.weight": P.column_concat("w_k", "w_v"),
                    "c_attn.bias": _LINEAR_BIAS(P.concat("b_k", "b_v")),
                    "c_proj.weight": P.same("w_o"), "c_proj.bias": _LINEAR_BIAS(P.same("b_o"))}
        return {"c_attn.weight": P.column_concat("w_q", "w_k", "w_v"),
                "c_attn.bias": _LINEAR_BIAS(P.concat("b_q", "b_k", "b_v")),
                "c_proj.weight": P.same("w_o"), "c_proj.bias": _LINEAR_BIAS(P.same("b_o"))}

    def call(module, xq, xkv, mask, spec):
        additive = hf_additive_mask(mask, spec, torch, xq, what)
        if xkv is None:
            return module(xq, attention_mask=additive)[0]
        return module(xq, encoder_hidden_states=xkv, encoder_attention_mask=additive)[0]

    return Layer(factory, params=params, call=call, masks_additively=True,
                 name=f"transformers GPT2Attention ({attn_implementation})")


def llama_rotary_cos_sin(torch, positions, head_dim, base, like):
    """Llama's ``(cos, sin)`` in ``like``'s dtype: ``emb = cat(freqs, freqs)``, ``freqs = p base^{-2m/D}``.

    The formula of ``LlamaRotaryEmbedding`` (default rope type), evaluated in
    float64 and rounded once: the module itself computes in float32 whatever the
    dtype, which a float64 run would show as float32-level error.
    """
    m = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (base ** m)
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def hf_llama_attention(*, attn_implementation="sdpa", module_rotary=False):
    """``transformers`` ``LlamaAttention``: grouped-query heads, rotary embeddings, no biases.

    Built from a ``LlamaConfig`` of the case (``num_key_value_heads =
    spec.kv_heads``, ``rope_theta = spec.rotary_base``, ``attention_bias =
    spec.bias``).  ``LlamaAttention`` takes its rotary ``(cos, sin)`` as an input:
    for rotary cases (``"mha-rotary"``) the adapter gives it Llama's own formula at
    positions ``0 ... L-1`` in the run's dtype (``module_rotary=True``: from
    ``LlamaRotaryEmbedding`` itself, which computes in float32, so float64 runs
    report float32-level error); cases without rotary pass ``cos = 1, sin = 0``.
    Llama rotates every feature in half-split pairs: interleaved or partial rotary
    cases and cross-attention are ``n/a``.  The mask and the causality go as the
    additive 4-D ``attention_mask``.
    """
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    what = "transformers LlamaAttention"

    def config_of(spec):
        return _set_attention(LlamaConfig(
            hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
            intermediate_size=2 * spec.d_model, num_hidden_layers=1, vocab_size=8,
            attention_bias=spec.bias, attention_dropout=0.0,
            max_position_embeddings=max(spec.L, 1),
            rope_parameters={"rope_type": "default", "rope_theta": spec.rotary_base}),
            attn_implementation)

    def factory(spec):
        reject_unless(spec, what=what, kv_heads=True, rotary=("half",), cross=False)
        if spec.rotary is not None and spec.rotary_dim != spec.head_dim:
            raise Unsupported(f"{what} rotates every feature of a head (rotary_dim="
                              f"{spec.head_dim}), not {spec.rotary_dim}")
        module = LlamaAttention(config_of(spec), layer_idx=0)
        if module_rotary:
            module.rotary_for_verify = LlamaRotaryEmbedding(config_of(spec))
        return module

    def call(module, xq, xkv, mask, spec):
        positions = torch.arange(spec.L, device=xq.device)[None, :]            # (1, L)
        if spec.rotary is None:
            shape = (1, spec.L, spec.head_dim)
            cos, sin = torch.ones(shape, dtype=xq.dtype), torch.zeros(shape, dtype=xq.dtype)
        elif module_rotary:
            cos, sin = module.rotary_for_verify(xq, positions)
        else:
            cos, sin = llama_rotary_cos_sin(torch, positions, spec.head_dim, spec.rotary_base, xq)
        additive = hf_additive_mask(mask, spec, torch, xq, what)
        return module(xq, position_embeddings=(cos, sin), attention_mask=additive)[0]

    names = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"))
    mapping = {f"{hf}.weight": P.linear_weight(f"w_{n}") for hf, n in names}
    mapping.update({f"{hf}.bias": P.same(f"b_{n}") for hf, n in names})
    return Layer(factory, params=mapping, call=call, masks_additively=True,
                 name=f"transformers LlamaAttention ({attn_implementation}"
                      f"{', LlamaRotaryEmbedding' if module_rotary else ''})")


def timm_attention(module_class=None):
    """``timm`` ``Attention`` (ViT): fused ``qkv`` ``nn.Linear``, output ``proj``.

    ``qkv.weight (3 d, d) = [W_q^T; W_k^T; W_v^T]``
    (:func:`refattn.verify.params.packed_linear`), ``qkv_bias`` and
    ``proj_bias`` from the case.  Self-attention only.  timm passes
    ``attn_mask`` to ``F.scaled_dot_product_attention``, where a boolean mask is
    ``True`` = attend like refattn's: the keep-mask goes as it is, the causality
    folded into it (``is_causal=True`` when there is no mask: timm cannot take
    both).  ``module_class``: a drop-in class with timm's signature.
    """
    import torch
    if module_class is None:
        from timm.layers import Attention as module_class

    what = f"timm {module_class.__name__}"

    def factory(spec):
        reject_unless(spec, what=what, cross=False)
        return module_class(spec.d_model, num_heads=spec.n_heads, qkv_bias=spec.bias,
                            proj_bias=spec.bias)

    def call(module, xq, xkv, mask, spec):
        if mask is None:
            return module(xq, is_causal=spec.causal)
        keep = torch_keep(mask, spec)
        return module(xq, attn_mask=torch.from_numpy(np.array(keep)).to(xq.device))

    mapping = {"qkv.weight": P.packed_linear("w_q", "w_k", "w_v"),
               "qkv.bias": P.concat("b_q", "b_k", "b_v"),
               "proj.weight": P.linear_weight("w_o"), "proj.bias": P.same("b_o")}
    return Layer(factory, params=mapping, call=call, name=f"{what}")
