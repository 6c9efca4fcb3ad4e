"""How refattn compiles and launches Numba kernels: one place for every core.

* :func:`jit` is ``numba.njit(cache=True, fastmath={"contract"}, nogil=True,
  error_model="numpy")``.  Of the fast-math flags only ``contract`` is on: it lets
  LLVM fuse ``a * b + c`` into one FMA instruction (one rounding instead of two:
  never less accurate) and assumes nothing about the values; ``nnan``/``ninf``
  would let LLVM assume that ``-inf`` (a masked score) never occurs, and
  ``reassoc`` would break the Cody-Waite reduction in :func:`fast_exp`, so they
  stay off.  Measured: +7 to +10 % on the SDPA kernels.  ``error_model="numpy"``
  drops the Python division checks so that loops vectorise.
* Cache: Numba writes compiled kernels to ``NUMBA_CACHE_DIR`` when it is set,
  else to ``__pycache__`` beside the sources, else to a per-user folder.  When
  ``NUMBA_CACHE_DIR`` names a folder that cannot be written, or no location is
  writable at all, :func:`jit` warns once (:class:`NumbaCacheWarning`) and
  compiles in memory instead of crashing; every process then pays the compile
  time again.
* Threads: the SDPA and element-wise kernels are serial ``nogil`` functions over a list of
  work items; :func:`run_split` cuts the items into :func:`num_threads` disjoint lists of
  about equal cost and runs one kernel call per list on a small thread pool (one pool per
  thread count, created at first use).  A serial kernel compiles in about half the time of
  a ``prange`` one: Numba's parfor lowering outlines the loop body into a gufunc and compiles
  it again (docs/benchmarks.md, "Cold start").  ``NUMBA_NUM_THREADS=1`` (a Dask worker's
  setting) or ``numba.set_num_threads(1)`` in the calling thread keeps a call on that thread.
  A kernel written with ``prange`` (none in refattn now) runs on Numba's threading layer:
  its default order (``tbb``, then ``omp``, then ``workqueue``) prefers the layers that
  accept launches from several Python threads at once; ``workqueue`` does not (it aborts
  the process), so :func:`launch` holds a lock around parallel launches whenever
  ``workqueue`` is (or may become) the layer in use.
* Several processes, one cache: a kernel missing from the cache is compiled under a lock
  file beside its cache index (``<index>.lock``, ``flock``), taken inside Numba's compiler
  lock: a second process that needs the same kernel meanwhile waits, then loads it from the
  cache instead of compiling it again, and two processes never write one index at once
  (Numba's index update is not safe for that: two writers may give two signatures the same
  data file).  :mod:`.compile_ahead` relies on it.  Without ``fcntl`` (Windows) there is no
  lock and no compile-ahead worker.
* :func:`cached_signatures` reads a kernel's cache index without compiling or loading
  anything: which signatures are cached for this CPU (``refattn info`` reports it).
  ``refattn.bench.cold_start.first_call_times`` measures what the first call of each core
  costs (compiling, or loading from the cache); ``refattn info --first-calls`` prints it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import scipy.linalg.cython_blas as cython_blas
from llvmlite import ir
from numba.core import cgutils, sigutils
from numba.core.compiler_lock import global_compiler_lock

from . import blas

try:
    import fcntl
except ImportError:                          # Windows: no lock, no compile-ahead
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "NumbaCacheWarning",
    "available_threading_layers",
    "blas_threads",
    "cache_status",
    "cached_signatures",
    "fast_exp",
    "fast_tanh",
    "gemm",
    "jit",
    "kernel_name",
    "kernels",
    "launch",
    "minmax_reductions",
    "num_threads",
    "run_split",
    "shares_compiles",
    "split_items",
    "threading_layer",
    "wide_vectors",
]


class NumbaCacheWarning(RuntimeWarning):
    """The Numba cache cannot be written: kernels are compiled in memory on every run."""


def _writable_dir(path: str) -> tuple[bool, str]:
    """Whether ``path`` exists (or can be created) and accepts a new file."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".refattn-probe-"):
            pass
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def cache_status() -> dict:
    """Where compiled kernels go: ``{"enabled": bool, "dir": str, "reason": str}``."""
    user_dir = numba.config.CACHE_DIR
    if user_dir:
        ok, why = _writable_dir(user_dir)
        return {"enabled": ok, "dir": user_dir,
                "reason": "" if ok else f"NUMBA_CACHE_DIR={user_dir!r} is not writable ({why})"}
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "__pycache__")
    return {"enabled": True, "dir": f"{here} (or Numba's per-user cache folder)", "reason": ""}


