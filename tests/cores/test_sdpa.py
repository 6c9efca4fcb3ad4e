"""SDPA: an independent loop implementation, array-API portability, properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.testing import check_grads


def naive_sdpa(q, k, v, mask=None, bias=None, causal=False, align="upper_left", scale=None,
               dropout_mask=None, dropout_p=0.0, window=None, softcap=None, q_lens=None,
               k_lens=None, mask_mod=None, score_mod=None, first_b=0):
    """The definition of docs/cores/sdpa.md, one (batch, head, query, key) at a time.

    ``q_lens``/``k_lens`` (flattened batch) are JAX's padding, each batch element aligned at
    its own lengths; ``mask_mod``/``score_mod`` see the flattened batch index plus ``first_b``.
    """
    *batch, H, L, E = q.shape
    Hkv, S, Ev = k.shape[-3], k.shape[-2], v.shape[-1]
    scale = 1 / math.sqrt(E) if scale is None else scale
    shape = (*batch, H, L, S)
    mask = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    bias = np.zeros(shape) if bias is None else np.broadcast_to(bias, shape)
    keep_drop = np.ones(shape, bool) if dropout_mask is None else np.broadcast_to(dropout_mask,
                                                                                  shape)
    left, right = (-1, -1) if window is None else (
        (window, window) if isinstance(window, int) else window)
    out = np.zeros((*batch, H, L, Ev))
    for b, idx in enumerate(np.ndindex(*batch)):
        Lb = L if q_lens is None else int(np.ravel(q_lens)[b])
        Sb = S if k_lens is None else int(np.ravel(k_lens)[b])
        offset = 0 if align == "upper_left" else Sb - Lb
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Lb):
                logits = []
                for j in range(S):
                    allowed = (j < Sb and mask[idx + (h, i, j)]
                               and (not causal or j <= i + offset)
                               and (left < 0 or j >= i + offset - left)
                               and (right < 0 or j <= i + offset + right)
                               and (mask_mod is None or bool(mask_mod(b + first_b, h, i, j))))
                    s = scale * float(np.dot(q[idx + (h, i)], k[idx + (g, j)]))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    s += bias[idx + (h, i, j)]
                    if score_mod is not None:
                        s = float(score_mod(s, b + first_b, h, i, j))
                    logits.append(s if allowed else -math.inf)
                m = max(logits)
                if m == -math.inf:
                    continue  # a row with no key left: output 0
                w = [math.exp(s - m) for s in logits]
                z = math.fsum(w)
                for j in range(S):
                    p = w[j] / z
                    if keep_drop[idx + (h, i, j)]:
                        out[idx + (h, i)] += p / (1 - dropout_p) * v[idx + (g, j)]
                    # dropped probabilities contribute nothing
    return out


def naive_packed(q, k, v, cu_q, cu_k, **options):
    """FlashAttention varlen, one sequence at a time: ``(T, H, E)`` tokens, head-first inside."""
    o = np.zeros(q.shape[:2] + v.shape[2:])
    for n in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        if cu_q[n + 1] > cu_q[n]:
            o[rows] = naive_sdpa(*(x.transpose(1, 0, 2) for x in (q[rows], k[keys], v[keys])),
                                 first_b=n, **options).transpose(1, 0, 2)
    return o


@pytest.mark.parametrize("index", range(len(refattn.get_variant("sdpa").cases("test"))))
def test_matches_independent_loop_implementation(index):
    case = refattn.get_variant("sdpa").cases("test")[index]
    q, k, v = case.arrays
    opts = dict(case.options)
    definition = dict(mask=opts.get("mask"), bias=opts.get("bias"),
                      causal=opts.get("causal", False),
                      align=opts.get("causal_align", "upper_left"), scale=opts.get("scale"),
                      dropout_mask=opts.get("dropout_mask"), dropout_p=opts.get("dropout_p", 0.0),
                      window=opts.get("window"), softcap=opts.get("softcap"),
                      mask_mod=opts.get("mask_mod"), score_mod=opts.get("score_mod"))
    if "cu_seqlens_q" in opts:
        expected = naive_packed(q, k, v, opts["cu_seqlens_q"], opts["cu_seqlens_k"], **definition)
    else:
        expected = naive_sdpa(q, k, v, q_lens=opts.get("query_seq_lengths"),
                              k_lens=opts.get("key_value_seq_lengths"), **definition)
    got = refattn.sdpa(q, k, v, backend="reference", **opts)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_output_and_zero_gradient():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 4, 3)) for _ in range(3))
    mask = np.ones((4, 4), bool)
    mask[1] = False
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, mask=mask, backend="reference")
    assert np.all(o[..., 1, :] == 0)
    dq, dk, dv = pull(rng.standard_normal(o.shape))
    assert np.all(dq[..., 1, :] == 0)
    _, lse = refattn.sdpa(q, k, v, mask=mask, return_lse=True, backend="reference")
    assert np.all(np.isneginf(lse[..., 1])) and np.all(np.isfinite(lse[..., [0, 2, 3]]))


def test_lse_is_the_log_partition_function():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    _, lse = refattn.sdpa(q, k, v, return_lse=True, backend="reference")
    s = q @ k.swapaxes(-1, -2) / 2.0
    np.testing.assert_allclose(lse, np.log(np.exp(s).sum(-1)), rtol=1e-13)


def test_gqa_equals_repeated_kv_heads():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 6, 5, 4))
    k, v = rng.standard_normal((2, 2, 7, 4)), rng.standard_normal((2, 2, 7, 3))
    o = refattn.sdpa(q, k, v, backend="reference")
    o_rep = refattn.sdpa(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), backend="reference")
    np.testing.assert_allclose(o, o_rep, rtol=1e-14, atol=1e-14)


def test_lower_right_causal_equals_upper_left_on_the_last_rows():
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 6, 4)), \
        rng.standard_normal((1, 6, 4))
    # lower-right keeps j <= i + S - L: the L queries are the last L of the S positions.
    full_q = np.concatenate([rng.standard_normal((1, 3, 4)), q], axis=1)
    o_full = refattn.sdpa(full_q, k, v, causal=True, backend="reference")
    o = refattn.sdpa(q, k, v, causal=True, causal_align="lower_right", backend="reference")
    np.testing.assert_allclose(o, o_full[:, 3:], rtol=1e-14)


def test_float32_in_float32_out():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 5, 4), dtype=np.float32) for _ in range(3))
    o, lse = refattn.sdpa(q, k, v, return_lse=True, backend="reference")
    assert o.dtype == np.float32 and lse.dtype == np.float32


def test_runs_on_array_api_strict_arrays():
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 2, 5, 4)) for _ in range(3))
    mask = rng.random((5, 5)) > 0.3
    expected = refattn.sdpa(q, k, v, mask=mask, causal=True, backend="reference")
    qs, ks, vs = (xp.asarray(a) for a in (q, k, v))
    o, pull = refattn.vjp(refattn.sdpa, qs, ks, vs, mask=xp.asarray(mask), causal=True)
    assert type(o).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(o), expected, rtol=1e-14)
    grads = pull(xp.ones_like(o))
    _, pull_np = refattn.vjp(refattn.sdpa, q, k, v, mask=mask, causal=True, backend="reference")
    for g, g_np in zip(grads, pull_np(np.ones_like(expected))):
        np.testing.assert_allclose(np.asarray(g), g_np, rtol=1e-13, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(st.integers(1, 2), max_size=2),
    kv_heads=st.integers(1, 2), group=st.integers(1, 3),
    L=st.integers(1, 6), S=st.integers(1, 6), E=st.integers(1, 5), Ev=st.integers(1, 4),
    causal=st.booleans(), align=st.sampled_from(["upper_left", "lower_right"]),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_gradients(batch, kv_heads, group, L, S, E, Ev, causal, align, seed):
    rng = np.random.default_rng(seed)
    H = kv_heads * group
    q = rng.standard_normal((*batch, H, L, E))
    k = rng.standard_normal((*batch, kv_heads, S, E))
    v = rng.standard_normal((*batch, kv_heads, S, Ev))
    o = refattn.sdpa(q, k, v, causal=causal, causal_align=align, backend="reference")
    assert o.shape == (*batch, H, L, Ev)
    # Each output row is a convex combination of value rows (or 0 for an empty row).
    vmax = np.abs(v).max() if v.size else 0.0
    assert np.all(np.abs(o) <= vmax + 1e-12)
    check_grads(refattn.sdpa, q, k, v, causal=causal, causal_align=align, backend="reference",
                n_directions=1)


# -- bad input: every error names the argument -------------------------------------------------
def _qkv(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 4, 5, 8)).astype(dtype),
            rng.standard_normal((2, 2, 6, 8)).astype(dtype),
            rng.standard_normal((2, 2, 6, 3)).astype(dtype))


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v: (q[0, 0, 0], k, v), ValueError, r"q must have shape \(\.\.\., H, L, E\)"),
    (lambda q, k, v: (q, k[..., :7], v), ValueError, "q has feature size 8 but k has 7"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "v has .* but k has"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "does not divide the 3 heads of q"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k has batch dimensions"),
    (lambda q, k, v: (q.astype(np.int64), k, v), TypeError, "q must be a real floating-point"),
    (lambda q, k, v: (q, k.astype(np.complex128), v), TypeError, "k must be a real floating"),
    (lambda q, k, v: (q, k, v.astype(np.float32)), TypeError, "v has dtype float32 but q has"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be an array"),
])
def test_bad_arrays(change, error, match):
    with pytest.raises(error, match=match):
        refattn.sdpa(*change(*_qkv()))


@pytest.mark.parametrize("options, error, match", [
    (dict(mask=np.ones((5, 7), bool)), ValueError, r"mask of shape \(5, 7\) does not broadcast"),
    (dict(mask=np.ones((5, 6))), TypeError, "mask must be a boolean array.*bias="),
    (dict(bias=np.ones((3, 5, 6))), ValueError, "bias of shape"),
    (dict(bias=np.ones((5, 6), bool)), TypeError, "bias must be a real floating"),
    (dict(bias=np.ones((5, 6), np.float32)), TypeError, "bias has dtype float32"),
    (dict(dropout_p=-0.1, dropout_mask=np.ones((5, 6), bool)), ValueError, r"dropout_p must lie"),
    (dict(dropout_p=1.0, dropout_mask=np.ones((5, 6), bool)), ValueError, r"dropout_p must lie"),
    (dict(dropout_p=0.5), ValueError, "needs an explicit dropout_mask"),
    (dict(dropout_p=0.1, dropout_mask=np.ones((5, 6))), TypeError, "dropout_mask must be a bool"),
    (dict(causal_align="bottom"), ValueError, "causal_align must be one of"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale="big"), TypeError, "scale must be a finite real"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite real"),
    (dict(backend="torch"), ValueError, "backend must be one of"),
    (dict(backend="cupy"), (RuntimeError, ValueError, TypeError), "cupy"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        refattn.sdpa(*_qkv(), **options)


def test_mask_combined_with_causal_is_allowed():
    q, k, v = _qkv()
    mask = np.ones((5, 6), bool)
    mask[:, 0] = False
    o = refattn.sdpa(q, k, v, mask=mask, causal=True, backend="reference")
    assert np.all(o[..., 0, :] == 0)  # query 0 may only see key 0, which the mask removes


def test_bad_cotangent():
    q, k, v = _qkv()
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, backend="reference")
    with pytest.raises(ValueError, match="cotangent has shape"):
        pull(np.ones((1, 2)))


def test_vjp_rejects_return_lse_and_non_refattn_functions():
    with pytest.raises(ValueError, match="return_lse"):
        refattn.vjp(refattn.sdpa, *_qkv(), return_lse=True)
    with pytest.raises(TypeError, match="no refattn backward"):
        refattn.vjp(np.sin, np.ones(3))


def test_bias_gradient_is_summed_to_its_broadcast_shape():
    q, k, v = _qkv()
    bias = np.random.default_rng(1).standard_normal((1, 5, 6))
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, bias=bias, backend="reference")
    grads = pull(np.ones_like(o))
    assert len(grads) == 4 and grads[3].shape == (1, 5, 6)
    check_grads(refattn.sdpa, q, k, v, bias=bias, backend="reference")
