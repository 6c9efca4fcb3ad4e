// The PTX instructions of refattn's kernels, emulated on the CPU (included by
// cuda_emulation.h, which defines CUDA_EMULATION).  sdpa.cu puts each inline-PTX instruction
// behind a `ptx_*` function defined with `asm` unless CUDA_EMULATION is defined; these are
// the same functions with the instructions' semantics as NVIDIA's PTX ISA (release 8.5)
// states them, written from that text and not from the kernels, so that running the kernels
// here checks the kernels' assumptions about fragment layouts, conversions and the cp.async
// pipeline.  Sections cited by their titles in the PTX ISA:
//
//   * "Data Movement and Conversion Instructions: cvt" (cvt.f32.f16, cvt.rn.f16.f32,
//     cvt.rn.f16x2.f32, cvt.rna.tf32.f32) and "Floating Point Data Types" (binary16).
//   * "Matrix Fragments for mma.m16n8k16 with floating point type" and "Matrix Fragments for
//     mma.m16n8k8" (.tf32), "Multiply-and-Accumulate Instruction: mma".
//   * "Warp-level matrix load instruction: ldmatrix" (.m8n8.x4, .trans, .b16).
//   * "Data Movement and Conversion Instructions: cp.async", "cp.async.commit_group",
//     "cp.async.wait_group / cp.async.wait_all".
//   * "Parallel Synchronization and Communication Instructions: red" (.global.add.v2.f32).
//
// What is modelled:
//   * Conversions bit-exactly: float16 <-> float32 round to nearest even, with subnormals,
//     overflow to infinity, infinities and NaN (a NaN converts to a NaN, the canonical one:
//     payloads are not modelled); tf32 round to nearest, ties away from zero, to 10 fraction
//     bits with the low 13 bits of the register zero.
//   * mma.sync and ldmatrix warp-collectively: every lane of the warp deposits its registers
//     (or row address) in a slot; the last lane to arrive forms the whole matrices from the
//     documented fragment layouts and writes each lane its result, then the warp goes on.  A
//     call from a partial warp, or a warp whose lanes are not all at the same instruction
//     (some at another barrier), is reported instead of computed.
//   * mma arithmetic: the float16 / tf32 operands' products are exact in float32 and are
//     accumulated into the float32 C in order k = 0, 1, ... with one float32 rounding per
//     step (fmaf).  The hardware's accumulation order and internal rounding are not
//     documented and may differ by a few float32 ulps of the sum; tf32 operands are read with
//     their low 13 bits ignored (masked), as a register not produced by cvt.rna.tf32 would
//     be by truncating hardware.  The kernels are compared with the reference backend within
//     the low-precision tolerance (refattn.testing), never a looser one for this.
//   * cp.async asynchronously: a copy is queued by the issuing thread (with its src-size:
//     the bytes past it are zero-filled) and performed only when that thread's
//     cp.async.wait_group N retires its group (every committed group but the N most recent);
//     copies not yet committed are not waited for.  So a missing wait, commit or a wait with
//     a too-large N leaves shared memory as it was: stale, or the emulation's NaN fill.
//     (The copy happens at the latest moment the ISA allows; a copy landing early, over data
//     other threads still read, is not modelled.)
//   * red.global.add: atomic adds (one block runs at a time).
//   Addresses are checked: shared ones inside the launch's dynamic shared memory, with the
//   alignment each instruction requires.

#ifndef CUDA_EMULATION_PTX_H
#define CUDA_EMULATION_PTX_H

#include <cfloat>
#include <cstring>
#include <limits>
#include <deque>

