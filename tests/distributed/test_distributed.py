"""refattn.distributed: sharded results equal the single-machine calls (float64, 1e-12).

Every core, option and chunking (uneven chunks included), forward and every
gradient, on the threaded scheduler; a subset, the layer and a worker killed
mid-computation on a ``LocalCluster`` of two worker processes (real
serialisation), started once for the module.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import refattn
from refattn import distributed as rd
from refattn._masks import (
    alibi_distance,
    causal_keep,
    causal_offset,
    window_bounds,
    window_keep,
)
from refattn.distributed._block_tasks import probs_block
from refattn.distributed.geometry import alibi_distance_block, alibi_offset

RTOL = 1e-12


def assert_close(got, want, what="", scale=0.0):
    """``max |got - want| <= RTOL * max(max |want|, scale)``, and the same infinities and NaNs.

    ``scale`` stands in for arrays that are zero in exact arithmetic (the
    gradient of a key bias, which softmax ignores, is rounding noise).
    """
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    inf, nan = np.isinf(want), np.isnan(want)
    np.testing.assert_array_equal(np.isinf(got), inf, err_msg=what)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
    g, w = np.where(inf | nan, 0.0, got), np.where(inf | nan, 0.0, want)
    scale = max(float(np.max(np.abs(w), initial=0.0)), scale, 1e-300)
    err = float(np.max(np.abs(g - w), initial=0.0)) / scale
    assert err <= RTOL, f"{what}: relative error {err:.2e}"


def check_vjp(fn, arrays, chunks, options, scheduler="threads", seed=1):
    """Sharded forward, output and every gradient against ``refattn.vjp`` on one machine."""
    sharded = [da.from_array(x, chunks=c) for x, c in zip(arrays, chunks)]
    out, pullback = rd.vjp(fn, *sharded, **options)
    want, want_pullback = refattn.vjp(fn, *arrays, **options)
    dout = np.random.default_rng(seed).standard_normal(want.shape)
    grads = pullback(da.from_array(dout, chunks=out.chunks))
    got = dask.compute(out, *grads, scheduler=scheduler)
    want_grads = want_pullback(dout)
    assert len(got) == 1 + len(want_grads)
    names = ("o", "dq", "dk", "dv") + tuple(n for n in ("bias", "alibi_slopes")
                                            if options.get(n) is not None)
    for name, g, w in zip(names, got, (want,) + tuple(want_grads)):
        assert_close(g, w, name)
    return out, grads


# -- problems -------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
L, S = 13, 11
MASK = RNG.random((L, S)) > 0.3
MASK[3] = False                                               # a fully masked row
BIAS = RNG.standard_normal((1, 4, L, S))
DROP = RNG.random((3, 1, L, S)) > 0.2
KEY_MASK = RNG.random((2, 1, 1, 20)) > 0.3
KEY_MASK[1] = False                                           # batch 1: every key masked out


def qkv(batch, H, Hkv, L, S, E, Ev, quaternion=False):
    rng = np.random.default_rng(len(batch) + H + L)
    tail = (lambda n: (4, n)) if quaternion else (lambda n: (n,))
    return (rng.standard_normal((*batch, H, L, *tail(E))),
            rng.standard_normal((*batch, Hkv, S, *tail(E))),
            rng.standard_normal((*batch, Hkv, S, *tail(Ev))))


SDPA_OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "causal lower_right": {"causal": True, "causal_align": "lower_right"},
    "mask (empty row) + causal + bias": {"mask": MASK, "causal": True, "bias": BIAS},
    "2-D bias, scale": {"bias": BIAS[0, 0], "scale": 0.3},
    "dropout + bias per head": {"dropout_mask": DROP, "dropout_p": 0.2, "bias": BIAS[0]},
    "numba tiles 4 x 4, causal": {"tiles": (4, 4), "causal": True},
}
#: (q chunks, k chunks): batch/head only; uneven key blocks; uneven query and key blocks.
SDPA_CHUNKS = {
    "batch/head": ((2, 2, L, 8), (2, 1, S, 8)),
    "keys uneven": ((3, 4, L, 8), (3, 2, (4, 4, 3), 8)),
    "queries and keys uneven": ((1, 2, (5, 3, 5), 8), (2, 1, (2, 6, 3), 8)),
}


@pytest.mark.parametrize("chunks", SDPA_CHUNKS.values(), ids=SDPA_CHUNKS.keys())
@pytest.mark.parametrize("options", SDPA_OPTIONS.values(), ids=SDPA_OPTIONS.keys())
def test_sdpa_equals_single_machine(options, chunks):
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)                     # GQA 4/2
    qc, kc = chunks
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)), options)
    o, lse = rd.sdpa(*(da.from_array(x, chunks=c) for x, c in zip((q, k, v), (qc, kc, kc))),
                     return_lse=True, **options)
    want_o, want_lse = refattn.sdpa(q, k, v, return_lse=True, **options)
    got_o, got_lse = dask.compute(o, lse, scheduler="threads")
    assert_close(got_o, want_o, "o")
    assert_close(got_lse, want_lse, "lse")


@pytest.mark.parametrize("batch, H, Hkv, qc, kc", [
    ((), 2, 1, (2, (1, 4, 2), 4), (1, (3, 4), 4)),            # no batch dims, MQA
    ((2, 3), 2, 2, (1, (1, 2), 1, (4, 3), 4), (2, (2, 1), 2, 4, 4)),   # two batch dims
])
def test_sdpa_batch_layouts(batch, H, Hkv, qc, kc):
    q, k, v = qkv(batch, H, Hkv, 7, 7, 4, 4)
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc), {"causal": True})


def test_rows_empty_in_every_block():
    """lower_right with L > S: the first rows see no key in any block, o = 0, lse = -inf."""
    q, k, v = qkv((1,), 2, 2, 12, 5, 4, 4)
    chunks = ((1, 2, 4, 4), (1, 2, (2, 3), 4))
    opts = {"causal": True, "causal_align": "lower_right"}
    check_vjp(refattn.sdpa, (q, k, v), chunks + (chunks[1],), opts)
    o, lse = rd.sdpa(*(da.from_array(x, chunks=c) for x, c in zip((q, k, v), chunks + chunks[1:])),
                     return_lse=True, **opts)
    o, lse = dask.compute(o, lse, scheduler="threads")
    assert np.all(o[..., :7, :] == 0) and np.all(np.isneginf(lse[..., :7]))


def _callable(task):
    """The function a graph entry calls (a legacy tuple or a ``dask`` Task object)."""
    return task[0] if isinstance(task, tuple) else getattr(task, "func", None)


def _tasks(collection, prefix):
    return [k for k in dict(collection.__dask_graph__()) if isinstance(k, tuple)
            and k[0].startswith(prefix)]


def test_causal_schedules_no_task_above_the_diagonal():
    n, c = 4, 8                                                # 4 x 4 blocks of 8 queries x 8 keys
    q, k, v = (da.from_array(x, chunks=(1, 1, c, 4)) for x in qkv((1,), 1, 1, n * c, n * c, 4, 4))
    o, pullback = rd.vjp(refattn.sdpa, q, k, v, causal=True)
    forward = _tasks(o, "sdpa-block-fwd-")
    assert sorted(key[-2:] for key in forward) == [(i, j) for i in range(n) for j in range(i + 1)]
    dq, _, _ = pullback(da.ones_like(o))
    backward = _tasks(dq, "sdpa-block-bwd-")
    assert sorted(key[-2:] for key in backward) == sorted(key[-2:] for key in forward)
    # not causal: every block has a task
    o_full = rd.sdpa(q, k, v)
    assert len(_tasks(o_full, "sdpa-block-fwd-")) == n * n


def test_merge_partials_of_public_block_calls():
    """Merging refattn.sdpa over key subsets (any grouping) gives the full call, float32 too."""
    rng = np.random.default_rng(7)
    for dtype in ("float64", "float32"):
        q, k, v = (rng.standard_normal((2, 3, 6, 4)).astype(dtype) for _ in range(3))
        mask = rng.random((6, 9)) > 0.5
        mask[:, :3] = False                                       # keys 0-2: no row sees them
        mask[1] = False                                           # row 1: empty everywhere
        k, v = (np.concatenate([x, x[..., :3, :]], axis=-2) for x in (k, v))   # S = 9
        blocks = [slice(0, 3), slice(3, 5), slice(5, 9)]
        parts = [refattn.sdpa(q, k[..., b, :], v[..., b, :], mask=mask[:, b], return_lse=True)
                 for b in blocks]
        assert np.all(np.isneginf(parts[0][1]))                   # a block every row misses
        want_o, want_lse = refattn.sdpa(q, k, v, mask=mask, return_lse=True)
        rtol = RTOL if dtype == "float64" else 1e-6
        for o, lse in (rd.merge_partials(*parts),
                       rd.merge_partials(rd.merge_partials(*parts[:2]), parts[2]),
                       rd.merge_partials(parts[0], rd.merge_partials(*parts[1:]))):
            assert o.dtype == lse.dtype == np.dtype(dtype)
            assert np.all(o[..., 1, :] == 0) and np.all(np.isneginf(lse[..., 1]))
            np.testing.assert_allclose(o, want_o, rtol=0, atol=rtol * np.abs(want_o).max())
            finite = np.isfinite(want_lse)
            np.testing.assert_array_equal(np.isfinite(lse), finite)
            np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=rtol)


def test_float32_blocks_stay_float32():
    q, k, v = (x.astype(np.float32) for x in qkv((2,), 2, 2, 9, 9, 4, 4))
    o, pullback = rd.vjp(refattn.sdpa, *_dask(q, k, v, chunks=[(1, 2, (4, 5), 4)] * 3),
                         causal=True)
    got = dask.compute(o, *pullback(np.ones(o.shape, np.float32)), scheduler="threads")
    want, want_pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True)
    for g, w in zip(got, (want,) + tuple(want_pullback(np.ones(want.shape, np.float32)))):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_merge_is_a_tree():
    """8 key blocks, fan-in 2: 7 merge tasks in 3 levels per query block."""
    q, k, v = (da.from_array(x, chunks=(1, 1, 16, 4)) for x in qkv((1,), 1, 1, 16, 64, 4, 4))
    k, v = k.rechunk((1, 1, 8, 4)), v.rechunk((1, 1, 8, 4))
    o = rd.sdpa(q, k, v, split_every=2)
    merges = _tasks(o, "sdpa-merge-")
    assert len(merges) == 7 and {key[-2] for key in merges} == {0, 1, 2}


# -- position options: window, soft-cap, ALiBi, rotary ------------------------------------------

SLOPES = RNG.random(4)
SLOPES_BATCH = RNG.random((3, 4))
POSITION_OPTIONS = {
    "window (3, 1)": {"window": (3, 1)},
    "window (4, 0) + causal lower_right": {"window": (4, 0), "causal": True,
                                           "causal_align": "lower_right"},
    "one-sided window (-1, 2) + softcap": {"window": (-1, 2), "softcap": 2.0},
    "alibi (H,) + causal": {"alibi_slopes": SLOPES, "causal": True},
    "alibi (*batch, H) + bias + window 3": {"alibi_slopes": SLOPES_BATCH, "bias": BIAS,
                                            "window": 3},
    "rotary half, q offset 2, causal": {"rotary": "half", "rotary_q_offset": 2, "causal": True},
    "all: rotary interleaved partial, window, softcap, alibi, dropout": {
        "rotary": "interleaved", "rotary_dim": 4, "rotary_base": 100.0, "window": (2, 5),
        "softcap": 3.0, "alibi_slopes": SLOPES, "dropout_mask": DROP, "dropout_p": 0.2},
}


@pytest.mark.parametrize("chunks", SDPA_CHUNKS.values(), ids=SDPA_CHUNKS.keys())
@pytest.mark.parametrize("options", POSITION_OPTIONS.values(), ids=POSITION_OPTIONS.keys())
def test_sdpa_position_options_equal_single_machine(options, chunks):
    """Forward, lse, probabilities and every gradient (the slopes' too), blocks shifted."""
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)                     # GQA 4/2
    qc, kc = chunks
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)), options)
    got = dask.compute(*rd.sdpa(*_dask(q, k, v, chunks=(qc, kc, kc)), return_lse=True,
                                return_probs=True, **options), scheduler="threads")
    want = refattn.sdpa(q, k, v, return_lse=True, return_probs=True, **options)
    for name, g, w in zip(("o", "lse", "probs"), got, want):
        assert_close(g, w, name)


