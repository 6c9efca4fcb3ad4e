"""``refattn params``: parameters, FLOPs and matmuls of the projection schemes vs standard."""

from __future__ import annotations

from ..bench.scheme_counts import counts_table, super_scan_table
from ..catalog.layers import PAPER_SETTINGS
from ._errors import UsageError, positive_int

NAME = "params"
HELP = ("print parameters, FLOPs and matmuls per head of the standard, optimised, efficient and "
        "super projection schemes, with ratios against standard")


def add_arguments(parser):
    parser.add_argument("--d-model", type=positive_int,
                        help="model width (default: the paper's settings)")
    parser.add_argument("--heads", type=positive_int, default=8, help="number of heads (default 8)")
    parser.add_argument("--seq-len", type=positive_int,
                        help="sequence length l = L = S (super's w_a is (l, l))")
    parser.add_argument("--bias", action="store_true", help="linear maps with biases")
    parser.add_argument("--causal", action="store_true", help="causal self-attention")


def run(args) -> int:
    if (args.d_model is None) != (args.seq_len is None):
        raise UsageError("--d-model, --seq-len: give both, or neither (the paper's settings)")
    if args.d_model is None:
        settings = [(label, l, d, h) for label, (l, d, h) in PAPER_SETTINGS.items()]
    else:
        settings = [("", args.seq_len, args.d_model, args.heads)]
    for label, l, d, h in settings:
        print(counts_table(d, h, l, bias=args.bias, causal=args.causal, label=label).format())
        print()
    for d in sorted({d for _, _, d, _ in settings}):
        print(super_scan_table(d, settings[0][3], bias=args.bias).format())
        print()
    return 0
