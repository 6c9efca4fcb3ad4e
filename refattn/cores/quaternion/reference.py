"""Quaternion attention reference backend: the explicit formulas (array API).

The score maps are accumulated term by term from :func:`algebra.score_terms`,
exactly as ``VARIANTS.md`` section 3 writes them (16 products ``Q_a K_b^T`` for
Hamilton, 4 for shared); the kernel backends compute the same maps by a
different route (:mod:`.reduction`), so comparing the two checks the reduction.
See ``docs/cores/quaternion.md`` for the derivation of the backward pass.

Backend contract (batch-flattened, validated by :mod:`.api`)::

    forward(q, k, v, opts, mode) -> (o, saved)
        q (B, H, L, 4, d), k (B, Hkv, S, 4, d), v (B, Hkv, S, 4, dv), o (B, H, L, 4, dv)
    backward(saved, do, opts, mode) -> (dq, dk, dv, dscores)
        dscores (B, H, L, S): gradient of a float bias (summed over the maps), or None

``opts`` is the :class:`refattn.cores.sdpa.api.SDPAOptions` of the equivalent SDPA
problem, so masks, bias and causal alignment mean exactly what they mean there.
"""

from __future__ import annotations

import array_api_compat

from ..._array import matrix_transpose, namespace
from ..._masks import keep_mask
from ..._softmax import masked_softmax, probs_from_lse, softmax_backward
from ..sdpa.reference import _work, expand_kv_heads, reduce_kv_heads
from .algebra import n_maps, score_terms

__all__ = ["forward", "backward", "score_maps", "expand_heads"]


def expand_heads(xp, x, group: int):
    """GQA: ``(B, Hkv, S, 4, f) -> (B, Hkv * group, S, 4, f)`` (sdpa's rule, on flat features)."""
    B, Hkv, S, _, f = x.shape
    flat = expand_kv_heads(xp, xp.reshape(x, (B, Hkv, S, 4 * f)), group)   # (B, H, S, 4f)
    return xp.reshape(flat, (B, Hkv * group, S, 4, f))


def _reduce_heads(xp, g, kv_heads: int):
    """Adjoint of :func:`expand_heads`: ``(B, H, S, 4, f) -> (B, Hkv, S, 4, f)``."""
    B, H, S, _, f = g.shape
    flat = reduce_kv_heads(xp, xp.reshape(g, (B, H, S, 4 * f)), kv_heads)  # (B, Hkv, S, 4f)
    return xp.reshape(flat, (B, kv_heads, S, 4, f))


def score_maps(xp, q, kh, mode):
    """Unscaled score maps ``(B, H, M, L, S)``: ``S_m = sum_terms sign * Q_a K_b^T``.

    ``q (B, H, L, 4, d)``, ``kh (B, H, S, 4, d)`` (kv heads already expanded).
    """
    maps = [None] * n_maps(mode)
    for a, b, m, sign in score_terms(mode):
        term = q[..., a, :] @ matrix_transpose(xp, kh[..., b, :])     # (B, H, L, S)
        term = term if sign > 0 else -term
        maps[m] = term if maps[m] is None else maps[m] + term
    return xp.stack(maps, axis=2)


def _with_map_axis(xp, x):
    """A 4-D ``(B|1, H|1, L|1, S|1)`` mask or bias -> ``(B|1, H|1, 1, L|1, S|1)``."""
    if x is None or x.ndim < 4:
        return x
    return xp.expand_dims(x, axis=2)


