"""Packed (FlashAttention varlen) and padded (JAX) sequences: one kernel call for all of them
on numba and cupy, one core call per group of equal-length sequences otherwise.

Layouts (``docs/cores/sdpa.md``, "Packed and padded sequences")
---------------------------------------------------------------
packed
    ``q (Tq, H, E)``, ``k (Tk, Hkv, E)``, ``v (Tk, Hkv, Ev)``: the tokens of ``N``
    sequences concatenated (FlashAttention's ``flash_attn_varlen_func``), with
    ``cu_seqlens_q``, ``cu_seqlens_k`` of shape ``(N + 1,)``: sequence ``n`` owns the
    queries ``cu_seqlens_q[n] : cu_seqlens_q[n+1]`` and the keys
    ``cu_seqlens_k[n] : cu_seqlens_k[n+1]``.  Output ``o (Tq, H, Ev)``, ``lse (H, Tq)``;
    arrays shaped like the scores (``mask``, ``bias``, ``dropout_mask``, the
    probabilities) are ``(H, Tq, Tk)``.
padded
    The usual ``q (*batch, H, L, E)`` with ``query_seq_lengths`` and/or
    ``key_value_seq_lengths`` of shape ``batch`` (``jax.nn.dot_product_attention``):
    batch element ``b`` has the queries ``0 : Lq[b]`` and the keys ``0 : Lk[b]``; the
    padded query rows give ``o = 0`` and receive no gradient.

The numba and cupy kernels map their work onto the sequences themselves: they get the whole
4-D view in one call (``fused_core`` of :func:`forward`), with a :class:`SequenceLayout` in
``SDPAOptions.sequences`` (spans of ``(b, q0, q1, k0, k1)`` per sequence), so that a call
of ``N`` sequences of any lengths is one kernel launch per pass, with no copies of rows and
no pair outside a sequence visited (numba: :func:`refattn.cores.sdpa.numba.span_table`;
cupy: ``sdpa.cu``).

The kernels also take ``mask_mod`` / ``score_mod`` (numba always, cupy given CUDA
expressions, :func:`refattn.cuda_expression`), which see the sequence's index as ``b`` and
positions within it as ``i``, ``j``.  Otherwise (the reference backend; cupy with functions
without CUDA expressions, which see a sequence's own ``b, i, j`` and run on the reference;
``rotary``, an ``empty_rows`` policy other than ``"zero"``, inputs that the non-finite policy sends to the reference), the
sequences of equal ``(queries, keys)`` lengths are stacked into one batched call of the core
(copies of their rows: ``O(L)``); the fused backends then keep ``O(L)`` memory and never
visit a pair outside the block diagonal either, at the cost of one core call per distinct
length pair.  Either way the causal rule, the window, ALiBi and rotary positions count from
the start of each sequence.  ``refattn.bench.sdpa_varlen`` measures the numba path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from ..._array import (
    as_batched_4d,
    flatten_batch,
    namespace,
    product,
    sum_to_shape,
    to_numpy,
)
from ...backends import needs_exact_path
from ..._validate import (
    attention_shapes,
    check_array,
    check_bool_array,
    check_broadcastable,
    check_cotangent,
    check_float_array,
    check_same_dtype,
)

__all__ = [
    "SegmentedResiduals",
    "SequenceLayout",
    "Span",
    "backward",
    "forward",
    "groups",
    "is_segmented",
    "packed_spans",
    "padded_spans",
    "span_array",
]

@dataclass(frozen=True)
class Span:
    """One sequence: batch row ``b`` of the 4-D view, its index ``seq``, its query and key ranges."""

    b: int
    seq: int
    q0: int
    q1: int
    k0: int
    k1: int


@dataclass(frozen=True)
class SequenceLayout:
    """Packed or padded sequences handed whole to a backend that maps its blocks onto them.

    Attributes
    ----------
    spans : int64 array (N, 5)
        Per sequence ``n``: ``(b, q0, q1, k0, k1)``, its batch row of the 4-D view and its
        query and key rows (:func:`span_array`).
    causal, lower_right : bool
        The causal rule and its alignment, applied within each sequence (offset
        ``k1 - k0 - (q1 - q0)`` when lower-right, else 0).
    window : (int, int) or None
        FlashAttention's ``(left, right)`` (``-1`` unbounded) relative to that offset.
    """

    spans: Any
    causal: bool
    lower_right: bool
    window: tuple | None


def span_array(spans) -> np.ndarray:
    """The spans as an int64 ``(N, 5)`` array of ``(b, q0, q1, k0, k1)``."""
    return np.array([(s.b, s.q0, s.q1, s.k0, s.k1) for s in spans], dtype=np.int64).reshape(-1, 5)


def is_segmented(cu_seqlens_q=None, cu_seqlens_k=None, query_seq_lengths=None,
                 key_value_seq_lengths=None) -> bool:
    """Whether a call names packed or padded sequences."""
    return any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, query_seq_lengths,
                                       key_value_seq_lengths))


def _host_ints(x, name: str) -> np.ndarray:
    """``x`` (an integer array of any library, or a sequence of ints) as int64 NumPy."""
    if array_api_compat.is_array_api_obj(x):
        a = to_numpy(x)
    elif isinstance(x, (list, tuple)):
        a = np.asarray(x)
    else:
        raise TypeError(f"{name} must be an integer array, got {type(x).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def packed_spans(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int) -> list[Span]:
    """The sequences of FlashAttention's ``cu_seqlens_q``, ``cu_seqlens_k`` ``(N + 1,)``.

    Each must start at 0, never decrease (a sequence may be empty) and end at the total
    token count of its side (``total_q``, ``total_k``).
    """
    cu = {}
    for name, x, total in (("cu_seqlens_q", cu_seqlens_q, total_q),
                           ("cu_seqlens_k", cu_seqlens_k, total_k)):
        a = _host_ints(x, name)
        if a.ndim != 1 or a.size < 1:
            raise ValueError(f"{name} must have shape (N + 1,) for N sequences, got "
                             f"{tuple(a.shape)}")
        if a[0] != 0:
            raise ValueError(f"{name} must start at 0, got {name}[0] = {int(a[0])}")
        steps = np.diff(a)
        if (steps < 0).any():
            n = int(np.argmax(steps < 0))
            raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), but "
                             f"{name}[{n + 1}] = {int(a[n + 1])} < {name}[{n}] = {int(a[n])}")
        if a[-1] != total:
            side = "q.shape[0]" if name.endswith("q") else "k.shape[0]"
            raise ValueError(f"{name} must end at the total token count {side} = {total}, got "
                             f"{name}[-1] = {int(a[-1])}")
        cu[name] = a
    cq, ck = cu["cu_seqlens_q"], cu["cu_seqlens_k"]
    if cq.size != ck.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"shapes ({cq.size},) and ({ck.size},)")
    return [Span(0, n, int(cq[n]), int(cq[n + 1]), int(ck[n]), int(ck[n + 1]))
            for n in range(cq.size - 1)]


def padded_spans(query_seq_lengths, key_value_seq_lengths, batch: tuple, q_len: int,
                 kv_len: int) -> list[Span]:
    """The sequences of JAX's ``query_seq_lengths``, ``key_value_seq_lengths`` (shape ``batch``).

    A missing side means full length; lengths must lie in ``[0, L]`` and ``[0, S]``.
    """
    lengths = {}
    for name, x, full, legend in (("query_seq_lengths", query_seq_lengths, q_len, "L"),
                                  ("key_value_seq_lengths", key_value_seq_lengths, kv_len, "S")):
        if x is None:
            lengths[name] = np.full(product(batch), full, np.int64)
            continue
        a = _host_ints(x, name)
        if tuple(a.shape) != tuple(batch):
            raise ValueError(f"{name} must have the batch shape {tuple(batch)} of q, got "
                             f"{tuple(a.shape)}")
        if a.size and (a.min() < 0 or a.max() > full):
            raise ValueError(f"{name} must lie in [0, {legend} = {full}], got values from "
                             f"{int(a.min())} to {int(a.max())}")
        lengths[name] = a.reshape(-1)
    lq, lk = lengths["query_seq_lengths"], lengths["key_value_seq_lengths"]
    return [Span(b, b, 0, int(lq[b]), 0, int(lk[b])) for b in range(lq.size)]


@dataclass
class SegmentedResiduals:
    """What the backward pass of a packed or padded call needs: one core residual per sequence.

    ``parts`` pairs each group of equal-length sequences (:func:`groups`) with the core
    residuals of its batched call; ``lse`` is
    ``(B, H, L)`` of the 4-D view (``-inf`` on rows outside every sequence, and on every row
    for a core whose residuals have no ``lse``: the quaternion cores, whose rows have one
    log-sum-exp per score map).
    """

    packed: bool
    xp: Any
    batch: tuple                    # the batch shape of the public arrays (() when packed)
    view: tuple                     # (B, H, Hkv, L, S, E, Ev) of the 4-D view
    o: Any                          # the public output
    lse: Any
    parts: list = field(default_factory=list)
    operand_shapes: dict = field(default_factory=dict)   # public and 4-D shapes of a bias
    slopes_shape: tuple | None = None                     # public shape of alibi_slopes
    slopes_rows: int = 1                                  # 1 for (H,) slopes, else per sequence
    # One call of a backend that maps its blocks onto the sequences (parts = [(spans,
    # residuals of the 4-D view)]); rerun gives grouped residuals on the reference backend
    # (for the probabilities).
    fused: bool = False
    rerun: Any = None               # () -> SegmentedResiduals, with fused

    def to_public(self, x4):
        """A 4-D ``(B, F, L, ...)`` view array in the public layout."""
        xp = self.xp
        if self.packed:                                     # (1, F, T, X) -> (T, F, X)
            return xp.permute_dims(x4[0], (1, 0, 2)) if x4.ndim == 4 else x4[0]
        return xp.reshape(x4, (*self.batch,) + tuple(x4.shape[1:]))

    def public_lse(self):
        """``lse`` as ``(H, Tq)`` (packed) or ``(*batch, H, L)``."""
        return self.lse[0] if self.packed else self.xp.reshape(self.lse, (*self.batch,)
                                                               + tuple(self.lse.shape[1:]))

    def probabilities(self, probs_of: Callable):
        """``P`` as ``(H, Tq, Tk)`` or ``(*batch, H, L, S)``; ``probs_of(q, k, lse, options)``."""
        if self.fused:                 # O(L S) anyway: recompute on the reference, per group
            return self.rerun().probabilities(probs_of)
        xp = self.xp
        B, H, _, L, S, _, _ = self.view
        p4 = xp.zeros((B, H, L, S), dtype=self.o.dtype, device=array_api_compat.device(self.o))
        for group, res in self.parts:
            p = probs_of(res.q, res.k, res.lse, res.options)            # (G, H, t, s)
            for g, span in enumerate(group):
                p4[span.b, :, span.q0:span.q1, span.k0:span.k1] = p[g]
        return p4[0] if self.packed else xp.reshape(p4, (*self.batch, H, L, S))


def _packed_view(xp, q, k, v):
    """``(T, H, E) -> (1, H, T, E)`` for each of q, k, v, after checking the packed shapes."""
    for name, x, legend in (("q", q, "(total_q, H, E)"), ("k", k, "(total_k, Hkv, E)"),
                            ("v", v, "(total_k, Hkv, Ev)")):
        check_array(x, name)
        if x.ndim != 3:
            raise ValueError(f"with cu_seqlens_q and cu_seqlens_k, {name} must have "
                             f"FlashAttention's packed shape {legend}, got {tuple(x.shape)}")
    return tuple(xp.permute_dims(x, (1, 0, 2))[None, ...] for x in (q, k, v))


def _slice4(x4, span, kv=False):
    """Rows of one sequence in a 4-D ``(B, F, T, X)`` view: ``(1, F, t, X)``."""
    lo, hi = (span.k0, span.k1) if kv else (span.q0, span.q1)
    return x4[span.b:span.b + 1, :, lo:hi]


def _operand_index(shape4, span):
    """Index of one sequence's block in a 4-D score operand ``(B|1, H|1, L|1, S|1)``."""
    b = span.b if shape4[0] > 1 else 0
    return (slice(b, b + 1), slice(None),
            slice(span.q0, span.q1) if shape4[2] > 1 else slice(None),
            slice(span.k0, span.k1) if shape4[3] > 1 else slice(None))


