"""verify explains failures: empty-row conventions detected and accepted, known mistakes named.

Every candidate here is real PyTorch (CPU) code with exactly one planted mistake;
verify must name it (``report.diagnosis.cause``), say nothing for a correct
candidate, and "no known cause" for a wrong one that is none of the known mistakes.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import refattn
import refattn.verify as V
from refattn.cores import get_core
from refattn.verify import params as P
from refattn.verify.adapters import Unsupported, accepts
from refattn.verify.diagnose import HYPOTHESES, softmax_over_queries
from refattn.verify.run import reference_problem

F64 = ("float64",)


# -- a plain PyTorch attention core with planted mistakes -------------------------------

def attention(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left",
              scale=None, dropout_mask=None, dropout_p=0.0, bug=None, empty="zero"):
    """``softmax(scale q k^T + bias) v`` on (..., H, L, E); GQA by repeat_interleave.

    ``empty`` is how a query row with no key comes out: ``"zero"`` (masked fill of
    ``finfo.min``, then times the keep-mask), ``"uniform"`` (the fill alone: every
    score equal), ``"nan"`` (a fill of ``-inf``).
    """
    H, L, E = q.shape[-3:]
    S = k.shape[-2]
    groups = H // k.shape[-3]
    if bug == "kv_tiled":
        k, v = k.repeat(*(1,) * (k.ndim - 3), groups, 1, 1), v.repeat(*(1,) * (v.ndim - 3),
                                                                     groups, 1, 1)
    else:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    if scale is None:
        scale = {"scale_d": 1.0 / E, "no_scale": 1.0}.get(bug, 1.0 / math.sqrt(E))
    s = scale * q @ k.transpose(-1, -2) + (0.0 if bias is None else bias)
    keep = torch.ones(L, S, dtype=torch.bool) if mask is None else mask
    if causal and bug != "causal_none":
        align = causal_align
        if bug == "causal_misaligned":
            align = "lower_right" if causal_align == "upper_left" else "upper_left"
        offset = (0 if align == "upper_left" else S - L) + (bug == "causal_off_by_one")
        keep = keep & torch.ones(L, S, dtype=torch.bool).tril(offset)
    keep = torch.broadcast_to(keep, s.shape)
    fill = -math.inf if empty == "nan" else torch.finfo(s.dtype).min
    p = torch.softmax(s.masked_fill(~keep, fill), dim=-2 if bug == "softmax_axis" else -1)
    if empty == "zero":
        p = p * keep
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v


def core(bug=None, empty="zero"):
    return functools.partial(attention, bug=bug, empty=empty)


def run(candidate, variant="sdpa", **kw):
    return V.verify(candidate, variant, framework="torch", dtypes=kw.pop("dtypes", F64), **kw)


CORE_BUGS = {
    "softmax_axis": "softmax over queries",
    "scale_d": "scale 1/d",
    "no_scale": "no scale",
    "causal_none": "causal mask not applied",
    "causal_misaligned": "causal mask misaligned",
    "causal_off_by_one": "causal mask off by one",
    "kv_tiled": "kv heads tiled",
}


def test_correct_candidate_has_no_diagnosis():
    report = run(core())
    report.assert_()
    assert report.diagnosis is None and report.conventions == {} and report.explanation() == ""


@pytest.mark.parametrize("bug", sorted(CORE_BUGS))
def test_planted_core_mistake_is_named(bug):
    report = run(core(bug))
    assert not report.ok
    diagnosis = report.diagnosis
    assert diagnosis.cause == CORE_BUGS[bug], diagnosis.description
    # Every failing case is explained, and the report says so in words.
    assert not diagnosis.unexplained and set(diagnosis.explained) == {
        c.case for c in report.failures}
    assert "likely cause: " in repr(report) and f"({CORE_BUGS[bug]}: explains" in repr(report)
    assert report.to_dict()["diagnosis"]["cause"] == CORE_BUGS[bug]


def test_a_mistake_is_named_in_float32_too():
    report = run(core("scale_d"), dtypes=("float32",))
    assert report.diagnosis.cause == "scale 1/d"


def test_random_wrong_candidate_has_no_known_cause():
    def noisy(q, k, v, **options):
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(v.shape, generator=generator, dtype=v.dtype)
        return attention(q, k, v + 0.1 * noise, **options)

    report = run(noisy, name="noisy values")
    assert not report.ok and report.diagnosis.cause is None
    assert report.diagnosis.description.startswith("no known cause")
    assert report.diagnosis.tested == [h.name for h in HYPOTHESES]
    assert "diagnosis: no known cause" in str(pytest.raises(AssertionError, report.assert_).value)


def test_wrong_backward_is_told_apart_from_a_wrong_forward():
    def doubled_gradient(q, k, v, *, mask=None, bias=None, causal=False,
                         causal_align="upper_left", scale=None, dropout_mask=None, dropout_p=0.0):
        # the options of attention() alone: the cases with others (window, ...) are n/a
        o = attention(q, k, v, mask=mask, bias=bias, causal=causal, causal_align=causal_align,
                      scale=scale, dropout_mask=dropout_mask, dropout_p=dropout_p)
        return o + (o - o.detach())                      # same forward, twice the gradient

    report = run(doubled_gradient)
    assert not report.ok and report.diagnosis.cause is None
    assert set(report.diagnosis.gradient_only) == {c.case for c in report.failures}
    assert "the output agrees with the reference, only gradients fail" in report.explanation()


# -- empty-row conventions ----------------------------------------------------------------

EMPTY_CASES = {"causal lower_right L>S (empty rows)", "mask with empty row + causal"}


@pytest.mark.parametrize("convention, words", [
    ("nan", "the -inf/NaN convention for empty rows"),
    ("uniform", "the finfo.min convention for empty rows"),
])
def test_empty_row_convention_is_detected_and_accepted(convention, words):
    candidate = core(empty=convention)
    report = run(candidate)
    assert {c.case for c in report.failures} == EMPTY_CASES
    assert report.conventions == {case: convention for case in EMPTY_CASES}
    assert report.convention == convention and report.diagnosis is None
    text = report.explanation()
    assert f"the candidate follows {words}" in text and f"empty_rows={convention!r}" in text
    assert report.to_dict()["conventions"] == report.conventions
    accepted = run(candidate, empty_rows=convention)
    accepted.assert_()
    assert accepted.empty_rows == convention
    compared = {c.case for c in accepted.compared}
    assert EMPTY_CASES <= compared
    # A fill is what the cores' option models: every case is compared exactly, the empty
    # rows' gradients included (NaN exactly where the reference's dv is NaN).
    assert set(accepted.comparisons.values()) == {"exact"} and accepted.output_only == {}
    assert {c.quantity for c in accepted.compared if c.case in EMPTY_CASES} == {
        "out", "dq", "dk", "dv"}


def test_switch_is_not_a_blanket_pass():
    # refattn's own convention under the NaN switch fails exactly the empty-row cases;
    # a NaN candidate with a planted mistake still fails under the switch.
    strict = run(core(), empty_rows="nan")
    assert {c.case for c in strict.failures if c.quantity == "out"} == EMPTY_CASES
    # ... and the report says the candidate follows refattn's convention after all.
    assert strict.conventions == {case: "zero" for case in EMPTY_CASES}
    assert "refattn's convention for empty rows" in strict.explanation()
    assert "empty_rows='zero'" in strict.explanation()
    wrong = run(core("scale_d", empty="nan"), empty_rows="nan")
    assert not wrong.ok and wrong.diagnosis.cause == "scale 1/d"


def test_empty_rows_keyword_is_checked():
    with pytest.raises(ValueError, match=r"empty_rows must be one of \('zero', 'uniform', "
                                         r"'nan'\), got 'inf'"):
        run(core(), empty_rows="inf")


def preconditioned(q, k, v, *, eps=1e-6, stop_gradient=True, preconditioner="row_norm",
                   bug=None, empty="zero", **options):
    """``diag(c) A``, ``c_i = 1 / (||A_i|| + eps)``, ``A`` = :func:`attention`."""
    not_taken = [name for name in options if not accepts(attention, name)]
    if not_taken:       # forwarded options must be ones attention takes: else n/a
        raise Unsupported(f"attention takes no {', '.join(not_taken)}")
    a = attention(q, k, v, bug=bug, empty=empty, **options)
    if preconditioner == "identity":
        return a
    c = 1.0 / (torch.linalg.vector_norm(a, dim=-1, keepdim=True) + eps)
    return (c.detach() if stop_gradient else c) * a


@pytest.mark.parametrize("convention", ["nan", "uniform"])
def test_preconditioned_empty_rows(convention):
    candidate = functools.partial(preconditioned, empty=convention)
    report = run(candidate, "preconditioned")
    assert report.conventions == {case: convention for case in EMPTY_CASES}
    run(candidate, "preconditioned", empty_rows=convention).assert_()


@pytest.mark.parametrize("bug", ["softmax_axis", "scale_d", "causal_none"])
def test_preconditioned_mistakes_are_named(bug):
    report = run(functools.partial(preconditioned, bug=bug), "preconditioned")
    assert report.diagnosis.cause == CORE_BUGS[bug], report.diagnosis.description


def test_softmax_over_queries_normalises_columns():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 5, 4)), np.eye(5)[None]
    p = softmax_over_queries(q, k, v)                         # v = I: the probabilities
    np.testing.assert_allclose(p.sum(axis=-2), 1.0, rtol=1e-14)


# -- layers ---------------------------------------------------------------------------------

def _heads(x, n):
    B, T, d = x.shape
    return x.reshape(B, T, n, d // n).transpose(1, 2)


class MHA(nn.Module):
    """Standard multi-head attention (GQA) over :func:`attention`; ``bug`` plants a mistake."""

    def __init__(self, spec, bug=None, empty="zero"):
        super().__init__()
        self.spec, self.bug, self.empty = spec, bug, empty
        d, d_kv = spec.d_model, spec.kv_heads * spec.head_dim
        self.q = nn.Linear(d, d, bias=spec.bias)
        self.k = nn.Linear(d, d_kv, bias=spec.bias)
        self.v = nn.Linear(d, d_kv, bias=spec.bias)
        self.o = nn.Linear(d, d, bias=spec.bias)

    def linear(self, name, x):
        layer = getattr(self, name)
        if self.bug in (f"{name}_transposed", "all_transposed"):   # x @ W, not x @ W^T
            return x @ layer.weight + (0.0 if layer.bias is None else layer.bias)
        return layer(x)

    def forward(self, xq, xkv=None, mask=None):
        xkv = xq if xkv is None else xkv
        s = self.spec
        o = attention(_heads(self.linear("q", xq), s.n_heads),
                      _heads(self.linear("k", xkv), s.kv_heads),
                      _heads(self.linear("v", xkv), s.kv_heads), mask=mask, causal=s.causal,
                      bug=None if self.bug and self.bug.endswith("transposed") else self.bug,
                      empty=self.empty)
        B, H, T, dk = o.shape
        return self.linear("o", o.transpose(1, 2).reshape(B, T, H * dk))


MHA_PARAMS = {**{f"{n}.weight": P.linear_weight(f"w_{n}") for n in "qkvo"},
              **{f"{n}.bias": P.same(f"b_{n}") for n in "qkvo"}}


def mha(bug=None, empty="zero"):
    return V.Layer(lambda spec: MHA(spec, bug, empty), MHA_PARAMS)


LAYER_BUGS = {**{f"{n}_transposed": f"w_{n} transposed" for n in "qkvo"},
              "all_transposed": "all weights transposed",
              "softmax_axis": "softmax over queries", "causal_none": "causal mask not applied"}


@pytest.mark.parametrize("bug, cause", sorted(LAYER_BUGS.items()))
def test_planted_layer_mistake_is_named(bug, cause):
    report = run(mha(bug), "mha-standard")
    assert not report.ok and report.diagnosis.cause == cause, report.diagnosis.description


def test_correct_layer_has_no_diagnosis():
    report = run(mha(), "mha-standard")
    report.assert_()
    assert report.diagnosis is None


@pytest.mark.parametrize("convention", ["nan", "uniform"])
def test_layer_empty_row_convention(convention):
    report = run(mha(empty=convention), "mha-standard")
    assert set(report.conventions) == {c.case for c in report.failures} and len(
        report.conventions) == 2
    assert set(report.conventions.values()) == {convention}
    run(mha(empty=convention), "mha-standard", empty_rows=convention).assert_()


# -- quaternion layers ---------------------------------------------------------------------

class QLinear(nn.Module):
    """Quaternion linear map on [r|i|j|k]; ``tay`` uses the transposed block signs."""

    def __init__(self, n, bias, tay=False):
        super().__init__()
        self.tay = tay
        self.weight = nn.Parameter(torch.zeros(4, n, n))
        self.bias = nn.Parameter(torch.zeros(4 * n)) if bias else None

    def forward(self, x):
        r, i, j, k = self.weight
        rows = [[r, i, j, k], [-i, r, k, -j], [-j, -k, r, i], [-k, j, -i, r]]
        if self.tay:
            rows = [[r, -i, -j, -k], [i, r, -k, j], [j, k, r, -i], [k, -j, i, r]]
        m = torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)
        return x @ m if self.bias is None else x @ m + self.bias


class SharedQuaternion(nn.Module):
    """Shared-score quaternion attention; ``chunks``: heads are flat chunks of [r|i|j|k]."""

    def __init__(self, spec, bug=None, empty="zero"):
        super().__init__()
        self.spec, self.bug, self.empty = spec, bug, empty
        for name in "qkvo":
            setattr(self, name, QLinear(spec.d_model // 4, spec.bias, tay=bug == "tay_signs"))

    def split(self, x):
        B, T, d = x.shape
        H = self.spec.n_heads
        if self.bug == "chunk_heads":                        # (B, T, H, 4, dh): chunk h
            x = x.reshape(B, T, H, 4, d // (4 * H)).permute(0, 2, 1, 3, 4)
        else:                                                # (B, T, 4, H, dh): units h
            x = x.reshape(B, T, 4, H, d // (4 * H)).permute(0, 3, 1, 2, 4)
        return x.reshape(B, H, T, d // H)                    # SDPA on the 4 dh features

    def forward(self, xq, xkv=None, mask=None):
        xkv = xq if xkv is None else xkv
        dh = self.spec.head_dim // 4
        scale = 1.0 / math.sqrt(dh) if self.bug == "component_scale" else None
        o = attention(self.split(self.q(xq)), self.split(self.k(xkv)), self.split(self.v(xkv)),
                      mask=mask, causal=self.spec.causal, scale=scale,
                      empty=self.empty)                  # (B, H, T, 4 dh)
        B, H, T, _ = o.shape
        o = o.reshape(B, H, T, 4, -1)
        order = (0, 2, 1, 3, 4) if self.bug == "chunk_heads" else (0, 2, 3, 1, 4)
        return self.o(o.permute(*order).reshape(B, T, -1))


Q_PARAMS = {**{f"{n}.weight": P.same(f"w_{n}") for n in "qkvo"},
            **{f"{n}.bias": P.same(f"b_{n}") for n in "qkvo"}}


@pytest.mark.parametrize("bug, cause", [(None, None),
                                        ("tay_signs", "quaternion sign convention"),
                                        ("component_scale", "quaternion scale 1/sqrt(d)"),
                                        ("chunk_heads", "quaternion head layout")])
def test_quaternion_layer_mistakes(bug, cause):
    report = run(V.Layer(lambda spec: SharedQuaternion(spec, bug), Q_PARAMS), "qattn-shared")
    if bug is None:
        report.assert_()
        assert report.diagnosis is None
    else:
        assert not report.ok and report.diagnosis.cause == cause, report.diagnosis.description


def test_report_dict_is_json():
    report = run(core("scale_d"))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["diagnosis"]["cause"] == "scale 1/d"
    assert data["checks"][0]["case"] == "plain" and data["empty_rows"] == "zero"
    assert data["summary"] == report.summary()


def test_every_hypothesis_has_a_planted_bug():
    planted = set(CORE_BUGS.values()) | set(LAYER_BUGS.values()) | {
        "quaternion sign convention", "quaternion head layout", "quaternion scale 1/sqrt(d)"}
    assert {h.name for h in HYPOTHESES} == planted


@pytest.mark.parametrize("name", sorted(refattn.variants()))
def test_recompute_reproduces_the_reference(name):
    """The pipeline the conventions and diagnoses change is the reference itself."""
    variant = refattn.get_variant(name)
    for case in variant.cases():
        problem = reference_problem(case, core=get_core(variant.core))
        out = problem.recompute.out()
        np.testing.assert_allclose(out, problem.expected["out"], rtol=1e-13, atol=1e-13,
                                   err_msg=case.name)


def test_official_style_quaternion_module():
    """Chunked heads and a finfo.min fill, as the official shared-score code: both are named."""
    def official(empty):
        return V.Layer(lambda spec: SharedQuaternion(spec, "chunk_heads", empty), Q_PARAMS)

    report = run(official("uniform"), "qattn-shared")
    # Every case fails on its rows with keys, so the layout explains them all (the empty
    # rows are left out of the comparison) ...
    assert report.diagnosis.cause == "quaternion head layout" and report.conventions == {}
    # ... and with the layout right, the fill is what remains: detected, then accepted.
    fill_only = V.Layer(lambda spec: SharedQuaternion(spec, None, "uniform"), Q_PARAMS)
    assert set(run(fill_only, "qattn-shared").conventions.values()) == {"uniform"}
    run(fill_only, "qattn-shared", empty_rows="uniform").assert_()
