"""Argument checks shared by every entry point.

Every public function validates its inputs here before any arithmetic, so a
bad argument raises a ``ValueError`` or ``TypeError`` that names the argument
and the expected shape or dtype, never a NumPy traceback from deep inside.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, ParamSpec, TypeVar
from dataclasses import dataclass

import array_api_compat

from .typing import Array

__all__ = [
    "SUPPORTED_FLOATS",
    "AttentionShapes",
    "check_array",
    "check_float_array",
    "check_bool_array",
    "check_same_dtype",
    "check_broadcastable",
    "check_choice",
    "check_positive_float",
    "check_dropout",
    "attention_shapes",
    "check_cotangent",
    "FRAMEWORK_ALIASES",
    "reject_framework_keywords",
]

SUPPORTED_FLOATS = ("float16", "float32", "float64")


def _dtype_name(x) -> str:
    """``"float32"`` etc. for NumPy, CuPy, array-api-strict (``array_api_strict.float32``) arrays."""
    return str(getattr(x.dtype, "name", x.dtype)).rsplit(".", 1)[-1]


def check_array(x, name: str):
    """Raise ``TypeError`` unless ``x`` is an array of a supported library."""
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(
            f"{name} must be an array (NumPy, CuPy or any array-API array), "
            f"got {type(x).__name__}"
        )
    return x


def check_float_array(x, name: str, *, allowed=SUPPORTED_FLOATS):
    """Raise ``TypeError`` unless ``x`` is a real floating-point array of an allowed dtype."""
    check_array(x, name)
    dtype = _dtype_name(x)
    if dtype not in allowed:
        raise TypeError(
            f"{name} must be a real floating-point array ({', '.join(allowed)}), "
            f"got dtype {dtype}"
        )
    return x


def check_bool_array(x, name: str, *, hint: str = ""):
    check_array(x, name)
    if _dtype_name(x) != "bool":
        raise TypeError(f"{name} must be a boolean array, got dtype {_dtype_name(x)}{hint}")
    return x


def check_same_dtype(**arrays):
    """Raise ``TypeError`` unless every given array has the same dtype."""
    named = [(n, a) for n, a in arrays.items() if a is not None]
    first_name, first = named[0]
    for name, a in named[1:]:
        if _dtype_name(a) != _dtype_name(first):
            raise TypeError(
                f"{name} has dtype {_dtype_name(a)} but {first_name} has dtype "
                f"{_dtype_name(first)}; all inputs must share one floating-point dtype"
            )


def _broadcasts(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    for n, t in zip(reversed(shape), reversed(target)):
        if n != 1 and n != t:
            return False
    return True


def check_broadcastable(x, name: str, target, legend: str):
    """Raise ``ValueError`` unless ``x`` broadcasts to ``target``.

    ``legend`` spells the target symbolically, e.g. ``"(..., H, L, S)"``.
    """
    if not _broadcasts(tuple(x.shape), tuple(target)):
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} does not broadcast to {legend} = {tuple(target)}"
        )
    return x


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive_float(value: float | None, name: str, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_dropout(dropout_p: float, dropout_mask: Array | None, target: tuple[int, ...],
                  legend: str) -> float:
    """Validate the explicit dropout keep-mask and rate; return ``1 / (1 - p)``."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p!r}")
    if dropout_mask is None:
        if dropout_p > 0:
            raise ValueError(
                "dropout_p > 0 needs an explicit dropout_mask (bool keep-mask broadcastable to "
                f"{legend}); refattn has no hidden random number generator"
            )
        return 1.0
    check_bool_array(dropout_mask, "dropout_mask")
    check_broadcastable(dropout_mask, "dropout_mask", target, legend)
    return 1.0 / (1.0 - float(dropout_p))


@dataclass(frozen=True)
class AttentionShapes:
    """Sizes of a head-first attention problem.

    ``q (*batch, H, L, E)``, ``k (*batch, Hkv, S, E)``, ``v (*batch, Hkv, S, Ev)``.
    """

    batch: tuple
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str

    @property
    def scores(self) -> tuple:
        """Shape of the score matrix ``(*batch, H, L, S)``."""
        return (*self.batch, self.heads, self.q_len, self.kv_len)

    @property
    def output(self) -> tuple:
        return (*self.batch, self.heads, self.q_len, self.value_dim)

    @property
    def group(self) -> int:
        """Query heads per kv head (grouped-query attention); 1 when there are no heads."""
        return self.heads // self.kv_heads if self.kv_heads else 1


