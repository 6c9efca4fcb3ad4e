// Element-wise attention (VARIANTS.md section 5): fused kernels, no L x S x D array.
//
// Self-contained (no CUDA headers), compiled by NVRTC.  Layout: psi (B, H, L, D),
// kappa, v (B, Hkv, S, D), C-contiguous, queries and keys already multiplied by
// sqrt(scale); one thread per (query or key, channel), consecutive threads on
// consecutive channels (coalesced loads; threads of one row share the mask byte).
//
// DT: 0 = float16 storage, 1 = float32, 2 = float64.  The exact form accumulates
// in float32 (float64 for float64); the Taylor scans accumulate in float64 for
// every dtype, like the Numba backend: a prefix sum over 65536 keys in float32
// would lose up to L * 2^-24 ~ 4e-3 relative.

typedef unsigned short half_t;

__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

template <class To, class From> struct Conv { static __device__ __forceinline__ To f(From x) { return (To)x; } };
template <> struct Conv<float, half_t> { static __device__ __forceinline__ float f(half_t x) { return h2f(x); } };
template <> struct Conv<double, half_t> { static __device__ __forceinline__ double f(half_t x) { return h2f(x); } };
template <> struct Conv<half_t, float> { static __device__ __forceinline__ half_t f(float x) { return f2h(x); } };
template <> struct Conv<half_t, double> { static __device__ __forceinline__ half_t f(double x) { return f2h((float)x); } };
template <class To, class From> __device__ __forceinline__ To cvt(From x) { return Conv<To, From>::f(x); }

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float ln(float x) { return logf(x); }
__device__ __forceinline__ double ln(double x) { return log(x); }
template <class A> __device__ __forceinline__ A inf();
template <> __device__ __forceinline__ float inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

template <int DT> struct EwCfg;
template <> struct EwCfg<0> { typedef half_t T; typedef float Acc; };
template <> struct EwCfg<1> { typedef float T; typedef float Acc; };
template <> struct EwCfg<2> { typedef double T; typedef double Acc; };

// Keys [0, end) are visible to query i before the mask (j <= i + offset when causal).
__device__ __forceinline__ int visible_end(int i, int S, int causal, int offset) {
    return causal ? min(S, max(0, i + offset + 1)) : S;
}

#define MASK_PARAMS \
    const unsigned char *mask, long long mb, long long mh, long long ml, long long ms, \
        int H, int Hkv, int L, int S, int D, int causal, int offset
#define KEPT(b, h, i, j) (!mask || mask[(b) * mb + (h) * mh + (long long)(i) * ml + (long long)(j) * ms])

// ---------------------------------------------------------------------------
// Exact form: per channel, an online softmax of -(psi_i - kappa_j)^2 over keys.
// grid (ceil(L D / threads), B H); lse (B, H, L, D) in the accumulation type.
// ---------------------------------------------------------------------------
template <int DT>
__global__ void ew_exact_fwd(const typename EwCfg<DT>::T* __restrict__ q,
                             const typename EwCfg<DT>::T* __restrict__ k,
                             const typename EwCfg<DT>::T* __restrict__ v,
                             typename EwCfg<DT>::T* __restrict__ o,
                             typename EwCfg<DT>::Acc* __restrict__ lse, MASK_PARAMS) {
    typedef typename EwCfg<DT>::T T;
    typedef typename EwCfg<DT>::Acc Acc;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)L * D) return;
    const int i = (int)(idx / D), c = (int)(idx % D);
    const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / (H / Hkv);
    const T* kc = k + (long long)(b * Hkv + hk) * S * D + c;
    const T* vc = v + (long long)(b * Hkv + hk) * S * D + c;
    const Acc psi = cvt<Acc>(q[(long long)bh * L * D + idx]);
    Acc mx = -inf<Acc>(), den = Acc(0), acc = Acc(0);
    const int end = visible_end(i, S, causal, offset);
    for (int j = 0; j < end; ++j) {
        if (!KEPT(b, h, i, j)) continue;
        const Acc d = psi - cvt<Acc>(kc[(long long)j * D]);
        const Acc s = -d * d;
        if (s > mx) {  // new row maximum: rescale what was summed (exp(-inf) = 0 at the start)
            const Acc r = ex(mx - s);
            den *= r;
            acc *= r;
            mx = s;
        }
        const Acc e = ex(s - mx);
        den += e;
        acc += e * cvt<Acc>(vc[(long long)j * D]);
    }
    const long long out = (long long)bh * L * D + idx;
    o[out] = cvt<T>(den > Acc(0) ? acc / den : Acc(0));   // no key: o = 0, lse = -inf
    lse[out] = den > Acc(0) ? mx + ln(den) : -inf<Acc>();
}

