"""The command line: the main report, info, bench, variants, --version, --debug.

The table of user mistakes (exit status and message per argument) is
tests/cli/test_edge_inputs.py; damaged golden files are in tests/verify/test_golden.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import refattn
from refattn.cli import main
from refattn.cli._errors import UsageError


def test_report_on_one_variant_passes(capsys):
    rc = main(["report", "--variants", "sdpa", "--backends", "reference", "--no-studies"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sdpa" in out and "reference" in out and "all 2 checks passed" in out
    assert "fwd err" in out and "GFLOP/s" in out


def test_report_fails_on_a_failing_check(monkeypatch, capsys):
    from refattn.cli import report

    monkeypatch.setattr(report, "FLOAT64_FORWARD_RTOL", -1.0)  # nothing can pass now
    rc = main(["report", "--variants", "sdpa", "--backends", "reference", "--dtypes", "float64",
               "--no-studies"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 of 1 check(s) FAILED" in out and "checks passed" not in out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "backends" in out and "numba threads" in out


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in refattn.bench.studies())


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"refattn {refattn.__version__}"


def test_variants_lists_every_registered_variant(capsys):
    from refattn.backends import available_backends

    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()
            and line.split()[0] in refattn.variants()}
    assert set(rows) == set(refattn.variants())
    name, kind, core, projection = rows["mha-efficient"][:4]
    assert (kind, core, projection) == ("layer", "sdpa", "efficient")
    assert rows["sdpa"][1:4] == ["core", "sdpa", "-"]
    for b in refattn.get_variant("sdpa").backends:
        assert (b + "*" if b in available_backends() else b) in rows["sdpa"]
    assert "causal_align," in rows["sdpa"] and "order," in rows["elementwise"]


def test_debug_lets_the_traceback_through(tmp_path, capsys):
    missing = str(tmp_path / "missing.npz")
    assert main(["cases", "check", missing]) == 2
    assert capsys.readouterr().err.strip() == f"refattn cases: error: {missing}: no such file"
    with pytest.raises(UsageError, match="no such file"):
        main(["--debug", "cases", "check", missing])
    with pytest.raises(UsageError):
        main(["cases", "check", missing, "--debug"])         # anywhere on the line


def test_an_internal_error_is_one_line_with_exit_4(monkeypatch, capsys):
    from refattn.cli import info

    def broken(args):
        raise RuntimeError("something refattn got wrong")

    monkeypatch.setattr(info, "run", broken)
    assert main(["info"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "refattn info: internal error RuntimeError: something refattn got wrong" in err
    assert "--debug" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "info"])


def test_entry_point_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "refattn", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"refattn {refattn.__version__}"


def test_report_options_work_without_the_command_name(capsys):
    assert main(["--variants", "sdpa", "--backends", "reference", "--dtypes", "float32",
                 "--no-studies"]) == 0
    assert "all 1 checks passed" in capsys.readouterr().out
