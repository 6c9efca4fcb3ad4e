// Kernels that check cuda_emulation.h itself (tests/backends/test_cuda_on_cpu.py): warp
// shuffles, block barriers with dynamic shared memory, atomics, and the failures the
// emulation must report instead of computing something (a divergent barrier, a partial
// warp mask, shared memory read before any thread wrote it, a missing barrier).

#include "cuda_emulation.h"

CUDA_EMU_EXTERN_SHARED(dyn)

// out[6 t + s]: shuffle s of the value 100 warp + lane (s = 5: a double, times 2).
__global__ void shuffles(int* out) {
    const int t = threadIdx.x, lane = t & 31, v = 100 * (t / 32) + lane;
    int* o = out + 6 * t;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_sync(0xffffffffu, v, 7);
    o[2] = __shfl_down_sync(0xffffffffu, v, 3);
    o[3] = __shfl_up_sync(0xffffffffu, v, 3);
    o[4] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
    o[5] = (int)(2 * __shfl_xor_sync(0xffffffffu, v + 0.5, 16));
}

// out[block] = sum of the block's x (a tree in shared memory); total += every x (atomics).
__global__ void block_sum(const double* x, double* out, double* total) {
    extern __shared__ __align__(16) unsigned char dyn[];
    double* buf = reinterpret_cast<double*>(dyn);
    const int t = threadIdx.x;
    const double xi = x[blockIdx.x * blockDim.x + t];
    buf[t] = xi;
    atomicAdd(total, xi);
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        __syncthreads();
        if (t < half) buf[t] += buf[t + half];
    }
    if (t == 0) out[blockIdx.x] = buf[0];
}

// Each thread reads its neighbour's slot without a barrier: the emulation runs thread t
// to its end before thread t + 1 starts (block 0; block 1 in reverse order), so every read
// but the last (block 1: but the first) sees the fill (NaN).
__global__ void missing_barrier(double* out) {
    extern __shared__ __align__(16) unsigned char dyn[];
    double* buf = reinterpret_cast<double*>(dyn);
    const int t = threadIdx.x;
    buf[t] = t;
    const int next = blockIdx.x % 2 == 0 ? (t + 1) % blockDim.x : (t + blockDim.x - 1) % blockDim.x;
    out[blockIdx.x * blockDim.x + t] = buf[next];
}

// Thread 0 waits at __syncwarp, the others at __syncthreads: a deadlock.
__global__ void divergent_barrier(int* out) {
    if (threadIdx.x == 0) __syncwarp(); else __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void partial_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 1);
}

#include "kernel_library.h"
