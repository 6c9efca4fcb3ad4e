// Host harness of refattn/cores/sdpa/sdpa_rules.cuh (the CUDA kernels' index math),
// compiled with a host C++ compiler by tests/backends/test_sdpa_rules.py.
//
// It walks the tiles exactly as sdpa_fwd_opt / sdpa_bwd_opt do and prints what they keep,
// so the test can compare it with the reference backend's masks.
//
// Input (stdin), one case per line:
//   B L S lo_rel hi_rel causal lower_right BM BN N  then N spans "b q0 q1 k0 k1"
// Output per case, one line each:
//   fwd <B*L*S digits>   1 where a forward block (query tile, key tiles from key_begin to
//                        key_end) keeps the pair (rule_keeps), else 0
//   bwd <B*L*S digits>   the same from the backward blocks (key tile, query range)
//   alibi <B*L*S ints>   alibi_distance of each pair of a sequence (local positions), -1
//                        outside every sequence
//   tiles <visited> <empty> <full_wrong> <full_missed>
//       forward tiles visited; visited tiles without a kept pair; tiles flagged
//       rule_tile_full with a pair not kept; fully kept in-range tiles not flagged.
// The first line printed is "unbounded <RULE_UNBOUNDED>".

#include <cstdio>
#include <vector>

#include "../../refattn/cores/sdpa/sdpa_rules.cuh"

int main() {
    std::printf("unbounded %d\n", RULE_UNBOUNDED);
    int B, L, S, lo_rel, hi_rel, causal, lower_right, BM, BN, N;
    while (std::scanf("%d %d %d %d %d %d %d %d %d %d", &B, &L, &S, &lo_rel, &hi_rel, &causal,
                      &lower_right, &BM, &BN, &N) == 10) {
        const long long cells = (long long)B * L * S;
        std::vector<char> fwd(cells, '0'), bwd(cells, '0');
        std::vector<int> dist(cells, -1);
        long long visited = 0, empty = 0, full_wrong = 0, full_missed = 0;
        for (int n = 0; n < N; ++n) {
            int b, q0, q1, k0, k1;
            if (std::scanf("%d %d %d %d %d", &b, &q0, &q1, &k0, &k1) != 5) return 2;
            const int Lq = q1 - q0, Sk = k1 - k0;
            const KeepRule rule = make_rule(Lq, Sk, lo_rel, hi_rel, causal, lower_right);
            auto at = [&](int i, int j) { return ((long long)b * L + q0 + i) * S + k0 + j; };
            for (int i = 0; i < Lq; ++i)
                for (int j = 0; j < Sk; ++j) dist[at(i, j)] = alibi_distance(i, j, Lq, Sk);
            // Forward blocks: query tile m0, key tiles n0 = key_begin, key_begin + BN, ...
            for (int m0 = 0; m0 < Lq; m0 += BM) {
                const int begin = rule_key_begin(rule, m0), end = rule_key_end(rule, m0, BM);
                for (int n0 = begin; n0 < end; n0 += BN) {
                    ++visited;
                    bool any = false, all = true;
                    for (int i = m0; i < m0 + BM; ++i)
                        for (int j = n0; j < n0 + BN; ++j) {
                            const bool keep = rule_keeps(rule, i, j);
                            any = any || keep;
                            all = all && keep;
                            if (keep) fwd[at(i, j)] = '1';
                        }
                    if (!any) ++empty;
                    const bool flagged = rule_tile_full(rule, m0, BM, n0, BN);
                    if (flagged && !all) ++full_wrong;
                    if (!flagged && all) ++full_missed;
                }
            }
            // Backward blocks: key tile n0, query tiles m0 = query_begin, ... < query_end.
            for (int n0 = 0; n0 < Sk; n0 += BN) {
                const int begin = rule_query_begin(rule, n0), end = rule_query_end(rule, n0, BN);
                for (int m0 = begin; m0 < end; m0 += BM)
                    for (int i = m0; i < m0 + BM; ++i)
                        for (int j = n0; j < n0 + BN; ++j)
                            if (rule_keeps(rule, i, j)) bwd[at(i, j)] = '1';
            }
        }
        std::printf("fwd %.*s\n", (int)cells, fwd.data());
        std::printf("bwd %.*s\n", (int)cells, bwd.data());
        std::printf("alibi");
        for (long long c = 0; c < cells; ++c) std::printf(" %d", dist[c]);
        std::printf("\ntiles %lld %lld %lld %lld\n", visited, empty, full_wrong, full_missed);
    }
    return 0;
}
