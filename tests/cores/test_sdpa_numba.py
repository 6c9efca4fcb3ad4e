"""The numba SDPA kernel against the float64 reference, plus the numba plumbing.

Sizes are chosen to cross the kernel's tile edges: L = 1, 63, 100, 257 with
S != L, and the tests shrink the tiles to 32 queries x 16 keys (``tiles=``, a
runtime argument, no recompilation) so that partial tiles, several tiles per
head, causal tile skipping and the key-chunked backward (one (batch, kv head)
pair and two threads) all run on small problems.
Every case uses the same compiled signatures (one per dtype), so the kernels
compile once for the whole module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from refattn.cores.sdpa import api
from refattn.cores.sdpa import numba as sdpa_numba
from refattn.testing import TOLERANCES, assert_close, max_errors

ROOT = Path(__file__).resolve().parents[2]


#: Tiles small enough that the test problems span several of them (a per-call option).
SMALL_TILES = (32, 16)


def _problem(rng, B, H, Hkv, L, S, E, Ev, dtype):
    q = rng.standard_normal((B, H, L, E))
    k = rng.standard_normal((B, Hkv, S, E))
    v = rng.standard_normal((B, Hkv, S, Ev))
    return tuple(x.astype(dtype) for x in (q, k, v))


def _options(name, rng, B, H, L, S, dtype):
    """Keyword options of one named scenario (masks and bias broadcast over some axes)."""
    if name == "plain":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "causal lower_right":
        return {"causal": True, "causal_align": "lower_right"}
    if name == "mask (L,S) with empty rows":
        mask = rng.random((L, S)) > 0.3
        mask[::7] = False                       # fully masked query rows
        return {"mask": mask}
    if name == "key padding mask (B,1,1,S) + causal":
        mask = rng.random((B, 1, 1, S)) > 0.2
        return {"mask": mask, "causal": True}
    if name == "bias (1,H,L,S) with -inf":
        bias = rng.standard_normal((1, H, L, S)).astype(dtype)
        bias[..., 1::5] = -np.inf
        return {"bias": bias}
    if name == "bias (B,1,1,S)":
        return {"bias": rng.standard_normal((B, 1, 1, S)).astype(dtype)}
    if name == "bias jumping by 80 after the first key tile":
        # the forward's lazy shift must be renewed (scores climb past RESHIFT = 30)
        bias = np.zeros((1, 1, 1, S), dtype)
        bias[..., 20:] = 80.0
        bias[..., 40:] = 160.0
        return {"bias": bias}
    if name == "dropout":
        return {"dropout_mask": rng.random((B, H, L, S)) > 0.25, "dropout_p": 0.25}
    if name == "dropout (L,S) + causal lower_right + scale":
        return {"dropout_mask": rng.random((L, S)) > 0.5, "dropout_p": 0.5, "causal": True,
                "causal_align": "lower_right", "scale": 0.3}
    raise AssertionError(name)


SCENARIOS = ["plain", "causal", "causal lower_right", "mask (L,S) with empty rows",
             "key padding mask (B,1,1,S) + causal", "bias (1,H,L,S) with -inf", "bias (B,1,1,S)",
             "bias jumping by 80 after the first key tile",
             "dropout", "dropout (L,S) + causal lower_right + scale"]

#      B, H, Hkv,   L,   S,  E, Ev
SHAPES = [
    (1, 1, 1, 257, 100, 8, 8),        # one kv head: key-chunked backward; L > S (empty causal rows)
    (2, 4, 2, 100, 257, 8, 5),        # GQA, Ev != E, L < S
    (1, 2, 1, 63, 63, 4, 4),          # MQA
    (2, 2, 2, 1, 5, 4, 4),            # one query
]


def _compare(shape, scenario, dtype, seed=0):
    rng = np.random.default_rng(seed)
    B, H, Hkv, L, S, E, Ev = shape
    q, k, v = _problem(rng, B, H, Hkv, L, S, E, Ev, "float64")
    options = _options(scenario, rng, B, H, L, S, "float64")
    o_ref, res_ref = api.forward(q, k, v, backend="reference", **options)
    do = rng.standard_normal(o_ref.shape)
    grads_ref = api.backward(res_ref, do)

    cast = {key: (val.astype(dtype) if isinstance(val, np.ndarray) and val.dtype != bool
                  else val) for key, val in options.items()}
    o, res = api.forward(q.astype(dtype), k.astype(dtype), v.astype(dtype), backend="numba",
                         tiles=SMALL_TILES,
                         **cast)
    assert o.dtype == dtype
    assert_close(o, o_ref, dtype, f"o [{scenario}]")
    lse_ref = res_ref.lse
    lse = res.lse
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref)), "empty rows differ"
    finite = np.isfinite(lse_ref)
    assert_close(lse[finite], lse_ref[finite], dtype, f"lse [{scenario}]")
    grads = api.backward(res, do.astype(dtype))
    assert len(grads) == len(grads_ref)
    for name, g, gr in zip(("dq", "dk", "dv", "dbias"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, gr, dtype, f"{name} [{scenario}]")
    return o, o_ref, grads, grads_ref


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}S{}E{}Ev{}".format(*s))
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_numba_matches_reference(scenario, shape, dtype):
    _compare(shape, scenario, dtype)


def test_fully_masked_rows_give_zero_output_and_zero_gradient():
    rng = np.random.default_rng(3)
    q, k, v = _problem(rng, 1, 2, 2, 9, 6, 4, 4, "float64")
    mask = np.ones((9, 6), bool)
    mask[[0, 4]] = False
    o, res = api.forward(q, k, v, mask=mask, backend="numba", tiles=SMALL_TILES)
    assert np.all(o[..., [0, 4], :] == 0)
    assert np.all(np.isneginf(res.lse[..., [0, 4]]))
    dq, dk, dv = api.backward(res, np.ones_like(o))
    assert np.all(dq[..., [0, 4], :] == 0)
    # lower_right with L > S: the first L - S queries see no key at all
    o, res = api.forward(q, k, v, causal=True, causal_align="lower_right", backend="numba",
                         tiles=SMALL_TILES)
    assert np.all(o[..., :3, :] == 0) and np.all(np.isfinite(o))
    dq, dk, dv = api.backward(res, np.ones_like(o))
    assert np.all(dq[..., :3, :] == 0) and np.all(np.isfinite(dk))


def test_non_contiguous_inputs():
    rng = np.random.default_rng(4)
    q, k, v = _problem(rng, 1, 2, 2, 8, 8, 5, 5, "float64")
    qt, kt, vt = (np.swapaxes(np.swapaxes(x, -1, -2).copy(), -1, -2) for x in (q, k, v))
    assert not qt.flags.c_contiguous
    o = api.sdpa(qt, kt, vt, backend="numba", tiles=SMALL_TILES)
    assert_close(o, api.sdpa(q, k, v, backend="reference"), "float64")


def test_float32_error_is_that_of_float32_arithmetic():
    """The float32 tolerance, derived: the kernel's float32 error is the error of float32
    arithmetic itself, i.e. of the same order as the float32 *reference* (NumPy, with the
    L x S matrix) against float64, and far inside ``TOLERANCES["float32"]``."""
    rng = np.random.default_rng(5)
    q, k, v = _problem(rng, 1, 2, 2, 257, 257, 64, 64, "float64")
    o64 = api.sdpa(q, k, v, causal=True, backend="reference")
    args32 = tuple(x.astype("float32") for x in (q, k, v))
    _, err_kernel = max_errors(api.sdpa(*args32, causal=True, backend="numba",
                                        tiles=SMALL_TILES), o64)
    _, err_numpy = max_errors(api.sdpa(*args32, causal=True, backend="reference"), o64)
    # Both sit at a few units of float32 roundoff (6e-8) times the dot-product length
    # growth; online-softmax rescaling adds at most a few roundings per key tile.
    assert err_kernel <= 8 * max(err_numpy, np.finfo(np.float32).eps)
    assert err_kernel < TOLERANCES["float32"][0] / 10


def test_concurrent_python_threads_get_correct_results():
    rng = np.random.default_rng(6)
    problems = [_problem(rng, 1, 2, 2, 40, 40, 8, 8, "float32") for _ in range(6)]
    expected = [api.sdpa(*p, causal=True, backend="numba", tiles=SMALL_TILES) for p in problems]
    results = [None] * len(problems)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                o, res = api.forward(*problems[i], causal=True, backend="numba",
                                     tiles=SMALL_TILES)
                api.backward(res, np.ones_like(o))
            results[i] = o
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_options_add_no_compiled_signature():
    """Masks of every shape (C-contiguous and Fortran ones, one row at L = 1), bias,
    soft-cap, window, dropout: one forward and one backward signature per dtype (absent
    options are stand-ins of the same array type, the score helper's flags are runtime
    values).  In a fresh process, so that no other test's call is counted."""
    proc = _run("""
        import numpy as np
        from refattn.cores.sdpa import api
        from refattn.cores.sdpa import numba as sdpa_numba
        rng = np.random.default_rng(7)
        for B, H, L in ((1, 1, 24), (2, 3, 24), (1, 1, 1), (2, 1, 1)):
            S = 24
            q = rng.standard_normal((B, H, L, 8))
            k, v = (rng.standard_normal((B, H, S, 8)) for _ in range(2))
            full = (B, H, L, S)
            for opts in ({}, {"causal": True}, {"mask": rng.random((L, S)) > 0.3},
                         {"mask": rng.random(full) > 0.3},
                         {"mask": np.asfortranarray(rng.random(full) > 0.3)},
                         {"mask": rng.random((B, 1, 1, S)) > 0.3},
                         {"bias": rng.standard_normal((L, S))},
                         {"bias": rng.standard_normal(full)},
                         {"bias": np.asfortranarray(rng.standard_normal(full))},
                         {"bias": rng.standard_normal((1, 1, 1, S))}, {"softcap": 5.0},
                         {"window": (4, 2)},
                         {"dropout_p": 0.2, "dropout_mask": rng.random((L, S)) > 0.2}):
                o, res = api.forward(q, k, v, backend="numba", tiles=SMALL_TILES, **opts)
                api.backward(res, np.ones_like(o))
        for kernel in (sdpa_numba._forward_kernel, sdpa_numba._backward_kernel):
            print(len(kernel.signatures))
    """.replace("SMALL_TILES", repr(SMALL_TILES)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"], proc.stdout


def _run(script: str, **env):
    # Put this checkout first but keep the caller's PYTHONPATH (dependencies may live there).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_kernel_source_runs_as_python_without_jit():
    """NUMBA_DISABLE_JIT=1 runs the kernel source as plain Python: covers its lines."""
    proc = _run("""
        import numpy as np
        from refattn.cores.sdpa import api
        from refattn.cores.sdpa import numba as sdpa_numba
        from refattn.testing import assert_close
        rng = np.random.default_rng(0)
        for dtype in ("float64", "float32"):
            q, k, v = (rng.standard_normal((1, 2, 5, 3)).astype(dtype) for _ in range(3))
            bias = rng.standard_normal((5, 5)).astype(dtype)
            for opts in ({"causal": True, "bias": bias},
                         {"mask": rng.random((5, 5)) > 0.4, "causal": True,
                          "causal_align": "lower_right"},
                         {"dropout_mask": rng.random((5, 5)) > 0.3, "dropout_p": 0.3}):
                o, res = api.forward(q, k[:, :1], v[:, :1], backend="numba", tiles=(4, 2), **opts)
                o2, res2 = api.forward(q, k[:, :1], v[:, :1], backend="reference", **opts)
                assert_close(o, o2, dtype)
                do = np.ones_like(o)
                for g, g2 in zip(api.backward(res, do), api.backward(res2, do)):
                    assert_close(g, g2, dtype)
        print("ok")
    """, NUMBA_DISABLE_JIT="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


_TINY_KERNEL = """
    import threading
    import numpy as np
    from numba import prange
    from refattn.backends import numba_support as ns

    @ns.jit(parallel=True)
    def twice(x, out):
        for i in prange(x.shape[0]):
            out[i] = 2 * x[i]

    def work():
        x = np.arange(1000.0)
        for _ in range(50):
            out = np.empty_like(x)
            with ns.launch():
                twice(x, out)
            assert np.array_equal(out, 2 * x)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(ns.threading_layer())
"""


def test_workqueue_layer_is_serialised(tmp_path):
    """``workqueue`` aborts on concurrent launches; :func:`launch` must serialise them."""
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(_TINY_KERNEL))
    proc = _run(f"exec(open({str(script)!r}).read())", NUMBA_THREADING_LAYER="workqueue",
                NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "workqueue"


def test_read_only_cache_dir_warns_and_still_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(_TINY_KERNEL))
    proc = _run(f"exec(open({str(script)!r}).read())",
                NUMBA_CACHE_DIR=str(blocker / "cache"))   # cannot be created: a file is in the way
    assert proc.returncode == 0, proc.stderr
    assert "NumbaCacheWarning" in proc.stderr and "not writable" in proc.stderr


def test_cache_status_reports_a_writable_dir(tmp_path, monkeypatch):
    import numba

    from refattn.backends import numba_support as ns

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "c"))
    assert ns.cache_status()["enabled"]
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "f" / "c"))
    status = ns.cache_status()
    assert not status["enabled"] and "not writable" in status["reason"]


