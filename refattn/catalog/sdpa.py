"""Seeded SDPA problems: every option, odd sizes, GQA, empty rows, packed and padded sequences."""

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


def _packed_case(name, rng, q_lens, k_lens, H, Hkv, E, Ev, dtype, **options):
    """FlashAttention varlen layout: ``q (total_q, H, E)`` with ``cu_seqlens_q``, ..."""
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (q_lens, k_lens))
    q = rng.standard_normal((int(cu_q[-1]), H, E)).astype(dtype)
    k = rng.standard_normal((int(cu_k[-1]), Hkv, E)).astype(dtype)
    v = rng.standard_normal((int(cu_k[-1]), Hkv, Ev)).astype(dtype)
    work = sum(flops((), H, lq, lk, E, Ev, causal=options.get("causal", False))
               for lq, lk in zip(q_lens, k_lens))
    return Case(name, sdpa, (q, k, v), {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **options},
                work)


def soft_cap_mod(score, b, h, i, j):
    """A FlexAttention-style ``score_mod``: Gemma 2's soft-cap at 2.

    ``np.tanh`` serves NumPy and CuPy arrays (``__array_ufunc__``) and numba scalars alike, so
    the same function runs on the reference backend and inside the numba kernels.
    """
    return 2.0 * np.tanh(score / 2.0)


def soft_cap_mod_grad(score, b, h, i, j):
    """``d soft_cap_mod / d score``."""
    return 1.0 - np.tanh(score / 2.0) ** 2


def sliding_window_mod(b, h, i, j):
    """A FlexAttention-style ``mask_mod``: causal, at most 3 keys back, head 1 sees one key more."""
    return (j <= i) & (i - j <= 3 + (h == 1))


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
        _case("window (3, 1)", rng, (2,), 2, 2, L, S, 8, 8, dtype, window=(3, 1)),
        _case("window + causal lower_right + GQA 4/2 + softcap", rng, (2,), 4, 2, L, S, 8, 6,
              dtype, window=(2, -1), causal=True, causal_align="lower_right", softcap=1.5),
        _packed_case("packed varlen: window + causal + GQA 4/2 + softcap", rng, (3, 5, 1, 6),
                     (4, 5, 2, 9), 4, 2, 8, 8, dtype, window=(3, 0), causal=True,
                     causal_align="lower_right", softcap=2.0),
        _case("padded seq lengths, causal", rng, (3,), 2, 2, L, S, 8, 8, dtype, causal=True,
              query_seq_lengths=np.array([7, 3, 5], np.int32),
              key_value_seq_lengths=np.array([9, 4, 8], np.int32)),
        _case("score_mod soft-cap + mask_mod sliding window", rng, (2,), 2, 2, L, L, 8, 8, dtype,
              score_mod=soft_cap_mod, score_mod_grad=soft_cap_mod_grad,
              mask_mod=sliding_window_mod),
    ]


VARIANT = Variant(
    name="sdpa",
    kind="core",
    make_cases=make_cases,
    core="sdpa",
    summary="scaled dot-product attention (masks, bias, causal, GQA, dropout, window, softcap, "
            "packed and padded sequences, mask_mod/score_mod)",
)