@pytest.mark.parametrize("c", [-7, 0, 5])
def test_backends_take_the_alibi_offset(c):
    """numba and the reference with ``alibi_offset=c`` equal the reference given the ALiBi term
    ``-slope |i - j + c|`` as a bias: forward, lse and every gradient (slopes from dS)."""
    from refattn.cores.sdpa import numba as numba_backend
    from refattn.cores.sdpa import reference
    from refattn.cores.sdpa.api import SDPAOptions

    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((2, 3, n, 5)) for n in (13, 11, 11))
    do = rng.standard_normal((2, 3, 13, 5))
    slopes = rng.random((1, 3, 1, 1))
    distance = alibi_distance_block(np, 13, 11, c, np.float64)
    common = {"scale": 0.4, "causal_offset": 2, "tiles": (4, 4)}
    as_bias = SDPAOptions(bias=-slopes * distance, need_bias_grad=True, **common)
    o, lse = reference.forward(q, k, v, as_bias)
    dq, dk, dv, ds, _ = reference.backward(q, k, v, o, lse, do, as_bias)
    want = (o, lse, dq, dk, dv, -np.sum(ds * distance, axis=(-2, -1)))
    offset = SDPAOptions(alibi=slopes, alibi_offset=c, need_alibi_grad=True, **common)
    for backend in (reference, numba_backend):
        o, lse = backend.forward(q, k, v, offset)
        dq, dk, dv, _, dslopes = backend.backward(q, k, v, o, lse, do, offset)
        for name, g, w in zip(("o", "lse", "dq", "dk", "dv", "dslopes"),
                              (o, lse, dq, dk, dv, dslopes), want):
            assert_close(g, w, f"{backend.__name__} {name}")


