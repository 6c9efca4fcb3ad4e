"""``refattn bench``: --plot DIR (one PNG per study), --json, --strict, the summary line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refattn.bench import STUDIES, Study, StudyResult, compare
from refattn.cli import main
from refattn.cli._study_plot import _columns

PNG = b"\x89PNG\r\n\x1a\n"


def _scaling(size):
    """Time and memory of a cumulative sum against L: a small scaling study with a target."""
    rows, times = [], []
    for L in (256, 512, 1024, 2048):
        x = np.ones(L * 64)
        t = compare({"cumsum": lambda: np.cumsum(x)}, rounds=2, min_time=0.001)["cumsum"]
        times.append(t)
        rows.append([L, f"{t * 1e3:.4f}", f"{x.nbytes / 2**20:.3f}"])
    slope = float(np.polyfit(np.log([r[0] for r in rows]), np.log(times), 1)[0])
    return StudyResult("cumsum against L", ["L", "cumsum ms", "input MiB"], rows,
                       metrics={"time_exponent": slope}, notes=["a test study"],
                       failures=[] if slope < 10 else [f"exponent {slope:.2f} >= 10"])


def _pairs(size):
    """Two contenders per row, their times and ratio; a target no machine meets."""
    rows, metrics = [], {}
    for n in (32, 64):
        a = np.ones((n, n))
        t = compare({"matmul": lambda: a @ a, "add": lambda: a + a}, rounds=2, min_time=0.001)
        ratio = t["matmul"] / t["add"]
        metrics[f"n{n}_ratio"] = ratio
        rows.append([f"n={n}", f"{t['matmul'] * 1e3:.4f}", f"{t['add'] * 1e3:.4f}",
                     f"{ratio:.2f}", f"{100 * (ratio - 1):+.1f}%"])
    return StudyResult("matmul vs add", ["size", "matmul ms", "add ms", "ratio", "change"], rows,
                       metrics=metrics, failures=["matmul is not free: a target no run meets"])


@pytest.fixture
def fixture_studies(monkeypatch):
    monkeypatch.setitem(STUDIES, "fixture-scaling", Study("fixture-scaling", "cumsum", _scaling))
    monkeypatch.setitem(STUDIES, "fixture-pairs", Study("fixture-pairs", "pairs", _pairs))


def test_plot_writes_one_png_per_study_and_json(fixture_studies, tmp_path, capsys):
    folder, path = tmp_path / "plots", tmp_path / "bench.json"
    argv = ["bench", "fixture-scaling", "fixture-pairs", "--quick", "--plot", str(folder),
            "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("fixture-scaling", "fixture-pairs"):
        png = folder / f"{name}.png"
        assert f"wrote {png}" in out
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    data = json.loads(path.read_text())
    studies = {s["name"]: s for s in data["studies"]}
    assert studies["fixture-scaling"]["targets_met"] is True
    assert studies["fixture-pairs"]["targets_not_met"] == [
        "matmul is not free: a target no run meets"]
    assert studies["fixture-pairs"]["size"] == "quick" and data["exit_status"] == 0
    assert ("1 study target(s) not met (fixture-pairs); --strict makes this exit status 3"
            in out)


def test_strict(fixture_studies, capsys):
    assert main(["bench", "fixture-pairs", "--strict"]) == 3
    assert main(["bench", "fixture-scaling", "--strict"]) == 0


def test_a_run_where_every_study_is_skipped_is_an_error(monkeypatch, capsys):
    needs = Study("fixture-needs", "needs a missing module", _pairs,
                  requires=("refattn_no_such_module",))
    monkeypatch.setitem(STUDIES, needs.name, needs)
    assert main(["bench", "fixture-needs"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("refattn bench: error: no study ran: fixture-needs needs "
                           "refattn_no_such_module (install the extras, e.g. pip install "
                           "'refattn[test]')")


def test_plot_panels_follow_the_table_units():
    scaling = _scaling("quick")
    x, labels, groups, _ = _columns(scaling)
    assert x == 0 and groups == {"time (ms)": [1], "memory (MiB)": [2]}   # lines against L
    pairs = _pairs("quick")
    x, labels, groups, values = _columns(pairs)
    assert x is None and labels == [0]
    assert groups == {"time (ms)": [1, 2], "ratio": [3], "percent": [4]}
    assert values[0][4] == pytest.approx(float(pairs.rows[0][4].rstrip("%")))
