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
    dslopes (b, h) = sum over blocks of the block's slope gradient   (a tree)

Position rules (causal, window, ALiBi distance) are shifted into block
coordinates and blocks no pair of which is kept get no task
(:mod:`refattn.distributed.geometry`).  Rotary embeddings rotate each chunk of
``q`` and ``k`` at its own positions before the blocks (and the gradients back
after them), the single-machine order.  Each block runs the SDPA backend
contract (:mod:`refattn.cores.sdpa.api`) of the best local backend
(:mod:`refattn.distributed._block_tasks`).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np
from dask.base import tokenize

from .._empty_rows import check_empty_rows
from .._masks import causal_offset, window_bounds
from .._validate import FRAMEWORK_ALIASES, check_float_array, check_same_dtype
from .._vjp import drop_output_only
from ..cores.sdpa import sdpa as _single_sdpa
from ..cores.sdpa.api import IMPLEMENTED
from ..rotary import apply_rotary, apply_rotary_backward
from ._block_tasks import (
    BlockSpec,
    backward_block,
    empty_partial,
    forward_block,
    probs_block,
    zeros_scores,
)
from ._cotangent import as_cotangent
from ._graph import (
    broadcast_grad,
    chunk_starts,
    new_array,
    sum_parts,
    tree_reduce,
    zeros_like_block,
)
from ._plan import SCORE_ARRAYS, as_dask, make_plan, probe_arrays
from .empty_rows import (
    adjusted_value_gradient,
    cotangent_for_kernels,
    filled_output,
    value_gradient_terms,
)
from .geometry import alibi_offset, block_band, block_visibility
from .merge import merge_partials

__all__ = [
    "PACKED_SEQUENCE_OPTIONS",
    "SDPA_OPTIONS",
    "block_visibility",
    "check_options",
    "sdpa_sharded",
    "sdpa_vjp_sharded",
]

#: Options of :func:`refattn.sdpa` that the sharded calls take (and mean the same).
SDPA_OPTIONS = ("mask", "bias", "causal", "causal_align", "scale", "dropout_mask", "dropout_p",
                "window", "softcap", "alibi_slopes", "rotary", "rotary_base", "rotary_dim",
                "rotary_q_offset", "backend", "tiles", "float32_math")

#: Packed / variable-length sequence arguments of FlashAttention varlen and JAX: refused by name.
PACKED_SEQUENCE_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                           "query_seq_lengths", "key_value_seq_lengths")


def check_options(options, call):
    """Raise ``TypeError`` naming the first option of ``options`` that ``call`` does not take.

    ``empty_rows`` is checked against :data:`refattn._empty_rows.EMPTY_ROWS` (``ValueError``).
    """
    for name in options:
        if name in SDPA_OPTIONS:
            continue
        if name == "empty_rows":
            check_empty_rows(options[name])
            continue
        if name in PACKED_SEQUENCE_OPTIONS:
            raise TypeError(
                f"{call}() got {name}=: packed or variable-length sequences (FlashAttention "
                "varlen cu_seqlens, JAX *_seq_lengths) are not supported on sharded calls, whose "
                "chunks would have to follow the sequence boundaries; express them as a mask= "
                "(block-diagonal for packing, key padding for lengths: sliced with the blocks, "
                "exact for any chunking) or put the sequences on a batch axis "
                "(docs/distributed.md)")
        if name in FRAMEWORK_ALIASES:
            raise TypeError(f"{call}() got {name}=, a PyTorch/JAX/FlashAttention keyword; "
                            f"refattn's is {FRAMEWORK_ALIASES[name]}")
        raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")


@dataclass
class _Blocks:
    """The visible blocks of a sharded SDPA call, their specs and the per-call extras."""

    plan: object
    token: str
    specs: dict          # (*bh, i, j) -> BlockSpec
    value_dim: int
    slopes: object = None         # dask (*batch|1, H), chunked like q's batch/head blocks
    slopes_ndim: int = 0
    rope: dict | None = None      # apply_rotary keywords
    q_offset: int = 0
    empty_rows: str = "zero"      # the policy (refattn._empty_rows)
    dropout_scale: float = 1.0    # 1 / (1 - p) with a dropout mask

    def rows(self):
        """Every ``(*bh, i)`` query-row block."""
        p = self.plan
        return list(np.ndindex(*p.q.numblocks[:p.nb + 2]))

    def keys_of(self, row):
        """Visible key blocks ``j`` of row block ``row``."""
        return [j for j in range(self.plan.k.numblocks[self.plan.nb + 1])
                if row + (j,) in self.specs]

    def slopes_key(self, bh):
        """Key of the slopes block that batch/head block ``bh`` reads (None without ALiBi)."""
        if self.slopes is None:
            return None
        nb = self.plan.nb
        return (self.slopes.name,) + tuple(b if n != 1 else 0 for b, n in
                                           zip(bh[:nb], self.slopes.shape[:nb])) + (bh[nb],)

    def inputs(self, index):
        """Keys of ``q_i, k_j, v_j``, the option blocks (mask, bias, dropout) and the slopes
        of block ``index = (*bh, i, j)``."""
        p = self.plan
        bh, i, j = index[:-2], index[-2], index[-1]
        opts = [p.option_block(n, index) if n in p.arrays else None for n in SCORE_ARRAYS]
        return ((p.q.name,) + bh + (i, 0), (p.k.name,) + bh + (j, 0),
                (p.v.name,) + bh + (j, 0), opts, self.slopes_key(bh))


