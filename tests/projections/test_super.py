"""Super Attention: token mixing by W_A, its causal restriction and its blocks."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import check_grads

D, H, SEQ_LEN = 8, 2, 9


def _layer(**kw):
    kw.setdefault("seq_len", SEQ_LEN)
    return refattn.Attention(D, H, projection="super", **kw)


def _naive(params, xq, xkv, causal, mask=None):
    """Per-batch, per-head loops with an explicit softmax over the KEY axis (the paper's
    public code normalises over queries; this is the definition)."""
    B, L, _ = xq.shape
    S = xkv.shape[1]
    dk = D // H
    w_a = params["w_a"][:S, :S]
    if causal:
        w_a = np.tril(w_a)
    y = np.zeros((B, L, D))
    for b in range(B):
        q = xq[b] @ params["w_q"] + params.get("b_q", 0.0)
        mixed = w_a @ xkv[b]                                       # (S, d): tokens mixed
        heads = []
        for h in range(H):
            cols = slice(h * dk, (h + 1) * dk)
            scores = q[:, cols] @ xkv[b][:, cols].T / np.sqrt(dk)  # (L, S)
            keep = np.ones((L, S), bool) if mask is None else mask.copy()
            if causal:
                keep &= np.tril(np.ones((L, S), bool))
            scores = np.where(keep, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)                      # rows sum to 1 over keys
            heads.append(p @ mixed[:, cols])
        y[b] = np.concatenate(heads, axis=1) @ params["w_o"] + params.get("b_o", 0.0)
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_matches_naive_loops(causal, cross):
    rng = np.random.default_rng(0)
    layer = _layer(causal=causal, bias=True)
    params = layer.init(seed=1)
    xq = rng.standard_normal((2, 5, D))
    xkv = rng.standard_normal((2, 7, D)) if cross else xq
    mask = rng.random((5, 7 if cross else 5)) > 0.2
    mask[:, 0] = True                        # every row keeps key 0: no empty rows here
    y = layer(params, xq, None if not cross else xkv, mask=mask)
    # Reassociation of sums between loops and batched matmuls: a few ulps of O(1) values.
    np.testing.assert_allclose(y, _naive(params, xq, xkv, causal, mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cross", [False, True])
def test_causal_does_not_leak(cross):
    """Perturbing token t changes no output row before t (W_A lower triangle, causal core)."""
    rng = np.random.default_rng(1)
    layer = _layer(causal=True)
    params = layer.init(seed=2)
    L = 7
    x = rng.standard_normal((2, L, D))
    for t in range(1, L):
        moved = x.copy()
        moved[:, t:] += 10.0 * rng.standard_normal((2, L - t, D))
        if cross:      # the keys/values move; the queries stay
            y0, y1 = layer(params, x, x), layer(params, x, moved)
        else:
            y0, y1 = layer(params, x), layer(params, moved)
        assert np.max(np.abs(y1[:, :t] - y0[:, :t])) <= 1e-15, f"token {t} leaks into earlier rows"
        assert np.max(np.abs(y1[:, t:] - y0[:, t:])) > 1e-3     # ... and does reach later ones


def test_causal_gradient_does_not_reach_the_future():
    """A loss on rows < t has zero gradient with respect to tokens >= t."""
    rng = np.random.default_rng(2)
    layer = _layer(causal=True)
    x = rng.standard_normal((2, 6, D))
    y, pull = refattn.vjp(layer, layer.init(seed=3), x)
    dy = np.zeros_like(y)
    dy[:, :3] = rng.standard_normal((2, 3, D))
    _, dx = pull(dy)
    assert np.all(dx[:, 3:] == 0)
    assert np.all(np.abs(dx[:, :3]) > 0)


@pytest.mark.parametrize("S", [4, SEQ_LEN])
def test_causal_w_a_gradient_is_zero_above_the_diagonal(S):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, S, D))
    for causal in (True, False):
        layer = _layer(causal=causal)
        y, pull = refattn.vjp(layer, layer.init(seed=4), x)
        dw_a = pull(rng.standard_normal(y.shape))[0]["w_a"]
        upper = np.triu(dw_a[:S, :S], 1)
        if causal:
            assert np.all(upper == 0), "causal: w_a gradient above the diagonal must be exactly 0"
        else:
            assert np.all(upper[np.triu_indices(S, 1)] != 0)   # the check above can fail
        assert np.all(dw_a[S:] == 0) and np.all(dw_a[:, S:] == 0), "entries outside W_A[:S, :S]"


def test_causal_ignores_the_upper_triangle_of_w_a():
    rng = np.random.default_rng(4)
    layer = _layer(causal=True)
    params = layer.init(seed=5)
    x = rng.standard_normal((2, 6, D))
    noisy = {**params, "w_a": params["w_a"] + np.triu(rng.standard_normal((SEQ_LEN,) * 2), 1)}
    assert np.array_equal(layer(params, x), layer(noisy, x))


def test_short_sequences_use_the_top_left_block():
    rng = np.random.default_rng(5)
    S = 6
    long_layer, exact_layer = _layer(), _layer(seq_len=S)
    params = long_layer.init(seed=6)
    block = {**params, "w_a": params["w_a"][:S, :S]}
    xq, xkv = rng.standard_normal((2, 4, D)), rng.standard_normal((2, S, D))
    y, pull = refattn.vjp(long_layer, params, xq, xkv)
    y_exact, pull_exact = refattn.vjp(exact_layer, block, xq, xkv)
    assert np.array_equal(y, y_exact)
    dy = rng.standard_normal(y.shape)
    g, g_exact = pull(dy), pull_exact(dy)
    assert np.array_equal(g[0]["w_a"][:S, :S], g_exact[0]["w_a"])
    assert np.all(g[0]["w_a"][S:] == 0) and np.all(g[0]["w_a"][:, S:] == 0)


@pytest.mark.parametrize("xq_shape, xkv_shape, options", [
    ((3, 2, 5, D), None, {"causal": True, "bias": True}),          # two batch dims
    ((5, D), (SEQ_LEN, D), {"causal": True}),                       # no batch dims, S = seq_len
    ((2, 5, D), (2, 7, D), {"causal": True, "causal_align": "lower_right"}),
])
def test_gradients_match_finite_differences(xq_shape, xkv_shape, options):
    rng = np.random.default_rng(6)
    layer = _layer(**options)
    arrays = [layer.init(seed=7), rng.standard_normal(xq_shape)]
    if xkv_shape is not None:
        arrays.append(rng.standard_normal(xkv_shape))
    check_grads(layer, *arrays)


def test_gradients_with_mask_and_empty_row():
    rng = np.random.default_rng(7)
    layer = _layer(bias=True)
    mask = rng.random((5, 7)) > 0.4
    mask[2] = False
    check_grads(layer, layer.init(seed=8), rng.standard_normal((2, 5, D)),
                rng.standard_normal((2, 7, D)), mask=mask)