def test_fast_exp_accuracy():
    from refattn.backends.numba_support import _exp32_nb, _exp64_nb

    x = np.concatenate([-np.logspace(-8, 3, 2000), np.linspace(-90, 0, 2000), [0.0]])
    for fn, dtype, bound in ((_exp32_nb, np.float32, 2.5e-7), (_exp64_nb, np.float64, 5e-16)):
        xs = x.astype(dtype)
        got = np.array([fn(t) for t in xs], dtype=np.float64)
        want = np.exp(xs.astype(np.float64))
        normal = want > np.finfo(dtype).tiny * 2 ** 24
        assert np.all(np.abs(got - want)[normal] <= bound * want[normal])
        assert np.all(got[~normal] <= 2 * np.finfo(dtype).tiny * 2 ** 24)
        assert fn(dtype(-np.inf)) == 0.0 and np.isnan(fn(dtype(np.nan)))


def test_first_call_times_reports_sdpa():
    from refattn.bench.cold_start import first_call_times

    times = first_call_times()
    assert times["sdpa float32"] > 0 and times["sdpa float64"] > 0
    hits, misses = times["cache"]
    assert hits + misses > 0


#: Tiles larger than (and not multiples of) DIAGONAL_ROWS, so a tile crossing the causal
#: diagonal or a window edge is cut into several blocks, the last one partial.
DIAGONAL_TILES = [(160, 96), (96, 160), (128, 128)]


