"""Parameter, FLOP and matmul counts of the four projection schemes, side by side.

Used by ``refattn params`` and the ``projection-schemes`` study.  Every count
comes from the layer itself (``Attention.num_params``, ``scheme.flops``,
``Attention.flops``), so the table cannot drift from the code.

FLOPs: 2 per multiply-add of the matrix products, per batch element, forward
pass; bias additions, reshapes and the softmax are not counted (they are
``O(L d)`` / ``O(L S)`` against ``O(L d^2)`` / ``O(L S d)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .study import StudyResult
from ..layers import Attention

__all__ = ["SCHEMES", "SchemeCounts", "scheme_counts", "counts_table", "super_break_even",
           "super_scan_table", "make_layer"]

#: Hosseini & Hosseini's schemes, with standard first (the denominator of every ratio).
SCHEMES = ("standard", "optimised", "efficient", "super")


@dataclass(frozen=True)
class SchemeCounts:
    params: int
    projection_flops: float     # input + output projections (and W_A X for super)
    layer_flops: float          # projections + attention core
    matmuls_per_head: int       # input matrix products per head


def make_layer(scheme, d_model, n_heads, seq_len, bias, causal):
    options = {"seq_len": seq_len} if scheme == "super" else {}
    return Attention(d_model, n_heads, projection=scheme, causal=causal, bias=bias, **options)


def scheme_counts(d_model, n_heads, seq_len, *, bias=False, causal=False) -> dict:
    """``{scheme: SchemeCounts}`` for self-attention over ``L = S = seq_len`` tokens."""
    out = {}
    for scheme in SCHEMES:
        layer = make_layer(scheme, d_model, n_heads, seq_len, bias, causal)
        out[scheme] = SchemeCounts(layer.num_params(),
                                   layer.scheme.flops(layer.config, seq_len, seq_len),
                                   layer.flops(seq_len), layer.scheme.matmuls_per_head)
    return out


def super_break_even(d_model, *, bias=False) -> int:
    """The largest ``l`` for which Super has at most 0.75 of standard's parameters.

    ``2 d^2 + l^2 <= 3/4 * 4 d^2`` gives ``l <= d`` (with biases ``l^2 <= d^2 + d``,
    also ``l <= d``).
    """
    standard = Attention(d_model, 1, bias=bias).num_params()
    without_w_a = Attention(d_model, 1, projection="super", seq_len=1, bias=bias).num_params() - 1
    return math.isqrt(math.floor(Fraction(3, 4) * standard - without_w_a))


def _ratio(x, ref):
    return f"{x / ref:.4f}"


def counts_table(d_model, n_heads, seq_len, *, bias=False, causal=False, label="") -> StudyResult:
    """The parameter/FLOP table of the four schemes with ratios against standard."""
    counts = scheme_counts(d_model, n_heads, seq_len, bias=bias, causal=causal)
    ref = counts["standard"]
    rows = [[s, c.params, _ratio(c.params, ref.params), f"{c.projection_flops:.4g}",
             _ratio(c.projection_flops, ref.projection_flops), f"{c.layer_flops:.4g}",
             _ratio(c.layer_flops, ref.layer_flops), c.matmuls_per_head]
            for s, c in counts.items()]
    l_max = super_break_even(d_model, bias=bias)
    holds = "holds" if seq_len <= l_max else "does NOT hold"
    title = (f"{label + ': ' if label else ''}d_model={d_model}, heads={n_heads}, L=S=l={seq_len}"
             f"{', bias' if bias else ''}{', causal' if causal else ''}")
    notes = [f"super: params 2 d^2 + l^2 (ratio 1/2 + l^2/(4 d^2)), projection FLOPs ratio "
             f"1/2 + l/(4 d) (non-causal): <= 0.75 only while l <= {l_max} (= d_model); at l = {seq_len} "
             f"it {holds}",
             "FLOPs: forward, per batch element, 2 per multiply-add of the matrix products"]
    return StudyResult(title, ["scheme", "params", "ratio", "proj FLOPs", "ratio", "layer FLOPs",
                               "ratio", "matmuls/head"], rows,
                       metrics={f"{s}.params_ratio": c.params / ref.params
                                for s, c in counts.items()},
                       notes=notes)


def super_scan_table(d_model, n_heads, *, bias=False) -> StudyResult:
    """Super's ratios against standard as ``l`` crosses ``d_model``."""
    rows = []
    for l in sorted({max(1, d_model // 4), max(1, d_model // 2), d_model, d_model + 1,
                     2 * d_model, 4 * d_model}):
        c = scheme_counts(d_model, n_heads, l, bias=bias)
        ratio = c["super"].params / c["standard"].params
        rows.append([l, c["super"].params, f"{ratio:.4f}",
                     _ratio(c["super"].projection_flops, c["standard"].projection_flops),
                     "yes" if ratio <= 0.75 else "NO"])
    return StudyResult(f"super vs standard as l grows (d_model={d_model}{', bias' if bias else ''})",
                       ["l", "params", "params ratio", "proj FLOPs ratio", "<= 0.75"], rows)