def _slopes_array(slopes, plan):
    """ALiBi slopes ``(H,)`` or ``(*batch, H)`` as a dask array ``(*batch|1, H)`` chunked like
    ``q``'s batch (full axes) and head blocks; validated as the single-machine call does."""
    s, nb = plan.shapes, plan.nb
    check_float_array(slopes, "alibi_slopes")
    check_same_dtype(q=plan.q, alibi_slopes=slopes)
    if tuple(slopes.shape) not in ((s.heads,), (*s.batch, s.heads)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({s.heads},) or (*batch, H) = "
                         f"{(*s.batch, s.heads)}, got {tuple(slopes.shape)}")
    x = as_dask(slopes, "alibi_slopes")
    if x.ndim == 1:
        x = x[(None,) * nb]
    chunks = tuple(c if n != 1 else (1,) for c, n in zip(plan.q.chunks[:nb], x.shape[:nb]))
    return x.rechunk(chunks + (plan.q.chunks[nb],))


def _window(window, offset):
    """``(lo, hi)`` of a validated ``window`` option (one int: symmetric), or None."""
    if window is None:
        return None
    if isinstance(window, numbers.Integral):
        window = (window, window)
    return window_bounds((int(window[0]), int(window[1])), offset)


def _rotate_block(x, rope, start, axis, backward, block_info=None):
    first = start + block_info[0]["array-location"][axis][0]
    rotate = apply_rotary_backward if backward else apply_rotary
    return rotate(x, offset=first, **rope)


def _rotated(x, axis, start, rope, backward=False):
    """Each chunk of ``x`` rotated at its own positions ``start + (chunk start) + 0, 1, ...``."""
    return x.map_blocks(_rotate_block, rope=rope, start=start, axis=axis, backward=backward,
                        dtype=x.dtype, meta=x._meta)


def _make_blocks(q, k, v, options, call):
    check_options(options, call)
    policy = options.get("empty_rows", "zero")
    options = {n: x for n, x in options.items() if n != "empty_rows"}
    slopes = options.pop("alibi_slopes", None)
    plan = make_plan(q, k, v, options, feature_axes=1, shard_sequence=True)
    backend = plan.static.get("backend", "auto")
    (qp, kp, vp), arrays = probe_arrays(plan, IMPLEMENTED, backend)
    s = plan.shapes
    if s.kv_len == 0:
        policy = "zero"     # no keys at all: every policy gives o = 0 (refattn._empty_rows)
    slopes_ndim = 0
    if slopes is not None:
        slopes, slopes_ndim = _slopes_array(slopes, plan), len(slopes.shape)
        arrays["alibi_slopes"] = np.zeros((s.heads,), np.dtype(slopes.dtype))
    _single_sdpa(qp, kp, vp, **{**plan.static, **arrays, "backend": "reference"})
    nb = plan.nb
    rope, q_offset = None, int(options.get("rotary_q_offset", 0))
    if options.get("rotary") is not None:
        rope = {"base": options.get("rotary_base", 10000.0),
                "rotary_dim": options.get("rotary_dim"),
                "interleaved": options["rotary"] == "interleaved"}
        plan.q = _rotated(plan.q, nb + 1, q_offset, rope)
        plan.k = _rotated(plan.k, nb + 1, 0, rope)
    scale = options.get("scale")
    scale = 1.0 / math.sqrt(s.head_dim) if scale is None else float(scale)
    aligned = causal_offset(options.get("causal_align", "upper_left"), s.q_len, s.kv_len)
    offset = aligned if options.get("causal", False) else None
    window = _window(options.get("window"), aligned)
    softcap = None if options.get("softcap") is None else float(options["softcap"])
    drop_scale = 1.0 / (1.0 - float(options.get("dropout_p", 0.0))) \
        if options.get("dropout_mask") is not None else 1.0
    tiles = None if options.get("tiles") is None else tuple(int(t) for t in options["tiles"])
    common = {"scale": scale, "dropout_scale": drop_scale, "need_bias_grad": "bias" in plan.arrays,
              "backend": backend, "softcap": softcap, "tiles": tiles,
              "float32_math": options.get("float32_math"),
              "reference_on_cupy": bool(window or softcap or slopes is not None)}
    grid = {}
    for i, lr in enumerate(chunk_starts(plan.q.chunks[nb + 1])):
        for j, sr in enumerate(chunk_starts(plan.k.chunks[nb + 1])):
            visible, local_offset, local_window = block_band(lr, sr, offset, window)
            if not visible:
                continue
            grid[(i, j)] = BlockSpec(causal_offset=local_offset, window=local_window,
                                     alibi=slopes is not None,
                                     alibi_offset=alibi_offset(lr, sr, s.q_len, s.kv_len),
                                     **common)
    specs = {bh + ij: spec for bh in np.ndindex(*plan.q.numblocks[:nb + 1])
             for ij, spec in grid.items()}
    token = tokenize("sdpa", plan.q, plan.k, plan.v, sorted(plan.static.items()),
                     *(x.name for x in plan.arrays.values()),
                     None if slopes is None else slopes.name)
    token = tokenize(token, policy)
    return _Blocks(plan, token, specs, s.value_dim, slopes, slopes_ndim, rope, q_offset, policy,
                   drop_scale)


