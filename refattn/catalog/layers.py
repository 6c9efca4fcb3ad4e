"""Layer variants: an ``Attention`` configuration with seeded cases (tests, benchmarks, CLI).

Shape legend: ``batch`` batch size, ``L`` query length, ``S`` key length,
``d`` = ``d_model``, ``H`` heads.
"""

from __future__ import annotations

import numpy as np

from ..layers import Attention
from ..projections import get_projection
from .builders import layer_test_cases
from .case import Case, Variant

__all__ = ["layer_variant", "LAYER_VARIANTS", "PAPER_SETTINGS", "paper_bench_sizes"]


def layer_variant(name, *, projection, core, summary="", layer_options=None,
                           test_sizes=None, default_size=(2, 64, 64, 4), bench_sizes=None,
                           key_mask=False, default_options=None):
    """An ``Attention`` configuration as a variant (tests, benchmarks, CLI).

    ``*_sizes`` are ``(batch, L, d_model, n_heads)`` tuples; ``bench_sizes`` may
    also be a dict ``{label: (batch, L, d_model, n_heads, extra_layer_options)}``.
    The ``"test"`` cases are :func:`refattn.catalog.builders.layer_test_cases`:
    masked self- and cross-attention, key padding, causal with and without a mask,
    grouped-query heads where the scheme has ``kv_heads``, rotary conventions when
    ``layer_options`` sets ``rotary``, and two labelled empty-row cases.
    ``key_mask=True``: every masked test case uses a key-padding mask ``(B, 1, 1, S)``,
    for cores that honour only masks on keys (e.g. Taylor element-wise attention).
    ``default_options`` are extra layer options of the default problem only.
    """
    layer_options = dict(layer_options or {})

    def _layer(d_model, n_heads, **extra):
        return Attention(d_model, n_heads, projection=projection, core=core,
                         **{**layer_options, **extra})

    def _case(label, rng, dtype, batch, L, d_model, n_heads, S=None, mask=None, **extra):
        layer = _layer(d_model, n_heads, **extra)
        params = layer.init(seed=int(rng.integers(1 << 31)), dtype=dtype)
        xq = rng.standard_normal((batch, L, d_model)).astype(dtype)
        arrays = (params, xq)
        if S is not None:
            arrays += (rng.standard_normal((batch, S, d_model)).astype(dtype),)
        options = {} if mask is None else {"mask": mask}
        return Case(label, layer, arrays, options, batch * layer.flops(L, S))

    def make_cases(kind="test", dtype="float64", seed=0):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        if kind == "default":
            b, L, d, h = default_size
            return [_case(f"B{b} L{L} d{d} H{h}", rng, dtype, b, L, d, h,
                          **(default_options or {}))]
        if kind == "bench":
            sizes = bench_sizes or {f"B1 L{L} d{d} H{h}": (1, L, d, h, {})
                                    for (L, d, h) in ((128, 256, 8),)}
            return [_case(label, rng, dtype, b, L, d, h, **extra)
                    for label, (b, L, d, h, extra) in sizes.items()]
        return layer_test_cases(_layer, rng, dtype, test_sizes or (2, 5, 8, 2), key_mask=key_mask,
                                gqa="kv_heads" in get_projection(projection).options,
                                rotary="rotary" in layer_options)

    return Variant(name=name, kind="layer", make_cases=make_cases, core=core,
                   summary=summary or f"{projection} projection x {core} core")


#: The two settings of Hosseini & Hosseini (arXiv 2403.01643): label -> (L = l, d_model, n_heads).
PAPER_SETTINGS = {"ViT-like": (196, 256, 8), "NLP-like": (128, 512, 8)}


def paper_bench_sizes(with_seq_len=False):
    """Bench sizes at :data:`PAPER_SETTINGS` (batch 1); ``with_seq_len`` sets ``seq_len = L`` (super)."""
    return {f"{name} B1 L{L} d{d} H{h}": (1, L, d, h, {"seq_len": L} if with_seq_len else {})
            for name, (L, d, h) in PAPER_SETTINGS.items()}


#: Every layer variant: one entry each.
LAYER_VARIANTS = (
    layer_variant("mha-standard", projection="standard", core="sdpa",
                  summary="multi-head attention, standard projection, sdpa core",
                  bench_sizes=paper_bench_sizes()),
    layer_variant("mha-rotary", projection="standard", core="sdpa",
                  layer_options={"rotary": "half"},
                  summary="multi-head attention with rotary embeddings on q and k "
                          "(GPT-NeoX/Llama half-split; interleaved and partial cases too)",
                  bench_sizes=paper_bench_sizes()),
    layer_variant("mha-optimised", projection="optimised", core="sdpa",
                  summary="Optimised Attention: V_h = x_h (no W_V), sdpa core",
                  bench_sizes=paper_bench_sizes()),
    layer_variant("mha-efficient", projection="efficient", core="sdpa",
                  summary="Efficient Attention: K_h = V_h = x_h (no W_K, W_V), sdpa core",
                  bench_sizes=paper_bench_sizes()),
    # seq_len=8 > the test cases' S = 7 > L = 5: the cases use strict top-left blocks of w_a.
    layer_variant("mha-super", projection="super", core="sdpa", layer_options={"seq_len": 8},
                  default_options={"seq_len": 64},
                  summary="Super Attention: K_h = x_h, V_h = W_A x_h (token mixing), sdpa core",
                  bench_sizes=paper_bench_sizes(with_seq_len=True)),
    layer_variant("mha-preconditioned", projection="standard", core="preconditioned",
                  layer_options={"stop_gradient": False},
                  summary="multi-head attention, standard projection, preconditioned sdpa core "
                          "(full gradient)"),
    layer_variant("mha-elementwise-taylor", projection="standard", core="elementwise",
                  layer_options={"order": 6}, key_mask=True,
                  summary="standard projection x element-wise attention, Taylor order 6",
                  bench_sizes={"B1 L1024 d256 H4 causal": (1, 1024, 256, 4, {"causal": True})}),
    # The quaternion layers: quaternion projection x each core.  The paper's models (d_model
    # 64, 4 heads, ~1100 frames); L = 4096 is benchmarked on the cores (kernel backends), the
    # layer adds only its O(L d^2) projections.
    *(layer_variant(f"qattn-{mode}", projection="quaternion", core=mode,
                    summary=f"quaternion Q/K/V/O layers (quarter-size), {mode} core",
                    test_sizes=(2, 5, 16, 2), default_size=(2, 64, 64, 4),
                    bench_sizes={"B1 L1100 d64 H4": (1, 1100, 64, 4, {})})
      for mode in ("shared", "hamilton")),
    # The official shared-score code's head split (contiguous chunks of the flat vector).
    *(layer_variant(f"qattn-{mode}-chunks", projection="quaternion", core=mode,
                    layer_options={"head_layout": "chunks"},
                    summary=f"quaternion Q/K/V/O layers, heads as contiguous chunks of the flat "
                            f"[r|i|j|k] vector (the official code's layout), {mode} core",
                    test_sizes=(2, 5, 16, 2), default_size=(2, 64, 64, 4),
                    bench_sizes={"B1 L1100 d64 H4": (1, 1100, 64, 4, {})})
      for mode in ("shared", "hamilton")),
)
