"""refattn.verify against real PyTorch (CPU): correct implementations pass, planted bugs fail."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refattn  # noqa: E402
import refattn.verify as V  # noqa: E402

from . import torch_models as M  # noqa: E402

# variant -> (candidate builder taking bug=, the bugs its test cases must expose)
CORE_BUGS = ("scale", "softmax_axis", "causal_leak")
VARIANTS = {
    "sdpa": (lambda bug: functools.partial(M.sdpa, bug=bug), CORE_BUGS),
    "mha-standard": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug), M.REAL_PARAMS),
                     CORE_BUGS),
    "preconditioned": (lambda bug: functools.partial(M.preconditioned, bug=bug), CORE_BUGS),
    "preconditioned-elementwise": (lambda bug: functools.partial(M.preconditioned, bug=bug),
                                   ("softmax_axis", "causal_leak")),
    "preconditioned-shared": (lambda bug: functools.partial(M.preconditioned, bug=bug),
                              ("scale", "causal_leak")),
    "preconditioned-hamilton": (lambda bug: functools.partial(M.preconditioned, bug=bug),
                                ("hamilton_sign", "causal_leak")),
    "mha-preconditioned": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug),
                                               M.REAL_PARAMS), CORE_BUGS),
    "mha-optimised": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug), M.REAL_PARAMS),
                      CORE_BUGS),
    "mha-rotary": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug), M.REAL_PARAMS),
                   CORE_BUGS),
    "mha-efficient": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug), M.REAL_PARAMS),
                      CORE_BUGS),
    "mha-super": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug), M.REAL_PARAMS),
                  ("scale", "causal_leak")),
    "quaternion-shared": (lambda bug: functools.partial(M.quaternion_attention, bug=bug),
                          CORE_BUGS),
    "quaternion-hamilton": (lambda bug: functools.partial(M.quaternion_attention, bug=bug),
                            CORE_BUGS + ("hamilton_sign",)),
    "qattn-shared": (lambda bug: V.Layer(lambda s: M.QuaternionAttention(s, bug),
                                         M.QUATERNION_PARAMS), ("scale", "hamilton_sign")),
    "qattn-hamilton": (lambda bug: V.Layer(lambda s: M.QuaternionAttention(s, bug),
                                           M.QUATERNION_PARAMS), ("hamilton_sign",)),
    "qattn-shared-chunks": (lambda bug: V.Layer(lambda s: M.QuaternionAttention(s, bug),
                                                M.QUATERNION_PARAMS), ("head_layout",)),
    "qattn-hamilton-chunks": (lambda bug: V.Layer(lambda s: M.QuaternionAttention(s, bug),
                                                  M.QUATERNION_PARAMS),
                              ("head_layout", "hamilton_sign")),
    "elementwise": (lambda bug: functools.partial(M.elementwise_attention, bug=bug),
                    ("softmax_axis", "causal_leak")),
    "elementwise-taylor": (lambda bug: functools.partial(M.elementwise_attention, bug=bug),
                           ("scale", "softmax_axis")),
    "elementwise-taylor-causal": (lambda bug: functools.partial(M.elementwise_attention, bug=bug),
                                  ("scale", "causal_leak")),
    "mha-elementwise-taylor": (lambda bug: V.Layer(lambda s: M.RealAttention(s, bug),
                                                   M.REAL_PARAMS), ("scale", "causal_leak")),
}


SOFTMAX_REAL = {"sdpa", "preconditioned", "mha-standard", "mha-rotary", "mha-optimised",
                "mha-efficient", "mha-preconditioned", "mha-super"}
QUATERNION = {"quaternion-shared", "quaternion-hamilton", "preconditioned-shared",
              "preconditioned-hamilton", "qattn-shared", "qattn-hamilton"}
#: Planted causal bugs that are not the causal mask off by one (Super: W_A not triangular)
#: or that the recomputation cannot express (the Taylor cores take masks on keys only).
OTHER_LEAKS = {"mha-super", "elementwise-taylor-causal", "mha-elementwise-taylor",
               "preconditioned-elementwise"}


def expected_cause(name, bug):
    """What verify's diagnosis names for a planted bug (None: not one of its known mistakes)."""
    if bug == "scale":
        return ("scale 1/d" if name in SOFTMAX_REAL else
                "quaternion scale 1/sqrt(d)" if name in QUATERNION else None)
    if bug == "softmax_axis":
        return "softmax over queries" if name in SOFTMAX_REAL | {"quaternion-shared"} else None
    if bug == "causal_leak":
        return None if name in OTHER_LEAKS else "causal mask off by one"
    return None                   # hamilton_sign: one sign of the product flipped


