"""Quaternion attention cores: algebra identities, equivalences, score maps, the SDPA reduction,
the cost model and argument errors.  (Finite-difference gradient checks and backend comparisons of
every registered case run in ``tests/test_variants.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cores.sdpa import api as sdpa_api
from refattn.cores.quaternion import api, pair_costs, score_maps
from refattn.cores.quaternion.algebra import SIGN, hamilton_product
from refattn.cores.quaternion.reduction import SDPAReduction
from refattn.testing import check_grads

# Identities and equivalences are exact up to rounding: a handful of float64 operations on
# O(1) values, so 1e-12 (about 5000 ulps) is far above rounding and far below any real error.
EXACT = dict(rtol=1e-12, atol=1e-12)
MODES = ("shared", "hamilton")

# The products of the basis units as textbooks write them.
UNITS = {"1": (1, 0, 0, 0), "i": (0, 1, 0, 0), "j": (0, 0, 1, 0), "k": (0, 0, 0, 1)}
TABLE = {("i", "i"): "-1", ("j", "j"): "-1", ("k", "k"): "-1", ("i", "j"): "k", ("j", "i"): "-k",
         ("j", "k"): "i", ("k", "j"): "-i", ("k", "i"): "j", ("i", "k"): "-j"}


def _unit(name):
    sign = -1.0 if name.startswith("-") else 1.0
    return sign * np.array(UNITS[name.lstrip("-")], dtype=float)


def _qkv(rng, batch=(2,), H=2, Hkv=2, L=5, S=6, d=3, dv=2):
    return (rng.standard_normal((*batch, H, L, 4, d)), rng.standard_normal((*batch, Hkv, S, 4, d)),
            rng.standard_normal((*batch, Hkv, S, 4, dv)))


def _flat(x):
    return x.reshape(*x.shape[:-2], 4 * x.shape[-1])          # (..., 4, f) -> (..., 4f)


# -- the algebra ------------------------------------------------------------------------------
@pytest.mark.parametrize("pair, product", sorted(TABLE.items()))
def test_multiplication_table_matches_hamilton(pair, product):
    a, b = pair
    np.testing.assert_array_equal(hamilton_product(np, _unit(a), _unit(b)),
                                  _unit(product) if product != "-1" else -_unit("1"))


def test_hamilton_product_norm_is_multiplicative():
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((2, 1000, 4))
    norm = lambda x: np.sqrt(np.sum(x * x, axis=-1))  # noqa: E731
    np.testing.assert_allclose(norm(hamilton_product(np, p, q)), norm(p) * norm(q), **EXACT)


def test_hamilton_product_is_associative():
    rng = np.random.default_rng(1)
    p, q, s = rng.standard_normal((3, 1000, 4))
    np.testing.assert_allclose(hamilton_product(np, hamilton_product(np, p, q), s),
                               hamilton_product(np, p, hamilton_product(np, q, s)), **EXACT)


# -- shared core == SDPA on the flattened components -------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_shared_core_is_sdpa_on_flattened_components(backend):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, batch=(2,), H=4, Hkv=2, L=5, S=7)
    mask = rng.random((5, 7)) > 0.3
    opts = dict(mask=mask, causal=True, causal_align="lower_right")
    o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, mode="shared", backend=backend,
                          **opts)
    of, pullf = refattn.vjp(refattn.sdpa, _flat(q), _flat(k), _flat(v), backend=backend, **opts)
    np.testing.assert_allclose(_flat(o), of, **EXACT)
    do = rng.standard_normal(o.shape)
    for g, gf in zip(pull(do), pullf(_flat(do))):
        np.testing.assert_allclose(_flat(g), gf, **EXACT)


def test_default_scale_is_one_over_sqrt_4d():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, d=5)
    for mode in MODES:
        np.testing.assert_allclose(
            refattn.quaternion_attention(q, k, v, mode=mode),
            refattn.quaternion_attention(q, k, v, mode=mode, scale=1 / np.sqrt(20)), **EXACT)


# -- Hamilton core: the score maps are the quaternion products ---------------------------------
def _explicit_hamilton_maps(q, k):
    """``S[h, c, l, j] = (sum_u q[h, l, :, u] (x) k[h, j, :, u])_c`` by a loop over units."""
    H, L, _, d = q.shape
    S = k.shape[1]
    out = np.zeros((H, 4, L, S))
    for h in range(H):
        for i in range(L):
            for j in range(S):
                total = np.zeros(4)
                for u in range(d):
                    total += hamilton_product(np, q[h, i, :, u], k[h, j, :, u])
                out[h, :, i, j] = total
    return out


def _masked_softmax(s, keep):
    s = np.where(keep, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_hamilton_score_maps_are_quaternion_products():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, batch=(), H=2, L=4, S=5, d=3, dv=2)
    maps = _explicit_hamilton_maps(q, k)
    np.testing.assert_allclose(score_maps(q, k, mode="hamilton"), maps, **EXACT)
    # ... and the core applies one softmax per map to its own value component.
    keep = rng.random((4, 5)) > 0.3
    keep[:, 0] = True
    scale = 1 / np.sqrt(4 * 3)
    expected = np.stack([_masked_softmax(scale * maps[:, c], keep) @ v[:, :, c]
                         for c in range(4)], axis=-2)                         # (H, L, 4, dv)
    for backend in ("reference", "auto"):
        o = refattn.quaternion_attention(q, k, v, mode="hamilton", mask=keep, backend=backend)
        np.testing.assert_allclose(o, expected, **EXACT)


def test_shared_score_map_is_real_part_of_q_times_conjugate_k():
    rng = np.random.default_rng(5)
    q, k, _ = _qkv(rng, batch=(), H=2, L=3, S=4, d=2)
    conj = np.array([1.0, -1.0, -1.0, -1.0])[:, None]
    real = _explicit_hamilton_maps(q, k * conj)[:, 0]                          # (H, L, S)
    np.testing.assert_allclose(score_maps(q, k, mode="shared")[:, 0], real, **EXACT)


def test_shared_core_is_invariant_to_a_common_unit_quaternion_on_queries_and_keys():
    """``Re((p q)(p k)*) = Re(p (q k*) p*) = |p|^2 Re(q k*)``: rotating every unit of q and k
    by one unit quaternion ``p`` leaves the shared scores, hence the output, unchanged."""
    rng = np.random.default_rng(16)
    q, k, v = _qkv(rng)
    p = rng.standard_normal(4)
    p /= np.linalg.norm(p)

    def rotate(x):   # (..., 4, d): left-multiply every unit by p
        return np.moveaxis(hamilton_product(np, p, np.moveaxis(x, -2, -1)), -1, -2)

    np.testing.assert_allclose(
        refattn.quaternion_attention(rotate(q), rotate(k), v, mode="shared"),
        refattn.quaternion_attention(q, k, v, mode="shared"), **EXACT)
    hamilton = refattn.quaternion_attention(rotate(q), rotate(k), v, mode="hamilton")
    assert np.max(np.abs(hamilton - refattn.quaternion_attention(q, k, v, mode="hamilton"))) > 1e-3


def test_hamilton_core_differs_from_shared():
    q, k, v = _qkv(np.random.default_rng(6))
    a = refattn.quaternion_attention(q, k, v, mode="hamilton")
    b = refattn.quaternion_attention(q, k, v, mode="shared")
    assert np.max(np.abs(a - b)) > 1e-3


# -- the SDPA reduction (kernel route) equals the explicit formulas -------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_sdpa_reduction_matches_explicit_formulas(mode, monkeypatch):
    """The reduction on SDPA's reference module, forward and backward, on every test case."""
    reduction = SDPAReduction(sdpa_api.implementation("reference"))
    for case in refattn.get_variant(f"quaternion-{mode}").cases("test"):
        o, pull = refattn.vjp(case.fn, *case.arrays, backend="reference", **case.options)
        do = np.random.default_rng(7).standard_normal(o.shape)
        grads = pull(do)
        with monkeypatch.context() as patch:
            patch.setattr(api, "implementation", lambda backend: reduction)
            o2, pull2 = refattn.vjp(case.fn, *case.arrays, backend="reference", **case.options)
            grads2 = pull2(do)
        np.testing.assert_allclose(o2, o, **EXACT, err_msg=case.name)
        assert len(grads2) == len(grads)
        for g2, g in zip(grads2, grads):
            np.testing.assert_allclose(g2, g, **EXACT, err_msg=case.name)


