// Fused scaled dot-product attention: FlashAttention-2 forward and backward.
//
// Self-contained (no CUDA headers): it compiles with a bare NVRTC, which is what
// CI checks, and with CuPy's RawModule on a GPU.  Design notes:
// docs/backends/cupy.md.
//
// Layout: q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), o (B, H, L, Ev),
// all C-contiguous; lse (B, H, L) in the accumulation type.  Masks, bias and
// the dropout keep-mask are 4-D arrays addressed through element strides (a zero
// stride broadcasts).  Head dims are padded with zeros to EP / EVP (multiples of
// 16) in shared memory only.
//
// Options (sliding window, soft-capping, ALiBi, per-sequence bounds, the user's mask_mod /
// score_mod as CUDA expressions pasted in by the driver) are compiled in by
// the template parameter OPT of the *_opt kernels (bits OPT_*, below): each `if constexpr`
// on a bit adds its code only there, and the kernels without options (sdpa_fwd, sdpa_bwd)
// instantiate the shared bodies with OPT = 0.
//
// Template parameter DT selects the element type and the warp-level matrix
// product: 0 = float16 on tensor cores (mma.m16n8k16, float32 accumulation),
// 1 = float32 on tensor cores as 3xTF32 (split products, float32 accuracy),
// 2 = float64 on CUDA cores, 3 = float32 on CUDA cores.  Every policy produces
// the accumulator layout of mma.m16n8: lane (g = lane/4, t = lane%4) holds
// rows g and g+8, columns 2t and 2t+1 of each 16x8 tile, so the softmax and
// masking code is written once.

// The option kernels' index math (a header of plain C++, also compiled on the host by the
// CPU tests); KernelSource pastes it in here, so NVRTC needs no include path.
#include "sdpa_rules.cuh"

typedef unsigned short half_t;  // IEEE binary16 bits, CuPy's float16 storage

// ---------------------------------------------------------------------------
// The inline PTX, one instruction per function (PTX ISA names).  Under CUDA_EMULATION (the
// CPU emulation of the tests, tests/backends/cuda_cpu/ptx_emulation.h) the emulation
// provides these functions with the instructions' semantics instead, so every instruction
// the kernels use goes through this list.
// ---------------------------------------------------------------------------
#ifndef CUDA_EMULATION
__device__ __forceinline__ float ptx_cvt_f32_f16(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ half_t ptx_cvt_rn_f16_f32(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// hi to the upper 16 bits, lo to the lower.
__device__ __forceinline__ unsigned ptx_cvt_rn_f16x2_f32(float hi, float lo) {
    unsigned d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ unsigned ptx_cvt_rna_tf32_f32(float x) {
    unsigned d;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(d) : "f"(x));
    return d;
}
// Warp-wide: lane l gives the shared-memory address of row l % 8 of 8x8 matrix l / 8.
__device__ __forceinline__ void ptx_ldmatrix_x4(unsigned* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(smem)) : "memory");
}
__device__ __forceinline__ void ptx_ldmatrix_x4_trans(unsigned* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(smem)) : "memory");
}
// Warp-wide: c (4 floats) += A (4 f16x2 registers) B (2 f16x2 registers), in place.
__device__ __forceinline__ void ptx_mma_m16n8k16_f16(float* c, const unsigned* a, const unsigned* b) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Warp-wide: c (4 floats) += A (4 tf32 registers) B (2 tf32 registers), in place.
__device__ __forceinline__ void ptx_mma_m16n8k8_tf32(float* c, const unsigned* a, const unsigned* b) {
    asm(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Asynchronous copies global -> shared of 16 (4) bytes: src-size = cp-size when `full`, else
// 0 (dst zero-filled, src not read); they complete at a cp.async.wait_group that retires
// their group.
__device__ __forceinline__ void ptx_cp_async_cg_16(void* dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void ptx_cp_async_ca_4(void* dst, const void* src, bool full) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "r"(full ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void ptx_cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void ptx_cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }
// dst[0] += a, dst[1] += b in global memory (sm_90), atomically, no result.
__device__ __forceinline__ void ptx_red_global_add_v2_f32(float* dst, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(dst), "f"(a), "f"(b) : "memory");
}
#endif

__device__ __forceinline__ float h2f(half_t h) { return ptx_cvt_f32_f16(h); }
__device__ __forceinline__ half_t f2h(float f) { return ptx_cvt_rn_f16_f32(f); }

// Conversions between storage and accumulation types (half_t is an integer
// type to C++, so every conversion goes through these).
template <class To, class From> struct Conv { static __device__ __forceinline__ To f(From x) { return (To)x; } };
template <> struct Conv<float, half_t> { static __device__ __forceinline__ float f(half_t x) { return h2f(x); } };
template <> struct Conv<half_t, float> { static __device__ __forceinline__ half_t f(float x) { return f2h(x); } };
template <> struct Conv<double, half_t> { static __device__ __forceinline__ double f(half_t x) { return h2f(x); } };
template <> struct Conv<half_t, double> { static __device__ __forceinline__ half_t f(double x) { return f2h((float)x); } };
template <class To, class From> __device__ __forceinline__ To cvt(From x) { return Conv<To, From>::f(x); }

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }
template <class A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }
template <class A> __device__ __forceinline__ A amax(A a, A b) { return a > b ? a : b; }

#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// ---------------------------------------------------------------------------
// Warp-level matrix-product policies.  A(m, k) = a[m*SAM + k*SAK] (16 rows),
// B(k, n) = b[k*SBK + n*SBN] (8 columns), both in shared memory.
// ---------------------------------------------------------------------------

struct MmaF16 {
    typedef half_t Tc;
    typedef float Acc;
    static constexpr int KSTEP = 16;
    struct AF { unsigned r[4]; };
    struct BF { unsigned r[2]; };

