"""Each scheme against standard MHA with fixed weights (docs/variants.md section 2).

* Efficient == standard with ``W_K = W_V = I`` (each head reads its own slice);
* Optimised == standard with ``W_V = I``;
* Super with ``W_A = I`` == Efficient.

Both sides do the same float64 arithmetic up to products with exact identity
matrices, so outputs and shared gradients agree to 1e-12 (a few ulps of O(1) values).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn

IDENTITY_TOL = 1e-12
D, H, L, S = 8, 2, 5, 7


def _inputs(cross, seed=0):
    rng = np.random.default_rng(seed)
    xq = rng.standard_normal((2, L, D))
    xkv = rng.standard_normal((2, S, D)) if cross else None
    mask = (rng.random((L, S if cross else L)) > 0.3) if cross else None
    return xq, xkv, mask


def _run(layer, params, xq, xkv, mask):
    args = (params, xq) if xkv is None else (params, xq, xkv)
    y, pull = refattn.vjp(layer, *args, mask=mask)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    return y, pull(dy)


def _assert_same(a, b, what):
    err = float(np.max(np.abs(a - b)))
    assert err <= IDENTITY_TOL, f"{what}: max |difference| {err:.3e} > {IDENTITY_TOL:g}"


def _compare(layer, params, reference, ref_params, cross):
    xq, xkv, mask = _inputs(cross)
    y, grads = _run(layer, params, xq, xkv, mask)
    y_ref, grads_ref = _run(reference, ref_params, xq, xkv, mask)
    _assert_same(y, y_ref, "output")
    for name in params:                          # the parameters both layers have
        if name in ref_params:
            _assert_same(grads[0][name], grads_ref[0][name], f"d{name}")
    for i in range(1, len(grads)):               # dxq (and dxkv)
        _assert_same(grads[i], grads_ref[i], f"input gradient {i}")


CONFIGS = [pytest.param(c, b, x, id=f"{'causal' if c else 'full'}-{'bias' if b else 'nobias'}-"
                        f"{'cross' if x else 'self'}")
           for c, b, x in [(False, False, False), (True, True, False), (False, True, True),
                           (True, False, True)]]


def _standard_with(layer, params, causal, bias, **fixed):
    standard = refattn.Attention(D, H, causal=causal, bias=bias)
    std = dict(standard.init(seed=9))
    std.update({k: v for k, v in params.items() if k in std})
    for name, value in fixed.items():
        std[name] = value
    return standard, std


@pytest.mark.parametrize("causal, bias, cross", CONFIGS)
def test_efficient_is_standard_with_identity_key_and_value(causal, bias, cross):
    layer = refattn.Attention(D, H, projection="efficient", causal=causal, bias=bias)
    params = layer.init(seed=1)
    fixed = {"w_k": np.eye(D), "w_v": np.eye(D)}
    if bias:
        fixed.update(b_k=np.zeros(D), b_v=np.zeros(D))
    standard, std = _standard_with(layer, params, causal, bias, **fixed)
    _compare(layer, params, standard, std, cross)


@pytest.mark.parametrize("causal, bias, cross", CONFIGS)
def test_optimised_is_standard_with_identity_value(causal, bias, cross):
    layer = refattn.Attention(D, H, projection="optimised", causal=causal, bias=bias)
    params = layer.init(seed=2)
    fixed = {"w_v": np.eye(D)}
    if bias:
        fixed.update(b_v=np.zeros(D))
    standard, std = _standard_with(layer, params, causal, bias, **fixed)
    _compare(layer, params, standard, std, cross)


@pytest.mark.parametrize("causal, bias, cross", CONFIGS)
def test_super_with_identity_mixing_is_efficient(causal, bias, cross):
    layer = refattn.Attention(D, H, projection="super", seq_len=S + 1, causal=causal, bias=bias)
    params = {**layer.init(seed=3), "w_a": np.eye(S + 1)}
    efficient = refattn.Attention(D, H, projection="efficient", causal=causal, bias=bias)
    eff = {k: v for k, v in params.items() if k != "w_a"}
    _compare(layer, params, efficient, eff, cross)
