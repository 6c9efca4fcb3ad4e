"""Name the likely cause of a failing verify report: known mistakes, recomputed and compared.

Each :class:`Hypothesis` recomputes refattn's float64 reference output of a
failing case **under one classic mistake** (from the case's own rounded inputs,
:mod:`refattn.verify.recompute`) and compares it with the candidate's output.
A hypothesis *explains* a case when the candidate's output agrees with it to
the accuracy the passing check would accept (the output check's ``allowed``
relative error, on the recomputed output's scale).  :func:`diagnose` reports the
mistake that explains every failing case, or "no known cause".

The mistakes (:data:`HYPOTHESES`):

``softmax over queries``
    ``softmax`` normalised over axis -2 (queries), not -1 (keys).
``scale 1/d``, ``no scale``
    scores scaled by ``1/D`` or not at all instead of ``1/sqrt(D)`` (``D``: a
    head's feature count, ``4 d`` for quaternion cores).
``quaternion scale 1/sqrt(d)``
    quaternion scores scaled by one component's ``1/sqrt(d)``, not ``1/sqrt(4 d)``.
``causal mask not applied``, ``causal mask off by one``
    a causal case computed without its causal mask, or with query ``i`` also
    seeing key ``i + 1``.
``causal mask misaligned``
    upper-left instead of lower-right (or the reverse) when ``L != S``.
``kv heads tiled``
    grouped-query heads mapped ``h -> h mod Hkv`` (``repeat``) instead of
    ``h -> h // (H / Hkv)`` (``repeat_interleave``).
``w_<n> transposed``, ``all weights transposed``
    a layer weight (one of ``w_q, w_k, w_v, w_o``, or all) used as ``W^T``.
``quaternion sign convention``
    the transposed block signs of Tay et al.'s Hamilton code: refattn's layer
    with weights ``(W_r, -W_i, -W_j, -W_k)``.
``quaternion head layout``
    heads as contiguous chunks of the flat ``[r|i|j|k]`` vector (each split
    into four components), not units of every component.

Diagnosis runs only on failing cases, one recomputation per hypothesis and case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._masks import causal_keep, causal_offset
from ..masks import combined_keep
from ..projections.quaternion import merge_quaternion_heads, split_quaternion_heads
from .recompute import NotApplicable, Recompute, expand_kv_heads, head_axis, lengths

__all__ = ["HYPOTHESES", "Diagnosis", "Failure", "Hypothesis", "diagnose", "explains",
           "softmax_over_queries"]


@dataclass(frozen=True)
class Hypothesis:
    """A known mistake: ``recompute(r)`` gives the case's output under it (float64).

    ``recompute`` raises :class:`~refattn.verify.recompute.NotApplicable` for a
    case the mistake does not change (no causality, no grouped heads, a core
    without a scale, ...).
    """

    name: str
    description: str
    recompute: Callable[[Recompute], np.ndarray]


# -- core mistakes ------------------------------------------------------------------------

def _feature_count(q, layout):
    return int(math.prod(q.shape[head_axis(layout) + 2:]))


def _rescaled(factor: Callable[[int], float]):
    """A core change: ``scale = factor(D)``; applies where the default scale is ``1/sqrt(D)``."""

    def hypothesis(r: Recompute):
        if "scale" in _explicit_options(r):
            raise NotApplicable("the case sets the scale")

        def change(base):
            def call(q, k, v, options):
                D = _feature_count(q, r.layout)
                ref = base(q, k, v, options)
                try:
                    standard = base(q, k, v, {**options, "scale": 1.0 / math.sqrt(D)})
                except TypeError as exc:                   # a core without a scale
                    raise NotApplicable(str(exc)) from exc
                if not np.allclose(standard, ref, rtol=1e-12, atol=1e-12, equal_nan=True):
                    raise NotApplicable("the core's default scale is not 1/sqrt(D)")
                return base(q, k, v, {**options, "scale": factor(D)})
            return call

        return r.out(change)

    return hypothesis


def _component_scale(r: Recompute):
    if r.layout != "quaternion":
        raise NotApplicable("not a quaternion core")
    return _rescaled(lambda D: 1.0 / math.sqrt(D // 4))(r)


def _explicit_options(r: Recompute) -> dict:
    return dict(r.layer.core_options) if r.layer is not None else dict(r.problem.options)


def _causal_options(r: Recompute) -> dict:
    if r.layer is not None:
        return {"causal": r.layer.config.causal, **r.layer.core_options}
    return r.problem.options


def _require_causal(r: Recompute):
    if not _causal_options(r).get("causal"):
        raise NotApplicable("the case is not causal")


def _no_causal(r: Recompute):
    _require_causal(r)
    return r.out(lambda base: lambda q, k, v, o: base(q, k, v, {**o, "causal": False}))


def _misaligned(r: Recompute):
    _require_causal(r)

    def change(base):
        def call(q, k, v, options):
            L, S = lengths(q, k, r.layout)
            if L == S:
                raise NotApplicable("L == S: both alignments agree")
            align = options.get("causal_align", "upper_left")
            other = "lower_right" if align == "upper_left" else "upper_left"
            return base(q, k, v, {**options, "causal_align": other})
        return call

    return r.out(change)


def _off_by_one(r: Recompute):
    _require_causal(r)

    def change(base):
        def call(q, k, v, options):
            L, S = lengths(q, k, r.layout)
            offset = causal_offset(options.get("causal_align", "upper_left"), L, S) + 1
            keep = causal_keep(np, L, S, offset)
            mask = options.get("mask")
            keep = keep if mask is None else np.logical_and(mask, keep)
            return base(q, k, v, {**options, "causal": False, "mask": keep})
        return call

    return r.out(change)


def _tiled_kv_heads(r: Recompute):
    def change(base):
        def call(q, k, v, options):
            axis = head_axis(r.layout)
            H, Hkv = q.shape[axis], k.shape[axis]
            if Hkv in (1, H):
                raise NotApplicable("no grouped heads to map")
            return base(q, expand_kv_heads(k, H, r.layout, "tiled"),
                        expand_kv_heads(v, H, r.layout, "tiled"), options)
        return call

    return r.out(change)


#: Options :func:`softmax_over_queries` implements; a core call with others is not recomputed.
_SOFTMAX_OPTIONS = {"mask", "bias", "causal", "causal_align", "scale", "dropout_mask",
                    "dropout_p"}


def softmax_over_queries(q, k, v, *, mask=None, bias=None, causal=False,
                         causal_align="upper_left", scale=None, dropout_mask=None,
                         dropout_p=0.0):
    """``P v`` with ``P = softmax`` of the scores over the **queries** (axis -2): a mistake.

    ``q (*batch, H, L, E)``, ``k (*batch, Hkv, S, E)``, ``v (*batch, Hkv, S, Ev)``;
    ``P_ij = exp(s_ij) / sum_i' exp(s_i'j)`` over the kept queries ``i'`` of key
    ``j`` (0 for a key no query keeps), ``s = scale q k^T + bias``; a dropout
    keep-mask scales the kept entries by ``1 / (1 - dropout_p)``.

    Examples
    --------
    >>> import numpy as np
    >>> q = k = v = np.eye(2)[None]                      # H = 1, L = S = 2, E = 2
    >>> softmax_over_queries(q, k, v, scale=0.0)          # every column averages the queries
    array([[[0.5, 0.5],
            [0.5, 0.5]]])
    """
    H, L, E = q.shape[-3:]
    S = k.shape[-2]
    k, v = expand_kv_heads(k, H, "real"), expand_kv_heads(v, H, "real")
    s = (1.0 / math.sqrt(E) if scale is None else scale) * (q @ np.swapaxes(k, -1, -2))
    if bias is not None:
        s = s + bias
    keep = combined_keep(mask, causal, L, S, causal_align)
    keep = np.ones(s.shape, bool) if keep is None else np.broadcast_to(keep, s.shape)
    s = np.where(keep, s, -np.inf)
    top = np.max(s, axis=-2, keepdims=True)
    e = np.where(keep, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=-2, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v


def _softmax_axis(r: Recompute):
    if r.core_name not in ("sdpa", "shared"):              # a preconditioned core's inner one
        raise NotApplicable("the core is not a softmax over real or shared scores")

    def change(base):
        def call(q, k, v, options):
            if set(options) - _SOFTMAX_OPTIONS:
                raise NotApplicable("options beyond a plain softmax")
            kw = {n: options[n] for n in _SOFTMAX_OPTIONS if options.get(n) is not None}
            if r.layout == "quaternion":                    # shared scores: SDPA on 4 d features
                flat = [x.reshape(*x.shape[:-2], -1) for x in (q, k, v)]
                out = softmax_over_queries(*flat, **kw)
                return out.reshape(*out.shape[:-1], 4, -1)
            return softmax_over_queries(q, k, v, **kw)
        return call

    return r.out(change)


# -- layer mistakes -----------------------------------------------------------------------

def _layer_params(r: Recompute) -> dict:
    if r.layer is None:
        raise NotApplicable("a core case has no weights")
    return dict(r.problem.arrays[0])


def _transposed(names: tuple[str, ...] | None):
    def hypothesis(r: Recompute):
        params = _layer_params(r)
        chosen = [n for n in params if n.startswith("w_") and (names is None or n in names)
                  and params[n].ndim >= 2 and params[n].shape[-1] == params[n].shape[-2]]
        if not chosen or (names is None and len(chosen) < 2):
            raise NotApplicable("no square weight to transpose")
        return r.out(params={**params, **{n: np.swapaxes(params[n], -1, -2) for n in chosen}})
    return hypothesis


def _quaternion_signs(r: Recompute):
    params = _layer_params(r)
    if r.layout != "quaternion":
        raise NotApplicable("not a quaternion layer")
    sign = np.array([1.0, -1.0, -1.0, -1.0])[:, None, None]
    flipped = {n: (w * sign if n.startswith("w_") and w.ndim == 3 and w.shape[0] == 4 else w)
               for n, w in params.items()}
    return r.out(params=flipped)


def _quaternion_head_layout(r: Recompute):
    _layer_params(r)
    H = r.layer.config.n_heads if r.layer is not None else 1
    if r.layout != "quaternion" or H == 1:
        raise NotApplicable("a quaternion layer with one head has one layout")

    def chunks(x):
        """refattn's heads -> heads as contiguous chunks of the flat [r|i|j|k] vector."""
        flat = merge_quaternion_heads(np, x)                          # (*batch, T, 4 n)
        *batch, T, d = flat.shape
        nb = len(batch)
        x = flat.reshape(*batch, T, H, 4, d // (4 * H))              # (*batch, T, H, 4, dh)
        return np.transpose(x, (*range(nb), nb + 1, nb, nb + 2, nb + 3))

    def unchunk(o):
        """The inverse: merge chunk heads to the flat vector, split it as refattn's heads."""
        *batch, _, T, _, dh = o.shape
        nb = len(batch)
        flat = np.transpose(o, (*range(nb), nb + 1, nb, nb + 2, nb + 3)).reshape(
            *batch, T, 4 * H * dh)
        return split_quaternion_heads(np, flat, H)

    return r.out(heads=(chunks, unchunk))


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis("softmax over queries", "the softmax normalises over the queries (axis -2) "
               "instead of the keys (axis -1)", _softmax_axis),
    Hypothesis("scale 1/d", "the scores are scaled by 1/d instead of 1/sqrt(d)",
               _rescaled(lambda D: 1.0 / D)),
    Hypothesis("no scale", "the scores are not scaled (1 instead of 1/sqrt(d))",
               _rescaled(lambda D: 1.0)),
    Hypothesis("quaternion scale 1/sqrt(d)", "the quaternion scores are scaled by 1/sqrt(d) "
               "(one component's width) instead of 1/sqrt(4 d)", _component_scale),
    Hypothesis("causal mask not applied", "the causal mask is not applied (every query "
               "sees every key)", _no_causal),
    Hypothesis("causal mask off by one", "the causal mask lets query i see key i + 1",
               _off_by_one),
    Hypothesis("causal mask misaligned", "the causal mask is aligned at the other corner "
               "(upper-left vs lower-right) when L != S", _misaligned),
    Hypothesis("kv heads tiled", "grouped-query heads are mapped h -> h mod Hkv (repeat) "
               "instead of h -> h // (H/Hkv) (repeat_interleave)", _tiled_kv_heads),
    *(Hypothesis(f"w_{n} transposed", f"the weight w_{n} is used transposed (W^T instead of W)",
                 _transposed((f"w_{n}",))) for n in "qkvo"),
    Hypothesis("all weights transposed", "every projection weight is used transposed",
               _transposed(None)),
    Hypothesis("quaternion sign convention", "the quaternion layers use the transposed "
               "block signs (Tay et al.): refattn with weights (W_r, -W_i, -W_j, -W_k)",
               _quaternion_signs),
    Hypothesis("quaternion head layout", "heads are contiguous chunks of the flat [r|i|j|k] "
               "vector instead of units of every component", _quaternion_head_layout),
)


