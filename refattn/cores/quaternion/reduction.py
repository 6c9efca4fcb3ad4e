"""Quaternion attention by exact reduction to SDPA: the kernel backends.

Any SDPA backend module (``refattn.cores.sdpa.<backend>``, contract in
:mod:`refattn.cores.sdpa.api`) becomes a quaternion backend here, so the
quaternion cores run on every backend that SDPA implements.

Shared
    ``S = sum_c Q_c K_c^T`` is the dot product of the flattened ``4d`` features and
    every output component uses the one softmax: one SDPA on ``(B, H, L, 4d)``
    queries/keys and ``(B, Hkv, S, 4dv)`` values.
Hamilton
    ``S_c = sum_b SIGN[c^b][b] Q_(c^b) K_b^T = Qt^(c) Kflat^T`` where
    ``Qt^(c)_b = SIGN[c^b][b] Q_(c^b)`` is a signed permutation of Q's components.
    The four problems ``(Qt^(c), Kflat, V_c)`` are stacked on the batch axis
    (``c``-major) and solved by ONE SDPA call on ``4B`` batch entries.  Backward:
    ``dQ_a = sum_c SIGN[a][a^c] dQt^(c)_(a^c)`` (the transposed signed permutation),
    ``dK = sum_c dK^(c)``, ``dV_c = dV^(c)``, ``dbias = sum_c dbias^(c)``,
    ``dslopes = sum_c dslopes^(c)``.  Batch-shaped operands (mask, bias, ALiBi slopes)
    are repeated for the four problems and ``mask_mod`` / ``score_mod`` see the batch
    entry ``b % B`` (:func:`batch_relabelled`), so every map has the options of the call.

See ``docs/cores/quaternion.md`` for the derivation.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..._array import namespace
from ..sdpa import numba_mods
from .algebra import SIGN

__all__ = ["SDPAReduction", "signed_permutations", "signed_permutations_adjoint",
           "batch_relabelled"]


def signed_permutations(xp, q):
    """Signed permutations of the components: ``q (B, H, L, 4, d) -> Qt (4, B, H, L, 4, d)``.

    ``Qt[c][..., b, :] = SIGN[c^b][b] q[..., c^b, :]``; map ``c`` of the Hamilton core is
    ``S_c = Qt[c] Kflat^T`` (components flattened).
    """
    return xp.stack([
        xp.stack([q[..., c ^ b, :] if SIGN[c ^ b][b] > 0 else -q[..., c ^ b, :]
                  for b in range(4)], axis=-2)
        for c in range(4)], axis=0)


def signed_permutations_adjoint(xp, dqt):
    """Adjoint of :func:`signed_permutations`: ``(4, B, H, L, 4, d) -> (B, H, L, 4, d)``.

    ``dQ_a = sum_c SIGN[a][a^c] dQt[c][..., a^c, :]`` (with ``b = a^c``, ``c^b = a``).
    """
    out = []
    for a in range(4):
        total = None
        for c in range(4):
            term = dqt[c][..., a ^ c, :]
            term = term if SIGN[a][a ^ c] > 0 else -term
            total = term if total is None else total + term
        out.append(total)
    return xp.stack(out, axis=-2)


def _flat_features(xp, x):
    """``(B, H, S, 4, f) -> (B, H, S, 4f)`` (the ``[r | i | j | k]`` flat layout)."""
    return xp.reshape(x, (*x.shape[:-2], 4 * x.shape[-1]))


def _components_first(xp, x):
    """``(B, H, S, 4, f) -> (4B, H, S, f)``, component-major on the batch axis."""
    x = xp.permute_dims(x, (3, 0, 1, 2, 4))                       # (4, B, H, S, f)
    return xp.reshape(x, (4 * x.shape[1], *x.shape[2:]))


def _components_last(xp, x):
    """Inverse of :func:`_components_first`: ``(4B, H, S, f) -> (B, H, S, 4, f)``."""
    x = xp.reshape(x, (4, x.shape[0] // 4, *x.shape[1:]))         # (4, B, H, S, f)
    return xp.permute_dims(x, (1, 2, 3, 0, 4))


def _tile_batch(xp, x):
    """Repeat a ``(B, ...)`` mask, bias or slopes for the 4 stacked problems; ``(1, ...)`` broadcasts."""
    if x is None or x.shape[0] == 1:
        return x
    return xp.concat([x] * 4, axis=0)                             # (4B, ...)


@functools.lru_cache(maxsize=64)
def batch_relabelled(fn, batch: int, name: str, scalar: bool):
    """``fn`` seeing batch entry ``b % batch``: the Hamilton maps stacked ``c``-major on ``4B``.

    ``scalar=True`` (the numba kernels call it pair by pair): a closure over ``fn``'s numba
    dispatcher, which numba compiles; else a Python closure over the array function.  Memoised
    on ``(fn, batch)``, so the numba kernels bound to it (memoised on function identity) are
    built once per function and batch size.
    """
    inner = numba_mods.compile_function(fn, name, np.float64) if scalar else fn

    def relabelled_mask(b, h, i, j):
        return inner(b % batch, h, i, j)

    def relabelled_score(score, b, h, i, j):
        return inner(score, b % batch, h, i, j)

    return relabelled_mask if name == "mask_mod" else relabelled_score


def _relabelled_mods(opts, batch: int, scalar: bool) -> dict:
    """The call's ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` for the ``4B`` problem."""
    return {name: (None if getattr(opts, name) is None else
                   batch_relabelled(getattr(opts, name), batch, name, scalar))
            for name in ("mask_mod", "score_mod", "score_mod_grad")}