def attention_shapes(q, k, v, *, feature_axes: int = 1, legend_feature: str = "E",
                     same_value_dim: bool = False) -> AttentionShapes:
    """Validate ``q, k, v`` of a head-first core and return their sizes.

    ``feature_axes`` is 1 for real cores (``(..., H, L, E)``) and 2 for cores with
    an explicit component axis such as quaternion ones (``(..., H, L, 4, d)``).
    """
    f = feature_axes
    tail = {1: "H, L, E", 2: f"H, L, 4, {legend_feature}"}[f]
    ktail = {1: "Hkv, S, E", 2: f"Hkv, S, 4, {legend_feature}"}[f]
    for name, x, t in (("q", q, tail), ("k", k, ktail), ("v", v, ktail)):
        check_float_array(x, name)
        if x.ndim < 2 + f:
            raise ValueError(
                f"{name} must have shape (..., {t}) with at least {2 + f} dimensions, "
                f"got shape {tuple(x.shape)}"
            )
    check_same_dtype(q=q, k=k, v=v)
    nb = q.ndim - 2 - f
    batch = tuple(q.shape[:nb])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[: x.ndim - 2 - f]) != batch:
            raise ValueError(
                f"{name} has batch dimensions {tuple(x.shape[: x.ndim - 2 - f])} but q has "
                f"{batch}; batch dimensions must be equal"
            )
    H, L = q.shape[nb], q.shape[nb + 1]
    Hkv, S = k.shape[nb], k.shape[nb + 1]
    if tuple(v.shape[nb: nb + 2]) != (Hkv, S):
        raise ValueError(
            f"v has (heads, length) = {tuple(v.shape[nb: nb + 2])} but k has {(Hkv, S)}; "
            "keys and values must pair up"
        )
    if f == 2:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.shape[-2] != 4:
                raise ValueError(
                    f"{name} must have a quaternion component axis of size 4 at position -2, "
                    f"got shape {tuple(x.shape)}"
                )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q has feature size {q.shape[-1]} but k has {k.shape[-1]}; "
            "queries and keys must have the same feature size"
        )
    if same_value_dim and v.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"v has feature size {v.shape[-1]} but k has {k.shape[-1]}; this core needs "
            "values as wide as keys"
        )
    if (Hkv == 0 and H != 0) or (Hkv != 0 and H % Hkv != 0):
        raise ValueError(
            f"k and v have {Hkv} heads, which does not divide the {H} heads of q "
            "(grouped-query attention needs H % Hkv == 0)"
        )
    return AttentionShapes(batch, H, Hkv, L, S, q.shape[-1], v.shape[-1], _dtype_name(q))


def check_cotangent(do, expected_shape, legend: str = "", like=None):
    """Validate the cotangent handed to a pullback: a float array of the output's shape.

    ``like`` (the output) also fixes the array library: a NumPy cotangent for a CuPy
    output is an error, not a silent transfer.  A cotangent of another float dtype is
    accepted and cast to the output's dtype by the caller.
    """
    check_float_array(do, "cotangent")
    if tuple(do.shape) != tuple(expected_shape):
        raise ValueError(f"cotangent has shape {tuple(do.shape)}, expected the output shape "
                         f"{legend + ' = ' if legend else ''}{tuple(expected_shape)}")
    if like is not None and type(do).__module__.split(".")[0] != type(like).__module__.split(".")[0]:
        raise TypeError(f"cotangent is a {type(do).__module__}.{type(do).__name__} but the output "
                        f"is a {type(like).__module__}.{type(like).__name__}; pass the same kind "
                        "of array")
    return do


#: Keyword names of PyTorch, JAX and FlashAttention and what refattn calls them.
FRAMEWORK_ALIASES = {
    "is_causal": "causal=",
    "attn_mask": "mask= (boolean, True = attend) or bias= (additive float)",
    "key_padding_mask": "mask= (refattn.masks.from_torch_key_padding_mask)",
    "window_size": "window=",
    "local_window_size": "window=",
    "softmax_scale": "scale=",
    "enable_gqa": "nothing: grouped-query attention follows from k's head count",
    "dropout": "dropout_p= with an explicit dropout_mask=",
    "need_weights": "return_probs=",
}


_P = ParamSpec("_P")
_R = TypeVar("_R")


def reject_framework_keywords(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap ``fn`` so that a framework's keyword name is a ``TypeError`` naming refattn's.

    ``refattn.sdpa(q, k, v, is_causal=True)`` says "use causal=" instead of Python's bare
    "unexpected keyword argument".  The wrapped function keeps its signature and attributes.
    """
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        known = [name for name in kwargs if name in FRAMEWORK_ALIASES]
        if known:
            name = known[0]
            raise TypeError(f"{fn.__qualname__}() got {name}=, a PyTorch/JAX/FlashAttention keyword; "
                            f"refattn's is {FRAMEWORK_ALIASES[name]}")
        return fn(*args, **kwargs)

    return wrapper