def _keep(L_, S_, offset, window):
    """The kept pairs of the causal rule and the window, from refattn's own definitions."""
    keep = np.ones((L_, S_), bool)
    if offset is not None:
        keep &= causal_keep(np, L_, S_, offset)
    if window is not None:
        keep &= window_keep(np, L_, S_, window)
    return keep


def test_empty_rows_zero_is_the_sharded_convention():
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)
    qc, kc = SDPA_CHUNKS["queries and keys uneven"]
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)),
              {"mask": MASK, "empty_rows": "zero"})


#: Problems with rows that no key block keeps (L = 13 > S = 11).
EMPTY_ROW_PROBLEMS = {
    "mask row 3 empty": {"mask": MASK},
    "mask + dropout + bias": {"mask": MASK, "dropout_mask": DROP, "dropout_p": 0.2,
                              "bias": BIAS},
    "causal lower_right (rows 0-1 empty, blocks skipped)": {"causal": True,
                                                            "causal_align": "lower_right"},
    "window + dropout (blocks skipped)": {"window": (-1, 0), "causal": True,
                                          "causal_align": "lower_right", "dropout_mask": DROP,
                                          "dropout_p": 0.3},
}


@pytest.mark.parametrize("policy", ["uniform", "nan"])
@pytest.mark.parametrize("chunks", [SDPA_CHUNKS["keys uneven"],
                                    SDPA_CHUNKS["queries and keys uneven"]],
                         ids=["keys uneven", "queries and keys uneven"])
