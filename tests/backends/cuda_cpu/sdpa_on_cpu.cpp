// The SDPA kernels of refattn/cores/sdpa/sdpa.cu built for the CPU (cuda_emulation.h) as a
// shared library that tests/backends/test_cuda_on_cpu.py loads with ctypes.
//
// The test writes the instantiations to build into "kernels.inc" (one
// `KERNEL(sdpa_fwd_opt<2,16,16,2,32,15>)` line each, names as the cupy driver's
// kernel_config gives them) and the functions' CUDA source into "mods.inc" (empty without
// functions), and compiles this file with that folder on the include path:
//   g++ -std=c++20 -O2 -shared -fPIC -fno-strict-aliasing -fvisibility=hidden -I<folder>
//       sdpa_on_cpu.cpp
// The C API: kernel_library.h.

#include "cuda_emulation.h"

CUDA_EMU_EXTERN_SHARED(smem_raw)  // sdpa.cu's `extern __shared__ unsigned char smem_raw[]`

// The user's mask_mod / score_mod as the cupy driver writes them (cuda_mods.CudaMods.source):
// "mods.inc" beside kernels.inc, empty for a library of kernels without them.
#include "mods.inc"

#include "../../../refattn/cores/sdpa/sdpa.cu"

#include "kernel_library.h"  // the table of kernels.inc and the C API
