// Kernels that check the emulated PTX instructions of ptx_emulation.h one at a time
// (tests/backends/test_cuda_on_cpu_tensor_cores.py): the conversions, mma.sync against a
// float64 product of the fragments' matrices, ldmatrix against a direct read of the rows,
// ldmatrix feeding mma, cp.async groups with a missing wait, red.global.add, and the calls
// the emulation must refuse (a partial warp, lanes at different instructions).

#include "cuda_emulation.h"

CUDA_EMU_EXTERN_SHARED(dyn)

__global__ void cvt_f16_to_f32(const unsigned short* h, float* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = ptx_cvt_f32_f16(h[i]);
}

__global__ void cvt_f32_to_f16(const float* x, unsigned short* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = ptx_cvt_rn_f16_f32(x[i]);
}

__global__ void cvt_f32_to_f16x2(const float* hi, const float* lo, unsigned* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = ptx_cvt_rn_f16x2_f32(hi[i], lo[i]);
}

__global__ void cvt_f32_to_tf32(const float* x, unsigned* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = ptx_cvt_rna_tf32_f32(x[i]);
}

// One warp: lane l's registers a[4 l ..], b[2 l ..], c[4 l ..]; d[4 l ..] receives its D.
__global__ void mma_f16(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int l = threadIdx.x;
    float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    ptx_mma_m16n8k16_f16(acc, a + 4 * l, b + 2 * l);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

__global__ void mma_tf32(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int l = threadIdx.x;
    float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    ptx_mma_m16n8k8_tf32(acc, a + 4 * l, b + 2 * l);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

// tile (nrows, 8) float16 bits copied to shared memory; lane l gives the address of row
// rows[l]; out[4 l + i] = its register i.
__global__ void ldmatrix(const unsigned short* tile, int nrows, const int* rows, int trans, unsigned* out) {
    extern __shared__ __align__(16) unsigned char dyn[];
    unsigned short* s = reinterpret_cast<unsigned short*>(dyn);
    for (int i = threadIdx.x; i < nrows * 8; i += blockDim.x) s[i] = tile[i];
    __syncthreads();
    const int l = threadIdx.x;
    unsigned r[4];
    if (trans) ptx_ldmatrix_x4_trans(r, s + 8 * rows[l]); else ptx_ldmatrix_x4(r, s + 8 * rows[l]);
    for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

// D (16 x 8, row-major) = A (16 x 16, row-major) B (16 x 8, row-major), the operands in
// shared memory loaded by ldmatrix (B transposed) as the fragment layouts of mma want them.
__global__ void ldmatrix_mma(const unsigned short* A, const unsigned short* B, float* D) {
    extern __shared__ __align__(16) unsigned char dyn[];
    unsigned short* sa = reinterpret_cast<unsigned short*>(dyn);
    unsigned short* sb = sa + 16 * 16;
    const int l = threadIdx.x;
    for (int i = l; i < 16 * 16; i += 32) sa[i] = A[i];
    for (int i = l; i < 16 * 8; i += 32) sb[i] = B[i];
    __syncwarp();
    // A's registers: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols
    // 8-15), (rows 8-15, cols 8-15).  B's: rows k 0-7 and 8-15 transposed (twice).
    unsigned a[4], b[4];
    ptx_ldmatrix_x4(a, sa + 16 * (l % 8 + 8 * ((l / 8) % 2)) + 8 * (l / 16));
    ptx_ldmatrix_x4_trans(b, sb + 8 * (l % 16));
    float acc[4] = {0, 0, 0, 0};
    ptx_mma_m16n8k16_f16(acc, a, b);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

// 64 threads.  Group 0: thread t copies src[t] (4 bytes) to shared word t; group 1: 16 bytes
// src[64 + 4 t ..] to words 64 + 4 t .. (odd t: src-size 0, zero fill); then 4 bytes
// src[t] to word 320 + t, not committed.  mode 0: wait_group 0; 1: wait_group 1; 2: no wait.
// out[0 .. 384) = the shared words after a barrier.
__global__ void cp_async_groups(const float* src, int mode, float* out) {
    extern __shared__ __align__(16) unsigned char dyn[];
    float* s = reinterpret_cast<float*>(dyn);
    const int t = threadIdx.x;
    ptx_cp_async_ca_4(s + t, src + t, true);
    ptx_cp_async_commit_group();
    ptx_cp_async_cg_16(s + 64 + 4 * t, src + 64 + 4 * t, t % 2 == 0);
    ptx_cp_async_commit_group();
    ptx_cp_async_ca_4(s + 320 + t, src + t, true);
    if (mode == 0) ptx_cp_async_wait_group<0>();
    if (mode == 1) ptx_cp_async_wait_group<1>();
    __syncthreads();
    for (int i = t; i < 384; i += 64) out[i] = s[i];
}

// Every thread adds (1, t) to dst[0], dst[1].
__global__ void red_add(float* dst) { ptx_red_global_add_v2_f32(dst, 1.0f, (float)threadIdx.x); }

// Lanes 16-31 exit before the mma: a partial warp.
__global__ void mma_partial_warp(float* out) {
    if (threadIdx.x >= 16) return;
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0};
    ptx_mma_m16n8k16_f16(c, a, b);
    out[threadIdx.x] = c[0];
}

// Lanes 0-15 at the mma, lanes 16-31 at __syncwarp: not one instruction for the warp.
__global__ void mma_divergent(float* out) {
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) ptx_mma_m16n8k16_f16(c, a, b); else __syncwarp();
    out[threadIdx.x] = c[0];
}

// A misaligned ldmatrix row address (8 bytes past a 16-byte boundary).
__global__ void ldmatrix_misaligned(unsigned* out) {
    extern __shared__ __align__(16) unsigned char dyn[];
    unsigned r[4];
    ptx_ldmatrix_x4(r, dyn + 16 * (threadIdx.x % 8) + 8);
    out[threadIdx.x] = r[0];
}

#include "kernel_library.h"