@pytest.mark.parametrize("options", EMPTY_ROW_PROBLEMS.values(), ids=EMPTY_ROW_PROBLEMS.keys())
def test_empty_rows_policies_equal_single_machine(options, chunks, policy):
    """The fills after the merge: o, lse and every gradient against the single-machine call."""
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)                     # GQA 4/2
    qc, kc = chunks
    options = {**options, "empty_rows": policy}
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)), options)
    got = dask.compute(*rd.sdpa(*_dask(q, k, v, chunks=(qc, kc, kc)), return_lse=True,
                                **options), scheduler="threads")
    want = refattn.sdpa(q, k, v, return_lse=True, **options)
    for name, g, w in zip(("o", "lse"), got, want):
        assert_close(g, w, name)
    # the problem has empty rows, and the policy changed them
    assert np.isneginf(want[1]).any()
    assert np.isnan(got[0]).any() if policy == "nan" else not np.isnan(got[0]).any()


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_empty_rows_without_keys_give_zero_as_on_one_machine(policy):
    """S = 0: every row is empty, and every policy gives o = 0 (no division by S)."""
    q, k, v = qkv((1,), 2, 2, 4, 0, 3, 3)
    want = refattn.sdpa(q, k, v, empty_rows=policy)
    assert not want.any()
    qd, kd, vd = _dask(q, k, v, chunks=[(1, 2, 2, 3)] * 3)
    assert_close(rd.sdpa(qd, kd, vd, empty_rows=policy).compute(scheduler="sync"), want, "o")
    o, pullback = rd.vjp(refattn.sdpa, qd, kd, vd, empty_rows=policy)
    _, single_pullback = refattn.vjp(refattn.sdpa, q, k, v, empty_rows=policy)
    do = np.ones(want.shape)
    for name, g, w in zip(("dq", "dk", "dv"), dask.compute(*pullback(do), scheduler="sync"),
                          single_pullback(do)):
        assert_close(g, w, name)


def test_empty_rows_keep_the_graph_of_zero():
    """'zero' (the default) adds no task; the fills add one per row block (no dropout)."""
    q, k, v = _dask(*qkv((1,), 2, 2, 16, 16, 4, 4), chunks=[(1, 2, 4, 4)] * 3)
    plain = rd.sdpa(q, k, v, causal=True)
    zero = rd.sdpa(q, k, v, causal=True, empty_rows="zero")
    assert len(dict(zero.__dask_graph__())) == len(dict(plain.__dask_graph__()))
    assert zero.name == plain.name
    nan = rd.sdpa(q, k, v, causal=True, empty_rows="nan")
    assert nan.name != plain.name and len(_tasks(nan, "sdpa-o-nan-")) == 4


