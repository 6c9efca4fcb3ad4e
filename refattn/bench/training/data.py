"""The study's data: scikit-learn's bundled digits, and multi-query associative recall.

* :func:`digits`: the 1797 8x8 images of ``sklearn.datasets.load_digits`` (shipped with
  scikit-learn, no download), pixels scaled to ``[0, 1]``, cut into 2x2 patches, and split
  into train and test sets stratified by class with a fixed seed (the same split for every
  model and seed of the study).
* :func:`recall_batch`: multi-query associative recall (MQAR; Arora et al. 2023, "Zoology")
  in its one-token-per-pair form.  A sequence shows ``n`` pairs ``(k_i, v_i)`` with distinct
  keys drawn from ``n_keys``, one token each (key id and value id), then queries all ``n`` keys
  again in a random order, each as a token ``(k, blank)``; the label at a query is the value
  paired with its key.  A causal model must look the key up among the earlier tokens: softmax
  attention can select the one matching token, a linear-state form (Taylor element-wise
  attention keeps ``O(t D)`` numbers per head) has to store ``n`` associations in its state.

Shape legend: ``B`` batch, ``N`` patches, ``L = 2 n`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .embedding import patchify

__all__ = ["Digits", "digits", "RecallBatch", "recall_batch", "DIGITS_TEST_FRACTION",
           "DIGITS_SPLIT_SEED"]

#: Held-out fraction of the digits and the seed of the (stratified) split.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
#: Largest pixel value of ``load_digits`` (4-bit grey levels).
DIGITS_MAX_PIXEL = 16.0


@dataclass(frozen=True)
class Digits:
    """Patches ``(n, N, p^2)`` float64 and labels ``(n,)`` of both splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    patch: int

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def digits(patch=2) -> Digits:
    """The digits as patches, split ``1 - DIGITS_TEST_FRACTION`` / ``DIGITS_TEST_FRACTION``.

    Examples
    --------
    >>> from refattn.bench.training.data import digits
    >>> data = digits(patch=2)
    >>> data.x_train.shape[1:], data.n_classes, len(data.y_train) + len(data.y_test)
    ((16, 4), 10, 1797)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float64) / DIGITS_MAX_PIXEL      # (1797, 8, 8)
    x = patchify(images, patch)                                      # (1797, N, p^2)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target)
    return Digits(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), patch)


@dataclass(frozen=True)
class RecallBatch:
    """``keys, values, labels (B, L)`` int64 and ``weights (B, L)`` float64 (1 at queries)."""

    keys: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    @property
    def inputs(self):
        return self.keys, self.values


def recall_batch(rng, batch, n_pairs, n_keys, n_values) -> RecallBatch:
    """``batch`` MQAR sequences of ``n_pairs`` pairs then ``n_pairs`` queries (``L = 2 n``).

    Value id ``n_values`` is the blank of the query tokens (so the value table of a model
    has ``n_values + 1`` rows); labels at the pair tokens are 0 with weight 0.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.data import recall_batch
    >>> b = recall_batch(np.random.default_rng(0), 1, 3, 8, 4)
    >>> k, v = b.keys[0], b.values[0]
    >>> all(b.labels[0, t] == v[:3][k[:3] == k[t]][0] for t in range(3, 6))
    True
    >>> b.weights[0].tolist(), bool(np.all(v[3:] == 4))
    ([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], True)
    """
    for name, n in (("batch", batch), ("n_pairs", n_pairs), ("n_values", n_values)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if not isinstance(n_keys, (int, np.integer)) or n_keys < n_pairs:
        raise ValueError(f"n_keys must be an integer >= n_pairs = {n_pairs} (keys are distinct "
                         f"within a sequence), got {n_keys!r}")
    keys = np.argsort(rng.random((batch, n_keys)), axis=1)[:, :n_pairs]       # (B, n) distinct
    values = rng.integers(0, n_values, size=(batch, n_pairs))                 # (B, n)
    order = np.argsort(rng.random((batch, n_pairs)), axis=1)                  # (B, n)
    query_keys = np.take_along_axis(keys, order, axis=1)
    answers = np.take_along_axis(values, order, axis=1)
    zeros = np.zeros((batch, n_pairs), np.int64)
    return RecallBatch(
        keys=np.concatenate([keys, query_keys], axis=1).astype(np.int64),
        values=np.concatenate([values, np.full((batch, n_pairs), n_values)], axis=1)
        .astype(np.int64),
        labels=np.concatenate([zeros, answers], axis=1).astype(np.int64),
        weights=np.concatenate([np.zeros((batch, n_pairs)), np.ones((batch, n_pairs))], axis=1),
    )
