"""Golden cases: a variant's seeded cases with float64 outputs and gradients in one ``.npz``.

A golden file lets any language test against refattn without running it: load
it with ``numpy.load(path, allow_pickle=False)`` (or any zip + ``.npy`` reader).
Every entry is a plain array: float64 numbers, booleans, int64 sizes, and
strings as 0-d unicode arrays.  The layout (version ``refattn-cases/1``)::

    format                        "refattn-cases/1"
    variant, variant_kind         "sdpa", "core" | "layer"
    case_kind, seed               "test", 0           how the cases were drawn
    refattn_version               "0.1.0"
    n_cases                       int
    case{i}/name                  "causal lower_right L<S"
    case{i}/inputs/<name>         float64 inputs: q, k, v (core); xq[, xkv] (layer)
    case{i}/params/<name>         float64 layer parameters, refattn layout (w_q is (d_in, d_out))
    case{i}/options/<key>         keyword options: mask, dropout_mask (bool, True = keep),
                                  bias (float64, differentiated too), causal (bool),
                                  causal_align (str), scale, dropout_p (float64), ...;
                                  an absent key means the default
    case{i}/layer/<key>           layers: d_model, n_heads (int64), projection, core (str),
                                  causal, bias (bool); layer/options/<key> and
                                  layer/core_options/<key> for scheme and core options
    case{i}/cotangent             float64, the output's cotangent
    case{i}/expected/out          float64 output
    case{i}/expected/d<name>      float64 vector-Jacobian products for the cotangent:
                                  dq, dk, dv[, dbias] (core); d<param>..., dxq[, dxkv] (layer)

:func:`check` recomputes every expected array with the current reference and
compares within :data:`refattn.testing.TOLERANCES` ``["float64"]``.
"""

from __future__ import annotations

import numpy as np

from ..catalog import get_variant
from .._vjp import vjp
from ..testing import TOLERANCES, max_errors
from .report import Check, VerifyReport
from .run import Problem, _NumpyRounding, quantities

__all__ = ["FORMAT", "export", "check", "load_cases"]

FORMAT = "refattn-cases/1"


def _encode(value):
    """A plain NumPy array for an option value (None is not stored: absent = default)."""
    if isinstance(value, (bool, np.bool_)):
        return np.array(bool(value))
    if isinstance(value, (int, np.integer)):
        return np.array(int(value), dtype=np.int64)
    if isinstance(value, (float, np.floating)):
        return np.array(float(value), dtype=np.float64)
    if isinstance(value, str):
        return np.array(value)
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "fiu":
        return arr.astype(np.float64)
    raise TypeError(f"cannot store option value of type {type(value).__name__} in a golden file")


def _decode(arr):
    arr = np.asarray(arr)
    if arr.ndim:
        return arr
    if arr.dtype.kind == "U":
        return str(arr)
    return arr.item()


def _put_dict(out, prefix, values):
    for key, value in values.items():
        if value is not None:
            out[f"{prefix}/{key}"] = _encode(value)


def export(variant, path, *, kind="test", seed=0) -> int:
    """Write ``variant``'s seeded ``kind`` cases with float64 outputs and gradients to ``path``.

    Returns the number of cases written.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from refattn.verify import golden
    >>> path = os.path.join(tempfile.mkdtemp(), "sdpa.npz")
    >>> golden.export("sdpa", path)
    11
    >>> data = np.load(path, allow_pickle=False)
    >>> str(data["case3/name"]), data["case3/inputs/q"].shape, bool(data["case3/options/causal"])
    ('MQA 4/1 causal', (1, 4, 7, 8), True)
    >>> golden.check(path).ok
    True
    """
    from .. import __version__

    variant = get_variant(variant) if isinstance(variant, str) else variant
    cases = variant.cases(kind, "float64", seed)
    out = {"format": np.array(FORMAT), "variant": np.array(variant.name),
           "variant_kind": np.array(variant.kind), "case_kind": np.array(kind),
           "seed": np.array(seed, dtype=np.int64), "refattn_version": np.array(__version__),
           "n_cases": np.array(len(cases), dtype=np.int64)}
    for i, case in enumerate(cases):
        p = f"case{i}"
        problem = Problem(case, "float64", _NumpyRounding(), seed * 1000 + i)
        out[f"{p}/name"] = np.array(case.name)
        for name, array in zip(problem.names, problem.arrays):
            if isinstance(array, dict):
                _put_dict(out, f"{p}/params", array)
            else:
                out[f"{p}/inputs/{name}"] = np.asarray(array, np.float64)
        _put_dict(out, f"{p}/options", problem.options)
        if problem.is_layer:
            spec = problem.layer_spec()
            _put_dict(out, f"{p}/layer", {"d_model": spec.d_model, "n_heads": spec.n_heads,
                                          "projection": spec.projection, "core": spec.core,
                                          "causal": spec.causal, "bias": spec.bias})
            _put_dict(out, f"{p}/layer/options", spec.options)
            _put_dict(out, f"{p}/layer/core_options", spec.core_options)
        out[f"{p}/cotangent"] = problem.cotangent
        _put_dict(out, f"{p}/expected", problem.expected)
    np.savez_compressed(path, **out)
    return len(cases)