def test_block_band_is_the_block_of_the_full_rules():
    """Local offset, window and ALiBi distance reproduce the global rules on random blocks."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        L_, S_ = (int(n) for n in rng.integers(1, 30, 2))
        l0, l1 = sorted(int(n) for n in rng.choice(L_ + 1, 2, replace=False))
        s0, s1 = sorted(int(n) for n in rng.choice(S_ + 1, 2, replace=False))
        offset = None if rng.random() < 0.3 else int(rng.integers(-10, 10))
        lo, hi = (None if rng.random() < 0.3 else int(rng.integers(-12, 12)) for _ in range(2))
        window = None if rng.random() < 0.2 else (lo, hi)
        full = _keep(L_, S_, offset, window)[l0:l1, s0:s1]
        visible, local_offset, local_window = rd.block_band((l0, l1), (s0, s1), offset, window)
        assert visible == bool(full.any())
        if visible:
            np.testing.assert_array_equal(_keep(l1 - l0, s1 - s0, local_offset, local_window),
                                          full)
        c = alibi_offset((l0, l1), (s0, s1), L_, S_)
        np.testing.assert_array_equal(alibi_distance_block(np, l1 - l0, s1 - s0, c, np.float64),
                                      alibi_distance(np, L_, S_, np.float64)[l0:l1, s0:s1])


@pytest.mark.parametrize("L_, S_, qc, kc, options", [
    (64, 64, 8, 8, {"window": (10, 0)}),
    (40, 56, (7, 9, 8, 16), (10, 6, 20, 20), {"window": (5, 3), "causal": True,
                                               "causal_align": "lower_right"}),
], ids=["8 x 8 blocks, window (10, 0)", "uneven, window + causal lower_right"])
def test_window_schedules_no_task_outside_the_band(L_, S_, qc, kc, options):
    q, k, v = _dask(*qkv((1,), 1, 1, L_, S_, 4, 4), chunks=[(1, 1, qc, 4), (1, 1, kc, 4),
                                                           (1, 1, kc, 4)])
    align = causal_offset(options.get("causal_align", "upper_left"), L_, S_)
    keep = _keep(L_, S_, align if options.get("causal") else None,
                 window_bounds(options["window"], align))
    l_bounds = np.cumsum((0,) + q.chunks[2])
    s_bounds = np.cumsum((0,) + k.chunks[2])
    want = sorted((i, j) for i in range(len(l_bounds) - 1) for j in range(len(s_bounds) - 1)
                  if keep[l_bounds[i]:l_bounds[i + 1], s_bounds[j]:s_bounds[j + 1]].any())
    assert len(want) < q.numblocks[2] * k.numblocks[2] / 2       # the band leaves most out
    o, pullback = rd.vjp(refattn.sdpa, q, k, v, **options)
    assert sorted(key[-2:] for key in _tasks(o, "sdpa-block-fwd-")) == want
    assert sorted(key[-2:] for key in _tasks(pullback(da.ones_like(o))[0],
                                             "sdpa-block-bwd-")) == want
    probs = rd.sdpa(q, k, v, return_probs=True, **options)[1]
    computed = [key[-2:] for key, task in dict(probs.__dask_graph__()).items()
                if isinstance(key, tuple) and key[0].startswith("sdpa-probs-")
                and _callable(task) is probs_block]
    assert sorted(computed) == want                          # the other blocks are zeros
    got = dask.compute(o, *pullback(da.ones_like(o)), probs, scheduler="threads")
    want_o, want_pullback = refattn.vjp(refattn.sdpa, *(x.compute() for x in (q, k, v)), **options)
    for g, w in zip(got, (want_o,) + tuple(want_pullback(np.ones(want_o.shape)))
                    + (refattn.sdpa(*(x.compute() for x in (q, k, v)), return_probs=True,
                                    **options)[1],)):
        assert_close(g, w)


# -- the other cores: batch/head sharding ---------------------------------------------------------

CORE_PROBLEMS = {
    "quaternion shared, mask + causal": (refattn.quaternion_attention, True,
                                         {"mode": "shared", "mask": MASK[:7, :9], "causal": True}),
    "quaternion hamilton, bias": (refattn.quaternion_attention, True,
                                  {"mode": "hamilton", "bias": BIAS[:, :, :7, :9]}),
    "elementwise exact, mask + causal": (refattn.elementwise_attention, False,
                                         {"mask": MASK[:7, :9], "causal": True}),
    "elementwise Taylor causal": (refattn.elementwise_attention, False,
                                  {"order": 4, "causal": True, "scale": 0.5}),
    "preconditioned sdpa, full derivative, bias": (refattn.preconditioned_sdpa, False,
                                                   {"stop_gradient": False,
                                                    "bias": BIAS[:, :, :7, :9]}),
    "preconditioned elementwise": (refattn.preconditioned_sdpa, False,
                                   {"inner_core": "elementwise", "causal": True}),
}


@pytest.mark.parametrize("fn, quaternion, options", CORE_PROBLEMS.values(),
                         ids=CORE_PROBLEMS.keys())
def test_every_core_batch_head_sharded(fn, quaternion, options):
    q, k, v = qkv((3,), 4, 2, 7, 9, 3, 3, quaternion=quaternion)
    tail = (4, 3) if quaternion else (3,)
    qc = ((2, 1), 2, 7) + tail                                  # uneven batch chunks
    kc = ((1, 2), 1, (4, 5)) + tail                             # k's chunks are realigned to q's
    check_vjp(fn, (q, k, v), (qc, kc, kc), options)
    o = rd.apply(fn, *(da.from_array(x, chunks=c) for x, c in zip((q, k, v), (qc, kc, kc))),
                 **options)
    assert_close(o.compute(scheduler="threads"), fn(q, k, v, **options), "apply")


def test_tuple_outputs_are_sharded_too():
    q, k, v = qkv((2,), 2, 2, 5, 5, 4, 4)
    o, c = rd.apply(refattn.preconditioned_sdpa, *(da.from_array(x, chunks=(1, 1, 5, 4))
                                                   for x in (q, k, v)), return_diagonal=True)
    want_o, want_c = refattn.preconditioned_sdpa(q, k, v, return_diagonal=True)
    assert_close(o.compute(), want_o, "o")
    assert_close(c.compute(), want_c, "c")


# -- element-wise causal Taylor: the chunked scan ------------------------------------------------

TAYLOR_SCAN = {
    "causal, uneven L and S chunks, GQA": ((2,), 4, 2, 20, 20, (1, 2, (7, 6, 7), 3),
                                           (2, 1, (5, 8, 7), 3), {"order": 4, "causal": True}),
    "causal t=6, scale": ((2,), 2, 2, 20, 20, (2, 2, (4, 16), 3), (1, 2, (9, 11), 3),
                          {"order": 6, "causal": True, "scale": 0.5}),
    "not causal": ((2,), 2, 2, 16, 12, (1, 2, (8, 8), 3), (2, 2, (5, 7), 3), {"order": 4}),
    "lower_right L > S (empty rows)": ((1,), 2, 1, 12, 9, (1, 2, (5, 7), 3), (1, 1, (4, 5), 3),
                                       {"order": 4, "causal": True,
                                        "causal_align": "lower_right"}),
    "key padding (a batch all masked)": ((2,), 2, 2, 20, 20, (1, 2, (7, 6, 7), 3),
                                         (2, 2, (5, 8, 7), 3),
                                         {"order": 8, "causal": True, "mask": KEY_MASK}),
    "no batch dims": ((), 2, 2, 10, 10, (2, (3, 7), 3), (2, (6, 4), 3),
                      {"order": 4, "causal": True}),
}


@pytest.mark.parametrize("batch, H, Hkv, L_, S_, qc, kc, options", TAYLOR_SCAN.values(),
                         ids=TAYLOR_SCAN.keys())
def test_elementwise_taylor_chunked_scan(batch, H, Hkv, L_, S_, qc, kc, options):
    rng = np.random.default_rng(8)
    q = 0.5 * rng.standard_normal((*batch, H, L_, 3))
    k = 0.5 * rng.standard_normal((*batch, Hkv, S_, 3))
    v = rng.standard_normal((*batch, Hkv, S_, 3))
    out, _ = check_vjp(refattn.elementwise_attention, (q, k, v), (qc, kc, kc), options)
    assert _tasks(out, "ew-scan-rows-"), "the scan path ran"
    o = rd.apply(refattn.elementwise_attention, *_dask(q, k, v, chunks=(qc, kc, kc)), **options)
    assert_close(o.compute(scheduler="threads"), refattn.elementwise_attention(q, k, v, **options))


def _sharded(fn, chunks):
    """``fn`` sharded with ``chunks`` as a NumPy-in, NumPy-out function with a refattn vjp."""
    def call(q, k, v, **options):
        return rd.apply(fn, *_dask(q, k, v, chunks=chunks), **options).compute(scheduler="threads")

    def rule(q, k, v, **options):
        out, pullback = rd.vjp(fn, *_dask(q, k, v, chunks=chunks), **options)
        return out.compute(scheduler="threads"), lambda do: dask.compute(
            *pullback(do), scheduler="threads")

    call.__refattn_vjp__ = rule
    return call


@pytest.mark.parametrize("fn, shapes, chunks, options", [
    (refattn.elementwise_attention, ((2, 2, 9, 3), (2, 1, 9, 3)), [(1, 2, (4, 5), 3)] * 3,
     {"order": 4, "causal": True, "scale": 0.7}),
    (refattn.sdpa, ((1, 2, 7, 4), (1, 1, 6, 4)), [(1, 2, (3, 4), 4), (1, 1, (2, 4), 4),
                                                  (1, 1, (2, 4), 4)],
     {"causal": True, "causal_align": "lower_right", "bias": BIAS[0, :2, :7, :6]}),
    (refattn.sdpa, ((1, 2, 7, 4), (1, 1, 6, 4)), [(1, 2, (3, 4), 4), (1, 1, (2, 4), 4),
                                                  (1, 1, (2, 4), 4)],
     {"alibi_slopes": np.array([0.5, 0.25]), "window": (2, 1), "softcap": 1.5,
      "rotary": "half"}),
], ids=["element-wise Taylor scan", "key/query-sharded sdpa with bias",
        "key/query-sharded sdpa: ALiBi slopes, window, softcap, rotary"])
def test_sharded_gradients_match_finite_differences(fn, shapes, chunks, options):
    rng = np.random.default_rng(9)
    q = 0.5 * rng.standard_normal(shapes[0])
    k, v = (0.5 * rng.standard_normal(shapes[1]) for _ in range(2))
    refattn.testing.check_grads(_sharded(fn, chunks), q, k, v, **options)


def test_scan_graph_is_linear_in_chunks():
    """n key chunks: n moment tasks and a chain of n prefix states; tiles only on the diagonal."""
    n = 5
    q, k, v = _dask(*qkv((1,), 1, 1, 8 * n, 8 * n, 3, 3), chunks=[(1, 1, 8, 3)] * 3)
    o = rd.apply(refattn.elementwise_attention, q, k, v, order=4, causal=True)
    assert len(_tasks(o, "ew-scan-moments-")) == n - 1      # the last chunk is never a prefix
    assert sorted(key[-2:] for key in _tasks(o, "ew-scan-tile-")) == [(i, i) for i in range(n)]


# -- layers ---------------------------------------------------------------------------------------

def test_attention_layer_data_parallel():
    rng = np.random.default_rng(3)
    layer = refattn.Attention(16, 4, causal=True, bias=True)
    params = layer.init(seed=1)
    x = rng.standard_normal((5, 7, 16))
    y, pullback = rd.vjp(layer, params, da.from_array(x, chunks=((2, 2, 1), 7, 16)),
                         split_every=2)
    dy = rng.standard_normal(y.shape)
    dparams, dx = pullback(dy)
    got_y, got_dx, got_dp = dask.compute(y, dx, dparams, scheduler="threads")
    want_y, want_pullback = refattn.vjp(layer, params, x)
    want_dp, want_dx = want_pullback(dy)
    assert_close(got_y, want_y, "y")
    assert_close(got_dx, want_dx, "dx")
    top = max(float(np.abs(g).max()) for g in want_dp.values())
    for name in want_dp:
        assert_close(got_dp[name], want_dp[name], name, scale=top)
    assert_close(rd.attention(layer, params, da.from_array(x, chunks=(3, 7, 16))).compute(),
                 want_y, "attention")


def test_attention_layer_cross_with_mask():
    rng = np.random.default_rng(4)
    layer = refattn.Attention(8, 2, projection="efficient")
    params = layer.init(seed=2)
    xq, xkv = rng.standard_normal((4, 5, 8)), rng.standard_normal((4, 6, 8))
    mask = rng.random((4, 1, 5, 6)) > 0.3
    y, pullback = rd.vjp(layer, params, da.from_array(xq, chunks=(3, 5, 8)),
                         da.from_array(xkv, chunks=(1, 6, 8)), mask)
    dy = rng.standard_normal(y.shape)
    got = dask.compute(y, *pullback(dy), scheduler="threads")
    want_y, want_pullback = refattn.vjp(layer, params, xq, xkv, mask=mask)
    want = (want_y,) + tuple(want_pullback(dy))
    assert_close(got[0], want[0], "y")
    for name in want[1]:
        assert_close(got[1][name], want[1][name], name)
    assert_close(got[2], want[2], "dxq")
    assert_close(got[3], want[3], "dxkv")


# -- bad input ------------------------------------------------------------------------------------

def _dask(*arrays, chunks):
    return [da.from_array(x, chunks=c) for x, c in zip(arrays, chunks)]


def test_errors():
    q, k, v = qkv((2,), 4, 2, 5, 5, 4, 4)
    with pytest.raises(ValueError, match="splits a group of G = H / Hkv = 2"):
        rd.sdpa(*_dask(q, k, v, chunks=[(1, (1, 3), 5, 4)] + [(1, 1, 5, 4)] * 2))
    with pytest.raises(ValueError, match="splits a group"):
        rd.vjp(refattn.elementwise_attention, *_dask(q, k, v, chunks=[(1, 1, 5, 4)] * 3))
    good = _dask(q, k, v, chunks=[(1, 2, 5, 4)] * 3)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4\) does not broadcast"):
        rd.sdpa(*good, mask=np.ones((5, 4), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        rd.sdpa(*good, mask=np.ones((5, 5)))
    with pytest.raises(TypeError, match="causal must be a bool"):
        rd.sdpa(*good, causal="yes")
    with pytest.raises(ValueError, match="order must be None"):
        rd.apply(refattn.elementwise_attention, *good, order=3)
    with pytest.raises(ValueError, match="depends on the query"):
        rd.apply(refattn.elementwise_attention, *good, order=4, mask=np.ones((5, 5), bool))
    with pytest.raises(TypeError, match="chunked element-wise scan takes float32 or float64"):
        rd.apply(refattn.elementwise_attention,
                 *_dask(*(x.astype(np.float16) for x in (q, k, v)), chunks=[(1, 2, 2, 4)] * 3),
                 order=4, causal=True)
    with pytest.raises(TypeError, match="not a refattn core function"):
        rd.vjp(np.add, *good)
    with pytest.raises(ValueError, match="drop return_lse"):
        rd.vjp(refattn.sdpa, *good, return_lse=True)
    with pytest.raises(ValueError, match="split_every must be an integer >= 2"):
        rd.sdpa(*good, split_every=1)
    with pytest.raises(ValueError, match="split_every must be an integer >= 2"):
        rd.vjp(refattn.sdpa, *good, split_every=1.5)
    with pytest.raises(TypeError, match="q must be a dask array"):
        rd.sdpa([1.0], *good[1:])
    _, pullback = rd.vjp(refattn.sdpa, *good)
    with pytest.raises(ValueError, match="cotangent has shape"):
        pullback(da.ones((2, 4, 5, 3)))
    _, pullback = rd.vjp(refattn.quaternion_attention,
                         *_dask(*qkv((2,), 2, 2, 3, 3, 2, 2, quaternion=True),
                                chunks=[(1, 2, 3, 4, 2)] * 3))
    with pytest.raises(ValueError, match="cotangent has shape"):
        pullback(da.ones((2, 2, 3, 4, 3)))
    layer = refattn.Attention(8, 2)
    with pytest.raises(ValueError, match="params has keys"):
        rd.vjp(layer, {}, da.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="xq must have shape"):
        rd.vjp(layer, layer.init(), da.ones((2, 3, 7)))



def test_option_errors_name_the_argument():
    q, k, v = qkv((2,), 4, 2, 5, 5, 4, 4)
    good = _dask(q, k, v, chunks=[(1, 2, (2, 3), 4)] * 3)
    for call in (lambda **o: rd.sdpa(*good, **o), lambda **o: rd.vjp(refattn.sdpa, *good, **o)):
        with pytest.raises(TypeError, match="cu_seqlens_q=: packed or variable-length sequences .* not supported"):
            call(cu_seqlens_q=np.array([0, 2, 5]))
        with pytest.raises(TypeError, match="key_value_seq_lengths=: packed or variable-length"):
            call(key_value_seq_lengths=np.array([5, 3]))
        with pytest.raises(ValueError, match="empty_rows must be one of .*got 'mean'"):
            call(empty_rows="mean")
        with pytest.raises(TypeError, match="window_size=.*refattn's is window="):
            call(window_size=(2, 0))
        with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
            call(windw=(2, 0))
        with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(H,\) = \(4,\)"):
            call(alibi_slopes=np.ones(2))
        with pytest.raises(TypeError, match="alibi_slopes has dtype float32"):
            call(alibi_slopes=np.ones(4, np.float32))
        with pytest.raises(ValueError, match="window must be None or"):
            call(window=(-2, 0))
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            call(softcap=0.0)
        with pytest.raises(ValueError, match="rotary must be one of"):
            call(rotary="full")
    with pytest.raises(ValueError, match="drop return_probs$"):
        rd.vjp(refattn.sdpa, *good, return_probs=True)
    layer = refattn.Attention(8, 2, alibi_slopes=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape .* \(2, 2\), got \(3, 2\)"):
        rd.vjp(layer, layer.init(), da.ones((2, 3, 8), chunks=1))


def test_attention_layer_with_position_options():
    """window, soft-cap, ALiBi per batch element (sliced per batch chunk) and rotary."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 7, 16))
    layer = refattn.Attention(16, 4, causal=True, window=(3, 0), softcap=5.0,
                              alibi_slopes=rng.random((5, 4)), rotary="half")
    params = layer.init(seed=1)
    y, pullback = rd.vjp(layer, params, da.from_array(x, chunks=((2, 2, 1), 7, 16)))
    dy = rng.standard_normal(y.shape)
    got_y, (got_dp, got_dx) = dask.compute(y, pullback(dy), scheduler="threads")
    want_y, want_pullback = refattn.vjp(layer, params, x)
    want_dp, want_dx = want_pullback(dy)
    assert_close(got_y, want_y, "y")
    assert_close(got_dx, want_dx, "dx")
    for name in want_dp:
        assert_close(got_dp[name], want_dp[name], name)
    assert_close(rd.attention(layer, params, da.from_array(x, chunks=(2, 7, 16))).compute(),
                 want_y, "attention")


