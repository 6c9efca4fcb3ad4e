"""FlexAttention-style functions on the cupy backend, without a GPU: the CUDA form of a
function (:func:`refattn.cuda_expression`), the routing of a call, the driver's errors and
its memory.

The kernels' arithmetic with the functions is checked on the CPU emulation
(``tests/backends/test_cuda_on_cpu.py``, the ``mask_mod`` / ``score_mod`` cases) and their
compile with NVRTC (``tests/backends/test_cuda_compile.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.cores.sdpa import api, cuda_mods
from refattn.cores.sdpa import cupy as sdpa_cupy


def _window(b, h, i, j):
    return (j <= i) & (i - j <= 9)


def _softcap(score, b, h, i, j):
    return 2 * np.tanh(score / 2)


def _softcap_grad(score, b, h, i, j):
    return 1 - np.tanh(score / 2) ** 2


# the decorator marks the function it is given: the plain functions above stay without
WINDOW = refattn.cuda_expression("j <= i && i - j <= 9")(lambda *a: _window(*a))
SOFTCAP = refattn.cuda_expression("2 * tanh(score / 2)")(lambda *a: _softcap(*a))
SOFTCAP_GRAD = refattn.cuda_expression("1 - tanh(score / 2) * tanh(score / 2)")(
    lambda *a: _softcap_grad(*a))


def _opts(L=40, S=40, **kw):
    q = np.zeros((1, 2, L, 8))
    k = np.zeros((1, 2, S, 8))
    return api.prepare(q, k, k, **kw)[2]


def test_cuda_expression_records_the_expression_on_the_unchanged_function():
    def fn(b, h, i, j):
        return j <= i

    assert refattn.cuda_expression("j <= i")(fn) is fn
    assert cuda_mods.expression_of(fn) == "j <= i" and fn(0, 0, 2, 1)
    assert cuda_mods.expression_of(lambda b, h, i, j: True) is None


@pytest.mark.parametrize("expression, error, message", [
    (None, TypeError, "as a str"),
    ("  ", ValueError, "empty"),
    ("score; return 0", ValueError, r"no ;"),
    ("[&]{ return 1; }()", ValueError, "no ; { }"),
    ("#define X", ValueError, "no #"),
])
def test_cuda_expression_takes_one_expression(expression, error, message):
    with pytest.raises(error, match=message):
        refattn.cuda_expression(expression)


def test_cuda_expression_decorates_only_callables():
    with pytest.raises(TypeError, match="decorates a function, got int"):
        refattn.cuda_expression("j <= i")(3)


def test_cupy_calls_with_cuda_expressions_stay_on_the_kernels():
    fused = _opts(mask_mod=WINDOW, score_mod=SOFTCAP, score_mod_grad=SOFTCAP_GRAD)
    assert api.option_route("cupy", fused, cuda_mods=True) == "cupy"
    assert api.option_route("numba", fused, cuda_mods=True) == "numba"
    # a core without the CUDA functions in its kernels (quaternion) keeps the reference
    assert api.option_route("cupy", fused) == "reference"


@pytest.mark.parametrize("kw", [
    dict(mask_mod=_window),                                           # no CUDA form
    dict(mask_mod=WINDOW, score_mod=_softcap),                        # one of two without
    dict(score_mod=SOFTCAP, score_mod_grad=_softcap_grad),            # its derivative without
])
def test_cupy_calls_with_a_function_without_cuda_expression_run_on_the_reference(kw):
    opts = _opts(**kw)
    assert api.option_route("cupy", opts, cuda_mods=True) == "reference"
    with pytest.raises(ValueError, match=r"only as CUDA expressions.*refattn.cuda_expression"):
        sdpa_cupy.forward(np.zeros((1, 2, 40, 8)), np.zeros((1, 2, 40, 8)),
                          np.zeros((1, 2, 40, 8)), opts, device=_Recording().device())


class _Recording:
    """An array namespace (NumPy's) that records the size of every array it makes, and a
    device that records the launches (their arrays included) and runs none."""

    def __init__(self):
        self.sizes = []
        self.launches = []

    def __getattr__(self, name):
        fn = getattr(np, name)
        if not callable(fn):
            return fn

        def recorded(*args, **kw):
            out = fn(*args, **kw)
            if isinstance(out, np.ndarray):
                self.sizes.append(out.size)
            return out
        return recorded

    def device(self):
        def launch(name, smem, grid, threads, args, mods):
            self.launches.append((name, mods))
            self.sizes += [a.size for a in args if isinstance(a, np.ndarray)]
        return sdpa_cupy.Device(self, launch, sdpa_cupy._DEFAULT_SMEM_LIMIT)


def test_the_fused_route_allocates_no_scores_array():
    # O(L) memory: nothing the driver makes or hands the kernels is L x S (E = 8 << S)
    L = S = 96
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 2, n, 8)) for n in (L, S, S, L))
    opts = _opts(L, S, mask_mod=WINDOW, score_mod=SOFTCAP, score_mod_grad=SOFTCAP_GRAD,
                 causal=True, softcap=3.0)
    recording = _Recording()
    device = recording.device()
    o, lse = sdpa_cupy.forward(q, k, v, opts, device=device)
    with np.errstate(all="ignore"):                     # o was never written: garbage
        sdpa_cupy.backward(q, k, v, o, lse, do, opts, device=device)
    bits = sum(sdpa_cupy.OPTION_BITS[n] for n in ("softcap", "mask_mod", "score_mod"))
    assert [name for name, _ in recording.launches] == [
        sdpa_cupy.kernel_config("float64", 8, 8, options=bits)[p] for p in ("fwd", "bwd")]
    assert all(mods == cuda_mods.of_options(opts) for _, mods in recording.launches)
    assert recording.sizes and max(recording.sizes) < L * S


def test_the_backward_pass_needs_score_mod_grad():
    q = np.zeros((1, 2, 40, 8))
    opts = _opts(score_mod=SOFTCAP)
    device = _Recording().device()
    o, lse = sdpa_cupy.forward(q, q, q, opts, device=device)      # the forward pass is fine
    with pytest.raises(ValueError, match=r"score_mod_grad\(score, b, h, i, j\)"):
        sdpa_cupy.backward(q, q, q, o, lse, q, opts, device=device)


def test_the_kernel_source_of_the_functions():
    mods = cuda_mods.of_functions(WINDOW, SOFTCAP, SOFTCAP_GRAD)
    assert mods == cuda_mods.CudaMods("j <= i && i - j <= 9", "2 * tanh(score / 2)",
                                      "1 - tanh(score / 2) * tanh(score / 2)")
    source = mods.source()
    assert source.startswith("#define REFATTN_USER_MODS\n")
    for expression in mods.given().values():
        assert f"\n{expression}\n" in source
    # an absent function keeps sdpa.cu's default (keep every pair / the identity / 1)
    assert "\ntrue\n" in cuda_mods.CudaMods(score_mod="score").source()


def test_packed_or_padded_cupy_calls_with_cuda_expressions_stay_in_one_kernel_call(monkeypatch):
    # No GPU here: resolving backend="cupy" is the one step replaced (it needs a device); the
    # decision which backend maps a call of sequences onto its kernels is the real one.
    monkeypatch.setattr(api._backends, "resolve", lambda backend, *a, **kw: backend)
    q = np.ones((1, 2, 40, 8))

    def maps(backend, mask_mod=None, score_mod=None, score_mod_grad=None):
        return api._maps_sequences(q, q, q, None, None, backend, mask_mod, score_mod,
                                   score_mod_grad, None, "zero")

    assert maps("cupy", WINDOW, SOFTCAP, SOFTCAP_GRAD) == "cupy"
    assert maps("cupy", WINDOW) == "cupy"
    assert maps("cupy", _window) is None                     # per group, on the reference
    assert maps("cupy", WINDOW, SOFTCAP, _softcap_grad) is None
    assert maps("numba", _window) == "numba"                 # numba compiles the function