namespace cuda_emu::ptx {

// ---- conversions ----------------------------------------------------------------------

constexpr std::uint16_t kCanonicalNaN16 = 0x7fff;
constexpr std::uint32_t kCanonicalNaN32 = 0x7fffffffu;

// binary16: 1 sign, 5 exponent (bias 15), 10 fraction bits; exponent field 0 holds zero and
// the subnormals (fraction * 2^-24), field 31 the infinities and NaNs.  Exact in float32.
inline float f16_to_f32(std::uint16_t h) {
    const bool negative = (h & 0x8000u) != 0;
    const int field = (h >> 10) & 0x1f;
    const int fraction = h & 0x3ff;
    float magnitude;
    if (field == 0x1f) {
        if (fraction != 0) return std::bit_cast<float>(kCanonicalNaN32);
        magnitude = std::numeric_limits<float>::infinity();
    } else if (field == 0) {
        magnitude = std::ldexp((float)fraction, -24);
    } else {
        magnitude = std::ldexp((float)(1024 + fraction), field - 15 - 10);
    }
    return negative ? -magnitude : magnitude;
}

// |x| (a finite double) rounded to a multiple of 2^max(min_exponent, floor(log2 |x|) - 10):
// 11 significant bits, or the fixed quantum of the subnormal range.  ties_away: round half
// away from zero (else half to even).
inline double round_to_11_bits(double x, int min_exponent, bool ties_away) {
    if (x == 0) return 0;
    int e;
    std::frexp(x, &e);  // x = f 2^e, f in [0.5, 1): floor(log2 x) = e - 1
    const int q = std::max(min_exponent, e - 1 - 10);
    const double n = std::ldexp(x, -q);  // exact
    const double r = ties_away ? std::floor(n + 0.5) : std::nearbyint(n);  // FE_TONEAREST
    return std::ldexp(r, q);
}

// cvt.rn.f16.f32: round to nearest even; beyond the largest finite value (65504) by half an
// ulp or more: infinity.
inline std::uint16_t f32_to_f16_rn(float f) {
    if (std::isnan(f)) return kCanonicalNaN16;
    const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs((double)f);
    if (std::isinf(a)) return sign | 0x7c00;
    const double r = round_to_11_bits(a, -24, false);
    if (r > 65504.0) return sign | 0x7c00;
    if (r < std::ldexp(1.0, -14)) return sign | (std::uint16_t)std::ldexp(r, 24);  // subnormal / 0
    int e;
    std::frexp(r, &e);
    const int exponent = e - 1;  // in [-14, 15]
    const int fraction = (int)std::ldexp(r, 10 - exponent) - 1024;
    return sign | (std::uint16_t)((exponent + 15) << 10) | (std::uint16_t)fraction;
}

// cvt.rna.tf32.f32: the float32 rounded to 10 fraction bits (19-bit tf32 in a .b32 register,
// low 13 bits zero), ties away from zero; float32's subnormals keep the top 10 of their 23
// fraction bits (quantum 2^-136).  Overflow past the largest float32: infinity.
inline std::uint32_t f32_to_tf32_rna(float f) {
    if (std::isnan(f)) return kCanonicalNaN32;
    const double a = std::fabs((double)f);
    const std::uint32_t sign = std::signbit(f) ? 0x80000000u : 0;
    if (std::isinf(a)) return sign | 0x7f800000u;
    const double r = round_to_11_bits(a, -136, true);
    if (r > (double)FLT_MAX) return sign | 0x7f800000u;
    const std::uint32_t bits = std::bit_cast<std::uint32_t>((float)r);  // exact
    return sign | bits;
}

// A tf32 operand of mma: the register's value with its low 13 bits ignored.
inline float tf32_operand(std::uint32_t r) { return std::bit_cast<float>(r & 0xffffe000u); }

inline float f16_half(std::uint32_t r, int upper) { return f16_to_f32((std::uint16_t)(upper ? r >> 16 : r)); }

// ---- shared-memory addresses ----------------------------------------------------------

inline std::size_t shared_offset(const void* p, std::size_t bytes, std::size_t alignment, const char* what) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (g_dynamic_shared == nullptr || c < g_dynamic_shared || c + bytes > g_dynamic_shared + g_dynamic_shared_size)
        trap(std::string(what) + ": address outside the block's dynamic shared memory");
    const std::size_t offset = (std::size_t)(c - g_dynamic_shared);
    if (offset % alignment != 0)
        trap(std::string(what) + ": shared address not aligned to " + std::to_string(alignment) + " bytes");
    return offset;
}

// ---- warp-collective instructions -----------------------------------------------------

struct LaneSlot {
    unsigned long block = ~0ul, generation = ~0ul;  // the round the lane deposited in
    unsigned long done_block = ~0ul, done_generation = ~0ul;  // the round its result is of
    const char* op = "";
    std::uint32_t a[4] = {}, b[2] = {}, r[4] = {};
    float c[4] = {}, d[4] = {};
    const void* address = nullptr;
};

inline LaneSlot g_slots[32][32];  // [warp][lane]: 1024 threads at most