def _relabelled(fn, seq_ids, with_score):
    """``fn`` seeing sequence ``seq_ids[b]`` as ``b`` (batch row ``b`` of a group's call)."""
    if fn is None:
        return None
    if with_score:
        return lambda s, b, h, i, j: fn(s, seq_ids[b], h, i, j)
    return lambda b, h, i, j: fn(seq_ids[b], h, i, j)


def groups(spans) -> list[list[Span]]:
    """The non-empty sequences grouped by their ``(queries, keys)`` lengths, in order.

    The sequences of a group are stacked into one batched core call.  A sequence without
    queries, or without keys (its rows give 0), needs no call.
    """
    by_shape: dict[tuple, list[Span]] = {}
    for span in spans:
        if span.q1 > span.q0 and span.k1 > span.k0:
            by_shape.setdefault((span.q1 - span.q0, span.k1 - span.k0), []).append(span)
    return list(by_shape.values())


def _stack(xp, x4, group, kv=False):
    """The group's rows of a 4-D ``(B, F, T, X)`` view stacked: ``(G, F, t, X)``."""
    if len(group) == 1:
        return _slice4(x4, group[0], kv)
    return xp.concat([_slice4(x4, span, kv) for span in group], axis=0)


def _operand_blocks(xp, x4, group):
    """A score operand's blocks for the group: ``(G | 1, H|1, t|1, s|1)``."""
    if x4.shape[0] == 1 and x4.shape[2] == 1 and x4.shape[3] == 1:
        return x4                                    # the same for every sequence
    return xp.concat([x4[_operand_index(x4.shape, span)] for span in group], axis=0)


