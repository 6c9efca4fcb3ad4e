// A small CUDA-on-the-CPU emulation for running kernels in tests (host C++20, g++ >= 10).
//
// It runs one thread block at a time: each CUDA thread of the block is a fiber (ucontext)
// with its own stack, all on the calling OS thread, switched cooperatively.  A fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a warp shuffle), so every thread
// of a block runs ahead of the others as far as the barriers allow: a read of shared
// memory that a missing barrier leaves unordered sees the value before the other threads'
// writes, and a write races ahead of their reads.  Dynamic shared memory is filled with
// 0xff bytes (NaN in float32 and float64) before each block, so reading what no thread
// wrote shows in the results.  Blocks run in order of their linear index; those of odd
// index resume their threads in reverse order (thread N-1 first), so that a missing
// barrier shows whichever thread reads another's data.
//
// Covered: __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__ /
// __align__ / __restrict__, threadIdx / blockIdx / blockDim / gridDim, extern __shared__
// (CUDA_EMU_EXTERN_SHARED), __syncthreads, __syncwarp, __shfl_sync / __shfl_xor_sync /
// __shfl_down_sync / __shfl_up_sync (full warps, full mask), atomicAdd, the bit casts
// (__int_as_float, ...), min / max, uint4 / make_uint4; the math functions are <cmath>'s.
// The PTX instructions of the tensor-core kernels (mma.sync m16n8k16 .f16 and m16n8k8 .tf32,
// ldmatrix .x4 [.trans], cp.async with commit / wait_group, cvt to and from f16 and tf32,
// red.global.add.v2.f32): ptx_emulation.h, included at the end, defines the `ptx_*`
// functions that sdpa.cu writes with inline asm outside CUDA_EMULATION.
// Not covered: inline PTX itself (asm statements: a source must route each instruction
// through a function the emulation defines), static __shared__ variables (a function-scope
// `__shared__` here is a per-thread local: the test checks the emulated source declares
// none), textures, cooperative groups, streams, warps in lockstep (lanes run one after
// another between barriers), concurrent blocks, the hardware's rounding inside mma and its
// <cmath> functions (exp2f, tanhf: the host's here), and speed: timing means nothing here.
//
// Launch: cuda_emu::launch(kernel, grid, block, dynamic_smem, params), with params as for
// cuLaunchKernel (an array of pointers to each argument's value).

#ifndef CUDA_EMULATION_H
#define CUDA_EMULATION_H

#include <ucontext.h>
#include <sys/mman.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__
#define CUDA_EMULATION 1  // sources test it: the emulation provides the ptx_* functions

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }

namespace cuda_emu {

constexpr std::size_t kStackBytes = 256 * 1024;          // per CUDA thread
constexpr std::size_t kDynamicSharedBytes = 227 * 1024;  // Hopper's opt-in limit per block
constexpr unsigned kFullMask = 0xffffffffu;

// A barrier among the live threads of a group (the block or one warp).
struct Barrier {
    int arrived = 0;
    int live = 0;
    unsigned long generation = 0;
    int collective = 0;  // arrivals of warp-collective PTX instructions (ptx_emulation.h)
    bool mixed = false;  // the last release had other arrivals beside them
};

struct Fiber {
    ucontext_t context;
    char* stack = nullptr;
    uint3 thread{0, 0, 0};
    bool done = false;
};

struct Block {
    std::vector<Fiber> fibers;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<std::array<std::uint64_t, 32>> slots;  // one shuffle slot per lane
    std::function<void()> body;
    ucontext_t scheduler;
    int current = 0;
    unsigned long progress = 0;  // arrivals, releases and exits: a round without any is a deadlock
    std::string error;
};

inline Block* g_block = nullptr;
inline uint3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0};
inline dim3 g_block_dim, g_grid_dim;
inline unsigned char* g_dynamic_shared = nullptr;  // set by CUDA_EMU_EXTERN_SHARED
inline std::size_t g_dynamic_shared_size = 0;      // bytes of it the launch asked for
inline unsigned long g_block_serial = 0;            // counts the blocks run: per-block state

inline int linear_thread() {
    return (int)(g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z));
}

// Back to the scheduler; it resumes this fiber later with threadIdx restored.
inline void yield() { swapcontext(&g_block->fibers[g_block->current].context, &g_block->scheduler); }

// Stop the launch with a message (the fiber is never resumed).
[[noreturn]] inline void trap(const std::string& message) {
    if (g_block->error.empty()) g_block->error = message;
    for (;;) yield();
}

inline void release_if_complete(Barrier& b) {
    if (b.arrived > 0 && b.arrived >= b.live) {
        b.mixed = b.collective != 0 && b.collective != b.arrived;
        b.collective = 0;
        b.arrived = 0;
        ++b.generation;
        ++g_block->progress;
    }
}

