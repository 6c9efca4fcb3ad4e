"""The SDPA cupy driver's launches against the compiled kernels' signatures, without a GPU.

``refattn/cores/sdpa/cupy.py`` assembles the argument lists of ``sdpa_fwd`` /
``sdpa_bwd`` and of the option kernels ``sdpa_fwd_opt`` / ``sdpa_bwd_opt``.  A wrong count,
order or width of an argument would only show on a GPU, so here the driver runs on a
:class:`~refattn.cores.sdpa.cupy.Device` of NumPy arrays whose launches are recorded
instead of run, and each argument list is compared with the
parameters NVRTC gives the kernel it names (PTX ``.param`` types), together with the grid
each launch asks for.  The kernels' arithmetic is checked on a GPU
(``tests/backends/test_cupy.py``), for float64 and CUDA-core float32 also on a CPU emulation
(``tests/backends/test_cuda_on_cpu.py``), and their index math on the CPU
(``tests/backends/test_sdpa_rules.py``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from refattn.backends import cupy_support as cs
from refattn.cores.sdpa import api, segments
from refattn.cores.sdpa import cupy as sdpa_cupy

# PTX parameter type of each kind of argument the driver passes (CuPy passes NumPy
# scalars by their dtype and arrays as device pointers).
_PTX_TYPE = {np.int32: ".u32", np.int64: ".u64", np.uint64: ".u64", np.float64: ".f64"}


def _ptx_type(arg):
    return ".u64" if isinstance(arg, np.ndarray) else _PTX_TYPE[type(arg)]


class Recorder(list):
    """A device of NumPy arrays that records ``(name, grid, threads, args)`` per launch."""

    def __init__(self):
        super().__init__()
        self.device = sdpa_cupy.Device(
            np, lambda name, smem, grid, threads, args, mods: self.append(
                (name, grid, threads, list(args))), sdpa_cupy._DEFAULT_SMEM_LIMIT)


@pytest.fixture
def launches():
    return Recorder()


def _signatures(names):
    """``{name: [PTX parameter types]}`` of the kernels, compiled by NVRTC in one program."""
    ptx = cs.nvrtc_compile(sdpa_cupy.SOURCE.code, "sdpa.cu", sorted(set(names)),
                           arch="compute_90")
    entries = re.findall(r"\.entry\s+(\S+)\(\s*(.*?)\)", ptx, flags=re.S)
    by_kernel = {}
    for mangled, params in entries:
        types = re.findall(r"\.param\s+(\.\w+)", params)
        by_kernel[mangled] = types
    out = {}
    for name in set(names):
        kernel, args = name.split("<")
        numbers = "".join(f"Li{a}E" for a in args.rstrip(">").split(","))
        mangled = [m for m in by_kernel if m.startswith(f"_Z{len(kernel)}{kernel}I{numbers}E")]
        assert len(mangled) == 1, (name, list(by_kernel))
        out[name] = by_kernel[mangled[0]]
    return out


def _run(launches, opts_of, L=37, S=53, B=2, H=4, Hkv=2, E=8, Ev=8):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in ((B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))
    opts = opts_of(q, k, v)
    o, lse = sdpa_cupy.forward(q, k, v, opts, device=launches.device)
    with np.errstate(all="ignore"):                     # o was never written: garbage
        sdpa_cupy.backward(q, k, v, o, lse, np.ones_like(o), opts, device=launches.device)
    return opts


def _one_call(**kw):
    return lambda q, k, v: api.prepare(q, k, v, **kw)[2]


def _sequences(q, k, v):
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    spans = segments.padded_spans(np.array([L, 5]), np.array([S - 3, 0]), (B,), L, S)
    return api.sequences_options(q, k, v, {"bias": np.zeros((1, q.shape[1], 1, S))},
                                 np.full((B, q.shape[1]), 0.25), spans, causal=True,
                                 causal_align="lower_right", window=(4, 2), softcap=3.0)[2]


CALLS = {
    "no option (the validated kernels)": _one_call(causal=True),
    "window + softcap + alibi": _one_call(window=(5, 3), softcap=2.0,
                                          alibi_slopes=np.full(4, 0.5), causal=True),
    "sequences + everything": _sequences,
}


def test_launches_match_the_kernel_signatures(launches):
    calls = {}
    for label, opts_of in CALLS.items():
        start = len(launches)
        opts = _run(launches, opts_of)
        calls[label] = (opts, launches[start:])
    names = [name for _, recorded in calls.values() for name, *_ in recorded]
    signatures = _signatures(names)
    for label, (opts, recorded) in calls.items():
        bits = sdpa_cupy.option_bits(opts)
        assert len(recorded) == 2, label                       # one forward, one backward
        for name, grid, threads, args in recorded:
            assert ("_opt<" in name) == (bits != 0) and name.endswith(f",{bits}>") == (bits != 0)
            assert [_ptx_type(a) for a in args] == signatures[name], (label, name)
            assert threads % 32 == 0 and all(g > 0 for g in grid), (label, name, grid)


def test_sequence_grids_follow_the_spans(launches):
    opts = _run(launches, _sequences)
    (fwd, fgrid, _, fargs), (bwd, bgrid, _, bargs) = launches
    cfg = sdpa_cupy.kernel_config("float64", 8, 8, options=sdpa_cupy.option_bits(opts))
    spans = opts.sequences.spans
    longest_q, longest_k = (spans[:, 2] - spans[:, 1]).max(), (spans[:, 4] - spans[:, 3]).max()
    H, Hkv = 4, 2
    assert fgrid == (len(spans) * H, -(-longest_q // cfg["fwd_rows"]))
    assert bgrid == (len(spans) * Hkv, -(-longest_k // cfg["bwd_rows"]))
    span_arg = fargs[-9]                                        # OPT_PARAMS starts with spans
    np.testing.assert_array_equal(span_arg, spans.astype(np.int32))
    assert span_arg.dtype == np.int32
    lo, hi, causal, lower_right = (int(x) for x in fargs[-8:-4])
    assert (lo, hi, causal, lower_right) == (-4, 2, 1, 1)
    dslopes = bargs[-1]
    assert dslopes.shape == (len(spans), H) and not dslopes.any()   # added to by the kernel


def test_an_alibi_offset_the_kernels_do_not_measure_is_an_error(launches):
    """The kernels measure ALiBi from the diagonal j = i + S - L; a sharded block's other
    offset must not be dropped silently."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)) for n in (6, 9, 9))
    opts = api.prepare(q, k, v, alibi_slopes=np.ones(2))[2]
    sdpa_cupy.forward(q, k, v, dataclasses.replace(opts, alibi_offset=3), device=launches.device)
    assert len(launches) == 1                          # S - L = 3: the kernels' own offset
    for call in (lambda o: sdpa_cupy.forward(q, k, v, o, device=launches.device),
                 lambda o: sdpa_cupy.backward(q, k, v, q, np.zeros((1, 2, 6)), q, o,
                                              device=launches.device)):
        with pytest.raises(ValueError, match="no alibi_offset other than S - L = 3, got 5"):
            call(dataclasses.replace(opts, alibi_offset=5))
    assert len(launches) == 1
