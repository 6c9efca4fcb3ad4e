"""SDPA CuPy backend: fused FlashAttention-2 kernels (``sdpa.cu`` beside this file).

Forward: one kernel, a tiled online softmax that never forms the ``(L, S)``
scores in memory and saves only the log-sum-exp.  Backward: one kernel per
key block that recomputes the probabilities from the log-sum-exp, accumulates
``dK``, ``dV`` in registers over every query tile (and every query head of a
GQA group) and ``dQ`` with atomics.  float16 runs on the tensor cores with
float32 accumulation; float32 runs on the tensor cores as 3xTF32 (float32
accuracy;  ``float32_math="simt"`` selects CUDA cores instead);
float64 runs on CUDA cores.  See ``docs/backends/cupy.md``.

Options run in the kernels too, compiled in only when a call uses them (template bits
``OPTION_BITS``; the kernels without options are the ones validated on a GPU): the
sliding window (with the causal rule) and packed or padded sequences as a keep rule
with key (query) tiles outside it skipped by the loop bounds (``sdpa_rules.cuh``),
the soft-cap, and ALiBi computed from the positions, with the slopes' gradient summed
by atomics, and FlexAttention-style ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` whose
functions carry a CUDA expression (:func:`refattn.cuda_expression`): the driver pastes them
in front of the kernel source (:mod:`.cuda_mods`) and NVRTC compiles the kernels once per
set of expressions.  Functions without one, and ``return_probs``, stay on the reference
backend (:mod:`refattn.cores.sdpa.api`).

The log-sum-exp is kept in the accumulation type (float32 for float16 inputs):
rounding it to float16 would cost the backward pass ~1e-2 relative accuracy.

Backend contract: :mod:`refattn.cores.sdpa.api`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...backends import cupy_support as cs
from . import cuda_mods

__all__ = ["forward", "backward", "MAX_HEAD_DIM", "DEFAULT_FLOAT32_MATH", "SOURCE", "OPTION_BITS",
           "option_bits", "rule_arguments", "RULE_UNBOUNDED", "MAX_LENGTH", "Device",
           "cupy_device"]

#: Largest ``E`` / ``Ev`` the kernels take (register tiles are sized at compile time).
MAX_HEAD_DIM = 256

#: float32 matrix products unless the call's ``SDPAOptions.float32_math`` says otherwise:
#: ``"tf32x3"`` (tensor cores, split operands) or ``"simt"`` (CUDA cores).
DEFAULT_FLOAT32_MATH = "tf32x3"

#: Template bits of the option kernels (``OPT_*`` in ``sdpa.cu``): which options a
#: call compiles in.  ``"window"`` also carries the causal rule; ``"sequences"`` is a
#: packed or padded call mapped onto its sequences (``SDPAOptions.sequences``);
#: ``"mask_mod"`` / ``"score_mod"`` the user's functions as CUDA expressions
#: (:mod:`.cuda_mods`; ``score_mod`` also carries ``score_mod_grad``).
OPTION_BITS = {"window": 1, "softcap": 2, "alibi": 4, "sequences": 8, "mask_mod": 16,
               "score_mod": 32}

#: A window side that keeps everything (``RULE_UNBOUNDED`` of ``sdpa_rules.cuh``).
RULE_UNBOUNDED = 1 << 30

#: Longest query or key axis the option kernels take (the keep rule's arithmetic is int32).
MAX_LENGTH = 1 << 29

# Shared memory a block may use when no device is at hand (the CI compile test):
# Hopper's 227 KiB.  At run time the device's own opt-in limit decides.
_DEFAULT_SMEM_LIMIT = 227 * 1024

# Template codes of sdpa.cu per kind: (forward DT, its shared element size, backward
# DT, its shared element size, row padding in elements, accumulator dtype).
_KINDS = {
    "float16": (0, 2, 0, 2, 8, "float32"),
    "tf32x3": (1, 4, 1, 4, 4, "float32"),
    "float64": (2, 8, 2, 8, 2, "float64"),
    "simt": (3, 4, 3, 4, 4, "float32"),
}


def _kind(dtype, float32_math=None) -> str:
    name = np.dtype(dtype).name
    if name == "float32":
        return float32_math or DEFAULT_FLOAT32_MATH
    if name in ("float16", "float64"):
        return name
    raise TypeError(f"backend='cupy' supports float16, float32 and float64, got {name}")


def _pad16(n: int) -> int:
    return max(16, -(-n // 16) * 16)


# Kinds whose matrix products take P straight from registers (no P tile in shared memory).
_REGISTER_P = ("float16", "tf32x3")
# Kinds whose forward double-buffers the K, V tiles (cp.async).
_TWO_STAGES = ("float16", "tf32x3")
# Kinds whose backward double-buffers the query-side tiles (cp.async).
_TWO_STAGES_BWD = ("float16",)


def _fwd_smem(kind, EP, EVP, NW, BN) -> int:
    _, item, _, _, pad, _ = _KINDS[kind]
    BM = 16 * NW
    p_tile = 0 if kind in _REGISTER_P else BM * (BN + pad)
    stages = 2 if kind in _TWO_STAGES else 1
    return item * (BM * (EP + pad) + stages * BN * (EP + EVP + 2 * pad) + p_tile)


def _bwd_smem(kind, EP, EVP, NW) -> int:
    _, _, _, item, pad, acc = _KINDS[kind]
    BM = BN = 16 * NW
    stages = 2 if kind in _TWO_STAGES_BWD else 1   # Q, dO, lse, D tiles
    tiles = BN * (EP + pad) + BN * (EVP + pad) + BN * (BM + pad)
    tiles += stages * (BM * (EP + pad) + BM * (EVP + pad))
    return item * tiles + stages * 2 * BM * np.dtype(acc).itemsize


def _first_fitting(choices, smem, limit, what):
    # Prefer two blocks per multiprocessor (half the opt-in limit, at least 99 KiB:
    # the whole of it on consumer GPUs), then anything that fits.
    for budget in (max(limit // 2, min(limit, 99 * 1024)), limit):
        for c in choices:
            if smem(c) <= budget:
                return c
    raise ValueError(f"backend='cupy': {what} needs {min(map(smem, choices))} bytes of shared "
                     f"memory per block, the device allows {limit}; use backend='reference'")


def device_smem_limit() -> int:
    """Shared memory a block of the current device may opt in to (bytes)."""
    cp = cs.cupy()
    dev = cp.cuda.Device()
    return _smem_limit(dev.id)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_id: int) -> int:
    cp = cs.cupy()
    return int(cp.cuda.runtime.deviceGetAttribute(
        cp.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id))


def option_bits(opts) -> int:
    """The ``OPTION_BITS`` an :class:`~refattn.cores.sdpa.api.SDPAOptions` needs (0: none)."""
    seq = opts.sequences
    window = opts.window if seq is None else seq.window
    return ((OPTION_BITS["window"] if window is not None else 0)
            | (OPTION_BITS["softcap"] if opts.softcap is not None else 0)
            | (OPTION_BITS["alibi"] if opts.alibi is not None else 0)
            | (OPTION_BITS["sequences"] if seq is not None else 0)
            | (OPTION_BITS["mask_mod"] if opts.mask_mod is not None else 0)
            | (OPTION_BITS["score_mod"] if opts.score_mod is not None else 0))


def call_mods(opts) -> cuda_mods.CudaMods | None:
    """The CUDA expressions of the call's ``mask_mod`` / ``score_mod`` / ``score_mod_grad``
    (None without functions).

    Raises ValueError when a function has none (:func:`refattn.cuda_expression`): the
    public call routes those to the reference backend (:func:`~.api.option_route`).
    """
    if opts.mask_mod is None and opts.score_mod is None:
        return None
    mods = cuda_mods.of_options(opts)
    if mods is None:
        missing = [name for name in cuda_mods.FUNCTION_NAMES
                   if getattr(opts, name) is not None
                   and cuda_mods.expression_of(getattr(opts, name)) is None]
        raise ValueError(f"backend='cupy' evaluates {', '.join(n + '=' for n in missing)} in "
                         f"its kernels only as CUDA expressions: decorate the function with "
                         f"refattn.cuda_expression(...) or use backend='reference'")
    return mods


def rule_arguments(opts) -> tuple:
    """``(lo_rel, hi_rel, causal, lower_right)`` of ``make_rule`` in ``sdpa_rules.cuh``.

    One call (``opts.window = (lo, hi)`` already holds the causal alignment's offset):
    the rule's offset is 0 and the causal rule ``j <= i + offset`` caps ``hi``.  Packed
    or padded sequences (``opts.sequences``): FlashAttention's ``(left, right)`` relative
    to each sequence's own offset (``S_n - L_n`` when lower-right).
    """
    seq = opts.sequences
    if seq is not None:
        left, right = seq.window if seq.window is not None else (-1, -1)
        return (-left if left >= 0 else -RULE_UNBOUNDED, right if right >= 0 else RULE_UNBOUNDED,
                int(seq.causal), int(seq.lower_right))
    lo, hi = opts.window if opts.window is not None else (None, None)
    lo = -RULE_UNBOUNDED if lo is None else max(int(lo), -RULE_UNBOUNDED + 1)
    hi = RULE_UNBOUNDED if hi is None else min(int(hi), RULE_UNBOUNDED - 1)
    if opts.causal_offset is not None:
        hi = min(hi, int(opts.causal_offset))
    return lo, hi, 0, 0


def kernel_config(dtype, E: int, Ev: int, float32_math=None, smem_limit=_DEFAULT_SMEM_LIMIT,
                  options: int = 0):
    """Kernel names and shared-memory sizes for one problem.

    ``options`` is a set of ``OPTION_BITS`` (0: the kernels without options).

    Returns
    -------
    dict with ``fwd`` / ``bwd`` (template name expressions), ``fwd_smem`` /
    ``bwd_smem`` (bytes), ``fwd_rows`` (queries per forward block), ``bwd_rows``
    (keys per backward block) and ``acc`` (accumulation dtype).
    """
    if max(E, Ev) > MAX_HEAD_DIM:
        raise ValueError(f"backend='cupy' supports head dims up to {MAX_HEAD_DIM}, got E={E}, "
                         f"Ev={Ev}; use backend='reference'")
    kind = _kind(dtype, float32_math)
    dt, _, dtb, _, _, acc = _KINDS[kind]
    EP, EVP = _pad16(E), _pad16(Ev)
    # Forward: 4 warps x 16 queries against 64-key tiles when they fit; float64
    # and wide heads take smaller tiles (registers hold 16 x EVP outputs per warp).
    fwd_choices = [(2, 32), (1, 16)] if kind == "float64" else [(4, 64), (4, 32), (2, 32), (1, 16)]
    if max(EP, EVP) > 128:
        fwd_choices = [c for c in fwd_choices if c[1] <= 32]
    NW, BN = _first_fitting(fwd_choices, lambda c: _fwd_smem(kind, EP, EVP, *c), smem_limit,
                            f"the forward pass for E={E}, Ev={Ev} in {kind}")
    # Backward: each warp holds dK, dV of 16 keys (2 x 16 x E accumulators).
    bwd_choices = [4, 2, 1] if (kind != "float64" and max(EP, EVP) <= 64) else [2, 1]
    NWB = _first_fitting(bwd_choices, lambda c: _bwd_smem(kind, EP, EVP, c), smem_limit,
                         f"the backward pass for E={E}, Ev={Ev} in {kind}")
    if not 0 <= options < 2 * max(OPTION_BITS.values()):
        raise ValueError(f"options must be a set of OPTION_BITS {OPTION_BITS}, got {options}")
    fwd = (f"sdpa_fwd_opt<{dt},{EP},{EVP},{NW},{BN},{options}>" if options
           else f"sdpa_fwd<{dt},{EP},{EVP},{NW},{BN}>")
    bwd = (f"sdpa_bwd_opt<{dtb},{EP},{EVP},{NWB},{options}>" if options
           else f"sdpa_bwd<{dtb},{EP},{EVP},{NWB}>")
    return {
        "fwd": fwd,
        "bwd": bwd,
        "fwd_smem": _fwd_smem(kind, EP, EVP, NW, BN),
        "bwd_smem": _bwd_smem(kind, EP, EVP, NWB),
        "fwd_rows": 16 * NW,
        "bwd_rows": 16 * NWB,
        "fwd_threads": 32 * NW,
        "bwd_threads": 32 * NWB,
        "acc": acc,
    }


_KIND_ARGS = (("float16", None), ("float32", "tf32x3"), ("float32", "simt"), ("float64", None))


def _instantiations():
    """Every code path: each element type and float32 math with narrow and odd-sized heads
    (E != Ev, unvectorised loads), wide heads (fewer warps per block) for the tensor-core
    and float64 kernels, the widest heads once: other sizes only change constants, and
    each instantiation costs seconds of NVRTC time on CI.  Then the option kernels
    (:func:`option_instantiations`)."""
    names = []
    for dtype, math in _KIND_ARGS:
        shapes = ((8, 8), (40, 72)) + (((128, 128),) if math != "simt" else ())
        shapes += ((256, 256),) if dtype == "float16" else ()
        for E, Ev in shapes:
            cfg = kernel_config(dtype, E, Ev, math)
            names += [cfg["fwd"], cfg["bwd"]]
    return tuple(dict.fromkeys(names + list(option_instantiations())))


def option_instantiations():
    """The option kernels the compile test builds, at the narrow heads (the options' code
    does not depend on the head size): all options together for each element type and
    float32 math (every option's code with each type's conversions), and each option alone
    in float64 (each bit's code without the others).  Each instantiation costs about 5 s of
    NVRTC time on CI, so not every combination."""
    every = sum(OPTION_BITS.values())
    names = []
    for dtype, math in _KIND_ARGS:
        cfg = kernel_config(dtype, 8, 8, math, options=every)
        names += [cfg["fwd"], cfg["bwd"]]
    for bits in OPTION_BITS.values():
        cfg = kernel_config("float64", 8, 8, options=bits)
        names += [cfg["fwd"], cfg["bwd"]]
    return tuple(dict.fromkeys(names))


SOURCE = cs.KernelSource(os.path.join(os.path.dirname(__file__), "sdpa.cu"), _instantiations)


def _nvrtc(code, name):
    return cs.nvrtc_compile(code, name, warnings_are_errors=False)


def _launch(name, smem, grid, threads, args, mods=None):
    if mods is not None:    # each expression alone first: an error names its argument
        cuda_mods.check_compiles(mods, _nvrtc)
    fn = SOURCE.function(name, prelude="" if mods is None else mods.source())
    if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem  # opt in beyond the default 48 KiB
    fn(grid, (threads,), args, shared_mem=smem)


@dataclass(frozen=True)
class Device:
    """Where :func:`forward` and :func:`backward` run their kernels.

    Attributes
    ----------
    xp : module
        The array namespace of the operands (``cupy``), with ``empty``, ``zeros``,
        ``full``, ``sum``, ``reshape``, ``asarray`` and ``ascontiguousarray``.
    launch : callable
        ``launch(name, smem, grid, threads, args, mods)`` runs the kernel ``name`` (a
        template name expression of :func:`kernel_config`) on a ``grid`` of ``(x, y)``
        blocks of ``threads`` threads with ``smem`` bytes of dynamic shared memory; ``args``
        are the kernel's arguments (arrays, the null pointer :data:`cupy_support.NULL` and
        NumPy scalars of the parameters' C types); ``mods`` is the call's
        :class:`~.cuda_mods.CudaMods` (its ``source()`` goes in front of the kernel source)
        or None.
    smem_limit : int
        Dynamic shared memory a block may opt in to (bytes): picks the tiles.

    The CPU tests run the same driver on an emulation of the kernels
    (``tests/backends/test_cuda_on_cpu.py``); :func:`cupy_device` is the GPU.

    Examples
    --------
    A device that records the launches instead of running them (NumPy arrays):

    >>> import numpy as np
    >>> from refattn.cores.sdpa import api, cupy as sdpa_cupy
    >>> q = np.zeros((1, 2, 40, 8))
    >>> _, _, opts = api.prepare(q, q, q, window=(4, 0))
    >>> launches = []
    >>> device = sdpa_cupy.Device(np, lambda *launch: launches.append(launch[:4]), 227 * 1024)
    >>> o, lse = sdpa_cupy.forward(q, q, q, opts, device=device)
    >>> launches            # name, dynamic shared memory, grid (B H, query tiles), threads
    [('sdpa_fwd_opt<2,16,16,2,32,1>', 22528, (2, 2), 64)]

    A causal mask written as a function, compiled into the kernels (option bit 16):

    >>> import refattn
    >>> causal = refattn.cuda_expression("j <= i")(lambda b, h, i, j: j <= i)
    >>> _, _, opts = api.prepare(q, q, q, mask_mod=causal)
    >>> o, lse = sdpa_cupy.forward(q, q, q, opts, device=device)
    >>> launches[-1][0], sdpa_cupy.call_mods(opts)
    ('sdpa_fwd_opt<2,16,16,2,32,16>', CudaMods(mask_mod='j <= i', score_mod=None, score_mod_grad=None))
    """

    xp: Any
    launch: Callable
    smem_limit: int


def cupy_device() -> Device:
    """The current CUDA device through CuPy."""
    return Device(cs.cupy(), _launch, device_smem_limit())


def _mods_args(opts, H, Hkv, L, S, E, Ev):
    """The score-modifier arguments shared by both kernels (see ``MODS_PARAMS``)."""
    args = []
    for m in (opts.mask, opts.bias, opts.dropout_mask):
        args.append(cs.pointer_or_null(m))
        args += [np.int64(s) for s in (cs.strides4(m) if m is not None else (0, 0, 0, 0))]
    causal = opts.causal_offset is not None
    args += cs.scalar_args(H, Hkv, L, S, E, Ev, float(opts.scale), int(causal),
                           int(opts.causal_offset) if causal else 0, float(opts.dropout_scale))
    return args


def _spans(cp, opts):
    """``(spans (N, 5) int32 on the device, N, longest queries, longest keys)`` of a packed or
    padded call (``opts.sequences``), or None (``cp``: the array namespace)."""
    seq = opts.sequences
    if seq is None:
        return None
    spans = np.asarray(seq.spans, dtype=np.int64).reshape(-1, 5)
    longest_q = int((spans[:, 2] - spans[:, 1]).max(initial=0))
    longest_k = int((spans[:, 4] - spans[:, 3]).max(initial=0))
    return cp.asarray(spans.astype(np.int32)), spans.shape[0], longest_q, longest_k


def _opt_args(cp, opts, spans, acc, dslopes=None):
    """The option arguments of both kernels (see ``OPT_PARAMS`` in ``sdpa.cu``); the slopes
    in the accumulation type ``acc`` (float16 inputs keep float32 slopes, as the reference
    and FlashAttention do)."""
    slopes, rows_stride = cs.NULL, 0
    if opts.alibi is not None:
        heads = opts.alibi.shape[1]
        slopes = cp.ascontiguousarray(cp.reshape(opts.alibi, (-1, heads)).astype(acc,
                                                                                 copy=False))
        rows_stride = heads if slopes.shape[0] > 1 else 0
    return ([cs.pointer_or_null(None if spans is None else spans[0])]
            + list(cs.scalar_args(*(int(a) for a in rule_arguments(opts)),
                                  float(opts.softcap if opts.softcap is not None else 1.0)))
            + [slopes, np.int64(rows_stride), cs.pointer_or_null(dslopes)])


def _check_lengths(L, S, bits):
    if bits and max(L, S) >= MAX_LENGTH:
        raise ValueError(f"backend='cupy' takes query and key lengths below {MAX_LENGTH} with "
                         f"window, softcap, alibi_slopes, sequences, mask_mod or score_mod, got "
                         f"L={L}, S={S}")


def _check_alibi_offset(opts, L, S):
    """The kernels measure ALiBi distances from the diagonal ``j = i + S - L`` (each
    sequence's own with ``opts.sequences``); a block of a sharded call with another offset
    runs on the reference (:mod:`refattn.distributed`)."""
    if opts.alibi is not None and opts.alibi_offset is not None and \
            (opts.sequences is not None or opts.alibi_offset != S - L):
        raise ValueError(f"backend='cupy' takes no alibi_offset other than S - L = {S - L}, got "
                         f"{opts.alibi_offset} (use backend='reference')")


def forward(q, k, v, opts, device=None):
    """``(o (B, H, L, Ev), lse (B, H, L))``; see :mod:`refattn.cores.sdpa.api`.

    With ``opts.sequences`` the rows outside every sequence give 0 (``lse = -inf``).
    ``device``: a :class:`Device`, :func:`cupy_device` when None.
    """
    device = cupy_device() if device is None else device
    cp = device.xp
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    bits = option_bits(opts)
    mods = call_mods(opts)
    _check_lengths(L, S, bits)
    _check_alibi_offset(opts, L, S)
    cfg = kernel_config(q.dtype, E, Ev, opts.float32_math, smem_limit=device.smem_limit,
                        options=bits)
    q, k, v = (cp.ascontiguousarray(x) for x in (q, k, v))
    spans = _spans(cp, opts)
    if spans is None:
        o = cp.empty((B, H, L, Ev), dtype=q.dtype)
        lse = cp.empty((B, H, L), dtype=cfg["acc"])
    else:       # blocks write only the rows of a sequence
        o = cp.zeros((B, H, L, Ev), dtype=q.dtype)
        lse = cp.full((B, H, L), -np.inf, dtype=cfg["acc"])
    if o.size == 0:
        return o, lse
    rows = cfg["fwd_rows"]
    blocks, query_rows = (B * H, L) if spans is None else (spans[1] * H, spans[2])
    if blocks == 0 or query_rows == 0:
        return o, lse
    args = [q, k, v, o, lse] + _mods_args(opts, H, Hkv, L, S, E, Ev)
    if bits:
        args += _opt_args(cp, opts, spans, cfg["acc"])
    device.launch(cfg["fwd"], cfg["fwd_smem"], (blocks, -(-query_rows // rows)),
                  cfg["fwd_threads"], args, mods)
    return o, lse


def backward(q, k, v, o, lse, do, opts, device=None):
    """``(dq, dk, dv, dscores, dslopes)``; see :mod:`refattn.cores.sdpa.api`.

    ``dslopes`` is ``(B, H)``, or ``(N, H)`` per sequence with ``opts.sequences``.
    ``device``: a :class:`Device`, :func:`cupy_device` when None.
    """
    device = cupy_device() if device is None else device
    cp = device.xp
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if opts.score_mod is not None and opts.score_mod_grad is None:
        raise ValueError("the gradient through score_mod= needs its derivative: pass "
                         "score_mod_grad(score, b, h, i, j) = d score_mod / d score")
    bits = option_bits(opts)
    mods = call_mods(opts)
    _check_lengths(L, S, bits)
    _check_alibi_offset(opts, L, S)
    cfg = kernel_config(q.dtype, E, Ev, opts.float32_math, smem_limit=device.smem_limit,
                        options=bits)
    acc = cfg["acc"]
    q, k, v, do = (cp.ascontiguousarray(x) for x in (q, k, v, do))
    # D = rowsum(dO * O) (B, H, L), in the accumulation type.
    rowdot = cp.sum(do.astype(acc, copy=False) * o.astype(acc, copy=False), axis=-1)
    dq = cp.zeros((B, H, L, E), dtype=acc)       # accumulated over key blocks (atomics)
    dk = cp.zeros((B, Hkv, S, E), dtype=q.dtype)
    dv = cp.zeros((B, Hkv, S, Ev), dtype=q.dtype)
    # Score gradient for a float bias; causal-skipped tiles stay 0.
    dscores = cp.zeros((B, H, L, S), dtype=q.dtype) if opts.need_bias_grad else None
    spans = _spans(cp, opts)
    slope_rows = B if spans is None else spans[1]
    # d loss / d slope per (batch row or sequence, head), accumulated by atomics.
    dslopes = cp.zeros((slope_rows, H), dtype=acc) if opts.need_alibi_grad else None
    blocks, key_rows = (B * Hkv, S) if spans is None else (spans[1] * Hkv, spans[3])
    if blocks * key_rows > 0 and L > 0:
        rows = cfg["bwd_rows"]
        lse_acc = cp.ascontiguousarray(lse.astype(acc, copy=False))
        args = ([q, k, v, do, lse_acc, rowdot, dq, dk, dv, cs.pointer_or_null(dscores)]
                + _mods_args(opts, H, Hkv, L, S, E, Ev))
        if bits:
            args += _opt_args(cp, opts, spans, acc, dslopes)
        device.launch(cfg["bwd"], cfg["bwd_smem"], (blocks, -(-key_rows // rows)),
                      cfg["bwd_threads"], args, mods)
    return (dq.astype(q.dtype, copy=False), dk, dv, dscores,
            None if dslopes is None else dslopes.astype(q.dtype, copy=False))
