"""The layer frame with the standard projection and the sdpa core."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import check_grads


def _explicit_mha(params, xq, xkv, n_heads, causal=False, mask=None):
    """docs/variants.md section 1, written out with plain NumPy (no refattn code)."""
    d = xq.shape[-1]
    dk = d // n_heads
    Q, K, V = xq @ params["w_q"], xkv @ params["w_k"], xkv @ params["w_v"]
    heads = []
    for h in range(n_heads):
        sl = slice(h * dk, (h + 1) * dk)
        s = Q[..., sl] @ K[..., sl].swapaxes(-1, -2) / np.sqrt(dk)
        keep = np.ones(s.shape[-2:], bool) if mask is None else mask
        if causal:
            keep = keep & np.tril(np.ones(s.shape[-2:], bool))
        s = np.where(keep, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append(p / p.sum(-1, keepdims=True) @ V[..., sl])
    return np.concatenate(heads, axis=-1) @ params["w_o"]


@pytest.mark.parametrize("causal", [False, True])
def test_standard_layer_matches_explicit_formula(causal):
    layer = refattn.Attention(12, 3, causal=causal)
    params = layer.init(seed=1)
    x = np.random.default_rng(0).standard_normal((2, 6, 12))
    np.testing.assert_allclose(layer(params, x, backend="reference"),
                               _explicit_mha(params, x, x, 3, causal), rtol=1e-12, atol=1e-13)


def test_cross_attention_gradients_and_shapes():
    layer = refattn.Attention(8, 2, bias=True)
    params = layer.init(seed=2)
    rng = np.random.default_rng(1)
    xq, xkv = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 7, 8))
    y, pull = refattn.vjp(layer, params, xq, xkv, backend="reference")
    dparams, dxq, dxkv = pull(np.ones_like(y))
    assert y.shape == (3, 4, 8) and dxq.shape == xq.shape and dxkv.shape == xkv.shape
    assert set(dparams) == set(params)
    check_grads(layer, params, xq, xkv, backend="reference")


def test_num_params_and_flops():
    layer = refattn.Attention(64, 4)
    assert layer.num_params() == 4 * 64 * 64
    assert refattn.Attention(64, 4, bias=True).num_params() == 4 * 64 * 64 + 4 * 64
    L = 10
    projections = 2 * 64 * 64 * 4 * L            # q, k, v and output maps
    core = 2 * 4 * L * L * (16 + 16)             # q k^T and p v over 4 heads of 16
    assert layer.flops(L) == projections + core


def test_init_is_seeded_and_typed():
    layer = refattn.Attention(8, 2)
    a, b = layer.init(seed=3), layer.init(seed=3, dtype=np.float32)
    assert all(b[n].dtype == np.float32 for n in b)
    np.testing.assert_allclose(a["w_q"], b["w_q"], rtol=1e-6)
    assert not np.allclose(layer.init(seed=4)["w_q"], a["w_q"])


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((10, 3), {}, ValueError, "d_model=10 is not divisible by n_heads=3"),
    ((0, 1), {}, ValueError, "d_model must be a positive integer"),
    ((8, 2), {"projection": "fancy"}, ValueError, "projection must be one of"),
    ((8, 2), {"core": "fancy"}, ValueError, "core must be one of"),
    ((8, 2), {"causal": "yes"}, TypeError, "causal must be a bool"),
    ((8, 2), {"dropout": 0.1}, TypeError, r"got dropout=.*refattn's is dropout_p="),
    ((8, 2), {"droput_p": 0.1}, TypeError, "unexpected option"),
])
def test_bad_layer_settings(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        refattn.Attention(*args, **kwargs)


def test_bad_layer_inputs():
    layer = refattn.Attention(8, 2)
    params = layer.init()
    x = np.zeros((2, 5, 8))
    with pytest.raises(ValueError, match=r"xq must have shape \(\.\.\., L, d_model=8\)"):
        layer(params, np.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match="xkv has batch dimensions"):
        layer(params, x, np.zeros((3, 5, 8)))
    with pytest.raises(ValueError, match="params has keys"):
        layer({"w_q": params["w_q"]}, x)
    with pytest.raises(ValueError, match=r"params\['w_k'\] has shape"):
        layer({**params, "w_k": np.zeros((8, 4))}, x)
    with pytest.raises(TypeError, match=r"params\['w_q'\] has dtype float32"):
        layer({**params, "w_q": params["w_q"].astype(np.float32)}, x)
    with pytest.raises(TypeError, match="params must be a dict"):
        layer([1, 2], x)
    with pytest.raises(ValueError, match="mask of shape"):
        layer(params, x, mask=np.ones((4, 4), bool))
