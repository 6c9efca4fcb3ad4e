"""Element-wise attention, reference backend: array-API code (NumPy, CuPy, array-api-strict).

Implements the backend contract of :mod:`refattn.cores.elementwise.api` on
batch-flattened arrays whose queries and keys are already multiplied by
``sqrt(scale)`` (``psi``, ``kappa``), so every formula here is scale-free:

* exact form: a per-channel masked softmax of the scores ``-(psi_i - kappa_j)^2``
  (reusing :mod:`refattn._softmax`), O(L S D) memory;
* Taylor form: a blocked scan over the sequence.  Keys every query of a block
  sees are summarised in shifted moments ``A_n, B_n`` (prefix sums carried from
  block to block); the few keys a block sees only partly (the causal diagonal)
  are weighted pair by pair.  O(t L D) time for a fixed block, O(t D) state,
  never an ``L x S x D`` array.  The backward pass recomputes the forward scan
  for ``dq`` and runs the reversed scan (suffix sums over queries) for ``dk, dv``.

The underflow guard (see ``docs/cores/elementwise.md``): each row's weights
are multiplied by ``exp(m_i)``, ``m_i`` the smallest ``kappa_j^2`` the row
sees, which cancels in the ratio; all exponents are then ``<= 0`` and the
denominator is at least ``min_x T_t(x) > 0`` for a row with a key.
"""

from __future__ import annotations

from ..._array import matrix_transpose, namespace, upcast_half
from ..._masks import keep_mask
from ..._softmax import masked_softmax, probs_from_lse, softmax_backward
from ..sdpa.reference import expand_kv_heads, reduce_kv_heads
from .taylor import TAYLOR_BLOCK, taylor_coefficients

__all__ = ["forward", "backward", "state_update", "state_read"]



def _channels_first(xp, x):
    """``(B, H, N, D) -> (B, H, D, N, 1)`` for per-channel pairwise arrays."""
    return matrix_transpose(xp, x)[..., None]


# -- exact form: a softmax per channel ------------------------------------------------------------

def _exact_scores(xp, q, kh, opts):
    """Scores ``-(psi_i - kappa_j)^2`` and ``psi_i - kappa_j`` ``(B, H, D, L, S)``, keep-mask."""
    diff = _channels_first(xp, q) - matrix_transpose(xp, kh)[..., None, :]   # (B, H, D, L, S)
    keep = keep_mask(xp, opts.mask, opts.causal_offset, q.shape[-2], kh.shape[-2])
    if keep is not None:
        keep = keep[..., None, :, :] if keep.ndim == 4 else keep                # (., ., 1, L, S)
    return -(diff * diff), diff, keep


def _exact_forward(xp, q, kh, vh, opts):
    s, _, keep = _exact_scores(xp, q, kh, opts)
    p, lse = masked_softmax(xp, s, keep)                                      # lse (B, H, D, L)
    o = xp.sum(p * matrix_transpose(xp, vh)[..., None, :], axis=-1)          # (B, H, D, L)
    return matrix_transpose(xp, o), matrix_transpose(xp, lse)


def _exact_backward(xp, q, kh, vh, o, lse, do, opts):
    s, diff, keep = _exact_scores(xp, q, kh, opts)
    p = probs_from_lse(xp, s, keep, matrix_transpose(xp, lse))              # (B, H, D, L, S)
    do_c = _channels_first(xp, do)                                          # (B, H, D, L, 1)
    v_c = matrix_transpose(xp, vh)[..., None, :]                            # (B, H, D, 1, S)
    ds = softmax_backward(xp, p, do_c * v_c, row_dot=matrix_transpose(xp, do * o))
    # d s_ij / d psi_i = -2 (psi_i - kappa_j) = -d s_ij / d kappa_j
    dq = matrix_transpose(xp, xp.sum(-2.0 * ds * diff, axis=-1))           # (B, H, L, D)
    dk = matrix_transpose(xp, xp.sum(2.0 * ds * diff, axis=-2))            # (B, H, S, D)
    dv = matrix_transpose(xp, xp.sum(p * do_c, axis=-2))                   # (B, H, S, D)
    return dq, dk, dv


