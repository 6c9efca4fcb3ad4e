"""Rotary position embeddings: finite differences, PyTorch ports of HF Llama / GPT-J, the layer option."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.backends import cupy_support as cs
from refattn.rotary import apply_rotary, apply_rotary_backward
from refattn.testing import assert_close, check_grads

OPTIONS = [
    {},
    {"interleaved": True},
    {"rotary_dim": 4, "base": 100.0},
    {"rotary_dim": 2, "interleaved": True, "offset": 5},
    {"offset": 3, "base": 500000.0},
]


def _x(rng, shape=(2, 3, 5, 8), dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("options", OPTIONS)
def test_finite_differences(options):
    check_grads(apply_rotary, _x(np.random.default_rng(0)), **options)


def test_finite_differences_with_explicit_positions():
    rng = np.random.default_rng(1)
    positions = rng.integers(0, 50, size=(2, 1, 5))                 # per sequence, (B, 1, T)
    check_grads(apply_rotary, _x(rng), positions=positions, interleaved=True)


@pytest.mark.parametrize("options", OPTIONS)
def test_backward_is_the_transpose(options):
    rng = np.random.default_rng(2)
    x, w = _x(rng), _x(rng)
    # <w, R x> == <R^T w, x> for the linear map R.
    lhs = np.sum(w * apply_rotary(x, **options))
    rhs = np.sum(apply_rotary_backward(w, **options) * x)
    assert lhs == pytest.approx(rhs, rel=1e-13)
    _, pullback = refattn.vjp(apply_rotary, x, **options)
    (dx,) = pullback(w)
    np.testing.assert_array_equal(dx, apply_rotary_backward(w, **options))


def test_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(3)
    q, k = _x(rng, (1, 8)), _x(rng, (1, 8))
    def score(i, j, interleaved):
        rq = apply_rotary(q, offset=i, interleaved=interleaved)
        rk = apply_rotary(k, offset=j, interleaved=interleaved)
        return float((rq @ rk.T)[0, 0])

    for interleaved in (False, True):
        assert score(7, 3, interleaved) == pytest.approx(score(4, 0, interleaved), rel=1e-12)
        assert score(7, 3, interleaved) != pytest.approx(score(3, 7, interleaved), rel=1e-3)


def test_float32_rounds_angles_once():
    rng = np.random.default_rng(4)
    x = _x(rng, (40, 8))
    y32 = apply_rotary(x.astype(np.float32), offset=1000)
    assert y32.dtype == np.float32
    assert_close(y32, apply_rotary(x.astype(np.float32).astype(np.float64), offset=1000),
                 "float32")


@pytest.mark.parametrize("style, rotary_dim, offset", [("half", None, 0), ("half", 4, 2),
                                                       ("interleaved", None, 3),
                                                       ("interleaved", 2, 0)])
def test_matches_pytorch_ports_of_llama_and_gptj(style, rotary_dim, offset):
    torch = pytest.importorskip("torch")
    from tests.verify.torch_models import rotary

    rng = np.random.default_rng(5)
    x = _x(rng)
    expected = rotary(torch.from_numpy(x), style, 500.0, rotary_dim, offset).numpy()
    got = apply_rotary(x, base=500.0, rotary_dim=rotary_dim, offset=offset,
                       interleaved=style == "interleaved")
    assert_close(got, expected, "float64")


def test_hf_llama_apply_rotary_pos_emb():
    """Against transformers' own apply_rotary_pos_emb, where transformers imports."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from refattn.verify.model_adapters import llama_rotary_cos_sin

    rng = np.random.default_rng(6)
    q, k = _x(rng), _x(rng, (2, 1, 5, 8))
    cos, sin = llama_rotary_cos_sin(torch, torch.arange(5)[None], 8, 10000.0,
                                    torch.zeros((), dtype=torch.float64))
    q_hf, k_hf = llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    assert_close(apply_rotary(q), q_hf.numpy(), "float64")
    assert_close(apply_rotary(k), k_hf.numpy(), "float64")


def test_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(7)
    x = _x(rng)
    for options in OPTIONS:
        y = apply_rotary(xps.asarray(x), **options)
        assert_close(np.asarray(y), apply_rotary(x, **options), "float64")
        dx = apply_rotary_backward(xps.asarray(x), **options)
        assert_close(np.asarray(dx), apply_rotary_backward(x, **options), "float64")


