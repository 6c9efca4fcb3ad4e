"""SDPA packed (cu_seqlens) and padded (*_seq_lengths) sequences, mask_mod and score_mod.

Each against its definition written out here (docs/cores/sdpa.md, "Packed and padded
sequences", "Mask and score functions"), by finite differences in float64, numba against the
reference, and against the frameworks they come from on the CPU: jax.nn.dot_product_attention
(padding, local_window_size; forward and gradients) and PyTorch FlexAttention (a soft-cap
score_mod and a sliding-window mask_mod; forward only: torch has no FlexAttention backward on
the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import assert_close, assert_within_reference_error, check_grads

SMALL_TILES = (8, 16)
# sequence 2 has no query; 1 and 4 have equal lengths (one batched call), so have 0 and 5
Q_LENS, K_LENS = (3, 6, 0, 5, 6, 3), (4, 6, 2, 9, 6, 4)


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _packed(seed=0, H=4, Hkv=2, E=6, Ev=5, dtype="float64"):
    rng = np.random.default_rng(seed)
    tq, tk = sum(Q_LENS), sum(K_LENS)
    q = rng.standard_normal((tq, H, E)).astype(dtype)
    k = rng.standard_normal((tk, Hkv, E)).astype(dtype)
    v = rng.standard_normal((tk, Hkv, Ev)).astype(dtype)
    return q, k, v, _cu(Q_LENS), _cu(K_LENS)


def _per_sequence(q, k, v, cq, ck, **options):
    """The definition: each sequence on its own (head-first), then packed back."""
    o = np.zeros(q.shape[:2] + v.shape[2:])
    for n in range(len(cq) - 1):
        if cq[n + 1] == cq[n]:
            continue
        head_first = [x.transpose(1, 0, 2) for x in (q[cq[n]:cq[n + 1]], k[ck[n]:ck[n + 1]],
                                                     v[ck[n]:ck[n + 1]])]
        slopes = options.get("alibi_slopes")
        opts = dict(options, alibi_slopes=None if slopes is None else
                    (slopes if slopes.ndim == 1 else slopes[n]))
        o[cq[n]:cq[n + 1]] = refattn.sdpa(*head_first, backend="reference", **opts) \
            .transpose(1, 0, 2)
    return o


PACKED_OPTIONS = {
    "plain": {},
    "causal lower_right (FlashAttention)": {"causal": True, "causal_align": "lower_right"},
    "causal upper_left": {"causal": True},
    "window + causal + softcap + GQA": {"window": (2, 0), "causal": True,
                                            "causal_align": "lower_right", "softcap": 2.0},
    "alibi (N, H) + window": {"alibi": True, "window": (3, 1), "causal_align": "lower_right"},
}


def _options(name, q, seed=1):
    opts = dict(PACKED_OPTIONS[name])
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = np.random.default_rng(seed).random((len(Q_LENS), q.shape[1])) \
            .astype(q.dtype)
    return opts


@pytest.mark.parametrize("name", sorted(PACKED_OPTIONS))
def test_packed_is_each_sequence_on_its_own(name):
    q, k, v, cq, ck = _packed()
    opts = _options(name, q)
    expected = _per_sequence(q, k, v, cq, ck, **opts)
    for backend in ("reference", "numba"):
        got = refattn.sdpa(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, backend=backend,
                           tiles=SMALL_TILES, **opts)
        assert got.shape == (sum(Q_LENS), 4, 5)
        assert_close(got, expected, "float64", f"{name} on {backend}")


@pytest.mark.parametrize("name", sorted(PACKED_OPTIONS))
def test_packed_gradients_match_finite_differences(name):
    q, k, v, cq, ck = _packed(2)
    report = check_grads(refattn.sdpa, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck,
                         backend="reference", **_options(name, q))
    assert ("alibi_slopes" in {row[0] for row in report.rows}) == ("alibi" in name)


def test_packed_bias_mask_and_lse_are_block_diagonal():
    q, k, v, cq, ck = _packed(3)
    rng = np.random.default_rng(4)
    tq, tk = q.shape[0], k.shape[0]
    bias = rng.standard_normal((4, tq, tk))
    mask = rng.random((tq, tk)) > 0.2
    report = check_grads(refattn.sdpa, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, bias=bias,
                         mask=mask, causal=True, backend="reference")
    assert "bias" in {row[0] for row in report.rows}
    check_grads(refattn.sdpa, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True,
                alibi_slopes=rng.random(4), backend="reference")
    # a bias constant per head is one operand for a group's batched call; its gradient is
    # 0 (softmax ignores a constant per row) but of the bias's shape
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck,
                          bias=rng.standard_normal((4, 1, 1)))
    dbias = pull(np.ones_like(o))[3]
    assert dbias.shape == (4, 1, 1) and np.abs(dbias).max() < 1e-12
    o, res = refattn.cores.sdpa.forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, bias=bias)
    _dq, _dk, _dv, dbias = refattn.cores.sdpa.backward(res, np.ones_like(o))
    block = np.zeros((tq, tk), bool)
    for n in range(len(Q_LENS)):
        block[cq[n]:cq[n + 1], ck[n]:ck[n + 1]] = True
    assert not dbias[:, ~block].any() and dbias[:, block].any()
    _, lse, p = refattn.sdpa(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True,
                             return_probs=True)
    assert lse.shape == (4, tq) and p.shape == (4, tq, tk)
    assert not p[:, ~block].any()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def _padded(seed=0, B=3, H=4, Hkv=2, L=7, S=9, E=6, dtype="float64"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    return q, k, v, np.array([7, 4, 5], np.int32), np.array([9, 5, 7], np.int32)


def _padding_mask(lq, lk, L, S):
    """JAX's definition: key j kept for query i of batch b iff i < Lq[b] and j < Lk[b]."""
    i, j = np.arange(L)[None, :, None], np.arange(S)[None, None, :]
    return ((i < lq[:, None, None]) & (j < lk[:, None, None]))[:, None]       # (B, 1, L, S)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": (2, 1), "softcap": 3.0}],
                         ids=["plain", "causal", "window + softcap"])
