"""Seeded element-wise problems: exact and Taylor forms, masks, causal alignments, GQA."""

from __future__ import annotations

import numpy as np

from ..cores.elementwise import elementwise_attention, flops
from .case import Case, Variant

__all__ = ["VARIANTS"]


def _case(name, rng, batch, H, Hkv, L, S, D, dtype, spread=1.0, backends=None, **options):
    """Seeded ``q, k, v`` with entries ``spread * N(0, 1)``; ``backends`` restricts the case."""
    q = (spread * rng.standard_normal((*batch, H, L, D))).astype(dtype)
    k = (spread * rng.standard_normal((*batch, Hkv, S, D))).astype(dtype)
    v = rng.standard_normal((*batch, Hkv, S, D)).astype(dtype)
    return Case(name, elementwise_attention, (q, k, v), options,
                flops(batch, H, L, S, D, D, causal=options.get("causal", False),
                      order=options.get("order")), backends=backends)


def _exact_cases(kind="test", dtype="float64", seed=0):
    """Exact form: every mask option, odd sizes, GQA, empty rows."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if kind == "default":     # 2.5 tiles of the numba kernels' 32 queries: a partial tile too
        return [_case("B2 H4 L80 D32 causal", rng, (2,), 4, 4, 80, 80, 32, dtype, causal=True)]
    if kind == "bench":     # O(L^2 D): sizes where the reference's L x S x D arrays stay small
        return [_case(f"B1 H4 L{L} D16{' causal' if c else ''}", rng, (1,), 4, 4, L, L, 16, dtype,
                      causal=c) for L in (256,) for c in (False, True)]
    L, S = 7, 9
    mask = rng.random((L, S)) > 0.3
    mask[2] = False                                    # a fully masked row
    return [
        _case("plain", rng, (2,), 3, 3, L, S, 5, dtype),
        _case("no batch dims, L=1", rng, (), 2, 2, 1, 5, 4, dtype),
        _case("two batch dims, GQA 4/2", rng, (2, 1), 4, 2, L, S, 4, dtype),
        _case("causal lower_right L>S (empty rows)", rng, (1,), 2, 2, S, L, 4, dtype,
              causal=True, causal_align="lower_right"),
        _case("mask with empty row + causal", rng, (2,), 2, 2, L, S, 4, dtype, mask=mask,
              causal=True),
        _case("scale=0.3, wide spread", rng, (1,), 2, 2, 20, 20, 3, dtype, spread=3.0, scale=0.3),
    ]


def _taylor_cases(causal):
    def make_cases(kind="test", dtype="float64", seed=0):
        """Taylor form: orders 2..8, GQA, key-padding masks with empty rows, multi-block scans."""
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        c = dict(causal=causal)
        if kind == "default":
            # 7.5 scan blocks of 32 queries (the last one partial): every path of the causal
            # scan, at a size where the float64 finite differences of the reference take a
            # second (the scaling study times the long sequences)
            return [_case("B2 H4 L240 D32 t=6", rng, (2,), 4, 4, 240, 240, 32, dtype, order=6,
                          **c)]
        if kind == "bench":   # the scaling study covers L up to 65536; asv tracks a few points
            sizes = [(2, 1024), (4, 1024), (6, 1024), (6, 8192)] if causal else [(4, 4096)]
            # the reference's causal scan weighs 32-query diagonal blocks pair by pair: keep
            # it to L = 1024; the kernels take every size
            return [_case(f"B1 H4 L{L} D64 t={t}", rng, (1,), 4, 4, L, L, 64, dtype, order=t,
                          backends=None if L <= 1024 else ("numba", "cupy"), **c)
                    for t, L in sizes]
        L, S = 7, 9
        keys = rng.random((2, 1, 1, S)) > 0.3             # key padding, per batch element
        keys[1] = False                                    # batch 1: every key masked out
        cases = [
            _case("t=2", rng, (2,), 3, 3, L, S, 5, dtype, order=2, **c),
            _case("t=6, no batch dims, L=1", rng, (), 2, 2, 1, 5, 4, dtype, order=6, **c),
            _case("t=4, two batch dims, GQA 4/2", rng, (2, 1), 4, 2, L, S, 4, dtype, order=4, **c),
            _case("t=8, key-padding mask (one batch all masked)", rng, (2,), 2, 2, L, S, 4, dtype,
                  order=8, mask=keys, **c),
            _case("t=6, scale=0.5, L=45 (two scan blocks)", rng, (1,), 2, 2, 45, 45, 3, dtype,
                  order=6, scale=0.5, **c),
        ]
        if causal:
            cases += [
                _case("t=4, lower_right L<S", rng, (1,), 2, 2, L, S, 4, dtype, order=4,
                      causal_align="lower_right", **c),
                _case("t=4, lower_right L>S (empty rows)", rng, (1,), 2, 1, 40, S, 4, dtype,
                      order=4, causal_align="lower_right", **c),
            ]
        return cases
    return make_cases


VARIANTS = (
    Variant(
        name="elementwise", kind="core", make_cases=_exact_cases, core="elementwise",
        summary="element-wise attention, exact O(L^2 D) form (masks, causal, GQA)"),
    Variant(
        name="elementwise-taylor", kind="core", make_cases=_taylor_cases(False), core="elementwise",
        summary="element-wise attention, Taylor form, non-causal moments, O(t L D)"),
    Variant(
        name="elementwise-taylor-causal", kind="core", make_cases=_taylor_cases(True),
        core="elementwise",
        summary="element-wise attention, causal Taylor form (prefix scan), O(t L D)"),
)
