r"""Task functions of the empty-row policies on sequence-sharded SDPA (``docs/distributed.md``).

Shape legend: ``*b`` a block's batch axes, ``Hb`` its query heads, ``Hkv_b =
Hb / G`` its key/value heads (a GQA group of ``G`` query heads is never split),
``Li`` queries, ``Sj`` keys, ``S`` all keys, ``Ev`` value features.

A row is empty when no key of any block is kept for it.  The blocks follow
refattn's convention (``o = 0``, ``lse = -inf``) and the log-sum-exp merge keeps
it (:mod:`refattn.distributed.merge`), so after the merge the empty rows are
exactly those with ``lse_i = -inf``.  The policies of :mod:`refattn._empty_rows`
then need sums over *every* key (``uniform`` averages all ``S`` values, masked
or above the diagonal alike), which the tasks here give per key block, to be
summed in a tree:

* forward, ``uniform``: ``o_i = (1/S) sum_j v_j`` (Dask's own sum of ``v`` over the
  keys, then :func:`uniform_fill`), with dropout ``o_i = sum_j w_ij v_j``, ``w_ij = D_ij / ((1 - p) S)``
  (:func:`dropout_fill_part` per block ``(i, j)``); ``nan``: ``o_i = NaN``;
* backward: the kernel blocks get the cotangent with the empty rows zeroed
  (:func:`kernel_cotangent`); ``uniform`` adds ``dv_j += sum_{h in group, i
  empty} w_hij do_hi`` (:func:`empty_row_sum`, :func:`dropout_value_part`),
  ``nan`` sets ``dv`` to NaN for every key of a (batch, kv head) with an empty
  row (:func:`has_empty_row`); :func:`adjust_value_gradient` applies either.
"""

from __future__ import annotations

from .._array import expand_kv_heads, namespace, sum_head_groups

__all__ = [
    "adjust_value_gradient",
    "dropout_fill_part",
    "dropout_value_part",
    "empty_row_sum",
    "fill_rows",
    "has_empty_row",
    "kernel_cotangent",
    "logical_or",
    "uniform_fill",
]


def _empty(xp, lse):
    """``(*b, Hb, Li)`` bool: the rows with no kept key in any block (``lse = -inf``)."""
    return lse == -xp.inf


def _dropout_weights(xp, drop, shape, weight, dtype):
    """``w (*b, Hb, Li, Sj) = D_ij * weight`` from a keep-mask block broadcastable to ``shape``."""
    return xp.astype(xp.broadcast_to(drop, shape), dtype) * weight


def uniform_fill(total, kv_len, group):
    """The ``uniform`` row ``(1/S) sum_j v_j`` per query head, ``(*b, Hb, 1, Ev)``."""
    xp = namespace(total)
    return expand_kv_heads(xp, total, group) / kv_len


def dropout_fill_part(drop, v, q_len, weight, group):
    """``sum_{j in block} w_ij v_j`` ``(*b, Hb, Li, Ev)`` of key block ``j``, every row.

    ``drop`` is the keep-mask block (broadcastable to ``(*b, Hb, Li, Sj)``), ``weight
    = 1 / ((1 - p) S)``.
    """
    xp = namespace(v)
    vh = expand_kv_heads(xp, v, group)                                     # (*b, Hb, Sj, Ev)
    shape = tuple(vh.shape[:-2]) + (q_len, vh.shape[-2])
    return _dropout_weights(xp, drop, shape, weight, v.dtype) @ vh


def fill_rows(policy, o, lse, fill=None):
    """The output block ``o (*b, Hb, Li, Ev)`` with its empty rows set by ``policy``.

    ``fill`` (``"uniform"``) broadcasts to ``o``: ``(*b, Hb, 1, Ev)`` or ``(*b, Hb, Li, Ev)``.
    """
    xp = namespace(o, lse)
    where = _empty(xp, lse)[..., None]
    if policy == "nan":
        return xp.where(where, xp.asarray(xp.nan, dtype=o.dtype), o)
    return xp.where(where, xp.astype(fill, o.dtype), o)


def kernel_cotangent(do, lse):
    """``do (*b, Hb, Li, Ev)`` with the empty rows zeroed: they reach no kernel (a NaN
    cotangent there would make ``0 * NaN`` in ``dq`` and ``dk``)."""
    xp = namespace(do, lse)
    return xp.where(_empty(xp, lse)[..., None], xp.zeros_like(do), do)


def empty_row_sum(do, lse, group):
    """``sum_{h in group, i empty} do_hi`` ``(*b, Hkv_b, 1, Ev)`` of a query block."""
    xp = namespace(do, lse)
    de = xp.where(_empty(xp, lse)[..., None], do, xp.zeros_like(do))
    return sum_head_groups(xp, xp.sum(de, axis=-2, keepdims=True), group)


def dropout_value_part(drop, do, lse, kv_len, weight, group):
    """``sum_{h in group, i empty} w_hij do_hi`` ``(*b, Hkv_b, Sj, Ev)`` of block ``(i, j)``."""
    xp = namespace(do, lse)
    de = xp.where(_empty(xp, lse)[..., None], do, xp.zeros_like(do))   # (*b, Hb, Li, Ev)
    shape = tuple(do.shape[:-1]) + (kv_len,)
    w = _dropout_weights(xp, drop, shape, weight, do.dtype)            # (*b, Hb, Li, Sj)
    return sum_head_groups(xp, xp.matrix_transpose(w) @ de, group)


def has_empty_row(lse, group):
    """``(*b, Hkv_b)`` bool: a query head of the kv head's group has an empty row here."""
    xp = namespace(lse)
    rows = xp.any(_empty(xp, lse), axis=-1)                            # (*b, Hb)
    lead, h = tuple(rows.shape[:-1]), rows.shape[-1]
    return xp.any(xp.reshape(rows, lead + (h // group, group)), axis=-1)


def logical_or(*flags):
    """Combine of the :func:`has_empty_row` tree."""
    xp = namespace(*flags)
    out = flags[0]
    for f in flags[1:]:
        out = xp.logical_or(out, f)
    return out


def adjust_value_gradient(policy, dv, extra, scale=1.0):
    """The kernel's ``dv_j (*b, Hkv_b, Sj, Ev)`` under ``policy``.

    ``"uniform"``: ``dv_j + scale * extra`` (``extra`` broadcastable to ``dv_j``);
    ``"nan"``: NaN where ``extra`` (``(*b, Hkv_b)`` bool) is set.
    """
    xp = namespace(dv)
    if policy == "nan":
        return xp.where(extra[..., None, None], xp.asarray(xp.nan, dtype=dv.dtype), dv)
    return dv + xp.astype(extra, dv.dtype) * scale