def test_padded_is_the_padding_mask_with_padded_rows_zero(options):
    q, k, v, lq, lk = _padded()
    L, S = q.shape[-2], k.shape[-2]
    expected = refattn.sdpa(q, k, v, mask=_padding_mask(lq, lk, L, S), backend="reference",
                            **options)
    for backend in ("reference", "numba"):
        got = refattn.sdpa(q, k, v, query_seq_lengths=lq, key_value_seq_lengths=lk,
                           backend=backend, tiles=SMALL_TILES, **options)
        assert_close(got, expected, "float64", f"padded {options} on {backend}")
    report = check_grads(refattn.sdpa, q, k, v, query_seq_lengths=lq, key_value_seq_lengths=lk,
                         backend="reference", **options)
    assert report.ok


def test_padded_and_packed_layouts_agree_lower_right():
    # The same sequences padded and packed: causal and window aligned at each sequence's end.
    q, k, v, lq, lk = _padded(5)
    opts = {"causal": True, "causal_align": "lower_right", "window": (3, -1)}
    padded = refattn.sdpa(q, k, v, query_seq_lengths=lq, key_value_seq_lengths=lk, **opts)
    pack = lambda x, n: np.concatenate([x[b, :, :n[b]].transpose(1, 0, 2)  # noqa: E731
                                        for b in range(3)])
    packed = refattn.sdpa(pack(q, lq), pack(k, lk), pack(v, lk), cu_seqlens_q=_cu(lq),
                          cu_seqlens_k=_cu(lk), **opts)
    assert_close(pack(padded, lq), packed, "float64")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_gradients_match_the_reference(dtype):
    q64, k64, v64, cq, ck = _packed(6)
    opts = {"window": (2, 1), "causal": True, "causal_align": "lower_right", "softcap": 2.5}

    def run(backend, dt):
        arrays = [x.astype(dt) for x in (q64, k64, v64)]
        o, pull = refattn.vjp(refattn.sdpa, *arrays, cu_seqlens_q=cq, cu_seqlens_k=ck,
                              backend=backend, tiles=SMALL_TILES, **opts)
        return [o, *pull(np.random.default_rng(7).standard_normal(o.shape).astype(dt))]

    expected, got = run("reference", "float64"), run("numba", dtype)
    low = expected if dtype == "float64" else run("reference", dtype)
    scale = max(float(np.abs(e).max()) for e in expected)
    for i, (g, e, lo) in enumerate(zip(got, expected, low)):
        assert g.dtype == dtype
        if dtype == "float64":
            assert_close(g, e, dtype, f"result {i}")
        else:
            assert_within_reference_error(g, e, lo, dtype, f"result {i}", gradient=i > 0,
                                          problem_scale=scale)


