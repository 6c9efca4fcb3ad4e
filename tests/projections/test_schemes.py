"""Gradients, counts and errors of the optimised, efficient and super projection schemes."""

from __future__ import annotations

import argparse
from fractions import Fraction

import numpy as np
import pytest

import refattn
from refattn.cli import params as params_cli
from refattn.bench.scheme_counts import counts_table, scheme_counts, super_break_even
from refattn.cli._errors import UsageError
from refattn.testing import check_grads

SCHEMES = ["optimised", "efficient", "super"]


def _layer(scheme, d=8, h=2, seq_len=9, **kw):
    extra = {"seq_len": seq_len} if scheme == "super" else {}
    return refattn.Attention(d, h, projection=scheme, **extra, **kw)


# -- gradients beyond the generic registered cases -------------------------------------------
@pytest.mark.parametrize("scheme", ["optimised", "efficient"])
@pytest.mark.parametrize("xq_shape, xkv_shape, options", [
    ((5, 8), None, {"bias": True}),                                   # no batch dims
    ((3, 2, 4, 8), (3, 2, 6, 8), {"causal": True, "causal_align": "lower_right"}),
], ids=["no-batch-bias", "two-batch-dims-cross-causal-lower-right"])
def test_gradients_match_finite_differences(scheme, xq_shape, xkv_shape, options):
    rng = np.random.default_rng(0)
    layer = _layer(scheme, **options)
    arrays = [layer.init(seed=1), rng.standard_normal(xq_shape)]
    if xkv_shape is not None:
        arrays.append(rng.standard_normal(xkv_shape))
    check_grads(layer, *arrays)


# -- counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d, h", [(8, 2), (256, 8), (512, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_ratios_are_exact(d, h, bias):
    standard = refattn.Attention(d, h, bias=bias).num_params()
    assert standard == 4 * d * d + (4 * d if bias else 0)
    assert Fraction(_layer("optimised", d, h, bias=bias).num_params(), standard) == Fraction(3, 4)
    assert Fraction(_layer("efficient", d, h, bias=bias).num_params(), standard) == Fraction(1, 2)
    for l in (d // 2, d, d + 1, 2 * d):
        n = _layer("super", d, h, seq_len=l, bias=bias).num_params()
        assert n == 2 * d * d + l * l + (2 * d if bias else 0)
        assert (Fraction(n, standard) <= Fraction(3, 4)) == (l <= d)
    assert Fraction(_layer("super", d, h, seq_len=d).num_params(), 4 * d * d) == Fraction(3, 4)
    assert super_break_even(d, bias=bias) == d


@pytest.mark.parametrize("causal", [False, True])
def test_flops_are_exact(causal):
    d, h, L, S = 8, 2, 5, 7
    core = refattn.get_core("sdpa").flops((), h, L, S, d // h, d // h, causal=causal)
    kept = S * (S + 1) // 2 if causal else S * S                  # W_A entries that do work
    expected = {
        "standard": 2 * d * d * (L + 2 * S) + 2 * L * d * d,
        "optimised": 2 * d * d * (L + S) + 2 * L * d * d,
        "efficient": 2 * d * d * L + 2 * L * d * d,
        "super": 2 * d * d * L + 2 * kept * d + 2 * L * d * d,
    }
    for scheme, projection_flops in expected.items():
        layer = _layer(scheme, causal=causal) if scheme != "standard" else refattn.Attention(
            d, h, causal=causal)
        assert layer.scheme.flops(layer.config, L, S) == projection_flops
        assert layer.flops(L, S) == projection_flops + core


def test_counts_table_reports_the_paper_ratios_and_the_super_limit():
    counts = scheme_counts(256, 8, 196)
    ref = counts["standard"].params
    assert [counts[s].params / ref for s in ("optimised", "efficient")] == [0.75, 0.5]
    assert [counts[s].matmuls_per_head for s in counts] == [3, 2, 1, 2]
    assert "it holds" in " ".join(counts_table(256, 8, 196).notes)
    assert "does NOT hold" in " ".join(counts_table(64, 4, 65).notes)


def test_params_command_prints_the_table(capsys):
    parser = argparse.ArgumentParser()
    params_cli.add_arguments(parser)
    assert params_cli.run(parser.parse_args(["--d-model", "64", "--heads", "4",
                                             "--seq-len", "96"])) == 0
    out = capsys.readouterr().out
    assert "efficient" in out and "0.5000" in out and "0.7500" in out
    assert "does NOT hold" in out
    with pytest.raises(UsageError, match="--d-model, --seq-len: give both, or neither"):
        params_cli.run(parser.parse_args(["--d-model", "64"]))


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [0, -3, 2.5, True, "8", None])
def test_bad_seq_len_is_rejected(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        refattn.Attention(8, 2, projection="super", **({} if seq_len is None else
                                                          {"seq_len": seq_len}))


def test_sequence_longer_than_seq_len_is_rejected():
    layer = _layer("super", seq_len=4)
    params = layer.init()
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"xq \(self-attention\) has 5 tokens.*seq_len=4"):
        layer(params, rng.standard_normal((1, 5, 8)))
    with pytest.raises(ValueError, match=r"xkv has 6 tokens.*seq_len=4"):
        layer(params, rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 6, 8)))


@pytest.mark.parametrize("scheme", ["optimised", "efficient"])
def test_seq_len_belongs_to_super_only(scheme):
    with pytest.raises(TypeError, match="seq_len"):
        refattn.Attention(8, 2, projection=scheme, seq_len=4)


def test_bad_parameter_shapes_are_rejected():
    layer = _layer("super", seq_len=6)
    params = layer.init()
    with pytest.raises(ValueError, match=r"params\['w_a'\] has shape \(5, 5\), expected \(6, 6\)"):
        layer({**params, "w_a": params["w_a"][:5, :5]}, np.zeros((1, 4, 8)))
    eff = _layer("efficient")
    with pytest.raises(ValueError, match="expected"):
        eff({**eff.init(), "w_k": np.eye(8)}, np.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="d_model"):
        _layer("optimised", d=9, h=2)


def test_projection_schemes_study_quick():
    result = refattn.bench.studies()["projection-schemes"].run("quick")
    for setting in ("ViT-like", "NLP-like"):
        assert result.metrics[f"{setting}.efficient.params_ratio"] == 0.5
        assert result.metrics[f"{setting}.standard.forward_time_ratio"] == 1.0
        for s in SCHEMES:
            assert result.metrics[f"{setting}.{s}.forward_backward_time_ratio"] > 0


@pytest.mark.parametrize("efficient_time, verdict", [
    (0.1, "not judged, every setting's time ratio is below 0.8 of its FLOP ratio"),
    (0.8, "measured at most 1.25x (forward)"),
])
def test_projection_schemes_judges_the_claim_on_plausible_ratios_only(monkeypatch, efficient_time,
                                                                       verdict):
    """A time ratio far below the FLOP ratio (load noise) cannot meet the paper's 2x claim."""
    from refattn.bench import projection_schemes

    def timings(contenders, **kwargs):      # standard 1 s, Efficient efficient_time s
        return {s: efficient_time if s == "efficient" else 1.0 for s in contenders}

    monkeypatch.setattr(projection_schemes, "compare", timings)
    (failure,) = projection_schemes.run("quick").failures
    assert verdict in failure
