"""Element-wise attention: identities, numerics and errors beyond the generic variant tests.

The generic tests (``tests/test_variants.py``) already run finite differences and
backend comparisons on every registered ``elementwise*`` case; here: the
definitions written out independently, pairwise == factorised Taylor,
recurrent == causal, the underflow guard, accuracy trends and bad input.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

import refattn
from refattn.cores.elementwise.accuracy import error_table, kernel_error
from refattn.testing import assert_close, check_grads

BACKENDS = ["reference", "numba"]


def _qkv(rng, shape_q, shape_kv, spread=0.7, dtype=np.float64):
    q = spread * rng.standard_normal(shape_q)
    k = spread * rng.standard_normal(shape_kv)
    v = rng.standard_normal(shape_kv)
    return tuple(x.astype(dtype) for x in (q, k, v))


def _keep(L, S, causal, offset, key_mask=None):
    keep = np.ones((L, S), dtype=bool)
    if causal:
        keep &= np.arange(S)[None, :] <= np.arange(L)[:, None] + offset
    if key_mask is not None:
        keep = keep & key_mask            # (..., 1, S) broadcasts over queries
    return keep


def _pairwise(q, k, v, order=None, scale=1.0, keep=None):
    """The definition, pair by pair (O(L S D) memory), in float64; GQA by repetition.

    Exact: ``w = exp(-s (q - k)^2)``; Taylor: ``w = exp(-s k^2) T_t(2 s q k)``
    (unshifted: fine for the moderate inputs used here).
    """
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    qi, kj = q[..., :, None, :], k[..., None, :, :]          # (..., L, 1, D), (..., 1, S, D)
    if order is None:
        w = np.exp(-scale * (qi - kj) ** 2)
    else:
        x = 2.0 * scale * qi * kj
        w = np.exp(-scale * kj ** 2) * sum(x ** n / math.factorial(n) for n in range(order + 1))
    if keep is not None:
        w = w * keep[..., None]
    den = w.sum(-2)
    return np.where(den > 0, (w * v[..., None, :, :]).sum(-2) / np.where(den > 0, den, 1), 0.0)


# -- definitions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [None, 2, 6])
@pytest.mark.parametrize("causal, align, L, S", [
    (False, "upper_left", 9, 12),
    (True, "upper_left", 45, 45),       # two blocks of the reference scan
    (True, "lower_right", 7, 12),
    (True, "lower_right", 40, 9),       # leading rows see no key: o = 0
])
def test_matches_pairwise_definition(backend, order, causal, align, L, S):
    """The factorised O(t L D) scan equals the pairwise O(L^2) Taylor form to 1e-12 (float64)."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, (2, 4, L, 20), (2, 2, S, 20))   # GQA 4/2, D=20: a partial channel block
    key_mask = rng.random((2, 1, 1, S)) > 0.2
    offset = 0 if align == "upper_left" else S - L
    o = refattn.elementwise_attention(q, k, v, order=order, causal=causal, causal_align=align,
                                      scale=0.8, mask=key_mask, backend=backend)
    expected = _pairwise(q, k, v, order, 0.8, _keep(L, S, causal, offset, key_mask))
    # float64: both sides sum <= 45 positive weights; differences are a few ulps of O(1)
    assert_close(o, expected, "float64", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_form_with_arbitrary_mask(backend):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, (3, 6, 4), (3, 8, 4), spread=1.5)
    mask = rng.random((6, 8)) > 0.4
    mask[4] = False                                                   # a fully masked row
    o, pull = refattn.vjp(refattn.elementwise_attention, q, k, v, mask=mask, causal=True,
                          scale=0.5, backend=backend)
    assert_close(o, _pairwise(q, k, v, None, 0.5, _keep(6, 8, True, 0, mask)), "float64")
    dq, dk, dv = pull(np.ones_like(o))
    assert np.all(o[:, 4] == 0) and np.all(dq[:, 4] == 0)          # empty row: 0, no gradient


