r"""The graphs of the empty-row policies ``"uniform"`` and ``"nan"`` on sequence-sharded SDPA.

A row is empty when no key of any block is kept for it (mask, causal rule,
window, ``-inf`` bias entries); after the log-sum-exp merge it is exactly a row
with ``lse_i = -inf``.  The policies (:mod:`refattn._empty_rows`,
``docs/conventions.md``) act on the merged rows, with sums over every key block,
masked or skipped by the causal rule alike:

=========  ==================================================  ==========================================
policy     output row ``o_i``                                   ``dv_j`` (after the kernel blocks' sum)
=========  ==================================================  ==========================================
uniform    ``(1/S) sum_j v_j``; dropout: ``sum_j w_ij v_j``     ``+ sum_{h in group, i empty} w_hij do_hi``
nan        NaN                                                  NaN on a (batch, kv head) with an empty row
=========  ==================================================  ==========================================

with ``w_ij = D_ij / ((1 - p) S)`` (``1/S`` without dropout).  The kernel blocks
see the cotangent with the empty rows zeroed (no gradient reaches ``q``, ``k``,
a bias or the slopes through them) and the merged ``o`` (refattn's convention)
as their residual, the order of the single-machine call.  Sums over key blocks
(forward) and query blocks (backward) are trees; without dropout the sums are
one ``(*b, Hkv_b, 1, Ev)`` vector per batch/head block, with dropout one task per
``(query block, key block)`` pair, the cost of a block's ``P V`` product.
Task functions: :mod:`refattn.distributed._empty_row_tasks`.
"""

from __future__ import annotations

from ._empty_row_tasks import (
    adjust_value_gradient,
    dropout_fill_part,
    dropout_value_part,
    empty_row_sum,
    fill_rows,
    has_empty_row,
    kernel_cotangent,
    logical_or,
    uniform_fill,
)
from ._graph import add, new_array, tree_reduce

__all__ = ["adjusted_value_gradient", "cotangent_for_kernels", "filled_output",
           "value_gradient_terms"]


def _drop_key(blocks, index):
    return blocks.plan.option_block("dropout_mask", index)


def _weight(blocks):
    return blocks.dropout_scale / blocks.plan.shapes.kv_len


def _bh_blocks(blocks):
    return [row[:-1] for row in blocks.rows() if row[-1] == 0]


def _n_key_blocks(blocks):
    return blocks.plan.k.numblocks[blocks.plan.nb + 1]


def _q_rows(blocks, i):
    return blocks.plan.q.chunks[blocks.plan.nb + 1][i]


def filled_output(blocks, o, lse, split_every):
    """The output ``o`` with its empty rows set by ``blocks.empty_rows`` (``"uniform"``,
    ``"nan"``); ``o, lse`` are the merged dask arrays (refattn's convention)."""
    p, t, policy = blocks.plan, blocks.token, blocks.empty_rows
    group, layer, deps = p.shapes.group, {}, [o, lse]
    fills = {}
    if policy == "uniform" and "dropout_mask" not in p.arrays:
        total = p.v.sum(axis=p.nb + 1, keepdims=True)          # (*batch, Hkv, 1, Ev)
        deps.append(total)
        for bh in _bh_blocks(blocks):
            key = (f"sdpa-uniform-fill-{t}",) + bh
            layer[key] = (uniform_fill, (total.name,) + bh + (0, 0), p.shapes.kv_len, group)
            fills.update({bh + (i,): key for i in range(p.q.numblocks[p.nb + 1])})
    elif policy == "uniform":
        part = f"sdpa-uniform-part-{t}"
        for row in blocks.rows():
            keys = []
            for j in range(_n_key_blocks(blocks)):
                key = (part,) + row + (j,)
                layer[key] = (dropout_fill_part, _drop_key(blocks, row + (j,)),
                              (p.v.name,) + row[:-1] + (j, 0), _q_rows(blocks, row[-1]),
                              _weight(blocks), group)
                keys.append(key)
            fills[row] = tree_reduce(layer, (f"sdpa-uniform-sum-{t}",) + row, keys, add,
                                     split_every)
        deps += [p.v, p.arrays["dropout_mask"]]
    name = f"sdpa-o-{policy}-{t}"
    for row in blocks.rows():
        layer[(name,) + row + (0,)] = (fill_rows, policy, (o.name,) + row + (0,),
                                       (lse.name,) + row, fills.get(row))
    return new_array(name, layer, deps, o.chunks, p.q, p.q.dtype)


def cotangent_for_kernels(blocks, do, lse, t):
    """``do`` with the empty rows zeroed, the cotangent of the kernel blocks."""
    p = blocks.plan
    name = f"sdpa-do-kernel-{t}"
    layer = {(name,) + row + (0,): (kernel_cotangent, (do.name,) + row + (0,), (lse.name,) + row)
             for row in blocks.rows()}
    return new_array(name, layer, [do, lse], do.chunks, p.q, p.q.dtype)


def value_gradient_terms(blocks, layer, do, lse, t, split_every):
    """Add the tasks of what the empty rows do to ``dv``; return ``(term, deps)``.

    ``term(col)`` for a ``dv`` block ``col = (*bh, j)`` is the argument tuple
    ``(extra key, scale)`` of :func:`adjust_value_gradient`.
    """
    p, policy = blocks.plan, blocks.empty_rows
    group, n_rows = p.shapes.group, p.q.numblocks[p.nb + 1]
    roots = {}
    if policy == "nan" or "dropout_mask" not in p.arrays:
        part, combine = (f"sdpa-empty-flag-{t}", logical_or) if policy == "nan" else \
            (f"sdpa-empty-dosum-{t}", add)
        for bh in _bh_blocks(blocks):
            keys = []
            for i in range(n_rows):
                key = (part,) + bh + (i,)
                layer[key] = (has_empty_row, (lse.name,) + bh + (i,), group) if policy == "nan" \
                    else (empty_row_sum, (do.name,) + bh + (i, 0), (lse.name,) + bh + (i,), group)
                keys.append(key)
            roots[bh] = tree_reduce(layer, (part + "-tree",) + bh, keys, combine, split_every)
        scale = 1.0 if policy == "nan" else 1.0 / p.shapes.kv_len
        return (lambda col: (roots[col[:-1]], scale)), [do, lse]
    part = f"sdpa-empty-dvpart-{t}"
    kv_chunks = p.k.chunks[p.nb + 1]
    for bh in _bh_blocks(blocks):
        for j in range(_n_key_blocks(blocks)):
            keys = []
            for i in range(n_rows):
                key = (part,) + bh + (i, j)
                layer[key] = (dropout_value_part, _drop_key(blocks, bh + (i, j)),
                              (do.name,) + bh + (i, 0), (lse.name,) + bh + (i,), kv_chunks[j],
                              _weight(blocks), group)
                keys.append(key)
            roots[bh + (j,)] = tree_reduce(layer, (part + "-tree",) + bh + (j,), keys, add,
                                           split_every)
    return (lambda col: (roots[col], 1.0)), [do, lse, p.arrays["dropout_mask"]]


def adjusted_value_gradient(layer, name, policy, kernel_key, term):
    """``layer[name] = dv block`` from the kernel's sum ``kernel_key`` and ``term``."""
    extra, scale = term
    layer[name] = (adjust_value_gradient, policy, kernel_key, extra, scale)