# -- mask_mod / score_mod -----------------------------------------------------------------

def _qkv(seed=0, B=2, H=4, L=9, S=11, E=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, L, E)), rng.standard_normal((B, 2, S, E)),
            rng.standard_normal((B, 2, S, E)))


def _cap(score, b, h, i, j):
    return 3.0 * np.tanh(score / 3.0)


def _cap_grad(score, b, h, i, j):
    return 1.0 - np.tanh(score / 3.0) ** 2


def _sliding(b, h, i, j):
    return (j <= i) & (i - j <= 3)


def test_flex_style_functions_equal_the_builtin_options():
    q, k, v = _qkv()
    builtin = refattn.sdpa(q, k, v, softcap=3.0, window=(3, 0), backend="reference")
    for backend in ("reference", "numba"):       # numba routes the callables to the reference
        got = refattn.sdpa(q, k, v, score_mod=_cap, mask_mod=_sliding, backend=backend)
        assert_close(got, builtin, "float64", f"score_mod + mask_mod on {backend}")


def test_score_mod_sees_b_h_i_j_and_is_differentiated():
    q, k, v = _qkv(1)
    L, S = q.shape[-2], k.shape[-2]

    def mod(s, b, h, i, j):                      # depends on every index and on s nonlinearly
        return s + 0.1 * s * s - 0.2 * h * (i - j) + 0.3 * b

    def mod_grad(s, b, h, i, j):
        return 1.0 + 0.2 * s + 0 * (b + h + i + j)

    keep = lambda b, h, i, j: (b + h + i + j) % 5 != 0      # noqa: E731
    raw = q @ np.swapaxes(np.repeat(k, 2, 1), -1, -2) / np.sqrt(q.shape[-1])
    b, h = np.arange(2)[:, None, None, None], np.arange(4)[None, :, None, None]
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    scores = np.where(keep(b, h, i, j), mod(raw, b, h, i, j), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ np.repeat(v, 2, 1)
    got = refattn.sdpa(q, k, v, score_mod=mod, mask_mod=keep)
    assert_close(got, expected, "float64")
    bias = np.random.default_rng(2).standard_normal((4, L, S))
    report = check_grads(refattn.sdpa, q, k, v, score_mod=mod, score_mod_grad=mod_grad,
                         mask_mod=keep, bias=bias, softcap=4.0, backend="reference")
    assert "bias" in {row[0] for row in report.rows}


def test_mask_mod_b_is_the_sequence_index_when_packed():
    q, k, v, cq, ck = _packed(8)
    only_even = lambda b, h, i, j: (b % 2 == 0) | (j == 0)       # noqa: E731
    got = refattn.sdpa(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, mask_mod=only_even)
    o1 = _per_sequence(q, k, v, cq, ck)
    first_key = np.repeat(v[ck[:-1]], np.diff(cq), axis=0).repeat(2, axis=1)   # (Tq, H, Ev)
    for n in range(len(Q_LENS)):
        rows = slice(cq[n], cq[n + 1])
        assert_close(got[rows], o1[rows] if n % 2 == 0 else first_key[rows], "float64")


def test_score_mod_without_its_derivative_says_so_when_differentiated():
    q, k, v = _qkv(3)
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, score_mod=_cap)
    with pytest.raises(ValueError, match="needs its derivative: pass score_mod_grad"):
        pull(np.ones_like(o))
    check_grads(refattn.sdpa, q, k, v, score_mod=_cap, score_mod_grad=_cap_grad)


# -- against the frameworks on the CPU ------------------------------------------------------

