"""Edge inputs of the public API, one row each: a correct result or a clear error by its message.

Every observation of the "trust at the edges" probe (issue 13) is a row here, rerun as
written; the command-line rows live in tests/cli/test_edge_inputs.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import assert_close

R = np.random.default_rng(0).standard_normal


def _qkv():
    return R((1, 2, 3, 4)), R((1, 2, 5, 4)), R((1, 2, 5, 4))


def _with(array, index, value):
    out = array.copy()
    out[index] = value
    return out


def _nan_row_numba():
    q, k, v = _qkv()
    o, lse = refattn.sdpa(_with(q, (0, 0, 1, 0), np.nan), k, v, backend="numba", return_lse=True)
    assert np.isnan(o[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    assert np.isfinite(o[0, 0, [0, 2]]).all() and np.isfinite(o[0, 1]).all()


def _nan_key_auto():
    q, k, v = _qkv()
    o = refattn.sdpa(q, _with(k, (0, 1, 2, 3), np.nan), v)           # backend="auto": numba
    assert np.isnan(o[0, 1]).all() and np.isfinite(o[0, 0]).all()


def _nan_bias_numba():
    q, k, v = _qkv()
    bias = _with(np.zeros((1, 2, 3, 5)), (0, 0, 2, 1), np.nan)
    o = refattn.sdpa(q, k, v, bias=bias, backend="numba")
    assert np.isnan(o[0, 0, 2]).all() and np.isfinite(o[0, 0, :2]).all()


def _nan_token_layer():
    layer = refattn.Attention(8, 2, causal=True)
    params = layer.init(seed=0)
    x = _with(R((1, 4, 8)), (0, 2, 5), np.nan)
    y = layer(params, x)                                             # token 2 reaches 2 and 3
    assert np.isfinite(y[0, :2]).all() and np.isnan(y[0, 2:]).all()


def _nan_quaternion_and_elementwise():
    q, k, v = (R((1, 2, 3, 4, 2)) for _ in range(3))
    o = refattn.quaternion_attention(_with(q, (0, 0, 1, 2, 0), np.nan), k, v, backend="numba")
    assert np.isnan(o[0, 0, 1]).all() and np.isfinite(o[0, 1]).all()
    q, k, v = _qkv()
    o = refattn.elementwise_attention(_with(q, (0, 0, 1, 0), np.nan), k, v, backend="numba")
    assert np.isnan(o[0, 0, 1, 0]) and np.isfinite(o[0, 0, 1, 1:]).all()


def _nan_forward_backward_agree():
    q, k, v = _qkv()
    q = _with(q, (0, 0, 1, 0), np.nan)
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, backend="numba")
    dq, dk, dv = pullback(np.ones_like(o))
    assert np.isnan(o[0, 0, 1]).all() and np.isnan(dq[0, 0, 1]).all()
    assert np.isfinite(dq[0, 1]).all() and np.isfinite(dk[0, 1]).all()


def _zero_keys_reference():
    q, k, v = R((1, 2, 3, 4)), R((1, 2, 0, 4)), R((1, 2, 0, 4))
    o, lse = refattn.sdpa(q, k, v, backend="reference", return_lse=True)
    assert o.shape == (1, 2, 3, 4) and not o.any() and np.all(lse == -np.inf)


def _zero_batch():
    q, k, v = R((0, 2, 3, 4)), R((0, 2, 5, 4)), R((0, 2, 5, 4))
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v)
    assert o.shape == (0, 2, 3, 4)
    assert [g.shape for g in pullback(o)] == [q.shape, k.shape, v.shape]


def _zero_features_explicit_scale():
    q, k, v = R((1, 2, 3, 0)), R((1, 2, 5, 0)), R((1, 2, 5, 4))
    o = refattn.sdpa(q, k, v, scale=1.0)                             # scores all 0: mean of v
    np.testing.assert_allclose(o, np.broadcast_to(v.mean(axis=2, keepdims=True), o.shape))


def _big_endian_auto():
    native = _qkv()
    swapped = [x.astype(">f8") for x in native]
    o = refattn.sdpa(*swapped)
    assert o.dtype.isnative
    np.testing.assert_allclose(o, refattn.sdpa(*native, backend="reference"), rtol=1e-12)


def _taylor_empty_queries():
    q, k, v = R((1, 2, 0, 4)), R((1, 2, 5, 4)), R((1, 2, 5, 4))
    o, pullback = refattn.vjp(refattn.elementwise_attention, q, k, v, order=2, causal=True)
    assert o.shape == (1, 2, 0, 4)
    dq, dk, dv = pullback(o)
    assert dq.shape == q.shape and not dk.any() and not dv.any()


def _state_with_int_batch():
    state = refattn.elementwise_state(2, 2, 4, 4)
    assert state.shift.shape == (2, 2, 4)


def _numpy_scalar_scales():
    q, k, v = _qkv()
    expected = refattn.sdpa(q, k, v, scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5)):
        np.testing.assert_allclose(refattn.sdpa(q, k, v, scale=scale), expected)
    np.testing.assert_allclose(refattn.sdpa(q, k, v, scale=np.int64(1)),
                               refattn.sdpa(q, k, v, scale=1.0))
    qq, kk, vv = (R((1, 2, 3, 4, 2)) for _ in range(3))
    refattn.quaternion_attention(qq, kk, vv, scale=np.float32(0.5))
    refattn.elementwise_attention(q, k, v, scale=np.float32(0.5))
    layer = refattn.Attention(8, 2, scale=np.float64(0.25))
    layer(layer.init(), R((1, 3, 8)))


def _listings_are_callable():
    assert "sdpa" in refattn.cores() and "standard" in refattn.projections()


def _layer_gradients_keep_parameter_dtype():
    layer = refattn.Attention(8, 2)
    params = layer.init(seed=0)
    y, pullback = refattn.vjp(layer, params, R((2, 3, 8)))
    dparams, dx = pullback(np.ones(y.shape, np.float32))
    assert {g.dtype for g in dparams.values()} == {np.dtype(np.float64)}
    assert dx.dtype == np.float64


def _checker_refuses_inf_against_finite():
    for actual, expected in (([0.0], [np.inf]), ([-np.inf], [np.inf]), ([1.0], [np.nan]),
                             ([np.nan], [1.0])):
        with pytest.raises(AssertionError, match="differ"):
            assert_close(np.array(actual), np.array(expected), "float64")
    assert_close(np.array([np.inf, np.nan]), np.array([np.inf, np.nan]), "float64")


def _layer_pullback_wrong_cotangent():
    layer = refattn.Attention(8, 2)
    _, pullback = refattn.vjp(layer, layer.init(), R((2, 3, 8)))
    pullback(np.ones((2, 3, 7)))


def _core_pullback_wrong_cotangent():
    _, pullback = refattn.vjp(refattn.sdpa, *_qkv())
    pullback(np.ones((1, 2, 3, 5)))


def _cotangent_of_ints():
    _, pullback = refattn.vjp(refattn.elementwise_attention, *_qkv())
    pullback(np.ones((1, 2, 3, 4), dtype=np.int32))


def _default_scale_of_no_features():
    refattn.sdpa(R((1, 2, 3, 0)), R((1, 2, 5, 0)), R((1, 2, 5, 4)))


def _assert_close_int_dtype():
    assert_close(np.zeros(1), np.zeros(1), "int32")


def _infinite_scale():
    refattn.sdpa(*_qkv(), scale=np.float32("inf"))


def _state_with_bad_batch():
    refattn.elementwise_state("2", 2, 4, 4)


def _heads_without_kv_heads():
    refattn.sdpa(R((1, 2, 3, 4)), R((1, 0, 5, 4)), R((1, 0, 5, 4)))


def _packed(cu_q, cu_k):
    q, k, v = R((4, 2, 3)), R((5, 2, 3)), R((5, 2, 3))                # (total, H, E)
    return refattn.sdpa(q, k, v, cu_seqlens_q=np.array(cu_q), cu_seqlens_k=np.array(cu_k))


def _empty_sequences_packed():
    o = _packed([0, 0, 4, 4], [0, 2, 2, 5])     # no query; no key (rows give 0); no query
    assert o.shape == (4, 2, 3) and not o.any()


def _no_key_left_padded():
    q, k, v = _qkv()
    o, lse = refattn.sdpa(q, k, v, key_value_seq_lengths=np.array([0]), return_lse=True)
    assert not o.any() and np.isneginf(lse).all()


def _score_mod_without_derivative():
    q, k, v = _qkv()
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, score_mod=lambda s, b, h, i, j: 2 * s)
    pullback(np.ones_like(o))


# id -> (call, None for "returns normally" or (exception type, message pattern))
EDGES = {
    "numba keeps a NaN query row NaN, and its lse": (_nan_row_numba, None),
    "auto (numba) NaN key poisons only its head": (_nan_key_auto, None),
    "numba NaN bias poisons only its row": (_nan_bias_numba, None),
    "layer: a NaN token reaches only the queries that see it": (_nan_token_layer, None),
    "quaternion and element-wise keep NaN": (_nan_quaternion_and_elementwise, None),
    "numba forward and backward agree on NaN": (_nan_forward_backward_agree, None),
    "S = 0 on the reference": (_zero_keys_reference, None),
    "batch of size 0": (_zero_batch, None),
    "E = 0 with an explicit scale": (_zero_features_explicit_scale, None),
    "big-endian arrays, backend auto": (_big_endian_auto, None),
    "element-wise Taylor with L = 0": (_taylor_empty_queries, None),
    "elementwise_state(2, 2, 4, 4)": (_state_with_int_batch, None),
    "NumPy scalar scales everywhere": (_numpy_scalar_scales, None),
    "refattn.cores() and refattn.projections()": (_listings_are_callable, None),
    "layer gradients have the parameters' dtype": (_layer_gradients_keep_parameter_dtype, None),
    "assert_close refuses inf against finite": (_checker_refuses_inf_against_finite, None),
    "layer pullback, wrong cotangent shape": (
        _layer_pullback_wrong_cotangent,
        (ValueError, r"cotangent has shape \(2, 3, 7\), expected the output shape "
                     r"\(\.\.\., L, d_model\) = \(2, 3, 8\)")),
    "sdpa pullback, wrong cotangent shape": (
        _core_pullback_wrong_cotangent, (ValueError, r"cotangent has shape \(1, 2, 3, 5\)")),
    "integer cotangent": (_cotangent_of_ints, (TypeError, "cotangent must be a real floating")),
    "E = 0 with the default scale": (_default_scale_of_no_features,
                                     (ValueError, r"feature size E = 0.*pass scale=")),
    "assert_close with dtype int32": (_assert_close_int_dtype,
                                      (ValueError, "dtype must be one of .* got 'int32'")),
    "infinite scale": (_infinite_scale, (ValueError, "scale must be a finite real number")),
    "elementwise_state with a string batch": (_state_with_bad_batch,
                                              (TypeError, "batch_shape must be a tuple")),
    "query heads without kv heads": (_heads_without_kv_heads,
                                     (ValueError, "does not divide the 2 heads of q")),
    "packed sequences without queries or keys": (_empty_sequences_packed, None),
    "padded batch element without keys": (_no_key_left_padded, None),
    "cu_seqlens_q decreasing": (lambda: _packed([0, 3, 2, 4], [0, 1, 2, 5]),
                                (ValueError, r"cu_seqlens_q must be non-decreasing")),
    "cu_seqlens_k short of the key count": (
        lambda: _packed([0, 4], [0, 4]),
        (ValueError, r"cu_seqlens_k must end at the total token count k.shape\[0\] = 5")),
    "cu_seqlens of floats": (lambda: _packed([0.0, 4.0], [0, 5]),
                             (TypeError, "cu_seqlens_q must be an integer array")),
    "query_seq_lengths beyond L": (lambda: refattn.sdpa(*_qkv(), query_seq_lengths=np.array([4])),
                                   (ValueError, r"query_seq_lengths must lie in \[0, L = 3\]")),
    "mask_mod not callable": (lambda: refattn.sdpa(*_qkv(), mask_mod=np.ones((3, 5), bool)),
                              (TypeError, "mask_mod must be None or a callable")),
    "score_mod differentiated without score_mod_grad": (
        _score_mod_without_derivative, (ValueError, "needs its derivative: pass score_mod_grad")),
    "window side below -1": (
        lambda: refattn.sdpa(*_qkv(), window=(-2, 1)),
        (ValueError, r"window must be None or \(left, right\) with ints >= -1")),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_input(name):
    call, error = EDGES[name]
    if error is None:
        call()
    else:
        with pytest.raises(error[0], match=error[1]):
            call()


@pytest.mark.parametrize("call, message", [
    (lambda q: refattn.sdpa(q, q, q, is_causal=True), r"sdpa\(\) got is_causal=.*refattn's is causal="),
    (lambda q: refattn.sdpa(q, q, q, attn_mask=None), r"got attn_mask=.*mask= .*or bias="),
    (lambda q: refattn.vjp(refattn.sdpa, q, q, q, window_size=(1, 1)), r"refattn's is window="),
    (lambda q: refattn.elementwise_attention(q, q, q, is_causal=True), "causal="),
    (lambda q: refattn.Attention(8, 2, is_causal=True), r"Attention.__init__\(\) got is_causal="),
    (lambda q: refattn.Attention(4, 2)(refattn.Attention(4, 2).init(), q[0],
                                      key_padding_mask=None), "from_torch_key_padding_mask"),
])
def test_framework_keywords_name_refattns(call, message):
    with pytest.raises(TypeError, match=message):
        call(R((1, 2, 3, 4)))
