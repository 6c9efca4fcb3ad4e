"""Parameter maps: rearrangements loading refattn weights into a candidate, gradients back."""

from __future__ import annotations

import numpy as np
import pytest

from refattn.verify import params as P


def _params(rng, d=4, bias=True):
    out = {f"w_{n}": rng.standard_normal((d, d)) for n in "qkvo"}
    if bias:
        out.update({f"b_{n}": rng.standard_normal(d) for n in "qkvo"})
    return out


def test_mha_packing_matches_torch_layout():
    rng = np.random.default_rng(0)
    p = _params(rng)
    x = rng.standard_normal((3, 4))
    packed_w = P.MHA_PARAMS["in_proj_weight"].to_candidate(p)
    packed_b = P.MHA_PARAMS["in_proj_bias"].to_candidate(p)
    assert packed_w.shape == (12, 4) and packed_b.shape == (12,)
    # torch computes x @ in_proj_weight.T + in_proj_bias, then chunks q, k, v.
    q, k, v = np.split(x @ packed_w.T + packed_b, 3, axis=-1)
    np.testing.assert_allclose(q, x @ p["w_q"] + p["b_q"])
    np.testing.assert_allclose(v, x @ p["w_v"] + p["b_v"])
    out_w = P.MHA_PARAMS["out_proj.weight"].to_candidate(p)
    np.testing.assert_allclose(x @ out_w.T, x @ p["w_o"])


@pytest.mark.parametrize("conv", [P.same("w_q"), P.linear_weight("w_q"),
                                  P.concat("b_q", "b_k", "b_v"),
                                  P.packed_linear("w_q", "w_k", "w_v"),
                                  P.column_concat("w_q", "w_k", "w_v")])
def test_round_trip_and_shape(conv):
    p = _params(np.random.default_rng(1))
    arr = conv.to_candidate(p)
    assert arr.shape == conv.shape_for({n: p[n].shape for n in p})
    back = conv.to_refattn(arr)
    assert sorted(back) == sorted(conv.names)
    for name, value in back.items():
        np.testing.assert_array_equal(value, p[name])


def test_resolve_drops_absent_biases_and_checks_coverage():
    names = ["w_q", "w_k", "w_v", "w_o"]                      # bias=False layer
    resolved = P.resolve_map(P.MHA_PARAMS, names, ["in_proj_weight", "out_proj.weight"])
    assert list(resolved) == ["in_proj_weight", "out_proj.weight"]
    assert list(P.resolve_map(None, names, names)) == names


@pytest.mark.parametrize("mapping, refattn_names, candidate_names, message", [
    (None, ["w_q"], ["q.weight"], r"\['q.weight'\] are not named like refattn's \['w_q'\]"),
    ({"q.weight": P.linear_weight("w_q")}, ["w_q"], ["q.weight", "extra"],
     r"candidate parameter\(s\) \['extra'\] have no entry"),
    ({"q.weight": P.linear_weight("w_q")}, ["w_q", "w_o"], ["q.weight"],
     r"missing \['w_o'\]"),
    ({"q.weight": P.linear_weight("w_q"), "q2": P.same("w_q")}, ["w_q"], ["q.weight", "q2"],
     r"mapped twice \['w_q'\]"),
    ({"q.weight": P.linear_weight("w_q")}, ["w_q"], [], r"does not have"),
    ({"in_proj_bias": P.concat("b_q", "b_k")}, ["b_q"], ["in_proj_bias"],
     r"refattn parameter\(s\) \['b_k'\]"),
])
def test_resolve_errors_name_the_parameter(mapping, refattn_names, candidate_names, message):
    with pytest.raises(ValueError, match=message):
        P.resolve_map(mapping, refattn_names, candidate_names)


def test_resolve_rejects_non_converters():
    with pytest.raises(TypeError, match=r"params\['q.weight'\] must be a converter"):
        P.resolve_map({"q.weight": "w_q"}, ["w_q"], ["q.weight"])


def test_column_concat_is_a_fused_conv1d_weight():
    p = _params(np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal((3, 4))
    w = P.column_concat("w_q", "w_k", "w_v").to_candidate(p)           # (d, 3 d), y = x @ w
    q, k, v = np.split(x @ w, 3, axis=-1)
    np.testing.assert_allclose(k, x @ p["w_k"])
    np.testing.assert_allclose(v, x @ p["w_v"])


def test_optional_bias_is_zero_when_refattn_has_none():
    conv = P.optional(P.concat("b_q", "b_k"))
    names = ["w_q", "w_k"]
    resolved = P.resolve_map({"w": P.column_concat("w_q", "w_k"), "b": conv}, names, ["w", "b"])
    assert resolved["b"] is P.ZERO
    np.testing.assert_array_equal(P.ZERO.to_candidate({}, (8,)), np.zeros(8))
    assert P.ZERO.to_refattn(np.ones(8)) == {}                        # its gradient is dropped
    # With the biases present it is the converter itself.
    with_bias = P.resolve_map({"b": conv, "w": P.column_concat("w_q", "w_k")},
                              names + ["b_q", "b_k"], ["w", "b"])
    assert with_bias["b"].kind == "concat"
    # Half present is still an error.
    with pytest.raises(ValueError, match=r"refattn parameter\(s\) \['b_k'\]"):
        P.resolve_map({"b": conv, "w": P.column_concat("w_q", "w_k")}, names + ["b_q"],
                      ["w", "b"])
