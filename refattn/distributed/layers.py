"""Data-parallel :class:`refattn.Attention`: forward and pullback over batch chunks.

Shape legend: ``*batch`` batch axes, ``L`` queries, ``S`` keys, ``d`` =
``d_model``, ``H`` heads.

Each batch chunk of ``xq`` (with the matching chunks of ``xkv`` and of the
mask) is one task running the single-machine layer, forward and backward.
The parameters are one graph key shared by every task (sent once to each
worker that needs them).  The pullback gives ``dx`` chunk by chunk and each
parameter gradient as the sum over chunks, a tree of fan-in ``split_every``:

.. math:: \\frac{\\partial \\mathcal{L}}{\\partial W} = \\sum_{c} \\frac{\\partial
          \\mathcal{L}_c}{\\partial W}

(the loss is a sum over batch elements, and a chunk's backward gives its own term).

The layer's core options (``window``, ``softcap``, ``alibi_slopes``, rotary, ...)
travel with the layer unchanged, except ALiBi slopes per batch element
``(*batch, H)``, which each task gets cut to its batch chunk.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
from dask.base import tokenize

from .._validate import check_broadcastable
from .._vjp import vjp as _single_vjp
from ._cotangent import as_cotangent
from ._graph import add, chunk_starts, new_array, tree_reduce
from ._plan import as_dask

__all__ = ["attention_forward", "attention_vjp"]


def _params(names, *arrays):
    return dict(zip(names, arrays))


def _forward_block(layer, params, xq, xkv, mask, backend):
    return _single_vjp(layer, params, xq, xkv, mask=mask, backend=backend)


def _call_block(layer, params, xq, xkv, mask, backend):
    return layer(params, xq, xkv, mask=mask, backend=backend)


def _backward_block(forward, dy):
    return forward[1](dy)


def _param_grad(grads, name):
    return grads[0][name]


def _prepare(layer, params, xq, xkv, mask):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays (from layer.init()), got "
                        f"{type(params).__name__}")
    xq = as_dask(xq, "xq")
    if xq.ndim < 2:
        raise ValueError(f"xq must have shape (..., L, d_model), got {tuple(xq.shape)}")
    nb = xq.ndim - 2
    xq = xq.rechunk({nb: -1, nb + 1: -1})
    if xkv is not None:
        xkv = as_dask(xkv, "xkv")
        if xkv.ndim != xq.ndim:
            raise ValueError(f"xkv must have shape (..., S, d_model) with the batch axes of xq "
                             f"{tuple(xq.shape[:nb])}, got {tuple(xkv.shape)}")
        xkv = xkv.rechunk(tuple(xq.chunks[:nb]) + (-1, -1))
    L = xq.shape[nb]
    S = L if xkv is None else xkv.shape[nb]
    heads = layer.config.n_heads
    if mask is not None:
        target = tuple(xq.shape[:nb]) + (heads, L, S)
        check_broadcastable(mask, "mask", target, "(..., H, L, S)")
        mask = as_dask(mask, "mask")
        if mask.ndim < nb + 3:
            mask = mask[(None,) * (nb + 3 - mask.ndim)]
        mask = mask.rechunk(tuple(c if n != 1 else (1,) for c, n in
                                  zip(tuple(xq.chunks[:nb]) + ((heads,), (L,), (S,)), mask.shape)))
    # validation: the single-machine layer on stand-ins (1 batch element, <= 2 tokens)
    lp, sp = min(L, 2), min(S, 2)
    xqp = np.zeros((1,) * nb + (lp, xq.shape[-1]), np.dtype(xq.dtype))
    xkvp = None if xkv is None else np.zeros((1,) * nb + (sp, xkv.shape[-1]), np.dtype(xkv.dtype))
    maskp = None
    if mask is not None:
        sizes = (1,) * nb + (heads, lp, sp)
        maskp = np.ones(tuple(n if m != 1 else 1 for n, m in zip(sizes, mask.shape)),
                        np.dtype(mask.dtype))
    slopes = layer.core_options.get("alibi_slopes")
    if slopes is not None and slopes.ndim > 1 and tuple(slopes.shape[:-1]) != tuple(xq.shape[:nb]):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or (*batch, H) = "
                         f"{(*xq.shape[:nb], heads)}, got {tuple(slopes.shape)}")
    probe = _block_layer(layer, (0,) * nb, ((1,),) * nb)
    y, pullback = _single_vjp(probe, params, xqp, xkvp, mask=maskp, backend="reference")
    pullback(np.ones(y.shape, y.dtype))
    return xq, xkv, mask, nb


def _block_layer(layer, index, batch_chunks):
    """``layer``, or for ALiBi slopes per batch element ``(*batch, H)`` a copy of it whose
    slopes are those of batch block ``index`` (every other option is per head or global)."""
    slopes = layer.core_options.get("alibi_slopes")
    if slopes is None or slopes.ndim == 1:
        return layer
    cut = tuple(slice(start, stop) for (start, stop) in
                (chunk_starts(c)[i] for c, i in zip(batch_chunks, index)))
    block = copy.copy(layer)
    block.core_options = {**layer.core_options, "alibi_slopes": slopes[cut]}
    return block


def _graph(layer, params, xq, xkv, mask, nb, backend, task, prefix):
    token = tokenize(prefix, repr(layer), xq, xkv, mask, sorted(params),
                     [params[n] for n in sorted(params)], backend)
    pkey = (f"attention-params-{token}",)
    names = tuple(sorted(params))
    dsk = {pkey: (_params, names, *[params[n] for n in names])}
    blocks = {}
    name = f"attention-{prefix}-{token}"
    for index in np.ndindex(*xq.numblocks[:nb]):
        xkey = (xq.name,) + index + (0, 0)
        kvkey = None if xkv is None else (xkv.name,) + index + (0, 0)
        mkey = None if mask is None else \
            (mask.name,) + tuple(i if n != 1 else 0 for i, n in zip(index, mask.shape)) + (0,) * 3
        dsk[(name,) + index] = (task, _block_layer(layer, index, xq.chunks[:nb]), pkey, xkey,
                                kvkey, mkey, backend)
        blocks[index] = (name,) + index
    deps = [x for x in (xq, xkv, mask) if x is not None]
    return dsk, blocks, deps, token


def attention_forward(layer, params, xq, xkv=None, mask=None, *, backend="auto"):
    """``layer(params, xq, xkv, mask)`` on dask arrays, one task per batch chunk of ``xq``."""
    xq, xkv, mask, nb = _prepare(layer, params, xq, xkv, mask)
    dsk, blocks, deps, token = _graph(layer, params, xq, xkv, mask, nb, backend, _call_block,
                                      "forward")
    y_name = f"attention-y-{token}"
    for index, key in blocks.items():
        dsk[(y_name,) + index + (0, 0)] = key
    return new_array(y_name, dsk, deps, xq.chunks, xq, xq.dtype)


def attention_vjp(layer, params, xq, xkv=None, mask=None, *, backend="auto", split_every=4):
    """``(y, pullback)``; ``pullback(dy) -> (dparams, dxq[, dxkv])`` (dask arrays)."""
    xq, xkv, mask, nb = _prepare(layer, params, xq, xkv, mask)
    dsk, blocks, deps, token = _graph(layer, params, xq, xkv, mask, nb, backend, _forward_block,
                                      "vjp")
    y_name = f"attention-y-{token}"
    for index, key in blocks.items():
        dsk[(y_name,) + index + (0, 0)] = (operator.getitem, key, 0)
    y = new_array(y_name, dsk, deps, xq.chunks, xq, xq.dtype)

    def pullback(dy):
        dy = as_cotangent(dy, y)
        t = tokenize(y.name, dy)
        bname = f"attention-bwd-{t}"
        sub = {}
        for index, key in blocks.items():
            sub[(bname,) + index] = (_backward_block, key, (dy.name,) + index + (0, 0))
        dxq_name = f"attention-dxq-{t}"
        for index in blocks:
            sub[(dxq_name,) + index + (0, 0)] = (operator.getitem, (bname,) + index, 1)
        dxq = new_array(dxq_name, sub, [y, dy], xq.chunks, xq, xq.dtype)
        dparams = {}
        for pname, value in params.items():
            gname = f"attention-d{pname}-{t}"
            g = {}
            leaves = []
            for n, index in enumerate(blocks):
                leaf = (gname + "-leaf", n)
                g[leaf] = (_param_grad, (bname,) + index, pname)
                leaves.append(leaf)
            root = tree_reduce(g, (gname + "-tree",), leaves, add, split_every)
            g[(gname,) + (0,) * value.ndim] = root
            dparams[pname] = new_array(gname, g, [dxq], tuple((n,) for n in value.shape), xq,
                                       value.dtype)
        out = (dparams, dxq)
        if xkv is not None:
            dxkv_name = f"attention-dxkv-{t}"
            g = {(dxkv_name,) + index + (0, 0): (operator.getitem, (bname,) + index, 2)
                 for index in blocks}
            out = out + (new_array(dxkv_name, g, [dxq], xkv.chunks, xq, xkv.dtype),)
        return out

    return y, pullback