# -- Taylor form: shared pieces -------------------------------------------------------------------

def _powers(xp, x, order):
    """``[x^0, ..., x^order]`` (a list: array-API arrays take no bare leading index)."""
    out = [xp.ones_like(x)]
    for _ in range(order):
        out.append(out[-1] * x)
    return out


def _horner(xp, coeffs, x):
    """``sum_n coeffs[n] x^n`` for Python-float ``coeffs``."""
    acc = xp.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def _decay(xp, m, x):
    """``exp(m - x)`` where both are finite (``m <= x`` by construction), else 0.

    ``+inf`` marks "no key" (an empty shift, a masked key), ``-inf`` an empty
    reverse shift; selecting before subtracting keeps ``inf - inf`` out.
    """
    finite = xp.isfinite(m) & xp.isfinite(x)
    zero = xp.zeros_like(m if m.ndim >= x.ndim else x)
    return xp.where(finite, xp.exp(xp.where(finite, m, zero) - xp.where(finite, x, zero)), zero)


def _key_squares(xp, kappa, key_keep):
    """``kappa^2`` with masked-out keys at ``+inf`` (they never set a shift nor get weight)."""
    k2 = kappa * kappa
    if key_keep is None:
        return k2
    return xp.where(key_keep, k2, xp.full_like(k2, xp.inf))


def _key_keep(xp, opts):
    """The key mask as ``(B|1, H|1, S|1, 1)`` (the Taylor form takes masks on keys only)."""
    if opts.mask is None:
        return None
    return matrix_transpose(xp, opts.mask)          # (B|1, H|1, 1, S|1) -> (B|1, H|1, S|1, 1)


def state_update(xp, state, kappa, v, k2, order):
    """Add keys ``kappa, v, k2 (..., n, D)`` (``k2 = kappa^2``, ``+inf`` = masked) to a state.

    ``state = (A, Bm, mu)`` with ``A, Bm (order + 1, ..., D)`` the shifted moments
    ``sum_j exp(mu - kappa_j^2) kappa_j^n (v_j | 1)`` and ``mu (..., D)`` their
    shift (``+inf`` while empty).  Returns the new state; O(t n D).
    """
    A, Bm, mu = state
    if kappa.shape[-2] == 0:
        return state
    new_mu = xp.minimum(mu, xp.min(k2, axis=-2))
    rescale = _decay(xp, new_mu, mu)                          # exp(new_mu - mu) <= 1
    e = _decay(xp, new_mu[..., None, :], k2)                  # (..., n, D), 0 for masked keys
    pw = xp.stack(_powers(xp, kappa, order), axis=0) * e      # (t+1, ..., n, D)
    A = A * rescale + xp.sum(pw * v, axis=-2)
    Bm = Bm * rescale + xp.sum(pw, axis=-2)
    return A, Bm, new_mu


def state_read(xp, state, psi, m, coeffs):
    """Numerator and denominator a state gives queries ``psi (..., n, D)`` with row shifts ``m``.

    Returns ``(N, Dn)`` each ``(..., n, D)``, scaled by ``exp(m_i)``:
    ``exp(m_i - mu) sum_n a_n psi^n (A_n | B_n)``.
    """
    A, Bm, mu = state
    f = _decay(xp, m, mu[..., None, :])                       # (..., n, D)
    c = _coefficient_powers(xp, coeffs, psi)                  # (t+1, ..., n, D)
    return f * xp.sum(c * A[..., None, :], axis=0), f * xp.sum(c * Bm[..., None, :], axis=0)


def _empty_state(xp, order, like):
    """Moments of no key for queries/keys like ``like (B, H, n, D)``."""
    shape = tuple(like.shape[:-2]) + (like.shape[-1],)
    zeros = xp.zeros((order + 1,) + shape, dtype=like.dtype)
    return zeros, zeros, xp.full(shape, xp.inf, dtype=like.dtype)