def test_scaling_study_is_registered():
    from refattn.bench import studies

    study = studies()["dask-scaling"]
    assert set(study.requires) == {"dask", "distributed"}
    assert "efficiency" in study.metric_names


# -- a LocalCluster of two worker processes -------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_on_local_cluster(client):
    q, k, v = qkv((2,), 4, 2, L, S, 8, 6)
    opts = SDPA_OPTIONS["mask (empty row) + causal + bias"]
    chunks = SDPA_CHUNKS["queries and keys uneven"]
    check_vjp(refattn.sdpa, (q, k, v), (chunks[0], chunks[1], chunks[1][:-1] + (6,)), opts,
              scheduler=client.get)
    fn, _, options = CORE_PROBLEMS["quaternion hamilton, bias"]
    q, k, v = qkv((3,), 4, 2, 7, 9, 3, 3, quaternion=True)
    check_vjp(fn, (q, k, v), [((2, 1), 2, 7, 4, 3)] * 3, options, scheduler=client.get)
    batch, H, Hkv, L_, S_, qc, kc, options = TAYLOR_SCAN["causal, uneven L and S chunks, GQA"]
    rng = np.random.default_rng(8)
    q, k, v = (0.5 * rng.standard_normal((*batch, h, n, 3)) for h, n in ((H, L_), (Hkv, S_),
                                                                        (Hkv, S_)))
    check_vjp(refattn.elementwise_attention, (q, k, v), (qc, kc, kc), options,
              scheduler=client.get)
    layer = refattn.Attention(8, 2, causal=True)
    params = layer.init(seed=0)
    x = np.random.default_rng(5).standard_normal((3, 4, 8))
    y, pullback = rd.vjp(layer, params, da.from_array(x, chunks=(2, 4, 8)))
    got_y, (got_dp, got_dx) = dask.compute(y, pullback(np.ones(y.shape)), scheduler=client.get)
    want_y, want_pullback = refattn.vjp(layer, params, x)
    want_dp, want_dx = want_pullback(np.ones(y.shape))
    assert_close(got_y, want_y, "y")
    assert_close(got_dx, want_dx, "dx")
    for name in want_dp:
        assert_close(got_dp[name], want_dp[name], name)


