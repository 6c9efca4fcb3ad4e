"""Packed and padded sequences on numba: one kernel launch per pass, against the reference.

The numba kernels walk the sequences themselves (``refattn.cores.sdpa.numba.span_table``:
work items address (sequence, head, query tile) forward and (sequence, kv head, key tile
chunk) backward), while the reference backend runs one call per group of equal-length
sequences (``refattn/cores/sdpa/segments.py``).  Both must give the numbers of
docs/cores/sdpa.md, "Packed and padded sequences", to float64 rounding: many distinct
lengths, empty sequences, a sequence of length 1, ``Lq != Sk`` per sequence, both causal
alignments, window, ALiBi, GQA, dropout, bias and mask of shape ``(H, Tq, Tk)``.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cores.sdpa import api
from refattn.cores.sdpa import numba as sdpa_numba
from refattn.cores.sdpa import segments
from refattn.testing import assert_close

H, HKV, E, EV = 4, 2, 5, 3
TILES = (4, 8)          # sequences cross tiles: first, inner and last tiles of a span
# 14 sequences, 10 distinct non-empty (queries, keys) pairs: empty on either side, length
# 1, Lq != Sk
Q_LENS = (5, 0, 1, 9, 3, 13, 7, 1, 0, 6, 11, 2, 9, 4)
K_LENS = (7, 4, 1, 9, 0, 6, 12, 3, 0, 6, 11, 17, 9, 2)


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _packed_arrays(seed):
    rng = np.random.default_rng(seed)
    tq, tk = sum(Q_LENS), sum(K_LENS)
    return (rng.standard_normal((tq, H, E)), rng.standard_normal((tk, HKV, E)),
            rng.standard_normal((tk, HKV, EV)))


def _case(name, rng, scores, rows):
    """Keyword arguments of case ``name``; ``scores`` is the shape (H, Tq, Tk) or
    (*batch, H, L, S), ``rows`` the ALiBi slope rows (N or *batch)."""
    cases = {
        "plain": {},
        "causal upper_left": {"causal": True},
        "causal lower_right": {"causal": True, "causal_align": "lower_right"},
        "window + causal lower_right + softcap": {"window": (3, 1), "causal": True,
                                                  "causal_align": "lower_right",
                                                  "softcap": 2.0},
        "window (2, -1) upper_left": {"window": (2, -1)},
        "window (-1, 2) lower_right": {"window": (-1, 2), "causal_align": "lower_right"},
        "alibi per sequence + causal": {"alibi_slopes": rng.random((*rows, H)),
                                        "causal": True, "causal_align": "lower_right"},
        "alibi (H,) + window": {"alibi_slopes": rng.random(H), "window": (4, 4)},
        "bias + mask (H, Tq, Tk)": {"bias": rng.standard_normal(scores),
                                    "mask": rng.random(scores) > 0.25, "causal": True},
        "dropout (H, Tq, Tk) + alibi": {"dropout_mask": rng.random(scores) > 0.3,
                                        "dropout_p": 0.3, "alibi_slopes": rng.random(H)},
    }
    return cases[name]


CASES = ("plain", "causal upper_left", "causal lower_right",
         "window + causal lower_right + softcap", "window (2, -1) upper_left",
         "window (-1, 2) lower_right", "alibi per sequence + causal", "alibi (H,) + window",
         "bias + mask (H, Tq, Tk)", "dropout (H, Tq, Tk) + alibi")


def _both_backends(arrays, seed, **options):
    """``[o, dq, dk, dv, (dbias), (dslopes)]`` on the reference and on numba."""
    results = []
    for backend in ("reference", "numba"):
        o, pull = refattn.vjp(refattn.sdpa, *arrays, backend=backend, tiles=TILES, **options)
        cotangent = np.random.default_rng(seed).standard_normal(o.shape)
        results.append([o, *pull(cotangent)])
    return results


def _assert_same(expected, got, what):
    assert len(expected) == len(got)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.shape == e.shape, (what, i)
        assert_close(g, e, "float64", f"{what}: result {i}")


@pytest.mark.parametrize("name", CASES)
def test_packed_numba_equals_the_reference(name):
    arrays = _packed_arrays(1)
    scores = (H, sum(Q_LENS), sum(K_LENS))
    options = _case(name, np.random.default_rng(2), scores, (len(Q_LENS),))
    expected, got = _both_backends(arrays, 3, cu_seqlens_q=_cu(Q_LENS),
                                   cu_seqlens_k=_cu(K_LENS), **options)
    _assert_same(expected, got, f"packed, {name}")
    o, dq = got[0], got[1]
    for n in (1, 8):                              # sequences without queries: nothing to write
        assert o[_cu(Q_LENS)[n]:_cu(Q_LENS)[n + 1]].size == 0
    empty_keys = slice(_cu(Q_LENS)[4], _cu(Q_LENS)[5])   # sequence 4: queries, no key
    assert not o[empty_keys].any() and not dq[empty_keys].any()


B, L, S = 6, 9, 11
PADDED_Q = np.array([9, 0, 1, 5, 7, 3], np.int32)
PADDED_K = np.array([11, 4, 1, 0, 10, 8], np.int32)


@pytest.mark.parametrize("name", ("causal upper_left", "window + causal lower_right + softcap",
                                  "alibi per sequence + causal", "bias + mask (H, Tq, Tk)",
                                  "dropout (H, Tq, Tk) + alibi"))
def test_padded_numba_equals_the_reference(name):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, H, L, E))               # batch (2, 3)
    k = rng.standard_normal((2, 3, HKV, S, E))
    v = rng.standard_normal((2, 3, HKV, S, EV))
    options = _case(name, np.random.default_rng(5), (2, 3, H, L, S), (2, 3))
    expected, got = _both_backends((q, k, v), 6, query_seq_lengths=PADDED_Q.reshape(2, 3),
                                   key_value_seq_lengths=PADDED_K.reshape(2, 3), **options)
    _assert_same(expected, got, f"padded, {name}")
    o, dq = got[0], got[1]
    assert not o[0, 1].any() and not dq[0, 1].any()        # Lq = 0
    assert not o[0, 2, :, 1:].any() and not dq[0, 2, :, 1:].any()    # padded query rows
    assert not o[1, 0].any() and not dq[1, 0].any()        # Lk = 0: o = 0, dq = 0


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels ``run_split`` launches (the real one runs), in order."""
    calls = []
    real = sdpa_numba.run_split

    def counting(kernel, args, items, costs):
        calls.append(kernel.py_func.__name__)
        return real(kernel, args, items, costs)

    monkeypatch.setattr(sdpa_numba, "run_split", counting)
    return calls


