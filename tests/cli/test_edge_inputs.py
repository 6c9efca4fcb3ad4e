"""Every user mistake on the command line: its exit status and one line naming the argument.

Run in-process (``refattn.cli.main(argv)``).  Each row: the argument vector
(``{tmp}`` is a fresh folder, ``{file}`` an existing plain file in it), the
expected exit status, and a piece of the message.  No row may print a
traceback, and each error is one line on stderr.
"""

from __future__ import annotations

import pytest

from refattn.cli import main, report

EDGE_INPUTS = [
    # the main job (refattn [report])
    (["report", "--variants", "sdpx", "--no-studies"], 2,
     "refattn report: error: --variants: unknown variant 'sdpx' (did you mean 'sdpa'?); "
     "choose from elementwise,"),
    (["--variants", "sdpa", "--backends", "cupyy", "--no-studies"], 2,
     "--backends: unknown backend 'cupyy' (did you mean 'cupy'?); choose from reference, "
     "numba, cupy"),
    (["--variants", "sdpa", "--backends", "cupy", "--no-studies"], 2,
     "--backends: cupy is not available on this machine (CuPy is not installed or sees no "
     "CUDA device); available: reference, numba"),
    (["--variants", "sdpa", "--studies", "sdpa-vs-torc"], 2,
     "--studies: unknown study 'sdpa-vs-torc' (did you mean 'sdpa-vs-torch'?)"),
    (["--variants", "sdpa", "--dtypes", "float16"], 2,
     "refattn report: error: argument --dtypes: invalid choice: 'float16'"),
    (["--variants"], 2, "argument --variants: expected at least one argument"),
    (["--variants", "sdpa", "--no-studies", "--json", "{tmp}/no/such/dir/r.json"], 2,
     "--json: folder {tmp}/no/such/dir does not exist"),
    (["--variants", "sdpa", "--no-studies", "--json", "{tmp}"], 2,
     "--json: {tmp} is a folder; give a file name"),
    (["--bogus"], 2, "refattn: error: unrecognized arguments: --bogus"),
    (["nosuchcommand"], 2, "refattn: error: argument COMMAND: invalid choice: 'nosuchcommand'"),
    # bench
    (["bench", "sdpa-memroy"], 2, "refattn bench: error: STUDY: unknown study 'sdpa-memroy' "
                                  "(did you mean 'sdpa-memory'?)"),
    (["bench", "sdpa-memory", "--plot", "{file}"], 2, "--plot: {file} exists and is not a folder"),
    # cond
    (["cond", "--length", "0"], 2,
     "refattn cond: error: argument --length: must be a positive integer, got 0"),
    (["cond", "--heads", "-2"], 2, "argument --heads: must be a positive integer, got -2"),
    (["cond", "--batch", "two"], 2,
     "argument --batch: expected a positive integer, got 'two'"),
    (["cond", "--d-model", "0"], 2, "argument --d-model: must be a positive integer, got 0"),
    (["cond", "--seed", "-1"], 2, "argument --seed: must be a non-negative integer, got -1"),
    (["cond", "--eps", "nan"], 2, "argument --eps: must be a finite non-negative number, got nan"),
    (["cond", "--eps", "-0.001"], 2, "argument --eps: must be a finite non-negative number"),
    (["cond", "--npz", "{tmp}/missing.npz"], 2, "refattn cond: {tmp}/missing.npz: no such file"),
    (["cond", "--length", "8", "--d-model", "8", "--heads", "2", "--core", "sdpx"], 2,
     "core must be one of"),
    # params
    (["params", "--d-model", "64"], 2,
     "refattn params: error: --d-model, --seq-len: give both, or neither"),
    (["params", "--heads", "0"], 2, "argument --heads: must be a positive integer, got 0"),
    # cases
    (["cases"], 2, "refattn cases: error: the following arguments are required: ACTION"),
    (["cases", "export", "sdpx", "--out", "{tmp}/x.npz"], 2,
     "refattn cases: error: VARIANT: unknown variant 'sdpx' (did you mean 'sdpa'?); "
     "choose from "),
    (["cases", "export", "sdpa"], 2, "the following arguments are required: --out"),
    (["cases", "export", "sdpa", "--out", "{tmp}/no/dir/x.npz"], 2,
     "--out: folder {tmp}/no/dir does not exist"),
    (["cases", "export", "sdpa", "--out", "{tmp}/x.npz", "--seed", "-1"], 2,
     "argument --seed: must be a non-negative integer, got -1"),
    (["cases", "export", "sdpa", "--out", "{tmp}/x.npz", "--kind", "big"], 2,
     "argument --kind: invalid choice: 'big'"),
    (["cases", "check", "{tmp}/missing.npz"], 2,
     "refattn cases: error: {tmp}/missing.npz: no such file"),
    (["cases", "check", "{file}"], 2, "{file}: not a readable .npz archive"),
    (["cases", "check", "{tmp}"], 2, "{tmp}: is a directory, not a golden .npz file"),
]


@pytest.mark.parametrize("argv, status, message", EDGE_INPUTS,
                         ids=[" ".join(a) for a, _, _ in EDGE_INPUTS])
def test_edge_input(argv, status, message, tmp_path, capsys, monkeypatch):
    # cupy is "not available" on every machine the table runs on, GPU or not
    monkeypatch.setattr(report, "available_backends", lambda: ("reference", "numba"))
    plain = tmp_path / "notes.txt"
    plain.write_text("not an archive\n")
    fill = {"{tmp}": str(tmp_path), "{file}": str(plain)}

    def expand(text):
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    assert main([expand(a) for a in argv]) == status
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert expand(message) in err, err
    assert err.count("\n") == 1, err