inline void arrive_and_wait(Barrier& b) {
    const unsigned long generation = b.generation;
    ++b.arrived;
    ++g_block->progress;
    release_if_complete(b);
    while (b.generation == generation) yield();
}

inline int warp_of_current() { return linear_thread() / 32; }

inline void check_warp(unsigned mask, const char* what) {
    if (mask != kFullMask) trap(std::string(what) + ": only the full mask 0xffffffff is emulated");
    if (g_block->warps[warp_of_current()].live != 32)
        trap(std::string(what) + ": only full warps of 32 live threads are emulated");
}

inline void syncthreads() { arrive_and_wait(g_block->block); }

inline void syncwarp(unsigned mask) {
    check_warp(mask, "__syncwarp");
    arrive_and_wait(g_block->warps[warp_of_current()]);
}

// Every lane publishes its value, then reads lane source(lane) (out of range: its own).
template <class T, class Source>
T shuffle(unsigned mask, T value, int width, Source source, const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles of up to 8 bytes");
    check_warp(mask, what);
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) trap(std::string(what) + ": bad width");
    const int warp = warp_of_current(), lane = linear_thread() % 32;
    auto& slots = g_block->slots[warp];
    std::memcpy(&slots[lane], &value, sizeof(T));
    arrive_and_wait(g_block->warps[warp]);  // every lane has published
    const int base = lane & ~(width - 1);
    int src = source(lane - base);
    src = (src < 0 || src >= width) ? lane : base + src;
    T out;
    std::memcpy(&out, &slots[src], sizeof(T));
    arrive_and_wait(g_block->warps[warp]);  // every lane has read before the slots are reused
    return out;
}

[[noreturn]] inline void fiber_exit_unreachable() { for (;;) yield(); }

inline void fiber_entry() {
    Block* b = g_block;
    const int self = b->current;
    b->body();
    b->fibers[self].done = true;
    ++b->progress;
    --b->block.live;
    Barrier& warp = b->warps[self / 32];
    --warp.live;
    release_if_complete(b->block);
    release_if_complete(warp);
    // returning switches to uc_link (the scheduler)
}

// Stacks with a guard page below each (an overflow faults instead of corrupting).
struct Stacks {
    std::vector<char*> maps;
    ~Stacks() {
        for (char* m : maps) munmap(m, kStackBytes + 4096);
    }
    char* get(std::size_t i) {
        while (maps.size() <= i) {
            void* m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            mprotect(m, 4096, PROT_NONE);
            maps.push_back(static_cast<char*>(m));
        }
        return maps[i] + 4096;
    }
};

// Run the block g_block_idx to its end; "" on success, else what went wrong.
inline std::string run_block(Block& b, long long threads, std::size_t dynamic_smem, Stacks& stacks,
                             bool reverse) {
    const int nwarps = (int)b.warps.size();
    ++g_block_serial;
    if (dynamic_smem > 0) std::memset(g_dynamic_shared, 0xff, dynamic_smem);
    b.block = Barrier{0, (int)threads, 0, 0, false};
    for (int w = 0; w < nwarps; ++w) b.warps[w] = Barrier{0, (int)std::min<long long>(32, threads - 32LL * w), 0, 0, false};
    const dim3 block = g_block_dim;
    for (long long i = 0; i < threads; ++i) {
        Fiber& f = b.fibers[i];
        f.done = false;
        f.stack = stacks.get(i);
        if (f.stack == nullptr) return "out of memory for the fibers' stacks";
        f.thread = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                         (unsigned)(i / ((long long)block.x * block.y))};
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    const std::string where = " (block " + std::to_string(g_block_idx.x) + ", " + std::to_string(g_block_idx.y) +
                              ", " + std::to_string(g_block_idx.z) + ")";
    long long remaining = threads;
    while (remaining > 0) {
        const unsigned long before = b.progress;
        for (long long n = 0; n < threads; ++n) {
            const long long i = reverse ? threads - 1 - n : n;
            Fiber& f = b.fibers[i];
            if (f.done) continue;
            b.current = (int)i;
            g_thread_idx = f.thread;
            swapcontext(&b.scheduler, &f.context);
            if (!b.error.empty()) return b.error + where + ", thread " + std::to_string(i);
            if (f.done) --remaining;
        }
        if (remaining > 0 && b.progress == before)
            return "deadlock: threads wait at a barrier that the others never reach" + where;
    }
    return "";
}

