// The C API of a library of emulated kernels, for ctypes: included last by a .cpp that
// defines (or includes) the kernels, with "kernels.inc" on the include path listing the
// instantiations to export, one `KERNEL(name<args>)` line each.
//
//   cuda_emu_kernel_count(), cuda_emu_kernel_name(i), cuda_emu_kernel_signature(i) (the
//   parameter type codes, "f64*,f64*,...,i32,f64"), and cuda_emu_launch(i, grid[3],
//   block[3], dynamic_smem, params, error, error_size): 0 on success, else 1 with the
//   message in error.  params as for cuLaunchKernel: pointers to each argument's value.

#ifndef CUDA_EMULATION_KERNEL_LIBRARY_H
#define CUDA_EMULATION_KERNEL_LIBRARY_H

#include <cstdio>
#include <string>
#include <vector>

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

#endif  // CUDA_EMULATION_KERNEL_LIBRARY_H