def _group(data, prefix):
    """``{key: decoded value}`` of the entries directly under ``prefix/``."""
    n = len(prefix) + 1
    return {k[n:]: _decode(data[k]) for k in data.files
            if k.startswith(prefix + "/") and "/" not in k[n:]}


def load_cases(path):
    """Read a golden file: ``(header, cases)``, each case a dict of its groups (module doc)."""
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != FORMAT:
            found = str(data["format"]) if "format" in data.files else "no format entry"
            raise ValueError(f"{path} is not a refattn golden file of format {FORMAT!r} "
                             f"({found})")
        header = {k: _decode(data[k]) for k in ("variant", "variant_kind", "case_kind", "seed",
                                                 "refattn_version", "n_cases")}
        cases = []
        for i in range(header["n_cases"]):
            p = f"case{i}"
            cases.append({"name": str(data[f"{p}/name"]), "inputs": _group(data, f"{p}/inputs"),
                          "params": _group(data, f"{p}/params"),
                          "options": _group(data, f"{p}/options"),
                          "layer": _group(data, f"{p}/layer"),
                          "layer_options": _group(data, f"{p}/layer/options"),
                          "core_options": _group(data, f"{p}/layer/core_options"),
                          "cotangent": np.asarray(data[f"{p}/cotangent"]),
                          "expected": _group(data, f"{p}/expected")})
    return header, cases


def _reference_call(header, case):
    """``(fn, arrays, input names)`` that reproduce one stored case with the current reference."""
    if header["variant_kind"] == "layer":
        from ..layers import Attention

        layer = case["layer"]
        fn = Attention(layer["d_model"], layer["n_heads"], projection=layer["projection"],
                       core=layer["core"], causal=layer["causal"], bias=layer["bias"],
                       **case["layer_options"], **case["core_options"])
        inputs = case["inputs"]
        arrays = (case["params"], inputs["xq"]) + ((inputs["xkv"],) if "xkv" in inputs else ())
        return fn, arrays, ["params"] + list(inputs)
    # A core variant's cases all call its public function (refattn.sdpa, ...).
    fn = get_variant(header["variant"]).cases("test", "float64", 0)[0].fn
    return fn, tuple(case["inputs"].values()), list(case["inputs"])


def check(path) -> VerifyReport:
    """Recompute a golden file's outputs and gradients with the current reference; compare.

    A quantity passes when ``max|stored - recomputed| <= atol + rtol * max|stored|``
    with :data:`refattn.testing.TOLERANCES` ``["float64"]``.
    """
    rtol, atol = TOLERANCES["float64"]
    header, cases = load_cases(path)
    report = VerifyReport(header["variant"], f"golden file {path}", "refattn reference",
                          legend=f"rel err = max|stored - recomputed| / max|stored|; allowed = "
                                 f"rtol + atol / max|stored| with (rtol, atol) = {(rtol, atol)}")
    for case in cases:
        fn, arrays, names = _reference_call(header, case)
        out, pullback = vjp(fn, *arrays, backend="reference", **case["options"])
        got = quantities(out, pullback(case["cotangent"]), names)
        for quantity, stored in case["expected"].items():
            scale = max(float(np.max(np.abs(stored), initial=0.0)), np.finfo(np.float64).tiny)
            allowed = atol + rtol * scale
            if quantity not in got:
                report.checks.append(Check(case["name"], "float64", quantity, status="FAIL",
                                           note="the reference no longer returns it"))
                continue
            try:
                err = max_errors(got[quantity], stored)[0]
            except AssertionError as exc:
                report.checks.append(Check(case["name"], "float64", quantity, status="FAIL",
                                           note=str(exc)))
                continue
            report.checks.append(Check(case["name"], "float64", quantity, err, err / scale,
                                       None, allowed / scale,
                                       "ok" if err <= allowed else "FAIL"))
    return report

