"""The training study: its private layers (finite differences), Adam, data, verdicts, quick run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refattn.bench import studies
from refattn.bench.training import claims
from refattn.bench.training.adam import Adam
from refattn.bench.training.data import digits, recall_batch
from refattn.bench.training.embedding import patch_embedding, patchify, token_embedding
from refattn.bench.training.layernorm import layer_norm
from refattn.bench.training.loss import accuracy, cross_entropy
from refattn.bench.training.mlp import mlp
from refattn.bench.training.model import TinyTransformer
from refattn.bench.training.study import (BUDGETS, DIGITS_MODELS, RECALL_MODELS, RECALL_VALUES,
                                          TrainingResult)
from refattn.cli import main
from refattn.cli.bench import run_studies
from refattn.testing import check_grads

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.standard_normal(shape)


# -- finite differences of every private part ---------------------------------------------------

def test_layer_norm_grads():
    check_grads(layer_norm, _normal(2, 3, 5), 1 + _normal(5), _normal(5), n_directions=3)


def test_mlp_grads():
    check_grads(mlp, _normal(2, 3, 4), _normal(4, 6), _normal(6), _normal(6, 3), _normal(3),
                n_directions=3)


def test_patch_embedding_grads():
    check_grads(patch_embedding, _normal(2, 4, 3), _normal(3, 5), _normal(5), _normal(4, 5),
                n_directions=3)


def test_token_embedding_grads_with_repeated_ids():
    keys = np.array([[0, 2, 2, 1], [2, 0, 0, 0]])           # repeated ids: scatter-add
    values = np.array([[1, 1, 0, 3], [3, 3, 2, 1]])
    check_grads(token_embedding, _normal(3, 4), _normal(4, 4), _normal(6, 4), keys=keys,
                values=values, n_directions=3)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_grads(weighted):
    labels = np.array([[0, 3, 1], [2, 2, 0]])
    weights = np.array([[0.0, 1.0, 2.0], [1.0, 0.5, 0.0]]) if weighted else None
    check_grads(cross_entropy, 3 * _normal(2, 3, 4), labels=labels, weights=weights,
                n_directions=3)


def _exact(options):
    """The options with the full gradient: ``stop_gradient=True`` (the study's preconditioned
    models) is by design not the derivative of the forward pass, so finite differences check
    ``False``; the ``True`` backward is checked in ``tests/cores/test_preconditioned.py``."""
    return options | {"stop_gradient": False} if options.get("core") == "preconditioned" else \
        options


@pytest.mark.parametrize("name", sorted(DIGITS_MODELS))
def test_patch_model_grads(name):
    model = TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=5,
                            **_exact(DIGITS_MODELS[name]))
    check_grads(model, model.init(seed=1), inputs=_normal(2, 4, 5), n_directions=1)


@pytest.mark.parametrize("name", ["sdpa", "elementwise-t2", "preconditioned"])
def test_causal_token_model_grads(name):
    model = TinyTransformer(8, 2, n_classes=3, n_tokens=6, vocab=(5, 4), readout="tokens",
                            causal=True, n_blocks=2, **_exact(RECALL_MODELS[name]))
    batch = recall_batch(np.random.default_rng(1), 2, 3, 5, 3)
    check_grads(model, model.init(seed=2), inputs=batch.inputs, n_directions=1)


def test_loss_and_grads_match_finite_differences_of_the_loss():
    model = TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=5)
    params = model.init(seed=3)
    x, y = _normal(3, 4, 5), np.array([0, 2, 1])
    loss, grads = model.loss_and_grads(params, x, y)
    h = 1e-6
    for name in ("embed.w", "block0.attn.w_q", "block0.mlp.w1", "final.g", "head.b"):
        u = _normal(*params[name].shape)
        plus = {**params, name: params[name] + h * u}
        minus = {**params, name: params[name] - h * u}
        numeric = (model.loss_and_grads(plus, x, y)[0] - model.loss_and_grads(minus, x, y)[0]) \
            / (2 * h)
        assert numeric == pytest.approx(float(np.sum(grads[name] * u)), rel=1e-6, abs=1e-9)
    assert loss == pytest.approx(float(cross_entropy(model(params, inputs=x), labels=y)))


# -- forward values and errors ------------------------------------------------------------------

def test_layer_norm_normalises_rows():
    y = layer_norm(3 + 2 * _normal(4, 7), np.ones(7), np.zeros(7))
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1, rtol=1e-4)     # var / (var + 1e-5)


def test_patchify_reassembles_the_image():
    images = _normal(2, 4, 6)
    p = patchify(images, 2)                                       # (2, 6, 4)
    back = p.reshape(2, 2, 3, 2, 2).transpose(0, 1, 3, 2, 4).reshape(2, 4, 6)
    np.testing.assert_array_equal(back, images)


def test_cross_entropy_and_accuracy_values():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 1])
    expected = np.mean([math.log1p(math.exp(-2)), math.log1p(math.exp(-3)),
                        math.log1p(math.exp(1))])
    assert float(cross_entropy(logits, labels=labels)) == pytest.approx(expected)
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy(logits, labels, np.array([0.0, 1.0, 1.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: layer_norm(np.ones((2, 3)), np.ones(4), np.zeros(3)), r"g must have shape \(3,\)"),
    (lambda: layer_norm(np.ones((2, 3), np.int64), np.ones(3), np.zeros(3)), "x must be a float"),
    (lambda: mlp(np.ones((2, 3)), np.ones((4, 5)), np.ones(5), np.ones((5, 3)), np.ones(3)),
     r"w1 must have shape \(3, n\)"),
    (lambda: patchify(np.ones((1, 5, 4)), 2), "patch must be a positive int dividing"),
    (lambda: patch_embedding(np.ones((2, 4, 3)), np.ones((3, 5)), np.ones(5), np.ones((3, 5))),
     r"pos must have shape \(4, 5\)"),
    (lambda: token_embedding(np.ones((3, 2)), np.ones((2, 2)), np.ones((4, 2)),
                             keys=np.array([[0, 3]]), values=np.array([[0, 1]])),
     r"keys must have entries in \[0, 3\)"),
    (lambda: token_embedding(np.ones((3, 2)), np.ones((2, 2)), np.ones((1, 2)),
                             keys=np.array([[0, 1]]), values=np.array([[0, 1]])),
     "only 1 positions"),
    (lambda: cross_entropy(np.ones((2, 3)), labels=np.array([0, 3])),
     r"labels must have entries in \[0, 3\)"),
    (lambda: cross_entropy(np.ones((2, 3)), labels=np.array([0, 1]), weights=np.zeros(2)),
     "positive sum"),
    (lambda: cross_entropy(np.ones((2, 3)), labels=np.array([0.0, 1.0])),
     "labels must be a NumPy integer array"),
    (lambda: recall_batch(np.random.default_rng(0), 2, 5, 4, 3), "n_keys must be an integer >="),
    (lambda: TinyTransformer(8, 2, n_classes=3, n_tokens=4), "exactly one of patch_dim"),
    (lambda: TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=2, readout="cls"),
     "readout must be one of"),
    (lambda: Adam({"w": np.ones(2)}, lr=0.0), "lr must be a positive number"),
    (lambda: Adam({"w": np.ones(2)}, betas=(0.9, 1.0)), "betas must be two numbers"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_model_rejects_wrong_params_and_inputs():
    model = TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=5)
    params = model.init(seed=0)
    with pytest.raises(ValueError, match=r"params\['head.w'\] has shape"):
        model(params | {"head.w": np.ones((8, 4))}, inputs=_normal(1, 4, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        model(params, inputs=_normal(4, 5))
    tokens = TinyTransformer(8, 2, n_classes=3, n_tokens=4, vocab=(5, 4), readout="tokens")
    with pytest.raises(TypeError, match=r"\(keys, values\) pair"):
        tokens(tokens.init(seed=0), inputs=np.zeros((1, 4), np.int64))


def test_init_follows_the_documented_initialisers():
    model = TinyTransformer(16, 2, n_classes=3, n_tokens=40, vocab=(50, 4), readout="tokens")
    params = model.init(seed=0)
    assert np.all(params["block0.ln1.g"] == 1) and np.all(params["block0.mlp.b1"] == 0)
    assert np.abs(params["block0.mlp.w1"]).max() <= 1 / math.sqrt(16)
    assert np.std(params["embed.keys"]) == pytest.approx(1.0, rel=0.1)
    assert np.std(params["embed.pos"]) == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(params["head.w"], model.init(seed=0)["head.w"])   # seeded


def test_super_model_uses_the_token_count_as_seq_len():
    model = TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=5, projection="super")
    assert model.param_shapes()["block0.attn.w_a"] == (4, 4)


# -- Adam ---------------------------------------------------------------------------------------

def test_adam_constant_gradient_moves_lr_times_sign_every_step():
    w0 = _normal(3, 2)
    params = {"w": w0.copy()}
    g = _normal(3, 2)
    opt = Adam(params, lr=0.05, eps=1e-12)
    for _ in range(5):
        opt.step({"w": g})
    np.testing.assert_allclose(params["w"], w0 - 5 * 0.05 * np.sign(g), rtol=1e-9, atol=1e-12)


def test_adam_minimises_a_quadratic():
    target = _normal(4)
    params = {"w": np.zeros(4)}
    opt = Adam(params, lr=0.05)
    for _ in range(500):
        opt.step({"w": 2 * (params["w"] - target)})
    np.testing.assert_allclose(params["w"], target, atol=1e-3)


def test_adam_rejects_mismatched_grads():
    opt = Adam({"w": np.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape"):
        opt.step({"w": np.ones(3)})
    with pytest.raises(ValueError, match="grads has keys"):
        opt.step({"v": np.ones(2)})


# -- data -------------------------------------------------------------------------------------

def test_recall_labels_are_the_values_of_the_queried_keys():
    b = recall_batch(np.random.default_rng(4), 16, 6, 10, 5)
    for keys, values, labels, weights in zip(b.keys, b.values, b.labels, b.weights):
        assert len(set(keys[:6])) == 6                            # distinct keys
        assert sorted(keys[6:]) == sorted(keys[:6])               # every key queried once
        table = dict(zip(keys[:6], values[:6]))
        assert [table[k] for k in keys[6:]] == list(labels[6:])
        assert list(values[6:]) == [5] * 6 and list(weights) == [0] * 6 + [1] * 6


def test_digits_split_is_fixed_and_stratified():
    a, b = digits(), digits()
    np.testing.assert_array_equal(a.y_test, b.y_test)
    counts = np.bincount(a.y_test, minlength=10) / len(a.y_test)
    np.testing.assert_allclose(counts, 0.1, atol=0.01)
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1


# -- verdicts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, claim, verdict", [
    ([0.90, 0.91, 0.92], [0.80, 0.81, 0.80], claims.outperforms, "reproduced"),
    ([0.80, 0.81, 0.80], [0.90, 0.91, 0.92], claims.outperforms, "not reproduced"),
    ([0.900, 0.901, 0.902], [0.899, 0.900, 0.902], claims.outperforms, "not reproduced"),
    ([0.80, 0.95, 0.70], [0.85, 0.80, 0.90], claims.outperforms, "inconclusive"),
    ([0.900, 0.901, 0.902], [0.899, 0.900, 0.902], claims.matches, "reproduced"),
    ([0.95, 0.96, 0.95], [0.90, 0.91, 0.92], claims.matches, "reproduced"),     # better: not worse
    ([0.70, 0.71, 0.70], [0.90, 0.91, 0.92], claims.matches, "not reproduced"),
    ([0.80, 0.95, 0.70], [0.85, 0.80, 0.90], claims.matches, "inconclusive"),
    ([0.99], [0.10], claims.outperforms, "inconclusive"),
])
def test_verdict_rules(a, b, claim, verdict):
    assert claim(claims.compare_scores(a, b), 0.02) == verdict


def test_a_reference_at_chance_has_not_learned():
    assert not claims.learned([0.11, 0.12], chance=0.1, factor=3.0)
    assert claims.learned([0.90, 0.95], chance=0.1, factor=3.0)


# -- the quick run, as CI runs it ----------------------------------------------------------------

@pytest.fixture(scope="module")
def quick():
    """The quick run through the command line's study runner (what ``refattn bench training
    --quick`` does), once for the tests below."""
    outcomes = run_studies({"training": studies()["training"]}, "quick")
    assert len(outcomes) == 1 and outcomes[0].status == "ok", outcomes[0].message
    return outcomes[0].result


def test_quick_run_learns(quick):
    assert isinstance(quick, TrainingResult)
    chance = 1 / 10
    for name in DIGITS_MODELS:   # 3 epochs on the digits: far above chance, every model
        assert quick.metrics[f"digits.{name}.accuracy"] > 5 * chance, name
    recall_chance = 1 / RECALL_VALUES
    n = BUDGETS["quick"].recall_pairs[0]
    assert quick.metrics[f"recall.sdpa.n{n}.accuracy"] > 0.9
    for name in RECALL_MODELS:
        assert quick.metrics[f"recall.{name}.n{n}.accuracy"] > 3 * recall_chance, name


def test_quick_run_reports_every_table_and_claim(quick):
    text = quick.format()
    for title in ("digits ViT", "associative recall", "condition numbers", "claims"):
        assert title in text
    verdicts = [row[-1] for row in quick.rows]
    assert verdicts and set(verdicts) <= set(claims.VERDICTS)
    assert all(v == "inconclusive" for v in verdicts)            # one seed: no spread
    markdown = quick.markdown()
    separators = [line for line in markdown.splitlines() if line.startswith("|---|")]
    assert len(separators) == 4 and "| standard |" in markdown


def test_training_is_listed(capsys):
    assert main(["bench", "--list"]) == 0
    assert "training" in capsys.readouterr().out
