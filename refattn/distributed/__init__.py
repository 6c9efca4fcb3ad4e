"""refattn on Dask: attention and its backward pass over many workers.

Functions here take and return ``dask.array`` arrays and accept the options of
the single-machine calls.  The chunks of the inputs choose the sharding
(``docs/distributed.md``):

* chunks along ``*batch`` and ``H`` (GQA groups kept whole): **batch/head
  sharding**, every core, one task per block, no data movement between
  blocks (:mod:`refattn.distributed.heads`);
* :func:`sdpa` also takes chunks along ``S`` (**key/value sharding**: partial
  outputs merged exactly by log-sum-exp in a tree) and ``L`` (**query
  sharding**; causal masking schedules no task above the diagonal)
  (:mod:`refattn.distributed.sequence`);
* :func:`apply` / :func:`vjp` of ``elementwise_attention(..., order=t)`` with
  chunks along ``L`` or ``S``: the **chunked scan** of the Taylor form (key
  moments scanned across chunks, diagonal tiles by the backend)
  (:mod:`refattn.distributed.scan`);
* :func:`vjp` of an :class:`refattn.Attention` layer: **data parallel** over
  batch chunks, parameter gradients tree-reduced (:mod:`refattn.distributed.layers`).

Every block runs the best local backend for its chunk type (numba for NumPy
chunks, cupy for CuPy chunks).  The same graphs run on the threaded
scheduler, a ``distributed.LocalCluster`` or a real cluster.

Shape legend: ``*batch`` batch axes, ``H`` query heads, ``Hkv`` kv heads,
``L`` queries, ``S`` keys, ``E`` features, ``Ev`` value features.

Examples
--------
>>> import numpy as np, dask, dask.array as da, refattn
>>> from refattn import distributed as rd
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((2, 4, 64, 8)) for _ in range(3))
>>> dq, dk, dv = (da.from_array(x, chunks=(1, 4, 16, 8)) for x in (q, k, v))
>>> o = rd.sdpa(dq, dk, dv, causal=True)        # 2 x 4 x 4 blocks, 20 above the diagonal skipped
>>> bool(np.allclose(o.compute(scheduler="threads"), refattn.sdpa(q, k, v, causal=True)))
True
>>> o, pullback = rd.vjp(refattn.sdpa, dq, dk, dv, causal=True)
>>> grads = pullback(da.ones_like(o))
>>> [g.chunksize for g in grads]
[(1, 4, 16, 8), (1, 4, 16, 8), (1, 4, 16, 8)]
"""

from __future__ import annotations

try:
    import dask.array  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("refattn.distributed needs Dask: pip install 'refattn[distributed]' "
                      f"(dask[array] and distributed); {exc}") from exc

from .._validate import reject_framework_keywords
from ..cores.sdpa import sdpa as _single_sdpa
from ..layers import Attention
from .geometry import block_band, block_visibility
from .heads import apply_heads, core_of, vjp_heads
from .layers import attention_forward, attention_vjp
from .merge import merge_partials
from .scan import taylor_scan_forward, taylor_scan_vjp, wants_scan
from .sequence import check_options, sdpa_sharded, sdpa_vjp_sharded

__all__ = [
    "apply",
    "attention",
    "block_band",
    "block_visibility",
    "merge_partials",
    "sdpa",
    "vjp",
]


@reject_framework_keywords
def sdpa(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
         dropout_mask=None, dropout_p=0.0, window=None, softcap=None, alibi_slopes=None,
         rotary=None, rotary_base=10000.0, rotary_dim=None, rotary_q_offset=0,
         return_lse=False, return_probs=False, backend="auto", tiles=None, float32_math=None,
         empty_rows="zero", split_every=4, **unsupported):
    """:func:`refattn.sdpa` on dask arrays, sharded along ``*batch``, ``H``, ``L`` and ``S``.

    Parameters
    ----------
    q : dask array (..., H, L, E)
        Its batch, head and ``L`` chunks lead; head chunks must be multiples of
        ``G = H / Hkv`` (``ValueError`` otherwise).  The ``E`` axis is merged into one chunk.
    k, v : dask arrays (..., Hkv, S, E), (..., Hkv, S, Ev)
        Rechunked to ``q``'s batch chunks and head chunks ``/ G``; ``k``'s ``S``
        chunks are the key blocks (``v`` follows them).
    mask, bias, dropout_mask : arrays broadcastable to (..., H, L, S), optional
        NumPy or dask; chunked like the score blocks.
    alibi_slopes : array (H,) or (..., H), optional
        NumPy or dask; chunked like ``q``'s batch and head blocks.  Each block gives the
        backend the slopes and its distance offset (``docs/distributed.md``): no
        ``(L_i, S_j)`` array in the task.
    causal, causal_align, scale, dropout_p, window, softcap, rotary, rotary_base, rotary_dim, rotary_q_offset, backend, tiles, float32_math
        As :func:`refattn.sdpa`; positions (causal offset, window, ALiBi distances,
        rotary angles) are shifted into each block, and a block no pair of which the
        causal rule and the window keep gets no task.  ``backend`` is resolved per block
        (a block with non-finite or no data runs the reference, as the single-machine
        call routes).
    empty_rows : {"zero", "uniform", "nan"}
        What a row with no kept key in any block gives, as :func:`refattn.sdpa`:
        applied after the merge (``lse = -inf`` marks the row), with sums over every
        key block (:mod:`refattn.distributed.empty_rows`).
    return_lse : bool
        Also return the merged log-sum-exp ``(..., H, L)``.
    return_probs : bool
        Also return the probabilities ``P (..., H, L, S)`` before dropout (after ``lse``),
        chunked like the score blocks: ``O(L S)`` memory, one task per block.
    split_every : int >= 2
        Fan-in of the merge tree.
    **unsupported
        Packed sequences (``cu_seqlens_q`` ...) and unknown names: ``TypeError`` naming
        the argument.

    Returns
    -------
    o : dask array (..., H, L, Ev), chunked like ``q`` along ``*batch, H, L``
    lse : dask array (..., H, L), only with ``return_lse=True``
    probs : dask array (..., H, L, S), only with ``return_probs=True``
    """
    check_options(unsupported, "refattn.distributed.sdpa")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    return sdpa_sharded(q, k, v, mask=mask, bias=bias, causal=causal, causal_align=causal_align,
                        scale=scale, dropout_mask=dropout_mask, dropout_p=dropout_p,
                        window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                        rotary=rotary, rotary_base=rotary_base, rotary_dim=rotary_dim,
                        rotary_q_offset=rotary_q_offset, backend=backend, tiles=tiles,
                        float32_math=float32_math, empty_rows=empty_rows, return_lse=return_lse,
                        return_probs=return_probs, split_every=split_every)


