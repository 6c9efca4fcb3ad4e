"""The default cases catch a negated mask and dropped causality; the default call passes causality."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refattn.verify as V  # noqa: E402
from refattn.verify import params as P  # noqa: E402
from refattn.verify.adapters import torch_keep  # noqa: E402

F = torch.nn.functional


class TimmStyleAttention(torch.nn.Module):
    """timm's ViT ``Attention`` as written there: fused ``qkv``, ``forward(x, attn_mask, is_causal)``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


TIMM_PARAMS = {"qkv.weight": P.packed_linear("w_q", "w_k", "w_v"),
               "qkv.bias": P.concat("b_q", "b_k", "b_v"),
               "proj.weight": P.linear_weight("w_o"), "proj.bias": P.same("b_o")}


def timm_factory(spec):
    if spec.cross:
        raise V.Unsupported("self-attention only")
    if spec.kv_heads != spec.n_heads:
        raise V.Unsupported("no grouped-query heads")
    return TimmStyleAttention(spec.d_model, spec.n_heads, qkv_bias=spec.bias,
                              proj_bias=spec.bias)


def test_timm_adapter_on_a_timm_style_class_passes():
    report = V.verify(V.timm_attention(TimmStyleAttention), "mha-standard")
    report.assert_()
    assert {c.case for c in report.not_run} == {
        "cross S=L+2, mask (L, S)", "cross S=L+2, mask (L, S) (empty rows)",
        "self causal GQA 2/1, key padding (B, S)"}
    compared = {c.case for c in report.compared}
    assert {"self, mask (L, S)", "self, key padding (B, S), bias", "self causal, mask (L, S)",
            "self, key padding (B, S) (empty rows)"} <= compared


def test_negated_keep_mask_fails_on_self_attention_cases():
    def negated(module, xq, xkv, mask, spec):
        if mask is None:
            return module(xq, is_causal=spec.causal)
        keep = torch.from_numpy(np.ascontiguousarray(torch_keep(mask, spec)))
        return module(xq, attn_mask=~keep)                       # the bug: True = masked out

    report = V.verify(V.Layer(timm_factory, TIMM_PARAMS, negated), "mha-standard",
                      dtypes=("float32",))
    assert not report.ok
    failed = {c.case for c in report.failures}
    assert {"self, mask (L, S)", "self, key padding (B, S), bias",
            "self causal, mask (L, S)"} <= failed
    # The unmasked cases pass: the failure points at the mask.
    assert not failed & {"self", "self causal, bias"}


def test_dropped_causality_fails():
    def no_causal(module, xq, xkv, mask, spec):
        keep = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask.numpy()))
        return module(xq, attn_mask=keep)                        # spec.causal forgotten

    report = V.verify(V.Layer(timm_factory, TIMM_PARAMS, no_causal), "mha-standard",
                      dtypes=("float32",))
    failed = {c.case for c in report.failures}
    assert {"self causal, bias", "self causal, mask (L, S)"} <= failed
    assert not failed & {"self", "self, mask (L, S)"}


class KeywordAttention(torch.nn.Module):
    """A correct module whose forward takes ``mask=`` and a causality keyword."""

    def __init__(self, spec, keyword="is_causal", ignore=False):
        super().__init__()
        self.h, self.keyword, self.ignore = spec.n_heads, keyword, ignore
        d, d_kv = spec.d_model, spec.kv_heads * spec.head_dim
        self.q = torch.nn.Linear(d, d, bias=spec.bias)
        self.k = torch.nn.Linear(d, d_kv, bias=spec.bias)
        self.v = torch.nn.Linear(d, d_kv, bias=spec.bias)
        self.o = torch.nn.Linear(d, d, bias=spec.bias)

    def attend(self, xq, xkv, mask, causal):
        xkv = xq if xkv is None else xkv

        def heads(x, n):
            B, T, _ = x.shape
            return x.reshape(B, T, n, -1).transpose(1, 2)

        q = heads(self.q(xq), self.h)
        k, v = (heads(f(xkv), self.k.out_features * self.h // self.q.out_features)
                for f in (self.k, self.v))
        k = k.repeat_interleave(self.h // k.shape[1], dim=1)
        v = v.repeat_interleave(self.h // v.shape[1], dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        L, S = s.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool) if mask is None else mask
        if causal and not self.ignore:
            keep = keep & torch.ones(L, S, dtype=torch.bool).tril()
        keep = torch.broadcast_to(keep, s.shape)
        p = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), -1) * keep
        B, H, L, dk = q.shape
        return self.o((p @ v).transpose(1, 2).reshape(B, L, H * dk))


class IsCausal(KeywordAttention):
    def forward(self, xq, xkv=None, mask=None, is_causal=False):
        return self.attend(xq, xkv, mask, is_causal)


class Causal(KeywordAttention):
    def forward(self, xq, xkv=None, *, mask=None, causal=False):
        return self.attend(xq, xkv, mask, causal)


LINEAR = {**{f"{n}.weight": P.linear_weight(f"w_{n}") for n in "qkvo"},
          **{f"{n}.bias": P.same(f"b_{n}") for n in "qkvo"}}


@pytest.mark.parametrize("cls", [IsCausal, Causal])
def test_default_call_passes_causality_by_the_modules_own_keyword(cls):
    # The module never reads spec.causal: only the default call tells it.
    report = V.verify(V.Layer(cls, LINEAR), "mha-standard", dtypes=("float64",))
    report.assert_()
    assert not report.not_run


def test_module_ignoring_its_causal_keyword_fails():
    report = V.verify(V.Layer(lambda s: IsCausal(s, ignore=True), LINEAR, name="ignores causal"),
                      "mha-standard", dtypes=("float64",))
    assert report.candidate == "ignores causal"
    failed = {c.case for c in report.failures}
    assert {"self causal, bias", "self causal, mask (L, S)",
            "self causal GQA 2/1, key padding (B, S)"} <= failed
    assert "self" not in failed


def test_default_call_reports_a_mask_keyword_it_cannot_use():
    report = V.verify(V.Layer(timm_factory, TIMM_PARAMS), "mha-standard", dtypes=("float32",))
    report.assert_()                                          # causal cases pass via is_causal
    notes = {c.case: c.note for c in report.not_run}
    assert "takes attn_mask=, whose convention differs" in notes["self, mask (L, S)"]
    assert {c.case for c in report.compared} == {"self", "self causal, bias"}
