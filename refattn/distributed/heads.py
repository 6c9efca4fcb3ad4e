"""Batch/head sharding of any core: one task per ``(*batch, H)`` block, forward and pullback.

Shape legend: ``*batch`` batch axes, ``H`` query heads, ``Hkv`` kv heads,
``L`` queries, ``S`` keys, ``F`` the feature axes of the output (``(Ev,)`` or
``(4, dv)``).

Attention heads and batch elements are independent, so a block of ``q``
(``(*b, Hb, L, ...)``) with the matching block of ``k``, ``v`` (``Hb / G`` kv
heads) and of the masks is a complete problem: each task calls the
single-machine function itself (``fn(q_b, k_b, v_b, **options)``, or
:func:`refattn.vjp` for the pullback), so its backend is the best one for the
chunk type (numba for NumPy chunks, cupy for CuPy chunks) and its numbers are
the single-machine ones.  Nothing moves between blocks, except the gradient
of a broadcast ``bias``, which is summed over the blocks that share it (a
tree reduction).
"""

from __future__ import annotations

import operator

import numpy as np
from dask.base import tokenize

from .._vjp import vjp as _single_vjp
from ..cores import get_core
from ..cores.elementwise import elementwise_attention
from ..cores.preconditioned import preconditioned_sdpa
from ..cores.quaternion import quaternion_attention
from ..cores.sdpa import sdpa
from ._cotangent import as_cotangent
from ._graph import broadcast_grad, new_array
from ._plan import make_plan, probe_arrays

__all__ = ["apply_heads", "core_of", "vjp_heads"]


def core_of(fn, options):
    """``(core, feature_axes)`` of a refattn core function and its options."""
    if fn is sdpa:
        core = get_core("sdpa")
    elif fn is quaternion_attention:
        core = get_core(options.get("mode", "shared"))
    elif fn is elementwise_attention:
        core = get_core("elementwise")
    elif fn is preconditioned_sdpa:
        core = get_core(options.get("inner_core", "sdpa"))
    else:
        raise TypeError(
            f"{getattr(fn, '__name__', type(fn).__name__)} is not a refattn core function; "
            "refattn.distributed shards refattn.sdpa, quaternion_attention, "
            "elementwise_attention and preconditioned_sdpa (and Attention layers via vjp)")
    return core, (2 if core.layout == "quaternion" else 1)


def _call_block(fn, q, k, v, names, arrays, static):
    return fn(q, k, v, **static, **dict(zip(names, arrays)))


def _vjp_block(fn, q, k, v, names, arrays, static):
    return _single_vjp(fn, q, k, v, **static, **dict(zip(names, arrays)))


def _pullback_block(forward, do):
    return tuple(forward[1](do))


def _prepare(fn, q, k, v, options, probe_vjp):
    core, f = core_of(fn, options)
    plan = make_plan(q, k, v, options, feature_axes=f, shard_sequence=False,
                     legend_feature="d" if f == 2 else "E")
    (qp, kp, vp), arrays = probe_arrays(plan, core.backends, options.get("backend", "auto"))
    probe_opts = {**plan.static, **arrays, "backend": "reference"}
    if probe_vjp:
        out, pullback = _single_vjp(fn, qp, kp, vp, **probe_opts)
        n_grads = len(pullback(np.ones(out.shape, out.dtype)))
    else:
        out, n_grads = fn(qp, kp, vp, **probe_opts), 0
    return plan, out, n_grads


def _grid(plan):
    """Block indices of the ``(*batch, H)`` grid."""
    return list(np.ndindex(*plan.q.numblocks[:plan.nb + 1]))


def _block_inputs(plan, index):
    nb = plan.nb
    qkey = (plan.q.name,) + index + (0,) * (plan.q.ndim - nb - 1)
    kkey = (plan.k.name,) + index + (0,) * (plan.k.ndim - nb - 1)
    vkey = (plan.v.name,) + index + (0,) * (plan.v.ndim - nb - 1)
    names = tuple(plan.arrays)
    arrays = [plan.option_block(n, index + (0, 0)) for n in names]
    return qkey, kkey, vkey, names, arrays


def _output_chunks(plan, out):
    """Chunks of an output ``(*batch, H, L, *tail)`` of the probe ``out``."""
    tail = tuple(out.shape[plan.nb + 2:])
    return tuple(plan.q.chunks[:plan.nb + 1]) + ((plan.shapes.q_len,),) + tuple((n,) for n in tail)


def _extract(layer, name, tasks, plan, out, position):
    """Output blocks ``(name, *index, 0, ...)`` taken from the tuple results ``tasks``."""
    chunks = _output_chunks(plan, out)
    zeros = (0,) * (len(chunks) - plan.nb - 1)
    for index, key in tasks.items():
        layer[(name,) + index + zeros] = (operator.getitem, key, position) if position is not None \
            else key
    return chunks


