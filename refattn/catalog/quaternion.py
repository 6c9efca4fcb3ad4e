"""Seeded quaternion problems: masks, causal alignments, bias, GQA, L != S, SDPA's options."""

from __future__ import annotations

import numpy as np

from ..cores.quaternion import MODES, SUMMARIES, flops, quaternion_attention
from .case import Case, Variant

__all__ = ["VARIANTS"]


def _case(name, mode, rng, batch, H, Hkv, L, S, d, dv, dtype, backends=None, **options):
    q = rng.standard_normal((*batch, H, L, 4, d)).astype(dtype)
    k = rng.standard_normal((*batch, Hkv, S, 4, d)).astype(dtype)
    v = rng.standard_normal((*batch, Hkv, S, 4, dv)).astype(dtype)
    return Case(name, quaternion_attention, (q, k, v), {"mode": mode, **options},
                flops(batch, H, L, S, 4 * d, 4 * dv, causal=options.get("causal", False),
                      mode=mode), backends=backends)


def _packed_case(name, mode, rng, q_lens, k_lens, H, Hkv, d, dv, dtype, **options):
    """FlashAttention varlen layout: ``q (total_q, H, 4, d)`` with ``cu_seqlens_q``, ..."""
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (q_lens, k_lens))
    q = rng.standard_normal((int(cu_q[-1]), H, 4, d)).astype(dtype)
    k = rng.standard_normal((int(cu_k[-1]), Hkv, 4, d)).astype(dtype)
    v = rng.standard_normal((int(cu_k[-1]), Hkv, 4, dv)).astype(dtype)
    work = sum(flops((), H, lq, lk, 4 * d, 4 * dv, causal=options.get("causal", False),
                     mode=mode) for lq, lk in zip(q_lens, k_lens))
    return Case(name, quaternion_attention, (q, k, v),
                {"mode": mode, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **options}, work)


def _make_cases(mode):
    def make_cases(kind="test", dtype="float64", seed=0):
        """Seeded problems: ``"test"`` covers masks, causal alignments, bias, GQA, L != S."""
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        if kind == "default":
            return [_case("B2 H4 L128 d4", mode, rng, (2,), 4, 4, 128, 128, 4, 4, dtype)]
        if kind == "bench":
            # The paper's models: d_model 64, 4 heads -> d = 64 / 4 / 4 = 4 units per component;
            # 6.86 s utterances -> about 1100 frames.  And a long sequence, for the
            # linear-memory kernels only: the reference holds M score maps of L^2 (Hamilton,
            # float64: 2 GiB each, several alive in the backward pass).
            return [_case("B1 H4 L1100 d4", mode, rng, (1,), 4, 4, 1100, 1100, 4, 4, dtype),
                    _case("B1 H4 L4096 d4", mode, rng, (1,), 4, 4, 4096, 4096, 4, 4, dtype,
                          backends=("numba", "cupy"))]
        L, S = 5, 7
        mask = rng.random((L, S)) > 0.3
        mask[2] = False                                   # a fully masked row
        bias = rng.standard_normal((2, 1, L, S)).astype(dtype)
        return [
            _case("plain L!=S", mode, rng, (2,), 2, 2, L, S, 3, 2, dtype),
            _case("no batch dims, L=1", mode, rng, (), 2, 2, 1, 4, 2, 2, dtype),
            _case("two batch dims, GQA 4/2", mode, rng, (2, 1), 4, 2, L, S, 2, 3, dtype),
            _case("causal lower_right L>S (empty rows)", mode, rng, (1,), 2, 1, S, L, 2, 2,
                  dtype, causal=True, causal_align="lower_right"),
            _case("mask with empty row + causal", mode, rng, (2,), 2, 2, L, S, 2, 2, dtype,
                  mask=mask, causal=True),
            _case("bias (B,1,L,S), scale=0.3", mode, rng, (2,), 2, 2, L, S, 2, 2, dtype,
                  bias=bias, scale=0.3),
            _case("window + causal lower_right + GQA 4/2 + softcap + alibi (B, H)", mode, rng,
                  (2,), 4, 2, L, S, 2, 2, dtype, window=(2, -1), causal=True,
                  causal_align="lower_right", softcap=1.5,
                  alibi_slopes=rng.random((2, 4)).astype(dtype)),
            _case("padded seq lengths + window + softcap, causal", mode, rng, (3,), 2, 2, L, S,
                  2, 2, dtype, causal=True, window=(3, 0), softcap=2.0,
                  query_seq_lengths=np.array([5, 2, 4], np.int32),
                  key_value_seq_lengths=np.array([7, 3, 6], np.int32)),
            _packed_case("packed varlen: window + causal + GQA 4/2 + softcap + alibi", mode, rng,
                         (3, 4, 1), (4, 4, 3), 4, 2, 2, 2, dtype, window=(2, 0), causal=True,
                         causal_align="lower_right", softcap=2.0,
                         alibi_slopes=rng.random(4).astype(dtype)),
        ]
    return make_cases


VARIANTS = tuple(Variant(name=f"quaternion-{mode}", kind="core", make_cases=_make_cases(mode),
                         core=mode, summary=SUMMARIES[mode], tags=("quaternion",))
                 for mode in MODES)
