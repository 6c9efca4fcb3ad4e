"""Compile a kernel this process will want next in a second process, while it compiles its own.

On an empty Numba cache the first call of a core compiles its forward kernel (seconds); a
backward call usually follows and compiles again.  :func:`start` runs the second compile in a
worker process meanwhile: the worker runs the Python code its caller gives (the SDPA core's:
a tiny backward call of one dtype), which writes the kernel into Numba's cache, shared
between processes.  When this process then needs that kernel, its
compile takes the kernel's lock file (:func:`~refattn.backends.numba_support.jit`: compiles
of cached kernels are serialised between processes), so it waits for the worker if the
worker is still compiling it and loads it from the cache.  Helpers that both compiles need
are compiled once, by whichever process gets there first.  On two cores the two compiles
overlap: the README's "A taste" compiles in about half the time (docs/benchmarks.md).

Nothing depends on the worker for correctness: if it fails, is slow or cannot start, this
process compiles the kernel itself (under the same lock).  ``REFATTN_COMPILE_AHEAD=0``
turns the workers off; they are off anyway on one CPU, when the cache is disabled, without
the lock (no ``fcntl``), and inside a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

from .numba_support import cache_status, shares_compiles

__all__ = ["enabled", "start", "wait", "workers"]

_SWITCH = "REFATTN_COMPILE_AHEAD"

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOCK = threading.Lock()
_WORKERS: dict[str, subprocess.Popen] = {}        # name -> its worker
_ERRORS: dict[str, Any] = {}                      # name -> the file of its stderr


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        return os.cpu_count() or 1


def enabled() -> bool:
    """Whether :func:`start` starts workers here: not switched off (``REFATTN_COMPILE_AHEAD=0``),
    more than one CPU, a writable cache and the cross-process compile lock."""
    return (os.environ.get(_SWITCH, "1") != "0" and _cpus() > 1 and shares_compiles()
            and bool(cache_status()["enabled"]))


def start(name: str, code: str) -> bool:
    """Run the Python ``code`` (a compile, e.g. one tiny kernel call) in a worker process;
    at most one worker per ``name`` per process.  Returns whether one started."""
    with _LOCK:
        if name in _WORKERS or not enabled():
            return False
        env = dict(os.environ)
        # the worker compiles and runs a tiny problem: one thread, no worker of its own
        env.update({_SWITCH: "0", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        # this refattn's sources, whatever the worker's path would find: Numba keys the
        # cache on each kernel's source file
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT,
                                                          env.get("PYTHONPATH"))))
        # stderr to a file, not a pipe: nobody reads it while the worker runs, and a full
        # pipe would block the worker
        errors = tempfile.TemporaryFile()
        try:
            _WORKERS[name] = subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=errors)
        except OSError:                     # no interpreter to start: compile here later
            errors.close()
            return False
        _ERRORS[name] = errors
        return True


def workers() -> dict[str, subprocess.Popen]:
    """This process's workers so far, ``{name: process}``."""
    with _LOCK:
        return dict(_WORKERS)


def wait(timeout: float | None = None) -> dict[str, tuple[int | None, str]]:
    """Wait for this process's workers; ``{name: (exit status, stderr)}`` (status None: still
    running after ``timeout`` seconds)."""
    ended: dict[str, tuple[int | None, str]] = {}
    for name, process in workers().items():
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ended[name] = (None, "")
            continue
        errors = _ERRORS[name]
        errors.seek(0)
        ended[name] = (code, errors.read().decode(errors="replace"))
    return ended


def _forget_in_child():
    """A forked child's workers are its parent's: it neither waits for nor starts them again."""
    global _LOCK
    _WORKERS.clear()
    _ERRORS.clear()
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):          # POSIX
    os.register_at_fork(after_in_child=_forget_in_child)
