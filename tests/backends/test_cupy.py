"""CuPy backend on a GPU: device residency, ``auto`` dispatch, float16, multi-tile problems.

The generic tests (``tests/test_variants.py``) already compare every cupy core with
the float64 reference on the registered test cases (float64, float32).  Those cases
are small (one tile), so this file adds problems that span several query and key
tiles, every head-dim configuration and float16.  Skipped without a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.backends import cupy_support as cs, resolve
from refattn.testing import assert_close

pytestmark = pytest.mark.skipif(not cs.available(), reason="needs CuPy and a CUDA device")


def _cp():
    return cs.cupy()


def _problem(rng, B, H, Hkv, L, S, E, Ev, mask=False, bias=False, dropout=False, dtype="float64"):
    q = rng.standard_normal((B, H, L, E))
    k = rng.standard_normal((B, Hkv, S, E))
    v = rng.standard_normal((B, Hkv, S, Ev))
    opts = {}
    if mask:
        m = rng.random((B, 1, L, S)) > 0.2
        m[:, :, 3] = False                                      # an empty row
        opts["mask"] = m
    if bias:
        opts["bias"] = rng.standard_normal((1, H, L, S)).astype(dtype)
    if dropout:
        opts["dropout_mask"] = rng.random((B, H, L, S)) > 0.1
        opts["dropout_p"] = 0.1
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), opts


def _compare(arrays, opts, dtype, rtol=None, atol=None, **kw):
    """cupy in ``dtype`` against the float64 reference (on the dtype-rounded inputs)."""
    cp = _cp()
    ref_arrays = tuple(a.astype(np.float64) for a in arrays)
    ref_opts = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                    else v) for k, v in opts.items() if k != "float32_math"}
    out_ref, pull_ref = refattn.vjp(refattn.sdpa, *ref_arrays, backend="reference", **ref_opts,
                                    **kw)
    dout = np.random.default_rng(7).standard_normal(out_ref.shape)
    grads_ref = pull_ref(dout)
    dev = tuple(cp.asarray(a.astype(dtype)) for a in arrays)
    dev_opts = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    out, pull = refattn.vjp(refattn.sdpa, *dev, backend="cupy", **dev_opts, **kw)
    assert isinstance(out, cp.ndarray) and str(out.dtype) == dtype
    assert_close(out, out_ref, dtype, "output", rtol, atol)
    grads = pull(cp.asarray(dout.astype(dtype)))
    assert len(grads) == len(grads_ref)
    for i, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert isinstance(g, cp.ndarray) and str(g.dtype) == dtype
        assert_close(g, gr, dtype, f"gradient {i}", rtol, atol)


# Tiles are 64 (16 for float64 with wide heads) rows: these sizes cross tile edges.
MULTI_TILE = [
    dict(B=2, H=4, Hkv=2, L=150, S=200, E=64, Ev=64),
    dict(B=1, H=2, Hkv=2, L=130, S=70, E=40, Ev=72),
    dict(B=1, H=3, Hkv=1, L=97, S=97, E=128, Ev=128),
    dict(B=1, H=1, Hkv=1, L=40, S=70, E=256, Ev=200),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", MULTI_TILE, ids=lambda s: "L{L} S{S} E{E} Ev{Ev}".format(**s))
@pytest.mark.parametrize("causal, align", [(False, "upper_left"), (True, "upper_left"),
                                           (True, "lower_right")])
def test_multi_tile_matches_reference(shape, dtype, causal, align):
    arrays, opts = _problem(np.random.default_rng(0), **shape, dtype=dtype)
    _compare(arrays, opts, dtype, causal=causal, causal_align=align)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mask_bias_dropout_together(dtype):
    arrays, opts = _problem(np.random.default_rng(1), 2, 4, 2, 90, 150, 32, 48, mask=True,
                            bias=True, dropout=True, dtype=dtype)
    _compare(arrays, opts, dtype, causal=True, causal_align="lower_right")


def test_float32_on_cuda_cores_matches_reference():
    arrays, opts = _problem(np.random.default_rng(2), 1, 2, 2, 100, 130, 64, 64, mask=True,
                            bias=True, dtype="float32")
    _compare(arrays, {**opts, "float32_math": "simt"}, "float32", causal=True)


@pytest.mark.parametrize("shape", MULTI_TILE[:2], ids=["E64", "E40 Ev72"])
def test_float16_matches_reference(shape):
    # Inputs are rounded to float16 first, so the reference sees the same operands;
    # what remains is float16 rounding of P, dS and the outputs (unit roundoff
    # 4.9e-4, a few roundings deep): the float16 tolerances of refattn.testing.
    arrays, opts = _problem(np.random.default_rng(3), **shape, mask=True, bias=True,
                            dtype="float16")
    _compare(arrays, opts, "float16", causal=True)


def test_outputs_and_lse_stay_on_the_device():
    cp = _cp()
    rng = np.random.default_rng(4)
    q, k, v = (cp.asarray(rng.standard_normal((2, 3, 20, 16)).astype(np.float32))
               for _ in range(3))
    o, lse = refattn.sdpa(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, cp.ndarray) and isinstance(lse, cp.ndarray)
    assert o.device == q.device
    _, lse_ref = refattn.sdpa(*(x.get().astype(np.float64) for x in (q, k, v)), causal=True,
                              return_lse=True, backend="reference")
    assert_close(lse, lse_ref, "float32", "lse")


def test_auto_picks_cupy_for_cupy_arrays():
    cp = _cp()
    q = cp.zeros((1, 1, 4, 8), dtype=cp.float32)
    assert resolve("auto", refattn.get_core("sdpa").backends, q) == "cupy"
    _, res = refattn.get_core("sdpa").forward(q, q, q)
    assert res.backend == "cupy"


def test_reference_backend_still_runs_on_cupy_arrays():
    cp = _cp()
    rng = np.random.default_rng(5)
    q, k, v = (cp.asarray(rng.standard_normal((1, 2, 9, 8))) for _ in range(3))
    o_ref = refattn.sdpa(q, k, v, backend="reference")
    o = refattn.sdpa(q, k, v, backend="cupy")
    assert isinstance(o_ref, cp.ndarray)
    assert_close(o, o_ref, "float64", "output")


def test_fully_masked_rows_give_zero_output_and_gradient():
    cp = _cp()
    rng = np.random.default_rng(6)
    q, k, v = (cp.asarray(rng.standard_normal((1, 2, 70, 16)).astype(np.float32))
               for _ in range(3))
    mask = cp.ones((70, 70), dtype=bool)
    mask[5] = False
    mask[66] = False
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, mask=mask)
    assert bool(cp.all(o[..., [5, 66], :] == 0))
    dq, _, _ = pull(cp.ones_like(o))
    assert bool(cp.all(dq[..., [5, 66], :] == 0)) and bool(cp.all(cp.isfinite(dq)))


def test_cupy_backend_rejects_numpy_arrays():
    with pytest.raises(TypeError, match="CuPy arrays"):
        refattn.sdpa(*(np.zeros((1, 1, 2, 4)),) * 3, backend="cupy")


def test_head_dims_beyond_the_kernels_limit_are_rejected():
    cp = _cp()
    q = cp.zeros((1, 1, 4, 320), dtype=cp.float32)
    with pytest.raises(ValueError, match="head dims up to 256"):
        refattn.sdpa(q, q, q, backend="cupy")



# --- Options in the kernels (sdpa_fwd_opt / sdpa_bwd_opt) --------------------------------
# Each option alone, then combinations, on problems spanning several query and key tiles,
# forward and every gradient (dq, dk, dv, then dbias and dalibi_slopes when present)
# against the float64 reference.  The index math is also checked on the CPU
# (tests/backends/test_sdpa_rules.py); these tests run the kernels themselves.

def _slopes(rng, shape, dtype):
    return (0.05 + 0.3 * rng.random(shape)).astype(dtype)


OPTION_CASES = {
    "window": dict(window=(20, 7)),
    "window left only + causal lower_right": dict(window=(33, -1), causal=True,
                                                  causal_align="lower_right"),
    "window right only + causal upper_left": dict(window=(-1, 70), causal=True),
    "window wider than S": dict(window=(500, 500)),
    "softcap": dict(softcap=3.0),
    "alibi (H,)": dict(alibi="H"),
    "alibi (B, H) + causal lower_right": dict(alibi="BH", causal=True,
                                              causal_align="lower_right"),
    "window + causal + softcap + alibi": dict(window=(40, 0), causal=True, softcap=2.5,
                                              alibi="H", causal_align="lower_right"),
    "window + softcap + mask + bias + dropout": dict(window=(25, 25), softcap=4.0, mask=True,
                                                     bias=True, dropout=True),
}


def _option_problem(rng, case, dtype, B=2, H=4, Hkv=2, L=150, S=200, E=64, Ev=64):
    case = dict(case)
    flags = {name: case.pop(name, False) for name in ("mask", "bias", "dropout")}
    arrays, opts = _problem(rng, B, H, Hkv, L, S, E, Ev, dtype=dtype, **flags)
    alibi = case.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = _slopes(rng, (H,) if alibi == "H" else (B, H), dtype)
    return arrays, {**opts, **case}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_option_kernels_match_reference(name, dtype):
    arrays, opts = _option_problem(np.random.default_rng(10), OPTION_CASES[name], dtype)
    _compare(arrays, opts, dtype)


@pytest.mark.parametrize("shape", MULTI_TILE[1:], ids=lambda s: "L{L} S{S} E{E} Ev{Ev}".format(**s))
def test_option_kernels_on_every_head_configuration(shape):
    arrays, opts = _option_problem(np.random.default_rng(11), OPTION_CASES[
        "window + causal + softcap + alibi"], "float32", **shape)
    _compare(arrays, opts, "float32")


def test_option_kernels_in_float16_and_simt():
    case = OPTION_CASES["window + causal + softcap + alibi"]
    arrays, opts = _option_problem(np.random.default_rng(12), case, "float16")
    _compare(arrays, opts, "float16")
    arrays, opts = _option_problem(np.random.default_rng(12), case, "float32")
    _compare(arrays, {**opts, "float32_math": "simt"}, "float32")


def test_option_calls_run_on_the_kernels_and_skip_tiles():
    cp = _cp()
    rng = np.random.default_rng(13)
    q, k, v = (cp.asarray(rng.standard_normal((1, 2, 300, 32))) for _ in range(3))
    _, res = refattn.get_core("sdpa").forward(q, k, v, window=(16, 0), softcap=5.0,
                                              alibi_slopes=cp.asarray([0.1, 0.2]))
    assert res.backend == "cupy"


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# sequence 2 has no query, 5 no key; lengths cross the 64-row tiles
PACKED_Q, PACKED_K = (70, 130, 0, 5, 64, 33), (90, 130, 20, 140, 0, 33)

SEQUENCE_CASES = {
    "plain": {},
    "causal lower_right": dict(causal=True, causal_align="lower_right"),
    "window + causal + softcap + GQA": dict(window=(30, 0), causal=True, softcap=2.0),
    "alibi per sequence + window": dict(alibi="rows", window=(20, 9),
                                        causal_align="lower_right"),
    "alibi (H,) + mask + bias": dict(alibi="shared", mask=True, bias=True),
}


def _sequence_problem(rng, layout, case, dtype, H=4, Hkv=2, E=40, Ev=24):
    case = dict(case)
    alibi, mask, bias = case.pop("alibi", None), case.pop("mask", False), case.pop("bias", False)
    if layout == "packed":
        tq, tk = sum(PACKED_Q), sum(PACKED_K)
        q, k, v = (rng.standard_normal(s) for s in ((tq, H, E), (tk, Hkv, E), (tk, Hkv, Ev)))
        opts = dict(cu_seqlens_q=_cu(PACKED_Q), cu_seqlens_k=_cu(PACKED_K))
        rows, scores = len(PACKED_Q), (H, tq, tk)
    else:
        B, L, S = 3, 150, 120
        q, k, v = (rng.standard_normal(s) for s in ((B, H, L, E), (B, Hkv, S, E),
                                                    (B, Hkv, S, Ev)))
        opts = dict(query_seq_lengths=np.array([150, 0, 77]),
                    key_value_seq_lengths=np.array([100, 50, 120]))
        rows, scores = B, (B, H, L, S)
    if alibi is not None:
        opts["alibi_slopes"] = _slopes(rng, (rows, H) if alibi == "rows" else (H,), dtype)
    if mask:
        opts["mask"] = rng.random((1,) + scores[1:]) > 0.2
    if bias:
        opts["bias"] = rng.standard_normal((H, 1, scores[-1])).astype(dtype)
    return tuple(x.astype(dtype) for x in (q, k, v)), {**opts, **case}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("name", list(SEQUENCE_CASES))
def test_sequences_in_the_kernels_match_reference(name, layout, dtype):
    arrays, opts = _sequence_problem(np.random.default_rng(14), layout, SEQUENCE_CASES[name],
                                     dtype)
    _compare(arrays, opts, dtype)


def test_sequences_run_as_one_kernel_call():
    cp = _cp()
    arrays, opts = _sequence_problem(np.random.default_rng(15), "packed",
                                     SEQUENCE_CASES["window + causal + softcap + GQA"], "float32")
    dev = tuple(cp.asarray(a) for a in arrays)
    _, res = refattn.get_core("sdpa").forward(*dev, **opts)
    assert res.fused and len(res.parts) == 1
    part = res.parts[0][1]
    assert part.backend == "cupy" and part.options.sequences is not None
    # return_probs recomputes on the reference, per sequence
    _, p = refattn.sdpa(*dev, return_probs=True, **opts)
    _, p_ref = refattn.sdpa(*(a.astype(np.float64) for a in arrays), return_probs=True,
                            backend="reference", **opts)
    assert_close(p, p_ref, "float32", "probabilities")


# --- FlexAttention-style functions as CUDA expressions (refattn.cuda_expression) ----------
# The same objects serve the float64 reference (array functions) and the kernels (their
# CUDA expressions, compiled in by the option bits mask_mod / score_mod).

@refattn.cuda_expression("(j <= i + 3 && i - j <= 40 && (b + h) % 3 != 1) || j == 0")
def _band_mod(b, h, i, j):
    """A band, open for some (b, h) patterns, with key 0 always kept."""
    return ((j <= i + 3) & (i - j <= 40) & ((b + h) % 3 != 1)) | (j == 0)


@refattn.cuda_expression("3 * tanh(score / 3) + 0.01 * (i - j) * (h + 1)")
def _capped_relative(score, b, h, i, j):
    """Soft-cap written as a function plus a relative position bias per head."""
    return 3 * np.tanh(score / 3) + 0.01 * (i - j) * (h + 1)


@refattn.cuda_expression("1 - tanh(score / 3) * tanh(score / 3)")
def _capped_relative_grad(score, b, h, i, j):
    return 1 - np.tanh(score / 3) ** 2


_SCORE_MODS = dict(score_mod=_capped_relative, score_mod_grad=_capped_relative_grad)

MOD_CASES = {
    "mask_mod": dict(mask_mod=_band_mod),
    "score_mod": dict(_SCORE_MODS),
    "both + window + causal + softcap + alibi": dict(mask_mod=_band_mod, **_SCORE_MODS,
                                                     window=(40, 0), causal=True, softcap=2.5,
                                                     alibi="H"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(MOD_CASES))
def test_mod_kernels_match_reference(name, dtype):
    arrays, opts = _option_problem(np.random.default_rng(16), MOD_CASES[name], dtype)
    _compare(arrays, opts, dtype)


def test_mod_kernels_in_float16_and_simt():
    case = MOD_CASES["both + window + causal + softcap + alibi"]
    arrays, opts = _option_problem(np.random.default_rng(17), case, "float16")
    _compare(arrays, opts, "float16")
    arrays, opts = _option_problem(np.random.default_rng(17), case, "float32")
    _compare(arrays, {**opts, "float32_math": "simt"}, "float32")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_mod_kernels_with_sequences_match_reference(layout):
    case = {**SEQUENCE_CASES["window + causal + softcap + GQA"], "mask_mod": _band_mod,
            **_SCORE_MODS}
    arrays, opts = _sequence_problem(np.random.default_rng(18), layout, case, "float32")
    _compare(arrays, opts, "float32")


def test_functions_with_cuda_expressions_run_on_the_kernels():
    cp = _cp()
    rng = np.random.default_rng(19)
    q, k, v = (cp.asarray(rng.standard_normal((1, 2, 100, 32))) for _ in range(3))
    _, res = refattn.get_core("sdpa").forward(q, k, v, mask_mod=_band_mod, **_SCORE_MODS)
    assert res.backend == "cupy"
    # a function without one: the reference formulas on the CuPy arrays
    _, res = refattn.get_core("sdpa").forward(q, k, v, mask_mod=lambda b, h, i, j: j <= i)
    assert res.backend == "reference"
