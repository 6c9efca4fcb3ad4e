"""Validation and chunk alignment shared by the sharded calls.

Shape legend: ``*batch`` (``nb`` axes), ``H`` query heads, ``Hkv`` kv heads
(group ``G = H / Hkv``), ``L`` queries, ``S`` keys, feature axes ``(E,)`` for a
real core or ``(4, d)`` for a quaternion core.

Policy (``docs/distributed.md``): the chunks of ``q`` lead.  Its head chunks
must be multiples of ``G`` (a GQA group is never split: ``ValueError``
otherwise); ``k`` and ``v`` are rechunked to ``q``'s batch chunks and to head
chunks ``c / G``; feature axes are merged into one chunk.  Mask, bias and
dropout keep-mask (broadcastable to the scores ``(*batch, H, L, S)``) are
given ``nb + 3`` axes and chunked like the scores: a full axis like ``q``'s
batch/head/``L`` chunks or ``k``'s ``S`` chunks, a broadcast (size 1) axis
as one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from .._validate import attention_shapes, check_broadcastable
from ..backends import resolve

__all__ = ["SCORE_ARRAYS", "Plan", "as_dask", "make_plan", "probe_arrays"]

#: Options that are arrays broadcastable to the scores ``(*batch, H, L, S)``.
SCORE_ARRAYS = ("mask", "bias", "dropout_mask")
_SCORES = "(..., H, L, S)"


def as_dask(x, name):
    """``x`` as a dask array (a NumPy/CuPy array becomes one chunk)."""
    if isinstance(x, da.Array):
        return x
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a dask array (or a NumPy/CuPy array), "
                        f"got {type(x).__name__}")
    return da.from_array(x, chunks=x.shape, asarray=False)


@dataclass
class Plan:
    """Aligned inputs of one sharded call.

    Attributes
    ----------
    q, k, v : dask arrays, chunked as described in the module docstring
    arrays : dict
        ``{option name: dask array with nb + 3 axes, chunked like the scores}``.
    static : dict
        The options that are not arrays (passed to every block unchanged).
    nb, f : int
        Batch axes, feature axes.
    shapes : AttentionShapes
    """

    q: da.Array
    k: da.Array
    v: da.Array
    arrays: dict
    static: dict
    nb: int
    f: int
    shapes: object
    option_shapes: dict

    def to_option_shape(self, name, x):
        """``x`` (``nb + 3`` axes) back to the shape option ``name`` was given in."""
        extra = x.ndim - len(self.option_shapes[name])
        return x[(0,) * extra] if extra else x

    def scores_chunks(self) -> tuple:
        """Chunks of the full score array ``(*batch, H, L, S)``."""
        nb = self.nb
        return tuple(self.q.chunks[:nb + 2]) + (self.k.chunks[nb + 1],)

    def option_block(self, name, index):
        """Key of the block of option array ``name`` that scores block ``index`` reads."""
        x = self.arrays[name]
        return (x.name,) + tuple(i if n != 1 else 0 for i, n in zip(index, x.shape))


def _group_chunks(q_head_chunks, group, head_axis):
    bad = [c for c in q_head_chunks if c % group]
    if bad:
        raise ValueError(
            f"q is chunked along its head axis (axis {head_axis}) as {tuple(q_head_chunks)}, "
            f"which splits a group of G = H / Hkv = {group} query heads sharing one kv head; "
            f"head chunks must be multiples of {group} (e.g. q.rechunk({{{head_axis}: "
            f"{group}}}))")
    return tuple(c // group for c in q_head_chunks)


def _score_array(x, name, plan_shapes, nb, chunks):
    """Option array ``x`` with ``nb + 3`` axes, chunked like the scores (broadcast axes: 1 chunk)."""
    target = tuple(plan_shapes.scores)
    check_broadcastable(x, name, target, _SCORES)
    x = as_dask(x, name)
    if x.ndim < nb + 3:
        x = x[(None,) * (nb + 3 - x.ndim)]
    return x.rechunk(tuple(c if n != 1 else (1,) for c, n in zip(chunks, x.shape)))


def make_plan(q, k, v, options, *, feature_axes, shard_sequence, legend_feature="E"):
    """Validate shapes and chunks of ``q, k, v`` and the score-shaped options; align chunks.

    ``shard_sequence=False`` merges ``L`` and ``S`` into one chunk each
    (batch/head sharding only); ``True`` keeps ``q``'s ``L`` chunks and ``k``'s
    ``S`` chunks.
    """
    q, k, v = as_dask(q, "q"), as_dask(k, "k"), as_dask(v, "v")
    f = feature_axes
    shapes = attention_shapes(q, k, v, feature_axes=f, legend_feature=legend_feature)
    nb = len(shapes.batch)
    kv_heads = _group_chunks(q.chunks[nb], shapes.group, nb)
    seq = {} if shard_sequence else {nb + 1: -1}
    feat = {nb + 2 + a: -1 for a in range(f)}
    q = q.rechunk({**seq, **feat})
    kc = dict(enumerate(q.chunks[:nb]))
    kc.update({nb: kv_heads, **seq, **feat})
    k = k.rechunk(kc)
    v = v.rechunk({**dict(enumerate(k.chunks[:nb + 2])), **feat})
    static = {n: x for n, x in options.items() if n not in SCORE_ARRAYS}
    plan = Plan(q, k, v, {}, static, nb, f, shapes, {})
    chunks = plan.scores_chunks()
    for name in SCORE_ARRAYS:
        if options.get(name) is not None:
            plan.arrays[name] = _score_array(options[name], name, shapes, nb, chunks)
            plan.option_shapes[name] = tuple(options[name].shape)
    return plan


def probe_arrays(plan, backend_choices, backend):
    """Small NumPy stand-ins for a validation call of the single-machine function.

    Batch axes of size 1, ``min(L, 2)`` queries, ``min(S, 2)`` keys, the real
    heads and features; option arrays cut to match (all ``True`` / zeros).
    Checks ``backend`` against the chunk type of ``q`` on the way.
    """
    resolve(backend, backend_choices, plan.q._meta, core="this core")
    s = plan.shapes
    nb = plan.nb
    lp, sp = min(s.q_len, 2), min(s.kv_len, 2)
    dtype = np.dtype(plan.q.dtype)
    q = np.zeros((1,) * nb + (s.heads, lp) + tuple(plan.q.shape[nb + 2:]), dtype)
    k = np.zeros((1,) * nb + (s.kv_heads, sp) + tuple(plan.k.shape[nb + 2:]), dtype)
    v = np.zeros((1,) * nb + (s.kv_heads, sp) + tuple(plan.v.shape[nb + 2:]), dtype)
    sizes = (1,) * nb + (s.heads, lp, sp)
    arrays = {}
    for name, x in plan.arrays.items():
        shape = tuple(n if m != 1 else 1 for n, m in zip(sizes, x.shape))
        arrays[name] = np.ones(shape, np.dtype(x.dtype)) if x.dtype == bool else \
            np.zeros(shape, np.dtype(x.dtype))
    return (q, k, v), arrays
