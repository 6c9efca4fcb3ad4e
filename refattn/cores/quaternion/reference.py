"""Quaternion attention reference backend: the explicit formulas (array API).

The score maps are built from the term table :func:`algebra.score_terms`
(``S_m = sum sign * Q_a K_b^T``, as ``docs/variants.md`` section 3 writes them),
grouped by query component: ``S_m = Qflat Kmix_m^T`` where each map mixes
signed KEY components (16 ``d`` multiplications per pair for Hamilton, 4 ``d``
for shared).  The kernel backends permute the QUERY components instead
(:mod:`.reduction`), so comparing the two checks the reduction.
See ``docs/cores/quaternion.md`` for the derivation of the backward pass.

Backend contract (batch-flattened, validated by :mod:`.api`)::

    forward(q, k, v, opts, mode) -> (o, saved)
        q (B, H, L, 4, d), k (B, Hkv, S, 4, d), v (B, Hkv, S, 4, dv), o (B, H, L, 4, dv)
    backward(saved, do, opts, mode) -> (dq, dk, dv, dscores, dslopes)
        dscores (B, H, L, S): gradient of a float bias (summed over the maps), or None
        dslopes (B, H): gradient of the ALiBi slopes (summed over the maps), or None

``opts`` is the :class:`refattn.cores.sdpa.api.SDPAOptions` of the equivalent SDPA
problem, so masks, bias, causal alignment, window, soft-cap, ALiBi and the
``mask_mod`` / ``score_mod`` functions mean exactly what they mean there, applied to
every score map (``docs/cores/quaternion.md``, "Options").
"""

from __future__ import annotations

import array_api_compat

from ..._array import matrix_transpose, namespace, upcast_half
from ..._masks import alibi_distance
from ..._softmax import (kept_matmul, masked_softmax, probs_from_lse, softmax_backward,
                         zero_unkept)
from ..sdpa.reference import (
    apply_score_mod,
    expand_kv_heads,
    option_scores,
    reduce_kv_heads,
)
from .algebra import n_maps, score_terms

__all__ = ["forward", "backward", "probabilities", "score_maps", "key_mixes", "expand_heads"]


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


def key_mixes(xp, kh, mode):
    """The keys each score map reads: ``(B, H, S, 4, d) -> (B, H, M, S, 4d)``.

    Grouping the terms of map ``m`` by query component, ``S_m = sum_a Q_a Kmix_(m,a)^T``
    with ``Kmix_(m,a) = sum over terms (a, b, m, sign) of sign * K_b``; so
    ``S_m = Qflat Kmix_m^T`` with the ``[r | i | j | k]`` flat layout.
    """
    maps = n_maps(mode)
    mixes = [[None] * 4 for _ in range(maps)]
    for a, b, m, sign in score_terms(mode):
        term = kh[..., b, :] if sign > 0 else -kh[..., b, :]               # (B, H, S, d)
        mixes[m][a] = term if mixes[m][a] is None else mixes[m][a] + term
    B, H, S, _, d = kh.shape
    return xp.stack([xp.reshape(xp.stack(mix, axis=-2), (B, H, S, 4 * d)) for mix in mixes],
                    axis=2)                                                 # (B, H, M, S, 4d)