# -- cost model --------------------------------------------------------------------------------
def test_pair_costs_count_16d_against_4d_and_four_softmaxes_against_one():
    for d in (1, 4, 16):
        h, s = pair_costs("hamilton", d), pair_costs("shared", d)
        assert (h.score_mults, s.score_mults) == (16 * d, 4 * d)
        assert (h.softmaxes, s.softmaxes) == (4, 1)
        assert h.value_mults == s.value_mults == 4 * d


def test_core_flops_follow_the_cost_model():
    L, S, d = 10, 12, 4
    hamilton, shared = refattn.get_core("hamilton"), refattn.get_core("shared")
    # E = 4d flattened; 2 FLOPs per multiplication per pair: (16d + 4d) vs (4d + 4d).
    assert hamilton.flops((2,), 3, L, S, 4 * d, 4 * d) == 2 * 2 * 3 * L * S * 20 * d
    assert shared.flops((2,), 3, L, S, 4 * d, 4 * d) == 2 * 2 * 3 * L * S * 8 * d


def test_cores_are_registered_with_quaternion_layout():
    for mode in MODES:
        core = refattn.get_core(mode)
        assert core.layout == "quaternion"
        assert "reference" in core.backends
        assert refattn.get_variant(f"quaternion-{mode}").core == mode