_KERNELS: list = []
_warned: set[str] = set()


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message + "; kernels are compiled in memory on every run (set "
                      "NUMBA_CACHE_DIR to a writable folder to keep them)", NumbaCacheWarning,
                      stacklevel=3)


def jit(fn=None, *, parallel: bool = False, **options):
    """``numba.njit`` with refattn's settings (see the module docstring).

    Use as ``@jit`` or ``@jit(parallel=True)``.  The dispatcher is recorded in
    :func:`kernels` so that ``refattn info`` can report compile and cache figures.
    """
    if fn is None:
        return lambda f: jit(f, parallel=parallel, **options)
    settings = dict(fastmath={"contract"}, nogil=True, error_model="numpy", parallel=parallel)
    settings.update(options)
    status = cache_status()
    cache = status["enabled"]
    if not cache:
        _warn_once(f"refattn: {status['reason']}")
    try:
        dispatcher = numba.njit(cache=cache, **settings)(fn)
    except RuntimeError as exc:  # Numba found no writable cache location at all
        _warn_once(f"refattn: Numba cannot cache {fn.__qualname__} ({exc})")
        dispatcher = numba.njit(cache=False, **settings)(fn)
    _share_compiles(dispatcher)
    _KERNELS.append(dispatcher)
    return dispatcher


#: Seconds a compile waits for another process's lock on the same kernel before compiling
#: without it (a stopped process may hold it forever; a crashed one releases it).
COMPILE_LOCK_WAIT_S = 600.0


def shares_compiles() -> bool:
    """Whether compiles of cached kernels take the cross-process lock (needs ``fcntl``)."""
    return fcntl is not None


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive ``flock`` on ``path`` (created if absent), given up after
    :data:`COMPILE_LOCK_WAIT_S`; yields whether it is held."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:                          # a read-only cache: nothing to write anyway
        yield False
        return
    try:
        deadline = time.monotonic() + COMPILE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    held = False
                    break
                time.sleep(0.02)
            except OSError:                  # no locks on this file system (ENOLCK)
                held = False
                break
        yield held
    finally:
        os.close(fd)                         # releases the lock


def _share_compiles(dispatcher) -> None:
    """Compile ``dispatcher``'s missing signatures under its cache's lock file.

    Numba's ``Dispatcher.compile`` looks in the cache, compiles on a miss and saves; wrapped
    in the lock, a process that waited for another's compile of the same kernel finds it in
    the cache and loads it.  The lock is taken inside Numba's (re-entrant) compiler lock, so
    threads of one process queue there first and never wait on each other's file locks;
    callees compile inside their caller's compile, each under its own lock, always from
    caller to callee (no cycle: no kernel calls itself), so processes cannot deadlock.
    """
    index_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if fcntl is None or index_file is None:   # no fcntl, or caching off
        return
    lock_path = index_file._index_path + ".lock"
    compile_here = dispatcher.compile

    def compile(sig):
        args, _ = sigutils.normalize_signature(sig)
        if tuple(args) in dispatcher.overloads:      # compiled or loaded in this process
            return compile_here(sig)
        with global_compiler_lock:
            with contextlib.suppress(OSError):   # unwritable: _file_lock compiles unlocked
                os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            with _file_lock(lock_path):
                return compile_here(sig)

    dispatcher.compile = compile


def kernels() -> list:
    """Every dispatcher created through :func:`jit` so far."""
    return list(_KERNELS)


# --------------------------------------------------------------------------- threads

_LAUNCH_LOCK = threading.RLock()
_THREADSAFE_LAYERS = ("tbb", "omp")


def available_threading_layers() -> tuple:
    """Threading layers whose libraries load here, in Numba's order of preference."""
    out = []
    for layer, module in (("tbb", "tbbpool"), ("omp", "omppool"), ("workqueue", "workqueue")):
        try:
            __import__(f"numba.np.ufunc.{module}")
        except Exception:
            continue
        out.append(layer)
    return tuple(out)


