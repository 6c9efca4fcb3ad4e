"""``refattn cond``: default problem, user .npz (core and layer inputs), --plot, bad files."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

from refattn.cli import cond


def _run(argv):
    # The subcommand's own parser: the test does not depend on the other subcommands.
    parser = argparse.ArgumentParser(prog="refattn cond")
    cond.add_arguments(parser)
    return cond.run(parser.parse_args(argv))


def _table_rows(out):
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:2] == ["head", "kappa(P)"])
    rows = []
    for line in lines[start + 2:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows.append(cells)
    return rows


def test_default_problem(capsys):
    assert _run(["--length", "24", "--d-model", "16", "--heads", "2", "--causal"]) == 0
    out = capsys.readouterr().out
    assert "default problem: Attention(d_model=16, n_heads=2, core='sdpa', causal=True)" in out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["0", "1"]
    for head, kp, ka, kca, ratio, empty in rows:
        assert float(ka) > 0 and float(kca) > 0 and empty == "0"
    assert "bound kappa(A) <= kappa(P) kappa(X) kappa(W_V^h)" in out


def test_npz_core_inputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 10, 4)) for _ in range(3))
    mask = np.ones((10, 10), bool)
    mask[4] = False
    path = tmp_path / "qkv.npz"
    np.savez(path, q=q, k=k, v=v, mask=mask)
    assert _run(["--npz", str(path), "--eps", "1e-3"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert len(rows) == 3 and all(r[-1] == "1" for r in rows)        # one empty row per head
    import refattn

    res = refattn.attention_conditioning(q, k, v, mask=mask, eps=1e-3)
    assert rows[0][2] == f"{res.per_head()['kappa_a'][0]:.3g}"


def test_npz_layer_input_with_weights(tmp_path, capsys):
    import refattn

    x = np.random.default_rng(1).standard_normal((2, 20, 8))
    params = refattn.Attention(8, 2).init(seed=5)
    path = tmp_path / "layer.npz"
    np.savez(path, x=x, **params)
    assert _run(["--npz", str(path), "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights from the file" in out and len(_table_rows(out)) == 2


def test_plot(tmp_path, capsys):
    png = tmp_path / "kappa.png"
    assert _run(["--length", "32", "--d-model", "16", "--heads", "2", "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_explains_its_matrices_and_keeps_overlapping_curves_apart(tmp_path):
    # issue 19: A, P, CA explained; no median of something not plotted; integer count ticks;
    # curves that coincide still distinguishable (marker and line style differ)
    import refattn

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 32, 8)) for _ in range(3))
    heads = refattn.attention_conditioning(q, k, v)
    sweep = cond.length_sweep(q, k, v, None, core="sdpa", causal=False,
                              preconditioner="row_norm", eps=1e-6)
    fig = cond.plot(tmp_path / "k.png", heads, sweep, "test")
    over_heads, ratio, over_length = fig.axes[:3]
    texts = " ".join(t.get_text() for t in fig.texts)
    for label, text in cond.MATRICES.values():
        assert f"{label}: {text}" in texts
    ticks = [t.get_text() for t in over_heads.get_xticklabels()]
    assert ticks == ["kappa(A)", "kappa(CA)"]
    assert "median" not in over_heads.get_title()                      # nothing unplotted quoted
    counts = ratio.get_yticks()
    assert np.allclose(counts, np.round(counts)) and ratio.get_ylabel() == "number of heads"
    lines = [line for line in over_length.get_lines() if line.get_label().startswith("kappa")]
    assert len(lines) == 3
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 3
    assert {line.get_label() for line in lines} == {"kappa(P), median", "kappa(A), median",
                                                    "kappa(CA), median"}


def test_plot_npz_with_mask_and_preconditioned_core(tmp_path, capsys):
    # the length sweep slices the mask with the sequence; the core option picks the inner core
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 24, 4)) for _ in range(3))
    mask = rng.random((24, 24)) > 0.2
    path, png = tmp_path / "qkv.npz", tmp_path / "qkv.png"
    np.savez(path, q=q, k=k, v=v, mask=mask)
    assert _run(["--npz", str(path), "--core", "preconditioned", "--plot", str(png)]) == 0
    assert len(_table_rows(capsys.readouterr().out)) == 2 and png.stat().st_size > 10_000


@pytest.mark.parametrize("core, projection", [("preconditioned-elementwise", "standard"),
                                              ("preconditioned-shared", "quaternion")])
def test_default_problem_with_drop_in_cores(core, projection, capsys):
    # the layer gets the projection whose heads the core takes; quaternion heads (L, 4, d)
    # are measured as rows (L, 4 d), the matrix the preconditioner scales
    import refattn

    argv = ["--length", "16", "--d-model", "16", "--heads", "2", "--causal", "--core", core]
    assert _run(argv) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 2 and all(r[1] == "-" for r in rows)       # no P outside softmax sdpa
    layer = refattn.Attention(16, 2, projection=projection, core=core, causal=True)
    params = layer.init(seed=0)
    x = np.random.default_rng(0).standard_normal((2, 16, 16))
    q, k, v, _ = layer.scheme.project_in(params, x, x, layer.config)
    inner = core.removeprefix("preconditioned-")
    a = refattn.get_core(inner).forward(q, k, v, causal=True)[0]
    kappa_a = np.linalg.cond(a.reshape(2, 2, 16, -1))               # (batch, H): rows (L, F)
    assert rows[0][2] == f"{np.median(kappa_a[:, 0]):.3g}"


def test_plot_npz_quaternion_heads(tmp_path, capsys):
    # the length sweep cuts the sequence axis of (..., L, 4, d) heads, not the last axis
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 24, 4, 2)) for _ in range(3))
    path, png = tmp_path / "quaternion.npz", tmp_path / "quaternion.png"
    np.savez(path, q=q, k=k, v=v)
    assert _run(["--npz", str(path), "--core", "preconditioned-shared", "--causal",
                 "--plot", str(png)]) == 0
    assert len(_table_rows(capsys.readouterr().out)) == 2 and png.stat().st_size > 10_000


def test_unknown_core_or_preconditioner(capsys):
    assert _run(["--length", "8", "--d-model", "8", "--heads", "2", "--core", "nope"]) == 2
    assert "refattn cond: default problem: core must be one of" in capsys.readouterr().err
    assert _run(["--length", "8", "--d-model", "8", "--heads", "2",
                 "--preconditioner", "jacobi"]) == 2
    assert "preconditioner must be one of" in capsys.readouterr().err


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert _run(["--length", "16", "--d-model", "8", "--heads", "2",
                 "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"not a zip archive", "not a readable .npz"),
    ({"a": np.ones(3)}, "expected arrays q, k, v (core inputs) or x (layer input); found a"),
    ({"q": np.ones((1, 2, 4, 3)), "k": np.ones((1, 2, 4, 3)), "v": np.ones((1, 2, 4, 3)),
      "w": np.ones(2)}, "unexpected arrays ['w']"),
    ({"q": np.ones((1, 2, 4, 3)), "k": np.ones((1, 2, 4, 5)), "v": np.ones((1, 2, 4, 3))},
     "q has feature size 3 but k has 5"),
    ({"q": np.ones((2, 4, 3), np.int64), "k": np.ones((2, 4, 3)), "v": np.ones((2, 4, 3))},
     "q must be a real floating-point array"),
    ({"x": np.ones((2, 6, 8)), "w_q": np.ones((8, 8))}, "give all of"),
    ({"x": np.ones((2, 6, 6))}, "not divisible by n_heads"),
    ({"x": np.ones((2, 6, 8)), "w_q": np.ones((8, 4)), "w_k": np.ones((8, 8)),
      "w_v": np.ones((8, 8)), "w_o": np.ones((8, 8))}, "params['w_q'] has shape (8, 4)"),
    ({"q": np.ones((1, 2, 4, 3)), "k": np.ones((1, 2, 4, 3)), "v": np.ones((1, 2, 4, 3)),
      "mask": np.ones((4, 4))}, "mask must be a boolean array"),
])
def test_bad_npz(tmp_path, capsys, content, message):
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    assert _run(["--npz", str(path), "--heads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refattn cond: ") and str(path) in err and message in err, err


def test_registered_as_a_refattn_subcommand(capsys):
    from refattn.cli import main

    assert main(["cond", "--length", "12", "--d-model", "8", "--heads", "2"]) == 0
    assert "kappa(CA)" in capsys.readouterr().out
