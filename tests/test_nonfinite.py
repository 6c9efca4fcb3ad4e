"""The non-finite policy (docs/conventions.md): a NaN or Inf reaches exactly its dependents.

For every core, on every backend, forward and backward: an output entry is non-finite
after a NaN, +Inf or -Inf is planted in one input entry if and only if that output
entry depends on the input entry.  Dependence is measured independently of the code
under test, on finite numbers: perturb the input entry and see which outputs of the
float64 reference move.  Every non-empty row of these cases keeps at least two keys,
so that dependence on finite numbers is generic (a row with one kept key has output
``v_j`` whatever its scores, which the structural policy still counts as dependent).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn

from .conftest import kernel_backends

BACKENDS = ("reference",) + tuple(kernel_backends())


def _rng(seed=0):
    return np.random.default_rng(seed)


def _sdpa_case(**options):
    r = _rng(1)
    q = r.standard_normal((1, 2, 3, 3))         # (B, H, L, E)
    k = r.standard_normal((1, 1, 5, 3))         # (B, Hkv, S, E): GQA, group 2
    v = r.standard_normal((1, 1, 5, 2))         # (B, Hkv, S, Ev)
    return refattn.sdpa, {"q": q, "k": k, "v": v}, options


def _masks():
    # Row 1 of head 0 is empty; every other row keeps >= 2 keys; key 4 is kept by nobody
    # in head 1.
    m = np.ones((1, 2, 3, 5), bool)
    m[0, 0, 1, :] = False
    m[0, 0, 0, 0] = False
    m[0, 1, :, 4] = False
    return m


def _bias():
    b = _rng(2).standard_normal((1, 2, 3, 5))
    b[0, 1, 2, 1] = -np.inf                     # an additive mask entry
    return b


def _dropout():
    d = np.ones((1, 2, 3, 5), bool)
    d[0, 0, 2, 3] = False
    d[0, 1, 0, 2] = False
    return d


def _quaternion_case(mode, **options):
    r = _rng(3)
    q = r.standard_normal((1, 2, 3, 4, 1))
    k = r.standard_normal((1, 1, 4, 4, 1))
    v = r.standard_normal((1, 1, 4, 4, 1))
    return refattn.quaternion_attention, {"q": q, "k": k, "v": v}, {"mode": mode, **options}


def _elementwise_case(**options):
    r = _rng(4)
    q = 0.5 * r.standard_normal((1, 2, 3, 2))
    k = 0.5 * r.standard_normal((1, 1, 4, 2))
    v = r.standard_normal((1, 1, 4, 2))
    return refattn.elementwise_attention, {"q": q, "k": k, "v": v}, options


def _key_mask():
    m = np.ones((1, 1, 1, 4), bool)
    m[..., 2] = False
    return m


CASES = {
    "sdpa": lambda: _sdpa_case(),
    "sdpa-mask": lambda: _sdpa_case(mask=_masks()),
    "sdpa-causal-lower-right": lambda: _sdpa_case(causal=True, causal_align="lower_right"),
    "sdpa-bias": lambda: _sdpa_case(bias=_bias(), mask=_masks()),
    "sdpa-dropout": lambda: _sdpa_case(dropout_mask=_dropout(), dropout_p=0.25),
    "sdpa-window-softcap-alibi": lambda: _sdpa_case(window=(2, 1), softcap=2.0,
                                                    alibi_slopes=np.array([0.3, 0.7])),
    "quaternion-shared": lambda: _quaternion_case("shared", causal=True,
                                                  causal_align="lower_right"),
    "quaternion-hamilton": lambda: _quaternion_case("hamilton", mask=_masks()[..., :4]),
    "quaternion-hamilton-window-softcap-alibi": lambda: _quaternion_case(
        "hamilton", window=(2, 1), softcap=2.0, alibi_slopes=np.array([0.3, 0.7])),
    "preconditioned": lambda: (refattn.preconditioned_sdpa, _sdpa_case()[1], {"causal": False}),
    "elementwise-exact": lambda: _elementwise_case(mask=_masks()[..., :4]),
    "elementwise-taylor": lambda: _elementwise_case(order=4, mask=_key_mask()),
    "elementwise-taylor-causal": lambda: _elementwise_case(order=4, causal=True,
                                                           causal_align="lower_right"),
}


def _evaluate(fn, inputs, options, backend, cotangent):
    """Forward outputs and gradients, flattened into one dict of arrays."""
    names = list(inputs)
    arrays = [inputs[n] for n in names]
    opts = dict(options)
    if "bias" in inputs:
        arrays, names = arrays[:-1], names[:-1]
        opts["bias"] = inputs["bias"]
    out, pullback = refattn.vjp(fn, *arrays, backend=backend, **opts)
    grads = pullback(cotangent)
    result = {"out": np.asarray(out)}
    for name, g in zip(names + (["bias"] if "bias" in inputs else []), grads):
        result[f"d{name}"] = np.asarray(g)
    if fn is refattn.sdpa:
        result["lse"] = np.asarray(refattn.sdpa(*arrays, backend=backend, return_lse=True,
                                                **opts)[1])
    return result


def _differentiable(case_inputs, options):
    inputs = dict(case_inputs)
    if options.get("bias") is not None:
        inputs["bias"] = options.pop("bias")
    return inputs, options


def _dependents(fn, inputs, options, cotangent):
    """``{(input, index): {output: bool mask}}`` by perturbation of the float64 reference."""
    base = _evaluate(fn, inputs, options, "reference", cotangent)
    table = {}
    sources = dict(inputs, cotangent=cotangent)
    for name, x in sources.items():
        for index in np.ndindex(x.shape):
            if name == "bias" and not np.isfinite(x[index]):
                continue                        # -inf is a mask, not a value
            moved = {n: a.copy() for n, a in sources.items()}
            moved[name][index] += 0.37
            cot = moved.pop("cotangent")
            out = _evaluate(fn, moved, options, "reference", cot)
            table[name, index] = {
                key: np.abs(out[key] - base[key]) > 1e-9 * (1 + np.abs(base[key]))
                for key in base}
    return table


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "posinf", "neginf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_non_finite_input_reaches_exactly_its_dependents(case, backend, value):
    fn, case_inputs, options = CASES[case]()
    inputs, options = _differentiable(case_inputs, dict(options))
    planted_in = [n for n in inputs if not (n == "bias" and value == -np.inf)]  # -inf: a mask
    out = fn(*[inputs[n] for n in ("q", "k", "v")], backend="reference",
             **({**options, "bias": inputs["bias"]} if "bias" in inputs else options))
    cotangent = _rng(9).standard_normal(np.shape(out))
    table = _dependents(fn, inputs, options, cotangent)
    reference = _evaluate(fn, inputs, options, "reference", cotangent)
    for (name, index), depends in table.items():
        if name not in planted_in + ["cotangent"]:
            continue
        planted = {n: a.copy() for n, a in dict(inputs, cotangent=cotangent).items()}
        planted[name][index] = value
        cot = planted.pop("cotangent")
        got = _evaluate(fn, planted, options, backend, cot)
        for key, dep in depends.items():
            # Entries non-finite without the planted value (the -inf lse of an empty row)
            # keep that value; every other entry turns non-finite iff it depends on it.
            clean = np.isfinite(reference[key])
            nonfinite = ~np.isfinite(got[key]) & clean
            dep = dep & clean
            assert np.array_equal(nonfinite, dep), (
                f"{case} on {backend}: {value} planted in {name}{list(index)} made "
                f"{key} non-finite at {np.argwhere(nonfinite & ~dep).tolist()} (independent) "
                f"and left it finite at {np.argwhere(dep & ~nonfinite).tolist()} (dependent)")
            # Where nothing depends on the planted entry, the numbers are the clean ones.
            np.testing.assert_allclose(got[key][~dep], reference[key][~dep], rtol=1e-10,
                                       atol=1e-12, err_msg=f"{case} {key} on {backend}")
