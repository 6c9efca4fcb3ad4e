"""The CUDA option kernels' index math on the CPU, against the reference backend's masks.

``refattn/cores/sdpa/sdpa_rules.cuh`` holds what ``sdpa_fwd_opt`` / ``sdpa_bwd_opt``
decide per pair and per tile: the keep rule (window, causal rule, sequence bounds), the
key (query) range a query (key) tile visits, the full-tile test and the ALiBi distance.
It is plain C++, so ``sdpa_rules_harness.cpp`` compiles it with the host compiler and
walks the tiles exactly as the kernels do; its output is compared here with the keep
masks of the reference backend for many shapes, windows, alignments, tile sizes and
packed / padded sequences.  The arguments come from the cupy driver's own functions
(:func:`refattn.cores.sdpa.cupy.rule_arguments`, ``SDPAOptions.sequences``), so the
mapping from the public options to the kernels' integers is checked too.  Runs without
a GPU (a C++ compiler is part of the CI image).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import refattn
from refattn._masks import alibi_distance, keep_mask
from refattn.cores.sdpa import api, segments
from refattn.cores.sdpa import cupy as sdpa_cupy

HERE = pathlib.Path(__file__).parent
HARNESS = HERE / "sdpa_rules_harness.cpp"
HEADER = pathlib.Path(sdpa_cupy.__file__).parent / "sdpa_rules.cuh"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The harness compiled with the host C++ compiler (warnings are errors)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a host C++ compiler (g++) is needed to check sdpa_rules.cuh"
    exe = tmp_path_factory.mktemp("rules") / "sdpa_rules_harness"
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(HARNESS)], check=True, capture_output=True, text=True)
    return exe


def _run(exe, cases):
    """Feed ``(B, L, S, rule_arguments, BM, BN, spans)`` cases; parse one result per case."""
    lines = []
    for B, L, S, rule, BM, BN, spans in cases:
        flat = " ".join(str(int(x)) for x in np.asarray(spans).reshape(-1))
        lines.append(f"{B} {L} {S} {' '.join(map(str, rule))} {BM} {BN} {len(spans)} {flat}")
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == f"unbounded {sdpa_cupy.RULE_UNBOUNDED}"   # header and driver agree
    results = []
    for n, (B, L, S, *_rest) in enumerate(cases):
        fwd, bwd, alibi, tiles = (line.split() for line in out[1 + 4 * n: 5 + 4 * n])
        assert (fwd[0], bwd[0], alibi[0], tiles[0]) == ("fwd", "bwd", "alibi", "tiles")

        def cells(words, kind=np.int8):
            digits = words[1] if len(words) > 1 else ""
            return np.array(list(digits), dtype=kind).reshape(B, L, S).astype(bool)

        results.append({"fwd": cells(fwd), "bwd": cells(bwd),
                        "alibi": np.array(alibi[1:], dtype=np.int64).reshape(B, L, S),
                        "tiles": tuple(int(x) for x in tiles[1:])})
    return results


def _min_tiles(keep, spans, BM, BN):
    """Key tiles a forward pass must visit at least: per query tile of each sequence, the
    kept keys' span in steps of BN from the first kept key (0 when none is kept)."""
    count = 0
    for b, q0, q1, k0, k1 in spans:
        for m0 in range(q0, q1, BM):
            cols = np.flatnonzero(keep[b, m0:min(m0 + BM, q1), k0:k1].any(axis=0))
            if cols.size:
                count += -(-(cols[-1] + 1 - cols[0]) // BN)
    return count


def _check(result, keep, spans, BM, BN, case):
    np.testing.assert_array_equal(result["fwd"], keep, err_msg=f"forward tiles, {case}")
    np.testing.assert_array_equal(result["bwd"], keep, err_msg=f"backward tiles, {case}")
    visited, empty, full_wrong, full_missed = result["tiles"]
    assert (empty, full_wrong, full_missed) == (0, 0, 0), case
    assert visited == _min_tiles(keep, spans, BM, BN), case    # fully masked tiles skipped
    B, L, S = keep.shape
    expected = np.full((B, L, S), -1, np.int64)
    for b, q0, q1, k0, k1 in spans:
        expected[b, q0:q1, k0:k1] = alibi_distance(np, q1 - q0, k1 - k0, np.int64)
    np.testing.assert_array_equal(result["alibi"], expected, err_msg=f"ALiBi distance, {case}")


def _window(rng):
    return None if rng.random() < 0.2 else tuple(int(rng.integers(-1, 9)) for _ in range(2))


def _tiles(rng):
    return int(rng.integers(1, 9)), int(rng.integers(1, 9))


def test_one_call_matches_the_reference_keep_mask(harness):
    rng = np.random.default_rng(0)
    cases, expected = [], []
    for _ in range(300):
        L, S = (int(x) for x in rng.integers(1, 30, 2))
        causal, align, window = bool(rng.random() < 0.5), str(rng.choice(
            ["upper_left", "lower_right"])), _window(rng)
        if window is None and not causal:
            causal = True
        _, _, opts = api.prepare(*(np.zeros((1, 1, n, 1)) for n in (L, S, S)), causal=causal,
                                 causal_align=align, window=window)
        keep = keep_mask(np, None, opts.causal_offset, L, S, window=opts.window)
        BM, BN = _tiles(rng)
        spans = [(0, 0, L, 0, S)]
        cases.append((1, L, S, sdpa_cupy.rule_arguments(opts), BM, BN, spans))
        expected.append((keep[None], spans, BM, BN, dict(L=L, S=S, causal=causal, align=align,
                                                         window=window, tiles=(BM, BN))))
    for result, (keep, spans, BM, BN, case) in zip(_run(harness, cases), expected):
        _check(result, keep, spans, BM, BN, case)


def _reference_keep(q, k, v, **kw):
    """Pairs the reference backend keeps: probabilities > 0 with scale 0 (uniform rows)."""
    _, p = refattn.sdpa(q, k, v, scale=0.0, return_probs=True, backend="reference", **kw)
    return p


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sequences_match_the_reference(harness, layout):
    rng = np.random.default_rng(1 if layout == "packed" else 2)
    cases, expected = [], []
    for _ in range(60):
        causal, align, window = bool(rng.random() < 0.5), str(rng.choice(
            ["upper_left", "lower_right"])), _window(rng)
        if layout == "packed":
            N = int(rng.integers(1, 5))
            lq, lk = rng.integers(0, 14, N), rng.integers(0, 14, N)
            cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in (lq, lk))
            Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
            q, k, v = (rng.standard_normal((n, 2, 3)) for n in (Tq, Tk, Tk))
            kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
            spans = segments.packed_spans(cu_q, cu_k, Tq, Tk)
            q4, k4, v4 = (np.transpose(x, (1, 0, 2))[None] for x in (q, k, v))
            B, L, S = 1, Tq, Tk
        else:
            B, L, S = int(rng.integers(1, 4)), int(rng.integers(1, 20)), int(rng.integers(1, 20))
            lq, lk = rng.integers(0, L + 1, B), rng.integers(0, S + 1, B)
            q, k, v = (rng.standard_normal((B, 2, n, 3)) for n in (L, S, S))
            kw = dict(query_seq_lengths=lq, key_value_seq_lengths=lk)
            spans = segments.padded_spans(lq, lk, (B,), L, S)
            q4, k4, v4 = q, k, v
        if L == 0 or S == 0:          # no token on a side: nothing to compare
            continue
        p = _reference_keep(q, k, v, causal=causal, causal_align=align, window=window, **kw)
        keep = (p[0] if layout == "packed" else p[:, 0]) > 0           # (B, L, S), head 0
        if layout == "packed":
            keep = keep[None]
        _, _, opts = api.sequences_options(q4, k4, v4, {}, None, spans, causal=causal,
                                           causal_align=align, window=window)
        BM, BN = _tiles(rng)
        cases.append((B, L, S, sdpa_cupy.rule_arguments(opts), BM, BN, opts.sequences.spans))
        rows = [tuple(int(x) for x in row) for row in opts.sequences.spans]
        expected.append((keep, rows, BM, BN, dict(layout=layout, causal=causal, align=align,
                                                  window=window, spans=rows, tiles=(BM, BN))))
    assert len(cases) > 40
    for result, (keep, rows, BM, BN, case) in zip(_run(harness, cases), expected):
        _check(result, keep, rows, BM, BN, case)