def attention(layer, params, xq, xkv=None, mask=None, *, backend="auto"):
    """``layer(params, xq, xkv, mask)`` for an :class:`refattn.Attention` layer, data parallel.

    Parameters
    ----------
    layer : refattn.Attention
    params : dict of NumPy/CuPy arrays
        From ``layer.init()``; one graph key shared by every task.
    xq : dask array (..., L, d)
        One task per batch chunk; ``L`` and ``d`` are merged into one chunk.
    xkv : dask array (..., S, d), optional
        Rechunked to the batch chunks of ``xq``.
    mask : bool array broadcastable to (..., H, L, S), optional
    backend : str

    Returns
    -------
    y : dask array (..., L, d), chunked like ``xq``
    """
    return attention_forward(layer, params, xq, xkv, mask, backend=backend)


def apply(fn, q, k, v, **options):
    """``fn(q, k, v, **options)`` on dask arrays, for any refattn core function.

    Parameters
    ----------
    fn : refattn core function
        :func:`refattn.sdpa` goes to :func:`sdpa` (batch, head, query and key
        sharding); ``quaternion_attention``, ``elementwise_attention`` and
        ``preconditioned_sdpa`` are sharded along ``*batch`` and ``H`` (GQA groups
        whole), their ``L``, ``S`` and feature axes merged into one chunk each.
    q, k, v : dask arrays
        ``(..., H, L, E)``, ``(..., Hkv, S, E)``, ``(..., Hkv, S, Ev)`` (quaternion
        cores: ``(..., H, L, 4, d)`` etc.).
    **options
        The options of ``fn``; array options (``mask``, ``bias``, ``dropout_mask``)
        may be NumPy or dask arrays.

    Returns
    -------
    dask array(s)
        What ``fn`` returns (``(o, c)`` for ``preconditioned_sdpa(...,
        return_diagonal=True)``), chunked like ``q`` along ``*batch, H``.
    """
    if fn is _single_sdpa:
        return sdpa(q, k, v, **options)
    if wants_scan(fn, q, k, options):
        return taylor_scan_forward(q, k, v, **options)
    return apply_heads(fn, q, k, v, **options)


def vjp(fn, *arrays, split_every=4, **options):
    """:func:`refattn.vjp` on dask arrays: ``(out, pullback)``.

    Parameters
    ----------
    fn : refattn core function or refattn.Attention
        A core function is sharded as :func:`apply` shards it; a layer is data
        parallel over the batch chunks of ``xq``.
    *arrays
        ``q, k, v`` (dask arrays) for a core; ``params, xq[, xkv, mask]`` for a layer.
    split_every : int >= 2
        Fan-in of the merge and gradient-sum trees.
    **options
        The options of ``fn``.

    Returns
    -------
    out : dask array
    pullback : callable
        ``pullback(dout)`` (dask or NumPy/CuPy, the shape of ``out``) returns dask
        arrays: ``(dq, dk, dv[, dbias][, dalibi_slopes])`` for a core (in the options' own
        shape), ``(dparams, dxq[, dxkv])`` for a layer (``dparams`` a dict, each
        summed over the batch chunks in a tree).

    Notes
    -----
    Compute the output and the gradients together (``dask.compute(out, *grads)``):
    they share the forward tasks, which then run once.
    """
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    if isinstance(fn, Attention):
        return attention_vjp(fn, *arrays, split_every=split_every, **options)
    if fn is _single_sdpa:
        return sdpa_vjp_sharded(*arrays, split_every=split_every, **options)
    core_of(fn, options)
    if len(arrays) == 3 and wants_scan(fn, arrays[0], arrays[1], options):
        return taylor_scan_vjp(*arrays, **options)
    return vjp_heads(fn, *arrays, split_every=split_every, **options)