def _dependencies(blocks):
    p = blocks.plan
    return [p.q, p.k, p.v, *p.arrays.values()] + ([blocks.slopes] if blocks.slopes is not None
                                                   else [])


def _forward_graph(blocks, split_every):
    """``(o, lse)`` dask arrays of the merged forward pass."""
    p, t = blocks.plan, blocks.token
    nb = p.nb
    layer = {}
    part = f"sdpa-block-fwd-{t}"
    for index, spec in blocks.specs.items():
        qk, kk, vk, opts, sk = blocks.inputs(index)
        layer[(part,) + index] = (forward_block, qk, kk, vk, *opts, sk, spec)
    o_name, lse_name = f"sdpa-o-{t}", f"sdpa-lse-{t}"
    lse_layer = {}
    for row in blocks.rows():
        js = blocks.keys_of(row)
        if not js:
            root = (f"sdpa-empty-{t}",) + row
            layer[root] = (empty_partial, (p.q.name,) + row + (0,), blocks.value_dim)
        elif len(js) == 1:
            root = (part,) + row + (js[0],)
        else:
            root = tree_reduce(layer, (f"sdpa-merge-{t}",) + row,
                               [(part,) + row + (j,) for j in js], merge_partials, split_every)
        layer[(o_name,) + row + (0,)] = (operator.getitem, root, 0)
        lse_layer[(lse_name,) + row] = (operator.getitem, root, 1)
    o_chunks = tuple(p.q.chunks[:nb + 2]) + ((blocks.value_dim,),)
    o = new_array(o_name, layer, _dependencies(blocks), o_chunks, p.q, p.q.dtype)
    lse = new_array(lse_name, lse_layer, [o], tuple(p.q.chunks[:nb + 2]), p.q, p.q.dtype)
    return o, lse


def _probs_graph(blocks, lse):
    """``P (*batch, H, L, S)`` before dropout, one task per block (zeros where none is kept)."""
    p = blocks.plan
    nb = p.nb
    name = f"sdpa-probs-{blocks.token}"
    layer = {}
    for index in np.ndindex(*p.q.numblocks[:nb + 2], p.k.numblocks[nb + 1]):
        qk, kk, _, (mk, bk, _), sk = blocks.inputs(index)
        spec = blocks.specs.get(index)
        layer[(name,) + index] = (zeros_scores, qk, kk) if spec is None else \
            (probs_block, qk, kk, (lse.name,) + index[:-1], mk, bk, sk, spec)
    return new_array(name, layer, _dependencies(blocks) + [lse], p.scores_chunks(), p.q,
                     p.q.dtype)


def sdpa_sharded(q, k, v, *, return_lse=False, return_probs=False, split_every=4, **options):
    """SDPA on dask arrays chunked along ``*batch``, ``H``, ``L`` and ``S``; see
    :func:`refattn.distributed.sdpa`."""
    blocks = _make_blocks(q, k, v, options, "refattn.distributed.sdpa")
    o, lse = _forward_graph(blocks, split_every)
    if blocks.empty_rows != "zero":
        o = filled_output(blocks, o, lse, split_every)
    extra = (lse,) if return_lse else ()
    if return_probs:
        extra += (_probs_graph(blocks, lse),)
    return (o, *extra) if extra else o