def test_jax_padding_and_local_window_forward_and_gradients():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    q, k, v, lq, lk = _padded(9, L=7, S=9)
    lq, lk = np.array([7, 4, 5], np.int32), np.array([9, 6, 7], np.int32)  # no empty valid row
    options = {"window": (2, 1), "causal": True}

    def jax_fn(q_, k_, v_):
        t = lambda x: jnp.transpose(x, (0, 2, 1, 3))                       # noqa: E731
        o = jax.nn.dot_product_attention(t(q_), t(k_), t(v_), is_causal=True,
                                         local_window_size=(2, 1), query_seq_lengths=lq,
                                         key_value_seq_lengths=lk)
        return t(o)

    arrays32 = [x.astype(np.float32) for x in (q, k, v)]
    cot = np.random.default_rng(10).standard_normal(q.shape[:-1] + (v.shape[-1],))
    o_jax, pull = jax.vjp(jax_fn, *map(jnp.asarray, arrays32))
    got = [np.asarray(o_jax)] + [np.asarray(g) for g in pull(jnp.asarray(cot, jnp.float32))]

    def ours(arrays, dt):
        o, back = refattn.vjp(refattn.sdpa, *arrays, query_seq_lengths=lq,
                              key_value_seq_lengths=lk, backend="reference", **options)
        return [o, *back(cot.astype(dt))]

    expected = ours([x.astype(np.float64) for x in arrays32], "float64")
    low = ours(arrays32, "float32")
    assert not got[0][1, :, 4:].any() and not expected[0][1, :, 4:].any()  # padded rows: 0
    scale = max(float(np.abs(e).max()) for e in expected)
    for i, (g, e, lo) in enumerate(zip(got, expected, low)):
        assert_within_reference_error(g, e, lo, "float32", f"jax result {i}", gradient=i > 0,
                                      problem_scale=scale)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_torch_flex_attention_softcap_and_sliding_window_forward():
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(11)
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]

    def softcap(score, b, h, i, j):
        return 3.0 * torch.tanh(score / 3.0)

    def sliding(b, h, i, j):
        return (j <= i) & (i - j <= 3)

    block_mask = flex.create_block_mask(sliding, B, H, L, S, device="cpu")
    o = flex.flex_attention(*(torch.from_numpy(x) for x in (q, k, v)), score_mod=softcap,
                            block_mask=block_mask, enable_gqa=True)
    assert o.dtype == torch.float64
    for opts in ({"score_mod": _cap, "mask_mod": _sliding}, {"softcap": 3.0, "window": (3, 0)}):
        assert_close(o.numpy(), refattn.sdpa(q, k, v, **opts), "float64", f"flex vs {opts}")


# -- bad values ---------------------------------------------------------------------------

def _bad_packed(**changes):
    q, k, v, cq, ck = _packed()
    args = {"cu_seqlens_q": cq, "cu_seqlens_k": ck}
    args.update(changes)
    return lambda: refattn.sdpa(q, k, v, **args)


