r"""Element-wise Taylor attention as a chunked scan over the sequence, forward and backward.

Shape legend: ``*batch`` (flattened to ``B`` inside a task), ``H`` query heads,
``Hkv`` kv heads, ``L`` queries in chunks ``i``, ``S`` keys in chunks ``j``,
``D`` channels, ``t`` the Taylor order; every formula is per channel.

With ``psi = sqrt(s) q``, ``kappa = sqrt(s) k`` and ``a_n = 2^n / n!`` the
Taylor weight of a kept pair is ``w_ij = exp(m_i - kappa_j^2) sum_n a_n (psi_i
kappa_j)^n`` (``m_i`` a row shift that cancels in ``o_i = N_i / D_i``,
``N_i = sum_j w_ij v_j``, ``D_i = sum_j w_ij``; ``docs/cores/elementwise.md``).
Causal masking makes the key chunks a query chunk sees fully a prefix
``0 .. p_i - 1``; the few it sees partly (the diagonal) are *tiles*.

Forward::

    KM_j   = moments of key chunk j  (A_n, B_n) = sum_j exp(mu - kappa_j^2) kappa_j^n (v_j, 1)
    PRE_p  = KM_0 + ... + KM_(p-1)       exclusive scan (a chain), shifts merged exactly
    tile (i, j): the single-machine backend on (psi_i, kappa_j, v_j), local causal offset
                 -> (o_ij, m_ij, den_ij)
    m_i = min(mu(PRE_p_i), m_ij);  N_i = state_read(PRE_p_i) + sum_j o_ij den_ij e^(m_i - m_ij)
    (and D_i alike);  o_i = N_i / D_i

Backward, with ``r_i = dO_i / D_i`` and ``g_ij = r_i (v_j - o_i)``, splits into the
same pieces (the loss is a sum over pairs):

* prefix, queries: ``dpsi_i += r_i e^(m_i - mu) sum_n n a_n psi_i^(n-1) (A_n - o_i B_n)``;
* prefix, keys: query moments ``G_n = sum_i psi_i^n r_i e^(m_i - nu)`` and ``H_n``
  (the same times ``o_i``), ``nu = max m_i``, summed over the query chunks that see
  key chunk ``j`` fully (a reversed exclusive scan); then
  ``dv_j = e^(nu - kappa_j^2) sum_n a_n kappa_j^n G_n`` and
  ``dkappa_j = e^(nu - kappa_j^2) sum_n a_n [n kappa_j^(n-1) - 2 kappa_j^(n+1)] (v_j G_n - H_n)``
  (from ``d w_ij / d kappa_j = e^(m_i - kappa_j^2) (psi_i P'(y) - 2 kappa_j P(y))``);
* tiles: the backend's backward on the tile with the *global* ``o_i`` and the
  global denominator expressed in the tile's shift, ``den_i e^(m_ij - m_i)``, so the
  backend's ``r_i`` is the global one: its ``(dpsi, dkappa, dv)`` are the tile's exact share.

Both scans reuse the element-wise reference's moment primitives (``state_update``
adds items to shifted moments, ``state_read`` evaluates them), with keys as items in
the forward and queries as items (shift ``-m_i``, so the weights are ``e^(m_i - nu)``)
in the backward.  Work O(t (L + S) D) plus the tiles, memory O(t D) per state.
"""

from __future__ import annotations

import math
import operator

import dask.array as da
import numpy as np
from dask.base import tokenize

from .._array import flatten_batch, matrix_transpose, namespace
from .._masks import causal_offset
from ..backends import resolve
from ..cores.elementwise import elementwise_attention as _single
from ..cores.elementwise.api import IMPLEMENTED, ElementwiseOptions, implementation
from ..cores.elementwise.reference import state_read, state_update
from ..cores.elementwise.taylor import taylor_coefficients
from ..cores.sdpa.api import as_batched_4d
from ..cores.sdpa.reference import expand_kv_heads, reduce_kv_heads
from ._cotangent import as_cotangent
from ._graph import chunk_starts, new_array
from ._plan import make_plan, probe_arrays
from .geometry import block_visibility

__all__ = ["combine_moments", "taylor_scan_forward", "taylor_scan_vjp", "wants_scan"]

