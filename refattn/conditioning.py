"""Condition numbers of attention, per head, from SciPy singular values.

``kappa_2(M) = sigma_max(M) / sigma_min(M)`` over the last two axes, for
every head at once (``scipy.linalg.svdvals`` is batched), of

* the probability matrix ``P (L, S)`` (softmax cores: SDPA and its options),
* the head output ``A = P V (L, Ev)``,
* the preconditioned output ``O = diag(c) A (L, Ev)``,
* and, for a layer, the input ``X (S, d)``, the weights and the per-head value
  weights ``W_V^h (d, d_k)``, with the bound ``kappa(A) <= kappa(P) kappa(X) kappa(W_V^h)``.

Conventions
-----------
* ``sigma_min`` is the ``r``-th singular value with ``r = min(rows, cols)``
  over the **non-zero rows**: a fully masked query row of ``P`` (and so of
  ``A``, ``O``) is exactly zero, carries no information and would otherwise
  make every square ``P`` singular.  ``empty_rows`` counts them per head.
* Rank deficient (``sigma_min <= tol``, ``tol = sigma_max max(rows, cols) eps``
  as in ``numpy.linalg.matrix_rank``, ``eps`` of the input dtype): ``kappa = inf``.
  A matrix with no non-zero row has ``kappa = inf``.

Shape legend: ``*batch`` batch dims, ``H`` heads, ``L`` queries, ``S`` keys,
``Ev`` value features, ``d`` = ``d_model``, ``d_k = d / H``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import scipy.linalg

from ._array import namespace, to_numpy
from ._validate import _dtype_name, check_positive_float
from .cores import get_core
from .cores.preconditioned.api import apply_preconditioner
from .cores.preconditioned.preconditioners import Preconditioner, get_preconditioner
from .cores.sdpa import sdpa
from .layers import Attention
from .typing import Array, Backend

__all__ = ["condition_number", "HeadConditioning", "LayerConditioning", "attention_conditioning",
           "layer_conditioning", "probabilities"]


def condition_number(m: Array, *, rtol: float | None = None,
                     drop_zero_rows: bool = True) -> np.ndarray:
    """``kappa_2`` of each matrix in ``m (..., rows, cols)``: an array ``(...)``.

    Parameters
    ----------
    m : array (..., rows, cols)
        NumPy or CuPy; computed in float64 on the host.
    rtol : float, optional
        Relative rank tolerance: ``sigma_min <= rtol * sigma_max`` counts as rank
        deficient (``kappa = inf``).  Default ``max(rows, cols) * eps(m.dtype)``.
    drop_zero_rows : bool
        Take ``sigma_min`` over the non-zero rows only (see the module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.conditioning import condition_number
    >>> condition_number(np.diag([4.0, 2.0, 1.0]))
    array(4.)
    >>> condition_number(np.array([[1.0, 2.0], [2.0, 4.0]]))  # rank 1
    array(inf)
    >>> condition_number(np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))  # zero row dropped
    array(2.)
    """
    host = to_numpy(m)
    if host.ndim < 2:
        raise ValueError(f"m must have shape (..., rows, cols), got shape {host.shape}")
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(f"m must be a real floating-point array, got dtype {host.dtype}")
    rows, cols = host.shape[-2:]
    if rtol is None:
        rtol = max(rows, cols) * float(np.finfo(host.dtype).eps)
    x = host.astype(np.float64)
    batch = x.shape[:-2]
    if rows == 0 or cols == 0:
        return np.full(batch, np.inf)
    s = scipy.linalg.svdvals(x)                                   # (..., min(rows, cols)), sorted
    used = np.count_nonzero(np.any(x != 0, axis=-1), axis=-1) if drop_zero_rows else \
        np.full(batch, rows)                                      # (...) rows that count
    rank_dim = np.minimum(used, cols)                             # (...)
    s_max = s[..., 0]
    idx = np.maximum(rank_dim - 1, 0)[..., None]
    s_min = np.take_along_axis(s, idx, axis=-1)[..., 0]
    deficient = (rank_dim == 0) | (s_min <= rtol * s_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(deficient, np.inf, s_max / np.where(deficient, 1.0, s_min))
    return kappa


def probabilities(q: Array, k: Array, *, scale: float | None = None,
                  **sdpa_options: Any) -> Array:
    """The attention probabilities ``P (..., H, L, S)`` of :func:`refattn.sdpa`.

    Computed as ``sdpa(q, k, I_S)``: with the identity as values the output is
    ``P`` itself, masks, bias, causal alignment, GQA and dropout scaling
    included, by the very code that computes attention.  Costs ``O(L S^2)`` per
    head, the order of the SVD that follows.
    """

    xp = namespace(q, k)
    S = k.shape[-2]
    eye = xp.eye(S, dtype=k.dtype, device=array_api_compat.device(k))   # (S, S)
    v = xp.broadcast_to(eye, tuple(k.shape[:-1]) + (S,))            # (..., Hkv, S, S)
    return sdpa(q, k, v, scale=scale, **sdpa_options)


def _fmt(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf"
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def _table(headers, rows) -> str:
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class HeadConditioning:
    """Condition numbers per head; every array has shape ``(*batch, H)``.

    Attributes
    ----------
    kappa_p : ndarray or None
        ``kappa(P)``; ``None`` when the core has no probability matrix.
    kappa_a : ndarray
        ``kappa(A)`` of the head output ``A = core(q, k, v)``.
    kappa_o : ndarray
        ``kappa(diag(c) A)``, the preconditioned output.
    empty_rows : ndarray of int
        Query rows with no key left (exactly zero rows of ``P``, or of ``A``).
    preconditioner : str
    eps : float
    rows, cols : int
        ``L`` and the number of columns of ``P`` (``S``) and of ``A`` (``Ev``).
    """

    kappa_p: np.ndarray | None
    kappa_a: np.ndarray
    kappa_o: np.ndarray
    empty_rows: np.ndarray
    preconditioner: str
    eps: float
    q_len: int
    kv_len: int
    value_dim: int

    @property
    def ratio(self) -> np.ndarray:
        """``kappa(O) / kappa(A)``: below 1 where the preconditioner helped (NaN for inf/inf)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.kappa_o / self.kappa_a

    @property
    def heads(self) -> int:
        return self.kappa_a.shape[-1]

    def per_head(self) -> dict:
        """``{field: (H,) array}``: medians over the batch elements."""
        fields = {"kappa_p": self.kappa_p, "kappa_a": self.kappa_a, "kappa_o": self.kappa_o,
                  "ratio": self.ratio, "empty_rows": self.empty_rows}
        return {name: None if x is None else np.median(np.reshape(x, (-1, self.heads)), axis=0)
                for name, x in fields.items()}                     # (batch elements, H) -> (H,)

    def to_records(self) -> np.ndarray:
        """A record array, one row per (batch element, head)."""
        n = self.kappa_a.size
        batch_index = np.repeat(np.arange(n // max(self.heads, 1)), self.heads)
        head = np.tile(np.arange(self.heads), n // max(self.heads, 1))
        kp = np.full(n, np.nan) if self.kappa_p is None else self.kappa_p.reshape(-1)
        return np.rec.fromarrays(
            [batch_index, head, kp, self.kappa_a.reshape(-1), self.kappa_o.reshape(-1),
             self.ratio.reshape(-1), self.empty_rows.reshape(-1)],
            dtype=[("batch", np.int64), ("head", np.int64), ("kappa_p", np.float64),
                   ("kappa_a", np.float64), ("kappa_o", np.float64), ("ratio", np.float64),
                   ("empty_rows", np.int64)])

    def table(self) -> str:
        """Per head (median over batch elements): kappa(P), kappa(A), kappa(CA), their ratio."""
        ph = self.per_head()
        rows = []
        for h in range(self.heads):
            rows.append([h, _fmt(None if ph["kappa_p"] is None else ph["kappa_p"][h]),
                         _fmt(ph["kappa_a"][h]), _fmt(ph["kappa_o"][h]), _fmt(ph["ratio"][h]),
                         int(ph["empty_rows"][h])])
        return _table(["head", "kappa(P)", "kappa(A)", "kappa(CA)", "CA/A", "empty rows"], rows)

    def __repr__(self) -> str:
        n = self.kappa_a.size // max(self.heads, 1)
        lead = (f"HeadConditioning(preconditioner={self.preconditioner!r}, eps={self.eps:g}, "
                f"L={self.q_len}, S={self.kv_len}, Ev={self.value_dim}, heads={self.heads}, "
                f"batch elements={n}; medians over batch elements)")
        return lead + "\n" + self.table()


def attention_conditioning(q: Array, k: Array, v: Array, *, inner_core: str = "sdpa",
                           preconditioner: str | Preconditioner = "row_norm", eps: float = 1e-6,
                           rtol: float | None = None, backend: Backend = "auto",
                           **core_options: Any) -> HeadConditioning:
    """Condition numbers of ``P``, ``A`` and ``diag(c) A`` for every head of a core.

    Parameters
    ----------
    q, k, v : arrays of the core (``(..., H, L, E)``, ``(..., Hkv, S, E)``, ``(..., Hkv, S, Ev)``)
    inner_core : str
        The core producing ``A``: ``"sdpa"`` or any registered core; a
        preconditioned core name (``"preconditioned"``) means its inner core.
        ``kappa(P)`` is computed for SDPA only (other cores have no ``P``).
    preconditioner : str or Preconditioner
    eps : float > 0
        Of the preconditioner.
    rtol : float, optional
        Rank tolerance of :func:`condition_number`.
    backend : str
    **core_options
        ``mask``, ``causal``, ``scale``, ... of the inner core.

    Returns
    -------
    HeadConditioning

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 3, 16, 4)) for _ in range(3))
    >>> res = refattn.attention_conditioning(q, k, v, causal=True)
    >>> res.kappa_a.shape
    (2, 3)
    >>> a = refattn.sdpa(q, k, v, causal=True)
    >>> bool(np.allclose(res.kappa_a, np.linalg.cond(a)))
    True
    """
    eps = check_positive_float(eps, "eps")
    pre = get_preconditioner(preconditioner)
    inner_name = get_core(inner_core).inner or inner_core
    core = get_core(inner_name)
    f = core.feature_axes
    a, _ = core.forward(q, k, v, backend=backend, **core_options)
    c, a_rows = apply_preconditioner(pre, q, k, v, a, eps, f)        # (.., H, L), (.., H, L, F)
    a_host = to_numpy(a_rows)
    o_host = to_numpy(c[..., None] * a_rows)                         # (*batch, H, L, F)
    kappa_p = None
    if inner_name == "sdpa":
        p = to_numpy(probabilities(q, k, backend=backend, **core_options))   # (*batch, H, L, S)
        kappa_p = condition_number(p, rtol=rtol)
        empty = np.count_nonzero(~np.any(p != 0, axis=-1), axis=-1)
    else:
        empty = np.count_nonzero(~np.any(a_host != 0, axis=-1), axis=-1)
    if rtol is None:   # judge the rank at the precision of the inputs (float16 rows are float32)
        rtol = max(a_host.shape[-2:]) * float(np.finfo(_dtype_name(a)).eps)
    return HeadConditioning(
        kappa_p=kappa_p,
        kappa_a=condition_number(a_host, rtol=rtol),
        kappa_o=condition_number(o_host, rtol=rtol),
        empty_rows=np.asarray(empty),
        preconditioner=pre.name,
        eps=eps,
        q_len=int(a_host.shape[-2]),
        kv_len=int(k.shape[k.ndim - 1 - f]),
        value_dim=int(a_host.shape[-1]),
    )


@dataclass(frozen=True)
class LayerConditioning:
    """Condition numbers of a layer: its heads, its input and its weights.

    Attributes
    ----------
    heads : HeadConditioning
    kappa_x : ndarray (*batch,)
        ``kappa(X)`` of the key/value input (``X = xkv``; ``xq`` for self-attention).
    kappa_weights : dict
        ``{parameter name: kappa}`` of every 2-D parameter.
    kappa_w_v : ndarray (H,) or None
        ``kappa(W_V^h)`` of each head's value weights ``(d, d_k)`` (schemes with ``w_v``).
    bound : ndarray (*batch, H) or None
        ``kappa(P) kappa(X) kappa(W_V^h)``.
    bound_applies : ndarray (*batch, H) of bool or None
        Where the bound is a theorem: no value bias, ``X`` tall (``S >= d``) and
        ``P`` tall over its non-empty rows (``L - empty >= S``); see
        ``docs/cores/preconditioned.md``.
    """

    heads: HeadConditioning
    kappa_x: np.ndarray
    kappa_weights: dict
    kappa_w_v: np.ndarray | None
    bound: np.ndarray | None
    bound_applies: np.ndarray | None

    @property
    def bound_holds(self) -> np.ndarray | None:
        """``kappa(A) <= bound`` (up to 1e-9 relative rounding), or ``None`` without a bound."""
        if self.bound is None:
            return None
        with np.errstate(invalid="ignore"):
            return self.heads.kappa_a <= self.bound * (1 + 1e-9)

    def __repr__(self) -> str:
        w = ", ".join(f"{k}={_fmt(v)}" for k, v in self.kappa_weights.items())
        kappa_x = _fmt(np.median(self.kappa_x))
        lines = [f"LayerConditioning(median kappa(X)={kappa_x}; weights: {w})"]
        if self.kappa_w_v is not None:
            lines.append("kappa(W_V^h) per head: " + ", ".join(map(_fmt, self.kappa_w_v)))
        lines.append(repr(self.heads))
        if self.bound is not None:
            holds, applies = self.bound_holds, self.bound_applies
            assert holds is not None and applies is not None   # both exist with a bound
            lines.append(f"bound kappa(A) <= kappa(P) kappa(X) kappa(W_V^h): applies to "
                         f"{int(applies.sum())}/{applies.size} heads, holds on "
                         f"{int(holds[applies].sum())}/{int(applies.sum())} of them and on "
                         f"{int(holds[~applies].sum())}/{int((~applies).sum())} of the others")
        return "\n".join(lines)


def layer_conditioning(layer: Attention, params: dict[str, Array], xq: Array,
                       xkv: Array | None = None, mask: Array | None = None, *,
                       preconditioner: str | Preconditioner | None = None,
                       eps: float | None = None, rtol: float | None = None,
                       backend: Backend = "auto") -> LayerConditioning:
    """Condition numbers of an :class:`refattn.Attention` layer.

    The heads are those the layer's core sees: ``q, k, v = projection(params, x)``;
    quaternion heads ``(L, 4, d)`` are measured as rows ``(L, 4 d)``, like the
    preconditioner sees them.
    ``preconditioner``/``eps`` default to the layer's own (a ``"preconditioned"``
    core) or to ``"row_norm"``/``1e-6``.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> layer = refattn.Attention(8, 2)
    >>> params = layer.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 16, 8))
    >>> res = refattn.layer_conditioning(layer, params, x)
    >>> res.heads.kappa_a.shape, bool(res.bound_applies.all()), bool(res.bound_holds.all())
    ((1, 2), True, True)
    """
    layer._check_inputs(xq, xkv)
    layer._check_params(params, str(xq.dtype))
    xkv_ = xq if xkv is None else xkv
    cfg = layer.config
    q, k, v, _ = layer.scheme.project_in(params, xq, xkv_, cfg)
    own = layer.core_options                       # a preconditioned layer's own settings
    if preconditioner is None:
        preconditioner = own.get("preconditioner", "row_norm")
    if eps is None:
        eps = own.get("eps", 1e-6)
    options = {n: x for n, x in own.items() if n not in ("stop_gradient", "preconditioner", "eps")}
    heads = attention_conditioning(q, k, v, inner_core=layer.core_name, mask=mask,
                                   causal=cfg.causal, preconditioner=preconditioner, eps=eps,
                                   rtol=rtol, backend=backend, **options)
    kappa_x = condition_number(xkv_, rtol=rtol)
    kappa_weights = {n: float(condition_number(p, rtol=rtol)) for n, p in params.items()
                     if getattr(p, "ndim", 0) == 2}
    kappa_w_v = bound = applies = None
    w_v = params.get("w_v")
    if w_v is not None and tuple(w_v.shape) == (cfg.d_model, cfg.d_model):
        w = to_numpy(w_v).reshape(cfg.d_model, cfg.n_heads, cfg.head_dim)   # (d, H, d_k)
        kappa_w_v = condition_number(np.moveaxis(w, 1, 0), rtol=rtol)         # of (H, d, d_k)
        if heads.kappa_p is not None:
            bound = heads.kappa_p * kappa_x[..., None] * kappa_w_v
            S, d = xkv_.shape[-2], cfg.d_model
            applies = ((heads.q_len - heads.empty_rows >= S) & (S >= d)
                       & ("b_v" not in params))
    return LayerConditioning(heads, kappa_x, kappa_weights, kappa_w_v, bound, applies)
