"""Empty-row policies (``empty_rows="zero" | "uniform" | "nan"``) of the softmax cores.

Against real PyTorch autograd on ``scores.masked_fill(~keep, finfo.min | -inf)``, by
float64 finite differences, across backends, and the row detection against the
log-sum-exp the kernels return.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
from refattn._empty_rows import empty_rows
from refattn.cores.sdpa.api import prepare
from refattn.testing import check_grads

torch = pytest.importorskip("torch")

FILLS = {"uniform": torch.finfo(torch.float64).min, "nan": -math.inf}
BACKENDS = ("reference", "numba")


def _problem(seed=0, B=2, H=4, Hkv=2, L=5, S=6, E=3):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, E)))
    mask = rng.random((B, 1, L, S)) > 0.3
    mask[0, 0, 1] = False                                   # an empty row in batch 0 only
    mask[-1, 0, 3] = False
    return rng, q, k, v, mask


def _torch_sdpa(q, k, v, keep, fill, do, dropout=None, dropout_p=0.0):
    """float64 PyTorch ``softmax(masked_fill(scores, ~keep, fill)) v`` and its autograd."""
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1)
    s = tq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = s.masked_fill(~torch.tensor(keep), fill).softmax(-1)
    if dropout is not None:
        p = p * torch.tensor(dropout) / (1 - dropout_p)
    o = p @ vv
    grads = torch.autograd.grad(o, (tq, tk, tv), torch.tensor(do))
    return o.detach().numpy(), [g.numpy() for g in grads]


def _assert_same(got, expected):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(expected), rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_sdpa_matches_torch_fill(policy, causal, backend):
    rng, q, k, v, mask = _problem()
    L, S = q.shape[-2], k.shape[-2]
    keep = mask & np.tril(np.ones((L, S), bool), S - L) if causal else mask
    do = rng.standard_normal(q.shape)
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, mask=mask, causal=causal,
                              causal_align="lower_right", empty_rows=policy, backend=backend)
    t_o, t_grads = _torch_sdpa(q, k, v, keep, FILLS[policy], do)
    _assert_same(o, t_o)
    for got, expected in zip(pullback(do), t_grads):
        _assert_same(got, expected)
    assert np.isnan(o).any() == (policy == "nan")


def test_uniform_with_dropout_matches_torch():
    rng, q, k, v, mask = _problem(1)
    dropout = rng.random((2, 4, 5, 6)) > 0.25
    do = rng.standard_normal(q.shape)
    o, pullback = refattn.vjp(refattn.sdpa, q, k, v, mask=mask, dropout_mask=dropout,
                              dropout_p=0.25, empty_rows="uniform")
    t_o, t_grads = _torch_sdpa(q, k, v, mask, FILLS["uniform"], do, dropout, 0.25)
    _assert_same(o, t_o)
    for got, expected in zip(pullback(do), t_grads):
        _assert_same(got, expected)


def test_zero_is_the_default_and_unchanged():
    _, q, k, v, mask = _problem()
    np.testing.assert_array_equal(refattn.sdpa(q, k, v, mask=mask),
                                  refattn.sdpa(q, k, v, mask=mask, empty_rows="zero"))
    assert np.all(refattn.sdpa(q, k, v, mask=mask)[0, :, 1] == 0)


@pytest.mark.parametrize("policy", ["zero", "uniform"])
def test_sdpa_uniform_finite_differences(policy):
    _, q, k, v, mask = _problem(2, B=1, H=2, Hkv=1, L=4, S=5, E=2)
    bias = np.random.default_rng(3).standard_normal((1, 2, 4, 5))
    check_grads(refattn.sdpa, q, k, v, bias=bias, backend="reference", mask=mask, causal=True,
                causal_align="lower_right", empty_rows=policy)


@pytest.mark.parametrize("mode", ["shared", "hamilton"])
def test_quaternion_uniform_rows_and_finite_differences(mode):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 3, 4, 2), (1, 2, 4, 4, 2), (1, 2, 4, 4, 2)))
    mask = rng.random((3, 4)) > 0.3
    mask[:, 0], mask[2] = True, False
    o = refattn.quaternion_attention(q, k, v, mode=mode, mask=mask, empty_rows="uniform")
    np.testing.assert_allclose(o[:, :, 2], v.mean(axis=2), rtol=1e-13, atol=1e-14)
    zero = refattn.quaternion_attention(q, k, v, mode=mode, mask=mask)
    np.testing.assert_array_equal(o[:, :, :2], zero[:, :, :2])
    check_grads(refattn.quaternion_attention, q, k, v, backend="reference", mode=mode, mask=mask,
                empty_rows="uniform")
    nan = refattn.quaternion_attention(q, k, v, mode=mode, mask=mask, empty_rows="nan")
    assert np.isnan(nan[:, :, 2]).all() and not np.isnan(nan[:, :, :2]).any()


@pytest.mark.parametrize("mode", ["shared", "hamilton"])
@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_quaternion_backends_agree(mode, policy):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((2, 2, 5, 4, 2), (2, 1, 6, 4, 2), (2, 1, 6, 4, 2)))
    mask = rng.random((2, 1, 1, 6)) > 0.3
    mask[0, ..., 0], mask[1] = True, False           # batch 0: every causal row keeps key 0
    do = rng.standard_normal((2, 2, 5, 4, 2))
    results = []
    for backend in BACKENDS:
        o, pullback = refattn.vjp(refattn.quaternion_attention, q, k, v, mode=mode, mask=mask,
                                  causal=True, empty_rows=policy, backend=backend)
        results.append((o, *pullback(do)))
    for got, expected in zip(*results):
        _assert_same(got, expected)
    _, dq, dk, dv = results[0]
    assert np.isfinite(dq).all() and np.isfinite(dk).all()     # masked_fill's zero pullback
    # batch 1 is all padding: NaN values gradient there (policy "nan") and nowhere else
    assert np.isnan(dv[1]).all() == (policy == "nan") and np.isfinite(dv[0]).all()


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_preconditioned_backends_agree(policy):
    rng, q, k, v, mask = _problem(10)
    do = rng.standard_normal(q.shape)
    results = []
    for backend in BACKENDS:
        o, pullback = refattn.vjp(refattn.preconditioned_sdpa, q, k, v, mask=mask,
                                  stop_gradient=False, empty_rows=policy, backend=backend)
        results.append((o, *pullback(do)))
    for got, expected in zip(*results):
        _assert_same(got, expected)


def test_preconditioned_inherits_the_policy():
    _, q, k, v, mask = _problem(6, B=1, H=2, Hkv=2, L=4, S=5, E=3)
    a = refattn.sdpa(q, k, v, mask=mask, empty_rows="uniform")
    o, c = refattn.preconditioned_sdpa(q, k, v, mask=mask, empty_rows="uniform",
                                       return_diagonal=True)
    np.testing.assert_allclose(o, c[..., None] * a, rtol=1e-13)
    assert np.all(np.abs(o[0, :, 1]) > 0)                  # the uniform row is not zero
    check_grads(refattn.preconditioned_sdpa, q, k, v, backend="reference", mask=mask,
                stop_gradient=False, empty_rows="uniform")
    nan = refattn.preconditioned_sdpa(q, k, v, mask=mask, empty_rows="nan")
    assert np.isnan(nan[0, :, 1]).all() and not np.isnan(nan[0, :, 0]).any()


@pytest.mark.parametrize("options", [
    {"causal": True, "causal_align": "lower_right"},
    {"window": (1, 0)},
    {"window": (0, -1), "causal": True},
    {"mask": "keys"},
    {"mask": "rows", "causal": True},
    {"bias": "-inf"},
])
def test_detected_rows_are_the_kernels_empty_rows(options):
    """The rows :func:`empty_rows` finds are exactly those whose log-sum-exp is -inf."""
    rng = np.random.default_rng(7)
    B, H, L, S = 2, 3, 6, 4
    q, k, v = rng.standard_normal((B, H, L, 2)), rng.standard_normal((B, H, S, 2)), \
        rng.standard_normal((B, H, S, 2))
    options = dict(options)
    if options.get("mask") == "keys":
        options["mask"] = rng.random((B, 1, 1, S)) > 0.6
        options["mask"][1] = False                          # a sequence that is all padding
    elif options.get("mask") == "rows":
        options["mask"] = rng.random((B, H, L, S)) > 0.5
        options["mask"][0, 1, 2] = False
    if options.get("bias") == "-inf":
        bias = rng.standard_normal((B, 1, L, S))
        bias[rng.random((B, 1, L, S)) > 0.4] = -np.inf
        bias[1, 0, 4] = -np.inf                             # a row masked by the bias alone
        options["bias"] = bias
    _, lse = refattn.sdpa(q, k, v, return_lse=True, **options)
    _, _, opts = prepare(q, k, v, **options)
    rows = empty_rows(np, opts, L, S)
    expected = np.isneginf(lse)
    assert expected.any()
    np.testing.assert_array_equal(np.broadcast_to(rows, expected.shape), expected)


def test_no_empty_row_and_no_key():
    rng = np.random.default_rng(8)
    q, k = rng.standard_normal((1, 1, 3, 2)), rng.standard_normal((1, 1, 4, 2))
    _, _, opts = prepare(q, k, k, causal=True)
    assert empty_rows(np, opts, 3, 4) is None
    none = np.zeros((1, 1, 0, 2))
    for policy in ("uniform", "nan"):                      # S = 0: the empty sum, 0
        np.testing.assert_array_equal(refattn.sdpa(q, none, none, empty_rows=policy),
                                      np.zeros((1, 1, 3, 2)))


def test_bad_policy_is_named():
    _, q, k, v, _ = _problem()
    with pytest.raises(ValueError, match=r"empty_rows must be one of \('zero', 'uniform', 'nan'\)"):
        refattn.sdpa(q, k, v, empty_rows="mean")
    with pytest.raises(ValueError, match=r"empty_rows must be one of"):
        refattn.quaternion_attention(np.zeros((1, 2, 4, 1)), np.zeros((1, 2, 4, 1)),
                                     np.zeros((1, 2, 4, 1)), empty_rows=None)


@pytest.mark.parametrize("core", ["sdpa", "shared"])
def test_layer_with_uniform_rows_finite_differences(core):
    """The layer option reaches the core: the official module's configuration, by FD."""
    rng = np.random.default_rng(9)
    projection = "quaternion" if core == "shared" else "standard"
    extra = {"head_layout": "chunks"} if core == "shared" else {}
    layer = refattn.Attention(16, 2, projection=projection, core=core, bias=True,
                              empty_rows="uniform", **extra)
    mask = rng.random((4, 4)) > 0.3
    mask[:, 0], mask[2] = True, False
    params, x = layer.init(seed=1), rng.standard_normal((1, 4, 16))
    y = layer(params, x, mask=mask)
    zero = refattn.Attention(16, 2, projection=projection, core=core, bias=True, **extra)
    assert np.max(np.abs(y[0, 2] - zero(params, x, mask=mask)[0, 2])) > 1e-3
    check_grads(layer, params, x, backend="reference", mask=mask)
