"""SDPA options of the framework kernels: sliding window, soft-capping, ALiBi, probabilities.

Each option against its definition written out here (docs/cores/sdpa.md), by finite
differences in float64 (the slopes' gradient included), and numba against the reference
with tiles small enough that windows, diagonals and tile edges cross.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import assert_close, assert_within_reference_error, check_grads

from ..conftest import window_band

SMALL_TILES = (8, 16)


def _problem(seed=0, B=2, H=4, Hkv=2, L=21, S=29, E=6, Ev=5, dtype="float64"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("align", ["upper_left", "lower_right"])
@pytest.mark.parametrize("window", [(3, 2), (0, 0), (5, -1), (-1, 4), (-1, -1)])
def test_window_is_the_band_mask_of_its_definition(window, align):
    q, k, v = _problem()
    L, S = q.shape[-2], k.shape[-2]
    offset = 0 if align == "upper_left" else S - L
    expected = refattn.sdpa(q, k, v, mask=window_band(L, S, *window, offset), backend="reference")
    for backend in ("reference", "numba"):
        got = refattn.sdpa(q, k, v, window=window, causal_align=align, backend=backend,
                           tiles=SMALL_TILES)
        assert_close(got, expected, "float64", f"window {window} {align} on {backend}")


def test_window_combines_with_causal_and_jax_int_form():
    q, k, v = _problem()
    L, S = q.shape[-2], k.shape[-2]
    both = window_band(L, S, 4, 3, S - L) & window_band(L, S, -1, 0, S - L)       # causal: right = 0
    got = refattn.sdpa(q, k, v, window=(4, 3), causal=True, causal_align="lower_right")
    assert_close(got, refattn.sdpa(q, k, v, mask=both, backend="reference"), "float64")
    sym = refattn.sdpa(q, k, v, window=2, backend="reference")         # JAX: (2, 2)
    assert_close(sym, refattn.sdpa(q, k, v, window=(2, 2), backend="reference"), "float64")


def test_softcap_and_alibi_follow_their_formulas():
    q, k, v = _problem(1, H=2, Hkv=2)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    slopes = np.array([0.25, 0.5])
    raw = q @ np.swapaxes(k, -1, -2) / np.sqrt(E)
    distance = np.abs(np.arange(L)[:, None] + S - L - np.arange(S)[None, :])
    scores = 7.0 * np.tanh(raw / 7.0) - slopes[:, None, None] * distance
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v
    for backend in ("reference", "numba"):
        got = refattn.sdpa(q, k, v, softcap=7.0, alibi_slopes=slopes, backend=backend)
        assert_close(got, expected, "float64", f"softcap + ALiBi on {backend}")


OPTION_SETS = {
    "window": dict(window=(4, 2)),
    "window + causal lower_right": dict(window=(3, -1), causal=True, causal_align="lower_right"),
    "softcap": dict(softcap=1.5),
    "alibi (H,)": dict(alibi=(4,)),
    "alibi (B, H)": dict(alibi=(2, 4)),
    "window + causal + GQA + softcap + alibi + bias": dict(
        window=(5, 1), causal=True, softcap=2.0, alibi=(4,), bias=True),
    "window with empty rows": dict(window=(0, 0), causal_align="lower_right", q_len=31),
}


def _with(options, q, seed=3):
    rng = np.random.default_rng(seed)
    opts = {key: value for key, value in options.items() if key not in ("alibi", "bias", "q_len")}
    if "bias" in options:
        opts["bias"] = rng.standard_normal((1, q.shape[1], q.shape[2], 29)).astype(q.dtype)
    slopes = rng.random(options["alibi"]).astype(q.dtype) if "alibi" in options else None
    return opts, slopes


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_reference_gradients_match_finite_differences(name):
    options = OPTION_SETS[name]
    q, k, v = _problem(2, L=options.get("q_len", 9), S=29)
    opts, slopes = _with(options, q)
    if slopes is not None:
        opts["alibi_slopes"] = slopes        # differentiated after the bias (DIFFERENTIABLE_OPTIONS)
    report = check_grads(refattn.sdpa, q, k, v, backend="reference", **opts)
    checked = {row[0] for row in report.rows}
    assert ("alibi_slopes" in checked) == (slopes is not None)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_numba_matches_reference(name, dtype):
    options = OPTION_SETS[name]
    q64, k64, v64 = _problem(4, L=options.get("q_len", 21))
    opts64, slopes64 = _with(options, q64)
    arrays = {"float64": (q64, k64, v64)}
    arrays["float32"] = tuple(x.astype(np.float32) for x in arrays["float64"])
    extra = {} if slopes64 is None else {"alibi_slopes": slopes64}

    def run(backend, dt, **kw):
        cast = {n: (x.astype(dt) if isinstance(x, np.ndarray) else x)
                for n, x in {**opts64, **extra}.items()}
        o, pull = refattn.vjp(refattn.sdpa, *arrays[dt], backend=backend, **cast, **kw)
        return [o, *pull(np.random.default_rng(5).standard_normal(o.shape).astype(dt))]

    expected = run("reference", "float64")
    got = run("numba", dtype, tiles=SMALL_TILES)
    low = expected if dtype == "float64" else run("reference", dtype)
    scale = max(float(np.abs(e).max()) for e in expected)
    for i, (g, e, lo) in enumerate(zip(got, expected, low)):
        if dtype == "float64":
            assert_close(g, e, dtype, f"{name}: result {i}")
        else:
            assert_within_reference_error(g, e, lo, dtype, f"{name}: result {i}",
                                          gradient=i > 0, problem_scale=scale)


def test_probabilities_are_returned_on_every_backend():
    q, k, v = _problem(6)
    for backend in ("reference", "numba"):
        o, lse, p = refattn.sdpa(q, k, v, window=(3, 1), softcap=4.0, return_lse=True,
                                 return_probs=True, backend=backend)
        assert p.shape == (2, 4, 21, 29)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(p @ np.repeat(v, 2, axis=1), o, rtol=1e-10, atol=1e-12)
        assert not p[..., 10, :6].any()                   # outside query 10's window (3, 1)
    with pytest.raises(ValueError, match=r"vjp\(sdpa, ...\) .* drop return_probs$"):
        refattn.vjp(refattn.sdpa, q, k, v, return_probs=True)
    with pytest.raises(ValueError, match="drop return_lse and return_probs"):
        refattn.vjp(refattn.sdpa, q, k, v, return_lse=True, return_probs=True)


def test_layer_passes_the_options_through():
    layer = refattn.Attention(16, 4, window=(2, 0), softcap=5.0)
    params = layer.init(seed=0)
    x = np.random.default_rng(7).standard_normal((2, 9, 16))
    check_grads(layer, params, x)
    plain = refattn.Attention(16, 4)
    assert not np.allclose(layer(params, x), plain(params, x))


@pytest.mark.parametrize("options, error, message", [
    (dict(window=(-2, 0)), ValueError, r"window must be None or \(left, right\)"),
    (dict(window=(1, 2, 3)), ValueError, "window must be"),
    (dict(window=(1.5, 2)), ValueError, "window must be"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap="big"), TypeError, "softcap must be None or a real number"),
    (dict(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes must have shape \(H,\) = \(4,\)"),
    (dict(alibi_slopes=np.ones((3, 4))), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=np.ones(4, np.float32)), TypeError, "alibi_slopes has dtype float32"),
])
def test_bad_option_values(options, error, message):
    q, k, v = _problem()
    with pytest.raises(error, match=message):
        refattn.sdpa(q, k, v, **options)


def test_options_study_reports_every_tracked_metric(monkeypatch):
    """The study's plumbing on a tiny size (its timings are not asserted: shared machines)."""
    from refattn.bench import sdpa_options

    monkeypatch.setattr(sdpa_options, "_SIZES", {"quick": (256, 32)})
    result = sdpa_options.STUDY.run("quick")
    assert set(result.metrics) == set(sdpa_options.STUDY.metric_names)
    assert all(np.isfinite(x) and x > 0 for x in result.metrics.values())
    assert sdpa_options._window_pairs(6, 2) == 1 + 2 + 3 + 3 + 3 + 3


