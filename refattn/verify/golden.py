"""Golden cases: a variant's seeded cases with float64 outputs and gradients in one ``.npz``.

A golden file lets any language test against refattn without running it: load
it with ``numpy.load(path, allow_pickle=False)`` (or any zip + ``.npy`` reader).
Every entry is a plain array: float64 numbers, booleans, int64 sizes, and
strings as 0-d unicode arrays (lists of strings as 1-d unicode arrays).  The
layout (version ``refattn-cases/2``)::

    format                        "refattn-cases/2"
    variant, variant_kind         "sdpa", "core" | "layer"
    case_kind, seed               "test", 0           how the cases were drawn
    refattn_version               "0.1.0"
    n_cases                       int, the cases are case0 ... case{n_cases - 1}
    manifest/keys                 1-d str: every other entry of the file
    manifest/finite               1-d str: the entries that hold only finite numbers
    case{i}/name                  "causal lower_right L<S"
    case{i}/inputs/<name>         float64 inputs: q, k, v (core); xq[, xkv] (layer)
    case{i}/params/<name>         float64 layer parameters, refattn layout (w_q is (d_in, d_out))
    case{i}/options/<key>         keyword options: mask, dropout_mask (bool, True = keep),
                                  bias (float64, differentiated too), causal (bool),
                                  causal_align (str), scale, dropout_p (float64), window,
                                  cu_seqlens_q/k, *_seq_lengths (int64), ...; an absent
                                  key means the default (cases with function options,
                                  mask_mod and score_mod, are left out)
    case{i}/layer/<key>           layers: d_model, n_heads (int64), projection, core (str),
                                  causal, bias (bool); layer/options/<key> and
                                  layer/core_options/<key> for scheme and core options
    case{i}/cotangent             float64, the output's cotangent
    case{i}/expected/out          float64 output
    case{i}/expected/d<name>      float64 vector-Jacobian products for the cotangent:
                                  dq, dk, dv[, dbias] (core); d<param>..., dxq[, dxkv] (layer)

Files of version ``refattn-cases/1`` (no manifest) are still read; every check
below except the manifest's is made on them too.

:func:`check` first checks the file against itself: it is a readable ``.npz``
archive of this format; the header is complete; ``n_cases`` matches the cases
present; every entry of the manifest is present and nothing else is; entries
the manifest declares finite are finite; each case has its name, inputs,
cotangent and expected output, with consistent shapes; the expected arrays are
exactly the quantities the reference computes.  A file that fails any of these
raises :class:`GoldenFileError` (one line naming the file and the entry).  Then
it recomputes every expected array with the current reference and compares
within :data:`refattn.testing.TOLERANCES` ``["float64"]``
(:func:`refattn.testing.assert_close`: a non-finite value must match exactly).
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from typing import Any

import numpy as np

from ..catalog import CASE_KINDS, Variant, get_variant
from ..layers import Attention
from .._version import __version__
from .._vjp import vjp
from ..testing import TOLERANCES, assert_close, max_errors
from .report import Check, VerifyReport
from .run import Problem, _NumpyRounding, quantities

__all__ = ["FORMAT", "READABLE_FORMATS", "GoldenFileError", "export", "check", "load_cases",
           "storable_cases"]

FORMAT = "refattn-cases/2"
#: Formats :func:`load_cases` and :func:`check` read (``/1`` has no manifest).
READABLE_FORMATS = ("refattn-cases/1", FORMAT)

_HEADER = {"variant": "U", "variant_kind": "U", "case_kind": "U", "seed": "i",
           "refattn_version": "U", "n_cases": "i"}
_MANIFEST = ("manifest/keys", "manifest/finite")
#: The inputs every case of a variant kind must hold (a layer's ``xkv`` is optional).
_REQUIRED_INPUTS = {"core": ("q", "k", "v"), "layer": ("xq",)}
_LAYER_KEYS = ("d_model", "n_heads", "projection", "core", "causal", "bias")
_CASE_KEY = re.compile(r"case(\d+)/")


class GoldenFileError(ValueError):
    """A golden file that cannot be checked: unreadable, or inconsistent with its own manifest.

    The message is one line that names the file and the offending entry.
    """


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
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    if arr.dtype.kind in "iu":          # a window (left, right), cu_seqlens, sequence lengths
        return arr.astype(np.int64)
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


def _manifest(entries) -> dict:
    """``manifest/keys`` (every entry) and ``manifest/finite`` (those without NaN/Inf)."""
    finite = [k for k, a in entries.items() if a.dtype.kind == "f" and np.isfinite(a).all()]
    return {"manifest/keys": np.array(sorted(entries), dtype=str),
            "manifest/finite": np.array(sorted(finite), dtype=str)}


def storable_cases(cases) -> list:
    """The cases a golden file can hold: those without function options (``mask_mod``,
    ``score_mod``; a file of plain arrays holds no code)."""
    return [c for c in cases if not any(callable(v) for v in c.options.values())]


def export(variant: str | Variant, path: str | os.PathLike[str], *, kind: str = "test",
           seed: int = 0) -> int:
    """Write ``variant``'s seeded ``kind`` cases with float64 outputs and gradients to ``path``.

    ``path`` is written as given (no ``.npz`` is appended).  Returns the number
    of cases written: every case but those with function options
    (:func:`storable_cases`).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from refattn.verify import golden
    >>> path = os.path.join(tempfile.mkdtemp(), "sdpa.npz")
    >>> golden.export("sdpa", path)
    15
    >>> data = np.load(path, allow_pickle=False)
    >>> str(data["case3/name"]), data["case3/inputs/q"].shape, bool(data["case3/options/causal"])
    ('MQA 4/1 causal', (1, 4, 7, 8), True)
    >>> "case3/expected/dk" in data["manifest/finite"]
    True
    >>> golden.check(path).ok
    True
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    if kind not in CASE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, CASE_KINDS))}; got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    cases = storable_cases(variant.cases(kind, "float64", int(seed)))
    out: dict[str, Any] = {"format": np.array(FORMAT), "variant": np.array(variant.name),
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
    out.update(_manifest(out))
    with open(path, "wb") as f:            # a file object: numpy appends no ".npz"
        np.savez_compressed(f, **out)
    return len(cases)


# -- reading and checking a file against itself ---------------------------------------

def _read_entries(path) -> dict:
    """Every entry of the archive at ``path``; :class:`GoldenFileError` when unreadable."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise GoldenFileError(f"{p}: no such file")
    if os.path.isdir(p):
        raise GoldenFileError(f"{p}: is a directory, not a golden .npz file")
    if os.path.getsize(p) == 0:
        raise GoldenFileError(f"{p}: empty file (0 bytes), not a golden .npz file")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GoldenFileError(f"{p}: not a readable .npz archive (truncated or another "
                              f"format: {_one_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        raise GoldenFileError(f"{p}: a single .npy array of shape {loaded.shape}, not a golden "
                              f".npz archive (write one with `refattn cases export`)")
    with loaded as data:
        try:
            return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise GoldenFileError(f"{p}: damaged .npz archive, an entry cannot be read "
                                  f"({_one_line(exc)})") from None


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _header(p, entries) -> dict:
    fmt = entries.get("format")
    if fmt is None or fmt.dtype.kind != "U" or fmt.ndim or str(fmt) not in READABLE_FORMATS:
        found = "no 'format' entry" if fmt is None else f"format {_decode(fmt)!r}"
        raise GoldenFileError(f"{p}: not a refattn golden file of format "
                              f"{' or '.join(map(repr, READABLE_FORMATS))} ({found})")
    header: dict[str, Any] = {"format": str(fmt)}
    for key, kind in _HEADER.items():
        value = entries.get(key)
        if value is None:
            raise GoldenFileError(f"{p}: header entry {key!r} is missing")
        if value.ndim or value.dtype.kind != kind:
            what = "a string" if kind == "U" else "an integer"
            raise GoldenFileError(f"{p}: header entry {key!r} must be {what} (0-d), got "
                                  f"dtype {value.dtype} shape {value.shape}")
        header[key] = _decode(value)
    try:
        variant = get_variant(header["variant"])
    except ValueError as exc:
        raise GoldenFileError(f"{p}: {exc}") from None
    if header["variant_kind"] != variant.kind:
        raise GoldenFileError(f"{p}: variant_kind is {header['variant_kind']!r} but variant "
                              f"{variant.name!r} is a {variant.kind}")
    if header["n_cases"] < 1:
        raise GoldenFileError(f"{p}: n_cases = {header['n_cases']}: the file declares no cases")
    return header


def _check_counts(p, header, entries):
    """``n_cases`` against the cases present; the manifest against the entries."""
    n = header["n_cases"]
    present = sorted({int(m.group(1)) for k in entries if (m := _CASE_KEY.match(k))})
    extra = [i for i in present if i >= n]
    if extra:
        raise GoldenFileError(f"{p}: n_cases = {n} but the file holds case{extra[0]} "
                              f"({len(present)} cases present)")
    missing = sorted(set(range(n)) - set(present))
    if missing:
        raise GoldenFileError(f"{p}: n_cases = {n} but case{missing[0]} is absent "
                              f"({len(present)} cases present)")
    if header["format"] == READABLE_FORMATS[0]:
        return                                           # /1: no manifest
    for key in _MANIFEST:
        if key not in entries or entries[key].ndim != 1 or entries[key].dtype.kind != "U":
            raise GoldenFileError(f"{p}: {key!r} is missing or not a list of entry names")
    declared = set(map(str, entries["manifest/keys"]))
    actual = set(entries) - set(_MANIFEST)
    absent = sorted(declared - actual)
    if absent:
        raise GoldenFileError(f"{p}: entry {absent[0]!r} is declared in the manifest but "
                              f"missing from the file ({len(absent)} missing)")
    undeclared = sorted(actual - declared)
    if undeclared:
        raise GoldenFileError(f"{p}: entry {undeclared[0]!r} is not in the manifest "
                              f"({len(undeclared)} undeclared)")


def _check_finite(p, header, entries):
    """Entries ``manifest/finite`` names hold no NaN or Inf."""
    if header["format"] == READABLE_FORMATS[0]:
        return
    for key in map(str, entries["manifest/finite"]):
        if key not in entries:
            raise GoldenFileError(f"{p}: manifest/finite names {key!r}, which is missing")
        arr = entries[key]
        bad = ~np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise GoldenFileError(f"{p}: {key} holds {int(bad.sum())} non-finite value(s) "
                                  f"({arr[idx].item()!r} at {idx}) but the manifest declares "
                                  f"it finite")


def _group(entries, prefix):
    """``{key: decoded value}`` of the entries directly under ``prefix/``."""
    n = len(prefix) + 1
    return {k[n:]: _decode(a) for k, a in entries.items()
            if k.startswith(prefix + "/") and "/" not in k[n:]}


def _case(p, header, entries, i) -> dict:
    c = f"case{i}"
    for key in ("name", "cotangent", "expected/out"):
        if f"{c}/{key}" not in entries:
            raise GoldenFileError(f"{p}: {c}/{key} is missing")
    case = {"index": i, "name": str(_decode(entries[f"{c}/name"])),
            "inputs": _group(entries, f"{c}/inputs"), "params": _group(entries, f"{c}/params"),
            "options": _group(entries, f"{c}/options"), "layer": _group(entries, f"{c}/layer"),
            "layer_options": _group(entries, f"{c}/layer/options"),
            "core_options": _group(entries, f"{c}/layer/core_options"),
            "cotangent": entries[f"{c}/cotangent"],
            "expected": _group(entries, f"{c}/expected")}
    kind = header["variant_kind"]
    for name in _REQUIRED_INPUTS[kind]:
        if name not in case["inputs"]:
            raise GoldenFileError(f"{p}: {c}/inputs/{name} is missing (a {kind} case needs "
                                  f"inputs {', '.join(_REQUIRED_INPUTS[kind])})")
    if kind == "layer":
        for key in _LAYER_KEYS:
            if key not in case["layer"]:
                raise GoldenFileError(f"{p}: {c}/layer/{key} is missing")
        if not case["params"]:
            raise GoldenFileError(f"{p}: {c}/params/ is missing (a layer case needs its "
                                  f"parameters)")
    arrays = {**{f"inputs/{k}": a for k, a in case["inputs"].items()},
              **{f"params/{k}": a for k, a in case["params"].items()},
              "cotangent": case["cotangent"],
              **{f"expected/{k}": a for k, a in case["expected"].items()}}
    for key, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype != np.float64:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise GoldenFileError(f"{p}: {c}/{key} must be a float64 array, got {got}")
    out_shape = case["expected"]["out"].shape
    if case["cotangent"].shape != out_shape:
        raise GoldenFileError(f"{p}: {c}/cotangent has shape {case['cotangent'].shape} but "
                              f"{c}/expected/out has {out_shape}")
    primal = {**case["inputs"], **case["params"]}
    for name, a in primal.items():
        grad = case["expected"].get(f"d{name}")
        if grad is not None and grad.shape != a.shape:
            raise GoldenFileError(f"{p}: {c}/expected/d{name} has shape {grad.shape} but its "
                                  f"primal has {a.shape}")
    return case


def _load(path):
    p = os.fspath(path)
    entries = _read_entries(p)
    header = _header(p, entries)
    _check_counts(p, header, entries)
    cases = [_case(p, header, entries, i) for i in range(header["n_cases"])]
    _check_finite(p, header, entries)
    return header, cases


def load_cases(path):
    """Read and self-check a golden file: ``(header, cases)``, each case a dict of its groups.

    Raises :class:`GoldenFileError` when the file is unreadable or inconsistent
    with its manifest (module docstring).
    """
    return _load(path)


def _reference_call(header, case):
    """``(fn, arrays, input names)`` that reproduce one stored case with the current reference."""
    inputs = case["inputs"]
    if header["variant_kind"] == "layer":
        layer = case["layer"]
        fn = Attention(layer["d_model"], layer["n_heads"], projection=layer["projection"],
                       core=layer["core"], causal=layer["causal"], bias=layer["bias"],
                       **case["layer_options"], **case["core_options"])
        names = ["xq"] + (["xkv"] if "xkv" in inputs else [])
        return fn, (case["params"], *(inputs[n] for n in names)), ["params"] + names
    # A core variant's cases all call its public function (refattn.sdpa, ...).
    fn = get_variant(header["variant"]).cases("test", "float64", 0)[0].fn
    names = list(_REQUIRED_INPUTS["core"])
    return fn, tuple(inputs[n] for n in names), names


def _compare(case, quantity, got, stored, rtol, atol) -> Check:
    """One row: ``|got - stored| <= atol + rtol max|stored|`` elementwise, non-finite exact."""
    finite = stored[np.isfinite(stored)]
    scale = max(float(np.max(np.abs(finite), initial=0.0)), np.finfo(np.float64).tiny)
    allowed = atol + rtol * scale
    err = max_errors(got, stored)[0]                     # inf when NaN/Inf do not match
    note = ""
    try:
        with np.errstate(invalid="ignore"):              # 0 * inf where stored is inf
            assert_close(got, stored, "float64", what=quantity, rtol=0.0, atol=allowed)
    except AssertionError as exc:
        note = str(exc).splitlines()[0]
    if not note and not err <= allowed:
        note = f"{quantity}: max |recomputed - stored| = {err:.3g} > allowed {allowed:.3g}"
    return Check(case["name"], "float64", quantity, err, err / scale, None,
                 allowed / scale, "FAIL" if note else "ok", note)


def check(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a golden file against itself, then recompute it with the current reference.

    A quantity passes when ``|stored - recomputed| <= atol + rtol * max|stored|``
    elementwise with :data:`refattn.testing.TOLERANCES` ``["float64"]``, and
    NaN/Inf sit at the same places with the same signs
    (:func:`refattn.testing.assert_close`).

    Raises
    ------
    GoldenFileError
        The file is unreadable or inconsistent with its manifest, or lacks a
        quantity the reference computes (module docstring): one line naming the
        file and the entry.
    """
    p = os.fspath(path)
    rtol, atol = TOLERANCES["float64"]
    header, cases = _load(p)
    report = VerifyReport(header["variant"], f"golden file {p}", "refattn reference",
                          legend=f"rel err = max|stored - recomputed| / max|stored|; allowed = "
                                 f"rtol + atol / max|stored| with (rtol, atol) = {(rtol, atol)}")
    for case in cases:
        where = f"{p}: case{case['index']} ({case['name']!r})"
        try:
            fn, arrays, names = _reference_call(header, case)
            out, pullback = vjp(fn, *arrays, backend="reference", **case["options"])
            got = quantities(out, pullback(case["cotangent"]), names)
        except (ValueError, TypeError) as exc:
            raise GoldenFileError(f"{where}: the reference rejects the stored case: "
                                  f"{_one_line(exc)}") from None
        absent = [q for q in got if q not in case["expected"]]
        if absent:
            raise GoldenFileError(f"{where}: expected/{absent[0]} is missing (the reference "
                                  f"computes {', '.join(got)})")
        for quantity, stored in case["expected"].items():
            if quantity not in got:
                report.checks.append(Check(case["name"], "float64", quantity, status="FAIL",
                                           note="the reference no longer returns it"))
                continue
            report.checks.append(_compare(case, quantity, got[quantity], stored, rtol, atol))
    return report