def test_every_registered_variant_has_a_pytorch_model():
    missing = sorted(set(refattn.variants()) - set(VARIANTS))
    assert not missing, (f"variants {missing} have no plain PyTorch model in "
                         f"tests/verify/torch_models.py: add one and its planted bugs to VARIANTS")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_correct_implementation_passes(name):
    build, _ = VARIANTS[name]
    report = V.verify(build(None), name, framework="torch")
    report.assert_()
    assert {c.dtype for c in report.compared} == {"float64", "float32"}
    assert all(c.status == "ok" for c in report.checks if c.status != "n/a")


@pytest.mark.parametrize("name, bug", [(n, b) for n in sorted(VARIANTS) for b in VARIANTS[n][1]])
def test_planted_bug_is_caught(name, bug):
    build, _ = VARIANTS[name]
    report = V.verify(build(bug), name, framework="torch", dtypes=("float32",))
    assert not report.ok
    with pytest.raises(AssertionError) as info:
        report.assert_()
    message = str(info.value)
    assert message.startswith("FAILED:") and name in message
    # The message is the failing rows of the table: case, dtype, quantity, errors, status.
    assert all(c.status == "FAIL" for c in report.failures)
    failing = report.failures[0]
    assert f"{failing.case}" in message and "FAIL  worst at" in message
    # A semantic bug moves results by far more than rounding: at least 100x the allowance.
    assert max(c.rel / c.allowed for c in report.failures) > 100
    # The report names the mistake when it is a known one, and only then.
    assert report.diagnosis.cause == expected_cause(name, bug), report.diagnosis.description


def test_torch_sdpa_recognised_and_dropout_reported_not_expressible():
    report = V.verify(torch.nn.functional.scaled_dot_product_attention, "sdpa",
                      dtypes=("float32",))
    report.assert_()
    assert report.framework.startswith("torch ")
    not_run = {c.case: c.note for c in report.not_run}
    assert "dropout" in not_run.pop("dropout keep-mask")
    # torch SDPA has no soft-cap, packed sequences or score functions: n/a, not failures
    assert sorted(not_run.values()) == sorted(f"the candidate takes no {name}= keyword" for name
                                              in ("softcap", "cu_seqlens_q", "score_mod"))
    assert "4 case(s) not expressible" in report.summary()
    # GQA, empty rows, lower-right causal, a float bias, a window and padding (as masks)
    compared = {c.case for c in report.compared}
    assert {"two batch dims, GQA 4/2", "causal lower_right L>S (empty rows)",
            "bias (B,1,L,S)", "window (3, 1)", "padded seq lengths, causal"} <= compared
    assert "dbias" in {c.quantity for c in report.compared}


def test_multihead_attention_one_liner():
    report = V.verify(torch.nn.MultiheadAttention, "mha-standard", dtypes=("float64", "float32"))
    report.assert_()
    quantities = {c.quantity for c in report.compared}
    assert {"out", "dw_q", "dw_k", "dw_v", "dw_o", "db_q", "db_o", "dxq", "dxkv"} <= quantities


