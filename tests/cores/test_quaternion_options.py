"""SDPA's options on the quaternion cores (shared, Hamilton) and through the preconditioned core.

Each option against its definition written out here (``docs/cores/quaternion.md``,
"Options": every map's own score soft-capped, the same ALiBi bias and masks on every map),
the SDPA reduction against the explicit formulas, finite differences in float64 (the
slopes' gradient included), packed and padded sequences against one call per sequence,
numba against the reference, the probabilities, the layer pass-through and the errors.
The combination window + causal + GQA + soft-cap + ALiBi + packed/padded lengths is in the
catalogue (``refattn/catalog/quaternion.py``, ``preconditioned.py``), so
``tests/test_variants.py`` checks it by finite differences and on every kernel backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.catalog.sdpa import soft_cap_mod, soft_cap_mod_grad
from refattn.cores.quaternion import api as quaternion_api
from refattn.cores.quaternion import reference, score_maps
from refattn.cores.quaternion.reduction import SDPAReduction
from refattn.cores.sdpa import reference as sdpa_reference
from refattn.testing import assert_close, check_grads

from ..conftest import window_band

MODES = ("shared", "hamilton")


def _problem(seed=0, B=2, H=4, Hkv=2, L=6, S=8, d=2, dv=3, dtype="float64"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, 4, d)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, 4, d)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, 4, dv)).astype(dtype)
    return q, k, v


def _definition(q, k, v, mode, keep, softcap=None, slopes=None, scale=None):
    """The cores written out: per map, cap(scale S_m) - slope |i + S - L - j|, masked softmax."""
    maps = score_maps(q, k, mode=mode)                        # (B, H, M, L, S)
    B, H, M, L, S = maps.shape
    scale = 1 / np.sqrt(4 * q.shape[-1]) if scale is None else scale
    z = scale * maps
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    if slopes is not None:
        i, j = np.arange(L)[:, None], np.arange(S)[None, :]
        z = z - slopes.reshape(-1, H, 1, 1, 1) * np.abs(i + S - L - j)
    z = np.where(keep, z, -np.inf)
    o = np.zeros((B, H, L, 4, v.shape[-1]))
    vh = np.repeat(v, H // v.shape[1], axis=1)                        # (B, H, S, 4, dv)
    for b in range(B):
        for h in range(H):
            for c in range(4):
                m = c if M == 4 else 0
                for i in range(L):
                    row = z[b, h, m, i]
                    if np.isneginf(row).all():
                        continue                                       # empty row: o = 0
                    p = np.exp(row - row.max())
                    o[b, h, i, c] = (p / p.sum()) @ vh[b, h, :, c]
    return o


@pytest.mark.parametrize("mode", MODES)
def test_options_follow_their_definition_on_every_map(mode):
    q, k, v = _problem(1)
    L, S = q.shape[2], k.shape[2]
    slopes = np.random.default_rng(2).random((2, 4))
    keep = window_band(L, S, 2, 1, S - L) & window_band(L, S, -1, 0, S - L)      # window + causal
    expected = _definition(q, k, v, mode, keep, softcap=1.5, slopes=slopes)
    for backend in ("reference", "numba"):
        got = refattn.quaternion_attention(q, k, v, mode=mode, window=(2, 1), causal=True,
                                           causal_align="lower_right", softcap=1.5,
                                           alibi_slopes=slopes, backend=backend)
        assert_close(got, expected, "float64", f"{mode} on {backend}")


def _window_mod(b, h, i, j):
    """Causal, 2 keys back for batch entry 0 and head 1, 3 otherwise (uses b and h)."""
    return (j <= i) & (i - j <= 3 - ((b == 0) & (h == 1)))


@pytest.mark.parametrize("mode", MODES)
def test_reduction_to_sdpa_matches_the_explicit_formulas_with_every_option(mode):
    q, k, v = _problem(3, L=7, S=7)
    rng = np.random.default_rng(4)
    options = dict(mask=rng.random((7, 7)) > 0.2, bias=rng.standard_normal((2, 1, 7, 7)),
                   causal=False, causal_align="upper_left", scale=None, empty_rows="zero",
                   window=(3, 1), softcap=2.5, alibi_slopes=rng.random(4), mask_mod=_window_mod,
                   score_mod=soft_cap_mod, score_mod_grad=soft_cap_mod_grad)
    _, _, opts = quaternion_api.prepare(q, k, v, mode, **options)
    reduction = SDPAReduction(sdpa_reference)
    o_ref, saved_ref = reference.forward(q, k, v, opts, mode)
    o_red, saved_red = reduction.forward(q, k, v, opts, mode)
    assert_close(o_red, o_ref, "float64", "forward")
    do = rng.standard_normal(o_ref.shape)
    grads_ref = reference.backward(saved_ref, do, opts, mode)
    grads_red = reduction.backward(saved_red, do, opts, mode)
    for what, got, want in zip(("dq", "dk", "dv", "dbias", "dslopes"), grads_red, grads_ref):
        assert_close(got, want, "float64", what)


OPTION_SETS = {
    "window": dict(window=(2, 0)),
    "softcap": dict(softcap=1.2),
    "alibi (H,)": dict(alibi=(4,)),
    "alibi (B, H) + causal lower_right": dict(alibi=(2, 4), causal=True,
                                              causal_align="lower_right"),
    "mask_mod + score_mod": dict(mask_mod=_window_mod, score_mod=soft_cap_mod,
                                 score_mod_grad=soft_cap_mod_grad),
    "padded lengths": dict(query_seq_lengths=np.array([6, 3]),
                           key_value_seq_lengths=np.array([8, 2])),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_reference_gradients_match_finite_differences(name, mode):
    q, k, v = _problem(5, L=6, S=6 if "mod" in name else 8)
    options = dict(OPTION_SETS[name])
    shape = options.pop("alibi", None)
    if shape is not None:
        options["alibi_slopes"] = np.random.default_rng(6).random(shape)
    report = check_grads(refattn.quaternion_attention, q, k, v, mode=mode, backend="reference",
                         **options)
    assert ("alibi_slopes" in {row[0] for row in report.rows}) == (shape is not None)


def _packed(seed, q_lens, k_lens, H=4, Hkv=2, d=2, dv=3):
    rng = np.random.default_rng(seed)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (q_lens, k_lens))
    return ((rng.standard_normal((cu_q[-1], H, 4, d)), rng.standard_normal((cu_k[-1], Hkv, 4, d)),
             rng.standard_normal((cu_k[-1], Hkv, 4, dv))), cu_q, cu_k)


def _heads_first(x):
    """One packed sequence ``(t, H, 4, f)`` as a batch of one ``(1, H, t, 4, f)``."""
    return np.moveaxis(x, 0, 1)[None]


@pytest.mark.parametrize("mode", MODES)
def test_packed_sequences_are_one_call_per_sequence(mode):
    (q, k, v), cu_q, cu_k = _packed(7, (3, 5, 0, 2), (4, 5, 3, 6))
    slopes = np.random.default_rng(8).random((4, 4))                 # (N, H)
    options = dict(mode=mode, window=(2, 0), causal=True, causal_align="lower_right",
                   softcap=2.0)
    o, p = refattn.quaternion_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        alibi_slopes=slopes, return_probs=True,
                                        backend="reference", **options)
    maps = 4 if mode == "hamilton" else 1
    assert o.shape == q.shape[:-1] + (3,) and p.shape == (4, maps, cu_q[-1], cu_k[-1])
    for n in range(4):
        qs, ks = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        if cu_q[n + 1] == cu_q[n]:
            continue
        o_n, p_n = refattn.quaternion_attention(*(_heads_first(x) for x in (q[qs], k[ks], v[ks])),
                                                alibi_slopes=slopes[n], return_probs=True,
                                                backend="reference", **options)
        assert_close(o[qs], np.moveaxis(o_n[0], 1, 0), "float64", f"sequence {n}")
        assert_close(p[:, :, qs, ks], p_n[0], "float64", f"probabilities of sequence {n}")
        off = np.ones(cu_k[-1], bool)
        off[ks] = False
        assert not p[:, :, qs][..., off].any()                        # no pair across sequences
    for backend in ("numba",):
        got = refattn.quaternion_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           alibi_slopes=slopes, backend=backend, **options)
        assert_close(got, o, "float64", backend)
    check_grads(refattn.quaternion_attention, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                alibi_slopes=slopes, backend="reference", **options)


@pytest.mark.parametrize("mode", MODES)
def test_padded_lengths_equal_the_packed_layout(mode):
    q, k, v = _problem(9, B=2, L=5, S=6)
    lq, lk = np.array([5, 2]), np.array([4, 6])
    # the functions see the batch entry (padded) and the sequence index (packed): the same b
    options = dict(mode=mode, causal=True, window=(1, 0), softcap=3.0, mask_mod=_window_mod,
                   score_mod=soft_cap_mod, score_mod_grad=soft_cap_mod_grad, backend="reference")
    padded = refattn.quaternion_attention(q, k, v, query_seq_lengths=lq,
                                          key_value_seq_lengths=lk, **options)
    tokens = lambda x, n: np.concatenate([np.moveaxis(x[b, :, :n[b]], 1, 0)   # noqa: E731
                                          for b in range(2)])
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (lq, lk))
    packed = refattn.quaternion_attention(tokens(q, lq), tokens(k, lk), tokens(v, lk),
                                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **options)
    assert_close(tokens(padded, lq), packed, "float64", "padded vs packed")
    assert not padded[1, :, 2:].any()                                 # padded query rows give 0


def test_numba_evaluates_the_functions_of_every_hamilton_map():
    """The four maps run as one SDPA on 4B batch entries: the functions see b % B (compiles
    the relabelled functions into the numba kernels once, 10-60 s)."""
    q, k, v = _problem(10, L=7, S=7)
    options = dict(mode="hamilton", mask_mod=_window_mod, score_mod=soft_cap_mod,
                   score_mod_grad=soft_cap_mod_grad)
    results = {}
    for backend in ("reference", "numba"):
        o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, backend=backend, **options)
        results[backend] = [o, *pull(np.random.default_rng(11).standard_normal(o.shape))]
    for i, (got, want) in enumerate(zip(results["numba"], results["reference"])):
        assert_close(got, want, "float64", f"result {i}")


@pytest.mark.parametrize("mode", MODES)
def test_probabilities_of_every_map(mode):
    q, k, v = _problem(12)
    o, p = refattn.quaternion_attention(q, k, v, mode=mode, window=(1, 1), softcap=4.0,
                                        return_probs=True, backend="numba")
    maps = 4 if mode == "hamilton" else 1
    assert p.shape == (2, 4, maps, 6, 8)
    keep = window_band(6, 8, 1, 1, 0)
    assert not p[..., ~keep].any()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-13)
    # O_c = P_m(c) V_c with the probabilities returned
    vh = np.repeat(v, 2, axis=1)
    for c in range(4):
        assert_close(o[:, :, :, c], p[:, :, c if maps == 4 else 0] @ vh[:, :, :, c], "float64",
                     f"component {c}")
    with pytest.raises(ValueError, match="drop return_probs"):
        refattn.vjp(refattn.quaternion_attention, q, k, v, mode=mode, return_probs=True)


@pytest.mark.parametrize("options, error, message", [
    (dict(window=(-2, 0)), ValueError, r"window must be None or \(left, right\)"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes must have shape \(H,\) = \(4,\)"),
    (dict(query_seq_lengths=np.array([7, 1])), ValueError, r"query_seq_lengths must lie in"),
    (dict(cu_seqlens_q=np.array([0, 3])), ValueError, "cu_seqlens_k is missing"),
    (dict(dropout_p=0.1), TypeError, "dropout_p"),
])
def test_bad_option_values(options, error, message):
    q, k, v = _problem()
    with pytest.raises(error, match=message):
        refattn.quaternion_attention(q, k, v, mode="hamilton", **options)


def test_bad_packed_layouts():
    (q, k, v), cu_q, cu_k = _packed(13, (3, 2), (2, 4))
    with pytest.raises(ValueError, match=r"packed quaternion shape \(total_q, H, 4, d\)"):
        refattn.quaternion_attention(q.reshape(5, 4, 8), k, v, cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        refattn.quaternion_attention(q, k, v, cu_seqlens_q=np.array([0, 4, 3, 5]),
                                     cu_seqlens_k=np.array([0, 2, 4, 6]))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must end at the total token count"):
        refattn.quaternion_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=np.array([0, 2, 5]))


def test_score_mod_without_its_derivative_runs_forward_only():
    q, k, v = _problem()
    o, pull = refattn.vjp(refattn.quaternion_attention, q, k, v, mode="hamilton",
                          score_mod=soft_cap_mod, backend="reference")
    with pytest.raises(ValueError, match="needs its derivative: pass score_mod_grad"):
        pull(np.ones_like(o))


@pytest.mark.parametrize("core", ["hamilton", "preconditioned-shared"])
def test_layer_passes_the_options_through(core):
    # the full derivative of the preconditioned core, for the finite differences
    full = {"stop_gradient": False} if core.startswith("preconditioned") else {}
    options = dict(window=(2, 0), softcap=5.0, alibi_slopes=np.linspace(0.1, 0.4, 4), **full)
    layer = refattn.Attention(16, 4, projection="quaternion", core=core, **options)
    params = layer.init(seed=0)
    x = np.random.default_rng(14).standard_normal((2, 6, 16))
    band = window_band(6, 6, 2, 0, 0)
    masked = refattn.Attention(16, 4, projection="quaternion", core=core, softcap=5.0,
                               alibi_slopes=options["alibi_slopes"], **full)
    assert_close(layer(params, x), masked(params, x, mask=band), "float64", "window = band mask")
    assert not np.allclose(layer(params, x), refattn.Attention(
        16, 4, projection="quaternion", core=core)(params, x))
    check_grads(layer, params, x)


# -- the preconditioned core: the options act inside the inner core -------------------------
def test_preconditioned_frozen_diagonal_backward_is_the_inner_one_with_options():
    """stop_gradient=True: dA = c dO, so every gradient, the slopes' too, is the inner core's
    at the cotangent c dO (docs/cores/preconditioned.md, "Options")."""
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((2, 4, 7, 8)) for _ in range(3))
    options = dict(window=(2, 1), causal=True, softcap=2.0, alibi_slopes=rng.random(4),
                   query_seq_lengths=np.array([7, 4]), key_value_seq_lengths=np.array([6, 7]))
    o, c = refattn.preconditioned_sdpa(q, k, v, return_diagonal=True, **options)
    _, pull = refattn.vjp(refattn.preconditioned_sdpa, q, k, v, **options)
    do = rng.standard_normal(o.shape)
    _, inner_pull = refattn.vjp(refattn.sdpa, q, k, v, **options)
    for i, (got, want) in enumerate(zip(pull(do), inner_pull(c[..., None] * do))):
        assert_close(got, want, "float64", f"gradient {i}")
    assert not o[1, :, 4:].any()                                      # padded rows: A = 0, O = 0


def test_preconditioned_packed_sequences_and_full_gradient():
    (q, k, v), cu_q, cu_k = _packed(16, (3, 4), (5, 2))
    options = dict(inner_core="hamilton", stop_gradient=False, cu_seqlens_q=cu_q,
                   cu_seqlens_k=cu_k, causal=True, causal_align="lower_right", softcap=2.0)
    o, c = refattn.preconditioned_sdpa(q, k, v, return_diagonal=True, **options)
    assert c.shape == (7, 4)                                          # (total_q, H) rows
    a = refattn.quaternion_attention(q, k, v, mode="hamilton", cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k, causal=True, causal_align="lower_right",
                                     softcap=2.0)
    assert_close(o, a / (np.linalg.norm(a.reshape(7, 4, -1), axis=-1) + 1e-6)[..., None, None],
                 "float64", "row-normalised inner output")
    check_grads(refattn.preconditioned_sdpa, q, k, v, **options)


def test_preconditioned_errors_name_the_option():
    q, k, v = _problem()
    with pytest.raises(TypeError, match="return_probs= is not an option of the preconditioned"):
        refattn.preconditioned_sdpa(q, k, v, inner_core="shared", return_probs=True)
    rng = np.random.default_rng(0)
    qr, kr, vr = (rng.standard_normal((1, 2, 4, 4)) for _ in range(3))
    with pytest.raises(TypeError, match=r"unexpected option\(s\) window for "
                                        r"inner_core='elementwise'"):
        refattn.preconditioned_sdpa(qr, kr, vr, inner_core="elementwise", window=(1, 0))


def test_conditioning_takes_the_options_and_counts_padded_rows_as_empty():
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((2, 3, 16, 4)) for _ in range(3))
    lengths = np.array([16, 9])
    report = refattn.attention_conditioning(q, k, v, query_seq_lengths=lengths, softcap=2.0)
    assert report.empty_rows.tolist() == [[0] * 3, [16 - 9] * 3]
    plain = refattn.attention_conditioning(q, k, v)
    windowed = refattn.attention_conditioning(q, k, v, window=(2, 0))
    assert not np.allclose(windowed.kappa_p, plain.kappa_p)         # P is the windowed one
