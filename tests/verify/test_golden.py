"""Golden files: export, load without pickle, re-check; tampering caught; the CLI's exit code."""

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
    registry = refattn.get_variant("sdpa").cases("test", "float64", 0)
    assert n == len(cases) == len(registry)
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
    assert golden.export("mha-standard", path, seed=3) == 3
    header, cases = golden.load_cases(path)
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
    with pytest.raises(ValueError, match="not a refattn golden file"):
        golden.load_cases(path)


def test_encode_rejects_unstorable_options():
    with pytest.raises(TypeError, match="cannot store option value of type dict"):
        golden._encode({"a": 1})


@pytest.mark.parametrize("name", sorted(refattn.variants()))
def test_every_variant_exports_and_rechecks(name, tmp_path):
    path = tmp_path / f"{name}.npz"
    n = golden.export(name, path)
    assert n == len(refattn.get_variant(name).cases())
    report = golden.check(path)
    report.assert_()
    assert len({c.case for c in report.checks}) == n
