"""FlexAttention-style ``mask_mod`` / ``score_mod`` compiled into the numba SDPA kernels.

The numba kernels evaluate the user's functions pair by pair, inside each tile that the
causal rule and the window leave (:func:`refattn.cores.sdpa.numba._scores`, on the
forward's ``(queries, keys)`` tiles and the backward's transposed ones), with scalar
arguments::

    mask_mod(b, h, i, j) -> bool                  b, h, i, j: int64
    score_mod(score, b, h, i, j) -> score         score: the input dtype (float32/float64)
    score_mod_grad(score, b, h, i, j) -> d score_mod / d score

``b`` is the flattened batch index (with packed or padded sequences the sequence's number,
``i`` and ``j`` then counted from its start) and ``h`` the query head, as in the reference
backend's array functions: a function written with operators alone (``j <= i``, ``(b + h) % 2 == 0``,
``30 * np.tanh(score / 30)``) serves both backends.

Why copies of the kernels.  Numba's cache keys a kernel that takes a function argument by
that function's identity, so such a kernel would recompile in every process, including for
calls without any function.  Instead the cached kernels call three module-level
placeholders (``_MASK_MOD``, ``_SCORE_MOD``, ``_SCORE_MOD_GRAD``: trivial jitted functions,
only reached behind flags that are False unless the call has the function).  For a call
with functions, :func:`kernels` builds uncached copies of every kernel of the call chain
whose globals bind the placeholder names to the user's compiled functions, once per set of
functions (memoised on the function objects: pass the same objects again to reuse them).
A first call with new functions compiles the forward and backward kernels again, about
10-30 s (FlexAttention compiles too); calls without functions never touch this module.
"""

from __future__ import annotations

import threading
import types as pytypes

import numba
import numpy as np
from numba.core import types as nbtypes
from numba.core.dispatcher import Dispatcher

__all__ = ["FUNCTIONS", "compile_function", "kernels"]

#: argument name -> (placeholder name in the kernels' module, signature, takes a score)
FUNCTIONS = {
    "mask_mod": ("_MASK_MOD", "(b, h, i, j) -> bool", False),
    "score_mod": ("_SCORE_MOD", "(score, b, h, i, j) -> score", True),
    "score_mod_grad": ("_SCORE_MOD_GRAD", "(score, b, h, i, j) -> d score_mod / d score", True),
}

#: refattn's settings (:func:`refattn.backends.numba_support.jit`) without the cache.
_JIT_OPTIONS = {"fastmath": {"contract"}, "nogil": True, "error_model": "numpy"}
_LOCK = threading.RLock()
_DISPATCHERS: dict = {}      # user function -> its numba dispatcher
_BUILT: dict = {}            # (mask_mod, score_mod, score_mod_grad) -> {kernel name: dispatcher}


def _compile_error(name: str, fn, dtype, reason: str) -> TypeError:
    _, signature, takes_score = FUNCTIONS[name]
    arguments = f"a {dtype.name} score and int64 indices" if takes_score else "int64 indices"
    return TypeError(
        f"{name}= on the numba backend needs a scalar, numba-compilable function {signature} "
        f"(called pair by pair with {arguments}); {reason}. Pass a function numba can compile "
        f"or use backend='reference' (array functions, O(L S) memory); got {fn!r}")


def compile_function(fn, name: str, dtype) -> Dispatcher:
    """``fn`` (a Python function or a numba dispatcher) compiled for the kernels' arguments.

    Raises TypeError, naming ``name``, when numba cannot compile ``fn`` for them or when the
    result has the wrong type (``mask_mod`` must give a bool, the score functions a number).

    Examples
    --------
    >>> import numpy as np
    >>> f = compile_function(lambda b, h, i, j: j <= i, "mask_mod", np.dtype("float64"))
    >>> bool(f(0, 0, 3, 2)), bool(f(0, 0, 2, 3))
    (True, False)
    """
    dtype = np.dtype(dtype)
    _, _, takes_score = FUNCTIONS[name]
    with _LOCK:
        dispatcher = fn if isinstance(fn, Dispatcher) else _DISPATCHERS.get(fn)
        if dispatcher is None:
            try:
                dispatcher = numba.njit(**_JIT_OPTIONS)(fn)
            except Exception as exc:   # not a function numba can take (a class, a builtin)
                raise _compile_error(name, fn, dtype, f"numba cannot jit it ({exc})") from exc
            _DISPATCHERS[fn] = dispatcher
        args = ((numba.from_dtype(dtype),) if takes_score else ()) + (nbtypes.int64,) * 4
        try:
            dispatcher.compile(args)
            result = dispatcher.overloads[args].signature.return_type
        except Exception as exc:       # numba's TypingError and friends, or a frozen signature
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise _compile_error(name, fn, dtype,
                                 f"numba could not compile it: {first_line}") from exc
    wanted = (nbtypes.Boolean,) if not takes_score else (nbtypes.Float, nbtypes.Integer)
    if not isinstance(result, wanted):
        kind = "a bool" if not takes_score else "a number"
        raise _compile_error(name, fn, dtype, f"it must return {kind}, numba typed it {result}")
    return dispatcher


def _rebuilt(namespace: dict, names, replacements: dict) -> dict:
    """Uncached copies of the dispatchers ``namespace[name]`` whose globals are ``namespace``
    with ``replacements`` and with the copies themselves (so callers reach the copied callees).
    """
    scope = {**namespace, **replacements}
    for name in names:
        original = namespace[name]
        py = original.py_func
        copy = pytypes.FunctionType(py.__code__, scope, py.__name__, py.__defaults__,
                                    py.__closure__)
        copy.__kwdefaults__, copy.__doc__ = py.__kwdefaults__, py.__doc__
        copy.__qualname__, copy.__module__ = py.__qualname__, py.__module__
        options = {k: v for k, v in original.targetoptions.items() if k != "nopython"}
        scope[name] = numba.njit(cache=False, **options)(copy)
    return {name: scope[name] for name in names}


def kernels(namespace: dict, names, dtype, *, mask_mod=None, score_mod=None,
            score_mod_grad=None) -> dict:
    """``{name: dispatcher}``: the kernels ``names`` of ``namespace`` bound to the functions.

    Every function given is compiled (and checked, :func:`compile_function`) for ``dtype``;
    the kernel copies are built once per ``(mask_mod, score_mod, score_mod_grad)`` objects
    (a call with some of the functions of an earlier call reuses that call's kernels) and
    compile lazily at their first call, once per dtype.
    """
    given = {"mask_mod": mask_mod, "score_mod": score_mod, "score_mod_grad": score_mod_grad}
    replacements = {FUNCTIONS[name][0]: compile_function(fn, name, dtype)
                    for name, fn in given.items() if fn is not None}
    key = (mask_mod, score_mod, score_mod_grad)
    with _LOCK:
        for bound, built in _BUILT.items():
            # kernels bound to more functions serve this call too: the flags of ``mods``
            # leave the functions this call lacks uncalled
            if all(fn is None or fn is other for fn, other in zip(key, bound)):
                return built
        built = _BUILT[key] = _rebuilt(namespace, names, replacements)
    return built
