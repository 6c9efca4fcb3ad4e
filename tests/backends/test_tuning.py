"""Run-time choices by measurement (refattn.backends.tuning) and the numba SDPA tiles."""

import json
import os

import numba
import numpy as np
import pytest

from refattn.backends import tuning
from refattn.cores.sdpa import api
from refattn.cores.sdpa import numba as sdpa_numba
from refattn.testing import assert_within_reference_error


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and no choices remembered by this process."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMO", {})
    return tmp_path


class Timer:
    """A measure that says candidate ``c`` takes ``cost[c]`` seconds, and counts its calls."""

    def __init__(self, cost):
        self.cost, self.calls = cost, 0

    def __call__(self, c):
        self.calls += 1
        return self.cost[tuple(c) if isinstance(c, list) else c]


def test_fastest_candidate_is_kept_and_recorded(fresh_cache):
    timer = Timer({1: 0.3, 2: 0.1, 3: 0.2})
    assert tuning.tuned_choice("t", [1, 2, 3], timer, rounds=3) == 2
    assert timer.calls == 3 + 3 * 3                       # one warm-up each, then 3 rounds
    assert tuning.recorded_choices() == {"t": 2}
    with open(os.path.join(fresh_cache, "refattn-tuning.json")) as f:
        assert json.load(f) == {f"{tuning.machine_key()}|t": 2}


def test_a_choice_is_measured_once(fresh_cache, monkeypatch):
    timer = Timer({(4, 8): 0.2, (8, 4): 0.1})
    assert tuning.tuned_choice("tiles", [(4, 8), (8, 4)], timer) == [8, 4]
    calls = timer.calls
    assert tuning.tuned_choice("tiles", [(4, 8), (8, 4)], timer) == [8, 4]   # process memo
    monkeypatch.setattr(tuning, "_MEMO", {})                                 # a new process
    assert tuning.tuned_choice("tiles", [(4, 8), (8, 4)], timer) == [8, 4]   # from the file
    assert timer.calls == calls


def test_a_recorded_value_no_longer_offered_is_measured_again(fresh_cache, monkeypatch):
    tuning.tuned_choice("c", [1, 2], Timer({1: 0.1, 2: 0.2}))
    monkeypatch.setattr(tuning, "_MEMO", {})
    assert tuning.tuned_choice("c", [2, 3], Timer({2: 0.2, 3: 0.1})) == 3


def test_unwritable_folder_keeps_the_choice_in_the_process(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(tuning, "_MEMO", {})
    assert tuning.tuning_file() is None
    assert tuning.tuned_choice("u", [1, 2], Timer({1: 0.2, 2: 0.1})) == 2
    assert tuning.recorded_choices() == {}


def test_a_damaged_file_is_measured_over(fresh_cache):
    (fresh_cache / "refattn-tuning.json").write_text("{not json")
    assert tuning.tuned_choice("d", [1, 2], Timer({1: 0.1, 2: 0.2})) == 1
    assert tuning.recorded_choices() == {"d": 1}


def test_numba_sdpa_tunes_long_problems_and_every_candidate_is_exact(fresh_cache):
    rng = np.random.default_rng(0)
    L, E = sdpa_numba.TUNE_MIN_LEN, 16
    q, k, v = (rng.standard_normal((1, 2, L, E)).astype(np.float32) for _ in range(3))
    expected = api.sdpa(*(x.astype(np.float64) for x in (q, k, v)), causal=True,
                        backend="reference")
    reference = api.sdpa(q, k, v, causal=True, backend="reference")     # float32
    got = api.sdpa(q, k, v, causal=True, backend="numba")      # measures, then records
    assert_within_reference_error(got, expected, reference, "float32")
    chosen = tuning.recorded_choices()[f"sdpa-numba-tiles:forward:float32:E{E}:Ev{E}"]
    assert tuple(chosen) in sdpa_numba.TILE_CANDIDATES
    for tiles in sdpa_numba.TILE_CANDIDATES:
        got = api.sdpa(q, k, v, causal=True, backend="numba", tiles=tiles)
        assert_within_reference_error(got, expected, reference, "float32", what=f"{tiles}")


def test_short_problems_and_explicit_tiles_measure_nothing(fresh_cache):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, sdpa_numba.TUNE_MIN_LEN - 1, 8))
    api.sdpa(q, q, q, backend="numba")
    big = rng.standard_normal((1, 1, sdpa_numba.TUNE_MIN_LEN, 8))
    api.sdpa(big, big, big, backend="numba", tiles=(64, 64))
    assert tuning.recorded_choices() == {}
