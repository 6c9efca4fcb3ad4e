"""Every CUDA source under ``refattn/`` compiles with NVRTC for Hopper.

This runs on CI machines without a GPU (NVRTC needs no device): a syntax or
type error in a kernel, or a compiler warning, fails the suite.  Templates are
only checked when instantiated, so each source is compiled with the
instantiations its backend declares (:class:`refattn.backends.cupy_support.KernelSource`),
the SDPA option kernels (``sdpa_fwd_opt`` / ``sdpa_bwd_opt``) among them.
The sources are compiled for ``sm_90``: NVRTC's front end for ``compute_90``
followed by its built-in assembler, the only step that checks inline PTX
(tensor-core ``mma``, ``ldmatrix``, ``cp.async``); the PTX of ``compute_90`` is
inspected for the tensor-core instructions.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil

import pytest

import refattn
from refattn.backends import cupy_support as cs

PACKAGE_ROOT = pathlib.Path(refattn.__file__).parent
CUDA_SOURCES = sorted(p for ext in ("*.cu", "*.cuh") for p in PACKAGE_ROOT.rglob(ext))


def _import_cupy_backends():
    """Import every ``refattn.cores.<core>.cupy`` module: they declare their sources."""
    import refattn.cores

    for info in pkgutil.walk_packages(refattn.cores.__path__, "refattn.cores."):
        if info.name.rsplit(".", 1)[-1] == "cupy":
            importlib.import_module(info.name)
    return cs.kernel_sources()


SOURCES = _import_cupy_backends()


def test_sources_exist():
    assert CUDA_SOURCES, "no .cu files found under refattn/"


@pytest.mark.parametrize("path", [p for p in CUDA_SOURCES if p.suffix == ".cu"],
                         ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_source_is_declared_with_instantiations(path):
    source = SOURCES.get(str(path.resolve()))
    assert source is not None, (f"{path} is not declared by any backend module "
                                "(cupy_support.KernelSource), so nothing launches or checks it")
    assert source.instantiations(), f"{path}: declare the template instantiations to check"


@pytest.mark.parametrize("path", sorted(SOURCES), ids=lambda p: pathlib.Path(p).name)
def test_source_compiles_and_assembles_for_sm_90(path):
    source = SOURCES[path]
    cubin = cs.nvrtc_compile(source.code, source.name, source.instantiations(), arch="sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_sdpa_kernels_use_the_tensor_cores():
    from refattn.cores.sdpa import cupy as sdpa_cupy

    names = [sdpa_cupy.kernel_config(dtype, 64, 64)[p] for dtype in ("float16", "float32")
             for p in ("fwd", "bwd")]
    ptx = cs.nvrtc_compile(sdpa_cupy.SOURCE.code, sdpa_cupy.SOURCE.name, names, arch="compute_90")
    assert ".target sm_90" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx      # float16
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in ptx     # float32 (3xTF32)
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx         # float16 operands
    assert "cp.async.cg.shared.global" in ptx                              # pipelined tiles


def test_every_sdpa_option_is_instantiated_for_the_compile_test():
    # The option kernels are compiled only when a call uses them, so the compile test must
    # name them: each option bit alone, and all of them with every element type.
    from refattn.cores.sdpa import cupy as sdpa_cupy

    names = set(SOURCES[sdpa_cupy.SOURCE.path].instantiations())
    every = sum(sdpa_cupy.OPTION_BITS.values())
    for dtype, math in (("float16", None), ("float32", "tf32x3"), ("float32", "simt"),
                        ("float64", None)):
        cfg = sdpa_cupy.kernel_config(dtype, 8, 8, math, options=every)
        assert {cfg["fwd"], cfg["bwd"]} <= names
    for bit in sdpa_cupy.OPTION_BITS.values():
        cfg = sdpa_cupy.kernel_config("float64", 8, 8, options=bit)
        assert {cfg["fwd"], cfg["bwd"]} <= names
    plain = sdpa_cupy.kernel_config("float32", 64, 64)
    assert "_opt" not in plain["fwd"] + plain["bwd"]          # no option: the earlier kernels


def test_an_error_in_the_option_code_fails_the_compile():
    # The option code goes through the same compile: break the soft-cap's code, and the
    # compile of its instantiation fails with the compiler's message.
    from refattn.cores.sdpa import cupy as sdpa_cupy

    code = sdpa_cupy.SOURCE.code
    marker = "tc = tanh_acc(s * scale * inv_cap);"
    assert marker in code
    broken = code.replace(marker, "tc = tanh_acc(s * scale * undefined_cap);")
    name = sdpa_cupy.kernel_config("float64", 8, 8, options=sdpa_cupy.OPTION_BITS["softcap"])
    with pytest.raises(cs.CudaCompileError, match="undefined_cap"):
        cs.nvrtc_compile(broken, "sdpa.cu", [name["fwd"]], arch="compute_90")


def test_inline_ptx_errors_are_caught():
    bad = ('extern "C" __global__ void k(float* x) '
           '{ asm volatile("mma.sync.bogus.f32 %0;" :: "f"(x[0])); }')
    cs.nvrtc_compile(bad, "bad_ptx.cu", arch="compute_90")  # the PTX pass copies asm verbatim
    with pytest.raises(cs.CudaCompileError, match="bogus"):
        cs.nvrtc_compile(bad, "bad_ptx.cu", arch="sm_90")


def test_compile_errors_carry_the_log():
    bad = 'extern "C" __global__ void k(float* x) { x[0] = undefined_name; }'
    with pytest.raises(cs.CudaCompileError, match="undefined_name"):
        cs.nvrtc_compile(bad, "bad.cu")


def test_compiler_warnings_are_errors():
    warns = 'extern "C" __global__ void k(float* x) { int unused_variable = 1; x[0] = 1.f; }'
    with pytest.raises(cs.CudaCompileError, match="unused_variable"):
        cs.nvrtc_compile(warns, "warn.cu")


def test_sdpa_kernel_config_checks_head_dims():
    from refattn.cores.sdpa import cupy as sdpa_cupy

    with pytest.raises(ValueError, match="head dims up to 256"):
        sdpa_cupy.kernel_config("float32", 320, 64)
    with pytest.raises(TypeError, match="float16, float32 and float64"):
        sdpa_cupy.kernel_config("int32", 64, 64)
    cfg = sdpa_cupy.kernel_config("float16", 64, 64)
    assert cfg["fwd"] == "sdpa_fwd<0,64,64,4,64>" and cfg["acc"] == "float32"


# --- FlexAttention-style functions as CUDA expressions (refattn.cuda_expression) -----------

# One expression per function, using each argument name, both index spellings and a math
# function, as a user's would.
USER_MODS = dict(mask_mod="(b + h) % 2 == 0 ? kv_idx <= q_idx : i - j < 7",
                 score_mod="30 * tanh(score / 30) + 0.5 * (i - j) * b",
                 score_mod_grad="1 - tanh(score / 30) * tanh(score / 30)")


def test_sdpa_option_kernels_compile_with_user_functions():
    # Every option with both functions, for each element type and float32 math: the
    # driver's source (the expressions pasted in front of sdpa.cu), with no warning.
    from refattn.cores.sdpa import cuda_mods
    from refattn.cores.sdpa import cupy as sdpa_cupy

    every = sum(sdpa_cupy.OPTION_BITS.values())
    names = []
    for dtype, math in (("float16", None), ("float32", "tf32x3"), ("float32", "simt"),
                        ("float64", None)):
        cfg = sdpa_cupy.kernel_config(dtype, 8, 8, math, options=every)
        names += [cfg["fwd"], cfg["bwd"]]
    code = cuda_mods.CudaMods(**USER_MODS).source() + sdpa_cupy.SOURCE.code
    ptx = cs.nvrtc_compile(code, "sdpa.cu", names, arch="compute_90")
    assert ptx.count(".entry") == len(names)


@pytest.mark.parametrize("name", ["mask_mod", "score_mod", "score_mod_grad"])
def test_a_user_expression_nvrtc_rejects_names_its_argument(name):
    # The GPU launch compiles each expression alone first (nothing reaches the device).
    from refattn.cores.sdpa import cuda_mods
    from refattn.cores.sdpa import cupy as sdpa_cupy

    given = {**USER_MODS, name: "score_typo + 1" if name != "mask_mod" else "j <= i_typo"}
    if name == "mask_mod":
        given = {"mask_mod": given["mask_mod"]}
    with pytest.raises(ValueError, match=rf"(?s){name}= has the CUDA expression.*_typo.*"
                                         r"is undefined"):
        sdpa_cupy._launch("sdpa_fwd_opt<2,16,16,2,32,48>", 0, (1, 1), 64, [],
                          cuda_mods.CudaMods(**given))


def test_the_user_functions_leave_the_kernels_without_them_unchanged():
    # sdpa.cu's defaults of the three functions are templates, instantiated only by the
    # mods bits: the option-free kernels compile to the same PTX with the driver's source.
    from refattn.cores.sdpa import cuda_mods
    from refattn.cores.sdpa import cupy as sdpa_cupy

    names = [sdpa_cupy.kernel_config("float64", 8, 8)["fwd"],
             sdpa_cupy.kernel_config("float64", 8, 8, options=1)["fwd"]]
    with_mods = cuda_mods.CudaMods(**USER_MODS).source() + sdpa_cupy.SOURCE.code
    for name in names:
        assert (cs.nvrtc_compile(with_mods, "sdpa.cu", [name])
                == cs.nvrtc_compile(sdpa_cupy.SOURCE.code, "sdpa.cu", [name]))
