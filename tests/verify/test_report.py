"""Report details: NaN shown as NaN, digits that separate float32 from float64, candidate names."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refattn  # noqa: E402
import refattn.verify as V  # noqa: E402
from refattn.verify.report import Check, VerifyReport  # noqa: E402
from refattn.verify.run import max_abs_error  # noqa: E402

from . import torch_models as M  # noqa: E402

CASES = refattn.get_variant("sdpa").cases()[:2]


def test_float32_arithmetic_in_a_float64_run_is_named():
    def float32_inside(q, k, v, **options):
        return M.sdpa(q.float(), k.float(), v.float(), **options).double()

    report = V.verify(float32_inside, "sdpa", framework="torch", dtypes=("float64",), cases=CASES)
    assert report.failures
    for row in report.failures:
        assert row.note.startswith("float32-level error in a float64 run; worst at")
        # Enough digits to see the difference: the two numbers printed differ.
        got, expected = row.note.split(": ")[-1].split(" vs ")
        assert got != expected and len(got.lstrip("+-").replace(".", "")) > 5
    # Float32 arithmetic is not diagnosed as a semantic mistake.
    assert report.diagnosis is None


def test_semantic_bug_in_float64_is_not_called_float32_level():
    report = V.verify(lambda q, k, v, **o: M.sdpa(q, k, v, bug="scale", **o), "sdpa",
                      framework="torch", dtypes=("float64",), cases=CASES)
    assert report.failures and not any("float32-level" in c.note for c in report.failures)
    assert "(pass name= to name it)" in report.candidate


def test_nan_output_is_reported_as_nan():
    def nan_row(q, k, v, **options):
        o = M.sdpa(q, k, v, **options)
        return o.index_fill(-2, torch.tensor([1]), float("nan"))

    report = V.verify(nan_row, "sdpa", framework="torch", dtypes=("float32",), cases=CASES,
                      name="NaN on row 1")
    assert report.candidate == "NaN on row 1" and report.summary().startswith("FAILED: NaN on row 1")
    out = next(c for c in report.failures if c.quantity == "out")
    assert np.isnan(out.max_abs) and "NaN where the reference is finite, first at" in out.note
    row = next(line for line in report.table().splitlines() if "NaN where" in line)
    assert " NaN " in row and " inf " not in row


def test_not_measured_is_a_dash_and_infinities_print():
    rows = [Check("a", "float32", "-", status="n/a", note="why"),
            Check("b", "float32", "out", float("inf"), float("inf"), 0.0, 1e-6, "FAIL")]
    table = VerifyReport("sdpa", "x", "torch").table(rows)
    assert table.splitlines()[1].split()[3:6] == ["-", "-", "-"]
    assert "inf" in table.splitlines()[2]


def test_max_abs_error():
    a = np.array([1.0, np.nan, 3.0])
    assert max_abs_error(a, a) == 0.0                             # NaN where the reference is
    assert np.isnan(max_abs_error(a, np.array([1.0, 2.0, 3.0])))
    assert max_abs_error(np.array([1.0, 2.0, 3.0]), a) == float("inf")
    assert max_abs_error(np.array([np.inf]), np.array([np.inf])) == 0.0
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        max_abs_error(np.ones(2), np.ones(3))


def test_layer_spec_carries_self_cross_and_lengths():
    seen = []

    def factory(spec):
        seen.append((spec.cross, spec.L, spec.S, spec.kv_heads, spec.rotary))
        raise V.Unsupported("recording only")

    V.verify(V.Layer(factory), "mha-rotary", framework="torch", dtypes=("float64",))
    assert (False, 5, 5, 2, "half") in seen                        # self-attention
    assert (True, 5, 7, 2, "half") in seen                         # cross S = L + 2
    assert (False, 5, 5, 1, "half") in seen                        # GQA
    assert (False, 5, 5, 2, "interleaved") in seen
