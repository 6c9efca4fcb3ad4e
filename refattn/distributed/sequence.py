r"""Key/value and query sharding of SDPA: blocks of ``(queries L_i) x (keys S_j)``.

Shape legend: ``*batch`` (``nb`` axes), ``H`` query heads, ``Hkv`` kv heads,
``L`` queries in chunks ``L_i``, ``S`` keys in chunks ``S_j``, ``E`` query/key
features, ``Ev`` value features.

Forward (one task per visible block, see :mod:`refattn.distributed.merge`)::

    (o_ij, lse_ij) = sdpa_block(q_i, k_j, v_j)          partial over the keys of S_j
    (o_i, lse_i)   = lse-merge over j (a tree)          exact

Backward (FlashAttention-2 from the global statistics,
``docs/cores/sdpa.md``): with the merged ``lse_i`` and ``D_i = rowsum(dO_i * o_i)``
the probabilities of block ``(i, j)`` are ``P_ij = exp(S_ij - lse_i)``, the
final ones, so each block's backward is exact on its own::

    (dq_ij, dk_ij, dv_ij, dS_ij) = sdpa_block_backward(q_i, k_j, v_j, o_i, lse_i, dO_i)
    dq_i = sum_j dq_ij,   dk_j = sum_i dk_ij,   dv_j = sum_i dv_ij    (trees)
    dbias block (i, j) = dS_ij summed over the bias's broadcast axes

Causal masking: block ``(i, j)`` with keys ``[s0, s1)`` and queries
``[l0, l1)`` is empty when ``s0 > l1 - 1 + offset`` (no task is made for it),
fully kept when ``s1 - 1 <= l0 + offset`` (no mask applied), and otherwise
masked with the local offset ``offset + l0 - s0``.  Each block runs the SDPA
backend contract (:mod:`refattn.cores.sdpa.api`) of the best local backend.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
from dask.base import tokenize

from .._array import flatten_batch, namespace, sum_to_shape
from .._masks import causal_offset
from ..backends import resolve, route
from ..cores.sdpa import sdpa as _single_sdpa
from ..cores.sdpa.api import IMPLEMENTED, SDPAOptions, as_batched_4d, implementation
from ._cotangent import as_cotangent
from ._graph import broadcast_grad, chunk_starts, new_array, sum_parts, tree_reduce, \
    zeros_like_block
from ._plan import SCORE_ARRAYS, make_plan, probe_arrays
from .merge import merge_partials

__all__ = ["BlockSpec", "sdpa_sharded", "sdpa_vjp_sharded", "block_visibility"]

@dataclass(frozen=True)
class BlockSpec:
    """The static options of one ``(L_i, S_j)`` block (what the SDPA backends receive)."""

    scale: float
    causal_offset: int | None
    dropout_scale: float
    need_bias_grad: bool
    backend: str
    tiles: tuple | None = None
    float32_math: str | None = None

    def options(self, xp, batch, mask, bias, drop):
        four = lambda m: None if m is None else as_batched_4d(xp, m, batch)   # noqa: E731
        return SDPAOptions(scale=self.scale, causal_offset=self.causal_offset, mask=four(mask),
                           bias=four(bias), dropout_mask=four(drop),
                           dropout_scale=self.dropout_scale, need_bias_grad=self.need_bias_grad,
                           tiles=self.tiles, float32_math=self.float32_math)


def block_visibility(l_range, s_range, offset):
    """``(visible, local_offset)`` of the block of queries ``l_range`` and keys ``s_range``.

    ``offset=None`` (not causal): visible, no mask.  Otherwise key ``j`` is kept for
    query ``i`` iff ``j <= i + offset``.

    Examples
    --------
    >>> block_visibility((0, 4), (4, 8), 0)          # above the diagonal: no task
    (False, None)
    >>> block_visibility((4, 8), (0, 4), 0)          # below it: every key kept
    (True, None)
    >>> block_visibility((4, 8), (4, 8), 0)          # on it: masked, local offset 0
    (True, 0)
    """
    (l0, l1), (s0, s1) = l_range, s_range
    if offset is None:
        return True, None
    if l1 <= l0 or s1 <= s0 or s0 > l1 - 1 + offset:
        return False, None
    if s1 - 1 <= l0 + offset:
        return True, None
    return True, offset + l0 - s0


def _impl(spec, xp, arrays, bias):
    """The backend module for a block: the best local one, or the reference for non-finite or
    empty data (the single-machine routing rule, ``refattn.backends.route``)."""
    backend = resolve(spec.backend, IMPLEMENTED, arrays[0], core="sdpa")
    return implementation(route(backend, xp, arrays, bias))


def _flat(xp, x, nb):
    return flatten_batch(xp, x, tuple(x.shape[:nb]))


def _forward_block(q, k, v, mask, bias, drop, spec):
    """``(o_ij, lse_ij)`` of one block, shapes ``(*b, Hb, Li, Ev)`` and ``(*b, Hb, Li)``."""
    nb = q.ndim - 3
    xp = namespace(q, k, v)
    batch = tuple(q.shape[:nb])
    opts = spec.options(xp, batch, mask, bias, drop)
    o, lse = _impl(spec, xp, (q, k, v), opts.bias).forward(
        _flat(xp, q, nb), _flat(xp, k, nb), _flat(xp, v, nb), opts)
    return (xp.reshape(o, batch + tuple(o.shape[1:])),
            xp.reshape(lse, batch + tuple(lse.shape[1:])))


def _empty_partial(q, value_dim):
    """``(0, -inf)`` for query rows that see no key block at all."""
    xp = namespace(q)
    rows = tuple(q.shape[:-1])
    return (xp.zeros(rows + (value_dim,), dtype=q.dtype),
            xp.full(rows, -xp.inf, dtype=q.dtype))


def _backward_block(q, k, v, o, lse, do, mask, bias, drop, spec):
    """``(dq_ij, dk_ij, dv_ij, dbias_ij)``; ``dbias_ij`` summed to the bias block's shape."""
    nb = q.ndim - 3
    xp = namespace(q, k, v)
    batch = tuple(q.shape[:nb])
    opts = spec.options(xp, batch, mask, bias, drop)
    dq, dk, dv, ds, _ = _impl(spec, xp, (q, k, v, do), opts.bias).backward(
        _flat(xp, q, nb), _flat(xp, k, nb), _flat(xp, v, nb), _flat(xp, o, nb),
        _flat(xp, lse, nb), _flat(xp, do, nb), opts)
    back = lambda g: xp.reshape(g, batch + tuple(g.shape[1:]))   # noqa: E731
    dbias = None
    if spec.need_bias_grad:
        dbias = sum_to_shape(xp, back(ds), tuple(bias.shape))
    return back(dq), back(dk), back(dv), dbias


