// Element-wise attention (docs/variants.md section 5): exact and Taylor forms, forward and backward.
//
// Self-contained (no CUDA headers): it compiles with a bare NVRTC (the CI compile
// test) and with CuPy's RawModule on a GPU.  Derivations: docs/cores/elementwise.md.
// The loops mirror numba.py (tested on CPU) one to one; only the parallel split differs.
//
// Layout: psi (B, H, L, D), kappa and v (B, Hkv, S, D), C-contiguous, scaled inputs
// (psi = sqrt(s) q, kappa = sqrt(s) k).  T = float or double (float16 runs as float).
// The keep-mask is a 4-D bool array addressed through element strides (mb, mh, ml,
// ms; 0 on a broadcast axis); null when there is none.  Query i sees key j iff
// j < visible_end(i) and the mask keeps (i, j).
//
// Precision: sums (softmax denominators and numerators, gradients, Taylor moments)
// accumulate in double for both T, as numba.py does: a float sum over S terms may lose
// up to S * 2^-24 relative (4e-3 at S = 65536).  The exact form's per-pair arithmetic
// (difference, exponential) is done in T: one rounding per term, not growing with S.

template <class T> __device__ __forceinline__ T ex(T x);
template <> __device__ __forceinline__ float ex<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double ex<double>(double x) { return exp(x); }
template <class T> __device__ __forceinline__ T pos_inf();
template <> __device__ __forceinline__ float pos_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double pos_inf<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}

// Keys [0, end) are visible to query i before the mask (numba.py: _visible_end).
__device__ __forceinline__ int visible_end(int i, int S, int causal, int offset) {
    if (!causal) return S;
    long long e = (long long)i + offset + 1;
    return e < 0 ? 0 : (e > S ? S : (int)e);
}

#define EW_MASK_PARAMS \
    const unsigned char* __restrict__ keep, long long mb, long long mh, long long ml, long long ms

// One thread per (b, h, i, c), c fastest: a warp reads one key row with consecutive c.
struct ExactIndex {
    long long t;   // linear index of (b, h, i, c) in (B, H, L, D)
    int b, h, hk, i, c;
    __device__ ExactIndex(long long t_, int H, int Hkv, int L, int D) : t(t_) {
        c = (int)(t % D);
        long long r = t / D;
        i = (int)(r % L);
        long long bh = r / L;
        h = (int)(bh % H);
        b = (int)(bh / H);
        hk = h / (H / Hkv);
    }
};

// Exact forward: two passes over the keys per (query, channel), the row max then the
// sums (as numba.py); o = 0 and lse = -inf for a row with no key.
template <class T>
__global__ void ew_exact_fwd(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, EW_MASK_PARAMS, int B, int H, int Hkv,
                             int L, int S, int D, int causal, int offset, T* __restrict__ o,
                             T* __restrict__ lse) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * H * L * D) return;
    ExactIndex x(t, H, Hkv, L, D);
    const long long kv_row = ((long long)x.b * Hkv + x.hk) * S;   // row of key 0
    const T* kc = k + kv_row * D + x.c;                            // key j at kc[j * D]
    const T* vc = v + kv_row * D + x.c;
    const unsigned char* mrow = keep ? keep + x.b * mb + x.h * mh + x.i * ml : nullptr;
    const int end = visible_end(x.i, S, causal, offset);
    const T qi = q[t];
    T mx = -pos_inf<T>();
    for (int j = 0; j < end; ++j) {
        if (mrow && !mrow[j * ms]) continue;
        T d = qi - kc[(long long)j * D];
        T s = -d * d;
        mx = s > mx ? s : mx;
    }
    double den = 0.0, acc = 0.0;
    if (mx > -pos_inf<T>()) {
        for (int j = 0; j < end; ++j) {
            if (mrow && !mrow[j * ms]) continue;
            T d = qi - kc[(long long)j * D];
            T e = ex<T>(-d * d - mx);
            den += (double)e;
            acc += (double)e * (double)vc[(long long)j * D];
        }
    }
    if (den > 0.0) {                 // den >= 1: the key at the row max has weight 1
        o[t] = (T)(acc / den);
        lse[t] = (T)((double)mx + log(den));
    } else {
        o[t] = (T)0;
        lse[t] = -pos_inf<T>();
    }
}

