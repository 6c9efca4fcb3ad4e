"""The CUDA SDPA kernels run on the CPU, against the reference backend.

``refattn/cores/sdpa/sdpa.cu`` is compiled with the host C++ compiler against a small
CUDA emulation (``cuda_cpu/cuda_emulation.h``: each CUDA thread a fiber, one block at a
time, barriers and warp shuffles emulated) into shared libraries loaded with ctypes.  The
cupy driver (:mod:`refattn.cores.sdpa.cupy`) runs unchanged on NumPy arrays with a
:class:`~refattn.cores.sdpa.cupy.Device` that launches the emulated kernels, so the
driver's choice of kernel, grid, block, shared memory and every argument is what runs
(each launch is checked against the kernel's parameter types).  Packed and padded
sequences go through :func:`refattn.cores.sdpa.segments.forward` / ``backward`` with the
kernels as the fused core, as the public call does on a GPU.

Covered: float64 (``Cfg<2>``, ``MmaSimt<double>``) and float32 on CUDA cores
(``float32_math="simt"``, ``Cfg<3>``), the kernels without options and the option kernels.
The tensor-core kernels (float16 ``Cfg<0>`` and 3xTF32 ``Cfg<1>``: ``mma.sync``,
``ldmatrix``, ``cvt.rna.tf32``, ``cp.async``, emulated by ``cuda_cpu/ptx_emulation.h``) run
in ``test_cuda_on_cpu_tensor_cores.py``.  Not covered: timing, and anything about the GPU's
memory model beyond what the emulation's scheduling exposes (docs/backends/cupy.md, "The
kernels on the CPU").
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import refattn
from refattn._array import sum_to_shape
from refattn.backends import cupy_support as cs
from refattn.cores.sdpa import api, segments
from refattn.cores.sdpa import cupy as sdpa_cupy
from refattn.testing import assert_close, assert_within_reference_error

HERE = pathlib.Path(__file__).parent / "cuda_cpu"
SDPA_CU = pathlib.Path(sdpa_cupy.__file__).parent / "sdpa.cu"
SMEM_LIMIT = sdpa_cupy._DEFAULT_SMEM_LIMIT     # an H100's: the tiles the CI compile test builds
SMALL_SMEM_LIMIT = 99 * 1024                   # a consumer GPU's: smaller tiles for wide heads

# NumPy dtype of each pointer parameter code of cuda_emulation.h.
_POINTEE = {"f64": (np.float64,), "f32": (np.float32,), "i32": (np.int32,),
            "u32": (np.uint32,), "u8": (np.uint8, np.bool_), "u16": (np.float16, np.uint16)}
_SCALAR = {"i32": (np.int32, ctypes.c_int32), "i64": (np.int64, ctypes.c_int64),
           "f64": (np.float64, ctypes.c_double)}


class Emulator:
    """The emulated kernels of some shared libraries, launched as the cupy driver asks.

    ``libraries``: ``(library, mods)`` pairs, ``mods`` the CUDA source of the user functions
    its kernels were built with (``cuda_mods.CudaMods.source``, "" without); a launch runs
    the kernel of its name built with the launch's functions."""

    def __init__(self, libraries):
        self.kernels = {}
        self.launched = []
        for lib, mods in libraries:
            lib.cuda_emu_kernel_name.restype = ctypes.c_char_p
            lib.cuda_emu_kernel_signature.restype = ctypes.c_char_p
            lib.cuda_emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                            ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong,
                                            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                            ctypes.c_ulonglong]
            for i in range(lib.cuda_emu_kernel_count()):
                name = lib.cuda_emu_kernel_name(i).decode()
                self.kernels[name, mods] = (lib, i,
                                            lib.cuda_emu_kernel_signature(i).decode().split(","))
        self.device = sdpa_cupy.Device(np, self.launch, SMEM_LIMIT)

    def launch(self, name, smem, grid, threads, args, mods=None):
        lib, index, signature = self.kernels[name, "" if mods is None else mods.source()]
        assert len(args) == len(signature), (name, len(args), signature)
        values = []
        for n, (arg, code) in enumerate(zip(args, signature)):
            if code.endswith("*"):
                if isinstance(arg, np.ndarray):
                    assert arg.dtype.type in _POINTEE[code[:-1]], (name, n, arg.dtype, code)
                    # CuPy's allocations are 256-byte aligned; the tiles are read as 16-byte
                    # vectors
                    assert arg.ctypes.data % 16 == 0, (name, n, arg.ctypes.data)
                    values.append(ctypes.c_void_p(arg.ctypes.data))
                else:
                    assert type(arg) is np.uint64 and arg == cs.NULL, (name, n, arg)
                    values.append(ctypes.c_void_p(None))
            else:
                kind, ctype = _SCALAR[code]
                assert type(arg) is kind, (name, n, type(arg), code)
                values.append(ctype(arg))
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        dims = [(ctypes.c_uint * 3)(*(tuple(grid) + (1,) * (3 - len(grid)))),
                (ctypes.c_uint * 3)(threads, 1, 1)]
        error = ctypes.create_string_buffer(1024)
        rc = lib.cuda_emu_launch(index, dims[0], dims[1], smem, params, error, len(error))
        assert rc == 0, f"{name}: {error.value.decode()}"
        self.launched.append(name)