def _key_mixes_adjoint(xp, dmix, mode):
    """Adjoint of :func:`key_mixes`: ``(B, H, M, S, 4d) -> (B, H, S, 4, d)``."""
    B, H, M, S, f = dmix.shape
    dmix = xp.reshape(dmix, (B, H, M, S, 4, f // 4))
    dk = [None] * 4
    for a, b, m, sign in score_terms(mode):
        term = dmix[:, :, m, :, a, :] if sign > 0 else -dmix[:, :, m, :, a, :]   # (B, H, S, d)
        dk[b] = term if dk[b] is None else dk[b] + term
    return xp.stack(dk, axis=-2)


def _flat(xp, x):
    return xp.reshape(x, (*x.shape[:-2], 4 * x.shape[-1]))                 # (..., 4f)


def score_maps(xp, q, kh, mode):
    """Unscaled score maps ``(B, H, M, L, S)``: ``S_m = sum_terms sign * Q_a K_b^T``.

    ``q (B, H, L, 4, d)``, ``kh (B, H, S, 4, d)`` (kv heads already expanded).
    """
    qf = xp.expand_dims(_flat(xp, q), axis=2)                              # (B, H, 1, L, 4d)
    return qf @ matrix_transpose(xp, key_mixes(xp, kh, mode))


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


def _scores(xp, q, kh, opts, mode):
    """Logits of every map ``(B, H, M, L, S)``, the kept pairs, ``tanh`` of the capped
    scores (or None) and the logits before ``score_mod`` (or None without it).

    Per map ``m``: ``Z_m = score_mod(cap(scale S_m) + bias - slope |i + S - L - j|)``, the
    options of :func:`refattn.sdpa` applied to each map's own score; the kept pairs (mask,
    ``mask_mod``, causal rule, window, ``bias != -inf``) are the same for every map.
    """
    raw = opts.scale * score_maps(xp, q, kh, mode)                       # (B, H, M, L, S)
    return option_scores(xp, raw, opts, array_api_compat.device(q),
                         lift=lambda x: _with_map_axis(xp, x),
                         per_map=lambda fn, s: _per_map(xp, fn, s))


def _per_map(xp, fn, x):
    """``fn`` on each map ``x[:, :, m]`` ``(B, H, L, S)`` of ``x (B, H, M, L, S)``, restacked."""
    return xp.stack([fn(x[:, :, m]) for m in range(x.shape[2])], axis=2)


def _probabilities_setup(xp, q, k, v, opts, mode):
    group = q.shape[1] // max(k.shape[1], 1)   # H = Hkv = 0: no heads
    kh, vh = expand_heads(xp, k, group), expand_heads(xp, v, group)
    return (kh, vh) + _scores(xp, q, kh, opts, mode)


def probabilities(q, k, opts, mode):
    """``P (B, H, M, L, S)``: every map's attention probabilities (0 where not kept).

    ``q (B, H, L, 4, d)``, ``k (B, Hkv, S, 4, d)``; evaluated afresh from the inputs.
    """
    xp = namespace(q, k)
    dtype = q.dtype
    q, k = upcast_half(xp, q, k)
    kh = expand_heads(xp, k, q.shape[1] // max(k.shape[1], 1))
    s, keep, _, _ = _scores(xp, q, kh, opts, mode)
    return xp.astype(masked_softmax(xp, s, keep)[0], dtype)


def _transposed(xp, keep):
    return None if keep is None else matrix_transpose(xp, keep)


def forward(q, k, v, opts, mode):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v = upcast_half(xp, q, k, v)
    kh, vh, s, keep, _, _ = _probabilities_setup(xp, q, k, v, opts, mode)
    p, lse = masked_softmax(xp, s, keep)                 # (B, H, M, L, S), (B, H, M, L)
    o = _from_value_groups(xp, kept_matmul(xp, p, _value_groups(xp, vh, n_maps(mode)), keep))
    # o (B, H, L, 4, dv)
    return xp.astype(o, dtype), (q, k, v, o, lse)


def backward(saved, do, opts, mode):
    q, k, v, o, lse = saved
    xp = namespace(q, k, v)
    dtype = do.dtype
    (do,) = upcast_half(xp, do)
    do = xp.astype(do, q.dtype)
    maps = n_maps(mode)
    kh, vh, s, keep, tanh, before_mod = _probabilities_setup(xp, q, k, v, opts, mode)
    p = probs_from_lse(xp, s, keep, lse)                                 # (B, H, M, L, S)
    vg, dog = _value_groups(xp, vh, maps), _value_groups(xp, do, maps)   # (B, H, M, S|L, 4dv/M)
    og = _value_groups(xp, o, maps)                                      # (B, H, M, L, 4dv/M)
    keep_t = _transposed(xp, keep)
    dvh = _from_value_groups(xp, kept_matmul(xp, matrix_transpose(xp, p), dog, keep_t))
    # dvh (B, H, S, 4, dv)
    dp = dog @ matrix_transpose(xp, vg)                                  # (B, H, M, L, S)
    ds = softmax_backward(xp, p, dp, row_dot=xp.sum(dog * og, axis=-1), keep=keep)
    # ds: d(logits) (B, H, M, L, S)
    device = array_api_compat.device(q)
    if before_mod is not None:                       # through score_mod, map by map
        grad = _per_map(xp, lambda z: apply_score_mod(xp, opts.score_mod_grad, "score_mod_grad",
                                                      z, device), before_mod)
        ds = zero_unkept(xp, ds * grad, keep)
    dslopes = None
    if opts.need_alibi_grad:                         # d Z_m / d slope = -|i + S - L - j|
        distance = alibi_distance(xp, s.shape[-2], s.shape[-1], s.dtype, device=device,
                                  offset=opts.alibi_offset)
        dslopes = -xp.sum(ds * distance, axis=(2, 3, 4))                # (B, H)
    ds_raw = ds if tanh is None else zero_unkept(xp, ds * (1 - tanh * tanh), keep)   # soft-cap
    # logits_m = cap(scale Qflat Kmix_m^T) + ...  =>  dQflat = scale sum_m dR_m Kmix_m,
    # dKmix_m = scale dR_m^T Qflat, and dK is dKmix pulled back through the mixing.
    dsc = opts.scale * ds_raw
    dqf = xp.sum(kept_matmul(xp, dsc, key_mixes(xp, kh, mode), keep), axis=2)   # (B, H, L, 4d)
    qf = xp.broadcast_to(xp.expand_dims(_flat(xp, q), axis=2),
                         (*q.shape[:2], ds.shape[2], q.shape[2], 4 * q.shape[-1]))
    dmix = kept_matmul(xp, matrix_transpose(xp, dsc), qf, keep_t)       # (B, H, M, S, 4d)
    kv_heads = k.shape[1]
    grads = (xp.reshape(dqf, q.shape),                                   # (B, H, L, 4, d)
             _reduce_heads(xp, _key_mixes_adjoint(xp, dmix, mode), kv_heads),  # (B, Hkv, S, 4, d)
             _reduce_heads(xp, dvh, kv_heads))                           # (B, Hkv, S, 4, dv)
    grads = tuple(xp.astype(g, dtype) for g in grads)
    # The bias is added to the logits of every map: its gradient sums the maps.
    dscores = xp.astype(xp.sum(ds, axis=2), dtype) if opts.need_bias_grad else None
    return grads + (dscores, None if dslopes is None else xp.astype(dslopes, dtype))