@dataclass
class _Blocks:
    """The visible blocks of a sharded SDPA call and their specs."""

    plan: object
    token: str
    specs: dict          # (*bh, i, j) -> BlockSpec
    value_dim: int

    def rows(self):
        """Every ``(*bh, i)`` query-row block."""
        p = self.plan
        return list(np.ndindex(*p.q.numblocks[:p.nb + 2]))

    def keys_of(self, row):
        """Visible key blocks ``j`` of row block ``row``."""
        return [j for j in range(self.plan.k.numblocks[self.plan.nb + 1])
                if row + (j,) in self.specs]

    def inputs(self, index):
        """Keys of ``q_i, k_j, v_j`` and the option blocks of block ``index = (*bh, i, j)``."""
        p = self.plan
        bh, i, j = index[:-2], index[-2], index[-1]
        opts = [p.option_block(n, index) if n in p.arrays else None for n in SCORE_ARRAYS]
        return ((p.q.name,) + bh + (i, 0), (p.k.name,) + bh + (j, 0),
                (p.v.name,) + bh + (j, 0), opts)


def _make_blocks(q, k, v, options):
    plan = make_plan(q, k, v, options, feature_axes=1, shard_sequence=True)
    backend = plan.static.get("backend", "auto")
    (qp, kp, vp), arrays = probe_arrays(plan, IMPLEMENTED, backend)
    _single_sdpa(qp, kp, vp, **{**plan.static, **arrays, "backend": "reference",
                                "return_lse": False})
    s = plan.shapes
    scale = options.get("scale")
    scale = 1.0 / math.sqrt(s.head_dim) if scale is None else float(scale)
    offset = causal_offset(options.get("causal_align", "upper_left"), s.q_len, s.kv_len) \
        if options.get("causal", False) else None
    drop_scale = 1.0 / (1.0 - float(options.get("dropout_p", 0.0))) \
        if options.get("dropout_mask") is not None else 1.0
    need_bias = options.get("bias") is not None
    tiles = None if options.get("tiles") is None else tuple(int(t) for t in options["tiles"])
    nb = plan.nb
    l_ranges = chunk_starts(plan.q.chunks[nb + 1])
    s_ranges = chunk_starts(plan.k.chunks[nb + 1])
    specs = {}
    for bh in np.ndindex(*plan.q.numblocks[:nb + 1]):
        for i, lr in enumerate(l_ranges):
            for j, sr in enumerate(s_ranges):
                visible, local = block_visibility(lr, sr, offset)
                if visible:
                    specs[bh + (i, j)] = BlockSpec(scale, local, drop_scale, need_bias, backend,
                                                   tiles, options.get("float32_math"))
    token = tokenize("sdpa", plan.q, plan.k, plan.v, sorted(plan.static.items()),
                     *(x.name for x in plan.arrays.values()))
    return _Blocks(plan, token, specs, s.value_dim)


