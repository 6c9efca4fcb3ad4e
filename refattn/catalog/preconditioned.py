"""Seeded preconditioned problems, and the drop-ins' cases: the inner cores' own, wrapped."""

from __future__ import annotations

import numpy as np

from .._array import product
from .._core import COMMON_OPTIONS
from ..cores.preconditioned import CORE, DROP_INS, INNER_CORES, make_core, preconditioned_sdpa
from . import elementwise as _elementwise
from . import quaternion as _quaternion
from . import sdpa as _sdpa
from .case import Case, Variant

__all__ = ["VARIANT", "DROP_IN_VARIANTS", "preconditioned_variant", "make_cases"]


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
        _case("window + causal lower_right + GQA 4/2 + softcap + alibi + padded lengths", rng,
              (3,), 4, 2, L, S, 8, 6, dtype, window=(3, -1), causal=True,
              causal_align="lower_right", softcap=1.5, alibi_slopes=rng.random(4).astype(dtype),
              query_seq_lengths=np.array([7, 2, 5], np.int32),
              key_value_seq_lengths=np.array([9, 4, 6], np.int32), **full),
    ]


VARIANT = Variant(
    name="preconditioned",
    kind="core",
    make_cases=make_cases,
    core="preconditioned",
    summary="diag(1/(||A_i||+eps)) sdpa(q, k, v): row-norm preconditioner (reconstruction)",
)

#: The core variants a drop-in's cases may wrap, by name.
_INNER = {v.name: v for v in (_sdpa.VARIANT, *_quaternion.VARIANTS, *_elementwise.VARIANTS)}


def _inner_variant(name):
    if name not in _INNER:
        raise ValueError(f"test_cases: variant must be one of {', '.join(map(repr, _INNER))}; "
                         f"got {name!r}")
    return _INNER[name]


def _wrap_case(case, variant_name, inner):
    """The inner core's ``case`` run through ``diag(c) inner`` (full gradient, see make_cases)."""
    # keep the core's own options; drop the case function's selectors (quaternion's mode=,
    # which the inner core's name already fixes)
    takes = inner.options + COMMON_OPTIONS + inner.call_options
    options = {n: x for n, x in case.options.items() if n in takes}
    q, v = case.arrays[0], case.arrays[2]
    f = inner.feature_axes
    rows, features = product(q.shape[:q.ndim - f]), product(v.shape[v.ndim - f:])
    return Case(f"{variant_name}: {case.name}", preconditioned_sdpa, case.arrays,
                {"inner_core": inner.name, "stop_gradient": False, **options},
                case.flops + 3.0 * rows * features, backends=case.backends)


def preconditioned_variant(core, *, test_cases=None, summary=None):
    """The variant of the drop-in ``preconditioned-<core>`` (:data:`refattn.cores.preconditioned.DROP_INS`).

    The variant's cases are the inner
    core's own, wrapped: ``"test"`` (``stop_gradient=False``, so
    ``tests/test_variants.py`` checks them with finite differences and against
    every kernel backend), ``"default"`` and ``"bench"`` (the first of the first
    inner variant, so the overhead reads off side by side).

    Parameters
    ----------
    core : str
        The inner core, e.g. ``"elementwise"``.
    test_cases : dict, optional
        ``{inner variant name: (test case name, ...)}``: the inner ``"test"``
        cases to wrap.  Keep it to one or two (each costs CI time); default: the
        first test case of every core variant of ``core``.
    summary : str, optional

    Returns
    -------
    Variant

    Examples
    --------
    >>> import numpy as np, refattn
    >>> refattn.get_variant("preconditioned-shared").cases("test")[0].name
    'quaternion-shared: mask with empty row + causal'
    >>> layer = refattn.Attention(16, 2, projection="quaternion", core="preconditioned-shared")
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 16))
    >>> layer(layer.init(seed=0), x).shape
    (1, 5, 16)
    """
    inner = INNER_CORES[core]
    if test_cases is None:
        test_cases = {name: (v.cases("test")[0].name,) for name, v in sorted(_INNER.items())
                      if v.core == inner.name}
    test_cases = {name: tuple(picks) for name, picks in test_cases.items()}
    for name, picks in test_cases.items():
        variant = _inner_variant(name)
        if variant.core != inner.name:
            raise ValueError(f"test_cases: variant {name!r} runs core {variant.core!r}, "
                             f"not {inner.name!r}")
        missing = sorted(set(picks) - {c.name for c in variant.cases("test")})
        if missing:
            raise ValueError(f"test_cases: variant {name!r} has no test case(s) {missing}")
    wrapped = DROP_INS[inner.name] if inner.name in DROP_INS else make_core(inner)

    def make_cases(kind="test", dtype="float64", seed=0):
        if kind != "test":            # one problem of the first inner variant, wrapped
            name = next(iter(test_cases))
            found = _inner_variant(name).cases(kind, dtype, seed)
            return [_wrap_case(c, name, inner) for c in found[:1]]
        return [_wrap_case(c, name, inner)
                for name, picks in test_cases.items()
                for c in _inner_variant(name).cases(kind, dtype, seed) if c.name in picks]

    make_cases.__doc__ = (f"The inner core {inner.name!r}'s cases wrapped by diag(c) "
                          f"(test: {test_cases}).")
    return Variant(
        name=wrapped.name, kind="core", make_cases=make_cases, core=wrapped.name,
        summary=summary or f"diag(1/(||A_i||+eps)) {inner.name}(q, k, v): drop-in around "
                           f"{inner.name}")


#: The drop-ins' variants: one line per inner core.
DROP_IN_VARIANTS = (
    preconditioned_variant("elementwise", test_cases={
        "elementwise": ("mask with empty row + causal",),
        "elementwise-taylor-causal": ("t=4, two batch dims, GQA 4/2",)}),
    preconditioned_variant("shared", test_cases={
        "quaternion-shared": ("mask with empty row + causal", "bias (B,1,L,S), scale=0.3",
                              "packed varlen: window + causal + GQA 4/2 + softcap + alibi")}),
    preconditioned_variant("hamilton", test_cases={
        "quaternion-hamilton": ("mask with empty row + causal",
                                "window + causal lower_right + GQA 4/2 + softcap + alibi (B, H)")}),
)