@pytest.mark.parametrize("order", [None, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_gqa_key_mask_scale(order, causal):
    """Finite differences on a two-block causal scan with GQA, a key mask and scale != 1."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, (1, 2, 40, 3), (1, 1, 40, 3))
    mask = rng.random((1, 1, 1, 40)) > 0.25
    check_grads(refattn.elementwise_attention, q, k, v, order=order, causal=causal, mask=mask,
                scale=1.7, backend="reference")


# -- recurrent form -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", None)])
def test_recurrent_reproduces_causal_taylor(dtype, tol):
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, (2, 4, 37, 6), (2, 2, 37, 6), dtype=dtype)
    expected = refattn.elementwise_attention(q, k, v, order=6, causal=True, scale=0.9,
                                             backend="reference")
    state = refattn.elementwise_state((2,), 4, 6, order=6, dtype=np.dtype(dtype).type, scale=0.9)
    outs = []
    for t in range(37):
        o_t, state = refattn.elementwise_step(state, q[:, :, t], k[:, :, t], v[:, :, t])
        outs.append(o_t)
    assert state.steps == 37 and state.moments.shape == (2, 7, 2, 4, 6)
    got = np.stack(outs, axis=-2)
    assert got.dtype == np.dtype(dtype)
    # float64: same sums in another order, 1e-12; float32: the default float32 tolerance
    assert_close(got, expected, dtype, rtol=tol, atol=tol)


# -- numerics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_underflow_guard_float32_large_keys(backend, causal):
    """|k| > 9: exp(-k^2) is 0 in float32 for every key, yet the output is right."""
    rng = np.random.default_rng(5)
    k = rng.uniform(9.5, 11.0, (1, 2, 24, 4)) * rng.choice([-1.0, 1.0], (1, 2, 24, 4))
    q = 0.05 * rng.standard_normal((1, 2, 24, 4))        # small |2 q k| (< ~2)
    v = rng.standard_normal((1, 2, 24, 4))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    assert np.all(np.exp(-k32 ** 2) < np.finfo(np.float32).tiny)   # subnormal or 0: unguarded,
    #                                                                 the moments would be noise
    o, pull = refattn.vjp(refattn.elementwise_attention, q32, k32, v32, order=6, causal=causal,
                          backend=backend)
    # reference: the pairwise form in float64 with exp(-(k^2 - min k^2)), exact in float64
    qq, kk, vv = (x.astype(np.float64) for x in (q32, k32, v32))
    x = 2 * qq[..., :, None, :] * kk[..., None, :, :]
    w = np.exp(-(kk ** 2 - (kk ** 2).min(axis=-2, keepdims=True)))[..., None, :, :] * sum(
        x ** n / math.factorial(n) for n in range(7)) * _keep(24, 24, causal, 0)[..., None]
    expected = (w * vv[..., None, :, :]).sum(-2) / w.sum(-2)
    assert np.all(np.isfinite(o))
    assert_close(o, expected, "float32")
    assert all(np.all(np.isfinite(g)) for g in pull(np.ones_like(o)))
    # the exact form far from every key (|q - k| ~ 10: exp(-(q-k)^2) underflows as well)
    o_exact = refattn.elementwise_attention(q32, k32, v32, causal=causal, backend=backend)
    assert_close(o_exact, _stable_exact(qq, kk, vv, causal), "float32")


def _stable_exact(q, k, v, causal):
    """The exact form as a max-shifted softmax per channel (float64)."""
    s = -(q[..., :, None, :] - k[..., None, :, :]) ** 2
    s = np.where(_keep(q.shape[-2], k.shape[-2], causal, 0)[..., None], s, -np.inf)
    w = np.exp(s - s.max(axis=-2, keepdims=True))
    return (w * v[..., None, :, :]).sum(-2) / w.sum(-2)


def test_error_shrinks_with_order_for_small_qk():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, (2, 3, 16, 8), (2, 3, 16, 8), spread=0.3)
    reports = [refattn.elementwise_taylor_error(q, k, v, t, causal=True) for t in (2, 4, 6, 8)]
    errors = [r.max_rel for r in reports]
    assert reports[0].max_abs_x < 1.2
    # the remainder of T_t(x) is about |x|^(t+1) / (t+1)!: raising t by 2 divides it by
    # (t+2)(t+3) / x^2 >= 20 / 1.44 ~ 14 for |x| < 1.2
    assert all(a > 10 * b for a, b in zip(errors, errors[1:])), errors
    assert reports[0].max_abs_x == pytest.approx(
        np.max(2 * np.abs(q[..., :, None, :] * k[..., None, :, :])
               * _keep(16, 16, True, 0)[..., None]))


def test_kernel_error_matches_spec_and_docs_table():
    # docs/variants.md section 5: t = 6 is 5e-4 relative at x = -1 and 0.15 at x = -2
    assert kernel_error(-1.0, 6) == pytest.approx(4.8e-4, rel=0.01)
    assert kernel_error(-2.0, 6) == pytest.approx(0.149, rel=0.01)
    doc = pathlib.Path(__file__).parents[2] / "docs" / "cores" / "elementwise.md"
    assert error_table() in doc.read_text(), "regenerate the table: python -m " \
        "refattn.cores.elementwise.accuracy"


def test_array_api_strict_reference():
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, (2, 40, 3), (2, 40, 3))
    for order in (None, 4):
        o, pull = refattn.vjp(refattn.elementwise_attention, *(xps.asarray(x) for x in (q, k, v)),
                              order=order, causal=True)
        o_np, pull_np = refattn.vjp(refattn.elementwise_attention, q, k, v, order=order,
                                    causal=True, backend="reference")
        assert_close(np.asarray(o), o_np, "float64")
        for g, g_np in zip(pull(xps.ones_like(o)), pull_np(np.ones_like(o_np))):
            assert_close(np.asarray(g), g_np, "float64")


def test_layer_with_taylor_core():
    layer = refattn.Attention(16, 4, core="elementwise", order=6, causal=True)
    params = layer.init(seed=0)
    x = 0.5 * np.random.default_rng(8).standard_normal((2, 9, 16))
    y = layer(params, x)
    assert y.shape == (2, 9, 16)
    check_grads(layer, params, x, backend="reference")
    with pytest.raises(ValueError, match="order"):
        refattn.Attention(16, 4, core="elementwise", order=3)(params, x)


# -- errors ---------------------------------------------------------------------------------------

def test_errors():
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, (2, 5, 4), (2, 6, 4))
    f = refattn.elementwise_attention
    with pytest.raises(ValueError, match="even"):
        f(q, k, v, order=5)
    with pytest.raises(ValueError, match="ignore the queries"):
        f(q, k, v, order=0)
    with pytest.raises(TypeError, match="order"):
        f(q, k, v, order=2.0)
    with pytest.raises(ValueError, match="depends on the query"):
        f(q, k, v, order=2, mask=np.ones((5, 6), dtype=bool))
    f(q, k, v, order=2, mask=np.ones((1, 6), dtype=bool))             # key mask: fine
    with pytest.raises(ValueError, match="values as wide as keys"):
        f(q, k, v[..., :3])
    with pytest.raises(ValueError, match="scale"):
        f(q, k, v, scale=0.0)
    with pytest.raises(TypeError, match="mask must be a boolean"):
        f(q, k, v, mask=np.ones((5, 6)))
    with pytest.raises(ValueError, match="backend"):
        f(q, k, v, backend="torch")
    with pytest.raises(TypeError, match="numba"):
        f(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), backend="numba")


def test_state_errors():
    with pytest.raises(ValueError, match="even integer"):
        refattn.elementwise_state((2,), 4, 8, order=None)
    with pytest.raises(ValueError, match="even"):
        refattn.elementwise_state((2,), 4, 8, order=3)
    with pytest.raises(TypeError, match="dtype"):
        refattn.elementwise_state((2,), 4, 8, order=2, dtype="int32")
    state = refattn.elementwise_state((2,), 4, 8, order=2)
    x = np.zeros((2, 4, 8))
    with pytest.raises(ValueError, match="q_t must have shape"):
        refattn.elementwise_step(state, x[:, :3], x, x)
    with pytest.raises(ValueError, match="k_t must have shape"):
        refattn.elementwise_step(state, x, x[:, :3], x[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        refattn.elementwise_step(state, x.astype(np.float32), x, x)
    with pytest.raises(TypeError, match="elementwise_state"):
        refattn.elementwise_step({}, x, x, x)
    o, _ = refattn.elementwise_step(state, x, x[:, :2], x[:, :2])       # GQA 4/2
    assert o.shape == (2, 4, 8)


def test_scaling_study_reports_its_metrics(monkeypatch):
    """The study's plumbing on tiny sizes (its timings are not asserted: shared machines)."""
    from refattn.bench import elementwise_scaling as study

    monkeypatch.setattr(study, "_LENGTHS", {"quick": (64, 128, 256)})
    monkeypatch.setattr(study, "_SDPA_MAX", {"quick": 64})
    monkeypatch.setattr(study, "_EXACT_MAX", {"quick": 64})
    monkeypatch.setattr(study, "_BASE_L", 64)
    result = study.run("quick")
    assert set(result.metrics) == set(study._metric_names())
    assert len(result.rows) == 3 and result.rows[0][4] != "-" and result.rows[1][4] == "-"
    # peak memory is deterministic: outputs and saved rows, (B, H, L, D) each
    assert 0.8 < result.metrics["memory_exponent_t6"] < 1.2
    assert all(np.isfinite(v) for v in result.metrics.values())
    assert all(v > 0 for name, v in result.metrics.items() if name.startswith("speedup"))


@pytest.mark.parametrize("order", [None, 6])
def test_float16_reference_computes_in_float32(order):
    """float16 in, float16 out; the arithmetic and the saved rows stay float32."""
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((2, 3, 200, 8)) for _ in range(3))
    o, pull = refattn.vjp(refattn.elementwise_attention, q, k, v, order=order, causal=True,
                          backend="reference")
    o16, pull16 = refattn.vjp(refattn.elementwise_attention,
                              *(x.astype(np.float16) for x in (q, k, v)), order=order, causal=True)
    assert o16.dtype == np.float16
    assert_close(o16, o, "float16")
    for g16, g in zip(pull16(np.ones_like(o16)), pull(np.ones_like(o))):
        assert g16.dtype == np.float16
        assert_close(g16, g, "float16")
