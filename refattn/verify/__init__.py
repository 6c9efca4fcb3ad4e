"""Verify PyTorch and JAX implementations against refattn's float64 reference.

One call runs a framework candidate (a core function or a layer module) and
the reference on a variant's seeded cases, differentiates both (the framework
with its own autograd, refattn with its hand-derived backward passes) and
reports per output and gradient the error and a dtype-aware verdict::

    report = refattn.verify.verify(torch.nn.functional.scaled_dot_product_attention, "sdpa")
    report.assert_()

Neither PyTorch nor JAX is a dependency: each is imported only when a
candidate of that framework is verified.  Golden files
(:mod:`refattn.verify.golden`) carry the same cases, outputs and gradients to
any language.  See ``docs/verify.md``.
"""

from __future__ import annotations

from .. import masks
from ..catalog import core_case, layer_case
from . import params, tolerance
from .adapters import (Layer, LayerSpec, Unsupported, jax_dot_product_attention,
                       torch_multihead_attention, torch_sdpa)
from .model_adapters import (hf_bert_attention, hf_gpt2_attention, hf_llama_attention,
                             timm_attention)
from .report import Check, VerifyReport
from .run import verify

__all__ = ["verify", "VerifyReport", "Check", "Layer", "LayerSpec", "Unsupported", "params",
           "tolerance", "masks", "layer_case", "core_case", "torch_sdpa",
           "jax_dot_product_attention", "torch_multihead_attention", "hf_bert_attention",
           "hf_gpt2_attention", "hf_llama_attention", "timm_attention"]