// Every lane of the current warp deposits (fill); the last to arrive checks that all 32 are
// at this instruction and computes every lane's result (compute(slots)); then each lane
// takes its own.  One warp barrier.
template <class Fill, class Compute>
void warp_collective(const char* what, Fill fill, Compute compute) {
    check_warp(kFullMask, what);
    const int warp = warp_of_current(), lane = linear_thread() % 32;
    Barrier& bar = g_block->warps[warp];
    LaneSlot* slots = g_slots[warp];
    LaneSlot& mine = slots[lane];
    const unsigned long generation = bar.generation;
    fill(mine);
    mine.op = what;
    mine.block = g_block_serial;
    mine.generation = generation;
    ++bar.arrived;
    ++bar.collective;
    ++g_block->progress;
    if (bar.arrived >= bar.live && bar.collective == bar.arrived) {
        for (int l = 0; l < 32; ++l)
            if (slots[l].block != g_block_serial || slots[l].generation != generation ||
                std::strcmp(slots[l].op, what) != 0)
                trap(std::string(what) + ": lane " + std::to_string(l) +
                     " of the warp is not at this instruction (every lane must execute it together)");
        compute(slots);
        for (int l = 0; l < 32; ++l) {
            slots[l].done_block = g_block_serial;
            slots[l].done_generation = generation;
        }
    }
    release_if_complete(bar);
    while (bar.generation == generation) yield();
    if (bar.mixed)  // released together with lanes at __syncwarp or a shuffle
        trap(std::string(what) + ": lanes of the warp are not at this instruction (they diverge)");
    if (mine.done_block != g_block_serial || mine.done_generation != generation)
        trap(std::string(what) + ": only full warps of 32 live threads are emulated");  // lanes exited
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8 i .. 8 i + 7 give the addresses
// of rows 0..7 of matrix i (16 bytes each, 16-byte aligned).  Lane l receives in register i
// the 32-bit word l % 4 of row l / 4 of matrix i: elements (row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1), the lower column in the lower half.  .trans: the matrix transposed, i.e.
// elements (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4).
inline void ldmatrix_x4(std::uint32_t* r, const void* smem, bool trans, const char* what) {
    shared_offset(smem, 16, 16, what);
    warp_collective(
        what, [&](LaneSlot& s) { s.address = smem; },
        [&](LaneSlot* slots) {
            for (int l = 0; l < 32; ++l) {
                const int g = l / 4, t = l % 4;
                for (int i = 0; i < 4; ++i) {
                    auto element = [&](int row, int col) {
                        std::uint16_t v;
                        std::memcpy(&v, static_cast<const unsigned char*>(slots[8 * i + row].address) + 2 * col, 2);
                        return (std::uint32_t)v;
                    };
                    slots[l].r[i] = trans ? element(2 * t, g) | (element(2 * t + 1, g) << 16)
                                          : element(g, 2 * t) | (element(g, 2 * t + 1) << 16);
                }
            }
        });
    std::memcpy(r, g_slots[warp_of_current()][linear_thread() % 32].r, 4 * sizeof(std::uint32_t));
}

// mma.sync.aligned.m16n8k{16,8}.row.col.f32.{f16,tf32}: D (16 x 8) = A (16 x K) B (K x 8) + C.
// Fragments, with g = lane / 4 (groupID), t = lane % 4 (threadID_in_group):
//   C, D (both shapes): element i of 4: row g + 8 (i >= 2), column 2 t + (i & 1).
//   m16n8k16 .f16: A: 4 .f16x2 registers, element i of 8 (register i / 2, the lower half
//     first): row g for i in {0, 1, 4, 5}, else g + 8; column 2 t + (i & 1) + 8 (i >= 4).
//     B: 2 .f16x2 registers, element i of 4: row 2 t + (i & 1) + 8 (i >= 2), column g.
//   m16n8k8 .tf32: A: 4 registers, element i: row g for i in {0, 2}, else g + 8; column
//     t + 4 (i >= 2).  B: 2 registers, element i: row t + 4 i, column g.
template <int K>
inline void mma(float* c, const std::uint32_t* a, const std::uint32_t* b, const char* what) {
    warp_collective(
        what,
        [&](LaneSlot& s) {
            std::memcpy(s.a, a, sizeof s.a);
            std::memcpy(s.b, b, sizeof s.b);
            std::memcpy(s.c, c, sizeof s.c);
        },
        [&](LaneSlot* slots) {
            float A[16][K], B[K][8];
            for (int l = 0; l < 32; ++l) {
                const int g = l / 4, t = l % 4;
                if constexpr (K == 16) {
                    for (int i = 0; i < 8; ++i) {
                        const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
                        const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                        A[row][col] = f16_half(slots[l].a[i / 2], i & 1);
                    }
                    for (int i = 0; i < 4; ++i)
                        B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = f16_half(slots[l].b[i / 2], i & 1);
                } else {
                    for (int i = 0; i < 4; ++i)
                        A[(i == 0 || i == 2) ? g : g + 8][t + (i >= 2 ? 4 : 0)] = tf32_operand(slots[l].a[i]);
                    for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_operand(slots[l].b[i]);
                }
            }
            for (int l = 0; l < 32; ++l) {
                const int g = l / 4, t = l % 4;
                for (int i = 0; i < 4; ++i) {
                    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
                    float acc = slots[l].c[i];
                    for (int k = 0; k < K; ++k) acc = std::fmaf(A[row][k], B[k][col], acc);
                    slots[l].d[i] = acc;
                }
            }
        });
    std::memcpy(c, g_slots[warp_of_current()][linear_thread() % 32].d, 4 * sizeof(float));
}

// ---- cp.async -------------------------------------------------------------------------

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int size, src_size;
};

