"""Element-wise attention, CuPy backend: what the generic variant tests do not cover.

``tests/test_variants.py`` compares the cupy backend with the float64 reference on
every registered ``elementwise*`` case (float64, float32).  Those cases are small,
so this file adds problems spanning many thread blocks (odd ``D``, GQA, masks,
both causal alignments), a long scan, float16, device residency without
synchronisation, ``auto`` dispatch and the float32 underflow guard.  The GPU tests
skip without a CUDA device.  Everywhere (with a C++ compiler): the kernel names, and
the kernels themselves built for the host and run thread after thread through
``cupy.py``'s glue with NumPy standing in for CuPy (the NVRTC compile test,
``tests/backends/test_cuda_compile.py``, checks that they compile for the GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.backends import cupy_support as cs, resolve
from refattn.cores.elementwise import cupy as ew_cupy
from refattn.testing import assert_close

gpu = pytest.mark.skipif(not cs.available(), reason="needs CuPy and a CUDA device")


def _qkv(rng, B, H, Hkv, L, S, D, spread=0.7):
    q = spread * rng.standard_normal((B, H, L, D))
    k = spread * rng.standard_normal((B, Hkv, S, D))
    v = rng.standard_normal((B, Hkv, S, D))
    return q, k, v


def _compare(arrays, dtype, options, seed=7, mask_stride=1):
    """cupy in ``dtype`` against the float64 reference on the same (rounded) inputs.

    ``mask_stride > 1`` hands the kernels a non-contiguous mask (a view with that
    step along keys), as the strided mask arguments allow.
    """
    cp = cs.cupy()
    rounded = tuple(a.astype(dtype).astype(np.float64) for a in arrays)
    mask = options.pop("mask", None)
    out_ref, pull_ref = refattn.vjp(refattn.elementwise_attention, *rounded, backend="reference",
                                    mask=mask, **options)
    dout = np.random.default_rng(seed).standard_normal(out_ref.shape)
    grads_ref = pull_ref(dout)
    dev = tuple(cp.asarray(a.astype(dtype)) for a in arrays)
    out, pull = refattn.vjp(refattn.elementwise_attention, *dev, backend="cupy",
                            mask=None if mask is None else
                            cp.asarray(np.repeat(mask, mask_stride, axis=-1))[..., ::mask_stride],
                            **options)
    assert isinstance(out, cp.ndarray) and str(out.dtype) == dtype
    assert_close(out, out_ref, dtype, "output")
    grads = pull(cp.asarray(dout.astype(dtype)))
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert isinstance(g, cp.ndarray) and str(g.dtype) == dtype
        assert_close(g, gr, dtype, name)


# Exact kernels run 128 threads per block over (B, H, L|S, D); D = 5 makes blocks
# straddle queries and heads, L = 150 / S = 200 span many blocks.
@gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("order", [None, 2, 6])
@pytest.mark.parametrize("causal, align, L, S", [
    (False, "upper_left", 150, 200),
    (True, "upper_left", 150, 200),
    (True, "lower_right", 200, 150),     # the first 50 rows see no key
])
def test_many_blocks_gqa_and_key_mask_match_reference(dtype, order, causal, align, L, S):
    rng = np.random.default_rng(0)
    arrays = _qkv(rng, 2, 4, 2, L, S, 5)
    keys = rng.random((2, 1, 1, S)) > 0.3                 # key padding, per batch element
    keys[1, ..., :40] = False
    _compare(arrays, dtype, dict(order=order, causal=causal, causal_align=align, mask=keys,
                                 scale=0.8))


@gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exact_form_with_strided_query_dependent_mask(dtype):
    rng = np.random.default_rng(1)
    arrays = _qkv(rng, 2, 3, 3, 70, 90, 8)
    mask = rng.random((2, 1, 70, 90)) > 0.4
    mask[:, :, 3] = False                                 # an empty row
    _compare(arrays, dtype, dict(mask=mask, causal=True), mask_stride=2)


@gpu
def test_long_causal_scan_float32_matches_float64_numba():
    """A 4096-token scan: float64 accumulators keep float32 inputs at float32 accuracy."""
    cp = cs.cupy()
    rng = np.random.default_rng(2)
    q, k, v = (x.astype(np.float32) for x in _qkv(rng, 1, 2, 2, 4096, 4096, 16, spread=0.5))
    expected, pull_ref = refattn.vjp(refattn.elementwise_attention,
                                     *(x.astype(np.float64) for x in (q, k, v)), order=6,
                                     causal=True, backend="numba")
    out, pull = refattn.vjp(refattn.elementwise_attention, *(cp.asarray(x) for x in (q, k, v)),
                            order=6, causal=True, backend="cupy")
    assert_close(out, expected, "float32", "output")
    dout = rng.standard_normal(expected.shape)
    for name, g, gr in zip(("dq", "dk", "dv"), pull(cp.asarray(dout.astype(np.float32))),
                           pull_ref(dout)):
        assert_close(g, gr, "float32", name)


@gpu
@pytest.mark.parametrize("order", [None, 6])
def test_float16_in_float16_out_saved_rows_float32(order):
    """float16 runs the float32 kernels: float16 out, saved rows float32, float16 accuracy."""
    cp = cs.cupy()
    rng = np.random.default_rng(3)
    arrays = _qkv(rng, 2, 4, 2, 130, 130, 8)
    rounded = tuple(a.astype(np.float16).astype(np.float64) for a in arrays)
    expected, pull_ref = refattn.vjp(refattn.elementwise_attention, *rounded, order=order,
                                     causal=True, backend="reference")
    dev = tuple(cp.asarray(a.astype(np.float16)) for a in arrays)
    o, res = refattn.get_core("elementwise").forward(*dev, order=order, causal=True)
    assert res.backend == "cupy" and o.dtype == cp.float16
    assert all(isinstance(s, cp.ndarray) and s.dtype == cp.float32 for s in res.saved)
    assert_close(o, expected, "float16", "output")
    dout = np.ones(expected.shape)
    grads = refattn.get_core("elementwise").backward(res, cp.asarray(dout.astype(np.float16)))
    for name, g, gr in zip(("dq", "dk", "dv"), grads, pull_ref(dout)):
        assert g.dtype == cp.float16
        assert_close(g, gr, "float16", name)


@gpu
@pytest.mark.parametrize("order", [None, 4])
def test_outputs_stay_on_the_device_without_synchronising(order):
    import cupyx

    cp = cs.cupy()
    rng = np.random.default_rng(4)
    q, k, v = (cp.asarray(x.astype(np.float32)) for x in _qkv(rng, 2, 2, 1, 33, 33, 6))
    keys = cp.asarray(rng.random((2, 1, 1, 33)) > 0.2)
    kw = dict(order=order, causal=True, mask=keys)
    o, pull = refattn.vjp(refattn.elementwise_attention, q, k, v, **kw)
    pull(cp.ones_like(o))                                       # compile outside the check
    with cupyx.allow_synchronize(False):                        # a host round-trip would raise
        o, pull = refattn.vjp(refattn.elementwise_attention, q, k, v, **kw)
        grads = pull(cp.ones_like(o))
    for x in (o,) + tuple(grads):
        assert isinstance(x, cp.ndarray) and x.device == q.device and x.dtype == cp.float32


@gpu
def test_auto_picks_cupy_for_cupy_arrays():
    cp = cs.cupy()
    q = cp.zeros((1, 2, 4, 8), dtype=cp.float32)
    core = refattn.get_core("elementwise")
    assert resolve("auto", core.backends, q) == "cupy"
    for order in (None, 2):
        _, res = core.forward(q, q, q, order=order)
        assert res.backend == "cupy"


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_underflow_guard_float32_large_keys(causal):
    """|k| > 9: exp(-k^2) is 0 or subnormal in float32 for every key, yet the output is right."""
    cp = cs.cupy()
    rng = np.random.default_rng(5)
    k = rng.uniform(9.5, 11.0, (1, 2, 40, 4)) * rng.choice([-1.0, 1.0], (1, 2, 40, 4))
    q = 0.05 * rng.standard_normal((1, 2, 40, 4))        # small |2 q k| (< ~2)
    v = rng.standard_normal((1, 2, 40, 4))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    assert np.all(np.exp(-k32 ** 2) < np.finfo(np.float32).tiny)
    # expected: the float64 reference (guarded too; tests/cores/test_elementwise.py checks it
    # against the pairwise form) on the same float32-rounded inputs
    f64 = tuple(x.astype(np.float64) for x in (q32, k32, v32))
    dev = tuple(cp.asarray(x) for x in (q32, k32, v32))
    for order in (6, None):                              # Taylor; exact far from every key
        expected, pull_ref = refattn.vjp(refattn.elementwise_attention, *f64, order=order,
                                         causal=causal, backend="reference")
        o, pull = refattn.vjp(refattn.elementwise_attention, *dev, order=order, causal=causal,
                              backend="cupy")
        assert bool(cp.all(cp.isfinite(o)))
        assert_close(o, expected, "float32", f"output, order={order}")
        dout = np.ones(expected.shape)
        for name, g, gr in zip(("dq", "dk", "dv"), pull(cp.asarray(dout, dtype=cp.float32)),
                               pull_ref(dout)):
            assert bool(cp.all(cp.isfinite(g)))
            assert_close(g, gr, "float32", f"{name}, order={order}")


# -- everywhere: the kernel names the backend launches (compiled by the NVRTC test) ------------

def test_kernel_names_per_dtype_and_order():
    assert ew_cupy.kernel_names("float16", None) == ew_cupy.kernel_names("float32", None)
    assert ew_cupy.kernel_names("float64", 6) == {"fwd": "ew_taylor_fwd<double,6>",
                                                  "bwd": "ew_taylor_bwd<double,6>"}
    assert set(ew_cupy.kernel_names("float32", None)) == {"fwd", "dq", "dkdv"}
    assert set(ew_cupy.SOURCE.instantiations()) >= {
        *ew_cupy.kernel_names("float32", 2).values(), *ew_cupy.kernel_names("float64", None).values()}
    with pytest.raises(TypeError, match="float16, float32 and float64"):
        ew_cupy.kernel_names("int32", None)
    with pytest.raises(ValueError, match="even integer"):
        ew_cupy.kernel_names("float32", 3)


# -- everywhere: the CUDA kernels compiled for the host, one thread after another ----------------
# The kernels are plain per-thread loops (no shared memory, no synchronisation), so a C++
# compiler can run them on the CPU with the CUDA built-ins shimmed: this checks their index
# arithmetic, masks (strided), causal alignments, GQA and empty rows, and the Python glue
# of cupy.py (NumPy standing in for CuPy), against the reference, on machines without a GPU.

_HOST_SHIM = r"""
#include <cmath>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { long long x; };
static Dim3 blockIdx{0}, blockDim{1}, threadIdx{0};
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) {
    double f; std::memcpy(&f, &i, 8); return f; }
