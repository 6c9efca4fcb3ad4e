"""Preconditioned attention (``VARIANTS.md`` section 4): ``O = diag(c) core(q, k, v)``.

``api.py`` holds the generic wrapper (any inner core, its backends for free),
``preconditioners.py`` the registry of diagonals ``c = C(q, k, v, A)``.
Derivation: ``docs/cores/preconditioned.md``.
"""

from __future__ import annotations

import numpy as np

from ..._registry import Case, Variant, register_core, register_variant
from ...layers import register_layer_variant
from .api import DEFAULT_EPS, backward, forward, make_core, preconditioned_sdpa
from .preconditioners import (Preconditioner, get_preconditioner, preconditioners,
                              register_preconditioner)
from . import study  # noqa: F401  (registers the study "preconditioned-overhead")

__all__ = ["preconditioned_sdpa", "forward", "backward", "make_core", "Preconditioner",
           "register_preconditioner", "get_preconditioner", "preconditioners", "CORE",
           "DEFAULT_EPS"]

CORE = register_core(make_core("sdpa", name="preconditioned"))


def _case(name, rng, batch, H, Hkv, L, S, E, Ev, dtype, **options):
    q = rng.standard_normal((*batch, H, L, E)).astype(dtype)
    k = rng.standard_normal((*batch, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((*batch, Hkv, S, Ev)).astype(dtype)
    return Case(name, preconditioned_sdpa, (q, k, v), options,
                CORE.flops(batch, H, L, S, E, Ev, causal=options.get("causal", False)))


def make_cases(kind="test", dtype="float64", seed=0):
    """Seeded problems.

    The ``"test"`` cases use ``stop_gradient=False``: the generic finite-difference
    check differentiates the forward pass, and only the full backward is its
    derivative (``tests/cores/test_preconditioned.py`` checks ``True`` separately).
    No case sets ``eps``: :func:`refattn.testing.check_grads` would take it for its
    finite-difference step (the tests bind it instead).
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    full = {"stop_gradient": False}
    if kind == "default":
        return [_case("B2 H4 L128 E32 causal", rng, (2,), 4, 4, 128, 128, 32, 32, dtype,
                      causal=True, **full)]
    if kind == "bench":
        return [_case(f"B1 H8 L{L} E64 stop_gradient={sg}", rng, (1,), 8, 8, L, L, 64, 64, dtype,
                      stop_gradient=sg) for L in (512, 2048) for sg in (True, False)]
    L, S = 7, 9
    mask = rng.random((L, S)) > 0.3
    mask[2] = False                                   # a fully masked row: A_2 = 0, c_2 = 1/eps
    bias = rng.standard_normal((2, 1, L, S)).astype(dtype)
    drop = rng.random((2, 4, L, S)) > 0.25
    return [
        _case("plain", rng, (2,), 4, 4, L, S, 8, 6, dtype, **full),
        _case("no batch dims, L=1", rng, (), 2, 2, 1, 5, 4, 4, dtype, **full),
        _case("two batch dims, GQA 4/2", rng, (2, 1), 4, 2, L, S, 8, 8, dtype, **full),
        _case("causal lower_right L>S (empty rows)", rng, (1,), 2, 2, S, L, 8, 8, dtype,
              causal=True, causal_align="lower_right", **full),
        _case("mask with empty row + causal", rng, (2,), 4, 4, L, S, 8, 8, dtype, mask=mask,
              causal=True, **full),
        _case("bias (B,1,L,S)", rng, (2,), 4, 4, L, S, 8, 8, dtype, bias=bias, **full),
        _case("dropout keep-mask", rng, (2,), 4, 4, L, S, 8, 8, dtype, dropout_mask=drop,
              dropout_p=0.25, **full),
        _case("identity preconditioner", rng, (2,), 2, 2, L, S, 8, 8, dtype,
              preconditioner="identity", **full),
    ]


register_variant(Variant(
    name="preconditioned",
    kind="core",
    make_cases=make_cases,
    core="preconditioned",
    summary="diag(1/(||A_i||+eps)) sdpa(q, k, v): row-norm preconditioner (reconstruction)",
))

register_layer_variant(
    "mha-preconditioned", projection="standard", core="preconditioned",
    layer_options={"stop_gradient": False},
    summary="multi-head attention, standard projection, preconditioned sdpa core (full gradient)")
