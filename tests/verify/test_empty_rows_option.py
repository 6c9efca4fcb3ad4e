"""The reference under a framework's empty-row convention, gradients included.

``cases=under_empty_rows(cases, policy)`` runs the reference with the cores' option
``empty_rows=policy``, so a candidate is held to that convention's exact gradients
(``verify(..., empty_rows=)`` alone compares the empty rows' output and zeroes their
cotangent, ``tests/verify/test_report.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
import refattn.verify as V
from refattn.verify.adapters import (
    LayerSpec,
    reject_unless,
    torch_keep,
    under_empty_rows,
)

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


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_core_candidate_passes_under_its_own_convention_only(policy):
    candidate = filled_sdpa(FILLS[policy])
    cases = [c for c in refattn.get_variant("sdpa").cases() if "empty" in c.name]
    assert cases
    same = V.verify(candidate, "sdpa", framework="torch", cases=under_empty_rows(cases, policy))
    assert _empty_row_statuses(same) == {"ok"}
    assert {c.quantity for c in same.compared} >= {"out", "dq", "dk", "dv"}
    for other in {"zero", "uniform", "nan"} - {policy}:
        report = V.verify(candidate, "sdpa", framework="torch",
                          cases=under_empty_rows(cases, other))
        assert "FAIL" in _empty_row_statuses(report)


class FilledMHA(nn.Module):
    """Standard multi-head attention whose softmax fills masked scores (spec.empty_rows)."""

    def __init__(self, spec):
        super().__init__()
        reject_unless(spec, what="FilledMHA", cross=True)
        self.spec = spec
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
            s = s.masked_fill(~torch.from_numpy(np.ascontiguousarray(keep)),
                              FILLS[spec.empty_rows](s.dtype))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(xq.shape)
        return self.o(o)


LINEAR = {**{f"{n}.weight": V.params.linear_weight(f"w_{n}") for n in "qkvo"},
          **{f"{n}.bias": V.params.same(f"b_{n}") for n in "qkvo"}}


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_layer_factory_reads_the_convention_from_the_spec(policy):
    cases = refattn.get_variant("mha-standard").cases()
    strict = V.verify(V.Layer(FilledMHA, params=LINEAR), "mha-standard", framework="torch",
                      dtypes=("float64",), cases=under_empty_rows(cases, policy))
    strict.assert_()
    assert _empty_row_statuses(strict) == {"ok"}
    # verify's own switch hands the convention to the factory too (spec.empty_rows).
    switch = V.verify(V.Layer(FilledMHA, params=LINEAR), "mha-standard", framework="torch",
                      dtypes=("float64",), empty_rows=policy)
    switch.assert_()


def test_spec_keeps_the_policy_out_of_the_core_options():
    layer = refattn.Attention(8, 2, causal_align="lower_right", empty_rows="nan")
    spec = LayerSpec.from_layer(layer)
    assert spec.empty_rows == "nan" and spec.core_options == {"causal_align": "lower_right"}
    assert LayerSpec.from_layer(refattn.Attention(8, 2)).empty_rows == "zero"


def test_under_empty_rows_rebuilds_layers_and_rejects_what_has_no_policy():
    cases = refattn.get_variant("mha-standard").cases()
    rebuilt = under_empty_rows(cases, "uniform")
    assert all(c.fn.core_options["empty_rows"] == "uniform" for c in rebuilt)
    assert under_empty_rows(cases, "zero") == cases
    with pytest.raises(ValueError, match=r"'elementwise' core .* has no empty-row policy"):
        under_empty_rows(refattn.get_variant("mha-elementwise-taylor").cases(), "nan")
    with pytest.raises(ValueError, match=r"empty_rows must be one of"):
        under_empty_rows(cases, "NaN")


def test_jax_adapter_compares_empty_rows_under_uniform():
    jax = pytest.importorskip("jax")
    cases = [c for c in refattn.get_variant("sdpa").cases()
             if c.name == "mask with empty row + causal"]
    report = V.verify(jax.nn.dot_product_attention, "sdpa", dtypes=("float32",),
                      cases=under_empty_rows(cases, "uniform"))
    report.assert_()
    assert {c.case for c in report.compared} == {"mask with empty row + causal"}