def _finite_exp(xp, a, b):
    """``exp(a - b)`` where both are finite, else 0 (``+-inf`` mark empty states and rows)."""
    finite = xp.isfinite(a) & xp.isfinite(b)
    zero = xp.zeros_like(a if a.ndim >= b.ndim else b)
    return xp.where(finite, xp.exp(xp.where(finite, a, zero) - xp.where(finite, b, zero)), zero)


def wants_scan(fn, q, k, options):
    """Whether ``fn(q, k, v, **options)`` is element-wise Taylor with ``L`` or ``S`` chunked."""
    if fn is not _single or options.get("order") is None:
        return False
    return any(isinstance(x, da.Array) and x.ndim >= 3 and x.numblocks[-2] > 1 for x in (q, k))


def combine_moments(*states):
    """Sum of shifted moment states ``(A, B, mu)``: ``mu = min mu_k``, each rescaled to it.

    ``A, B (t + 1, ..., D)``, ``mu (..., D)`` (``+inf`` for an empty state).
    """
    xp = namespace(states[0][2])
    mu = states[0][2]
    for s in states[1:]:
        mu = xp.minimum(mu, s[2])
    A = B = None
    for a, b, m in states:
        f = _finite_exp(xp, mu, m)
        A = a * f if A is None else A + a * f
        B = b * f if B is None else B + b * f
    return A, B, mu


def _flat(xp, x):
    """``(*b, H, n, D) -> (B, H, n, D)``."""
    return flatten_batch(xp, x, tuple(x.shape[:x.ndim - 3]))


def _prepared_keys(xp, k, v, mask, spec):
    """Scaled, head-expanded keys and values ``(B, H, n, D)`` and key squares (``+inf`` masked)."""
    kappa = _flat(xp, k) * spec.root
    vv = _flat(xp, v)
    kappa, vv = expand_kv_heads(xp, kappa, spec.group), expand_kv_heads(xp, vv, spec.group)
    k2 = kappa * kappa
    if mask is not None:
        keep = as_batched_4d(xp, mask, tuple(k.shape[:k.ndim - 3]))      # (B|1, H|1, 1, n|1)
        keep = matrix_transpose(xp, keep)                                 # (B|1, H|1, n|1, 1)
        k2 = xp.where(keep, k2, xp.full_like(k2, xp.inf))
    return kappa, vv, k2


class _Spec:
    """Static facts of a scan: order, scale root, GQA group, backend (picklable)."""

    def __init__(self, order, root, group, backend):
        self.order, self.root, self.group, self.backend = order, root, group, backend

    def coeffs(self):
        return taylor_coefficients(self.order)

    def dcoeffs(self):
        c = self.coeffs()
        return [n * c[n] for n in range(1, self.order + 1)]


def _empty_moments(q, spec):
    xp = namespace(q)
    qf = _flat(xp, q)
    shape = (qf.shape[0], qf.shape[1], qf.shape[3])
    zeros = xp.zeros((spec.order + 1,) + shape, dtype=q.dtype)
    return zeros, zeros, xp.full(shape, xp.inf, dtype=q.dtype)


def _key_moments(q, k, v, mask, spec):
    """Moments of one key chunk (``q`` only gives the shapes of an empty state)."""
    xp = namespace(k)
    kappa, vv, k2 = _prepared_keys(xp, k, v, mask, spec)
    return state_update(xp, _empty_moments(q, spec), kappa, vv, k2, spec.order)


def _impl(spec, x):
    return implementation(resolve(spec.backend, IMPLEMENTED, x, core="elementwise"))


def _tile_options(spec, offset, mask, batch):
    four = None if mask is None else as_batched_4d(namespace(mask), mask, batch)
    return ElementwiseOptions(spec.order, offset, four)


def _tile_forward(q, k, v, mask, spec, offset):
    """``(o, m, den)`` of query chunk ``q`` against key chunk ``k`` (flattened ``(B, H, n, D)``)."""
    xp = namespace(q)
    o, (m, den) = _impl(spec, q).forward(_flat(xp, q) * spec.root, _flat(xp, k) * spec.root,
                                         _flat(xp, v), _tile_options(spec, offset, mask, q.shape[:q.ndim - 3]))
    return o, m, den


