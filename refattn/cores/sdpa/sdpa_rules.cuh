// Index math of the SDPA option kernels: which (query, key) pairs a sequence keeps,
// which key (query) tiles a query (key) tile can reach, and the ALiBi distance.
//
// Plain C++ (no CUDA types): sdpa.cu includes it (KernelSource inlines it, so NVRTC
// needs no include path), and tests/backends/sdpa_rules_harness.cpp compiles it with a
// host C++ compiler so that the CPU test suite checks it against the reference's masks.
//
// A KeepRule describes one sequence of L queries and S keys (positions from 0): key j
// is kept for query i iff 0 <= i < L, 0 <= j < S and lo <= j - i <= hi.  This is the
// reference's causal rule (hi = offset), FlashAttention's window (lo = offset - left,
// hi = offset + right) and their intersection; RULE_UNBOUNDED stands for a missing side.
// Definitions: docs/cores/sdpa.md, docs/backends/cupy.md ("Options in the kernels").

#ifndef REFATTN_SDPA_RULES_CUH
#define REFATTN_SDPA_RULES_CUH

#ifdef __CUDACC__
#define RULE_FN __host__ __device__ __forceinline__
#else
#define RULE_FN inline
#endif

// A window side that keeps everything (|j - i| + |offset| stays far below it: lengths
// are checked to be < 2^29 by the driver).
#define RULE_UNBOUNDED (1 << 30)

struct KeepRule {
    int L, S;    // queries and keys of the sequence
    int lo, hi;  // kept iff lo <= j - i <= hi
};

RULE_FN int rule_min(int a, int b) { return a < b ? a : b; }
RULE_FN int rule_max(int a, int b) { return a > b ? a : b; }

// The rule of one sequence.  lo_rel, hi_rel are the window's bounds relative to the causal
// alignment's offset (-left, +right; +-RULE_UNBOUNDED for a missing side); the offset is
// 0 (upper-left) or S - L (lower-right, FlashAttention); causal caps hi at the offset.
RULE_FN KeepRule make_rule(int L, int S, int lo_rel, int hi_rel, int causal, int lower_right) {
    const int offset = lower_right ? S - L : 0;
    KeepRule r;
    r.L = L;
    r.S = S;
    r.lo = lo_rel <= -RULE_UNBOUNDED ? -RULE_UNBOUNDED : lo_rel + offset;
    r.hi = hi_rel >= RULE_UNBOUNDED ? RULE_UNBOUNDED : hi_rel + offset;
    if (causal) r.hi = rule_min(r.hi, offset);
    return r;
}

// Whether query i keeps key j.
RULE_FN bool rule_keeps(const KeepRule& r, int i, int j) {
    return i >= 0 && i < r.L && j >= 0 && j < r.S && j - i >= r.lo && j - i <= r.hi;
}

// Keys [key_begin, key_end) hold every key that some query of [i0, i0 + ni) keeps
// (begin >= end: none).  The band is convex, so every key tile in between has a kept pair.
RULE_FN int rule_key_begin(const KeepRule& r, int i0) {
    return rule_min(r.S, rule_max(0, r.lo <= -RULE_UNBOUNDED ? 0 : i0 + r.lo));
}
RULE_FN int rule_key_end(const KeepRule& r, int i0, int ni) {
    const int last = rule_min(i0 + ni, r.L) - 1;  // last query in range
    if (last < rule_max(i0, 0)) return 0;
    return rule_max(0, rule_min(r.S, r.hi >= RULE_UNBOUNDED ? r.S : last + r.hi + 1));
}

// Queries [query_begin, query_end) hold every query that keeps some key of [j0, j0 + nj).
RULE_FN int rule_query_begin(const KeepRule& r, int j0) {
    return rule_min(r.L, rule_max(0, r.hi >= RULE_UNBOUNDED ? 0 : j0 - r.hi));
}
RULE_FN int rule_query_end(const KeepRule& r, int j0, int nj) {
    const int last = rule_min(j0 + nj, r.S) - 1;  // last key in range
    if (last < rule_max(j0, 0)) return 0;
    return rule_max(0, rule_min(r.L, r.lo <= -RULE_UNBOUNDED ? r.L : last - r.lo + 1));
}

// Whether every pair of queries [i0, i0 + ni) x keys [j0, j0 + nj) is kept (the tile
// needs no test per pair).
RULE_FN bool rule_tile_full(const KeepRule& r, int i0, int ni, int j0, int nj) {
    return i0 >= 0 && j0 >= 0 && i0 + ni <= r.L && j0 + nj <= r.S && j0 - (i0 + ni - 1) >= r.lo &&
           (j0 + nj - 1) - i0 <= r.hi;
}

// FlashAttention's ALiBi distance |i + S - L - j| (the bias is -slope times it).
RULE_FN int alibi_distance(int i, int j, int L, int S) {
    const int d = i + S - L - j;
    return d < 0 ? -d : d;
}

#endif  // REFATTN_SDPA_RULES_CUH