// dpsi_i = sum_j -2 dS_ij (psi_i - kappa_j), dS_ij = P_ij do_i (v_j - o_i).
template <int DT>
__global__ void ew_exact_dq(const typename EwCfg<DT>::T* __restrict__ q,
                            const typename EwCfg<DT>::T* __restrict__ k,
                            const typename EwCfg<DT>::T* __restrict__ v,
                            const typename EwCfg<DT>::T* __restrict__ o,
                            const typename EwCfg<DT>::Acc* __restrict__ lse,
                            const typename EwCfg<DT>::T* __restrict__ dout,
                            typename EwCfg<DT>::T* __restrict__ dq, MASK_PARAMS) {
    typedef typename EwCfg<DT>::T T;
    typedef typename EwCfg<DT>::Acc Acc;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)L * D) return;
    const int i = (int)(idx / D), c = (int)(idx % D);
    const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / (H / Hkv);
    const T* kc = k + (long long)(b * Hkv + hk) * S * D + c;
    const T* vc = v + (long long)(b * Hkv + hk) * S * D + c;
    const long long at = (long long)bh * L * D + idx;
    const Acc l = lse[at];
    Acc acc = Acc(0);
    if (l > -inf<Acc>()) {  // an empty row has no gradient
        const Acc psi = cvt<Acc>(q[at]), oi = cvt<Acc>(o[at]), g = cvt<Acc>(dout[at]);
        const int end = visible_end(i, S, causal, offset);
        for (int j = 0; j < end; ++j) {
            if (!KEPT(b, h, i, j)) continue;
            const Acc d = psi - cvt<Acc>(kc[(long long)j * D]);
            const Acc p = ex(-d * d - l);
            acc -= Acc(2) * p * g * (cvt<Acc>(vc[(long long)j * D]) - oi) * d;
        }
    }
    dq[at] = cvt<T>(acc);
}

// dkappa_j = sum_i 2 dS_ij (psi_i - kappa_j), dv_j = sum_i P_ij do_i over the queries of
// every head of the GQA group.  grid (ceil(S D / threads), B Hkv).
template <int DT>
__global__ void ew_exact_dkdv(const typename EwCfg<DT>::T* __restrict__ q,
                              const typename EwCfg<DT>::T* __restrict__ k,
                              const typename EwCfg<DT>::T* __restrict__ v,
                              const typename EwCfg<DT>::T* __restrict__ o,
                              const typename EwCfg<DT>::Acc* __restrict__ lse,
                              const typename EwCfg<DT>::T* __restrict__ dout,
                              typename EwCfg<DT>::T* __restrict__ dk,
                              typename EwCfg<DT>::T* __restrict__ dv, MASK_PARAMS) {
    typedef typename EwCfg<DT>::T T;
    typedef typename EwCfg<DT>::Acc Acc;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)S * D) return;
    const int j = (int)(idx / D), c = (int)(idx % D);
    const int b = blockIdx.y / Hkv, hk = blockIdx.y % Hkv, group = H / Hkv;
    const long long at = (long long)blockIdx.y * S * D + idx;
    const Acc kap = cvt<Acc>(k[at]), vj = cvt<Acc>(v[at]);
    const int first = causal ? max(0, j - offset) : 0;  // queries that see key j
    Acc gk = Acc(0), gv = Acc(0);
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const long long row0 = ((long long)b * H + h) * L * D + c;
        for (int i = first; i < L; ++i) {
            if (!KEPT(b, h, i, j)) continue;
            const long long qi = row0 + (long long)i * D;
            const Acc l = lse[qi];
            if (!(l > -inf<Acc>())) continue;
            const Acc d = cvt<Acc>(q[qi]) - kap;
            const Acc p = ex(-d * d - l);
            const Acc g = cvt<Acc>(dout[qi]);
            gv += p * g;
            gk += Acc(2) * p * g * (vj - cvt<Acc>(o[qi])) * d;
        }
    }
    dk[at] = cvt<T>(gk);
    dv[at] = cvt<T>(gv);
}

