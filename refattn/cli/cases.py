"""``refattn cases``: export a variant's golden cases to ``.npz``, or re-check a file.

::

    refattn cases export sdpa --out sdpa.npz     # inputs, options, outputs, gradients (float64)
    refattn cases check sdpa.npz                 # exit status 1 if the reference disagrees

The file format is documented in :mod:`refattn.verify.golden` and ``docs/verify.md``.
"""

from __future__ import annotations

NAME = "cases"
HELP = "export golden cases (inputs, outputs, gradients in float64) to .npz, or re-check a file"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="write a variant's seeded cases with float64 outputs and "
                                        "gradients to an .npz file")
    exp.add_argument("variant", help="a registered variant (see `refattn info` or "
                                     "refattn.variants())")
    exp.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    exp.add_argument("--kind", default="test", choices=("test", "default", "bench"),
                     help="which case set of the variant (default: test)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the cases and cotangents")
    chk = sub.add_parser("check", help="recompute a golden file with the current reference; "
                                       "exit status 1 on any mismatch")
    chk.add_argument("file", metavar="FILE.npz")
    chk.add_argument("--quiet", action="store_true", help="print only the verdict line")


def run(args) -> int:
    from refattn.verify import golden

    if args.action == "export":
        n = golden.export(args.variant, args.out, kind=args.kind, seed=args.seed)
        print(f"wrote {n} {args.kind} case(s) of {args.variant!r} to {args.out}")
        return 0
    report = golden.check(args.file)
    print(report.summary() if args.quiet else repr(report))
    return 0 if report.ok else 1