def _hamilton_options(xp, opts, batch: int, scalar: bool):
    """``opts`` of the ``4B`` stacked problem: per-batch operands repeated, functions relabelled."""
    return dataclasses.replace(opts, mask=_tile_batch(xp, opts.mask),
                               bias=_tile_batch(xp, opts.bias),
                               alibi=_tile_batch(xp, opts.alibi),
                               **_relabelled_mods(opts, batch, scalar))


class SDPAReduction:
    """A quaternion backend (contract of :mod:`.reference`) built on an SDPA backend module.

    ``scalar_mods``: the SDPA backend calls ``mask_mod`` / ``score_mod`` pair by pair as
    compiled scalar functions (numba), not as array functions (the reference).
    """

    def __init__(self, sdpa_impl, scalar_mods: bool = False):
        self.sdpa = sdpa_impl
        self.scalar_mods = scalar_mods

    def forward(self, q, k, v, opts, mode):
        xp = namespace(q, k, v)
        B, H, L, _, d = q.shape
        if mode == "shared":
            args = (_flat_features(xp, q), _flat_features(xp, k), _flat_features(xp, v))
            o, lse = self.sdpa.forward(*args, opts)                            # (B, H, L, 4dv)
            return xp.reshape(o, (B, H, L, 4, v.shape[-1])), (args, o, lse, opts)
        qt = xp.reshape(signed_permutations(xp, q), (4 * B, H, L, 4 * d))   # (4B, H, L, 4d)
        kf = _flat_features(xp, k)                                          # (B, Hkv, S, 4d)
        args = (qt, xp.concat([kf] * 4, axis=0), _components_first(xp, v))  # kt, vt (4B, Hkv, S, .)
        opts4 = _hamilton_options(xp, opts, B, self.scalar_mods)
        o4, lse = self.sdpa.forward(*args, opts4)                               # (4B, H, L, dv)
        return _components_last(xp, o4), (args, o4, lse, opts4)

    def backward(self, saved, do, opts, mode):
        (q, k, v), o, lse, opts_used = saved
        xp = namespace(q)
        if mode == "shared":
            B, H, L, _, dv = do.shape
            dq, dk, dvf, ds, dslopes = self.sdpa.backward(q, k, v, o, lse,
                                                          _flat_features(xp, do), opts_used)
            d = q.shape[-1] // 4
            return (xp.reshape(dq, (*dq.shape[:-1], 4, d)),                # (B, H, L, 4, d)
                    xp.reshape(dk, (*dk.shape[:-1], 4, d)),                # (B, Hkv, S, 4, d)
                    xp.reshape(dvf, (*dvf.shape[:-1], 4, dv)), ds, dslopes)  # (B, Hkv, S, 4, dv)
        # the functions as this backend calls them (the exact path's reference takes arrays)
        opts_used = dataclasses.replace(opts_used, **_relabelled_mods(opts, do.shape[0],
                                                                      self.scalar_mods))
        dqt, dkt, dvt, ds, dslopes = self.sdpa.backward(q, k, v, o, lse,
                                                        _components_first(xp, do), opts_used)
        B4, H, L, f = dqt.shape
        dqt = xp.reshape(dqt, (4, B4 // 4, H, L, 4, f // 4))              # (4, B, H, L, 4, d)
        dkt = xp.reshape(dkt, (4, B4 // 4, *dkt.shape[1:-1], 4, f // 4))  # (4, B, Hkv, S, 4, d)
        if ds is not None:
            ds = xp.sum(xp.reshape(ds, (4, B4 // 4, *ds.shape[1:])), axis=0)  # (B, H, L, S)
        if dslopes is not None:                                           # the maps share them
            dslopes = xp.sum(xp.reshape(dslopes, (4, B4 // 4, H)), axis=0)    # (B, H)
        return (signed_permutations_adjoint(xp, dqt), xp.sum(dkt, axis=0),
                _components_last(xp, dvt), ds, dslopes)