def _query_forward(q, prefix, spec, *tiles):
    """``(o, m, den)`` of a query chunk: the prefix moments plus its tiles, shifts merged."""
    xp = namespace(q)
    psi = _flat(xp, q) * spec.root
    m = xp.broadcast_to(prefix[2][..., None, :], psi.shape)
    for _, mt, _ in tiles:
        m = xp.minimum(m, mt)
    num, den = state_read(xp, prefix, psi, m, spec.coeffs())
    for ot, mt, dt in tiles:
        f = _finite_exp(xp, m, mt)
        num, den = num + ot * dt * f, den + dt * f
    o = num / xp.where(den > 0, den, xp.ones_like(den))
    return o, m, den


def _unflat(o, like):
    xp = namespace(o)
    return xp.reshape(o, tuple(like.shape[:like.ndim - 1]) + (o.shape[-1],))


def _ratio(xp, do, den):
    return do / xp.where(den > 0, den, xp.ones_like(den))


def _query_moments(q, fwd, do, spec):
    """Query moments ``(G, H, -nu)`` of a query chunk for the keys' backward."""
    xp = namespace(q)
    o, m, den = fwd
    psi = _flat(xp, q) * spec.root
    r = _ratio(xp, _flat(xp, do), den)
    # items: queries, "squares" -m_i (so exp(mu - item) = exp(m_i - nu), mu = -max m)
    neg_m = xp.where(xp.isfinite(m), -m, xp.full_like(m, xp.inf))
    empty = _empty_moments(q, spec)
    G, _, mu = state_update(xp, empty, psi, r, neg_m, spec.order)
    Hm, _, _ = state_update(xp, empty, psi, r * o, neg_m, spec.order)
    return G, Hm, mu


def _query_grad(q, fwd, do, prefix, spec, *tile_grads):
    """``dpsi`` of a query chunk: prefix moments plus the tiles' shares; ``(*b, H, n, D)``."""
    xp = namespace(q)
    o, m, den = fwd
    psi = _flat(xp, q) * spec.root
    r = _ratio(xp, _flat(xp, do), den)
    A, B, mu = prefix
    na, nb = state_read(xp, (A[1:], B[1:], mu), psi, m, spec.dcoeffs())
    dpsi = r * (na - o * nb)
    for g in tile_grads:
        dpsi = dpsi + g[0]
    return _unflat(dpsi * spec.root, q)


def _key_grads(q, k, v, mask, suffix, spec, *tile_grads):
    """``(dkappa, dv)`` of a key chunk: suffix query moments plus the tiles' shares."""
    xp = namespace(k)
    kappa, vv, k2 = _prepared_keys(xp, k, v, mask, spec)
    G, Hm, mu = suffix
    neg = xp.where(xp.isfinite(k2), -k2, xp.full_like(k2, -xp.inf))   # exp(nu - kappa^2)
    x1, x2 = state_read(xp, (G, Hm, mu), kappa, neg, spec.coeffs())
    y1, y2 = state_read(xp, (G[1:], Hm[1:], mu), kappa, neg, spec.dcoeffs())
    dv = x1
    dk = (vv * y1 - y2) - 2.0 * kappa * (vv * x1 - x2)
    kv_heads = _flat(xp, k).shape[1]
    dk, dv = reduce_kv_heads(xp, dk, kv_heads), reduce_kv_heads(xp, dv, kv_heads)
    for g in tile_grads:
        dk, dv = dk + g[1], dv + g[2]
    return _unflat(dk * spec.root, k), _unflat(dv, v)


def _tile_backward(q, k, v, mask, tile, fwd, do, spec, offset):
    """The tile's share of ``(dpsi, dkappa, dv)``, from the global ``o`` and denominator."""
    xp = namespace(q)
    _, mt, _ = tile
    o, m, den = fwd
    den_tile = xp.where(xp.isfinite(mt), den * _finite_exp(xp, mt, m), xp.zeros_like(den))
    return _impl(spec, q).backward(_flat(xp, q) * spec.root, _flat(xp, k) * spec.root,
                                   _flat(xp, v), o, (mt, den_tile), _flat(xp, do),
                                   _tile_options(spec, offset, mask, q.shape[:q.ndim - 3]))


# -- the graph ------------------------------------------------------------------------------------