// P = exp(s - lse) with lse = -inf (an empty row) mapped to +inf, so P = 0 there.
template <class T> __device__ __forceinline__ T lse_or_inf(T l) {
    return l > -pos_inf<T>() ? l : pos_inf<T>();
}

// Exact dq: per (query, channel), a loop over the keys recomputing P from lse.
// dS = P do (v - o), dpsi = sum_j dS * (-2 (psi - kappa)).
template <class T>
__global__ void ew_exact_dq(const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const T* __restrict__ o,
                            const T* __restrict__ lse, const T* __restrict__ dout, EW_MASK_PARAMS,
                            int B, int H, int Hkv, int L, int S, int D, int causal, int offset,
                            T* __restrict__ dq) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * H * L * D) return;
    ExactIndex x(t, H, Hkv, L, D);
    const long long kv_row = ((long long)x.b * Hkv + x.hk) * S;
    const T* kc = k + kv_row * D + x.c;
    const T* vc = v + kv_row * D + x.c;
    const unsigned char* mrow = keep ? keep + x.b * mb + x.h * mh + x.i * ml : nullptr;
    const int end = visible_end(x.i, S, causal, offset);
    const T qi = q[t], oi = o[t], g = dout[t], l = lse_or_inf<T>(lse[t]);
    double acc = 0.0;
    for (int j = 0; j < end; ++j) {
        if (mrow && !mrow[j * ms]) continue;
        T d = qi - kc[(long long)j * D];
        T p = ex<T>(-d * d - l);
        acc -= 2.0 * (double)(p * g * (vc[(long long)j * D] - oi)) * (double)d;
    }
    dq[t] = (T)acc;
}

// Exact dk, dv per query head (B, H, S, D), summed over GQA groups by the caller: per
// (key, channel), a loop over the queries that see the key (i >= j - offset).
template <class T>
__global__ void ew_exact_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ o,
                              const T* __restrict__ lse, const T* __restrict__ dout,
                              EW_MASK_PARAMS, int B, int H, int Hkv, int L, int S, int D,
                              int causal, int offset, T* __restrict__ dk, T* __restrict__ dv) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * H * S * D) return;
    ExactIndex x(t, H, Hkv, S, D);                 // here x.i is the key index j
    const int j = x.i;
    const long long kv = (((long long)x.b * Hkv + x.hk) * S + j) * D + x.c;
    const long long q_row = ((long long)x.b * H + x.h) * L;        // row of query 0
    const T kj = k[kv], vj = v[kv];
    const unsigned char* mcol = keep ? keep + x.b * mb + x.h * mh + j * ms : nullptr;
    long long first = causal ? (long long)j - offset : 0;          // j <= i + offset
    if (first < 0) first = 0;
    double gk = 0.0, gv = 0.0;
    for (long long i = first; i < L; ++i) {
        if (mcol && !mcol[i * ml]) continue;
        const long long qi = (q_row + i) * D + x.c;
        T d = q[qi] - kj;
        T p = ex<T>(-d * d - lse_or_inf<T>(lse[qi]));
        T g = dout[qi];
        gv += (double)(p * g);
        gk += 2.0 * (double)(p * g * (vj - o[qi])) * (double)d;
    }
    dk[t] = (T)gk;
    dv[t] = (T)gv;
}

// ---- Taylor form: one thread per (b, h, c) scans the sequence (numba.py's per-channel scan).
// a_n = 2^n / n!: exp(2 y) ~ sum_n a_n y^n.

template <int ORDER> struct Coeffs {
    double a[ORDER + 1];
    __device__ Coeffs() {
        a[0] = 1.0;
#pragma unroll
        for (int n = 1; n <= ORDER; ++n) a[n] = a[n - 1] * (2.0 / n);
    }
};

