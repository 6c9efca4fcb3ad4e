"""The training loop: Adam on minibatches, evaluation and monitoring after every epoch.

The step size follows a cosine decay over the epochs, ``lr_e = lr (1 + cos(pi e / E)) / 2``
for epoch ``e = 0 .. E-1``, so the last epochs settle instead of ending on a noisy step.

Only the minibatch steps (forward, hand-derived backward, Adam update) are timed; the
evaluation and the monitor run outside the clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .adam import Adam

__all__ = ["History", "train", "minibatches", "cosine_lr"]


@dataclass
class History:
    """Per epoch: mean training loss, test accuracy, seconds of training steps, monitor output.

    ``monitor[0]`` is taken before the first step, ``monitor[e]`` after epoch ``e``.
    """

    train_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    monitor: list = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]

    @property
    def mean_train_loss(self) -> float:
        """Mean over epochs of the training loss: the area under the loss curve per epoch."""
        return float(np.mean(self.train_loss))


def minibatches(rng, n, batch) -> list:
    """A random permutation of ``range(n)`` cut into index arrays of ``batch`` (last shorter)."""
    order = rng.permutation(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def cosine_lr(lr, epoch, epochs) -> float:
    """``lr (1 + cos(pi epoch / epochs)) / 2``: ``lr`` at epoch 0, decaying towards 0."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))


def train(model, params, *, epochs: int, batches: Callable[[int], Iterable], lr: float,
          evaluate: Callable[[dict], float], monitor: Callable[[dict], object] | None = None
          ) -> History:
    """Train ``params`` in place with Adam for ``epochs``; return the :class:`History`.

    Parameters
    ----------
    model : TinyTransformer
    params : dict
    epochs : int
    batches : callable
        ``batches(epoch)`` yields ``(inputs, labels, weights)`` minibatches (``weights`` may
        be ``None``).
    lr : float
        Adam's initial step size (cosine decay, see :func:`cosine_lr`).
    evaluate : callable
        ``evaluate(params) -> accuracy`` on held-out data.
    monitor : callable, optional
        ``monitor(params)`` before training and after every epoch (e.g. condition numbers).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    optimizer = Adam(params, lr=lr)
    history = History()
    if monitor is not None:
        history.monitor.append(monitor(params))
    for epoch in range(epochs):
        optimizer.lr = cosine_lr(lr, epoch, epochs)
        losses = []
        t0 = time.perf_counter()
        for inputs, labels, weights in batches(epoch):
            loss, grads = model.loss_and_grads(params, inputs, labels, weights)
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at epoch {epoch}")
            optimizer.step(grads)
            losses.append(loss)
        history.epoch_seconds.append(time.perf_counter() - t0)
        history.train_loss.append(float(np.mean(losses)))
        history.test_accuracy.append(float(evaluate(params)))
        if monitor is not None:
            history.monitor.append(monitor(params))
    return history