# -- matching -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One failing case to diagnose: its problem, the candidate's output, the check's bound.

    ``problem`` is a :class:`refattn.verify.run.Problem` (its ``recompute`` and
    ``rows``); ``allowed`` is the output check's accepted relative error, ``scale``
    the reference output's scale (``allowed x scale``: the accepted absolute error).
    """

    problem: Any
    got: np.ndarray
    allowed: float
    scale: float

    @property
    def case(self) -> str:
        return self.problem.case.name


def explains(hypothesis: Hypothesis, failure: Failure) -> bool:
    """Whether the candidate's output equals the case's output under ``hypothesis``.

    The rows compared are those with a key in both the reference and the
    hypothesis (a row with no key may follow any convention, :mod:`.empty_rows`).
    """
    r: Recompute = failure.problem.recompute
    try:
        alt = hypothesis.recompute(r)
    except (NotApplicable, ValueError, TypeError):    # a core that cannot take the change
        return False
    got = np.asarray(failure.got, np.float64)
    if alt.shape != got.shape:
        return False
    features = 2 if r.layout == "quaternion" and r.layer is None else 1
    rows = failure.problem.rows                                   # (*batch[, H], L) or None
    skip = np.zeros(got.shape[:-features], bool) if rows is None else rows
    skip = skip | np.all(alt == 0, axis=tuple(range(-features, 0)))   # the hypothesis's own
    keep = ~skip
    if not keep.any():
        return False
    a, g = alt[keep], got[keep]
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(g))):
        return False
    scale = max(failure.scale, float(np.max(np.abs(a), initial=0.0)))
    return bool(np.max(np.abs(a - g)) <= failure.allowed * scale)


@dataclass
class Diagnosis:
    """What explains a failing report (:func:`diagnose`).

    Attributes
    ----------
    cause : str or None
        The name of the hypothesis that explains every case whose output fails;
        None: no known cause.
    description : str
        One sentence, for the report.
    explained : dict
        ``{case: [hypothesis names]}`` for each failing output.
    unexplained : list of str
        Failing cases no hypothesis explains.
    gradient_only : list of str
        Cases whose output passes but a gradient fails (a backward-pass mistake:
        no forward hypothesis applies).
    tested : list of str
        The hypotheses tried.
    """

    cause: str | None
    description: str
    explained: dict = field(default_factory=dict)
    unexplained: list = field(default_factory=list)
    gradient_only: list = field(default_factory=list)
    tested: list = field(default_factory=list)

    def text(self) -> str:
        lines = [f"diagnosis: {self.description}"]
        if self.gradient_only and self.explained:
            lines.append(f"  the output agrees but gradients fail in "
                         f"{_cases(self.gradient_only)}: the backward pass differs")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"cause": self.cause, "description": self.description,
                "explained": {k: list(v) for k, v in self.explained.items()},
                "unexplained": list(self.unexplained), "gradient_only": list(self.gradient_only),
                "tested": list(self.tested)}


def _cases(names: list) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} case(s) ({shown})"


def diagnose(failures: list, gradient_only: Sequence[str] = (),
             hypotheses: tuple[Hypothesis, ...] = HYPOTHESES) -> Diagnosis:
    """The hypothesis that explains every failing output, or "no known cause".

    ``failures``: :class:`Failure` per case whose output fails (one problem per
    case: the most precise dtype that failed); ``gradient_only``: names of cases
    whose output passes but a gradient fails.
    """
    tested = [h.name for h in hypotheses]
    explained = {f.case: [h.name for h in hypotheses if explains(h, f)] for f in failures}
    unexplained = [case for case, names in explained.items() if not names]
    common = [h for h in hypotheses if failures and all(h.name in explained[f.case]
                                                        for f in failures)]
    if common:
        best = common[0]
        also = f" (equally: {', '.join(h.name for h in common[1:])})" if common[1:] else ""
        text = (f"likely cause: {best.description} ({best.name}: explains the output of "
                f"{'the' if len(failures) == 1 else 'all ' + str(len(failures))} failing "
                f"case{'s' if len(failures) > 1 else ''} to float rounding){also}")
        return Diagnosis(best.name, text, explained, unexplained, list(gradient_only), tested)
    if not failures:
        text = ("no known cause: the output agrees with the reference, only gradients fail "
                f"(the backward pass differs) in {_cases(list(gradient_only))}")
        return Diagnosis(None, text, explained, unexplained, list(gradient_only), tested)
    partial = sorted({n for names in explained.values() for n in names})
    text = "no known cause: none of the known mistakes explains every failing output"
    if partial:
        text += (f" (some cases match: {', '.join(f'{c}: {n[0]}' for c, n in explained.items() if n)})")
    return Diagnosis(None, text, explained, unexplained, list(gradient_only), tested)
