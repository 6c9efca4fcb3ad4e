"""The quaternion projection's ``head_layout="chunks"`` (the official shared-score code's split).

Finite differences and the backends of the layer variants ``qattn-*-chunks`` run in
``tests/test_variants.py``; the port of the official module in ``tests/verify/test_seed_ports.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cores.quaternion.algebra import MODES
from refattn.projections.quaternion import (
    merge_quaternion_heads,
    split_quaternion_heads,
)

EXACT = {"rtol": 1e-12, "atol": 1e-12}


def _labels(H, dh):
    """One token whose flat feature ``f`` carries the label ``f`` (an index map made visible)."""
    return np.arange(4 * H * dh, dtype=float)[None, :]                       # (L=1, 4 H dh)


@pytest.mark.parametrize("H, dh", [(1, 3), (2, 2), (4, 1), (4, 2)])
def test_chunks_index_map(H, dh):
    heads = split_quaternion_heads(np, _labels(H, dh), H, "chunks")           # (H, 1, 4, dh)
    assert heads.shape == (H, 1, 4, dh)
    for h in range(H):
        for c in range(4):
            for u in range(dh):
                assert heads[h, 0, c, u] == h * 4 * dh + c * dh + u
    np.testing.assert_array_equal(merge_quaternion_heads(np, heads, "chunks"), _labels(H, dh))


def test_chunks_equal_units_for_one_head_and_differ_otherwise():
    one = _labels(1, 4)
    np.testing.assert_array_equal(split_quaternion_heads(np, one, 1, "chunks"),
                                  split_quaternion_heads(np, one, 1, "units"))
    four = _labels(4, 2)
    chunks = split_quaternion_heads(np, four, 4, "chunks")
    units = split_quaternion_heads(np, four, 4, "units")
    assert not np.array_equal(chunks, units)
    n = 4 * 2                                    # units per component of the linear layer
    # H = 4: head h of the chunks layout holds component h of the linear layer only.
    assert all(np.all(chunks[h] // n == h) for h in range(4))


def test_merge_is_the_transpose_of_split():
    """<split(x), g> = <x, merge(g)>: the backward pass of the permutation is its inverse."""
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((2, 3, 16)), rng.standard_normal((2, 2, 3, 4, 2))
    lhs = np.sum(split_quaternion_heads(np, x, 2, "chunks") * g)
    np.testing.assert_allclose(lhs, np.sum(x * merge_quaternion_heads(np, g, "chunks")), **EXACT)


@pytest.mark.parametrize("mode", MODES)
def test_chunks_layer_is_linear_layers_around_the_core(mode):
    rng = np.random.default_rng(5)
    d, H, L, S = 16, 2, 4, 6
    dh = d // (4 * H)
    layer = refattn.Attention(d, H, projection="quaternion", core=mode, bias=True,
                              head_layout="chunks")
    p = layer.init(seed=1)
    xq, xkv = rng.standard_normal((2, L, d)), rng.standard_normal((2, S, d))
    mask = rng.random((L, S)) > 0.3

    def heads(x):   # (B, T, d) -> (B, H, T, 4, dh): head h = flat chunk h, then 4 quarters
        B, T, _ = x.shape
        return x.reshape(B, T, H, 4, dh).transpose(0, 2, 1, 3, 4)

    q = heads(refattn.quaternion_linear(xq, p["w_q"], p["b_q"]))
    k = heads(refattn.quaternion_linear(xkv, p["w_k"], p["b_k"]))
    v = heads(refattn.quaternion_linear(xkv, p["w_v"], p["b_v"]))
    o = refattn.quaternion_attention(q, k, v, mode=mode, mask=mask)           # (B, H, L, 4, dh)
    merged = o.transpose(0, 2, 1, 3, 4).reshape(2, L, d)
    expected = refattn.quaternion_linear(merged, p["w_o"], p["b_o"])
    np.testing.assert_allclose(layer(p, xq, xkv, mask), expected, **EXACT)
    units = refattn.Attention(d, H, projection="quaternion", core=mode, bias=True)
    assert np.max(np.abs(units(p, xq, xkv, mask) - expected)) > 1e-3


def test_chunks_layer_on_the_numba_backend_matches_the_reference():
    rng = np.random.default_rng(2)
    layer = refattn.Attention(16, 4, projection="quaternion", core="hamilton",
                              head_layout="chunks", causal=True)
    p, x = layer.init(seed=3), rng.standard_normal((2, 5, 16))
    y_ref, pull_ref = refattn.vjp(layer, p, x, backend="reference")
    y, pull = refattn.vjp(layer, p, x, backend="numba")
    np.testing.assert_allclose(y, y_ref, **EXACT)
    dy = rng.standard_normal(y.shape)
    (dp_ref, dx_ref), (dp, dx) = pull_ref(dy), pull(dy)
    np.testing.assert_allclose(dx, dx_ref, **EXACT)
    for name in dp_ref:
        np.testing.assert_allclose(dp[name], dp_ref[name], **EXACT)


def test_bad_head_layout_is_named():
    with pytest.raises(ValueError, match=r"head_layout must be one of \('units', 'chunks'\)"):
        refattn.Attention(16, 2, projection="quaternion", core="shared", head_layout="heads")
    with pytest.raises(TypeError, match=r"unexpected option\(s\) head_layout"):
        refattn.Attention(16, 2, head_layout="chunks")
