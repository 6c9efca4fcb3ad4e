"""Quaternion linear layer and quaternion projection: the spec's formulas, Hamilton-product
identities, the per-unit head split, parameter counts and errors.  (Gradient checks of the
registered layers ``qattn-*`` run in ``tests/test_variants.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cores.quaternion.algebra import hamilton_product
from refattn.projections.quaternion import (linear_matrix, merge_quaternion_heads,
                                            split_quaternion_heads)
from refattn.testing import check_grads

# A few float64 operations on O(1) values: 1e-12 is far above rounding, far below any real error.
EXACT = dict(rtol=1e-12, atol=1e-12)
MODES = ("shared", "hamilton")


def _blocks(x):
    """``(..., 4n) -> r, i, j, k`` blocks."""
    return np.split(x, 4, axis=-1)


def test_linear_layer_is_the_spec_formula():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 2, 4 * 5)), rng.standard_normal((4, 5, 6))
    xr, xi, xj, xk = _blocks(x)
    wr, wi, wj, wk = w
    expected = np.concatenate([
        xr @ wr - xi @ wi - xj @ wj - xk @ wk,
        xr @ wi + xi @ wr - xj @ wk + xk @ wj,
        xr @ wj + xi @ wk + xj @ wr - xk @ wi,
        xr @ wk - xi @ wj + xj @ wi + xk @ wr], axis=-1)
    np.testing.assert_allclose(refattn.quaternion_linear(x, w), expected, **EXACT)
    M = np.block([[wr, wi, wj, wk], [-wi, wr, wk, -wj], [-wj, -wk, wr, wi], [-wk, wj, -wi, wr]])
    np.testing.assert_array_equal(linear_matrix(np, w), M)


def test_one_unit_layer_is_hamilton_product_with_weight_on_the_left():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((50, 4)), rng.standard_normal((4, 1, 1))
    wq = w[:, 0, 0]
    np.testing.assert_allclose(refattn.quaternion_linear(x, w), hamilton_product(np, wq, x), **EXACT)
    assert np.max(np.abs(refattn.quaternion_linear(x, w) - hamilton_product(np, x, wq))) > 1e-3


def _quaternion_matmul(w2, w1):
    """Weight of ``x -> w2 (x) (w1 (x) x)``: ``W[i, p] = sum_o w2[o, p] (x) w1[i, o]``."""
    n_in, n_mid, n_out = w1.shape[1], w1.shape[2], w2.shape[2]
    out = np.zeros((4, n_in, n_out))
    for i in range(n_in):
        for p in range(n_out):
            for o in range(n_mid):
                out[:, i, p] += hamilton_product(np, w2[:, o, p], w1[:, i, o])
    return out


def test_linear_layer_composition_is_associative():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 4 * 3))
    w1, w2 = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 5, 2))
    np.testing.assert_allclose(
        refattn.quaternion_linear(refattn.quaternion_linear(x, w1), w2),
        refattn.quaternion_linear(x, _quaternion_matmul(w2, w1)), **EXACT)


def test_one_unit_layer_preserves_norm_products():
    """``|w (x) x| = |w| |x|`` through the layer (norm multiplicativity)."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((100, 4)), rng.standard_normal((4, 1, 1))
    np.testing.assert_allclose(np.linalg.norm(refattn.quaternion_linear(x, w), axis=-1),
                               np.linalg.norm(w) * np.linalg.norm(x, axis=-1), **EXACT)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_layer_gradients(with_bias):
    rng = np.random.default_rng(4)
    arrays = (rng.standard_normal((2, 3, 4 * 3)), rng.standard_normal((4, 3, 2)))
    if with_bias:
        arrays += (rng.standard_normal(4 * 2),)
    check_grads(refattn.quaternion_linear, *arrays)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(w=np.zeros((3, 3, 2))), ValueError, r"w must have shape \(4, n_in, n_out\)"),
    (dict(w=np.zeros((4, 3))), ValueError, r"w must have shape \(4, n_in, n_out\)"),
    (dict(x=np.zeros((2, 10))), ValueError, r"x must have shape \(\.\.\., 4 n_in\) = \(\.\.\., 12\)"),
    (dict(b=np.zeros(2)), ValueError, r"b must have shape \(4 n_out,\) = \(8,\)"),
    (dict(w=np.zeros((4, 3, 2), dtype=np.float32)), TypeError, r"w has dtype float32"),
    (dict(x=np.zeros((2, 12), dtype=int)), TypeError, r"x must be a real floating-point array"),
])
def test_linear_layer_errors(kwargs, error, pattern):
    args = dict(x=np.zeros((2, 12)), w=np.zeros((4, 3, 2)), b=None, **{})
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        refattn.quaternion_linear(args["x"], args["w"], args["b"])