def _check_slopes(slopes, q, heads, rows_legend, rows):
    """ALiBi slopes ``(H,)`` or ``(rows, H)`` as ``(1 | rows, H)``."""
    check_float_array(slopes, "alibi_slopes")
    check_same_dtype(q=q, alibi_slopes=slopes)
    if tuple(slopes.shape) not in ((heads,), (*rows, heads)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or ({rows_legend}, H) = "
                         f"{(*rows, heads)}, got {tuple(slopes.shape)}")
    return namespace(slopes).reshape(slopes, (product(rows) if slopes.ndim > 1 else 1, heads))


def forward(core_forward: Callable, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None,
            query_seq_lengths=None, key_value_seq_lengths=None, mask=None, bias=None,
            dropout_mask=None, alibi_slopes=None, mask_mod=None, score_mod=None,
            score_mod_grad=None, fused_core: Callable | None = None, **options):
    """``(o, SegmentedResiduals)``: ``core_forward(q, k, v, **options)`` once per group of
    sequences.

    With ``fused_core``, one call ``fused_core(q4, k4, v4, operands, slopes, spans,
    **options, mask_mod=, score_mod=, score_mod_grad=) -> (o4, residuals)`` on the 4-D view
    instead: ``operands`` the 4-D mask, bias and dropout mask, ``slopes`` ``(1 | N, H)`` or
    None (numba, and cupy with CUDA expressions of the functions).  Either way the functions
    see sequence ``n`` as ``b`` and positions counted from its start.
    """
    arguments = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                     query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths, mask=mask, bias=bias,
                     dropout_mask=dropout_mask, alibi_slopes=alibi_slopes, mask_mod=mask_mod,
                     score_mod=score_mod, score_mod_grad=score_mod_grad, **options)
    mods = dict(mask_mod=mask_mod, score_mod=score_mod, score_mod_grad=score_mod_grad)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (query_seq_lengths is not None or key_value_seq_lengths is not None):
        raise ValueError("pass cu_seqlens_q/cu_seqlens_k (packed tokens) or query_seq_lengths/"
                         "key_value_seq_lengths (padded batch), not both")
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k go together (FlashAttention varlen); "
                         f"{missing} is missing")
    xp = namespace(q, k, v)
    if fused_core is None and (mask_mod is not None or score_mod is not None):
        # per group of sequences the functions see them relabelled through Python closures,
        # which the numba kernels cannot compile: evaluate them as array functions (the
        # fused numba and cupy cores pass each sequence's number and start to the functions
        # themselves)
        options["backend"] = "reference"
    if packed:
        q4, k4, v4 = _packed_view(xp, q, k, v)
        shapes = attention_shapes(q4, k4, v4)
        batch: tuple = ()
        spans = packed_spans(cu_seqlens_q, cu_seqlens_k, shapes.q_len, shapes.kv_len)
        scores, legend = tuple(shapes.scores[1:]), "(H, total_q, total_k)"
        rows, rows_legend = (len(spans),), "N sequences"
    else:
        shapes = attention_shapes(q, k, v)
        batch = shapes.batch
        q4, k4, v4 = (flatten_batch(xp, x, batch) for x in (q, k, v))
        spans = padded_spans(query_seq_lengths, key_value_seq_lengths, batch, shapes.q_len,
                             shapes.kv_len)
        scores, legend = shapes.scores, "(..., H, L, S)"
        rows, rows_legend = batch, "*batch"
    operands = {"mask": mask, "bias": bias, "dropout_mask": dropout_mask}
    four = {}
    for name, x in operands.items():
        if x is None:
            continue
        (check_float_array if name == "bias" else check_bool_array)(x, name)
        check_broadcastable(x, name, scores, legend)
        four[name] = as_batched_4d(xp, x, batch)
    slopes2 = None if alibi_slopes is None else _check_slopes(alibi_slopes, q, shapes.heads,
                                                             rows_legend, rows)
    B, L = q4.shape[0], shapes.q_len
    device = array_api_compat.device(q)
    o4 = xp.zeros((B, shapes.heads, L, shapes.value_dim), dtype=q.dtype, device=device)
    lse4 = xp.full((B, shapes.heads, L), -xp.inf, dtype=q.dtype, device=device)
    res = SegmentedResiduals(packed, xp, batch, (B, shapes.heads, shapes.kv_heads, L,
                                                 shapes.kv_len, shapes.head_dim,
                                                 shapes.value_dim), None, lse4)
    if bias is not None:
        res.operand_shapes = {"bias": tuple(bias.shape), "bias4": tuple(four["bias"].shape)}
    if slopes2 is not None:
        res.slopes_shape, res.slopes_rows = tuple(alibi_slopes.shape), slopes2.shape[0]
    if fused_core is not None:
        o4, part = fused_core(q4, k4, v4, four, slopes2, spans, **options, **mods)
        res.fused = True
        res.rerun = lambda: forward(core_forward, q, k, v, **{**arguments,
                                                              "backend": "reference"})[1]
        res.lse = xp.astype(part.lse, lse4.dtype)
        res.parts.append((spans, part))
        res.o = res.to_public(o4)
        return res.o, res
    for group in groups(spans):
        extra = {name: _operand_blocks(xp, x4, group) for name, x4 in four.items()}
        ids = np.array([span.seq for span in group])
        if slopes2 is not None:
            extra["alibi_slopes"] = (slopes2[0] if slopes2.shape[0] == 1
                                     else xp.take(slopes2, xp.asarray(ids, device=device), axis=0))
        seq_ids = xp.asarray(ids, device=device)
        o_g, part = core_forward(_stack(xp, q4, group), _stack(xp, k4, group, True),
                                 _stack(xp, v4, group, True), **options, **extra,
                                 mask_mod=_relabelled(mask_mod, seq_ids, False),
                                 score_mod=_relabelled(score_mod, seq_ids, True),
                                 score_mod_grad=_relabelled(score_mod_grad, seq_ids, True))
        lse_g = getattr(part, "lse", None)    # None: a core without a per-row lse (quaternion)
        for g, span in enumerate(group):
            o4[span.b, :, span.q0:span.q1] = o_g[g]
            if lse_g is not None:
                lse4[span.b, :, span.q0:span.q1] = xp.astype(lse_g[g], lse4.dtype)
        res.parts.append((group, part))
    res.o = res.to_public(o4)
    return res.o, res


