"""The ``refattn`` command line.

``refattn`` with no arguments runs the main job (:mod:`refattn.cli.report`).
Each subcommand is a module here defining ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; list it in
``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("report", "info", "bench", "cond", "params", "cases")


def _commands():
    return [importlib.import_module(f"{__name__}.{m}") for m in COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn",
        description="Reference engine for attention mechanisms. With no command, checks and "
                    "times every registered variant on every available backend.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["report"] + argv   # `refattn --variants sdpa` = `refattn report --variants sdpa`
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
