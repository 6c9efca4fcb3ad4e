"""``refattn cond``: condition numbers per head, before and after preconditioning.

Prints, per head, ``kappa(P)``, ``kappa(A)``, ``kappa(CA)`` and ``kappa(CA)/kappa(A)``
(``refattn.conditioning``), on a default seeded layer or on a user's ``.npz``,
and with ``--plot FILE.png`` draws their distribution over heads and over the
sequence length (prefixes of the sequence).

The ``.npz`` holds either

* **core inputs**: ``q (..., H, L, E)``, ``k (..., Hkv, S, E)``, ``v (..., Hkv, S, Ev)``
  (same float dtype), optional ``mask`` (bool, ``True`` = attend, broadcastable
  to ``(..., H, L, S)``); or
* **a layer input**: ``x (..., L, d_model)``, optional weights ``w_q, w_k, w_v,
  w_o`` (all four, each ``(d_model, d_model)``; default: seeded ``layer.init``)
  and ``mask``; ``--heads`` sets the number of heads.
"""

from __future__ import annotations

import math
import sys
import zipfile

import numpy as np

from ..conditioning import attention_conditioning, layer_conditioning
from ..cores import get_core
from ..layers import Attention
from ._errors import UsageError, non_negative_float, non_negative_int, positive_int
from ._study_plot import plain_log_ticks

NAME = "cond"
HELP = "condition numbers kappa(P), kappa(A), kappa(CA) per head (default problem or --npz)"

_WEIGHTS = ("w_q", "w_k", "w_v", "w_o")


class InputError(UsageError):
    """A user input the command cannot use; printed without a traceback."""


def add_arguments(parser):
    parser.add_argument("--npz", metavar="FILE", help="inputs: q, k, v [, mask] or x [, w_q, w_k, "
                        "w_v, w_o, mask] (see `refattn cond --help` and the module docs)")
    parser.add_argument("--plot", metavar="FILE.png", help="write the distributions of kappa "
                        "over heads and over sequence length (needs matplotlib)")
    parser.add_argument("--preconditioner", default="row_norm", help="registered preconditioner "
                        "(default: row_norm)")
    parser.add_argument("--eps", type=non_negative_float, default=1e-6,
                        help="preconditioner eps (default 1e-6)")
    parser.add_argument("--core", default="sdpa", help="the attention core producing A (default: "
                        "sdpa; a preconditioned core such as preconditioned-elementwise or "
                        "preconditioned-shared means its inner core; quaternion cores get the "
                        "quaternion projection)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--batch", type=positive_int, default=2,
                        help="default problem: batch (2)")
    parser.add_argument("--length", type=positive_int, default=128,
                        help="default problem: L = S (128)")
    parser.add_argument("--d-model", type=positive_int, default=64,
                        help="default problem: d_model (64)")
    parser.add_argument("--heads", type=positive_int, default=4,
                        help="heads of the layer (4)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of inputs/weights (0)")


def _load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc})") from None


def _projection(core):
    """The projection producing the heads ``core`` takes: quaternion heads or real ones."""
    return "quaternion" if get_core(core).layout == "quaternion" else "standard"


def _problem(args):
    """``(kind, label, arrays)``, kind ``"core"`` (arrays q, k, v, mask) or ``"layer"``."""
    if args.npz is None:
        rng = np.random.default_rng(args.seed)
        layer = Attention(args.d_model, args.heads, projection=_projection(args.core),
                                  core=args.core, causal=args.causal)
        x = rng.standard_normal((args.batch, args.length, args.d_model))
        return ("layer", f"default problem: Attention(d_model={args.d_model}, "
                f"n_heads={args.heads}, core={args.core!r}, causal={args.causal}), "
                f"x ~ N(0, 1) of shape {x.shape}, "
                f"seed {args.seed}", {"layer": layer, "params": layer.init(seed=args.seed), "x": x,
                                      "mask": None})
    data = _load_npz(args.npz)
    found = ", ".join(sorted(data)) or "none"
    mask = data.pop("mask", None)
    if all(n in data for n in ("q", "k", "v")):
        extra = sorted(set(data) - {"q", "k", "v"})
        if extra:
            raise InputError(f"{args.npz}: unexpected arrays {extra} beside q, k, v")
        return "core", f"{args.npz}: core inputs q {data['q'].shape}, k {data['k'].shape}, " \
                       f"v {data['v'].shape}", {**data, "mask": mask}
    if "x" in data:
        x = data.pop("x")
        if x.ndim < 2:
            raise InputError(f"{args.npz}: x must have shape (..., L, d_model), got {x.shape}")
        given = [n for n in _WEIGHTS if n in data]
        extra = sorted(set(data) - set(_WEIGHTS))
        if extra:
            raise InputError(f"{args.npz}: unexpected arrays {extra} beside x and {list(_WEIGHTS)}")
        if given and len(given) != len(_WEIGHTS):
            raise InputError(f"{args.npz}: give all of {list(_WEIGHTS)} or none; found {given}")
        try:
            layer = Attention(int(x.shape[-1]), args.heads,
                                      projection=_projection(args.core), core=args.core,
                                      causal=args.causal)
        except ValueError as exc:
            raise InputError(f"{args.npz}: {exc} (set --heads)") from None
        params = {n: data[n] for n in _WEIGHTS} if given else layer.init(
            seed=args.seed, dtype=x.dtype if x.dtype.kind == "f" else np.float64)
        return "layer", f"{args.npz}: layer input x {x.shape}, " + (
            "weights from the file" if given else f"weights layer.init(seed={args.seed})"), \
            {"layer": layer, "params": params, "x": x, "mask": mask}
    raise InputError(f"{args.npz}: expected arrays q, k, v (core inputs) or x (layer input); "
                     f"found {found}")


