"""SDPA reference backend: array-API code, exact, O(L S) memory.

Runs on NumPy, CuPy and any array-API array.  float16 inputs are computed in
float32 and the results cast back.  See ``docs/cores/sdpa.md`` for the
derivation of the backward pass.
"""

from __future__ import annotations

import array_api_compat

from ..._array import (expand_kv_heads, matrix_transpose, namespace, sum_head_groups,
                      upcast_half)
from ..._masks import alibi_distance, keep_mask, score_indices
from ..._softmax import (kept_matmul, masked_softmax, probs_from_lse, softmax_backward,
                         zero_unkept)
from ..._validate import check_bool_array, check_broadcastable, check_float_array


def reduce_kv_heads(xp, g, kv_heads: int):
    """Adjoint of :func:`expand_kv_heads`: ``(B, H, S, F) -> (B, kv_heads, S, F)``."""
    if g.shape[-3] == kv_heads:                  # no groups (also H = kv_heads = 0)
        return g
    return sum_head_groups(xp, g, g.shape[-3] // kv_heads)


def mask_mod_keep(xp, opts, shape, device):
    """``mask_mod(b, h, i, j)`` on every pair ``(B, H, L, S)`` ANDed with ``mask`` (or None)."""
    if opts.mask_mod is None:
        return opts.mask
    keep = opts.mask_mod(*score_indices(xp, *shape, device=device))
    check_bool_array(keep, "mask_mod(b, h, i, j)", hint=" (True = attend)")
    check_broadcastable(keep, "mask_mod(b, h, i, j)", shape, "(B, H, L, S)")
    return keep if opts.mask is None else xp.logical_and(opts.mask, keep)


def apply_score_mod(xp, fn, name, s, device):
    """``fn(s, b, h, i, j)`` checked to be a float array broadcastable to ``s (B, H, L, S)``."""
    out = fn(s, *score_indices(xp, *s.shape, device=device))
    check_float_array(out, f"{name}(score, b, h, i, j)")
    check_broadcastable(out, f"{name}(score, b, h, i, j)", tuple(s.shape), "(B, H, L, S)")
    return xp.broadcast_to(xp.astype(out, s.dtype), tuple(s.shape))


def _scores(xp, q, kh, opts):
    """Scores ``(B, H, L, S)``, the kept pairs, ``tanh`` of the capped scores (or None) and
    the scores before ``score_mod`` (or None without it).

    ``s = score_mod(cap(scale q k^T) + bias - slope |i + S - L - j|)`` with ``cap`` the
    soft-cap; the kept pairs combine mask, ``mask_mod``, causal rule, window and
    ``bias != -inf``.
    """
    raw = opts.scale * (q @ matrix_transpose(xp, kh))  # (B, H, L, S)
    return option_scores(xp, raw, opts, array_api_compat.device(q))


def _same(x):
    return x


def option_scores(xp, raw, opts, device, *, lift=_same, per_map=None):
    """The options on scaled scores ``raw (B, H, *maps, L, S)``: ``(s, keep, tanh,
    before_mod)`` as :func:`_scores` returns them.

    ``s = score_mod(cap(raw) + bias - slope |i + S - L - j|)``; the kept pairs (mask,
    ``mask_mod``, causal rule, window, ``bias != -inf``) are those of ``(B, H, L, S)``.
    Cores with several score maps per head (quaternion: ``(B, H, M, L, S)``) pass
    ``lift``, which gives a ``(B, H, L, S)``-broadcastable operand their map axis, and
    ``per_map(fn, s)``, which applies a ``(B, H, L, S)`` function to every map.
    """
    B, H, L, S = raw.shape[0], raw.shape[1], raw.shape[-2], raw.shape[-1]
    s, tanh = raw, None
    if opts.softcap is not None:
        tanh = xp.tanh(raw / opts.softcap)
        # a non-finite raw score stays non-finite (it poisons its row; tanh would hide it)
        s = xp.where(xp.isfinite(raw), opts.softcap * tanh, raw)
    bias = None if opts.bias is None else xp.astype(opts.bias, s.dtype)
    if bias is not None:
        s = s + lift(bias)
    if opts.alibi is not None:
        distance = alibi_distance(xp, L, S, s.dtype, device=device, offset=opts.alibi_offset)
        s = s - lift(xp.astype(opts.alibi, s.dtype)) * distance
    before_mod = None
    if opts.score_mod is not None:
        before_mod = s

        def mod(z):
            return apply_score_mod(xp, opts.score_mod, "score_mod", z, device)
        s = mod(s) if per_map is None else per_map(mod, s)
    keep = keep_mask(xp, mask_mod_keep(xp, opts, (B, H, L, S), device), opts.causal_offset,
                     L, S, device=device, bias=bias, window=opts.window)
    return s, (None if keep is None else lift(keep)), tanh, before_mod


def probabilities(q, k, lse, opts):
    """``P (B, H, L, S)`` before dropout, from the inputs and the saved ``lse`` of any backend."""
    xp = namespace(q, k)
    dtype = q.dtype
    q, k, lse = upcast_half(xp, q, k, lse)
    kh = expand_kv_heads(xp, k, q.shape[1] // max(k.shape[1], 1))
    s, keep, _, _ = _scores(xp, q, kh, opts)
    return xp.astype(probs_from_lse(xp, s, keep, lse), dtype)


def _dropout(xp, p, opts):
    if opts.dropout_mask is None:
        return p
    return xp.where(opts.dropout_mask, p * opts.dropout_scale, xp.zeros_like(p))


def _value_keep(keep, opts, xp):
    """Pairs whose value reaches the output: kept and not dropped."""
    if opts.dropout_mask is None:
        return keep
    return opts.dropout_mask if keep is None else xp.logical_and(keep, opts.dropout_mask)


def _transposed(xp, keep):
    return None if keep is None else matrix_transpose(xp, keep)


def forward(q, k, v, opts):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v = upcast_half(xp, q, k, v)
    group = q.shape[1] // max(k.shape[1], 1)   # H = Hkv = 0: no heads
    kh, vh = expand_kv_heads(xp, k, group), expand_kv_heads(xp, v, group)
    s, keep, _, _ = _scores(xp, q, kh, opts)
    p, lse = masked_softmax(xp, s, keep)
    o = kept_matmul(xp, _dropout(xp, p, opts), vh, _value_keep(keep, opts, xp))  # (B, H, L, Ev)
    return xp.astype(o, dtype), xp.astype(lse, dtype)


def backward(q, k, v, o, lse, do, opts):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v, o, lse, do = upcast_half(xp, q, k, v, o, lse, do)
    kv_heads = k.shape[1]
    group = q.shape[1] // max(kv_heads, 1)
    kh, vh = expand_kv_heads(xp, k, group), expand_kv_heads(xp, v, group)
    s, keep, tanh, before_mod = _scores(xp, q, kh, opts)
    p = probs_from_lse(xp, s, keep, lse)                          # (B, H, L, S)
    value_keep = _transposed(xp, _value_keep(keep, opts, xp))
    dv = kept_matmul(xp, matrix_transpose(xp, _dropout(xp, p, opts)), do, value_keep)  # (B, H, S, Ev)
    dp = _dropout(xp, do @ matrix_transpose(xp, vh), opts)        # (B, H, L, S)
    ds = softmax_backward(xp, p, dp, row_dot=xp.sum(do * o, axis=-1), keep=keep)
    if before_mod is not None:                                    # through score_mod
        ds = zero_unkept(xp, ds * apply_score_mod(xp, opts.score_mod_grad, "score_mod_grad",
                                             before_mod, array_api_compat.device(q)), keep)
    dslopes = None
    if opts.need_alibi_grad:                                      # d s / d slope = -|i + c - j|
        distance = alibi_distance(xp, s.shape[-2], s.shape[-1], s.dtype,
                                  device=array_api_compat.device(q), offset=opts.alibi_offset)
        dslopes = -xp.sum(ds * distance, axis=(-2, -1))            # (B, H)
    ds_raw = ds
    if tanh is not None:                                          # through the soft-cap
        ds_raw = zero_unkept(xp, ds * (1 - tanh * tanh), keep)
    dq = opts.scale * kept_matmul(xp, ds_raw, kh, keep)           # (B, H, L, E)
    dk = opts.scale * kept_matmul(xp, matrix_transpose(xp, ds_raw), q, _transposed(xp, keep))
    # dk (B, H, S, E)
    out = (dq, reduce_kv_heads(xp, dk, kv_heads), reduce_kv_heads(xp, dv, kv_heads))
    out = tuple(xp.astype(g, dtype) for g in out)
    return out + ((xp.astype(ds, dtype) if opts.need_bias_grad else None),
                  (None if dslopes is None else xp.astype(dslopes, dtype)))