def _blocks(L, S, offset, block):
    """Query blocks ``[i0, i1)`` with the keys ``[p, e)`` the block sees partly.

    Query ``i`` sees key ``j`` iff ``j <= i + offset``; keys ``< p = i0 + offset + 1``
    are seen by every query of the block (they are in the carried moments), keys
    in ``[p, e)`` with ``e = i1 + offset`` by some.  Non-causal uses ``offset = S``.
    """
    clamp = lambda x: max(0, min(S, x))                        # noqa: E731
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        yield i0, i1, clamp(i0 + offset + 1), clamp(max(i0 + offset + 1, i1 + offset))


def _coefficient_powers(xp, coeffs, psi):
    """``(len(coeffs), *psi.shape)``: ``coeffs[n] psi^n``."""
    pw = _powers(xp, psi, len(coeffs) - 1)
    return xp.stack([coeffs[n] * pw[n] for n in range(len(coeffs))], axis=0)


def _visibility(xp, psi, kappa, k2, i0, p, offset):
    """Pairwise pieces of a block: ``y = psi_i kappa_j`` and who sees whom.

    ``psi (B, H, n, D)`` are queries ``i0 ...``, ``kappa, k2 (B, H, s, D)`` keys ``p ...``.
    Returns ``y (B, H, n, s, D)`` and ``vis`` (query ``i`` sees kept key ``j``).  With
    ``P(y) = sum_n a_n y^n = T_t(2 y)`` (``a_n = 2^n / n!``), ``P'(y) = 2 T_(t-1)(2 y)``,
    i.e. ``2 * horner(coeffs[:-1], y)``.
    """
    x = psi[..., :, None, :] * kappa[..., None, :, :]         # (B, H, n, s, D)
    n, s = psi.shape[-2], kappa.shape[-2]
    i = xp.reshape(xp.arange(i0, i0 + n), (n, 1, 1))
    j = xp.reshape(xp.arange(p, p + s), (1, s, 1))
    vis = (j <= i + offset) & xp.isfinite(k2[..., None, :, :])
    return x, vis


def _taylor_scan(xp, q, kh, vh, opts, backward_from=None):
    """Blocked scan over the queries; returns ``(o, m, den)``, each ``(B, H, L, D)``.

    ``m`` are the row shifts, ``den`` the shifted denominators (0 for a row with no
    key).  With ``backward_from = (r, o)`` (``r_i = do_i / den_i``) it returns ``dq``
    instead: the forward sweep of the backward pass, which needs the prefix moments.
    """
    order = opts.order
    coeffs = taylor_coefficients(order)
    dcoeffs = [n * coeffs[n] for n in range(1, order + 1)]    # d/dx sum a_n x^n, by x^(n-1)
    L, S = q.shape[-2], kh.shape[-2]
    offset = S if opts.causal_offset is None else opts.causal_offset
    block = L if opts.causal_offset is None else min(L, TAYLOR_BLOCK)
    k2_all = _key_squares(xp, kh, _key_keep(xp, opts))       # (B, H, S, D)
    state = _empty_state(xp, order, q)
    added = 0
    outs, shifts, dens = [], [], []
    for i0, i1, p, e in _blocks(L, S, offset, max(block, 1)):
        state = state_update(xp, state, kh[..., added:p, :], vh[..., added:p, :],
                             k2_all[..., added:p, :], order)
        added = p
        psi = q[..., i0:i1, :]                                # (B, H, n, D)
        x, vis = _visibility(xp, psi, kh[..., p:e, :], k2_all[..., p:e, :], i0, p, offset)
        k2v = xp.where(vis, k2_all[..., None, p:e, :], xp.full_like(x, xp.inf))
        row_min = xp.min(k2v, axis=-2) if e > p else xp.full_like(psi, xp.inf)
        m = xp.minimum(state[2][..., None, :], row_min)      # row shifts (B, H, n, D)
        w = _decay(xp, m[..., :, None, :], k2v)               # exp(m_i - kappa_j^2) (B, H, n, s, D)
        vj = vh[..., None, p:e, :]                            # (B, H, 1, s, D)
        if backward_from is None:
            num, den = state_read(xp, state, psi, m, coeffs)
            wt = w * _horner(xp, coeffs, x)
            num = num + xp.sum(wt * vj, axis=-2)
            den = den + xp.sum(wt, axis=-2)
            outs.append(num / xp.where(den > 0, den, xp.ones_like(den)))
            shifts.append(m)
            dens.append(den)
        else:
            r, o = backward_from[0][..., i0:i1, :], backward_from[1][..., i0:i1, :]
            A, Bm, mu = state
            f = _decay(xp, m, mu[..., None, :])
            dc = _coefficient_powers(xp, dcoeffs, psi)       # n a_n psi^(n-1), (t, B, H, n, D)
            pref = f * xp.sum(dc * (A[1:, ..., None, :] - o * Bm[1:, ..., None, :]), axis=0)
            # d w_ij / d psi_i = exp(m_i - kappa_j^2) kappa_j P'(psi_i kappa_j)
            dw = w * 2.0 * kh[..., None, p:e, :] * _horner(xp, coeffs[:-1], x)
            outs.append(r * (pref + xp.sum(dw * (vj - o[..., :, None, :]), axis=-2)))
    cat = lambda xs: xp.concat(xs, axis=-2) if xs else xp.zeros_like(q)   # noqa: E731 (L = 0)
    if backward_from is not None:
        return cat(outs)
    return cat(outs), cat(shifts), cat(dens)