// ---------------------------------------------------------------------------
// Taylor form: one thread per (batch, query head, channel) scans the sequence
// carrying the shifted moments A_n = sum_j exp(mu - kappa_j^2) kappa_j^n v_j and
// B_n (the same without v_j), mu = min kappa_j^2 so far (the underflow guard, see
// docs/cores/elementwise.md).  grid ceil(B H D / threads).  coef[n] = 2^n / n!.
// ---------------------------------------------------------------------------
#define MAX_ORDER 16

__device__ __forceinline__ void add_key(double* A, double* Bm, double& mu, double kk, double vv,
                                        int order) {
    const double x = kk * kk;
    if (x < mu) {  // smaller kappa^2: shift down, rescale the moments
        if (mu < inf<double>()) {
            const double r = exp(x - mu);
            for (int n = 0; n <= order; ++n) { A[n] *= r; Bm[n] *= r; }
        }
        mu = x;
    }
    double p = exp(mu - x);
    for (int n = 0; n <= order; ++n) {
        A[n] += p * vv;
        Bm[n] += p;
        p *= kk;
    }
}

template <int DT>
__global__ void ew_taylor_fwd(const typename EwCfg<DT>::T* __restrict__ q,
                              const typename EwCfg<DT>::T* __restrict__ k,
                              const typename EwCfg<DT>::T* __restrict__ v,
                              const double* __restrict__ coef, int order, int B,
                              typename EwCfg<DT>::T* __restrict__ o,
                              typename EwCfg<DT>::Acc* __restrict__ m_out,
                              typename EwCfg<DT>::Acc* __restrict__ den_out, MASK_PARAMS) {
    typedef typename EwCfg<DT>::T T;
    typedef typename EwCfg<DT>::Acc Acc;
    const long long task = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (task >= (long long)B * H * D) return;
    const int c = (int)(task % D), bh = (int)(task / D), b = bh / H, h = bh % H;
    const int hk = h / (H / Hkv);
    const T* kc = k + (long long)(b * Hkv + hk) * S * D + c;
    const T* vc = v + (long long)(b * Hkv + hk) * S * D + c;
    const long long row0 = (long long)bh * L * D + c;
    double A[MAX_ORDER + 1], Bm[MAX_ORDER + 1];
    for (int n = 0; n <= order; ++n) A[n] = Bm[n] = 0.0;
    double mu = inf<double>();
    int added = 0;
    for (int i = 0; i < L; ++i) {
        const int end = visible_end(i, S, causal, offset);
        for (; added < end; ++added)  // the Taylor mask depends on keys only (its L axis is 1)
            if (KEPT(b, h, 0, added))
                add_key(A, Bm, mu, cvt<double>(kc[(long long)added * D]),
                        cvt<double>(vc[(long long)added * D]), order);
        const long long at = row0 + (long long)i * D;
        if (mu == inf<double>()) {  // no key yet
            o[at] = cvt<T>(Acc(0));
            m_out[at] = inf<Acc>();
            den_out[at] = Acc(0);
            continue;
        }
        const double psi = cvt<double>(q[at]);
        double num = 0.0, dd = 0.0;
        for (int n = order; n >= 0; --n) {  // Horner in psi
            num = num * psi + coef[n] * A[n];
            dd = dd * psi + coef[n] * Bm[n];
        }
        o[at] = cvt<T>((Acc)(num / dd));
        m_out[at] = (Acc)mu;
        den_out[at] = (Acc)dd;
    }
}

