"""Exit statuses of ``refattn`` and the user errors the commands raise.

=====  ==========================================================================
 0     success: every check ran and passed (and, with ``--strict``, every study
       target was met)
 1     a check failed: a variant disagreed with the reference, a golden file
       disagreed with the current reference, or a study raised an error
 2     a usage or input error: an unknown name, an unavailable backend, a bad
       number, a damaged or missing file, a run that would perform no check
 3     ``--strict`` only: every check passed but some study targets were not met
 4     an internal error (a bug in refattn: rerun with ``--debug`` and report it)
 130   interrupted (Ctrl-C); 141: the reader of the output pipe left (``| head``)
=====  ==========================================================================
"""

from __future__ import annotations

import argparse
import difflib
import math

__all__ = ["OK", "FAILED", "USAGE", "TARGETS_NOT_MET", "INTERNAL", "UsageError",
           "check_names", "positive_int", "non_negative_int", "non_negative_float"]

OK, FAILED, USAGE, TARGETS_NOT_MET, INTERNAL = 0, 1, 2, 3, 4


class UsageError(ValueError):
    """A user mistake the command reports as one line (exit status 2), never a traceback."""


def check_names(argument: str, names, choices, what: str = "name") -> list:
    """``names`` unchanged when each is in ``choices``; else :class:`UsageError` listing them.

    >>> check_names("--dtypes", ["float32"], ["float64", "float32"])
    ['float32']
    >>> check_names("--backends", ["cupyy"], ["reference", "numba", "cupy"], "backend")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    refattn.cli._errors.UsageError: --backends: unknown backend 'cupyy' (did you mean 'cupy'?); ...
    """
    choices = list(choices)
    for name in names:
        if name not in choices:
            close = difflib.get_close_matches(name, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{argument}: unknown {what} {name!r}{hint}; choose from "
                             f"{', '.join(choices)}")
    return list(names)


def _number(kind, test, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = requirement           # argparse names the type in some messages
    return parse


#: argparse ``type=`` converters that reject bad numbers with a message naming the rule.
positive_int = _number(int, lambda x: x >= 1, "a positive integer")
non_negative_int = _number(int, lambda x: x >= 0, "a non-negative integer")
non_negative_float = _number(float, lambda x: math.isfinite(x) and x >= 0,
                             "a finite non-negative number")