def threading_layer() -> str:
    """The layer in use, or the one Numba will pick at its first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel launch yet
        requested = str(numba.config.THREADING_LAYER)
        available = available_threading_layers()
        if requested in available:
            return requested
        if requested in ("safe",):
            return "tbb" if "tbb" in available else "none (safe needs tbb)"
        return available[0] if available else "none"


def num_threads() -> int:
    """Threads a kernel call may use: Numba's setting for the calling thread
    (``numba.set_num_threads``, else ``NUMBA_NUM_THREADS``, else the CPU count)."""
    return numba.get_num_threads()


class _SingleThreadedBlas:
    """Keep the BLAS that ``np.dot`` calls inside kernels on one thread per caller.

    ``np.dot`` in ``njit`` code calls SciPy's OpenBLAS.  Called from the threads
    of a ``prange`` loop, a multi-threaded OpenBLAS oversubscribes the cores and,
    inside an OpenMP region, can hang ("Detect OpenMP Loop and this application may
    hang"): measured 40x slower here.  While any kernel runs, the BLAS thread count
    is set to 1 and restored when the last concurrent launch ends.  A BLAS without
    these entry points (MKL detects nesting itself) is left alone.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None
        self._get = self._set = None
        self._found = False

    def _find(self):
        self._found = True
        try:
            lib = ctypes.CDLL(cython_blas.__file__)   # dlsym also searches its dependencies
        except Exception:  # pragma: no cover - SciPy is a dependency
            return
        for prefix in ("scipy_openblas_", "scipy_openblas64_", "openblas_"):
            get = getattr(lib, f"{prefix}get_num_threads", None)
            set_ = getattr(lib, f"{prefix}set_num_threads", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                self._get, self._set = get, set_
                return

    def __enter__(self):
        with self._lock:
            if not self._found:
                self._find()
            if self._depth == 0 and self._set is not None:
                self._saved = self._get()
                if self._saved != 1:
                    self._set(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._set is not None and self._saved not in (None, 1):
                self._set(self._saved)

    def forget_launches(self):
        """In a forked child: no launch of the parent's runs here, so the BLAS gets its
        thread count back and the lock (perhaps held by a parent thread) is new."""
        self._lock = threading.Lock()
        if self._depth and self._set is not None and self._saved not in (None, 1):
            self._set(self._saved)
        self._depth = 0


_BLAS = _SingleThreadedBlas()
# the kernels' gemm symbols, bound before any kernel is compiled or loaded (a cached kernel
# refers to them by name)
blas.bind(lambda: _BLAS)


def blas_threads() -> int | None:
    """Threads of the BLAS used inside kernels (None when it is not OpenBLAS)."""
    if not _BLAS._found:
        _BLAS._find()
    return None if _BLAS._get is None else _BLAS._get()


@contextlib.contextmanager
def launch():
    """Context for parallel kernel launches.

    * keeps the BLAS called by ``np.dot`` inside kernels single-threaded (see
      :class:`_SingleThreadedBlas`): the kernel's ``prange`` threads own the cores;
    * serialises launches on the ``workqueue`` layer, which aborts the process when
      two Python threads launch at once (``tbb`` and ``omp`` accept that).
    """
    with _BLAS:
        if threading_layer() in _THREADSAFE_LAYERS:
            yield
            return
        with _LAUNCH_LOCK:
            yield


def split_items(costs, parts: int) -> list[np.ndarray]:
    """Cut items ``0 .. n-1`` (in this order) into at most ``parts`` contiguous runs of about
    equal total cost.

    Each cut is placed at the item boundary nearest to ``total * p / parts``, so no run is
    off its share by more than one item's cost.  Callers order their items so that
    neighbours are cheap to split (e.g. causal query tiles in zig-zag order 0, n-1, 1, n-2,
    ...: every pair costs the same).

    Parameters
    ----------
    costs : array_like, shape (n,)
        Non-negative cost of each item (any unit).
    parts : int
        Wanted number of runs; fewer come back when there are fewer items.

    Returns
    -------
    list of numpy.ndarray
        int64 index arrays, non-empty, disjoint, covering ``0 .. n-1`` in order (none when
        there are no items).

    Examples
    --------
    >>> [r.tolist() for r in split_items([1, 8, 2, 7, 3, 6, 4, 5], 2)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> [r.tolist() for r in split_items([5, 1, 1, 1, 1, 1], 2)]
    [[0], [1, 2, 3, 4, 5]]
    """
    costs = np.asarray(costs, dtype=np.float64)
    n = costs.shape[0]
    if n == 0:
        return []
    parts = max(1, min(int(parts), n))
    cum = np.cumsum(costs)
    total = cum[-1]
    cuts = [0]
    for p in range(1, parts):
        target = total * p / parts
        at = int(np.searchsorted(cum, target))       # cum[at - 1] < target <= cum[at]
        if at < n and cum[at] - target < target - (cum[at - 1] if at else 0.0):
            at += 1                                   # ending after item ``at`` is nearer
        cuts.append(min(max(at, cuts[-1] + 1), n - (parts - p)))
    cuts.append(n)
    return [np.arange(a, b, dtype=np.int64) for a, b in itertools.pairwise(cuts)]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` kernel threads: the process's largest, replaced by a
    larger one when a call needs more (so a sweep of thread counts leaves one pool)."""
    with _POOLS_LOCK:
        largest = max(_POOLS, default=0)
        if largest < workers:
            # dropped, not shut down: a caller holding it still submits; its idle threads
            # exit once it is garbage (ThreadPoolExecutor's weak reference)
            _POOLS.pop(largest, None)
            largest = workers
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="refattn-kernel",
                                                 initializer=blas.single_thread_here)
        return _POOLS[largest]


def _forget_pools_in_child():
    """A forked child inherits the pools but not their threads (a task submitted to one
    would never run): it starts with none and creates its own at first use; the BLAS
    setting of a launch running in the parent at the fork is undone."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _BLAS.forget_launches()


if hasattr(os, "register_at_fork"):          # POSIX
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def run_split(kernel, args: Sequence, items: np.ndarray, costs) -> None:
    """``kernel(*args, part)`` for disjoint parts of ``items``, on :func:`num_threads` threads.

    ``kernel`` is a serial ``nogil`` Numba kernel that loops over the int64 work items it is
    given and writes disjoint parts of its outputs.  The items are cut by
    :func:`split_items` (``costs[i]`` is the cost of ``items[i]``); the calling thread runs
    the first part and a pool of ``threads - 1`` threads the others.  With one thread (or
    one item) the kernel runs once in the calling thread, on every item.  The BLAS called
    inside the kernels stays single-threaded meanwhile (:class:`_SingleThreadedBlas`): the
    kernel threads own the cores.  An exception of any part is raised after all parts end.
    """
    items = np.ascontiguousarray(items, dtype=np.int64)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != items.shape:
        raise ValueError(f"costs must have the shape of items {items.shape}, got {costs.shape}")
    threads = num_threads()
    parts = [items[p] for p in split_items(costs, threads)] if items.size else [items]
    with _BLAS:
        restore = blas.single_thread_here()      # MKL: per thread (the pool's: at start)
        try:
            if len(parts) == 1:
                kernel(*args, parts[0])
                return
            pool = _pool(threads - 1)
            futures = [pool.submit(kernel, *(*args, part)) for part in parts[1:]]
            try:
                kernel(*args, parts[0])
            finally:
                errors = [f.exception() for f in futures]
        finally:
            blas.restore_threads(restore)
        for error in errors:
            if error is not None:
                raise error


# --------------------------------------------------------------------------- exp

_F32 = np.float32
_F64 = np.float64


def _exp32(x):
    # Cephes expf: exp(x) = 2^n exp(r), |r| <= ln2/2, degree-6 polynomial for exp(r);
    # 2^n is written into the exponent bits.  Max relative error 1.2e-7 (2 ulp).
    # Written so that LLVM vectorises it (no libm call per element).
    xc = min(max(x, _F32(-87.0)), _F32(88.0))
    fx = np.floor(xc * _F32(1.44269504088896341) + _F32(0.5))
    r = xc - fx * _F32(0.693359375) - fx * _F32(-2.12194440e-4)
    z = r * r
    y = ((((_F32(1.9875691500e-4) * r + _F32(1.3981999507e-3)) * r + _F32(8.3334519073e-3)) * r
          + _F32(4.1665795894e-2)) * r + _F32(1.6666665459e-1)) * r + _F32(5.0000001201e-1)
    y = y * z + r + _F32(1.0)
    out = y * np.int32((np.int32(fx) + np.int32(127)) << np.int32(23)).view(_F32)
    if x < _F32(-87.0):  # exp(-87) = 1.6e-38: the zero of a masked (-inf) score, exactly
        out = _F32(0.0)
    if x != x:
        out = x
    return out


def _exp64(x):
    # Cephes exp: 2^n exp(r) with a (3,3) Pade form for exp(r); max relative error 2.2e-16.
    xc = min(max(x, -708.0), 709.0)
    fx = np.floor(xc * 1.4426950408889634073599 + 0.5)
    r = xc - fx * 6.93145751953125e-1 - fx * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
              + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
          + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0
    y = 1.0 + 2.0 * (px / (qx - px))
    out = y * np.int64((np.int64(fx) + np.int64(1023)) << np.int64(52)).view(_F64)
    if x < -708.0:  # exp(-708) = 3.3e-308
        out = 0.0
    if x != x:
        out = x
    return out


def minmax_reductions():
    """Called first in a small jitted function: let LLVM vectorise its min/max reductions.

    LLVM vectorises ``m = x if x > m else m`` over a row only when the function may assume
    no NaN and no signed zero (measured 10x on a 256-wide row here: 1.6 -> 13-16 G/s).  The
    function gets ``"no-nans-fp-math"`` and ``"no-signed-zeros-fp-math"``, and ``noinline``
    so that the assumption stays inside it.  With a NaN among its inputs its result is
    unspecified (a NaN or one of the values): use it only where the caller handles that (the
    SDPA row maximum: a row holding a NaN score must sum to NaN whatever the maximum is).
    A no-op in Python (``NUMBA_DISABLE_JIT``).
    """


def wide_vectors():
    """Called first in a jitted function: let LLVM vectorise its loops with the widest vector
    registers of the host (512-bit on AVX-512 CPUs).

    LLVM's cost model for most AVX-512 CPUs prefers 256-bit vectors (the frequency of older
    server parts dropped under 512-bit code); for the element-wise ``exp`` of the SDPA rows
    the wider vectors measured 1.3-1.4x here (docs/benchmarks.md).  Sets the function's
    ``"prefer-vector-width"`` and ``"min-legal-vector-width"`` (the second one survives
    inlining into callers, so the backend does not split the wide operations again); on CPUs
    without AVX-512 the widest registers are the default ones and nothing changes.  A no-op
    in Python (``NUMBA_DISABLE_JIT``).
    """


def _function_attributes(*names):
    """An intrinsic that adds LLVM function attributes to the function that calls it."""
    def intrinsic(typingctx):
        def codegen(context, builder, sig, args):
            attributes = builder.function.attributes
            for name in names:
                if "=" in name:                  # a string attribute: llvmlite's add()
                    set.add(attributes, name)    # accepts keyword attributes only
                else:
                    attributes.add(name)
            return context.get_dummy_value()

        return numba.types.none(), codegen

    return numba.extending.intrinsic(intrinsic)


_MINMAX_ATTRIBUTES = _function_attributes('"no-nans-fp-math"="true"',
                                          '"no-signed-zeros-fp-math"="true"', "noinline")
_WIDE_ATTRIBUTES = _function_attributes('"prefer-vector-width"="512"',
                                        '"min-legal-vector-width"="512"')


# inlined at Numba IR level: the intrinsic then sets the attributes of the caller itself
@numba.extending.overload(minmax_reductions, inline="always")
def _minmax_reductions_overload():
    return lambda: _MINMAX_ATTRIBUTES()


@numba.extending.overload(wide_vectors, inline="always")
def _wide_vectors_overload():
    return lambda: _WIDE_ATTRIBUTES()


def fast_exp(x):
    """``exp(x)`` for float32/float64 scalars in a form LLVM vectorises.

    Inside kernels it resolves at compile time to the float32 or float64
    polynomial; ``exp(-inf)`` is exactly 0 and NaN propagates.
    """
    if isinstance(x, np.float32):
        return _exp32(x)
    return _exp64(_F64(x))


_EXP_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy"}


@numba.extending.overload(fast_exp, jit_options=_EXP_OPTIONS)
def _fast_exp_overload(x):
    if x == numba.types.float32:
        return lambda x: _exp32_nb(x)
    return lambda x: _exp64_nb(x)


_exp32_nb = numba.njit(**_EXP_OPTIONS)(_exp32)
_exp64_nb = numba.njit(**_EXP_OPTIONS)(_exp64)


def _tanh32(x):
    # Eigen's float tanh: an odd rational (13, 6) minimax form on [-7.9988, 7.9988] (beyond
    # it tanh rounds to +-1 in float32); max error 4.4 ulp (2.6e-7 relative, measured
    # against float64 tanh on 2.2e6 points).  No libm call: LLVM vectorises it.
    xc = min(max(x, _F32(-7.99881172180175781)), _F32(7.99881172180175781))
    x2 = xc * xc
    p = x2 * _F32(-2.76076847742355e-16) + _F32(2.00018790482477e-13)
    p = x2 * p + _F32(-8.60467152213735e-11)
    p = x2 * p + _F32(5.12229709037114e-08)
    p = x2 * p + _F32(1.48572235717979e-05)
    p = x2 * p + _F32(6.37261928875436e-04)
    p = x2 * p + _F32(4.89352455891786e-03)
    d = x2 * _F32(1.19825839466702e-06) + _F32(1.18534705686654e-04)
    d = x2 * d + _F32(2.26843463243900e-03)
    d = x2 * d + _F32(4.89352518554385e-03)
    out = xc * p / d
    if abs(x) < _F32(0.0004):  # tanh(x) = x to float32 rounding
        out = x
    if x != x:
        out = x
    return out


def fast_tanh(x):
    """``tanh(x)`` for float32/float64 scalars; float32 in a form LLVM vectorises.

    float32 resolves to a rational minimax form (4.4 ulp); float64 to libm's ``tanh``
    (correctly rounded in practice; not vectorised).
    """
    if isinstance(x, np.float32):
        return _tanh32(x)
    return math.tanh(x)


@numba.extending.overload(fast_tanh, jit_options=_EXP_OPTIONS)
def _fast_tanh_overload(x):
    if x == numba.types.float32:
        return lambda x: _tanh32_nb(x)
    return lambda x: math.tanh(x)


_tanh32_nb = numba.njit(**_EXP_OPTIONS)(_tanh32)


# --------------------------------------------------------------------------- gemm

@numba.extending.intrinsic
def _xxgemm(typingctx, c, a, b, trans_a, trans_b, accumulate):
    """One call of the bound BLAS's ``sgemm`` / ``dgemm`` (Fortran interface, 32-bit
    integers: :mod:`.blas`) with ``beta`` exposed, so that tile products accumulate in place
    (``C += A B``) without a temporary and an extra pass.  Referenced by symbol name
    (``refattn_sgemm`` / ``refattn_dgemm``), so kernels that use it stay cacheable (a ctypes
    pointer would not) and valid whichever provider the symbol is bound to."""
    sig = numba.types.none(c, a, b, trans_a, trans_b, accumulate)

    def codegen(context, builder, sig, args):
        c_ty, a_ty, b_ty = sig.args[:3]
        c_val, a_val, b_val, ta, tb, acc = args
        arr_c, arr_a, arr_b = (context.make_array(t)(context, builder, v)
                               for t, v in ((c_ty, c_val), (a_ty, a_val), (b_ty, b_val)))
        dtype = c_ty.dtype
        ll_char, ll_int = ir.IntType(8), ir.IntType(32)
        ll_float = context.get_value_type(dtype)
        char_p, int_p, float_p = (t.as_pointer() for t in (ll_char, ll_int, ll_float))
        fnty = ir.FunctionType(ir.VoidType(), [char_p, char_p, int_p, int_p, int_p, float_p,
                                               float_p, int_p, float_p, int_p, float_p,
                                               float_p, int_p])
        name = blas.SYMBOLS["float32" if dtype == numba.types.float32 else "float64"]
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        one, zero = context.get_constant(dtype, 1.0), context.get_constant(dtype, 0.0)
        alpha = cgutils.alloca_once_value(builder, one)
        beta = cgutils.alloca_once_value(builder, builder.select(acc, one, zero))
        m, n = cgutils.unpack_tuple(builder, arr_c.shape)
        a_rows, a_cols = cgutils.unpack_tuple(builder, arr_a.shape)
        b_cols = cgutils.unpack_tuple(builder, arr_b.shape)[1]
        k = builder.select(ta, a_rows, a_cols)

        def int_arg(value):                      # tile sizes: far below 2**31
            return cgutils.alloca_once_value(builder, builder.trunc(value, ll_int))

        t_char, n_char = ir.Constant(ll_char, ord("T")), ir.Constant(ll_char, ord("N"))
        trans_b_char = cgutils.alloca_once_value(builder, builder.select(tb, t_char, n_char))
        trans_a_char = cgutils.alloca_once_value(builder, builder.select(ta, t_char, n_char))
        # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
        builder.call(fn, (trans_b_char, trans_a_char, int_arg(n), int_arg(m), int_arg(k), alpha,
                          builder.bitcast(arr_b.data, float_p), int_arg(b_cols),
                          builder.bitcast(arr_a.data, float_p), int_arg(a_cols), beta,
                          builder.bitcast(arr_c.data, float_p), int_arg(n)))
        return context.get_dummy_value()

    return sig, codegen


def gemm(c, a, trans_a, b, trans_b, accumulate):
    """``c = op(a) @ op(b)``, or ``c += op(a) @ op(b)`` with ``accumulate``.

    ``op(x)`` is ``x.T`` when its flag is set.  All three are C-contiguous 2-D
    arrays of one float dtype; inside kernels this is one BLAS call.
    """
    product = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if accumulate:
        c += product
    else:
        c[...] = product


@numba.extending.overload(gemm, jit_options={"fastmath": False})
def _gemm_overload(c, a, trans_a, b, trans_b, accumulate):
    for name, x in (("c", c), ("a", a), ("b", b)):
        if not (isinstance(x, numba.types.Array) and x.ndim == 2 and x.layout == "C"):
            raise numba.errors.TypingError(f"gemm: {name} must be a C-contiguous 2-D array, "
                                           f"got {x}")

    def impl(c, a, trans_a, b, trans_b, accumulate):
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:                               # BLAS rejects a leading dimension of 0
            if not accumulate:
                c[...] = 0
            return
        _xxgemm(c, a, b, trans_a, trans_b, accumulate)

    return impl


# --------------------------------------------------------------------------- compile time

def kernel_name(dispatcher) -> str:
    """``core.function`` of a kernel, e.g. ``sdpa._forward_kernel``."""
    module = dispatcher.py_func.__module__.split(".")
    core = module[-2] if module[-1] == "numba" and len(module) > 1 else module[-1]
    return f"{core}.{dispatcher.py_func.__name__}"


def cached_signatures(dispatcher) -> dict:
    """What Numba's cache holds for ``dispatcher``, read from its index file only.

    Nothing is compiled and no compiled code is loaded.  An entry counts as
    usable (``"here"``) when it was written for this CPU (target triple, CPU name
    and features: Numba's ``magic_tuple``), from the current source file (its
    stamp) and the current bytecode of the function; anything else in the index
    is ``"elsewhere"`` (another CPU sharing the folder, or stale).

    Returns
    -------
    dict
        ``{"enabled": bool, "dir": str | None, "here": [signature, ...],
        "elsewhere": int}``; signatures are tuples of Numba types.
    """
    cache: Any = getattr(dispatcher, "_cache", None)
    index_file = getattr(cache, "_cache_file", None)
    if cache is None or index_file is None:       # caching off (NullCache)
        return {"enabled": False, "dir": None, "here": [], "elsewhere": 0}
    index = index_file._load_index()              # {} if missing, stale or another Numba
    codegen = dispatcher.targetctx.codegen()
    here = [key[0] for key in index if key == cache._index_key(key[0], codegen)]
    return {"enabled": True, "dir": cache.cache_path, "here": here,
            "elsewhere": len(index) - len(here)}