@pytest.mark.skipif(not cs.available(), reason="needs CuPy and a CUDA device")
def test_cupy_matches_numpy():
    cp = cs.cupy()
    x = _x(np.random.default_rng(8))
    for options in OPTIONS:
        assert_close(cp.asnumpy(apply_rotary(cp.asarray(x), **options)),
                     apply_rotary(x, **options), "float64")


@pytest.mark.parametrize("kwargs", [
    {"rotary": "half"},
    {"rotary": "interleaved", "rotary_dim": 2, "rotary_base": 50.0, "bias": True,
     "causal": True},
    {"rotary": "half", "kv_heads": 1, "causal": True},
])
def test_layer_finite_differences(kwargs):
    rng = np.random.default_rng(9)
    layer = refattn.Attention(8, 2, **kwargs)
    params, x = layer.init(seed=1), rng.standard_normal((2, 5, 8))
    check_grads(layer, params, x)
    check_grads(layer, params, x, rng.standard_normal((2, 6, 8)),
                mask=rng.random((2, 1, 1, 6)) > 0.3)


def test_layer_rotates_queries_and_keys_after_projection():
    rng = np.random.default_rng(10)
    layer = refattn.Attention(8, 2, rotary="half", causal=True)
    plain = refattn.Attention(8, 2, causal=True)
    params, x = layer.init(seed=2), rng.standard_normal((1, 6, 8))
    def heads(w):
        return np.swapaxes((x @ w).reshape(1, 6, 2, 4), 1, 2)        # (1, H, L, d_k)

    q, k = apply_rotary(heads(params["w_q"])), apply_rotary(heads(params["w_k"]))
    o = refattn.sdpa(q, k, heads(params["w_v"]), causal=True)
    expected = np.swapaxes(o, 1, 2).reshape(1, 6, 8) @ params["w_o"]
    assert_close(layer(params, x), expected, "float64")
    assert not np.allclose(layer(params, x), plain(params, x))


def test_layer_numba_backend_matches_reference():
    layer = refattn.Attention(8, 2, rotary="interleaved", causal=True, kv_heads=1)
    params = layer.init(seed=3)
    x = np.random.default_rng(11).standard_normal((2, 7, 8))
    if "numba" not in refattn.available_backends():
        pytest.skip("numba backend unavailable")
    y, pull = refattn.vjp(layer, params, x, backend="numba")
    y_ref, pull_ref = refattn.vjp(layer, params, x, backend="reference")
    assert_close(y, y_ref, "float64")
    g, g_ref = pull(np.ones_like(y)), pull_ref(np.ones_like(y))
    for name in g_ref[0]:
        assert_close(g[0][name], g_ref[0][name], "float64")
    assert_close(g[1], g_ref[1], "float64")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rotary_dim": 3}, ValueError, "rotary_dim must be an even integer in \\[2, D=8\\]"),
    ({"rotary_dim": 10}, ValueError, "rotary_dim must be an even integer"),
    ({"base": 0.0}, ValueError, "base must be a positive number"),
    ({"interleaved": 1}, TypeError, "interleaved must be a bool"),
    ({"offset": 1.5}, TypeError, "offset must be an integer"),
    ({"positions": np.arange(4)}, ValueError, r"positions must broadcast to x.shape\[:-1\]"),
    ({"positions": np.arange(5), "offset": 2}, ValueError, "pass positions or offset"),
    ({"positions": np.ones(5, dtype=bool)}, TypeError, "positions must be an integer or float"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_rotary(np.zeros((5, 8)), **kwargs)


def test_bad_inputs_and_layer_options():
    with pytest.raises(TypeError, match="x must be a real floating-point array"):
        apply_rotary(np.zeros((5, 8), dtype=np.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(..., T, D\)"):
        apply_rotary(np.zeros(8))
    with pytest.raises(TypeError, match="dy must be a real floating-point array"):
        apply_rotary_backward(np.zeros((5, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="rotary must be None or one of"):
        refattn.Attention(8, 2, rotary="neox")
    with pytest.raises(ValueError, match="rotary_dim must be an even integer in \\[2, head_dim=4\\]"):
        refattn.Attention(8, 2, rotary="half", rotary_dim=6)
    with pytest.raises(ValueError, match="rotary_base must be a positive number"):
        refattn.Attention(8, 2, rotary="half", rotary_base=-1.0)
    with pytest.raises(ValueError, match="rotary needs real-valued heads"):
        refattn.Attention(16, 2, projection="quaternion", core="shared", rotary="half")
    with pytest.raises(ValueError, match="kv_heads must be a positive integer dividing n_heads=4"):
        refattn.Attention(8, 4, kv_heads=3)