using std::exp; using std::log;
#include "SOURCE"
#define RUN(n, call) for (long long t = 0; t < (n); ++t) { threadIdx.x = t; call; }
#define MP const unsigned char* keep, long long mb, long long mh, long long ml, long long ms
#define SZ int B, int H, int Hkv, int L, int S, int D, int causal, int offset
#define ARGS keep, mb, mh, ml, ms, B, H, Hkv, L, S, D, causal, offset
"""

_HOST_KERNELS = r"""
extern "C" {
void exact_fwd_T(const T* q, const T* k, const T* v, MP, SZ, T* o, T* lse) {
    RUN((long long)B * H * L * D, (ew_exact_fwd<T>(q, k, v, ARGS, o, lse))) }
void exact_dq_T(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* g, MP, SZ,
                T* dq) {
    RUN((long long)B * H * L * D, (ew_exact_dq<T>(q, k, v, o, lse, g, ARGS, dq))) }
void exact_dkdv_T(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* g, MP,
                  SZ, T* dk, T* dv) {
    RUN((long long)B * H * S * D, (ew_exact_dkdv<T>(q, k, v, o, lse, g, ARGS, dk, dv))) }
void taylor_fwd_T(const T* q, const T* k, const T* v, MP, SZ, T* o, T* m, T* den) {
    RUN((long long)B * H * D, (ew_taylor_fwd<T, ORDER>(q, k, v, ARGS, o, m, den))) }
void taylor_bwd_T(const T* q, const T* k, const T* v, const T* o, const T* m, const T* den,
                  const T* g, MP, SZ, T* dq, T* dk, T* dv) {
    RUN((long long)B * H * D, (ew_taylor_bwd<T, ORDER>(q, k, v, o, m, den, g, ARGS, dq, dk, dv))) }
}
"""

_HOST_ORDER = 6


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to run the CUDA kernels on the host")
    code = _HOST_SHIM.replace("SOURCE", ew_cupy.SOURCE.path)
    for ctype in ("float", "double"):
        code += _HOST_KERNELS.replace("_T(", f"_{ctype}(").replace("<T>", f"<{ctype}>").replace(
            "<T, ORDER>", f"<{ctype}, {_HOST_ORDER}>").replace("const T*", f"const {ctype}*") \
            .replace("T* ", f"{ctype}* ")
    folder = tmp_path_factory.mktemp("ew_host")
    (folder / "host.cpp").write_text(code)
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(folder / "host.so"),
                    str(folder / "host.cpp")], check=True, capture_output=True)
    return ctypes.CDLL(str(folder / "host.so"))


def _host_backend(monkeypatch, lib):
    """Route cupy.py's launches to the host build; NumPy stands in for CuPy."""
    import ctypes

    import refattn.backends

    def arg(a):
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous or a.dtype == np.bool_, "kernel operands are contiguous"
            return ctypes.c_void_p(a.ctypes.data)
        return {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int,
                np.uint64: lambda x: ctypes.c_void_p(int(x) or None)}[type(a)](int(a))

    def function(name):
        kernel, ctype = name.split("<")[0][3:], name.split("<")[1].split(",")[0].rstrip(">")
        if "," in name:
            assert name.endswith(f",{_HOST_ORDER}>"), "the host build has one Taylor order"
        fn = getattr(lib, f"{kernel}_{ctype}")
        return lambda grid, block, args: fn(*map(arg, args))

    monkeypatch.setattr(cs, "cupy", lambda: np)
    monkeypatch.setattr(ew_cupy.SOURCE, "function", function)
    monkeypatch.setattr(refattn.backends, "resolve", lambda backend, *a, **k: backend)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("order", [None, _HOST_ORDER])