def apply_heads(fn, q, k, v, **options):
    """Forward pass of ``fn`` sharded over the batch and head chunks of ``q``: dask array(s)."""
    plan, out, _ = _prepare(fn, q, k, v, options, probe_vjp=False)
    token = tokenize(fn.__name__, plan.q, plan.k, plan.v, plan.static,
                     *(x.name for x in plan.arrays.values()))
    deps = [plan.q, plan.k, plan.v, *plan.arrays.values()]
    outs = out if isinstance(out, tuple) else (out,)
    names = [f"{fn.__name__}-out{n}-{token}" for n in range(len(outs))]
    task_name = f"{fn.__name__}-block-{token}"
    layer, tasks = {}, {}
    for index in _grid(plan):
        qkey, kkey, vkey, arr_names, arr_keys = _block_inputs(plan, index)
        key = (task_name,) + index
        layer[key] = (_call_block, fn, qkey, kkey, vkey, arr_names, list(arr_keys), plan.static)
        tasks[index] = key
    results = []
    for n, (name, o) in enumerate(zip(names, outs)):
        sub = dict(layer) if n == 0 else {}
        chunks = _extract(sub, name, tasks, plan, o, n if isinstance(out, tuple) else None)
        arr_deps = deps if n == 0 else [results[0]]
        results.append(new_array(name, sub, arr_deps, chunks, plan.q, o.dtype))
    return tuple(results) if isinstance(out, tuple) else results[0]


def vjp_heads(fn, q, k, v, *, split_every=4, **options):
    """``(o, pullback)`` of ``fn`` sharded over batch and head chunks (see :func:`refattn.vjp`)."""
    plan, out, n_grads = _prepare(fn, q, k, v, options, probe_vjp=True)
    token = tokenize("vjp", fn.__name__, plan.q, plan.k, plan.v, plan.static,
                     *(x.name for x in plan.arrays.values()))
    deps = [plan.q, plan.k, plan.v, *plan.arrays.values()]
    fwd_name, o_name = f"{fn.__name__}-vjp-block-{token}", f"{fn.__name__}-o-{token}"
    layer, tasks = {}, {}
    for index in _grid(plan):
        qkey, kkey, vkey, arr_names, arr_keys = _block_inputs(plan, index)
        key = (fwd_name,) + index
        layer[key] = (_vjp_block, fn, qkey, kkey, vkey, arr_names, list(arr_keys), plan.static)
        tasks[index] = key
    chunks = _extract(layer, o_name, tasks, plan, out, 0)
    o = new_array(o_name, layer, deps, chunks, plan.q, out.dtype)

    def pullback(do):
        do = as_cotangent(do, o)
        ptoken = tokenize(o.name, do)
        pname = f"{fn.__name__}-pullback-block-{ptoken}"
        grads_layer = {}
        nb = plan.nb
        for index, fkey in tasks.items():
            dokey = (do.name,) + index + (0,) * (do.ndim - nb - 1)
            grads_layer[(pname,) + index] = (_pullback_block, fkey, dokey)
        grads = []
        for n, like in enumerate((plan.q, plan.k, plan.v)):
            name = f"{fn.__name__}-d{'qkv'[n]}-{ptoken}"
            sub = {(name,) + index + (0,) * (like.ndim - nb - 1): (operator.getitem,
                                                                   (pname,) + index, n)
                   for index in tasks}
            if n == 0:
                sub.update(grads_layer)
            grads.append(new_array(name, sub, [o, do] if n == 0 else [grads[0]], like.chunks,
                                   plan.q, like.dtype))
        if n_grads > 3:
            grads.append(_bias_grad(plan, tasks, pname, ptoken, grads[0], split_every))
        return tuple(grads)

    return o, pullback


def _bias_grad(plan, tasks, pname, token, after, split_every):
    """``dbias`` summed over the batch/head blocks that share each of its blocks."""
    bias = plan.arrays["bias"]
    contributions = {}
    for index in tasks:
        target = tuple(i if n != 1 else 0 for i, n in zip(index + (0, 0), bias.shape))
        contributions.setdefault(target, []).append(((pname,) + index, 3))
    name = f"dbias-{token}"
    layer = {}
    broadcast_grad(layer, name, contributions, bias.chunks,
                   (plan.q.name,) + (0,) * plan.q.ndim, bias.dtype, split_every)
    grad = new_array(name, layer, [after], bias.chunks, plan.q, bias.dtype)
    return plan.to_option_shape("bias", grad)
