"""Generic tests every registered variant gets for free.

* the float64 reference backward passes central finite differences;
* every kernel backend (numba, cupy where available) matches the float64
  reference, forward and backward: in float64 within :data:`refattn.testing.TOLERANCES`,
  in float32 within the float32 reference's own error
  (:func:`refattn.testing.assert_within_reference_error`).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import assert_close, assert_within_reference_error, check_grads

from .conftest import kernel_backends, variant_cases

CASES = variant_cases("test")


def _case(name, index, dtype="float64"):
    return refattn.get_variant(name).cases("test", dtype)[index]


@pytest.mark.parametrize("name, index", CASES)
def test_reference_gradients_match_finite_differences(name, index):
    case = _case(name, index)
    check_grads(case.fn, *case.arrays, backend="reference", **case.options)


def _to(backend, x):
    if backend == "cupy":
        import cupy

        if isinstance(x, dict):
            return {k: cupy.asarray(v) for k, v in x.items()}
        return cupy.asarray(x)
    return x


def _options_to(backend, options):
    return {k: (_to(backend, v) if isinstance(v, np.ndarray) else v) for k, v in options.items()}


# Only the (variant, backend) pairs that exist here: a backend a variant does not
# implement is not a skipped check but no check at all (``refattn.variants()`` lists them).
BACKEND_CASES = [
    pytest.param(p.values[0], p.values[1], backend, id=f"{p.id}-{backend}")
    for p in CASES for backend in kernel_backends()
    if backend in refattn.get_variant(p.values[0]).backends
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, index, backend", BACKEND_CASES)
def test_backend_matches_reference(name, index, backend, dtype):
    case64 = _case(name, index, "float64")
    case = _case(name, index, dtype)
    out_ref, pull_ref = case64.vjp("reference")
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(np.shape(out_ref))
    grads_ref = pull_ref(dout)
    arrays = tuple(_to(backend, a) for a in case.arrays)
    out, pull = refattn.vjp(case.fn, *arrays, backend=backend, **_options_to(backend, case.options))
    assert str(out.dtype) == dtype
    grads = pull(_to(backend, dout.astype(dtype)))
    assert len(grads) == len(grads_ref)
    if dtype == "float64":
        compare = lambda got, ref, what, **_: assert_close(got, ref, dtype, what)  # noqa: E731
        low_out, low_grads = out_ref, grads_ref
    else:
        # float32: within the error of the float32 reference on the same inputs (FlashAttention's
        # and PyTorch's rule), so that gradients that cancel to ~0 are judged by their terms.
        leaves = [out_ref] + [x for g in grads_ref for x in (g.values() if isinstance(g, dict)
                                                              else [g])]
        magnitude = max(float(np.max(np.abs(np.asarray(x)), initial=0.0)) for x in leaves)
        compare = lambda got, ref, what, low, gradient: assert_within_reference_error(  # noqa
            got, ref, low, dtype, what, gradient=gradient, problem_scale=magnitude)
        low_out, low_pull = case.vjp("reference")
        low_grads = low_pull(dout.astype(dtype))
    compare(out, out_ref, f"{name} output", low=low_out, gradient=False)
    for i, (g, gr, gl) in enumerate(zip(grads, grads_ref, low_grads)):
        if isinstance(gr, dict):
            for key in gr:
                compare(g[key], gr[key], f"{name} d{key}", low=gl[key], gradient=True)
        else:
            compare(g, gr, f"{name} gradient {i}", low=gl, gradient=True)


@pytest.mark.parametrize("name", sorted(refattn.variants()))
def test_default_and_bench_cases_build_and_the_default_runs(name):
    """The report's default problem runs, and every asv bench case can be built."""
    variant = refattn.get_variant(name)
    (case,) = variant.cases("default", "float32")
    backend = "reference" if case.backends is None else case.backends[0]
    out = case.run(backend)
    assert np.all(np.isfinite(np.asarray(out)))
    labels = [c.name for c in variant.cases("bench", "float32")]
    assert labels and len(set(labels)) == len(labels)