// Run every block of the grid, in order of the linear block index; "" on success.
inline std::string run_grid(dim3 grid, dim3 block, std::size_t dynamic_smem, const std::function<void()>& body) {
    const long long threads = (long long)block.x * block.y * block.z;
    if (threads <= 0 || threads > 1024 || block.z > 64) return "block: 1 to 1024 threads (z <= 64)";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
        return "grid: x in [1, 2^31), y and z in [1, 65535]";
    if (dynamic_smem > kDynamicSharedBytes) return "dynamic shared memory above the 227 KiB a block may use";
    if (dynamic_smem > 0 && g_dynamic_shared == nullptr) return "no extern __shared__ buffer declared";
    static Stacks stacks;
    Block b;
    b.body = body;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.slots.resize(b.warps.size());
    g_block = &b;
    g_block_dim = block;
    g_grid_dim = grid;
    g_dynamic_shared_size = dynamic_smem;
    std::string error;
    for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
        for (unsigned by = 0; by < grid.y && error.empty(); ++by)
            for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
                g_block_idx = uint3{bx, by, bz};
                const unsigned long long linear = bx + (unsigned long long)grid.x * (by + (unsigned long long)grid.y * bz);
                error = run_block(b, threads, dynamic_smem, stacks, linear % 2 == 1);
            }
    g_block = nullptr;
    return error;
}

// Kernel parameter type codes, checked against the caller's arguments.
template <class T> struct TypeCode;
template <> struct TypeCode<int> { static constexpr const char* value = "i32"; };
template <> struct TypeCode<unsigned> { static constexpr const char* value = "u32"; };
template <> struct TypeCode<long long> { static constexpr const char* value = "i64"; };
template <> struct TypeCode<unsigned long long> { static constexpr const char* value = "u64"; };
template <> struct TypeCode<float> { static constexpr const char* value = "f32"; };
template <> struct TypeCode<double> { static constexpr const char* value = "f64"; };
template <> struct TypeCode<unsigned char> { static constexpr const char* value = "u8"; };
template <> struct TypeCode<unsigned short> { static constexpr const char* value = "u16"; };
template <class T> struct TypeCode<T*> {
    static inline const std::string text = std::string(TypeCode<std::remove_cv_t<T>>::value) + "*";
    static inline const char* value = text.c_str();
};

template <class... A>
std::string signature() {
    std::string s;
    ((s += (s.empty() ? "" : ","), s += TypeCode<std::remove_cv_t<A>>::value), ...);
    return s;
}

// One kernel instantiation, callable with cuLaunchKernel-style parameters.
struct Kernel {
    std::string name, signature;
    std::function<std::string(dim3, dim3, std::size_t, void**)> launch;
};

template <class... A, std::size_t... I>
std::tuple<A...> unpack(void** params, std::index_sequence<I...>) {
    return std::tuple<A...>{*static_cast<std::remove_cv_t<A>*>(params[I])...};
}

template <class... A>
Kernel kernel(const char* name, void (*fn)(A...)) {
    Kernel k;
    k.name = name;
    k.signature = signature<A...>();
    k.launch = [fn](dim3 grid, dim3 block, std::size_t smem, void** params) {
        const std::tuple<A...> args = unpack<A...>(params, std::index_sequence_for<A...>{});
        return run_grid(grid, block, smem, [&] { std::apply(fn, args); });
    };
    return k;
}

}  // namespace cuda_emu

// The shared-memory window address of a pointer (only inline PTX takes it).
inline std::size_t __cvta_generic_to_shared(const void* p) {
    return (std::size_t)(static_cast<const unsigned char*>(p) - ::cuda_emu::g_dynamic_shared);
}

#define threadIdx (::cuda_emu::g_thread_idx)
#define blockIdx (::cuda_emu::g_block_idx)
#define blockDim (::cuda_emu::g_block_dim)
#define gridDim (::cuda_emu::g_grid_dim)

inline void __syncthreads() { ::cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = ::cuda_emu::kFullMask) { ::cuda_emu::syncwarp(mask); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return ::cuda_emu::shuffle(mask, v, width, [src, width](int) { return src % width; }, "__shfl_sync");
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::cuda_emu::shuffle(mask, v, width, [lane_mask](int l) { return l ^ lane_mask; }, "__shfl_xor_sync");
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::cuda_emu::shuffle(mask, v, width, [delta](int l) { return l + (int)delta; }, "__shfl_down_sync");
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::cuda_emu::shuffle(mask, v, width, [delta](int l) { return l - (int)delta; }, "__shfl_up_sync");
}

// One block runs at a time on one OS thread, so a read-modify-write is atomic here.
template <class T>
T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}

// The dynamic shared memory of `extern __shared__ T name[]` declarations in the kernels.
#define CUDA_EMU_EXTERN_SHARED(name)                                                   \
    __attribute__((aligned(16))) unsigned char name[::cuda_emu::kDynamicSharedBytes]; \
    static const bool name##_registered_ = (::cuda_emu::g_dynamic_shared = name, true);

#include "ptx_emulation.h"  // the ptx_* functions of the tensor-core kernels

#endif  // CUDA_EMULATION_H