def test_half_precisions_pass_with_looser_but_meaningful_bounds():
    cases = refattn.get_variant("sdpa").cases()[:4]
    report = V.verify(torch.nn.functional.scaled_dot_product_attention, "sdpa",
                      dtypes=("bfloat16", "float16"), cases=cases)
    report.assert_()
    allowed = {d: max(c.allowed for c in report.compared if c.dtype == d)
               for d in ("bfloat16", "float16")}
    # Bounds follow the unit roundoff: bfloat16 (2^-8) looser than float16 (2^-11),
    # both well below the O(0.1) effect of a wrong scale.
    assert allowed["float16"] < allowed["bfloat16"] < 0.1
    buggy = V.verify(functools.partial(M.sdpa, bug="scale"), "sdpa", framework="torch",
                     dtypes=("bfloat16",), cases=cases)
    assert not buggy.ok


def test_candidate_errors_and_wrong_shapes_are_reported():
    def raises(q, k, v, **options):
        raise RuntimeError("kernel exploded")

    report = V.verify(raises, "sdpa", framework="torch", dtypes=("float32",))
    assert not report.ok
    assert all(c.status in ("error", "n/a") for c in report.checks)
    assert "RuntimeError: kernel exploded" in repr(report)

    def transposed(q, k, v, **options):
        return M.sdpa(q, k, v, **options).transpose(-1, -2)

    report = V.verify(transposed, "sdpa", framework="torch", dtypes=("float32",),
                      cases=refattn.get_variant("sdpa").cases()[:1])
    (row,) = report.failures
    assert row.status == "error" and "shape" in row.note


def test_detached_and_upcasting_candidates_fail():
    cases = refattn.get_variant("sdpa").cases()[:1]

    def detached(q, k, v, **options):
        return M.sdpa(q, k, v, **options).detach()

    assert "does not require grad" in V.verify(detached, "sdpa", framework="torch",
                                               cases=cases).failures[0].note

    def upcasting(q, k, v, **options):
        return M.sdpa(q.double(), k.double(), v.double(), **options)

    report = V.verify(upcasting, "sdpa", framework="torch", dtypes=("float32",), cases=cases)
    out = [c for c in report.checks if c.quantity == "out"][0]
    assert out.status == "FAIL" and "returned float64, expected float32" in out.note


def test_unused_input_gets_zero_gradient_and_fails():
    def ignores_value(q, k, v, **options):
        return M.sdpa(q, k, torch.ones_like(v), **options)

    report = V.verify(ignores_value, "sdpa", framework="torch", dtypes=("float64",),
                      cases=refattn.get_variant("sdpa").cases()[:1])
    failed = {c.quantity for c in report.failures}
    assert {"out", "dv"} <= failed


def test_parameter_map_problems_are_error_rows():
    cases = refattn.get_variant("mha-standard").cases()[:1]
    twice = {**M.REAL_PARAMS, "q.weight": V.params.linear_weight("w_k")}
    report = V.verify(V.Layer(lambda s: M.RealAttention(s), twice), "mha-standard",
                      dtypes=("float64",), cases=cases)
    (row,) = report.checks
    assert row.status == "error" and "missing ['w_q'], mapped twice ['w_k']" in row.note

    class Wide(M.RealAttention):
        def __init__(self, spec):
            super().__init__(spec)
            self.q = torch.nn.Linear(spec.d_model, spec.d_model + 1, bias=spec.bias)

    report = V.verify(V.Layer(Wide, M.REAL_PARAMS), "mha-standard", dtypes=("float64",),
                      cases=cases)
    (row,) = report.checks
    assert row.status == "error" and "'q.weight' has shape (9, 8)" in row.note


def test_framework_must_be_named_when_undetectable():
    with pytest.raises(TypeError, match="pass framework='torch' or framework='jax'"):
        V.verify(functools.partial(lambda q, k, v: q), "sdpa")


