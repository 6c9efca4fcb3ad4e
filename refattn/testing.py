"""Public testing helpers: finite-difference gradient checks and tolerances.

Every backward pass in refattn is checked with :func:`check_grads`; users can
run the same check on their own compositions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _tolerance
from ._array import to_numpy
from ._vjp import vjp
from .typing import Array

__all__ = ["check_grads", "GradCheckReport", "TOLERANCES", "assert_close", "max_errors",
           "nonfinite_mismatch", "assert_within_reference_error", "reference_error_bound",
           "DIFFERENTIABLE_OPTIONS"]

#: ``(rtol, atol)`` for comparing a backend with the float64 reference, per dtype.
#: float64: a different summation order changes results by a few ulps times the
#: reduction length, far below 1e-10.  float32: the float32 reference itself differs
#: from the float64 one by about 1e-6 relative (unit roundoff 6e-8 times the
#: ~sqrt(S) growth of a dot product over S <= 2^12 keys); 2e-4 leaves room for the
#: online-softmax rescaling of fused kernels.  float16 (GPU, accumulating in float32):
#: unit roundoff 4.9e-4 on inputs and outputs.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-4, 2e-5),
    "float16": (2e-2, 2e-3),
}


def _as_float64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def _tolerances(dtype):
    """``(rtol, atol)`` of :data:`TOLERANCES` for a float dtype name, dtype or array dtype."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype).rsplit(".", 1)[-1]
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, TOLERANCES))} (the dtypes "
                         f"refattn compares in), got {dtype!r}")
    return TOLERANCES[name]


def nonfinite_mismatch(actual, expected):
    """Where ``actual`` and ``expected`` disagree on a non-finite value (bool array).

    A NaN must meet a NaN, a ``+inf`` a ``+inf`` and a ``-inf`` a ``-inf``: a
    non-finite value is matched exactly, never within a tolerance.
    """
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return (np.isnan(a) != np.isnan(e)) | (np.isposinf(a) != np.isposinf(e)) | (
        np.isneginf(a) != np.isneginf(e))