def sdpa_vjp_sharded(q, k, v, *, split_every=4, **options):
    """``(o, pullback)`` of sharded SDPA; ``pullback(do) -> (dq, dk, dv[, dbias][, dslopes])``."""
    drop_output_only("sdpa", options, ("return_lse", "return_probs"))
    blocks = _make_blocks(q, k, v, options, "refattn.distributed.vjp")
    o, lse = _forward_graph(blocks, split_every)            # o: the kernels' convention
    out = o if blocks.empty_rows == "zero" else filled_output(blocks, o, lse, split_every)

    def pullback(do):
        do = as_cotangent(do, out)
        t = tokenize(o.name, do)
        part = f"sdpa-block-bwd-{t}"
        layer = {}
        do_kernel = do if blocks.empty_rows == "zero" else cotangent_for_kernels(blocks, do, lse,
                                                                                 t)
        for index, spec in blocks.specs.items():
            qk, kk, vk, opts, sk = blocks.inputs(index)
            row = index[:-1]
            layer[(part,) + index] = (backward_block, qk, kk, vk, (o.name,) + row + (0,),
                                      (lse.name,) + row, (do_kernel.name,) + row + (0,), *opts,
                                      sk, spec)
        deps = [o, lse, do] + ([do_kernel] if do_kernel is not do else [])
        return _gradients(blocks, layer, part, t, deps, split_every)

    return out, pullback


def _gradients(blocks, layer, part, t, deps, split_every):
    """Tree-sum the block gradients into ``dq`` (over key blocks), ``dk, dv`` (over query
    blocks), ``dbias`` and ``dslopes`` (over the blocks sharing each of their blocks)."""
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
    policy = blocks.empty_rows
    for n, like in ((1, p.k), (2, p.v)):
        name = f"sdpa-d{'kv'[n - 1]}-{t}"
        sub, sub_deps = {}, [dq]
        adjust = n == 2 and policy != "zero"           # the empty rows' share of dv
        if adjust:
            term, sub_deps = value_gradient_terms(blocks, sub, deps[2], deps[1], t, split_every)
            sub_deps = [dq] + sub_deps
        for col in np.ndindex(*like.numblocks[:nb + 2]):
            bh, j = col[:-1], col[-1]
            root = (name,) + col + (0,)
            kernel_root = (f"sdpa-dvk-{t}",) + col + (0,) if adjust else root
            parts = [(part,) + bh + (i, j) for i in range(n_rows) if bh + (i, j) in blocks.specs]
            if parts:
                sum_parts(sub, kernel_root, parts, n, split_every)
            else:
                sub[kernel_root] = (zeros_like_block, (like.name,) + col + (0,),
                                    _block_shape(like, col + (0,)), like.dtype)
            if adjust:
                adjusted_value_gradient(sub, root, policy, kernel_root, term(col))
        grads.append(new_array(name, sub, sub_deps, like.chunks, p.q, like.dtype))
    if blocks.rope is not None:            # the rotation is orthogonal: its pullback is R^T
        grads[0] = _rotated(grads[0], nb + 1, blocks.q_offset, blocks.rope, backward=True)
        grads[1] = _rotated(grads[1], nb + 1, 0, blocks.rope, backward=True)
    like_key = (p.q.name,) + (0,) * p.q.ndim
    if "bias" in p.arrays:
        bias = p.arrays["bias"]
        contributions = {}
        for index in blocks.specs:
            target = tuple(i if m != 1 else 0 for i, m in zip(index, bias.shape))
            contributions.setdefault(target, []).append(((part,) + index, 3))
        name, sub = f"sdpa-dbias-{t}", {}
        broadcast_grad(sub, name, contributions, bias.chunks, like_key, bias.dtype, split_every)
        grads.append(p.to_option_shape("bias", new_array(name, sub, [dq], bias.chunks, p.q,
                                                          bias.dtype)))
    if blocks.slopes is not None:
        slopes = blocks.slopes
        contributions = {}
        for index in blocks.specs:
            target = blocks.slopes_key(index[:-2])[1:]
            contributions.setdefault(target, []).append(((part,) + index, 4))
        name, sub = f"sdpa-dslopes-{t}", {}
        broadcast_grad(sub, name, contributions, slopes.chunks, like_key, slopes.dtype,
                       split_every)
        grad = new_array(name, sub, [dq], slopes.chunks, p.q, slopes.dtype)
        grads.append(grad[(0,) * nb] if blocks.slopes_ndim == 1 else grad)
    return tuple(grads)


def _block_shape(arr, index):
    return tuple(c[i] for c, i in zip(arr.chunks, index))