@pytest.mark.parametrize("tiles", DIAGONAL_TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("L, S", [(300, 290), (290, 300)])
@pytest.mark.parametrize("options", [
    {"causal": True},
    {"causal": True, "causal_align": "lower_right"},
    {"window": (37, 0)},
    {"window": (100, 20), "causal_align": "lower_right"},
    {"window": (-1, 50)},
    {"window": (70, -1)},
    {"window": (45, 10), "causal": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_diagonal_blocks_match_reference(tiles, L, S, options):
    """The blocks of DIAGONAL_ROWS queries (forward) / keys (backward) a crossing tile is
    cut into keep exactly the pairs of the reference's mask, forward and backward."""
    assert max(tiles) > sdpa_numba.DIAGONAL_ROWS
    rng = np.random.default_rng(7)
    q, k, v = _problem(rng, 1, 2, 1, L, S, 8, 8, "float64")
    o_ref, res_ref = api.forward(q, k, v, backend="reference", **options)
    o, res = api.forward(q, k, v, backend="numba", tiles=tiles, **options)
    assert_close(o, o_ref, "float64", "o")
    assert np.array_equal(np.isneginf(res.lse), np.isneginf(res_ref.lse)), "empty rows differ"
    do = rng.standard_normal(o_ref.shape)
    for name, g, gr in zip(("dq", "dk", "dv"), api.backward(res, do), api.backward(res_ref, do)):
        assert_close(g, gr, "float64", name)


def test_forward_products_are_the_unnormalised_tile_sums():
    """The study's bound runs the forward's products on its tiles: (scale Q K^T) V, GQA."""
    rng = np.random.default_rng(3)
    q, k, v = _problem(rng, 2, 4, 2, 100, 70, 8, 5, "float64")
    opts = api.prepare(q, k, v, scale=0.3, tiles=SMALL_TILES)[2]
    got = sdpa_numba.forward_products(q, k, v, opts)
    kk, vv = (np.repeat(x, 2, axis=1) for x in (k, v))                  # (B, H, S, E)
    assert_close(got, (0.3 * q @ kk.transpose(0, 1, 3, 2)) @ vv, "float64", "products")