# -- array API and dtypes ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_reference_runs_on_array_api_strict(mode):
    xps = pytest.importorskip("array_api_strict")
    q, k, v = _qkv(np.random.default_rng(8))
    mask = np.random.default_rng(9).random((5, 6)) > 0.3
    o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, mode=mode, mask=mask,
                          causal=True)
    os_, pulls = refattn.vjp(refattn.quaternion_attention, *(xps.asarray(x) for x in (q, k, v)),
                             mode=mode, mask=xps.asarray(mask), causal=True, backend="reference")
    np.testing.assert_allclose(np.asarray(os_), o, **EXACT)
    for g, gs in zip(pull(np.ones_like(o)), pulls(xps.ones(os_.shape, dtype=xps.float64))):
        np.testing.assert_allclose(np.asarray(gs), g, **EXACT)


def test_float32_inputs_give_float32_outputs():
    q, k, v = (x.astype(np.float32) for x in _qkv(np.random.default_rng(9)))
    for mode in MODES:
        o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, mode=mode)
        assert o.dtype == np.float32
        # a float64 cotangent is cast to the inputs' dtype, as for sdpa
        assert all(g.dtype == np.float32 for g in pull(np.ones(o.shape)))


# -- errors ------------------------------------------------------------------------------------
def test_component_axis_must_be_4():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=r"q must have a quaternion component axis of size 4"):
        refattn.quaternion_attention(q[..., :3, :], k, v)
    with pytest.raises(ValueError, match=r"v must have a quaternion component axis of size 4"):
        refattn.quaternion_attention(q, k, np.concatenate([v, v], axis=-2))
    with pytest.raises(ValueError, match=r"at least 4 dimensions"):
        refattn.quaternion_attention(q[0, 0], k[0, 0], v[0, 0])


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(mode="conjugate"), ValueError, r"mode must be one of 'shared', 'hamilton'"),
    (dict(mask=np.ones((3, 5, 6), dtype=bool)), ValueError, r"mask of shape .* \(\.\.\., H, L, S\)"),
    (dict(mask=np.ones((5, 6))), TypeError, r"mask must be a boolean array"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(scale="0.5"), TypeError, r"scale must be a finite real number"),
    (dict(backend="torch"), ValueError, r"backend must be one of"),
    (dict(dropout_p=0.1), TypeError, r"dropout_p"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, pattern):
    q, k, v = _qkv(np.random.default_rng(11))
    with pytest.raises(error, match=pattern):
        refattn.quaternion_attention(q, k, v, **kwargs)


def test_mismatched_inputs_raise():
    q, k, v = _qkv(np.random.default_rng(12))
    with pytest.raises(ValueError, match=r"q has feature size 3 but k has 2"):
        refattn.quaternion_attention(q, k[..., :2], v)
    with pytest.raises(TypeError, match=r"k has dtype float32 but q has dtype float64"):
        refattn.quaternion_attention(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match=r"does not divide the 2 heads"):
        refattn.quaternion_attention(q, np.concatenate([k] * 3, axis=1),
                                     np.concatenate([v] * 3, axis=1))


def test_bad_cotangent_raises():
    q, k, v = _qkv(np.random.default_rng(13))
    o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, mode="hamilton")
    with pytest.raises(ValueError, match=r"expected the output shape \(\.\.\., H, L, 4, dv\)"):
        pull(_flat(o))


def test_score_maps_mode_error():
    q, k, _ = _qkv(np.random.default_rng(14))
    with pytest.raises(ValueError, match="mode must be one of"):
        score_maps(q, k, mode="tay")


def test_gradients_with_bias_for_both_modes():
    """dbias sums the four maps' score gradients (Hamilton) or is SDPA's (shared)."""
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, L=4, S=5)
    bias = rng.standard_normal((1, 2, 4, 5))
    for mode in MODES:
        check_grads(refattn.quaternion_attention, q, k, v, mode=mode, bias=bias, causal=True)


def test_sign_table_is_the_spec_table():
    # docs/variants.md section 3, S_i = Q_r K_i + Q_i K_r + Q_j K_k - Q_k K_j: component 1 terms.
    terms_i = {(a, b): SIGN[a][b] for a in range(4) for b in range(4) if a ^ b == 1}
    assert terms_i == {(0, 1): 1, (1, 0): 1, (2, 3): 1, (3, 2): -1}