def test_position_options_on_local_cluster(client):
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)
    qc, kc = SDPA_CHUNKS["queries and keys uneven"]
    options = {"window": (4, 1), "causal": True, "causal_align": "lower_right", "softcap": 2.5,
               "alibi_slopes": SLOPES_BATCH, "rotary": "half", "bias": BIAS}
    check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)), options, scheduler=client.get)


def test_empty_rows_on_local_cluster(client):
    q, k, v = qkv((3,), 4, 2, L, S, 8, 6)
    qc, kc = (3, 4, (5, 8), 8), (3, 2, (4, 7), 8)       # 4 blocks: few tasks, one skipped
    for policy, name in (("uniform", "mask + dropout + bias"),
                         ("nan", "causal lower_right (rows 0-1 empty, blocks skipped)")):
        check_vjp(refattn.sdpa, (q, k, v), (qc, kc, kc[:-1] + (6,)),
                  {**EMPTY_ROW_PROBLEMS[name], "empty_rows": policy}, scheduler=client.get)


def test_killed_worker_costs_a_retry_not_the_result(client):
    """SIGKILL one worker process while it runs blocks of a key-sharded fwd+bwd: same numbers."""
    rng = np.random.default_rng(6)
    n = 1024
    q, k, v = (rng.standard_normal((1, 2, n, 32)) for _ in range(3))
    dq, dk, dv = (da.from_array(x, chunks=(1, 1, 128, 32)) for x in (q, k, v))
    o, pullback = rd.vjp(refattn.sdpa, dq, dk, dv, causal=True)
    grads = pullback(da.ones_like(o))
    before = dict(client.run(os.getpid))                      # worker address -> pid
    futures = client.compute([o, *grads], retries=3)
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        victim = busy[0] if busy else None
        if victim is None:
            time.sleep(0.005)
    assert victim is not None, "no worker started a task within 60 s"
    os.kill(before[victim], signal.SIGKILL)
    assert not all(f.done() for f in futures), "finished before the kill: the test saw no fault"
    distributed.wait(futures, timeout=180)                   # bounded: a hang fails the test
    got = client.gather(futures)
    want, want_pullback = refattn.vjp(refattn.sdpa, q, k, v, causal=True)
    for g, w in zip(got, (want,) + tuple(want_pullback(np.ones(want.shape)))):
        assert_close(g, w)
    assert victim not in client.scheduler_info()["workers"]  # the scheduler saw it die