def _head_inputs(kind, arrays, args):
    """``(q, k, v, mask)`` the core sees (after the layer's projection)."""
    if kind == "core":
        return arrays["q"], arrays["k"], arrays["v"], arrays["mask"]
    layer = arrays["layer"]
    x = arrays["x"]
    layer._check_inputs(x, None)
    layer._check_params(arrays["params"], str(x.dtype))
    q, k, v, _ = layer.scheme.project_in(arrays["params"], x, x, layer.config)
    return q, k, v, arrays["mask"]


def _conditioning(kind, arrays, args):
    if kind == "layer":
        return layer_conditioning(arrays["layer"], arrays["params"], arrays["x"],
                                          mask=arrays["mask"], preconditioner=args.preconditioner,
                                          eps=args.eps)
    return attention_conditioning(arrays["q"], arrays["k"], arrays["v"],
                                          inner_core=args.core, mask=arrays["mask"],
                                          causal=args.causal,
                                          preconditioner=args.preconditioner, eps=args.eps)


def _prefix(x, axis_lengths):
    """``x[..., :l, :s]`` on the last axes that are not broadcast (size 1)."""
    index = [slice(None)] * x.ndim
    for axis, n in axis_lengths.items():
        if x.shape[axis] != 1:
            index[axis] = slice(0, n)
    return x[tuple(index)]


def length_sweep(q, k, v, mask, *, core, causal, preconditioner, eps, n_lengths=6):
    """``{l: HeadConditioning}`` on the prefixes of ``l`` queries (and ``ceil(l S / L)`` keys)."""
    f = get_core(get_core(core).inner or core).feature_axes   # (L, E) or (L, 4, d) per head
    L, S = q.shape[-1 - f], k.shape[-1 - f]
    lengths = sorted({int(round(x)) for x in np.geomspace(min(8, L), L, n_lengths)})
    out = {}
    for ell in lengths:
        s = max(1, math.ceil(ell * S / L))
        m = None if mask is None else _prefix(np.asarray(mask), {-2: ell, -1: s})
        out[ell] = attention_conditioning(
            _prefix(q, {-1 - f: ell}), _prefix(k, {-1 - f: s}), _prefix(v, {-1 - f: s}),
            inner_core=core, mask=m, causal=causal,
            preconditioner=preconditioner, eps=eps)
    return out


#: What the three matrices are, for the figure's legend and caption.
MATRICES = {
    "kappa_p": ("P", "probabilities P = softmax(scale Q K^T) (L x S), softmax cores only"),
    "kappa_a": ("A", "head output A = attention(Q, K, V) (L x Ev), = P V for softmax cores"),
    "kappa_o": ("CA", "preconditioned output C A, C = diag(1 / (||A_i|| + eps)) (L x Ev)"),
}
_STYLE = {"kappa_p": dict(color="C0", linestyle=":", marker="^", markersize=6),
          "kappa_a": dict(color="C1", linestyle="-", marker="o", markersize=8),
          "kappa_o": dict(color="C2", linestyle="--", marker="s", markersize=5,
                          markerfacecolor="none", markeredgewidth=1.5)}