// Shifted moments A_n = sum_j exp(mu - kappa_j^2) kappa_j^n v_j, Bm_n (the same without v_j),
// mu the smallest kappa_j^2 added (+inf while empty).
template <int ORDER> struct Moments {
    double A[ORDER + 1], Bm[ORDER + 1], mu;
    __device__ Moments() : mu(pos_inf<double>()) {
#pragma unroll
        for (int n = 0; n <= ORDER; ++n) A[n] = Bm[n] = 0.0;
    }
    __device__ __forceinline__ void add(double kk, double vv) {
        double x = kk * kk;
        if (x < mu) {                         // smaller kappa^2: shift down, rescale
            if (mu < pos_inf<double>()) {
                double r = exp(x - mu);
#pragma unroll
                for (int n = 0; n <= ORDER; ++n) { A[n] *= r; Bm[n] *= r; }
            }
            mu = x;
        }
        double p = exp(mu - x);
#pragma unroll
        for (int n = 0; n <= ORDER; ++n) {
            A[n] += p * vv;
            Bm[n] += p;
            p *= kk;
        }
    }
};

// One thread per (b, h, c), c fastest.
struct ScanIndex {
    int b, h, hk, c;
    __device__ ScanIndex(long long t, int H, int Hkv, int D) {
        c = (int)(t % D);
        long long bh = t / D;
        h = (int)(bh % H);
        b = (int)(bh / H);
        hk = h / (H / Hkv);
    }
};

// Add the kept keys [added, end) to the moments; returns the new frontier.
template <class T, int ORDER>
__device__ __forceinline__ int add_keys_until(Moments<ORDER>& st, const T* kc, const T* vc,
                                              const unsigned char* mkeys, long long ms, int D,
                                              int added, int end) {
    for (int j = added; j < end; ++j) {
        if (mkeys && !mkeys[j * ms]) continue;
        st.add((double)kc[(long long)j * D], (double)vc[(long long)j * D]);
    }
    return end > added ? end : added;
}

// Taylor forward: o, the row shifts m (+inf: no key) and shifted denominators den (0: no key).
template <class T, int ORDER>
__global__ void ew_taylor_fwd(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, EW_MASK_PARAMS, int B, int H, int Hkv,
                              int L, int S, int D, int causal, int offset, T* __restrict__ o,
                              T* __restrict__ m, T* __restrict__ den) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * H * D) return;
    ScanIndex x(t, H, Hkv, D);
    const Coeffs<ORDER> a;
    const long long kv0 = ((long long)x.b * Hkv + x.hk) * S * D + x.c;    // key 0, channel c
    const long long q0 = ((long long)x.b * H + x.h) * L * D + x.c;        // query 0, channel c
    const unsigned char* mkeys = keep ? keep + x.b * mb + x.h * mh : nullptr;  // the L axis is 1
    (void)ml;
    Moments<ORDER> st;
    int added = 0;
    for (int i = 0; i < L; ++i) {
        added = add_keys_until<T, ORDER>(st, k + kv0, v + kv0, mkeys, ms, D, added,
                                         visible_end(i, S, causal, offset));
        const long long qi = q0 + (long long)i * D;
        if (st.mu == pos_inf<double>()) {          // no key yet
            o[qi] = (T)0;
            m[qi] = pos_inf<T>();
            den[qi] = (T)0;
            continue;
        }
        const double psi = (double)q[qi];
        double num = 0.0, dd = 0.0;
#pragma unroll
        for (int n = ORDER; n >= 0; --n) {          // Horner in psi
            num = num * psi + a.a[n] * st.A[n];
            dd = dd * psi + a.a[n] * st.Bm[n];
        }
        o[qi] = (T)(num / dd);
        m[qi] = (T)st.mu;
        den[qi] = (T)dd;
    }
}