def _taylor_backward_keys(xp, q, kh, vh, o, m, r, opts):
    """Reversed scan: ``dk, dv`` from suffix sums over queries (``r_i = do_i / den_i``)."""
    order = opts.order
    coeffs = taylor_coefficients(order)
    L, S = q.shape[-2], kh.shape[-2]
    offset = S if opts.causal_offset is None else opts.causal_offset
    block = L if opts.causal_offset is None else min(L, TAYLOR_BLOCK)
    k2_all = _key_squares(xp, kh, _key_keep(xp, opts))
    shape = tuple(q.shape[:-2]) + (q.shape[-1],)
    G = xp.zeros((order + 1,) + shape, dtype=q.dtype)         # sum_i a_n psi_i^n r_i exp(m_i - nu)
    Hs = xp.zeros((order + 1,) + shape, dtype=q.dtype)        # the same times o_i
    nu = xp.full(shape, -xp.inf, dtype=q.dtype)               # reverse shift: max m_i so far
    blocks = list(_blocks(L, S, offset, max(block, 1)))
    p_prev = [0] + [b[2] for b in blocks[:-1]]
    parts = []                                                # (a, b, dk rows, dv rows)
    for (i0, i1, p, e), p0 in zip(reversed(blocks), reversed(p_prev)):
        psi, mi = q[..., i0:i1, :], m[..., i0:i1, :]
        ri, oi = r[..., i0:i1, :], o[..., i0:i1, :]
        # pairwise part: keys [p, e) seen by some queries of this block
        x, vis = _visibility(xp, psi, kh[..., p:e, :], k2_all[..., p:e, :], i0, p, offset)
        k2v = xp.where(vis, k2_all[..., None, p:e, :], xp.full_like(x, xp.inf))
        rw = ri[..., :, None, :] * _decay(xp, mi[..., :, None, :], k2v)   # (B, H, n, s, D)
        kj, vj = kh[..., None, p:e, :], vh[..., None, p:e, :]
        T, dT = _horner(xp, coeffs, x), _horner(xp, coeffs[:-1], x)
        # d w_ij / d kappa_j = exp(m_i - kappa_j^2) (psi_i P'(y) - 2 kappa_j P(y))
        dwk = rw * (2.0 * psi[..., :, None, :] * dT - 2.0 * kj * T)
        parts.append((p, e, xp.sum(dwk * (vj - oi[..., :, None, :]), axis=-3),
                      xp.sum(rw * T, axis=-3)))
        # add this block's queries to the suffix sums, rescaled to the new shift
        finite = xp.isfinite(mi)
        new_nu = xp.maximum(nu, xp.max(xp.where(finite, mi, xp.full_like(mi, -xp.inf)), axis=-2))
        rescale = _decay(xp, -new_nu, -nu)                    # exp(nu - new_nu) <= 1
        cr = _coefficient_powers(xp, coeffs, psi) * (ri * _decay(xp, -new_nu[..., None, :], -mi))
        G = G * rescale + xp.sum(cr, axis=-2)
        Hs = Hs * rescale + xp.sum(cr * oi, axis=-2)
        nu = new_nu
        # keys [p0, p) joined the moments just before this block: every query from here on
        # sees them, and G, Hs now hold exactly those queries
        kap, vv, k2 = kh[..., p0:p, :], vh[..., p0:p, :], k2_all[..., p0:p, :]
        g = _decay(xp, nu[..., None, :], k2)                  # exp(nu - kappa_j^2) <= 1
        pw = _powers(xp, kap, order + 1)                      # kappa^0 .. kappa^(t+1)
        dv_pref = g * xp.sum(xp.stack(pw[:-1], axis=0) * G[..., None, :], axis=0)
        n_pw = xp.stack([xp.zeros_like(kap)] + [float(n) * pw[n - 1] for n in
                                                range(1, order + 1)], axis=0)   # n kappa^(n-1)
        # d/dkappa (exp(-kappa^2) kappa^n) = exp(-kappa^2) (n kappa^(n-1) - 2 kappa^(n+1))
        dpw = n_pw - 2.0 * xp.stack(pw[1:], axis=0)
        dk_pref = g * xp.sum(dpw * (vv * G[..., None, :] - Hs[..., None, :]), axis=0)
        parts.append((p0, p, dk_pref, dv_pref))
    dk, dv = xp.zeros_like(kh), xp.zeros_like(vh)
    for a, b, gk, gv in parts:
        dk, dv = _add_rows(xp, dk, dv, a, b, gk, gv)
    return dk, dv