def test_packed_call_is_one_kernel_launch_per_pass(launches):
    """Many distinct length pairs: one run_split forward and one backward (the real one,
    counted), where the grouped path of segments.py makes one core call per pair."""
    calls = launches
    arrays = _packed_arrays(7)
    kwargs = {"cu_seqlens_q": _cu(Q_LENS), "cu_seqlens_k": _cu(K_LENS), "causal": True,
              "window": (5, 0), "alibi_slopes": np.random.default_rng(8).random(H)}
    o, res = api.forward(*arrays, backend="numba", tiles=TILES, **kwargs)
    assert calls == ["_forward_kernel"]
    grads = api.backward(res, np.ones_like(o))
    assert calls == ["_forward_kernel", "_backward_kernel"]
    spans = segments.packed_spans(_cu(Q_LENS), _cu(K_LENS), sum(Q_LENS), sum(K_LENS))
    assert len(segments.groups(spans)) == len({(a, b) for a, b in zip(Q_LENS, K_LENS)
                                               if a and b}) == 10
    o_ref, res_ref = api.forward(*arrays, backend="reference", **kwargs)
    assert_close(o, o_ref, "float64")
    for g, e in zip(grads, api.backward(res_ref, np.ones_like(o))):
        assert_close(g, e, "float64")


