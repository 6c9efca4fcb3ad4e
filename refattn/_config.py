"""The settings of a layer that projection schemes read.

It lives apart from :mod:`refattn.layers` and :mod:`refattn.projections` so that
either can import it without importing the other (cores register layer
variants, and the quaternion projection imports the quaternion core).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerConfig"]


@dataclass(frozen=True)
class LayerConfig:
    """The layer settings a projection scheme may read."""

    d_model: int
    n_heads: int
    causal: bool = False
    bias: bool = False
    options: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
