"""The ``refattn`` command line.

``refattn`` with no arguments runs the main job (:mod:`refattn.cli.report`).
Each subcommand is a module here defining ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; list it in ``COMMANDS``.

No user error prints a traceback: :func:`main` turns a
:class:`~refattn.cli._errors.UsageError` (and a ``ValueError``, ``TypeError`` or
``OSError`` from the library) into one line on stderr and exit status 2; the
global ``--debug`` flag lets the traceback through.  The exit statuses are
listed in :mod:`refattn.cli._errors`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from . import bench, cases, cond, info, params, report, variants, warmup
from ._errors import INTERNAL, USAGE, UsageError

#: The subcommands, in the order ``refattn --help`` lists them.
COMMANDS = (report, variants, info, warmup, bench, cond, params, cases)
#: Exit statuses of an interrupted run (128 + SIGINT) and of output into a closed pipe
#: (128 + SIGPIPE, ``refattn variants | head``), as shells report them.
INTERRUPTED, BROKEN_PIPE = 130, 141


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``prog: error: ... (see prog --help)``."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="refattn",
        description="Reference engine for attention mechanisms. With no command, checks and "
                    "times every variant of the catalogue on every available backend.",
        epilog="exit status: 0 success, 1 a check failed, 2 usage or input error, 3 study "
               "targets not met (--strict), 4 internal error")
    parser.add_argument("--version", action="version", version=f"refattn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in COMMANDS:
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _with_command(argv: list) -> list:
    """``refattn --variants sdpa`` means ``refattn report --variants sdpa``."""
    if not argv:
        return ["report"]
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["report"] + argv
    return argv


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _silence_stdout():
    """After the reader of a pipe left: send the rest (and Python's final flush) nowhere."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    argv = _with_command([a for a in argv if a != "--debug"])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:                     # --help, --version, a usage error
        return exc.code if isinstance(exc.code, int) else USAGE
    prog = f"refattn {args.command}"
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return USAGE
    except (ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: internal error {type(exc).__name__}: {_one_line(exc)} (a bug in "
              f"refattn: rerun with --debug for the traceback and report it)", file=sys.stderr)
        return INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
