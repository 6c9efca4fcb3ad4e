"""Study ``training``: the papers' comparisons, trained end to end on refattn's own backward passes.

Two tasks, each model trained from ``len(seeds)`` seeds with the same budget (epochs,
minibatch, Adam step size and its cosine decay):

* **digits** (non-causal): a one-block ViT on scikit-learn's bundled 8x8 digits, 2x2 patches
  (16 tokens), ``d_model = 32``, 2 heads, mean read-out; projection schemes standard,
  Optimised, Efficient, Super; quaternion attention with shared scores vs Hamilton; Taylor
  element-wise attention; preconditioned vs plain SDPA.  Test accuracy, parameters, seconds
  per epoch, and the condition numbers of the attention matrices through training.
* **recall** (causal): multi-query associative recall (:func:`~.data.recall_batch`) with
  ``n`` pairs (``L = 2 n`` tokens): causal SDPA, causal Taylor element-wise attention of
  order 2, 4, 6, and preconditioned SDPA; query accuracy against ``n``.

Then every claim of the seed papers gets a verdict (:mod:`.claims`).

Backends: every core runs on the NumPy ``reference`` backend, except causal Taylor
element-wise attention in the full run, which runs on ``numba``: at these sizes (at most
64 tokens, 32 features) the reference SDPA and quaternion cores beat the numba kernels
(thread start-up dominates), while the reference causal Taylor scan is 3-10x slower than
the numba one at 16-64 tokens; the quick run stays on the reference backend to spend no
time compiling.  BLAS runs on one thread (``threadpoolctl``): on these small matrices
OpenBLAS threads cost more than they save.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...backends.tuning import cpu_model
from ...conditioning import layer_conditioning
from ..study import Study, StudyResult
from .claims import combine, compare_scores, learned, matches, outperforms
from .data import digits, recall_batch
from .loss import accuracy
from .model import TinyTransformer
from .train import minibatches, train

try:  # optional: comes with scikit-learn, which the study needs for its data anyway
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - the study is skipped without it (Study.requires)
    threadpool_limits = None

__all__ = ["Budget", "BUDGETS", "DIGITS_MODELS", "RECALL_MODELS", "TrainingResult", "run",
           "run_digits", "run_recall", "MATCH_MARGIN"]

D_MODEL, N_HEADS = 32, 2
PATCH = 2
DIGITS_LR, RECALL_LR = 1e-2, 5e-3
#: Recall vocabulary: keys and values (chance accuracy 1 / RECALL_VALUES).
RECALL_KEYS, RECALL_VALUES = 32, 8
#: Test images on which the condition numbers are measured.
CONDITIONING_IMAGES = 32
#: Accuracy a model may lose and still "match" its reference, 2 points.
MATCH_MARGIN = 0.02
#: A reference model "learned" when its accuracy exceeds this multiple of chance; otherwise
#: comparisons against it are inconclusive.
LEARNED_FACTOR = 3.0
#: Seed of the fixed recall test sequences.
RECALL_TEST_SEED = 12345

#: Model name -> attention options (``refattn.Attention`` keywords).
DIGITS_MODELS: dict[str, dict[str, Any]] = {
    "standard": {},
    "optimised": {"projection": "optimised"},
    "efficient": {"projection": "efficient"},
    "super": {"projection": "super"},
    "quaternion-shared": {"projection": "quaternion", "core": "shared"},
    "quaternion-hamilton": {"projection": "quaternion", "core": "hamilton"},
    "elementwise-t4": {"core": "elementwise", "order": 4},
    "preconditioned": {"core": "preconditioned"},
}
RECALL_MODELS: dict[str, dict[str, Any]] = {
    "sdpa": {},
    "elementwise-t2": {"core": "elementwise", "order": 2},
    "elementwise-t4": {"core": "elementwise", "order": 4},
    "elementwise-t6": {"core": "elementwise", "order": 6},
    "preconditioned": {"core": "preconditioned"},
}
#: Models whose condition numbers are followed through training.
CONDITIONING_MODELS = ("standard", "preconditioned")


@dataclass(frozen=True)
class Budget:
    seeds: tuple
    digits_epochs: int
    digits_batch: int
    recall_pairs: tuple
    recall_epochs: int
    recall_steps: int          # minibatches per recall epoch (fresh sequences each)
    recall_batch: int
    recall_test: int           # fixed test sequences
    causal_elementwise_backend: str


BUDGETS = {
    "quick": Budget(seeds=(0,), digits_epochs=3, digits_batch=64, recall_pairs=(4,),
                    recall_epochs=2, recall_steps=40, recall_batch=32, recall_test=128,
                    causal_elementwise_backend="reference"),
    "full": Budget(seeds=(0, 1, 2), digits_epochs=10, digits_batch=64, recall_pairs=(4, 8, 16),
                   recall_epochs=4, recall_steps=40, recall_batch=32, recall_test=256,
                   causal_elementwise_backend="numba"),
}


@dataclass
class Run:
    """One model trained from one seed."""

    model: TinyTransformer
    accuracy: float
    mean_train_loss: float
    epoch_seconds: float
    conditioning: list = field(default_factory=list)   # per epoch (H, 3): kappa_P, _A, _CA


def _head_kappas(model, params, x):
    """``(H, 3)``: per head, medians over the images of ``kappa(P), kappa(A), kappa(CA)``."""
    (layer, layer_params, a), = model.attention_inputs(params, x)
    heads = layer_conditioning(layer, layer_params, a, backend=model.backend).heads.per_head()
    return np.stack([heads["kappa_p"], heads["kappa_a"], heads["kappa_o"]], axis=1)


def run_digits(name, seed, budget: Budget, data, *, conditioning=False) -> Run:
    """Train the digits model ``name`` from ``seed``."""
    model = TinyTransformer(D_MODEL, N_HEADS, n_classes=data.n_classes,
                            n_tokens=data.x_train.shape[1], patch_dim=data.x_train.shape[2],
                            **DIGITS_MODELS[name])
    params = model.init(seed=seed)
    rng = np.random.default_rng(1000 + seed)

    def batches(epoch):
        return [(data.x_train[i], data.y_train[i], None)
                for i in minibatches(rng, len(data.y_train), budget.digits_batch)]

    probe = data.x_test[:CONDITIONING_IMAGES]
    history = train(model, params, epochs=budget.digits_epochs, batches=batches, lr=DIGITS_LR,
                    evaluate=lambda p: accuracy(model(p, inputs=data.x_test), data.y_test),
                    monitor=(lambda p: _head_kappas(model, p, probe)) if conditioning else None)
    return Run(model, history.final_accuracy, history.mean_train_loss,
               float(np.mean(history.epoch_seconds)), history.monitor)


def run_recall(name, seed, n_pairs, budget: Budget) -> Run:
    """Train the recall model ``name`` on ``n_pairs`` pairs from ``seed``."""
    options = dict(RECALL_MODELS[name])
    backend = budget.causal_elementwise_backend if options.get("core") == "elementwise" else \
        "reference"
    model = TinyTransformer(D_MODEL, N_HEADS, n_classes=RECALL_VALUES, n_tokens=2 * n_pairs,
                            vocab=(RECALL_KEYS, RECALL_VALUES + 1), readout="tokens",
                            causal=True, backend=backend, **options)
    params = model.init(seed=seed)
    rng = np.random.default_rng(2000 + seed)
    test = recall_batch(np.random.default_rng(RECALL_TEST_SEED), budget.recall_test, n_pairs,
                        RECALL_KEYS, RECALL_VALUES)

    def batches(epoch):
        for _ in range(budget.recall_steps):
            b = recall_batch(rng, budget.recall_batch, n_pairs, RECALL_KEYS, RECALL_VALUES)
            yield b.inputs, b.labels, b.weights

    history = train(model, params, epochs=budget.recall_epochs, batches=batches, lr=RECALL_LR,
                    evaluate=lambda p: accuracy(model(p, inputs=test.inputs), test.labels,
                                                test.weights))
    return Run(model, history.final_accuracy, history.mean_train_loss,
               float(np.mean(history.epoch_seconds)))


class TrainingResult(StudyResult):
    """The claims table, printed after the tables it is drawn from (``sections``)."""

    def __init__(self, *args, sections=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = list(sections)

    def format(self) -> str:
        return "\n\n".join([s.format() for s in self.sections] + [super().format()])

    def markdown(self) -> str:
        """Every table as Markdown (for ``docs/fidelity.md``), notes as bullet lists."""
        out = []
        for table in self.sections + [self]:
            out.append(f"**{table.title}**\n")
            out.append("| " + " | ".join(map(str, table.headers)) + " |")
            out.append("|" + "---|" * len(table.headers))
            out += ["| " + " | ".join(map(str, row)) + " |" for row in table.rows]
            out += [""] + [f"* {note}" for note in table.notes] + [""]
        return "\n".join(out)


def _pct(x):
    return f"{100 * x:.1f}"


def _spread(xs):
    return f"{100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1 else "-"


def _kappa(x):
    return f"{x:.3g}" if np.isfinite(x) else "inf"


def _digits_table(runs, budget):
    rows, metrics = [], {}
    for name, rs in runs.items():
        acc = [r.accuracy for r in rs]
        m = rs[0].model
        rows.append([name, m.attention_params(), m.num_params(), _pct(np.mean(acc)), _spread(acc),
                     f"{_pct(min(acc))}-{_pct(max(acc))}",
                     f"{np.mean([r.mean_train_loss for r in rs]):.3f}",
                     f"{np.median([r.epoch_seconds for r in rs]):.2f}"])
        metrics[f"digits.{name}.accuracy"] = float(np.mean(acc))
        metrics[f"digits.{name}.attention_params"] = float(m.attention_params())
    return StudyResult(
        f"digits ViT (non-causal): test accuracy after {budget.digits_epochs} epochs, "
        f"seeds {list(budget.seeds)}",
        ["model", "attn params", "params", "acc %", "sd", "min-max", "mean train loss",
         "s/epoch"], rows, metrics=metrics,
        notes=[f"d_model={D_MODEL}, {N_HEADS} heads, 1 block, 2x2 patches (16 tokens), batch "
               f"{budget.digits_batch}, Adam lr {DIGITS_LR:g} with cosine decay; sd = sample "
               f"standard deviation over seeds; mean train loss = mean over epochs (area under "
               f"the loss curve); s/epoch = median over seeds of the training steps' time"])


def _recall_table(runs, budget):
    rows, metrics = [], {}
    for name in RECALL_MODELS:
        row = [name]
        for n in budget.recall_pairs:
            acc = [r.accuracy for r in runs[name, n]]
            row += [_pct(np.mean(acc)), _spread(acc)]
            metrics[f"recall.{name}.n{n}.accuracy"] = float(np.mean(acc))
        seconds = [r.epoch_seconds for n in budget.recall_pairs for r in runs[name, n]]
        row.append(f"{np.median(seconds):.2f}")
        rows.append(row)
    headers = ["model"] + [h for n in budget.recall_pairs for h in (f"n={n} acc %", "sd")] + \
        ["s/epoch"]
    return StudyResult(
        f"associative recall (causal): query accuracy against n pairs (L = 2n tokens), "
        f"seeds {list(budget.seeds)}", headers, rows, metrics=metrics,
        notes=[f"{RECALL_KEYS} keys, {RECALL_VALUES} values (chance {_pct(1 / RECALL_VALUES)}%), "
               f"{budget.recall_epochs} epochs x {budget.recall_steps} minibatches of "
               f"{budget.recall_batch} fresh sequences, Adam lr {RECALL_LR:g} with cosine decay; "
               f"{budget.recall_test} fixed test sequences; causal Taylor element-wise on the "
               f"{budget.causal_elementwise_backend} backend"])


def _conditioning_table(runs, budget):
    epochs = sorted({0, 1, budget.digits_epochs // 2, budget.digits_epochs})
    rows = []
    for e in epochs:
        for h in range(N_HEADS):
            row = [e, h]
            for name in CONDITIONING_MODELS:
                per_seed = np.array([r.conditioning[e][h] for r in runs[name]])   # (seeds, 3)
                row += [_kappa(x) for x in np.median(per_seed, axis=0)]
            rows.append(row)
    headers = ["epoch", "head"] + [f"{name} {k}" for name in CONDITIONING_MODELS
                                   for k in ("k(P)", "k(A)", "k(CA)")]
    return StudyResult(
        "condition numbers of the attention matrices during digits training, per head (median "
        f"over {CONDITIONING_IMAGES} test images, then over seeds)", headers, rows,
        notes=["P (16 x 16) softmax probabilities, A = P V (16 x 16) head output, CA = diag(c) A "
               "with the row-norm preconditioner c_i = 1/(||A_i|| + 1e-6) (what the "
               "preconditioned model outputs; for standard, what it would output); "
               "refattn.layer_conditioning, SciPy singular values; epoch 0 = at initialisation"])


def _claims(digits_runs, recall_runs, budget, n_classes):
    acc = {n: [r.accuracy for r in rs] for n, rs in digits_runs.items()}
    loss = {n: [-r.mean_train_loss for r in rs] for n, rs in digits_runs.items()}  # higher=better
    params = {n: rs[0].model.attention_params() for n, rs in digits_runs.items()}
    rows = []

    def add(claim, paper, setting, comparison, verdict, unit=" pts", scale=100.0):
        rows.append([claim, paper, setting, comparison.describe(scale, unit), verdict])

    def versus(a, b, rule, chance, margin=MATCH_MARGIN):
        """``(comparison, verdict)``; inconclusive when the reference ``b`` did not learn."""
        c = compare_scores(a, b)
        return c, rule(c, margin) if learned(b, chance, LEARNED_FACTOR) else "inconclusive"

    digits_chance, recall_chance = 1 / n_classes, 1 / RECALL_VALUES
    c, v = versus(acc["super"], acc["standard"], outperforms, digits_chance)
    add("Super outperforms standard", "Hosseini & Hosseini", "digits acc, super - standard", c, v)
    for scheme in ("optimised", "efficient"):
        c, v = versus(acc[scheme], acc["standard"], matches, digits_chance)
        if params[scheme] >= params["standard"]:
            v = "not reproduced"
        add(f"{scheme.capitalize()} matches standard with fewer params", "Hosseini & Hosseini",
            f"digits acc, {scheme} - standard (attn params {params[scheme]} vs "
            f"{params['standard']})", c, v)
    c, v = versus(acc["elementwise-t4"], acc["standard"], matches, digits_chance)
    add("element-wise comparable to softmax (non-causal)", "Feng",
        "digits acc, elementwise-t4 - standard", c, v)
    verdicts = []
    for t in (2, 4, 6):
        for n in budget.recall_pairs:
            c, v = versus([r.accuracy for r in recall_runs[f"elementwise-t{t}", n]],
                          [r.accuracy for r in recall_runs["sdpa", n]], matches, recall_chance)
            verdicts.append(v)
            add(f"element-wise comparable to softmax (causal, t={t})", "Feng",
                f"recall acc n={n}, elementwise-t{t} - sdpa", c, v)
    rows.append(["element-wise comparable to softmax (causal), all t and n", "Feng", "", "",
                 combine(verdicts)])
    final = np.array([r.conditioning[-1] for r in digits_runs["preconditioned"]])   # (seeds, H, 3)
    c = compare_scores(-np.log10(np.median(final[:, :, 2], axis=1)),
                       -np.log10(np.median(final[:, :, 1], axis=1)))
    add("preconditioning lowers the condition number", "Saratchandran",
        "digits, preconditioned model after training: log10 k(A) - log10 k(CA)", c,
        outperforms(c, 0.0), unit="", scale=1.0)
    c = compare_scores(loss["preconditioned"], loss["standard"])
    add("preconditioning eases optimisation", "Saratchandran",
        "digits mean train loss, standard - preconditioned", c, outperforms(c, 0.0), unit="",
        scale=1.0)
    c, v = versus(acc["preconditioned"], acc["standard"], matches, digits_chance)
    add("preconditioning keeps accuracy", "Saratchandran",
        "digits acc, preconditioned - standard", c, v)
    c, v = versus(acc["quaternion-shared"], acc["quaternion-hamilton"], matches, digits_chance)
    add("shared-score quaternion matches Hamilton", "Yamauchi et al.",
        "digits acc, shared - hamilton", c, v)
    return rows


class _Log:
    """One line per trained model on ``stream`` (silent without one)."""

    def __init__(self, stream):
        self.stream, self.t0 = stream, time.perf_counter()

    def __call__(self, what, result: Run):
        if self.stream is None:
            return
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {what}: accuracy "
              f"{_pct(result.accuracy)}%, {result.epoch_seconds:.2f} s/epoch", file=self.stream,
              flush=True)


def run(size="quick", log=None) -> TrainingResult:
    """Train every model of both tasks at ``size`` ("quick" or "full"); the tables and verdicts.

    ``log``: a text stream for one line per trained model (default: none).
    """
    if threadpool_limits is None:
        raise ImportError("the training study needs threadpoolctl (pip install "
                          "'refattn[bench]', which brings scikit-learn and threadpoolctl)")
    if size not in BUDGETS:
        raise ValueError(f"size must be one of {sorted(BUDGETS)}, got {size!r}")
    budget = BUDGETS[size]
    logger = _Log(log)
    t0 = time.perf_counter()

    def logged(what, result):
        logger(what, result)
        return result

    with threadpool_limits(limits=1, user_api="blas"):
        data = digits(PATCH)
        digits_runs = {name: [logged(f"digits {name} seed {s}",
                                     run_digits(name, s, budget, data,
                                                conditioning=name in CONDITIONING_MODELS))
                              for s in budget.seeds] for name in DIGITS_MODELS}
        recall_runs = {(name, n): [logged(f"recall {name} n={n} seed {s}",
                                          run_recall(name, s, n, budget))
                                   for s in budget.seeds]
                       for name in RECALL_MODELS for n in budget.recall_pairs}
    sections = [_digits_table(digits_runs, budget), _recall_table(recall_runs, budget),
                _conditioning_table(digits_runs, budget)]
    metrics = {k: v for s in sections for k, v in s.metrics.items()}
    rows = _claims(digits_runs, recall_runs, budget, data.n_classes)
    notes = [f"verdict rules: refattn/bench/training/claims.py (interval delta +- 2 se over "
             f"seeds; 'matches' = not worse by more than {100 * MATCH_MARGIN:g} points; "
             f"inconclusive when the reference is not above {LEARNED_FACTOR:g}x chance)",
             f"{cpu_model()} ({os.cpu_count()} logical CPUs), {time.perf_counter() - t0:.0f} s "
             f"in all; NumPy {np.__version__}"]
    return TrainingResult("the papers' claims at this scale", ["claim", "paper", "setting",
                                                              "measured", "verdict"], rows,
                          metrics=metrics, notes=notes, sections=sections)


STUDY = Study(
    name="training",
    summary="tiny ViT on digits and causal associative recall trained with refattn's own "
            "backward passes (NumPy only): the papers' claims, reproduced or not",
    run=run,
    requires=("sklearn", "threadpoolctl"),
    metric_names=("digits.standard.accuracy", "recall.sdpa.n4.accuracy"),
    main_job=False,
    main_job_note="a verdict needs the full run's 3 seeds; the quick run's one seed leaves every "
                  "claim inconclusive after 20-50 s of training",
)