def _value_groups(xp, x, maps: int):
    """``(B, H, S, 4, f) -> (B, H, M, S, (4/M) f)``: the value features each map weighs.

    Hamilton (``M = 4``): map ``c`` weighs component ``c``.  Shared (``M = 1``): the one
    map weighs all four components, flattened ``[r | i | j | k]``.
    """
    B, H, S, _, f = x.shape
    x = xp.reshape(x, (B, H, S, maps, (4 // maps) * f))                 # (B, H, S, M, 4f/M)
    return xp.permute_dims(x, (0, 1, 3, 2, 4))                           # (B, H, M, S, 4f/M)


def _from_value_groups(xp, x):
    """Inverse of :func:`_value_groups`: ``(B, H, M, L, (4/M) f) -> (B, H, L, 4, f)``."""
    B, H, M, L, g = x.shape
    x = xp.permute_dims(x, (0, 1, 3, 2, 4))                              # (B, H, L, M, 4f/M)
    return xp.reshape(x, (B, H, L, 4, (M * g) // 4))


def _probabilities_setup(xp, q, k, v, opts, mode):
    group = q.shape[1] // k.shape[1]
    kh, vh = expand_heads(xp, k, group), expand_heads(xp, v, group)
    s = opts.scale * score_maps(xp, q, kh, mode)                         # (B, H, M, L, S)
    if opts.bias is not None:
        s = s + xp.astype(_with_map_axis(xp, opts.bias), s.dtype)
    keep = keep_mask(xp, opts.mask, opts.causal_offset, q.shape[2], k.shape[2],
                     device=array_api_compat.device(q))
    return kh, vh, s, _with_map_axis(xp, keep)


def forward(q, k, v, opts, mode):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v = _work(xp, q, k, v)
    kh, vh, s, keep = _probabilities_setup(xp, q, k, v, opts, mode)
    p, lse = masked_softmax(xp, s, keep)                 # (B, H, M, L, S), (B, H, M, L)
    o = _from_value_groups(xp, p @ _value_groups(xp, vh, n_maps(mode)))   # (B, H, L, 4, dv)
    return xp.astype(o, dtype), (q, k, v, o, lse)


def backward(saved, do, opts, mode):
    q, k, v, o, lse = saved
    xp = namespace(q, k, v)
    dtype = do.dtype
    (do,) = _work(xp, do)
    do = xp.astype(do, q.dtype)
    maps = n_maps(mode)
    kh, vh, s, keep = _probabilities_setup(xp, q, k, v, opts, mode)
    p = probs_from_lse(xp, s, keep, lse)                                 # (B, H, M, L, S)
    vg, dog = _value_groups(xp, vh, maps), _value_groups(xp, do, maps)   # (B, H, M, S|L, 4dv/M)
    og = _value_groups(xp, o, maps)                                      # (B, H, M, L, 4dv/M)
    dvh = _from_value_groups(xp, matrix_transpose(xp, p) @ dog)          # (B, H, S, 4, dv)
    dp = dog @ matrix_transpose(xp, vg)                                  # (B, H, M, L, S)
    ds = softmax_backward(xp, p, dp, row_dot=xp.sum(dog * og, axis=-1))  # d(logits) (B, H, M, L, S)
    dq, dkh = [None] * 4, [None] * 4
    for a, b, m, sign in score_terms(mode):
        # logits_m = scale S_m + bias, S_m += sign Q_a K_b^T
        #   =>  dQ_a += scale sign dS_m K_b,  dK_b += scale sign dS_m^T Q_a  (scale applied below)
        gq = ds[:, :, m] @ kh[..., b, :]                                 # (B, H, L, d)
        gk = matrix_transpose(xp, ds[:, :, m]) @ q[..., a, :]            # (B, H, S, d)
        gq, gk = (gq, gk) if sign > 0 else (-gq, -gk)
        dq[a] = gq if dq[a] is None else dq[a] + gq
        dkh[b] = gk if dkh[b] is None else dkh[b] + gk
    kv_heads = k.shape[1]
    grads = (opts.scale * xp.stack(dq, axis=-2),                         # (B, H, L, 4, d)
             _reduce_heads(xp, opts.scale * xp.stack(dkh, axis=-2), kv_heads),  # (B, Hkv, S, 4, d)
             _reduce_heads(xp, dvh, kv_heads))                           # (B, Hkv, S, 4, dv)
    grads = tuple(xp.astype(g, dtype) for g in grads)
    # The bias is added to the logits of every map: its gradient sums the maps.
    dscores = xp.astype(xp.sum(ds, axis=2), dtype) if opts.need_bias_grad else None
    return grads + (dscores,)
