"""FlexAttention-style ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` in the CUDA kernels.

The reference backend calls these functions on index arrays and the numba backend compiles
them into its tiles; neither can run a Python function on a GPU.  :func:`cuda_expression`
gives such a function a CUDA C++ expression besides its Python body (the function itself is
unchanged), and a ``backend="cupy"`` call whose functions all carry one runs in the fused
kernels of ``sdpa.cu``: the driver (:mod:`refattn.cores.sdpa.cupy`) pastes the expressions in
front of the kernel source as three device functions (:meth:`CudaMods.source`), compiled in
by the option bits ``OPT_MASK_MOD`` / ``OPT_SCORE_MOD``, and NVRTC compiles the kernels once
per element type, option set and set of expressions (then CuPy's caches serve them).

Names in the expressions (the arguments of the Python functions)::

    mask_mod:        b, h, i, j              -> bool
    score_mod:       score, b, h, i, j       -> score
    score_mod_grad:  score, b, h, i, j       -> d score_mod / d score

``b``, ``h``, ``i``, ``j`` (also spelt ``q_idx`` = ``i`` and ``kv_idx`` = ``j``, as in
FlexAttention) are ``long long``: the flattened batch row (the sequence, for packed or
padded sequences), the query head, and the query and key positions (within the sequence).
``score`` has the accumulation type (``float`` for float16 and float32 inputs, ``double``
for float64) and is the score in natural units after scaling, soft-cap, bias and ALiBi, as
the reference backend's array functions see it.  CUDA's math functions (``tanh``, ``exp``,
``fabs``, ``fmin``, ...) and C++ operators are available; no headers are.  Unlike a
FlexAttention ``score_mod``, an expression cannot read a captured tensor (a per-head table,
a document-id array): only its arguments and constants.  Tensors go in through ``bias=``,
``mask=``, ``alibi_slopes=`` or packed sequences (``cu_seqlens_*``), or the function stays
without a CUDA form and the call runs on the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["cuda_expression", "expression_of", "CudaMods", "of_functions", "of_options",
           "FUNCTION_NAMES", "check_compiles"]

#: The attribute :func:`cuda_expression` sets on a function.
ATTRIBUTE = "__refattn_cuda_expression__"

#: The option names of the functions, in the order of :class:`CudaMods`.
FUNCTION_NAMES = ("mask_mod", "score_mod", "score_mod_grad")

_FORBIDDEN = (";", "{", "}", "#")


def _check_expression(expression) -> str:
    if not isinstance(expression, str):
        raise TypeError(f"cuda_expression takes a CUDA C++ expression as a str, got "
                        f"{type(expression).__name__}")
    if not expression.strip():
        raise ValueError("cuda_expression takes a CUDA C++ expression, got an empty string")
    bad = [c for c in _FORBIDDEN if c in expression]
    if bad:
        raise ValueError(f"cuda_expression takes one C++ expression (no {' '.join(bad)}), got "
                         f"{expression!r}")
    return expression


def cuda_expression(expression: str) -> Callable[[Any], Any]:
    """Decorator giving a ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` its CUDA form.

    The decorated function is returned unchanged (the reference backend calls it on index
    arrays, numba compiles it); the expression is recorded on it, and a
    ``backend="cupy"`` call whose functions all have one evaluates them pair by pair inside
    the fused CUDA kernels, in ``O(L)`` memory.  Without it a cupy call with such functions
    runs on the reference formulas (``O(L S)`` memory).

    Parameters
    ----------
    expression : str
        One CUDA C++ expression (no ``;``, braces or ``#``) over ``b, h, i, j``
        (``long long``; ``q_idx``, ``kv_idx`` are aliases of ``i``, ``j``) and, for the
        score functions, ``score`` (``float`` for float16/float32 inputs, ``double`` for
        float64).  It must mean what the Python function computes: refattn cannot check
        that (the tests of a project should compare ``backend="cupy"`` with
        ``backend="reference"``).  A first call with a new expression compiles the kernels
        through NVRTC (seconds); an expression NVRTC rejects raises ValueError naming the
        argument, with the compiler's message.

    Returns
    -------
    callable
        ``decorate(fn) -> fn``.

    Examples
    --------
    FlexAttention's causal mask and Gemma-style soft-capping, one object per backend:

    >>> import numpy as np
    >>> import refattn
    >>> @refattn.cuda_expression("j <= i")
    ... def causal(b, h, i, j):
    ...     return j <= i
    >>> @refattn.cuda_expression("30 * tanh(score / 30)")
    ... def softcap(score, b, h, i, j):
    ...     return 30 * np.tanh(score / 30)
    >>> @refattn.cuda_expression("1 - tanh(score / 30) * tanh(score / 30)")
    ... def softcap_grad(score, b, h, i, j):
    ...     return 1 - np.tanh(score / 30) ** 2
    >>> causal(0, 0, 3, 2), refattn.cores.sdpa.cuda_mods.expression_of(causal)
    (True, 'j <= i')
    >>> q = np.random.default_rng(0).standard_normal((1, 2, 5, 4))
    >>> o = refattn.sdpa(q, q, q, mask_mod=causal, score_mod=softcap, backend="reference")
    >>> np.allclose(o, refattn.sdpa(q, q, q, causal=True, softcap=30.0, backend="reference"))
    True
    """
    expression = _check_expression(expression)

    def decorate(fn):
        if not callable(fn):
            raise TypeError(f"cuda_expression decorates a function, got {type(fn).__name__}")
        setattr(fn, ATTRIBUTE, expression)
        return fn

    return decorate


def expression_of(fn) -> str | None:
    """The CUDA expression :func:`cuda_expression` recorded on ``fn``, or None."""
    return getattr(fn, ATTRIBUTE, None)


@dataclass(frozen=True)
class CudaMods:
    """The CUDA expressions of one call's functions (None: the function is absent).

    Examples
    --------
    >>> mods = CudaMods(mask_mod="j <= i")
    >>> print(mods.source().splitlines()[0])
    #define REFATTN_USER_MODS
    """

    mask_mod: str | None = None
    score_mod: str | None = None
    score_mod_grad: str | None = None

    def source(self) -> str:
        """The device functions ``refattn_mask_mod``, ``refattn_score_mod`` and
        ``refattn_score_mod_grad`` that ``sdpa.cu`` calls (an absent function keeps its
        default: keep every pair, the identity, 1), to paste in front of the kernel source.
        """
        mask = "true" if self.mask_mod is None else self.mask_mod
        score = "score" if self.score_mod is None else self.score_mod
        grad = "A(1)" if self.score_mod_grad is None else self.score_mod_grad
        return f"""#define REFATTN_USER_MODS
// mask_mod= (the user's CUDA expression)
template <class I>
__device__ __forceinline__ bool refattn_mask_mod_(I b, I h, I i, I j, I q_idx, I kv_idx) {{
    return (bool)(
{mask}
    );
}}
template <class I>
__device__ __forceinline__ bool refattn_mask_mod(I b, I h, I i, I j) {{
    return refattn_mask_mod_(b, h, i, j, i, j);
}}
// score_mod= (the user's CUDA expression)
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod_(A score, I b, I h, I i, I j, I q_idx, I kv_idx) {{
    return (A)(
{score}
    );
}}
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod(A score, I b, I h, I i, I j) {{
    return refattn_score_mod_<A>(score, b, h, i, j, i, j);
}}
// score_mod_grad= (the user's CUDA expression)
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod_grad_(A score, I b, I h, I i, I j, I q_idx,
                                                     I kv_idx) {{
    return (A)(
{grad}
    );
}}
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod_grad(A score, I b, I h, I i, I j) {{
    return refattn_score_mod_grad_<A>(score, b, h, i, j, i, j);
}}
"""

    def given(self) -> dict:
        """``{option name: expression}`` of the functions present."""
        return {name: e for name, e in zip(FUNCTION_NAMES, (self.mask_mod, self.score_mod,
                                                             self.score_mod_grad))
                if e is not None}


def of_functions(mask_mod=None, score_mod=None, score_mod_grad=None) -> CudaMods | None:
    """The :class:`CudaMods` of a call's functions when ``mask_mod`` / ``score_mod`` (and
    ``score_mod_grad``) all carry a CUDA expression; None without functions, or when one of
    them has none (the call then runs on the reference).

    Examples
    --------
    >>> mask = cuda_expression("j <= i")(lambda b, h, i, j: j <= i)
    >>> of_functions(mask_mod=mask)
    CudaMods(mask_mod='j <= i', score_mod=None, score_mod_grad=None)
    >>> print(of_functions(mask_mod=mask, score_mod=lambda s, b, h, i, j: 2 * s))
    None
    """
    fns = (mask_mod, score_mod, score_mod_grad)
    if mask_mod is None and score_mod is None:
        return None
    expressions = tuple(None if fn is None else expression_of(fn) for fn in fns)
    if any(fn is not None and e is None for fn, e in zip(fns, expressions)):
        return None
    return CudaMods(*expressions)


def of_options(opts) -> CudaMods | None:
    """:func:`of_functions` of an :class:`~refattn.cores.sdpa.api.SDPAOptions`."""
    return of_functions(opts.mask_mod, opts.score_mod, opts.score_mod_grad)


_PROBE = """
extern "C" __global__ void refattn_probe(float* f, double* d, bool* m) {
    m[0] = refattn_mask_mod(1LL, 2LL, 3LL, 4LL);
    f[0] = refattn_score_mod<float>(f[1], 1LL, 2LL, 3LL, 4LL);
    d[0] = refattn_score_mod<double>(d[1], 1LL, 2LL, 3LL, 4LL);
    f[2] = refattn_score_mod_grad<float>(f[1], 1LL, 2LL, 3LL, 4LL);
    d[2] = refattn_score_mod_grad<double>(d[1], 1LL, 2LL, 3LL, 4LL);
}
"""


def check_compiles(mods: CudaMods, compile_source: Callable[[str, str], Any]) -> None:
    """Raise ValueError naming the argument (``mask_mod=`` ...) whose expression does not
    compile, with the compiler's message.

    ``compile_source(code, name)`` compiles a CUDA source (raising on an error): NVRTC
    through :func:`refattn.backends.cupy_support.nvrtc_compile` on a GPU machine.  Each
    expression is compiled alone, in float and double, once per process.
    """
    for name, expression in mods.given().items():
        _check_one(name, expression, compile_source)


@functools.lru_cache(maxsize=256)
def _check_one(name: str, expression: str, compile_source) -> None:
    alone = CudaMods(**{name: expression})
    try:
        compile_source(alone.source() + _PROBE, f"{name}.cu")
    except Exception as exc:
        raise ValueError(f"{name}= has the CUDA expression {expression!r}, which NVRTC does not "
                         f"compile as {name}{_SIGNATURES[name]}:\n{exc}") from None


_SIGNATURES = {"mask_mod": "(long long b, h, i, j) -> bool",
               "score_mod": "(score, long long b, h, i, j) -> score (score: float or double)",
               "score_mod_grad": "(score, long long b, h, i, j) -> d score_mod / d score"}