    // Elements (r, c) and (r, c+1) of a matrix with strides (SR, SC), packed low/high.
    template <int SR, int SC>
    static __device__ __forceinline__ unsigned pair(const half_t* p, int r, int c) {
        if constexpr (SC == 1) {
            return *reinterpret_cast<const unsigned*>(p + r * SR + c);
        } else {
            return (unsigned)p[r * SR + c * SC] | ((unsigned)p[r * SR + (c + 1) * SC] << 16);
        }
    }
    // ldmatrix: lane l supplies the address of row l % 8 of 8x8 matrix l / 8 (16-byte
    // rows); register i receives (row g, columns 2t, 2t+1) of matrix i (.trans: of
    // its transpose).  One instruction replaces eight 16/32-bit shared loads.
    static __device__ __forceinline__ void ldsm4(unsigned* r, const half_t* p) { ptx_ldmatrix_x4(r, p); }
    static __device__ __forceinline__ void ldsm4t(unsigned* r, const half_t* p) { ptx_ldmatrix_x4_trans(r, p); }
    template <int SAM, int SAK>
    static __device__ __forceinline__ void load_a(AF& f, const half_t* a, int k0) {
        const int l = lane_id(), mi = l >> 3, rr = l & 7;
        if constexpr (SAK == 1) {         // rows of A are contiguous
            ldsm4(f.r, a + (rr + 8 * (mi & 1)) * SAM + k0 + 8 * (mi >> 1));
        } else if constexpr (SAM == 1) {  // columns of A are contiguous
            ldsm4t(f.r, a + (k0 + rr + 8 * (mi >> 1)) * SAK + 8 * (mi & 1));
        } else {
            const int g = l >> 2, t = l & 3;
            f.r[0] = pair<SAM, SAK>(a, g, k0 + 2 * t);
            f.r[1] = pair<SAM, SAK>(a, g + 8, k0 + 2 * t);
            f.r[2] = pair<SAM, SAK>(a, g, k0 + 2 * t + 8);
            f.r[3] = pair<SAM, SAK>(a, g + 8, k0 + 2 * t + 8);
        }
    }
    // B fragments of two adjacent 8-column tiles (b points at the first).
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b2(BF& f0, BF& f1, const half_t* b, int k0) {
        const int l = lane_id(), mi = l >> 3, rr = l & 7;
        unsigned r[4];
        if constexpr (SBK == 1) {         // columns of B contiguous (B = K^T)
            ldsm4(r, b + (rr + 8 * (mi >> 1)) * SBN + k0 + 8 * (mi & 1));
        } else if constexpr (SBN == 1) {  // rows of B contiguous (B = V)
            ldsm4t(r, b + (k0 + rr + 8 * (mi & 1)) * SBK + 8 * (mi >> 1));
        } else {
            load_b<SBK, SBN>(f0, b, k0);
            load_b<SBK, SBN>(f1, b + 8 * SBN, k0);
            return;
        }
        f0.r[0] = r[0]; f0.r[1] = r[1]; f1.r[0] = r[2]; f1.r[1] = r[3];
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b(BF& f, const half_t* b, int k0) {
        const int g = lane_id() >> 2, t = lane_id() & 3;
        f.r[0] = pair<SBN, SBK>(b, g, k0 + 2 * t);
        f.r[1] = pair<SBN, SBK>(b, g, k0 + 2 * t + 8);
    }
    static __device__ __forceinline__ half_t to_smem(float x) { return f2h(x); }
    static __device__ __forceinline__ half_t to_smem(half_t x) { return x; }
    // A operand from accumulator tiles (C layout) 2 kk and 2 kk + 1: the layouts agree.
    static constexpr bool REG_A = true;
    static __device__ __forceinline__ unsigned pack(float lo, float hi) { return ptx_cvt_rn_f16x2_f32(hi, lo); }
    static __device__ __forceinline__ void a_from_acc(AF& f, const float (*c)[4], int kk) {
        f.r[0] = pack(c[2 * kk][0], c[2 * kk][1]);
        f.r[1] = pack(c[2 * kk][2], c[2 * kk][3]);
        f.r[2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        f.r[3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b2_for_acc_a(BF& f0, BF& f1, const half_t* b, int k0) {
        load_b2<SBK, SBN>(f0, f1, b, k0);
    }
    static __device__ __forceinline__ void mma(float* c, const AF& a, const BF& b) {
        ptx_mma_m16n8k16_f16(c, a.r, b.r);
    }
};

// float32 on tensor cores with float32 accuracy: x = big + small with both
// parts in TF32, and a*b ~ a_big*b_big + a_big*b_small + a_small*b_big.
// Operands are split as they are loaded from shared memory.  (Storing them pre-split
// as float2 tiles was measured slower on an H100: twice the shared-memory traffic and
// footprint cost more than the conversions saved.)
struct MmaTF32x3 {
    typedef float Tc;
    typedef float Acc;
    static constexpr int KSTEP = 8;
    struct AF { unsigned big[4], small[4]; };
    struct BF { unsigned big[2], small[2]; };

    static __device__ __forceinline__ void split(float x, unsigned& big, unsigned& small) {
        big = ptx_cvt_rna_tf32_f32(x);
        const float rest = x - __uint_as_float(big);
        small = ptx_cvt_rna_tf32_f32(rest);
    }
    static __device__ __forceinline__ float to_smem(float x) { return x; }
    static __device__ __forceinline__ void get(float v, unsigned& big, unsigned& small) {
        split(v, big, small);
    }
    template <int SAM, int SAK>
    static __device__ __forceinline__ void load_a(AF& f, const Tc* a, int k0) {
        const int g = lane_id() >> 2, t = lane_id() & 3;
        get(a[g * SAM + (k0 + t) * SAK], f.big[0], f.small[0]);
        get(a[(g + 8) * SAM + (k0 + t) * SAK], f.big[1], f.small[1]);
        get(a[g * SAM + (k0 + t + 4) * SAK], f.big[2], f.small[2]);
        get(a[(g + 8) * SAM + (k0 + t + 4) * SAK], f.big[3], f.small[3]);
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b(BF& f, const Tc* b, int k0) {
        const int g = lane_id() >> 2, t = lane_id() & 3;
        get(b[(k0 + t) * SBK + g * SBN], f.big[0], f.small[0]);
        get(b[(k0 + t + 4) * SBK + g * SBN], f.big[1], f.small[1]);
    }
    // A operand from accumulator tile kk: thread (g, t) holds columns 2t, 2t+1 where
    // the tf32 A layout wants t, t+4, so the k index is permuted (logical t <-> key 2t,
    // t+4 <-> key 2t+1) and B's rows are read with the same permutation.
    static constexpr bool REG_A = true;
    static __device__ __forceinline__ void a_from_acc(AF& f, const float (*c)[4], int kk) {
        split(c[kk][0], f.big[0], f.small[0]);
        split(c[kk][2], f.big[1], f.small[1]);
        split(c[kk][1], f.big[2], f.small[2]);
        split(c[kk][3], f.big[3], f.small[3]);
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b_for_acc_a(BF& f, const Tc* b, int k0) {
        const int g = lane_id() >> 2, t = lane_id() & 3;
        get(b[(k0 + 2 * t) * SBK + g * SBN], f.big[0], f.small[0]);
        get(b[(k0 + 2 * t + 1) * SBK + g * SBN], f.big[1], f.small[1]);
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b2_for_acc_a(BF& f0, BF& f1, const Tc* b, int k0) {
        load_b_for_acc_a<SBK, SBN>(f0, b, k0);
        load_b_for_acc_a<SBK, SBN>(f1, b + 8 * SBN, k0);
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b2(BF& f0, BF& f1, const Tc* b, int k0) {
        load_b<SBK, SBN>(f0, b, k0);
        load_b<SBK, SBN>(f1, b + 8 * SBN, k0);
    }
    static __device__ __forceinline__ void mma1(float* c, const unsigned* a, const unsigned* b) {
        ptx_mma_m16n8k8_tf32(c, a, b);
    }
    static __device__ __forceinline__ void mma(float* c, const AF& a, const BF& b) {
        mma1(c, a.small, b.big);  // small terms first: they are the ones rounding would lose
        mma1(c, a.big, b.small);
        mma1(c, a.big, b.big);
    }
};

// CUDA-core fallback with the same accumulator layout (float64, exact float32).
template <class T>
struct MmaSimt {
    typedef T Tc;
    typedef T Acc;
    static constexpr int KSTEP = 8;
    struct AF { T v[2][8]; };
    struct BF { T v[8][2]; };
    static constexpr bool REG_A = false;  // A operands always come from shared memory
    static __device__ __forceinline__ T to_smem(T x) { return x; }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b2(BF& f0, BF& f1, const T* b, int k0) {
        load_b<SBK, SBN>(f0, b, k0);
        load_b<SBK, SBN>(f1, b + 8 * SBN, k0);
    }
    template <int SAM, int SAK>
    static __device__ __forceinline__ void load_a(AF& f, const T* a, int k0) {
        const int g = lane_id() >> 2;
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            f.v[0][kk] = a[g * SAM + (k0 + kk) * SAK];
            f.v[1][kk] = a[(g + 8) * SAM + (k0 + kk) * SAK];
        }
    }
    template <int SBK, int SBN>
    static __device__ __forceinline__ void load_b(BF& f, const T* b, int k0) {
        const int t = lane_id() & 3;
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            f.v[kk][0] = b[(k0 + kk) * SBK + (2 * t) * SBN];
            f.v[kk][1] = b[(k0 + kk) * SBK + (2 * t + 1) * SBN];
        }
    }
    static __device__ __forceinline__ void mma(T* c, const AF& a, const BF& b) {
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            c[0] += a.v[0][kk] * b.v[kk][0];
            c[1] += a.v[0][kk] * b.v[kk][1];
            c[2] += a.v[1][kk] * b.v[kk][0];
            c[3] += a.v[1][kk] * b.v[kk][1];
        }
    }
};

template <int DT> struct Cfg;
// ASYNC: the forward double-buffers K, V tiles with cp.async (shared-memory cost: one
// more K and V tile; float64 and exact float32 keep one stage for their larger tiles).
// ASYNC_BWD: the backward double-buffers Q, dO, lse, D (float16: its tiles are small).
template <> struct Cfg<0> { typedef half_t T; typedef MmaF16 P; static constexpr int PAD = 8; static constexpr bool ASYNC = true; static constexpr bool ASYNC_BWD = true; };
template <> struct Cfg<1> { typedef float T; typedef MmaTF32x3 P; static constexpr int PAD = 4; static constexpr bool ASYNC = true; static constexpr bool ASYNC_BWD = false; };
template <> struct Cfg<2> { typedef double T; typedef MmaSimt<double> P; static constexpr int PAD = 2; static constexpr bool ASYNC = false; static constexpr bool ASYNC_BWD = false; };
template <> struct Cfg<3> { typedef float T; typedef MmaSimt<float> P; static constexpr int PAD = 4; static constexpr bool ASYNC = false; static constexpr bool ASYNC_BWD = false; };

// acc[NT][4] += A (16 x KDIM) * B (KDIM x 8 NT), one warp.
template <class P, int NT, int KDIM, int SAM, int SAK, int SBK, int SBN>
__device__ __forceinline__ void warp_gemm(typename P::Acc (*acc)[4], const typename P::Tc* a,
                                          const typename P::Tc* b) {
    static_assert(KDIM % P::KSTEP == 0, "padded K must be a multiple of the policy's k-step");
    static_assert(NT % 2 == 0, "tiles are loaded in pairs");
#pragma unroll 2
    for (int k0 = 0; k0 < KDIM; k0 += P::KSTEP) {
        typename P::AF fa;
        P::template load_a<SAM, SAK>(fa, a, k0);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            typename P::BF f0, f1;
            P::template load_b2<SBK, SBN>(f0, f1, b + j * 8 * SBN, k0);
            P::mma(acc[j], fa, f0);
            P::mma(acc[j + 1], fa, f1);
        }
    }
}

// acc[NT][4] += A (16 x KDIM) * B (KDIM x 8 NT) with A given as accumulator tiles
// c[KDIM / 8][4] of this warp (C layout), converted to operands in registers.
template <class P, int NT, int KDIM, int SBK, int SBN>
__device__ __forceinline__ void warp_gemm_acc_a(typename P::Acc (*acc)[4], const typename P::Acc (*c)[4],
                                                const typename P::Tc* b) {
#pragma unroll
    for (int k0 = 0; k0 < KDIM; k0 += P::KSTEP) {
        typename P::AF fa;
        P::a_from_acc(fa, c, k0 / P::KSTEP);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            typename P::BF f0, f1;
            P::template load_b2_for_acc_a<SBK, SBN>(f0, f1, b + j * 8 * SBN, k0);
            P::mma(acc[j], fa, f0);
            P::mma(acc[j + 1], fa, f1);
        }
    }
}

template <bool V> struct Bool { static constexpr bool value = V; };
template <class A, class B> struct is_same { static constexpr bool value = false; };
template <class A> struct is_same<A, A> { static constexpr bool value = true; };

// Asynchronous global -> shared copies of 16 bytes (zero-filled past the last row).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    ptx_cp_async_cg_16(dst, src, valid);
}
// dst[0] += a, dst[1] += b: one vector reduction for float (sm_90), two for double.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
    ptx_red_global_add_v2_f32(dst, a, b);
}
__device__ __forceinline__ void atomic_add2(double* dst, double a, double b) {
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    ptx_cp_async_ca_4(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { ptx_cp_async_commit_group(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ptx_cp_async_wait_group<N>(); }

// Start copying rows [row0, row0 + ROWS) of a (nrows, COLS) slab into a shared tile.
template <class T, int ROWS, int COLS, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int row0, int nrows) {
    constexpr int VEC = 16 / sizeof(T);
    for (int idx = threadIdx.x; idx < ROWS * (COLS / VEC); idx += NTHREADS) {
        const int r = idx / (COLS / VEC), c = (idx % (COLS / VEC)) * VEC;
        const bool valid = row0 + r < nrows;
        cp_async16(dst + r * LD + c, src + (long long)(valid ? row0 + r : 0) * COLS + c, valid);
    }
}

template <class A, int NT>
__device__ __forceinline__ void zero(A (*acc)[4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = A(0);
}

// Copy rows [row0, row0 + ROWS) of a (nrows, ncols) C-contiguous slab into a
// zero-padded (ROWS, COLS) shared tile with leading dimension LD.
template <class P, class T, int ROWS, int COLS, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile(typename P::Tc* dst, const T* __restrict__ src, int row0,
                                          int nrows, int ncols) {
    typedef typename P::Tc Ts;
    constexpr int VEC = 16 / sizeof(T);
    if constexpr (!is_same<Ts, T>::value) {  // converted on the way (3xTF32 split)
        for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NTHREADS) {
            const int r = idx / COLS, c = idx % COLS;
            T val = T(0);
            if (row0 + r < nrows && c < ncols) val = src[(long long)(row0 + r) * ncols + c];
            dst[r * LD + c] = P::to_smem(val);
        }
    } else if (ncols == COLS) {  // whole rows of 16-byte vectors (COLS is a multiple of 16)
        for (int idx = threadIdx.x; idx < ROWS * (COLS / VEC); idx += NTHREADS) {
            const int r = idx / (COLS / VEC), c = (idx % (COLS / VEC)) * VEC;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (row0 + r < nrows) val = *reinterpret_cast<const uint4*>(src + (long long)(row0 + r) * COLS + c);
            *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NTHREADS) {
            const int r = idx / COLS, c = idx % COLS;
            T val = T(0);
            if (row0 + r < nrows && c < ncols) val = src[(long long)(row0 + r) * ncols + c];
            dst[r * LD + c] = val;
        }
    }
}

// Option bits of the template parameter OPT (0: no option, the code validated on a GPU).
#define OPT_WINDOW 1   // sliding window (with the causal rule folded in): a KeepRule
#define OPT_SOFTCAP 2  // cap(x) = c tanh(x / c) of the scaled scores
#define OPT_ALIBI 4    // bias -slope |i + S - L - j|, computed from the positions
#define OPT_SEQ 8      // packed or padded sequences: blocks mapped to spans, per-sequence rule
#define OPT_MASK_MOD 16   // refattn_mask_mod(b, h, i, j): the user's keep function, every pair
#define OPT_SCORE_MOD 32  // refattn_score_mod(score, b, h, i, j), refattn_score_mod_grad
#define OPT_RULE (OPT_WINDOW | OPT_SEQ)
#define OPT_MODS (OPT_MASK_MOD | OPT_SCORE_MOD)

// FlexAttention-style functions (OPT_MASK_MOD, OPT_SCORE_MOD).  The cupy driver pastes the
// user's CUDA expressions in front of this file as these three templates, after
// `#define REFATTN_USER_MODS` (refattn/cores/sdpa/cuda_mods.py); without them, these
// defaults (never instantiated by the kernels without those bits).  b is the flattened
// batch row (the sequence with OPT_SEQ), h the query head, i, j the query and key
// positions (within the sequence); score is in natural units, in the accumulation type.
#ifndef REFATTN_USER_MODS
template <class I>
__device__ __forceinline__ bool refattn_mask_mod(I b, I h, I i, I j) { return true; }
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod(A score, I b, I h, I i, I j) { return score; }
template <class A, class I>
__device__ __forceinline__ A refattn_score_mod_grad(A score, I b, I h, I i, I j) { return A(1); }
#endif

__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// Score modifiers: scale, causal, boolean keep-mask, additive bias, dropout; with OPT, the
// keep rule of docs/backends/cupy.md, the soft-cap, ALiBi and the user's mask_mod / score_mod.
template <class T, class Acc, int OPT = 0>
struct Mods {
    const unsigned char* mask; long long mb, mh, ml, ms;
    const T* bias; long long xb, xh, xl, xs;
    const unsigned char* drop; long long db, dh, dl, ds;
    int L, S, causal, offset;
    Acc scale2;  // scale * log2(e): scores are kept in base-2 units
    Acc dscale;  // 1 / (1 - dropout_p)
    KeepRule rule;       // OPT_RULE: the kept pairs (replaces L, S, causal, offset)
    Acc scale, cap2, inv_cap;  // OPT_SOFTCAP: logit2 = c log2(e) tanh(scale s / c)
    Acc slope2;          // OPT_ALIBI: slope * log2(e) of the current (sequence, head)
    int mrow;            // OPT_MODS: the functions' b (the batch row, or the sequence)

    // Base-2 logit of query i, key j from the raw dot product s; -inf when masked.
    template <bool PLAIN>
    __device__ __forceinline__ Acc logit2(Acc s, int b, int h, int i, int j) const {
        if constexpr (OPT == 0) {
            if constexpr (PLAIN) return s * scale2;  // tile fully inside, no mask or bias
            bool keep = i < L && j < S && (!causal || j <= i + offset);
            if (keep && mask) keep = mask[b * mb + h * mh + (long long)i * ml + (long long)j * ms] != 0;
            if (!keep) return neg_inf<Acc>();
            Acc x = s * scale2;
            if (bias) x += cvt<Acc>(bias[b * xb + h * xh + (long long)i * xl + (long long)j * xs]) * Acc(LOG2E);
            return x;
        } else {
            Acc tc, gm;
            return logit2_t<PLAIN, false>(s, b, h, i, j, tc, gm);
        }
    }
    // The same with the options; tc receives tanh(scale s / c) under OPT_SOFTCAP (the
    // backward pass's factor 1 - tc^2), else is left unset; with GRAD, gm receives
    // score_mod_grad at the score before score_mod under OPT_SCORE_MOD (0 for a pair a -inf
    // bias masks), else is left unset.
    template <bool PLAIN, bool GRAD>
    __device__ __forceinline__ Acc logit2_t(Acc s, int b, int h, int i, int j, Acc& tc,
                                            Acc& gm) const {
        if constexpr (!PLAIN) {
            bool keep;
            if constexpr ((OPT & OPT_RULE) != 0) keep = rule_keeps(rule, i, j);
            else keep = i < L && j < S && (!causal || j <= i + offset);
            if (keep && mask) keep = mask[b * mb + h * mh + (long long)i * ml + (long long)j * ms] != 0;
            if constexpr ((OPT & OPT_MASK_MOD) != 0)
                if (keep) keep = refattn_mask_mod((long long)mrow, (long long)h, (long long)i, (long long)j);
            if (!keep) return neg_inf<Acc>();
        }
        Acc x;
        if constexpr ((OPT & OPT_SOFTCAP) != 0) {
            tc = tanh_acc(s * scale * inv_cap);
            x = cap2 * tc;
        } else {
            x = s * scale2;
        }
        if constexpr (!PLAIN)
            if (bias) x += cvt<Acc>(bias[b * xb + h * xh + (long long)i * xl + (long long)j * xs]) * Acc(LOG2E);
        if constexpr ((OPT & OPT_ALIBI) != 0) x -= slope2 * Acc(alibi_distance(i, j, L, S));
        if constexpr ((OPT & OPT_SCORE_MOD) != 0) {
            if (x == neg_inf<Acc>()) {  // a -inf bias masks the pair whatever score_mod makes of it
                if constexpr (GRAD) gm = Acc(0);
            } else {                    // the functions take and give natural units
                const Acc u = x * Acc(LN2);
                const long long mb_ = mrow, mh_ = h, mi_ = i, mj_ = j;
                if constexpr (GRAD) gm = refattn_score_mod_grad<Acc>(u, mb_, mh_, mi_, mj_);
                x = refattn_score_mod<Acc>(u, mb_, mh_, mi_, mj_) * Acc(LOG2E);
            }
        }
        return x;
    }
    // Factor applied to a probability by dropout (1 without dropout).
    template <bool PLAIN>
    __device__ __forceinline__ Acc dropf(int b, int h, int i, int j) const {
        if constexpr (PLAIN) return Acc(1);
        if (!drop || i >= L || j >= S) return Acc(1);
        return drop[b * db + h * dh + (long long)i * dl + (long long)j * ds] ? dscale : Acc(0);
    }
    // Whether queries [i0, i0 + ni) x keys [j0, j0 + nj) are all in range, all kept
    // by the causal mask (the keep rule) and free of mask, bias and dropout (warp-uniform).
    __device__ __forceinline__ bool plain(int i0, int ni, int j0, int nj) const {
        if constexpr ((OPT & OPT_MASK_MOD) != 0) return false;  // every pair is tested
        if constexpr ((OPT & OPT_RULE) != 0)
            return !mask && !bias && !drop && rule_tile_full(rule, i0, ni, j0, nj);
        return !mask && !bias && !drop && i0 + ni <= L && j0 + nj <= S &&
               (!causal || j0 + nj - 1 <= i0 + offset);
    }
    // OPT_SEQ: the lengths of one sequence, whose queries start at row q_row0 and keys at
    // row k_row0 of the (B, H, L, S) view, and its operands addressed from local positions 0.
    __device__ __forceinline__ void enter_sequence(int Lq, int Sk, int q_row0, int k_row0) {
        L = Lq;
        S = Sk;
        if (mask) mask += (long long)q_row0 * ml + (long long)k_row0 * ms;
        if (bias) bias += (long long)q_row0 * xl + (long long)k_row0 * xs;
        if (drop) drop += (long long)q_row0 * dl + (long long)k_row0 * ds;
    }
};

// OPT_SEQ: sequence n of a packed or padded call, from its 5 ints in `spans` (batch row,
// query rows [q0, q1), key rows [k0, k1) of the view).
struct Span {
    int b, q_row0, Lq, k_row0, Sk;
    static __device__ __forceinline__ Span of(const int* spans, int n) {
        const int* s = spans + 5 * n;
        return Span{s[0], s[1], s[2] - s[1], s[3], s[4] - s[3]};
    }
};

#define MODS_PARAMS(T)                                                                          \
    const unsigned char *mask, long long mb, long long mh, long long ml, long long ms,         \
        const T *bias, long long xb, long long xh, long long xl, long long xs,                 \
        const unsigned char *drop, long long db, long long dh, long long dl, long long ds,     \
        int H, int Hkv, int L, int S, int E, int Ev, double scale, int causal, int offset,     \
        double dscale

#define MODS_ARGS                                                                               \
    mask, mb, mh, ml, ms, bias, xb, xh, xl, xs, drop, db, dh, dl, ds, H, Hkv, L, S, E, Ev,     \
        scale, causal, offset, dscale

#define MODS_INIT(mods)                                                                         \
    mods.mask = mask; mods.mb = mb; mods.mh = mh; mods.ml = ml; mods.ms = ms;                   \
    mods.bias = bias; mods.xb = xb; mods.xh = xh; mods.xl = xl; mods.xs = xs;                   \
    mods.drop = drop; mods.db = db; mods.dh = dh; mods.dl = dl; mods.ds = ds;                   \
    mods.L = L; mods.S = S; mods.causal = causal; mods.offset = offset;                         \
    mods.scale2 = (Acc)(scale * LOG2E); mods.dscale = (Acc)dscale;

// Arguments of the option kernels (sdpa_fwd_opt, sdpa_bwd_opt), read only under their bits.
//   spans (N, 5) int32 (OPT_SEQ): per sequence n, (batch row b, q0, q1, k0, k1) of the view;
//   lo_rel, hi_rel, rule_causal, lower_right: make_rule's (OPT_RULE);
//   softcap (OPT_SOFTCAP);  alibi (rows, H) slopes in the accumulation type, row stride
//   alibi_rows (0: shared), row = b, or n with OPT_SEQ; dslopes (rows, H) in the accumulation type, added to by
//   atomics in the backward pass (OPT_ALIBI).
#define OPT_PARAMS(T, Acc)                                                                      \
    const int *__restrict__ spans, int lo_rel, int hi_rel, int rule_causal, int lower_right,   \
        double softcap, const Acc *__restrict__ alibi, long long alibi_rows, Acc *__restrict__ dslopes

#define OPT_ARGS spans, lo_rel, hi_rel, rule_causal, lower_right, softcap, alibi, alibi_rows, dslopes
#define NO_OPT_ARGS nullptr, 0, 0, 0, 0, 0.0, nullptr, 0, nullptr

// ---------------------------------------------------------------------------
// Forward: grid (B * H, ceil(L / BM)), NW warps, each warp owns 16 query rows.
// Dynamic shared memory: Q (BM, EP), K (BN, EP), V (BN, EVP), and P (BM, BN) for
// policies that cannot take P from registers.
// ---------------------------------------------------------------------------
// With OPT_SEQ the grid is (N * H, ceil(max q1 - q0 / BM)): block (n, h) takes the
// queries of sequence n (spans) and only its keys; blocks past the sequence's end exit.
template <int DT, int EP, int EVP, int NW, int BN, int OPT>
__device__ __forceinline__ void
sdpa_fwd_body(const typename Cfg<DT>::T* __restrict__ q, const typename Cfg<DT>::T* __restrict__ k,
              const typename Cfg<DT>::T* __restrict__ v, typename Cfg<DT>::T* __restrict__ o,
              typename Cfg<DT>::P::Acc* __restrict__ lse, MODS_PARAMS(typename Cfg<DT>::T),
              OPT_PARAMS(typename Cfg<DT>::T, typename Cfg<DT>::P::Acc)) {
    typedef typename Cfg<DT>::T T;
    typedef typename Cfg<DT>::P P;
    typedef typename P::Acc Acc;
    constexpr int BM = 16 * NW, PAD = Cfg<DT>::PAD;
    constexpr int LDQ = EP + PAD, LDV = EVP + PAD, LDP = BN + PAD;
    constexpr int NS = BN / 8, NO = EVP / 8;
    typedef typename P::Tc Ts;
    constexpr bool ASYNC = Cfg<DT>::ASYNC;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Ts* Qs = reinterpret_cast<Ts*>(smem_raw);
    Ts* K0 = Qs + BM * LDQ;
    Ts* V0 = K0 + BN * LDQ;
    Ts* K1 = V0 + BN * LDV;  // second stage (ASYNC only)
    Ts* V1 = K1 + BN * LDQ;
    Ts* Ps = ASYNC ? V1 + BN * LDV : K1;

    Mods<T, Acc, OPT> mods;
    MODS_INIT(mods)
    const int warp = threadIdx.x >> 5, g = lane_id() >> 2, t = lane_id() & 3;
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // the longest causal blocks first
    // Queries Lq and keys Sk of this block's sequence, from rows q_row0, k_row0 of the view.
    int bh = blockIdx.x, b = bh / H, h = bh % H, Lq = L, Sk = S, q_row0 = 0, k_row0 = 0, arow = b;
    if constexpr ((OPT & OPT_SEQ) != 0) {
        const int n = blockIdx.x / H;
        const Span seq = Span::of(spans, n);
        h = blockIdx.x % H;
        b = seq.b;
        bh = b * H + h;
        q_row0 = seq.q_row0, Lq = seq.Lq, k_row0 = seq.k_row0, Sk = seq.Sk;
        arow = n;
        if (m0 >= Lq) return;  // the whole block: no barrier is pending
        mods.enter_sequence(Lq, Sk, q_row0, k_row0);
    }
    const int hk = h / (H / Hkv);
    if constexpr ((OPT & OPT_RULE) != 0) mods.rule = make_rule(Lq, Sk, lo_rel, hi_rel, rule_causal, lower_right);
    if constexpr ((OPT & OPT_SOFTCAP) != 0) {
        mods.scale = (Acc)scale;
        mods.cap2 = (Acc)(softcap * LOG2E);
        mods.inv_cap = (Acc)(1.0 / softcap);
    }
    if constexpr ((OPT & OPT_ALIBI) != 0) mods.slope2 = cvt<Acc>(alibi[arow * alibi_rows + h]) * Acc(LOG2E);
    if constexpr ((OPT & OPT_MODS) != 0) mods.mrow = arow;
    const T* qb = q + ((long long)bh * L + q_row0) * E;
    const T* kb = k + ((long long)(b * Hkv + hk) * S + k_row0) * E;
    const T* vb = v + ((long long)(b * Hkv + hk) * S + k_row0) * Ev;
    Ts* Pw = Ps + warp * 16 * LDP;

    // Key tiles [n_begin, n_end): the rest is masked for every query of the block.
    int n_begin = 0, n_end = Sk;
    if constexpr ((OPT & OPT_RULE) != 0) {
        n_begin = rule_key_begin(mods.rule, m0);
        n_end = rule_key_end(mods.rule, m0, BM);
    } else {
        if (causal) n_end = min(Sk, max(0, m0 + BM + offset));
    }

    load_tile<P, T, BM, EP, LDQ, NW * 32>(Qs, qb, m0, Lq, E);

    Acc m_run[2] = {neg_inf<Acc>(), neg_inf<Acc>()}, l_run[2] = {Acc(0), Acc(0)};
    Acc oacc[NO][4];
    zero<Acc, NO>(oacc);

    // One key tile: S = Q K^T, online softmax, O += P V.
    auto tile = [&](const Ts* Ks, const Ts* Vs, int n0) {
        Acc sacc[NS][4];
        zero<Acc, NS>(sacc);
        warp_gemm<P, NS, EP, LDQ, 1, 1, LDQ>(sacc, Qs + warp * 16 * LDQ, Ks);

        // Online softmax on this warp's 16 x BN scores; PLAIN tiles skip every test.
        auto softmax = [&](auto plain_tag) {
            constexpr bool PLAIN = decltype(plain_tag)::value;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m0 + warp * 16 + g + 8 * r;
                Acc mx = neg_inf<Acc>();
#pragma unroll
                for (int j = 0; j < NS; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const Acc x = mods.template logit2<PLAIN>(sacc[j][2 * r + e], b, h, i,
                                                                  n0 + 8 * j + 2 * t + e);
                        sacc[j][2 * r + e] = x;
                        mx = amax(mx, x);
                    }
                mx = amax(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = amax(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const Acc m_new = amax(m_run[r], mx);
                // A row with nothing kept yet has max -inf: shift by 0 so exp2 gives 0, not NaN.
                const Acc base = m_new == neg_inf<Acc>() ? Acc(0) : m_new;
                const Acc alpha = ex2(m_run[r] - base);
                m_run[r] = m_new;
                l_run[r] *= alpha;
#pragma unroll
                for (int jv = 0; jv < NO; ++jv) {
                    oacc[jv][2 * r] *= alpha;
                    oacc[jv][2 * r + 1] *= alpha;
                }
#pragma unroll
                for (int j = 0; j < NS; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = 8 * j + 2 * t + e;
                        const Acc p = ex2(sacc[j][2 * r + e] - base);
                        l_run[r] += p;
                        sacc[j][2 * r + e] = p * mods.template dropf<PLAIN>(b, h, i, n0 + col);
                    }
            }
        };
        if (mods.plain(m0 + warp * 16, 16, n0, BN)) softmax(Bool<true>()); else softmax(Bool<false>());

        // O += P V, P (dropped) straight from registers where the policy allows.
        if constexpr (P::REG_A) {
            warp_gemm_acc_a<P, NO, BN, LDV, 1>(oacc, sacc, Vs);
        } else {
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    Pw[(g + 8 * (e >> 1)) * LDP + 8 * j + 2 * t + (e & 1)] = P::to_smem(sacc[j][e]);
            __syncwarp();
            warp_gemm<P, NO, BN, LDP, 1, LDV, 1>(oacc, Pw, Vs);
            __syncwarp();
        }
    };

    bool pipelined = false;
    if constexpr (ASYNC) {
        // Two stages: the copy of key tile n0 + BN overlaps the work on tile n0.
        pipelined = E == EP && Ev == EVP;
        if (pipelined) {
            if (n_begin < n_end) {
                load_tile_async<T, BN, EP, LDQ, NW * 32>(K0, kb, n_begin, Sk);
                load_tile_async<T, BN, EVP, LDV, NW * 32>(V0, vb, n_begin, Sk);
                cp_async_commit();
            }
            int cur = 0;
            for (int n0 = n_begin; n0 < n_end; n0 += BN, cur ^= 1) {
                if (n0 + BN < n_end) {
                    load_tile_async<T, BN, EP, LDQ, NW * 32>(cur ? K0 : K1, kb, n0 + BN, Sk);
                    load_tile_async<T, BN, EVP, LDV, NW * 32>(cur ? V0 : V1, vb, n0 + BN, Sk);
                    cp_async_commit();
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();  // tile n0 (and Q) visible to every warp
                tile(cur ? K1 : K0, cur ? V1 : V0, n0);
                __syncthreads();  // this stage is consumed before it is refilled
            }
        }
    }
    if (!pipelined) {
        for (int n0 = n_begin; n0 < n_end; n0 += BN) {
            __syncthreads();  // previous tiles fully consumed (and Q loaded)
            load_tile<P, T, BN, EP, LDQ, NW * 32>(K0, kb, n0, Sk, E);
            load_tile<P, T, BN, EVP, LDV, NW * 32>(V0, vb, n0, Sk, Ev);
            __syncthreads();
            tile(K0, V0, n0);
        }
    }

    T* ob = o + ((long long)bh * L + q_row0) * Ev;
    Acc* lseb = lse + (long long)bh * L + q_row0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        Acc l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int i = m0 + warp * 16 + g + 8 * r;
        if (i >= Lq) continue;
        const Acc inv = l > Acc(0) ? Acc(1) / l : Acc(0);
#pragma unroll
        for (int jv = 0; jv < NO; ++jv)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = 8 * jv + 2 * t + e;
                if (c < Ev) ob[(long long)i * Ev + c] = cvt<T>(oacc[jv][2 * r + e] * inv);
            }
        if (t == 0) lseb[i] = l > Acc(0) ? (m_run[r] + lg2(l)) * Acc(LN2) : neg_inf<Acc>();
    }
}

template <int DT, int EP, int EVP, int NW, int BN>
__global__ void __launch_bounds__(NW * 32)
sdpa_fwd(const typename Cfg<DT>::T* __restrict__ q, const typename Cfg<DT>::T* __restrict__ k,
         const typename Cfg<DT>::T* __restrict__ v, typename Cfg<DT>::T* __restrict__ o,
         typename Cfg<DT>::P::Acc* __restrict__ lse, MODS_PARAMS(typename Cfg<DT>::T)) {
    sdpa_fwd_body<DT, EP, EVP, NW, BN, 0>(q, k, v, o, lse, MODS_ARGS, NO_OPT_ARGS);
}

// The forward pass with the options of OPT (bits OPT_*, at least one).
template <int DT, int EP, int EVP, int NW, int BN, int OPT>
__global__ void __launch_bounds__(NW * 32)
sdpa_fwd_opt(const typename Cfg<DT>::T* __restrict__ q, const typename Cfg<DT>::T* __restrict__ k,
             const typename Cfg<DT>::T* __restrict__ v, typename Cfg<DT>::T* __restrict__ o,
             typename Cfg<DT>::P::Acc* __restrict__ lse, MODS_PARAMS(typename Cfg<DT>::T),
             OPT_PARAMS(typename Cfg<DT>::T, typename Cfg<DT>::P::Acc)) {
    static_assert(OPT > 0 && OPT < 64, "OPT: a non-empty set of the OPT_* bits");
    sdpa_fwd_body<DT, EP, EVP, NW, BN, OPT>(q, k, v, o, lse, MODS_ARGS, OPT_ARGS);
}

// ---------------------------------------------------------------------------
// Backward: grid (B * Hkv, ceil(S / BN)), NW warps, BM = BN = 16 NW; each warp
// owns 16 keys of the block and accumulates their dK, dV over every query tile
// of every query head of the GQA group; dQ is accumulated with atomics.
// Dynamic shared memory: K (BN, EP), V (BN, EVP), Q (BM, EP), dO (BM, EVP),
// dS^T (BN, BM), lse and D (BM each, accumulation type).
// ---------------------------------------------------------------------------
// With OPT_SEQ the grid is (N * Hkv, ceil(max k1 - k0 / BN)): block (n, hk) takes keys of
// sequence n and only its queries.  With OPT_ALIBI, dslopes[row, h] -= sum dS |i + S - L - j|.
#define BWD_PARAMS(DT)                                                                          \
    const typename Cfg<DT>::T *__restrict__ q, const typename Cfg<DT>::T *__restrict__ k,      \
        const typename Cfg<DT>::T *__restrict__ v, const typename Cfg<DT>::T *__restrict__ dout, \
        const typename Cfg<DT>::P::Acc *__restrict__ lse,                                      \
        const typename Cfg<DT>::P::Acc *__restrict__ rowdot,                                   \
        typename Cfg<DT>::P::Acc *__restrict__ dq, typename Cfg<DT>::T *__restrict__ dk,       \
        typename Cfg<DT>::T *__restrict__ dv, typename Cfg<DT>::T *__restrict__ dscores,       \
        MODS_PARAMS(typename Cfg<DT>::T)

// The ALiBi distance of the kept key of query i nearest the ALiBi diagonal j = i + S - L.
// dS sums to 0 over each row's kept keys, so the slope's gradient -sum dS_ij d_ij equals
// -sum dS_ij (d_ij - c_i) for any per-row c_i; with this c_i the terms stay as small as the
// row's spread of distances, not the distances themselves.  That matters when the kept keys
// lie far from the diagonal (upper-left alignment with L > S, a window away from it): a
// rounding of D_i against the row's sum of P dP shifts every dS of the row alike, and the
// distance would multiply that shift (float32: 40x the reference's own error, found on the
// CPU emulation, tests/backends/test_cuda_on_cpu.py).
//
// Not with OPT_SCORE_MOD: dS is multiplied by score_mod_grad there, and its rows no longer
// sum to 0 (the centre is 0).
template <int OPT, class M>
__device__ __forceinline__ int alibi_center(const M& mods, int i, int L, int S) {
    if constexpr ((OPT & OPT_SCORE_MOD) != 0) return 0;
    int first = 0, last = S - 1;  // the keys query i may keep (the rule's band, the causal rule)
    if constexpr ((OPT & OPT_RULE) != 0) {
        first = rule_max(0, i + mods.rule.lo);
        last = rule_min(S - 1, i + mods.rule.hi);
    } else {
        if (mods.causal) last = rule_min(S - 1, i + mods.offset);
    }
    return alibi_distance(i, rule_max(first, rule_min(last, i + S - L)), L, S);
}

template <int DT, int EP, int EVP, int NW, int OPT>
__device__ __forceinline__ void
sdpa_bwd_body(BWD_PARAMS(DT), OPT_PARAMS(typename Cfg<DT>::T, typename Cfg<DT>::P::Acc)) {
    typedef typename Cfg<DT>::T T;
    typedef typename Cfg<DT>::P P;
    typedef typename P::Acc Acc;
    constexpr int BM = 16 * NW, BN = 16 * NW, PAD = Cfg<DT>::PAD;
    constexpr int LDK = EP + PAD, LDV = EVP + PAD, LDS = BM + PAD;
    constexpr int NQ = BM / 8, NK = EP / 8, NV = EVP / 8;
    typedef typename P::Tc Ts;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Ts* Ks = reinterpret_cast<Ts*>(smem_raw);
    Ts* Vs = Ks + BN * LDK;
    Ts* dSt = Vs + BN * LDV;
    Ts* Q0 = dSt + BN * LDS;        // query-side stages: Q, dO, lse, D (two with ASYNC_BWD)
    Ts* dO0 = Q0 + BM * LDK;
    Ts* Q1 = dO0 + BM * LDV;
    Ts* dO1 = Q1 + BM * LDK;
    Acc* lse0 = reinterpret_cast<Acc*>(Cfg<DT>::ASYNC_BWD ? dO1 + BM * LDV : Q1);
    Acc* D0 = lse0 + BM;
    Acc* lse1 = D0 + BM;
    Acc* D1 = lse1 + BM;

    Mods<T, Acc, OPT> mods;
    MODS_INIT(mods)
    const int warp = threadIdx.x >> 5, g = lane_id() >> 2, t = lane_id() & 3;
    const int n0 = blockIdx.y * BN;  // the longest causal blocks (first keys) first
    int b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv;
    const int group = H / Hkv;
    // Queries Lq and keys Sk of this block's sequence, from rows q_row0, k_row0 of the view.
    int Lq = L, Sk = S, q_row0 = 0, k_row0 = 0, arow = b;
    long long kv_slab = (long long)blockIdx.x * S;
    if constexpr ((OPT & OPT_SEQ) != 0) {
        const int n = blockIdx.x / Hkv;
        const Span seq = Span::of(spans, n);
        b = seq.b;
        q_row0 = seq.q_row0, Lq = seq.Lq, k_row0 = seq.k_row0, Sk = seq.Sk;
        arow = n;
        if (n0 >= Sk) return;  // the whole block: no barrier is pending
        kv_slab = (long long)(b * Hkv + hk) * S + k_row0;
        mods.enter_sequence(Lq, Sk, q_row0, k_row0);
    }
    if constexpr ((OPT & OPT_RULE) != 0) mods.rule = make_rule(Lq, Sk, lo_rel, hi_rel, rule_causal, lower_right);
    if constexpr ((OPT & OPT_SOFTCAP) != 0) {
        mods.scale = (Acc)scale;
        mods.cap2 = (Acc)(softcap * LOG2E);
        mods.inv_cap = (Acc)(1.0 / softcap);
    }
    if constexpr ((OPT & OPT_MODS) != 0) mods.mrow = arow;
    load_tile<P, T, BN, EP, LDK, NW * 32>(Ks, k + kv_slab * E, n0, Sk, E);
    load_tile<P, T, BN, EVP, LDV, NW * 32>(Vs, v + kv_slab * Ev, n0, Sk, Ev);

    Acc dkacc[NK][4], dvacc[NV][4];
    zero<Acc, NK>(dkacc);
    zero<Acc, NV>(dvacc);
    Ts* dSw = dSt + warp * 16 * LDS;  // this warp's 16 keys
    const Acc sc = (Acc)scale;

    // Query tiles [m_begin, m_end): the rest is masked for every key of the block.
    int m_begin = 0, m_end = Lq;
    if constexpr ((OPT & OPT_RULE) != 0) {
        m_begin = rule_query_begin(mods.rule, n0);
        m_end = rule_query_end(mods.rule, n0, BN);
    } else {
        if (causal) m_begin = max(0, n0 - offset) / BM * BM;
    }

    // One query tile (query head h, rows m0 ...) against this block's keys.  lse and
    // D of rows past L read 0: those rows are masked (logit -inf, probability 0).
    auto step = [&](int h, int m0, const Ts* Qs, const Ts* dOs, const Acc* lse_s, const Acc* D_s) {
            const long long bh = (long long)b * H + h;
            if constexpr ((OPT & OPT_ALIBI) != 0)
                mods.slope2 = cvt<Acc>(alibi[arow * alibi_rows + h]) * Acc(LOG2E);
            Acc dslope = Acc(0);  // OPT_ALIBI: this lane's part of d loss / d slope
            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
            Acc sacc[NQ][4], dpacc[NQ][4];
            zero<Acc, NQ>(sacc);
            zero<Acc, NQ>(dpacc);
            warp_gemm<P, NQ, EP, LDK, 1, 1, LDK>(sacc, Ks + warp * 16 * LDK, Qs);
            warp_gemm<P, NQ, EVP, LDV, 1, 1, LDV>(dpacc, Vs + warp * 16 * LDV, dOs);

            // P^T recomputed from lse, then dS^T = P^T * (dP^T f - D), the gradient of
            // the pre-softmax scores (f: the dropout factor); sacc becomes the dropped
            // P^T (the A operand of dV), dpacc becomes dS^T (the A operand of dK).
            auto grads = [&](auto plain_tag) {
                constexpr bool PLAIN = decltype(plain_tag)::value;
#pragma unroll
                for (int j = 0; j < NQ; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int kr = g + 8 * (e >> 1), qc = 8 * j + 2 * t + (e & 1);
                        const int key = n0 + warp * 16 + kr, query = m0 + qc;
                        if constexpr (OPT == 0) {
                            const Acc x = mods.template logit2<PLAIN>(sacc[j][e], b, h, query, key);
                            const Acc p = (!PLAIN && x == neg_inf<Acc>()) ? Acc(0)
                                                                           : ex2(x - lse_s[qc] * Acc(LOG2E));
                            const Acc f = mods.template dropf<PLAIN>(b, h, query, key);
                            const Acc dsv = p * (dpacc[j][e] * f - D_s[qc]);
                            sacc[j][e] = p * f;
                            dpacc[j][e] = dsv;
                            dSw[kr * LDS + qc] = P::to_smem(dsv);
                            if (!PLAIN && dscores && key < S && query < L)
                                dscores[(bh * L + query) * S + key] = cvt<T>(dsv);
                        } else {
                            Acc tc = Acc(0), gm = Acc(1);
                            const Acc x = mods.template logit2_t<PLAIN, true>(sacc[j][e], b, h, query,
                                                                              key, tc, gm);
                            // score_mod may give -inf in a plain tile (and a row lse -inf)
                            constexpr bool TEST = !PLAIN || (OPT & OPT_SCORE_MOD) != 0;
                            const Acc p = (TEST && x == neg_inf<Acc>()) ? Acc(0)
                                                                         : ex2(x - lse_s[qc] * Acc(LOG2E));
                            const Acc f = mods.template dropf<PLAIN>(b, h, query, key);
                            Acc dsv = p * (dpacc[j][e] * f - D_s[qc]);  // d / d score
                            // d / d (score before score_mod); 0 where P = 0 (the derivative
                            // of a masked pair may be anything)
                            if constexpr ((OPT & OPT_SCORE_MOD) != 0)
                                if (p != Acc(0)) dsv *= gm;
                            if constexpr ((OPT & OPT_ALIBI) != 0)  // d score / d slope = -distance
                                if (p != Acc(0))
                                    dslope -= dsv * Acc(alibi_distance(query, key, Lq, Sk) -
                                                        alibi_center<OPT>(mods, query, Lq, Sk));
                            // d / d (scale q k^T): through the soft-cap, times 1 - tanh^2
                            Acc dsr = dsv;
                            if constexpr ((OPT & OPT_SOFTCAP) != 0) dsr = dsv * (Acc(1) - tc * tc);
                            sacc[j][e] = p * f;
                            dpacc[j][e] = dsr;
                            dSw[kr * LDS + qc] = P::to_smem(dsr);
                            if (!PLAIN && dscores && key < Sk && query < Lq)
                                dscores[(bh * L + q_row0 + query) * S + k_row0 + key] = cvt<T>(dsv);
                        }
                    }
            };
            if (mods.plain(m0, BM, n0 + warp * 16, 16) && !dscores) grads(Bool<true>());
            else grads(Bool<false>());

            if constexpr (P::REG_A) {
                warp_gemm_acc_a<P, NV, BM, LDV, 1>(dvacc, sacc, dOs);   // dV += P_drop^T dO
                warp_gemm_acc_a<P, NK, BM, LDK, 1>(dkacc, dpacc, Qs);   // dK += dS^T Q
            } else {
                __syncwarp();
                warp_gemm<P, NK, BM, LDS, 1, LDK, 1>(dkacc, dSw, Qs);  // dK += dS^T Q
                __syncwarp();
#pragma unroll
                for (int j = 0; j < NQ; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dSw[(g + 8 * (e >> 1)) * LDS + 8 * j + 2 * t + (e & 1)] = P::to_smem(sacc[j][e]);
                __syncwarp();
                warp_gemm<P, NV, BM, LDS, 1, LDV, 1>(dvacc, dSw, dOs);  // dV += P_drop^T dO
                __syncwarp();
#pragma unroll
                for (int j = 0; j < NQ; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dSw[(g + 8 * (e >> 1)) * LDS + 8 * j + 2 * t + (e & 1)] = P::to_smem(dpacc[j][e]);
            }
            __syncthreads();  // all of dS^T is written

            // dQ (warp's 16 queries) += dS K, accumulated across key blocks by atomics.
            Acc dqacc[NK][4];
            zero<Acc, NK>(dqacc);
            warp_gemm<P, NK, BN, 1, LDS, LDK, 1>(dqacc, dSt + warp * 16, Ks);
            Acc* dqb = dq + (bh * L + q_row0) * E;
#pragma unroll
            for (int j = 0; j < NK; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = m0 + warp * 16 + g + 8 * r, c = 8 * j + 2 * t;
                    Acc* dst = dqb + (long long)i * E + c;
                    if (i >= Lq || c >= E) continue;
                    if (E % 2 == 0) {  // columns c, c+1 both exist and are 8-byte aligned
                        atomic_add2(dst, sc * dqacc[j][2 * r], sc * dqacc[j][2 * r + 1]);
                    } else {
                        atomicAdd(dst, sc * dqacc[j][2 * r]);
                        if (c + 1 < E) atomicAdd(dst + 1, sc * dqacc[j][2 * r + 1]);
                    }
                }
            if constexpr ((OPT & OPT_ALIBI) != 0) {  // one atomic per warp and query tile
#pragma unroll
                for (int w = 16; w > 0; w >>= 1) dslope += __shfl_xor_sync(0xffffffffu, dslope, w);
                if (lane_id() == 0) atomicAdd(dslopes + (long long)arow * H + h, dslope);
            }
    };

    const int count = m_begin < m_end ? (m_end - m_begin + BM - 1) / BM : 0;  // query tiles per head
    const int total = group * count;
    bool pipelined = false;
    if constexpr (Cfg<DT>::ASYNC_BWD) {
        // Two stages: the copy of the next query tile overlaps the work on this one.
        pipelined = E == EP && Ev == EVP;
        auto issue = [&](int it, Ts* Qd, Ts* dOd, Acc* ld, Acc* Dd) {
            const int h = hk * group + it / count, m0 = m_begin + (it % count) * BM;
            const long long bh = (long long)b * H + h;
            load_tile_async<T, BM, EP, LDK, NW * 32>(Qd, q + (bh * L + q_row0) * E, m0, Lq);
            load_tile_async<T, BM, EVP, LDV, NW * 32>(dOd, dout + (bh * L + q_row0) * Ev, m0, Lq);
            for (int idx = threadIdx.x; idx < BM; idx += NW * 32) {
                const bool valid = m0 + idx < Lq;
                const long long row = bh * L + q_row0 + (valid ? m0 + idx : 0);
                cp_async4(ld + idx, lse + row, valid);
                cp_async4(Dd + idx, rowdot + row, valid);
            }
            cp_async_commit();
        };
        if (pipelined) {
            if (total > 0) issue(0, Q0, dO0, lse0, D0);
            for (int it = 0; it < total; ++it) {
                const int cur = it & 1;
                if (it + 1 < total) {
                    if (cur) issue(it + 1, Q0, dO0, lse0, D0); else issue(it + 1, Q1, dO1, lse1, D1);
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();  // this stage (and K, V) visible to every warp
                step(hk * group + it / count, m_begin + (it % count) * BM, cur ? Q1 : Q0,
                     cur ? dO1 : dO0, cur ? lse1 : lse0, cur ? D1 : D0);
                __syncthreads();  // this stage and dS^T consumed before they are refilled
            }
        }
    }
    if (!pipelined) {
        for (int h = hk * group; h < (hk + 1) * group; ++h) {
            const long long bh = (long long)b * H + h;
            for (int m0 = m_begin; m0 < m_end; m0 += BM) {
                __syncthreads();  // previous tiles fully consumed (and K, V loaded)
                load_tile<P, T, BM, EP, LDK, NW * 32>(Q0, q + (bh * L + q_row0) * E, m0, Lq, E);
                load_tile<P, T, BM, EVP, LDV, NW * 32>(dO0, dout + (bh * L + q_row0) * Ev, m0, Lq, Ev);
                for (int idx = threadIdx.x; idx < BM; idx += NW * 32) {
                    const bool valid = m0 + idx < Lq;
                    lse0[idx] = valid ? lse[bh * L + q_row0 + m0 + idx] : Acc(0);
                    D0[idx] = valid ? rowdot[bh * L + q_row0 + m0 + idx] : Acc(0);
                }
                __syncthreads();
                step(h, m0, Q0, dO0, lse0, D0);
            }
        }
    }

    // Write dK = scale dS^T Q and dV for this block's keys.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int key = n0 + warp * 16 + g + 8 * (e >> 1);
        if (key >= Sk) continue;
#pragma unroll
        for (int j = 0; j < NK; ++j) {
            const int c = 8 * j + 2 * t + (e & 1);
            if (c < E) dk[(kv_slab + key) * E + c] = cvt<T>(sc * dkacc[j][e]);
        }
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const int c = 8 * j + 2 * t + (e & 1);
            if (c < Ev) dv[(kv_slab + key) * Ev + c] = cvt<T>(dvacc[j][e]);
        }
    }
}

template <int DT, int EP, int EVP, int NW>
__global__ void __launch_bounds__(NW * 32) sdpa_bwd(BWD_PARAMS(DT)) {
    sdpa_bwd_body<DT, EP, EVP, NW, 0>(q, k, v, dout, lse, rowdot, dq, dk, dv, dscores, MODS_ARGS,
                                      NO_OPT_ARGS);
}

// The backward pass with the options of OPT (bits OPT_*, at least one).
template <int DT, int EP, int EVP, int NW, int OPT>
__global__ void __launch_bounds__(NW * 32)
sdpa_bwd_opt(BWD_PARAMS(DT), OPT_PARAMS(typename Cfg<DT>::T, typename Cfg<DT>::P::Acc)) {
    static_assert(OPT > 0 && OPT < 64, "OPT: a non-empty set of the OPT_* bits");
    sdpa_bwd_body<DT, EP, EVP, NW, OPT>(q, k, v, dout, lse, rowdot, dq, dk, dv, dscores, MODS_ARGS,
                                        OPT_ARGS);
}