def _forward_graph(blocks, split_every):
    """``(o, lse)`` dask arrays of the merged forward pass."""
    p, t = blocks.plan, blocks.token
    nb = p.nb
    layer = {}
    part = f"sdpa-block-fwd-{t}"
    for index, spec in blocks.specs.items():
        qk, kk, vk, opts = blocks.inputs(index)
        layer[(part,) + index] = (_forward_block, qk, kk, vk, *opts, spec)
    o_name, lse_name = f"sdpa-o-{t}", f"sdpa-lse-{t}"
    lse_layer = {}
    for row in blocks.rows():
        js = blocks.keys_of(row)
        if not js:
            root = (f"sdpa-empty-{t}",) + row
            layer[root] = (_empty_partial, (p.q.name,) + row + (0,), blocks.value_dim)
        elif len(js) == 1:
            root = (part,) + row + (js[0],)
        else:
            root = tree_reduce(layer, (f"sdpa-merge-{t}",) + row,
                               [(part,) + row + (j,) for j in js], merge_partials, split_every)
        layer[(o_name,) + row + (0,)] = (operator.getitem, root, 0)
        lse_layer[(lse_name,) + row] = (operator.getitem, root, 1)
    deps = [p.q, p.k, p.v, *p.arrays.values()]
    o_chunks = tuple(p.q.chunks[:nb + 2]) + ((blocks.value_dim,),)
    o = new_array(o_name, layer, deps, o_chunks, p.q, p.q.dtype)
    lse = new_array(lse_name, lse_layer, [o], tuple(p.q.chunks[:nb + 2]), p.q, p.q.dtype)
    return o, lse


def sdpa_sharded(q, k, v, *, return_lse=False, split_every=4, **options):
    """SDPA on dask arrays chunked along ``*batch``, ``H``, ``L`` and ``S``; see
    :func:`refattn.distributed.sdpa`."""
    blocks = _make_blocks(q, k, v, options)
    o, lse = _forward_graph(blocks, split_every)
    return (o, lse) if return_lse else o


def sdpa_vjp_sharded(q, k, v, *, split_every=4, **options):
    """``(o, pullback)`` of sharded SDPA; ``pullback(do) -> (dq, dk, dv[, dbias])``."""
    if options.pop("return_lse", False):
        raise ValueError("vjp(sdpa, ...) differentiates the output o only; drop return_lse")
    blocks = _make_blocks(q, k, v, options)
    o, lse = _forward_graph(blocks, split_every)

    def pullback(do):
        do = as_cotangent(do, o)
        t = tokenize(o.name, do)
        part = f"sdpa-block-bwd-{t}"
        layer = {}
        for index, spec in blocks.specs.items():
            qk, kk, vk, opts = blocks.inputs(index)
            row = index[:-1]
            layer[(part,) + index] = (_backward_block, qk, kk, vk, (o.name,) + row + (0,),
                                      (lse.name,) + row, (do.name,) + row + (0,), *opts, spec)
        return _gradients(blocks, layer, part, t, [o, lse, do], split_every)

    return o, pullback


def _gradients(blocks, layer, part, t, deps, split_every):
    """Tree-sum the block gradients into ``dq`` (over key blocks), ``dk, dv`` (over query blocks)."""
    p = blocks.plan
    nb = p.nb
    dq_name = f"sdpa-dq-{t}"
    for row in blocks.rows():
        root = (dq_name,) + row + (0,)
        parts = [(part,) + row + (j,) for j in blocks.keys_of(row)]
        if parts:
            sum_parts(layer, root, parts, 0, split_every)
        else:
            layer[root] = (zeros_like_block, (p.q.name,) + row + (0,),
                           _block_shape(p.q, row + (0,)), p.q.dtype)
    dq = new_array(dq_name, layer, deps, p.q.chunks, p.q, p.q.dtype)
    grads = [dq]
    n_rows = p.q.numblocks[nb + 1]
    for n, like in ((1, p.k), (2, p.v)):
        name = f"sdpa-d{'kv'[n - 1]}-{t}"
        sub = {}
        for col in np.ndindex(*like.numblocks[:nb + 2]):
            bh, j = col[:-1], col[-1]
            root = (name,) + col + (0,)
            parts = [(part,) + bh + (i, j) for i in range(n_rows) if bh + (i, j) in blocks.specs]
            if parts:
                sum_parts(sub, root, parts, n, split_every)
            else:
                sub[root] = (zeros_like_block, (like.name,) + col + (0,),
                             _block_shape(like, col + (0,)), like.dtype)
        grads.append(new_array(name, sub, [dq], like.chunks, p.q, like.dtype))
    if "bias" in p.arrays:
        bias = p.arrays["bias"]
        contributions = {}
        for index in blocks.specs:
            target = tuple(i if m != 1 else 0 for i, m in zip(index, bias.shape))
            contributions.setdefault(target, []).append(((part,) + index, 3))
        name, sub = f"sdpa-dbias-{t}", {}
        broadcast_grad(sub, name, contributions, bias.chunks,
                       (p.q.name,) + (0,) * p.q.ndim, bias.dtype, split_every)
        grads.append(p.to_option_shape("bias", new_array(name, sub, [dq], bias.chunks, p.q,
                                                          bias.dtype)))
    return tuple(grads)


def _block_shape(arr, index):
    return tuple(c[i] for c, i in zip(arr.chunks, index))