def max_errors(actual: Array, expected: Array) -> tuple[float, float]:
    """``(max_abs, max_rel)`` error, relative to the largest finite magnitude of ``expected``.

    Non-finite entries must match exactly (:func:`nonfinite_mismatch`); any mismatch
    makes both errors ``inf``.  Matching non-finite entries contribute nothing.
    """
    a = _as_float64(actual)
    e = _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {a.shape} != expected shape {e.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if nonfinite_mismatch(a, e).any():
        return float("inf"), float("inf")
    both = np.isfinite(e)
    if not both.any():
        return 0.0, 0.0
    diff = np.abs(a[both] - e[both])
    scale = max(float(np.max(np.abs(e[both]))), np.finfo(np.float64).tiny)
    return float(diff.max()), float(diff.max() / scale)


def assert_close(actual: Array, expected: Array, dtype: Any, what: str = "value",
                 rtol: float | None = None, atol: float | None = None) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (per-dtype defaults).

    Non-finite values are matched exactly: NaN only where NaN is expected, and an
    infinity only where the same infinity is expected.

    Parameters
    ----------
    actual, expected : arrays of the same shape (NumPy, CuPy or any array-API array)
    dtype : {"float64", "float32", "float16"}
        Selects the default ``(rtol, atol)`` of :data:`TOLERANCES`.
    what : str
        Named in the error message.
    rtol, atol : float, optional

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import assert_close
    >>> assert_close(np.array([1.0, np.nan]), np.array([1.0 + 1e-12, np.nan]), "float64")
    >>> assert_close(np.array([0.0]), np.array([np.inf]), "float64")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: value: 1 of 1 elements differ ... worst at (0,): 0.0 vs inf
    """
    r, a = _tolerances(dtype)
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    act = _as_float64(actual)
    exp = _as_float64(expected)
    if act.shape != exp.shape:
        raise AssertionError(f"{what}: shape {act.shape} != expected {exp.shape}")
    mismatch = nonfinite_mismatch(act, exp)
    finite = np.isfinite(act) & np.isfinite(exp)
    with np.errstate(invalid="ignore"):
        far = finite & ~(np.abs(act - exp) <= atol + rtol * np.abs(exp))
    bad = mismatch | far
    if bad.any():
        size = np.where(mismatch, np.inf, np.where(far, np.abs(act - exp), -1.0))
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(size), act.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {act.size} elements differ beyond rtol={rtol:g}, "
            f"atol={atol:g} ({dtype}); worst at {idx}: {float(act[idx])!r} vs "
            f"{float(exp[idx])!r}"
        )


def reference_error_bound(actual, expected, reference, dtype, *, gradient=False,
                          problem_scale=0.0):
    """``(error, bound)`` of :func:`assert_within_reference_error`, without raising.

    ``error = max|actual - expected|`` over the entries finite in ``expected`` and
    ``reference``; ``inf`` when a non-finite value does not match
    (:func:`nonfinite_mismatch`).  The check passes when ``error <= bound``.
    """
    name = np.dtype(dtype).name
    act, exp, ref = (_as_float64(x) for x in (actual, expected, reference))
    for label, x in (("actual", act), ("reference", ref)):
        if x.shape != exp.shape:
            raise AssertionError(f"{label} shape {x.shape} != expected {exp.shape}")
    if nonfinite_mismatch(act, exp).any():
        return float("inf"), 0.0
    finite = np.isfinite(exp) & np.isfinite(ref)
    if not finite.any():
        return 0.0, 0.0
    err = float(np.max(np.abs(act[finite] - exp[finite])))
    ref_err = float(np.max(np.abs(ref[finite] - exp[finite])))
    float32_err = ref_err * _tolerance.eps("float32") / _tolerance.eps(name)
    quantity = max(_tolerance.scale(float(np.max(np.abs(exp[finite]))), float32_err),
                   float(problem_scale))
    return err, _tolerance.bound(name, ref_err, quantity, gradient)


def assert_within_reference_error(actual: Array, expected: Array, reference: Array, dtype: Any,
                                  what: str = "value", *, gradient: bool = False,
                                  problem_scale: float = 0.0) -> None:
    """Assert that ``actual`` is as close to ``expected`` as a plain reference run in ``dtype`` is.

    The bound of :func:`refattn._tolerance.bound` (FlashAttention's and PyTorch's rule):
    ``max|actual - expected| <= factor * max|reference - expected| + floor``, where
    ``expected`` is the float64 reference, ``reference`` refattn's reference backend run
    in ``dtype`` on the same (rounded) inputs, ``factor`` 2 for outputs and 3 for
    gradients, and the floor a few ulps of ``dtype`` times the quantity's scale.  The
    tolerance thus follows the problem: a gradient that cancels to about zero in exact
    arithmetic is judged by the size of the terms it sums, which the reference's own
    error reveals.  Where the low-precision reference happens to be exact too (a
    gradient that is exactly 0 on a one-key row), ``problem_scale`` (e.g. the largest
    magnitude of the case's output and gradients) stands in for the terms' size, like
    the absolute floor of PyTorch's tolerances.  Non-finite values must match exactly
    (:func:`nonfinite_mismatch`).

    Examples
    --------
    >>> import numpy as np, refattn
    >>> from refattn.testing import assert_within_reference_error
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 64, 16)) for _ in range(3))
    >>> exact = refattn.sdpa(q, k, v, backend="reference")
    >>> low = [x.astype(np.float32) for x in (q, k, v)]
    >>> assert_within_reference_error(refattn.sdpa(*low, backend="numba"), exact,
    ...                               refattn.sdpa(*low, backend="reference"), "float32")
    """
    mismatch = nonfinite_mismatch(_as_float64(actual), _as_float64(expected))
    if mismatch.any():
        act, exp = _as_float64(actual), _as_float64(expected)
        idx = tuple(int(i) for i in np.argwhere(mismatch)[0])
        raise AssertionError(f"{what}: {int(mismatch.sum())} non-finite entries differ; first at "
                             f"{idx}: {float(act[idx])!r} vs {float(exp[idx])!r}")
    err, limit = reference_error_bound(actual, expected, reference, dtype, gradient=gradient,
                                       problem_scale=problem_scale)
    if not err <= limit:
        name = np.dtype(dtype).name
        raise AssertionError(
            f"{what}: max error {err:.3e} exceeds the {name} bound {limit:.3e} "
            f"({_tolerance.GRADIENT_FACTOR if gradient else _tolerance.OUTPUT_FACTOR:g} x the "
            f"{name} reference's own error + {_tolerance.FLOOR_ULPS[name]} ulps of the scale)")


#: Float options whose gradients a pullback returns after the positional inputs, in order.
DIFFERENTIABLE_OPTIONS = ("bias", "alibi_slopes")


def _map(f, x):
    if isinstance(x, dict):
        return {k: f(v) for k, v in x.items()}
    return f(x)


def _leaves(x, prefix):
    if isinstance(x, dict):
        return [(f"{prefix}[{k!r}]", k) for k in x]
    return [(prefix, None)]


def _vdot(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


@dataclass
class GradCheckReport:
    """Per-input results of :func:`check_grads`."""

    rtol: float
    rows: list = field(default_factory=list)   # (input, direction, analytic, numeric, rel_err)

    @property
    def max_rel_error(self) -> float:
        return max((r[4] for r in self.rows), default=0.0)

    @property
    def ok(self) -> bool:
        return all(r[5] for r in self.rows)

    def __repr__(self) -> str:
        lines = [f"GradCheckReport(rtol={self.rtol:g}, ok={self.ok}, "
                 f"max_rel_error={self.max_rel_error:.2e})"]
        for name, d, an, fd, rel, ok in self.rows:
            lines.append(f"  {name:<16} dir {d}: analytic {an:+.10e}  numeric {fd:+.10e}  "
                         f"rel {rel:.1e}{'' if ok else '  FAIL'}")
        return "\n".join(lines)


def check_grads(fn: Callable[..., Any], *arrays: Any, fd_step: float = 1e-6, rtol: float = 1e-6,
                atol: float = 1e-9, n_directions: int = 2, seed: int = 0,
                raise_on_failure: bool = True, **options: Any) -> GradCheckReport:
    """Check ``refattn.vjp(fn, ...)`` against central finite differences in float64.

    For a random cotangent ``w`` and random directions ``u`` (one per input, or
    per parameter of a parameter dict), compares the analytic directional
    derivative ``<pullback(w)_i, u>`` with
    ``(<w, f(x + h u)> - <w, f(x - h u)>) / (2 h)``, ``h = fd_step``.

    Parameters
    ----------
    fn : callable with a refattn backward pass (e.g. :func:`refattn.sdpa`, a layer)
    *arrays : the differentiable inputs (arrays, or a dict of arrays)
    fd_step : float
        Finite-difference step (named so as not to shadow a core's own ``eps``
        option, which is passed through like any other).  The truncation error is
        ``O(fd_step^2)`` and the rounding error ``O(1e-16 / fd_step)``, both below
        ``1e-9`` relative at ``1e-6``.
    rtol, atol : float
        A direction passes when
        ``|numeric - analytic| <= rtol * max(|numeric|, |analytic|, atol / rtol)``.
    n_directions : int
    seed : int
    raise_on_failure : bool
    **options
        Keyword options of ``fn``; the float options of :data:`DIFFERENTIABLE_OPTIONS`
        (``bias``, ``alibi_slopes``) are differentiated too, in that order.

    Returns
    -------
    GradCheckReport

    Examples
    --------
    >>> import numpy as np, refattn
    >>> from refattn.testing import check_grads
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    >>> check_grads(refattn.sdpa, q, k, v, causal=True).ok
    True
    """
    rng = np.random.default_rng(seed)
    arrays = tuple(_map(lambda a: np.asarray(to_numpy(a), dtype=np.float64), a) for a in arrays)
    differentiable = [n for n in DIFFERENTIABLE_OPTIONS if options.get(n) is not None]
    options = {**options, **{n: np.asarray(to_numpy(options[n]), dtype=np.float64)
                             for n in differentiable}}
    out, pullback = vjp(fn, *arrays, **options)
    w = rng.standard_normal(np.shape(out))
    grads = pullback(w)
    if not isinstance(grads, tuple):
        grads = (grads,)
    targets: list[Any] = list(range(len(arrays)))
    if len(grads) == len(arrays) + len(differentiable):
        targets += differentiable
    if len(grads) != len(targets):
        raise AssertionError(f"pullback returned {len(grads)} gradients for {len(targets)} inputs")

    def objective(args, opts):
        return _vdot(w, to_numpy(fn(*args, **opts)))

    report = GradCheckReport(rtol)
    for t, g in zip(targets, grads):
        base = options[t] if isinstance(t, str) else arrays[t]
        label = t if isinstance(t, str) else f"input {t}"
        for name, key in _leaves(base, label):
            x0 = base[key] if key is not None else base
            gx = to_numpy(g[key] if key is not None else g)
            if np.shape(gx) != np.shape(x0):
                raise AssertionError(f"gradient of {name} has shape {np.shape(gx)}, "
                                     f"expected {np.shape(x0)}")
            for d in range(n_directions):
                u = rng.standard_normal(np.shape(x0))
                values = []
                for sign in (1.0, -1.0):
                    xs = x0 + sign * fd_step * u
                    new: Any = dict(base) if key is not None else None
                    if key is not None:
                        new[key] = xs
                    moved = new if key is not None else xs
                    if isinstance(t, str):
                        values.append(objective(arrays, {**options, t: moved}))
                    else:
                        args = list(arrays)
                        args[t] = moved
                        values.append(objective(tuple(args), options))
                numeric = (values[0] - values[1]) / (2 * fd_step)
                analytic = _vdot(gx, u)
                diff = abs(numeric - analytic)
                # Relative error, floored so that a true zero derivative (e.g. a key bias,
                # which softmax ignores) is judged by atol instead of by rounding noise.
                denom = max(abs(numeric), abs(analytic), atol / rtol)
                rel = diff / denom
                report.rows.append((name, d, analytic, numeric, rel, bool(rel <= rtol)))
    if raise_on_failure and not report.ok:
        raise AssertionError(f"gradient check failed for {getattr(fn, '__name__', fn)!r}:\n"
                             f"{report!r}")
    return report