def test_sequences_add_no_compiled_signature():
    """Packed and padded calls run the same compiled kernels as calls without sequences."""
    arrays = _packed_arrays(9)
    for kwargs in ({"cu_seqlens_q": _cu(Q_LENS), "cu_seqlens_k": _cu(K_LENS), "causal": True},
                   {"cu_seqlens_q": _cu(Q_LENS), "cu_seqlens_k": _cu(K_LENS),
                    "alibi_slopes": np.ones((len(Q_LENS), H))}):
        o, res = api.forward(*arrays, backend="numba", tiles=TILES, **kwargs)
        api.backward(res, np.ones_like(o))
    q = np.ones((3, H, 6, E))
    o, res = api.forward(q, q[:, :HKV], q[:, :HKV], backend="numba", causal=True,
                         query_seq_lengths=np.array([6, 2, 0]))
    api.backward(res, np.ones_like(o))
    for kernel in (sdpa_numba._forward_kernel, sdpa_numba._backward_kernel):
        float64 = [sig for sig in kernel.signatures if sig[0].dtype.name == "float64"]
        assert len(float64) == 1, (kernel, float64)


def test_span_table_moves_each_sequence_rule_to_the_view():
    """A sequence's rule counted from its start is the view's rule with shifted offsets."""
    layout = segments.SequenceLayout(
        np.array([[0, 0, 3, 0, 5], [0, 3, 7, 5, 6]]), causal=True, lower_right=True,
        window=(1, -1))
    table = sdpa_numba.span_table(api.SDPAOptions(scale=1.0, sequences=layout), 1, 7, 6)
    col = {name: table[:, i].tolist() for i, name in enumerate(sdpa_numba.SPAN_COLUMNS)}
    # sequence 1: l = 4, s = 1, lower-right offset s - l = -3, shifted by k0 - q0 = 2
    assert col["causal"] == [2, -1] and col["lo"] == [1, -2] and col["dist"] == [2, -1]
    assert col["row"] == [0, 1] and col["hi"] == [0, 0]
    i, j = np.arange(3, 7)[:, None], np.arange(5, 6)[None, :]
    kept = (j <= i + col["causal"][1]) & (j - i >= col["lo"][1])
    i_local, j_local = i - 3, j - 5
    assert np.array_equal(kept, (j_local <= i_local - 3) & (j_local >= i_local - 3 - 1))


# FlexAttention-style functions: each sequence is seen as batch row b = its number, with
# positions counted from its start (the reference relabels its grouped calls the same way)
def _mask_mod(b, h, i, j):
    return (i + 2 * j + b + h) % 5 != 0


def _score_mod(score, b, h, i, j):
    return score * (1.0 + 0.25 * h) + 0.125 * (i - j) - 0.0625 * b


def _score_mod_grad(score, b, h, i, j):
    return 1.0 + 0.25 * h + 0.0 * score


MODS = {"mask_mod": _mask_mod, "score_mod": _score_mod, "score_mod_grad": _score_mod_grad}


@pytest.mark.parametrize("name", ("plain", "window + causal lower_right + softcap",
                                  "alibi per sequence + causal"))
def test_packed_mods_on_numba_equal_the_reference_in_one_launch(name, launches):
    arrays = _packed_arrays(10)
    scores = (H, sum(Q_LENS), sum(K_LENS))
    options = _case(name, np.random.default_rng(11), scores, (len(Q_LENS),))
    expected, got = _both_backends(arrays, 12, cu_seqlens_q=_cu(Q_LENS),
                                   cu_seqlens_k=_cu(K_LENS), **options, **MODS)
    _assert_same(expected, got, f"packed + mask_mod + score_mod, {name}")
    assert launches == ["_forward_kernel", "_backward_kernel"]   # no call per group


def test_padded_mods_on_numba_equal_the_reference():
    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, 3, H, L, E))
    k = rng.standard_normal((2, 3, HKV, S, E))
    v = rng.standard_normal((2, 3, HKV, S, EV))
    expected, got = _both_backends((q, k, v), 14, query_seq_lengths=PADDED_Q.reshape(2, 3),
                                   key_value_seq_lengths=PADDED_K.reshape(2, 3), causal=True,
                                   **MODS)
    _assert_same(expected, got, "padded + mask_mod + score_mod")
