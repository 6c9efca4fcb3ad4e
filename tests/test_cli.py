"""The command line: the main report, info, bench."""

from __future__ import annotations

import subprocess
import sys

from refattn.cli import main


def test_report_on_one_variant_passes(capsys):
    rc = main(["report", "--variants", "sdpa", "--backends", "reference", "--no-studies"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sdpa" in out and "reference" in out and "all checks passed" in out
    assert "fwd err" in out and "GFLOP/s" in out


def test_report_fails_on_a_failing_check(monkeypatch, capsys):
    from refattn.cli import report

    monkeypatch.setitem(report.FORWARD_TOL, "float64", -1.0)  # nothing can pass now
    rc = main(["report", "--variants", "sdpa", "--backends", "reference", "--dtypes", "float64",
               "--no-studies"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "backends" in out and "numba threads" in out


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0


def test_bench_unknown_study(capsys):
    assert main(["bench", "no-such-study"]) == 2


def test_entry_point_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "refattn", "info"], capture_output=True,
                         text=True, check=True)
    assert "refattn" in out.stdout


def test_report_options_work_without_the_command_name(capsys):
    assert main(["--variants", "sdpa", "--backends", "reference", "--dtypes", "float64",
                 "--no-studies"]) == 0
    assert "all checks passed" in capsys.readouterr().out