class _Scan:
    """Tiles, prefixes and suffixes of one chunked scan (per ``(*batch, H)`` block)."""

    def __init__(self, q, k, v, options):
        self.plan = plan = make_plan(q, k, v, options, feature_axes=1, shard_sequence=True,
                                     legend_feature="D")
        backend = plan.static.get("backend", "auto")
        (qp, kp, vp), arrays = probe_arrays(plan, IMPLEMENTED, backend)
        _single(qp, kp, vp, **{**plan.static, **arrays, "backend": "reference"})
        s = plan.shapes
        if s.dtype not in ("float32", "float64"):
            raise TypeError(f"the chunked element-wise scan takes float32 or float64 inputs, got "
                            f"{s.dtype}; cast them, or keep L and S in one chunk each")
        scale = float(options.get("scale", 1.0))
        offset = causal_offset(options.get("causal_align", "upper_left"), s.q_len, s.kv_len) \
            if options.get("causal", False) else None
        self.spec = _Spec(int(options["order"]), math.sqrt(scale), s.group, backend)
        nb = plan.nb
        l_ranges = chunk_starts(plan.q.chunks[nb + 1])
        s_ranges = chunk_starts(plan.k.chunks[nb + 1])
        self.prefix, self.tiles = [], []               # per query chunk: p_i, [(j, local offset)]
        for lr in l_ranges:
            full, tiles = [], []
            for j, sr in enumerate(s_ranges):
                visible, local = block_visibility(lr, sr, offset)
                if visible and local is None:
                    full.append(j)
                elif visible:
                    tiles.append((j, local))
            assert full == list(range(len(full))), "fully visible key chunks form a prefix"
            self.prefix.append(len(full))
            self.tiles.append(tiles)
        self.token = tokenize("taylor-scan", plan.q, plan.k, plan.v, sorted(plan.static.items()),
                              *(x.name for x in plan.arrays.values()))

    def keys(self, bh, i=None, j=None):
        p = self.plan
        out = []
        if i is not None:
            out.append((p.q.name,) + bh + (i, 0))
        if j is not None:
            out += [(p.k.name,) + bh + (j, 0), (p.v.name,) + bh + (j, 0)]
            out.append(p.option_block("mask", bh + (0, j)) if "mask" in p.arrays else None)
        return out

    def forward_layer(self):
        """Tasks of the forward scan; returns ``(layer, {(*bh, i): key of (o, m, den)})``."""
        p, t, spec = self.plan, self.token, self.spec
        nb = p.nb
        layer, results = {}, {}
        n_keys = p.k.numblocks[nb + 1]
        for bh in np.ndindex(*p.q.numblocks[:nb + 1]):
            q0 = self.keys(bh, i=0)[0]
            pre = [(f"ew-scan-prefix-{t}",) + bh + (0,)]
            layer[pre[0]] = (_empty_moments, q0, spec)
            for j in range(min(max(self.prefix), n_keys)):
                km = (f"ew-scan-moments-{t}",) + bh + (j,)
                layer[km] = (_key_moments, q0, *self.keys(bh, j=j), spec)
                nxt = (f"ew-scan-prefix-{t}",) + bh + (j + 1,)
                layer[nxt] = (combine_moments, pre[-1], km)
                pre.append(nxt)
            for i, (p_i, tiles) in enumerate(zip(self.prefix, self.tiles)):
                qk = self.keys(bh, i=i)[0]
                tile_keys = []
                for j, local in tiles:
                    tk = (f"ew-scan-tile-{t}",) + bh + (i, j)
                    layer[tk] = (_tile_forward, qk, *self.keys(bh, j=j), spec, local)
                    tile_keys.append(tk)
                fk = (f"ew-scan-rows-{t}",) + bh + (i,)
                layer[fk] = (_query_forward, qk, pre[p_i], spec, *tile_keys)
                results[bh + (i,)] = fk
        return layer, results

    def output(self, layer, results, deps):
        p, t = self.plan, self.token
        name = f"ew-scan-o-{t}"
        for row, key in results.items():
            layer[(name,) + row + (0,)] = (_unflat_o, key, (p.q.name,) + row + (0,))
        return new_array(name, layer, deps, p.q.chunks, p.q, p.q.dtype)


def _unflat_o(fwd, q):
    return _unflat(fwd[0], q)