// One thread's copies: those issued since its last commit, then its committed groups (oldest
// first).  Reset at the start of each block.
struct AsyncCopies {
    unsigned long block = ~0ul;
    std::vector<Copy> uncommitted;
    std::deque<std::vector<Copy>> groups;
};

inline AsyncCopies g_async[1024];

inline AsyncCopies& async_copies() {
    AsyncCopies& s = g_async[linear_thread()];
    if (s.block != g_block_serial) {
        s.uncommitted.clear();
        s.groups.clear();
        s.block = g_block_serial;
    }
    return s;
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp-size, src-size: dst and src aligned to
// cp-size; src-size <= cp-size bytes are read, the rest of dst zero-filled.
inline void cp_async(void* dst, const void* src, int size, int src_size, const char* what) {
    shared_offset(dst, (std::size_t)size, (std::size_t)size, what);
    if (reinterpret_cast<std::uintptr_t>(src) % (std::uintptr_t)size != 0)
        trap(std::string(what) + ": global address not aligned to cp-size");
    if (src_size < 0 || src_size > size) trap(std::string(what) + ": src-size outside [0, cp-size]");
    async_copies().uncommitted.push_back(
        Copy{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), size, src_size});
}

inline void commit_group() {
    AsyncCopies& s = async_copies();
    s.groups.push_back(std::move(s.uncommitted));
    s.uncommitted.clear();
}

// cp.async.wait_group N: every committed group but the N most recent is complete.
inline void wait_group(int n) {
    AsyncCopies& s = async_copies();
    while ((int)s.groups.size() > n) {
        for (const Copy& c : s.groups.front()) {
            std::memcpy(c.dst, c.src, (std::size_t)c.src_size);
            std::memset(c.dst + c.src_size, 0, (std::size_t)(c.size - c.src_size));
        }
        s.groups.pop_front();
    }
}

}  // namespace cuda_emu::ptx

// ---- the functions sdpa.cu defines with asm outside the emulation ------------------------

inline float ptx_cvt_f32_f16(unsigned short h) { return ::cuda_emu::ptx::f16_to_f32(h); }
inline unsigned short ptx_cvt_rn_f16_f32(float f) { return ::cuda_emu::ptx::f32_to_f16_rn(f); }
// cvt.rn.f16x2.f32 d, a, b: a converted to the upper half of d, b to the lower.
inline unsigned ptx_cvt_rn_f16x2_f32(float hi, float lo) {
    return ((unsigned)::cuda_emu::ptx::f32_to_f16_rn(hi) << 16) | ::cuda_emu::ptx::f32_to_f16_rn(lo);
}
inline unsigned ptx_cvt_rna_tf32_f32(float x) { return ::cuda_emu::ptx::f32_to_tf32_rna(x); }
inline void ptx_ldmatrix_x4(unsigned* r, const void* smem) {
    ::cuda_emu::ptx::ldmatrix_x4(r, smem, false, "ldmatrix.sync.aligned.m8n8.x4.shared.b16");
}
inline void ptx_ldmatrix_x4_trans(unsigned* r, const void* smem) {
    ::cuda_emu::ptx::ldmatrix_x4(r, smem, true, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16");
}
inline void ptx_mma_m16n8k16_f16(float* c, const unsigned* a, const unsigned* b) {
    ::cuda_emu::ptx::mma<16>(c, a, b, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
}
inline void ptx_mma_m16n8k8_tf32(float* c, const unsigned* a, const unsigned* b) {
    ::cuda_emu::ptx::mma<8>(c, a, b, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
}
// src-size = cp-size when full, else 0.
inline void ptx_cp_async_cg_16(void* dst, const void* src, bool full) {
    ::cuda_emu::ptx::cp_async(dst, src, 16, full ? 16 : 0, "cp.async.cg.shared.global");
}
inline void ptx_cp_async_ca_4(void* dst, const void* src, bool full) {
    ::cuda_emu::ptx::cp_async(dst, src, 4, full ? 4 : 0, "cp.async.ca.shared.global");
}
inline void ptx_cp_async_commit_group() { ::cuda_emu::ptx::commit_group(); }
template <int N>
inline void ptx_cp_async_wait_group() {
    static_assert(N >= 0, "cp.async.wait_group N: N a non-negative constant");
    ::cuda_emu::ptx::wait_group(N);
}
// red.global.add.v2.f32 [dst], {a, b}: dst 8-byte aligned.
inline void ptx_red_global_add_v2_f32(float* dst, float a, float b) {
    if (reinterpret_cast<std::uintptr_t>(dst) % 8 != 0)
        ::cuda_emu::trap("red.global.add.v2.f32: address not aligned to 8 bytes");
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
}

#endif  // CUDA_EMULATION_PTX_H
