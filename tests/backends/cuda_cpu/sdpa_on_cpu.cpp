// The SDPA kernels of refattn/cores/sdpa/sdpa.cu built for the CPU (cuda_emulation.h) as a
// shared library that tests/backends/test_cuda_on_cpu.py loads with ctypes.
//
// The test writes the instantiations to build into "kernels.inc" (one
// `KERNEL(sdpa_fwd_opt<2,16,16,2,32,15>)` line each, names as the cupy driver's
// kernel_config gives them) and compiles this file with that folder on the include path:
//   g++ -std=c++20 -O2 -shared -fPIC -fno-strict-aliasing -I<folder> sdpa_on_cpu.cpp
//
// C API: cuda_emu_kernel_count(), cuda_emu_kernel_name(i), cuda_emu_kernel_signature(i)
// (parameter type codes, "f64*,f64*,...,i32,f64"), and cuda_emu_launch(i, grid, block,
// dynamic_smem, params, error, error_size): 0 on success, else an error message.

#include "cuda_emulation.h"

CUDA_EMU_EXTERN_SHARED(smem_raw)  // sdpa.cu's `extern __shared__ unsigned char smem_raw[]`

#include "../../../refattn/cores/sdpa/sdpa.cu"

#include <cstdio>

#define KERNEL(...) ::cuda_emu::kernel(#__VA_ARGS__, &__VA_ARGS__),

static const std::vector<cuda_emu::Kernel>& kernels() {
    static const std::vector<cuda_emu::Kernel> table = {
#include "kernels.inc"
    };
    return table;
}

// Built with -fvisibility=hidden (each library keeps its own emulator state): only these
// are exported.
#define API extern "C" __attribute__((visibility("default")))

API int cuda_emu_kernel_count() { return (int)kernels().size(); }

API const char* cuda_emu_kernel_name(int i) { return kernels().at(i).name.c_str(); }

API const char* cuda_emu_kernel_signature(int i) { return kernels().at(i).signature.c_str(); }

API int cuda_emu_launch(int i, const unsigned* grid, const unsigned* block, unsigned long long smem,
                        void** params, char* error, unsigned long long error_size) {
    const std::string message = kernels().at(i).launch(dim3{grid[0], grid[1], grid[2]},
                                                       dim3{block[0], block[1], block[2]},
                                                       (std::size_t)smem, params);
    std::snprintf(error, error_size, "%s", message.c_str());
    return message.empty() ? 0 : 1;
}
