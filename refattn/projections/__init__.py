"""Projection schemes: one module each, registered on import."""

from ._base import LayerConfig, Projection, RealOutputProjection  # noqa: F401
from . import standard  # noqa: F401
from . import quaternion  # noqa: F401
