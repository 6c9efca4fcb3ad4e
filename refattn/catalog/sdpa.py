"""Seeded SDPA problems: every option, odd sizes, GQA, empty rows."""

from __future__ import annotations

import numpy as np

from ..cores.sdpa import flops, sdpa
from .case import Case, Variant

__all__ = ["VARIANT", "make_cases"]


def _case(name, rng, batch, H, Hkv, L, S, E, Ev, dtype, **options):
    q = rng.standard_normal((*batch, H, L, E)).astype(dtype)
    k = rng.standard_normal((*batch, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((*batch, Hkv, S, Ev)).astype(dtype)
    return Case(name, sdpa, (q, k, v), options,
                flops(batch, H, L, S, E, Ev, causal=options.get("causal", False)))


def make_cases(kind="test", dtype="float64", seed=0):
    """Seeded SDPA problems: ``"test"`` covers every option, odd sizes and GQA."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if kind == "default":
        return [_case("B2 H4 L128 E32 causal", rng, (2,), 4, 4, 128, 128, 32, 32, dtype,
                      causal=True)]
    if kind == "bench":
        return [_case(f"B1 H8 L{L} E64{' causal' if c else ''}", rng, (1,), 8, 8, L, L, 64, 64,
                      dtype, causal=c) for L in (512, 2048) for c in (False, True)]
    L, S = 7, 9
    mask = rng.random((L, S)) > 0.3
    mask[2] = False                                   # a fully masked row
    bias = rng.standard_normal((2, 1, L, S)).astype(dtype)
    drop = rng.random((2, 4, L, S)) > 0.25
    return [
        _case("plain", rng, (2,), 4, 4, L, S, 8, 6, dtype),
        _case("no batch dims, L=1", rng, (), 2, 2, 1, 5, 4, 4, dtype),
        _case("two batch dims, GQA 4/2", rng, (2, 1), 4, 2, L, S, 8, 8, dtype),
        _case("MQA 4/1 causal", rng, (1,), 4, 1, L, L, 8, 8, dtype, causal=True),
        _case("causal upper_left L<S", rng, (2,), 2, 2, L, S, 8, 8, dtype, causal=True),
        _case("causal lower_right L<S", rng, (2,), 2, 2, L, S, 8, 8, dtype, causal=True,
              causal_align="lower_right"),
        _case("causal lower_right L>S (empty rows)", rng, (1,), 2, 2, S, L, 8, 8, dtype,
              causal=True, causal_align="lower_right"),
        _case("mask with empty row + causal", rng, (2,), 4, 4, L, S, 8, 8, dtype, mask=mask,
              causal=True),
        _case("bias (B,1,L,S)", rng, (2,), 4, 4, L, S, 8, 8, dtype, bias=bias),
        _case("dropout keep-mask", rng, (2,), 4, 4, L, S, 8, 8, dtype, dropout_mask=drop,
              dropout_p=0.25),
        _case("scale=0.3, L=63", rng, (1,), 2, 2, 63, 63, 4, 4, dtype, scale=0.3),
    ]


VARIANT = Variant(
    name="sdpa",
    kind="core",
    make_cases=make_cases,
    core="sdpa",
    summary="scaled dot-product attention (masks, bias, causal, GQA, dropout)",
)