// Taylor backward: dq (B, H, L, D); dk, dv per query head (B, H, S, D), summed over GQA
// groups by the caller.  A forward sweep for dq (it needs the prefix moments), then the
// reversed sweep (suffix sums over queries) for dk, dv; see docs/cores/elementwise.md.
template <class T, int ORDER>
__global__ void ew_taylor_bwd(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ o,
                              const T* __restrict__ m, const T* __restrict__ den,
                              const T* __restrict__ dout, EW_MASK_PARAMS, int B, int H, int Hkv,
                              int L, int S, int D, int causal, int offset, T* __restrict__ dq,
                              T* __restrict__ dk, T* __restrict__ dv) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * H * D) return;
    ScanIndex x(t, H, Hkv, D);
    const Coeffs<ORDER> a;
    const long long kv0 = ((long long)x.b * Hkv + x.hk) * S * D + x.c;    // key 0, channel c
    const long long q0 = ((long long)x.b * H + x.h) * L * D + x.c;        // query 0, channel c
    const long long g0 = ((long long)x.b * H + x.h) * S * D + x.c;        // dk, dv per query head
    const unsigned char* mkeys = keep ? keep + x.b * mb + x.h * mh : nullptr;
    (void)ml;
    // forward sweep: dpsi_i = r_i sum_n n a_n psi^(n-1) (A_n - o_i B_n), r_i = do_i / den_i
    {
        Moments<ORDER> st;
        int added = 0;
        for (int i = 0; i < L; ++i) {
            added = add_keys_until<T, ORDER>(st, k + kv0, v + kv0, mkeys, ms, D, added,
                                             visible_end(i, S, causal, offset));
            const long long qi = q0 + (long long)i * D;
            if (st.mu == pos_inf<double>()) {
                dq[qi] = (T)0;
                continue;
            }
            const double psi = (double)q[qi], oi = (double)o[qi];
            double acc = 0.0;
#pragma unroll
            for (int n = ORDER; n >= 1; --n) acc = acc * psi + n * a.a[n] * (st.A[n] - oi * st.Bm[n]);
            dq[qi] = (T)((double)dout[qi] / (double)den[qi] * acc);
        }
    }
    // reversed sweep: G_n = sum_i a_n psi_i^n r_i exp(m_i - nu), Hs_n = the same times o_i,
    // over the queries that see the key; nu the largest m_i among them
    double G[ORDER + 1], Hs[ORDER + 1];
#pragma unroll
    for (int n = 0; n <= ORDER; ++n) G[n] = Hs[n] = 0.0;
    double nu = -pos_inf<double>();
    for (int j = visible_end(L - 1, S, causal, offset); j < S; ++j) {    // keys no query sees
        dk[g0 + (long long)j * D] = (T)0;
        dv[g0 + (long long)j * D] = (T)0;
    }
    for (int i = L - 1; i >= 0; --i) {
        const long long qi = q0 + (long long)i * D;
        const double mi = (double)m[qi];
        if (mi != pos_inf<double>()) {
            if (mi > nu) {                          // m_i grows backwards: shift up
                if (nu > -pos_inf<double>()) {
                    double r = exp(nu - mi);
#pragma unroll
                    for (int n = 0; n <= ORDER; ++n) { G[n] *= r; Hs[n] *= r; }
                }
                nu = mi;
            }
            double p = (double)dout[qi] / (double)den[qi] * exp(mi - nu);
            const double psi = (double)q[qi], oi = (double)o[qi];
#pragma unroll
            for (int n = 0; n <= ORDER; ++n) {
                G[n] += a.a[n] * p;
                Hs[n] += a.a[n] * p * oi;
                p *= psi;
            }
        }
        // keys first seen by query i: every query from i on sees them
        const int lo = i == 0 ? 0 : visible_end(i - 1, S, causal, offset);
        const int hi = visible_end(i, S, causal, offset);
        for (int j = lo; j < hi; ++j) {
            const long long gj = g0 + (long long)j * D;
            const bool kept = !mkeys || mkeys[j * ms];
            if (!kept || nu == -pos_inf<double>()) {
                dk[gj] = (T)0;
                dv[gj] = (T)0;
                continue;
            }
            const double kk = (double)k[kv0 + (long long)j * D];
            const double vv = (double)v[kv0 + (long long)j * D];
            const double g = exp(nu - kk * kk);
            double gv = 0.0, gk = 0.0;
            double pw = 1.0;                        // kappa^n
            double pm = 0.0;                        // n kappa^(n-1)
#pragma unroll
            for (int n = 0; n <= ORDER; ++n) {
                gv += pw * G[n];
                // d/dkappa exp(-kappa^2) kappa^n = exp(-kappa^2) (n kappa^(n-1) - 2 kappa^(n+1))
                gk += (pm - 2.0 * pw * kk) * (vv * G[n] - Hs[n]);
                pm = (n + 1) * pw;
                pw *= kk;
            }
            dk[gj] = (T)(g * gk);
            dv[gj] = (T)(g * gv);
        }
    }
}