@pytest.mark.parametrize("causal, align, L, S", [
    (False, "upper_left", 15, 20),
    (True, "upper_left", 45, 45),
    (True, "lower_right", 20, 15),      # the first 5 rows see no key
])
def test_kernels_on_the_host_match_reference(host_kernels, monkeypatch, dtype, order, causal,
                                             align, L, S):
    _host_backend(monkeypatch, host_kernels)
    rng = np.random.default_rng(8)
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 2, 4, 2, L, S, 5))
    keys = rng.random((2, 1, 1, S)) > 0.3
    keys[1, ..., :4] = False
    masks = [keys]
    if order is None:                     # a query-dependent mask, strided along keys
        full = rng.random((2, 1, L, 2 * S)) > 0.4
        full[:, :, 3] = False
        masks.append(full[..., ::2])
    core = refattn.get_core("elementwise")
    for mask in masks:
        kw = dict(order=order, causal=causal, causal_align=align, mask=mask, scale=0.8)
        expected, pull_ref = refattn.vjp(refattn.elementwise_attention,
                                         *(x.astype(np.float64) for x in (q, k, v)),
                                         backend="reference", **kw)
        o, res = core.forward(q, k, v, backend="cupy", **kw)
        assert o.dtype == dtype and res.backend == "cupy"
        assert all(s.dtype == (np.float64 if dtype == "float64" else np.float32)
                   for s in res.saved)
        assert_close(o, expected, dtype, "output")
        dout = rng.standard_normal(expected.shape)
        for name, g, gr in zip(("dq", "dk", "dv"), core.backward(res, dout.astype(dtype)),
                               pull_ref(dout)):
            assert g.dtype == dtype
            assert_close(g, gr, dtype, name)