// dpsi by the forward sweep; dkappa, dv per query head (B, H, S, D) by the reversed
// sweep carrying suffix sums G_n = sum_i a_n psi_i^n r_i exp(m_i - nu), H_n (times o_i).
template <int DT>
__global__ void ew_taylor_bwd(const typename EwCfg<DT>::T* __restrict__ q,
                              const typename EwCfg<DT>::T* __restrict__ k,
                              const typename EwCfg<DT>::T* __restrict__ v,
                              const typename EwCfg<DT>::T* __restrict__ o,
                              const typename EwCfg<DT>::Acc* __restrict__ m_in,
                              const typename EwCfg<DT>::Acc* __restrict__ den_in,
                              const typename EwCfg<DT>::T* __restrict__ dout,
                              const double* __restrict__ coef, int order, int B,
                              typename EwCfg<DT>::T* __restrict__ dq,
                              typename EwCfg<DT>::T* __restrict__ dk,
                              typename EwCfg<DT>::T* __restrict__ dv, MASK_PARAMS) {
    typedef typename EwCfg<DT>::T T;
    const long long task = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (task >= (long long)B * H * D) return;
    const int c = (int)(task % D), bh = (int)(task / D), b = bh / H, h = bh % H;
    const int hk = h / (H / Hkv);
    const T* kc = k + (long long)(b * Hkv + hk) * S * D + c;
    const T* vc = v + (long long)(b * Hkv + hk) * S * D + c;
    const long long row0 = (long long)bh * L * D + c;   // also the (b, h) slab of dk, dv (S rows)
    const long long key0 = (long long)bh * S * D + c;
    double A[MAX_ORDER + 1], Bm[MAX_ORDER + 1];
    // forward sweep: dpsi_i = r_i sum_n n a_n psi^(n-1) (A_n - o_i B_n), r_i = do_i / den_i
    for (int n = 0; n <= order; ++n) A[n] = Bm[n] = 0.0;
    double mu = inf<double>();
    int added = 0;
    for (int i = 0; i < L; ++i) {
        const int end = visible_end(i, S, causal, offset);
        for (; added < end; ++added)
            if (KEPT(b, h, 0, added))
                add_key(A, Bm, mu, cvt<double>(kc[(long long)added * D]),
                        cvt<double>(vc[(long long)added * D]), order);
        const long long at = row0 + (long long)i * D;
        if (mu == inf<double>()) { dq[at] = cvt<T>(typename EwCfg<DT>::Acc(0)); continue; }
        const double psi = cvt<double>(q[at]), oi = cvt<double>(o[at]);
        double acc = 0.0;
        for (int n = order; n > 0; --n) acc = acc * psi + n * coef[n] * (A[n] - oi * Bm[n]);
        dq[at] = cvt<T>((typename EwCfg<DT>::Acc)(cvt<double>(dout[at]) / (double)den_in[at] * acc));
    }
    // reversed sweep (A, Bm reused as G, H)
    double* G = A;
    double* Hs = Bm;
    for (int n = 0; n <= order; ++n) G[n] = Hs[n] = 0.0;
    double nu = -inf<double>();
    for (int j = visible_end(L - 1, S, causal, offset); j < S; ++j) {  // keys no query sees
        dk[key0 + (long long)j * D] = cvt<T>(typename EwCfg<DT>::Acc(0));
        dv[key0 + (long long)j * D] = cvt<T>(typename EwCfg<DT>::Acc(0));
    }
    for (int i = L - 1; i >= 0; --i) {
        const long long at = row0 + (long long)i * D;
        const double mi = (double)m_in[at];
        if (mi != inf<double>()) {
            if (mi > nu) {  // m_i grows backwards: shift up
                if (nu > -inf<double>()) {
                    const double r = exp(nu - mi);
                    for (int n = 0; n <= order; ++n) { G[n] *= r; Hs[n] *= r; }
                }
                nu = mi;
            }
            double p = cvt<double>(dout[at]) / (double)den_in[at] * exp(mi - nu);
            const double psi = cvt<double>(q[at]), oi = cvt<double>(o[at]);
            for (int n = 0; n <= order; ++n) {
                G[n] += coef[n] * p;
                Hs[n] += coef[n] * p * oi;
                p *= psi;
            }
        }
        // keys first seen by query i: every query from i on sees them
        const int lo = i == 0 ? 0 : visible_end(i - 1, S, causal, offset);
        for (int j = lo; j < visible_end(i, S, causal, offset); ++j) {
            const long long kat = key0 + (long long)j * D;
            if (!KEPT(b, h, 0, j) || nu == -inf<double>()) {
                dk[kat] = cvt<T>(typename EwCfg<DT>::Acc(0));
                dv[kat] = cvt<T>(typename EwCfg<DT>::Acc(0));
                continue;
            }
            const double kk = cvt<double>(kc[(long long)j * D]), vv = cvt<double>(vc[(long long)j * D]);
            const double g = exp(nu - kk * kk);
            double gv = 0.0, gk = 0.0, pw = 1.0, pm = 0.0;  // kappa^n, n kappa^(n-1)
            for (int n = 0; n <= order; ++n) {
                gv += pw * G[n];
                // d/dkappa exp(-kappa^2) kappa^n = exp(-kappa^2) (n kappa^(n-1) - 2 kappa^(n+1))
                gk += (pm - 2.0 * pw * kk) * (vv * G[n] - Hs[n]);
                pm = (n + 1) * pw;
                pw *= kk;
            }
            dk[kat] = cvt<T>((typename EwCfg<DT>::Acc)(g * gk));
            dv[kat] = cvt<T>((typename EwCfg<DT>::Acc)(g * gv));
        }
    }
}