@pytest.mark.parametrize("rotary", ["half", "interleaved"])
def test_rotary_is_the_rotation_of_q_and_k_then_sdpa(rotary):
    q, k, v = _problem(8, E=8)
    opts = dict(rotary_base=500.0, rotary_dim=6, causal=True, causal_align="lower_right")
    rope = dict(base=500.0, rotary_dim=6, interleaved=rotary == "interleaved")
    expected = refattn.sdpa(refattn.apply_rotary(q, offset=8, **rope),
                            refattn.apply_rotary(k, **rope), v, causal=True,
                            causal_align="lower_right", backend="reference")
    for backend in ("reference", "numba"):
        got = refattn.sdpa(q, k, v, rotary=rotary, rotary_q_offset=8, backend=backend, **opts)
        assert_close(got, expected, "float64", f"{rotary} rotary on {backend}")
    check_grads(refattn.sdpa, q[:, :, :5], k[:, :, :7], v[:, :, :7], rotary=rotary,
                rotary_q_offset=2, backend="reference", **opts)
    with pytest.raises(ValueError, match="rotary must be one of"):
        refattn.sdpa(q, k, v, rotary="neox")


@pytest.mark.parametrize("case", ["one kept key per row", "kept keys far from the diagonal"])
def test_float32_slope_gradient_is_centred_on_each_rows_band(case):
    """Each row of dS sums to 0, so the numba backward takes off every term the distance of
    the row's nearest kept key: a rounding of D_i then does not grow with the distance
    (float32 dslopes was up to 1.8x the bound with one kept key per row, before)."""
    rng = np.random.default_rng(198)
    if case == "one kept key per row":
        B, L, S = 1, 64, 10
        kw = dict(window=(12, 7), causal=True, softcap=2.48, query_seq_lengths=np.array([45]),
                  key_value_seq_lengths=np.array([1]))
    else:
        B, L, S = 2, 58, 7
        kw = dict(window=(13, 17), causal=True)
    q = rng.standard_normal((B, 1, L, 8))
    k, v = (rng.standard_normal((B, 1, S, 8)) for _ in range(2))
    slopes = 0.05 + 0.5 * rng.random(1)
    do = rng.standard_normal((B, 1, L, 8))
    exact, low = {}, {}
    for store, dtype, backend in ((exact, "float64", "reference"), (low, "float32", "reference"),
                                  (low, "float32", "numba")):
        cast = (x.astype(dtype) for x in (q, k, v, slopes, do))
        qq, kk, vv, ss, dd = cast
        _, pull = refattn.vjp(refattn.sdpa, qq, kk, vv, alibi_slopes=ss, backend=backend, **kw)
        store[backend] = pull(dd)[-1]
    assert_within_reference_error(low["numba"], exact["reference"], low["reference"], "float32",
                                  "dalibi_slopes", gradient=True,
                                  problem_scale=float(np.abs(exact["reference"]).max()))
