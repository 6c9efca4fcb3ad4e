"""refattn: a framework-free reference engine for attention mechanisms.

Every variant has a forward pass and a hand-derived backward pass, on three
backends (``reference`` array-API code, ``numba`` CPU kernels, ``cupy`` GPU
kernels) behind one API.  See ``docs/`` for the conventions and derivations.
"""

from __future__ import annotations

from ._version import __version__
from . import testing  # noqa: F401
from ._vjp import vjp
from .backends import available_backends
from .cores.sdpa import sdpa
from .cores.sdpa.cuda_mods import cuda_expression
from .cores.elementwise import (elementwise_attention, elementwise_state, elementwise_step,
                                elementwise_taylor_error)
from .cores.quaternion import quaternion_attention
from .projections.quaternion import quaternion_linear
from .cores.preconditioned import (Preconditioner, preconditioned_sdpa, preconditioners,
                                   register_preconditioner)
from . import conditioning  # noqa: F401
from .conditioning import attention_conditioning, condition_number, layer_conditioning
from .layers import Attention
from .rotary import apply_rotary, apply_rotary_backward
from .cores import get_core
from .catalog import get_variant, variants
from . import cores, projections  # noqa: F401  (callable packages: refattn.cores() lists them)
from . import verify  # noqa: F401  (imports PyTorch or JAX only for their candidates)

__all__ = [
    "sdpa",
    "cuda_expression",
    "elementwise_attention",
    "elementwise_state",
    "elementwise_step",
    "elementwise_taylor_error",
    "quaternion_attention",
    "quaternion_linear",
    "vjp",
    "Attention",
    "apply_rotary",
    "apply_rotary_backward",
    "available_backends",
    "cores",
    "projections",
    "variants",
    "get_core",
    "get_variant",
    "testing",
    "preconditioned_sdpa",
    "Preconditioner",
    "register_preconditioner",
    "preconditioners",
    "conditioning",
    "condition_number",
    "attention_conditioning",
    "layer_conditioning",
    "verify",
    "__version__",
]

