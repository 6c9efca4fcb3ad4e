"""Task-graph helpers: block keys, tree reductions, arrays from hand-built layers.

The sharded calls build their graphs block by block (one task per block, no
task for a block that causal masking empties), so they speak Dask's graph
format directly: a layer is a dict ``{key: (function, *arguments)}`` whose
arguments may be keys of other tasks.
"""

from __future__ import annotations

import itertools
import operator

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.highlevelgraph import HighLevelGraph

from .._array import namespace

__all__ = [
    "add",
    "broadcast_grad",
    "chunk_starts",
    "new_array",
    "sum_parts",
    "tree_reduce",
    "zeros_like_block",
]


def chunk_starts(chunks):
    """``[(start, stop), ...]`` of each chunk along one axis."""
    bounds = [0] + list(itertools.accumulate(chunks))
    return list(itertools.pairwise(bounds))


def tree_reduce(layer, name, keys, combine, split_every=4):
    """Add tasks combining ``keys`` ``split_every`` at a time, level by level; return the root key.

    ``combine(*values)`` must be associative (a sum, a log-sum-exp merge).  ``n``
    keys take ``ceil((n - 1) / (split_every - 1))`` combine tasks and
    ``ceil(log_split_every(n))`` levels; a single key is returned as it is.
    ``name`` is a tuple prefix unique to this reduction, e.g. ``("dq-sum-<token>", b, h, i)``.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    keys = list(keys)
    if not keys:
        raise ValueError("tree_reduce needs at least one key")
    level = 0
    while len(keys) > 1:
        nxt = []
        for g in range(0, len(keys), split_every):
            group = keys[g:g + split_every]
            if len(group) == 1:
                nxt.append(group[0])
                continue
            key = tuple(name) + (level, len(nxt))
            layer[key] = (combine, *group)
            nxt.append(key)
        keys, level = nxt, level + 1
    return keys[0]


def new_array(name, layer, dependencies, chunks, like, dtype):
    """A dask array named ``name`` whose block keys ``(name, *index)`` are in ``layer``.

    ``like`` (a dask array) gives the chunk type (NumPy, CuPy) of the result.
    """
    graph = HighLevelGraph.from_collections(name, layer, dependencies=dependencies)
    meta = meta_from_array(like._meta, ndim=len(chunks), dtype=dtype)
    return da.Array(graph, name, chunks, meta=meta)


def add(*blocks):
    """Sum of blocks (the combine of a gradient tree reduction)."""
    total = blocks[0]
    for b in blocks[1:]:
        total = total + b
    return total


def zeros_like_block(like, shape, dtype):
    """Zeros of ``shape`` in the array library (and on the device) of the block ``like``."""
    xp = namespace(like)
    return xp.zeros(tuple(shape), dtype=getattr(xp, np.dtype(dtype).name))


def sum_parts(layer, root, parts, index, split_every):
    """``layer[root] = sum_p parts[p][index]`` as a tree; ``parts`` are keys of tuple results.

    The leaves are ``getitem`` tasks (run where the tuple lives, so only the
    needed element travels); ``len(parts) >= 1``.
    """
    if len(parts) == 1:
        layer[root] = (operator.getitem, parts[0], index)
        return
    leaves = []
    for n, p in enumerate(parts):
        key = (root[0] + "-leaf",) + tuple(root[1:]) + (n,)
        layer[key] = (operator.getitem, p, index)
        leaves.append(key)
    top = tree_reduce(layer, (root[0] + "-tree",) + tuple(root[1:]), leaves[:-1], add,
                      split_every) if len(leaves) > 2 else None
    # the last combine writes the root itself (no alias task)
    if top is None:
        layer[root] = (add, *leaves)
    else:
        layer[root] = (add, top, leaves[-1])


def broadcast_grad(layer, name, contributions, grad_chunks, like_key, dtype, split_every):
    """Blocks ``(name, *index)`` of the gradient of a broadcast option (``dbias``).

    ``contributions`` maps a block index of the gradient (an axis the option
    broadcasts has one block) to the ``(part_key, position)`` of every task
    result holding a piece of it; missing blocks (every contribution skipped by
    causal masking) are zeros made like the block ``like_key``.
    """
    numblocks = tuple(len(c) for c in grad_chunks)
    for index in np.ndindex(*numblocks):
        root = (name,) + index
        found = contributions.get(index, [])
        if not found:
            shape = tuple(c[i] for c, i in zip(grad_chunks, index))
            layer[root] = (zeros_like_block, like_key, shape, dtype)
            continue
        positions = {pos for _, pos in found}
        (position,) = positions
        sum_parts(layer, root, [key for key, _ in found], position, split_every)