def taylor_scan_forward(q, k, v, **options):
    """``elementwise_attention(q, k, v, order=t, ...)`` as a chunked scan along ``L`` and ``S``."""
    scan = _Scan(q, k, v, options)
    layer, results = scan.forward_layer()
    p = scan.plan
    return scan.output(layer, results, [p.q, p.k, p.v, *p.arrays.values()])


def taylor_scan_vjp(q, k, v, **options):
    """``(o, pullback)`` of the chunked scan; ``pullback(do) -> (dq, dk, dv)``.

    The scans are chains (prefix over key chunks, suffix over query chunks), so
    there is no tree to tune.
    """
    scan = _Scan(q, k, v, options)
    layer, results = scan.forward_layer()
    p, t, spec = scan.plan, scan.token, scan.spec
    o = scan.output(layer, results, [p.q, p.k, p.v, *p.arrays.values()])
    nb = p.nb

    def pullback(do):
        do = as_cotangent(do, o)
        pt = tokenize(o.name, do)
        sub = {}
        n_rows, n_keys = p.q.numblocks[nb + 1], p.k.numblocks[nb + 1]
        dq_name, dk_name, dv_name = (f"ew-scan-d{c}-{pt}" for c in "qkv")
        dk_layer = {}
        for bh in np.ndindex(*p.q.numblocks[:nb + 1]):
            q0 = scan.keys(bh, i=0)[0]
            tile_grads = {}
            for i, tiles in enumerate(scan.tiles):
                qk, dok = scan.keys(bh, i=i)[0], (do.name,) + bh + (i, 0)
                for j, local in tiles:
                    gk = (f"ew-scan-tile-bwd-{pt}",) + bh + (i, j)
                    sub[gk] = (_tile_backward, qk, *scan.keys(bh, j=j),
                               (f"ew-scan-tile-{t}",) + bh + (i, j), results[bh + (i,)], dok,
                               spec, local)
                    tile_grads[i, j] = gk
            # queries: prefix moments of the forward plus their tiles
            for i, p_i in enumerate(scan.prefix):
                dok = (do.name,) + bh + (i, 0)
                sub[(dq_name,) + bh + (i, 0)] = (
                    _query_grad, scan.keys(bh, i=i)[0], results[bh + (i,)], dok,
                    (f"ew-scan-prefix-{t}",) + bh + (p_i,), spec,
                    *[tile_grads[i, j] for j, _ in scan.tiles[i]])
            # keys: suffix sums of query moments over the chunks that see them fully
            suffix = (f"ew-scan-suffix-{pt}",) + bh + (n_rows,)
            sub[suffix] = (_empty_moments, q0, spec)
            suffixes = {n_rows: suffix}
            for i in reversed(range(n_rows)):
                qm = (f"ew-scan-qmoments-{pt}",) + bh + (i,)
                sub[qm] = (_query_moments, scan.keys(bh, i=i)[0], results[bh + (i,)],
                           (do.name,) + bh + (i, 0), spec)
                key = (f"ew-scan-suffix-{pt}",) + bh + (i,)
                sub[key] = (combine_moments, qm, suffixes[i + 1])
                suffixes[i] = key
            for j in range(n_keys):
                first = next((i for i, p_i in enumerate(scan.prefix) if p_i > j), n_rows)
                grads = (f"ew-scan-keys-{pt}",) + bh + (j,)
                sub[grads] = (_key_grads, q0, *scan.keys(bh, j=j), suffixes[first], spec,
                              *[tile_grads[i, j] for i in range(n_rows) if (i, j) in tile_grads])
                dk_layer[(dk_name,) + bh + (j, 0)] = (operator.getitem, grads, 0)
                dk_layer[(dv_name,) + bh + (j, 0)] = (operator.getitem, grads, 1)
        dq = new_array(dq_name, sub, [o, do], p.q.chunks, p.q, p.q.dtype)
        dv_layer = {key: task for key, task in dk_layer.items() if key[0] == dv_name}
        dk_only = {key: task for key, task in dk_layer.items() if key[0] == dk_name}
        dk = new_array(dk_name, dk_only, [dq], p.k.chunks, p.q, p.k.dtype)
        dv = new_array(dv_name, dv_layer, [dq], p.v.chunks, p.q, p.v.dtype)
        return dq, dk, dv

    return o, pullback