def plot(path, heads, sweep, title):
    """Write the three-panel figure: kappa(A), kappa(CA) per head, their ratio, kappa over L.

    Returns the :class:`matplotlib.figure.Figure`.

    Every quantity named in a title or legend is plotted; the caption defines
    P, A and CA; overlapping curves differ in marker and line style.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: "
                         "pip install 'refattn[plot]' (or pip install matplotlib)") from None
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    ax1, ax_ratio, ax2 = fig.subplots(1, 3, width_ratios=(1.1, 1, 1.4))
    rec = heads.to_records()
    # kappa(P) is often orders of magnitude above kappa(A): it is drawn over L (right panel)
    # only, so this panel's scale shows each head's A -> CA change.
    fields = ["kappa_a", "kappa_o"]
    jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(rec))
    for i, f in enumerate(fields):
        x = getattr(rec, f)
        st = _STYLE[f]
        ax1.scatter(i + jitter, x, s=20, alpha=0.75, color=st["color"], marker=st["marker"])
        ax1.boxplot([x[np.isfinite(x)]], positions=[i], widths=0.45, showfliers=False,
                    medianprops=dict(color="k"))
    for a, o, j in zip(rec.kappa_a, rec.kappa_o, jitter):
        ax1.plot([j, 1 + j], [a, o], color="0.6", lw=0.6, zorder=0)
    ax1.set_xticks(range(len(fields)), [f"kappa({MATRICES[f][0]})" for f in fields])
    ax1.set_yscale("log")
    plain_log_ticks(ax1.yaxis)
    ax1.set_ylabel("condition number kappa_2 (log scale)")
    ax1.set_title(f"per head ({len(rec)} = heads x batch); box: quartiles,\n"
                  f"grey lines pair one head's kappa(A) and kappa(CA)", fontsize=10)
    ratio = rec.ratio[np.isfinite(rec.ratio)]
    ax_ratio.hist(ratio, bins=min(30, max(5, len(ratio) // 2)), color="C2", alpha=0.8)
    ax_ratio.axvline(1.0, color="k", lw=1)
    ax_ratio.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ratio.set_xlabel("kappa(CA) / kappa(A)   (< 1: preconditioning lowered kappa)")
    ax_ratio.set_ylabel("number of heads")
    ax_ratio.set_title(f"ratio per head: {int((ratio > 1).sum())} of {len(ratio)} raised, "
                       f"{int((ratio < 1).sum())} lowered", fontsize=10)
    lengths = np.array(sorted(sweep))
    medians = {}
    for f in MATRICES:
        if getattr(sweep[lengths[0]], f) is None:
            continue
        vals = [np.ravel(getattr(sweep[n], f)) for n in lengths]
        q25, q50, q75 = (np.array([np.percentile(x, p) for x in vals]) for p in (25, 50, 75))
        medians[f] = q50
        line, = ax2.plot(lengths, q50, label=f"kappa({MATRICES[f][0]}), median", **_STYLE[f])
        ax2.fill_between(lengths, q25, q75, color=line.get_color(), alpha=0.15)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(lengths, [str(n) for n in lengths])
    ax2.minorticks_off()
    ax2.set_yscale("log")
    ax2.set_xlabel("sequence length L (prefix of the sequence)")
    ax2.set_ylabel("condition number kappa_2 (log scale)")
    title2 = "over sequence length (band: 25-75 % of heads)"
    if "kappa_o" in medians:
        gap = float(np.max(np.abs(medians["kappa_o"] / medians["kappa_a"] - 1)))
        if gap < 0.05:
            title2 += f"\nmedian kappa(CA) within {gap:.1%} of kappa(A) at every L"
    ax2.set_title(title2, fontsize=10)
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    caption = "; ".join(f"{label}: {text}" for label, text in
                        (MATRICES[f] for f in MATRICES if f in medians))
    fig.text(0.5, -0.01, caption + ". kappa_2 = sigma_max / sigma_min over the non-zero rows.",
             ha="center", va="top", fontsize=8.5, wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def run(args) -> int:
    try:
        try:
            kind, label, arrays = _problem(args)
            result = _conditioning(kind, arrays, args)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise InputError(f"{args.npz or 'default problem'}: {exc}") from None
        print(label)
        print(result)
        if args.plot:
            q, k, v, mask = _head_inputs(kind, arrays, args)
            sweep = length_sweep(q, k, v, mask, core=args.core, causal=args.causal,
                                 preconditioner=args.preconditioner, eps=args.eps)
            heads = result.heads if kind == "layer" else result
            plot(args.plot, heads, sweep, f"{label}; preconditioner={args.preconditioner}, "
                 f"eps={args.eps:g}")
            print(f"wrote {args.plot}")
    except InputError as exc:
        print(f"refattn cond: {exc}", file=sys.stderr)
        return 2
    return 0
