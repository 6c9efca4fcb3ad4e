"""``verify(..., empty_rows=policy)``: one switch, two comparisons (``refattn.verify.empty_rows``).

Wherever the case's core has the option, the reference runs under the cores' own
``empty_rows=policy`` and every output and gradient is compared exactly; where the
option does not model the candidate (a core without it, a module that *adds* its
mask to the scores) only the empty rows' output is compared.  The report says which.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import refattn
import refattn.verify as V
from refattn.cores import get_core
from refattn.verify.adapters import LayerSpec, reject_unless, torch_keep
from refattn.verify.empty_rows import ADDITIVE, reference_case

torch = pytest.importorskip("torch")
nn = torch.nn

FILLS = {"uniform": lambda dtype: torch.finfo(dtype).min, "nan": lambda dtype: -math.inf}


def filled_sdpa(fill):
    """A hand-written core that fills masked scores with ``fill(dtype)``."""

    def attention(q, k, v, mask=None, causal=False, causal_align="upper_left"):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        L, S = s.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool)
        if causal:
            keep = keep.tril(0 if causal_align == "upper_left" else S - L)
        keep = keep if mask is None else keep & mask
        return s.masked_fill(~keep, fill(s.dtype)).softmax(-1) @ v

    return attention


def _empty_row_statuses(report):
    return {c.status for c in report.checks if "(empty rows)" in c.case}


def _empty_cases(variant):
    cases = [c for c in refattn.get_variant(variant).cases() if "empty" in c.name]
    assert cases
    return cases


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_core_candidate_passes_exactly_under_its_own_convention_only(policy):
    candidate = filled_sdpa(FILLS[policy])
    cases = _empty_cases("sdpa")
    same = V.verify(candidate, "sdpa", framework="torch", cases=cases, empty_rows=policy)
    assert _empty_row_statuses(same) == {"ok"}
    # The reference ran under the cores' option: the empty rows' gradients were compared.
    assert same.comparisons == {c.name: "exact" for c in cases} and same.output_only == {}
    assert {c.quantity for c in same.compared} >= {"out", "dq", "dk", "dv"}
    assert "exact (the reference under the cores' empty_rows option" in repr(same)
    for other in {"zero", "uniform", "nan"} - {policy}:
        report = V.verify(candidate, "sdpa", framework="torch", cases=cases, empty_rows=other)
        assert "FAIL" in _empty_row_statuses(report)
        assert set(report.conventions.values()) == {policy}     # and says which it follows


class FilledMHA(nn.Module):
    """Standard multi-head attention that masks its scores by ``spec.empty_rows``'s fill.

    ``additive``: the fill is *added* to the scores (Hugging Face's ``attention_mask``)
    instead of replacing them.
    """

    def __init__(self, spec, additive=False):
        super().__init__()
        reject_unless(spec, what="FilledMHA", cross=True)
        self.spec, self.additive = spec, additive
        d = spec.d_model
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=spec.bias) for _ in range(4))

    def forward(self, xq, xkv=None, mask=None):
        spec, H = self.spec, self.spec.n_heads
        xkv = xq if xkv is None else xkv
        split = (lambda x: x.view(*x.shape[:2], H, -1).transpose(1, 2))
        q, k, v = split(self.q(xq)), split(self.k(xkv)), split(self.v(xkv))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        keep = torch_keep(mask, spec)
        if keep is not None:
            keep = torch.from_numpy(np.ascontiguousarray(keep))
            fill = FILLS[spec.empty_rows](s.dtype)
            if self.additive:
                s = s + torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, fill)
            else:
                s = s.masked_fill(~keep, fill)
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(xq.shape)
        return self.o(o)


LINEAR = {**{f"{n}.weight": V.params.linear_weight(f"w_{n}") for n in "qkvo"},
          **{f"{n}.bias": V.params.same(f"b_{n}") for n in "qkvo"}}


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_layer_factory_reads_the_convention_from_the_spec(policy):
    cases = _empty_cases("mha-standard")
    report = V.verify(V.Layer(FilledMHA, params=LINEAR), "mha-standard", framework="torch",
                      dtypes=("float64",), cases=cases, empty_rows=policy)
    report.assert_()
    assert _empty_row_statuses(report) == {"ok"}
    assert set(report.comparisons.values()) == {"exact"}
    assert {c.quantity for c in report.compared} >= {"dw_q", "dw_k", "dw_v", "dxq"}


def test_additive_mask_is_detected_and_compared_on_its_output_when_declared():
    cases = _empty_cases("mha-standard")

    def additive(spec):
        return FilledMHA(spec, additive=True)

    # As a fill, the added finfo.min mask gives the uniform output, not the fill's gradient.
    strict = V.verify(V.Layer(additive, params=LINEAR), "mha-standard", framework="torch",
                      dtypes=("float64",), cases=cases, empty_rows="uniform")
    assert not strict.ok
    assert {c.quantity for c in strict.failures} & {"dw_q", "dw_k", "dxq"}
    assert "out" not in {c.quantity for c in strict.failures}
    assert strict.empty_row_gradients == [c.name for c in cases]
    assert "Layer(..., masks_additively=True)" in strict.explanation()
    # Declared, its empty rows' output is compared and their cotangent is 0.
    declared = V.verify(V.Layer(additive, params=LINEAR, masks_additively=True),
                        "mha-standard", framework="torch", dtypes=("float64",), cases=cases,
                        empty_rows="uniform")
    declared.assert_()
    assert declared.comparisons == {c.name: "output" for c in cases}
    assert declared.output_only == {c.name: ADDITIVE for c in cases}
    assert declared.to_dict()["comparisons"] == declared.comparisons
    assert "output only on the empty rows" in repr(declared)
    # ... which is no blanket pass: a module whose empty rows give 0 still fails them.
    mha = dataclasses.replace(V.torch_multihead_attention(), masks_additively=True)
    zero = V.verify(mha, "mha-standard", dtypes=("float64",), cases=cases, empty_rows="uniform")
    assert {c.quantity for c in zero.failures} == {"out"}
    assert zero.conventions == {c.name: "zero" for c in cases}


def test_spec_keeps_the_policy_out_of_the_core_options():
    layer = refattn.Attention(8, 2, causal_align="lower_right", empty_rows="nan")
    spec = LayerSpec.from_layer(layer)
    assert spec.empty_rows == "nan" and spec.core_options == {"causal_align": "lower_right"}
    assert LayerSpec.from_layer(refattn.Attention(8, 2)).empty_rows == "zero"


def test_reference_case_uses_the_cores_option_where_it_exists():
    case = refattn.get_variant("mha-standard").cases()[0]
    rebuilt, reason = reference_case(case, "uniform")
    assert reason is None and rebuilt.fn.core_options["empty_rows"] == "uniform"
    assert reference_case(case, "zero") == (case, None)
    core_case = refattn.get_variant("sdpa").cases()[0]
    rebuilt, reason = reference_case(core_case, "nan", get_core("sdpa"))
    assert reason is None and rebuilt.options["empty_rows"] == "nan"
    # No such option: the case stays as it is, and the reason is given.
    taylor = refattn.get_variant("mha-elementwise-taylor").cases()[0]
    assert reference_case(taylor, "nan") == (taylor, "the 'elementwise' core has no "
                                                     "empty-row policy")
    inner = refattn.get_variant("preconditioned-elementwise").cases()[0]
    same, reason = reference_case(inner, "uniform", get_core("preconditioned-elementwise"))
    assert same is inner and "has no empty-row policy" in reason
    assert reference_case(case, "uniform", additive=True) == (case, ADDITIVE)
    with pytest.raises(ValueError, match=r"empty_rows must be one of"):
        reference_case(case, "NaN")


def test_jax_adapter_compares_empty_rows_under_uniform():
    jax = pytest.importorskip("jax")
    cases = [c for c in refattn.get_variant("sdpa").cases()
             if c.name == "mask with empty row + causal"]
    report = V.verify(jax.nn.dot_product_attention, "sdpa", dtypes=("float32",), cases=cases,
                      empty_rows="uniform")
    report.assert_()
    assert {c.case for c in report.compared} == {"mask with empty row + causal"}
    assert report.comparisons == {"mask with empty row + causal": "exact"}
