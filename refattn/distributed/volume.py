r"""Communication volume per worker of sequence-sharded SDPA: a calculation.

Per batch element and head, ``L`` queries, ``S`` keys, ``E`` query/key and
``Ev`` value features, ``b`` bytes per number, ``P`` workers.  Bytes a worker
receives plus sends over one forward and one backward pass (the inputs a
worker owns and the tensors it keeps between the passes do not travel):

``"keys"`` (key/value sharding, one query block: ``refattn.distributed.sdpa``
with chunks along ``S`` only; worker ``j`` owns key block ``j``)
    forward: all queries in (``L E``), its partial ``(o_j, lse_j)`` out to the
    merge tree (``L (Ev + 1)``); backward: ``o, lse, dO`` in (``L (2 Ev + 1)``),
    its partial ``dq`` out (``L E``).  Total ``b L (2 E + 3 Ev + 2)``: it does
    not shrink with ``P``.

``"ring"`` (ring attention: worker ``i`` owns query, key and value block ``i``;
the key/value blocks travel round the ring)
    forward: ``P - 1`` key/value blocks in and out; backward: the key/value
    blocks again plus their ``dk, dv`` accumulators.  Received ``3 (P - 1) / P
    S (E + Ev)``, sent as much: total ``6 b (P - 1) / P S (E + Ev)``.

``"tiles"`` (query and key sharding on a ``r x r`` grid of tiles, ``r = sqrt(P)``,
one tile per worker)
    forward: its query tile and key/value tile in (``(L E + S (E + Ev)) / r``),
    its partial out (``L (Ev + 1) / r``); backward: ``o, lse, dO`` of its query
    tile in, partial ``dq`` and its ``dk, dv`` out.  Total
    ``b / r (L (2 E + 3 Ev + 2) + 2 S (E + Ev))``.

The merge trees add ``log_split_every`` levels of latency, not volume: each
partial is sent once and received once.
"""

from __future__ import annotations

import math

__all__ = ["LAYOUTS", "communication_volume"]

LAYOUTS = ("keys", "ring", "tiles")


def communication_volume(layout, L, S, E, Ev, workers, itemsize=4):
    """Bytes one worker receives plus sends, forward + backward, per batch element and head.

    Examples
    --------
    >>> mib = lambda x: round(x / 2 ** 20)
    >>> [mib(communication_volume(lay, 2 ** 20, 2 ** 20, 64, 64, 64)) for lay in LAYOUTS]
    [1288, 3024, 289]
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    rows = L * (2 * E + 3 * Ev + 2)
    if layout == "keys":
        return itemsize * rows
    if layout == "ring":
        return itemsize * 6 * (workers - 1) / workers * S * (E + Ev)
    r = math.sqrt(workers)
    return itemsize / r * (rows + 2 * S * (E + Ev))
