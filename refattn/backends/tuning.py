"""Choices made by measurement on this machine at first use, kept beside the Numba cache.

Some kernel parameters (the numba SDPA tile shapes) have no best value across CPUs: a
shape that runs at the GEMM rate on one host falls off a small-GEMM cliff of the BLAS on
another.  Instead of a constant tuned to one machine, :func:`tuned_choice` times a few
candidates on the real kernel once, interleaved (so that every candidate sees the same
load), keeps the fastest and records it in ``refattn-tuning.json`` in the folder of
Numba's cache (``NUMBA_CACHE_DIR``, else ``~/.cache/refattn``).  Entries are keyed by the
machine (LLVM's name of the host CPU, the CPU model, the thread count), so a cache folder
shared between machines keeps one choice per machine.  When no folder can be written the
choice lives in the process only.

The choice is a performance decision only: every candidate computes the same function
(to float rounding), and a call that passes its own parameters (``tiles=``) bypasses it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import llvmlite.binding as llvm
import numba

__all__ = ["cpu_model", "machine_key", "recorded_choices", "tuned_choice", "tuning_file"]

_FILE_NAME = "refattn-tuning.json"
_LOCK = threading.Lock()
_MEMO: dict[str, Any] = {}


def cpu_model() -> str:
    """The CPU model (``model name`` of ``/proc/cpuinfo`` on Linux), else the platform's word."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return f"{llvm.get_host_cpu_name()}|{cpu_model()}"    # read once: /proc/cpuinfo is slow


def machine_key() -> str:
    """``"<llvm cpu>|<cpu model>|<threads> threads"``: what a recorded choice is valid for."""
    return f"{_host()}|{numba.get_num_threads()} threads"


def tuning_file() -> str | None:
    """Path of the JSON file of recorded choices, or None when no folder is writable."""
    folder = numba.config.CACHE_DIR or os.path.join(os.path.expanduser("~"), ".cache",
                                                    "refattn")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return os.path.join(folder, _FILE_NAME) if os.access(folder, os.W_OK) else None


def _read(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: str | None, key: str, value) -> None:
    if path is None:
        return
    data = _read(path)                     # merge: another process may have added entries
    data[key] = value
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".refattn-tuning-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)              # atomic: readers see the old or the new file
    except OSError:
        pass


def recorded_choices() -> dict:
    """The choices recorded for this machine: ``{name: value}`` (nothing is measured)."""
    prefix = machine_key() + "|"
    return {k[len(prefix):]: v for k, v in _read(tuning_file()).items() if k.startswith(prefix)}


def tuned_choice(name: str, candidates: Sequence, measure: Callable[[Any], float], *,
                 rounds: int = 3):
    """The candidate with the least median ``measure(candidate)`` seconds on this machine.

    Measured once per machine and ``name`` (interleaved rounds after one warm-up call of
    each candidate), then read from the tuning file or the process memo.  Candidates must
    be JSON values (ints, lists of ints); a recorded value that is no longer among the
    candidates is measured again.

    Examples
    --------
    >>> tuned_choice("doc-example", [3, 1, 2], lambda c: float(c), rounds=1) in (1, 2, 3)
    True
    """
    candidates = [list(c) if isinstance(c, tuple) else c for c in candidates]
    key = f"{machine_key()}|{name}"
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        recorded = _read(tuning_file()).get(key)
        if recorded in candidates:
            _MEMO[key] = recorded
            return recorded
        for c in candidates:
            measure(c)                     # warm-up: compiles, faults the buffers in
        samples: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
        for _ in range(rounds):
            for i, c in enumerate(candidates):
                samples[i].append(measure(c))
        best = min(samples, key=lambda i: statistics.median(samples[i]))
        choice = candidates[best]
        _MEMO[key] = choice
        _write(tuning_file(), key, choice)
        return choice
