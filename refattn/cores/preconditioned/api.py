"""Preconditioned attention (Saratchandran, arXiv 2603.27153; ``docs/variants.md`` section 4), a drop-in around any core.

Shape legend
------------
``*batch``  any number of batch dimensions;  ``H`` query heads, ``Hkv`` kv heads
``L``       query length; ``S`` key length;  ``E`` query/key features
``F``       features of one output row: ``Ev`` for a real core, ``4 d`` for a
            quaternion core (its ``(4, d)`` axes flattened)

Per head, with ``A = core(q, k, v)`` the inner core's output::

    c = C(q, k, v, A)        (*batch, H, L)       the preconditioner's diagonal
    O = diag(c) A            (*batch, H, L, ...)  same shape as A

The inner core runs through its own ``forward``/``backward``, so every backend
it has (numba, cupy) serves the preconditioned core too; the diagonal scaling
is array-API code (NumPy, CuPy).  Backward (``docs/cores/preconditioned.md``)::

    stop_gradient=True:   dA = c dO                      (c treated as a constant)
    stop_gradient=False:  dA = c dO + dA_C,  dc_i = <dO_i, A_i>
                          (dq_C, dk_C, dv_C, dA_C) = preconditioner.vjp(..., dc)
    (dq, dk, dv) = core.backward(dA) + (dq_C, dk_C, dv_C)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._array import namespace, product
from ..._core import COMMON_OPTIONS, Core
from ..._validate import (_dtype_name, check_cotangent, check_positive_float,
                          reject_framework_keywords)
from ..._vjp import attach_vjp
from ..elementwise import CORE as _ELEMENTWISE
from ..quaternion import HAMILTON as _HAMILTON
from ..quaternion import SHARED as _SHARED
from ..sdpa import CORE as _SDPA
from .preconditioners import Preconditioner, get_preconditioner
from ...typing import Array, Backend

__all__ = ["PreconditionedResiduals", "forward", "backward", "preconditioned_sdpa",
           "make_core", "apply_preconditioner", "DEFAULT_EPS", "INNER_CORES"]

DEFAULT_EPS = 1e-6

#: The cores ``inner_core=`` may name; any other :class:`~refattn._core.Core` may be passed.
INNER_CORES = {core.name: core for core in (_SDPA, _SHARED, _HAMILTON, _ELEMENTWISE)}


@dataclass
class PreconditionedResiduals:
    """What :func:`backward` needs: the inner core's residuals and the diagonal."""

    core: Core
    inner: Any
    preconditioner: Preconditioner
    eps: float
    stop_gradient: bool
    c: Any                 # (*batch, H, L), working precision
    out_shape: tuple
    out_dtype: Any
    a: Any = None          # (*batch, H, L, F), only for stop_gradient=False
    qkv: tuple = ()        # (q, k, v), only for stop_gradient=False


def _working(xp, x):
    """float16 rows are scaled in float32: ``1/eps`` overflows float16 (max 65504)."""
    return xp.astype(x, xp.float32) if _dtype_name(x) == "float16" else x


def _check_options(eps, stop_gradient, preconditioner, inner_core, inner_options):
    eps = check_positive_float(eps, "eps")
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {type(stop_gradient).__name__}")
    pre = get_preconditioner(preconditioner)
    if not stop_gradient and pre.vjp is None:
        raise ValueError(f"preconditioner {pre.name!r} has no derivative rule (vjp=None); use "
                         "stop_gradient=True or register it with a vjp")
    core = _inner(inner_core)
    inspection = sorted(set(inner_options) & {"return_probs", "return_lse"})
    if inspection:
        raise TypeError(f"{inspection[0]}= is not an option of the preconditioned cores: the "
                        "diagonal c scales the rows of A = P V and leaves the inner core's "
                        "probabilities and log-sum-exp unchanged; ask the inner core for them "
                        f"(e.g. refattn.sdpa(..., {inspection[0]}=True)) and for c with "
                        "return_diagonal=True")
    takes = COMMON_OPTIONS + core.options + core.call_options
    unknown = sorted(set(inner_options) - set(takes))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)} for inner_core="
                        f"{core.name!r}, which takes {list(takes)}")
    return eps, pre, core


