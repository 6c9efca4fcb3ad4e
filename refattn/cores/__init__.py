"""Attention cores: one package per core, reference and kernels side by side.

Importing this package registers every core.  A new core is a new package
here plus one line below.
"""

from . import sdpa  # noqa: F401
from . import elementwise  # noqa: F401
from . import preconditioned  # noqa: F401
from . import quaternion  # noqa: F401

from .._registry import make_package_callable as _make_package_callable  # noqa: E402
from .._registry import cores as _cores  # noqa: E402

_make_package_callable(__name__, _cores)   # refattn.cores() lists them (the public API)