def test_option_bits_and_rule_arguments_of_the_driver():
    _, _, plain = api.prepare(*(np.zeros((1, 1, 4, 2)),) * 3, causal=True)
    assert sdpa_cupy.option_bits(plain) == 0                   # the validated kernels
    assert sdpa_cupy.kernel_config("float32", 64, 64, options=0)["fwd"] == "sdpa_fwd<1,64,64,4,64>"
    _, _, opts = api.prepare(*(np.zeros((1, 2, n, 2)) for n in (3, 7, 7)), causal=True,
                             causal_align="lower_right", window=(2, 5), softcap=5.0,
                             alibi_slopes=np.ones(2))
    bits = sdpa_cupy.OPTION_BITS
    assert sdpa_cupy.option_bits(opts) == bits["window"] | bits["softcap"] | bits["alibi"]
    # offset S - L = 4: kept iff 4 - 2 <= j - i <= min(4 + 5, 4)
    assert sdpa_cupy.rule_arguments(opts) == (2, 4, 0, 0)
    cfg = sdpa_cupy.kernel_config("float32", 64, 64, options=sdpa_cupy.option_bits(opts))
    assert cfg["fwd"] == "sdpa_fwd_opt<1,64,64,4,64,7>" and cfg["bwd"] == "sdpa_bwd_opt<1,64,64,4,7>"
    with pytest.raises(ValueError, match="OPTION_BITS"):
        sdpa_cupy.kernel_config("float32", 64, 64, options=2 * max(sdpa_cupy.OPTION_BITS.values()))


def test_the_header_is_pasted_into_the_kernel_source():
    code = sdpa_cupy.SOURCE.code
    assert '#include "sdpa_rules.cuh"' not in code
    assert HEADER.read_text() in code
