"""The layer variants' test cases cover masking and causality; the public case builder; refattn.masks."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import masks
from refattn.catalog import EMPTY_ROWS, core_case, layer_case

LAYER_VARIANTS = sorted(n for n, v in refattn.variants().items() if v.kind == "layer")


def _facts(case):
    """(self-attention, mask kind, causal, GQA, has empty rows) of a layer case."""
    layer, xq, rest = case.fn, case.arrays[1], case.arrays[2:]
    L = xq.shape[-2]
    S = rest[0].shape[-2] if rest else L
    mask = case.options.get("mask")
    kind = None if mask is None else ("key padding" if mask.ndim == 4 and mask.shape[1:3] == (1, 1)
                                      and mask.shape[0] == xq.shape[0] else "general")
    causal = layer.config.causal
    gqa = layer.config.options.get("kv_heads", layer.config.n_heads) < layer.config.n_heads
    return not rest, kind, causal, gqa, masks.empty_rows(mask, causal, L, S)


@pytest.mark.parametrize("name", LAYER_VARIANTS)
def test_every_layer_variant_covers_masks_causality_and_gqa(name):
    variant = refattn.get_variant(name)
    facts = [_facts(c) for c in variant.cases()]
    full = [f for f in facts if not f[4]]                   # without empty rows
    # Masked self-attention: a self-attention-only module cannot skip every masked case.
    assert any(self_ and kind for self_, kind, *_ in full)
    # A key-padding mask (B, 1, 1, S), one row of keys per sequence, on self-attention.
    assert any(self_ and kind == "key padding" for self_, kind, *_ in full)
    # Causal alone and causal with a mask.
    assert any(causal and not kind for _, kind, causal, *_ in full)
    assert any(causal and kind for _, kind, causal, *_ in full)
    if name != "mha-elementwise-taylor":                    # its core honours key masks only
        assert any(self_ and kind == "general" for self_, kind, *_ in full)
    if "kv_heads" in variant.cases()[0].fn.scheme.options:              # GQA where allowed
        assert any(gqa for *_, gqa, _ in full)


@pytest.mark.parametrize("name", LAYER_VARIANTS)
def test_empty_row_cases_are_separate_and_labelled(name):
    cases = refattn.get_variant(name).cases()
    for case in cases:
        assert _facts(case)[4] == case.name.endswith(EMPTY_ROWS), case.name
    assert sum(c.name.endswith(EMPTY_ROWS) for c in cases) == 2
    assert len({c.name for c in cases}) == len(cases)


def test_rotary_variant_covers_both_conventions_and_partial_rotary():
    layers = [c.fn for c in refattn.get_variant("mha-rotary").cases()]
    styles = {(la.rotary_options["rotary"], la.rotary_options["rotary_dim"] < 4) for la in layers}
    assert styles == {("half", False), ("interleaved", False), ("half", True)}


def test_layer_case_builder():
    rng = np.random.default_rng(0)
    layer = refattn.Attention(8, 2, causal=True, kv_heads=1)
    x, xkv = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 6, 8))
    padding = np.array([[True] * 6, [True] * 4 + [False] * 2])
    case = layer_case(layer, x, xkv, key_padding=padding, mask=np.ones((5, 6), bool))
    assert case.name == "cross, masked" and case.options["mask"].shape == (2, 1, 5, 6)
    np.testing.assert_array_equal(case.run(), layer(case.arrays[0], x, xkv,
                                                    mask=case.options["mask"]))
    same = layer_case(layer, x, params=case.arrays[0], name="mine")
    assert same.name == "mine" and same.options == {} and same.arrays[0] is case.arrays[0]
    assert layer_case(layer, x, seed=1).arrays[0]["w_q"].dtype == np.float64
    with pytest.raises(TypeError, match="layer must be a refattn.Attention"):
        layer_case(refattn.sdpa, x)
    with pytest.raises(ValueError, match=r"key_padding must have shape \(B, S=5\)"):
        layer_case(layer, x, key_padding=np.ones((2, 6), bool))
    with pytest.raises(TypeError, match="key_padding must be a boolean"):
        layer_case(layer, x, key_padding=np.ones((2, 5)))
    with pytest.raises(TypeError, match="xq must be a real floating-point array"):
        layer_case(layer, x.astype(int))


def test_core_case_builder():
    q = np.random.default_rng(1).standard_normal((1, 2, 3, 4))
    case = core_case(refattn.sdpa, q, q, q, causal=True, name="c")
    assert case.options == {"causal": True}
    np.testing.assert_array_equal(case.run(), refattn.sdpa(q, q, q, causal=True))
    with pytest.raises(TypeError, match="fn must be a refattn function with a backward pass"):
        core_case(np.add, q, q)


def test_mask_converters_round_trip():
    keep = np.array([[True, True, False], [True, False, False]])[:, None, None, :]
    assert masks.is_key_padding(keep) and not masks.is_key_padding(np.ones((3, 3), bool))
    padding = masks.to_torch_key_padding_mask(keep)
    np.testing.assert_array_equal(masks.from_torch_key_padding_mask(padding), keep)
    np.testing.assert_array_equal(masks.to_torch_key_padding_mask(keep[:1, 0, 0], batch=2),
                                  [[False, False, True]] * 2)
    general = np.random.default_rng(2).random((4, 3)) > 0.5
    np.testing.assert_array_equal(masks.from_torch_attn_mask(masks.to_torch_attn_mask(general))[0],
                                  general)
    hf = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(masks.from_hf_padding_mask(hf), keep)
    additive = masks.to_hf_additive_mask(general, np.float64)
    assert additive.shape == (1, 1, 4, 3) and set(np.unique(additive)) <= {0.0,
                                                                          np.finfo(np.float64).min}
    np.testing.assert_array_equal(masks.from_hf_additive_mask(additive)[0, 0], general)


def test_combined_keep_and_empty_rows():
    assert masks.combined_keep(None, False, 3, 3) is None
    tri = masks.combined_keep(None, True, 3, 3)
    np.testing.assert_array_equal(tri, np.tril(np.ones((3, 3), bool)))
    assert not masks.empty_rows(None, True, 3, 3)
    assert masks.empty_rows(None, True, 4, 2, "lower_right")      # L > S: first rows see nothing
    only_last = np.zeros((3, 3), bool)
    only_last[:, -1] = True
    assert masks.empty_rows(only_last, True, 3, 3)                # row 0 keeps no key
    assert not masks.empty_rows(only_last, False, 3, 3)


def test_mask_converter_errors():
    with pytest.raises(ValueError, match="needs a keep-mask on keys only"):
        masks.to_torch_key_padding_mask(np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="must be a boolean keep-mask"):
        masks.to_torch_attn_mask(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, S\)"):
        masks.from_hf_padding_mask(np.ones(3))
    with pytest.raises(TypeError, match="an additive mask is a float array"):
        masks.from_hf_additive_mask(np.ones((1, 1, 2, 2), bool))
