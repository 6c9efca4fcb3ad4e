"""Golden files: export, load without pickle, re-check; tampering and damage caught; exit codes."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cli import main
from refattn.verify import golden


def _cli(*argv):
    return main(["cases", *argv])


@pytest.fixture(scope="module")
def sdpa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "sdpa.npz"
    assert _cli("export", "sdpa", "--out", str(path)) == 0
    return path


def test_file_is_plain_arrays_and_round_trips(sdpa_file):
    with np.load(sdpa_file, allow_pickle=False) as data:
        assert str(data["format"]) == golden.FORMAT
        assert str(data["variant"]) == "sdpa" and str(data["variant_kind"]) == "core"
        n = int(data["n_cases"])
        for key in data.files:
            assert data[key].dtype.kind in "fbiU", key       # no object arrays anywhere
            if data[key].dtype.kind == "f":
                assert data[key].dtype == np.float64, key
    header, cases = golden.load_cases(sdpa_file)
    everything = refattn.get_variant("sdpa").cases("test", "float64", 0)
    registry = golden.storable_cases(everything)
    assert n == len(cases) == len(registry)
    assert [c.name for c in everything if c.name not in {r.name for r in registry}] == [
        "score_mod soft-cap + mask_mod sliding window"]            # no code in a golden file
    for stored, case in zip(cases, registry):
        assert stored["name"] == case.name
        for name, array in zip("qkv", case.arrays):
            np.testing.assert_array_equal(stored["inputs"][name], array)
        assert set(stored["options"]) == {k for k, v in case.options.items() if v is not None}
        out = case.run("reference")
        np.testing.assert_allclose(stored["expected"]["out"], out, rtol=1e-13, atol=1e-13)
    lower = next(c for c in cases if c["name"] == "causal lower_right L<S")
    assert lower["options"] == {"causal": True, "causal_align": "lower_right"}


def test_check_passes_and_cli_exit_code_zero(sdpa_file, capsys):
    report = golden.check(sdpa_file)
    report.assert_()
    assert {"out", "dq", "dk", "dv", "dbias"} <= {c.quantity for c in report.checks}
    assert _cli("check", str(sdpa_file), "--quiet") == 0
    assert capsys.readouterr().out.startswith("PASSED")


def test_tampered_file_fails_with_nonzero_exit(sdpa_file, tmp_path, capsys):
    with np.load(sdpa_file, allow_pickle=False) as data:
        entries = {k: data[k] for k in data.files}
    entries["case3/expected/dk"] = entries["case3/expected/dk"] * (1 + 1e-6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **entries)
    report = golden.check(bad)
    assert [(c.case, c.quantity) for c in report.failures] == [("MQA 4/1 causal", "dk")]
    assert _cli("check", str(bad)) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and "MQA 4/1 causal" in out


def test_layer_file_round_trips(tmp_path):
    path = tmp_path / "mha.npz"
    n = len(refattn.get_variant("mha-standard").cases("test", "float64", 3))
    assert golden.export("mha-standard", path, seed=3) == n
    header, cases = golden.load_cases(path)
    assert len(cases) == n
    assert header["seed"] == 3 and header["variant_kind"] == "layer"
    biased = cases[1]
    assert biased["layer"] == {"d_model": 8, "n_heads": 2, "projection": "standard",
                               "core": "sdpa", "causal": True, "bias": True}
    assert set(biased["params"]) == {"w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o"}
    assert "dxkv" in cases[2]["expected"] and cases[2]["options"]["mask"].dtype == bool
    golden.check(path).assert_()


def test_not_a_golden_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.ones(2))
    with pytest.raises(golden.GoldenFileError, match="not a refattn golden file"):
        golden.load_cases(path)


def _entries(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _drop(entries, key, *, from_manifest):
    del entries[key]
    if from_manifest:
        for m in ("manifest/keys", "manifest/finite"):
            entries[m] = np.array([k for k in map(str, entries[m]) if k != key], dtype=str)


def _with_inf(entries, key, *, declared_finite):
    entries[key] = entries[key].copy()
    entries[key].flat[0] = np.inf
    if not declared_finite:
        entries["manifest/finite"] = np.array([k for k in map(str, entries["manifest/finite"])
                                               if k != key], dtype=str)


def _damage(kind, src, path):
    """Write a damaged copy of the golden file ``src`` at ``path``."""
    e = _entries(src)
    if kind == "missing":
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "not a zip":
        path.write_bytes(b"q,k,v\n1,2,3\n")
        return
    if kind == "truncated":
        path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        return
    if kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones((2, 3, 4)))
        return
    if kind == "no inputs/q, manifest kept":
        del e["case0/inputs/q"]
    elif kind == "no inputs/q, manifest edited":
        _drop(e, "case0/inputs/q", from_manifest=True)
    elif kind == "lowered n_cases":
        e["n_cases"] = np.array(int(e["n_cases"]) - 1, dtype=np.int64)
    elif kind == "raised n_cases":
        e["n_cases"] = np.array(int(e["n_cases"]) + 1, dtype=np.int64)
    elif kind == "expected array removed, manifest kept":
        del e["case3/expected/dk"]
    elif kind == "expected array removed, manifest edited":
        _drop(e, "case3/expected/dk", from_manifest=True)
    elif kind == "+inf in an output declared finite":
        _with_inf(e, "case0/expected/out", declared_finite=True)
    elif kind == "undeclared entry":
        e["case0/expected/dz"] = np.zeros(3)
    elif kind == "mistyped variant":
        e["variant"] = np.array("sdpx")
    elif kind == "other format":
        e["format"] = np.array("refattn-cases/9")
    elif kind == "no n_cases":
        del e["n_cases"]
    elif kind == "cotangent of the wrong shape":
        e["case2/cotangent"] = e["case2/cotangent"][..., :1]
    elif kind == "integer inputs":
        e["case1/inputs/k"] = e["case1/inputs/k"].astype(np.int64)
    np.savez(path, **e)


DAMAGE = [
    ("missing", "no such file"),
    ("empty", "empty file (0 bytes)"),
    ("not a zip", "not a readable .npz archive"),
    ("truncated", "not a readable .npz archive"),
    ("npy", "a single .npy array of shape (2, 3, 4), not a golden .npz archive"),
    ("no inputs/q, manifest kept", "entry 'case0/inputs/q' is declared in the manifest but "
                                   "missing"),
    ("no inputs/q, manifest edited", "case0/inputs/q is missing (a core case needs inputs q, "
                                     "k, v)"),
    ("lowered n_cases", "n_cases = 14 but the file holds case14 (15 cases present)"),
    ("raised n_cases", "n_cases = 16 but case15 is absent (15 cases present)"),
    ("expected array removed, manifest kept", "entry 'case3/expected/dk' is declared in the "
                                              "manifest but missing"),
    ("expected array removed, manifest edited", "case3 ('MQA 4/1 causal'): expected/dk is "
                                                "missing (the reference computes out, dq, dk"),
    ("+inf in an output declared finite", "case0/expected/out holds 1 non-finite value(s) "
                                          "(inf at (0, 0, 0, 0)) but the manifest declares it "
                                          "finite"),
    ("undeclared entry", "entry 'case0/expected/dz' is not in the manifest"),
    ("mistyped variant", "variant must be one of"),
    ("other format", "not a refattn golden file of format 'refattn-cases/1' or "
                     "'refattn-cases/2' (format 'refattn-cases/9')"),
    ("no n_cases", "header entry 'n_cases' is missing"),
    ("cotangent of the wrong shape", "case2/cotangent has shape"),
    ("integer inputs", "case1/inputs/k must be a float64 array, got int64"),
]


@pytest.mark.parametrize("kind, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_file_is_one_line_and_exit_2(kind, message, sdpa_file, tmp_path, capsys):
    path = tmp_path / "damaged.npz"
    _damage(kind, sdpa_file, path)
    with pytest.raises(golden.GoldenFileError) as info:
        golden.check(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)
    capsys.readouterr()
    assert _cli("check", str(path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("refattn cases: error: ") and message in err


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_expected_value_fails_the_check(value, sdpa_file, tmp_path, capsys):
    # The manifest edited to allow it: the comparison itself must catch a non-finite
    # stored value where the reference is finite (inf <= atol + rtol * inf must not pass).
    e = _entries(sdpa_file)
    e["case0/expected/out"] = e["case0/expected/out"].copy()
    e["case0/expected/out"][0, 1, 2] = value
    e["manifest/finite"] = np.array([k for k in map(str, e["manifest/finite"])
                                     if k != "case0/expected/out"], dtype=str)
    path = tmp_path / "nonfinite.npz"
    np.savez(path, **e)
    report = golden.check(path)
    first = golden.load_cases(sdpa_file)[1][0]["name"]
    assert [(c.case, c.quantity) for c in report.failures] == [(first, "out")]
    assert _cli("check", str(path), "--quiet") == 1
    assert capsys.readouterr().out.startswith("FAILED")


def test_version_1_file_without_manifest_is_still_checked(sdpa_file, tmp_path):
    e = _entries(sdpa_file)
    e["format"] = np.array("refattn-cases/1")
    del e["manifest/keys"], e["manifest/finite"]
    path = tmp_path / "v1.npz"
    np.savez(path, **e)
    golden.check(path).assert_()
    e["n_cases"] = np.array(3, dtype=np.int64)                  # counts still checked
    np.savez(path, **e)
    with pytest.raises(golden.GoldenFileError, match="n_cases = 3 but the file holds case3"):
        golden.check(path)


def test_export_writes_the_path_as_given_and_rejects_bad_arguments(tmp_path, capsys):
    path = tmp_path / "cases.golden"                     # no .npz appended
    assert golden.export("sdpa", path, kind="default") == 1
    assert path.exists() and golden.check(path).ok
    with pytest.raises(ValueError, match="kind must be one of 'test', 'default', 'bench'"):
        golden.export("sdpa", path, kind="tests")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        golden.export("sdpa", path, seed=-1)
    assert _cli("export", "sdpx", "--out", str(path)) == 2
    err = capsys.readouterr().err
    assert "VARIANT: unknown variant 'sdpx' (did you mean 'sdpa'?); choose from " in err
    assert "mha-standard" in err and "Traceback" not in err


def test_encode_rejects_unstorable_options():
    with pytest.raises(TypeError, match="cannot store option value of type dict"):
        golden._encode({"a": 1})


@pytest.mark.parametrize("name", sorted(refattn.variants()))
def test_every_variant_exports_and_rechecks(name, tmp_path):
    path = tmp_path / f"{name}.npz"
    n = golden.export(name, path)
    assert n == len(golden.storable_cases(refattn.get_variant(name).cases()))
    report = golden.check(path)
    report.assert_()
    assert len({c.case for c in report.checks}) == n
