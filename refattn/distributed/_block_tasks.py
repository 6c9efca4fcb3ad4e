"""The task functions of sequence-sharded SDPA: one ``(L_i, S_j)`` block, forward, backward, P.

Shape legend: ``*b`` the block's batch axes, ``Hb`` its query heads, ``Li``
queries, ``Sj`` keys, ``E``/``Ev`` features.  Each function runs the SDPA
backend contract (:mod:`refattn.cores.sdpa.api`) of the best local backend on the
block, with the options shifted into block coordinates
(:mod:`refattn.distributed.geometry`).

ALiBi: the slopes go to the backend with the block's distance offset ``c``
(``SDPAOptions.alibi_offset``, :func:`refattn.distributed.geometry.alibi_offset`),
so the kernel computes ``-slope |i' - j' + c|`` pair by pair inside its tiles and
the slope gradient ``-sum(dS |i' - j' + c|)`` with them: no ``(Li, Sj)`` array in
the task (the reference backend, which builds the scores, builds the distances
with them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._array import flatten_batch, namespace, product, sum_to_shape
from ..backends import resolve, route
from ..cores.sdpa.api import IMPLEMENTED, SDPAOptions, as_batched_4d, implementation
from ..cores.sdpa.reference import probabilities

__all__ = [
    "BlockSpec",
    "backward_block",
    "empty_partial",
    "forward_block",
    "probs_block",
    "zeros_scores",
]


@dataclass(frozen=True)
class BlockSpec:
    """The static options of one block, in block coordinates.

    Attributes
    ----------
    scale, dropout_scale, softcap, tiles, float32_math
        As :class:`refattn.cores.sdpa.api.SDPAOptions`.
    causal_offset, window
        Local causal offset and window ``(lo, hi)`` (None where the block needs none).
    alibi : bool
        The call has ALiBi slopes (module docstring).
    alibi_offset : int
        ``c`` of the block's ALiBi distance ``|i' - j' + c|``.
    need_bias_grad : bool
        The call has a float ``bias`` (its gradient is returned).
    backend : str
        As given to the call (``"auto"`` resolved per block).
    reference_on_cupy : bool
        The call has a window, soft-cap or ALiBi, which the single-machine call runs
        on the reference backend for CuPy arrays.
    """

    scale: float
    causal_offset: int | None
    dropout_scale: float
    need_bias_grad: bool
    backend: str
    window: tuple | None = None
    softcap: float | None = None
    alibi: bool = False
    alibi_offset: int = 0
    tiles: tuple | None = None
    float32_math: str | None = None
    reference_on_cupy: bool = False

    def options(self, xp, q, k, mask, bias, drop, slopes):
        """The block's :class:`SDPAOptions`; ``q`` ``(*b, Hb, Li, E)``, ``k`` ``(*b, Hkv_b, Sj, E)``."""
        batch = tuple(q.shape[:-3])
        four = lambda m: None if m is None else as_batched_4d(xp, m, batch)
        alibi4 = None
        if self.alibi:
            lead = product(tuple(slopes.shape[:-1]))
            alibi4 = xp.reshape(slopes, (lead, slopes.shape[-1], 1, 1))       # (B|1, Hb, 1, 1)
        return SDPAOptions(scale=self.scale, causal_offset=self.causal_offset, mask=four(mask),
                           bias=four(bias), dropout_mask=four(drop),
                           dropout_scale=self.dropout_scale, need_bias_grad=self.need_bias_grad,
                           window=self.window, softcap=self.softcap, alibi=alibi4,
                           alibi_offset=self.alibi_offset if self.alibi else None,
                           need_alibi_grad=self.alibi, tiles=self.tiles,
                           float32_math=self.float32_math)

    def implementation(self, xp, arrays, bias):
        """The backend module: the best local one, routed as the single-machine call routes
        (non-finite or empty data, and the options CUDA does not take, to the reference)."""
        backend = resolve(self.backend, IMPLEMENTED, arrays[0], core="sdpa")
        backend = route(backend, xp, arrays, bias)
        if backend == "cupy" and self.reference_on_cupy:
            backend = "reference"
        return implementation(backend)


def _flat(xp, x):
    return flatten_batch(xp, x, tuple(x.shape[:x.ndim - 3]))


def _unflat(xp, x, batch):
    return xp.reshape(x, batch + tuple(x.shape[1:]))


def forward_block(q, k, v, mask, bias, drop, slopes, spec):
    """``(o_ij, lse_ij)`` of one block, shapes ``(*b, Hb, Li, Ev)`` and ``(*b, Hb, Li)``."""
    xp = namespace(q, k, v)
    batch = tuple(q.shape[:-3])
    opts = spec.options(xp, q, k, mask, bias, drop, slopes)
    impl = spec.implementation(xp, (q, k, v, slopes), bias)
    o, lse = impl.forward(_flat(xp, q), _flat(xp, k), _flat(xp, v), opts)
    return _unflat(xp, o, batch), _unflat(xp, lse, batch)


def empty_partial(q, value_dim):
    """``(0, -inf)`` for query rows that see no key block at all."""
    xp = namespace(q)
    rows = tuple(q.shape[:-1])
    return (xp.zeros(rows + (value_dim,), dtype=q.dtype),
            xp.full(rows, -xp.inf, dtype=q.dtype))


def backward_block(q, k, v, o, lse, do, mask, bias, drop, slopes, spec):
    """``(dq_ij, dk_ij, dv_ij, dbias_ij, dslopes_ij)`` of one block.

    ``dbias_ij`` is summed to the bias block's shape and ``dslopes_ij`` to the slopes
    block's (None without them); ``o, lse, do`` are the merged rows of query block ``i``.
    """
    xp = namespace(q, k, v)
    batch = tuple(q.shape[:-3])
    opts = spec.options(xp, q, k, mask, bias, drop, slopes)
    impl = spec.implementation(xp, (q, k, v, slopes, do), bias)
    dq, dk, dv, ds, dsl = impl.backward(_flat(xp, q), _flat(xp, k), _flat(xp, v), _flat(xp, o),
                                        flatten_batch(xp, lse, batch), _flat(xp, do), opts)
    dbias = None
    if spec.need_bias_grad:
        dbias = sum_to_shape(xp, _unflat(xp, ds, batch), tuple(bias.shape))
    dslopes = None
    if spec.alibi:
        dslopes = sum_to_shape(xp, _unflat(xp, dsl, batch), tuple(slopes.shape))
    return _unflat(xp, dq, batch), _unflat(xp, dk, batch), _unflat(xp, dv, batch), dbias, dslopes


def probs_block(q, k, lse, mask, bias, slopes, spec):
    """``P_ij`` ``(*b, Hb, Li, Sj)`` before dropout, from the merged ``lse`` of the rows."""
    xp = namespace(q, k)
    batch = tuple(q.shape[:-3])
    opts = spec.options(xp, q, k, mask, bias, None, slopes)
    p = probabilities(_flat(xp, q), _flat(xp, k), flatten_batch(xp, lse, batch), opts)
    return _unflat(xp, p, batch)


def zeros_scores(q, k):
    """Zero probabilities ``(*b, Hb, Li, Sj)`` of a block no pair of which is kept."""
    xp = namespace(q)
    return xp.zeros(tuple(q.shape[:-1]) + (k.shape[-2],), dtype=q.dtype)