@pytest.mark.parametrize("order", [None, _HOST_ORDER])
def test_kernels_on_the_host_guard_float32_underflow(host_kernels, monkeypatch, order):
    """|k| > 9 in float32 (every exp(-k^2) subnormal or 0): outputs and gradients stay right."""
    _host_backend(monkeypatch, host_kernels)
    rng = np.random.default_rng(5)
    k = rng.uniform(9.5, 11.0, (1, 2, 40, 4)) * rng.choice([-1.0, 1.0], (1, 2, 40, 4))
    q = 0.05 * rng.standard_normal((1, 2, 40, 4))
    v = rng.standard_normal((1, 2, 40, 4))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    for causal in (False, True):
        expected, pull_ref = refattn.vjp(refattn.elementwise_attention,
                                         *(x.astype(np.float64) for x in (q32, k32, v32)),
                                         order=order, causal=causal, backend="reference")
        o, pull = refattn.vjp(refattn.elementwise_attention, q32, k32, v32, order=order,
                              causal=causal, backend="cupy")
        assert_close(o, expected, "float32", "output")
        dout = np.ones(expected.shape)
        for name, g, gr in zip(("dq", "dk", "dv"), pull(dout.astype(np.float32)),
                               pull_ref(dout)):
            assert np.all(np.isfinite(g))
            assert_close(g, gr, "float32", name)