# -- heads own units of every component ----------------------------------------------------------
def test_heads_split_per_unit_not_per_component():
    H, dh = 4, 2
    n = H * dh
    # feature f = c * n + u carries the label 100 c + u (component c, unit u)
    labels = np.array([100.0 * c + u for c in range(4) for u in range(n)])[None, :]   # (L=1, 4n)
    heads = split_quaternion_heads(np, labels, H)                                    # (H, 1, 4, dh)
    assert heads.shape == (H, 1, 4, dh)
    for h in range(H):
        expected = np.array([[100.0 * c + h * dh + t for t in range(dh)] for c in range(4)])
        np.testing.assert_array_equal(heads[h, 0], expected)
    # The public-code pitfall: a contiguous split of the flat vector gives head h = component h.
    naive = labels.reshape(1, H, 4 * dh)[0]                                            # (H, 4 dh)
    assert all(np.all(naive[h] // 100 == h) for h in range(H))
    assert not np.array_equal(heads.reshape(H, 4 * dh), naive)
    np.testing.assert_array_equal(merge_quaternion_heads(np, heads), labels)


@pytest.mark.parametrize("mode", MODES)
def test_layer_is_linear_layers_around_the_core(mode):
    """The layer == quaternion_linear -> per-unit head split -> core -> merge -> quaternion_linear."""
    rng = np.random.default_rng(5)
    d, H, L, S = 16, 2, 4, 6
    dh = d // (4 * H)
    layer = refattn.Attention(d, H, projection="quaternion", core=mode, bias=True)
    p = layer.init(seed=1)
    xq, xkv = rng.standard_normal((2, L, d)), rng.standard_normal((2, S, d))
    mask = rng.random((L, S)) > 0.3

    def heads(x):   # (B, T, d) -> (B, H, T, 4, dh): [r|i|j|k] blocks, head h takes units h*dh...
        B, T, _ = x.shape
        return x.reshape(B, T, 4, H, dh).transpose(0, 3, 1, 2, 4)

    q = heads(refattn.quaternion_linear(xq, p["w_q"], p["b_q"]))
    k = heads(refattn.quaternion_linear(xkv, p["w_k"], p["b_k"]))
    v = heads(refattn.quaternion_linear(xkv, p["w_v"], p["b_v"]))
    o = refattn.quaternion_attention(q, k, v, mode=mode, mask=mask)           # (B, H, L, 4, dh)
    merged = o.transpose(0, 2, 3, 1, 4).reshape(2, L, d)
    expected = refattn.quaternion_linear(merged, p["w_o"], p["b_o"])
    np.testing.assert_allclose(layer(p, xq, xkv, mask), expected, **EXACT)


def test_parameters_are_quarter_size():
    for d, H in ((64, 4), (32, 2)):
        layer = refattn.Attention(d, H, projection="quaternion", core="shared")
        assert layer.param_shapes() == {n: (4, d // 4, d // 4) for n in ("w_q", "w_k", "w_v", "w_o")}
        assert layer.num_params() == refattn.Attention(d, H).num_params() // 4 == d * d
        biased = refattn.Attention(d, H, projection="quaternion", core="hamilton", bias=True)
        assert biased.param_shapes()["b_q"] == (d,)
        assert biased.num_params() == d * d + 4 * d


def test_layer_flops_use_the_core_cost_model():
    d, H, L, S = 64, 4, 30, 40
    dh = d // (4 * H)
    flops = {m: refattn.Attention(d, H, projection="quaternion", core=m).flops(L, S) for m in MODES}
    # Only the score maps differ: 16 dh against 4 dh multiplications per pair and head.
    assert flops["hamilton"] - flops["shared"] == 2 * H * L * S * 12 * dh
    # Projections: four (d, d) real GEMMs (the block matrix) for L queries and S keys.
    core_shared = refattn.get_core("shared").flops((), H, L, S, 4 * dh, 4 * dh)
    assert flops["shared"] - core_shared == 2 * d * d * (2 * L + 2 * S)


def test_layer_errors():
    with pytest.raises(ValueError, match=r"d_model divisible by 4 \* n_heads"):
        refattn.Attention(24, 4, projection="quaternion", core="shared")
    with pytest.raises(ValueError, match=r"produces quaternion heads but core='sdpa' takes real"):
        refattn.Attention(16, 2, projection="quaternion", core="sdpa")
    with pytest.raises(ValueError, match=r"produces real heads but core='hamilton' takes quaternion"):
        refattn.Attention(16, 2, projection="standard", core="hamilton")
    layer = refattn.Attention(16, 2, projection="quaternion", core="hamilton")
    p = layer.init()
    p["w_q"] = np.zeros((16, 16))
    with pytest.raises(ValueError, match=r"params\['w_q'\] has shape \(16, 16\), expected \(4, 4, 4\)"):
        layer(p, np.zeros((1, 3, 16)))


def test_float32_layer():
    layer = refattn.Attention(16, 2, projection="quaternion", core="hamilton", causal=True)
    p = layer.init(dtype=np.float32)
    x = np.random.default_rng(6).standard_normal((2, 5, 16)).astype(np.float32)
    y, pull = refattn.vjp(layer, p, x)
    dp, dx = pull(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in dp.values())