def apply_preconditioner(pre: Preconditioner, q, k, v, a, eps: float, feature_axes: int = 1):
    """``(c, a_rows)``: the diagonal ``c (*batch, H, L)`` of ``a`` and ``a`` as rows ``(.., L, F)``.

    Both in the working precision (float32 for float16).  ``O = c[..., None] * a_rows``.
    """
    xp = namespace(a)
    f = feature_axes
    rows = tuple(a.shape[: a.ndim - f])                               # (*batch, H, L)
    a_rows = _working(xp, xp.reshape(a, rows + (product(a.shape[a.ndim - f:]),)))  # (.., L, F)
    c = pre.diagonal(q, k, v, a_rows, eps=eps)
    if tuple(c.shape) != rows:
        raise ValueError(f"preconditioner {pre.name!r} returned a diagonal of shape "
                         f"{tuple(c.shape)}, expected (..., H, L) = {rows}")
    c = xp.astype(c, a_rows.dtype)
    # A row holding NaN or Inf makes its diagonal NaN: a preconditioner that saturates
    # (1 / ||inf|| = 0) would otherwise hide the non-finite value from the whole row.  A row
    # sum is finite when every element is (one pass); only when some sum is not (a
    # non-finite element, or a sum beyond the dtype's range) are the elements looked at.
    finite_rows = xp.isfinite(xp.sum(a_rows, axis=-1))
    if not bool(xp.all(finite_rows)):
        finite_rows = xp.all(xp.isfinite(a_rows), axis=-1)
    return xp.where(finite_rows, c, xp.asarray(xp.nan, dtype=c.dtype)), a_rows


@reject_framework_keywords
def forward(q, k, v, *, eps=DEFAULT_EPS, stop_gradient=True, preconditioner="row_norm",
            inner_core="sdpa", backend="auto", **inner_options):
    """Forward pass returning ``(o, residuals)`` for :func:`backward`.

    Same arguments as :func:`preconditioned_sdpa`; ``residuals.c`` is the diagonal.
    """
    eps, pre, core = _check_options(eps, stop_gradient, preconditioner, inner_core,
                                    inner_options)
    a, inner = core.forward(q, k, v, backend=backend, **inner_options)
    xp = namespace(a)
    c, a_rows = apply_preconditioner(pre, q, k, v, a, eps, core.feature_axes)
    o = xp.astype(xp.reshape(c[..., None] * a_rows, tuple(a.shape)), a.dtype, copy=False)
    res = PreconditionedResiduals(core, inner, pre, eps, stop_gradient, c, tuple(a.shape),
                                  a.dtype)
    if not stop_gradient:
        res.a, res.qkv = a_rows, (q, k, v)
    return o, res


def _add(xp, g, extra):
    return g if extra is None else g + xp.astype(extra, g.dtype)


def backward(res: PreconditionedResiduals, do):
    """Backward pass: ``(dq, dk, dv)`` plus whatever extra gradients the inner core returns
    (e.g. ``dbias`` of :func:`refattn.sdpa`)."""
    check_cotangent(do, res.out_shape)
    xp = namespace(do)
    rows = tuple(res.c.shape)
    features = product(res.out_shape[len(rows):])
    do_rows = xp.astype(xp.reshape(do, rows + (features,)), res.c.dtype)   # (*batch, H, L, F)
    da = res.c[..., None] * do_rows
    extra = (None, None, None)
    if not res.stop_gradient:
        dc = xp.sum(do_rows * res.a, axis=-1)                          # (*batch, H, L)
        q, k, v = res.qkv
        assert res.preconditioner.vjp is not None        # _check_options requires one here
        *extra, da_c = res.preconditioner.vjp(q, k, v, res.a, res.c, dc, eps=res.eps)
        da = _add(xp, da, da_c)
    da = xp.astype(xp.reshape(da, res.out_shape), res.out_dtype)
    grads = tuple(res.core.backward(res.inner, da))
    return tuple(_add(xp, g, e) for g, e in zip(grads[:3], extra)) + grads[3:]


