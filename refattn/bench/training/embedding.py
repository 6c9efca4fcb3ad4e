r"""Input embeddings of the study's models: image patches and (key, value) token pairs.

* :func:`patchify` cuts ``(B, h, w)`` images into ``N = (h/p)(w/p)`` patches of ``p^2`` pixels
  (row-major over the patch grid), a reshape without parameters.
* :func:`patch_embedding`: ``y = X W + b + P`` with a learned position table ``P (N, d)``.
  Backward: ``dX = dy W^T``, ``dW = sum_rows X^T dy``, ``db = sum_rows dy``,
  ``dP = sum_batch dy``.
* :func:`token_embedding`: ``y_t = E_key[k_t] + E_val[v_t] + P_t``, a sum of two table
  look-ups and a position.  Backward: row ``i`` of ``dE_key`` is the sum of ``dy_t`` over the
  positions with ``k_t = i`` (a scatter-add), likewise ``dE_val``; ``dP = sum_batch dy``.

Shape legend: ``B`` batch, ``N`` / ``L`` tokens, ``p`` patch side, ``d`` features.
"""

from __future__ import annotations

import numpy as np

from ..._vjp import attach_vjp

from ...projections._base import linear_backward, linear_forward
from ._checks import check_float, check_int_array, check_matrix, check_vector

__all__ = ["patchify", "patch_embedding", "patch_embedding_forward", "patch_embedding_backward",
           "token_embedding", "token_embedding_forward", "token_embedding_backward"]


def patchify(images, patch):
    """``(B, h, w) -> (B, (h/p) (w/p), p^2)``: non-overlapping ``p x p`` patches, row-major.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.embedding import patchify
    >>> patchify(np.arange(16.0).reshape(1, 4, 4), 2)[0, 1].tolist()   # the top-right patch
    [2.0, 3.0, 6.0, 7.0]
    """
    check_float(images, "images")
    if images.ndim != 3:
        raise ValueError(f"images must have shape (B, h, w), got {images.shape}")
    B, h, w = images.shape
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or h % patch or \
            w % patch:
        raise ValueError(f"patch must be a positive int dividing the image sides ({h}, {w}), "
                         f"got {patch!r}")
    x = images.reshape(B, h // patch, patch, w // patch, patch)      # (B, gh, p, gw, p)
    return x.transpose(0, 1, 3, 2, 4).reshape(B, (h // patch) * (w // patch), patch * patch)


def patch_embedding_forward(x, w, b, pos):
    """``(y, residuals)``: ``x (B, N, p^2)`` -> ``y (B, N, d)``."""
    return linear_forward(np, x, w, b) + pos, (x, w)


def patch_embedding_backward(res, dy):
    """``(dx, dw, db, dpos)`` of :func:`patch_embedding_forward`."""
    x, w = res
    dx, dw, db = linear_backward(np, x, w, dy, True)
    return dx, dw, db, dy.sum(axis=0)


def _check_patches(x, w, b, pos):
    check_float(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, patch_dim), got {x.shape}")
    d = check_matrix(w, "w", x.shape[2])
    check_vector(b, "b", d)
    check_matrix(pos, "pos", x.shape[1], d)


def patch_embedding(x, w, b, pos):
    """``x W + b + pos``: ``x (B, N, p^2)``, ``w (p^2, d)``, ``b (d,)``, ``pos (N, d)``."""
    _check_patches(x, w, b, pos)
    return patch_embedding_forward(x, w, b, pos)[0]


def _checked_patch_forward(x, w, b, pos):
    _check_patches(x, w, b, pos)
    return patch_embedding_forward(x, w, b, pos)


attach_vjp(patch_embedding, _checked_patch_forward, patch_embedding_backward)


def token_embedding_forward(keys, values, key_table, value_table, pos):
    """``y (B, L, d)`` from ids ``keys, values (B, L)``; residuals for the backward pass."""
    L = keys.shape[1]
    y = key_table[keys] + value_table[values] + pos[:L]
    return y, (keys, values, key_table.shape, value_table.shape, pos.shape)


def token_embedding_backward(res, dy):
    """``(dkey_table, dvalue_table, dpos)``: scatter-adds of ``dy`` by id, and ``sum_batch dy``."""
    keys, values, key_shape, value_shape, pos_shape = res
    d = dy.shape[-1]
    dkey = np.zeros(key_shape, dy.dtype)
    np.add.at(dkey, keys.reshape(-1), dy.reshape(-1, d))
    dvalue = np.zeros(value_shape, dy.dtype)
    np.add.at(dvalue, values.reshape(-1), dy.reshape(-1, d))
    dpos = np.zeros(pos_shape, dy.dtype)
    dpos[:keys.shape[1]] = dy.sum(axis=0)
    return dkey, dvalue, dpos


def _check_tokens(keys, values, key_table, value_table, pos):
    check_float(key_table, "key_table")
    if key_table.ndim != 2:
        raise ValueError(f"key_table must have shape (n_keys, d), got {key_table.shape}")
    n_keys, d = key_table.shape
    check_float(value_table, "value_table")
    if value_table.ndim != 2 or value_table.shape[1] != d:
        raise ValueError(f"value_table must have shape (n_values, {d}), got {value_table.shape}")
    check_float(pos, "pos")
    if pos.ndim != 2 or pos.shape[1] != d:
        raise ValueError(f"pos must have shape (max_len, {d}), got {pos.shape}")
    if not isinstance(keys, np.ndarray) or keys.ndim != 2:
        raise ValueError(f"keys must be an integer array (B, L), got "
                         f"{getattr(keys, 'shape', type(keys).__name__)}")
    if keys.shape[1] > pos.shape[0]:
        raise ValueError(f"keys has {keys.shape[1]} tokens but pos has only {pos.shape[0]} "
                         f"positions")
    check_int_array(keys, "keys", None, n_keys)
    check_int_array(values, "values", keys.shape, value_table.shape[0])


def token_embedding(key_table, value_table, pos, *, keys, values):
    """``E_key[keys] + E_val[values] + pos[:L]``; the id arrays are keyword options.

    Parameters
    ----------
    key_table : ndarray (n_keys, d)
    value_table : ndarray (n_values, d)
    pos : ndarray (max_len, d)
    keys, values : integer ndarray (B, L), ``L <= max_len``

    Returns
    -------
    y : ndarray (B, L, d)

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.embedding import token_embedding
    >>> ek, ev, pos = np.eye(3), 10 * np.eye(3), np.zeros((4, 3))
    >>> token_embedding(ek, ev, pos, keys=np.array([[0, 2]]), values=np.array([[1, 1]])).tolist()
    [[[1.0, 10.0, 0.0], [0.0, 10.0, 1.0]]]
    """
    _check_tokens(keys, values, key_table, value_table, pos)
    return token_embedding_forward(keys, values, key_table, value_table, pos)[0]


def _checked_token_forward(key_table, value_table, pos, *, keys, values):
    _check_tokens(keys, values, key_table, value_table, pos)
    return token_embedding_forward(keys, values, key_table, value_table, pos)


attach_vjp(token_embedding, _checked_token_forward, token_embedding_backward)