def _add_rows(xp, dk, dv, a, b, gk, gv):
    """``dk[..., a:b, :] += gk`` (and ``dv``) without item assignment (array-API-strict)."""
    if b <= a:
        return dk, dv
    pad = lambda g: xp.concat([xp.zeros_like(dk[..., :a, :]), g,     # noqa: E731
                               xp.zeros_like(dk[..., b:, :])], axis=-2)
    return dk + pad(gk), dv + pad(gv)


# -- backend contract -----------------------------------------------------------------------------

def forward(q, k, v, opts):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v = upcast_half(xp, q, k, v)
    group = q.shape[1] // max(k.shape[1], 1)   # H = Hkv = 0: no heads
    kh, vh = expand_kv_heads(xp, k, group), expand_kv_heads(xp, v, group)
    # ``saved`` stays in the working precision: float16 would round lse (|lse| up to
    # ~100: steps of 0.06, i.e. 6% in exp(s - lse)) and overflow den (> 65504)
    if opts.order is None:
        o, lse = _exact_forward(xp, q, kh, vh, opts)
        return xp.astype(o, dtype), (lse,)
    o, m, den = _taylor_scan(xp, q, kh, vh, opts)
    return xp.astype(o, dtype), (m, den)


def backward(q, k, v, o, saved, do, opts):
    xp = namespace(q, k, v)
    dtype = q.dtype
    q, k, v, o, do = upcast_half(xp, q, k, v, o, do)
    saved = upcast_half(xp, *saved)
    kv_heads = k.shape[1]
    group = q.shape[1] // max(kv_heads, 1)
    kh, vh = expand_kv_heads(xp, k, group), expand_kv_heads(xp, v, group)
    if opts.order is None:
        dq, dk, dv = _exact_backward(xp, q, kh, vh, o, saved[0], do, opts)
    else:
        m, den = saved
        r = do / xp.where(den > 0, den, xp.ones_like(den))   # empty rows: do_i / 1 * 0 weights
        dq = _taylor_scan(xp, q, kh, vh, opts, backward_from=(r, o))
        dk, dv = _taylor_backward_keys(xp, q, kh, vh, o, m, r, opts)
    out = (dq, reduce_kv_heads(xp, dk, kv_heads), reduce_kv_heads(xp, dv, kv_heads))
    return tuple(xp.astype(g, dtype) for g in out)
