"""The one-line adapters against the real modules: nn.MultiheadAttention, transformers, timm.

Tiny randomly initialised modules built from configs (no download).  The
transformers tests run where ``transformers`` imports (``.ci/requirements.txt``
pins it); timm needs ``torchvision``, whose wheels for torch 2.13 are CUDA
builds that cannot load against the CPU torch: see the skip reason.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

import refattn  # noqa: E402
import refattn.verify as V  # noqa: E402

EMPTY = {"cross S=L+2, mask (L, S) (empty rows)", "self, key padding (B, S) (empty rows)"}
GQA = "self causal GQA 2/1, key padding (B, S)"
CROSS = "cross S=L+2, mask (L, S)"


def _na(report):
    return {c.case: c.note for c in report.not_run}


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_both_layouts_with_key_padding(batch_first):
    report = V.verify(V.torch_multihead_attention(batch_first=batch_first), "mha-standard")
    report.assert_()
    assert set(_na(report)) == {GQA} and "no grouped-query" in _na(report)[GQA]
    # Key padding goes as key_padding_mask, including a sequence that is all padding.
    assert {"self, key padding (B, S), bias", "self, key padding (B, S) (empty rows)"} \
        <= {c.case for c in report.compared}
    assert report.candidate.startswith("torch.nn.MultiheadAttention")
    assert ("batch_first=False" in report.candidate) == (not batch_first)


def test_multihead_attention_mask_folded_into_attn_mask():
    report = V.verify(V.torch_multihead_attention(key_padding=False), "mha-standard",
                      dtypes=("float64",))
    report.assert_()


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pinned in "
                               ".ci/requirements.txt)")


def _hf_checks(report, extra_na=()):
    report.assert_()
    na = _na(report)
    assert EMPTY <= set(na) and set(na) <= EMPTY | {GQA, *extra_na}
    for case in EMPTY & set(na):
        assert "mean of the values" in na[case]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bert_self_and_cross_attention(implementation, transformers):
    report = V.verify(V.hf_bert_attention(attn_implementation=implementation), "mha-standard")
    _hf_checks(report)
    assert CROSS in {c.case for c in report.compared}               # BertCrossAttention
    assert {"db_q", "db_o", "dxkv"} <= {c.quantity for c in report.compared}


def test_hf_empty_rows_compared_on_their_output_under_uniform(transformers):
    # The additive finfo.min mask: the empty rows' output is the mean of the values, their
    # gradient is not the fill's, so the adapter declares masks_additively.
    empty = [c for c in refattn.get_variant("mha-standard").cases() if c.name in EMPTY]
    report = V.verify(V.hf_bert_attention(), "mha-standard", dtypes=("float64",), cases=empty,
                      empty_rows="uniform")
    report.assert_()
    assert {c.case for c in report.compared} == EMPTY
    assert report.comparisons == {case: "output" for case in EMPTY}
    assert all("adds its mask to the scores" in r for r in report.output_only.values())


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_gpt2_attention_fused_conv1d(implementation, transformers):
    report = V.verify(V.hf_gpt2_attention(attn_implementation=implementation), "mha-standard")
    _hf_checks(report)
    assert CROSS in {c.case for c in report.compared}               # q_attn + c_attn (d, 2 d)


def test_gpt2_attention_planted_scale_bug_fails(transformers):
    adapter = V.hf_gpt2_attention()

    def unscaled(spec):
        module = adapter.factory(spec)
        module.scaling = 1.0                                         # scale_attn_weights=False
        return module

    report = V.verify(dataclasses.replace(adapter, factory=unscaled), "mha-standard",
                      dtypes=("float32",))
    assert not report.ok and len({c.case for c in report.failures}) >= 6


def test_llama_attention_with_real_rotary_and_gqa(transformers):
    report = V.verify(V.hf_llama_attention(), "mha-rotary")
    report.assert_()
    na = _na(report)
    assert {"self causal, interleaved rotary", CROSS} <= set(na)
    assert "only half" in na["self causal, interleaved rotary"]
    assert "self-attention only" in na[CROSS]
    assert GQA in {c.case for c in report.compared}
    # Against the plain variant the adapter passes cos = 1, sin = 0.
    V.verify(V.hf_llama_attention(), "mha-standard", dtypes=("float64",)).assert_()


def test_llama_rotary_module_has_float32_accuracy(transformers):
    adapter = V.hf_llama_attention(module_rotary=True)
    V.verify(adapter, "mha-rotary", dtypes=("float32",)).assert_()
    report = V.verify(adapter, "mha-rotary", dtypes=("float64",))
    assert not report.ok
    assert all(c.note.startswith("float32-level error in a float64 run")
               for c in report.failures)


def test_timm_attention():
    try:
        import timm  # noqa: F401
    except Exception as exc:                                        # ImportError, RuntimeError
        pytest.skip(f"timm cannot be imported ({type(exc).__name__}: {exc}). It is left out of "
                    f".ci/requirements.txt: timm imports torchvision, and the torchvision wheel "
                    f"for torch 2.13 is a CUDA build that cannot load against the CPU torch. "
                    f"The adapter's logic is tested on a timm-style class in "
                    f"test_masking_bugs.py")
    report = V.verify(V.timm_attention(), "mha-standard")
    report.assert_()
    assert {CROSS, "cross S=L+2, mask (L, S) (empty rows)", GQA} == set(_na(report))
