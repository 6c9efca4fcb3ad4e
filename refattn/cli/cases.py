"""``refattn cases``: export a variant's golden cases to ``.npz``, or re-check a file.

::

    refattn cases export sdpa --out sdpa.npz     # inputs, options, outputs, gradients (float64)
    refattn cases check sdpa.npz                 # exit status 1 if the reference disagrees

The file format is documented in :mod:`refattn.verify.golden` and ``docs/verify.md``.
Exit status of ``check``: 0 every quantity agrees; 1 some quantity disagrees with
the current reference; 2 the file is missing, unreadable or inconsistent with
its own manifest (one line saying which entry), or the command line is wrong.
"""

from __future__ import annotations

import os

from ..catalog import variants
from ..verify import golden
from ._errors import FAILED, OK, UsageError, check_names, non_negative_int

NAME = "cases"
HELP = "export golden cases (inputs, outputs, gradients in float64) to .npz, or re-check a file"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="write a variant's seeded cases with float64 outputs and "
                                        "gradients to an .npz file")
    exp.add_argument("variant", help="a variant of the catalogue (list them with `refattn variants`)")
    exp.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    exp.add_argument("--kind", default="test", choices=("test", "default", "bench"),
                     help="which case set of the variant (default: test)")
    exp.add_argument("--seed", type=non_negative_int, default=0,
                     help="seed of the cases and cotangents (default 0)")
    chk = sub.add_parser("check", help="check a golden file against its manifest, then recompute "
                                       "it with the current reference; exit status 1 on any "
                                       "mismatch, 2 for a damaged file")
    chk.add_argument("file", metavar="FILE.npz")
    chk.add_argument("--quiet", action="store_true", help="print only the verdict line")


def run(args) -> int:
    if args.action == "export":
        check_names("VARIANT", [args.variant], sorted(variants()), "variant")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise UsageError(f"--out: folder {folder} does not exist")
        if os.path.isdir(args.out):
            raise UsageError(f"--out: {args.out} is a folder; give a file name")
        n = golden.export(args.variant, args.out, kind=args.kind, seed=args.seed)
        print(f"wrote {n} {args.kind} case(s) of {args.variant!r} to {args.out}")
        return OK
    try:
        report = golden.check(args.file)
    except golden.GoldenFileError as exc:
        raise UsageError(str(exc)) from None
    print(report.summary() if args.quiet else repr(report))
    return OK if report.ok else FAILED