@reject_framework_keywords
def preconditioned_sdpa(q: Array, k: Array, v: Array, *, eps: float = DEFAULT_EPS,
                        stop_gradient: bool = True,
                        preconditioner: str | Preconditioner = "row_norm",
                        inner_core: str | Core = "sdpa", return_diagonal: bool = False,
                        backend: Backend = "auto", **sdpa_options: Any) -> Array:
    r"""Preconditioned attention: a diagonal ``C(q, k, v, A)`` applied to each head's output.

    .. math::

        A = \mathrm{softmax}(\text{scale}\; q k^\top + \text{mask})\, v, \qquad
        c_i = \frac{1}{\lVert A_i \rVert_2 + \varepsilon}, \qquad O = \mathrm{diag}(c)\, A

    with the default ``preconditioner="row_norm"`` (a **reconstruction**: the
    paper's ``C`` is diagonal and depends on ``Q, K, V``; its formula could not
    be read).  ``inner_core`` swaps SDPA for any registered core (a drop-in).
    A fully masked query row has ``A_i = 0``, ``c_i = 1/eps`` and ``O_i = 0``.

    Parameters
    ----------
    q : array (..., H, L, E)
    k : array (..., Hkv, S, E)
    v : array (..., Hkv, S, Ev)
        Other layouts when ``inner_core`` takes them (e.g. ``(..., H, L, 4, d)``).
    eps : float > 0
        Keeps ``c`` finite on zero rows; ``||O_i|| = ||A_i|| / (||A_i|| + eps) < 1``.
    stop_gradient : bool
        ``True`` (default): the backward pass treats ``c`` as a constant (like
        ``c.detach()``), so it is *not* the derivative of the forward pass.
        ``False``: the full derivative, through ``c``.
    preconditioner : str or Preconditioner
        ``"row_norm"``, ``"identity"`` or a registered one
        (:func:`refattn.register_preconditioner`).
    inner_core : str
        The core producing ``A``: ``"sdpa"`` or any registered core.
    return_diagonal : bool
        Also return ``c (..., H, L)``.
    backend : {"auto", "reference", "numba", "cupy"}
        Passed to the inner core.
    **sdpa_options
        Options of the inner core: for SDPA ``mask``, ``causal``, ``causal_align``,
        ``scale``, ``bias``, ``dropout_mask``, ``dropout_p``, ``window``, ``softcap``,
        ``alibi_slopes`` (its gradient after ``dbias``), packed ``cu_seqlens_q`` /
        ``cu_seqlens_k`` (then ``q (total_q, H, E)`` and ``c (total_q, H)``), padded
        ``query_seq_lengths`` / ``key_value_seq_lengths``, ``mask_mod``, ``score_mod``,
        ``score_mod_grad`` (``docs/cores/preconditioned.md``, "Options").  Not
        ``return_probs`` / ``return_lse``: ``c`` leaves them unchanged (ask the inner core).

    Returns
    -------
    o : array (..., H, L, Ev), the dtype of ``q``
    c : array (..., H, L), only with ``return_diagonal=True``
        In the working precision: float32 for float16 inputs (``1/eps`` overflows float16).

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 6, 8)) for _ in range(3))
    >>> o, c = refattn.preconditioned_sdpa(q, k, v, causal=True, return_diagonal=True)
    >>> o.shape, c.shape
    ((2, 4, 6, 8), (2, 4, 6))
    >>> bool(np.allclose(np.linalg.norm(o, axis=-1), 1.0, atol=1e-5))  # rows equilibrated
    True
    >>> o, pullback = refattn.vjp(refattn.preconditioned_sdpa, q, k, v, stop_gradient=False)
    >>> [g.shape for g in pullback(np.ones_like(o))]
    [(2, 4, 6, 8), (2, 4, 6, 8), (2, 4, 6, 8)]
    """
    o, res = forward(q, k, v, eps=eps, stop_gradient=stop_gradient,
                     preconditioner=preconditioner, inner_core=inner_core, backend=backend,
                     **sdpa_options)
    if return_diagonal:
        return o, res.c
    return o


attach_vjp(preconditioned_sdpa, forward, backward, output_only=("return_diagonal",))


def _inner(inner_core) -> Core:
    if isinstance(inner_core, Core):
        return inner_core
    if isinstance(inner_core, str):
        if inner_core not in INNER_CORES:
            raise ValueError(f"inner_core must be one of {', '.join(map(repr, INNER_CORES))} "
                             f"(or a Core); got {inner_core!r}")
        return INNER_CORES[inner_core]
    raise TypeError(f"inner_core must be a core name (str) or a Core, got "
                    f"{type(inner_core).__name__}")


def make_core(inner_core, name: str | None = None) -> Core:
    """The :class:`~refattn._core.Core` ``diag(c) inner_core(q, k, v)`` for the layer frame.

    Its options are ``eps``, ``stop_gradient``, ``preconditioner`` and the inner
    core's; its backends and layout are the inner core's; ``Core.inner`` names the
    inner core.  List it in the inventory ``refattn.cores.CORES`` to use it by name.
    """
    inner = _inner(inner_core)

    def core_forward(q, k, v, *, backend="auto", **options):
        return forward(q, k, v, inner_core=inner, backend=backend, **options)

    def core_flops(batch, heads, q_len, kv_len, head_dim, value_dim, eps=None,
                   stop_gradient=None, preconditioner=None, **options):
        # the row norm (2 F) and the scaling (F) per output row, F = value_dim
        rows = product(batch) * heads * q_len
        return inner.flops(batch, heads, q_len, kv_len, head_dim, value_dim,
                           **options) + 3.0 * rows * value_dim

    return Core(
        name=name or f"preconditioned-{inner.name}",
        forward=core_forward,
        backward=backward,
        layout=inner.layout,
        backends=inner.backends,
        options=("eps", "stop_gradient", "preconditioner") + tuple(inner.options),
        flops=core_flops if inner.flops is not None else None,
        summary=f"diag(c) {inner.name}(q, k, v), c = preconditioner(q, k, v, A)"
                + (" (rows of (4, d))" if inner.feature_axes == 2 else ""),
        inner=inner.name,
        call_options=inner.call_options,
    )
