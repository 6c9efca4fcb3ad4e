"""The main job: streamed rows, the progress bar, --json, study targets and --strict, timing."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from rich.console import Console

import refattn
from refattn._core import Core
from refattn.bench import STUDIES, Study, StudyResult, compare
from refattn.catalog import VARIANTS, Variant
from refattn.cores import CORES
from refattn.cli import main, report
from refattn.cli._progress import Progress

ONE_ROW = ["--variants", "sdpa", "--backends", "reference", "--dtypes", "float32"]


def _ratio_study(name, target):
    """A small real study: the time of a 64 x 64 matmul over a 32 x 32 one, against ``target``."""

    def run(size):
        a, b = np.ones((64, 64)), np.ones((32, 32))
        t = compare({"64": lambda: a @ a, "32": lambda: b @ b}, rounds=2, min_time=0.001)
        ratio = t["64"] / t["32"]
        failures = [] if ratio <= target else [f"ratio {ratio:.2f} > target {target}"]
        return StudyResult(f"matmul 64 over 32 ({size})", ["what", "ms", "ratio"],
                           [["64", f"{t['64'] * 1e3:.4f}", f"{ratio:.2f}"],
                            ["32", f"{t['32'] * 1e3:.4f}", "1.00"]],
                           metrics={"time_ratio": ratio}, failures=failures)

    return Study(name, "test study: matmul time ratio", run)


@pytest.fixture
def fixture_studies(monkeypatch):
    """Two registered studies: one whose target always holds, one whose target never can."""
    met = _ratio_study("fixture-met", target=float("inf"))
    unmet = _ratio_study("fixture-unmet", target=0.0)

    def broken(size):
        raise RuntimeError("the study broke")

    for study in (met, unmet, Study("fixture-broken", "raises", broken)):
        monkeypatch.setitem(STUDIES, study.name, study)


def _table_lines(out):
    return [line for line in out.splitlines() if line.startswith("sdpa ")]


def test_json_holds_what_the_table_shows(fixture_studies, tmp_path, capsys):
    path = tmp_path / "report.json"
    argv = ["--variants", "sdpa", "--backends", "reference", "--studies", "fixture-met",
            "fixture-unmet", "--json", str(path)]
    assert main(argv) == 0                                   # unmet targets: 0 without --strict
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["refattn_version"] == refattn.__version__ and data["command"] == "report"
    rows = data["checks"]
    assert [(r["variant"], r["backend"], r["dtype"]) for r in rows] == [
        ("sdpa", "reference", "float64"), ("sdpa", "reference", "float32")]
    fmt = report.RowFormat(["sdpa"])
    assert _table_lines(out) == [fmt.line(report.row_cells(r)) for r in rows]
    for r in rows:
        assert r["ok"] is True and r["t_fwd"] > 0 and r["t_fwdbwd"] > 0
        assert f"{r['t_fwd'] * 1e3:.3f}" in out
        assert 0 < r["cpu_seconds"] and 0 < r["seconds"]
    assert 0 < data["checks_cpu_seconds"] <= data["cpu_seconds"]
    assert f"{data['checks_cpu_seconds']:.1f} CPU s)" in out
    studies = {s["name"]: s for s in data["studies"]}
    assert all(s["cpu_seconds"] > 0 for s in studies.values())
    assert data["studies_left_to_bench"] == {}               # studies named: nothing left out
    assert studies["fixture-met"]["targets_met"] is True
    assert studies["fixture-unmet"]["targets_met"] is False
    unmet = studies["fixture-unmet"]
    assert f"  target not met: {unmet['targets_not_met'][0]}" in out
    assert unmet["rows"][0][2] in out and unmet["metrics"]["time_ratio"] > 0
    summary = data["summary"]
    assert summary["checks"] == 2 and summary["failed"] == 0 and summary["targets_not_met"] == 1
    assert summary["exit_status"] == 0
    assert out.rstrip().endswith(f"wrote {path}")
    for line in summary["lines"]:
        assert line in out
    assert "all 2 checks passed" in summary["lines"]
    assert ("1 study target(s) not met (fixture-unmet); --strict makes this exit status 3"
            in summary["lines"])


def test_strict_makes_unmet_targets_exit_3(fixture_studies, capsys):
    assert main(ONE_ROW + ["--studies", "fixture-unmet", "--strict"]) == 3
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == ("1 study target(s) not met (fixture-unmet): "
                                             "exit status 3 (--strict)")
    assert main(ONE_ROW + ["--studies", "fixture-met", "--strict"]) == 0
    assert "all targets of 1 study(ies) met" in capsys.readouterr().out


def test_a_study_that_raises_fails_the_run(fixture_studies, capsys):
    assert main(ONE_ROW + ["--studies", "fixture-broken", "fixture-met"]) == 1
    out, err = capsys.readouterr()
    assert "fixture-broken: ERROR RuntimeError: the study broke" in err
    assert "1 study(ies) raised an error: fixture-broken" in out
    assert "Traceback" not in out + err


def test_the_main_job_leaves_bench_only_studies_to_refattn_bench(monkeypatch, capsys):
    """Without --studies the main job runs the main-job studies and names the others."""
    for name in list(STUDIES):
        monkeypatch.delitem(STUDIES, name)
    monkeypatch.setitem(STUDIES, "fixture-met", _ratio_study("fixture-met", float("inf")))
    slow = Study("fixture-slow", "bench only", lambda size: 1 / 0, main_job=False,
                 main_job_note="judged at full size only")
    monkeypatch.setitem(STUDIES, slow.name, slow)
    from refattn.cli.bench import select_studies
    assert list(select_studies([], main_job=True)) == ["fixture-met"]
    assert list(select_studies([])) == ["fixture-met", "fixture-slow"]      # refattn bench
    assert main(ONE_ROW) == 0                              # the slow study would raise
    out = capsys.readouterr().out
    assert "then 1 studies (size quick); 1 left to `refattn bench`" in out
    assert ("fixture-slow: run by `refattn bench fixture-slow` only (judged at full size "
            "only; `refattn --studies fixture-slow` adds it here)") in out
    assert main(ONE_ROW + ["--studies", "fixture-slow"]) == 1           # named: it runs
    assert main(["bench", "--list"]) == 0
    assert "bench only [refattn bench only]" in capsys.readouterr().out


def test_a_variants_rows_share_its_references():
    """The float64 and float32 references are computed once and give the same verdicts."""
    variant = refattn.get_variant("elementwise")
    refs = report.References(variant)
    shared = [report.check_row(variant, b, d, refs=refs)
              for b in ("reference", "numba") for d in ("float64", "float32")]
    alone = [report.check_row(variant, b, d) for b in ("reference", "numba")
             for d in ("float64", "float32")]
    for a, b in zip(shared, alone):
        assert a["ok"] and b["ok"]
        assert (a["fwd_err"], a["grad_err"]) == (b["fwd_err"], b["grad_err"])
    assert refs.float64_output()[0] is refs.float64_output()[0]
    assert refs.low("float32")[0] is refs.low("float32")[0]
    assert refs.float64_grads() is refs.float64_grads()


def test_rows_are_printed_as_they_finish(monkeypatch, capsys):
    seen = []
    real = report.check_row

    def spy(*args, **kwargs):           # what stdout held when each row started
        seen.append(capsys.readouterr().out)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "check_row", spy)
    assert main(ONE_ROW[:1] + ["sdpa", "elementwise"] + ONE_ROW[2:] + ["--no-studies"]) == 0
    assert len(seen) == 2
    assert "fwd err" in seen[0] and "sdpa " not in seen[0]           # header before row 1
    assert seen[1].count("sdpa ") == 1 and "elementwise" not in seen[1]  # row 1 before row 2


def test_no_check_to_run_is_an_error(monkeypatch, capsys):
    core = Core("fixture-core", forward=lambda *a, **k: None, backward=lambda *a: None,
                backends=("reference",))
    monkeypatch.setitem(CORES, core.name, core)
    monkeypatch.setitem(VARIANTS, "fixture-variant", Variant(
        "fixture-variant", "core", lambda kind, dtype, seed: [], core.name))
    assert main(["--variants", "fixture-variant", "--backends", "numba", "--no-studies"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("refattn report: error: --backends: none of numba implements "
                           "fixture-variant: nothing to check")


def test_progress_bar_shows_count_eta_and_what_runs():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    with Progress(3, "checking", console=console) as bar:
        bar.advance()
        bar.doing("sdpa numba float32: first call (compiles the numba kernels unless cached)")
    text = buffer.getvalue()
    assert "checking" in text and "1/3" in text
    assert re.search(r"ETA \d+:\d\d:\d\d", text)            # a time once a step is done
    assert "sdpa numba float32: first call (compiles" in text


def test_progress_bar_is_silent_off_a_terminal(capsys):
    with Progress(2, "checking") as bar:          # stderr is captured: not a terminal
        bar.doing("something")
        bar.emit("a finished row")
        bar.advance()
    out, err = capsys.readouterr()
    assert out == "a finished row\n" and err == ""


def test_timed_samples_are_far_above_the_clock_resolution():
    from refattn.bench.timing import MIN_BATCH_SECONDS, clock_resolution, time_per_call

    x = np.ones((16, 16))
    seconds, n = time_per_call(lambda: x @ x)
    assert n > 1                                          # one call is far below 50 ms
    assert seconds * n >= 0.5 * MIN_BATCH_SECONDS         # every sample a long batch
    assert seconds * n >= 500 * clock_resolution()


def test_report_rows_record_their_batches(capsys):
    variant = refattn.get_variant("sdpa")
    row = report.check_row(variant, "reference", "float32")
    assert row["ok"]
    for what in ("fwd", "fwdbwd"):
        t, n = row[f"t_{what}"], row[f"calls_per_sample_{what}"]
        assert t * n >= 0.5 * report.TIMING_MIN_BATCH_SECONDS