def _compiler():
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a host C++20 compiler (g++ >= 10) is needed to run the CUDA kernels on the CPU"
    return compiler


def _build(folder, names, source="sdpa_on_cpu.cpp", jobs=2):
    """``(shared library, mods)`` pairs holding the kernels ``names`` of ``source``
    (``cuda_cpu/``), split over ``jobs`` compiles per set of functions, all run side by side.

    ``names``: kernel names, or ``(name, mods)`` pairs with ``mods`` the functions' CUDA
    source ("" without), written to ``mods.inc``."""
    by_mods: dict = {}
    for entry in names:
        name, mods = entry if isinstance(entry, tuple) else (entry, "")
        by_mods.setdefault(mods, []).append(name)
    # a set of functions has few kernels: one compile each (the fixed cost of a compile is
    # the emulation and sdpa.cu's parsing)
    chunks = [(group[i::n], mods) for mods, group in by_mods.items()
              for n in [1 if mods else jobs] for i in range(n) if group[i::n]]
    procs = []
    for n, (chunk, mods) in enumerate(chunks):
        inc = folder / f"{pathlib.Path(source).stem}{n}"
        inc.mkdir()
        (inc / "kernels.inc").write_text("".join(f"KERNEL({name})\n" for name in chunk))
        (inc / "mods.inc").write_text(mods)
        out = inc / "kernels.so"
        cmd = [_compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing",
               "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
               "-Wno-unused-parameter", f"-I{inc}", "-o", str(out), str(HERE / source)]
        procs.append((out, mods, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
    libraries = []
    for out, mods, proc in procs:
        log, _ = proc.communicate()
        assert proc.returncode == 0, log
        libraries.append((ctypes.CDLL(str(out)), mods))
    return libraries


# --- Running a case through the driver -------------------------------------------------

def _gradients(dq, dk, dv, dscores, dslopes, scores_shape, bias_shape, slopes_shape):
    """The backend contract's gradients as ``refattn.vjp`` returns them (api.backward)."""
    grads = (dq, dk, dv)
    if bias_shape is not None:
        grads += (sum_to_shape(np, np.reshape(dscores, scores_shape), bias_shape),)
    if slopes_shape is not None:
        grads += (sum_to_shape(np, dslopes, slopes_shape),)
    return grads


def _one_call(device, arrays, kw, do):
    """Output, lse and gradients of one call (4-D public arrays) on the kernels."""
    q, k, v = arrays
    _, shapes, opts = api.prepare(q, k, v, **kw)
    o, lse = sdpa_cupy.forward(q, k, v, opts, device=device)
    dq, dk, dv, dscores, dslopes = sdpa_cupy.backward(q, k, v, o, lse, do, opts, device=device)
    bias, slopes = kw.get("bias"), kw.get("alibi_slopes")
    if slopes is not None:
        dslopes = np.reshape(dslopes, (q.shape[0], shapes.heads))
    return o, lse, _gradients(dq, dk, dv, dscores, dslopes, shapes.scores,
                              None if bias is None else bias.shape,
                              None if slopes is None else slopes.shape)


def _sequences(device, arrays, kw, do):
    """The same for packed or padded sequences: the kernels as the fused core of
    :func:`segments.forward` (as ``api._sequences_forward`` on a GPU)."""

    def fused(q4, k4, v4, operands, slopes, spans, **options):
        _, shapes, opts = api.sequences_options(q4, k4, v4, operands, slopes, spans, **options)
        o4, lse = sdpa_cupy.forward(q4, k4, v4, opts, device=device)
        bias = operands.get("bias")
        return o4, api.SDPAResiduals("cupy", q4, k4, v4, o4, lse, opts, shapes,
                                     None if bias is None else tuple(bias.shape),
                                     None if slopes is None else tuple(slopes.shape))

    def core_backward(res, do4):
        dq, dk, dv, dscores, dslopes = sdpa_cupy.backward(res.q, res.k, res.v, res.o, res.lse,
                                                          do4, res.options, device=device)
        return _gradients(dq, dk, dv, dscores, dslopes, res.shapes.scores, res.bias_shape,
                          res.alibi_shape)

    o, res = segments.forward(api.forward, *arrays, fused_core=fused, **kw)
    assert res.fused
    return o, res.public_lse(), segments.backward(core_backward, res, do)


def _kernels(device, arrays, kw, do):
    sequences = any(n in kw for n in ("cu_seqlens_q", "query_seq_lengths"))
    return (_sequences if sequences else _one_call)(device, arrays, kw, do)


def _reference(arrays, kw, do):
    o, lse = refattn.sdpa(*arrays, return_lse=True, backend="reference", **kw)
    _, pull = refattn.vjp(refattn.sdpa, *arrays, backend="reference", **kw)
    return o, lse, pull(do)


# --- The cases ---------------------------------------------------------------------------

def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# FlexAttention-style functions, one object per backend: the array function the reference
# calls and the CUDA expression the kernels compile (refattn.cuda_expression).
def _mod(expression, fn):
    return refattn.cuda_expression(expression)(fn)


MASK_MODS = {
    "window": _mod("j <= i && i - j <= 9", lambda b, h, i, j: (j <= i) & (i - j <= 9)),
    "checkered": _mod("(b + h) % 2 == 0 ? j <= i + 3 : (i + j) % 3 != 0",
                      lambda b, h, i, j: np.where((b + h) % 2 == 0, j <= i + 3, (i + j) % 3 != 0)),
    # rows i = 3 (mod 7) keep no key
    "empty rows": _mod("q_idx % 7 != 3 && (kv_idx + 2 * h) % 5 != 1",
                       lambda b, h, i, j: (i % 7 != 3) & ((j + 2 * h) % 5 != 1)),
}
# name -> (score_mod, score_mod_grad)
SCORE_MODS = {
    "softcap": (_mod("2 * tanh(score / 2)", lambda s, b, h, i, j: 2 * np.tanh(s / 2)),
                _mod("1 - tanh(score / 2) * tanh(score / 2)",
                     lambda s, b, h, i, j: 1 - np.tanh(s / 2) ** 2)),
    # FlexAttention's relative position bias, scaled down
    "relative": (_mod("score + 0.1 * (i - j)", lambda s, b, h, i, j: s + 0.1 * (i - j)),
                 _mod("1", lambda s, b, h, i, j: np.ones_like(s))),
    "affine": (_mod("score * (1 + 0.25 * h) - 0.1 * b + 0.01 * (i - j)",
                    lambda s, b, h, i, j: s * (1 + 0.25 * h) - 0.1 * b + 0.01 * (i - j)),
               _mod("1 + 0.25 * h", lambda s, b, h, i, j: (1 + 0.25 * h) + 0 * s)),
}

MOD_CASES = {
    "mask_mod: window as a function": ((1, 2, 2, 70, 70, 8, 8), dict(mask_mod="window")),
    "mask_mod: (b + h) % 2 + GQA + causal lower_right": (
        (2, 4, 2, 63, 80, 8, 8), dict(mask_mod="checkered", causal=True,
                                      causal_align="lower_right")),
    "mask_mod: empty rows + window + alibi": ((1, 2, 1, 70, 50, 8, 8),
                                             dict(mask_mod="empty rows", window=(20, 5),
                                                  alibi="H")),
    "score_mod: soft-cap as a function": ((2, 2, 2, 63, 70, 8, 8), dict(score_mod="softcap")),
    "score_mod: relative bias + causal + GQA": ((1, 4, 2, 70, 70, 8, 8),
                                                dict(score_mod="relative", causal=True)),
    # dS scaled by a derivative that varies along each row: its rows no longer sum to 0, so
    # the slope gradient must not take off the row's centre (sdpa.cu's alibi_center), here
    # far from 0 (the ALiBi diagonal j = i + S - L beyond the causal rule's last key j = i)
    "score_mod: soft-cap as a function + alibi + causal upper_left, L < S": (
        (1, 2, 2, 30, 70, 8, 8), dict(score_mod="softcap", alibi="H", causal=True)),
    "score_mod + mask_mod + softcap + alibi + bias + window + dropout": (
        (2, 2, 1, 63, 70, 8, 8), dict(score_mod="affine", mask_mod="checkered", softcap=2.0,
                                      alibi="BH", bias=True, window=(12, 4), dropout=True)),
    "packed + mask_mod + score_mod + causal + alibi per sequence": (
        (None, 2, 1, (30, 0, 63, 5), (45, 7, 63, 12), 8, 8),
        dict(mask_mod="checkered", score_mod="relative", causal=True, alibi="rows")),
    "padded + mask_mod (empty rows) + score_mod + window": (
        (3, 2, 2, 40, 50, 8, 8), dict(query_seq_lengths=np.array([40, 0, 17]),
                                      key_value_seq_lengths=np.array([50, 20, 33]),
                                      mask_mod="empty rows", score_mod="softcap",
                                      window=(9, 9))),
}

# (B, H, Hkv, L, S, E, Ev) and the call's options; "alibi": "H" / "BH" / "rows" slopes.
CASES = {
    "plain": ((2, 2, 2, 40, 70, 8, 8), {}),
    "causal upper_left": ((1, 2, 2, 63, 63, 8, 8), dict(causal=True)),
    "causal lower_right, L > S (empty rows)": ((1, 2, 1, 100, 37, 8, 8),
                                               dict(causal=True, causal_align="lower_right")),
    "causal lower_right, L < S": ((1, 2, 2, 33, 100, 8, 8),
                                  dict(causal=True, causal_align="lower_right")),
    "L = 1": ((2, 2, 1, 1, 100, 8, 8), dict(causal=True, causal_align="lower_right")),
    "odd head dims E 5, Ev 20": ((1, 2, 2, 63, 45, 5, 20), dict(causal=True)),
    "E = Ev = 16 (whole-row vector loads)": ((2, 2, 1, 70, 63, 16, 16), dict(causal=True)),
    "E 32, Ev 48 + window": ((1, 2, 2, 50, 70, 32, 48), dict(window=(5, 5))),
    "E 40, Ev 72 + softcap + alibi": ((1, 2, 1, 50, 70, 40, 72), dict(softcap=3.0, alibi="H")),
    "E = Ev = 128 (one-warp backward in float64)": ((1, 2, 2, 40, 50, 128, 128),
                                                    dict(causal=True)),
    "E = Ev = 256 + window + softcap": ((1, 2, 1, 20, 40, 256, 256),
                                        dict(window=(6, 6), softcap=2.0)),
    "window (7, 3)": ((1, 2, 2, 100, 100, 8, 8), dict(window=(7, 3))),
    "window (0, 0)": ((1, 2, 2, 63, 63, 8, 8), dict(window=(0, 0))),
    "window left only (20, -1)": ((1, 2, 2, 100, 80, 8, 8), dict(window=(20, -1))),
    "window right only (-1, 5) + causal lower_right": (
        (1, 2, 2, 70, 100, 8, 8), dict(window=(-1, 5), causal=True, causal_align="lower_right")),
    "window (-1, -1) unbounded": ((1, 2, 2, 40, 70, 8, 8), dict(window=(-1, -1))),
    "window (9, 0) + causal, L > S (empty rows)": (
        (1, 2, 2, 100, 30, 8, 8), dict(window=(9, 0), causal=True, causal_align="lower_right")),
    "softcap": ((2, 2, 2, 63, 70, 8, 8), dict(softcap=0.7)),
    "alibi (H,)": ((2, 2, 2, 63, 100, 8, 8), dict(alibi="H")),
    "alibi (B, H) + causal lower_right": ((2, 2, 1, 70, 45, 8, 8),
                                          dict(alibi="BH", causal=True, causal_align="lower_right")),
    # Every kept key far from the ALiBi diagonal i + S - L, and a slope gradient that cancels
    # (-4.9 from terms of total size 1090): float32 dalibi_slopes was 40x the float32
    # reference's own error until sdpa.cu's alibi_center (found by a sweep of 1000 calls).
    "alibi far from the kept keys: packed, window + causal upper_left": (
        (None, 1, 1, (58,), (7,), 8, 8), dict(alibi="rows", causal=True, window=(13, 17),
                                              seed=9093)),
    "window + softcap + alibi + mask (empty rows) + bias + dropout": (
        (2, 2, 1, 63, 70, 8, 8), dict(window=(12, 4), softcap=2.0, alibi="BH", mask=True,
                                      bias=True, dropout=True)),
    "padded": ((3, 2, 2, 70, 50, 8, 8), dict(query_seq_lengths=np.array([70, 0, 33]),
                                            key_value_seq_lengths=np.array([50, 20, 0]))),
    "padded + causal + alibi (B, H)": ((3, 2, 1, 40, 70, 8, 8), dict(
        query_seq_lengths=np.array([40, 1, 17]), key_value_seq_lengths=np.array([70, 33, 5]),
        causal=True, causal_align="lower_right", alibi="BH")),
    "packed": ((None, 2, 2, (30, 0, 1, 64, 9), (40, 7, 0, 64, 20), 8, 8), {}),
    "packed + alibi (H,) + window": ((None, 2, 2, (30, 63, 5), (45, 63, 12), 8, 8),
                                     dict(alibi="H", window=(10, 2))),
    "packed + mask + bias + dropout + softcap": (
        (None, 2, 2, (30, 63, 5), (45, 63, 12), 8, 8),
        dict(mask=True, bias=True, dropout=True, softcap=1.0)),
    "packed + alibi per sequence + causal upper_left": (
        (None, 2, 1, (30, 63, 5), (45, 63, 12), 8, 8), dict(alibi="rows", causal=True)),
    "window + causal + GQA + softcap + packed": (
        (None, 4, 2, (33, 70, 1, 20), (50, 70, 9, 20), 8, 8),
        dict(window=(16, 3), causal=True, causal_align="lower_right", softcap=1.5)),
    "window + causal + GQA + softcap + padded": (
        (2, 4, 2, 100, 80, 8, 8), dict(query_seq_lengths=np.array([100, 37]),
                                      key_value_seq_lengths=np.array([61, 80]),
                                      window=(16, -1), causal=True, softcap=1.5)),
}

CASES.update(MOD_CASES)

# float32 on CUDA cores: its own tiles (64 rows); the cases that cross them.
SIMT_CASES = ["plain", "causal lower_right, L > S (empty rows)", "L = 1",
              "odd head dims E 5, Ev 20", "E = Ev = 16 (whole-row vector loads)",
              "E 32, Ev 48 + window", "E 40, Ev 72 + softcap + alibi", "window (7, 3)",
              "softcap", "alibi (B, H) + causal lower_right",
              "alibi far from the kept keys: packed, window + causal upper_left",
              "window + softcap + alibi + mask (empty rows) + bias + dropout",
              "padded + causal + alibi (B, H)", "window + causal + GQA + softcap + packed"]
SIMT_CASES += list(MOD_CASES)



def _sweep(n, seed=0):
    """``n`` cases with options and lengths drawn at random: one call, padded or packed."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        H = int(rng.choice([1, 2, 4]))
        Hkv = int(rng.choice([h for h in (1, 2, 4) if H % h == 0]))
        layout = str(rng.choice(["one call", "padded", "packed"]))
        kw = {}
        if rng.random() < 0.6:
            kw["window"] = tuple(int(x) for x in rng.integers(-1, 40, 2))
        if rng.random() < 0.5:
            kw.update(causal=True, causal_align=str(rng.choice(["upper_left", "lower_right"])))
        if rng.random() < 0.4:
            kw["softcap"] = float(rng.uniform(0.5, 5.0))
        if rng.random() < 0.3:
            kw["scale"] = float(rng.uniform(0.05, 1.5))
        if rng.random() < 0.4:
            kw["alibi"] = str(rng.choice(["H", "rows"]))
        for operand in ("mask", "bias", "dropout"):
            if rng.random() < 0.15:
                kw[operand] = True
        if layout == "packed":
            n_seq = int(rng.integers(1, 5))
            shape = (None, H, Hkv, tuple(int(x) for x in rng.integers(0, 70, n_seq)),
                     tuple(int(x) for x in rng.integers(0, 70, n_seq)), 8, 8)
        else:
            B, L, S = int(rng.integers(1, 3)), int(rng.integers(1, 100)), int(rng.integers(1, 100))
            shape = (B, H, Hkv, L, S, 8, 8)
            if layout == "padded":
                kw.update(query_seq_lengths=rng.integers(0, L + 1, B),
                          key_value_seq_lengths=rng.integers(0, S + 1, B))
        if kw.get("alibi") == "rows" and layout == "one call":
            kw["alibi"] = "BH"
        cases[f"sweep {i}: {layout}, {shape[1:5]}, {kw}"] = (shape, kw)
    return cases


# REFATTN_CUDA_CPU_SWEEP raises the number of random cases for a longer local hunt.
SWEEP = _sweep(int(os.environ.get("REFATTN_CUDA_CPU_SWEEP", "40")))
CASES.update(SWEEP)
SIMT_CASES += list(SWEEP)[::4]

# Cases whose tiles change with the shared memory a block may use (float64 forward: one warp).
SMALL_SMEM_CASES = ["E = Ev = 128 (one-warp backward in float64)"]

PARAMS = ([pytest.param(name, "float64", SMEM_LIMIT, id=f"float64-{name}") for name in CASES]
          + [pytest.param(name, "float32", SMEM_LIMIT, id=f"simt-{name}") for name in SIMT_CASES]
          + [pytest.param(name, dtype, SMALL_SMEM_LIMIT, id=f"{label}-99KiB-{name}")
             for name in SMALL_SMEM_CASES for dtype, label in (("float64", "float64"),
                                                               ("float32", "simt"))])


def _problem(name, cases=None):
    """``(arrays (float64), call keywords, cotangent)`` of case ``name`` of ``cases``
    (default :data:`CASES`; the tensor-core tests pass theirs), a fixed seed per case."""
    (B, H, Hkv, L, S, E, Ev), case = (CASES if cases is None else cases)[name]
    kw = dict(case)
    rng = np.random.default_rng(kw.pop("seed", sum(map(ord, name))))
    packed = B is None
    if packed:
        kw.update(cu_seqlens_q=_cu(L), cu_seqlens_k=_cu(S))
        rows, L, S = len(L), sum(L), sum(S)
        q, k, v = (rng.standard_normal(s) for s in ((L, H, E), (S, Hkv, E), (S, Hkv, Ev)))
        scores = (H, L, S)
    else:
        rows = B
        q, k, v = (rng.standard_normal(s) for s in ((B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))
        scores = (B, H, L, S)
    alibi = kw.pop("alibi", None)
    if alibi is not None:           # "BH" / "rows": one slope per batch row or sequence
        kw["alibi_slopes"] = 0.05 + 0.5 * rng.random((H,) if alibi == "H" else (rows, H))
    if kw.pop("mask", False):
        mask = rng.random((1,) + scores[1:]) > 0.2
        if L:
            mask[..., L // 2, :] = False                                # an empty row
        kw["mask"] = mask
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal((H, 1, S))
    if kw.pop("dropout", False):
        kw["dropout_mask"], kw["dropout_p"] = rng.random(scores) > 0.1, 0.1
    if "mask_mod" in kw:
        kw["mask_mod"] = MASK_MODS[kw["mask_mod"]]
    if "score_mod" in kw:
        kw["score_mod"], kw["score_mod_grad"] = SCORE_MODS[kw["score_mod"]]
    out_shape = (L, H, Ev) if packed else (B, H, L, Ev)
    return (q, k, v), kw, rng.standard_normal(out_shape)


def _cast(kw, dtype):
    return {n: (x.astype(dtype) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x)
            for n, x in kw.items()}


def _inputs(name, dtype):
    """The case in ``dtype`` (float32: with ``float32_math="simt"``) and in float64."""
    arrays, kw, do = _problem(name)
    low = tuple(x.astype(dtype) for x in arrays), _cast(kw, dtype), do.astype(dtype)
    exact = tuple(x.astype(np.float64) for x in low[0]), _cast(low[1], np.float64), \
        low[2].astype(np.float64)
    if dtype == "float32":
        low = low[0], {**low[1], "float32_math": "simt"}, low[2]
    return low, exact


class _Recorder:
    """A device that records the kernels the driver names and runs none."""

    def __init__(self):
        self.names = []

    def device(self, smem_limit):
        def launch(name, smem, grid, threads, args, mods):
            self.names.append((name, "" if mods is None else mods.source()))
        return sdpa_cupy.Device(np, launch, smem_limit)


def _kernel_names():
    """The kernels every case launches, as the driver names them (a dry run)."""
    recorder = _Recorder()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # uninitialised outputs
        for param in PARAMS:
            name, dtype, smem_limit = param.values
            low, _ = _inputs(name, dtype)
            _kernels(recorder.device(smem_limit), *low)
    return sorted(set(recorder.names))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return Emulator(_build(tmp_path_factory.mktemp("cuda_on_cpu"), _kernel_names()))


SELFTEST = ["shuffles", "block_sum", "missing_barrier", "divergent_barrier", "partial_mask"]


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return Emulator(_build(tmp_path_factory.mktemp("selftest"), SELFTEST,
                           "emulation_selftest.cpp", jobs=1))


# --- Tests -------------------------------------------------------------------------------

def test_the_emulated_source_declares_only_dynamic_shared_memory():
    # cuda_emulation.h maps `extern __shared__` to one buffer per block; a static
    # `__shared__` variable would become per-thread there, so none may appear.
    code = re.sub(r"//[^\n]*", "", SDPA_CU.read_text())
    shared = re.findall(r"[^\n]*__shared__[^\n]*", code)
    assert shared and all(re.match(r"\s*extern __shared__ ", line) for line in shared), shared


def test_every_kind_of_kernel_is_covered(emulator):
    names = {name for name, _ in emulator.kernels}
    for dt in (2, 3):                       # float64, float32 on CUDA cores
        assert any(n.startswith(f"sdpa_fwd<{dt},") for n in names)
        assert any(n.startswith(f"sdpa_bwd<{dt},") for n in names)
        bits = {int(n.rstrip(">").rsplit(",", 1)[1]) for n in names
                if n.startswith(f"sdpa_fwd_opt<{dt},")}
        for bit in sdpa_cupy.OPTION_BITS.values():
            assert any(b & bit for b in bits), (dt, bit, bits)


def test_the_emulation_shuffles_like_a_warp(selftest):
    out = np.zeros((64, 6), np.int32)
    selftest.launch("shuffles", 0, (1,), 64, [out])
    t = np.arange(64)
    lane, base = t % 32, 100 * (t // 32)
    down, up = lane + 3, lane - 3
    expected = np.stack([base + (lane ^ 5), base + 7, base + np.where(down < 32, down, lane),
                         base + np.where(up >= 0, up, lane), base + ((lane & ~7) | ((lane & 7) ^ 1)),
                         2 * (base + (lane ^ 16)) + 1], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_the_emulation_synchronises_blocks_and_adds_atomically(selftest):
    x = np.random.default_rng(0).standard_normal(3 * 128)
    out, total = np.zeros(3), np.zeros(1)
    selftest.launch("block_sum", 128 * 8, (3,), 128, [x, out, total])
    np.testing.assert_allclose(out, x.reshape(3, 128).sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(total, x.sum(), rtol=1e-13)


def test_the_emulation_exposes_a_missing_barrier(selftest):
    # block 0 resumes its threads in order, block 1 in reverse: a read of the next (block 1:
    # the previous) thread's slot comes before its write, except at the end of the walk
    out = np.zeros((2, 64))
    selftest.launch("missing_barrier", 64 * 8, (2,), 64, [out])
    assert np.isnan(out[0, :-1]).all() and out[0, -1] == 0
    assert np.isnan(out[1, 1:]).all() and out[1, 0] == 63


@pytest.mark.parametrize("kernel, message", [("divergent_barrier", "deadlock"),
                                             ("partial_mask", "only the full mask")])
def test_the_emulation_reports_what_it_cannot_run(selftest, kernel, message):
    with pytest.raises(AssertionError, match=message):
        selftest.launch(kernel, 0, (1,), 64, [np.zeros(64, np.int32)])


def test_the_emulation_checks_the_launch(selftest):
    out = np.zeros(64)
    with pytest.raises(AssertionError, match="227 KiB"):
        selftest.launch("missing_barrier", 228 * 1024, (1,), 64, [out])
    with pytest.raises(AssertionError, match="1 to 1024 threads"):
        selftest.launch("missing_barrier", 0, (1,), 2048, [out])
    with pytest.raises(AssertionError, match="f64"):                 # an int array for double*
        selftest.launch("missing_barrier", 0, (1,), 64, [np.zeros(64, np.int32)])


@pytest.mark.parametrize("name, dtype, smem_limit", PARAMS)
def test_kernels_match_the_reference(emulator, name, dtype, smem_limit):
    low, exact = _inputs(name, dtype)
    start = len(emulator.launched)
    device = dataclasses.replace(emulator.device, smem_limit=smem_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)              # -inf lse of empty rows
        o, lse, grads = _kernels(device, *low)
        expected = _reference(*exact)
        reference = expected if dtype == "float64" else _reference(*low)
    launched = emulator.launched[start:]
    sequences = any(n in low[1] for n in ("cu_seqlens_q", "query_seq_lengths"))
    # one forward and one backward launch (sequences: none for a side without tokens)
    assert len(launched) <= 2 if sequences else len(launched) == 2, launched
    assert all(f"<{2 if dtype == 'float64' else 3}," in n for n in launched), launched
    got = (o, lse) + tuple(grads)
    labels = ["output", "lse", "dq", "dk", "dv"]
    labels += [n for n in ("dbias", "dalibi_slopes") if low[1].get(n[1:]) is not None]
    want = (expected[0], expected[1]) + tuple(expected[2])
    lows = (reference[0], reference[1]) + tuple(reference[2])
    assert len(got) == len(want) == len(labels)
    problem_scale = max(float(np.max(np.abs(e[np.isfinite(e)]), initial=0.0)) for e in want)
    for i, (g, e, lo, what) in enumerate(zip(got, want, lows, labels)):
        assert g.shape == e.shape, (what, g.shape, e.shape)
        assert g.dtype == np.dtype(dtype), (what, g.dtype)
        if dtype == "float64":
            assert_close(g, e, dtype, f"{name}: {what}")
        else:
            assert_within_reference_error(g, e, lo, dtype, f"{name}: {what}", gradient=i > 1,
                                          problem_scale=problem_scale)
