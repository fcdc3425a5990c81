// LoRA and AdaLoRA on dense rows (peftdecl_cupy.lora launches these):
//   shrink  U = α · (X Aᵀ) ⊙ e          [tokens, r]   (e: AdaLoRA's Λ per rank, or none)
//   expand  Y = [Y +] α · U Bᵀ           [tokens, n]   one pass over Y: the base output gets s·B A x in place
//   outer   G = α · Uᵀ X  [+ G]          [r, n]        dB (U = u, X = dy) and dA (U = du, X = h), split over tokens
// A and B are read through strides, so the backward reuses them: du = s·dy B is a shrink with Aᵀ := B and
// dx += du A an expand with B := Aᵀ. U and every workspace are in the accumulation type (float for bfloat16).
#include "common.cuh"
#include "lowrank_tiles.cuh"

template <typename T>
__device__ void lora_shrink(const T* x, long long ldx, const T* a, long long a_sr, long long a_sk,
                            const typename acc_of<T>::type* rank_scale, typename acc_of<T>::type* u,
                            long long ldu, int tokens, int K, int rank, double alpha) {
    typedef typename acc_of<T>::type A;
    const int t0 = blockIdx.x * SHRINK_TT, r0 = blockIdx.y * SHRINK_RT;
    A acc[4];
    shrink_tile<T, A>(x, ldx, a, a_sr, a_sk, t0, tokens, r0, rank, K, acc);
    const int r = r0 + threadIdx.x % SHRINK_RT, tg = threadIdx.x / SHRINK_RT;
    if (r >= rank) return;
    const A scale = A(alpha) * (rank_scale != nullptr ? rank_scale[r] : A(1));
    for (int j = 0; j < 4; ++j) {
        const int t = t0 + tg + 8 * j;
        if (t < tokens) u[(long long)t * ldu + r] = scale * acc[j];
    }
}

template <typename T>
__device__ void lora_expand(const typename acc_of<T>::type* u, long long ldu, const T* b, long long b_sn,
                            long long b_sr, T* y, long long ldy, int tokens, int N, int rank, double alpha,
                            int accumulate) {
    typedef typename acc_of<T>::type A;
    const int t0 = blockIdx.x * EXPAND_TT, n0 = blockIdx.y * EXPAND_NT;
    A acc[8];
    expand_tile<T, A>(u, ldu, b, b_sn, b_sr, t0, tokens, n0, N, rank, acc);
    const int n = n0 + threadIdx.x % EXPAND_NT, tg = threadIdx.x / EXPAND_NT;
    if (n >= N) return;
    for (int j = 0; j < 8; ++j) {
        const int t = t0 + tg + 4 * j;
        if (t >= tokens) continue;
        const long long i = (long long)t * ldy + n;
        // without accumulate Y is never read: a poisoned (NaN) output buffer must not leak into the result
        const A before = accumulate ? A(load(y, i)) : A(0);
        store(y, i, before + A(alpha) * acc[j]);
    }
}

// partial sums over tokens [z·per_split, (z+1)·per_split) added into ws[r, n] (zeroed by the caller)
template <typename T>
__device__ void lora_outer(const typename acc_of<T>::type* u, long long ldu, const T* x, long long ldx,
                           typename acc_of<T>::type* ws, int tokens, int rank, int N, int per_split) {
    typedef typename acc_of<T>::type A;
    const int n0 = blockIdx.x * OUTER_NT, r0 = blockIdx.y * OUTER_RT;
    const int t_lo = blockIdx.z * per_split, t_hi = min(tokens, t_lo + per_split);
    A acc[8];
    outer_tile<T, A>(u, ldu, x, ldx, t_lo, t_hi, r0, rank, n0, N, acc);
    const int n = n0 + threadIdx.x % OUTER_NT, rg = threadIdx.x / OUTER_NT;
    if (n >= N) return;
    for (int j = 0; j < 8; ++j) {
        const int r = r0 + rg + 4 * j;
        if (r < rank) atomicAdd(&ws[(long long)r * N + n], acc[j]);
    }
}

// G[r·g_sr + n·g_sn] = α · ws[r, n] (+ G): the outer product's result in the element type, at any layout
template <typename T>
__device__ void lora_finish(const typename acc_of<T>::type* ws, T* g, long long g_sr, long long g_sn, int rank,
                            int N, double alpha, int accumulate) {
    typedef typename acc_of<T>::type A;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rank * N) return;
    const long long r = i / N, n = i % N, at = r * g_sr + n * g_sn;
    const A before = accumulate ? A(load(g, at)) : A(0);
    store(g, at, before + A(alpha) * ws[i]);
}

#define PD_LORA_ENTRIES(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        lora_shrink_##SUFFIX(const T* x, long long ldx, const T* a, long long a_sr, long long a_sk,            \
                             const acc_of<T>::type* rank_scale, acc_of<T>::type* u, long long ldu, int tokens, \
                             int K, int rank, double alpha) {                                                   \
        lora_shrink<T>(x, ldx, a, a_sr, a_sk, rank_scale, u, ldu, tokens, K, rank, alpha);                      \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        lora_expand_##SUFFIX(const acc_of<T>::type* u, long long ldu, const T* b, long long b_sn,              \
                             long long b_sr, T* y, long long ldy, int tokens, int N, int rank, double alpha,    \
                             int accumulate) {                                                                  \
        lora_expand<T>(u, ldu, b, b_sn, b_sr, y, ldy, tokens, N, rank, alpha, accumulate);                      \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        lora_outer_##SUFFIX(const acc_of<T>::type* u, long long ldu, const T* x, long long ldx,                \
                            acc_of<T>::type* ws, int tokens, int rank, int N, int per_split) {                  \
        lora_outer<T>(u, ldu, x, ldx, ws, tokens, rank, N, per_split);                                          \
    }                                                                                                           \
    extern "C" __global__ void lora_finish_##SUFFIX(const acc_of<T>::type* ws, T* g, long long g_sr,           \
                                                    long long g_sn, int rank, int N, double alpha,              \
                                                    int accumulate) {                                           \
        lora_finish<T>(ws, g, g_sr, g_sn, rank, N, alpha, accumulate);                                          \
    }

PD_LORA_ENTRIES(f32, float)
PD_LORA_ENTRIES(f64, double)
PD_LORA_ENTRIES(bf16, bf16_t)
