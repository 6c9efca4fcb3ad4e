"""Projection schemes: one module each, registered on import."""

from ._base import LayerConfig, OutputProjection, Projection, RealOutputProjection  # noqa: F401
from . import standard  # noqa: F401
from . import quaternion  # noqa: F401
from . import optimised, efficient, super  # noqa: F401,E401  (Hosseini & Hosseini schemes)
from ..bench import projection_schemes  # noqa: F401,E402  (registers the study)

from .._registry import make_package_callable as _make_package_callable  # noqa: E402
from .._registry import projections as _projections  # noqa: E402

_make_package_callable(__name__, _projections)   # refattn.projections() lists them (the public API)
