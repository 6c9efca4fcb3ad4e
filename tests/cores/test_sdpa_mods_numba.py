"""FlexAttention-style ``mask_mod`` / ``score_mod`` on the numba SDPA kernels.

The numba kernels call the functions pair by pair, tile by tile
(:mod:`refattn.cores.sdpa.numba_mods`).  Checked in float64 against the reference backend
given the equivalent built-in options (the mask ``mask_mod`` describes; ``score_mod`` =
soft-cap minus a position term = ``softcap`` plus a bias), against the definition written
out (``score_mod`` after soft-cap, bias and ALiBi; a ``-inf`` bias masks), by finite
differences of the numba forward pass, and for the default path's cache.

Every test uses one set of functions, compiled once for the module (a call with a subset of
the functions reuses the kernels of the full set): each new set of functions costs a
compile of the forward and backward kernels (10-30 s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import refattn
from refattn._vjp import attach_vjp
from refattn.cores.sdpa import api, numba_mods
from refattn.cores.sdpa import numba as sdpa_numba
from refattn.cores.sdpa import reference as sdpa_reference
from refattn.testing import assert_close, check_grads

ROOT = Path(__file__).resolve().parents[2]
#: Small tiles: the problems below span several tiles, diagonals and window edges cross them.
TILES = (8, 4)
CAP = 3.0
POSITION = 0.1


def mask_mod(b, h, i, j):
    """A causal band widened for some (b, h); the rows ``i % 7 == 3`` keep no key."""
    return ((j <= i + 2) | ((b + h) % 3 == 0)) & (i % 7 != 3)


def score_mod(score, b, h, i, j):
    """Soft-cap, then an ALiBi-like position term of slope ``POSITION (h + 1)``."""
    return CAP * np.tanh(score / CAP) - POSITION * (h + 1) * np.abs(i - j)


def score_mod_grad(score, b, h, i, j):
    """``d score_mod / d score``."""
    return 1 - np.tanh(score / CAP) ** 2


def _indices(B, H, L, S):
    return np.ix_(np.arange(B), np.arange(H), np.arange(L), np.arange(S))


def _problem(seed=0, B=2, H=4, Hkv=2, L=23, S=27, E=5, Ev=3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, E))
    k = rng.standard_normal((B, Hkv, S, E))
    v = rng.standard_normal((B, Hkv, S, Ev))
    return q, k, v, rng.standard_normal((B, H, L, Ev))


def _options(q, k, v, **kw):
    """The validated :class:`SDPAOptions` of ``sdpa(q, k, v, **kw)`` (front end's rules)."""
    mods = {name: kw.pop(name) for name in ("mask_mod", "score_mod", "score_mod_grad")
            if name in kw}
    _, _, opts = api.prepare(q, k, v, **kw)
    return dataclasses.replace(opts, tiles=TILES, **mods)


def _both_passes(backend, q, k, v, do, opts):
    o, lse = backend.forward(q, k, v, opts)
    return (o, lse) + tuple(backend.backward(q, k, v, o, lse, do, opts))


def _compare(got, expected, what):
    names = ("o", "lse", "dq", "dk", "dv", "dscores", "dslopes")
    for name, g, e in zip(names, got, expected):
        assert (g is None) == (e is None), f"{what}: {name}"
        if g is not None:
            assert_close(g, e, "float64", f"{what}: {name}")


@pytest.fixture(scope="module")
def compiled():
    """The kernels bound to the three functions, built (and compiled at first call) once."""
    q, k, v, do = _problem()
    opts = _options(q, k, v, mask_mod=mask_mod, score_mod=score_mod,
                    score_mod_grad=score_mod_grad)
    _both_passes(sdpa_numba, q, k, v, do, opts)
    return sdpa_numba._kernels(opts, np.dtype("float64"))


def _mask_array(B, H, L, S):
    return np.broadcast_to(mask_mod(*_indices(B, H, L, S)), (B, H, L, S))


def _position_bias(H, L, S):
    _, h, i, j = _indices(1, H, L, S)
    return -POSITION * (h + 1) * np.abs(i - j) + 0.0 * j     # (1, H, L, S)


def test_mask_mod_alone_is_the_mask_it_describes(compiled):
    q, k, v, do = _problem(1)
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    opts = _options(q, k, v, mask_mod=mask_mod)
    assert sdpa_numba._kernels(opts, np.dtype("float64")) is compiled   # the set is reused
    got = _both_passes(sdpa_numba, q, k, v, do, opts)
    expected = _both_passes(sdpa_reference, q, k, v, do,
                            _options(q, k, v, mask=_mask_array(B, H, L, S)))
    _compare(got, expected, "mask_mod")
    empty = np.arange(L) % 7 == 3                   # fully masked rows: o = 0, lse = -inf
    assert np.all(got[0][:, :, empty] == 0) and np.all(got[1][:, :, empty] == -np.inf)
    assert np.all(got[2][:, :, empty] == 0)


def test_score_mod_alone_is_softcap_plus_a_position_bias(compiled):
    q, k, v, do = _problem(2)
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    opts = _options(q, k, v, score_mod=score_mod, score_mod_grad=score_mod_grad)
    got = _both_passes(sdpa_numba, q, k, v, do, opts)
    ref = _options(q, k, v, softcap=CAP, bias=_position_bias(H, L, S))
    expected = _both_passes(sdpa_reference, q, k, v, do, dataclasses.replace(
        ref, need_bias_grad=False))
    _compare(got, expected, "score_mod")


@pytest.mark.parametrize("causal_align, window", [("upper_left", None),
                                                   ("lower_right", (5, 2)),
                                                   ("upper_left", (3, -1))])
def test_both_functions_with_causal_gqa_and_window(compiled, causal_align, window):
    q, k, v, do = _problem(3, B=2, H=6, Hkv=2, L=21, S=30)
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    common = {"causal": True, "causal_align": causal_align, "window": window}
    opts = _options(q, k, v, mask_mod=mask_mod, score_mod=score_mod,
                    score_mod_grad=score_mod_grad, **common)
    got = _both_passes(sdpa_numba, q, k, v, do, opts)
    ref = _options(q, k, v, mask=_mask_array(B, H, L, S), softcap=CAP,
                   bias=_position_bias(H, L, S), **common)
    expected = _both_passes(sdpa_reference, q, k, v, do, dataclasses.replace(
        ref, need_bias_grad=False))
    _compare(got, expected, f"mask_mod + score_mod, causal {causal_align}, window {window}")


def _definition(q, k, v, scale, bias, slopes):
    """``o`` and ``lse`` of ``softmax(score_mod(cap(R) + bias - slope |i + S - L - j|))``
    over the pairs ``mask_mod`` and ``bias != -inf`` keep, written out (float64)."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    b, h, i, j = _indices(B, H, L, S)
    u = (CAP * np.tanh(scale * q @ kh.swapaxes(-1, -2) / CAP) + bias
         - slopes[:, None, None] * np.abs(i + S - L - j))
    keep = mask_mod(b, h, i, j) & (bias != -np.inf)
    s = np.where(keep, score_mod(np.where(keep, u, 0.0), b, h, i, j), -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(total > 0, (p / np.where(total > 0, total, 1)) @ vh, 0.0)
        lse = np.where(total[..., 0] > 0, top[..., 0] + np.log(total[..., 0]), -np.inf)
    return o, lse


def test_score_mod_comes_after_softcap_bias_and_alibi(compiled):
    q, k, v, _ = _problem(4)
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    rng = np.random.default_rng(5)
    bias = rng.standard_normal((B, H, L, S))
    bias[..., 2::5] = -np.inf                     # masks its pairs whatever score_mod gives
    slopes = rng.random(H)
    opts = _options(q, k, v, mask_mod=mask_mod, score_mod=score_mod,
                    score_mod_grad=score_mod_grad, softcap=CAP, bias=bias, alibi_slopes=slopes)
    o, lse = sdpa_numba.forward(q, k, v, opts)
    o_def, lse_def = _definition(q, k, v, opts.scale, bias, slopes)
    assert_close(o, o_def, "float64", "o")
    assert_close(lse, lse_def, "float64", "lse")


def _flex_forward(q, k, v, *, bias=None, alibi_slopes=None, **kw):
    opts = _options(q, k, v, bias=bias, alibi_slopes=alibi_slopes, mask_mod=mask_mod,
                    score_mod=score_mod, score_mod_grad=score_mod_grad, **kw)
    o, lse = sdpa_numba.forward(q, k, v, opts)
    return o, (q, k, v, o, lse, opts)


def _flex_backward(res, do):
    q, k, v, o, lse, opts = res
    dq, dk, dv, dscores, dslopes = sdpa_numba.backward(q, k, v, o, lse, do, opts)
    extra = () if dscores is None else (dscores,)
    return (dq, dk, dv) + extra + (() if dslopes is None else (dslopes.sum(axis=0),))


def numba_flex_sdpa(q, k, v, **kw):
    """sdpa on the numba kernels with the three functions of this module (for check_grads)."""
    return _flex_forward(q, k, v, **kw)[0]


attach_vjp(numba_flex_sdpa, _flex_forward, _flex_backward)


def test_gradients_match_finite_differences(compiled):
    """Through score_mod_grad, the soft-cap, the bias and the ALiBi slopes, with causal + GQA."""
    q, k, v, _ = _problem(6, B=1, H=4, Hkv=2, L=11, S=13, E=4, Ev=3)
    rng = np.random.default_rng(7)
    bias = rng.standard_normal((1, 4, 11, 13))
    report = check_grads(numba_flex_sdpa, q, k, v, bias=bias, alibi_slopes=rng.random(4),
                         causal=True, causal_align="lower_right", softcap=CAP)
    assert {row[0] for row in report.rows} >= {"input 0", "input 1", "input 2", "bias",
                                               "alibi_slopes"}


def test_the_slope_gradient_through_score_mod_far_from_the_alibi_diagonal(compiled):
    # score_mod_grad scales dS pair by pair: its rows no longer sum to 0, so the slope
    # gradient may not take each row's centre off its terms.  Causal upper-left with L < S
    # puts every kept key S - L or more from the ALiBi diagonal j = i + S - L (the centres
    # are far from 0: the slopes' gradient was off by O(1) when they were taken off).
    q, k, v, do = _problem(8, L=11, S=29)
    slopes = 0.05 + 0.5 * np.random.default_rng(9).random((2, 4, 1, 1))
    opts = dataclasses.replace(_options(q, k, v, causal=True, mask_mod=mask_mod,
                                        score_mod=score_mod, score_mod_grad=score_mod_grad),
                               alibi=slopes, need_alibi_grad=True)
    _compare(_both_passes(sdpa_numba, q, k, v, do, opts),
             _both_passes(sdpa_reference, q, k, v, do, opts), "alibi + score_mod, L < S")


def test_the_backward_pass_needs_score_mod_grad(compiled):
    q, k, v, do = _problem()
    opts = _options(q, k, v, score_mod=score_mod)
    o, lse = sdpa_numba.forward(q, k, v, opts)
    with pytest.raises(ValueError, match="score_mod_grad"):
        sdpa_numba.backward(q, k, v, o, lse, do, opts)


class _NotAFunction:
    def __call__(self, b, h, i, j):
        return j <= i


@pytest.mark.parametrize("name, fn, message", [
    ("mask_mod", lambda b, h, i, j: object() is None, "numba could not compile it"),
    ("mask_mod", lambda b, h, i, j: 0.5 * i, "must return a bool"),
    ("mask_mod", _NotAFunction(), "numba cannot jit it"),
    ("score_mod", lambda score, b: score, "numba could not compile it"),
    ("score_mod", lambda score, b, h, i, j: np.ones(3) * score, "must return a number"),
])
def test_functions_numba_cannot_compile_are_type_errors(name, fn, message):
    q, k, v, _ = _problem()
    opts = _options(q, k, v, **{name: fn})
    with pytest.raises(TypeError, match=f"{name}= on the numba backend needs a scalar, "
                                        f"numba-compilable function.*{message}.*"
                                        "backend='reference'"):
        sdpa_numba.forward(q, k, v, opts)


def test_default_path_stays_cached_and_untouched(compiled):
    q, k, v, do = _problem()
    plain = _options(q, k, v, causal=True)
    _both_passes(sdpa_numba, q, k, v, do, plain)     # compiles (and saves) or loads them
    signatures = [list(sdpa_numba._DEFAULT_KERNELS[n].signatures)
                  for n in sdpa_numba.MOD_KERNELS]
    _both_passes(sdpa_numba, q, k, v, do, _options(q, k, v, mask_mod=mask_mod, causal=True))
    assert all(compiled[n] is not sdpa_numba._DEFAULT_KERNELS[n]
               for n in sdpa_numba.MOD_KERNELS)
    assert signatures == [list(sdpa_numba._DEFAULT_KERNELS[n].signatures)
                          for n in sdpa_numba.MOD_KERNELS]   # no signature added to them
    assert numba_mods.FUNCTIONS["mask_mod"][0] in vars(sdpa_numba)
    # A fresh process loads the default kernels from the cache: no compile.
    script = """
        import json, numpy as np
        from refattn.cores.sdpa import api, numba as m
        rng = np.random.default_rng(0)
        q, k, v, do = (rng.standard_normal(shape) for shape in
                       ((2, 4, 23, 5), (2, 2, 27, 5), (2, 2, 27, 3), (2, 4, 23, 3)))
        _, _, opts = api.prepare(q, k, v, causal=True, tiles=(8, 4))
        o, lse = m.forward(q, k, v, opts)
        m.backward(q, k, v, o, lse, do, opts)
        print(json.dumps({n: [sum(m._DEFAULT_KERNELS[n].stats.cache_hits.values()),
                              sum(m._DEFAULT_KERNELS[n].stats.cache_misses.values())]
                          for n in ("_forward_kernel", "_backward_kernel")}))
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=False,
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats == {"_forward_kernel": [1, 0], "_backward_kernel": [1, 0]}, stats


def test_public_sdpa_runs_the_functions_on_numba_like_the_reference():
    """``refattn.sdpa(..., backend="numba")`` evaluates plain Python functions in the kernel."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 64, 16)) for _ in range(3))

    def near(b, h, i, j):
        return (i - j) <= 8

    def decay(s, b, h, i, j):
        return s - 0.1 * (h + 1) * abs(i - j)

    def decay_grad(s, b, h, i, j):
        return 1.0 + 0.0 * s

    kw = dict(mask_mod=near, score_mod=decay, score_mod_grad=decay_grad)
    outs = {}
    for backend in ("reference", "numba"):
        o, pullback = refattn.vjp(refattn.sdpa, q, k, v, backend=backend, **kw)
        outs[backend] = (o, *pullback(np.cos(o)))
    for got, expected in zip(outs["numba"], outs["reference"]):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