def test_module_instance_is_refused_with_a_hint():
    with pytest.raises(TypeError, match=r"pass a factory \(spec -> module\) or the module class"):
        V.verify(torch.nn.MultiheadAttention(8, 2), "mha-standard")


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtypes must be a non-empty subset"):
        V.verify(M.sdpa, "sdpa", framework="torch", dtypes=("float8",))
    with pytest.raises(TypeError, match="params= and call= apply to layer variants"):
        V.verify(M.sdpa, "sdpa", framework="torch", params={})
    with pytest.raises(ValueError, match="variant must be one of"):
        V.verify(M.sdpa, "no-such-variant", framework="torch")
    with pytest.raises(ValueError, match="framework must be one of"):
        V.verify(M.sdpa, "sdpa", framework="tensorflow")


def test_repr_is_a_table():
    report = V.verify(torch.nn.functional.scaled_dot_product_attention, "sdpa",
                      dtypes=("float32",), cases=refattn.get_variant("sdpa").cases()[:2])
    lines = repr(report).splitlines()
    assert lines[0].startswith("PASSED:")
    assert lines[2].split()[:4] == ["case", "dtype", "value", "max"]
    assert len(lines) == 3 + len(report.checks)
    np.testing.assert_array_less([c.rel for c in report.compared],
                                 [c.allowed for c in report.compared])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_with_every_option_it_expresses():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    names = ("window + causal lower_right + GQA 4/2 + softcap",
             "packed varlen: window + causal + GQA 4/2 + softcap", "padded seq lengths, causal",
             "bias (B,1,L,S)", "mask with empty row + causal", "score_mod soft-cap + mask_mod "
             "sliding window")
    cases = [c for c in refattn.get_variant("sdpa").cases() if c.name in names]
    report = V.verify(flex.flex_attention, "sdpa", gradients=False, cases=cases)
    report.assert_()
    assert report.candidate == "torch.nn.attention.flex_attention.flex_attention"
    assert {c.quantity for c in report.compared} == {"out"}
    assert {c.case for c in report.compared} == set(names[:-1])
    # refattn's own score_mod is a NumPy function: not FlexAttention's (n/a, not a failure)
    assert {c.case for c in report.not_run} == {names[-1]}
    # the forward has no backward on the CPU: with gradients the adapter's error is reported
    report = V.verify(flex.flex_attention, "sdpa", dtypes=("float64",), cases=cases[:1])
    assert not report.ok and "backward on CPU" in report.checks[0].note


def test_framework_argument_names_are_mapped():
    """A FlashAttention-style candidate: window_size=, softmax_scale=, is_causal=."""
    def flash_style(q, k, v, *, is_causal=False, window_size=(-1, -1), softmax_scale=None,
                    softcap=0.0, causal_align="upper_left"):
        L, S = q.shape[-2], k.shape[-2]
        offset = S - L if causal_align == "lower_right" else 0
        i, j = torch.arange(L)[:, None] + offset, torch.arange(S)[None, :]
        left, right = window_size
        keep = torch.ones(L, S, dtype=torch.bool)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        if is_causal:
            keep &= j <= i
        scale = softmax_scale or q.shape[-1] ** -0.5
        s = scale * q @ M._repeat_kv(k, q.shape[-3], -3).transpose(-1, -2)
        s = softcap * torch.tanh(s / softcap) if softcap else s
        p = torch.softmax(s.masked_fill(~keep, -torch.inf), -1)
        return p @ M._repeat_kv(v, q.shape[-3], -3)

    names = ("window + causal lower_right + GQA 4/2 + softcap", "scale=0.3, L=63",
             "window (3, 1)", "MQA 4/1 causal")
    cases = [c for c in refattn.get_variant("sdpa").cases() if c.name in names]
    report = V.verify(flash_style, "sdpa", framework="torch", cases=cases, dtypes=("float64",))
    report.assert_()
    assert {c.case for c in report.compared} == set(names)