@pytest.mark.parametrize("call, error, message", [
    (_bad_packed(cu_seqlens_q=np.array([0.0, 14.0])), TypeError,
     "cu_seqlens_q must be an integer array, got dtype float64"),
    (_bad_packed(cu_seqlens_k=np.array([1, 4, 10, 12, 21])), ValueError,
     r"cu_seqlens_k must start at 0, got cu_seqlens_k\[0\] = 1"),
    (_bad_packed(cu_seqlens_q=np.array([0, 3, 2, 9, 14])), ValueError,
     r"cu_seqlens_q must be non-decreasing .* cu_seqlens_q\[2\] = 2 < cu_seqlens_q\[1\] = 3"),
    (_bad_packed(cu_seqlens_q=np.array([0, 3, 9, 9, 13])), ValueError,
     r"cu_seqlens_q must end at the total token count q.shape\[0\] = 23, got .* = 13"),
    (_bad_packed(cu_seqlens_k=np.array([0, 31])), ValueError,
     "must describe as many sequences"),
    (_bad_packed(cu_seqlens_k=None), ValueError, "cu_seqlens_k is missing"),
    (_bad_packed(query_seq_lengths=np.array([1])), ValueError, "not both"),
    (_bad_packed(alibi_slopes=np.ones((3, 4))), ValueError,
     r"alibi_slopes must have shape \(H,\) = \(4,\) or \(N sequences, H\) = \(6, 4\)"),
    (_bad_packed(bias=np.ones((4, 23, 20))), ValueError,
     r"bias of shape \(4, 23, 20\) does not broadcast to \(H, total_q, total_k\)"),
    (lambda: refattn.sdpa(*_qkv(), cu_seqlens_q=np.array([0, 9]), cu_seqlens_k=np.array([0, 11])),
     ValueError, r"q must have FlashAttention's packed shape \(total_q, H, E\)"),
    (lambda: refattn.sdpa(*_qkv(), query_seq_lengths=np.array([3, 10])), ValueError,
     r"query_seq_lengths must lie in \[0, L = 9\], got values from 3 to 10"),
    (lambda: refattn.sdpa(*_qkv(), key_value_seq_lengths=np.array([3, -1])), ValueError,
     r"key_value_seq_lengths must lie in \[0, S = 11\]"),
    (lambda: refattn.sdpa(*_qkv(), key_value_seq_lengths=np.array([3])), ValueError,
     r"key_value_seq_lengths must have the batch shape \(2,\) of q, got \(1,\)"),
    (lambda: refattn.sdpa(*_qkv(), query_seq_lengths="3"), TypeError,
     "query_seq_lengths must be an integer array, got str"),
    (lambda: refattn.sdpa(*_qkv(), mask_mod=3), TypeError,
     r"mask_mod must be None or a callable \(b, h, i, j\) -> bool array, got int"),
    (lambda: refattn.sdpa(*_qkv(), score_mod="tanh"), TypeError,
     "score_mod must be None or a callable"),
    (lambda: refattn.sdpa(*_qkv(), score_mod_grad=_cap_grad), ValueError,
     "score_mod_grad= is the derivative of score_mod=, which is missing"),
    (lambda: refattn.sdpa(*_qkv(), mask_mod=lambda b, h, i, j: i - j,
                          backend="reference"), TypeError,
     r"mask_mod\(b, h, i, j\) must be a boolean array, got dtype int64"),
    (lambda: refattn.sdpa(*_qkv(), mask_mod=lambda b, h, i, j: np.ones((3, 1), bool),
                          backend="reference"), ValueError,
     r"mask_mod\(b, h, i, j\) of shape \(3, 1\) does not broadcast to \(B, H, L, S\)"),
    # the array functions' checks (reference backend); numba's own: test_sdpa_mods_numba.py
    (lambda: refattn.sdpa(*_qkv(), score_mod=lambda s, b, h, i, j: s > 0,
                          backend="reference"), TypeError,
     r"score_mod\(score, b, h, i, j\) must be a real floating-point array"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_values_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_layer_passes_padding_and_functions_through():
    layer = refattn.Attention(16, 4, causal=True, softcap=5.0)
    params = layer.init(seed=0)
    x = np.random.default_rng(12).standard_normal((2, 6, 16))
    lengths = np.array([6, 3])
    padded = refattn.Attention(16, 4, causal=True, softcap=5.0, query_seq_lengths=lengths,
                               key_value_seq_lengths=lengths)
    y = padded(params, x)
    assert_close(y[1, :3], layer(params, x[1:, :3])[0], "float64")
    assert_close(y[0], layer(params, x[:1])[0], "float64")
    moded = refattn.Attention(16, 4, score_mod=_cap, score_mod_grad=_cap_grad,
                              mask_mod=_sliding)
    builtin = refattn.Attention(16, 4, softcap=3.0, window=(3, 0))
    assert_close(moded(params, x), builtin(params, x), "float64")
    check_grads(moded, params, x)


def test_varlen_study_reports_every_tracked_metric(monkeypatch):
    """The study's plumbing on a tiny size (its timings are not asserted: shared machines)."""
    from refattn.bench import sdpa_varlen

    monkeypatch.setattr(sdpa_varlen, "_SIZES", {"quick": 256})
    result = sdpa_varlen.STUDY.run("quick")
    assert set(result.metrics) == set(sdpa_varlen.STUDY.metric_names)
    assert all(np.isfinite(x) and x >= 0 for x in result.metrics.values())
