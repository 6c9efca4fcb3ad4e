"""Differential fuzzing: every core x available backend x dtype x options against the float64 reference.

Hypothesis draws the sizes (zero-size batch, heads, queries and keys included; L = 1),
the options (random masks with empty rows, both causal alignments, GQA, bias with
``-inf`` entries, dropout) and, in a third of the examples, a NaN or +-Inf planted in
one entry of an input or of the cotangent.  Each example runs the forward pass and the
pullback on the backend under test and on the reference, and demands:

* non-finite entries match the float64 reference exactly (position and sign);
* float64: everything else within :data:`refattn.testing.TOLERANCES`;
* float32: within the float32 reference's own error on the same inputs
  (:func:`refattn.testing.assert_within_reference_error`).

The examples are derandomized (the same in every run) so that CI is reproducible;
``REFATTN_FUZZ_EXAMPLES`` raises their number for a longer local hunt.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refattn
from refattn.testing import assert_close, assert_within_reference_error

from .conftest import kernel_backends

EXAMPLES = int(os.environ.get("REFATTN_FUZZ_EXAMPLES", "80"))
BACKENDS = ("reference",) + tuple(kernel_backends())
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# core -> (function, fixed options, feature layout, supports bias / dropout / query masks)
CORES = {
    "sdpa": (refattn.sdpa, {}, "real", True, True, True),
    "shared": (refattn.quaternion_attention, {"mode": "shared"}, "quaternion", True, False, True),
    "hamilton": (refattn.quaternion_attention, {"mode": "hamilton"}, "quaternion", True, False,
                 True),
    "preconditioned": (refattn.preconditioned_sdpa, {}, "real", False, False, True),
    "elementwise": (refattn.elementwise_attention, {}, "real", False, False, True),
    "elementwise-taylor": (refattn.elementwise_attention, {"order": 4}, "real", False, False,
                           False),
}


@st.composite
def problems(draw, core):
    fn, fixed, layout, has_bias, has_dropout, query_masks = CORES[core]
    batch = draw(st.sampled_from([(), (0,), (1,), (2,), (1, 2), (2,), (1,)]))
    kv_heads = draw(st.sampled_from([0, 1, 1, 2, 2, 2]))
    heads = kv_heads * draw(st.integers(1, 2))
    L = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 7]))
    S = draw(st.sampled_from([0, 1, 2, 4, 6, 9, 9]))
    E = draw(st.integers(1, 4))
    Ev = E if core.startswith("elementwise") else draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tail = (lambda n, f: (n, 4, f)) if layout == "quaternion" else (lambda n, f: (n, f))
    spread = 0.5 if core.startswith("elementwise") else 1.0
    q = spread * rng.standard_normal((*batch, heads) + tail(L, E))
    k = spread * rng.standard_normal((*batch, kv_heads) + tail(S, E))
    v = rng.standard_normal((*batch, kv_heads) + tail(S, Ev))
    options = dict(fixed)
    if draw(st.booleans()):
        options["causal"] = True
        options["causal_align"] = draw(st.sampled_from(["upper_left", "lower_right"]))
    if draw(st.booleans()):
        rows = L if query_masks and draw(st.booleans()) else 1
        mask = rng.random((*batch, heads, rows, S)) > draw(st.sampled_from([0.2, 0.5]))
        if rows > 1 and draw(st.booleans()):
            mask[..., 0, :] = False                         # an empty row
        options["mask"] = mask
    if has_bias and draw(st.booleans()):
        bias = rng.standard_normal((heads, L, S))
        bias[rng.random(bias.shape) < 0.2] = -np.inf        # additive mask entries
        options["bias"] = bias
    if core in ("sdpa", "shared", "hamilton", "preconditioned") and draw(st.booleans()):
        # the framework kernels' options, on every softmax core
        options["window"] = (draw(st.integers(-1, 4)), draw(st.integers(-1, 3)))
        if draw(st.booleans()):
            options["softcap"] = draw(st.sampled_from([0.5, 3.0, 30.0]))
        if draw(st.booleans()):
            options["alibi_slopes"] = rng.random((heads,))
    if has_dropout and draw(st.booleans()):
        options["dropout_mask"] = rng.random((*batch, heads, L, S)) > 0.25
        options["dropout_p"] = 0.25
    arrays = {"q": q, "k": k, "v": v}
    plant = draw(st.sampled_from([None, None, "q", "k", "v", "bias", "cotangent"]))
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return fn, arrays, options, plant, value, rng


def _run(fn, arrays, options, backend, dtype, cotangent):
    cast = lambda x: x.astype(dtype) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x  # noqa
    args = [cast(arrays[n]) for n in ("q", "k", "v")]
    opts = {n: cast(x) for n, x in options.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # inf - inf in the planted examples
        out, pullback = refattn.vjp(fn, *args, backend=backend, **opts)
        grads = pullback(cast(cotangent))
    assert out.dtype == np.dtype(dtype)
    assert all(g.dtype == np.dtype(dtype) for g in grads)
    return [np.asarray(out)] + [np.asarray(g) for g in grads]


def _check(core, backend, dtype, problem):
    fn, arrays, options, plant, value, rng = problem
    arrays = dict(arrays)
    options = dict(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape = np.shape(fn(arrays["q"], arrays["k"], arrays["v"], backend="reference",
                            **options))
    cotangent = rng.standard_normal(shape)
    target = {"cotangent": cotangent, "bias": options.get("bias")}.get(plant, arrays.get(plant))
    if target is not None and target.size:
        target[np.unravel_index(rng.integers(target.size), target.shape)] = value
    expected = _run(fn, arrays, options, "reference", "float64", cotangent)
    got = _run(fn, arrays, options, backend, dtype, cotangent)
    low = expected if dtype == "float64" else _run(fn, arrays, options, "reference", dtype,
                                                   cotangent)
    labels = ["output", "dq", "dk", "dv"] + [n for n in ("dbias", "dalibi_slopes")
                                              if options.get(n[1:]) is not None]
    problem_scale = max((float(np.max(np.abs(e[np.isfinite(e)]), initial=0.0))
                         for e in expected), default=0.0)
    for i, (g, e, lo) in enumerate(zip(got, expected, low)):
        what = f"{core} {labels[i]} on {backend} ({dtype}; planted {value} in {plant})"
        if dtype == "float64":
            assert_close(g, e, dtype, what)
        else:
            assert_within_reference_error(g, e, lo, dtype, what, gradient=i > 0,
                                          problem_scale=problem_scale)


# The float64 reference is the ground truth here (tests/test_nonfinite.py checks it against
# its own definition); every other (backend, dtype) pair is fuzzed against it.
PAIRS = [(b, d) for b in BACKENDS for d in ("float64", "float32")
         if (b, d) != ("reference", "float64")]


@pytest.mark.parametrize("backend, dtype", PAIRS)
@pytest.mark.parametrize("core", sorted(CORES))
def test_backend_agrees_with_float64_reference(core, backend, dtype):
    @FUZZ
    @given(problems(core))
    def run(problem):
        _check(core, backend, dtype, problem)

    run()
