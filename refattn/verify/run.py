"""``verify``: run a framework candidate and the float64 reference on seeded cases, compare."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..catalog import Variant, get_variant
from ..cores import get_core
from .._vjp import vjp
from . import empty_rows as _empty_rows
from . import tolerance
from .adapters import (Layer, LayerSpec, Unsupported, accepts, default_jax_call,
                       default_torch_call, framework_keywords, jax_dot_product_attention,
                       named_keyword, torch_flex_attention, torch_multihead_attention,
                       torch_sdpa)
from .diagnose import Failure, diagnose
from .frameworks import detect_framework, load_framework
from .params import gather_gradients, resolve_map
from .recompute import Recompute, head_axis
from .report import Check, VerifyReport

__all__ = ["verify", "reference_problem", "Problem", "quantities"]


def _map(f, x):
    return {k: f(a) for k, a in x.items()} if isinstance(x, dict) else f(x)


def _input_names(fn, count):
    """The first ``count`` positional parameter names of ``fn`` (``q, k, v``; ``params, xq``)."""
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count]


def quantities(out, grads, names) -> dict:
    """Flatten ``out`` and the gradients of inputs ``names`` into ``{quantity: float64 array}``.

    ``"out"``, then ``"d<name>"`` per input (a parameter dict gives ``"d<param>"``
    per parameter) and ``"dbias"`` when the gradients include a bias's.
    """
    result = {"out": np.asarray(out, np.float64)}
    names = list(names) + (["bias"] if len(grads) > len(names) else [])
    for name, g in zip(names, grads):
        if isinstance(g, dict):
            result.update({f"d{k}": np.asarray(v, np.float64) for k, v in g.items()})
        else:
            result[f"d{name}"] = np.asarray(g, np.float64)
    return result


class Problem:
    """One case in one dtype: rounded inputs, cotangent, and the reference's answers.

    Attributes
    ----------
    case : refattn Case (float64)
    dtype : str
    arrays : tuple
        The case's differentiable inputs rounded to ``dtype`` (held as float64).
    options : dict
        The case's options; a float ``bias`` rounded like the inputs.
    names : list of str
        Input names (``["q", "k", "v"]``, ``["params", "xq", "xkv"]``).
    cotangent : ndarray
        Seeded, rounded to ``dtype``.
    expected : dict
        ``{quantity: float64 reference}``: ``"out"``, ``"d<name>"`` per input (a
        parameter dict contributes ``"d<param>"`` per parameter), ``"dbias"``.
    float32 : dict
        The same quantities from the reference run in float32.
    core : refattn.cores.Core, optional
        The core of a core case (a layer's core is its own): the recomputations
        of :mod:`refattn.verify.empty_rows` and :mod:`refattn.verify.diagnose` need it.
    empty_rows : {"zero", "uniform", "nan"}
        The convention the empty rows are compared under (verify's ``empty_rows=``).
    fallback : str or None
        None: the ``"exact"`` comparison, the reference runs the case under the
        cores' option ``empty_rows=`` (:func:`refattn.verify.empty_rows.reference_case`).
        Otherwise why the empty rows get the ``"output"`` comparison instead:
        ``expected["out"]`` holds the convention's values on those rows and the
        cotangent is 0 there, so the gradients do not depend on them.
    candidate_options : dict
        The options a core candidate is offered: :attr:`options`, and the
        policy ``empty_rows`` under the ``"exact"`` comparison (passed only to a
        candidate whose signature names the keyword).
    rows : ndarray or None
        The output rows with no key: ``(*batch, H, L)`` (core), ``(*batch, L)`` (layer).
    """

    def __init__(self, case, dtype, fw, seed, *, core=None, empty_rows="zero", additive=False):
        self.case, self.dtype = case, dtype
        self.core, self.empty_rows = core, empty_rows
        reference, self.fallback = _empty_rows.reference_case(case, empty_rows, core, additive)
        self.names = _input_names(case.fn, len(case.arrays))
        self.arrays = tuple(_map(lambda a: fw.round(a, dtype), a) for a in case.arrays)
        self.options = self._rounded(case.options, fw)
        self.candidate_options = self._rounded(reference.options, fw)
        out, pullback = vjp(reference.fn, *self.arrays, backend="reference",
                            **self.candidate_options)
        rng = np.random.default_rng(seed)
        self.cotangent = fw.round(rng.standard_normal(np.shape(out)), dtype)
        output_only = self.fallback is not None and self.rows is not None
        if output_only:
            self.cotangent = _empty_rows.zero_rows(self.cotangent, self.rows)
        self.expected = self.quantities(out, pullback(self.cotangent))
        to32 = (lambda a: np.asarray(a, np.float32) if isinstance(a, np.ndarray)
                and a.dtype == np.float64 else a)
        out32, pull32 = vjp(reference.fn, *(_map(to32, a) for a in self.arrays),
                            backend="reference",
                            **{k: to32(v) for k, v in self.candidate_options.items()})
        self.float32 = self.quantities(out32, pull32(to32(self.cotangent)))
        if output_only:
            convention = _empty_rows.expected_out(self.recompute, empty_rows)
            self.expected["out"] = convention
            self.float32["out"] = np.where(self._row_mask(convention.shape), convention,
                                           self.float32["out"])

    def _rounded(self, options, fw):
        """``options`` with a float ``bias`` rounded like the inputs."""
        options = dict(options)
        if options.get("bias") is not None:
            options["bias"] = fw.round(options["bias"], self.dtype)
        return options

    @property
    def comparison(self) -> str:
        """How the empty rows were compared: ``"exact"`` or ``"output"``.

        ``"exact"`` also for a fallback case without empty rows (nothing was left out).
        """
        return "exact" if self.fallback is None or self.rows is None else "output"

    @functools.cached_property
    def recompute(self) -> Recompute:
        """This problem's :class:`~refattn.verify.recompute.Recompute`."""
        return Recompute(self, self.core)

    @property
    def layout(self) -> str:
        return self.recompute.layout

    @functools.cached_property
    def rows(self):
        return self.recompute.empty_rows()

    def _row_mask(self, shape):
        rows = self.rows
        return np.broadcast_to(rows.reshape(rows.shape + (1,) * (len(shape) - rows.ndim)), shape)

    @property
    def batch(self) -> tuple:
        """The batch dimensions of the inputs."""
        first = self.arrays[1] if self.is_layer else self.arrays[0]
        return tuple(first.shape[:-2] if self.is_layer else first.shape[:head_axis(self.layout)])

    def nan_allowed(self, quantity, shape):
        """Where ``quantity`` may be NaN under ``empty_rows="nan"`` (False elsewhere)."""
        if self.empty_rows != "nan" or self.fallback is None or quantity == "out":
            return np.zeros((), bool)
        batched = quantity in {f"d{n}" for n in self.names if n != "params"} | {"dbias"}
        return _empty_rows.nan_region(self.rows, self.batch, shape, batched)

    @property
    def is_layer(self) -> bool:
        return self.names[:1] == ["params"]

    def quantities(self, out, grads) -> dict:
        return quantities(out, grads, self.names)

    def layer_spec(self):
        """The case's :class:`LayerSpec`; ``spec.empty_rows`` is the convention compared under
        (verify's ``empty_rows=``, or the layer's own core option)."""
        spec = LayerSpec.from_case(self.case, self.dtype)
        if self.empty_rows != "zero" and spec.empty_rows == "zero":
            spec = dataclasses.replace(spec, empty_rows=self.empty_rows)
        return spec


def reference_problem(case, dtype="float64", seed=0, framework=None, *, core=None,
                      empty_rows="zero", additive=False):
    """The :class:`Problem` of ``case`` in ``dtype`` (rounding through ``framework``, or NumPy)."""
    return Problem(case, dtype, framework or _NumpyRounding(), seed, core=core,
                   empty_rows=empty_rows, additive=additive)


class _NumpyRounding:
    @staticmethod
    def round(x, dtype):
        return np.asarray(np.asarray(x).astype(dtype), np.float64)


# -- running candidates ----------------------------------------------------------------

def _run_core(fn, problem, fw, selectors=(), gradients=True):
    options = dict(problem.candidate_options)
    if "empty_rows" in options and not named_keyword(fn, "empty_rows"):
        del options["empty_rows"]         # it describes the candidate, which need not take it
    # e.g. mode="shared" names the variant: a candidate of that variant alone need not take it
    options = {k: v for k, v in options.items() if accepts(fn, k) or k not in selectors}
    bias = options.pop("bias", None)
    wide = sum(max(np.shape(a)) for a in problem.arrays[:2])    # beyond any query-key distance
    options = framework_keywords(fn, options, wide)
    if bias is not None and not accepts(fn, "bias"):
        raise Unsupported("the candidate takes no bias= keyword")
    static = {k: (fw.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in options.items()}
    primals = list(problem.arrays) + ([bias] if bias is not None else [])
    n = len(problem.arrays)

    def f(*xs):
        extra = {"bias": xs[n]} if bias is not None else {}
        return fn(*xs[:n], **static, **extra)

    if not gradients:
        out, out_dtype = fw.forward(f, primals, problem.dtype)
        return {"out": out}, out_dtype
    out, grads, out_dtype = fw.vjp(f, primals, problem.cotangent, problem.dtype)
    return problem.quantities(out, grads), out_dtype


def _layer_inputs(problem):
    params, xq, *rest = problem.arrays
    return params, xq, (rest[0] if rest else None), problem.options.get("mask")


def _run_torch_layer(layer, problem, fw):
    torch = fw.torch
    spec = problem.layer_spec()
    params, xq, xkv, mask = _layer_inputs(problem)
    module = layer.factory(spec)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"the factory returned {type(module).__name__}, expected a torch.nn.Module")
    module = module.to(getattr(torch, problem.dtype))
    named = dict(module.named_parameters())
    mapping = resolve_map(layer.param_map(spec), list(params), list(named))
    with torch.no_grad():
        for cname, conv in mapping.items():
            value = conv.to_candidate(params, tuple(named[cname].shape))
            if tuple(named[cname].shape) != value.shape:
                raise ValueError(f"candidate parameter {cname!r} has shape "
                                 f"{tuple(named[cname].shape)}; the parameter map builds "
                                 f"{value.shape} from refattn's {list(conv.names)}")
            named[cname].copy_(fw.asarray(value, problem.dtype))
    leaves = [named[c].requires_grad_(True) for c in mapping]
    inputs, flat_inputs = fw.leaves([xq] + ([xkv] if xkv is not None else []), problem.dtype)
    call = layer.call or default_torch_call
    out = call(module, inputs[0], inputs[1] if xkv is not None else None,
               None if mask is None else fw.asarray(mask), spec)
    grads = fw.grad(out, leaves + flat_inputs, problem.cotangent)
    shapes = {n: np.shape(a) for n, a in params.items()}
    dparams = gather_gradients(mapping, grads[:len(leaves)], shapes)
    return (problem.quantities(fw.to_numpy(out), (dparams, *grads[len(leaves):])),
            fw.dtype_name(out))


def _run_jax_layer(layer, problem, fw):
    spec = problem.layer_spec()
    params, xq, xkv, mask = _layer_inputs(problem)
    fn = layer.factory(spec)
    mapping = layer.param_map(spec)
    mapping = resolve_map(mapping, list(params),
                          list(params) if mapping is None else
                          [c for c, conv in mapping.items()
                           if all(n in params for n in conv.names)])
    cand_params = {c: conv.to_candidate(params) for c, conv in mapping.items()}
    mask_ = None if mask is None else fw.asarray(mask)
    call = layer.call or default_jax_call

    def f(p, xq_, *rest):
        return call(fn, p, xq_, rest[0] if rest else None, mask_, spec)

    primals = [cand_params, xq] + ([xkv] if xkv is not None else [])
    out, grads, out_dtype = fw.vjp(f, primals, problem.cotangent, problem.dtype)
    dparams = gather_gradients(mapping, [grads[0][c] for c in mapping],
                               {n: np.shape(a) for n, a in params.items()})
    return problem.quantities(out, (dparams, *grads[1:])), out_dtype


# -- comparing -------------------------------------------------------------------------

def max_abs_error(got, expected) -> float:
    """``max |got - expected|``: NaN when ``got`` is NaN where ``expected`` is not.

    Entries NaN in both count as equal (a reference that is NaN there by its
    documented policy).  Raises ``ValueError`` on a shape mismatch.
    """
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"the candidate returned shape {got.shape}, expected {expected.shape}")
    if got.size == 0:
        return 0.0
    got_nan, ref_nan = np.isnan(got), np.isnan(expected)
    if (got_nan & ~ref_nan).any():
        return float("nan")
    if (ref_nan & ~got_nan).any():
        return float("inf")
    same = (got == expected) | (got_nan & ref_nan)          # also equal infinities
    with np.errstate(invalid="ignore"):                     # inf - inf where ``same``
        return float(np.max(np.where(same, 0.0, np.abs(got - expected))))


def _compare(problem, got, out_dtype):
    checks = []
    label = problem.case.name
    for quantity, expected in problem.expected.items():
        ref32_err = max_abs_error(problem.float32[quantity], expected)
        finite = np.abs(expected[np.isfinite(expected)])          # NaN rows: empty_rows="nan"
        scale = tolerance.scale(float(np.max(finite, initial=0.0)), ref32_err)
        ref_err = (ref32_err if problem.dtype == "float32"
                   else tolerance.reference_error(ref32_err, problem.dtype))
        gradient = quantity != "out"
        allowed = tolerance.bound(problem.dtype, ref_err, scale, gradient)
        if quantity not in got:
            checks.append(Check(label, problem.dtype, quantity, status="FAIL",
                                note="the candidate returned no such gradient"))
            continue
        value, accepted = _accept_nan(problem, quantity, got[quantity], expected)
        try:
            abs_err = max_abs_error(value, expected)
        except ValueError as exc:                       # shape mismatch
            checks.append(Check(label, problem.dtype, quantity, status="FAIL", note=str(exc)))
            continue
        ok = abs_err <= allowed                        # False for NaN
        note = "" if ok else _hint(value, expected)
        if accepted:
            note = (f"{accepted} NaN entries from the empty rows accepted (empty_rows='nan')"
                    + (f"; {note}" if note else ""))
        if not ok and problem.dtype == "float64" and abs_err <= tolerance.bound(
                "float32", ref32_err, scale, gradient):
            note = f"float32-level error in a float64 run; {note}"
        if quantity == "out" and out_dtype != problem.dtype:
            ok, note = False, f"returned {out_dtype}, expected {problem.dtype}"
        checks.append(Check(label, problem.dtype, quantity, abs_err, abs_err / scale,
                            ref_err / scale, allowed / scale, "ok" if ok else "FAIL", note,
                            scale))
    return checks


def _accept_nan(problem, quantity, got, expected):
    """``got`` with its NaN entries where ``empty_rows="nan"`` allows them set to ``expected``.

    Returns ``(value, count)``: the finite entries are compared as they are.
    """
    got = np.asarray(got, np.float64)
    if (problem.empty_rows != "nan" or problem.fallback is None or problem.rows is None
            or got.shape != np.shape(expected)):
        return got, 0
    allowed = np.broadcast_to(problem.nan_allowed(quantity, got.shape), got.shape)
    nan = np.isnan(got) & allowed & ~np.isnan(expected)
    return (np.where(nan, expected, got), int(nan.sum())) if nan.any() else (got, 0)


def _digits(a: float, b: float) -> int:
    """Significant digits that tell ``a`` from ``b`` apart (4 to 17)."""
    diff, size = abs(a - b), max(abs(a), abs(b))
    if not np.isfinite(diff) or diff == 0 or size == 0:
        return 4
    return int(min(17, max(4, np.ceil(np.log10(size / diff)) + 2)))


def _hint(got, expected):
    """Where the largest error sits (index), with digits enough to see the difference."""
    got = np.asarray(got, np.float64)
    bad = np.isnan(got) & ~np.isnan(expected)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return f"NaN where the reference is finite, first at {idx} (reference {expected[idx]:+.6g})"
    with np.errstate(invalid="ignore"):
        diff = np.where((got == expected) | (np.isnan(got) & np.isnan(expected)), 0.0,
                        np.abs(got - expected))
    diff = np.where(np.isnan(diff), np.inf, diff)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    a, b = float(got[idx]), float(expected[idx])
    n = _digits(a, b)
    return f"worst at {tuple(int(i) for i in idx)}: {a:+.{n}g} vs {b:+.{n}g}"


# -- the entry point -------------------------------------------------------------------

def _known(candidate, kind, fw_name):
    """Wrap the frameworks' own attention (recognised by identity) in their adapters."""
    torch, jax = sys.modules.get("torch"), sys.modules.get("jax")
    if fw_name == "torch" and torch is not None:
        if kind == "core" and candidate is torch.nn.functional.scaled_dot_product_attention:
            return torch_sdpa(), "torch.nn.functional.scaled_dot_product_attention"
        flex = sys.modules.get("torch.nn.attention.flex_attention")
        if kind == "core" and flex is not None and candidate is flex.flex_attention:
            return torch_flex_attention(), "torch.nn.attention.flex_attention.flex_attention"
        if kind == "layer" and isinstance(candidate, type) and issubclass(
                candidate, torch.nn.MultiheadAttention):
            adapter = torch_multihead_attention(candidate)
            return adapter, adapter.name
    if fw_name == "jax" and jax is not None and kind == "core":
        if candidate is jax.nn.dot_product_attention:
            return jax_dot_product_attention(), "jax.nn.dot_product_attention"
    return candidate, _describe(candidate)


def _describe(candidate) -> str:
    if getattr(candidate, "name", None) and isinstance(candidate, Layer):
        return str(candidate.name)
    obj = getattr(candidate, "factory", candidate)
    obj = getattr(obj, "func", obj)                              # functools.partial
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    mod = getattr(obj, "__module__", "") or ""
    text = f"{mod}.{name}" if mod and mod not in ("__main__", "builtins") else name
    return text + (" (pass name= to name it)" if "<lambda>" in text else "")


def _framework_of(candidate, variant, cases):
    found = detect_framework(getattr(candidate, "factory", candidate))
    if found is None and variant.kind == "layer" and cases:
        # A factory reveals its framework by what it builds.
        factory = getattr(candidate, "factory", candidate)
        probe = next((c for c in cases if hasattr(c.fn, "config")), None)
        if probe is not None:
            try:
                found = detect_framework(factory(LayerSpec.from_case(probe)))
            except Exception:
                found = None
    if found is None:
        raise TypeError(f"cannot tell whether {_describe(candidate)} is a PyTorch or a JAX "
                        f"candidate; pass framework='torch' or framework='jax'")
    return found


def verify(candidate: Any, variant: str | Variant, *, framework: str | None = None,
           dtypes: Sequence[str] = ("float64", "float32"), cases: Any = "test", seed: int = 0,
           params: Any = None, call: Callable[..., Any] | None = None,
           name: str | None = None, empty_rows: str = "zero",
           gradients: bool = True) -> VerifyReport:
    """Verify a PyTorch or JAX implementation against refattn's float64 reference.

    For every seeded case of ``variant`` (its catalogue ``"test"`` cases: shapes,
    masks, causal alignments, GQA, ...) and every dtype, the inputs are drawn in
    float64 and rounded to the dtype; the candidate runs on them and its
    framework's autograd computes the gradients for a random cotangent
    (``torch.autograd.grad`` / ``jax.vjp``); refattn's float64 reference runs on the
    same rounded values.  Each output and gradient passes when its error is within
    a small multiple of the error refattn's own reference makes in that dtype,
    plus a floor (:mod:`refattn.verify.tolerance`).

    Parameters
    ----------
    candidate : callable or Layer
        A core: ``candidate(q, k, v, **options) -> o`` on framework arrays, in
        refattn's conventions (head-first, ``mask`` True = attend; see
        :mod:`refattn.verify.adapters`).  ``torch.nn.functional.scaled_dot_product_attention``
        and ``jax.nn.dot_product_attention`` are recognised and adapted.
        A layer: a :class:`refattn.verify.Layer`, or a factory ``factory(spec)``
        returning a ``torch.nn.Module`` (or JAX function); the class
        ``torch.nn.MultiheadAttention`` is recognised.
    variant : str or Variant
        A registered variant (``refattn.variants()``): ``"sdpa"``, ``"mha-standard"``, ...
    framework : {"torch", "jax"}, optional
        Detected from the candidate when possible.
    dtypes : sequence of str
        Among ``"float64", "float32", "float16", "bfloat16"``.
    cases : str or list of Case
        A case kind of the catalogue (``"test"``) or explicit float64 cases.
    seed : int
        Seeds the cases and the cotangents.
    params, call
        For a layer factory: the parameter map and call adapter of :class:`Layer`.
    name : str, optional
        The candidate's name in the report (default: its qualified name, or the
        adapter's).
    empty_rows : {"zero", "uniform", "nan"}
        The convention the candidate follows for a query row that keeps no key
        (``docs/conventions.md``, "Empty-row policies"): refattn's 0 (default),
        the mean of all values (a ``finfo.min`` fill), or NaN (a ``-inf`` fill).
        Wherever the case's core has the option, the reference runs under the
        cores' own ``empty_rows=`` and every output and gradient is compared
        exactly (``"exact"``; a core candidate whose signature names
        ``empty_rows`` is passed it).  Where it does not model the candidate,
        the empty rows' output alone is compared with the convention's values (``"output"``;
        their cotangent is 0, and under ``"nan"`` NaN is accepted in the
        gradients it reaches): a core without the option (element-wise
        attention), or a candidate that adds its mask to the scores (a
        :class:`Layer` with ``masks_additively=True``, as the Hugging Face
        adapters).  ``report.comparisons`` says which comparison each case got
        (:mod:`refattn.verify.empty_rows`).
    gradients : bool
        Compare the gradients too (default).  ``False`` compares the outputs alone, for
        a core candidate without a backward pass (FlexAttention on the CPU).

    Returns
    -------
    VerifyReport
        ``repr`` is a table; ``report.assert_()`` raises with the failures.
        A failing report also says which empty-row convention the candidate
        follows, when its failures are only there (``report.conventions``), and
        the likely cause among known mistakes (``report.diagnosis``,
        :mod:`refattn.verify.diagnose`).

    Examples
    --------
    >>> import refattn
    >>> torch = __import__("pytest").importorskip("torch")
    >>> report = refattn.verify.verify(torch.nn.functional.scaled_dot_product_attention, "sdpa")
    >>> report.ok
    True
    """
    variant = variant if isinstance(variant, Variant) else get_variant(variant)
    dtypes = tuple(dtypes)
    bad = [d for d in dtypes if d not in tolerance.DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {tolerance.DTYPES}, got {dtypes}")
    if variant.kind == "core" and (params is not None or call is not None):
        raise TypeError(f"params= and call= apply to layer variants; {variant.name!r} is a core")
    if variant.kind != "core" and not gradients:
        raise TypeError(f"gradients=False applies to core variants; {variant.name!r} is a layer")
    _empty_rows.check_policy(empty_rows)
    core = get_core(variant.core)
    case_list = (variant.cases(cases, "float64", seed) if isinstance(cases, str)
                 else list(cases))
    fw_name = framework or _framework_of(candidate, variant, case_list)
    fw = load_framework(fw_name)
    candidate, description = _known(candidate, variant.kind, fw_name)
    if variant.kind == "layer" and not isinstance(candidate, Layer):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(candidate, torch.nn.Module):
            raise TypeError(f"pass a factory (spec -> module) or the module class, not a "
                            f"{type(candidate).__name__} instance: the cases of {variant.name!r} "
                            f"need layers of several configurations (bias, causal, sizes), "
                            f"e.g. verify(lambda spec: {type(candidate).__name__}(spec.d_model, "
                            f"spec.n_heads, ...), {variant.name!r})")
        candidate = Layer(candidate, params=params, call=call, name=description)
    if variant.kind == "core" and not callable(candidate):
        raise TypeError(f"candidate must be callable, got {type(candidate).__name__}")
    report = VerifyReport(variant.name, name or description, f"{fw.name} {fw.version}",
                          empty_rows=empty_rows)
    selectors = _selectors(case_list)
    additive = bool(getattr(candidate, "masks_additively", False))
    runs = []
    for index, case in enumerate(case_list):
        for dtype in dtypes:
            checks, problem, got = _check(candidate, case, dtype, fw, seed * 1000 + index,
                                          selectors, core, empty_rows, gradients, additive)
            report.checks.extend(checks)
            runs.append((checks, problem, got))
            if problem is not None and empty_rows != "zero":
                report.comparisons[case.name] = problem.comparison
                if problem.comparison == "output":
                    report.output_only[case.name] = problem.fallback
    if report.failures:
        _explain(report, runs)
    return report


def _explain(report, runs):
    """Name the empty-row convention and the likely cause of the failures (only on failure).

    Per failing case, the most precise dtype that failed is examined (a case
    whose failures there are all float32-level, already noted, is skipped): a
    case whose output fails only on its empty rows, where it follows another
    convention, is recorded in ``report.conventions``; the other failing outputs
    go to :func:`refattn.verify.diagnose.diagnose`.
    """
    by_case: dict = {}
    for checks, problem, got in runs:
        if problem is not None and any(c.failed for c in checks):
            by_case.setdefault(problem.case.name, []).append((checks, problem, got))
    failures, gradient_only = [], []
    for case, failed in by_case.items():
        checks, problem, got = min(failed, key=lambda run: tolerance.eps(run[1].dtype))
        if all(c.note.startswith("float32-level") for c in checks if c.failed):
            continue                           # float32 arithmetic: the rows' notes say so
        out = next((c for c in checks if c.quantity == "out"), None)
        if out is None or out.allowed is None or "out" not in got:
            continue
        if out.status == "ok":
            gradient_only.append(case)
            if (report.empty_rows != "zero" and problem.fallback is None
                    and problem.rows is not None):
                report.empty_row_gradients.append(case)
            continue
        if problem.rows is not None:
            convention = _empty_rows.detect(problem.recompute, got["out"], out.allowed,
                                            out.scale, problem.rows)
            if convention is not None and convention != report.empty_rows:
                report.conventions[case] = convention
                continue
        failures.append(Failure(problem, got["out"], out.allowed, out.scale))
    if failures or gradient_only:
        report.diagnosis = diagnose(failures, gradient_only)


def _selectors(case_list):
    """String options with one value in every case (``mode="shared"``): they name the variant.

    A candidate that implements only that variant need not accept them.
    """
    if not case_list:
        return ()
    first = case_list[0].options
    return tuple(k for k, v in first.items() if isinstance(v, str)
                 and all(c.options.get(k) == v for c in case_list))


def _check(candidate, case, dtype, fw, seed, selectors=(), core=None, empty_rows="zero",
           gradients=True, additive=False):
    """``(checks, problem, got)`` of one case in one dtype (``got`` None when it did not run)."""
    with fw.precision(dtype):
        problem = Problem(case, dtype, fw, seed, core=core, empty_rows=empty_rows,
                          additive=additive)
        if not gradients:
            problem.expected = {"out": problem.expected["out"]}
        try:
            if problem.is_layer:
                run = _run_torch_layer if fw.name == "torch" else _run_jax_layer
                got, out_dtype = run(candidate, problem, fw)
            else:
                got, out_dtype = _run_core(candidate, problem, fw, selectors, gradients)
        except Unsupported as exc:
            return [Check(case.name, dtype, "-", status="n/a", note=str(exc))], None, None
        except Exception as exc:                       # the candidate's failure, reported
            return [Check(case.name, dtype, "-", status="error",
                          note=f"{type(exc).__name__}: {exc}".splitlines()[0])], None, None
    return _compare(problem, got, out_dtype), problem, got