def backward(core_backward: Callable, res: SegmentedResiduals, do):
    """``(dq, dk, dv)``, then ``dbias`` with a bias, then ``dalibi_slopes`` with ALiBi slopes.

    ``core_backward(residuals, do)`` runs once per sequence; the gradients are scattered
    back into the public layout (zeros outside every sequence).
    """
    xp = res.xp
    legend = "(total_q, H, Ev)" if res.packed else "(..., H, L, Ev)"
    check_cotangent(do, tuple(res.o.shape), legend, like=res.o)
    if res.fused and needs_exact_path(xp, (do,)):
        # the non-finite policy wants the reference backend, which runs per group
        return backward(core_backward, res.rerun(), do)
    do = xp.astype(do, res.o.dtype)
    do4 = (xp.permute_dims(do, (1, 0, 2))[None, ...] if res.packed
           else flatten_batch(xp, do, res.batch))
    B, H, Hkv, L, S, E, Ev = res.view
    dtype, device = res.o.dtype, array_api_compat.device(res.o)
    dq4 = xp.zeros((B, H, L, E), dtype=dtype, device=device)
    dk4 = xp.zeros((B, Hkv, S, E), dtype=dtype, device=device)
    dv4 = xp.zeros((B, Hkv, S, Ev), dtype=dtype, device=device)
    has_bias = "bias" in res.operand_shapes
    dbias4 = (xp.zeros(res.operand_shapes["bias4"], dtype=dtype, device=device) if has_bias
              else None)
    dslopes = (xp.zeros((res.slopes_rows, H), dtype=dtype, device=device)
               if res.slopes_shape is not None else None)
    if res.fused:                  # one call on the whole view: gradients in the view's layout
        (_, part), = res.parts
        grads = core_backward(part, do4)
        dq4, dk4, dv4 = grads[:3]
        if dbias4 is not None:
            dbias4 = grads[3]
        if dslopes is not None:
            dslopes = grads[-1]                                   # (1 | N, H)
        return _public_gradients(res, dq4, dk4, dv4, dbias4, dslopes)
    for group, part in res.parts:
        grads = core_backward(part, _stack(xp, do4, group))
        shared_bias = dbias4 is not None and tuple(grads[3].shape) == tuple(dbias4.shape) \
            and len(group) > 1 and dbias4.shape[0] == 1 and dbias4.shape[2:] == (1, 1)
        if shared_bias:                          # one operand served the whole group
            dbias4 = dbias4 + grads[3]
        for g, span in enumerate(group):
            dq4[span.b, :, span.q0:span.q1] = grads[0][g]
            dk4[span.b, :, span.k0:span.k1] = grads[1][g]
            dv4[span.b, :, span.k0:span.k1] = grads[2][g]
            if dbias4 is not None and not shared_bias:
                at = _operand_index(dbias4.shape, span)
                block = grads[3] if len(group) == 1 else grads[3][g:g + 1]
                dbias4[at] = dbias4[at] + block
            if dslopes is not None and res.slopes_rows > 1:
                dslopes[span.seq:span.seq + 1] = (dslopes[span.seq:span.seq + 1]
                                                  + xp.reshape(grads[-1][g], (1, H)))
        if dslopes is not None and res.slopes_rows == 1:
            dslopes = dslopes + xp.reshape(grads[-1], (1, H))
    return _public_gradients(res, dq4, dk4, dv4, dbias4, dslopes)


def _public_gradients(res, dq4, dk4, dv4, dbias4, dslopes):
    """The view's gradients in the public layout: ``(dq, dk, dv[, dbias][, dslopes])``."""
    xp = res.xp
    out: tuple[Any, ...] = (res.to_public(dq4), res.to_public(dk4), res.to_public(dv4))
    if dbias4 is not None:
        lead = res.batch if dbias4.shape[0] > 1 else (1,) * len(res.batch)
        full = xp.reshape(dbias4, (*lead,) + tuple(dbias4.shape[1:]))
        out += (sum_to_shape(xp, full, res.operand_shapes["bias"]),)
    if dslopes is not None:
        out += (xp.reshape(dslopes, res.slopes_shape),)
    return out
